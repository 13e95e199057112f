"""The plan's rehearsal: one real training step of each row, at the real world size, on fake tensors.

    python -m elastic.run recipe=nemotron_9b_to_4b stage=plan parent.path=DIR plan.rehearse=true plan.gpus=8

`elastic.plan` prices a step by arithmetic (instant, and it explains itself); this module runs the step
the trainer runs and measures it, so the arithmetic is checked against the code rather than against a
second model of it (torchtitan's memory estimator does the same for its trainer). For the search row and
each distill phase:

* a fake process group of ``plan.gpus`` ranks (``torch.distributed`` backend ``fake``: collectives return
  at once) stands in for the launch; this process is rank 0;
* the student and the teacher are built from ``config.json`` alone on the meta device (no weights), by
  the stages' own code (`stages.search.make_search_model`, `losses.KDStudent`), then wrapped by
  `train.prepare_model` exactly as `train.train` wraps them (activation checkpointing, ``fully_shard``
  per decoder block and the root, the router replicated) and the teacher placed as the stage places it
  (replicated, or `parallel.shard_frozen`);
* ``to_empty`` inside ``FakeTensorMode`` gives every tensor a shape, a dtype and no storage, and
  `train.make_optimizer` builds the trainer's AdamW over them;
* `train.optimizer_step` -- the trainer's own step: forward, the chunked KD loss, backward with the
  recipe's gradient accumulation, gradient averaging and clipping, ``optimizer.step()`` -- runs once
  inside torch's ``FSDPMemTracker`` (``MemTracker`` without FSDP), which records the peak bytes by
  category (sharded and unsharded parameters and gradients, activations, optimizer state, collectives'
  buffers).

What stands in for a GPU here, and what the rehearsal cannot see:

* device ``cpu`` instead of ``cuda`` (fake CUDA tensors cannot run a backward on a CPU-only torch), and
  so transformers' pure-torch Mamba-2 scan (``plan.mamba_path=torch``; the fused kernels are CUDA only);
* AdamW's moments are allocated by one step on zero gradients before the traced step, as they exist
  from the trainer's first step on (a first step's lazy state initialisation inflates the peak by
  temporaries that a later step never has);
* micro-batches past the second repeat the second's memory exactly (the same tensors are alive: the
  accumulated gradients, the fixed state), so an accumulation of N > 2 is rehearsed with 2;
* the search draws its budgets as the trainer does (`SearchModel.plan`, on real generators) at a router
  step that does not log the router's choices (that logging reads tensor values; fake tensors have none);
* transformers builds an S x S attention mask when it sees fake position ids (it takes them for a
  trace that might be packed); training rows are never packed, so the rehearsal gives it what a real
  run's position ids give: no packed-sequence mask;
* a ``ddp`` row is rehearsed as one replica: DDP's gradient buckets are not traced (the plan adds them);
* two things the tracker would count that a GPU run never holds are kept out: DTensor's global-shape
  stand-ins for sharding propagation (fake on a GPU; `_sharding_propagation_untracked`) and a micro-batch's
  checkpointed block inputs held past its backward by the tracker's own module hooks (`_tracker_grad_hooks`);
* left out, as by the plan: the CUDA context, NCCL's own buffers, allocator fragmentation
  (``plan.reserve_gib``).
"""

from __future__ import annotations

import contextlib
import copy
import time
import types
from dataclasses import dataclass, field

import torch

from elastic.plan import GiB, PlanError, StagePlan

__all__ = ["Rehearsal", "RehearsalError", "fake_world", "frozen_params_take_no_grad_hooks", "rehearse_distill", "rehearse_search", "rehearse_rows"]


class RehearsalError(PlanError):
    """A rehearsal that cannot run here (a setting it cannot reproduce on this machine)."""


@dataclass
class Rehearsal:
    """What one rehearsed step of one plan row measured (bytes per GPU, rank 0)."""

    row: str
    peak_bytes: int
    by_category: dict[str, int]  # the categories at the moment of the peak (FSDPMemTracker's names, lower case)
    world_size: int
    strategy: str
    micro_batches: int  # micro-batches run (the recipe's accumulation, capped at 2: see the module docstring)
    grad_accum: int  # the recipe's accumulation
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_gib, 2), "world_size": self.world_size,
                "strategy": self.strategy, "micro_batches": self.micro_batches, "grad_accum": self.grad_accum,
                "seconds": round(self.seconds, 1), "by_category_gib": {k: round(v / GiB, 3) for k, v in self.by_category.items()},
                "notes": self.notes}


