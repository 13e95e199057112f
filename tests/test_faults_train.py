"""Crash-resume of the training stages: a run of search or distill that dies at any point, then the same
command again, completes, redoes nothing that was finished, and gives what an uninterrupted run gives --
the same losses at every step, the same held-out losses, the same weights (bitwise, on one machine).

Crash points, injected by `fail_at_step` (after that step's checkpoint, if any) or by monkeypatching the
function that runs there: mid-training after a checkpoint, right after the final step's checkpoint, while
the final model folder is written, after it is written but before it is scored, between the outputs and
DONE. One test is a real ``kill -9`` of ``python -m elastic.run stage=distill`` once a checkpoint appears.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import elastic.parent
import elastic.train
from elastic.rundir import RunDir, read_json
from elastic.run import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distill import make_cfg as distill_cfg  # noqa: E402
from test_distill import world  # noqa: E402,F401  (the tiny teacher / student / text fixture)
from test_pipeline import make_cfg as pipeline_cfg  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """The injected crash: a BaseException, so no `except Exception` on the way can swallow it."""


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def crash_on_call(monkeypatch, owner, name: str, n: int = 1, *, after: bool = False):
    """Make ``owner.name`` raise `Killed` on its n-th call (after running it, with `after`)."""
    real = getattr(owner, name)
    calls = [0]

    def f(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            if after:
                real(*a, **k)
            raise Killed(f"killed in {name} (call {n})")
        return real(*a, **k)

    monkeypatch.setattr(owner, name, f)


# ------------------------------------------------------------------------------------------------ distill


def run_distill(cfg):
    from elastic.stages import distill

    return distill.run(cfg, RunDir(cfg.run_dir))


def fail_in_phase(monkeypatch, phase: str, step: int):
    """`fail_at_step` for one phase only (the config key applies to every phase)."""
    real = elastic.train.train

    def train(model, step_fn, batches, cfg, **kw):
        if cfg.desc == f"distill {phase}":
            cfg = dataclasses.replace(cfg, fail_at_step=step)
        return real(model, step_fn, batches, cfg, **kw)

    monkeypatch.setattr(elastic.train, "train", train)


def trained_phases(monkeypatch) -> list[str]:
    """Record which phases `train` is called for (a finished phase must not be)."""
    real, seen = elastic.train.train, []

    def train(model, step_fn, batches, cfg, **kw):
        seen.append(cfg.desc.split()[-1])
        return real(model, step_fn, batches, cfg, **kw)

    monkeypatch.setattr(elastic.train, "train", train)
    return seen


@pytest.fixture(scope="module")
def distill_reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_ref")
    return out, run_distill(distill_cfg(world, out))


def inject(monkeypatch, point: str):
    from elastic.stages import distill

    if point == "phase1_mid":  # after step 3; the newest checkpoint is step 2's
        fail_in_phase(monkeypatch, "phase1", 3)
    elif point == "phase1_final_checkpoint":  # the last step's checkpoint is written, then the crash
        fail_in_phase(monkeypatch, "phase1", 4)
    elif point == "phase1_writing_model":  # the weights are in the temporary folder, not yet renamed
        crash_on_call(monkeypatch, elastic.parent, "save_checkpoint", after=True)
    elif point == "phase1_sidecar":  # the sidecar of phase1/ is being written (the older order: after the rename)
        crash_on_call(monkeypatch, RunDir, "write_sidecar")
    elif point == "phase1_before_scoring":  # phase1/ written, its held-out score not yet
        crash_on_call(monkeypatch, distill, "evaluate", 2)
    elif point == "phase2_mid":
        fail_in_phase(monkeypatch, "phase2", 1)
    elif point == "phase2_final_checkpoint":
        fail_in_phase(monkeypatch, "phase2", 2)
    elif point == "phase2_writing_model":
        crash_on_call(monkeypatch, elastic.parent, "save_checkpoint", 2, after=True)
    elif point == "before_done":  # every phase written and scored, the stage's DONE marker not yet
        crash_on_call(monkeypatch, RunDir, "mark_done")
    else:
        raise AssertionError(point)


@pytest.mark.parametrize("point", [
    "phase1_mid", "phase1_final_checkpoint", "phase1_writing_model", "phase1_sidecar", "phase1_before_scoring",
    "phase2_mid", "phase2_final_checkpoint", "phase2_writing_model", "before_done",
])
def test_distill_crash_then_rerun_equals_the_uninterrupted_run(world, distill_reference, tmp_path, monkeypatch, point):
    ref_dir, ref = distill_reference
    cfg = distill_cfg(world, tmp_path)
    with monkeypatch.context() as m:
        inject(m, point)
        with pytest.raises((Killed, elastic.train.SimulatedCrash)):
            run_distill(cfg)
    if point == "phase1_before_scoring":  # the trained model is on disk before any scoring of it runs
        assert RunDir(tmp_path).is_complete("distill/phase1")
    p1 = tmp_path / "distill" / "phase1" / "model.safetensors"
    p1_mtime = p1.stat().st_mtime_ns if point.startswith(("phase2", "before")) else None
    with monkeypatch.context() as m:
        trained = trained_phases(m)
        got = run_distill(cfg)  # the same command, no force
    for phase in ("phase1", "phase2"):
        a, b = ref["phases"][phase], got["phases"][phase]
        assert b["final_train_loss"] == a["final_train_loss"], phase
        assert b["heldout_before"] == a["heldout_before"] and b["heldout_after"] == a["heldout_after"], phase
        assert_same_weights(ref_dir / "distill" / phase, tmp_path / "distill" / phase)
        assert json.loads((tmp_path / "distill" / f"{phase}.meta.json").read_text())["evaluated"] is True
    if p1_mtime is not None:  # a crash in phase 2 or later: phase 1 is neither retrained nor rewritten
        assert "phase1" not in trained and p1.stat().st_mtime_ns == p1_mtime
    if point == "before_done":
        assert trained == []
    assert RunDir(tmp_path).is_done("distill")
    assert not (tmp_path / "distill" / "checkpoints").exists()
    assert not [p.name for p in (tmp_path / "distill").iterdir() if p.name.startswith(".")]  # no crash debris


@pytest.mark.faults  # ~55 s: an uninterrupted reference and two subprocess runs that each import torch
def test_distill_killed_by_sigkill_resumes_to_the_uninterrupted_result(world, tmp_path):
    """A real `kill -9` of `python -m elastic.run stage=distill` once phase 1's first checkpoint is on disk."""
    from hydra import compose, initialize_config_dir

    from elastic.run import CONF_DIR

    phases = {0: dict(seq_len=32, batch_size=4, micro_batch_size=2, max_steps=6, warmup_steps=1),
              1: dict(seq_len=256, batch_size=2, micro_batch_size=1, max_steps=2, warmup_steps=0)}
    args = [
        "stage=distill", f"parent.path={world['teacher']}", f"data.files={world['text']}/*.txt", "device=cpu",
        f"distill.student={world['student']}", "distill.eval_sequences=4", "distill.checkpoint_every=2",
        "tracking.backends=[]",
        *[f"distill.phases.{i}.{k}={v}" for i, ph in phases.items() for k, v in ph.items()],
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        ref_cfg = compose("config", overrides=[*args, f"run_dir={tmp_path / 'ref'}"])
    ref = pipeline(ref_cfg)["distill"]  # the uninterrupted run, the same composed config in this process

    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "elastic.run", *args, f"run_dir={run_dir}"]
    marker = run_dir / "distill" / "checkpoints" / "phase1" / "step_00000002" / "trainer_state.json"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), f"no checkpoint appeared: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished first
    assert not RunDir(run_dir).is_done("distill")

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got = read_json(run_dir / "distill" / "DONE.json")["summary"]
    assert got["phases"]["phase1"]["resumed_from"] in (2, 4, 6)  # it continued from a checkpoint
    for phase in ("phase1", "phase2"):
        a, b = ref["phases"][phase], got["phases"][phase]
        assert b["final_train_loss"] == a["final_train_loss"] and b["heldout_after"] == a["heldout_after"], phase
        assert_same_weights(tmp_path / "ref" / "distill" / phase, run_dir / "distill" / phase)


