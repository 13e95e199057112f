"""Benchmark: the toy run's pruned and distilled models as GGUF in llama.cpp, next to transformers.

For each checkpoint it runs the export stage (llama.cpp's converter + quantizer, then the check:
greedy tokens on the stage's prompts, held-out perplexity, size on disk, CPU tokens/s) and writes the
tables to a markdown file with the command, the machine and the date.

    OMP_NUM_THREADS=1 .venv/bin/python -m elastic.run run_dir=/tmp/ggufrun        # the toy run (all stages)
    .venv/bin/python scripts/bench_gguf.py --run-dir /tmp/ggufrun --out benchmarks/gguf_toy.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


NOTES = "<!-- notes: written by hand, kept when the script reruns -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a finished toy run (python -m elastic.run run_dir=...)")
    ap.add_argument("--quant", nargs="+", default=["q8_0", "q4_k_m"], help="GGUF types")
    ap.add_argument("--heldout-sequences", type=int, default=32, help="held-out sequences of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--out", default="benchmarks/gguf_toy.md", help="markdown results file")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from elastic import gguf
    from elastic.rundir import RunDir, read_json
    from elastic.run import CONF_DIR, pipeline

    run = RunDir(args.run_dir)
    distill = (run.done_record("distill") or {}).get("summary", {})
    pruned = read_json(run.path("prune", "latest.json"))["path"] if run.path("prune", "latest.json").exists() else None
    # the parent too: its widths (hidden 128, FFN 512) let llama.cpp use K-quants where the pruned ones' do not
    models = {"distilled": distill.get("output"), "pruned": pruned, "parent (uncompressed)": distill.get("teacher")}
    missing = [k for k, v in models.items() if not v]
    if missing:
        sys.exit(f"{args.run_dir} has no {' / '.join(missing)} model: run `python -m elastic.run run_dir={args.run_dir}` first")

    sections = []
    for label, path in models.items():
        overrides = [f"run_dir={run.root}", "stage=export", "export.format=gguf", f"export.model={path}",
                     f"export.quant=[{','.join(args.quant)}]", f"export.heldout_sequences={args.heldout_sequences}",
                     f"export.seq_len={args.seq_len}", f"export.max_new_tokens={args.max_new_tokens}", "force=true"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        summary = pipeline(cfg)["export"]
        name = Path(next(iter(summary["files"].values()))).name.rsplit("-", 1)[0]
        report = json.loads(run.path("export", f"{name}.check.json").read_text())
        metas = {q: json.loads(Path(p + ".meta.json").read_text()) for q, p in summary["files"].items()}
        where = Path(path).relative_to(run.root) if Path(path).is_relative_to(run.root) else Path(path).name
        lines = [f"### {label}: `{where}`", "",
                 f"`python -m elastic.run {' '.join(o for o in overrides if not o.startswith('run_dir')).replace(str(run.root), 'RUN')} run_dir=RUN`", "",
                 gguf.check_table(report), ""]
        lines.append("Tensor types per file (llama.cpp keeps F16 or falls back to another type where a tensor's input width "
                     "is not a multiple of the quant block: 32, or 256 for K-quants):")
        lines.append("")
        for q, m in metas.items():
            lines.append(f"- {q}: {m['architecture']}, pre-tokenizer `{m['tokenizer_pre']}`, tensors {m['tensor_types']}")
        lines.append("")
        lines.append("Greedy continuations (token ids; HF first, then each GGUF):")
        lines.append("")
        for i, prompt in enumerate(report["prompts"]):
            lines.append(f"- `{prompt}`: " + " | ".join(
                f"{k} {'=' if k != 'hf' and m['tokens_identical'][i] else ''}{m['tokens'][i][:12]}..." for k, m in report["models"].items()))
        sections.append("\n".join(lines))

    versions = metas[next(iter(metas))]["tool_versions"]
    header = [
        "# GGUF export of the toy run, run in llama.cpp",
        f"Command: `.venv/bin/python scripts/bench_gguf.py --run-dir RUN --quant {' '.join(args.quant)} "
        f"--heldout-sequences {args.heldout_sequences} --seq-len {args.seq_len} --max-new-tokens {args.max_new_tokens}` "
        "after `OMP_NUM_THREADS=1 .venv/bin/python -m elastic.run run_dir=RUN` (the toy run).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (tokens/s are indicative only), "
        f"{platform.platform()}. Date: {dt.date.today().isoformat()}.",
        "Tools: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "llama_cpp_source") + ".",
        f"Held-out text: {report['heldout']['sequences']} sequences x {report['heldout']['seq_len']} tokens of the toy's "
        f"held-out plays ({report['heldout']['tokens']} predicted tokens); {len(report['prompts'])} prompts x "
        f"{report['max_new_tokens']} greedy tokens, the same token ids in transformers and llama.cpp; "
        f"threads: {report['threads']}.",
    ]
    out = Path(args.out)
    # hand-written reading of the results below the marker survives a rerun
    notes = out.read_text().partition(NOTES)[2] if out.exists() and NOTES in out.read_text() else "\n"
    out.write_text("\n\n".join(header + sections) + "\n" + NOTES + notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
