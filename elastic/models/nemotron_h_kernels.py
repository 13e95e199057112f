"""Which Mamba-2 scan transformers' NemotronH will run: the fused kernels, or its pure-torch reference.

transformers picks, per function, the Hub kernels when a model is loaded with ``use_kernels=True`` (not
used here), else the ``mamba_ssm`` / ``causal_conv1d`` packages when they import, else a pure-torch path
whose chunked scan materialises ``[batch, heads, seq/chunk, chunk, chunk]`` fp32 tensors several times a
layer: fine on CPU for the toy, out of memory at long context on a GPU. The training stages log which
path runs (`elastic.kernels`), and the plan sizes the scan's workspace for it and refuses what does not fit.
"""

from __future__ import annotations

import importlib

PACKAGES = ("mamba_ssm", "causal_conv1d")
INSTALL_HINT = "pip install --no-build-isolation mamba-ssm causal-conv1d   # CUDA toolkit + matching torch needed to build"


def path() -> str:
    """``kernel`` when both kernel packages import in this environment, else ``torch``."""
    for pkg in PACKAGES:
        try:
            importlib.import_module(pkg)
        except Exception:  # ImportError, or a CUDA extension that fails to load: transformers falls back too
            return "torch"
    return "kernel"


def describe(path_: str | None = None) -> str:
    """One log line saying which scan runs and, for the torch path, how to get the kernels."""
    if (path_ or path()) == "kernel":
        return "Mamba-2 scan: fused kernels (mamba-ssm, causal-conv1d)"
    return f"Mamba-2 scan: transformers' pure-torch path (slow, memory hungry at long context); for the kernels: {INSTALL_HINT}"
