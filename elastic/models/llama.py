"""The Llama family: transformers' `LlamaForCausalLM` and the decoders sharing its layout (Qwen2, Qwen3, Mistral).

Every layer is one kind, ``L``: pre-norm attention then pre-norm gated MLP, ``x + attn(norm1(x))``,
``x + down(act(gate(norm2(x))) * up(norm2(x)))``. Axes, all ordered by importance so a sub-network
keeps a *prefix* of each ranked axis:

* ``hidden`` -- residual-stream channels, one ranking shared by every layer: ``embed_tokens``
  columns, both norms of every layer, q/k/v and gate/up columns, o_proj and down_proj rows, the
  final ``norm`` and ``lm_head`` (the embedding itself when tied).
* ``ffn``    -- MLP neurons per layer: gate/up rows, down_proj columns.
* ``heads``  -- query heads per layer, ranked *within their KV group* so every group keeps the same
  number and GQA stays valid: q_proj rows and o_proj columns of the kept heads (``head_dim`` channels
  each); k/v projections lose only hidden columns, KV heads are never cut.
* ``depth``  -- whole layers.

GQA layout (transformers' ``repeat_kv``): KV head ``g`` serves query heads ``g * r .. g * r + r - 1``
(``r = num_attention_heads / num_key_value_heads``), so a group's query heads are contiguous, the
layout `Ranking.index` assumes for grouped axes.

Which projections carry a bias differs by model type (Llama: ``attention_bias`` on q/k/v/o and
``mlp_bias``; Qwen2: always on q/k/v, never on o or the MLP; Qwen3: ``attention_bias`` on q/k/v/o;
Mistral: none), and Qwen3 adds per-head RMS norms of q and k over ``head_dim`` (``q_norm``, ``k_norm``:
untouched by any axis). Each type has its own `Sizes` subclass, so the exported config and
``model_type`` stay the parent's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from elastic.arch import ArchError
from elastic.models.family import (Axis, ElasticBase, Ranking, Sizes as _Sizes, assemble_child, head_stat, input_stat,
                                   masked_units, output_stat, prefix_masks, slice_inputs)

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Sizes(_Sizes):
    """Sizes of a Llama-layout network. Field names follow the HF configs (`to_config` copies them);
    `pattern` is ``"L" * num_layers``. The bias flags say which projections have a bias; `qk_norm`
    whether q and k get a per-head RMS norm (Qwen3)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    # fixed fields (never pruned)
    vocab_size: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    AXES = (
        Axis("ffn", "intermediate_size", "L", "FFN size"),
        Axis("heads", "num_attention_heads", "L", "attention heads", groups_field="num_key_value_heads"),
    )
    KINDS = "L"
    FIXED = ("vocab_size", "num_key_value_heads", "head_dim", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias",
             "qk_norm")
    MODEL_TYPE = "llama"

    # transformers (5.x) `LlamaConfig` refuses hidden_size % num_attention_heads != 0 even with an explicit
    # head_dim, at construction and at `from_pretrained`: such a child could not be loaded. Qwen2, Qwen3
    # and Mistral configs have no such rule.
    HIDDEN_DIVISIBLE_BY_HEADS: ClassVar[bool] = True

    def __post_init__(self):
        for name in ("vocab_size", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ArchError(f"{name} must be positive, got {getattr(self, name)}")
        super().__post_init__()  # also: num_attention_heads a multiple of num_key_value_heads (GQA)
        if not self.allows(self.sizes()):
            raise ArchError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                            f"{self.num_attention_heads}: transformers' {self.MODEL_TYPE} config refuses it, so "
                            "such a model could not be loaded (pick hidden sizes divisible by every heads choice)")

    def allows(self, sizes):
        """Whether axis sizes `sizes` make a loadable config (ints or broadcast tensors, elementwise)."""
        if not self.HIDDEN_DIVISIBLE_BY_HEADS:
            return True
        return sizes["hidden"] % sizes.get("heads", self.num_attention_heads) == 0

    @staticmethod
    def _layout(c: dict) -> dict[str, bool]:
        """Which projections of this model type carry a bias (and whether q/k are normed), from its config."""
        att = bool(c.get("attention_bias", False))
        return {"qkv_bias": att, "o_bias": att, "mlp_bias": bool(c.get("mlp_bias", False)), "qk_norm": False}

    # ------------------------------------------------------------------ the one closed form
    def params_of(self, sizes, counts):
        """Embeddings (+ untied lm_head) + final norm + per layer: two norms, q/k/v/o, gate/up/down."""
        h = sizes["hidden"]
        f = sizes.get("ffn", self.intermediate_size)
        q = sizes.get("heads", self.num_attention_heads) * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        layer = 2 * h + 2 * self.head_dim * self.qk_norm  # input_layernorm, post_attention_layernorm (q_norm, k_norm)
        layer = layer + h * q + q * self.qkv_bias  # q_proj
        layer = layer + 2 * (h * kv + kv * self.qkv_bias)  # k_proj, v_proj
        layer = layer + q * h + h * self.o_bias  # o_proj
        layer = layer + 3 * h * f + (2 * f + h) * self.mlp_bias  # gate_proj, up_proj, down_proj
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h  # embed (+ lm_head) + norm
        return emb + counts.get("L", 0) * layer

    def kv_cache_of(self, sizes, counts, bytes_per_value):
        """K and V of every layer for one token (KV heads are never cut)."""
        return counts.get("L", 0) * 2 * self.num_key_value_heads * self.head_dim * bytes_per_value

    def state_of(self, sizes, counts, bytes_per_value):
        return 0  # no recurrent state

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_config(cls, config: Any) -> "Sizes":
        """The sizes of a Llama / Qwen2 / Qwen3 / Mistral config (object or dict); the subclass follows its model_type."""
        c = config if isinstance(config, dict) else config.to_dict()
        model_type = c.get("model_type")
        if model_type not in _BY_TYPE:
            raise ArchError(f"expected a config of model_type {list(_BY_TYPE)}, got {model_type!r}")
        kind = _BY_TYPE[model_type]
        heads = c["num_attention_heads"]
        return kind(
            pattern="L" * c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_attention_heads=heads,
            vocab_size=c["vocab_size"],
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            **kind._layout(c),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "Sizes":
        return _BY_TYPE[d.get("model_type", cls.MODEL_TYPE)]._from_fields(d)

    @classmethod
    def _from_fields(cls, d: dict) -> "Sizes":
        return super().from_dict(d)

    def to_config(self, parent_config: Any):
        """The parent's config with these sizes: heads, widths, layer count and any per-layer list
        (``layer_types``) follow the kept layers; ``head_dim`` is written out, since
        ``hidden_size / num_attention_heads`` no longer gives it."""
        from transformers import AutoConfig

        d = dict(parent_config) if isinstance(parent_config, dict) else parent_config.to_dict()
        if d.get("model_type") != self.MODEL_TYPE:
            raise ArchError(f"sizes of a {self.MODEL_TYPE} network cannot make a {d.get('model_type')!r} config")
        types = d.get("layer_types")
        if types is not None:
            if len(types) <= max(self.layers):
                raise ArchError(f"the parent config lists {len(types)} layer types, layer {max(self.layers)} is kept")
            d["layer_types"] = [types[i] for i in self.layers]
        d.update(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_attention_heads=self.num_attention_heads, num_hidden_layers=self.num_layers,
                 vocab_size=self.vocab_size, num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 tie_word_embeddings=self.tie_word_embeddings)
        d.pop("model_type")
        cfg = AutoConfig.for_model(self.MODEL_TYPE, **d)
        if not cfg.architectures:
            cfg.architectures = [_CAUSAL_LM[self.MODEL_TYPE]]
        return cfg


@dataclass(frozen=True, kw_only=True)
class Qwen2Sizes(Sizes):
    MODEL_TYPE = "qwen2"
    HIDDEN_DIVISIBLE_BY_HEADS = False

    @staticmethod
    def _layout(c: dict) -> dict[str, bool]:
        # fixed by Qwen2's modules, not its config
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False}


