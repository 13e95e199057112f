"""The elastic NemotronH (the family's `Elastic`): one set of weights, any sub-network of the search space by masking.

Construction (`ElasticNemotronH.from_parent`): the parent is first physically reordered into
importance order with ``slice_model(parent, parent_arch, ranking)`` -- the same function, the same
weights, every width axis stored most-important-first. A sub-network is then a *prefix* of each
axis: the first ``k`` hidden channels, the first ``k`` FFN neurons of every MLP layer, the first
``k / n_groups`` heads of EVERY Mamba group, and all layers but the ``d`` least important droppable
ones (``Ranking.layers_after_dropping``). Because the same index sets drive `slice_model`, a hard
mask gives exactly the function of the sliced model (tested with ``assert_close`` on logits).

Masks are distributions over each axis's choices: ``p`` (a probability vector over the choices of
`elastic.search_space.Space`; one-hot = a hard architecture). The generic parts (hidden-axis norms,
depth gates, activation checkpointing, hard architectures, extraction) are `ElasticBase`'s. transformers' own modules compute
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
* MoE layers (``NemotronHMoE``): ``NemotronHTopkRouter.forward`` -- the experts axis. Experts are
  stored most-important-first (within each routing group), so choice ``j`` keeps the first ``e_j / n_group``
  of each group; a dropped expert's score is ``-inf`` before the group and top-k selection, so the top-k
  is taken among kept experts -- what the sliced model's router computes. The soft router is the mixture
  over choices: ``sum_j p_j * MoE_j(x)``, exact because the experts' output is linear in the routing
  weights: one routing whose weights are ``sum_j p_j * w_j`` over the union of the choices' top-k sets
  (each expert runs once per token however many choices picked it). ``experts.act_fn`` -- the moe_ffn
  axis, the prefix mask on every routed expert's activation (as the MLP's); ``shared_experts`` is an
  MLP masked by the shared_ffn axis.
* ``NemotronHBlock.forward`` -- depth: layer ``l`` is kept with probability ``g_l = sum_j p_j keep_j(l)``
  and its output is ``x + g_l * (block(x) - x)``; a layer with ``g_l == 0`` and no gradient is skipped
  (its input passes through the residual).

With ``probs = None`` on an axis the model is the plain parent on that axis (all patched forwards
call the original ones).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from elastic.models.family import ElasticBase, masked_units, mixture_scale, prefix_masks
from elastic.models.nemotron_h.sizes import Sizes
from elastic.models.nemotron_h.surgery import slice_model


class ElasticNemotronH(ElasticBase):
    """A NemotronH whose axes are importance-ordered, masked to a (soft) architecture of a `Space`.

    ``model`` must already be importance-ordered (use `from_parent`); ``depth_order`` is its layer
    ranking (most important first) and ``protect_kinds`` the layer kinds never dropped.
    """

    # what `ElasticBase` reads of its family, taken from the modules below this one (a submodule never
    # imports the family package, which imports it)
    family = SimpleNamespace(Sizes=Sizes, slice_model=slice_model)

    def _patch_axes(self) -> None:
        from transformers.models.nemotron_h import modeling_nemotron_h as mh

        a, G, hd = self.arch, self.arch.n_groups, self.arch.mamba_head_dim
        self.register_buffer("ffn_masks", prefix_masks(list(self.space.choices["ffn"]), a.intermediate_size), persistent=False)
        if a.is_moe:
            self._moe_masks()
        kc = [m // G * hd for m in self.space.choices["mamba"]]  # kept channels per group
        self.register_buffer("mamba_kc", torch.tensor(kc), persistent=False)
        self.register_buffer("mamba_masks", prefix_masks(kc, a.mamba_intermediate // G), persistent=False)
        for norm in [b.norm for b in self.model.model.layers] + [self.model.model.norm_f]:
            self.patch_norm(norm)
        for i, block in enumerate(self.model.model.layers):
            self.patch_block(block, i)
            mixer = block.mixer
            if isinstance(mixer, mh.NemotronHMamba2Mixer):
                self.patch(mixer, _mamba_forward, self.state)
                self.patch(mixer.norm, _gated_norm_forward, self.state, lambda: self.mamba_kc, lambda: self.mamba_masks, G)
            elif isinstance(mixer, mh.NemotronHMLP):
                self.patch(mixer, _mlp_forward, self.state, "ffn", lambda: self.ffn_masks)
            elif isinstance(mixer, mh.NemotronHMoE):
                self.patch(mixer.gate, _router_forward, self.state, lambda: self.expert_keep)
                self.patch(mixer.experts.act_fn, _expert_act_forward, self.state, lambda: self.moe_ffn_masks)
                self.patch(mixer.shared_experts, _mlp_forward, self.state, "shared_ffn", lambda: self.shared_ffn_masks)

    def _moe_masks(self) -> None:
        a = self.arch
        for e in self.space.choices["experts"]:
            a.replace(n_routed_experts=e)  # one ArchError line for a choice the router cannot run (e.g. < top-k)
        per_group = a.n_routed_experts // a.n_group
        kept = [e // a.n_group for e in self.space.choices["experts"]]
        # [J, E]: choice j keeps the first kept[j] experts of every routing group (groups are contiguous)
        self.register_buffer("expert_keep", prefix_masks(kept, per_group).bool().repeat(1, a.n_group), persistent=False)
        self.register_buffer("moe_ffn_masks", prefix_masks(list(self.space.choices["moe_ffn"]), a.moe_intermediate_size),
                             persistent=False)
        self.register_buffer("shared_ffn_masks", prefix_masks(list(self.space.choices["shared_ffn"]),
                                                              a.moe_shared_expert_intermediate_size), persistent=False)


# ---------------------------------------------------------------------------------------------
# the patched forwards (module instance, original unbound forward, state getter, ...)
# ---------------------------------------------------------------------------------------------
def _gated_norm_forward(norm, orig, st, kc, masks, n_groups, hidden_states, gate=None):
    p = st().get("mamba")
    if p is None:
        return orig(norm, hidden_states, gate)
    dtype = hidden_states.dtype
    x = hidden_states.float()
    if gate is not None:
        x = x * F.silu(gate.float())
    *prefix, last = x.shape
    xg = x.view(*prefix, n_groups, last // n_groups)
    scale = mixture_scale(xg.pow(2).cumsum(-1), kc(), p, masks(), norm.variance_epsilon)
    return norm.weight * (xg * scale).view(*prefix, last).to(dtype)


def _mamba_forward(mixer, orig, st, *args, **kwargs):
    if st().get("mamba") is None and st().get("hidden") is None or not mixer.training:
        return orig(mixer, *args, **kwargs)
    # the fused training kernel (when mamba-ssm is installed) applies its own unmasked gated norm
    mixer.training = False
    try:
        return orig(mixer, *args, **kwargs)
    finally:
        mixer.training = True


def _mlp_forward(mlp, orig, st, axis, masks, x):
    p = st().get(axis)
    if p is None:
        return orig(mlp, x)
    return mlp.down_proj(masked_units(mlp.act_fn(mlp.up_proj(x)), p, masks(), 1))


def _expert_act_forward(act, orig, st, masks, x):
    """Every routed expert's activation ``[routed tokens, f]`` (whatever experts implementation runs: they
    all call ``act_fn`` between the two projections), masked to the moe_ffn prefix."""
    p = st().get("moe_ffn")
    out = orig(act, x)
    return out if p is None else masked_units(out, p, masks(), 1)


def _router_forward(gate, orig, st, keep, hidden_states):
    """transformers' `NemotronHTopkRouter.forward` with the dropped experts of each choice out of the top-k,
    and the routing of the mixture over choices (see the module docstring).

    Every shape is fixed by the configuration, never by a value: the forward reads nothing back on the host (a
    sync per MoE layer on a GPU, and fake tensors, which the plan's rehearsal runs on, have no values). A hard
    architecture set by its indices (`set_indices`) routes its one choice's top-k, exactly the sliced model's
    router; any other distribution routes the union of all choices' top-k sets, at most ``min(E, top_k * J)``
    experts per token (J choices), padded to that fixed width with experts of weight 0 (each of them runs and
    adds nothing; the experts' output is linear in the routing weights). Every choice is routed even where its
    probability is 0: a straight-through one-hot's gradient reaches the choices it did not pick."""
    state = st()
    p = state.get("experts")
    if p is None:
        return orig(gate, hidden_states)
    keep = keep()
    E, G = gate.num_experts, gate.num_group
    h = hidden_states.view(-1, gate.hidden_dim)
    logits = F.linear(h.type(torch.float32), gate.weight.type(torch.float32))
    scores = logits.sigmoid()
    for_choice = scores + gate.e_score_correction_bias
    hard = state.get("indices", {}).get("experts")
    chosen = range(len(keep)) if hard is None else (hard,)
    dense = torch.zeros_like(scores)  # [T, E] routing weight of the mixture
    picked = torch.zeros_like(scores, dtype=torch.bool)
    for j in chosen:
        c = for_choice.masked_fill(~keep[j], float("-inf"))
        if G > 1:
            group_scores = c.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            c = c.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = torch.topk(c, k=gate.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if gate.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        w = w * gate.routed_scaling_factor
        if hard is not None:
            return logits, w * p[j].to(w.dtype), idx  # p[j] == 1: the sliced model's routing
        dense = dense.scatter_add(1, idx, w * p[j].to(w.dtype))
        picked = picked.scatter(1, idx, True)
    # the union of the choices' top-k sets first (a picked expert sorts above an unpicked one), then unpicked
    # experts, whose mixture weight is exactly 0, up to the fixed width
    width = min(E, gate.top_k * len(chosen))
    index = torch.topk(picked.to(scores.dtype), k=width, dim=-1)[1]
    return logits, dense.gather(1, index), index
