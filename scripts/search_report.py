"""Markdown tables from `scripts/bench_search.py` results (the JSON files it writes next to its plot).

    python scripts/search_report.py benchmarks/search_toy_360.json            # one table per run
    python scripts/search_report.py --seeds A.json B.json C.json              # mean and range over seeds
    python scripts/search_report.py --compare 'default=A*.json' 'micro 8=B*.json'   # family loss per setting

Prints to stdout; benchmarks/search_toy.md is assembled from this output plus prose.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _seed(d: dict) -> str:
    """The run's search seed: recorded in newer results, else read off the command (default 0)."""
    if "seed" in d:
        return str(d["seed"])
    return d["command"].split("seed=")[-1].split()[0] if "seed=" in d["command"] else "0"


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
        f"Seeds: {len(docs)} ({', '.join(_seed(d) for d in docs)}); each cell: mean [min, max]; "
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


def compare_table(groups: list[tuple[str, list[dict]]]) -> str:
    """The family's zero-shot loss per budget for several search settings (each over its seeds): ablations
    run with --family-only have no baselines, and their (b) is the same for every setting."""
    budgets = [r["budget"] for r in groups[0][1][0]["rows"]]
    lines = [
        "Each cell: elastic held-out loss, mean [min, max] over the setting's seeds.",
        "",
        "| setting | seeds | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for label, docs in groups:
        cells = []
        for b in budgets:
            v = [next(r for r in d["rows"] if r["budget"] == b)["elastic_loss"] for d in docs]
            cells.append(f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        seeds = ", ".join(_seed(d) for d in docs)
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--seeds", action="store_true", help="one table over all files (runs differing only in seed)")
    ap.add_argument("--compare", nargs="+", metavar="LABEL=GLOB",
                    help="one row per search setting: LABEL=GLOB of its runs' JSON files (one per seed)")
    args = ap.parse_args()
    if args.compare:
        groups = []
        for spec in args.compare:
            label, _, pattern = spec.rpartition("=")  # the label may hold "=", a file pattern rarely does
            files = sorted(Path().glob(pattern))
            if not files:
                ap.error(f"--compare {spec!r}: no file matches {pattern!r}")
            groups.append((label, [json.loads(f.read_text()) for f in files]))
        print(compare_table(groups))
        return
    if not args.files:
        ap.error("give result files, or --compare")
    docs = [json.loads(f.read_text()) for f in args.files]
    if args.seeds:
        print(seeds_table(docs))
    else:
        print("\n\n".join(run_table(d) for d in docs))


if __name__ == "__main__":
    main()
