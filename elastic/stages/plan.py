"""Stage `plan`: will the recipe fit, and what will it cost? From the config alone (no weights, no data, no GPU).

    python -m elastic.run recipe=nemotron_9b_to_4b stage=plan parent.path=/ckpt/nano-9b-v2   # a folder with config.json is enough
    python -m elastic.run recipe=nemotron_9b_to_4b stage=plan parent.path=DIR plan.mamba_path=torch plan.gpus=8
    python -m elastic.run recipe=nemotron_9b_to_4b stage=plan parent.path=DIR plan.rehearse=true plan.gpus=8   # + one real step per row
    python -m elastic.run stage=plan                                                           # tiny CPU variant: the toy recipe

Prints the student's and teacher's parameter counts and one row per stage -- importance, search,
each distill phase -- with the per-GPU memory by term (`elastic.plan`), tokens per step, steps,
FLOPs per token and GPU-hours at ``plan.mfu``; writes ``plan/plan.json`` and ``plan/plan.md``
(atomically, with sidecars). Exits 2 with one ``elastic: error:`` line naming the overflowing term
and the key to change when a row does not fit -- after writing both files, so the whole table can be
read. Not part of ``stage=all``; it keeps no DONE marker (it is cheap and always recomputed).

With ``plan.rehearse=true`` the search row and each distill phase are also rehearsed (`elastic.rehearse`:
the trainer's own step on fake tensors under a fake process group of ``plan.gpus`` ranks, measured by
torch's FSDPMemTracker); every row then carries ``rehearsal_peak_gib`` beside ``peak_gib``, the table
shows both, and the stage exits 2 when a rehearsed peak exceeds usable memory, even where the plan's
arithmetic says it fits.
"""

from __future__ import annotations

from elastic.plan import GiB, PlanError, plan_all
from elastic.rundir import RunDir, _atomic_write_bytes

STAGE = "plan"

_TERMS = ("parameters", "gradients", "optimizer", "ddp_buckets", "bf16_weights", "fsdp_gathered", "teacher",
          "activations", "logits_chunk", "mamba_scan", "layer_transient")


def _g(b) -> str:
    return "-" if b is None else f"{b / GiB:.1f}"


def _rows_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """One column per plan row (importance, search, distill phases), one line per term; the terminal table
    and plan.md show these cells, which are plan.json's numbers rounded."""
    rows = doc["rows"]
    present = [t for t in _TERMS if any(t in r["terms"] for r in rows)]
    head = ["per GPU"] + [r["row"] for r in rows]

    def line(label, fn):
        return [label] + [fn(r) for r in rows]

    cells = [
        line("sharding (student/teacher)", lambda r: f"{r['strategy']}/{r['teacher_mode']}"),
        line("micro-batch x seq_len", lambda r: f"{r['micro_batch']} x {r['seq_len']}"),
        line("activation checkpointing", lambda r: "yes" if r["checkpointing"] else "no"),
        # a MoE student touches a fraction of its parameters per token: memory counts them all, FLOPs the active
        line("student params / active per token", lambda r: f"{r['student_params'] / 1e9:.2f}B / {r['student_active_params'] / 1e9:.2f}B"),
    ]
    cells += [line(f"{t} GiB", lambda r, t=t: f"{r['terms'][t]['gib']:.1f}" if t in r["terms"] else "-") for t in present]
    cells += [
        line("activations, other checkpointing GiB", lambda r: f"{r['activations_other_gib']:.1f}" if "activations_other_gib" in r else "-"),
        line("peak at", lambda r: r["peak_phase"]),
        line("PEAK / usable GiB", lambda r: f"{r['peak_gib']:.1f} / {r['budget_gib']:.1f}"),
    ]
    if any("rehearsal_peak_gib" in r for r in rows):
        cells += [
            line("REHEARSED PEAK GiB", lambda r: f"{r['rehearsal_peak_gib']:.1f}" if r.get("rehearsal_peak_gib") is not None else "-"),
            line("plan / rehearsal", lambda r: f"{r['peak_gib'] / r['rehearsal_peak_gib']:.2f}" if r.get("rehearsal_peak_gib") else "-"),
        ]
    cells += [
        # per node, not per GPU: process 0 reads the weights; every process adds its own overhead
        line("host RAM per node / limit GiB", lambda r: f"{r['host_gib_per_node']:.0f}"
             + (f" / {r['host_limit_gib']:.0f}" if r.get("host_limit_gib") is not None else "")),
        line("fits", lambda r: "yes" if r["fits"] else "NO"),
        line("tokens per step", lambda r: f"{r['tokens_per_step']:,}"),
        line("steps", lambda r: f"{r['steps']:,}"),
        line("TFLOP per token", lambda r: f"{r['flops_per_token'] / 1e12:.4f}"),
        line("GPU-hours", lambda r: f"{r['gpu_hours']:,.0f}"),
    ]
    return head, cells


