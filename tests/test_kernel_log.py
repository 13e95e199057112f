"""The kernel-path line: each stage says once which Mamba-2 path runs, and transformers' own
per-function fallback lines ("`<fn>` is falling back to its reference PyTorch implementation ...")
are gone, while its other warnings still show.

Both checks run in a fresh interpreter: transformers logs each fallback line once per process
(`warning_once`), so in the test process an earlier forward may already have spent it."""

import subprocess
import sys
from pathlib import Path

from elastic import kernels, toy

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}

# A tiny NemotronH prefill and cached decode (every kernel function of the mixer), then another
# warning on the same logger, which must survive the filter.
SCRIPT = """
import logging, sys, torch
sys.path.insert(0, "tests")
from tiny import tiny_model, tokens
from elastic import kernels
model = tiny_model()
if sys.argv[1] == "announce":
    kernels.announce("evaluate", model, "cpu")
with torch.no_grad():
    for _ in range(2):
        out = model(input_ids=tokens(1, 20), use_cache=True)
        model(input_ids=tokens(1, 1), use_cache=True, past_key_values=out.past_key_values)
logging.getLogger(kernels.FALLBACK_LOGGER).warning("some other kernels warning")
"""


def _run(*args: str, timeout: int = 300) -> str:
    import os

    r = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_announce_replaces_transformers_fallback_lines_with_one_line():
    plain = _run("-c", SCRIPT, "plain")
    # what transformers says without the filter: the text and logger the filter targets are the installed ones
    assert plain.count(kernels.FALLBACK_TEXT) >= 2
    quiet = _run("-c", SCRIPT, "announce")
    assert kernels.FALLBACK_TEXT not in quiet
    assert quiet.count("[evaluate] Mamba-2 scan: transformers' pure-torch path (on cpu") == 1
    assert quiet.count("Mamba-2 scan") == 1
    assert "some other kernels warning" in quiet and "some other kernels warning" in plain


def test_evaluate_stage_says_its_kernel_path_once(toy_parent, tmp_path):
    out = _run("-m", "elastic.run", "stage=evaluate", f"run_dir={tmp_path}", f"parent.path={toy_parent}",
               f"data.files=[{','.join(toy.toy_files('calib'))}]", f"data.heldout_files=[{','.join(toy.toy_files('heldout'))}]",
               "data.seq_len=64", "evaluate.heldout_sequences=4", "evaluate.tasks=[]", "evaluate.passkey.lengths=[]",
               "evaluate.cost.lengths=[32]", "evaluate.cost.decode_tokens=2", "evaluate.track=false", timeout=600)
    assert [line for line in out.splitlines() if "Mamba-2 scan" in line] == [
        "[evaluate] Mamba-2 scan: transformers' pure-torch path (on cpu; the fused kernels run on CUDA only)"]
    assert kernels.FALLBACK_TEXT not in out
