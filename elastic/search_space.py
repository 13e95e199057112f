"""The discrete search space of sub-networks of a parent, and budgets over it.

Used by the prune stage's grid search (and by the router of the search stage for its per-axis choice
lists): every axis moves in configurable steps, widths stay within `max_width_prune` of the parent,
depth drops at most `max_depth_prune` of the layers (least important first).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from elastic.arch import Arch, ArchError, human_count

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_budget(target, parent_params: int) -> int:
    """A parameter budget as an absolute count: a fraction of the parent (<= 1), a count, or "4B"/"600M"."""
    if isinstance(target, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMBGT]?)\s*", target, flags=re.I)
        if not m:
            raise ArchError(f"cannot read the budget {target!r}: use a fraction (0.6), a count (4e9) or '4B' / '600M'")
        target = float(m.group(1)) * _SUFFIX.get(m.group(2).upper(), 1) if m.group(2) else float(m.group(1))
    target = float(target)
    if target <= 0:
        raise ArchError(f"the budget must be positive, got {target}")
    n = round(target * parent_params) if target <= 1 else round(target)
    if n > parent_params:
        raise ArchError(f"the budget {human_count(n)} exceeds the parent's {human_count(parent_params)} parameters")
    return n


def axis_choices(full: int, step: int, min_keep: float) -> list[int]:
    """Allowed sizes of one axis: multiples of `step` from ceil(min_keep * full) up to `full` (always included)."""
    if step <= 0:
        raise ArchError(f"granularity must be positive, got {step}")
    lo = math.ceil(min_keep * full)
    vals = [v for v in range(step, full + 1, step) if v >= lo]
    if full not in vals:
        vals.append(full)
    return sorted(vals)


@dataclass(frozen=True)
class Space:
    """Per-axis choices for sub-networks of `parent`. `drops` is the number of layers removed."""

    parent: Arch
    hidden: tuple[int, ...]
    ffn: tuple[int, ...]
    mamba_heads: tuple[int, ...]
    drops: tuple[int, ...]

    @classmethod
    def build(
        cls,
        parent: Arch,
        *,
        hidden_step: int = 64,
        ffn_step: int = 64,
        mamba_heads_per_group_step: int = 1,
        max_width_prune: float = 0.4,
        max_depth_prune: float = 0.2,
        protect_kinds: str = "",
    ) -> "Space":
        if not 0 <= max_width_prune < 1 or not 0 <= max_depth_prune < 1:
            raise ArchError("max_width_prune and max_depth_prune must be in [0, 1)")
        keep = 1 - max_width_prune
        g = parent.n_groups
        hpg = parent.mamba_num_heads // g
        droppable = sum(k not in protect_kinds for k in parent.pattern)
        max_drop = min(int(math.floor(max_depth_prune * parent.num_layers)), max(droppable - 0, 0))
        return cls(
            parent=parent,
            hidden=tuple(axis_choices(parent.hidden_size, hidden_step, keep)),
            ffn=tuple(axis_choices(parent.intermediate_size, ffn_step, keep)) if "-" in parent.pattern else (parent.intermediate_size,),
            mamba_heads=tuple(g * h for h in axis_choices(hpg, mamba_heads_per_group_step, keep)) if "M" in parent.pattern else (parent.mamba_num_heads,),
            drops=tuple(range(0, max_drop + 1)),
        )

    def size(self) -> int:
        return len(self.hidden) * len(self.ffn) * len(self.mamba_heads) * len(self.drops)

    def __iter__(self):
        return itertools.product(self.hidden, self.ffn, self.mamba_heads, self.drops)
