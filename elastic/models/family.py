"""The family interface: what a model family provides, and the parts every family shares.

A family module or package (``elastic/models/<family>.py`` or ``elastic/models/<family>/``, registered in
``elastic.models.FAMILIES``) defines:

* ``MODEL_TYPES``   -- the Hugging Face ``model_type`` values it handles (`Sizes.MODEL_TYPE` is one
  value, so a family covering several model types has one `Sizes` subclass per type and its
  ``Sizes.from_config`` / ``from_dict`` pick the subclass);
* ``Sizes``         -- a frozen dataclass subclassing `Sizes` below (the "Arch" role): the exact
  parameter count (one closed form, `Sizes.params_of`, also used by the router's differentiable
  cost), the inference memory, the config export (`to_config`, derived from the kept sizes);
* ``Elastic``       -- a subclass of `ElasticBase` below: the masked forward over its axes;
* ``decoder_layers(model)`` / ``set_decoder_layers(model, layers)`` -- the block list (depth);
* ``width_hooks(model, sizes, add)`` -- forward hooks feeding activation statistics to
  ``add(key, per_sequence [B, C])``: key ``"hidden"`` and ``"<axis>.<layer>"`` (one score per unit of
  the axis in that layer, e.g. per FFN neuron, per head);
* ``slice_model(model, sizes, ranking)`` -- the physical slice, a plain model of the same class whose
  config is ``sizes.to_config(model.config)``.

Axes. ``hidden`` (the residual stream, one ranking shared by every layer) and ``depth`` (whole layers)
belong to every family; the others are per-layer axes declared by `Axis`: the layer kinds that carry
them and, for grouped axes (Mamba heads within their group, query heads within their KV group), the
field giving the group count. A grouped axis keeps the same number of units in every group, ranked
within each group; every choice of an axis is a multiple of its group count.

One ranked index set drives both the physical slice and the masked forward: `Ranking` below holds a
permutation per axis (and per layer), `slice_model` gathers the ranked prefix of each axis, and
`ElasticBase.from_parent` stores the parent in importance order so a sub-network is a prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from elastic.arch import ArchError, human_count


# ---------------------------------------------------------------------------------------------
# axes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One per-layer width axis of a family.

    `field` is the `Sizes` field holding the kept count (total over groups), `kinds` the layer kinds
    that carry the axis, `groups_field` the `Sizes` field giving the number of groups (None = one
    group), `label` the name used in plots and summaries. An `optional` axis belongs only to networks
    that have its layer kinds (NemotronH's MoE axes): a dense network neither lists it in `Sizes.axes`
    nor gets a one-choice router, grid or name part for it, so it behaves as before the axis existed.
    """

    name: str
    field: str
    kinds: str
    label: str
    groups_field: str | None = None
    optional: bool = False

    def groups(self, sizes: "Sizes") -> int:
        return int(getattr(sizes, self.groups_field)) if self.groups_field else 1


HIDDEN = Axis("hidden", "hidden_size", "", "hidden size")


