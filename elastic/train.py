"""The one training loop, shared by the distill stage and the search stage's joint router training.

Built on accelerate, so the same code runs on one CPU, one GPU, DDP or FSDP over many GPUs and
nodes (``accelerate launch``; see ``scripts/distill_multigpu.sh``). What a step computes and which
parameters it trains are plugged in by the caller:

``step_fn(batch, model, teacher, step) -> (loss, metrics)``
    ``batch`` is one micro-batch (a ``LongTensor[micro_batch, seq_len]`` of token ids on the
    device), ``model`` the prepared (maybe DDP/FSDP-wrapped) trained module, ``teacher`` whatever
    was passed as ``teacher`` (frozen, not wrapped), ``step`` the 0-based optimizer step. Return
    the scalar loss of this micro-batch (a token mean) and a dict of floats to log. Every
    parameter use must happen inside ``model(...)`` so DDP/FSDP see it (see ``losses.KDStudent``).
``param_groups(model) -> list[dict]``
    Optimizer groups of the UNwrapped model (``{"params": [...], "lr": ..., "weight_decay": ...,
    "warmup_steps": ..., "name": ...}``); missing keys come from :class:`TrainConfig`. Default:
    every trainable parameter, no weight decay on vectors (norms, biases).
``extra_state``
    Objects with ``state_dict()``/``load_state_dict()`` saved in every checkpoint (e.g. a router's
    temperature schedule); RNG states of python, numpy and torch are always saved.

Data comes from :class:`StepBatches`: a deterministic global stream of packed rows
(``data.Mixture``) in which optimizer step ``t`` owns rows ``[t*B, (t+1)*B)`` (``B`` = global batch
in sequences). Micro-step ``a`` of process ``r`` takes rows ``(a*W + r)*m ... +m`` (``m`` = micro
batch, ``W`` = world size), so W processes with ``B/(m*W)`` accumulation steps see exactly the rows
one process sees with ``B/m``: the loss curve does not depend on the number of GPUs.

Checkpoints (``checkpoint_every`` steps, and always the last step) go to ``checkpoint_dir/step_<N>/``:
written into a hidden temporary folder by every process (``Accelerator.save_state``: model, optimizer,
RNG states of python, numpy, torch and CUDA; FSDP sharded), fsynced, completed by ``trainer_state.json``
(step, per-step metrics, data position, scheduler, run fingerprint) and renamed into place only then; a
crash mid-write leaves no ``step_*`` folder. On start, the newest complete checkpoint is resumed
(``resume=None``), after checking that its fingerprint matches this run's: weights, optimizer moments,
RNG streams, the scheduler and the data position all continue, so later steps give bit-identical losses
on the same hardware. The last step's checkpoint means a crash in what follows training (writing the
model, scoring it) costs no training: the rerun resumes at ``max_steps`` and runs no step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from elastic.rundir import fsync_dir, fsync_tree, write_json

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "TrainResult", "StepBatches", "ResumeError", "SimulatedCrash", "train",
    "make_accelerator", "default_param_groups", "latest_checkpoint", "clear_checkpoints",
    "gather_state_dict", "memory_gb", "preflight", "PlacementError", "check_placement",
]

StepFn = Callable[[torch.Tensor, nn.Module, Any, int], "tuple[torch.Tensor, Mapping[str, Any]]"]
ParamGroupsFn = Callable[[nn.Module], "list[dict]"]

STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"  # FSDP2 checkpoints: torch.distributed.checkpoint shards of model + optimizer
EXTRA_FILE = "extra_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed: it belongs to another run, or `resume=true` found none."""


class SimulatedCrash(RuntimeError):
    """Raised by `TrainConfig.fail_at_step` (tests kill a run mid-phase with it)."""


