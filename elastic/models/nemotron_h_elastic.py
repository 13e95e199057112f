"""The elastic NemotronH: one set of weights, any sub-network of the search space by masking.

Construction (`ElasticNemotronH.from_parent`): the parent is first physically reordered into
importance order with ``slice_model(parent, parent_arch, ranking)`` -- the same function, the same
weights, every width axis stored most-important-first. A sub-network is then a *prefix* of each
axis: the first ``k`` hidden channels, the first ``k`` FFN neurons of every MLP layer, the first
``k / n_groups`` heads of EVERY Mamba group, and all layers but the ``d`` least important droppable
ones (``Ranking.layers_after_dropping``). Because the same index sets drive `slice_model`, a hard
mask gives exactly the function of the sliced model (tested with ``assert_close`` on logits).

Masks are distributions over each axis's choices: ``p`` (a probability vector over the choices of
`elastic.search_space.Space`; one-hot = a hard architecture). transformers' own modules compute
everything; we replace the ``forward`` of these module *instances* (no modeling code copied):

* ``NemotronHRMSNorm.forward`` (each block's pre-norm and ``norm_f``) -- the hidden axis. The residual
  stream is read only through these norms (the mixers read the block norm's output, ``lm_head`` reads
  ``norm_f``'s), so masking the norms' outputs masks the hidden axis for every reader; channels past
  the prefix may hold anything in the residual, nobody reads them. The norm of choice ``j`` keeps ``k_j``
  channels and divides by their own RMS, ``sqrt(sum_{c<k_j} x_c^2 / k_j)``; the soft norm is the
  expectation over choices, ``sum_j p_j * norm_j(x)``, computed from one cumulative sum of ``x^2``.
* ``NemotronHRMSNormGated.forward`` (the Mamba mixer's gated group norm) -- the Mamba-head axis. Each
  group's channels are its heads in importance order, so choice ``j`` keeps the first
  ``heads_j * head_dim`` channels of each group and normalises over those only; soft = expectation over
  choices, as above. Heads past the prefix get a zero output, so ``out_proj`` never sees them (their
  scan runs but contributes nothing; heads are independent in the scan).
* ``NemotronHMamba2Mixer.forward`` -- wrapped only to turn off the fused training kernel while masks
  are active (that kernel would apply its own, unmasked, gated norm); the pure path is used instead.
* ``NemotronHMLP.forward`` -- the FFN axis: the activation is multiplied by the expected prefix mask
  ``sum_j p_j * 1[n < f_j]`` before ``down_proj`` (exact for a hard mask: zero neurons contribute nothing).
* ``NemotronHBlock.forward`` -- depth: layer ``l`` is kept with probability ``g_l = sum_j p_j keep_j(l)``
  and its output is ``x + g_l * (block(x) - x)``; a layer with ``g_l == 0`` and no gradient is skipped
  (its input passes through the residual).

With ``probs = None`` on an axis the model is the plain parent on that axis (all patched forwards
call the original ones).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from elastic.arch import Arch, ArchError
from elastic.models.nemotron_h import Ranking, arch_of, make_arch, slice_model
from elastic.search_space import Space

AXES = ("hidden", "ffn", "mamba", "depth")


def space_sizes(space: Space, axis: str) -> tuple[int, ...]:
    """The choice values of one axis (`drops` for depth: layers removed)."""
    return {"hidden": space.hidden, "ffn": space.ffn, "mamba": space.mamba_heads, "depth": space.drops}[axis]


def validate_space(space: Space) -> None:
    """One clear error for every choice list the elastic model cannot hold."""
    p = space.parent
    for axis, full in (("hidden", p.hidden_size), ("ffn", p.intermediate_size), ("mamba", p.mamba_num_heads)):
        vals = space_sizes(space, axis)
        if not vals:
            raise ArchError(f"the {axis} axis has an empty choice list")
        if any(v <= 0 or v > full for v in vals):
            raise ArchError(f"{axis} choices {list(vals)} must lie in 1..{full} (the parent's size)")
        if list(vals) != sorted(set(vals)):
            raise ArchError(f"{axis} choices {list(vals)} must be strictly increasing")
    if any(v % p.n_groups for v in space.mamba_heads):
        raise ArchError(
            f"Mamba head choices {list(space.mamba_heads)} are not multiples of n_groups={p.n_groups}: "
            "every group must keep the same number of heads (use a per-group granularity)"
        )
    if not space.drops or list(space.drops) != sorted(set(space.drops)) or space.drops[0] < 0:
        raise ArchError(f"depth choices {list(space.drops)} must be a non-empty increasing list of layer counts >= 0")


@dataclass
class _State:
    """What the patched forwards read: per-axis probabilities (None = the full axis)."""

    hidden: torch.Tensor | None = None  # [J_h]
    ffn: torch.Tensor | None = None
    mamba: torch.Tensor | None = None
    gates: torch.Tensor | None = None  # [L] keep probability of each layer


class ElasticNemotronH(nn.Module):
    """A NemotronH whose axes are importance-ordered, masked to a (soft) architecture of `space`.

    ``model`` must already be importance-ordered (use `from_parent`); ``depth_order`` is its layer
    ranking (most important first) and ``protect_kinds`` the layer kinds never dropped.
    """

    def __init__(self, model, space: Space, depth_order: torch.Tensor, protect_kinds: str = ""):
        super().__init__()
        validate_space(space)
        arch = arch_of(model)
        if arch.replace(layers=()) != space.parent.replace(layers=()):
            raise ArchError("the space's parent is not the architecture of the model")
        self.model = model
        self.space = space
        self.arch = arch
        self.protect_kinds = protect_kinds
        self.ranking = Ranking.identity(arch.replace(layers=()))
        self.ranking.depth = torch.as_tensor(depth_order, dtype=torch.long)
        self.protect = {i for i, k in enumerate(arch.pattern) if k in protect_kinds}
        hd, G = arch.mamba_head_dim, arch.n_groups

        def prefix(sizes, full):
            return (torch.arange(full)[None, :] < torch.tensor(sizes)[:, None]).float()

        self.register_buffer("hidden_k", torch.tensor(space.hidden), persistent=False)
        self.register_buffer("hidden_masks", prefix(space.hidden, arch.hidden_size), persistent=False)
        self.register_buffer("ffn_masks", prefix(space.ffn, arch.intermediate_size), persistent=False)
        kc = [m // G * hd for m in space.mamba_heads]  # kept channels per group
        self.register_buffer("mamba_kc", torch.tensor(kc), persistent=False)
        self.register_buffer("mamba_masks", prefix(kc, arch.mamba_intermediate // G), persistent=False)
        keep = torch.zeros(len(space.drops), arch.num_layers)
        self.kept_layers = []
        for j, d in enumerate(space.drops):
            kept = self.ranking.layers_after_dropping(d, arch.num_layers, self.protect)
            self.kept_layers.append(kept)
            keep[j, list(kept)] = 1.0
        self.register_buffer("depth_keep", keep, persistent=False)
        self._state = _State()
        # While a block runs (and while its activations are recomputed in backward) the patched forwards
        # read this captured state instead of `_state`: see `_block_forward`.
        self._override: _State | None = None
        self.checkpointing = False
        self._patch()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parent(cls, parent_model, ranking: Ranking, space: Space, protect_kinds: str = "") -> "ElasticNemotronH":
        """Reorder `parent_model` by `ranking` (a copy; the parent is untouched) and make it elastic."""
        parent = arch_of(parent_model)
        ordered = slice_model(parent_model, parent, ranking)
        return cls(ordered, space, ranking.child(parent).depth, protect_kinds)

    # ------------------------------------------------------------------ patching
    def _patch(self) -> None:
        from transformers.models.nemotron_h import modeling_nemotron_h as mh

        st = lambda: self._override if self._override is not None else self._state  # noqa: E731 - read at call time
        hk, hm = (lambda: self.hidden_k), (lambda: self.hidden_masks)
        for norm in [b.norm for b in self.model.model.layers] + [self.model.model.norm_f]:
            norm.forward = functools.partial(_rmsnorm_forward, norm, norm.__class__.forward, st, hk, hm)
        for i, block in enumerate(self.model.model.layers):
            block.forward = functools.partial(_block_forward, block, block.__class__.forward, st, i, self)
            mixer = block.mixer
            if isinstance(mixer, mh.NemotronHMamba2Mixer):
                mixer.forward = functools.partial(_mamba_forward, mixer, mixer.__class__.forward, st)
                mixer.norm.forward = functools.partial(
                    _gated_norm_forward, mixer.norm, mixer.norm.__class__.forward, st,
                    lambda: self.mamba_kc, lambda: self.mamba_masks, self.arch.n_groups,
                )
            elif isinstance(mixer, mh.NemotronHMLP):
                mixer.forward = functools.partial(_mlp_forward, mixer, mixer.__class__.forward, st, lambda: self.ffn_masks)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward, under the masks the block ran with.

        transformers' own checkpointing would recompute a block after `SearchModel.forward` has reset
        the masks, i.e. train the wrong sub-network's gradients; here every block captures its state
        and re-installs it for the recompute (tested: equal gradients with and without).
        """
        self.checkpointing = bool(enabled)

    @contextlib.contextmanager
    def _using(self, state: "_State"):
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
    def set_probs(self, hidden=None, ffn=None, mamba=None, depth=None) -> None:
        """Per-axis probabilities over the choices (one-hot = hard); None = the full axis."""
        for name, p in (("hidden", hidden), ("ffn", ffn), ("mamba", mamba), ("depth", depth)):
            if p is not None and p.shape != (len(space_sizes(self.space, name)),):
                raise ValueError(f"{name} probabilities have shape {tuple(p.shape)}, expected ({len(space_sizes(self.space, name))},)")
        gates = None if depth is None else depth.to(self.depth_keep.dtype) @ self.depth_keep
        self._state = _State(hidden=hidden, ffn=ffn, mamba=mamba, gates=gates)

    def set_full(self) -> None:
        self._state = _State()

    def one_hot(self, axis: str, index: int) -> torch.Tensor:
        n = len(space_sizes(self.space, axis))
        return F.one_hot(torch.tensor(index), n).float().to(self.hidden_masks.device)

    def choice_indices(self, arch: Arch) -> dict[str, int]:
        """The choice index of each axis for an architecture of this space (ArchError if not in it)."""
        out = {}
        for axis, val in (("hidden", arch.hidden_size), ("ffn", arch.intermediate_size), ("mamba", arch.mamba_num_heads)):
            vals = space_sizes(self.space, axis)
            if val not in vals:
                raise ArchError(f"{axis}={val} is not a choice of the search space {list(vals)}")
            out[axis] = vals.index(val)
        if tuple(arch.layers) not in self.kept_layers:
            raise ArchError(f"kept layers {list(arch.layers)} are not 'drop the k least important' of this space")
        out["depth"] = self.kept_layers.index(tuple(arch.layers))
        return out

    def set_arch(self, arch: Arch) -> None:
        """A hard mask: exactly the function of ``slice_model(model, arch)``."""
        idx = self.choice_indices(arch)
        self.set_probs(**{a: self.one_hot(a, i) for a, i in idx.items()})

    def arch_from_indices(self, idx: dict[str, int]) -> Arch:
        s = self.space
        return make_arch(
            self.arch, self.ranking,
            hidden_size=s.hidden[idx["hidden"]], intermediate_size=s.ffn[idx["ffn"]],
            mamba_num_heads=s.mamba_heads[idx["mamba"]], layers=self.kept_layers[idx["depth"]],
        )

    def extract(self, arch: Arch):
        """The sub-network `arch` as a plain `NemotronHForCausalLM` (a prefix slice of every axis)."""
        self.choice_indices(arch)  # only architectures of the space
        return slice_model(self.model, arch, self.ranking)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, **kwargs):
        kwargs.setdefault("use_cache", False)
        return self.model(input_ids=input_ids, **kwargs)


