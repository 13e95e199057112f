"""Finding and loading the parent model (and any NemotronH checkpoint) with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A checkpoint that is missing, unreadable or not a model this project can compress."""


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_checkpoint(path: str | Path) -> Path:
    """Raise `ModelError` unless `path` is a local Hugging Face checkpoint of a supported model type."""
    from elastic.models import SUPPORTED

    p = Path(path).expanduser()
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{p} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file} is not valid JSON: {e}") from None
    if model_type not in SUPPORTED:
        raise ModelError(
            f"{p} holds a {model_type!r} model; elastic supports {sorted(SUPPORTED)} (e.g. nvidia/NVIDIA-Nemotron-Nano-9B-v2)"
        )
    return p.resolve()


def resolve_parent_path(cfg: Any) -> Path:
    """The parent checkpoint of this run: `parent.path`, or the cached toy parent (built on first use)."""
    if cfg.parent.path:
        return check_checkpoint(cfg.parent.path)
    if "toy" not in cfg or cfg.toy is None:
        raise ModelError("parent.path is not set; point it at a local NemotronH checkpoint or use recipe=toy")
    import hashlib

    from omegaconf import OmegaConf

    from elastic import toy

    settings = {k: v for k, v in OmegaConf.to_container(cfg.toy, resolve=True).items() if k != "cache_dir"}
    # one cache folder per distinct build, so changing a toy setting never reuses a stale parent
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cfg.toy.cache_dir).expanduser() / f"parent-{key}"
    return check_checkpoint(toy.build_toy_parent(out, **settings))


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load a checkpoint with plain `from_pretrained` (no project code, no trust_remote_code), in eval mode."""
    from transformers import AutoModelForCausalLM

    p = check_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype(dtype))
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        return AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in {p}: {e}") from None