# ------------------------------------------------------------------------------------------------ stand-ins


@contextlib.contextmanager
def fake_world(world_size: int):
    """A ``fake`` process group of `world_size` ranks (this process is rank 0) for the duration."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RehearsalError("plan.rehearse needs a process of its own: a process group is already initialised here")
    dist.init_process_group("fake", rank=0, world_size=int(world_size), store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _zeros_like_list(t: torch.Tensor):
    """What ``t.tolist()`` gives for a tensor of zeros, built without a tensor op (none may run on a fake value)."""
    zero = 0.0 if t.is_floating_point() else 0

    def fill(shape):
        return zero if not shape else [fill(shape[1:]) for _ in range(shape[0])]

    return fill(tuple(t.shape))


@contextlib.contextmanager
def fake_values_read_as_zero():
    """The step reads a few numbers off tensors (``float`` of the loss, the KL, the grad norm; ``tolist``); a
    fake tensor has no value, so they read as zeros here (`parallel.average_gradients` takes its fake per-rank
    counts as present on its own). Nothing the step allocates depends on them (a grad norm of 0 skips clipping's
    in-place scaling, which allocates next to nothing). Also used by the tests' fake-tensor traces (tests/memtrace.py)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

    orig = torch.Tensor.__float__, torch.Tensor.tolist

    def tolist(t):
        try:
            return orig[1](t)  # a fake tensor made from a constant (AdamW's step count) still has its values
        except DataDependentOutputException:
            return _zeros_like_list(t)

    torch.Tensor.__float__ = lambda t: 0.0 if isinstance(t, FakeTensor) else orig[0](t)
    torch.Tensor.tolist = lambda t: tolist(t) if isinstance(t, FakeTensor) else orig[1](t)
    try:
        yield
    finally:
        torch.Tensor.__float__, torch.Tensor.tolist = orig


