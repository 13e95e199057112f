"""The end-of-run table: one row per stage -- what it wrote, its key figure -- and where the report is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elastic.arch import human_count


def _num(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def key_figure(stage: str, s: Any) -> str:
    """The one number a user looks for in a stage's summary (best effort: summaries are plain dicts)."""
    if not isinstance(s, dict):
        return ""
    if stage == "evaluate":
        losses = s.get("heldout_loss") or {}
        txt = f"{s.get('models', 0)} models; held-out loss " + ", ".join(f"{n} {_num(v, 3)}" for n, v in losses.items())
        return txt + (f"; FAILED: {', '.join(s['failed'])}" if s.get("failed") else "")
    if stage == "distill":
        parts = []
        for name, m in (s.get("phases") or {}).items():
            after = (m or {}).get("heldout_after") or {}
            if "ce" in after:
                parts.append(f"{name} held-out CE {_num(after['ce'])}")
        return ", ".join(parts)
    if stage == "quantize" and isinstance(s.get("heldout_loss"), dict):
        h, b = s["heldout_loss"], s.get("bytes") or {}
        txt = f"held-out loss BF16 {_num(h.get('bf16'))} -> FP8 {_num(h.get('dequantized_export'))}"
        if b.get("export") and b.get("source_bf16"):
            txt += f"; {b['export'] / b['source_bf16']:.0%} of the BF16 bytes"
        return txt
    if stage == "export" and s.get("format") is None and "format" in s:
        return "off (export.format is null)"
    if stage == "importance" and s.get("depth_order") is not None:
        return f"layers, least important first: {list(s['depth_order'])[::-1][:8]}"  # depth_order is most important first
    if stage == "search" and isinstance(s.get("budgets"), dict):
        return "; ".join(f"budget {b}: {human_count(r['params'])} params" for b, r in s["budgets"].items())
    if stage == "prune":
        items = list((s.get("extracted") or {}).values()) or [s]
        return "; ".join(f"{r.get('name')}: {human_count(r['params'])} of {human_count(r['parent_params'])} params"
                         for r in items if r.get("params") and r.get("parent_params"))
    for key in ("heldout_loss", "loss", "params"):
        if key in s and not isinstance(s[key], dict):
            return f"{key} {_num(s[key])}"
    return ""


def wrote(stage: str, s: Any, run_root: Path) -> str:
    """What the stage wrote, as paths relative to the run directory where possible."""
    paths = []
    if isinstance(s, dict):
        extracted = [r.get("path") for r in (s.get("extracted") or {}).values() if isinstance(r, dict)]
        for key in ("report", "ranking", "archs", "output", "path", "paths", "outputs", "extracted"):
            v = extracted if key == "extracted" else s.get(key)
            for p in (v if isinstance(v, list) else [v] if v else []):
                if isinstance(p, str):
                    try:
                        paths.append(str(Path(p).resolve().relative_to(run_root)))
                    except ValueError:
                        paths.append(p)
    if not paths and isinstance(s, dict) and "format" in s and s["format"] is None:
        return "-"  # an export stage that was switched off wrote nothing
    return ", ".join(paths) or f"{stage}/"


def rows(run_root: Path, results: dict) -> list[tuple[str, str, str]]:
    return [(stage, wrote(stage, s, run_root), key_figure(stage, s)) for stage, s in results.items()]


def print_summary(run, results: dict) -> None:
    """A rich table (plain text without rich) and the report's path when the evaluate stage ran."""
    table_rows = rows(run.root, results)
    report = (results.get("evaluate") or {}).get("report") if isinstance(results.get("evaluate"), dict) else None
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in table_rows:
            print(" | ".join(r))
        if report:
            print(f"report: {report}")
        return
    table = Table(title=f"elastic run: {run.root}")
    for col in ("stage", "wrote", "key figure"):
        table.add_column(col, overflow="fold")
    for r in table_rows:
        table.add_row(*r)
    console = Console()
    console.print(table)
    if report:
        console.print(f"report: {report}  (and {Path(report).with_suffix('.md')})")


def summary_json(results: dict) -> str:
    return json.dumps(results, indent=1, default=str)
