"""NemotronH surgery: the four elastic axes, rankings and the physical slice.

Axes (all ordered by importance, so every sub-network keeps a *prefix* of each ranked axis and the
family is nested):

* ``hidden``  -- residual-stream channels, one ranking shared by every layer (embeddings, every
  block's pre-norm, every mixer's input/output projection, ``norm_f`` and ``lm_head``).
* ``ffn``     -- MLP neurons, one ranking per MLP layer (the kept count is the same in every layer:
  stock HF NemotronH holds a single ``intermediate_size``).
* ``mamba``   -- Mamba-2 heads, ranked *within each group* (a ``[n_groups, heads_per_group]`` tensor
  of local indices per Mamba layer) so every group keeps the same count; B and C, shared by a group's
  heads, are never cut; ``head_dim`` is kept.
* ``depth``   -- whole layers, ranked from most to least important; a depth budget drops the tail.

`slice_model` gathers the ranked prefix of each axis, so the child's channels are stored in
importance order: its own ranking is the identity on every width axis (`Ranking.child`), which is
what makes "slice twice == slice once" hold exactly.

Mamba-2 layout (transformers' `NemotronHMamba2Mixer`), used by the index math below:
``in_proj`` rows are ``[z (I) | x (I) | B (G*N) | C (G*N) | dt (H)]`` with ``I = H * head_dim``;
``conv1d`` is depthwise over ``[x | B | C]``; ``dt_bias``, ``A_log``, ``D`` are per head; the gated
RMSNorm normalises each group's ``I / G`` channels; ``out_proj`` reads ``I`` columns. Heads of a
group are contiguous.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from elastic.arch import Arch, ArchError

MODEL_TYPE = "nemotron_h"
AXES = ("hidden", "ffn", "mamba", "depth")


# ---------------------------------------------------------------------------------------------
# rankings
# ---------------------------------------------------------------------------------------------
@dataclass
class Ranking:
    """Importance order of every axis of one NemotronH (most important first).

    `ffn` and `mamba` are keyed by the layer index *in the model they rank*.
    """

    hidden: torch.Tensor  # [hidden_size] channel indices
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [intermediate_size]
    mamba: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_groups, heads_per_group] local indices
    depth: torch.Tensor | None = None  # [num_layers] layer indices, most important first

    # ----------------------------------------------------------------- construction
    @classmethod
    def identity(cls, arch: Arch) -> "Ranking":
        hpg = arch.mamba_num_heads // arch.n_groups
        return cls(
            hidden=torch.arange(arch.hidden_size),
            ffn={i: torch.arange(arch.intermediate_size) for i, k in enumerate(arch.pattern) if k == "-"},
            mamba={i: torch.arange(hpg).repeat(arch.n_groups, 1) for i, k in enumerate(arch.pattern) if k == "M"},
            depth=torch.arange(arch.num_layers),
        )

    @classmethod
    def random(cls, arch: Arch, generator: torch.Generator) -> "Ranking":
        """A uniformly random ranking: the baseline that importance must beat."""
        hpg = arch.mamba_num_heads // arch.n_groups
        g = generator
        return cls(
            hidden=torch.randperm(arch.hidden_size, generator=g),
            ffn={i: torch.randperm(arch.intermediate_size, generator=g) for i, k in enumerate(arch.pattern) if k == "-"},
            mamba={
                i: torch.stack([torch.randperm(hpg, generator=g) for _ in range(arch.n_groups)])
                for i, k in enumerate(arch.pattern)
                if k == "M"
            },
            depth=torch.randperm(arch.num_layers, generator=g),
        )

    @classmethod
    def from_scores(cls, scores: dict[str, torch.Tensor], arch: Arch, depth_metric: str = "depth_mse") -> "Ranking":
        """Sort importance scores (higher = more important) into a ranking.

        `scores` holds ``hidden`` [H], ``ffn.<layer>`` [F], ``mamba.<layer>`` [num_heads] and the depth
        metrics ``depth_mse`` / ``depth_loss`` [L]. Ties break by index so the order is deterministic.
        """
        def order(x: torch.Tensor) -> torch.Tensor:
            # stable descending sort: equal scores keep index order
            return torch.sort(x.float(), descending=True, stable=True).indices

        ffn, mamba = {}, {}
        for key, val in scores.items():
            if key.startswith("ffn."):
                ffn[int(key.split(".")[1])] = order(val)
            elif key.startswith("mamba."):
                per_group = val.float().view(arch.n_groups, -1)
                mamba[int(key.split(".")[1])] = torch.stack([order(row) for row in per_group])
        if depth_metric not in scores:
            raise KeyError(f"no {depth_metric!r} scores; have {sorted(k for k in scores if k.startswith('depth'))}")
        return cls(hidden=order(scores["hidden"]), ffn=ffn, mamba=mamba, depth=order(scores[depth_metric]))

    # ----------------------------------------------------------------- (de)serialisation
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"hidden": self.hidden}
        out.update({f"ffn.{i}": v for i, v in self.ffn.items()})
        out.update({f"mamba.{i}": v for i, v in self.mamba.items()})
        if self.depth is not None:
            out["depth"] = self.depth
        return {k: v.to(torch.int64).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Ranking":
        return cls(
            hidden=t["hidden"],
            ffn={int(k.split(".")[1]): v for k, v in t.items() if k.startswith("ffn.")},
            mamba={int(k.split(".")[1]): v for k, v in t.items() if k.startswith("mamba.")},
            depth=t.get("depth"),
        )

    # ----------------------------------------------------------------- index sets
    def validate(self, arch: Arch) -> None:
        """Raise unless this ranking has one permutation per axis of `arch`."""
        def is_perm(x: torch.Tensor, n: int) -> bool:
            return x.numel() == n and torch.equal(torch.sort(x.flatten()).values, torch.arange(n))

        if not is_perm(self.hidden, arch.hidden_size):
            raise ArchError("hidden ranking is not a permutation of the hidden channels")
        hpg = arch.mamba_num_heads // arch.n_groups
        for i, kind in enumerate(arch.pattern):
            if kind == "-" and not is_perm(self.ffn.get(i, torch.empty(0)), arch.intermediate_size):
                raise ArchError(f"layer {i}: ffn ranking missing or not a permutation")
            if kind == "M":
                m = self.mamba.get(i)
                if m is None or m.shape != (arch.n_groups, hpg) or not all(is_perm(r, hpg) for r in m):
                    raise ArchError(f"layer {i}: mamba ranking must be a per-group permutation [{arch.n_groups}, {hpg}]")
        if self.depth is not None and not is_perm(self.depth, arch.num_layers):
            raise ArchError("depth ranking is not a permutation of the layers")

    def hidden_index(self, k: int) -> torch.Tensor:
        return self.hidden[:k]

    def ffn_index(self, layer: int, k: int) -> torch.Tensor:
        return self.ffn[layer][:k]

    def mamba_heads(self, layer: int, heads: int, n_groups: int) -> torch.Tensor:
        """Global indices of the kept heads: the top `heads // n_groups` of each group, group by group."""
        local = self.mamba[layer]
        hpg = local.shape[1]
        keep = heads // n_groups
        base = (torch.arange(n_groups) * hpg).unsqueeze(1)
        return (base + local[:, :keep]).flatten()

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

    def child(self, arch: Arch) -> "Ranking":
        """The ranking of the model `slice_model(parent, arch, self)` returns.

        Width axes are stored in importance order there, so they become the identity; depth keeps
        the parent's order among the surviving layers, renumbered.
        """
        child = Ranking.identity(dataclasses.replace(arch, layers=()))
        if self.depth is not None:
            pos = {old: new for new, old in enumerate(arch.layers)}
            child.depth = torch.tensor([pos[int(i)] for i in self.depth if int(i) in pos], dtype=torch.long)
        return child


# ---------------------------------------------------------------------------------------------
# architecture <-> model
# ---------------------------------------------------------------------------------------------
def arch_of(model) -> Arch:
    """The `Arch` of a loaded NemotronH model (read from its config)."""
    return Arch.from_config(model.config)


def layers(model) -> nn.ModuleList:
    return model.model.layers


def block_kind(block) -> str:
    from elastic.arch import LAYER_TYPE_TO_CHAR

    return LAYER_TYPE_TO_CHAR[block.block_type]


def make_arch(
    parent: Arch,
    ranking: Ranking | None = None,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    mamba_num_heads: int | None = None,
    drop_layers: int = 0,
    layers: tuple[int, ...] | None = None,
    protect_kinds: str = "",
) -> Arch:
    """A child `Arch` of `parent`: new widths, and either explicit kept `layers` or the `drop_layers`
    least important ones dropped (by `ranking.depth`, never a layer whose kind is in `protect_kinds`)."""
    if layers is None:
        if drop_layers:
            if ranking is None:
                raise ArchError("dropping layers by importance needs a ranking")
            protect = {i for i, k in enumerate(parent.pattern) if k in protect_kinds}
            layers = ranking.layers_after_dropping(drop_layers, parent.num_layers, protect)
        else:
            layers = tuple(range(parent.num_layers))
    child = dataclasses.replace(
        parent,
        hidden_size=parent.hidden_size if hidden_size is None else int(hidden_size),
        intermediate_size=parent.intermediate_size if intermediate_size is None else int(intermediate_size),
        mamba_num_heads=parent.mamba_num_heads if mamba_num_heads is None else int(mamba_num_heads),
        pattern="".join(parent.pattern[i] for i in layers),
        layers=tuple(layers),
    )
    child.check_within(parent)
    return child


@torch.no_grad()
def slice_model(model, arch: Arch, ranking: Ranking | None = None):
    """Cut `arch` out of `model`: a new, plain `NemotronHForCausalLM` holding the ranked prefixes.

    The config of the result is `arch.to_config(model.config)`, i.e. derived from the kept sizes, and
    the model is built on the meta device then filled, so slicing a 9B model costs one copy of the
    kept weights.
    """
    from transformers import NemotronHForCausalLM

    parent = arch_of(model)
    arch.check_within(parent)
    ranking = ranking if ranking is not None else Ranking.identity(parent)
    ranking.validate(parent)

    hk = ranking.hidden_index(arch.hidden_size)
    src = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.contiguous().clone()

    put("model.embeddings.weight", src["model.embeddings.weight"][:, hk])
    put("model.norm_f.weight", src["model.norm_f.weight"][hk])
    if not arch.tie_word_embeddings:
        put("lm_head.weight", src["lm_head.weight"][:, hk])

    hd, N, G = parent.mamba_head_dim, parent.ssm_state_size, parent.n_groups
    for new_i, old_i in enumerate(arch.layers):
        p, q = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        kind = parent.pattern[old_i]
        put(q + "norm.weight", src[p + "norm.weight"][hk])
        if kind == "M":
            I_old = parent.mamba_intermediate
            heads = ranking.mamba_heads(old_i, arch.mamba_num_heads, G)
            ch = (heads.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # head channels inside one I-sized block
            bc = torch.arange(2 * I_old, 2 * I_old + 2 * G * N)
            # in_proj rows [z | x | B | C | dt]; conv channels [x | B | C]
            rows = torch.cat([ch, I_old + ch, bc, 2 * I_old + 2 * G * N + heads])
            conv = torch.cat([ch, torch.arange(I_old, I_old + 2 * G * N)])
            m = p + "mixer."
            n = q + "mixer."
            put(n + "in_proj.weight", src[m + "in_proj.weight"][rows][:, hk])
            if m + "in_proj.bias" in src:
                put(n + "in_proj.bias", src[m + "in_proj.bias"][rows])
            put(n + "conv1d.weight", src[m + "conv1d.weight"][conv])
            if m + "conv1d.bias" in src:
                put(n + "conv1d.bias", src[m + "conv1d.bias"][conv])
            for name in ("dt_bias", "A_log", "D"):
                put(n + name, src[m + name][heads])
            put(n + "norm.weight", src[m + "norm.weight"][ch])
            put(n + "out_proj.weight", src[m + "out_proj.weight"][hk][:, ch])
            if m + "out_proj.bias" in src:
                put(n + "out_proj.bias", src[m + "out_proj.bias"][hk])
        elif kind == "-":
            f = ranking.ffn_index(old_i, arch.intermediate_size)
            m, n = p + "mixer.", q + "mixer."
            put(n + "up_proj.weight", src[m + "up_proj.weight"][f][:, hk])
            put(n + "down_proj.weight", src[m + "down_proj.weight"][hk][:, f])
            if m + "up_proj.bias" in src:
                put(n + "up_proj.bias", src[m + "up_proj.bias"][f])
                put(n + "down_proj.bias", src[m + "down_proj.bias"][hk])
        elif kind == "*":
            m, n = p + "mixer.", q + "mixer."
            for proj in ("q_proj", "k_proj", "v_proj"):
                put(n + f"{proj}.weight", src[m + f"{proj}.weight"][:, hk])
            put(n + "o_proj.weight", src[m + "o_proj.weight"][hk])
        else:  # pragma: no cover - Arch rejects other kinds
            raise ArchError(f"cannot slice layer kind {kind!r}")

    cfg = arch.to_config(model.config)
    cfg._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        child = NemotronHForCausalLM(cfg)
    missing, unexpected = child.load_state_dict(out, strict=False, assign=True)
    # tied lm_head shares the embedding; anything else missing is a bug in the index math
    missing = [k for k in missing if not (arch.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"slice produced a state dict that does not fit the child: missing={missing} unexpected={unexpected}")
    if arch.tie_word_embeddings:
        child.tie_weights()
    leftover = [n for n, t in list(child.named_parameters()) + list(child.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"slice left tensors on the meta device: {leftover}")
    child.to(next(model.parameters()).dtype)
    child.train(model.training)
    return child

# family facts the core reaches through `family_for` (optional attributes; see elastic.models)
from elastic.models import nemotron_h_export as export_facts  # noqa: E402  (hub names, llama.cpp config)
from elastic.models import nemotron_h_kernels as kernels  # noqa: E402  (which Mamba-2 scan runs)
from elastic.models import nemotron_h_plan as plan_model  # noqa: E402  (training memory / FLOP model)
Sizes = Arch  # the sizes type core code reaches as family_for(config).Sizes (until the family defines its own)