# ---------------------------------------------------------------------------------------------
# sizes (the "Arch" role)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Base of every family's sizes type. Subclasses are frozen dataclasses that add their own
    fields (the axis fields and the fixed ones), and define `AXES`, `KINDS`, `FIXED`, `MODEL_TYPE`,
    `params_of`, `kv_cache_of`, `state_of`, `from_config`, `to_config` and `short`.

    `pattern` has one letter per kept layer (its kind); `layers` are the kept layers' indices in the
    parent (``0..n-1`` for a network not cut from one).
    """

    pattern: str
    layers: tuple[int, ...] = ()

    AXES: ClassVar[tuple[Axis, ...]] = ()  # per-layer width axes (hidden and depth are implicit)
    KINDS: ClassVar[str] = ""  # the layer-kind letters this family uses
    FIXED: ClassVar[tuple[str, ...]] = ()  # fields a child must share with its parent
    MODEL_TYPE: ClassVar[str] = ""

    def __post_init__(self):
        if not self.layers:
            object.__setattr__(self, "layers", tuple(range(len(self.pattern))))
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        bad = set(self.pattern) - set(self.KINDS)
        if bad:
            raise ArchError(f"layer pattern {self.pattern!r} has unknown layer kinds {sorted(bad)}; "
                            f"{self.MODEL_TYPE} layers are {list(self.KINDS)}")
        if not self.pattern:
            raise ArchError("an architecture needs at least one layer")
        if len(self.layers) != len(self.pattern):
            raise ArchError(f"{len(self.layers)} kept layer indices for a pattern of {len(self.pattern)} layers")
        if list(self.layers) != sorted(set(self.layers)):
            raise ArchError(f"kept layer indices must be strictly increasing, got {list(self.layers)}")
        if self.hidden_size <= 0:
            raise ArchError(f"hidden_size must be positive, got {self.hidden_size}")
        for ax in self.AXES:
            if any(k in self.pattern for k in ax.kinds):
                n, g = self.axis_size(ax.name), ax.groups(self)
                if n <= 0:
                    raise ArchError(f"{ax.field} must be positive when its layers are kept, got {n}")
                if n % g:
                    raise ArchError(f"{ax.field}={n} is not a multiple of {ax.groups_field}={g}: every group "
                                    "must keep the same number of units")

    # ------------------------------------------------------------------ family hooks (override)
    def params_of(self, sizes: Mapping[str, Any], counts: Mapping[str, Any]):
        """Exact parameter count for axis sizes `sizes` (``hidden`` and every axis name) and `counts`
        kept layers per kind; works on numbers and (fractional, differentiable) tensors alike."""
        raise NotImplementedError

    def active_of(self, sizes: Mapping[str, Any], counts: Mapping[str, Any]):
        """Parameters one token touches (`params_of` with only the routed experts a token is sent to
        counted in mixture-of-experts layers); a family without such layers: `params_of`."""
        return self.params_of(sizes, counts)

    def kv_cache_of(self, sizes: Mapping[str, Any], counts: Mapping[str, Any], bytes_per_value: int):
        """KV-cache bytes per token."""
        raise NotImplementedError

    def state_of(self, sizes: Mapping[str, Any], counts: Mapping[str, Any], bytes_per_value: int):
        """Fixed per-sequence state bytes (recurrent layers), 0 for pure attention models."""
        raise NotImplementedError

    def allows(self, sizes: Mapping[str, Any]):
        """Whether axis sizes `sizes` give a config the model class accepts (ints, or broadcast tensors
        elementwise). Some classes refuse combinations the index math could cut (e.g. a hidden size not
        divisible by the head count); grids and the router's decode skip those."""
        return True

    @classmethod
    def from_config(cls, config: Any) -> "Sizes":
        raise NotImplementedError

    def to_config(self, parent_config: Any):
        raise NotImplementedError

    def short(self) -> str:
        widths = ", ".join(f"{a.label} {self.axis_size(a.name)}" for a in self.axes())
        kinds = " ".join(f"{self.count(k)}{k}" for k in self.KINDS if self.count(k))
        return f"{widths}, layers {self.num_layers} ({kinds}), {human_count(self.num_params())} params"

    # ------------------------------------------------------------------ generic
    @classmethod
    def all_axes(cls) -> tuple[Axis, ...]:
        """Every width axis the family declares, hidden first."""
        return (HIDDEN, *cls.AXES)

    def axes(self) -> tuple[Axis, ...]:
        """This network's width axes, hidden first: an `optional` axis only where its layer kinds occur."""
        return tuple(a for a in self.all_axes() if not a.optional or any(k in self.pattern for k in a.kinds))

    @classmethod
    def axis(cls, name: str) -> Axis:
        for a in cls.all_axes():
            if a.name == name:
                return a
        raise ArchError(f"{cls.MODEL_TYPE} has no axis {name!r}; its axes are {[a.name for a in cls.all_axes()]}, depth")

    def axis_size(self, name: str) -> int:
        return int(getattr(self, self.axis(name).field))

    def sizes(self) -> dict[str, int]:
        return {a.name: self.axis_size(a.name) for a in self.axes()}

    def counts(self) -> dict[str, int]:
        return {k: self.pattern.count(k) for k in self.KINDS}

    def count(self, kind: str) -> int:
        return self.pattern.count(kind)

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    def carries(self, axis: Axis, layer: int) -> bool:
        """Whether kept layer `layer` (an index into this network) has units of `axis`."""
        return self.pattern[layer] in axis.kinds

    def layout(self) -> dict[str, dict[int, tuple[int, int]]]:
        """Per-layer axes: axis -> layer -> (groups, units per group)."""
        out = {}
        for a in self.axes()[1:]:
            g = a.groups(self)
            out[a.name] = {i: (g, self.axis_size(a.name) // g) for i in range(self.num_layers) if self.carries(a, i)}
        return out

    def num_params(self) -> int:
        return int(self.params_of(self.sizes(), self.counts()))

    def active_params(self) -> int:
        """Parameters one token touches (`active_of`); equal to `num_params` for a family without experts."""
        return int(self.active_of(self.sizes(), self.counts()))

    def embedding_of(self, sizes: Mapping[str, Any]):
        """Input embedding plus an untied output head, for hidden size ``sizes["hidden"]``."""
        return self.vocab_size * sizes["hidden"] * (1 if self.tie_word_embeddings else 2)

    def embedding_params(self) -> int:
        return int(self.embedding_of(self.sizes()))

    def non_embedding_params(self) -> int:
        """What papers usually report (Minitron, the SmolLM2 benchmark): everything but the vocabulary's share."""
        return self.num_params() - self.embedding_params()

    # the parameter counts a budget may be given in (`prune.count`, `search.resource` besides memory)
    COUNTS: ClassVar[tuple[str, ...]] = ("params", "non_embedding_params", "active_params")

    def count_of(self, kind: str) -> int:
        """The parameter count named `kind` (one of `COUNTS`): the one dispatch the prune stage's budget and the
        router's cost share."""
        if kind not in self.COUNTS:
            raise ArchError(f"a parameter count must be one of {', '.join(self.COUNTS)}, got {kind!r}")
        return {"params": self.num_params, "non_embedding_params": self.non_embedding_params,
                "active_params": self.active_params}[kind]()

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return int(self.kv_cache_of(self.sizes(), self.counts(), bytes_per_value))

    def state_bytes(self, bytes_per_value: int = 2) -> int:
        return int(self.state_of(self.sizes(), self.counts(), bytes_per_value))

    def memory_of(self, sizes, counts, context: int, batch: int = 1, bytes_per_value: int = 2):
        """Weights + KV cache + recurrent state for `batch` sequences of `context` tokens."""
        return (self.params_of(sizes, counts) * bytes_per_value
                + batch * context * self.kv_cache_of(sizes, counts, bytes_per_value)
                + batch * self.state_of(sizes, counts, bytes_per_value))

    def memory_bytes(self, context: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        return int(self.memory_of(self.sizes(), self.counts(), context, batch, bytes_per_value))

    def replace(self, **changes) -> "Sizes":
        return dataclasses.replace(self, **changes)

    def with_sizes(self, sizes: Mapping[str, int | None], layers: tuple[int, ...]) -> "Sizes":
        """A child of this (parent) network: new axis sizes (None = keep) and the kept parent layers."""
        unknown = {k for k, v in sizes.items() if v is not None} - {a.name for a in self.axes()}
        if unknown:
            raise ArchError(f"{self.MODEL_TYPE} has no axes {sorted(unknown)}; its axes are "
                            f"{[a.name for a in self.axes()]}")
        changes = {self.axis(k).field: int(v) for k, v in sizes.items() if v is not None}
        child = dataclasses.replace(self, pattern="".join(self.pattern[i] for i in layers), layers=tuple(layers), **changes)
        child.check_within(self)
        return child

    def check_within(self, parent: "Sizes") -> None:
        """Raise `ArchError` unless this network can be cut out of `parent`."""
        if type(self) is not type(parent):
            raise ArchError(f"a {self.MODEL_TYPE} network cannot be cut out of a {parent.MODEL_TYPE} one")
        for a in self.axes():
            if self.axis_size(a.name) > parent.axis_size(a.name):
                raise ArchError(f"{a.field}={self.axis_size(a.name)} exceeds the parent's {parent.axis_size(a.name)}")
        for name in self.FIXED:
            if getattr(self, name) != getattr(parent, name):
                raise ArchError(f"{name} is fixed: {getattr(self, name)} != parent's {getattr(parent, name)}")
        if self.layers and max(self.layers) >= parent.num_layers:
            raise ArchError(f"layer index {max(self.layers)} does not exist in a {parent.num_layers}-layer parent")
        for i, kind in zip(self.layers, self.pattern):
            if parent.pattern[i] != kind:
                raise ArchError(f"layer {i} is {parent.pattern[i]!r} in the parent but {kind!r} here")

    def cut(self, ranking: "Ranking | None" = None, *, sizes: Mapping[str, int | None] | None = None,
            drop_layers: int = 0, layers: tuple[int, ...] | None = None, protect_kinds: str = "") -> "Sizes":
        """A child of this parent: new axis sizes and either explicit kept `layers` or the `drop_layers`
        least important ones dropped (by `ranking.depth`, never a layer whose kind is in `protect_kinds`)."""
        if layers is None:
            if drop_layers:
                if ranking is None:
                    raise ArchError("dropping layers by importance needs a ranking")
                layers = ranking.layers_after_dropping(drop_layers, self.num_layers, self.protected(protect_kinds))
            else:
                layers = tuple(range(self.num_layers))
        return self.with_sizes(sizes or {}, tuple(layers))

    def cut_fields(self, ranking: "Ranking | None", fields: Mapping[str, Any], protect_kinds: str = "") -> "Sizes":
        """`cut` from a mapping in the config's own field names (``hidden_size``, ``intermediate_size``,
        ...) plus ``drop_layers`` or ``layers``: what a user writes in ``prune.arch``."""
        names = {a.field: a.name for a in self.axes()}
        known = set(names) | {"drop_layers", "layers"}
        unknown = set(fields) - known
        if unknown:
            raise ArchError(f"unknown keys {sorted(unknown)}; known for {self.MODEL_TYPE}: {sorted(known)}")
        if "drop_layers" in fields and "layers" in fields:
            raise ArchError("give drop_layers or layers, not both")
        layers = tuple(int(i) for i in fields["layers"]) if fields.get("layers") is not None else None
        return self.cut(ranking, sizes={names[k]: v for k, v in fields.items() if k in names},
                        drop_layers=int(fields.get("drop_layers") or 0), layers=layers, protect_kinds=protect_kinds)

    def protected(self, protect_kinds: str) -> set[int]:
        return {i for i, k in enumerate(self.pattern) if k in protect_kinds}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["model_type"] = self.MODEL_TYPE
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sizes":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "layers" else v) for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------------------------
# importance hooks: the statistics every family's `width_hooks` feeds to `add(key, [B, C])`
# ---------------------------------------------------------------------------------------------
def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    """[B, S, C] -> [B, C]: mean over the sequence of |activation|."""
    return x.abs().float().mean(1)


def output_stat(add, key: str):
    """Forward hook: a module's output, per channel (e.g. a residual-stream norm for ``hidden``)."""
    return lambda _m, _inp, out: add(key, _mean_abs(out))


def input_stat(add, key: str):
    """Forward pre-hook: a module's input, per channel (e.g. an MLP's hidden activation before ``down``)."""
    return lambda _m, inp: add(key, _mean_abs(inp[0]))


def head_stat(add, key: str, n_heads: int):
    """Forward pre-hook: a projection's input split into `n_heads` equal heads, the L2 over each head's
    channels, averaged over the sequence: one score per head."""
    return lambda _m, inp: add(key, inp[0].float().unflatten(-1, (n_heads, -1)).norm(dim=-1).mean(1))


# ---------------------------------------------------------------------------------------------
# rankings
# ---------------------------------------------------------------------------------------------
def _order(x: torch.Tensor) -> torch.Tensor:
    """Stable descending sort: equal scores keep index order, so rankings are deterministic."""
    return torch.sort(x.float(), descending=True, stable=True).indices


def _is_perm(x: torch.Tensor, n: int) -> bool:
    return x.numel() == n and torch.equal(torch.sort(x.flatten()).values, torch.arange(n))


@dataclass
class Ranking:
    """Importance order of every axis of one network (most important first).

    `width[axis][layer]` is a ``[groups, units_per_group]`` tensor of local indices (one group for an
    ungrouped axis), keyed by the layer index in the model it ranks.
    """

    hidden: torch.Tensor  # [hidden_size] channel indices
    width: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    depth: torch.Tensor | None = None  # [num_layers] layer indices, most important first

    @classmethod
    def identity(cls, sizes: Sizes) -> "Ranking":
        return cls(
            hidden=torch.arange(sizes.hidden_size),
            width={a: {i: torch.arange(n).repeat(g, 1) for i, (g, n) in per.items()} for a, per in sizes.layout().items()},
            depth=torch.arange(sizes.num_layers),
        )

    @classmethod
    def random(cls, sizes: Sizes, generator: torch.Generator) -> "Ranking":
        """A uniformly random ranking: the baseline that importance must beat."""
        g = generator
        return cls(
            hidden=torch.randperm(sizes.hidden_size, generator=g),
            width={a: {i: torch.stack([torch.randperm(n, generator=g) for _ in range(gr)]) for i, (gr, n) in per.items()}
                   for a, per in sizes.layout().items()},
            depth=torch.randperm(sizes.num_layers, generator=g),
        )

    @classmethod
    def from_scores(cls, scores: dict[str, torch.Tensor], sizes: Sizes, depth_metric: str = "depth_mse") -> "Ranking":
        """Sort importance scores (higher = more important) into a ranking.

        `scores` holds ``hidden`` [H], ``<axis>.<layer>`` [units] for every per-layer axis, and the
        depth metrics [L]; grouped axes are ranked within each group."""
        layout = sizes.layout()
        width: dict[str, dict[int, torch.Tensor]] = {a: {} for a in layout}
        for key, val in scores.items():
            axis, _, layer = key.partition(".")
            if axis in layout and layer.isdigit() and int(layer) in layout[axis]:
                g, n = layout[axis][int(layer)]
                width[axis][int(layer)] = torch.stack([_order(row) for row in val.float().reshape(g, n)])
        if depth_metric not in scores:
            raise KeyError(f"no {depth_metric!r} scores; have {sorted(k for k in scores if k.startswith('depth'))}")
        return cls(hidden=_order(scores["hidden"]), width=width, depth=_order(scores[depth_metric]))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"hidden": self.hidden}
        for a, per in self.width.items():
            out.update({f"{a}.{i}": v for i, v in per.items()})
        if self.depth is not None:
            out["depth"] = self.depth
        return {k: v.to(torch.int64).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Ranking":
        width: dict[str, dict[int, torch.Tensor]] = {}
        for k, v in t.items():
            axis, _, layer = k.partition(".")
            if layer.isdigit():
                width.setdefault(axis, {})[int(layer)] = v if v.ndim == 2 else v.unsqueeze(0)
        return cls(hidden=t["hidden"], width=width, depth=t.get("depth"))

    def validate(self, sizes: Sizes) -> None:
        """Raise unless this ranking has one permutation per axis (per layer, per group) of `sizes`."""
        if not _is_perm(self.hidden, sizes.hidden_size):
            raise ArchError("hidden ranking is not a permutation of the hidden channels")
        for a, per in sizes.layout().items():
            for i, (g, n) in per.items():
                r = self.width.get(a, {}).get(i)
                if r is None or r.shape != (g, n) or not all(_is_perm(row, n) for row in r):
                    raise ArchError(f"layer {i}: the {a} ranking must be a per-group permutation [{g}, {n}]")
        if self.depth is not None and not _is_perm(self.depth, sizes.num_layers):
            raise ArchError("depth ranking is not a permutation of the layers")

    def hidden_index(self, k: int) -> torch.Tensor:
        return self.hidden[:k]

    def index(self, axis: str, layer: int, k: int) -> torch.Tensor:
        """Global indices of the `k` kept units of `axis` in `layer`: the top ``k / groups`` of each group,
        group by group (units of a group are contiguous)."""
        local = self.width[axis][layer]
        g, n = local.shape
        if k % g:
            raise ArchError(f"{axis}: {k} units do not split evenly over {g} groups")
        base = (torch.arange(g) * n).unsqueeze(1)
        return (base + local[:, : k // g]).flatten()

    def layers_after_dropping(self, n_drop: int, num_layers: int, protect: set[int] | None = None) -> tuple[int, ...]:
        """Indices (sorted) of the layers kept when the `n_drop` least important droppable ones go."""
        if self.depth is None:
            raise ArchError("this ranking has no depth order")
        protect = protect or set()
        droppable = [int(i) for i in self.depth.flip(0) if int(i) not in protect]
        if n_drop > len(droppable):
            raise ArchError(f"cannot drop {n_drop} layers: only {len(droppable)} may be dropped")
        dropped = set(droppable[:n_drop])
        return tuple(i for i in range(num_layers) if i not in dropped)

    def child(self, sizes: Sizes) -> "Ranking":
        """The ranking of the model ``slice_model(parent, sizes, self)`` returns: width axes are stored in
        importance order there, so they become the identity; depth keeps the parent's order among the
        surviving layers, renumbered."""
        child = Ranking.identity(sizes.replace(layers=()))
        if self.depth is not None:
            pos = {old: new for new, old in enumerate(sizes.layers)}
            child.depth = torch.tensor([pos[int(i)] for i in self.depth if int(i) in pos], dtype=torch.long)
        return child


# ---------------------------------------------------------------------------------------------
# the physical slice: what every family's `slice_model` does before and after its own index math
# ---------------------------------------------------------------------------------------------
def slice_inputs(model, sizes: Sizes, ranking: "Ranking | None"):
    """(parent sizes, validated ranking, kept hidden channels, the parent's state dict) for a slice."""
    parent = type(sizes).from_config(model.config)
    sizes.check_within(parent)
    ranking = ranking if ranking is not None else Ranking.identity(parent)
    ranking.validate(parent)
    return parent, ranking, ranking.hidden_index(sizes.hidden_size), model.state_dict()


@torch.no_grad()
def assemble_child(model, sizes: Sizes, state: dict[str, torch.Tensor]):
    """A plain model of `model`'s class with config ``sizes.to_config(model.config)`` holding `state`:
    built on the meta device and filled (one copy of the kept weights, nothing initialised), a tied
    head re-tied, non-persistent buffers (rotary tables: their sizes depend on fixed fields only) taken
    from the parent, in the parent's dtype and train/eval mode. Anything missing or left over is a bug
    in the family's index math and raises."""
    import copy

    cfg = sizes.to_config(model.config)
    cfg._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        child = type(model)(cfg)
    missing, unexpected = child.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (sizes.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"slice produced a state dict that does not fit the child: missing={missing} unexpected={unexpected}")
    if sizes.tie_word_embeddings:
        child.tie_weights()
    parent_buffers = dict(model.named_buffers())
    for name, buf in list(child.named_buffers()):
        if buf.is_meta and name in parent_buffers:
            mod, _, leaf = name.rpartition(".")
            child.get_submodule(mod).register_buffer(leaf, parent_buffers[name].clone(), persistent=False)
    leftover = [n for n, t in list(child.named_parameters()) + list(child.named_buffers()) if t.is_meta]
    if leftover and not next(model.parameters()).is_meta:  # a meta parent (the plan's rehearsal) slices to a meta child
        raise RuntimeError(f"slice left tensors on the meta device: {leftover}")
    if getattr(model, "generation_config", None) is not None:
        child.generation_config = copy.deepcopy(model.generation_config)
    child.to(next(model.parameters()).dtype)
    child.train(model.training)
    return child


# ---------------------------------------------------------------------------------------------
# the elastic (masked) model
# ---------------------------------------------------------------------------------------------
def prefix_masks(kept: list[int], full: int) -> torch.Tensor:
    """``[J, full]``: row j keeps the first ``kept[j]`` units."""
    return (torch.arange(full)[None, :] < torch.tensor(kept)[:, None]).float()


def mixture_scale(x2_cumsum: torch.Tensor, k: torch.Tensor, p: torch.Tensor, masks: torch.Tensor, eps: float):
    """``sum_j p_j * rsqrt(mean_{c<k_j} x_c^2 + eps) * 1[c < k_j]`` per position: the expected RMS-norm
    scale of a prefix of ``k_j`` channels under choice probabilities ``p``, ``[..., C]``."""
    var = x2_cumsum[..., k - 1] / k.to(x2_cumsum.dtype)  # [..., J]
    coef = torch.rsqrt(var + eps) * p.to(var.dtype)
    return coef @ masks.to(coef.dtype)


class ElasticBase(nn.Module):
    """A model whose axes are importance-ordered, masked to a (soft) architecture of a `Space`.

    Generic: per-axis probabilities over the space's choices, the depth gates, activation
    checkpointing under the captured masks, hard architectures, extraction. A family subclass sets
    ``family`` (its module) and implements `_patch_axes` (its mixers' masked forwards); the hidden
    axis is masked in the family's RMS norms with `masked_rmsnorm_forward` and depth in the blocks
    with `gated_block_forward`, both installed by `_patch_axes` through `patch_norm` / `patch_block`.

    With ``probs = None`` on an axis the model is the plain parent on that axis.
    """

    family: Any = None  # the family module (Sizes, slice_model, decoder_layers, ...)

    def __init__(self, model, space, depth_order: torch.Tensor, protect_kinds: str = ""):
        super().__init__()
        space.validate()
        sizes = self.family.Sizes.from_config(model.config)
        if sizes.replace(layers=()) != space.parent.replace(layers=()):
            raise ArchError("the space's parent is not the architecture of the model")
        self.model, self.space, self.arch, self.protect_kinds = model, space, sizes, protect_kinds
        self.axes = tuple(space.choices) + ("depth",)
        self.ranking = Ranking.identity(sizes.replace(layers=()))
        self.ranking.depth = torch.as_tensor(depth_order, dtype=torch.long)
        self.protect = sizes.protected(protect_kinds)
        self.register_buffer("hidden_k", torch.tensor(space.choices["hidden"]), persistent=False)
        self.register_buffer("hidden_masks", prefix_masks(list(space.choices["hidden"]), sizes.hidden_size), persistent=False)
        keep = torch.zeros(len(space.drops), sizes.num_layers)
        self.kept_layers = []
        for j, d in enumerate(space.drops):
            kept = self.ranking.layers_after_dropping(d, sizes.num_layers, self.protect)
            self.kept_layers.append(kept)
            keep[j, list(kept)] = 1.0
        self.register_buffer("depth_keep", keep, persistent=False)
        self._state: dict[str, torch.Tensor | None] = {}
        # While a block runs (and while its activations are recomputed in backward) the patched forwards
        # read this captured state instead of `_state`: see `gated_block_forward`.
        self._override: dict | None = None
        self.checkpointing = False
        self._patch_axes()

    @classmethod
    def from_parent(cls, parent_model, ranking: Ranking, space, protect_kinds: str = ""):
        """Reorder `parent_model` by `ranking` (a copy; the parent is untouched) and make it elastic."""
        parent = cls.family.Sizes.from_config(parent_model.config)
        ordered = cls.family.slice_model(parent_model, parent, ranking)
        return cls(ordered, space, ranking.child(parent).depth, protect_kinds)

    # ------------------------------------------------------------------ patching helpers
    def state(self) -> dict:
        """The masks in force now (read by the patched forwards at call time)."""
        return self._override if self._override is not None else self._state

    def _patch_axes(self) -> None:
        raise NotImplementedError

    def patch(self, module: nn.Module, fn, *args) -> None:
        """Replace the forward of this module *instance* by ``fn(module, original_forward, *args, ...)``."""
        module.forward = functools.partial(fn, module, module.__class__.forward, *args)

    def patch_norm(self, norm: nn.Module) -> None:
        """The hidden axis: a residual-stream RMS norm normalises over the kept prefix only."""
        self.patch(norm, masked_rmsnorm_forward, self.state, lambda: self.hidden_k, lambda: self.hidden_masks)

    def patch_block(self, block: nn.Module, index: int) -> None:
        """Depth (and activation checkpointing under the block's captured masks)."""
        self.patch(block, gated_block_forward, self.state, index, self)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward, under the masks the block ran with.

        transformers' own checkpointing would recompute a block after the search has reset the masks,
        i.e. train the wrong sub-network's gradients; here every block captures its state and
        re-installs it for the recompute (tested: equal gradients with and without)."""
        self.checkpointing = bool(enabled)

    @contextlib.contextmanager
    def _using(self, state: dict):
        prev, self._override = self._override, state
        try:
            yield
        finally:
            self._override = prev

    def unpatch(self):
        """Remove the patched forwards and return the plain HF model (importance-ordered weights)."""
        for m in self.model.modules():
            m.__dict__.pop("forward", None)
        return self.model

    # ------------------------------------------------------------------ masks
    def choices(self, axis: str) -> tuple[int, ...]:
        return self.space.drops if axis == "depth" else self.space.choices[axis]

    def set_probs(self, **probs) -> None:
        """Per-axis probabilities over the choices (one-hot = hard); a missing axis = the full axis."""
        unknown = set(probs) - set(self.axes)
        if unknown:
            raise ValueError(f"unknown axes {sorted(unknown)}; this model's axes are {list(self.axes)}")
        for name, p in probs.items():
            if p is not None and p.shape != (len(self.choices(name)),):
                raise ValueError(f"{name} probabilities have shape {tuple(p.shape)}, expected ({len(self.choices(name))},)")
        state = {a: p for a, p in probs.items() if a != "depth"}
        depth = probs.get("depth")
        state["gates"] = None if depth is None else depth.to(self.depth_keep.dtype) @ self.depth_keep
        if depth is not None and not state["gates"].requires_grad:
            # which layers a hard mask skips, read back once per forward rather than once per block (a host sync
            # per block keeps the CPU from running ahead of the GPU; issue #20, defect 7)
            state["gates_host"] = state["gates"].tolist()
        self._state = state

    def set_full(self) -> None:
        self._state = {}

    def one_hot(self, axis: str, index: int) -> torch.Tensor:
        # written, not `F.one_hot`: that one reads its input's range back on the host (a sync per axis on a GPU)
        p = torch.zeros(len(self.choices(axis)), device=self.hidden_masks.device)
        p[index] = 1.0
        return p

    def choice_indices(self, arch: Sizes) -> dict[str, int]:
        """The choice index of each axis for an architecture of this space (ArchError if not in it)."""
        out = {}
        for axis, vals in self.space.choices.items():
            val = arch.axis_size(axis)
            if val not in vals:
                raise ArchError(f"{axis}={val} is not a choice of the search space {list(vals)}")
            out[axis] = vals.index(val)
        if tuple(arch.layers) not in self.kept_layers:
            raise ArchError(f"kept layers {list(arch.layers)} are not 'drop the k least important' of this space")
        out["depth"] = self.kept_layers.index(tuple(arch.layers))
        return out

    def set_indices(self, idx: Mapping[str, int]) -> None:
        """A hard architecture given by its choice index on every axis (host integers): the one-hot masks, and
        what the forward would otherwise read back from them (which layers are skipped, which expert choice
        routes) taken from the indices, so that the forward reads no tensor value on the host."""
        self.set_probs(**{a: self.one_hot(a, i) for a, i in idx.items()})
        self._state["indices"] = {a: int(i) for a, i in idx.items()}
        if "depth" in idx:
            kept = set(self.kept_layers[int(idx["depth"])])
            self._state["gates_host"] = [1.0 if layer in kept else 0.0 for layer in range(self.arch.num_layers)]

    def set_arch(self, arch: Sizes) -> None:
        """A hard mask: exactly the function of ``slice_model(model, arch)``."""
        self.set_indices(self.choice_indices(arch))

    def arch_from_indices(self, idx: Mapping[str, int]) -> Sizes:
        sizes = {a: self.space.choices[a][idx[a]] for a in self.space.choices}
        return self.arch.cut(self.ranking, sizes=sizes, layers=self.kept_layers[idx["depth"]])

    def extract(self, arch: Sizes):
        """The sub-network `arch` as a plain model of the parent's class (a prefix slice of every axis)."""
        self.choice_indices(arch)  # only architectures of the space
        return self.family.slice_model(self.model, arch, self.ranking)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        kwargs.setdefault("use_cache", False)
        return self.model(input_ids=input_ids, **kwargs)


def masked_rmsnorm_forward(norm, orig, st, hk, hm, hidden_states):
    """An RMS norm (``weight``, ``variance_epsilon``) over the kept prefix of the hidden channels: choice
    j keeps ``k_j`` channels and divides by their own RMS; the soft norm is the expectation over
    choices, from one cumulative sum of ``x^2``. Channels past the prefix come out zero, so every reader
    of the residual stream (they all read it through such a norm) sees the sub-network's channels only."""
    p = st().get("hidden")
    if p is None:
        return orig(norm, hidden_states)
    dtype = hidden_states.dtype
    x = hidden_states.float()
    scale = mixture_scale(x.pow(2).cumsum(-1), hk(), p, hm(), norm.variance_epsilon)
    return (norm.weight.float() * x * scale).to(dtype)


def masked_units(x: torch.Tensor, p: torch.Tensor, masks: torch.Tensor, groups: int) -> torch.Tensor:
    """Multiply the last dim of `x` (``groups`` contiguous groups of equal width) by the expected prefix
    mask ``sum_j p_j masks[j]`` of each group (exact for a hard mask: dropped units contribute nothing)."""
    m = p.to(x.dtype) @ masks.to(x.dtype)  # [width per group]
    *lead, last = x.shape
    return (x.view(*lead, groups, last // groups) * m).view(*lead, last)


def _keep_in_graph(block, hidden_states):
    """The input of a dropped layer, tied to the layer's parameters by a zero term so that each of them gets a
    (zero) gradient. FSDP2 reduce-scatters a block's gradients in its backward only when the block has any: a
    layer dropped on one process and kept on another would make the processes' collectives differ (a hang on gloo,
    corruption or a hang on NCCL), and with gradient sync on every micro-batch (no unsharded accumulation, see
    `elastic.train.optimizer_step`) that happens whenever two processes draw different depths. Done the same way in
    every strategy, so one process and FSDP give the same optimizer steps (AdamW sees a zero gradient, not none)."""
    if not (block.training and torch.is_grad_enabled()):
        return hidden_states
    touch = [p.reshape(-1)[:1].sum().float() for p in block.parameters() if p.requires_grad]  # dtypes may differ
    if not touch:
        return hidden_states
    return hidden_states + (sum(touch) * 0).to(hidden_states.dtype)


def gated_block_forward(block, orig, st, index, elastic, hidden_states, *args, **kwargs):
    """Depth: layer ``l`` is kept with probability ``g_l`` and its output is ``x + g_l * (block(x) - x)``;
    a layer with ``g_l == 0`` and no gradient is skipped. The block captures the masks it runs with so
    a recompute in backward (activation checkpointing) sees the same sub-network."""
    state = st()
    # transformers wraps the class forward for its own checkpointing; run the plain one, we checkpoint here
    inner = getattr(orig, "__wrapped__", orig)

    def run(h):
        with elastic._using(state):
            return inner(block, h, *args, **kwargs)

    def gated(h, g):
        out = run(h)
        return h + g.to(out.dtype) * (out - h)

    def call(fn, *inputs):
        # The gate runs inside the checkpoint with the block: outside it, its product would keep ``block(x) - x``
        # for the gate's gradient, one residual-sized tensor per layer through the whole forward (8192 tokens of the
        # 9B: 4.1 GiB over 56 layers), where a checkpointed block keeps only its input.
        if elastic.checkpointing and block.training and torch.is_grad_enabled():
            return checkpoint(fn, *inputs, use_reentrant=False)
        return fn(*inputs)

    gates = state.get("gates")
    if gates is None:
        return call(run, hidden_states)
    g = gates[index]
    if not g.requires_grad:
        host = state["gates_host"][index] if "gates_host" in state else float(g)
        if host == 0.0:
            return _keep_in_graph(block, hidden_states)  # a dropped layer: its input passes through the residual
        if host == 1.0:
            return call(run, hidden_states)
    return call(gated, hidden_states, g)


# ---------------------------------------------------------------------------------------------
# transformers' fused routed experts (the layout FP8 quantization and its emulation must know)
# ---------------------------------------------------------------------------------------------
EXPERT_PROJECTIONS = ("up_proj", "down_proj")  # a fused-experts module's two stacked projections, input side first


def is_fused_experts(module) -> bool:
    """A MoE layer's routed experts stored as 3-D tensors (transformers 5.x ``@use_experts_implementation``,
    e.g. NemotronH's ``mixer.experts``: ``up_proj`` [experts, ffn, hidden], ``down_proj`` [experts, hidden, ffn]).
    modelopt quantizes them as one unit (`_QuantFusedExperts`): one FP8 weight scale per expert and projection,
    one input scale per projection shared by the layer's experts; its export writes them per expert
    (``experts.<i>.up_proj.weight``), the hub layout transformers and vLLM read."""
    first_name, second_name = EXPERT_PROJECTIONS
    down = getattr(module, second_name, None)
    first = getattr(module, first_name, None) if getattr(module, "gate_up_proj", None) is None else module.gate_up_proj
    return (hasattr(module, "num_experts") and isinstance(down, torch.Tensor) and down.dim() == 3
            and isinstance(first, torch.Tensor) and first.dim() == 3)
