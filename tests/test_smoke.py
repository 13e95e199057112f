"""The user's command, `python -m elastic.run` (stage=all), on the test toy at tiny sizes, in a child process:
every stage runs and every figure of every model is computed. Marked `smoke`: the drift check
(scripts/check_latest.sh) runs the `smoke` tests with the newest versions of the dependencies, where this is the
test that sees a release break a stage (transformers 5.25 broke the evaluate stage's peak-memory figure of every
model while every unit test of the evaluation passed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elastic import toy

from test_quantize import TINY_RUN

pytestmark = pytest.mark.smoke

TINY_EVALUATE = [
    "evaluate.heldout_sequences=4", "evaluate.batch_size=4", "evaluate.tasks=[elastic_winowhy]", "evaluate.task_limit=4",
    "evaluate.passkey.lengths=[64]", "evaluate.passkey.depths=[0.5]", "evaluate.passkey.trials=2",
    "evaluate.cost.lengths=[32]", "evaluate.cost.decode_tokens=2", "evaluate.cost.repeats=1", "evaluate.cost.curve_points=3",
]
FIGURES = ("cost", "heldout", "tasks", "passkey", "speed", "peak_memory")  # what a fully evaluated model's entry holds


def test_every_stage_runs_from_the_command_line_and_every_figure_is_computed(toy_parent, tmp_path):
    run_dir = tmp_path / "run"
    files, held = toy.toy_files("calib"), toy.toy_files("heldout")
    args = [sys.executable, "-m", "elastic.run", f"parent.path={toy_parent}", f"run_dir={run_dir}",
            f"data.files=[{','.join(files)}]", f"data.heldout_files=[{','.join(held)}]", "data.seq_len=64",
            *TINY_RUN, *TINY_EVALUATE, "evaluate.track=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("importance", "search", "prune", "distill", "quantize", "evaluate"):
        assert (run_dir / stage / "DONE.json").exists(), stage

    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    # the parent, the pruned child, both distill phases and the FP8 export: every kind of folder the loader reads
    assert len(names) >= 5 and any("fp8" in n for n in names), names
    for m in results["models"]:
        assert m["status"] == "ok", (m["name"], m.get("error"))
        for figure in FIGURES:
            assert m.get(figure), (m["name"], figure, m.get("failed_figures"))
        assert not m.get("failed_figures"), (m["name"], m["failed_figures"])
        assert all(r["peak_bytes"] > 0 for r in m["peak_memory"]), m["name"]
    assert Path(run_dir / "evaluate" / "report" / "report.html").stat().st_size > 0