def _markdown(doc: dict) -> str:
    head, cells = _rows_table(doc)
    lines = [
        f"# Plan: {doc['gpus']} x {doc['gpu_memory_gib']:.0f} GiB, Mamba {doc['mamba_path']} path",
        "",
        f"- teacher / parent: {doc['teacher']['params']:,} parameters, {doc['teacher']['active_params']:,} active per token "
        f"({doc['teacher']['arch']})",
        f"- student: {doc['student']['params']:,} parameters, {doc['student']['active_params']:,} active per token "
        f"({doc['student']['arch']}; {doc['student']['source']})",
        f"- per-GPU memory in GiB; usable = GPU memory - plan.reserve_gib ({doc['reserve_gib']:.0f} GiB); "
        "terms: see `elastic/plan.py`",
        f"- search temperature: {doc['tau']['tau_end']:.3f} at the end of {doc['tau']['router_steps']} router steps "
        f"(floor {doc['tau']['tau_min']})" + (f" -- WARNING: {doc['tau_warning']}" if doc["tau_warning"] else ""),
        f"- total: {doc['gpu_hours']:,.0f} GPU-hours at the stated MFU",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    refusals = doc.get("_refusals", [r.refusal() for r in doc["_rows"] if not r.fits])
    if refusals:
        lines += ["", "Refused:", ""] + [f"- {r}" for r in refusals]
    return "\n".join(lines) + "\n"


def _print(doc: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(_markdown(doc))
        return
    head, cells = _rows_table(doc)
    con = Console(width=max(120, Console().width))
    con.print(f"teacher / parent: [bold]{doc['teacher']['params'] / 1e6:,.0f}M[/] parameters ({doc['teacher']['arch']})")
    con.print(f"student:          [bold]{doc['student']['params'] / 1e6:,.0f}M[/] parameters ({doc['student']['arch']}; {doc['student']['source']})")
    table = Table(title=f"per GPU on {doc['gpus']} x {doc['gpu_memory_gib']:.0f} GiB, Mamba {doc['mamba_path']} path")
    for h in head:
        table.add_column(h, justify="left" if h == "per GPU" else "right")
    for c in cells:
        table.add_row(*c, style="bold" if c[0] in ("PEAK / usable GiB", "REHEARSED PEAK GiB", "fits") else None)
    con.print(table)
    tau = doc["tau"]
    con.print(f"search: Gumbel temperature {tau['tau_end']:.3f} after {tau['router_steps']} router steps (floor {tau['tau_min']})")
    if doc["tau_warning"]:
        con.print(f"[yellow]warning:[/] {doc['tau_warning']}")
    con.print(f"total: {doc['gpu_hours']:,.0f} GPU-hours at the stated MFU")


def _rehearse(cfg, doc: dict) -> list[str]:
    """Rehearse the training rows (`elastic.rehearse`) and fold the measured peaks into `doc`'s rows: a row
    whose rehearsed peak exceeds usable memory does not fit, whatever the arithmetic says. Returns the
    refusals the rehearsal adds."""
    from elastic.rehearse import rehearse_rows

    measured = rehearse_rows(cfg, doc["_rows"])
    refusals = []
    for r, d in zip(doc["_rows"], doc["rows"]):
        m = measured.get(r.row)
        d["rehearsal_peak_gib"] = round(m.peak_gib, 2) if m else None
        if m is None:
            continue
        d["rehearsal"] = m.to_dict()
        if m.peak_bytes > r.budget_bytes:
            d["fits"] = False
            if r.fits:  # the plan's own refusal already names the row otherwise
                refusals.append(f"{r.row}: the rehearsed step peaks at {m.peak_gib:.1f} GiB > {r.budget_bytes / GiB:.1f} GiB usable "
                                f"per GPU although the plan says {r.peak_bytes / GiB:.1f} GiB ({r.strategy}, {r.world_size} GPU(s)) -- "
                                + r.gpu_advice()[1])
    doc["fits"] = all(d["fits"] for d in doc["rows"])
    return refusals


def run(cfg, run: RunDir) -> dict:
    doc = plan_all(cfg)
    extra = _rehearse(cfg, doc) if bool(cfg.get("plan", {}).get("rehearse", False)) else []
    doc["_refusals"] = [r.refusal() for r in doc["_rows"] if not r.fits] + extra
    public = {k: v for k, v in doc.items() if not k.startswith("_")}
    _print(doc)
    meta = dict(stage=STAGE, config={k: cfg.get(k) for k in ("plan", "parallel")})
    run.save_json(f"{STAGE}/plan.json", public, **meta)
    md = run.path(STAGE, "plan.md")
    _atomic_write_bytes(md, _markdown(doc).encode())
    run.write_sidecar(md, **meta)
    print(f"plan: {run.path(STAGE, 'plan.json')}, {md}")
    if doc["_refusals"]:
        raise PlanError("; ".join(doc["_refusals"]))
    return {"fits": True, "gpu_hours": round(doc["gpu_hours"]), "plan": str(run.path(STAGE, "plan.json"))}
