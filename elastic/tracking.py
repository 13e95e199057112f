"""Experiment tracking through accelerate's trackers: tensorboard, wandb, and a JSONL file.

``tracking.backends`` picks any of ``tensorboard`` and ``wandb``; a ``metrics.jsonl`` file (one JSON
object per logged step, readable with ``pandas.read_json(lines=True)``) is always written too, so a
run has its curves even with ``backends: []``. wandb runs offline unless the user asks otherwise
(``tracking.wandb_mode=online`` or the ``WANDB_MODE`` environment variable, which wins); sync an
offline run later with ``wandb sync <dir>/wandb/offline-run-*``. wandb's start-up costs ~6 s.

Use::

    acc = train.make_accelerator(**tracking.accelerator_kwargs(cfg.tracking, log_dir), ...)
    tracking.init_trackers(acc, cfg.tracking, run_name="distill", config=cfg)
    acc.log({"loss": 1.0}, step=1)   # train.train does this
    acc.end_training()
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

__all__ = ["BACKENDS", "TrackingError", "JSONLTracker", "accelerator_kwargs", "init_trackers", "flatten"]

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> module it needs


class TrackingError(ValueError):
    """An unknown or uninstalled tracking backend."""


class JSONLTracker(GeneralTracker):
    """Appends ``{"step": ..., **metrics}`` lines to ``<logging_dir>/metrics.jsonl`` (main process)."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=1, default=str) + "\n")

    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}, default=float) + "\n")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": scalar}`` (lists and None as strings): what tensorboard hparams accept."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = obj if isinstance(obj, (bool, int, float, str)) else json.dumps(obj, default=str)
    return out


def _backends(tcfg: Any) -> list[str]:
    names = list(tcfg.get("backends") or []) if hasattr(tcfg, "get") else list(tcfg or [])
    for n in names:
        if n not in BACKENDS:
            raise TrackingError(f"unknown tracking backend {n!r}; use any of {sorted(BACKENDS)} (or [] for none)")
        if importlib.util.find_spec(BACKENDS[n]) is None:
            raise TrackingError(f"tracking backend {n!r} needs the {BACKENDS[n]!r} package: pip install {BACKENDS[n]}")
    return names


def accelerator_kwargs(tcfg: Any, logging_dir: str | os.PathLike) -> dict:
    """``log_with`` and ``project_dir`` for ``Accelerator`` from the ``tracking`` config group."""
    d = Path(tcfg.get("dir") or logging_dir)
    return {"log_with": [*_backends(tcfg), JSONLTracker(d)], "project_dir": d}


def init_trackers(accelerator, tcfg: Any, *, run_name: str, config: Any = None) -> None:
    """Start the trackers (on the main process); wandb offline unless set online."""
    mode = os.environ.get("WANDB_MODE") or tcfg.get("wandb_mode") or "offline"
    logging_dir = accelerator.project_configuration.logging_dir
    init_kwargs = {"wandb": {"mode": mode, "name": run_name, "dir": str(logging_dir)}}
    if tcfg.get("wandb_entity"):
        init_kwargs["wandb"]["entity"] = tcfg.get("wandb_entity")
    accelerator.init_trackers(tcfg.get("project") or "elastic", config=flatten(config) if config is not None else None,
                              init_kwargs=init_kwargs)
