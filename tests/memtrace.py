"""Fake-tensor memory traces of one real training step (no memory, no GPU): what `elastic.plan` is checked against.

Inside ``FakeTensorMode`` tensors have shapes and dtypes but no storage, and
``torch.distributed._tools.mem_tracker.MemTracker`` records what every live tensor would occupy,
so a 9B-wide step costs seconds on a CPU. Device "cpu" with CPU bf16 autocast stands in for a GPU
with bf16 autocast (fake ``cuda`` tensors cannot run a backward on a CPU-only build). Each trace calls
the project's own step code (``stages.distill.make_step_fn`` + ``losses.KDStudent``,
``stages.search.make_search_model`` + ``stages.search.make_step_fn``), so it follows that code when
it changes. The step is run twice; the second one (optimizer state allocated, gradients freed by
``zero_grad(set_to_none=True)`` as in ``train.train``) is traced.
"""

from __future__ import annotations

import types

import torch


def _build(config, dtype: torch.dtype):
    """A NemotronH built directly in `dtype` (casting a fake model afterwards fails to swap its tensors)."""
    from transformers import NemotronHForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return NemotronHForCausalLM(config)
    finally:
        torch.set_default_dtype(old)


def _autocast(module: torch.nn.Module) -> None:
    """What accelerate's ``mixed_precision=bf16`` does to the prepared module: its forward runs under autocast."""
    module.forward = torch.autocast("cpu", dtype=torch.bfloat16)(module.forward)


def _init_optimizer(tracked) -> None:
    """AdamW's moments exist from the first step on: allocate them with one step on zero gradients (no
    forward/backward needed) and free the gradients again, as ``zero_grad(set_to_none=True)`` does."""
    for opt in (o for o in tracked if isinstance(o, torch.optim.Optimizer)):
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


LAST = {}  # the last trace's MemTracker (tests print its module-wise peaks on failure)


def _peak(run_step, *tracked) -> dict[str, int]:
    from torch.distributed._tools.mem_tracker import MemTracker

    _init_optimizer(tracked)
    from elastic.rehearse import frozen_params_take_no_grad_hooks

    mt = MemTracker()
    mt.track_external(*tracked)
    # MemTracker hooks the gradient of every parameter a module uses, and a frozen one (the teacher's) refuses a
    # hook: the hook becomes a no-op there instead. Flagging the teacher trainable for the trace fails on
    # transformers >= 5.25, whose NemotronH passes the conv weight as a module input (the tracker then hooks it)
    with mt, frozen_params_take_no_grad_hooks():
        run_step()
    LAST["tracker"] = mt
    snap = mt.get_tracker_snapshot("peak")
    dev = next(d for d in snap if str(d) == "cpu")
    return {str(k).split(".")[-1]: int(v) for k, v in snap[dev].items()}


def trace_distill(student_config, teacher_config, *, seq_len: int, micro_batch: int, chunk_size: int,
                  checkpointing: bool) -> dict[str, int]:
    """Peak bytes by category (``Total``, ``PARAM``, ``GRAD``, ``ACT``, ``TEMP``, ``OPT``, ...) of one distill step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from elastic.losses import KDStudent
    from elastic.stages.distill import make_step_fn
    from elastic.train import _enable_gradient_checkpointing, default_param_groups

    with FakeTensorMode():
        student = _build(student_config, torch.float32).train()
        teacher = _build(teacher_config, torch.bfloat16).eval().requires_grad_(False)
        model = KDStudent(student, chunk_size=chunk_size)
        if checkpointing:
            _enable_gradient_checkpointing(model)
        _autocast(model)
        opt = torch.optim.AdamW(default_param_groups(model), lr=1e-4)
        step_fn = make_step_fn(0.0)
        batch = torch.randint(0, student_config.vocab_size, (micro_batch, seq_len))

        def run_step():
            loss, _ = step_fn(batch, model, teacher, 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return _peak(run_step, model, opt, teacher)


def _to_fake(module: torch.nn.Module, mode) -> None:
    """Swap every parameter and buffer of a real module for a fake one of the same shape and dtype."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = mode.from_tensor(b)


def trace_search(parent_config, search_cfg, *, micro_batch: int, checkpointing: bool, seed: int = 0) -> dict[str, int]:
    """Peak bytes by category of one search step: the elastic student (the whole parent, fp32, masked by the
    router's sample) and the frozen bf16 parent as teacher, through ``stages.search.make_search_model`` and
    ``stages.search.make_step_fn``.

    The elastic model is built for real (its rankings, masks and router are small tensors whose values the
    construction reads) and then made fake; so `parent_config` must be small enough to build (a few layers,
    a reduced vocabulary). The router's draws run on real generators outside the fake mode, as in training.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from elastic.models.nemotron_h import Ranking, arch_of
    from elastic.stages.search import make_search_model, make_step_fn, param_groups_fn
    from elastic.train import _enable_gradient_checkpointing

    from elastic.rehearse import fake_values_read_as_zero

    c = search_cfg
    with torch.device("meta"):  # real but uninitialised weights: only shapes matter, and init would cost minutes
        parent = _build(parent_config, torch.float32)
    parent = parent.to_empty(device="cpu")
    sm = make_search_model(parent, Ranking.identity(arch_of(parent)), c, seed)
    del parent
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _to_fake(sm, mode)
    plan = sm.plan

    def real_draws(*args, **kwargs):
        with unset_fake_temporarily():
            return plan(*args, **kwargs)

    sm.plan = real_draws
    with mode, fake_values_read_as_zero():
        teacher = _build(parent_config, torch.bfloat16).eval().requires_grad_(False)
        sm.train()
        if checkpointing:
            _enable_gradient_checkpointing(sm)
        _autocast(sm)
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                 for g in param_groups_fn(c)(sm)], lr=1e-4)
        accel = types.SimpleNamespace(unwrap_model=lambda m: m)
        step_fn = make_step_fn(accel, c)
        batch = torch.randint(0, parent_config.vocab_size, (micro_batch, int(c.seq_len)))
        step = 1  # a router step (not settling), not one that logs the router's choices (log_choices_every > 1)

        def run_step():
            loss, _ = step_fn(batch, sm, teacher, step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return _peak(run_step, sm, opt, teacher)
