"""Crash-resume of the single-process stages (importance, prune, quantize, export, evaluate).

For each stage, a fault is injected at each point where a crash leaves a different state on disk: before the
first artifact, inside one (a temporary written, not yet renamed), between two, between a folder and its sidecar,
between budgets or models of a loop, between the last artifact and ``DONE.json``. Then the same command runs
again through the real entry point (`elastic.run.pipeline`, what ``python -m elastic.run`` calls) without
``force``: it must finish and leave exactly the files of an uninterrupted run -- the same names (no temporary
left), equal tensors, equal JSON but for timestamps and timings, equal bytes otherwise.

The fault is a kill, not an exception a stage could handle: `Crash` is a BaseException (no ``except Exception``
swallows it) and from the moment it fires until the crashed command is over, file deletions do nothing, so
the cleanup of ``except``/``finally`` blocks cannot tidy up what a SIGKILL would leave behind.
"""

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import elastic.rundir
from elastic.run import pipeline
from elastic.rundir import RunDir

from test_pipeline import make_cfg

# every test here is a crash and a rerun (~4 min in all on one core): .ci/run runs them as its second step (-m faults)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.faults]

SMALL = ["importance.num_sequences=8", "importance.batch_size=8", "prune.score_sequences=4", "prune.num_candidates=2",
         "tracking.backends=[]"]
# keys whose values differ between two runs of the same command
VOLATILE = {"created", "finished", "seconds", "timing", "git_sha"}  # provenance: the checkout may gain a commit between runs


class Crash(BaseException):
    """The injected fault."""


class Kill:
    """Raise `Crash` at the `nth` call of ``owner.attr`` for which ``when(*args, **kwargs)`` holds (before it runs,
    or right after it returned with ``after=True``); from then on deletions are no-ops, as after a SIGKILL."""

    def __init__(self, owner, attr: str, when=None, nth: int = 1, after: bool = False):
        self.owner, self.attr, self.when, self.nth, self.after = owner, attr, when or (lambda *a, **k: True), nth, after
        self.fired, self.calls = False, 0

    def fire(self):
        self.fired = True
        raise Crash(f"killed at {self.attr}")

    @contextlib.contextmanager
    def armed(self):
        original = getattr(self.owner, self.attr)

        def wrapper(*args, **kwargs):
            hit = not self.fired and self.when(*args, **kwargs)
            if hit:
                self.calls += 1
                hit = self.calls == self.nth
            if hit and not self.after:
                self.fire()
            out = original(*args, **kwargs)
            if hit:
                self.fire()
            return out

        def unless_killed(fn):
            return lambda *a, **k: None if self.fired else fn(*a, **k)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(self.owner, self.attr, wrapper)
            for mod, name in ((os, "unlink"), (os, "remove"), (os, "rmdir"), (shutil, "rmtree")):
                mp.setattr(mod, name, unless_killed(getattr(mod, name)))
            mp.setattr(Path, "unlink", unless_killed(Path.unlink))
            yield self


def named(name: str):
    """A predicate on the path argument (first, or the second of os.replace) of a file write: its name is `name`."""
    def when(*args, **kwargs):
        paths = [a for a in args if isinstance(a, (str, os.PathLike))]
        return any(Path(p).name == name for p in paths)
    return when


def crash_then_resume(cfg, kill: Kill):
    """Run the command with `kill` armed: it must crash; then the same command again, which must finish."""
    with kill.armed(), pytest.raises(Crash):
        pipeline(cfg.copy())
    assert kill.fired
    return pipeline(cfg.copy())


