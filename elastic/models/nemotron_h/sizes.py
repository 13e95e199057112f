"""NemotronH sizes: the `Sizes` type (exact parameter count, memory, config export), the layer-pattern
helpers and `make_arch`. The bottom of the family: it imports nothing else of the family.

Axes (all ordered by importance, so every sub-network keeps a *prefix* of each ranked axis and the
family is nested):

* ``hidden``  -- residual-stream channels, one ranking shared by every layer (embeddings, every
  block's pre-norm, every mixer's input/output projection, ``norm_f`` and ``lm_head``).
* ``ffn``     -- MLP neurons, one ranking per MLP layer (the kept count is the same in every layer:
  stock HF NemotronH holds a single ``intermediate_size``).
* ``mamba``   -- Mamba-2 heads, ranked *within each group* (``[n_groups, heads_per_group]`` local
  indices per Mamba layer) so every group keeps the same count; B and C, shared by a group's heads,
  are never cut; ``head_dim`` is kept.
* ``depth``   -- whole layers, ranked from most to least important; a depth budget drops the tail.
* MoE layers (``E``, transformers' `NemotronHMoE`: a sigmoid top-k router ``gate``, routed experts
  ``experts`` stacked as ``up_proj [E, f, h]`` / ``down_proj [E, h, f]``, one shared expert MLP):
  ``experts`` -- routed experts, one ranking per MoE layer (within each of ``n_group`` routing groups),
  the kept count the same in every layer; ``moe_ffn`` -- each routed expert's neurons, one ranking per
  layer shared by all its experts (one ``moe_intermediate_size`` holds for all); ``shared_ffn`` -- the
  shared expert's neurons. These three axes exist only for networks with MoE layers (`Axis.optional`):
  a dense NemotronH has exactly the axes, fields and counts it had before MoE support.

Layer kinds use the single-letter pattern of NVIDIA's configs: ``M`` Mamba-2, ``-`` MLP, ``*``
attention, ``E`` MoE.

Parameter counts (`params_of`) are every tensor of the checkpoint: ``parameters()`` plus each MoE
router's ``e_score_correction_bias`` (a persistent buffer, one float per expert, read by every token's
routing). `active_of` counts what one token touches: the embedding and head (like ModelOpt's active
count; no non-embedding variant), every non-MoE layer, and in each MoE layer its norm, the router's
weight and correction bias (all experts' rows: every token is scored against every kept expert), the
shared expert and ``num_experts_per_tok`` routed experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from elastic.arch import ArchError
from elastic.models.family import Axis, Ranking, Sizes as _Sizes

MODEL_TYPES = ("nemotron_h",)

# HF `layers_block_type` names <-> NVIDIA pattern letters.
LAYER_TYPE_TO_CHAR = {"linear_attention": "M", "mlp": "-", "full_attention": "*", "moe": "E"}
CHAR_TO_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_TO_CHAR.items()}


def pattern_to_types(pattern: str) -> tuple[str, ...]:
    bad = set(pattern) - set(CHAR_TO_LAYER_TYPE)
    if bad:
        raise ArchError(f"layer pattern {pattern!r} has unknown layer kinds {sorted(bad)}; use M, -, *, E")
    return tuple(CHAR_TO_LAYER_TYPE[c] for c in pattern)


def types_to_pattern(types: Iterable[str]) -> str:
    return "".join(LAYER_TYPE_TO_CHAR[t] for t in types)


@dataclass(frozen=True, kw_only=True)
class Sizes(_Sizes):
    """Sizes of a NemotronH network. Field names follow transformers' `NemotronHConfig`, so `to_config`
    is a plain field copy; `pattern` is the kept layers' kinds, e.g. ``"M-M*-"``."""

    hidden_size: int
    intermediate_size: int
    mamba_num_heads: int
    # fixed fields (never pruned by this project)
    vocab_size: int = 131072
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    mamba_head_dim: int = 80
    n_groups: int = 8
    ssm_state_size: int = 128
    conv_kernel: int = 4
    tie_word_embeddings: bool = False
    use_bias: bool = False  # Mamba in_proj/out_proj bias
    use_conv_bias: bool = True
    mlp_bias: bool = False
    attention_bias: bool = False  # transformers' NemotronH ignores it (q/k/v/o never have a bias)
    # MoE layers ('E'): the axes' fields, then fixed ones; defaults are transformers' NemotronHConfig's.
    # A dense network keeps the defaults whatever its config says (`from_config`): they describe no layer.
    n_routed_experts: int = 8
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    num_experts_per_tok: int = 2  # top-k: a child keeps at least this many experts
    n_shared_experts: int = 1  # transformers builds one shared MLP whatever this says
    n_group: int = 1  # routing groups (experts are ranked and kept within each)
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    moe_latent_size: int | None = None  # only None (no latent projection) is supported

    AXES = (
        Axis("ffn", "intermediate_size", "-", "FFN size"),
        Axis("mamba", "mamba_num_heads", "M", "Mamba heads", groups_field="n_groups"),
        Axis("experts", "n_routed_experts", "E", "routed experts", groups_field="n_group", optional=True),
        Axis("moe_ffn", "moe_intermediate_size", "E", "expert FFN size", optional=True),
        Axis("shared_ffn", "moe_shared_expert_intermediate_size", "E", "shared expert FFN size", optional=True),
    )
    KINDS = "M-*E"
    MOE_FIXED = ("num_experts_per_tok", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
                 "norm_topk_prob", "moe_latent_size")
    MOE_FIELDS = ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size") + MOE_FIXED
    FIXED = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_head_dim", "n_groups",
             "ssm_state_size", "conv_kernel", "tie_word_embeddings", "use_bias", "use_conv_bias", "mlp_bias",
             "attention_bias") + MOE_FIXED
    MODEL_TYPE = "nemotron_h"

    def __post_init__(self):
        super().__post_init__()
        for name in ("vocab_size", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel"):
            if getattr(self, name) <= 0:
                raise ArchError(f"{name} must be positive, got {getattr(self, name)}")
        if "*" in self.pattern:
            if self.num_attention_heads <= 0 or self.num_key_value_heads <= 0:
                raise ArchError("attention layers need positive num_attention_heads and num_key_value_heads")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ArchError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                f"num_key_value_heads={self.num_key_value_heads} (GQA)")
        if "E" in self.pattern:
            if self.moe_latent_size is not None:
                raise ArchError(f"moe_latent_size={self.moe_latent_size}: MoE layers with a latent projection are not "
                                "supported (only moe_latent_size null)")
            k, e, g = self.num_experts_per_tok, self.n_routed_experts, self.n_group
            if not 0 < k <= e:
                raise ArchError(f"n_routed_experts={e} is fewer than num_experts_per_tok={k} (the router's top-k): "
                                f"keep at least {k} experts")
            if g > 1 and (e // g < 2 or self.topk_group * (e // g) < k):
                raise ArchError(f"n_routed_experts={e} leaves {e // g} per routing group (n_group={g}): the router needs "
                                f"at least 2 per group and topk_group={self.topk_group} groups holding {k} experts")

    @property
    def is_moe(self) -> bool:
        return "E" in self.pattern

    # ------------------------------------------------------------------ derived sizes
    @property
    def layer_types(self) -> tuple[str, ...]:
        return pattern_to_types(self.pattern)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    # ------------------------------------------------------------------ the one closed form
    def _block_params(self, kind: str, h, f, m, e=None, fe=None, fs=None, active: bool = False):
        """Parameters of one block of `kind`, its pre-norm included, for hidden `h`, FFN `f`, Mamba heads `m`,
        and for a MoE block `e` routed experts of width `fe` and a shared expert of width `fs`; `active`: only
        what one token touches (``num_experts_per_tok`` routed experts)."""
        n = h  # the block's RMSNorm
        if kind == "M":
            i = m * self.mamba_head_dim
            conv = i + 2 * self.n_groups * self.ssm_state_size
            n = n + h * (i + conv + m) + (i + conv + m) * self.use_bias  # in_proj [z|xBC|dt]
            n = n + conv * self.conv_kernel + conv * self.use_conv_bias  # depthwise conv1d
            n = n + 3 * m + i  # dt_bias, A_log, D; gated RMSNorm weight
            n = n + i * h + h * self.use_bias  # out_proj
        elif kind == "-":
            n = n + 2 * h * f + (f + h) * self.mlp_bias
        elif kind == "*":
            q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            n = n + h * q + 2 * h * kv + q * h
        elif kind == "E":
            n = n + e * h + e  # router weight [E, h] and e_score_correction_bias [E]
            routed = self.num_experts_per_tok if active else e
            n = n + routed * 2 * h * fe  # experts' up_proj [E, fe, h] and down_proj [E, h, fe], no biases
            n = n + 2 * h * fs + (fs + h) * self.mlp_bias  # the shared expert (a NemotronH MLP)
        else:
            raise ArchError(f"unsupported layer kind {kind!r}")
        return n

    def layer_params(self, kind: str) -> int:
        """Exact parameter count of one block of the given kind, its pre-norm included."""
        return int(self._block_params(kind, self.hidden_size, self.intermediate_size, self.mamba_num_heads,
                                      self.n_routed_experts, self.moe_intermediate_size,
                                      self.moe_shared_expert_intermediate_size))

    def params_of(self, sizes, counts, active: bool = False):
        h = sizes["hidden"]
        n = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h  # embeddings (+ lm_head) + norm_f
        for kind in self.KINDS:
            c = counts.get(kind, 0)
            if not isinstance(c, torch.Tensor) and c == 0:
                continue
            n = n + c * self._block_params(kind, h, sizes.get("ffn", self.intermediate_size),
                                           sizes.get("mamba", self.mamba_num_heads),
                                           sizes.get("experts", self.n_routed_experts),
                                           sizes.get("moe_ffn", self.moe_intermediate_size),
                                           sizes.get("shared_ffn", self.moe_shared_expert_intermediate_size), active)
        return n

    def active_of(self, sizes, counts):
        """`params_of` with ``num_experts_per_tok`` routed experts per MoE layer (see the module docstring:
        embedding and head included); equal to `params_of` for a dense network."""
        return self.params_of(sizes, counts, active=True)

    def allows(self, sizes):
        """A MoE network keeps at least ``num_experts_per_tok`` experts (grids and the router's decode skip
        fewer); every other combination is accepted."""
        if not self.is_moe or "experts" not in sizes:
            return True
        return sizes["experts"] >= self.num_experts_per_tok

    def kv_cache_of(self, sizes, counts, bytes_per_value):
        """K and V of every attention layer for one token."""
        return counts.get("*", 0) * self.num_key_value_heads * self.head_dim * 2 * bytes_per_value

    def state_of(self, sizes, counts, bytes_per_value, state_bytes_per_value: int = 4):
        """Fixed per-sequence state of all Mamba layers: conv state + SSM state (fp32 in HF)."""
        m = sizes.get("mamba", self.mamba_num_heads)
        conv = m * self.mamba_head_dim + 2 * self.n_groups * self.ssm_state_size
        per_layer = (conv * (self.conv_kernel - 1) * bytes_per_value
                     + m * self.mamba_head_dim * self.ssm_state_size * state_bytes_per_value)
        return counts.get("M", 0) * per_layer

    def mamba_state_bytes(self, bytes_per_value: int = 2) -> int:
        return self.state_bytes(bytes_per_value)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_config(cls, config: Any) -> "Sizes":
        """Read the sizes of a `NemotronHConfig` (or a dict / JSON config with the same keys)."""
        c = config if isinstance(config, dict) else config.to_dict() | {"layers_block_type": config.layers_block_type}
        if c.get("model_type", "nemotron_h") != "nemotron_h":
            raise ArchError(f"expected a NemotronH config (model_type 'nemotron_h'), got {c.get('model_type')!r}")
        if c.get("layers_block_type"):
            pattern = types_to_pattern(c["layers_block_type"])
        elif c.get("hybrid_override_pattern"):
            pattern = c["hybrid_override_pattern"]
        else:
            raise ArchError("config has neither layers_block_type nor hybrid_override_pattern")
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        moe = "E" in pattern
        # a dense config's MoE keys (transformers fills them into every NemotronH config) describe no layer:
        # the defaults stand for them, so that a dense network's sizes do not depend on them
        kw = {k: (c.get(k, defaults.get(k)) if moe or k not in cls.MOE_FIELDS else defaults.get(k))
              for k in cls.FIXED + (cls.MOE_FIELDS if moe else ())}
        if c.get("head_dim") is None:
            kw["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
        return cls(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                   mamba_num_heads=c["mamba_num_heads"], pattern=pattern, **kw)

    def to_config(self, parent_config: Any):
        """A `NemotronHConfig` equal to `parent_config` except for these sizes and layers."""
        from transformers import NemotronHConfig

        if isinstance(parent_config, dict):
            parent_config = NemotronHConfig(**parent_config)
        d = parent_config.to_dict()
        # Both spellings of the layout: `layers_block_type` wins over the pattern in the constructor,
        # and a stale `num_hidden_layers` is one of the traps peers fell into.
        for stale in ("hybrid_override_pattern", "num_hidden_layers", "layer_types"):
            d.pop(stale, None)
        d.update(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 mamba_num_heads=self.mamba_num_heads, layers_block_type=list(self.layer_types))
        # a dense network leaves the parent config's MoE keys as they are (they describe no layer)
        for k in self.FIXED + (self.MOE_FIELDS if self.is_moe else ()):
            if self.is_moe or k not in self.MOE_FIELDS:
                d[k] = getattr(self, k)
        cfg = NemotronHConfig(**d)
        if not cfg.architectures:
            cfg.architectures = ["NemotronHForCausalLM"]
        return cfg

    def to_dict(self) -> dict:
        """As the base, without the MoE fields for a dense network (its record is the one it had before MoE
        support; `from_dict` restores the defaults)."""
        d = super().to_dict()
        return d if self.is_moe else {k: v for k, v in d.items() if k not in self.MOE_FIELDS}

    def short(self) -> str:
        """One-line human summary, e.g. ``hidden 3136, ffn 12544, mamba heads 96, layers 42 (...), 3.97B params``;
        a MoE network adds its experts and its active parameters."""
        from elastic.arch import human_count

        if not self.is_moe:
            return (f"hidden {self.hidden_size}, ffn {self.intermediate_size}, mamba heads {self.mamba_num_heads}, "
                    f"layers {self.num_layers} ({self.count('M')}M {self.count('-')}- {self.count('*')}*), "
                    f"{human_count(self.num_params())} params")
        return (f"hidden {self.hidden_size}, ffn {self.intermediate_size}, mamba heads {self.mamba_num_heads}, "
                f"experts {self.n_routed_experts} x {self.moe_intermediate_size} (top {self.num_experts_per_tok}), "
                f"shared expert {self.moe_shared_expert_intermediate_size}, layers {self.num_layers} "
                f"({self.count('M')}M {self.count('-')}- {self.count('*')}* {self.count('E')}E), "
                f"{human_count(self.num_params())} params, {human_count(self.active_params())} active")


Arch = Sizes  # the name this type had before families existed (tests, scripts)


def arch_of(model) -> Sizes:
    """The sizes of a loaded NemotronH model (read from its config)."""
    return Sizes.from_config(model.config)


def make_arch(parent: Sizes, ranking: Ranking | None = None, *, hidden_size: int | None = None,
              intermediate_size: int | None = None, mamba_num_heads: int | None = None,
              n_routed_experts: int | None = None, moe_intermediate_size: int | None = None,
              moe_shared_expert_intermediate_size: int | None = None, drop_layers: int = 0,
              layers: tuple[int, ...] | None = None, protect_kinds: str = "") -> Sizes:
    """`Sizes.cut` with NemotronH's config field names (None keeps the parent's size)."""
    return parent.cut(ranking, sizes={"hidden": hidden_size, "ffn": intermediate_size, "mamba": mamba_num_heads,
                                      "experts": n_routed_experts, "moe_ffn": moe_intermediate_size,
                                      "shared_ffn": moe_shared_expert_intermediate_size},
                      drop_layers=drop_layers, layers=layers, protect_kinds=protect_kinds)
