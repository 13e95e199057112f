"""Router variants on SmolLM2-135M at equal tokens (issue #21): which settings make one nested search beat the grid.

    OMP_NUM_THREADS=1 python scripts/router_ablation.py                    # every variant, then the report
    python scripts/router_ablation.py --variants default,no_full,prior     # some of them
    python scripts/router_ablation.py --report-only                        # re-render benchmarks/router_ablation.md

Each variant is `scripts/bench_smollm2.py --preset reduced --methods ours_router` with its overrides of the search
stage (budgets 0.6 and 0.4 of the non-embedding parameters, one search for both, the tokens of two separate
distillations); the reference is `ours_grid` at the same preset (each budget pruned by the grid, then distilled
alone with half of the router's tokens). All share one importance run. Results: one JSON per variant in
benchmarks/ablations/router/, the table in benchmarks/router_ablation.md. Reruns skip finished variants.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (search overrides, what it tests). Every variant but `default` trains no unmasked full model: in this
# comparison the family's tokens should go to the two budgets, as the grid's go to its two models.
NOPRIOR = ("search.full_model_share=0",)
PRIOR = ("search.full_model_share=0", "search.router.prior=grid")
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "default": ((), "the stage's defaults: 1/3 of the steps train the unmasked full model, router uninformed"),
    "no_full": (NOPRIOR, "no full-model steps: all tokens go to the two budgets"),
    "prior": (PRIOR, "+ router prior from the importance grid (strength 3)"),
    "prior_strong": (PRIOR + ("search.router.prior_strength=8",), "+ prior strength 8 (the grid's shape held harder)"),
    "prior_slow_router": (PRIOR + ("search.router.lr=1e-3",), "+ router lr 1e-3 (paper: 1e-2)"),
    "prior_strong_slow": (PRIOR + ("search.router.prior_strength=8", "search.router.lr=1e-3"),
                          "+ prior strength 8 and router lr 1e-3: the router leaves the grid's shape only on a consistent signal"),
    "prior_frozen": (PRIOR + ("search.router.lr=0",), "+ router frozen at the prior (lr 0): the grid's shapes trained as one nested family"),
    "prior_uniform": (PRIOR + ("search.phase2_weights=[1,1]",), "+ uniform budget sampling throughout (no 60%-first weighting)"),
    "prior_no_settle": (PRIOR + ("search.settle_share=0",), "+ no settle phase (the paper's schedule)"),
    "prior_model_warmup": (PRIOR + ("search.warmup_steps=4",), "+ router warm-up: the model's lr ramps over 4 of 12 steps, the router's is full from step 0"),
    "prior_cold": (PRIOR + ("search.tau0=0.5", "search.logit_scale_max=20"),
                   "+ colder sampling (tau 0.5 -> 0.05, logit scale 1 -> 20)"),
    "no_full_hot": (NOPRIOR + ("search.logit_scale_max=3",), "no prior, logit scale 1 -> 3 (a flatter router)"),
}
OUT = Path("benchmarks/ablations/router")
WORK = Path.home() / ".cache" / "elastic" / "smollm2-ablation"


def run_variant(name: str, preset: str, parent: str | None) -> None:
    import bench_smollm2

    overrides, _ = VARIANTS[name]
    argv = ["--preset", preset, "--methods", "ours_router", "--budgets", "0.6,0.4", "--work", str(WORK),
            "--out", str(OUT / f"{name}.md"), "--title", f"router variant {name}"]
    for o in overrides:
        argv += ["--router-set", o]
    if parent:
        argv += ["--parent", parent]
    assert bench_smollm2.main(argv) == 0, name


def run_grid(preset: str, parent: str | None) -> None:
    import bench_smollm2

    argv = ["--preset", preset, "--methods", "ours_grid", "--budgets", "0.6,0.4", "--work", str(WORK),
            "--out", str(OUT / "grid.md"), "--title", "grid reference"]
    if parent:
        argv += ["--parent", parent]
    assert bench_smollm2.main(argv) == 0


def finished(path: Path, method: str) -> bool:
    """Whether a variant's JSON holds both budgets' rows (bench_smollm2 saves it after every row, so a stopped run
    leaves a partial one, which the rerun completes)."""
    if not path.exists():
        return False
    rows, _ = _rows(path)
    return all((method, b) in rows for b in (0.6, 0.4))


def _rows(path: Path) -> dict:
    doc = json.loads(path.read_text())
    return {(r["method"], r["budget"]): r for r in doc["rows"]}, doc


def report(md: Path) -> None:
    grid, gdoc = _rows(OUT / "grid.json")
    parent = grid[("unpruned", 1.0)]["ppl"]
    lines = ["# Router variants on SmolLM2-135M at equal tokens (issue #21)", "",
             f"- command: `{gdoc['command'].split()[0]} python scripts/router_ablation.py` "
             "(each variant: `scripts/bench_smollm2.py --preset reduced --methods ours_router --router-set ...`; JSON per "
             "variant in `benchmarks/ablations/router/`)",
             f"- machine: {gdoc.get('machine')}; date: {gdoc.get('date')}",
             f"- tokens: {gdoc['budgets']['distill_rows']} rows x {gdoc['budgets']['seq_len']} per separately distilled model "
             "(the grid's); the router's one search has the two models' tokens together; held-out: "
             f"{gdoc['budgets']['heldout_rows']} x {gdoc['budgets']['seq_len']} tokens of Wikipedia never read; parent ppl {parent:.2f}",
             "", "| variant | what it changes | 60%: shape (hidden / FFN / q heads / layers) | 60% ppl | 40%: shape | 40% ppl | search tokens |",
             "|---|---|---|---|---|---|---|"]
    g6, g4 = grid[("ours_grid", 0.6)], grid[("ours_grid", 0.4)]

    def shape(r):
        s = r["shape"]
        return f"{s['hidden_size']} / {s['intermediate_size']} / {s['num_attention_heads']} / {s['num_hidden_layers']}"

    lines.append(f"| **grid + distill each budget alone** (reference) | prune stage's grid, then distill | {shape(g6)} | "
                 f"**{g6['ppl_distilled']:.2f}** | {shape(g4)} | **{g4['ppl_distilled']:.2f}** | {g6['tokens']:,} per model |")
    for name, (overrides, what) in VARIANTS.items():
        p = OUT / f"{name}.json"
        if not finished(p, "ours_router"):
            lines.append(f"| {name} | {what} | not run | | | | |")
            continue
        rows, _ = _rows(p)
        r6, r4 = rows[("ours_router", 0.6)], rows[("ours_router", 0.4)]
        mark = lambda r, g: f"**{r['ppl_distilled']:.2f}**" if r["ppl_distilled"] <= g["ppl_distilled"] else f"{r['ppl_distilled']:.2f}"  # noqa: E731
        lines.append(f"| {name} | {what} (`{' '.join(overrides) or 'none'}`) | {shape(r6)} | {mark(r6, g6)} | {shape(r4)} | "
                     f"{mark(r4, g4)} | {r6['tokens']:,} |")
    reading = OUT / "reading.md"
    if reading.exists():
        lines += ["", reading.read_text().strip(), ""]
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names (default: all)")
    ap.add_argument("--preset", default="reduced", help="bench_smollm2's token preset (default: reduced)")
    ap.add_argument("--parent", default=None, help="parent HF folder (default: SmolLM2 converted by scripts/get_smollm2.py)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default="benchmarks/router_ablation.md")
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"elastic: error: unknown variants {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    if not args.report_only:
        OUT.mkdir(parents=True, exist_ok=True)
        if not finished(OUT / "grid.json", "ours_grid"):
            run_grid(args.preset, args.parent)
        for n in names:
            if not finished(OUT / f"{n}.json", "ours_router"):
                run_variant(n, args.preset, args.parent)
            report(Path(args.out))
    report(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