# ------------------------------------------------------------------------------------------------ comparing runs
def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def snapshot(root: Path) -> dict:
    """Every file under `root` (hidden ones included) -> its comparable content; paths inside the run dir written
    relative to it, so that two run directories compare."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            out[str(p.relative_to(root)) + "/"] = None
            continue
        rel = str(p.relative_to(root))
        if p.suffix == ".safetensors":
            out[rel] = load_file(p)
        elif p.suffix in (".json", ".jsonl"):
            text = p.read_text().replace(str(root), "<RUN>")
            out[rel] = _strip(json.loads(text) if p.suffix == ".json" else [json.loads(l) for l in text.splitlines()])
        else:
            data = p.read_bytes().replace(str(root).encode(), b"<RUN>")
            out[rel] = re.sub(rb"Time spent on the models: \d+ s", b"Time spent on the models: <T> s", data)  # evaluate's report
    return out


def assert_same_files(got: Path, want: Path) -> None:
    a, b = snapshot(got), snapshot(want)
    assert sorted(a) == sorted(b), f"files differ: extra {sorted(set(a) - set(b))}, missing {sorted(set(b) - set(a))}"
    for rel in a:
        if isinstance(a[rel], dict) and rel.endswith(".safetensors"):
            assert a[rel].keys() == b[rel].keys(), rel
            for k in a[rel]:
                assert torch.equal(a[rel][k], b[rel][k]), f"{rel}: tensor {k} differs"
        else:
            assert a[rel] == b[rel], f"{rel} differs"


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of the run directory `src` that refers to its own files (``prune/latest.json`` holds an absolute path)."""
    shutil.copytree(src, dst)
    for p in dst.rglob("*.json"):
        p.write_text(p.read_text().replace(str(src), str(dst)))
    return dst


# ------------------------------------------------------------------------------------------------ importance
@pytest.fixture(scope="module")
def importance_run(toy_parent, tmp_path_factory):
    """An uninterrupted importance run: the reference, and the start of the later stages' runs."""
    run_dir = tmp_path_factory.mktemp("importance")
    pipeline(make_cfg(toy_parent, run_dir, "stage=importance", *SMALL))
    return run_dir


IMPORTANCE_CRASHES = {
    "scoring": lambda: Kill(__import__("elastic.stages.importance", fromlist=["x"]), "compute_scores"),
    "scores-temp-written": lambda: Kill(elastic.rundir.os, "replace", named("scores.safetensors")),
    "scores-without-sidecar": lambda: Kill(RunDir, "write_sidecar", named("scores.safetensors")),
    "between-scores-and-ranking": lambda: Kill(RunDir, "save_tensors", nth=1, after=True),
    "ranking-temp-written": lambda: Kill(elastic.rundir.os, "replace", named("ranking.safetensors")),
    "before-summary": lambda: Kill(RunDir, "save_json"),
    "before-done": lambda: Kill(RunDir, "mark_done"),
    "done-temp-written": lambda: Kill(elastic.rundir.os, "replace", named("DONE.json")),
}


@pytest.mark.parametrize("point", IMPORTANCE_CRASHES)
def test_importance_resumes_after_a_crash(point, importance_run, toy_parent, tmp_path):
    cfg = make_cfg(toy_parent, tmp_path, "stage=importance", *SMALL)
    crash_then_resume(cfg, IMPORTANCE_CRASHES[point]())
    assert_same_files(tmp_path, importance_run)


# ------------------------------------------------------------------------------------------------ prune (one target)
PRUNE = ["stage=prune", "prune.target=0.6", "prune.ranking=importance", "prune.name=child"]


@pytest.fixture(scope="module")
def prune_run(importance_run, toy_parent, tmp_path_factory):
    """Importance, then an uninterrupted prune to 60%: the reference, and the input of quantize / export / evaluate."""
    run_dir = copy_run(importance_run, tmp_path_factory.mktemp("prune") / "run")
    pipeline(make_cfg(toy_parent, run_dir, *PRUNE, *SMALL))
    return run_dir


def _prune():
    return __import__("elastic.stages.prune", fromlist=["x"])


PRUNE_CRASHES = {
    "scoring-candidates": lambda: Kill(__import__("elastic.grid", fromlist=["x"]), "heldout_loss", nth=2),  # the grid scores them
    "folder-half-written": lambda: Kill(_prune(), "write_json", named("child.arch.json")),
    "child-ranking-temp-written": lambda: Kill(elastic.rundir.os, "replace", named("child.ranking.safetensors")),
    "folder-without-sidecar": lambda: Kill(RunDir, "write_sidecar", named("child")),
    "before-latest": lambda: Kill(_prune(), "write_json", named("latest.json")),
    "before-done": lambda: Kill(RunDir, "mark_done"),
}