# ------------------------------------------------------------------------------------------------ search

SEARCH = [
    "search.steps=4", "search.batch_size=4", "search.micro_batch_size=2", "search.seq_len=32",
    "search.train_sequences=32", "search.checkpoint_every=2", "search.eval_sequences=2", "search.log_choices_every=2",
    "tracking.backends=[]",
]


@pytest.fixture(scope="module")
def search_reference(toy_parent, tmp_path_factory):
    """The importance ranking (copied into every crash run) and an uninterrupted search."""
    base = tmp_path_factory.mktemp("search_ref")
    pipeline(pipeline_cfg(toy_parent, base, "stage=importance", *SEARCH))
    pipeline(pipeline_cfg(toy_parent, base, "stage=search", *SEARCH))
    return base


def inject_search(monkeypatch, point: str) -> list[str]:
    from elastic.stages import search

    extra: list[str] = []
    if point == "mid":
        extra = ["+search.fail_at_step=3"]  # newest checkpoint: step 2
    elif point == "final_checkpoint":
        extra = ["+search.fail_at_step=4"]
    elif point == "writing_model":
        crash_on_call(monkeypatch, elastic.parent, "save_checkpoint", after=True)
    elif point == "before_archs":  # search/elastic written and scored, archs.json not yet
        crash_on_call(monkeypatch, search, "plot_choices")
    elif point == "before_done":
        crash_on_call(monkeypatch, RunDir, "mark_done")
    else:
        raise AssertionError(point)
    return extra


