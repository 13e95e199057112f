"""`scripts/gpu_check.py --smoke`: the GPU check's code runs on the CPU at tiny widths and writes its report, so
it has not rotted when a GPU is lent.

Both runs hide what the lent GPU host lacks, as that host would: a ``sitecustomize`` on the subprocess's
PYTHONPATH (inherited by every check's process) swaps the import system's path finder for one that finds
neither the modules nor the package metadata of the hidden packages (``importlib.util.find_spec`` returns
None, ``importlib.metadata.version`` raises), so optional-import probes (transformers', accelerate's) see
them as not installed rather than crash. The first run hides hydra, omegaconf, datasets, modelopt,
mamba-ssm and causal-conv1d: every check but the distill stage's must pass without them. The second keeps
omegaconf and datasets (the wheels `scripts/gpu_check_wheels.sh` makes for the host) and runs the distill
stage, single and FSDP.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

HOST_LACKS = {"hydra": "hydra-core", "omegaconf": "omegaconf", "datasets": "datasets", "modelopt": "nvidia-modelopt",
              "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}  # module -> distribution

SITECUSTOMIZE = '''
import os
import sys
from importlib.machinery import PathFinder

_MODULES = set(os.environ["GPU_CHECK_TEST_HIDE_MODULES"].split(","))
_DISTS = set(os.environ["GPU_CHECK_TEST_HIDE_DISTS"].split(","))


class _HidingPathFinder:
    """The standard path finder, blind to the hidden packages' modules and metadata."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _MODULES:
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for d in PathFinder.find_distributions(*args, **kwargs):
            if (d.metadata["Name"] or "").lower().replace("_", "-") not in _DISTS:
                yield d

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()


sys.meta_path[:] = [_HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
'''


def run_smoke(tmp_path: Path, hidden: list[str], only: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(site), "GPU_CHECK_TEST_HIDE_MODULES": ",".join(hidden),
           "GPU_CHECK_TEST_HIDE_DISTS": ",".join(HOST_LACKS[m] for m in hidden), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--out", str(out), "--only", only],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert (out / "gpu_cpu.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu_cpu.json").read_text()), (out / "gpu_cpu.md").read_text()


def _why(report: dict) -> str:
    return "; ".join(f"{n}: {r['why']}" for n, r in report["checks"].items() if r["status"] != "passed")


@pytest.mark.slow
def test_smoke_without_the_packages_the_gpu_host_lacks(tmp_path):
    proc, report, md = run_smoke(tmp_path, list(HOST_LACKS), "kernel_path,distill_stage,masked_sliced,distill_step")
    checks = report["checks"]
    # the hiding reached the checks' processes: the host's view
    optional = checks["environment"]["figures"]["optional"]
    assert all(optional[d][0] == "missing" for d in HOST_LACKS.values()), optional

    # everything but the distill stage runs without hydra, omegaconf, datasets, modelopt, mamba-ssm, causal-conv1d
    for name in ("environment", "kernel_path", "masked_sliced", "distill_step"):
        assert checks[name]["status"] == "passed", _why(report)
    # ... and the distill stage fails in one line that says what to carry, without stopping the checks after it
    stage = checks["distill_stage"]
    assert stage["status"] == "failed" and "not importable" in stage["why"] and "gpu_check_wheels.sh" in stage["why"]
    assert "\n" not in stage["why"]
    assert list(checks) == ["environment", "kernel_path", "distill_stage", "masked_sliced", "distill_step"]
    assert proc.returncode == 1, proc.stdout[-2000:]

    # which Mamba scan ran, seen, and what elastic/kernels.py assumes (the torch path without mamba-ssm)
    assert checks["kernel_path"]["figures"]["ran"] == "torch"
    assert checks["kernel_path"]["figures"]["elastic_kernels_path"] == "torch"
    # masked == sliced for a block of each kind, the masked error within the bf16 slice's own
    for kind in ("mamba", "attention", "mlp"):
        r = checks["masked_sliced"]["figures"][kind]
        assert 0 < r["rel_err_masked_bf16"] <= 2 * r["rel_err_sliced_bf16"] + 1e-3, r
    # the distill step: the plan's prediction for the same shapes, a speed and finite losses (no allocator peak on a CPU)
    step = checks["distill_step"]["figures"]
    assert step["plan_peak_gib"] > 0 and step["tokens_per_s"] > 0 and step["mamba_path"] == "torch"
    assert len(step["losses"]) == 2 and all(math.isfinite(x) for x in step["losses"])
    assert step["attempts"] and "*" in step["attempts"][-1]["student_layers"]  # the reduced depth keeps attention
    assert step["measured_peak_gib"] is None and step["mfu"] is None

    # the report: command, card, date, one row per check, the figures
    assert md.startswith("# GPU check: cpu (smoke")
    assert "- command: `python3 scripts/gpu_check.py --smoke" in md and "- date: " in md and "- card: cpu" in md
    for name in checks:
        assert f"| {name} | {checks[name]['status']} |" in md
    assert "## distill_step" in md and "- plan_peak_gib: " in md


@pytest.mark.slow
def test_smoke_distill_stage_with_the_carried_wheels(tmp_path):
    """omegaconf and datasets present (carried), hydra and the rest still missing: the real distill stage runs its
    first evaluation and steps on the check's device, in one process and on its FSDP path."""
    proc, report, md = run_smoke(tmp_path, ["hydra", "modelopt", "mamba_ssm", "causal_conv1d"],
                                 "distill_stage,distill_stage_fsdp")
    assert proc.returncode == 0, _why(report) + proc.stdout[-2000:]
    checks = report["checks"]
    assert checks["environment"]["figures"]["optional"]["hydra-core"][0] == "missing"
    assert checks["distill_stage"]["figures"]["strategy"] == "single"
    assert checks["distill_stage_fsdp"]["figures"]["strategy"] == "fsdp (forced, 1 rank)"
    for name in ("distill_stage", "distill_stage_fsdp"):
        f = checks[name]["figures"]
        for phase in ("phase1", "phase2"):
            assert f[phase]["steps"] == 1 and math.isfinite(f[phase]["heldout_ce_before"]), f
            assert math.isfinite(f[phase]["heldout_ce_after"]), f
    # one rank of FSDP2 computes what one process does
    a, b = checks["distill_stage"]["figures"]["phase1"], checks["distill_stage_fsdp"]["figures"]["phase1"]
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-4)
    assert "| distill_stage_fsdp | passed |" in md