@pytest.mark.parametrize("point", PRUNE_CRASHES)
def test_prune_resumes_after_a_crash(point, importance_run, prune_run, toy_parent, tmp_path):
    run_dir = copy_run(importance_run, tmp_path / "run")
    crash_then_resume(make_cfg(toy_parent, run_dir, *PRUNE, *SMALL), PRUNE_CRASHES[point]())
    assert_same_files(run_dir, prune_run)


def test_prune_still_refuses_another_runs_model_of_that_name(prune_run, toy_parent, tmp_path):
    """What lets a crashed prune replace its own folder must not let another setting replace a finished model."""
    run_dir = copy_run(prune_run, tmp_path / "run")
    (run_dir / "prune" / "DONE.json").unlink()
    with pytest.raises(FileExistsError, match="force=true"):
        pipeline(make_cfg(toy_parent, run_dir, *PRUNE, *SMALL, "prune.num_candidates=1"))
    assert_same_files(run_dir / "prune" / "child", prune_run / "prune" / "child")


# ------------------------------------------------------------------------------------------------ prune (budgets)
SEARCH = ["search.budgets=[0.5,0.7]", "search.steps=2", "search.batch_size=2", "search.micro_batch_size=2",
          "search.seq_len=32", "search.train_sequences=8", "search.checkpoint_every=0", "search.eval_sequences=0"]
EXTRACT = ["stage=prune", "prune.target=null", "budget=[0.5,0.6,0.7]", *SEARCH]  # 0.6: the router's interpolation


@pytest.fixture(scope="module")
def search_run(importance_run, toy_parent, tmp_path_factory):
    run_dir = copy_run(importance_run, tmp_path_factory.mktemp("search") / "run")
    pipeline(make_cfg(toy_parent, run_dir, "stage=search", *SEARCH, *SMALL))
    return run_dir


@pytest.fixture(scope="module")
def extract_run(search_run, toy_parent, tmp_path_factory):
    run_dir = copy_run(search_run, tmp_path_factory.mktemp("extract") / "run")
    pipeline(make_cfg(toy_parent, run_dir, *EXTRACT, *SMALL))
    return run_dir


def _budget_folder(_self, artifact, **_):
    return re.fullmatch(r"budget-[0-9.]+", Path(artifact).name) is not None  # the model folder, not its side files


EXTRACT_CRASHES = {  # (the fault, how many budgets were finished before it: the rerun must not cut them again)
    "between-budgets": (lambda: Kill(_prune(), "write_json", named("latest.json"), after=True), 1),
    "second-folder-half-written": (lambda: Kill(_prune(), "write_json", lambda p, *a: str(p).endswith(".arch.json"), nth=2), 1),
    # the sidecar is written before the folder's rename (elastic/rundir.py): a crash between the two
    "second-folder-sidecar-before-rename": (lambda: Kill(RunDir, "write_sidecar", _budget_folder, nth=2, after=True), 1),
    "last-budget-before-latest": (lambda: Kill(_prune(), "write_json", named("latest.json"), nth=3), 3),
    "before-done": (lambda: Kill(RunDir, "mark_done"), 3),
}


@pytest.mark.parametrize("point", EXTRACT_CRASHES)
def test_budget_extraction_resumes_after_a_crash_without_cutting_finished_budgets_again(
        point, search_run, extract_run, toy_parent, tmp_path):
    run_dir = copy_run(search_run, tmp_path / "run")
    cfg = make_cfg(toy_parent, run_dir, *EXTRACT, *SMALL)
    make, finished = EXTRACT_CRASHES[point]
    kill = make()
    with kill.armed(), pytest.raises(Crash):
        pipeline(cfg.copy())
    weights = {b: run_dir / "prune" / f"budget-{b}" / "model.safetensors" for b in ("0.5", "0.6", "0.7")}
    stamps = {b: p.stat().st_mtime_ns for b, p in list(weights.items())[:finished]}
    assert all(p.is_file() for p in list(weights.values())[:finished])
    pipeline(cfg.copy())
    assert {b: weights[b].stat().st_mtime_ns for b in stamps} == stamps, "a finished budget was cut and written again"
    assert_same_files(run_dir, extract_run)