class PlacementError(RuntimeError):
    """A model and the batch it is about to run on are on different devices (a stage forgot to move or shard
    it): named here in one line instead of torch's device-mismatch error deep inside a kernel."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    # `cuda` (no index: the current device) matches any `cuda:i`; the loops always place on an indexed one
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_placement(module: Any, batch: torch.Tensor, where: str, name: str = "model") -> None:
    """Raise `PlacementError` naming `where`, the module and both devices unless every parameter of `module`
    (an FSDP shard counts where its local part lives) is on `batch`'s device. Costs a walk over the parameter
    list, no device work; a module without parameters, or not a module, passes."""
    if not isinstance(module, nn.Module):
        return
    for pname, p in module.named_parameters():
        if not _same_device(p.device, batch.device):
            raise PlacementError(
                f"[{where}] the {name} ({type(module).__name__}, parameter {pname}) is on {p.device} but its batch is on "
                f"{batch.device}: the stage must move or shard the {name} onto {batch.device} before it runs")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (one phase). Sizes are per optimizer step unless noted."""

    max_steps: int                         # optimizer steps of this run
    lr: float = 1e-4                       # peak learning rate (groups may set their own)
    warmup_steps: int = 0                  # linear warmup from 0 to the peak
    min_lr_ratio: float = 0.1              # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.01             # AdamW decoupled weight decay (matrices only by default)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0          # max global grad norm; None/0 = no clipping
    gradient_checkpointing: bool = False   # recompute activations in backward (HF models inside `model`)
    checkpoint_every: int = 0              # save a resumable checkpoint every N steps and at the last; 0 = never
    keep_checkpoints: int = 2              # newest checkpoints kept on disk
    resume: bool | None = None             # None: resume if a checkpoint exists; True: must; False: start over
    log_every: int = 1                     # tracker logging period in steps
    seed: int = 0                          # seeds python/numpy/torch at a fresh start
    fail_at_step: int | None = None        # testing: raise SimulatedCrash after this many steps
    desc: str = "train"                    # progress bar label
    log_prefix: str = ""                   # tracker metric prefix, e.g. "phase1/"
    step_offset: int = 0                   # tracker step of this run's step 0 (phases continue one curve)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"bad schedule: warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    model: nn.Module                        # the prepared (maybe wrapped) module, still on the device
    steps: int                              # optimizer steps done in total (resumed ones included)
    history: list[dict] = field(default_factory=list)  # per-step metrics, index = step - 1
    resumed_from: int | None = None         # the step of the checkpoint this run resumed, if any
    tokens: int = 0                         # global tokens seen (all processes, resumed steps included)
    seconds: float = 0.0                    # wall time of this invocation

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


# ------------------------------------------------------------------------------------------------ data


class StepBatches:
    """This process's micro-batches of each optimizer step, cut from a global row stream.

    ``stream`` has ``take(n)`` (addresses of the next n global rows), ``fetch(addresses)``,
    ``catch_up()``, ``state_dict()``/``load_state_dict()`` and ``seq_len`` -- a ``data.Mixture``.
    ``batch_size`` is the GLOBAL batch in sequences; gradient accumulation is derived from it.
    """

    def __init__(self, stream, *, batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1):
        if micro_batch_size < 1 or batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1 (batch_size={batch_size}, micro_batch_size={micro_batch_size})")
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"batch_size {batch_size} is not a multiple of micro_batch_size x processes "
                f"({micro_batch_size} x {world_size}); change one of them"
            )
        self.stream, self.batch_size, self.micro_batch_size = stream, batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.grad_accum = batch_size // (micro_batch_size * world_size)

    @property
    def seq_len(self) -> int:
        return self.stream.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def next_step(self) -> list[torch.Tensor]:
        addresses = self.stream.take(self.batch_size)
        m, w, r = self.micro_batch_size, self.world_size, self.rank
        out = [self.stream.fetch(addresses[(a * w + r) * m : (a * w + r + 1) * m]) for a in range(self.grad_accum)]
        self.stream.catch_up()
        return out

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ setup


