"""Markdown tables from `scripts/bench_search.py` results (the JSON files it writes next to its plot).

    python scripts/search_report.py benchmarks/search_toy_360.json            # one table per run
    python scripts/search_report.py --seeds A.json B.json C.json              # mean and range over seeds

Prints to stdout; benchmarks/search_toy.md is assembled from this output plus prose.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def run_table(d: dict) -> str:
    lines = [
        f"    {d['command']}",
        "",
        f"Machine: {d['machine']}; {d['date']}. Parent held-out loss {d['parent_heldout_loss']:.3f}; "
        f"search wall time {d['search_seconds']} s; {d['search_steps']} steps x {d['tokens_per_step']} tokens; "
        f"baselines get 1/{d['baseline_split']} of them.",
        "",
        "| budget | elastic (router shape, zero-shot from the family) | (a) grid shape distilled alone | (c) router shape distilled alone | (b) grid shape one-shot | router shape | grid-search shape |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        if "oneshot_loss" not in r:  # the full model: nothing to compare against
            lines.append(f"| {r['budget']:g} | {r['elastic_loss']:.3f} | - | - | - | {r['router_arch']} | - |")
            continue
        el, a = f"{r['elastic_loss']:.3f}", "-"
        if "alone_loss" in r:  # not in --family-only runs
            a = f"{r['alone_loss']:.3f} ({r['alone_steps']} steps)"
            el = f"**{el}**" if r["elastic_loss"] <= r["alone_loss"] else el
        c = f"{r['router_alone_loss']:.3f}" if "router_alone_loss" in r else "-"
        lines.append(f"| {r['budget']:g} | {el} | {a} | {c} | {r['oneshot_loss']:.3f} | {r['router_arch']} | {r['grid_arch']} |")
    return "\n".join(lines)


def seeds_table(docs: list[dict]) -> str:
    budgets = [r["budget"] for r in docs[0]["rows"] if "alone_loss" in r]
    cols = [("elastic_loss", "elastic"), ("alone_loss", "(a) grid alone"), ("router_alone_loss", "(c) router alone"),
            ("oneshot_loss", "(b) one-shot")]
    lines = [
        f"Seeds: {len(docs)} ({', '.join(str(d.get('seed', d['command'].split('seed=')[-1].split()[0] if 'seed=' in d['command'] else 0)) for d in docs)}); each cell: mean [min, max]; "
        "last column: elastic minus (a), per seed.",
        "",
        "| budget | " + " | ".join(name for _, name in cols) + " | elastic - (a) per seed |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for b in budgets:
        rows = [next(r for r in d["rows"] if r["budget"] == b) for d in docs]
        cells = []
        for key, _ in cols:
            v = [r[key] for r in rows if key in r]
            cells.append(f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if v else "-")
        diff = ", ".join(f"{r['elastic_loss'] - r['alone_loss']:+.3f}" for r in rows)
        lines.append(f"| {b:g} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--seeds", action="store_true", help="one table over all files (runs differing only in seed)")
    args = ap.parse_args()
    docs = [json.loads(f.read_text()) for f in args.files]
    if args.seeds:
        print(seeds_table(docs))
    else:
        print("\n\n".join(run_table(d) for d in docs))


if __name__ == "__main__":
    main()
