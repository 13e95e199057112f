"""Our methods for the SmolLM2 benchmark (`scripts/bench_smollm2.py`), run through the real stages.

Every method here is the pipeline a user runs, composed from the project's Hydra config with the
parent's folder as ``parent.path`` (the Llama family is reached through the registry like any other):

* ``ours_grid``   -- stage importance, then stage prune with ``prune.target`` counted in
  non-embedding parameters (``prune.count=non_embedding_params``): the grid search picks the shape;
* ``ours_router`` -- stage importance, then stage search (the router and the nested family trained
  once for every budget by distillation, ``search.resource=non_embedding_params``), then stage prune
  ``budget=<b>``: each budget cut out zero-shot;
* ``random``      -- stage prune as ``ours_grid`` but with ``prune.ranking=random`` (seeded): random
  structured pruning, the baseline importance must beat;
* `distill`       -- stage distill of a pruned folder from the unpruned parent (the same data, tokens and
  seed for every pruned model).

Text: ``data.files`` is the benchmark's training split only (calibration, candidate scoring on its last
``data.heldout_fraction`` of rows, training); the benchmark's held-out articles are never read here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

# The prune grid: hidden in steps of 72 (a multiple of 9 and of 6) keeps every (hidden, heads) pair a config
# LlamaConfig accepts (it refuses a hidden size not divisible by the head count); FFN in steps of 64.
GRID = ["prune.granularity.hidden=72", "prune.granularity.ffn=64", "prune.granularity.heads=1",
        "search.granularity.hidden=72", "search.granularity.ffn=64", "search.granularity.heads=1",
        "prune.protect_kinds=''", "search.protect_kinds=''"]


@dataclass(frozen=True)
class Effort:
    """The stages' token budgets (rows of `seq_len` tokens)."""

    seq_len: int
    calib_rows: int  # importance calibration
    score_rows: int  # held-out rows (from the training split) scoring each grid candidate
    distill_steps: int  # optimizer steps of one distillation, `batch` rows each
    batch: int
    micro_batch: int
    lr: float


def _compose(parent_dir: Path, run_dir: Path, data_dir: Path, effort: Effort, seed: int, *overrides: str):
    from hydra import compose, initialize_config_dir

    from elastic.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            f"parent.path={parent_dir}", f"run_dir={run_dir}", f"data.files={data_dir / 'train.jsonl'}",
            "data.text_column=text", f"data.seq_len={effort.seq_len}", f"seed={seed}", "tracking.backends=[]",
            f"importance.num_sequences={effort.calib_rows}", "importance.batch_size=4", f"importance.seq_len={effort.seq_len}",
            f"prune.score_sequences={effort.score_rows}", "prune.score_batch_size=4", "prune.num_candidates=4",
            *GRID, *overrides,
        ])


def _run(cfg) -> dict:
    from elastic.run import pipeline

    return pipeline(cfg)