def make_accelerator(*, device: str = "auto", mixed_precision: str = "auto", log_with=None, project_dir=None, **kwargs):
    """An `Accelerator` for this project's conventions.

    ``device="cpu"`` (or no GPU) forces CPU; ``mixed_precision="auto"`` is bf16 on GPU, none on CPU.
    The scheduler is NOT prepared by the loop (accelerate would step it once per process), so
    nothing else needs configuring here.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = device == "cpu" or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir)) if project_dir else None
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with or None,
                       project_config=project, **kwargs)


def preflight(cfg, stage: str, accelerator) -> None:
    """Before a training stage loads anything onto GPUs: log which kernels the family will run (NemotronH:
    which Mamba-2 scan) and refuse a configuration the plan (`elastic.plan`) says does not fit this
    launch's GPUs, naming the term. A family without a memory model is logged as unchecked."""
    preflight_device(cfg, stage, accelerator.device, accelerator.num_processes, printer=accelerator.print)


def preflight_device(cfg, stage: str, device: torch.device, world_size: int = 1, printer: Callable = print) -> None:
    """`preflight` for a stage without an accelerator (importance: one process on `device`)."""
    from elastic import kernels
    from elastic.parallel import gpu_memory_bytes
    from elastic.plan import NoMemoryModel, check_stage, parent_config

    kernels.announce(stage, parent_config(cfg), device, printer=printer)
    if device.type != "cuda":
        return
    try:
        check_stage(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes(device))
    except NoMemoryModel as e:
        printer(f"[{stage}] {e}")


def default_param_groups(model: nn.Module) -> list[dict]:
    """Matrices with weight decay, vectors (norm weights, biases, NemotronH's A_log, D, dt_bias) without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _lr_lambda(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    def f(step: int) -> float:  # `step` = optimizer steps done; the lr used for step s is f(s)
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _enable_gradient_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing in every outermost model inside `model`: a module's own
    ``enable_activation_checkpointing`` (the elastic model, which must recompute under the masks its
    blocks ran with) wins over transformers' ``gradient_checkpointing_enable``."""
    done: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(d + ".") or d == "" for d in done):
            continue
        if hasattr(m, "enable_activation_checkpointing"):
            m.enable_activation_checkpointing(True)
        elif hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            continue
        done.append(name)
    return len(done)


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        return float("nan")


def gather_state_dict(accelerator, model: nn.Module, prefix: str = "",
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The full state dict of a trained model on the main process (FSDP shards gathered one tensor at a
    time), keys with ``prefix`` stripped and only those kept, floating tensors cast to `dtype`; None on
    other processes. Call on EVERY process."""
    from elastic.parallel import full_state_dict, is_sharded

    if is_sharded(model):
        return full_state_dict(model, dtype=dtype, main=accelerator.is_main_process, prefix=prefix)
    if not accelerator.is_main_process:
        return None
    sd = accelerator.unwrap_model(model).state_dict()
    return {k[len(prefix):]: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ checkpoints


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoint_dir.is_dir():
        return []
    out = []
    for p in checkpoint_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `checkpoint_dir`, or None."""
    dirs = _step_dirs(Path(checkpoint_dir))
    return dirs[-1][1] if dirs else None


def read_checkpoint_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def clear_checkpoints(checkpoint_dir: str | Path) -> None:
    """Remove a checkpoint folder (e.g. once the phase's final model is safely written)."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _flat(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys -> JSON of the leaf (lists and scalars are leaves)."""
    if isinstance(d, Mapping) and d:
        out: dict[str, str] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True, default=str)}


def fingerprint_diff(saved: Mapping | None, current: Mapping | None) -> list[str]:
    """The dotted keys (``search.lr``, ``data.seq_len``) whose values differ between two fingerprints."""
    a, b = _flat(dict(saved or {})), _flat(dict(current or {}))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def describe_diff(saved: Mapping | None, current: Mapping | None, limit: int = 6, then: str = "checkpoint") -> str:
    """``key: <then> X vs now Y; ...`` for the keys `fingerprint_diff` finds, on one line."""
    a, b = _flat(dict(saved or {})), _flat(dict(current or {}))
    diff = fingerprint_diff(saved, current)
    text = "; ".join(f"{k}: {then} {a.get(k, 'absent')} vs now {b.get(k, 'absent')}" for k in diff[:limit])
    return text + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")


