"""Per-architecture surgery, registered by Hugging Face `model_type`.

Each module here knows one architecture's elastic axes and all of its index math: how a ranking
orders the axes, how an `Arch` slices the weights, and how the masked (elastic) forward hides the
channels a sub-network drops.
"""

from __future__ import annotations

from types import ModuleType

from elastic.models import nemotron_h

REGISTRY: dict[str, ModuleType] = {"nemotron_h": nemotron_h}
SUPPORTED = frozenset(REGISTRY)


def surgery_for(model_or_config) -> ModuleType:
    """The surgery module for a model or config; a clear error for unsupported architectures."""
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED)}")
    return REGISTRY[model_type]