@contextlib.contextmanager
def _sharding_propagation_untracked():
    """DTensor's sharding propagation (the slow path, e.g. ``clip_grad_norm_``'s ``_foreach_norm`` over every
    sharded gradient) derives output metadata by running the op on *global-shape* stand-ins made under the
    fake mode it detects. On a GPU there is none, so it makes a fresh FakeTensorMode and the stand-ins cost
    nothing; here it finds the rehearsal's, and the memory tracker would count a global-shape copy of every
    gradient it sees at once (the 9B's search: 33 GiB fp32, the whole model, at grad clipping -- the 9.5 GiB
    the first full-depth rehearsal put above the plan). Propagation runs here as on a GPU: outside every
    active mode (tracker and fake mode), on its own fake tensors; it returns metadata only."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.utils._python_dispatch import _disable_current_modes

    name = "_propagate_tensor_meta_non_cached"
    orig = getattr(ShardingPropagator, name, None)
    if orig is None:  # another torch: nothing to redirect (a peak at grad clipping may then hold the stand-ins)
        yield
        return

    def untracked(self, *args, **kwargs):
        with _disable_current_modes():
            return orig(self, *args, **kwargs)

    setattr(ShardingPropagator, name, untracked)
    try:
        yield
    finally:
        setattr(ShardingPropagator, name, orig)


@contextlib.contextmanager
def frozen_params_take_no_grad_hooks():
    """Torch's ``MemTracker`` installs gradient hooks on the parameters of every module that runs inside it,
    and a frozen parameter (the teacher's) refuses one with a RuntimeError. No gradient ever reaches a tensor
    that does not require one, so such a hook could never fire: while this is active, registering one is a
    no-op. The teacher can stay frozen, as in training, whatever transformers passes between its modules
    (5.25 passes the conv weight as a module input, and the tracker hooks a trainable input's gradient)."""
    from collections import OrderedDict

    from torch.utils.hooks import RemovableHandle

    names = ("register_hook", "register_post_accumulate_grad_hook")
    orig = {n: getattr(torch.Tensor, n) for n in names}

    def guarded(name):
        def register(t, hook):
            return orig[name](t, hook) if t.requires_grad else RemovableHandle(OrderedDict())  # nothing to remove
        return register

    for n in names:
        setattr(torch.Tensor, n, guarded(n))
    try:
        yield
    finally:
        for n in names:
            setattr(torch.Tensor, n, orig[n])


@contextlib.contextmanager
def _tracker_grad_hooks():
    """Yields ``release()``, which removes the gradient hooks the memory tracker's module tracker registered so far.

    The tracker learns where each module's backward starts and ends from multi-gradient hooks on the module's
    inputs and outputs; each hook's closure holds the autograd nodes it watches, a cycle through C++ that keeps
    those nodes -- and the tensors they saved -- alive after the backward. Under transformers' activation
    checkpointing that is every block's input, still held through the next micro-batch (measured: one bf16
    block input per layer; the 4B student's 49K row peaked 5.9 GiB too high, memory a run without the tracker frees).
    Removing the hooks once a micro-batch's backward is done frees them, as a real run does."""
    import gc

    try:
        from torch.distributed._tools import mod_tracker
    except ImportError:  # pragma: no cover - a torch without the tracker cannot rehearse anyway
        yield lambda: None
        return
    orig = getattr(mod_tracker, "register_multi_grad_hook", None)
    handles = []

    def recorded(*args, **kwargs):
        handle = orig(*args, **kwargs)
        handles.append(handle)
        return handle

    def release():
        for h in handles:
            h.remove()
        handles.clear()
        gc.collect()  # the cycles are Python closures around the nodes

    if orig is None:  # another torch: nothing to release (a later micro-batch may then hold the earlier's inputs)
        yield lambda: None
        return
    mod_tracker.register_multi_grad_hook = recorded
    try:
        yield release
    finally:
        mod_tracker.register_multi_grad_hook = orig


@contextlib.contextmanager
def _unpacked_rows():
    """transformers' packed-sequence detection returns a mask for fake position ids (it cannot read them)
    and the attention then builds an S x S mask; real rows are contiguous 0..S-1, for which it returns None."""
    from transformers import masking_utils

    orig = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


def _hf_config(config: dict):
    from transformers import AutoConfig

    d = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    return AutoConfig.for_model(**d)


def _build_meta(config, dtype: torch.dtype):
    """The family's causal LM of `config` on the meta device, its floating tensors in `dtype` (no memory, no init).
    `dtype` is passed on: ``from_config`` would otherwise build in the config's own ``torch_dtype`` (a hub
    config.json says bfloat16), and the fp32 student of the stages would be rehearsed in bf16."""
    from transformers import AutoModelForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(old)


def _autocast(module: torch.nn.Module) -> None:
    """What accelerate's ``mixed_precision=bf16`` does to a prepared (non-FSDP) module: its forward runs under autocast."""
    module.forward = torch.autocast("cpu", dtype=torch.bfloat16)(module.forward)


def _accelerator():
    """The little of accelerate's `Accelerator` the step reads, for a process that trains on its own
    (under FSDP only ``device`` is read; DDP's no_sync and bucketed backward are not rehearsed)."""
    return types.SimpleNamespace(
        device=torch.device("cpu"), no_sync=lambda model: contextlib.nullcontext(),
        backward=lambda loss: loss.backward(), unwrap_model=lambda m: m,
        clip_grad_norm_=lambda params, max_norm: torch.nn.utils.clip_grad_norm_(list(params), max_norm))


def _init_optimizer_state(optimizer) -> None:
    """AdamW's moments exist from the trainer's first step on: allocate them with one step on zero gradients."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _measure(model, optimizer, frozen: torch.nn.Module | None, fsdp: bool, run_step) -> dict[str, int]:
    """Peak bytes of `run_step` by category on the cpu device ("total" included)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = FSDPMemTracker(model, optimizer) if fsdp else MemTracker()
    if not fsdp:
        mt.track_external(model, optimizer)
    if frozen is not None:
        # The teacher's weights, by their local shards when sharded. FSDPMemTracker counts only its FSDP tree's
        # modules and has no "other" category: the teacher is the step's input (`step_fn(batch, model,
        # teacher, step)`), and counted as such; MemTracker counts it as "other". Both read "teacher" below.
        from torch.distributed.tensor import DTensor

        tensors = tuple(t.to_local() if isinstance(t, DTensor) else t for t in list(frozen.parameters()) + list(frozen.buffers()))
        mt.track_inputs(tensors) if fsdp else mt.track_external(*tensors)
    # the teacher's weights stay frozen, as in training: flagging them trainable for the trace would make the
    # tracker hook the gradient of a conv weight that transformers >= 5.25 passes as a module input, and fail
    with mt, frozen_params_take_no_grad_hooks():
        run_step(mt)
    snap = mt.get_tracker_snapshot("peak")
    dev = next(d for d in snap if str(d) == "cpu")
    names = {"inputs": "teacher", "other": "teacher"}  # the micro-batches are made before tracking: only the teacher is either
    out = {}
    for k, v in snap[dev].items():
        k = str(getattr(k, "value", k)).lower().replace(" ", "_")
        out[names.get(k, k)] = out.get(names.get(k, k), 0) + int(v)
    return out


def _run(model, optimizer_args, *, teacher, step_fn, step: int, batch_shape: tuple[int, int], vocab: int,
         micro_batches: int, fsdp: bool, mixed: bool, grad_clip, replicated=()) -> dict[str, int]:
    """Materialise `model` and `teacher` as fake tensors, build the trainer's optimizer and run its step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from elastic.train import make_optimizer, optimizer_step

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with (mode, fake_values_read_as_zero(), _unpacked_rows(), _sharding_propagation_untracked(),
          _tracker_grad_hooks() as release_tracker_hooks):
        model.to_empty(device="cpu")
        teacher.to_empty(device="cpu")
        if not fsdp and mixed:
            _autocast(model)
        optimizer, _sched, _n = make_optimizer(model, *optimizer_args)
        _init_optimizer_state(optimizer)
        micro = [torch.randint(0, vocab, batch_shape) for _ in range(micro_batches)]
        acc = _accelerator()

        def run_step(mt):
            calls = []

            def each_micro_batch(*args):
                # FSDPMemTracker refuses a second forward of the root in one trace unless its per-module
                # stats (not the peak) are cleared first: gradient accumulation runs one forward per micro-batch
                if calls:
                    release_tracker_hooks()  # the previous micro-batch's backward is over: they have fired
                    if hasattr(mt, "reset_mod_stats"):
                        mt.reset_mod_stats()
                calls.append(1)
                return step_fn(*args)

            optimizer_step(model, optimizer, micro, each_micro_batch, teacher=teacher, step=step, accelerator=acc,
                           fsdp=fsdp, replicated=list(replicated), grad_clip=grad_clip)

        return _measure(model, optimizer, teacher, fsdp, run_step)


def _place_teacher(teacher, teacher_mode: str, fsdp: bool, world_size: int):
    from elastic.parallel import shard_frozen

    teacher.requires_grad_(False).eval()
    if fsdp and teacher_mode == "shard" and world_size > 1:
        shard_frozen(teacher, torch.device("cpu"))
    return teacher


def _micro_batches(grad_accum: int, micro_batches: int | None) -> int:
    return int(micro_batches) if micro_batches else min(max(1, int(grad_accum)), 2)


# ------------------------------------------------------------------------------------------------ the rows


def rehearse_distill(student_config: dict, teacher_config: dict, *, row: str = "distill", world_size: int, strategy: str,
                     teacher_mode: str, seq_len: int, micro_batch: int, grad_accum: int, checkpointing: bool,
                     loss_chunk: int, temperature: float = 1.0, lm_weight: float = 0.0, mixed_precision: str = "bf16",
                     grad_clip: float | None = 1.0, micro_batches: int | None = None) -> Rehearsal:
    """One distill step (`stages.distill.make_step_fn` on `losses.KDStudent`): an fp32 student trained
    against a frozen bf16 teacher, as `stages.distill.run` sets them up."""
    from elastic.losses import KDStudent
    from elastic.stages.distill import make_step_fn
    from elastic.train import TrainConfig, prepare_model

    t0 = time.perf_counter()
    fsdp = strategy == "fsdp" and world_size > 1
    n_micro = _micro_batches(grad_accum, micro_batches)
    with fake_world(world_size if fsdp else 1):
        student = _build_meta(_hf_config(student_config), torch.float32)
        model = KDStudent(student, temperature=temperature, lm_weight=lm_weight, chunk_size=loss_chunk)
        teacher = _place_teacher(_build_meta(_hf_config(teacher_config), torch.bfloat16), teacher_mode, fsdp, world_size)
        prepare_model(model, gradient_checkpointing=checkpointing, fsdp=fsdp, device=torch.device("cpu"),
                      mixed_precision=mixed_precision)
        peak = _run(model, (TrainConfig(max_steps=1, grad_clip=grad_clip),), teacher=teacher,
                    step_fn=make_step_fn(lm_weight), step=0, batch_shape=(micro_batch, seq_len),
                    vocab=int(student_config["vocab_size"]), micro_batches=n_micro, fsdp=fsdp,
                    mixed=mixed_precision in ("bf16", "bfloat16"), grad_clip=grad_clip)
    return _result(row, peak, world_size, strategy, n_micro, grad_accum, t0)


def rehearse_search(parent_config: dict, search_cfg, *, row: str = "search", world_size: int, strategy: str,
                    teacher_mode: str, micro_batch: int, grad_accum: int, checkpointing: bool, seed: int = 0,
                    mixed_precision: str = "bf16", micro_batches: int | None = None) -> Rehearsal:
    """One search step (`stages.search.make_search_model` + its `make_step_fn`): the whole parent in fp32,
    importance-ordered and masked by the router's draw, against the frozen bf16 parent as teacher. A plan
    has no importance ranking: the identity order (the order changes no size)."""
    from omegaconf import OmegaConf
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from elastic.models import family_for
    from elastic.models.family import Ranking
    from elastic.stages.search import make_search_model, make_step_fn, param_groups_fn
    from elastic.train import TrainConfig, prepare_model

    t0 = time.perf_counter()
    fsdp = strategy == "fsdp" and world_size > 1
    n_micro = _micro_batches(grad_accum, micro_batches)
    c = copy.deepcopy(search_cfg) if OmegaConf.is_config(search_cfg) else OmegaConf.create(search_cfg)
    # the logged router choices read tensor values (fake here) every log_choices_every steps: rehearse a step
    # that does not log them; step 1 is a router step of the first (uniform) phase, as in the trainer
    c.log_choices_every = 1_000_000
    step = 1
    config = _hf_config(parent_config)
    with fake_world(world_size if fsdp else 1):
        parent = _build_meta(config, torch.float32)
        sizes = family_for(parent).Sizes.from_config(parent.config)
        sm = make_search_model(parent, Ranking.identity(sizes), c, seed)
        del parent
        plan = sm.plan

        def real_draws(*args, **kwargs):  # the draws run on real generators, as in training
            with unset_fake_temporarily():
                return plan(*args, **kwargs)

        sm.plan = real_draws
        sm.set_process(0, world_size if fsdp else 1)
        teacher = _place_teacher(_build_meta(config, torch.bfloat16), teacher_mode, fsdp, world_size)
        replicated = list(sm.router.parameters())
        prepare_model(sm, gradient_checkpointing=checkpointing, fsdp=fsdp, device=torch.device("cpu"),
                      mixed_precision=mixed_precision, replicated=replicated)
        tc = TrainConfig(max_steps=int(c.steps), grad_clip=float(c.grad_clip) or None)
        peak = _run(sm, (tc, param_groups_fn(c)), teacher=teacher, step_fn=make_step_fn(_accelerator(), c), step=step,
                    batch_shape=(micro_batch, int(c.seq_len)), vocab=int(parent_config["vocab_size"]),
                    micro_batches=n_micro, fsdp=fsdp, mixed=mixed_precision in ("bf16", "bfloat16"),
                    grad_clip=tc.grad_clip, replicated=replicated)
    return _result(row, peak, world_size, strategy, n_micro, grad_accum, t0)


def _result(row, peak, world_size, strategy, n_micro, grad_accum, t0) -> Rehearsal:
    notes = []
    if strategy == "ddp" and world_size > 1:
        notes.append("ddp rehearsed as one replica: DDP's gradient buckets are not traced")
    return Rehearsal(row=row, peak_bytes=peak.pop("total"), by_category=peak, world_size=world_size, strategy=strategy,
                     micro_batches=n_micro, grad_accum=grad_accum, seconds=time.perf_counter() - t0, notes=notes)


def _host_read_site(err: BaseException) -> str:
    """``file:line: code`` of the project's innermost frame in `err`'s traceback (where a value was read)."""
    import traceback
    from pathlib import Path

    root = Path(__file__).resolve().parent
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve().is_relative_to(root)]
    if not frames:
        return "outside the project"
    f = frames[-1]
    return f"{Path(f.filename).resolve().relative_to(root.parent)}:{f.lineno}: {f.line}"


def rehearse_rows(cfg, rows: list[StagePlan], *, log=print) -> dict[str, Rehearsal]:
    """Rehearse every training row of a plan (search, each distill phase; importance has no training step).

    A step that reads a tensor's value on the host to decide a shape cannot run on fake tensors (they have no
    values) and is a sync on a GPU: it is refused in one line naming the code that read it (the masked models
    and the stages' steps read none: `tests/test_moe_core.py` counts them)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from elastic.plan import _get, parent_config
    from elastic.schedule import parse_phases

    pcfg = parent_config(cfg)
    out: dict[str, Rehearsal] = {}
    phases = {f"distill {ph.name}": ph for ph in parse_phases(cfg.distill)}
    mixed = str(_get(cfg, "distill.mixed_precision", "bf16"))
    mixed = "bf16" if mixed == "auto" else mixed  # auto is bf16 on a GPU, what is rehearsed
    student_config = None
    for r in rows:
        if r.stage not in ("search", "distill"):
            continue
        if r.mamba_path != "torch":
            raise RehearsalError(f"plan.rehearse runs transformers' pure-torch Mamba path (the fused kernels need CUDA), "
                                 f"but the plan is for the {r.mamba_path} path: set plan.mamba_path=torch")
        log(f"rehearsing {r.row}: {r.world_size} ranks, {r.strategy}/{r.teacher_mode}, {r.micro_batch} x {r.seq_len}, "
            f"accumulation {r.grad_accum} ...")
        try:
            res, student_config = _rehearse_row(cfg, r, pcfg, phases, mixed, student_config)
        except DataDependentOutputException as err:
            raise RehearsalError(f"plan.rehearse: the {r.row} step reads a tensor's value on the host to size a tensor "
                                 f"({_host_read_site(err)}), which fake tensors cannot run -- rerun with "
                                 f"plan.rehearse=false and report it") from err
        log(f"rehearsed {r.row}: peak {res.peak_gib:.1f} GiB per GPU (plan {r.peak_bytes / GiB:.1f}) in {res.seconds:.0f} s")
        out[r.row] = res
    return out


def _rehearse_row(cfg, r: StagePlan, pcfg: dict, phases: dict, mixed: str, student_config: dict | None):
    """(the rehearsal of one training row, the distill student's config as built for it)."""
    from elastic.plan import _get, distill_student, plan_model

    if r.stage == "search":
        res = rehearse_search(pcfg, cfg.search, row=r.row, world_size=r.world_size, strategy=r.strategy,
                              teacher_mode=r.teacher_mode, micro_batch=r.micro_batch, grad_accum=r.grad_accum,
                              checkpointing=r.checkpointing, seed=int(_get(cfg, "seed", 0)))
    else:
        if student_config is None:
            arch, _src, student_config = distill_student(cfg, plan_model(pcfg).sizes(pcfg))
            if student_config is None:
                student_config = arch.to_config(_hf_config(pcfg)).to_dict()
        dc = cfg.distill
        grad_clip = dc.get("grad_clip")
        res = rehearse_distill(student_config, pcfg, row=r.row, world_size=r.world_size, strategy=r.strategy,
                               teacher_mode=r.teacher_mode, seq_len=r.seq_len, micro_batch=r.micro_batch,
                               grad_accum=r.grad_accum, checkpointing=r.checkpointing,
                               loss_chunk=int(dc.get("loss_chunk_size", 1024)), temperature=float(dc.get("temperature", 1.0)),
                               lm_weight=float(dc.get("lm_weight", 0.0)), mixed_precision=mixed,
                               grad_clip=float(grad_clip) if grad_clip else None)
        assert r.row in phases
    return res, student_config
