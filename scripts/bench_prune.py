"""Benchmark: importance-guided pruning vs random pruning on the trained toy parent (issue 3).

    python scripts/bench_prune.py                 # default toy parent (built and cached on first use)
    python scripts/bench_prune.py --seeds 8 --out benchmarks/prune_toy.json

Width: the prune stage's grid-search shape at `--target` of the parameters, sliced with the
importance ranking vs with random rankings (same shape). Depth: dropping the `--drop` least
important layers (attention protected) vs dropping as many random droppable layers, widths kept.
Writes JSON with the numbers and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from elastic.importance import compute_scores, versus_random  # noqa: E402
from elastic.inputs import token_batches  # noqa: E402
from elastic.models.nemotron_h import Ranking, arch_of, make_arch  # noqa: E402
from elastic.parent import load_model, load_tokenizer, resolve_parent_path  # noqa: E402
from elastic.run import CONF_DIR  # noqa: E402
from elastic.search_space import parse_budget  # noqa: E402
from elastic.stages.prune import grid_candidates  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.6, help="parameter fraction of the width+depth shape")
    ap.add_argument("--drop", type=int, default=2, help="layers dropped in the depth-only comparison")
    ap.add_argument("--seeds", type=int, default=5, help="random rankings averaged")
    ap.add_argument("--heldout", type=int, default=32, help="held-out sequences")
    ap.add_argument("--out", default="benchmarks/prune_toy.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the toy recipe, e.g. toy.steps=100")
    args = ap.parse_args(argv)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(args.overrides))
    path = resolve_parent_path(cfg)
    model, tok = load_model(path), load_tokenizer(path)
    parent = arch_of(model)
    t0 = time.time()
    calib = token_batches(cfg, tok, "calib", num_sequences=cfg.importance.num_sequences, batch_size=cfg.importance.batch_size)
    held = token_batches(cfg, tok, "heldout", num_sequences=args.heldout, batch_size=16)
    ranking = Ranking.from_scores(compute_scores(model, calib), parent, cfg.importance.depth_metric)
    target = parse_budget(args.target, parent.num_params())
    shape = grid_candidates(parent, ranking, target, cfg.prune)[0]
    seeds = list(range(args.seeds))

    def width_depth(r):  # same widths and the same NUMBER of dropped layers, chosen by r's depth order
        return make_arch(parent, r, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         mamba_num_heads=shape.mamba_num_heads, drop_layers=parent.num_layers - shape.num_layers,
                         protect_kinds=cfg.prune.protect_kinds)

    def depth_only(r):
        return make_arch(parent, r, drop_layers=args.drop, protect_kinds=cfg.prune.protect_kinds)

    from elastic.inputs import heldout_loss

    result = {
        "command": "python scripts/bench_prune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "parent": str(path),
        "parent_params": parent.num_params(),
        "parent_heldout_loss": heldout_loss(model, held),
        "width_and_depth": versus_random(model, ranking, width_depth, held, seeds),
        "depth_only": versus_random(model, ranking, depth_only, held, seeds),
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| comparison | params | importance | random (mean of {len(seeds)}) | random min |")
    print("|---|---|---|---|---|")
    for key in ("width_and_depth", "depth_only"):
        r = result[key]
        print(f"| {key} | {r['params']:,} ({r['params'] / parent.num_params():.0%}) | {r['importance']:.3f} | "
              f"{r['random_mean']:.3f} | {min(r['random']):.3f} |")
    print(f"parent held-out loss {result['parent_heldout_loss']:.3f}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
