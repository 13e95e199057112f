"""Stage `export`: the compressed model as GGUF files for llama.cpp (edge devices), checked in llama.cpp.

Features: llama.cpp's own converter writes one lossless GGUF (f32 / bf16 / f16, the checkpoint's
dtype) and llama.cpp's quantizer makes every requested type from it (Q8_0, Q4_K_M, ... as
`llama-quantize` would); a config goes to the converter in the hub's style when its family says so
(NemotronH: ``elastic/models/nemotron_h/export.py``) and tokenizers unknown to llama.cpp are mapped
by behaviour and verified (``elastic/gguf.py``); each GGUF is loaded in llama.cpp and compared with
the Hugging Face model: greedy tokens, held-out perplexity, size on disk, CPU tokens/s. Needs the
gguf extra: ``bash scripts/install.sh --gguf``.

Launch::

    python -m elastic.run stage=export export.format=gguf run_dir=RUN                  # Q8_0 + Q4_K_M of the last distilled phase
    python -m elastic.run stage=export export.format=gguf export.quant=[q8_0,q4_k_m] \\
        export.model=RUN/prune/budget-0.5 run_dir=RUN                                  # any checkpoint

Tiny CPU variant (seconds, after the toy run)::

    python -m elastic.run stage=export export.format=gguf export.quant=[q8_0] export.heldout_sequences=2 \\
        export.max_new_tokens=8 run_dir=runs/toy

Inputs: ``export.model``, else the output of ``RUN/distill/DONE.json``, else ``RUN/prune/latest.json``.
Outputs: ``RUN/export/<name>-<quant>.gguf``, each with a ``.meta.json`` sidecar (source checkpoint,
quant, size, tensor types, tool versions), and ``RUN/export/<name>.check.json`` (the comparison).
GGUF files are made in a temporary folder inside ``RUN/export`` and renamed into place only after
llama.cpp loaded them and tokenized the test texts like transformers: no half-written ``.gguf``.
A MoE NemotronH (layers ``E``) becomes llama.cpp's ``nemotron_h_moe`` (routed experts stacked per layer,
shared expert, router with its correction bias); one that also has dense MLP layers (``-``) is refused
in one line before anything is written: that llama.cpp architecture has none.
With ``export.format: null`` (the toy default, so ``python -m elastic.run`` needs no extra) the
stage prints one line and writes nothing. Bad input -- an unknown GGUF type, a checkpoint or
tokenizer llama.cpp cannot take -- stops with one error line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from elastic.rundir import RunDir, read_json, remove_temps

STAGE = "export"
FORMATS = ("gguf",)


class ExportError(ValueError):
    """Bad input for the export stage (reported as one line by `elastic.run`)."""


def source_checkpoint(cfg: Any, run: RunDir) -> Path:
    """`export.model`, or the last distilled phase, or the pruned model `prune/latest.json` names."""
    ecfg = cfg.export
    if ecfg.get("model"):
        path = Path(ecfg.model).expanduser()
    elif ((run.done_record("distill") or {}).get("summary") or {}).get("output"):
        path = Path(run.done_record("distill")["summary"]["output"])
    elif run.path("prune", "latest.json").exists():
        path = Path(read_json(run.path("prune", "latest.json"))["path"])
    else:
        raise ExportError(f"nothing to export in {run.root}: run stage=distill or stage=prune first, or set export.model=<checkpoint>")
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    from elastic.parent import check_weights

    check_weights(path)  # a truncated or missing weight file: one line naming it, before the converter runs
    return path.resolve()


def export_name(cfg: Any, run: RunDir, source: Path) -> str:
    """`export.name`, or the checkpoint's path inside the run dir joined by '-' (distill-phase2), or its folder name."""
    if cfg.export.get("name"):
        return str(cfg.export.name)
    try:
        return "-".join(source.relative_to(run.root).parts)
    except ValueError:
        return source.name


def run(cfg: Any, run: RunDir) -> dict:
    """Export the chosen checkpoint in every `export.quant` type and check the files in llama.cpp."""
    from elastic import gguf

    ecfg = cfg.export
    fmt = ecfg.get("format")
    if not fmt:
        print(f"[{STAGE}] export.format is null: nothing exported (export.format=gguf writes GGUF files for llama.cpp; "
              "needs `bash scripts/install.sh --gguf`)")
        return {"format": None}
    if fmt not in FORMATS:
        raise ExportError(f"unknown export.format {fmt!r}; choose one of: {', '.join(FORMATS)} (or null)")
    quants = [str(q).lower() for q in (ecfg.quant if not isinstance(ecfg.quant, str) else [ecfg.quant])]
    unknown = [q for q in quants if q not in gguf.QUANTS]
    if unknown or not quants:
        raise ExportError(f"unknown GGUF type(s) {unknown or quants} in export.quant; choose from: {', '.join(gguf.QUANTS)}")
    source = source_checkpoint(cfg, run)
    name = export_name(cfg, run, source)
    versions = gguf.tool_versions()  # fails early, with the install command, when the extra is missing
    threads = int(ecfg.threads) if ecfg.get("threads") else None

    out_dir = run.path(STAGE)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a rerun after a crash redoes every file (each replaces its earlier copy whole); the work folder, sidecars
    # or marker a killed run left half-written go first
    remove_temps(out_dir, (name, *(f"{name}-{q}.gguf" for q in quants), run.done_path(STAGE).name))
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    try:
        files = gguf.export_gguf(source, name, quants, workdir=work, threads=threads)
        report = None
        if ecfg.get("check", True):
            rows = _heldout_rows(cfg, source)
            report = gguf.check(source, files, list(ecfg.prompts), rows, max_new_tokens=int(ecfg.max_new_tokens),
                                threads=threads, hf_dtype=ecfg.get("hf_dtype"))
        final = {}
        for quant, tmp in files.items():
            dest = out_dir / f"{name}-{quant}.gguf"
            meta = gguf.gguf_metadata(tmp)
            os.replace(tmp, dest)
            run.write_sidecar(dest, stage=STAGE, config=ecfg, inputs={"checkpoint": str(source)}, quant=quant,
                              size_bytes=dest.stat().st_size, source_size_bytes=_size(source), tool_versions=versions,
                              architecture=meta.get("general.architecture"), tokenizer_pre=meta.get("tokenizer.ggml.pre"),
                              tensor_types=meta["tensor_types"])
            final[quant] = str(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, Any] = {"format": fmt, "source": str(source), "files": final}
    if report is not None:
        run.save_json(f"{STAGE}/{name}.check.json", report, stage=STAGE, config=ecfg, inputs={"checkpoint": str(source), **final},
                      tool_versions=versions)
        print(gguf.check_table(report))
        summary["check"] = {q: {"ppl": round(m["ppl"], 4), "tokens_identical": m.get("all_identical", True)}
                            for q, m in report["models"].items()}
    return summary


def _heldout_rows(cfg: Any, source: Path):
    from transformers import AutoTokenizer

    from elastic.inputs import token_rows

    tokenizer = AutoTokenizer.from_pretrained(source)
    rows = token_rows(cfg, tokenizer, "heldout", num_sequences=int(cfg.export.heldout_sequences), seq_len=int(cfg.export.seq_len))
    if len(rows) == 0:
        raise ExportError("no held-out text for the check: set data.heldout_files (or data.files)")
    return rows


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