@dataclass(frozen=True, kw_only=True)
class Qwen3Sizes(Sizes):
    MODEL_TYPE = "qwen3"
    HIDDEN_DIVISIBLE_BY_HEADS = False

    @staticmethod
    def _layout(c: dict) -> dict[str, bool]:
        att = bool(c.get("attention_bias", False))
        return {"qkv_bias": att, "o_bias": att, "mlp_bias": False, "qk_norm": True}


@dataclass(frozen=True, kw_only=True)
class MistralSizes(Sizes):
    MODEL_TYPE = "mistral"
    HIDDEN_DIVISIBLE_BY_HEADS = False

    @staticmethod
    def _layout(c: dict) -> dict[str, bool]:
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": False}


_BY_TYPE = {k.MODEL_TYPE: k for k in (Sizes, Qwen2Sizes, Qwen3Sizes, MistralSizes)}
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM"}


def arch_of(model) -> Sizes:
    """The sizes of a loaded model of this family (read from its config)."""
    return Sizes.from_config(model.config)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def set_decoder_layers(model, layers) -> None:
    """Replace the layer list (depth importance swaps in lists without one layer, then restores).

    The model runs ``layers[:config.num_hidden_layers]`` and Qwen2 picks each layer's attention mask
    from ``config.layer_types[i]``: both follow the new list (each attention module knows its type)."""
    model.model.layers = nn.ModuleList(layers)
    cfg = model.config
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [getattr(layer.self_attn, "layer_type", None) or "full_attention" for layer in layers]


def width_hooks(model, sizes: Sizes, add) -> list:
    """Activation statistics for importance (`add(key, [B, C])`, mean |a| over the sequence):

    * ``hidden``    -- the outputs of both norms of every layer and of the final norm (every reader of
      the residual stream reads it through one of them);
    * ``ffn.<l>``   -- the MLP's hidden activation ``act(gate) * up`` (the input of ``down_proj``);
    * ``heads.<l>`` -- per query head, the L2 over ``head_dim`` of the input of ``o_proj``; heads are
      later ranked within their KV group.
    """
    on_norm = output_stat(add, "hidden")
    hooks = []
    for i, layer in enumerate(decoder_layers(model)):
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(input_stat(add, f"ffn.{i}")))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_stat(add, f"heads.{i}", sizes.num_attention_heads)))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    return hooks


