"""Stage `distill`: the pruned student learns from the frozen parent, short context then long context.

Features: forward KL(teacher || student) on full-vocabulary logits (chunked over tokens, so long
contexts never hold ``[tokens x vocab]``; ``losses.py``), optional LM-loss mix (off by default), a
weighted mixture of data sources (the real recipe's 70% post-training / 30% pretraining split is
config), in memory or streamed, any number of phases (``distill.phases``: each with its own
sequence length, global batch, learning rate, warmup and token budget), accelerate for one CPU, one
GPU, DDP or FSDP over GPUs and nodes, exact resume from atomic checkpoints, progress bar with
tokens/s and ETA, tensorboard / wandb (offline) / JSONL metrics.

Launch::

    python -m elastic.run stage=distill run_dir=RUN                     # after stage=prune
    python -m elastic.run stage=distill distill.max_steps=2 run_dir=RUN # smoke test: 2 steps per phase
    python -m elastic.run stage=distill distill.student=/ckpt/student parent.path=/ckpt/teacher \\
        data.files='corpus/*.jsonl' run_dir=RUN
    scripts/distill_multigpu.sh 8 recipe=nemotron_9b_to_4b run_dir=RUN  # 8 GPUs (DDP; FSDP: see the script)

Tiny CPU variant (a few seconds; the toy recipe's two phases at 16 and 64 tokens)::

    python -m elastic.run stage=distill distill.max_steps=3 'distill.phases.0.seq_len=16' \\
        'distill.phases.1.seq_len=64' tracking.backends=[] run_dir=runs/toy

Inputs: the student ``distill.student`` or else ``RUN/prune/latest.json``'s checkpoint; the teacher
``parent.path`` (or the toy parent). Outputs: ``RUN/distill/<phase>/`` plain Hugging Face
checkpoints (``from_pretrained`` with no project code) with ``.meta.json`` sidecars; each phase
starts from the previous one's output. While a phase runs, ``RUN/distill/checkpoints/<phase>/``
holds its resumable checkpoints, the last step's included (removed once the phase's model is written
and scored, unless ``keep_checkpoints_after``); ``RUN/distill/logs/`` holds metrics.

Phase handoff: the next phase loads the written output (the parent's dtype: bf16 for the 9B) as fp32
masters with a fresh AdamW, not phase 1's fp32 masters and moments. The output folder is the one
contract between phases (a crash in phase 2 needs nothing else of phase 1, and phase 1's optimizer
state, ~3x the model, need not be kept), and phase 2 has its own warmup and schedule anyway; the cost
of the bf16 rounding is measured on the toy in the README ("Stages").

Order per phase, so that a crash anywhere loses nothing: train (checkpointing the last step too),
write the model with a sidecar saying ``evaluated: false``, score it on held-out rows (the in-memory
fp32 weights), rewrite the sidecar with the scores, then remove the checkpoints. A finished phase
(sidecar fingerprint of this run, ``evaluated``) is not redone (``force=true`` retrains); a written
but unscored one resumes its last checkpoint (no step left) and scores the same weights; a folder
without a sidecar is crash debris and is retrained over. Bad input -- vocabularies that differ, a sequence longer than a model's
``max_position_embeddings``, no data left, a checkpoint folder of another run -- stops with one
error before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from elastic.rundir import RunDir, read_json
from elastic.schedule import DistillError, Phase, parse_phases  # noqa: F401 - parsed below the plan, which prices them

STAGE = "distill"


# ------------------------------------------------------------------------------------------------ inputs


def resolve_student(cfg: Any, run: RunDir) -> Path:
    """`distill.student`, or the checkpoint `RUN/prune/latest.json` points at."""
    from elastic.parent import check_checkpoint

    if cfg.distill.get("student"):
        return check_checkpoint(cfg.distill.student)
    latest = run.path("prune", "latest.json")
    if not latest.exists():
        raise DistillError(f"no student: set distill.student=<checkpoint> or run stage=prune first ({latest} is missing)")
    return check_checkpoint(read_json(latest)["path"])


def config_hash(path: str | Path) -> str:
    """Hash of a checkpoint's config.json, minus fields that do not change the model."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "use_cache"):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _max_positions(path: Path) -> int | None:
    v = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    return int(v) if v else None


