"""NemotronH surgery: the block list, the importance hooks and the physical slice (all index math here).

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

import torch
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
    * ``attn.<l>`` -- per head, the input of ``o_proj`` (recorded for reports; not pruned).
    """
    on_norm = output_stat(add, "hidden")
    hooks = []
    for i, (block, kind) in enumerate(zip(decoder_layers(model), sizes.pattern)):
        hooks.append(block.norm.register_forward_hook(on_norm))
        if kind == "-":
            hooks.append(block.mixer.down_proj.register_forward_pre_hook(input_stat(add, f"ffn.{i}")))
        elif kind == "M":
            hooks.append(block.mixer.out_proj.register_forward_pre_hook(head_stat(add, f"mamba.{i}", sizes.mamba_num_heads)))
        elif kind == "*":
            hooks.append(block.mixer.o_proj.register_forward_pre_hook(head_stat(add, f"attn.{i}", sizes.num_attention_heads)))
    hooks.append(model.model.norm_f.register_forward_hook(on_norm))
    return hooks


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
        else:  # pragma: no cover - Sizes rejects other kinds
            raise ArchError(f"cannot slice layer kind {kind!r}")

    return assemble_child(model, arch, out)