def _copy(folder: Path, out: Path) -> Path:
    """The benchmark's own copy of an exported folder (loader files only: what the stage exported)."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, out)
    return out


def _with_importance(run_dir: Path, shared: Path) -> Path:
    """`run_dir` holding a copy of the shared run's importance stage: one ranking for every method and seed, while
    each router search (seed, variant) keeps its own search/ and prune/ folders."""
    if not (run_dir / "importance" / "DONE.json").exists():
        shutil.rmtree(run_dir / "importance", ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(shared / "importance", run_dir / "importance")
    return run_dir


def make_methods(effort: Effort, data_dir: Path, Method, fractions: list[float], seeds: tuple[int, ...] = (0,),
                 router_overrides: tuple[str, ...] = (), random_seeds: tuple[int, ...] = (0, 1, 2)):
    """`Method` entries for the benchmark's registry (its signature: ``fn(parent_dir, target_nonembed, calib,
    seed, *, out, work) -> folder``; `calib` is unused: our stages read their calibration rows from
    ``data.files`` themselves, the same count of rows of the same split)."""

    def shared(work) -> Path:
        """One run directory for all our methods: one importance ranking, one search."""
        return Path(work).parent.parent / "elastic-run"

    def importance(parent_dir, run_dir):
        _run(_compose(parent_dir, run_dir, data_dir, effort, 0, "stage=importance"))  # skipped once done

    def grid(ranking: str, *space: str, tag: str = ""):
        def fn(parent_dir, target, calib, seed, *, out, work):
            run_dir = shared(work)
            if ranking == "importance":
                importance(parent_dir, run_dir)
            res = _run(_compose(parent_dir, run_dir, data_dir, effort, seed, "stage=prune", "force=true",
                                f"prune.target={int(target)}", "prune.count=non_embedding_params",
                                f"prune.ranking={ranking}", f"prune.name={ranking}{tag}-t{int(target)}-s{seed}", *space))
            return _copy(Path(res["prune"]["path"]), Path(out))
        return fn

    # the grid over the search's own space and band (the search stage's defaults): the shapes the router's grid
    # prior starts from, distilled alone -- the control that separates the router family's shapes from its joint training
    search_space = ("prune.max_width_prune=0.5", "prune.max_depth_prune=0.25", "prune.tolerance=0.05")

    def router(budgets: list[float]):
        def fn(parent_dir, target, calib, seed, *, out, work):
            importance(parent_dir, shared(work))
            run_dir = _with_importance(Path(work), shared(work))  # this seed's own search, the shared ranking
            # once: both budgets come from one search, with as many tokens as the separately
            # distilled models get together (the stage skips a search it finished)
            steps = effort.distill_steps * len(budgets)
            _run(_compose(parent_dir, run_dir, data_dir, effort, seed, "stage=search",
                          f"search.budgets=[{','.join(f'{b:g}' for b in budgets)}]", "search.resource=non_embedding_params",
                          f"search.steps={steps}", f"search.batch_size={effort.batch}",
                          f"search.micro_batch_size={effort.micro_batch}", f"search.seq_len={effort.seq_len}",
                          f"search.lr={effort.lr}", "search.eval_sequences=0", f"search.checkpoint_every={max(10, steps // 4)}",
                          f"search.train_sequences={steps * effort.batch}", *router_overrides))
            parent_nonembed = _nonembed(parent_dir)
            b = min(budgets, key=lambda x: abs(x * parent_nonembed - target))
            res = _run(_compose(parent_dir, run_dir, data_dir, effort, seed, "stage=prune", "force=true", f"budget={b:g}"))
            return _copy(Path(res["prune"]["extracted"][f"{b:g}"]["path"]), Path(out))
        return fn

    def search_tokens(work) -> int:
        from elastic.rundir import read_json

        return int(read_json(Path(work) / "search" / "archs.json")["tokens"])

    return {
        "ours_grid": Method("ours_grid", grid("importance"), seeds=seeds, label="ours: importance + grid (prune stage)"),
        "ours_router": Method("ours_router", router(sorted(fractions)), seeds=seeds, trained=True, tokens=search_tokens,
                              variant=" ".join(router_overrides),
                              label="ours: router search, both budgets at once (search + prune stages)"
                              + (f" [{' '.join(router_overrides)}]" if router_overrides else "")),
        "random": Method("random", grid("random"), seeds=random_seeds, label="random structured (prune.ranking=random)"),
        "ours_grid_wide": Method("ours_grid_wide", grid("importance", *search_space, tag="-wide"), seeds=seeds,
                                 label="control: grid over the search's space (the router prior's shapes), each budget distilled alone"),
    }


def _nonembed(parent_dir) -> int:
    import json

    from elastic.arch import sizes_from_config

    return sizes_from_config(json.loads((Path(parent_dir) / "config.json").read_text())).non_embedding_params()


def make_distill(effort: Effort, data_dir: Path):
    """The DISTILL hook: stage distill of `student_dir` from the unpruned parent, one phase of
    ``distill_steps`` x ``batch`` rows; the same data, tokens and seed for every student."""

    def distill(teacher_dir, student_dir, train_rows, seed, *, out):
        work = Path(out).with_name(Path(out).name + ".run")
        shutil.rmtree(work, ignore_errors=True)
        phase = (f"[{{name:phase1,seq_len:{effort.seq_len},batch_size:{effort.batch},micro_batch_size:{effort.micro_batch},"
                 f"lr:{effort.lr},warmup_steps:1,max_steps:{effort.distill_steps},max_tokens:null}}]")
        res = _run(_compose(teacher_dir, work, data_dir, effort, seed, "stage=distill", f"distill.student={student_dir}",
                            f"distill.phases={phase}", "distill.eval_sequences=0", "distill.checkpoint_every=0"))
        folder = _copy(Path(res["distill"]["output"]), Path(out))
        shutil.rmtree(work, ignore_errors=True)
        return folder

    return distill
