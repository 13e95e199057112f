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
    if not p.exists():
        raise ModelError(f"{p} does not exist (no config.json): point the path at a Hugging Face checkpoint folder")
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
    check_weights(p)
    return p.resolve()


# Weight files `from_pretrained` reads: one of these must be in a checkpoint folder.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
FIX = "re-run the stage that wrote it or fix the path"


def check_weights(folder: str | Path) -> None:
    """Raise `ModelError` (one line naming the file) unless the folder's weights are all there and whole.

    Reads only each ``*.safetensors`` header (a few KB even for a 9B model) and compares the file's
    size with the header's data offsets, so a truncated copy or an interrupted write is refused before
    a stage starts a tracker run or writes anything; safetensors itself would fail only mid-load, with
    a message that names no file. A sharded checkpoint's index must name shards that exist.
    """
    p = Path(folder)
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"{p} has no weights (none of {', '.join(WEIGHT_FILES)}); {FIX}")
    files = set(p.glob("*.safetensors"))
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} is not a readable safetensors index (no JSON weight_map); {FIX}") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ModelError(f"{p / missing[0]} is missing ({len(missing)} of the {len(shards)} shards {index.name} lists "
                             f"are); {FIX}")
        files |= {p / s for s in shards}
    for f in sorted(files):
        check_safetensors(f)


def check_safetensors(path: str | Path) -> None:
    """Raise `ModelError` unless `path` has a well-formed safetensors header whose tensors end exactly
    where the file does (the layout: 8-byte little-endian header length, JSON header, data)."""
    f = Path(path)

    def bad(why: str):
        return ModelError(f"{f} is not a readable safetensors file ({why}); {FIX}")

    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
        if size < 8 or 8 + n > size:
            raise bad(f"truncated or corrupt: its header says at least {8 + n} bytes, the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise bad("corrupt: its header is not a safetensors JSON header") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise bad(f"truncated or corrupt: its header says {expected} bytes, the file has {size}")


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
    folder = toy_parent(settings, cfg.toy.cache_dir)
    try:
        return check_checkpoint(folder)
    except ModelError as e:  # a cached build is reused as it is: the fix is to build it again
        raise ModelError(f"{e} (the cached toy parent: delete {folder} and it is rebuilt)") from None


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

    from safetensors import SafetensorError

    p = check_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype(dtype))
    except SafetensorError as e:  # what the header check cannot see (e.g. an unknown dtype): still one line
        raise ModelError(f"{p}: its weights do not load ({one_line(e)}); {FIX}") from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        return AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in {p}: {one_line(e)}") from None


def one_line(e: BaseException | str, limit: int = 400) -> str:
    """An error message (ours or a library's, often several lines) as one line for the user."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