def check_fingerprint(saved: Mapping | None, current: Mapping | None, where: Path) -> None:
    """Refuse to resume a checkpoint written by a run with other inputs (teacher, student, data, a setting that
    changes the trajectory), naming every key that differs. Callers fingerprint only what changes the
    trajectory, so settings a rerun after a crash may need to change (activation checkpointing, loss chunk,
    logging and checkpoint periods, evaluation size) resume."""
    if not current:
        return
    if fingerprint_diff(saved, current):
        raise ResumeError(
            f"{where} belongs to another run ({describe_diff(saved, current)}); change these back to resume, point "
            "the run elsewhere, or set resume=false to start over (its checkpoints will be replaced)"
        )


def _save_checkpoint(accelerator, checkpoint_dir: Path, step: int, trainer_state: dict, extra: dict, keep: int,
                     sharded: tuple | None = None) -> Path:
    final = checkpoint_dir / f"step_{step:08d}"
    tmp = checkpoint_dir / f".step_{step:08d}.tmp"  # the same name on every process (shared filesystem)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded is not None:  # FSDP2: every process writes its shards of the model and optimizer, and its RNG
        from elastic.parallel import rng_state, save_sharded

        save_sharded(tmp / SHARDED_DIR, *sharded)
        torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    else:
        accelerator.save_state(str(tmp))  # model, optimizer, RNG of every process
    # each process makes what it wrote durable (on a shared filesystem only the writer's fsync flushes its
    # cache); fsyncing a file another process already flushed costs nothing
    fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra:
            torch.save(extra, tmp / EXTRA_FILE)
            fsync_tree(tmp)
        # trainer_state.json last: a folder without it is not a checkpoint
        write_json(tmp / STATE_FILE, trainer_state)  # fsynced: a renamed folder always has a whole state
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(checkpoint_dir)  # the rename itself, before older checkpoints go
        for _, old in _step_dirs(checkpoint_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ one step
# `train` and the plan's rehearsal (`elastic.rehearse`, which runs them on fake tensors at the real world size)
# share these three: the rehearsal measures the step the trainer runs, not a model of it.


def prepare_model(model: nn.Module, *, gradient_checkpointing: bool, fsdp: bool, device: torch.device,
                  mixed_precision: str = "no", replicated: list | tuple = ()) -> None:
    """What training does to `model` before its optimizer exists: activation checkpointing, no KV cache, train
    mode, and under FSDP2 one shard unit per decoder block plus the root (`replicated` parameters stay whole)."""
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    for m in model.modules():  # no KV / state cache in training (NemotronH fails with one)
        if getattr(getattr(m, "config", None), "use_cache", None):
            m.config.use_cache = False
    model.train()
    if fsdp:
        from elastic.parallel import shard_model

        for p in replicated:  # fully_shard moves what it manages to the device; these it does not manage
            p.data = p.data.to(device)
        # after sharding: the optimizer must hold the sharded (DTensor) parameters
        shard_model(model, device, mixed_precision=mixed_precision, ignored_params=replicated)


def make_optimizer(model: nn.Module, cfg: TrainConfig, param_groups: ParamGroupsFn | None = None):
    """(AdamW, its LambdaLR schedule, trained parameter count) over ``param_groups(model)``, defaults from `cfg`."""
    groups = (param_groups or default_param_groups)(model)
    lambdas = []
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g.setdefault("weight_decay", cfg.weight_decay)
        lambdas.append(_lr_lambda(int(g.pop("warmup_steps", cfg.warmup_steps)), cfg.max_steps,
                                  float(g.pop("min_lr_ratio", cfg.min_lr_ratio))))
    n_trained = sum(p.numel() for g in groups for p in g["params"])
    if n_trained == 0:
        raise ValueError("no trainable parameters in the optimizer groups")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  foreach=True)
    # Not prepared on purpose: accelerate would step a prepared scheduler once per process.
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), n_trained