def check_models(student: Path, teacher: Path, phases: list[Phase], tokenizer) -> None:
    """Vocabulary and context checks, before any training or writing."""
    s_cfg = json.loads((student / "config.json").read_text())
    t_cfg = json.loads((teacher / "config.json").read_text())
    if s_cfg.get("vocab_size") != t_cfg.get("vocab_size"):
        raise DistillError(
            f"student vocabulary ({s_cfg.get('vocab_size')}, {student}) differs from the teacher's "
            f"({t_cfg.get('vocab_size')}, {teacher}): logit distillation needs the same tokenizer and vocabulary"
        )
    if len(tokenizer) > int(t_cfg["vocab_size"]):
        raise DistillError(f"the tokenizer has {len(tokenizer)} tokens, more than the models' vocabulary {t_cfg['vocab_size']}")
    for ph in phases:
        for who, p in (("student", student), ("teacher", teacher)):
            mp = _max_positions(p)
            if mp is not None and ph.seq_len > mp:
                raise DistillError(
                    f"phase {ph.name}: seq_len {ph.seq_len} exceeds the {who}'s max_position_embeddings {mp} ({p})"
                )


def data_spec(cfg: Any, phase: Phase) -> dict:
    """What a phase's data stream depends on (part of the resume fingerprint)."""
    from elastic import inputs

    return inputs.stream_spec(cfg, "distill", phase.seq_len) | {"batch_size": phase.batch_size}


def build_data(cfg: Any, tokenizer, phase: Phase):
    """(training `Mixture`, held-out rows or None) for one phase; DataError when nothing is left."""
    from elastic import inputs
    from elastic.data import DataError

    mixture = inputs.training_stream(cfg, tokenizer, "distill", phase.seq_len)

    n_eval = int(cfg.distill.get("eval_sequences") or 0)
    heldout = None
    if n_eval > 0:
        try:
            batches = inputs.token_batches(cfg, tokenizer, "heldout", num_sequences=n_eval, batch_size=n_eval,
                                           seq_len=phase.seq_len)
            heldout = batches[0] if batches else None
        except DataError as e:  # too little held-out text at this length: train anyway, report no eval
            print(f"[distill] {phase.name}: no held-out evaluation ({e})")
    return mixture, heldout


# ------------------------------------------------------------------------------------------------ training


def make_step_fn(lm_weight: float):
    """The distillation step: teacher hidden states without grad, the student's loss inside its forward."""
    from elastic.losses import hidden_states

    def step_fn(batch, model, teacher, step):
        th = head = None
        if lm_weight < 1.0:
            with torch.no_grad():
                th = hidden_states(teacher, batch)
            head = teacher.get_output_embeddings().weight
        out = model(batch, th, head)
        metrics = {}
        if lm_weight < 1.0:
            metrics["kl"] = out.kl
        if lm_weight > 0.0:
            metrics["ce"] = out.ce
        return out.loss, metrics

    return step_fn


@torch.no_grad()
def evaluate(accelerator, model, teacher, rows: torch.Tensor | None, batch_size: int) -> dict[str, float]:
    """Held-out student CE and KL to the teacher, and the teacher's CE (nats/token), on every process."""
    from elastic.losses import chunked_kd_loss, hidden_states, next_token_labels

    if rows is None:
        return {}
    from elastic.train import check_placement

    was_training = model.training
    model.eval()
    sums = {"ce": 0.0, "kl": 0.0, "teacher_ce": 0.0}
    n = 0
    head = teacher.get_output_embeddings()
    for i, batch in enumerate(torch.split(rows, batch_size)):
        batch = batch.to(accelerator.device)
        if i == 0:  # defect 1 of issue #20: an unsharded host student scored with batches on the GPU
            check_placement(model, batch, "distill evaluate", "student")
            check_placement(teacher, batch, "distill evaluate", "teacher")
        th = hidden_states(teacher, batch)
        out = model(batch, th, head.weight, lm_weight=0.5)
        t_out = chunked_kd_loss(th, None, head, labels=next_token_labels(batch), lm_weight=1.0)
        k = batch.shape[0]
        sums["ce"] += float(out.ce) * k
        sums["kl"] += float(out.kl) * k
        sums["teacher_ce"] += float(t_out.ce) * k
        n += k
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}


