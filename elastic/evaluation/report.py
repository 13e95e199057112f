"""The evaluation report: plots (matplotlib, Agg), ``report.md`` and a self-contained ``report.html``.

Everything here reads the plain results dict that the stage writes to ``results.json``, so the
notebook (``notebooks/report.ipynb``) can redraw the same plots from a finished run directory.

A model either failed whole (``status: failed``, it did not load) or loaded (``status: ok``), and then
each figure it lacks because measuring it raised is in its ``failed_figures`` (key -> one-line error):
the tables show such a figure as FAILED, a plot names the models it leaves out and why, and the
"Failed figures" section lists every one with its reason.
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from elastic.arch import human_count  # noqa: E402


def ok_models(results: dict) -> list[dict]:
    """The models that loaded (some of their figures may have failed: `figure_failures`)."""
    return [m for m in results["models"] if m.get("status") == "ok"]


FAILED = "FAILED"  # a table cell whose figure raised (the reason is under "Failed figures")

# how the report names a figure key of results.json (a task's key is "task/<name>")
FIGURE_NAMES = {"cost": "static cost", "heldout": "held-out loss", "passkey": "pass key", "speed": "throughput",
                "peak_memory": "peak memory"}


def figure_name(key: str) -> str:
    return f"task {key.split('/', 1)[1]}" if key.startswith("task/") else FIGURE_NAMES.get(key, key)


def figure_error(m: dict, key: str) -> str | None:
    """The one-line error of a model's figure that failed, else None."""
    return ((m.get("failed_figures") or {}).get(key) or {}).get("error")


def figure_failures(results: dict) -> list[tuple[str, str, str]]:
    """(model, figure key, one-line error) for every figure that failed in a model that loaded."""
    return [(m["name"], k, f.get("error", "?")) for m in ok_models(results) for k, f in (m.get("failed_figures") or {}).items()]