def optimizer_step(model: nn.Module, optimizer, micro: list[torch.Tensor], step_fn: StepFn, *, teacher: Any, step: int,
                   accelerator, fsdp: bool, replicated: list | tuple = (), grad_clip: float | None = None,
                   where: str = "train"):
    """One optimizer step over this process's micro-batches: forward + backward of each (gradients
    accumulated, each loss divided by the micro-batch count), replicated gradients averaged, clipping,
    ``optimizer.step()`` and ``zero_grad``. Returns (metric sums, metric counts, grad norm or None).

    Nothing here reads a device value back to the host: a metric that is a tensor is summed on the device
    (``float(loss)`` per micro-batch would stall the CPU until the GPU caught up, and FSDP needs the CPU to
    run ahead to issue the next block's all-gather while this one computes). `train` reads the sums back
    once per ``log_every`` steps."""
    device = accelerator.device
    sums: dict[str, torch.Tensor | float] = {}
    counts: dict[str, int] = {}  # a metric some micro-batches lack (a per-budget loss) averages over those that have it
    for i, mb in enumerate(micro):
        mb = mb.to(device, non_blocking=True)
        if i == 0:  # a model or teacher left off the device: one line naming both devices, not a kernel's error
            check_placement(model, mb, where, "model")
            check_placement(teacher, mb, where, "teacher")
        sync = i == len(micro) - 1
        if fsdp:
            # Gradient sync stays on for every micro-batch: each backward reduce-scatters its gradients into the
            # sharded fp32 .grad, where they accumulate, so a process holds one block's unsharded gradient at a
            # time. With set_requires_gradient_sync(False) on all but the last (DDP's no_sync idea) FSDP2 keeps
            # every parameter's unsharded fp32 gradient until the last micro-batch: the whole model in fp32 on
            # every GPU (issue #20, defect 2). The cost: one reduce-scatter per micro-batch, overlapped with the backward.
            loss, metrics = step_fn(mb, model, teacher, step)
            (loss / len(micro)).backward()
        else:
            # DDP: all-reduce once per step; its buckets are one fixed copy of the gradients either way
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss, metrics = step_fn(mb, model, teacher, step)
                accelerator.backward(loss / len(micro))
        for k, v in {"loss": loss, **metrics}.items():
            v = v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else float(v)
            sums[k] = sums[k] + v if k in sums else v
            counts[k] = counts.get(k, 0) + 1
    grad_norm = None
    if fsdp:
        from elastic.parallel import average_gradients, clip_grad_norm

        average_gradients(replicated)
        if grad_clip:
            grad_norm = clip_grad_norm(model.parameters(), grad_clip)
    elif grad_clip:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, counts, grad_norm


def _read_back(pending: list[dict]) -> None:
    """Every device tensor among the pending steps' metric sums and grad norms becomes a float, all read back
    in ONE transfer (the window's one host sync)."""
    cells = [(p["sums"], k) for p in pending for k, v in p["sums"].items() if isinstance(v, torch.Tensor)]
    cells += [(p, "grad_norm") for p in pending if isinstance(p.get("grad_norm"), torch.Tensor)]
    if not cells:
        return
    dev = cells[0][0][cells[0][1]].device
    vals = torch.stack([d[k].detach().to(dev, torch.float64).reshape(()) for d, k in cells]).cpu().tolist()
    for (d, k), v in zip(cells, vals):
        d[k] = v


# ------------------------------------------------------------------------------------------------ the loop