def _fingerprint(cfg: Any, teacher: Path, student_in: Path, phase: Phase, spec: dict, steps: int) -> dict:
    """What makes a checkpoint or a phase output belong to this run (compared on resume / skip): every input of
    the trajectory, and only those. Memory, speed and bookkeeping settings -- gradient_checkpointing,
    loss_chunk_size, micro_batch_size (the same global batch, split otherwise), eval_sequences / eval_batch_size,
    log_every, checkpoint_every, keep_checkpoints -- are left out: a rerun after an out-of-memory crash may
    change them and still resumes."""
    d = cfg.distill
    return {
        "teacher": str(teacher),
        "teacher_config": config_hash(teacher),
        "student_config": config_hash(student_in),
        "phase": phase.name,
        "data": spec,
        "loss": {"temperature": float(d.get("temperature", 1.0)), "lm_weight": float(d.get("lm_weight", 0.0))},
        "optimizer": {"lr": float(phase.lr), "warmup_steps": int(phase.warmup_steps), "steps": int(steps),
                      "min_lr_ratio": float(d.get("min_lr_ratio", 0.1)), "weight_decay": float(d.get("weight_decay", 0.0)),
                      "betas": [float(b) for b in d.get("betas", (0.9, 0.95))],
                      "grad_clip": None if d.get("grad_clip") is None else float(d.grad_clip)},
        "precision": {"teacher_dtype": str(d.get("teacher_dtype", "auto")),
                      "mixed_precision": str(d.get("mixed_precision", "auto"))},
    }


def _resume_flag(value: Any) -> bool | None:
    if value in (None, "auto"):
        return None
    if isinstance(value, bool):
        return value
    raise DistillError(f"distill.resume must be auto, true or false, got {value!r}")