def test_budgets_of_another_search_are_cut_again(extract_run, toy_parent, tmp_path):
    """Skipping a finished budget must not keep one cut from other weights: here the search ran again (its DONE
    fingerprint changed) and the extraction must cut every budget anew."""
    run_dir = copy_run(extract_run, tmp_path / "run")
    done = run_dir / "search" / "DONE.json"
    done.write_text(json.dumps(json.loads(done.read_text()) | {"fingerprint": "another-search"}))
    weights = run_dir / "prune" / "budget-0.5" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    pipeline(make_cfg(toy_parent, run_dir, *EXTRACT, *SMALL))
    assert weights.stat().st_mtime_ns != stamp


# ------------------------------------------------------------------------------------------------ quantize
QUANTIZE = ["stage=quantize", "quantize.calib_sequences=8", "quantize.calib_batch_size=8", "quantize.eval_sequences=4",
            "quantize.eval_batch_size=4"]


@pytest.fixture(scope="module")
def quantize_run(prune_run, toy_parent, tmp_path_factory):
    run_dir = copy_run(prune_run, tmp_path_factory.mktemp("quantize") / "run")
    pipeline(make_cfg(toy_parent, run_dir, *QUANTIZE, *SMALL))
    return run_dir


def _fp8():
    return __import__("elastic.fp8", fromlist=["x"])


QUANTIZE_CRASHES = {
    "calibrating": lambda: Kill(_fp8(), "quantize"),
    "folder-half-written": lambda: Kill(_fp8(), "load_dequantized"),  # weights and tokenizer in the temporary folder
    "report-written": lambda: Kill(__import__("elastic.stages.quantize", fromlist=["x"]), "write_json",
                                   named("child-fp8.report.json"), after=True),
    "folder-without-sidecar": lambda: Kill(RunDir, "write_sidecar", named("child-fp8")),
    "before-done": lambda: Kill(RunDir, "mark_done"),
}


@pytest.mark.parametrize("point", QUANTIZE_CRASHES)
def test_quantize_resumes_after_a_crash(point, prune_run, quantize_run, toy_parent, tmp_path):
    run_dir = copy_run(prune_run, tmp_path / "run")
    crash_then_resume(make_cfg(toy_parent, run_dir, *QUANTIZE, *SMALL), QUANTIZE_CRASHES[point]())
    assert_same_files(run_dir, quantize_run)


# ------------------------------------------------------------------------------------------------ export
EXPORT = ["stage=export", "export.format=gguf", "export.quant=[q8_0,q4_k_m]", "export.heldout_sequences=2",
          "export.max_new_tokens=4"]
NEEDS_LLAMA = "llama-cpp-python is not installed: `bash scripts/install.sh --gguf` installs the gguf extra (CI does)"


@pytest.fixture
def stand_in_llama_cpp(monkeypatch):
    """llama.cpp's converter, quantizer and check replaced by deterministic stand-ins: what is left is the stage's
    own file handling (the work folder, the renames, the sidecars, check.json), which is what a crash tests."""
    from elastic import gguf

    def export_gguf(checkpoint, name, quants, *, workdir, threads=None):
        weights = (Path(checkpoint) / "model.safetensors").read_bytes()
        files = {}
        for q in quants:
            files[q] = Path(workdir) / f"{name}-{q}.gguf"
            files[q].write_bytes(b"GGUF" + q.encode() + weights[: 1 << 16])
        return files

    monkeypatch.setattr(gguf, "tool_versions", lambda: {"llama-cpp-python": "stand-in"})
    monkeypatch.setattr(gguf, "export_gguf", export_gguf)
    monkeypatch.setattr(gguf, "gguf_metadata", lambda path: {"general.architecture": "nemotron_h",
                                                             "tokenizer.ggml.pre": "stand-in", "tensor_types": {}})
    monkeypatch.setattr(gguf, "check", lambda checkpoint, files, *a, **k: {
        "models": {q: {"ppl": float(len(q)), "all_identical": True} for q in files}})
    monkeypatch.setattr(gguf, "check_table", lambda report: "")
    return gguf


