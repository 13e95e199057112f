"""Finding and loading the parent model (and any checkpoint of a supported family) with clear errors."""

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
            f"{p} holds a {model_type!r} model; elastic supports the model types {sorted(SUPPORTED)}"
        )
    return p.resolve()


def resolve_parent_path(cfg: Any) -> Path:
    """The parent checkpoint of this run: `parent.path`, or the cached toy parent (built on first use)."""
    if cfg.parent.path:
        return check_checkpoint(cfg.parent.path)
    from elastic.models import SUPPORTED

    if "toy" not in cfg or cfg.toy is None:
        raise ModelError("parent.path is not set; point it at a local checkpoint of a supported model type "
                         f"({', '.join(sorted(SUPPORTED))}) or use recipe=toy")
    from omegaconf import OmegaConf

    settings = {k: v for k, v in OmegaConf.to_container(cfg.toy, resolve=True).items() if k != "cache_dir"}
    return check_checkpoint(toy_parent(settings, cfg.toy.cache_dir))


def toy_parent(settings: dict[str, Any], cache_dir: str | Path) -> Path:
    """The toy parent built with `settings` (elastic.toy.build_toy_parent's keywords) under `cache_dir`,
    built on first use: the folder `python -m elastic.run` uses for the same settings."""
    import hashlib

    from elastic import toy

    # one cache folder per distinct build, so changing a toy setting never reuses a stale parent
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return toy.build_toy_parent(Path(cache_dir).expanduser() / f"parent-{key}", **settings)


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


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its config.json's ``dtype`` / ``torch_dtype``;
    float32 when it does not say): students and extracted models are written in their parent's dtype."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return torch_dtype(name) if name in DTYPES else torch.float32


@torch.no_grad()
def save_checkpoint(config, state_dict: dict[str, torch.Tensor], out: str | Path, *, dtype: torch.dtype,
                    tokenizer=None) -> Path:
    """Write a plain Hugging Face checkpoint from a full state dict (in-memory key names).

    The model is built on the meta device and takes the tensors as they are (``assign``), so writing
    costs no second copy of the weights; ``save_pretrained`` then writes the hub's key names and a
    config saying `dtype`. ``use_cache`` is switched back on (training turns it off; a released model
    generates with a cache).
    """
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.use_cache = True
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ModelError(f"state dict does not match the config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return Path(out)
