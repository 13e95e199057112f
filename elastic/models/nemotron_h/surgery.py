"""NemotronH surgery: the block list, the importance hooks and the physical slice (all index math here).

`slice_model` gathers the ranked prefix of each axis, so the child's channels are stored in
importance order: its own ranking is the identity on every width axis (`Ranking.child`), which is
what makes "slice twice == slice once" hold exactly.

Mamba-2 layout (transformers' `NemotronHMamba2Mixer`), used by the index math below:
``in_proj`` rows are ``[z (I) | x (I) | B (G*N) | C (G*N) | dt (H)]`` with ``I = H * head_dim``;
``conv1d`` is depthwise over ``[x | B | C]``; ``dt_bias``, ``A_log``, ``D`` are per head; the gated
RMSNorm normalises each group's ``I / G`` channels; ``out_proj`` reads ``I`` columns. Heads of a
group are contiguous.

MoE layout (transformers' `NemotronHMoE`): ``gate.weight [E, h]`` and ``gate.e_score_correction_bias
[E]`` (routing groups are ``n_group`` contiguous blocks of experts), ``experts.up_proj [E, f, h]`` and
``experts.down_proj [E, h, f]``, ``shared_experts`` a plain NemotronH MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elastic.arch import ArchError
from elastic.models.family import Ranking, assemble_child, head_stat, input_stat, output_stat, slice_inputs
from elastic.models.nemotron_h.sizes import Sizes


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def set_decoder_layers(model, layers: nn.ModuleList) -> None:
    model.model.layers = layers


def width_hooks(model, sizes: Sizes, add) -> list:
    """Activation statistics for importance (`add(key, [B, C])`, mean |a| over the sequence):

    * ``hidden`` -- the outputs of every RMSNorm that feeds a mixer, plus ``norm_f``;
    * ``ffn.<l>`` -- the MLP's hidden activation (the input of ``down_proj``);
    * ``mamba.<l>`` -- per head, the L2 over ``head_dim`` of the activation entering ``out_proj``
      (after the gated group norm); heads are later ranked within their group;
    * ``attn.<l>`` -- per head, the input of ``o_proj`` (recorded for reports; not pruned);
    * MoE layers: ``experts.<l>``, ``experts_frequency.<l>``, ``moe_ffn.<l>`` (`moe_stat`) and
      ``shared_ffn.<l>``, the shared expert's hidden activation.
    """
    on_norm = output_stat(add, "hidden")
    hooks = []
    for i, (block, kind) in enumerate(zip(decoder_layers(model), sizes.pattern)):
        hooks.append(block.norm.register_forward_hook(on_norm))
        if kind == "E":
            hooks.append(block.mixer.register_forward_hook(moe_stat(add, i)))
            hooks.append(block.mixer.shared_experts.down_proj.register_forward_pre_hook(input_stat(add, f"shared_ffn.{i}")))
        elif kind == "-":
            hooks.append(block.mixer.down_proj.register_forward_pre_hook(input_stat(add, f"ffn.{i}")))
        elif kind == "M":
            hooks.append(block.mixer.out_proj.register_forward_pre_hook(head_stat(add, f"mamba.{i}", sizes.mamba_num_heads)))
        elif kind == "*":
            hooks.append(block.mixer.o_proj.register_forward_pre_hook(head_stat(add, f"attn.{i}", sizes.num_attention_heads)))
    hooks.append(model.model.norm_f.register_forward_hook(on_norm))
    return hooks


# the statistics `experts.<l>` may be ranked by (`expert_scores`); the first is the default
EXPERT_SCORES = ("share_gate_norm", "frequency")


def moe_stat(add, layer: int):
    """Forward hook on a MoE mixer: per sequence, for each routed expert ``e`` of the layer

    * ``experts.<l>`` = routed-token share x mean gate weight x mean output norm: the share of the
      sequence's (token, slot) routings that go to ``e``, the mean of the router's weight over them and
      the mean L2 norm of ``e``'s output (before the gate weight) over them -- how much ``e`` moves the
      residual stream; an expert nobody routes to scores 0;
    * ``experts_frequency.<l>`` = the routed-token share alone (the baseline ranking, `expert_scores`);
    * ``moe_ffn.<l>`` = per neuron, ``|activation|`` summed over every (token, expert) routing and divided
      by their number: the experts' mean activations weighted by each expert's token share (one ranking
      for all experts of the layer, since one ``moe_intermediate_size`` holds for all).

    The router is rerun on the mixer's input (cheap: ``[tokens, E]``) and each routed expert on its own
    tokens, one expert at a time: the hook holds ``[tokens routed to e, f]`` at most, never a
    ``[tokens, experts, hidden]`` tensor.
    """

    def hook(mixer, inputs, _output):
        x = inputs[0]
        B, S, h = x.shape
        _, weights, index = mixer.gate(x)  # [B*S, k] each
        k = index.shape[-1]
        experts = mixer.experts
        E, dev = experts.num_experts, x.device
        seq = torch.arange(B * S, device=dev).div(S, rounding_mode="floor").repeat_interleave(k)  # routing -> sequence
        flat_e, flat_w = index.reshape(-1), weights.reshape(-1).float()
        count = torch.zeros(B, E, device=dev).index_put_((seq, flat_e), torch.ones_like(flat_w), accumulate=True)
        gate = torch.zeros(B, E, device=dev).index_put_((seq, flat_e), flat_w, accumulate=True)
        norm = torch.zeros(B, E, device=dev)
        act = torch.zeros(B, experts.intermediate_dim, device=dev)
        tokens = x.reshape(B * S, h)
        order = torch.argsort(flat_e, stable=True)  # routings grouped by expert
        bounds = torch.bincount(flat_e, minlength=E).cumsum(0).tolist()
        start = 0
        for e, end in enumerate(bounds):
            if end > start:
                r = order[start:end]  # this expert's routings
                a = experts.act_fn(F.linear(tokens[r // k], experts.up_proj[e]))
                out = F.linear(a, experts.down_proj[e])
                norm[:, e].index_add_(0, seq[r], out.float().norm(dim=-1))
                act.index_add_(0, seq[r], a.float().abs())
            start = end
        per = count.clamp(min=1)
        share = count / (S * k)
        add(f"experts.{layer}", share * (gate / per) * (norm / per))
        add(f"experts_frequency.{layer}", share)
        add(f"moe_ffn.{layer}", act / (S * k))

    return hook


def expert_scores(scores: dict[str, torch.Tensor], statistic: str = "share_gate_norm") -> dict[str, torch.Tensor]:
    """`scores` (as `width_hooks` recorded them) with ``experts.<l>`` taken from `statistic`: ``share_gate_norm``
    (the default, what the hooks store under ``experts.<l>``) or ``frequency`` (the routed-token share alone,
    ``experts_frequency.<l>``), for `Ranking.from_scores`."""
    if statistic not in EXPERT_SCORES:
        raise ArchError(f"expert score must be one of {', '.join(EXPERT_SCORES)}, got {statistic!r}")
    if statistic == "share_gate_norm":
        return dict(scores)
    out = {k: v for k, v in scores.items() if not k.startswith("experts.")}
    for key, val in scores.items():
        if key.startswith("experts_frequency."):
            out["experts." + key.partition(".")[2]] = val
    return out


@torch.no_grad()
def slice_model(model, arch: Sizes, ranking: Ranking | None = None):
    """Cut `arch` out of `model`: a new, plain `NemotronHForCausalLM` holding the ranked prefixes.

    The config of the result is `arch.to_config(model.config)`, i.e. derived from the kept sizes, and
    the model is built on the meta device then filled, so slicing a 9B model costs one copy of the
    kept weights.
    """
    parent, ranking, hk, src = slice_inputs(model, arch, ranking)
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
            heads = ranking.index("mamba", old_i, arch.mamba_num_heads)
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
            f = ranking.index("ffn", old_i, arch.intermediate_size)
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
        elif kind == "E":
            m, n = p + "mixer.", q + "mixer."
            ex = ranking.index("experts", old_i, arch.n_routed_experts)  # group by group: routing groups stay whole
            fe = ranking.index("moe_ffn", old_i, arch.moe_intermediate_size)
            fs = ranking.index("shared_ffn", old_i, arch.moe_shared_expert_intermediate_size)
            put(n + "gate.weight", src[m + "gate.weight"][ex][:, hk])
            put(n + "gate.e_score_correction_bias", src[m + "gate.e_score_correction_bias"][ex])
            put(n + "experts.up_proj", src[m + "experts.up_proj"][ex][:, fe][:, :, hk])
            put(n + "experts.down_proj", src[m + "experts.down_proj"][ex][:, hk][:, :, fe])
            put(n + "shared_experts.up_proj.weight", src[m + "shared_experts.up_proj.weight"][fs][:, hk])
            put(n + "shared_experts.down_proj.weight", src[m + "shared_experts.down_proj.weight"][hk][:, fs])
            if m + "shared_experts.up_proj.bias" in src:
                put(n + "shared_experts.up_proj.bias", src[m + "shared_experts.up_proj.bias"][fs])
                put(n + "shared_experts.down_proj.bias", src[m + "shared_experts.down_proj.bias"][hk])
        else:  # pragma: no cover - Sizes rejects other kinds
            raise ArchError(f"cannot slice layer kind {kind!r}")

    return assemble_child(model, arch, out)


