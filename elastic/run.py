"""Entry point: ``python -m elastic.run [stage=<stage>] [recipe=<recipe>] [key=value ...]``.

A thin Hydra wrapper: it composes ``conf/config.yaml`` + ``recipes/<recipe>.yaml`` + the command
line and hands the config to `pipeline`, which runs the stages (each ``elastic.stages.<name>.run``)
against one run directory. `pipeline` is plain Python and testable without Hydra.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from elastic import kernels
from elastic.stages import ORDER, STANDALONE  # noqa: E402

# Stages that train and may run under a multi-process launch (accelerate / torchrun); every other stage
# runs in one process, before (importance, prune) or after (quantize, evaluate) them.
MULTI_PROCESS_STAGES = ("search", "distill")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# Exceptions that mean "bad input": reported as one line, exit code 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from elastic.arch import ArchError
    from elastic.data import DataError
    from elastic.parent import ModelError
    from omegaconf.errors import MissingMandatoryValue

    return (ArchError, DataError, ModelError, FileNotFoundError, FileExistsError, MissingMandatoryValue)


def stage_fingerprint(cfg: Any, stage: str, upstream: dict[str, str] | None = None) -> str:
    """Hash of what a stage's output depends on: its own config group, the parent, the data, the seed
    and the fingerprints of the earlier stages it read (so a new prune makes distill run again)."""
    from omegaconf import OmegaConf

    def part(key: str):
        return OmegaConf.to_container(cfg[key], resolve=True) if key in cfg and OmegaConf.is_config(cfg[key]) else cfg.get(key)

    keys = (stage, "parent", "data", "toy", "seed") + (("budget",) if stage == "prune" else ())
    blob = {k: part(k) for k in keys} | {"upstream": upstream or {}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def available_stages() -> list[str]:
    return [s for s in ORDER if importlib.util.find_spec(f"elastic.stages.{s}") is not None]


def pipeline(cfg: Any) -> dict[str, Any]:
    """Run `cfg.stage` (or every implemented stage, in order, for ``all``) in `cfg.run_dir`."""
    from elastic.rundir import RunDir

    check_launch(cfg.stage)
    kernels.quiet()  # transformers' kernel-fallback lines, from the toy's build on: each stage says its path once
    if cfg.stage in STANDALONE:  # e.g. stage=plan: reads only the config, writes RUN/<stage>/, no DONE marker
        return {cfg.stage: importlib.import_module(f"elastic.stages.{cfg.stage}").run(cfg, RunDir(cfg.run_dir))}
    implemented = available_stages()
    if cfg.stage == "all":
        stages = implemented
    elif cfg.stage in implemented:
        stages = [cfg.stage]
    elif cfg.stage in ORDER:
        raise ValueError(f"stage {cfg.stage!r} is not implemented yet; implemented: {', '.join(implemented)}")
    else:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of: all, {', '.join(implemented)}")

    run = RunDir(cfg.run_dir)
    print(f"elastic: run directory {run.root}")
    results: dict[str, Any] = {}
    for stage in stages:
        upstream = {s: (run.done_record(s) or {}).get("fingerprint") for s in ORDER[: ORDER.index(stage)]}
        fp = stage_fingerprint(cfg, stage, {s: f for s, f in upstream.items() if f})
        done = run.done_record(stage)
        if done and done.get("fingerprint") == fp and not cfg.force:
            print(f"[{stage}] already done with this config (force=true reruns it): {run.path(stage)}")
            results[stage] = done.get("summary")
            continue
        run.clear_done(stage)
        print(f"[{stage}] running ...")
        t0 = time.time()
        module = importlib.import_module(f"elastic.stages.{stage}")
        summary = module.run(cfg, run)
        seconds = round(time.time() - t0, 1)
        run.mark_done(stage, summary, config=cfg.get(stage), fingerprint=fp, seconds=seconds)
        results[stage] = summary
        print(f"[{stage}] done in {seconds}s -> {run.path(stage)}")
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch` every process runs the pipeline
        _print_summary(run, results)
    return results


def _print_summary(run, results: dict) -> None:
    from elastic.summary import print_summary

    print_summary(run, results)


def world_size() -> int:
    """Processes of this launch (accelerate and torchrun set WORLD_SIZE in each of them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(stage: str) -> None:
    """One stage per launch: only the training stages run under several processes.

    Under ``accelerate launch`` every process runs this entry point; `stage=all` there would load the
    parent once per process for importance and prune and race on the run directory.
    """
    n = world_size()
    if n > 1 and stage not in MULTI_PROCESS_STAGES:
        raise ValueError(
            f"stage={stage} was launched on {n} processes; only {' and '.join(MULTI_PROCESS_STAGES)} run multi-process. "
            "Launch one stage per command: the single-process stages with `python -m elastic.run stage=<stage>`, "
            "then `scripts/distill_multigpu.sh N ...` (STAGE=search for the search) -- see README, 'Run the real thing'")


def offline_defaults(argv: list[str]) -> None:
    """The toy recipe (the default) needs no hub: without these, each hub look-up on an offline machine
    wastes ~45 s retrying DNS. Other recipes leave the hub alone (transformers' kernels, datasets
    specs); set the variables yourself when your cluster has no hub."""
    recipe = next((a.partition("=")[2] for a in argv if a.startswith("recipe=")), "toy")
    if recipe == "toy":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")  # wandb stays offline unless asked (tracking.wandb_mode)


def _preflight(argv: list[str]) -> None:
    """Catch the commonest typos before Hydra prints a long report about them."""
    for arg in argv:
        key, _, val = arg.partition("=")
        if key == "recipe" and val and not (RECIPES_DIR / f"{val}.yaml").exists():
            names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
            _fail(f"unknown recipe {val!r}; choose one of: {', '.join(names)}")
        if key == "stage" and val and val != "all" and val not in ORDER + STANDALONE:
            _fail(f"unknown stage {val!r}; choose one of: all, {', '.join(ORDER + STANDALONE)}")


def _fail(msg: str) -> None:
    # one line whatever the message: a library's text (a tokenizer's, a data loader's) may span several
    print("elastic: error: " + " ".join(str(msg).split()), file=sys.stderr)
    sys.exit(2)


def main() -> None:
    import hydra

    _preflight(sys.argv[1:])
    offline_defaults(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg) -> None:
        try:
            pipeline(cfg)
        except _user_errors() + (ValueError,) as e:
            if os.environ.get("ELASTIC_TRACEBACK"):
                raise
            _fail(str(e))

    _main()


if __name__ == "__main__":
    main()
