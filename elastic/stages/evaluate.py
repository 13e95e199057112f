"""Stage `evaluate`: quality and cost of every model in the run, as one report with plots.

    python -m elastic.run stage=evaluate run_dir=RUN                          # every model of RUN
    python -m elastic.run stage=evaluate run_dir=RUN 'evaluate.models=[prune/budget-0.5,/ckpt/other]'
    python -m elastic.run stage=evaluate run_dir=runs/toy evaluate.tasks=[] evaluate.cost.lengths=[]   # tiny CPU variant

Models: the parent, then every exported folder under ``prune/``, ``distill/`` and ``quantize/``
(FP8 exports through `elastic.fp8.load_dequantized`), or the list in ``evaluate.models``.
Per model: sizes and memory from its config (`Arch`; a MoE model also its active parameters, those one
token touches, in the table and the trackers), held-out loss / perplexity (chunked over
tokens), multiple-choice accuracy through lm-evaluation-harness on shipped local tasks, pass-key
retrieval at several context lengths and needle depths, and measured prefill / decode throughput
and peak memory.

Every figure of every model is measured on its own (`measure_figure`): static cost, held-out loss,
each lm-eval task, pass key, throughput, peak memory. One that raises is recorded as failed with one
line (exception type and message; the traceback goes to ``results.json`` only), printed as one line,
and shown as failed in the report and the trackers; the other figures and models stand. A model that
does not load has nothing to measure and fails whole. The stage fails (`EvaluateError`) only when no
quality figure (held-out loss, a task, the pass key) could be computed for any model.

Output (``RUN/evaluate/``): ``results.json`` (rewritten after each model, so a crash keeps what was
measured), ``report/report.md``, ``report/report.html`` (self-contained, images inlined),
``report/*.png``, and ``logs/`` (tensorboard, wandb offline, metrics.jsonl).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from elastic import kernels
from elastic.evaluation import cost, lmeval, passkey, quality, report
from elastic.evaluation.models import EvaluateError, ModelRef, discover, from_list, load
from elastic.parent import resolve_device, resolve_parent_path
from elastic.rundir import RunDir, atomic_dir, remove_temps, write_json

STAGE = "evaluate"


def plan_models(cfg: Any, run: RunDir) -> list[ModelRef]:
    ec = cfg[STAGE]
    if ec.get("models"):
        refs = from_list(list(ec.models), run.root)
    else:
        refs = discover(run.root, resolve_parent_path(cfg))
    if not refs:
        raise EvaluateError(f"no model to evaluate in {run.root}: run the other stages first or set evaluate.models")
    return refs


def check_lengths(refs: list[ModelRef], ec: Any) -> None:
    """Every context length asked for must fit every model: one error before anything runs."""
    if ec.passkey.lengths and ec.passkey.get("keys", "words") not in passkey.KINDS:
        raise EvaluateError(f"evaluate.passkey.keys must be one of {list(passkey.KINDS)}, got {ec.passkey.keys!r}")
    wanted = [("evaluate.passkey.lengths", int(n)) for n in ec.passkey.lengths] + \
             [("evaluate.cost.lengths", int(n)) for n in ec.cost.lengths]
    for ref in refs:
        limit = ref.config.get("max_position_embeddings")
        for key, n in wanted:
            if limit and n > int(limit):
                raise EvaluateError(f"{key} asks for {n} tokens but {ref.name} ({ref.path}) handles at most "
                                    f"max_position_embeddings={limit}")


class TextCache:
    """Held-out rows and the pass-key haystack and keys, built once per tokenizer (every model of a
    family shares one); each built on first use, so that a failure counts against its own figure."""

    def __init__(self, cfg: Any):
        self.cfg, self.cache = cfg, {}

    def _get(self, tokenizer, what: str, build: Callable[[], Any]):
        key = (hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(), what)
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def heldout(self, tokenizer) -> list[torch.Tensor]:
        from elastic.inputs import token_rows

        ec = self.cfg[STAGE]
        seq_len = int(ec.heldout_seq_len or self.cfg.data.seq_len)
        return self._get(tokenizer, "heldout", lambda: list(torch.split(
            token_rows(self.cfg, tokenizer, "heldout", num_sequences=int(ec.heldout_sequences), seq_len=seq_len),
            int(ec.batch_size))))

    def passkey(self, tokenizer) -> tuple[torch.Tensor, Any]:
        """(haystack token ids, keys): contiguous text packed at the longest length, so each prompt is one run of prose."""
        from elastic.inputs import token_rows

        pk = self.cfg[STAGE].passkey
        return self._get(tokenizer, "passkey", lambda: (
            token_rows(self.cfg, tokenizer, "heldout", seq_len=max(int(n) for n in pk.lengths)).flatten(),
            passkey.keys(tokenizer, str(pk.get("keys", "words")))))


MAX_ERROR_CHARS = 400  # one readable line; the full traceback is in results.json


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and its message with the whitespace (newlines) collapsed."""
    msg = " ".join(str(e).split())
    if len(msg) > MAX_ERROR_CHARS:
        msg = msg[:MAX_ERROR_CHARS] + " ..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def measure_figure(entry: dict, key: str, fn: Callable[[], Any], device: torch.device) -> Any:
    """`fn()`, or None when it raises: then the figure is recorded as failed in `entry` (one line, and
    the traceback) and said in one line. Its time goes to ``entry["timing"]``."""
    t0 = time.time()
    try:
        return fn()
    except Exception as e:  # any library's error or assertion: this figure is lost, not the model or the run
        err, tb = one_line(e), traceback.format_exc(limit=12)
    finally:
        entry.setdefault("timing", {})[f"{key.replace('/', '_')}_s"] = round(time.time() - t0, 2)
    entry.setdefault("failed_figures", {})[key] = {"error": err, "traceback": tb}
    print(f"[evaluate] {entry['name']}: {report.figure_name(key)} FAILED: {err}")
    gc.collect()  # out of the handler, the failed forward's frames are gone: free its tensors for the next figure
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def evaluate_model(ref: ModelRef, cfg: Any, device: torch.device, texts: TextCache, tasks: dict[str, dict],
                   entry: dict) -> None:
    """Fill `entry` with one model's figures, each on its own (`measure_figure`); raises only when the
    model does not load."""
    ec = cfg[STAGE]
    bpv = int(ec.cost.bytes_per_value)

    def static() -> tuple[dict, dict]:
        arch = ref.arch()
        maxpos = int(ref.config.get("max_position_embeddings") or 4096)
        contexts = sorted({int(x) for x in np.geomspace(min(128, maxpos), maxpos, int(ec.cost.curve_points))})
        return (cost.static_cost(arch, ref.path, bytes_per_value=bpv),
                {"context": contexts, "bytes": cost.memory_curve(arch, contexts, bpv)})

    got = measure_figure(entry, "cost", static, device)
    if got is not None:
        entry["cost"], entry["memory_curve"] = got

    model, tok = load(ref, device)  # nothing can be measured without the model: the caller fails it whole
    figures: dict[str, Callable[[], Any]] = {
        "heldout": lambda: quality.chunked_loss(model, texts.heldout(tok), int(ec.loss_chunk_tokens))}
    if tasks:
        harness: list = []  # lm-eval's wrapper, made once for all of this model's tasks

        def task_fn(task_dict: dict) -> Callable[[], dict]:
            def run_task() -> dict:
                if not harness:
                    harness.append(lmeval.harness(model, tok, batch_size=int(ec.batch_size)))
                return lmeval.evaluate_task(harness[0], task_dict, limit=ec.task_limit)
            return run_task

        figures |= {f"task/{name}": task_fn(td) for name, td in tasks.items()}
    if ec.passkey.lengths:
        pk = ec.passkey

        def run_passkey() -> list[dict]:
            hay, pool = texts.passkey(tok)
            trials = [passkey.build_trials(pool, hay, int(n), float(d), int(pk.trials), int(pk.candidates), int(cfg.seed))
                      for n in pk.lengths for d in pk.depths]
            return passkey.evaluate(model, trials, int(ec.batch_size))

        figures["passkey"] = run_passkey
    if ec.cost.lengths:
        lengths = [int(n) for n in ec.cost.lengths]
        figures["speed"] = lambda: cost.throughput(model, lengths, int(ec.cost.decode_tokens),
                                                   repeats=int(ec.cost.get("repeats", 1)), seed=int(cfg.seed))
        figures["peak_memory"] = lambda: cost.peak_memory(model, lengths, seed=int(cfg.seed))
    for key, fn in figures.items():
        value = measure_figure(entry, key, fn, device)
        if value is None:
            continue
        if key.startswith("task/"):
            entry.setdefault("tasks", {}).update(value)
        else:
            entry[key] = value
    del model


