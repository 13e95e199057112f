"""Benchmarks of the distill stage (results: benchmarks/distill_toy.md).

    python scripts/bench_distill.py memory     # peak memory of the KD loss vs context: chunked vs unchunked
    python scripts/bench_distill.py recovery   # toy parent -> pruned student -> KD vs plain LM, same tokens

``memory`` runs every (loss, context) point in a fresh subprocess and reports the rise of peak
resident memory (ru_maxrss) during forward + backward of the loss alone, on the CPU.

``recovery`` builds (or reuses) the trained toy parent, runs the pipeline's own importance and prune
stages (``prune.target`` of the parent's parameters), then trains the pruned student with the
distill stage's two phases twice from the same start, with the same data, steps, lr and tokens:
once with the KD loss (``lm_weight=0``), once with plain next-token cross-entropy
(``lm_weight=1``). All models are scored on the same held-out sequences (plays the parent never
saw). Recovery = (CE_pruned - CE_student) / (CE_pruned - CE_parent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ memory


def _memory_point(method: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    """Peak RSS rise (MiB) of one KD loss forward+backward; runs in its own process."""
    import torch

    from elastic.losses import chunked_kd_loss, kd_loss

    torch.manual_seed(0)
    s_head = torch.nn.Linear(hidden, vocab, bias=False)
    t_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    s_h = torch.randn(1, tokens, hidden, requires_grad=True)
    t_h = torch.randn(1, tokens, hidden)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    if method == "chunked":
        loss = chunked_kd_loss(s_h, t_h, s_head, t_head, chunk_size=chunk).loss
    else:
        loss = kd_loss(s_head(s_h), t_head(t_h)).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "tokens": tokens, "peak_rise_mib": round((peak - base) / 1024, 1),
            "seconds": round(seconds, 2), "loss": float(loss)}


def bench_memory(args) -> list[dict]:
    rows = []
    for method, lengths in (("unchunked", args.unchunked_lengths), ("chunked", args.lengths)):
        for t in lengths:
            cmd = [sys.executable, __file__, "_memory_point", method, str(t), str(args.vocab), str(args.hidden),
                   str(args.chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["logits_mib"] = round(t * args.vocab * 4 / 2**20, 1)  # one fp32 [tokens x vocab] tensor
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ recovery


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def bench_recovery(args) -> dict:
    import torch

    from elastic import inputs
    from elastic.parent import load_model, load_tokenizer, resolve_parent_path
    from elastic.rundir import RunDir, read_json
    from elastic.run import pipeline
    from elastic.stages import distill

    torch.set_num_threads(args.threads)
    root = Path(args.run_dir).resolve()
    common = [f"seed={args.seed}", "device=cpu", "tracking.backends=[]"]
    t0 = time.time()
    base = common + [f"run_dir={root / 'prune_run'}", f"prune.target={args.target}"]
    if not (root / "prune_run" / "prune" / "latest.json").exists():  # reuse the student of an earlier run
        for stage in ("importance", "prune"):
            pipeline(_compose(base + [f"stage={stage}"]))
    t_prune = time.time() - t0
    cfg = _compose(base + ["stage=distill"])
    parent_path = resolve_parent_path(cfg)
    student_path = Path(read_json(root / "prune_run" / "prune" / "latest.json")["path"])
    tok = load_tokenizer(parent_path)
    heldout = inputs.token_batches(cfg, tok, "heldout", num_sequences=args.eval_sequences, batch_size=16,
                                   seq_len=args.eval_seq_len)

    def score(path) -> float:
        return inputs.heldout_loss(load_model(path, "float32", "cpu"), heldout)

    result = {
        "parent": str(parent_path), "parent_params": sum(p.numel() for p in load_model(parent_path).parameters()),
        "student_params": sum(p.numel() for p in load_model(student_path).parameters()),
        "ce_parent": score(parent_path), "ce_pruned": score(student_path),
        "importance_prune_seconds": round(t_prune, 1),  # includes building the toy parent on first use
        "steps_scale": args.steps_scale, "lr_scale": args.lr_scale, "runs": {},
    }
    print(json.dumps(result), flush=True)
    scale = args.steps_scale
    tag = f"steps{scale:g}_lr{args.lr_scale:g}"
    for loss, lm_weight in (("kd", 0.0), ("lm", 1.0)):
        name = f"{loss}_{tag}"
        over = common + [f"run_dir={root / name}", "stage=distill", f"distill.student={student_path}",
                         f"distill.lm_weight={lm_weight}", "distill.checkpoint_every=0", f"prune.target={args.target}"]
        cfg = _compose(over)
        for i, ph in enumerate(cfg.distill.phases):
            ph.max_steps = int(ph.max_steps * scale)
            if args.lr_scale != 1.0:
                ph.lr = float(ph.lr) * args.lr_scale
        t1 = time.time()
        summary = distill.run(cfg, RunDir(cfg.run_dir))
        seconds = time.time() - t1
        out = {"seconds": round(seconds, 1), "tokens": sum(p["tokens"] for p in summary["phases"].values()),
               "steps": {k: p["steps"] for k, p in summary["phases"].items()}}
        for ph in summary["phases"]:
            out[f"ce_after_{ph}"] = score(root / name / "distill" / ph)
        ce = out[f"ce_after_{list(summary['phases'])[-1]}"]
        out["ce"] = ce
        out["recovery"] = (result["ce_pruned"] - ce) / (result["ce_pruned"] - result["ce_parent"])
        result["runs"][loss] = out
        print(name, json.dumps(out), flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_point":
        m, t, v, h, c = sys.argv[2:7]
        print(json.dumps(_memory_point(m, int(t), int(v), int(h), int(c))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--vocab", type=int, default=32768)
    mem.add_argument("--hidden", type=int, default=256)
    mem.add_argument("--chunk", type=int, default=512)
    mem.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    mem.add_argument("--unchunked-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    rec = sub.add_parser("recovery")
    rec.add_argument("--run-dir", default="runs/bench_distill")
    rec.add_argument("--target", type=float, default=0.6, help="prune.target: share of the parent's parameters")
    rec.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's max_steps")
    rec.add_argument("--lr-scale", type=float, default=1.0, help="multiply every phase's lr")
    rec.add_argument("--eval-sequences", type=int, default=64)
    rec.add_argument("--eval-seq-len", type=int, default=128)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    info = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "python": platform.python_version()}
    res = bench_memory(args) if args.what == "memory" else bench_recovery(args)
    print(json.dumps({"info": info, "results": res}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
