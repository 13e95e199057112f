"""Benchmark: the nested family trained once (search stage) vs one-shot pruning, at equal tokens.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
        python scripts/bench_search.py --parent PARENT_DIR --out benchmarks/search_toy --steps 90

For every budget b of the search (0.5, 0.7, 1.0), at an equal total of distillation tokens:
  elastic   -- the router's architecture cut out of the jointly trained elastic checkpoint (zero-shot);
  (a)       -- the prune stage's grid-search shape for b (importance ranking, best held-out loss among
               the closest candidates), distilled ALONE from the same parent with the same loop, loss,
               lr and batch for steps / N steps (N = number of budgets, `--split all`, the family's
               token total split evenly; `--split pruned` gives each baseline more: N = budgets below 1);
  (b)       -- the same one-shot pruned shape with no training;
  (c)       -- the router's shape for b, one-shot from the parent and distilled alone like (a).
All held-out losses are next-token cross-entropy on the toy's held-out plays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parent", required=True)
    ap.add_argument("--run-dir", default="/tmp/bench_search_run")
    ap.add_argument("--out", default="benchmarks/search_toy")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--search-micro-batch", type=int, default=None,
                    help="the search's micro-batch (default: the search config's); each micro-batch draws its own budget")
    ap.add_argument("--split", choices=["all", "pruned"], default="all",
                    help="N for the (a) baseline's 1/N of the tokens: all = every budget of the family (the issue's "
                         "accounting), pruned = only budgets below 1.0 (more tokens for the baseline)")
    ap.add_argument("--family-only", action="store_true",
                    help="score the family and the untrained grid shape (b) only, skip distilling the baselines (a) "
                         "and (c): for ablations of search settings, whose baselines do not change")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the search, e.g. search.full_model_share=0.1")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from elastic import toy
    from elastic.inputs import heldout_loss, token_batches
    from elastic.losses import kd_loss
    from elastic.models.nemotron_h import arch_of, slice_model
    from elastic.parent import load_model, load_tokenizer
    from elastic.run import CONF_DIR, pipeline
    from elastic.rundir import RunDir, read_json
    from elastic.stages.importance import load_ranking
    from elastic.stages.prune import grid_candidates
    from elastic.stages.search import train_batches
    from elastic.search_space import parse_budget
    from elastic.train import TrainConfig, make_accelerator, train

    files, held = toy.toy_files("calib"), toy.toy_files("heldout")
    train_files = toy.toy_files("train")
    common = [
        f"parent.path={args.parent}", f"run_dir={args.run_dir}", f"data.files=[{','.join(train_files)}]",
        f"data.heldout_files=[{','.join(held)}]", f"data.seq_len={args.seq_len}", "importance.num_sequences=32",
        f"search.steps={args.steps}", f"search.batch_size={args.batch}",
        *([f"search.micro_batch_size={args.search_micro_batch}"] if args.search_micro_batch else []),
        f"search.seq_len={args.seq_len}", "search.checkpoint_every=0", "search.eval_sequences=0", "tracking.backends=[]",
        "force=true", *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=common + ["stage=importance"])
        cfg_s = compose("config", overrides=common + ["stage=search"])
    run = RunDir(args.run_dir)
    t0 = time.time()
    pipeline(cfg)  # always: a ranking left in run_dir by another parent would silently mis-order the axes
    pipeline(cfg_s)
    t_search = time.time() - t0
    doc = read_json(run.path("search/archs.json"))

    tok = load_tokenizer(args.parent)
    teacher = load_model(args.parent)
    for p in teacher.parameters():
        p.requires_grad_(False)
    parent = arch_of(teacher)
    ranking = load_ranking(run)
    elastic = load_model(run.path("search/elastic"))
    from safetensors.torch import load_file

    from elastic.models.nemotron_h import Ranking

    el_rank = Ranking.from_tensors(load_file(str(run.beside("search/elastic", "ranking.safetensors"))))
    hb = token_batches(cfg, tok, "heldout", num_sequences=args.heldout, batch_size=16, seq_len=args.seq_len)
    parent_loss = heldout_loss(teacher, hb)

    from elastic.models.nemotron_h import Arch

    budgets = sorted(float(b) for b in doc["budgets"])
    pruned = [b for b in budgets if b < 1.0]
    n_split = len(budgets) if args.split == "all" else max(1, len(pruned))
    per_budget_steps = max(1, args.steps // n_split)
    rows = []
    for b in budgets:
        rec = doc["budgets"][f"{b:g}"]
        arch = Arch.from_dict(rec["arch"])
        el_loss = heldout_loss(slice_model(elastic, arch, el_rank), hb)
        row = {"budget": b, "router_arch": rec["summary"], "router_params": rec["params"], "elastic_loss": el_loss}
        if b < 1.0:
            target = parse_budget(b, parent.num_params())
            cands = grid_candidates(parent, ranking, target, cfg.prune)[:3]
            scored = [(heldout_loss(slice_model(teacher, a, ranking), hb[:2]), a) for a in cands]
            grid = min(scored, key=lambda t: t[0])[1]
            child = slice_model(teacher, grid, ranking)
            row.update(grid_arch=grid.short(), grid_params=grid.num_params(), oneshot_loss=heldout_loss(child, hb))
            if args.family_only:
                rows.append(row)
                print(json.dumps(row))
                continue
            acc = make_accelerator(device="cpu")
            batches = train_batches(cfg_s, tok, args.batch, args.batch, args.seq_len, int(cfg_s.search.train_sequences))
            c = cfg_s.search
            tc = TrainConfig(max_steps=per_budget_steps, lr=float(c.lr), warmup_steps=int(c.warmup_steps),
                             min_lr_ratio=float(c.min_lr_ratio), weight_decay=float(c.weight_decay),
                             grad_clip=float(c.grad_clip), seed=int(cfg.seed), desc=f"distill alone {b:g}")

            def step_fn(batch, model, teacher, step):
                with torch.no_grad():
                    t = teacher(batch, use_cache=False).logits
                out = kd_loss(model(batch, use_cache=False).logits, t)
                return out.loss, {"kl": float(out.kl)}

            res = train(child, step_fn, batches, tc, accelerator=acc, teacher=teacher)
            row.update(alone_loss=heldout_loss(acc.unwrap_model(res.model), hb), alone_steps=per_budget_steps)
            # (c) the router's shape, one-shot from the parent and distilled alone the same way: separates
            # what the router's choice is worth from what training the family together is worth
            acc = make_accelerator(device="cpu")
            batches = train_batches(cfg_s, tok, args.batch, args.batch, args.seq_len, int(cfg_s.search.train_sequences))
            tc.desc = f"router shape alone {b:g}"
            res = train(slice_model(teacher, arch, ranking), step_fn, batches, tc, accelerator=acc, teacher=teacher)
            row.update(router_alone_loss=heldout_loss(acc.unwrap_model(res.model), hb))
        rows.append(row)
        print(json.dumps(row))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"), "parent": str(args.parent), "parent_params": parent.num_params(),
        "parent_heldout_loss": parent_loss, "search_steps": args.steps, "tokens_per_step": args.batch * args.seq_len,
        "search_seconds": round(t_search, 1), "baseline_split": n_split, "seed": int(cfg.seed), "overrides": list(args.overrides), "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["budget"] for r in rows]
    ax.plot(xs, [r["elastic_loss"] for r in rows], "o-", label=f"elastic family, trained once ({result['search_steps']} steps)")
    pr = [r for r in rows if "alone_loss" in r]
    ax.plot([r["budget"] for r in pr], [r["alone_loss"] for r in pr], "s--", label="(a) one-shot + distilled alone (1/N steps)")
    po = [r for r in rows if "oneshot_loss" in r]
    ax.plot([r["budget"] for r in po], [r["oneshot_loss"] for r in po], "x:", label="(b) one-shot, no training")
    rc = [r for r in pr if "router_alone_loss" in r]
    if rc:
        ax.plot([r["budget"] for r in rc], [r["router_alone_loss"] for r in rc], "d-.", label="(c) router's shape distilled alone (1/N steps)")
    ax.axhline(result["parent_heldout_loss"], color="gray", lw=0.8, label="parent")
    ax.set_xlabel("budget (fraction of parent parameters)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
