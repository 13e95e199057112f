"""Which Mamba-2 scan transformers' NemotronH will run: the fused kernels, or its pure-torch reference.

transformers picks, per function, the Hub kernels when a model is loaded with ``use_kernels=True`` (not
used here), else the ``mamba_ssm`` / ``causal_conv1d`` packages when they import and the inputs are on
a CUDA device (the only one they run on), else a pure-torch path whose chunked scan materialises
``[batch, heads, seq/chunk, chunk, chunk]`` fp32 tensors several times a layer: fine on CPU for the toy,
out of memory at long context on a GPU. Every stage that runs the model says which path runs, once
(`elastic.kernels.announce`), and the plan sizes the scan's workspace for it and refuses what does not fit.
"""

from __future__ import annotations

import importlib
from typing import Any

PACKAGES = ("mamba_ssm", "causal_conv1d")
INSTALL_HINT = "pip install --no-build-isolation mamba-ssm causal-conv1d   # CUDA toolkit + matching torch needed to build"


def _device_type(device: Any) -> str | None:
    if device is None:
        return None
    return getattr(device, "type", None) or str(device).split(":")[0]


def path(device: Any = None) -> str:
    """``kernel`` when both kernel packages import in this environment (and `device`, if given, is a CUDA
    device: transformers sends inputs on any other device to the torch path), else ``torch``."""
    if _device_type(device) not in (None, "cuda"):
        return "torch"
    for pkg in PACKAGES:
        try:
            importlib.import_module(pkg)
        except Exception:  # ImportError, or a CUDA extension that fails to load: transformers falls back too
            return "torch"
    return "kernel"


def describe(path_: str | None = None, device: Any = None) -> str:
    """One log line saying which scan runs and, for the torch path on a GPU, how to get the kernels."""
    if (path_ or path(device)) == "kernel":
        return "Mamba-2 scan: fused kernels (mamba-ssm, causal-conv1d)"
    where = _device_type(device)
    if where not in (None, "cuda"):
        return f"Mamba-2 scan: transformers' pure-torch path (on {where}; the fused kernels run on CUDA only)"
    return f"Mamba-2 scan: transformers' pure-torch path (slow, memory hungry at long context); for the kernels: {INSTALL_HINT}"
