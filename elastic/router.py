"""The Nemotron Elastic router: a target budget -> a distribution over each axis's choices.

One `AxisRouter` per axis of the family (hidden, its per-layer width axes, depth), each ``Linear(n_budgets, 256) ->
LeakyReLU(0.1) -> Linear(256, n_choices)`` with the output layer initialised with std 0.1. The input
is a one-hot over the trained budgets; a budget between two trained ones interpolates their
one-hots linearly. Sampling is Gumbel-softmax on ``scale * logits`` with temperature ``tau``
(`Schedule`: ``tau = max(tau_min, tau0 * decay**step)``, ``scale`` rising linearly 1 -> 10); a hard
sample is the straight-through one-hot; extraction takes the argmax.

`Cost` is the differentiable closed form of the resource the budget constrains -- parameters, the
parameters one token touches (``active_params``: mixture-of-experts layers count their top-k routed
experts), or memory (weights + KV cache + recurrent state at a context length and batch) -- evaluated
on the *expected* architecture (``probs @ choices`` per width axis, expected number of kept layers of
each kind for depth). At one-hot probabilities it equals the sizes type's ``num_params()`` /
``active_params()`` / ``memory_bytes()`` exactly: each is the family's one closed form (tested). The budget loss is ``|C / (budget * C_full) - 1|``, zero inside a ``band``
(default 5%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic.arch import ArchError
from elastic.search_space import Space, read_budget

RESOURCES = ("params", "non_embedding_params", "active_params", "memory")


def check_budgets(budgets) -> tuple[float, ...]:
    """Budgets as fractions of the parent's resource, in (0, 1], distinct, sorted ascending."""
    if isinstance(budgets, (str, int, float)):
        raise ArchError(f"search.budgets must be a list of fractions in (0, 1], got {budgets!r}")
    out = tuple(read_budget(b, "search.budgets", counts=False) for b in budgets)
    if not out:
        raise ArchError("the list of budgets is empty")
    if len(set(out)) != len(out):
        raise ArchError(f"budgets must be distinct, got {list(out)}")
    return tuple(sorted(out))


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------
class Cost:
    """The resource of an architecture of `space` as a closed form in the (expected) axis sizes.

    The closed form is the family's own (`Sizes.params_of` / `active_of` / `memory_of`), the one that gives
    every parameter count in the project: the router's cost and the extracted model cannot disagree.
    ``kept_layers[j]`` are the layers kept by depth choice ``j`` (from the elastic model).
    """

    def __init__(self, space: Space, kept_layers, resource: str = "params", context: int = 4096,
                 batch: int = 1, bytes_per_value: int = 2):
        if resource not in RESOURCES:
            raise ArchError(f"budget resource must be one of {RESOURCES}, got {resource!r}")
        self.space, self.parent, self.resource = space, space.parent, resource
        self.context, self.batch, self.bpv = int(context), int(batch), int(bytes_per_value)
        p = self.parent
        self.kinds = p.KINDS
        counts = [[sum(p.pattern[i] == k for i in kept) for k in self.kinds] for kept in kept_layers]
        self.kind_counts = torch.tensor(counts, dtype=torch.float64)  # [J_depth, kinds]
        self.choices = {a: torch.tensor(v, dtype=torch.float64) for a, v in space.choices.items()}

    def of_sizes(self, sizes: dict, counts):
        """The cost for (possibly fractional, differentiable) axis sizes and kept-layer counts per kind
        (`counts[..., k]` for kind ``self.kinds[k]``)."""
        per_kind = {k: counts[..., i] for i, k in enumerate(self.kinds)}
        if self.resource == "params":
            return self.parent.params_of(sizes, per_kind)
        if self.resource == "non_embedding_params":
            return self.parent.params_of(sizes, per_kind) - self.parent.embedding_of(sizes)
        if self.resource == "active_params":
            return self.parent.active_of(sizes, per_kind)
        return self.parent.memory_of(sizes, per_kind, self.context, self.batch, self.bpv)

    def expected(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cost of the expected architecture under per-axis probabilities (differentiable, float64)."""
        sizes = {a: probs[a].to(torch.float64) @ c.to(probs[a].device) for a, c in self.choices.items()}
        counts = probs["depth"].to(torch.float64) @ self.kind_counts.to(probs["depth"].device)
        return self.of_sizes(sizes, counts)

    def of_arch(self, arch) -> int:
        """The same cost read from a sizes object (its num_params / active_params / memory_bytes)."""
        if self.resource == "memory":
            return arch.memory_bytes(self.context, self.batch, self.bpv)
        return arch.count_of(self.resource)

    @property
    def full(self) -> int:
        return self.of_arch(self.parent)


def budget_loss(cost: torch.Tensor, budget: float, full: float, band: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``|C / (budget * C_full) - 1|``, zero inside the band; returns (loss, ratio)."""
    ratio = cost / (budget * full)
    dev = (ratio - 1).abs()
    return torch.where(dev > band, dev, torch.zeros_like(dev)), ratio.detach()


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """Temperature ``tau0 * decay**step`` clipped at ``tau_min``; logit scale ``1 -> scale_max`` linearly.

    ``decay=None`` picks the decay that reaches ``tau_min`` at the last step (short runs; the paper's
    0.9999 suits ~30K steps).
    """

    total_steps: int
    tau0: float = 1.0
    tau_min: float = 0.05
    decay: float | None = None
    scale_max: float = 10.0

    def __post_init__(self):
        if not 0 < self.tau_min <= self.tau0:
            raise ArchError(f"need 0 < tau_min <= tau0, got tau_min={self.tau_min}, tau0={self.tau0}")
        if self.decay is None:
            self.decay = (self.tau_min / self.tau0) ** (1.0 / max(1, self.total_steps - 1))
        if not 0 < self.decay <= 1:
            raise ArchError(f"tau decay must be in (0, 1], got {self.decay}")

    def tau(self, step: int) -> float:
        return max(self.tau_min, self.tau0 * self.decay ** step)

    def scale(self, step: int) -> float:
        return 1.0 + (self.scale_max - 1.0) * min(1.0, step / max(1, self.total_steps - 1))


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------
class AxisRouter(nn.Module):
    def __init__(self, n_budgets: int, n_choices: int, hidden: int = 256, init_std: float = 0.1):
        super().__init__()
        if n_choices < 1:
            raise ArchError("a router needs at least one choice")
        self.net = nn.Sequential(nn.Linear(n_budgets, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, n_choices))
        nn.init.normal_(self.net[2].weight, std=init_std)
        nn.init.zeros_(self.net[2].bias)
        # fixed prior logits per trained budget (zero = none; `Router.set_prior`): added to the network's output, so
        # the router starts at the prior's choice and leaves it only as far as its trained logits outweigh it
        self.register_buffer("prior", torch.zeros(n_budgets, n_choices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x @ self.prior


class Router(nn.Module):
    """One `AxisRouter` per axis; ``choices[axis]`` are the sizes of `space` (drops for depth)."""

    def __init__(self, budgets, space: Space, hidden: int = 256, init_std: float = 0.1):
        super().__init__()
        self.budgets = check_budgets(budgets)
        self.sizes = {**space.choices, "depth": space.drops}
        self.axes = tuple(self.sizes)
        self.routers = nn.ModuleDict({a: AxisRouter(len(self.budgets), len(self.sizes[a]), hidden, init_std) for a in self.axes})
        self.hidden, self.init_std = hidden, init_std

    def budget_input(self, budget: float) -> torch.Tensor:
        """One-hot over the trained budgets; between two of them, the linear interpolation."""
        b, bs = float(budget), self.budgets
        dev = next(self.parameters()).device
        x = torch.zeros(len(bs), device=dev)
        for i, t in enumerate(bs):
            if math.isclose(b, t, rel_tol=0, abs_tol=1e-9):
                x[i] = 1.0
                return x
        if not bs[0] < b < bs[-1]:
            raise ArchError(
                f"budget {b} lies outside the trained budgets {list(bs)}: the router can only interpolate between them"
            )
        hi = next(i for i, t in enumerate(bs) if t > b)
        w = (b - bs[hi - 1]) / (bs[hi] - bs[hi - 1])
        x[hi - 1], x[hi] = 1 - w, w
        return x

    def set_prior(self, budget: float, choices: dict[str, int], strength: float) -> None:
        """Start trained budget `budget` at the architecture `choices` (axis -> choice index, depth included):
        ``strength`` is added to that choice's logit (before the logit scale), on the budget's one-hot input only."""
        i = [j for j, t in enumerate(self.budgets) if math.isclose(float(budget), t, rel_tol=0, abs_tol=1e-9)]
        if not i:
            raise ArchError(f"a prior needs a trained budget; {budget} is not one of {list(self.budgets)}")
        for a, k in choices.items():
            prior = self.routers[a].prior
            prior[i[0]].zero_()
            prior[i[0], int(k)] = float(strength)

    def logits(self, budget: float) -> dict[str, torch.Tensor]:
        x = self.budget_input(budget)
        return {a: r(x) for a, r in self.routers.items()}

    def sample(self, budget: float, *, tau: float, scale: float, hard: bool = False,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Gumbel-softmax probabilities per axis (straight-through one-hot when `hard`).

        The noise comes from `generator` (CPU) so a step's sample depends only on its seed.
        """
        out = {}
        for a, lg in self.logits(budget).items():
            u = torch.rand(lg.shape, generator=generator, dtype=torch.float32).to(lg.device)
            g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
            y = F.softmax((lg * scale + g) / tau, dim=-1)
            if hard:
                # scatter, not F.one_hot: one_hot range-checks its index on the host (a device sync off CUDA)
                y_hard = torch.zeros_like(y).scatter_(0, y.argmax().unsqueeze(0), 1.0)
                y = y_hard - y.detach() + y
            out[a] = y
        return out

    @torch.no_grad()
    def argmax(self, budget: float) -> dict[str, int]:
        return {a: int(lg.argmax()) for a, lg in self.logits(budget).items()}

    def chosen_sizes(self, budget: float) -> dict[str, int]:
        return {a: int(self.sizes[a][i]) for a, i in self.argmax(budget).items()}

    def config(self) -> dict:
        return {"budgets": list(self.budgets), "hidden": self.hidden, "init_std": self.init_std,
                "sizes": {a: list(v) for a, v in self.sizes.items()}}

    @torch.no_grad()
    def constrained_argmax(self, budget: float, cost: "Cost", band: float = 0.05) -> tuple[dict[str, int], bool]:
        """The most probable architecture (sum of per-axis log-probabilities) whose cost is within the
        band of the budget; falls back to the most probable one (second value False) when none is.
        Either way only combinations the model class accepts (`Sizes.allows`) are chosen.

        The plain per-axis argmax can leave the band when the router's distribution is still spread
        (short runs); this decodes the same distribution under the budget constraint.
        """
        lp = {a: F.log_softmax(lg.double(), -1).cpu() for a, lg in self.logits(budget).items()}
        axes = self.axes  # width axes in the space's order, depth last
        shape = [len(lp[a]) for a in axes]
        view = lambda t, i: t.view(*[-1 if j == i else 1 for j in range(len(axes))])  # noqa: E731
        total = sum(view(lp[a], i) for i, a in enumerate(axes))
        d = len(axes) - 1
        # every combination at once: sizes broadcast over their own dimension, kind counts over depth's
        sizes = {a: view(cost.choices[a], i) for i, a in enumerate(axes[:-1])}
        c = cost.of_sizes(sizes, cost.kind_counts.view(*[shape[d] if j == d else 1 for j in range(len(axes))], -1))
        allowed = torch.as_tensor(cost.parent.allows(sizes)).expand(shape)
        ok = ((((c / (budget * cost.full)) - 1).abs() <= band).expand(shape)) & allowed
        in_band = bool(ok.any())
        if not in_band:
            if bool(allowed.all()):
                return self.argmax(budget), False
            ok = allowed
        flat = int(torch.where(ok, total.expand(shape), torch.tensor(-math.inf, dtype=total.dtype)).argmax())
        idx = []
        for n in reversed(shape):
            idx.append(flat % n)
            flat //= n
        return dict(zip(axes, reversed(idx))), in_band

    @classmethod
    def from_config(cls, config: dict, parent) -> "Router":
        s = config["sizes"]
        space = Space(parent=parent, choices={a: tuple(v) for a, v in s.items() if a != "depth"}, drops=tuple(s["depth"]))
        return cls(config["budgets"], space, hidden=config["hidden"], init_std=config["init_std"])
