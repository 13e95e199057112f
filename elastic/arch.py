"""`Arch`: the one source of truth for the sizes of a NemotronH (sub)network.

Every size the pipeline talks about -- the parameter count, the weights kept by the surgery, the
exported `config.json`, the memory cost the router optimises -- is derived from an `Arch`. Stage code
never reads sizes from anywhere else.

Field names follow transformers' `NemotronHConfig` so that `to_config` is a plain field copy.
Layer kinds use the single-letter pattern of NVIDIA's configs: ``M`` Mamba-2, ``-`` MLP,
``*`` attention (``E`` MoE is recognised but not supported by the surgery yet).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

# HF `layers_block_type` names <-> NVIDIA pattern letters.
LAYER_TYPE_TO_CHAR = {"linear_attention": "M", "mlp": "-", "full_attention": "*", "moe": "E"}
CHAR_TO_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_TO_CHAR.items()}


class ArchError(ValueError):
    """An architecture that cannot exist (broken Mamba groups, GQA, sizes above the parent, ...)."""


def pattern_to_types(pattern: str) -> tuple[str, ...]:
    bad = set(pattern) - set(CHAR_TO_LAYER_TYPE)
    if bad:
        raise ArchError(f"layer pattern {pattern!r} has unknown layer kinds {sorted(bad)}; use M, -, *, E")
    return tuple(CHAR_TO_LAYER_TYPE[c] for c in pattern)


def types_to_pattern(types: Iterable[str]) -> str:
    return "".join(LAYER_TYPE_TO_CHAR[t] for t in types)


@dataclass(frozen=True)
class Arch:
    """Sizes of a NemotronH network. The first four fields are the elastic axes; the rest are fixed.

    `layers` are the indices, in the parent, of the layers this network keeps (in order); for a
    network that is not cut from a parent they are simply ``0..n-1``. `pattern` is the kept layers'
    kinds, e.g. ``"M-M*-"``.
    """

    hidden_size: int
    intermediate_size: int
    mamba_num_heads: int
    pattern: str
    layers: tuple[int, ...] = ()
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

    def __post_init__(self):
        if not self.layers:
            object.__setattr__(self, "layers", tuple(range(len(self.pattern))))
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        pattern_to_types(self.pattern)  # validates the letters
        if len(self.layers) != len(self.pattern):
            raise ArchError(f"{len(self.layers)} kept layer indices for a pattern of {len(self.pattern)} layers")
        if list(self.layers) != sorted(set(self.layers)):
            raise ArchError(f"kept layer indices must be strictly increasing, got {list(self.layers)}")
        if not self.pattern:
            raise ArchError("an architecture needs at least one layer")
        for name in ("hidden_size", "vocab_size", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel"):
            if getattr(self, name) <= 0:
                raise ArchError(f"{name} must be positive, got {getattr(self, name)}")
        if "-" in self.pattern and self.intermediate_size <= 0:
            raise ArchError(f"intermediate_size must be positive when MLP layers are kept, got {self.intermediate_size}")
        if "M" in self.pattern:
            if self.mamba_num_heads <= 0:
                raise ArchError(f"mamba_num_heads must be positive, got {self.mamba_num_heads}")
            if self.mamba_num_heads % self.n_groups:
                raise ArchError(
                    f"mamba_num_heads={self.mamba_num_heads} is not a multiple of n_groups={self.n_groups}: "
                    "every Mamba group must keep the same number of heads"
                )
        if "*" in self.pattern:
            if self.num_attention_heads <= 0 or self.num_key_value_heads <= 0:
                raise ArchError("attention layers need positive num_attention_heads and num_key_value_heads")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ArchError(
                    f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads} (GQA)"
                )
        if "E" in self.pattern:
            raise ArchError("MoE layers ('E') are not supported yet")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return pattern_to_types(self.pattern)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    def count(self, kind: str) -> int:
        """Number of kept layers of one kind ('M', '-', '*')."""
        return self.pattern.count(kind)

    # ------------------------------------------------------------------ parameters
    def layer_params(self, kind: str) -> int:
        """Exact parameter count of one block of the given kind, its pre-norm included."""
        h = self.hidden_size
        n = h  # the block's RMSNorm
        if kind == "M":
            i, nh = self.mamba_intermediate, self.mamba_num_heads
            n += h * (i + self.conv_dim + nh) + (i + self.conv_dim + nh) * self.use_bias  # in_proj [z|xBC|dt]
            n += self.conv_dim * self.conv_kernel + self.conv_dim * self.use_conv_bias  # depthwise conv1d
            n += 3 * nh  # dt_bias, A_log, D
            n += i  # gated RMSNorm weight
            n += i * h + h * self.use_bias  # out_proj
        elif kind == "-":
            f = self.intermediate_size
            n += 2 * h * f + (f + h) * self.mlp_bias
        elif kind == "*":
            q = self.num_attention_heads * self.head_dim
            kv = self.num_key_value_heads * self.head_dim
            n += h * q + 2 * h * kv + q * h
        else:
            raise ArchError(f"unsupported layer kind {kind!r}")
        return n

    def num_params(self) -> int:
        """Exact number of parameters of `NemotronHForCausalLM` built from `to_config`."""
        h, v = self.hidden_size, self.vocab_size
        n = v * h + h  # embeddings + norm_f
        n += 0 if self.tie_word_embeddings else v * h  # lm_head
        n += sum(self.layer_params(k) for k in self.pattern)
        return n

    # ------------------------------------------------------------------ inference memory
    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """K and V of every attention layer for one token."""
        return self.count("*") * self.num_key_value_heads * self.head_dim * 2 * bytes_per_value

    def mamba_state_bytes(self, bytes_per_value: int = 2, state_bytes_per_value: int = 4) -> int:
        """Fixed per-sequence state of all Mamba layers: conv state + SSM state (fp32 by default in HF)."""
        conv = self.conv_dim * (self.conv_kernel - 1) * bytes_per_value
        ssm = self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size * state_bytes_per_value
        return self.count("M") * (conv + ssm)

    def memory_bytes(self, context: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        """Weights + KV cache + Mamba state for `batch` sequences of `context` tokens."""
        return (
            self.num_params() * bytes_per_value
            + batch * context * self.kv_cache_bytes_per_token(bytes_per_value)
            + batch * self.mamba_state_bytes(bytes_per_value)
        )

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_config(cls, config: Any) -> "Arch":
        """Read an `Arch` from a `NemotronHConfig` (or a dict / JSON config with the same keys)."""
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
        kw = {k: c.get(k, defaults.get(k)) for k in _FIXED_FIELDS}
        if c.get("head_dim") is None:
            kw["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
        return cls(
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            mamba_num_heads=c["mamba_num_heads"],
            pattern=pattern,
            **kw,
        )

    def to_config(self, parent_config: Any):
        """A `NemotronHConfig` equal to `parent_config` except for this architecture's sizes and layers."""
        from transformers import NemotronHConfig

        if isinstance(parent_config, dict):
            parent_config = NemotronHConfig(**parent_config)
        d = parent_config.to_dict()
        # Both spellings of the layout: `layers_block_type` wins over the pattern in the constructor,
        # and a stale `num_hidden_layers` is one of the traps peers fell into.
        for stale in ("hybrid_override_pattern", "num_hidden_layers", "layer_types"):
            d.pop(stale, None)
        d.update(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            mamba_num_heads=self.mamba_num_heads,
            layers_block_type=list(self.layer_types),
        )
        for k in _FIXED_FIELDS:
            d[k] = getattr(self, k)
        cfg = NemotronHConfig(**d)
        if not cfg.architectures:
            cfg.architectures = ["NemotronHForCausalLM"]
        return cfg

    def replace(self, **changes) -> "Arch":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "layers" else v) for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def short(self) -> str:
        """One-line human summary, e.g. ``h3136 ffn12544 mamba96 L42 (3.97B)``."""
        return (
            f"hidden {self.hidden_size}, ffn {self.intermediate_size}, mamba heads {self.mamba_num_heads}, "
            f"layers {self.num_layers} ({self.count('M')}M {self.count('-')}- {self.count('*')}*), "
            f"{human_count(self.num_params())} params"
        )

    def check_within(self, parent: "Arch") -> None:
        """Raise `ArchError` unless this architecture can be cut out of `parent`."""
        for name in ("hidden_size", "intermediate_size", "mamba_num_heads"):
            if getattr(self, name) > getattr(parent, name):
                raise ArchError(f"{name}={getattr(self, name)} exceeds the parent's {getattr(parent, name)}")
        for name in _FIXED_FIELDS:
            if getattr(self, name) != getattr(parent, name):
                raise ArchError(f"{name} is fixed: {getattr(self, name)} != parent's {getattr(parent, name)}")
        if self.layers and max(self.layers) >= parent.num_layers:
            raise ArchError(f"layer index {max(self.layers)} does not exist in a {parent.num_layers}-layer parent")
        for i, kind in zip(self.layers, self.pattern):
            if parent.pattern[i] != kind:
                raise ArchError(f"layer {i} is {parent.pattern[i]!r} in the parent but {kind!r} here")


_FIXED_FIELDS = (
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "mamba_head_dim",
    "n_groups",
    "ssm_state_size",
    "conv_kernel",
    "tie_word_embeddings",
    "use_bias",
    "use_conv_bias",
    "mlp_bias",
    "attention_bias",
)


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