def train(
    model: nn.Module,
    step_fn: StepFn,
    batches: StepBatches,
    cfg: TrainConfig,
    *,
    accelerator,
    checkpoint_dir: str | Path | None = None,
    teacher: Any = None,
    param_groups: ParamGroupsFn | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Stateful] | None = None,
    on_step_end: Callable[[int, dict], None] | None = None,
    strategy: str = "auto",
    mixed_precision: str = "no",
    replicated_params: Callable[[nn.Module], list] | None = None,
    on_prepared: Callable[[nn.Module], Any] | None = None,
) -> TrainResult:
    """Train `model` for ``cfg.max_steps`` optimizer steps; see the module docstring.

    The accelerator's previously prepared objects are released first (so checkpoints hold this
    run's model and optimizer only). Trackers must be initialised by the caller
    (``tracking.init_trackers``); metrics go to them every ``log_every`` steps.

    ``strategy="fsdp"`` shards `model` with FSDP2 (`elastic.parallel.shard_model`, ``mixed_precision``
    "bf16" or "no") instead of handing it to accelerate (one process, or DDP); ``replicated_params(model)``
    names parameters kept whole on every process (their gradients are averaged like DDP's).

    ``on_prepared(model)`` runs on every process once the model is prepared (under FSDP sharded, so a forward
    there is collective), before the optimizer exists and before a checkpoint's weights are restored: the
    place to fill a model built on the meta device from process 0's weights (`parallel.materialize`) and to
    score the starting weights where they train (distill's held-out "before"), never an unsharded host copy.
    """
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    accelerator.free_memory()
    main = accelerator.is_main_process
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    extra_state = dict(extra_state or {})
    fingerprint = dict(fingerprint or {})

    # --- resume decision, before anything is modified
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if cfg.resume is True and latest is None:
        raise ResumeError(f"resume=true but there is no checkpoint in {ckpt_dir}")
    if cfg.resume is False:
        latest = None
    state = None
    if latest is not None:
        state = read_checkpoint_state(latest)
        check_fingerprint(state.get("fingerprint"), fingerprint, latest)
        if state["step"] > cfg.max_steps:
            raise ResumeError(f"{latest} is at step {state['step']}, beyond max_steps={cfg.max_steps}")
    accelerator.wait_for_everyone()
    if ckpt_dir is not None and main:
        if cfg.resume is False and ckpt_dir.exists():
            clear_checkpoints(ckpt_dir)
        for p in ckpt_dir.glob(".step_*.tmp") if ckpt_dir.exists() else []:  # a crash mid-save
            shutil.rmtree(p, ignore_errors=True)
    if state is None:
        set_seed(cfg.seed)

    # --- model, optimizer, schedule
    fsdp = strategy == "fsdp"
    replicated = list(replicated_params(model)) if fsdp and replicated_params else []
    prepare_model(model, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=fsdp, device=accelerator.device,
                  mixed_precision=mixed_precision, replicated=replicated)
    if on_prepared is not None:  # before the optimizer holds the parameters: the hook may give meta ones memory
        on_prepared(model)
    optimizer, scheduler, n_trained = make_optimizer(model, cfg, param_groups)
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)

    history: list[dict] = []
    start = 0
    if state is not None:
        if fsdp:
            from elastic.parallel import load_sharded, set_rng_state

            load_sharded(latest / SHARDED_DIR, model, optimizer)
            rng = latest / f"rng_{accelerator.process_index}.pt"
            if rng.exists():
                set_rng_state(torch.load(rng, weights_only=False))
        else:
            accelerator.load_state(str(latest))  # model, optimizer, RNG states
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        history = list(state["history"])
        start = int(state["step"])
        if (latest / EXTRA_FILE).exists() and extra_state:
            saved = torch.load(latest / EXTRA_FILE, weights_only=True)
            for k, obj in extra_state.items():
                if k in saved:
                    obj.load_state_dict(saved[k])
        if state.get("world_size") != accelerator.num_processes:
            log.warning("resuming a %s-process checkpoint on %s processes: same rows, but RNG streams differ",
                        state.get("world_size"), accelerator.num_processes)

    world = accelerator.num_processes
    accelerator.print(
        f"[{cfg.desc}] world size {world} ({'FSDP2' if fsdp else accelerator.distributed_type}, {accelerator.device}, "
        f"mixed precision {mixed_precision if fsdp else accelerator.mixed_precision}); global batch {batches.batch_size} x {batches.seq_len} tokens "
        f"= micro {batches.micro_batch_size} x accumulation {batches.grad_accum} x {world} processes; "
        f"{n_trained / 1e6:.2f}M trained parameters; "
        + (f"resuming at step {start}/{cfg.max_steps} from {latest}" if state else f"{cfg.max_steps} steps")
    )

    bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.desc, unit="step", disable=not main, dynamic_ncols=True,
               mininterval=1.0)
    tokens_per_step = batches.tokens_per_step
    device = accelerator.device
    step = start
    # Steps whose metrics are still on the device: read back (one host sync, one collective) only when they
    # are needed -- a tracker log step, a checkpoint, the last step, or every step for an `on_step_end` hook
    pending: list[dict] = []
    window_start = time.perf_counter()

    def flush() -> None:
        nonlocal window_start
        if not pending:
            return
        keys = sorted(set().union(*(p["sums"] for p in pending)))
        _read_back(pending)
        # token means over the micro-batches of all processes that report a metric (every micro-batch
        # has the same token count); processes may report different keys (search: each draws its own
        # budgets), so the union of keys is agreed first and a key a process lacks counts 0 there
        if world > 1:
            keys = sorted(set(gather_object(keys)))
        tot = torch.tensor([[p["sums"].get(k, 0.0) for k in keys] for p in pending], dtype=torch.float64, device=device)
        num = torch.tensor([[p["counts"].get(k, 0) for k in keys] for p in pending], dtype=torch.float64, device=device)
        if world > 1:
            tot, num = accelerator.reduce(tot, reduction="sum"), accelerator.reduce(num, reduction="sum")
        tot, num = tot.cpu().tolist(), num.cpu().tolist()
        # throughput over the window: a step's own wall time means nothing while the CPU runs ahead of the GPU
        tps = tokens_per_step * len(pending) / max(time.perf_counter() - window_start, 1e-9)
        for p, t_row, n_row in zip(pending, tot, num):
            rec = {k: t / n for k, t, n in zip(keys, t_row, n_row) if n}
            rec.update(p["rec"], tokens_per_s=tps)
            if p.get("grad_norm") is not None:
                rec["grad_norm"] = float(p["grad_norm"])
            history.append(rec)
            if cfg.log_every and (rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.max_steps):
                accelerator.log({f"{cfg.log_prefix}{k}": v for k, v in rec.items() if k != "step"},
                                step=cfg.step_offset + rec["step"])
            if on_step_end is not None:
                on_step_end(rec["step"], rec)
        last = history[-1]
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{tps:.0f}",
                        refresh=False)
        pending.clear()
        window_start = time.perf_counter()

    try:
        while step < cfg.max_steps:
            micro = batches.next_step()
            lrs = [g["lr"] for g in optimizer.param_groups]
            sums, counts, grad_norm = optimizer_step(model, optimizer, micro, step_fn, teacher=teacher, step=step,
                                                     accelerator=accelerator, fsdp=fsdp, replicated=replicated,
                                                     grad_clip=cfg.grad_clip, where=cfg.desc)
            scheduler.step()
            step += 1
            rec = dict(step=step, lr=lrs[0], tokens=step * tokens_per_step, mem_gb=memory_gb(device))
            for g, lr in zip(optimizer.param_groups[1:], lrs[1:]):
                if g.get("name"):
                    rec[f"lr_{g['name']}"] = lr
            pending.append({"sums": sums, "counts": counts, "grad_norm": grad_norm, "rec": rec})
            bar.update(1)

            # the last step is checkpointed too: what runs after training (saving, scoring) may still fail,
            # and a rerun then starts from the trained model instead of the last periodic checkpoint
            checkpoint = (ckpt_dir is not None and cfg.checkpoint_every
                          and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps))
            if (on_step_end is not None or checkpoint or step == cfg.max_steps
                    or (cfg.log_every and step % cfg.log_every == 0)):
                flush()  # a checkpoint holds the history up to its step
            if checkpoint:
                trainer_state = {
                    "step": step,
                    "max_steps": cfg.max_steps,
                    "world_size": world,
                    "fingerprint": fingerprint,
                    "data": batches.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "config": asdict(cfg),
                }
                extra = {k: obj.state_dict() for k, obj in extra_state.items()}
                _save_checkpoint(accelerator, ckpt_dir, step, trainer_state, extra, cfg.keep_checkpoints,
                                 sharded=(model, optimizer) if fsdp else None)
            if cfg.fail_at_step is not None and step == cfg.fail_at_step:
                raise SimulatedCrash(f"simulated crash after step {step} (fail_at_step)")
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    return TrainResult(model=model, steps=step, history=history, resumed_from=start if state else None,
                       tokens=step * tokens_per_step, seconds=time.perf_counter() - t_start)