def peak_rows(m: dict) -> list[dict]:
    """A model's measured peak memory rows (results.json before the split kept ``peak_bytes`` in ``speed``)."""
    return m.get("peak_memory") or [r for r in m.get("speed") or [] if "peak_bytes" in r]


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def mean_task_accuracy(m: dict) -> float | None:
    accs = [t["acc"] for t in (m.get("tasks") or {}).values() if t.get("acc") is not None]
    return sum(accs) / len(accs) if accs else None


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not beaten by another with fewer-or-equal parameters AND lower-or-equal loss."""
    front, best = [], math.inf
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


# ------------------------------------------------------------------------------------------------ plots
def _save(fig, path: Path, results: dict | None = None, keys: tuple[str, ...] = ()) -> Path:
    """Lay out, write and close a figure (every plot of the report ends this way); below it, the models
    it leaves out because one of `keys` failed for them, with the reason."""
    fig.tight_layout()
    missing = [f"{n}: {figure_name(k)} failed ({e})" for n, k, e in figure_failures(results or {"models": []}) if k in keys]
    if missing:
        note = "not shown: " + "; ".join(missing)
        fig.text(0.01, 0.0, textwrap.fill(note, 170), fontsize=7, va="top", color="darkred")
    fig.savefig(path, dpi=110, bbox_inches="tight" if missing else None)
    plt.close(fig)
    return path


def _label(ax, xlabel: str, ylabel: str, title: str, *, log2x: bool = False) -> None:
    """The axes style every line plot of the report shares: labels, title, legend, light grid."""
    if log2x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_quality_vs_params(results: dict, path: Path) -> Path | None:
    models = [m for m in ok_models(results) if m.get("heldout") and m.get("cost")]
    if not models:
        return None
    has_tasks = any(mean_task_accuracy(m) is not None for m in models)
    fig, axes = plt.subplots(1, 2 if has_tasks else 1, figsize=(11 if has_tasks else 6, 4.2), squeeze=False)
    ax = axes[0, 0]
    pts = [(m["cost"]["params"], m["heldout"]["loss"], m["name"]) for m in models]
    for x, y, name in pts:
        ax.scatter(x, y, s=40, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    _label(ax, "parameters", "held-out loss (nats/token, lower is better)", "Quality vs size")
    if has_tasks:
        ax = axes[0, 1]
        for m in models:
            acc = mean_task_accuracy(m)
            if acc is not None:
                ax.scatter(m["cost"]["params"], acc, s=40, zorder=3)
                ax.annotate(m["name"], (m["cost"]["params"], acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
        chance = results.get("task_chance")
        if chance:
            ax.axhline(chance, color="gray", ls=":", label=f"chance (mean) {chance:.2f}")
            ax.legend(fontsize=8)
        ax.set_xlabel("parameters")
        ax.set_ylabel("multiple-choice accuracy (mean over tasks)")
        ax.set_title("lm-eval accuracy vs size")
        ax.grid(alpha=0.3)
    return _save(fig, path, results, ("cost", "heldout", *{k for _, k, _ in figure_failures(results) if k.startswith("task/")}))


def plot_memory(results: dict, path: Path) -> Path | None:
    """From the sizes (left) and measured (right): each panel draws the models that have its figure."""
    models = [m for m in ok_models(results) if m.get("memory_curve")]
    measured = [m for m in ok_models(results) if peak_rows(m)]
    panels = [p for p in (models and "sizes", measured and "measured") if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + (0.5 if len(panels) == 1 else 0), 4.2), squeeze=False)
    if models:
        ax = axes[0, 0]
        for m in models:
            c = m["memory_curve"]
            ax.plot(c["context"], [b / 2**20 for b in c["bytes"]], marker=".", label=m["name"])
        _label(ax, "context length (tokens, one sequence)", "MiB (bf16 weights + KV cache + Mamba state)", "Inference memory vs context (from the sizes)", log2x=True)
    if measured:
        ax = axes[0, len(panels) - 1]
        for m in measured:
            ax.plot([r["length"] for r in peak_rows(m)], [r["peak_bytes"] / 2**20 for r in peak_rows(m)], marker="o", label=m["name"])
        _label(ax, "context length (tokens)", f"peak MiB during prefill ({results.get('device', 'cpu')}, fp32)", "Measured peak memory", log2x=True)
    return _save(fig, path, results, ("cost", "peak_memory"))


def plot_passkey(results: dict, path: Path) -> Path | None:
    models = [m for m in ok_models(results) if m.get("passkey")]
    if not models:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    ax = axes[0, 0]
    for m in models:
        lengths = sorted({r["length"] for r in m["passkey"]})
        acc = [sum(r["accuracy"] for r in m["passkey"] if r["length"] == n) /
               len([r for r in m["passkey"] if r["length"] == n]) for n in lengths]
        ax.plot(lengths, acc, marker="o", label=m["name"])
    chance = models[0]["passkey"][0]["chance"]
    ax.axhline(chance, color="gray", ls=":", label=f"chance {chance:.2f}")
    if results.get("trained_length"):
        ax.axvline(results["trained_length"], color="red", ls="--", lw=1, label=f"parent trained at {results['trained_length']}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    _label(ax, "context length (tokens)", "pass-key accuracy (mean over depths)", "Long-context retrieval")
    # the first model's accuracy per (length, depth): where in the context retrieval fails
    ax = axes[0, 1]
    m = models[0]
    lengths = sorted({r["length"] for r in m["passkey"]})
    depths = sorted({r["depth"] for r in m["passkey"]})
    grid = [[next(r["accuracy"] for r in m["passkey"] if r["length"] == n and r["depth"] == d) for n in lengths] for d in depths]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0 = start)")
    ax.set_title(f"{m['name']}: accuracy by length and depth")
    fig.colorbar(im, ax=ax)
    return _save(fig, path, results, ("passkey",))


def plot_speed(results: dict, path: Path) -> Path | None:
    models = [m for m in ok_models(results) if m.get("speed")]
    if not models:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, key, title in ((axes[0, 0], "prefill_tokens_per_s", "Prefill"), (axes[0, 1], "decode_tokens_per_s", "Decode")):
        for m in models:
            ax.plot([r["length"] for r in m["speed"]], [r[key] for r in m["speed"]], marker="o", label=m["name"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _label(ax, "context length (tokens)", "tokens / s", f"{title} throughput ({results.get('device', 'cpu')}, batch 1, fp32)")
    return _save(fig, path, results, ("speed",))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def plot_distill(metrics: list[dict], path: Path) -> Path | None:
    """Training loss of each distillation phase (keys ``<phase>/loss``), held-out CE where logged."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in metrics:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and row.get("step") is not None and (
                    k.endswith("/loss") or k.endswith("/kl") or "/eval/" in k):
                series.setdefault(k, []).append((row["step"], v))
    if not series:
        return None
    # training loss / KL per step, and the held-out evaluations (much larger numbers) on their own axes
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, is_eval, title in ((axes[0, 0], False, "training (per step)"), (axes[0, 1], True, "held-out, after each phase")):
        for k, pts in sorted(series.items()):
            if ("/eval/" in k) != is_eval:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if is_eval else "-", label=k, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("nats")
        ax.set_title(f"Distillation {title}")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


