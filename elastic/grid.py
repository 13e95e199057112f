"""The grid: every architecture of a search space within a budget band, and the best of them by held-out loss.

Minitron's rule, shared by the prune stage (how `prune.target` becomes a shape) and the search stage (the
router's prior, ``search.router.prior=grid``: each budget's router starts at the shape this rule picks). Nothing
here knows a family: the axes come from the parent's sizes type, the slice from the caller.
"""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

from elastic.arch import ArchError, human_count
from elastic.inputs import heldout_loss
from elastic.models.family import Ranking, Sizes
from elastic.search_space import Space


def candidates(parent: Sizes, space: Space, ranking: Ranking, target: float, count: Callable[[Sizes], float],
               tolerance: float, protect_kinds: str) -> list[Sizes]:
    """Every architecture of `space` whose `count` lies in ``[(1 - tolerance) * target, target]``, largest first
    (ties: wider residual stream, then more layers)."""
    protect = parent.protected(protect_kinds)
    kept = {d: ranking.layers_after_dropping(d, parent.num_layers, protect) for d in space.drops}
    lo = (1 - float(tolerance)) * target
    out, smallest, largest = [], None, None
    for sizes, d in space:
        a = parent.with_sizes(sizes, kept[d])
        n = count(a)
        smallest = n if smallest is None else min(smallest, n)
        largest = n if largest is None else max(largest, n)
        if lo <= n <= target:
            out.append(a)
    if not out:
        raise ArchError(
            f"no architecture of the grid has between {human_count(lo)} and {human_count(target)} parameters "
            f"(the grid spans {human_count(smallest)} .. {human_count(largest)}; widen max_width_prune / max_depth_prune, "
            "refine granularity or raise tolerance)"
        )
    out.sort(key=lambda a: (-count(a), -a.hidden_size, -a.num_layers))
    return out


def score(model, cands: list[Sizes], ranking: Ranking, batches, slice_model, desc: str = "scoring candidates") -> list[tuple[float, Sizes]]:
    """(held-out loss, architecture) of each candidate, sliced from `model` with `ranking` one at a time."""
    out = []
    for a in tqdm(cands, desc=desc, unit="arch"):
        child = slice_model(model, a, ranking)
        out.append((heldout_loss(child, batches), a))
        del child
    return out


def pick(model, cands: list[Sizes], ranking: Ranking, batches, slice_model, desc: str = "scoring candidates"):
    """The grid's choice among `cands` (largest first): the lowest held-out loss on `batches`, or the largest
    when there is nothing to score (no batches, or one candidate). Returns (architecture, scored or None)."""
    if batches is None or len(cands) < 2:
        return cands[0], None
    scored = score(model, cands, ranking, batches, slice_model, desc)
    return min(scored, key=lambda t: t[0])[1], scored