def has_quality(m: dict) -> bool:
    """Whether a model has at least one quality figure (held-out loss, a task, the pass key)."""
    return bool(m.get("heldout") or m.get("tasks") or m.get("passkey"))


def track(cfg: Any, run: RunDir, results: dict) -> None:
    """Scalars per model and the model table to the configured trackers (tensorboard, wandb offline, jsonl)."""
    from elastic import tracking
    from elastic.train import make_accelerator

    # A run killed after logging and before DONE.json logs again when rerun: start the logs afresh, so the rerun's
    # metrics.jsonl / event files hold one run's rows, as an uninterrupted run's do.
    shutil.rmtree(run.path(STAGE, "logs"), ignore_errors=True)
    acc = make_accelerator(device="cpu", **tracking.accelerator_kwargs(cfg.tracking, run.path(STAGE, "logs")))
    tracking.init_trackers(acc, cfg.tracking, run_name=STAGE, config={STAGE: cfg[STAGE]})
    scalars = {}
    for m in report.ok_models(results):  # the figures a model has; a failed one is in the tables below
        if m.get("cost"):
            scalars[f"{m['name']}/params"] = m["cost"]["params"]
            if m["cost"].get("active_params", m["cost"]["params"]) != m["cost"]["params"]:  # a MoE model
                scalars[f"{m['name']}/active_params"] = m["cost"]["active_params"]
        if m.get("heldout"):
            scalars[f"{m['name']}/heldout_loss"] = m["heldout"]["loss"]
        for t, r in (m.get("tasks") or {}).items():
            if r.get("acc") is not None:
                scalars[f"{m['name']}/{t}/acc"] = r["acc"]
        for r in m.get("passkey") or []:
            scalars[f"{m['name']}/passkey/{r['length']}@{r['depth']}"] = r["accuracy"]
    acc.log(scalars, step=0)
    tables = {"evaluate/models": report.model_table(results)}
    fails = report.failure_table(results)
    if fails[1]:
        tables["evaluate/failures"] = fails
    for tracker in acc.trackers:
        for name, (cols, rows) in tables.items():
            if tracker.name == "wandb":
                tracker.log_table(name, columns=cols, data=rows, step=0)
            elif tracker.name == "tensorboard":
                tracker.writer.add_text(name, report._md_table(cols, rows), 0)
    acc.end_training()