def _gguf():
    return __import__("elastic.gguf", fromlist=["x"])


EXPORT_CRASHES = {
    "converting": lambda: Kill(_gguf(), "export_gguf"),
    "checking": lambda: Kill(_gguf(), "check"),  # every file made, in the work folder
    "between-files": lambda: Kill(os, "replace", named("prune-child-q4_k_m.gguf")),
    "file-without-sidecar": lambda: Kill(RunDir, "write_sidecar", named("prune-child-q8_0.gguf")),
    "before-check-json": lambda: Kill(RunDir, "save_json"),
    "before-done": lambda: Kill(RunDir, "mark_done"),
}


@pytest.fixture
def export_run(stand_in_llama_cpp, prune_run, toy_parent, tmp_path):
    run_dir = copy_run(prune_run, tmp_path / "uninterrupted")
    pipeline(make_cfg(toy_parent, run_dir, *EXPORT, *SMALL))
    return run_dir


@pytest.mark.parametrize("point", EXPORT_CRASHES)
def test_export_resumes_after_a_crash(point, export_run, prune_run, toy_parent, tmp_path):
    run_dir = copy_run(prune_run, tmp_path / "run")
    crash_then_resume(make_cfg(toy_parent, run_dir, *EXPORT, *SMALL), EXPORT_CRASHES[point]())
    assert sorted(p.name for p in (run_dir / "export").glob("*.gguf")) == ["prune-child-q4_k_m.gguf", "prune-child-q8_0.gguf"]
    assert_same_files(run_dir, export_run)


@pytest.mark.faults
@pytest.mark.parametrize("point", ["checking", "between-files"])
def test_export_in_llama_cpp_resumes_after_a_crash(point, prune_run, toy_parent, tmp_path):
    """The same with llama.cpp's real converter, quantizer and check (two crash points: each run converts)."""
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA)
    want = copy_run(prune_run, tmp_path / "uninterrupted")
    pipeline(make_cfg(toy_parent, want, *EXPORT, *SMALL))
    run_dir = copy_run(prune_run, tmp_path / "run")
    crash_then_resume(make_cfg(toy_parent, run_dir, *EXPORT, *SMALL), EXPORT_CRASHES[point]())
    assert_same_files(run_dir, want)


# ------------------------------------------------------------------------------------------------ evaluate
EVALUATE = ["stage=evaluate", "evaluate.tasks=[]", "evaluate.passkey.lengths=[]", "evaluate.cost.lengths=[]",
            "evaluate.heldout_sequences=4", "evaluate.batch_size=4", "evaluate.cost.curve_points=3"]


@pytest.fixture(scope="module")
def evaluate_run(prune_run, toy_parent, tmp_path_factory):
    run_dir = copy_run(prune_run, tmp_path_factory.mktemp("evaluate") / "run")
    pipeline(make_cfg(toy_parent, run_dir, *EVALUATE, *SMALL))
    return run_dir


def _evaluation(name):
    return __import__(f"elastic.evaluation.{name}", fromlist=["x"])


EVALUATE_CRASHES = {
    "second-model": lambda: Kill(_evaluation("quality"), "chunked_loss", nth=2),
    "results-temp-written": lambda: Kill(os, "replace", named("results.json")),
    "report-half-written": lambda: Kill(_evaluation("report"), "write", after=True),
    "before-tracking": lambda: Kill(__import__("elastic.stages.evaluate", fromlist=["x"]), "track"),
    "before-done": lambda: Kill(RunDir, "mark_done"),
}


@pytest.mark.parametrize("point", list(EVALUATE_CRASHES))
def test_evaluate_resumes_after_a_crash(point, prune_run, evaluate_run, toy_parent, tmp_path):
    run_dir = copy_run(prune_run, tmp_path / "run")
    crash_then_resume(make_cfg(toy_parent, run_dir, *EVALUATE, *SMALL), EVALUATE_CRASHES[point]())
    assert_same_files(run_dir, evaluate_run)