# ---------------------------------------------------------------------------------------------
# the patched forwards (module instance, original unbound forward, state getter, ...)
# ---------------------------------------------------------------------------------------------
def _mixture_scale(x2_cumsum: torch.Tensor, k: torch.Tensor, p: torch.Tensor, masks: torch.Tensor, eps: float):
    """sum_j p_j * rsqrt(mean_{c<k_j} x_c^2 + eps) * 1[c < k_j], per position: [..., C]."""
    var = x2_cumsum[..., k - 1] / k.to(x2_cumsum.dtype)  # [..., J]
    coef = torch.rsqrt(var + eps) * p.to(var.dtype)
    return coef @ masks.to(coef.dtype)


def _rmsnorm_forward(norm, orig, st, hk, hm, hidden_states):
    p = st().hidden
    if p is None:
        return orig(norm, hidden_states)
    dtype = hidden_states.dtype
    x = hidden_states.float()
    scale = _mixture_scale(x.pow(2).cumsum(-1), hk(), p, hm(), norm.variance_epsilon)
    return (norm.weight.float() * x * scale).to(dtype)


def _gated_norm_forward(norm, orig, st, kc, masks, n_groups, hidden_states, gate=None):
    p = st().mamba
    if p is None:
        return orig(norm, hidden_states, gate)
    dtype = hidden_states.dtype
    x = hidden_states.float()
    if gate is not None:
        x = x * F.silu(gate.float())
    *prefix, last = x.shape
    xg = x.view(*prefix, n_groups, last // n_groups)
    scale = _mixture_scale(xg.pow(2).cumsum(-1), kc(), p, masks(), norm.variance_epsilon)
    return norm.weight * (xg * scale).view(*prefix, last).to(dtype)


def _mamba_forward(mixer, orig, st, *args, **kwargs):
    if st().mamba is None and st().hidden is None or not mixer.training:
        return orig(mixer, *args, **kwargs)
    # the fused training kernel (when mamba-ssm is installed) applies its own unmasked gated norm
    mixer.training = False
    try:
        return orig(mixer, *args, **kwargs)
    finally:
        mixer.training = True


def _mlp_forward(mlp, orig, st, masks, x):
    p = st().ffn
    if p is None:
        return orig(mlp, x)
    a = mlp.act_fn(mlp.up_proj(x))
    m = p.to(a.dtype) @ masks().to(a.dtype)
    return mlp.down_proj(a * m)


def _block_forward(block, orig, st, index, elastic, hidden_states, *args, **kwargs):
    state = st()  # captured: the recompute in backward must see these masks, not whatever is set by then
    # transformers wraps the class forward for its own checkpointing; run the plain one, we checkpoint here
    inner = getattr(orig, "__wrapped__", orig)

    def run(h):
        with elastic._using(state):
            return inner(block, h, *args, **kwargs)

    def call(h):
        if elastic.checkpointing and block.training and torch.is_grad_enabled():
            return checkpoint(run, h, use_reentrant=False)
        return run(h)

    gates = state.gates
    if gates is None:
        return call(hidden_states)
    g = gates[index]
    if not g.requires_grad:
        if float(g) == 0.0:
            return hidden_states  # a dropped layer: its input passes through the residual
        if float(g) == 1.0:
            return call(hidden_states)
    out = call(hidden_states)
    return hidden_states + g.to(out.dtype) * (out - hidden_states)
