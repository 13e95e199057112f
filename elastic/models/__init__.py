"""Model families, registered by Hugging Face `model_type`.

A family is a module here (``llama.py``) or a package (``nemotron_h/``) that knows everything
architecture-specific: its elastic axes and their granularity, its sizes type (parameter count,
memory, exported config), its importance hooks, the physical slice and the masked (elastic) wrapper.
A package splits these by role into submodules that import only downward (sizes, surgery, masking,
plan, ...), and its ``__init__`` is the interface re-exporting them; no submodule imports it.
The interface is described in `elastic.models.family`; stages and core modules reach a family only
through `family_for`.

Adding a family = one new module or package + one line in `FAMILIES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# model_type -> the module implementing the family (imported on first use)
FAMILIES: dict[str, str] = {
    "nemotron_h": "elastic.models.nemotron_h",
    **{t: "elastic.models.llama" for t in ("llama", "qwen2", "qwen3", "mistral")},
}
SUPPORTED = frozenset(FAMILIES)


def model_type_of(model_or_config) -> str | None:
    """`model_type` of a model, a config object or a config dict."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)


def family_for(model_or_config) -> ModuleType:
    """The family module for a model, a config or a config dict; a clear error for unsupported ones."""
    model_type = model_or_config if isinstance(model_or_config, str) else model_type_of(model_or_config)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED)}")
    return importlib.import_module(FAMILIES[model_type])


def all_axis_names() -> set[str]:
    """Every axis name of every registered family (config keys may name any of them)."""
    names = {"hidden"}
    for model_type in FAMILIES:
        names |= {a.name for a in family_for(model_type).Sizes.AXES}
    return names
def family_attr(model_or_config, name: str):
    """An optional attribute a family may declare (`plan_model`, `export_facts`, `kernels`), or None when
    the family has none or the model type is not registered (callers then use the generic behaviour)."""
    model_type = model_or_config if isinstance(model_or_config, str) else model_type_of(model_or_config)
    return getattr(family_for(model_type), name, None) if model_type in FAMILIES else None
