"""Stage `evaluate`: quality and cost of every model in the run, as one report with plots.

    python -m elastic.run stage=evaluate run_dir=RUN                          # every model of RUN
    python -m elastic.run stage=evaluate run_dir=RUN 'evaluate.models=[prune/budget-0.5,/ckpt/other]'
    python -m elastic.run stage=evaluate run_dir=runs/toy evaluate.tasks=[] evaluate.cost.lengths=[]   # tiny CPU variant

Models: the parent, then every exported folder under ``prune/``, ``distill/`` and ``quantize/``
(FP8 exports through `elastic.fp8.load_dequantized`), or the list in ``evaluate.models``.
Per model: sizes and memory from its config (`Arch`), held-out loss / perplexity (chunked over
tokens), multiple-choice accuracy through lm-evaluation-harness on shipped local tasks, pass-key
retrieval at several context lengths and needle depths, and measured prefill / decode throughput
and peak memory. A model that fails is listed with its error and the others are still reported.

Output (``RUN/evaluate/``): ``results.json`` (rewritten after each model, so a crash keeps what was
measured), ``report/report.md``, ``report/report.html`` (self-contained, images inlined),
``report/*.png``, and ``logs/`` (tensorboard, wandb offline, metrics.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from elastic.evaluation import cost, lmeval, passkey, quality, report
from elastic.evaluation.models import EvaluateError, ModelRef, discover, from_list, load
from elastic.parent import resolve_device, resolve_parent_path
from elastic.rundir import RunDir, atomic_dir, write_json

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
    """Held-out rows, the pass-key haystack and keys, built once per tokenizer (every model of a family shares one)."""

    def __init__(self, cfg: Any):
        self.cfg, self.cache = cfg, {}

    def get(self, tokenizer) -> dict:
        from elastic.inputs import token_rows

        key = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
        if key not in self.cache:
            ec = self.cfg[STAGE]
            seq_len = int(ec.heldout_seq_len or self.cfg.data.seq_len)
            rows = token_rows(self.cfg, tokenizer, "heldout", num_sequences=int(ec.heldout_sequences), seq_len=seq_len)
            hay = pool = None
            if ec.passkey.lengths:
                # contiguous text: packed at the longest length, so each prompt is one run of prose
                hay = token_rows(self.cfg, tokenizer, "heldout", seq_len=max(int(n) for n in ec.passkey.lengths)).flatten()
                pool = passkey.keys(tokenizer, str(ec.passkey.get("keys", "words")))
            self.cache[key] = {"heldout": list(torch.split(rows, int(ec.batch_size))), "haystack": hay, "keys": pool}
        return self.cache[key]


def evaluate_model(ref: ModelRef, cfg: Any, device: torch.device, texts: TextCache, tasks: list, entry: dict) -> None:
    """Fill `entry` with one model's figures (what is filled before a failure stays)."""
    ec = cfg[STAGE]
    arch = ref.arch()
    bpv = int(ec.cost.bytes_per_value)
    entry["cost"] = cost.static_cost(arch, ref.path, bytes_per_value=bpv)
    maxpos = int(ref.config.get("max_position_embeddings") or 4096)
    contexts = sorted({int(x) for x in np.geomspace(min(128, maxpos), maxpos, int(ec.cost.curve_points))})
    entry["memory_curve"] = {"context": contexts, "bytes": cost.memory_curve(arch, contexts, bpv)}

    model, tok = load(ref, device)
    data = texts.get(tok)
    t0 = time.time()
    entry["heldout"] = quality.chunked_loss(model, data["heldout"], int(ec.loss_chunk_tokens))
    entry["timing"] = {"heldout_s": round(time.time() - t0, 2)}
    if tasks:
        t0 = time.time()
        entry["tasks"] = lmeval.evaluate(model, tok, tasks, limit=ec.task_limit, batch_size=int(ec.batch_size))
        entry["timing"]["tasks_s"] = round(time.time() - t0, 2)
    if ec.passkey.lengths:
        t0 = time.time()
        pk = ec.passkey
        trials = [passkey.build_trials(data["keys"], data["haystack"], int(n), float(d), int(pk.trials), int(pk.candidates),
                                      int(cfg.seed))
                  for n in pk.lengths for d in pk.depths]
        entry["passkey"] = passkey.evaluate(model, trials, int(ec.batch_size))
        entry["timing"]["passkey_s"] = round(time.time() - t0, 2)
    if ec.cost.lengths:
        t0 = time.time()
        entry["speed"] = cost.measure(model, [int(n) for n in ec.cost.lengths], int(ec.cost.decode_tokens),
                                     repeats=int(ec.cost.get("repeats", 1)), seed=int(cfg.seed))
        entry["timing"]["speed_s"] = round(time.time() - t0, 2)
    del model


def track(cfg: Any, run: RunDir, results: dict) -> None:
    """Scalars per model and the model table to the configured trackers (tensorboard, wandb offline, jsonl)."""
    from elastic import tracking
    from elastic.train import make_accelerator

    acc = make_accelerator(device="cpu", **tracking.accelerator_kwargs(cfg.tracking, run.path(STAGE, "logs")))
    tracking.init_trackers(acc, cfg.tracking, run_name=STAGE, config={STAGE: cfg[STAGE]})
    scalars = {}
    for m in report.ok_models(results):
        scalars[f"{m['name']}/params"] = m["cost"]["params"]
        scalars[f"{m['name']}/heldout_loss"] = m["heldout"]["loss"]
        for t, r in (m.get("tasks") or {}).items():
            scalars[f"{m['name']}/{t}/acc"] = r["acc"]
        for r in m.get("passkey") or []:
            scalars[f"{m['name']}/passkey/{r['length']}@{r['depth']}"] = r["accuracy"]
    acc.log(scalars, step=0)
    cols, rows = report.model_table(results)
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            tracker.log_table("evaluate/models", columns=cols, data=rows, step=0)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text("evaluate/models", report._md_table(cols, rows), 0)
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
    task_dicts = lmeval.load_tasks(tasks) if tasks else []

    out = run.path(STAGE)
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
        except Exception as e:  # one broken model must not lose the others' results
            entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=6)
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
        track(cfg, run, results)

    ok = report.ok_models(results)
    failed = report.failures(results)
    if not ok:
        raise EvaluateError(f"every model failed to evaluate (see {out / 'report' / 'report.md'}): "
                            + "; ".join(f"{n}: {e}" for n, e in failed))
    best = min(ok, key=lambda m: m["heldout"]["loss"])
    return {
        "report": str(out / "report" / "report.html"),
        "models": len(ok), "failed": [n for n, _ in failed],
        "heldout_loss": {m["name"]: round(m["heldout"]["loss"], 4) for m in ok},
        "best": best["name"], "plots": sorted(k for k in files if k not in ("md", "html")),
        "seconds": results["seconds"],
    }
