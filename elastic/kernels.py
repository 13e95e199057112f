"""Which fused kernels a model family will run here, as one log line for the training stages.

A family that has a fast kernel path and a slow reference path (NemotronH: mamba-ssm's fused Mamba-2
scan, or transformers' pure-torch scan that is out of memory at long context on a GPU) declares
``kernels`` in its module (`elastic.models.<family>`): ``path()`` says which runs in this environment,
``describe(path)`` says it in words with the install command. The plan (`elastic.plan`) sizes the
workspace for that path; a family without ``kernels`` has one path and nothing to log.
"""

from __future__ import annotations


def path(model_or_config) -> str | None:
    """``kernel`` or ``torch`` for a family with a kernel choice, else None."""
    from elastic.models import family_attr

    facts = family_attr(model_or_config, "kernels")
    return facts.path() if facts is not None else None


def describe(model_or_config, path_: str | None = None) -> str | None:
    """One log line saying which path runs (and, on the slow one, how to get the kernels); None for a
    family without a kernel choice."""
    from elastic.models import family_attr

    facts = family_attr(model_or_config, "kernels")
    return facts.describe(path_) if facts is not None else None
