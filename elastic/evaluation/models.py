"""Which models a run directory holds, and how each one is loaded.

A model is an exported Hugging Face folder (it has a ``config.json``). The run's parent comes first,
then ``prune/*/``, ``distill/<phase>/`` and ``quantize/*/`` in name order. Left out: hidden temporary
folders (``.name.tmp``, a stage still writing), training ``checkpoints/`` and ``search/elastic/``
(the importance-ordered full model: the parent's function in another order, not a model to ship).

Sizes come from ``config.json`` through the family's sizes type only (``family_for(config).Sizes``):
our own artifacts (arch.json,
candidates.json) live beside a model folder or not at all, so nothing else inside it is read
besides what the loaders read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elastic.models.family import Sizes as Arch  # any family's sizes type
from elastic.models import family_for

# Stage folders that hold exported models, in pipeline order.
MODEL_STAGES = ("prune", "distill", "quantize")
SKIP_NAMES = {"checkpoints", "logs"}


class EvaluateError(ValueError):
    """Bad input to the evaluate stage: no model where one was named, a task that does not parse, ..."""


@dataclass(frozen=True)
class ModelRef:
    """One model to evaluate: a short name for tables and plots, its folder, and where it came from."""

    name: str       # e.g. "parent", "prune/budget-0.5", "distill/phase2", "quantize/fp8"
    path: Path
    stage: str      # parent | prune | distill | quantize | given

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def is_fp8(self) -> bool:
        """A modelopt FP8 export (plain transformers would load its float8 weights without their scales)."""
        from elastic.fp8 import is_modelopt_fp8

        return is_modelopt_fp8(self.path)

    def arch(self) -> Arch:
        """The model's sizes, from its config by its family's sizes type."""
        config = self.config
        return family_for(config).Sizes.from_config(config)


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not path.name.startswith(".")


def discover(run_root: Path, parent: Path | None) -> list[ModelRef]:
    """Every model of a run: the parent (when given), then each stage's exported folders."""
    refs = [ModelRef("parent", Path(parent), "parent")] if parent is not None else []
    for stage in MODEL_STAGES:
        d = run_root / stage
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if sub.name in SKIP_NAMES or not is_model_dir(sub):
                continue
            refs.append(ModelRef(f"{stage}/{sub.name}", sub, stage))
    return refs


def from_list(paths: list[Any], run_root: Path) -> list[ModelRef]:
    """`evaluate.models=[...]`: paths (absolute, or relative to the run directory, then to the cwd)."""
    refs = []
    for item in paths:
        p = Path(str(item)).expanduser()
        candidates = [p] if p.is_absolute() else [run_root / p, Path.cwd() / p]
        found = next((c for c in candidates if (c / "config.json").is_file()), None)
        if found is None:
            where = " or ".join(str(c) for c in candidates)
            raise EvaluateError(f"evaluate.models: no model at {where} (a model folder has a config.json)")
        found = found.resolve()
        try:
            name = str(found.relative_to(run_root))
        except ValueError:
            name = found.name
        refs.append(ModelRef(name, found, "given"))
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise EvaluateError(f"evaluate.models names the same model twice: {names}")
    return refs


def load(ref: ModelRef, device: torch.device | str = "cpu"):
    """(model, tokenizer) in float32 and eval mode; FP8 exports through their dequantizing reader."""
    from elastic.parent import load_model, load_tokenizer

    if ref.is_fp8:
        from elastic import fp8  # the quantize stage's dequantizing reader: weight x weight_scale

        model = fp8.load_dequantized(ref.path, dtype="float32", device="cpu").to(device).eval()
    else:
        try:
            model = load_model(ref.path, dtype="float32", device=device)
        except RuntimeError as e:  # transformers' size-mismatch report ends with "look at the above report"
            raise EvaluateError(f"{ref.path} does not load with from_pretrained (do the weights match its "
                                f"config.json?): {str(e).strip().splitlines()[0][:300]}") from None
    return model, load_tokenizer(ref.path)
