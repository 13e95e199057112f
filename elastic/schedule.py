"""How long the training stages run, parsed from the config: the distill phases and the search's settle steps.

Read by the stages that train (`stages/distill.py`, `stages/search.py`) and by the plan that prices them
(`elastic/plan.py`), so it sits below both: the plan never imports a stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["DistillError", "Phase", "parse_phases", "settle_steps"]


class DistillError(ValueError):
    """Bad input for the distill stage (reported as one line by `elastic.run`)."""


@dataclass(frozen=True)
class Phase:
    """One curriculum phase (a `distill.phases` entry)."""

    name: str
    seq_len: int
    batch_size: int               # global batch in sequences (all processes, all accumulation steps)
    micro_batch_size: int         # sequences per process per forward
    lr: float
    warmup_steps: int = 0
    max_steps: int | None = None
    max_tokens: int | None = None  # token budget; steps = ceil(max_tokens / (batch_size * seq_len))

    def steps(self, cap: int | None = None) -> int:
        tokens_per_step = self.batch_size * self.seq_len
        candidates = [s for s in (self.max_steps, math.ceil(self.max_tokens / tokens_per_step) if self.max_tokens else None, cap) if s]
        if not candidates:
            raise DistillError(f"phase {self.name!r} needs max_steps or max_tokens")
        return int(min(candidates))


def parse_phases(dcfg: Any) -> list[Phase]:
    """The `distill.phases` list, checked (unique folder names, sizes, batch divisibility)."""
    raw = list(dcfg.get("phases") or [])
    if not raw:
        raise DistillError("distill.phases is empty: give at least one phase (name, seq_len, batch_size, lr, ...)")
    phases, names = [], set()
    for i, p in enumerate(raw):
        p = dict(p)
        p.setdefault("name", f"phase{i + 1}")
        p.setdefault("micro_batch_size", p.get("batch_size"))
        unknown = set(p) - set(Phase.__dataclass_fields__)
        if unknown:
            raise DistillError(f"distill.phases[{i}] has unknown keys {sorted(unknown)}")
        try:
            ph = Phase(**{k: v for k, v in p.items()})
        except TypeError as e:
            raise DistillError(f"distill.phases[{i}]: {e}") from None
        if ph.name in names or not str(ph.name).replace("_", "").replace("-", "").isalnum():
            raise DistillError(f"distill.phases[{i}]: phase names must be unique folder names, got {ph.name!r}")
        if ph.seq_len < 2 or ph.batch_size < 1 or ph.micro_batch_size < 1 or not ph.lr > 0:
            raise DistillError(f"distill.phases[{i}] ({ph.name}): seq_len >= 2, batch sizes >= 1 and lr > 0 needed")
        if ph.batch_size % ph.micro_batch_size:
            raise DistillError(f"distill.phases[{i}] ({ph.name}): batch_size {ph.batch_size} is not a multiple of "
                               f"micro_batch_size {ph.micro_batch_size}")
        names.add(ph.name)
        phases.append(ph)
    return phases


def settle_steps(c) -> int:
    """The search's final steps with the router frozen (``search.settle_share`` of ``search.steps``)."""
    return int(round(float(c.get("settle_share") or 0.0) * int(c.steps)))
