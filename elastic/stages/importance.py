"""Stage `importance`: score and rank every elastic axis of the parent on calibration data.

    python -m elastic.run stage=importance parent.path=/ckpt/NVIDIA-Nemotron-Nano-9B-v2 \
        data.files='calib/*.jsonl' run_dir=runs/9b
    python -m elastic.run stage=importance            # tiny CPU variant: the toy parent, ~20 s

Writes ``importance/scores.safetensors`` (raw scores), ``importance/ranking.safetensors`` (the
importance order of every axis, the one index set that search, prune and distill all use) and
``importance/summary.json`` (per-layer depth scores, readable), each with a ``.meta.json`` sidecar.
"""

from __future__ import annotations

import time

from elastic.importance import compute_scores
from elastic.inputs import token_batches
from elastic.arch import sizes_from_config
from elastic.models.family import Ranking
from elastic.parent import load_model, load_tokenizer, resolve_device, resolve_parent_path
from elastic.rundir import RunDir, remove_temps
from elastic.train import preflight_device

STAGE = "importance"
# Everything the stage writes, in order; a rerun after a crash rewrites them all (each write replaces the file
# whole), so nothing a crashed run left needs reading, only its temporaries removing.
ARTIFACTS = ("scores.safetensors", "ranking.safetensors", "summary.json")


def run(cfg, run: RunDir) -> dict:
    c = cfg.importance
    remove_temps(run.path(STAGE), (*ARTIFACTS, run.done_path(STAGE).name))
    parent_path = resolve_parent_path(cfg)
    device = resolve_device(cfg.device)
    # as search and distill do: say which kernels run, and refuse what the plan says does not fit this GPU,
    # before the parent is read (minutes for the 9B) or anything is written
    preflight_device(cfg, STAGE, device)
    tok = load_tokenizer(parent_path)
    model = load_model(parent_path, cfg.parent.dtype, device)
    arch = sizes_from_config(model)
    batches = token_batches(cfg, tok, "calib", num_sequences=c.num_sequences, batch_size=c.batch_size, seq_len=c.seq_len)
    t0 = time.time()
    scores = compute_scores(model, batches, depth=c.depth, chunk_size=int(c.get("logits_chunk_size") or 1024))
    if not c.depth:  # keep the layer order as given so depth pruning still has a (trivial) ranking
        import torch

        # two tensors: safetensors refuses to save one tensor under two names
        scores["depth_mse"] = torch.arange(arch.num_layers, 0, -1).float()
        scores["depth_loss"] = scores["depth_mse"].clone()
    ranking = Ranking.from_scores(ranked_scores(model, scores, c.get("expert_score")), arch, depth_metric=c.depth_metric)
    ranking.validate(arch)
    inputs = {"parent": str(parent_path), "calibration_sequences": sum(len(b) for b in batches)}
    meta = dict(stage=STAGE, config=cfg.importance, inputs=inputs, arch=arch.to_dict())
    run.save_tensors("importance/scores.safetensors", scores, **meta)
    run.save_tensors("importance/ranking.safetensors", ranking.to_tensors(), **meta)
    summary = {
        "parent": str(parent_path),
        "arch": arch.to_dict(),
        "layers": [
            {"index": i, "kind": k, "depth_mse": float(scores["depth_mse"][i]), "depth_loss": float(scores["depth_loss"][i])}
            for i, k in enumerate(arch.pattern)
        ],
        "depth_order": ranking.depth.tolist(),
        "seconds": round(time.time() - t0, 1),
    }
    run.save_json("importance/summary.json", summary, **meta)
    return {"ranking": str(run.path("importance/ranking.safetensors")), "depth_order": summary["depth_order"]}


def ranked_scores(model, scores: dict, expert_score: str | None) -> dict:
    """The scores the ranking is built from: for a family with routed experts (``expert_scores``), the experts'
    scores by `expert_score` (``importance.expert_score``: share_gate_norm | frequency; one ArchError line for
    another); a model without experts (no ``experts.<layer>`` scores) ranks `scores` as they are. The raw scores,
    every statistic, are what ``scores.safetensors`` keeps."""
    from elastic.models import family_for

    select = getattr(family_for(model), "expert_scores", None)
    if select is None or expert_score is None or not any(k.startswith("experts.") for k in scores):
        return scores
    return select(scores, str(expert_score))


def load_ranking(run: RunDir) -> Ranking:
    """The parent's ranking from a finished importance stage (clear error if it has not run)."""
    path = run.path("importance/ranking.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m elastic.run stage=importance run_dir={run.root}` first")
    return Ranking.from_tensors(run.load_tensors("importance/ranking.safetensors"))
