"""GPU-only defects of issue #20 made visible on a CPU: placement (defect 1 and the guard B), host syncs in the
training loop (defect 7) and the importance stage's pre-flight (defect 8).

Gloo on a CPU hides device placement (every tensor is on `cpu`), so the placement tests use two devices on
purpose: `cpu` for the model and `meta` for the batch. The FSDP test runs the real distill stage under a
one-process gloo group, where `fully_shard` really shards (DTensors), in-process and in seconds.
"""

import contextlib
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distill import VOCAB, make_cfg, run_stage, student_model, teacher_model, world  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def one_process_group(path: Path):
    """A real one-process gloo group: FSDP2 shards for real, without launching processes. (The stage's
    `end_training` may tear it down itself.)"""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ defect 1, guard B


def test_distill_under_fsdp_scores_the_sharded_student_where_it_trains(world, tmp_path, monkeypatch):
    """Defect 1: under FSDP, distill scored the whole host copy of the student (loaded on the CPU for sharding)
    with batches on `accelerator.device` -- on a GPU run, a device error before step 1. Every evaluation must
    see the sharded student (on every process, collectively), and give the scores an unsharded run gives."""
    import elastic.parallel
    from elastic.parallel import is_sharded
    from elastic.stages import distill

    single = run_stage(make_cfg(world, tmp_path / "single"))

    seen = []
    real = distill.evaluate

    def spy(acc, model, teacher, rows, batch_size):
        seen.append(is_sharded(model))
        return real(acc, model, teacher, rows, batch_size)

    monkeypatch.setattr(distill, "evaluate", spy)
    monkeypatch.setattr(elastic.parallel, "resolve_strategy", lambda cfg, stage, acc: "fsdp")
    with one_process_group(tmp_path / "pg"):
        sharded = run_stage(make_cfg(world, tmp_path / "fsdp"))
    assert seen == [True] * 4, seen  # before and after each of the two phases, always on the sharded student
    for phase in ("phase1", "phase2"):
        for when in ("heldout_before", "heldout_after"):
            a, b = single["phases"][phase][when], sharded["phases"][phase][when]
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (phase, when, a, b)


def _cpu_student_and_meta_accelerator():
    from elastic.losses import KDStudent

    acc = types.SimpleNamespace(device=torch.device("meta"), num_processes=1)
    return acc, KDStudent(student_model(), chunk_size=40), teacher_model().requires_grad_(False)


def test_evaluation_names_the_module_and_both_devices(monkeypatch):
    """Guard B in distill's evaluation: a student on `cpu` scored with batches on another device (`meta` stands
    in for `cuda`) is one `PlacementError` naming the module and both devices, not torch's error from a kernel."""
    from elastic.stages.distill import evaluate
    from elastic.train import PlacementError

    acc, student, teacher = _cpu_student_and_meta_accelerator()
    rows = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(PlacementError) as e:
        evaluate(acc, student, teacher, rows, 2)
    msg = str(e.value)
    assert "\n" not in msg and "distill evaluate" in msg
    assert "KDStudent" in msg and "student" in msg and "on cpu" in msg and "on meta" in msg, msg


def test_training_step_names_the_module_and_both_devices():
    """Guard B in the training loop: the model, then the teacher, each checked against the batch's device."""
    from elastic.stages.distill import make_step_fn
    from elastic.train import PlacementError, TrainConfig, make_optimizer, optimizer_step

    acc, student, teacher = _cpu_student_and_meta_accelerator()
    opt, _sched, _n = make_optimizer(student, TrainConfig(max_steps=1))
    micro = [torch.randint(0, VOCAB, (2, 16))]
    with pytest.raises(PlacementError, match=r"\[distill phase1\] the model \(KDStudent, parameter [\w.]+\) is on cpu "
                                             r"but its batch is on meta"):
        optimizer_step(student, opt, micro, make_step_fn(0.0), teacher=teacher, step=0, accelerator=acc, fsdp=False,
                       where="distill phase1")
    acc.device = torch.device("cpu")
    with pytest.raises(PlacementError, match=r"the teacher \(NemotronHForCausalLM, .*\) is on meta but its batch is on cpu"):
        optimizer_step(student, opt, micro, make_step_fn(0.0), teacher=teacher.to("meta"), step=0, accelerator=acc,
                       fsdp=False)