def _plain(obj: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(obj, resolve=True) if OmegaConf.is_config(obj) else obj


def run(cfg: Any, run: RunDir) -> dict:
    """Distill every phase of `cfg.distill.phases` in order; returns a short summary."""
    from elastic import tracking
    from elastic.losses import KDStudent
    from elastic.parent import load_model, load_tokenizer, resolve_parent_path, torch_dtype
    from elastic.parallel import is_main_rank, load_frozen, materialize, resolve_strategy, resolve_teacher_mode, skeleton
    from elastic.parent import checkpoint_dtype, save_checkpoint
    from elastic.train import (TrainConfig, StepBatches, clear_checkpoints, describe_diff, gather_state_dict,
                               make_accelerator, preflight, train)

    dcfg = cfg.distill
    if run.is_done(STAGE) and not cfg.force:
        print(f"[distill] already done (force=true reruns it): {run.path(STAGE)}")
        return (run.done_record(STAGE) or {}).get("summary") or {}

    # ---- every check that can fail on bad input, before anything is loaded onto a device or written
    phases = parse_phases(dcfg)
    teacher_path = resolve_parent_path(cfg)
    student_path = resolve_student(cfg, run)
    tokenizer = load_tokenizer(student_path if (student_path / "tokenizer_config.json").exists() else teacher_path)
    check_models(student_path, teacher_path, phases, tokenizer)
    resume = _resume_flag(dcfg.get("resume", "auto"))
    lm_weight = float(dcfg.get("lm_weight", 0.0))
    cap = dcfg.get("max_steps")
    data = {ph.name: build_data(cfg, tokenizer, ph) for ph in phases}

    # ---- accelerator, trackers, teacher
    log_dir = run.path(STAGE, "logs")
    acc = make_accelerator(device=str(cfg.get("device", "auto")), mixed_precision=str(dcfg.get("mixed_precision", "auto")),
                           **tracking.accelerator_kwargs(cfg.get("tracking") or {}, log_dir))
    main = acc.is_main_process
    for ph in phases:  # the global batch must split evenly over the processes
        if ph.batch_size % (ph.micro_batch_size * acc.num_processes):
            raise DistillError(f"phase {ph.name}: batch_size {ph.batch_size} is not a multiple of micro_batch_size x "
                               f"processes ({ph.micro_batch_size} x {acc.num_processes}); change one of them")
    strategy = resolve_strategy(cfg, STAGE, acc)
    teacher_mode = resolve_teacher_mode(cfg, STAGE, acc, strategy)
    preflight(cfg, STAGE, acc)
    tracking.init_trackers(acc, cfg.get("tracking") or {}, run_name=f"{STAGE}-{run.root.name}",
                           config={"distill": _plain(dcfg), "parent": str(teacher_path), "student": str(student_path)})
    t_dtype = dcfg.get("teacher_dtype", "auto")
    t_dtype = ("bfloat16" if acc.device.type == "cuda" else "float32") if t_dtype == "auto" else t_dtype
    # students are written in the parent's own dtype (bf16 for the 9B), whatever they trained in
    save_dtype = checkpoint_dtype(teacher_path)
    mixed = str(dcfg.get("mixed_precision", "auto"))
    mixed = ("bf16" if acc.device.type == "cuda" else "no") if mixed == "auto" else mixed
    # read by process 0 only and broadcast (issue #20, defect 5: 8 host copies per node otherwise)
    teacher = load_frozen(teacher_path, torch_dtype(t_dtype), acc.device, shard=teacher_mode == "shard")
    acc.print(f"[distill] teacher {teacher_path} ({t_dtype}, {teacher_mode}), student {student_path}, "
              f"{acc.num_processes} process(es), {strategy}")

    summary: dict[str, Any] = {"teacher": str(teacher_path), "student": str(student_path), "phases": {}}
    source = student_path
    step_offset = 0
    for ph in phases:
        out_rel = f"{STAGE}/{ph.name}"
        out = run.path(out_rel)
        mixture, heldout = data.pop(ph.name)
        spec = data_spec(cfg, ph)
        n_steps = ph.steps(cap)
        fp = _fingerprint(cfg, teacher_path, source, ph, spec, n_steps)
        ckpt_dir = run.path(STAGE, "checkpoints", ph.name)
        keep_after = bool(dcfg.get("keep_checkpoints_after", False))
        if out.exists() and not cfg.force:
            # a folder without its sidecar is crash debris (never another run's result): retrained over
            saved = run.read_sidecar(out) if run.is_complete(out) else None
            if saved is not None and saved.get("fingerprint") != json.loads(json.dumps(fp)):
                raise DistillError(f"{out} exists from another run ({describe_diff(saved.get('fingerprint'), fp, then='written with')}); "
                                   "force=true replaces it, or use another run_dir")
            # `evaluated` false: the model was written, then the run died before its held-out score; the
            # phase reruns from its final-step checkpoint (no training left) to score the same fp32 weights
            if saved is not None and saved.get("evaluated", True):  # sidecars without the key predate it: finished
                acc.print(f"[distill] {ph.name}: already trained ({out}); skipping")
                summary["phases"][ph.name] = saved.get("metrics", {})
                if main and not keep_after:  # a crash after the sidecar may have left them
                    clear_checkpoints(ckpt_dir)
                source, step_offset = out, step_offset + n_steps
                continue

        # Several processes: process 0 alone reads the student (fp32, on the host), the others build it on the meta
        # device; each gets its weights once prepared -- under FSDP only its shards, on the GPU -- and process 0's
        # host copy goes as soon as it is broadcast (issue #20, defect 5). One process: loaded where it trains.
        multi = acc.num_processes > 1
        host = [load_model(source, dtype="float32", device="cpu").state_dict()] if multi and is_main_rank() else [None]
        student = skeleton(source, torch.float32) if multi else load_model(source, dtype="float32", device=acc.device)
        model = KDStudent(student, temperature=float(dcfg.get("temperature", 1.0)), lm_weight=lm_weight,
                          chunk_size=int(dcfg.get("loss_chunk_size", 1024)))
        batches = StepBatches(mixture, batch_size=ph.batch_size, micro_batch_size=ph.micro_batch_size,
                              rank=acc.process_index, world_size=acc.num_processes)
        tcfg = TrainConfig(
            max_steps=n_steps, lr=float(ph.lr), warmup_steps=int(ph.warmup_steps),
            min_lr_ratio=float(dcfg.get("min_lr_ratio", 0.1)), weight_decay=float(dcfg.get("weight_decay", 0.0)),
            betas=tuple(dcfg.get("betas", (0.9, 0.95))), grad_clip=dcfg.get("grad_clip"),
            gradient_checkpointing=bool(dcfg.get("gradient_checkpointing", False)),
            checkpoint_every=int(dcfg.get("checkpoint_every") or 0), keep_checkpoints=int(dcfg.get("keep_checkpoints", 2)),
            resume=resume, log_every=int(dcfg.get("log_every", 1)), seed=int(cfg.seed),
            fail_at_step=dcfg.get("fail_at_step"), desc=f"distill {ph.name}", log_prefix=f"{ph.name}/",
            step_offset=step_offset,
        )
        eval_bs = int(dcfg.get("eval_batch_size") or ph.micro_batch_size)
        before: dict[str, float] = {}

        def score_start(prepared, heldout=heldout, eval_bs=eval_bs, before=before, host=host, multi=multi):
            if multi:
                materialize(prepared, {f"student.{k}": v for k, v in host[0].items()} if host[0] is not None else None,
                            acc.device)
                host[0] = None  # the host copy is consumed
            # the starting weights are scored where they train: under FSDP the sharded student on every process
            # (collectively), never the whole host copy loaded before sharding (issue #20, defect 1)
            before.update(evaluate(acc, prepared, teacher, heldout, eval_bs))

        result = train(model, make_step_fn(lm_weight), batches, tcfg, accelerator=acc, checkpoint_dir=ckpt_dir,
                       teacher=teacher, fingerprint=fp, strategy=strategy, mixed_precision=mixed,
                       on_prepared=score_start)
        metrics = {
            "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
            "final_train_loss": result.losses[-1], "resumed_from": result.resumed_from,
            "heldout_before": before, "world_size": acc.num_processes,
        }
        meta = dict(stage=STAGE, config=_plain(dcfg), inputs={"teacher": str(teacher_path), "student": str(source)},
                    phase=asdict(ph), fingerprint=fp)

        # The trained model is written BEFORE it is scored: scoring may fail (memory, data) and must not cost
        # the training. Every process gathers (FSDP: one tensor at a time); main holds one copy, in the
        # parent's dtype. Reaching here, an existing folder is this run's unfinished one, or force=true.
        state_dict = gather_state_dict(acc, result.model, prefix="student.", dtype=save_dtype)
        if main:
            trained = acc.unwrap_model(result.model).student
            with run.artifact_dir(out_rel, overwrite=True, metrics=metrics, evaluated=False, **meta) as (tmp, _extra):
                save_checkpoint(trained.config, state_dict, tmp, dtype=save_dtype, tokenizer=tokenizer)
        del state_dict  # before scoring: a second copy of the student on the device
        acc.wait_for_everyone()

        # scored on the in-memory fp32 weights, as an uninterrupted run does: a rerun after a crash before the
        # sidecar below says `evaluated` resumes the final-step checkpoint and scores the same weights
        after = evaluate(acc, result.model, teacher, heldout, eval_bs)
        metrics["heldout_after"] = after
        if after:
            acc.log({f"{ph.name}/eval/{k}": v for k, v in after.items()}, step=step_offset + result.steps)
            acc.print(f"[distill] {ph.name}: held-out CE {before['ce']:.4f} -> {after['ce']:.4f} "
                      f"(teacher {after['teacher_ce']:.4f}), KL {before['kl']:.4f} -> {after['kl']:.4f}")
        if main:
            run.write_sidecar(out, metrics=metrics, evaluated=True, **meta)  # atomic: the phase is finished
            if not keep_after:
                clear_checkpoints(ckpt_dir)
        acc.wait_for_everyone()
        summary["phases"][ph.name] = metrics
        source, step_offset = out, step_offset + result.steps
        del model, student, result
        acc.free_memory()

    acc.end_training()
    if main:
        with contextlib.suppress(OSError):  # only if empty: kept checkpoints stay
            run.path(STAGE, "checkpoints").rmdir()
    summary["output"] = str(source)
    if main:
        run.mark_done(STAGE, summary, config=_plain(dcfg))
    return summary
