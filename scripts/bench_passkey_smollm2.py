"""Pass key on SmolLM2-135M (issue #21, item 3): does pruning and distillation keep retrieval?

    OMP_NUM_THREADS=1 python scripts/bench_passkey_smollm2.py --bench benchmarks/smollm2_full.json
    python scripts/bench_passkey_smollm2.py --bench benchmarks/smollm2_full.json --report-only

The evaluate stage's own scorer (`elastic.evaluation.passkey`: 4 one-token digit keys absent from the haystack,
contrastive log-likelihood, chance 0.25) on the benchmark's held-out Wikipedia articles, at 512, 1K, 2K and 4K
tokens and depths 0, 0.5, 1, for the parent, a randomly initialised SmolLM2 of the same shape (`from_config`, seed 0)
and every compressed model in the benchmark's JSON (the distilled folder where there is one). Digit tokens are
removed from the haystack, so that every digit can be a key (Wikipedia text holds most digits in 512 tokens).
Models run in bfloat16 (this CPU's AMX units make a 4K-token forward ~5x faster than float32; the same dtype for
every model). Each cell is saved as it finishes (`--out`'s JSON); a rerun computes only the missing cells, shortest
contexts first, so an interrupted run still covers every model at the short lengths.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

LENGTHS = (512, 1024, 2048, 4096)
DEPTHS = (0.0, 0.5, 1.0)


def models_of(bench: dict) -> list[tuple[str, str]]:
    """(name, folder) of the parent and of every compressed model of a bench_smollm2 JSON (distilled when it was)."""
    out = []
    for r in bench["rows"]:
        if r["method"] == "unpruned":
            out.append(("parent", r["folder"]))
            continue
        folder = Path(r["folder"])
        distilled = folder.with_name(folder.name + "-distilled")
        if r.get("ppl_distilled") is not None and distilled.is_dir():
            folder = distilled
        out.append((f"{r['method']} {r['budget']:.0%} s{r['seed']}", str(folder)))
    return out


def haystack(tok, path: Path, digits: list[int]) -> torch.Tensor:
    """The held-out articles as one token stream, digit tokens removed."""
    ids = []
    for line in path.read_text().splitlines():
        ids += tok.encode(json.loads(line)["text"] + "\n\n", add_special_tokens=False)
    drop = set(digits)
    return torch.tensor([i for i in ids if i not in drop])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="benchmarks/smollm2_full.json", help="a bench_smollm2 JSON (its models are scored)")
    ap.add_argument("--out", default="benchmarks/passkey_smollm2.md", help="the report (a JSON of every cell beside it)")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    ap.add_argument("--trials", type=int, default=4, help="trials per cell (each: 4 prompts, one per candidate key)")
    ap.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elastic.evaluation import passkey

    bench = json.loads(Path(args.bench).read_text())
    md = Path(args.out)
    js = md.with_suffix(".json")
    doc = json.loads(js.read_text()) if js.exists() else {"cells": {}}
    models = [("random init", "random")] + models_of(bench)
    if args.only:
        keep = set(args.only.split(","))
        models = [m for m in models if m[0] in keep]
    parent_dir = next(f for n, f in models_of(bench) if n == "parent")
    if not args.report_only:
        tok = AutoTokenizer.from_pretrained(parent_dir)
        pool = passkey.keys(tok, "digits")
        hay = haystack(tok, Path(bench["data"]["heldout"]), pool.ids)
        t_start = time.time()
        for length in sorted(args.lengths):  # every model at a length before the next: a stopped run covers short ones
            for name, folder in models:
                todo = [d for d in args.depths if f"{name}|{length}|{d}" not in doc["cells"]]
                if not todo:
                    continue
                if folder == "random":
                    torch.manual_seed(0)
                    from transformers import AutoConfig

                    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(parent_dir), dtype=torch.bfloat16)
                else:
                    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
                model.eval()
                for d in todo:
                    t0 = time.time()
                    trials = passkey.build_trials(pool, hay, length, d, args.trials, 4, seed=0)
                    acc = passkey.accuracy(model, trials, batch_size=4)
                    doc["cells"][f"{name}|{length}|{d}"] = {"model": name, "folder": folder, "length": length, "depth": d,
                                                           "accuracy": acc, "prompts": int(trials.ids.shape[0] * trials.ids.shape[1]),
                                                           "seconds": round(time.time() - t0, 1)}
                    doc.update(machine=f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), OMP_NUM_THREADS="
                               f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}",
                               date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), bench=args.bench,
                               trials=args.trials)
                    js.write_text(json.dumps(doc, indent=2) + "\n")
                    print(f"{name} {length} depth {d}: {acc:.3f} ({time.time() - t0:.0f} s; {time.time() - t_start:.0f} s in all)", flush=True)
                del model
    report(doc, md, [n for n, _ in models], args)
    return 0


def report(doc: dict, md: Path, names: list[str], args) -> None:
    cells = doc["cells"]
    lengths = sorted({c["length"] for c in cells.values()})
    depths = sorted({c["depth"] for c in cells.values()})
    lines = ["# Pass key on SmolLM2-135M: parent, random model and every compressed model (issue #21)", "",
             f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python scripts/bench_passkey_smollm2.py "
             f"--bench {doc.get('bench')} --trials {doc.get('trials')}`",
             f"- machine: {doc.get('machine')}; date: {doc.get('date')}",
             "- scorer: the evaluate stage's pass key (`elastic/evaluation/passkey.py`), digit keys (`evaluate.passkey.keys=digits`), "
             "4 candidates (chance 0.25), haystack = the benchmark's held-out Wikipedia articles with digit tokens removed; "
             "bfloat16 for every model",
             f"- {doc.get('trials')} trials x 4 prompts per cell: one standard error is about "
             f"{math.sqrt(0.25 * 0.75 / (4 * (doc.get('trials') or 1))):.2f} at chance and smaller near 1",
             "", "Accuracy per context length (mean over the depths measured) and per depth (0 = key at the start, 1 = just before the question):", "",
             "| model | " + " | ".join(f"{n}" for n in lengths) + " | " + " | ".join(f"{n} @ {d:g}" for n in lengths for d in depths) + " |",
             "|---|" + "---|" * (len(lengths) + len(lengths) * len(depths))]
    for name in names:
        row = [c for c in cells.values() if c["model"] == name]
        if not row:
            continue
        means = []
        for n in lengths:
            v = [c["accuracy"] for c in row if c["length"] == n]
            means.append(f"{sum(v) / len(v):.2f}" if v else "-")
        per = []
        for n in lengths:
            for d in depths:
                c = cells.get(f"{name}|{n}|{d}")
                per.append(f"{c['accuracy']:.2f}" if c else "-")
        lines.append(f"| {name} | " + " | ".join(means) + " | " + " | ".join(per) + " |")
    reading = md.with_name(md.stem + ".reading.md")
    if reading.exists():
        lines += ["", reading.read_text().strip()]
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    sys.exit(main())