@pytest.mark.faults
@pytest.mark.parametrize("point", ["mid", "final_checkpoint", "writing_model", "before_archs", "before_done"])
def test_search_crash_then_rerun_equals_the_uninterrupted_run(toy_parent, search_reference, tmp_path, monkeypatch, point):
    import shutil

    ref = search_reference
    shutil.copytree(ref / "importance", tmp_path / "importance")
    shutil.copy(ref / "importance" / "DONE.json", tmp_path / "importance" / "DONE.json")
    with monkeypatch.context() as m:
        extra = inject_search(m, point)
        with pytest.raises((Killed, elastic.train.SimulatedCrash)):
            pipeline(pipeline_cfg(toy_parent, tmp_path, "stage=search", *SEARCH, *extra))
    with monkeypatch.context() as m:
        trained = []
        real = elastic.train.train
        m.setattr(elastic.train, "train", lambda *a, **k: trained.append(1) or real(*a, **k))
        pipeline(pipeline_cfg(toy_parent, tmp_path, "stage=search", *SEARCH))  # the same command, no force
    if point == "before_done":
        assert trained == []  # every output was there: nothing retrained
    a, b = read_json(ref / "search" / "archs.json"), read_json(tmp_path / "search" / "archs.json")
    assert b["steps"] == a["steps"] == 4
    assert b["parent_heldout_loss"] == a["parent_heldout_loss"]
    for budget, rec in a["budgets"].items():
        assert b["budgets"][budget]["arch"] == rec["arch"], budget
        assert b["budgets"][budget]["heldout_loss"] == rec["heldout_loss"], budget
    losses = [[h["loss"] for h in read_json(d / "search" / "history.json")] for d in (ref, tmp_path)]
    assert losses[1] == losses[0]
    assert_same_weights(ref / "search" / "elastic", tmp_path / "search" / "elastic")
    for f in ("elastic.router.safetensors", "elastic.ranking.safetensors"):
        ra, rb = load_file(str(ref / "search" / f)), load_file(str(tmp_path / "search" / f))
        assert all(torch.equal(ra[k], rb[k]) for k in ra), f
    assert RunDir(tmp_path).is_done("search") and not (tmp_path / "search" / "checkpoints").exists()
