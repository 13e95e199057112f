"""Greedy continuations from compressed checkpoints, loaded with plain transformers (no project code).

    python scripts/smollm2_generate.py ~/.cache/elastic/smollm2-bench/ours_grid/0.6-s0-distilled ...

Prints one continuation per folder for each prompt, and whether the folder holds loader files only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from elastic.export_check import stray_files  # noqa: E402

PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="Hugging Face model folders")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per prompt")
    args = ap.parse_args(argv)
    for folder in args.folders:
        folder = Path(folder).expanduser()
        extra = stray_files(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        print(f"## {folder} ({sum(p.numel() for p in model.parameters()):,} params; "
              f"{'loader files only' if not extra else f'EXTRA FILES {extra}'})")
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            print(f"- {prompt!r} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
