"""The discrete search space of sub-networks of a parent, and budgets over it.

Used by the prune stage's grid search and by the search stage's router (its per-axis choice lists):
every width axis of the family moves in configurable steps (per group for grouped axes), widths stay
within `max_width_prune` of the parent, depth drops at most `max_depth_prune` of the layers (least
important first). Nothing here knows a family: the axes come from the parent's sizes type.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Mapping

from elastic.arch import ArchError, human_count

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
# A number above 1 and below this is neither a fraction nor a plausible parameter count: `2.0` or `1.5`
# is a typo for "2B" / "1.5B" or a percentage, and read as a count it ends in "no architecture of the
# grid has between 2 and 2 parameters". Refused instead of guessed.
MIN_COUNT = 1000


def read_budget(value, key: str, *, counts: bool = True) -> float:
    """A budget as the user wrote it: a fraction of the parent in (0, 1] (0.6, "0.6"), or, where `counts`,
    a parameter count of at least `MIN_COUNT` (4e9, "4e9", "4B", "600M"). Every key that takes a budget
    (prune.target, search.budgets, budget) reads it here, so each refuses the same inputs with one line."""
    how = "a fraction of the parent (0.6)" + (", or a parameter count (4e9, \"4B\", \"600M\")" if counts else "")
    raw = value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([KMBGT]?)\s*", value, flags=re.I)
        if not m:
            raise ArchError(f"cannot read {key}={raw!r}: write {how}")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()] if m.group(2) else float(m.group(1))
    try:
        if isinstance(value, bool):  # YAML's yes/no: True would read as 1.0, the whole parent
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise ArchError(f"cannot read {key}={raw!r}: write {how}") from None
    if not value > 0 or math.isinf(value):
        raise ArchError(f"{key}={raw!r} must be positive and finite: write {how}")
    if value <= 1:
        return value
    if not counts:
        raise ArchError(f"{key}={raw!r} is not a fraction of the parent in (0, 1]: write 0.6 for 60% of the parent")
    if value < MIN_COUNT:
        raise ArchError(f"{key}={raw!r} is ambiguous (a fraction above 1, or a count of {value:g} parameters?): "
                        f"write {how}")
    return value


def parse_budget(target, parent_params: int, key: str = "prune.target") -> int:
    """A parameter budget as an absolute count: a fraction of the parent (<= 1), a count, or "4B"/"600M"."""
    target = read_budget(target, key)
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


def check_granularity(granularity: Mapping[str, int], axes) -> dict[str, int]:
    """`granularity` keys are axis names of any family (a recipe may name axes another family has);
    keys that are no family's axis are typos: one error naming the known ones."""
    from elastic.models import all_axis_names

    known = all_axis_names()
    unknown = set(granularity) - known
    if unknown:
        raise ArchError(f"granularity has unknown axes {sorted(unknown)}; axes are {sorted(known)}")
    return {a.name: int(granularity.get(a.name, 1)) for a in axes}


@dataclass(frozen=True)
class Space:
    """Per-axis choices (total units, every width axis of the parent's family, hidden first) for
    sub-networks of `parent`; `drops` is the number of layers removed."""

    parent: object  # the family's Sizes
    choices: dict[str, tuple[int, ...]]
    drops: tuple[int, ...]

    @classmethod
    def build(cls, parent, *, granularity: Mapping[str, int] | None = None, max_width_prune: float = 0.4,
              max_depth_prune: float = 0.2, protect_kinds: str = "") -> "Space":
        """`granularity[axis]` is the step in units per group (channels for hidden and FFN; heads per
        group for grouped head axes)."""
        if not 0 <= max_width_prune < 1 or not 0 <= max_depth_prune < 1:
            raise ArchError("max_width_prune and max_depth_prune must be in [0, 1)")
        steps = check_granularity(granularity or {}, parent.axes())
        keep = 1 - max_width_prune
        choices = {}
        for a in parent.axes():
            full, g = parent.axis_size(a.name), a.groups(parent)
            present = not a.kinds or any(k in parent.pattern for k in a.kinds)
            choices[a.name] = tuple(g * v for v in axis_choices(full // g, steps[a.name], keep)) if present else (full,)
        droppable = sum(k not in protect_kinds for k in parent.pattern)
        max_drop = min(int(math.floor(max_depth_prune * parent.num_layers)), droppable)
        return cls(parent=parent, choices=choices, drops=tuple(range(0, max_drop + 1)))

    def with_choices(self, explicit: Mapping[str, list[int]], protect_kinds: str = "") -> "Space":
        """Explicit per-axis choice lists (``drops`` for depth) replacing the built ones."""
        names = set(self.choices) | {"drops"}
        unknown = set(explicit) - names
        if unknown:
            raise ArchError(f"unknown axes {sorted(unknown)} for {self.parent.MODEL_TYPE}; use {sorted(names)}")
        choices = {a: tuple(int(x) for x in explicit.get(a, v)) for a, v in self.choices.items()}
        drops = tuple(int(x) for x in explicit.get("drops", self.drops))
        droppable = sum(k not in protect_kinds for k in self.parent.pattern)
        if drops and max(drops) > droppable:
            raise ArchError(f"cannot drop {max(drops)} layers: only {droppable} are not protected")
        return Space(parent=self.parent, choices=choices, drops=drops)

    def validate(self) -> None:
        """One clear error for every choice list an elastic model cannot hold."""
        p = self.parent
        for a in p.axes():
            vals, full, g = self.choices.get(a.name, ()), p.axis_size(a.name), a.groups(p)
            if not vals:
                raise ArchError(f"the {a.name} axis has an empty choice list")
            if any(v <= 0 or v > full for v in vals):
                raise ArchError(f"{a.name} choices {list(vals)} must lie in 1..{full} (the parent's size)")
            if list(vals) != sorted(set(vals)):
                raise ArchError(f"{a.name} choices {list(vals)} must be strictly increasing")
            if any(v % g for v in vals):
                raise ArchError(f"{a.name} choices {list(vals)} are not multiples of {a.groups_field}={g}: "
                                "every group must keep the same number of units (use a per-group granularity)")
        if not self.drops or list(self.drops) != sorted(set(self.drops)) or self.drops[0] < 0:
            raise ArchError(f"depth choices {list(self.drops)} must be a non-empty increasing list of layer counts >= 0")

    def size(self) -> int:
        return math.prod(len(v) for v in self.choices.values()) * len(self.drops)

    def __iter__(self):
        """Every (axis sizes dict, layers dropped) of the space whose sizes the model class accepts."""
        names = list(self.choices)
        for combo in itertools.product(*self.choices.values(), self.drops):
            sizes = dict(zip(names, combo[:-1]))
            if self.parent.allows(sizes):
                yield sizes, combo[-1]
