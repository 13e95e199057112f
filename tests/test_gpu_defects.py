"""GPU-only defects of issue #20 made visible on a CPU: placement (defect 1 and the guard B), host syncs in the
training loop (defect 7) and the importance stage's pre-flight (defect 8).

Gloo on a CPU hides device placement (every tensor is on `cpu`), so the placement tests use two devices on
purpose: `cpu` for the model and `meta` for the batch. The FSDP test runs the real distill stage under a
one-process gloo group, where `fully_shard` really shards (DTensors), in-process and in seconds.
"""

import contextlib
import json
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script (the 2-process worker): this checkout's package
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


# ------------------------------------------------------------------------------------------------ defect 7


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `float(t)`, `int(t)`, `bool(t)`: all
    `aten._local_scalar_dense`), per training step. On a GPU each one waits for every queued kernel. Not
    counted: AdamW's step counters (host tensors by design in torch), transformers' own packed-sequence check,
    the data stream (host rows, before they go to the device) and the search's budget draws (a CPU generator):
    none of them waits for device work."""

    def __init__(self):
        super().__init__()
        self.per_step: list[list[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.per_step:
            frames = traceback.extract_stack()
            if not any("/torch/optim/" in f.filename or "/transformers/" in f.filename or f.filename.endswith("elastic/data.py")
                       or (f.filename.endswith("stages/search.py") and f.name == "plan") for f in frames):
                mine = [f for f in frames if "/elastic/" in f.filename]
                self.per_step[-1].append(f"{Path(mine[-1].filename).name}:{mine[-1].lineno}" if mine else "?")
        return func(*args, **(kwargs or {}))


def _count_host_reads(monkeypatch, model, step_fn, teacher, *, steps=4, micro=2, log_every=4):
    from elastic import train as T
    from elastic.data import Mixture, PackedRows

    reads = HostReads()
    real_next = T.StepBatches.next_step

    def next_step(self):  # a new step begins: its reads (and those of the read-back after it) go to a new list
        reads.per_step.append([])
        return real_next(self)

    monkeypatch.setattr(T.StepBatches, "next_step", next_step)
    rows = torch.randint(0, VOCAB, (64, 24), generator=torch.Generator().manual_seed(0))
    batches = T.StepBatches(Mixture([PackedRows(rows, seed=0)], [1.0], seed=0), batch_size=2 * micro, micro_batch_size=2)
    cfg = T.TrainConfig(max_steps=steps, log_every=log_every, grad_clip=1.0)
    with reads:
        result = T.train(model, step_fn, batches, cfg, accelerator=T.make_accelerator(device="cpu"), teacher=teacher)
    return reads.per_step, result


def test_distill_steps_read_nothing_back_between_log_steps(monkeypatch):
    """Defect 7: ``float(loss)`` and ``float(metric)`` per micro-batch made the CPU wait for the GPU on every
    micro-batch. Losses and metrics are summed on the device and read back once per log window."""
    from elastic.losses import KDStudent
    from elastic.stages.distill import make_step_fn

    per_step, result = _count_host_reads(monkeypatch, KDStudent(student_model(), chunk_size=40), make_step_fn(0.0),
                                         teacher_model().requires_grad_(False))
    assert per_step[:3] == [[], [], []], per_step  # steps 1-3: no read at all (the old loop: 4 per step)
    assert len(result.history) == 4 and all(h["loss"] > 0 and "kl" in h and "grad_norm" in h for h in result.history)


def test_search_steps_read_nothing_back_between_log_steps(monkeypatch):
    """The search's step: its KL, budget loss and cost ratio stay tensors; the router's decode for the choice
    log runs once per logged step, not on every micro-batch."""
    from omegaconf import OmegaConf

    from elastic.arch import sizes_from_config
    from elastic.models.nemotron_h import Ranking
    from elastic.run import CONF_DIR
    from elastic.stages.search import make_search_model, make_step_fn
    from elastic.train import make_accelerator
    from tiny import tiny_model

    model = tiny_model("M-*M-M-", vocab_size=VOCAB)
    c = OmegaConf.load(CONF_DIR / "search/default.yaml")
    c.steps, c.log_choices_every, c.settle_share = 8, 8, 0.0
    c.granularity.hidden, c.granularity.ffn = 16, 32
    sm = make_search_model(model, Ranking.random(sizes_from_config(model), torch.Generator().manual_seed(0)), c, seed=0)
    teacher = tiny_model("M-*M-M-", vocab_size=VOCAB, seed=1).requires_grad_(False)
    per_step, result = _count_host_reads(monkeypatch, sm, make_step_fn(make_accelerator(device="cpu"), c), teacher,
                                         steps=8, log_every=8)
    assert per_step[1:7] == [[]] * 6, per_step  # step 1 logs the choices (log_choices_every), step 8 too
    assert len(result.history) == 8 and all("kl" in h for h in result.history)


# ------------------------------------------------------------------------------------------------ defect 8


def test_importance_refuses_what_does_not_fit_before_loading_the_parent(tmp_path, monkeypatch):
    """Defect 8: importance ran no pre-flight; on a GPU that cannot hold the 9B's importance pass it read the
    parent (minutes) and then ran out of memory. Now the plan refuses it first, naming the term and the fix."""
    import elastic.parallel
    from elastic.plan import GiB, PlanError
    from elastic.rundir import RunDir
    from elastic.stages import importance
    from test_plan import _cfg, _parent_dir

    def must_not_run(*args, **kwargs):
        raise AssertionError("the parent was read before the pre-flight check")

    monkeypatch.setattr(importance, "load_model", must_not_run)
    monkeypatch.setattr(importance, "load_tokenizer", must_not_run)
    monkeypatch.setattr(importance, "resolve_parent_path", lambda cfg: Path(cfg.parent.path))  # no weight check
    monkeypatch.setattr(elastic.parallel, "gpu_memory_bytes", lambda device: 24 * GiB)  # a 24 GB card
    parent = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")  # config.json only: no weights to read
    cfg = _cfg("nemotron_9b_to_4b", parent, "device=cuda", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(PlanError, match=r"^importance: .*overflow 24 GiB per GPU"):
        importance.run(cfg, RunDir(cfg.run_dir))
    assert not (tmp_path / "run" / "importance").exists() or not any((tmp_path / "run" / "importance").iterdir())


# ------------------------------------------------------------------------------------------------ defect 5


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "distill/logs/metrics.jsonl").read_text().splitlines()]
    return [x[k] for x in lines for k in ("phase1/loss", "phase2/loss") if k in x]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, teacher", [("fsdp", "shard"), ("ddp", "replicate")])
def test_two_process_distill_reads_the_weights_on_process_0_only(world, tmp_path, strategy, teacher):
    """Defect 5: every process read the teacher and the student from disk and held them whole on the host (the
    9B -> 4B: ~54 GB per process, 8 per node). Under 2-process FSDP (sharded teacher) process 1 now reads no
    weights at all -- `from_pretrained` runs on process 0 only, once per model, and the others get their shards
    by broadcast -- while the losses and held-out scores stay those of one unsharded process. DDP with a
    replicated teacher (whole models on every GPU) loads the same way."""
    from launch import launch_two_processes

    one = run_stage(make_cfg(world, tmp_path / "one"))
    proc = launch_two_processes(__file__, str(tmp_path / "two"), str(world["root"]), strategy, teacher, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f", {teacher})" in proc.stdout + proc.stderr and f"2 process(es), {strategy}" in proc.stdout + proc.stderr
    reads = {r: json.loads((tmp_path / "two" / f"reads_{r}.json").read_text()) for r in (0, 1)}
    assert reads[1] == [], reads[1]
    # process 0: the teacher once, then each phase's input student once
    assert [Path(p).name for p in reads[0]] == ["teacher", "student", "phase1"], reads[0]
    two = _losses(tmp_path / "two")
    assert len(two) == 6 and max(abs(a - b) for a, b in zip(_losses(tmp_path / "one"), two)) < 1e-5
    summary = json.loads((tmp_path / "two/distill/DONE.json").read_text())["summary"]
    for phase in ("phase1", "phase2"):
        a, b = one["phases"][phase]["heldout_before"], summary["phases"][phase]["heldout_before"]
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (phase, a, b)


def _worker(out: Path, root: Path, strategy: str, teacher: str) -> None:
    """One process of the 2-process distill run, counting its checkpoint reads. (On gloo the "device" is the host
    too, so what a process holds cannot tell the host copy from the shards: the reads can.)"""
    import os

    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    reads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        reads.append(str(path))
        return real(cls, path, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(counted)
    world = {"root": root, "text": root / "text", "teacher": root / "teacher", "student": root / "student"}
    cfg = make_cfg(world, out)
    cfg.parallel = OmegaConf.create({"strategy": strategy, "teacher": teacher})
    run_stage(cfg)
    (out / f"reads_{os.environ['RANK']}.json").write_text(json.dumps(reads))


if __name__ == "__main__":  # `accelerate launch tests/test_gpu_defects.py OUT WORLD_ROOT STRATEGY TEACHER`
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])


def test_plan_shows_host_ram_per_node_and_refuses_above_the_limit(tmp_path):
    """Defect 5, the plan's side: host RAM per node is a row field (process 0's weights + an allowance per
    process), the 9B search's is what one process reads (fp32 parent + reordered copy), not 8 processes' worth,
    and a node below it is refused with the key to change."""
    from elastic.plan import GiB, HOST_PER_PROCESS, PlanError, check_stage, plan_all
    from test_plan import _cfg, _parent_dir

    parent = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")
    doc = plan_all(_cfg("nemotron_9b_to_4b", parent, "plan.mamba_path=kernel", "plan.gpus=16", "plan.gpus_per_node=8"))
    rows = {r["row"]: r for r in doc["rows"]}
    p9 = doc["teacher"]["params"]
    assert rows["search"]["host_gib_per_node"] == pytest.approx((8 * p9 + 8 * HOST_PER_PROCESS) / GiB, abs=0.1)
    assert rows["distill phase1"]["host_gib_per_node"] < rows["search"]["host_gib_per_node"] < 120  # was ~720
    assert all(r["host_limit_gib"] == 1024 and r["fits"] for r in doc["rows"])
    small = _cfg("nemotron_9b_to_4b", parent, "plan.mamba_path=kernel", "plan.host_memory_gib=64")
    with pytest.raises(PlanError, match=r"^search: host RAM 98 GiB per node exceeds plan.host_memory_gib 64 .*plan.host_memory_gib"):
        check_stage(small, "search", world_size=8, gpu_memory_bytes=80 * GiB)
    check_stage(small, "distill", world_size=8, gpu_memory_bytes=80 * GiB)  # ~18 GB of weights + 8 x 4: fits 64
