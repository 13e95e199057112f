"""Which fused kernels a model family will run here, said once per stage in one line.

A family that has a fast kernel path and a slow reference path (NemotronH: mamba-ssm's fused Mamba-2
scan, or transformers' pure-torch scan that is out of memory at long context on a GPU) declares
``kernels`` in its module (`elastic.models.<family>`): ``path(device)`` says which runs in this
environment, ``describe(path, device)`` says it in words with the install command. The plan
(`elastic.plan`) sizes the workspace for that path; a family without ``kernels`` has one path and
nothing to log.

Every stage that runs a model calls `announce` once, at its start. That line replaces transformers'
own: since 5.x it logs "`<function>` is falling back to its reference PyTorch implementation ..." from
``transformers.integrations.hub_kernels``, once per kernel function (up to five for NemotronH, in the
middle of progress bars). `quiet` installs a filter on that one logger that drops only those lines;
every other transformers warning still shows.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

# the logger and the words of transformers' per-function fallback line (5.24 and 5.25 alike)
FALLBACK_LOGGER = "transformers.integrations.hub_kernels"
FALLBACK_TEXT = "is falling back to its reference PyTorch implementation"


class _DropFallbackLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FALLBACK_TEXT not in record.getMessage()


def quiet() -> None:
    """Drop transformers' repeated kernel-fallback lines (our `announce` line says the same, once); idempotent."""
    logger = logging.getLogger(FALLBACK_LOGGER)
    if not any(isinstance(f, _DropFallbackLines) for f in logger.filters):
        logger.addFilter(_DropFallbackLines())


def path(model_or_config, device: Any = None) -> str | None:
    """``kernel`` or ``torch`` for a family with a kernel choice (on `device`, if given), else None."""
    from elastic.models import family_attr

    facts = family_attr(model_or_config, "kernels")
    return facts.path(device) if facts is not None else None


def describe(model_or_config, path_: str | None = None, device: Any = None) -> str | None:
    """One log line saying which path runs (and, on the slow one, how to get the kernels); None for a
    family without a kernel choice."""
    from elastic.models import family_attr

    facts = family_attr(model_or_config, "kernels")
    return facts.describe(path_, device) if facts is not None else None


def announce(stage: str, model_or_config, device: Any = None, printer: Callable[[str], Any] = print) -> str | None:
    """Say which kernel path `stage` runs (``[stage] <line>``) and silence transformers' own lines.

    Call it once per stage, before the first forward. Returns the line (None: the family has one path,
    nothing is printed)."""
    quiet()
    line = describe(model_or_config, device=device)
    if line:
        printer(f"[{stage}] {line}")
    return line