PLOTS = (
    ("quality_vs_params.png", "Quality vs parameters", plot_quality_vs_params),
    ("memory_vs_context.png", "Memory vs context length", plot_memory),
    ("passkey.png", "Pass-key retrieval vs context length", plot_passkey),
    ("speed.png", "Prefill and decode throughput", plot_speed),
)


def draw_all(results: dict, out: Path, distill_metrics: list[dict] | None = None,
             failed: list[tuple[str, str]] | None = None) -> list[tuple[str, Path]]:
    """Every plot the results allow, as (title, png path). A plot that raises is left out and, when
    `failed` is a list, added to it as (title, one-line error): a plot never costs the report."""
    drawn = []
    jobs = [(title, lambda fn=fn, fname=fname: fn(results, out / fname)) for fname, title, fn in PLOTS]
    if distill_metrics:
        jobs.append(("Distillation curves", lambda: plot_distill(distill_metrics, out / "distill_curves.png")))
    for title, job in jobs:
        try:
            p = job()
        except Exception as e:
            plt.close("all")
            if failed is None:
                raise
            failed.append((title, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
            continue
        if p:
            drawn.append((title, p))
    return drawn


# ------------------------------------------------------------------------------------------------ tables
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def model_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model: the figures a user picks a model by (FAILED where measuring one raised)."""
    models = ok_models(results)
    tasks = sorted({t for m in models for t in (m.get("tasks") or {})} |
                   {k.split("/", 1)[1] for _, k, _ in figure_failures(results) if k.startswith("task/")})
    lengths = {r["length"] for m in models for r in (m.get("passkey") or [])}
    if any(figure_error(m, "passkey") for m in models):  # the asked lengths, so a failed pass key still has columns
        lengths |= {int(n) for n in ((results.get("settings") or {}).get("passkey") or {}).get("lengths") or []}
    lengths = sorted(lengths)
    # MoE models: the parameters a token touches next to the total (a dense run's table stays as it was)
    costs = [m.get("cost") or {} for m in models]
    moe = any(c.get("active_params", c.get("params")) != c.get("params") for c in costs)
    cols = ["model", "params", *(["active params"] if moe else []), "non-emb params", "weights", "KV / token (bf16)",
            "Mamba state / seq", "held-out loss", "ppl", *[f"{t} acc" for t in tasks], *[f"passkey@{n}" for n in lengths]]
    rows = []
    for m in models:
        c = m.get("cost")
        if c:
            sizes = [human_count(c["params"]), *([human_count(c.get("active_params", c["params"]))] if moe else []),
                     human_count(c["non_embedding_params"]), human_bytes(c.get("weight_bytes")),
                     human_bytes(c["kv_bytes_per_token"]), human_bytes(c["mamba_state_bytes"])]
        else:
            sizes = [FAILED if figure_error(m, "cost") else "-"] * (6 if moe else 5)
        held = m.get("heldout")
        loss = [_fmt(held.get("loss")), _fmt(held.get("perplexity"), 1)] if held else [FAILED if figure_error(m, "heldout") else "-"] * 2
        accs = [_fmt(((m.get("tasks") or {}).get(t) or {}).get("acc")) if t in (m.get("tasks") or {})
                else (FAILED if figure_error(m, f"task/{t}") else "-") for t in tasks]
        pk = {n: [r["accuracy"] for r in m.get("passkey") or [] if r["length"] == n] for n in lengths}
        pks = [_fmt(sum(v) / len(v), 2) if v else (FAILED if figure_error(m, "passkey") else "-") for v in pk.values()]
        rows.append([m["name"], *sizes, *loss, *accs, *pks])
    return cols, rows


def speed_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model and measured context: throughput and peak memory, each FAILED on its own."""
    cols = ["model", "context", "prefill tok/s", "decode tok/s", "peak memory"]
    rows = []
    for m in ok_models(results):
        speed = {r["length"]: r for r in m.get("speed") or []}
        peak = {r["length"]: r["peak_bytes"] for r in peak_rows(m)}
        speed_failed, peak_failed = figure_error(m, "speed"), figure_error(m, "peak_memory")
        lengths = sorted(set(speed) | set(peak))
        if not lengths and (speed_failed or peak_failed):
            lengths = [int(n) for n in ((results.get("settings") or {}).get("cost") or {}).get("lengths") or []] or ["-"]
        for n in lengths:
            r = speed.get(n)
            tput = [f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}"] if r else [FAILED if speed_failed else "-"] * 2
            mem = human_bytes(peak[n]) if n in peak else (FAILED if peak_failed else "-")
            rows.append([m["name"], str(n), *tput, mem])
    return cols, rows


def failures(results: dict) -> list[tuple[str, str]]:
    """(model, one-line error) for every model that failed whole (did not load)."""
    return [(m["name"], m.get("error", "?")) for m in results["models"] if m.get("status") != "ok"]


def failure_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Every failure, whole models and single figures, as one table (for the trackers)."""
    rows = [[n, "model (did not load)", e] for n, e in failures(results)]
    rows += [[n, figure_name(k), e] for n, k, e in figure_failures(results)]
    return ["model", "figure", "error"], rows


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows]  # an error message may hold a |
    return "\n".join(lines)


def _html_table(cols: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


NOTES = [
    "Held-out loss: mean next-token cross-entropy on held-out text (nats/token); ppl = exp(loss).",
    "Multiple-choice accuracy: lm-evaluation-harness on the task YAMLs shipped in elastic/evaluation/tasks (local data).",
    "Pass key: of several one-token keys (words or digits: evaluate.passkey.keys), the hidden key must get the highest next-token probability; chance = 1 / candidates.",
    "KV cache and Mamba state from the sizes (bf16 values, fp32 SSM state); throughput and peak memory measured at batch 1 in fp32.",
    "Peak memory of one cached prefill, weights included: torch.cuda.max_memory_allocated on a GPU; on a CPU every tensor alive during the forward, counted once per storage.",
    "FAILED: measuring that figure raised (the reason is under Failed figures); the model's other figures stand.",
]


def write(results: dict, out: Path, distill_metrics: list[dict] | None = None) -> dict[str, Path]:
    """Plots, report.md and report.html (images inlined as base64) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_fails: list[tuple[str, str]] = []
    plots = draw_all(results, out, distill_metrics, failed=plot_fails)
    mcols, mrows = model_table(results)
    scols, srows = speed_table(results)
    fails = failures(results)
    fig_fails = [(n, figure_name(k), e) for n, k, e in figure_failures(results)]
    title = f"elastic evaluation: {results.get('run_dir', '')}"

    md = [f"# {title}", "", f"{len(mrows)} model(s) evaluated, {len(fails)} failed, {len(fig_fails)} figure(s) failed. "
          f"Device: {results.get('device', 'cpu')}. Time spent on the models: {results.get('seconds', 0):.0f} s.", "",
          "## Models", "", _md_table(mcols, mrows), ""]
    if srows:
        md += ["## Throughput and memory", "", _md_table(scols, srows), ""]
    if fails:
        md += ["## Failed", "", *[f"- **{n}**: {e}" for n, e in fails], ""]
    if fig_fails:
        md += ["## Failed figures", "", "Each was measured on its own; the model's other figures stand. "
               "Tracebacks: results.json (`failed_figures`).", "", *[f"- **{n}**, {f}: {e}" for n, f, e in fig_fails], ""]
    if plot_fails:
        md += ["## Plots not drawn", "", *[f"- {t}: {e}" for t, e in plot_fails], ""]
    md += ["## Plots", ""] + [f"### {t}\n\n![{t}]({p.name})\n" for t, p in plots]
    md += ["## Notes", "", *[f"- {n}" for n in NOTES], ""]
    (out / "report.md").write_text("\n".join(md))

    def img(p: Path) -> str:
        return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'

    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(md[2])}</p>", "<h2>Models</h2>", _html_table(mcols, mrows)]
    if srows:
        parts += ["<h2>Throughput and memory</h2>", _html_table(scols, srows)]
    if fails:
        parts += ["<h2>Failed</h2><ul>"] + [f"<li><b>{html.escape(n)}</b>: {html.escape(e)}</li>" for n, e in fails] + ["</ul>"]
    if fig_fails:
        parts += ["<h2>Failed figures</h2><p>Each was measured on its own; the model's other figures stand. "
                  "Tracebacks: results.json (<code>failed_figures</code>).</p><ul>"]
        parts += [f"<li><b>{html.escape(n)}</b>, {html.escape(f)}: {html.escape(e)}</li>" for n, f, e in fig_fails] + ["</ul>"]
    if plot_fails:
        parts += ["<h2>Plots not drawn</h2><ul>"] + [f"<li>{html.escape(t)}: {html.escape(e)}</li>" for t, e in plot_fails] + ["</ul>"]
    parts += ["<h2>Plots</h2>"] + [f"<h3>{html.escape(t)}</h3>{img(p)}" for t, p in plots]
    parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in NOTES] + ["</ul>"]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                                     f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return {"md": out / "report.md", "html": out / "report.html", **{p.stem: p for _, p in plots}}
