"""Why a router search picked its shape: the router's distribution per axis and the cost surface it saw.

    python scripts/router_why.py RUN_DIR [--parent DIR --heldout JSONL --rows 8]     # RUN_DIR: a finished search's run directory

Prints (markdown) for each trained budget: every axis's choice probabilities at the end of training (logit scale
at its maximum, no noise), the chosen (in-band) architecture, and the expected architecture of a uniform router
(where an uninformed router starts); then the cost surface: the share of the budget's resource one step of each
axis removes (the closed form `router.Cost`), and -- with `--heldout` and `--parent` -- the held-out loss of the parent cut along
one axis at a time by about the same resource (the parent cut with the importance ranking: the damage per saved
parameter that the router's budget loss does not see).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--heldout", default=None, help="JSONL of held-out text ({'text': ...} per line) for the loss probe")
    ap.add_argument("--parent", default=None, help="the parent folder the search started from (the loss probe cuts it with "
                    "RUN_DIR/importance's ranking: what the router faced at step 0)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elastic.arch import sizes_from_config
    from elastic.models import family_for
    from elastic.models.family import Ranking
    from elastic.router import Cost, Router
    from elastic.rundir import read_json
    from elastic.stages.prune import router_space

    run = Path(args.run_dir)
    ckpt = run / "search" / "elastic"
    rcfg = read_json(run / "search" / "elastic.router.json")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    parent = sizes_from_config(model)
    router = Router.from_config(rcfg, parent)
    router.load_state_dict(load_file(str(run / "search" / "elastic.router.safetensors")))
    ranking = Ranking.from_tensors(load_file(str(run / "search" / "elastic.ranking.safetensors")))
    space = router_space(router, parent)
    protect = parent.protected(rcfg["protect_kinds"])
    kept = [ranking.layers_after_dropping(d, parent.num_layers, protect) for d in space.drops]
    cost = Cost(space, kept, rcfg["resource"], context=rcfg["context"], batch=rcfg["memory_batch"])
    archs = read_json(run / "search" / "archs.json")
    print(f"# Router of {run}\n\nresource: {rcfg['resource']}, budgets {rcfg['budgets']}\n")
    uniform = {a: sum(v) / len(v) for a, v in router.sizes.items()}
    print("Uniform router (where an uninformed router starts): expected " +
          ", ".join(f"{a} {v:.1f}" for a, v in uniform.items()) + "\n")
    with torch.no_grad():
        for b in router.budgets:
            print(f"## budget {b:g}: chosen {archs['budgets'][f'{b:g}']['summary']}\n")
            print("| axis | choices | probability of each (logit scale 10, no noise) |\n|---|---|---|")
            for a, lg in router.logits(b).items():
                p = torch.softmax(lg * 10, -1)
                print(f"| {a} | {list(router.sizes[a])} | {', '.join(f'{x:.2f}' for x in p.tolist())} |")
            prior = (archs.get("prior") or {}).get(f"{b:g}")
            if prior:
                print(f"\ngrid prior: {prior['summary']}")
            print()
    # the cost surface: resource removed by one step of each axis, from the full parent
    full = {a: float(router.sizes[a][-1]) for a in router.sizes if a != "depth"}
    counts0 = cost.kind_counts[0]
    base = float(cost.of_sizes(full, counts0))
    print("## Cost surface: share of the parent's resource one step of each axis removes\n")
    print("| axis | step | resource removed |\n|---|---|---|")
    for a, v in router.sizes.items():
        if len(v) < 2:
            continue
        if a == "depth":
            c = float(cost.of_sizes(full, cost.kind_counts[1]))
            print(f"| depth | drop {v[1] - v[0]} layer | {1 - c / base:.1%} |")
        else:
            s = dict(full)
            s[a] = float(v[-2])
            print(f"| {a} | {int(v[-1])} -> {int(v[-2])} | {1 - float(cost.of_sizes(s, counts0)) / base:.1%} |")
    if args.heldout and args.parent:
        from elastic.inputs import heldout_loss
        from elastic.stages.importance import load_ranking
        from elastic.rundir import RunDir

        model = AutoModelForCausalLM.from_pretrained(args.parent, dtype=torch.float32).eval()
        ranking = load_ranking(RunDir(run))
        tok = AutoTokenizer.from_pretrained(args.parent)
        ids = []
        for line in Path(args.heldout).read_text().splitlines():
            ids += tok.encode(json.loads(line)["text"], add_special_tokens=False)
            if len(ids) >= args.rows * args.seq_len:
                break
        rows = torch.tensor(ids[: args.rows * args.seq_len]).reshape(args.rows, args.seq_len)
        batches = [rows[i:i + 4] for i in range(0, args.rows, 4)]
        slice_model = family_for(model).slice_model
        print(f"\n## One axis at a time: held-out loss of the importance-ordered parent cut to ~{{10, 20}}% less resource "
              f"({args.rows} x {args.seq_len} held-out tokens; parent {heldout_loss(model, batches):.3f} nats)\n")
        print("| axis | cut | resource removed | held-out loss |\n|---|---|---|---|")
        for target in (0.10, 0.20):
            for a, v in router.sizes.items():
                if len(v) < 2:
                    continue
                best = None
                for i, x in enumerate(v):
                    if a == "depth":
                        c = float(cost.of_sizes(full, cost.kind_counts[i]))
                        sizes, drop = {}, int(x)
                    else:
                        s = dict(full)
                        s[a] = float(x)
                        c = float(cost.of_sizes(s, counts0))
                        sizes, drop = {a: int(x)}, 0
                    gap = abs((1 - c / base) - target)
                    if best is None or gap < best[0]:
                        best = (gap, sizes, drop, 1 - c / base, x)
                _, sizes, drop, removed, x = best
                arch = parent.cut(ranking, sizes=sizes, drop_layers=drop, protect_kinds=rcfg["protect_kinds"])
                loss = heldout_loss(slice_model(model, arch, ranking), batches)
                what = f"drop {drop} layers" if a == "depth" else f"{a} {int(full[a])} -> {int(x)}"
                print(f"| {a} | {what} | {removed:.1%} | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