@torch.no_grad()
def slice_model(model, sizes: Sizes, ranking: Ranking | None = None):
    """Cut `sizes` out of `model`: a new, plain model of the same class holding the ranked prefixes.

    Its config is ``sizes.to_config(model.config)``; it is built on the meta device then filled with
    the kept weights (one copy of them, nothing initialised), in the parent's dtype."""
    parent, ranking, hk, src = slice_inputs(model, sizes, ranking)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, old: str, rows=None, cols=None) -> None:
        """`name` <- `old` with rows / columns gathered; its bias (if any) follows the rows."""
        w = src[old + ".weight"]
        w = w if rows is None else w[rows]
        out[name + ".weight"] = (w if cols is None else w[:, cols]).contiguous().clone()
        if old + ".bias" in src:
            b = src[old + ".bias"]
            out[name + ".bias"] = (b if rows is None else b[rows]).contiguous().clone()

    put("model.embed_tokens", "model.embed_tokens", cols=hk)
    put("model.norm", "model.norm", rows=hk)
    if not sizes.tie_word_embeddings:
        put("lm_head", "lm_head", cols=hk)

    hd = parent.head_dim
    for new_i, old_i in enumerate(sizes.layers):
        p, q = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        put(q + "input_layernorm", p + "input_layernorm", rows=hk)
        put(q + "post_attention_layernorm", p + "post_attention_layernorm", rows=hk)
        heads = ranking.index("heads", old_i, sizes.num_attention_heads)
        ch = (heads.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # the kept heads' q / o channels
        put(q + "self_attn.q_proj", p + "self_attn.q_proj", rows=ch, cols=hk)
        put(q + "self_attn.k_proj", p + "self_attn.k_proj", cols=hk)
        put(q + "self_attn.v_proj", p + "self_attn.v_proj", cols=hk)
        put(q + "self_attn.o_proj", p + "self_attn.o_proj", rows=hk, cols=ch)
        if sizes.qk_norm:  # per-head norms over head_dim, shared by all heads: kept whole
            put(q + "self_attn.q_norm", p + "self_attn.q_norm")
            put(q + "self_attn.k_norm", p + "self_attn.k_norm")
        f = ranking.index("ffn", old_i, sizes.intermediate_size)
        put(q + "mlp.gate_proj", p + "mlp.gate_proj", rows=f, cols=hk)
        put(q + "mlp.up_proj", p + "mlp.up_proj", rows=f, cols=hk)
        put(q + "mlp.down_proj", p + "mlp.down_proj", rows=hk, cols=f)

    return assemble_child(model, sizes, out)


# ---------------------------------------------------------------------------------------------
# the elastic (masked) model
# ---------------------------------------------------------------------------------------------
class Elastic(ElasticBase):
    """A Llama-layout model masked to a (soft) architecture of a space (see `ElasticBase`).

    transformers' own modules compute everything; these module *instances* get a masked forward:

    * every ``input_layernorm`` / ``post_attention_layernorm`` and the final ``norm`` -- the hidden axis
      (`masked_rmsnorm_forward`: they are the only readers of the residual stream);
    * every ``mlp.down_proj`` -- the FFN axis: its input ``act(gate) * up`` times the expected prefix mask;
    * every ``self_attn.o_proj`` -- the heads axis: its input (heads x head_dim channels, KV groups
      contiguous) times the expected per-group prefix mask of heads, expanded to their channels; a
      head masked out contributes nothing, as if its q_proj rows and o_proj columns were gone;
    * every decoder layer -- depth (`gated_block_forward`).
    """

    family = sys.modules[__name__]

    def _patch_axes(self) -> None:
        a = self.arch
        groups = a.num_key_value_heads
        per_group = a.num_attention_heads // groups
        self.register_buffer("ffn_masks", prefix_masks(list(self.space.choices["ffn"]), a.intermediate_size),
                             persistent=False)
        heads = prefix_masks([k // groups for k in self.space.choices["heads"]], per_group)  # [J, heads per group]
        self.register_buffer("heads_masks", heads.repeat_interleave(a.head_dim, dim=1), persistent=False)
        for i, layer in enumerate(decoder_layers(self.model)):
            self.patch_block(layer, i)
            self.patch_norm(layer.input_layernorm)
            self.patch_norm(layer.post_attention_layernorm)
            self.patch(layer.mlp.down_proj, masked_input_forward, self.state, "ffn", lambda: self.ffn_masks, 1)
            self.patch(layer.self_attn.o_proj, masked_input_forward, self.state, "heads", lambda: self.heads_masks,
                       groups)
        self.patch_norm(self.model.model.norm)


def masked_input_forward(linear, orig, st, axis, masks, groups, x):
    """A projection reading the units of `axis` (``groups`` contiguous groups) under the axis's mask."""
    p = st().get(axis)
    if p is not None:
        x = masked_units(x, p, masks(), groups)
    return orig(linear, x)
