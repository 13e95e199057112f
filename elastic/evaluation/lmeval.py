"""Multiple-choice accuracy through lm-evaluation-harness, on task YAMLs and data shipped with us.

The shipped tasks (``elastic/evaluation/tasks/*.yaml``) read local JSONL through ``dataset_path:
json`` with ``data_files`` relative to the task folder, so nothing touches the hub. lm-eval hands
``data_files`` to `datasets`, which resolves a relative path from the working directory: a task runs
with the working directory set to its YAML's folder, here (`in_folder`) as on the command line::

    cd elastic/evaluation/tasks && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=/abs/path/to/checkpoint,dtype=float32 --include_path . \\
        --tasks elastic_social_iqa,elastic_winowhy

A user's own task folder (``evaluate.task_dirs``) follows the same convention.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from elastic.evaluation.models import EvaluateError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def read_yaml(path: Path) -> dict:
    """A task YAML as lm-eval itself reads it (`include:` merged, `!function` tags left unresolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # what TaskManager uses; no public equivalent in 0.4.13

    return load_yaml(path, resolve_func=False)


def find_tasks(names: list[str], extra_dirs: list[str | Path] = ()) -> dict[str, Path]:
    """Task name -> its YAML, for every name asked for; a YAML that does not parse is an error now."""
    index: dict[str, Path] = {}
    for d in [TASKS_DIR, *[Path(str(x)).expanduser().resolve() for x in extra_dirs]]:
        if not d.is_dir():
            raise EvaluateError(f"evaluate.task_dirs: {d} is not a folder")
        for y in sorted(d.glob("*.yaml")):
            try:
                cfg = read_yaml(y)
            except Exception as e:  # yaml errors, a bad !function, an unreadable include: all one message
                raise EvaluateError(f"task file {y} does not parse: {type(e).__name__}: {e}") from None
            if not isinstance(cfg, dict) or "task" not in cfg:
                raise EvaluateError(f"task file {y} has no `task:` name")
            index[str(cfg["task"])] = y
    missing = [n for n in names if n not in index]
    if missing:
        raise EvaluateError(f"evaluate.tasks: unknown task(s) {missing}; available: {sorted(index)}")
    return {n: index[n] for n in names}


@contextlib.contextmanager
def in_folder(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def num_choices(yaml_path: Path) -> float | None:
    """Mean number of choices of a shipped-style task (JSONL with a `choices` list): its chance level is 1/that."""
    import json

    cfg = read_yaml(yaml_path)
    files = ((cfg.get("dataset_kwargs") or {}).get("data_files") or {})
    f = files.get(cfg.get("test_split", "test")) if isinstance(files, dict) else None
    p = yaml_path.parent / f if f else None
    if not p or not p.is_file():
        return None
    counts = [len(json.loads(line).get("choices", [])) for line in p.read_text().splitlines() if line.strip()]
    return sum(counts) / len(counts) if counts and all(counts) else None


def load_tasks(tasks: dict[str, Path]) -> dict[str, dict]:
    """Task name -> its own lm-eval task dict, built once for all models (indexing a folder costs
    seconds, so one `TaskManager` per folder). One dict per task, so that each task is scored (and may
    fail) on its own.

    Each folder's tasks are built with the working directory in that folder, where their relative
    `data_files` resolve (the datasets are read at this point).
    """
    from lm_eval.tasks import TaskManager

    by_folder: dict[Path, list[str]] = {}
    for name, path in tasks.items():
        by_folder.setdefault(path.parent, []).append(name)
    out = {}
    for folder, names in by_folder.items():
        with in_folder(folder):
            tm = TaskManager(include_path=str(folder), include_defaults=False)
            for name in names:
                try:
                    out[name] = tm.load([name])
                except Exception as e:  # a data file that is missing or malformed: name the folder and task
                    raise EvaluateError(f"lm-eval task {name} in {folder} does not load: {type(e).__name__}: {e}") from None
    return {name: out[name] for name in tasks}  # in the order asked for


def harness(model, tokenizer, batch_size: int = 8):
    """lm-eval's wrapper around an already loaded model (one per model, shared by its tasks)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))


def evaluate_task(lm, task_dict: dict, *, limit: int | None) -> dict[str, dict]:
    """Accuracy (acc, acc_norm, examples) of each task in `task_dict` (one, from `load_tasks`)."""
    from lm_eval.evaluator import evaluate as lm_evaluate

    res = lm_evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    return {name: {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"),
                   "examples": int(res["n-samples"][name]["effective"])} for name, r in res["results"].items()}