def trained_length(cfg: Any) -> int | None:
    if cfg[STAGE].passkey.get("trained_length"):
        return int(cfg[STAGE].passkey.trained_length)
    if not cfg.parent.get("path") and cfg.get("toy") is not None:
        return int(cfg.toy.seq_len)
    return None


def run(cfg: Any, run: RunDir) -> dict:
    t_start = time.time()
    ec = cfg[STAGE]
    device = resolve_device(ec.get("device") or cfg.device)
    refs = plan_models(cfg, run)
    check_lengths(refs, ec)
    tasks = lmeval.find_tasks(list(ec.tasks or []), list(ec.task_dirs or [])) if ec.tasks else {}
    chances = [1 / c for c in (lmeval.num_choices(p) for p in tasks.values()) if c]
    task_dicts = lmeval.load_tasks(tasks) if tasks else {}
    for model_type in dict.fromkeys(r.config.get("model_type") for r in refs):  # one line per family (NemotronH: its Mamba path)
        kernels.announce(STAGE, {"model_type": model_type}, device)

    out = run.path(STAGE)
    remove_temps(out, ("results.json", "report", run.done_path(STAGE).name))  # what a killed run left half written
    results: dict[str, Any] = {
        "run_dir": str(run.root), "device": str(device), "trained_length": trained_length(cfg),
        "task_chance": sum(chances) / len(chances) if chances else None,
        "settings": OmegaConf.to_container(ec, resolve=True), "models": [],
    }
    texts = TextCache(cfg)
    for ref in refs:
        print(f"[evaluate] {ref.name} ({ref.path})")
        entry: dict[str, Any] = {"name": ref.name, "path": str(ref.path), "stage": ref.stage}
        t0 = time.time()
        try:
            evaluate_model(ref, cfg, device, texts, task_dicts, entry)
            entry["status"] = "ok"
        except Exception as e:  # the model did not load: nothing of it can be measured, the other models still are
            entry["status"], entry["error"] = "failed", one_line(e)
            entry["traceback"] = traceback.format_exc(limit=12)
            print(f"[evaluate] {ref.name} FAILED: {entry['error']}")
        entry["seconds"] = round(time.time() - t0, 1)
        results["models"].append(entry)
        results["seconds"] = round(time.time() - t_start, 1)
        write_json(out / "results.json", results)  # after every model: a crash keeps what was measured

    distill_metrics = report.read_metrics(run.path("distill", "logs", "metrics.jsonl"))
    with atomic_dir(out / "report", overwrite=True) as tmp:
        files = report.write(results, tmp, distill_metrics)
    run.write_sidecar(out / "report", stage=STAGE, config=ec, inputs={"models": [str(r.path) for r in refs]})
    write_json(out / "results.json", results)
    run.write_sidecar(out / "results.json", stage=STAGE, config=ec, inputs={"models": [str(r.path) for r in refs]})
    if ec.get("track", True):
        try:
            track(cfg, run, results)
        except Exception as e:  # the report is written; a tracker's failure must not turn the stage into a traceback
            print(f"[evaluate] tracking FAILED: {one_line(e)}")

    ok = report.ok_models(results)
    failed = report.failures(results)
    if not any(has_quality(m) for m in ok):
        reasons = failed + [(f"{n} {report.figure_name(k)}", e) for n, k, e in report.figure_failures(results)
                            if k in ("heldout", "passkey") or k.startswith("task/")]
        raise EvaluateError(f"no quality figure (held-out loss, task, pass key) could be computed for any model "
                            f"(see {out / 'report' / 'report.md'}): " + "; ".join(f"{n}: {e}" for n, e in reasons))
    scored = [m for m in ok if m.get("heldout")]
    figure_fails: dict[str, list[str]] = {}
    for n, k, _ in report.figure_failures(results):
        figure_fails.setdefault(n, []).append(k)
    return {
        "report": str(out / "report" / "report.html"),
        "models": len(ok), "failed": [n for n, _ in failed], "failed_figures": figure_fails,
        "heldout_loss": {m["name"]: round(m["heldout"]["loss"], 4) for m in scored},
        "best": min(scored, key=lambda m: m["heldout"]["loss"])["name"] if scored else None,
        "plots": sorted(k for k in files if k not in ("md", "html")),
        "seconds": results["seconds"],
    }
