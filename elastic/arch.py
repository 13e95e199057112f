"""Architecture sizes, reached without knowing the family.

Every size the pipeline talks about -- the parameter count, the weights kept by the surgery, the
exported `config.json`, the memory cost the router optimises -- comes from a family's sizes type
(`elastic.models.family.Sizes`; e.g. `elastic.models.nemotron_h.Sizes`). Core code reads one with
`sizes_from_config` / `sizes_from_dict`, which pick the family by ``model_type``.
"""

from __future__ import annotations

from typing import Any


class ArchError(ValueError):
    """An architecture that cannot exist (broken head groups, GQA, sizes above the parent, ...)."""


def sizes_from_config(config: Any):
    """The family's sizes of a config (object or dict) or of a model."""
    from elastic.models import family_for

    config = getattr(config, "config", config)
    try:
        family = family_for(config)
    except ValueError as e:
        raise ArchError(str(e)) from None
    return family.Sizes.from_config(config)


def sizes_from_dict(d: dict):
    """Sizes from `Sizes.to_dict()` output (which records the model_type)."""
    from elastic.models import family_for

    if "model_type" not in d:
        raise ArchError("these sizes record no model_type (written before model families existed): rerun the stage")
    try:
        family = family_for(d["model_type"])
    except ValueError as e:
        raise ArchError(str(e)) from None
    return family.Sizes.from_dict(d)


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
