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

Layer kinds use the single-letter pattern of NVIDIA's configs: ``M`` Mamba-2, ``-`` MLP, ``*``
attention (``E`` MoE is recognised but not supported by the surgery yet).
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

    AXES = (
        Axis("ffn", "intermediate_size", "-", "FFN size"),
        Axis("mamba", "mamba_num_heads", "M", "Mamba heads", groups_field="n_groups"),
    )
    KINDS = "M-*E"
    FIXED = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_head_dim", "n_groups",
             "ssm_state_size", "conv_kernel", "tie_word_embeddings", "use_bias", "use_conv_bias", "mlp_bias",
             "attention_bias")
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
            raise ArchError("MoE layers ('E') are not supported yet")

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
    def _block_params(self, kind: str, h, f, m):
        """Parameters of one block of `kind`, its pre-norm included, for hidden `h`, FFN `f`, Mamba heads `m`."""
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
        else:
            raise ArchError(f"unsupported layer kind {kind!r}")
        return n

    def layer_params(self, kind: str) -> int:
        """Exact parameter count of one block of the given kind, its pre-norm included."""
        return int(self._block_params(kind, self.hidden_size, self.intermediate_size, self.mamba_num_heads))

    def params_of(self, sizes, counts):
        h = sizes["hidden"]
        n = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h  # embeddings (+ lm_head) + norm_f
        for kind in "M-*":
            c = counts.get(kind, 0)
            if not isinstance(c, torch.Tensor) and c == 0:
                continue
            n = n + c * self._block_params(kind, h, sizes.get("ffn", self.intermediate_size),
                                           sizes.get("mamba", self.mamba_num_heads))
        return n

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
        kw = {k: c.get(k, defaults.get(k)) for k in cls.FIXED}
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
        for k in self.FIXED:
            d[k] = getattr(self, k)
        cfg = NemotronHConfig(**d)
        if not cfg.architectures:
            cfg.architectures = ["NemotronHForCausalLM"]
        return cfg

    def short(self) -> str:
        """One-line human summary, e.g. ``hidden 3136, ffn 12544, mamba heads 96, layers 42 (...), 3.97B params``."""
        from elastic.arch import human_count

        return (f"hidden {self.hidden_size}, ffn {self.intermediate_size}, mamba heads {self.mamba_num_heads}, "
                f"layers {self.num_layers} ({self.count('M')}M {self.count('-')}- {self.count('*')}*), "
                f"{human_count(self.num_params())} params")


Arch = Sizes  # the name this type had before families existed (tests, scripts)


def arch_of(model) -> Sizes:
    """The sizes of a loaded NemotronH model (read from its config)."""
    return Sizes.from_config(model.config)


def make_arch(parent: Sizes, ranking: Ranking | None = None, *, hidden_size: int | None = None,
              intermediate_size: int | None = None, mamba_num_heads: int | None = None, drop_layers: int = 0,
              layers: tuple[int, ...] | None = None, protect_kinds: str = "") -> Sizes:
    """`Sizes.cut` with NemotronH's config field names."""
    return parent.cut(ranking, sizes={"hidden": hidden_size, "ffn": intermediate_size, "mamba": mamba_num_heads},
                      drop_layers=drop_layers, layers=layers, protect_kinds=protect_kinds)
