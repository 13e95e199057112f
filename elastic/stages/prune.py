"""Stage `prune`: slice the parent into one architecture, saved as a plain Hugging Face checkpoint.

    python -m elastic.run stage=prune prune.target=0.6 run_dir=RUN          # a budget: grid search picks the shape
    python -m elastic.run stage=prune 'prune.arch={hidden_size:3136,intermediate_size:12544,mamba_num_heads:96,drop_layers:14}' \
        parent.path=/ckpt/NVIDIA-Nemotron-Nano-9B-v2 run_dir=runs/9b
    python -m elastic.run stage=prune budget=[0.5,0.7]                      # after search: cut trained budgets zero-shot
    python -m elastic.run stage=prune prune.target=0.6                      # tiny CPU variant on the toy parent

Which rule applies: `prune.target` or `prune.arch` when set (one of them), else `budget` (extraction
from ``search/``; the toy recipe sets ``budget: 0.5`` so that ``stage=all`` distills a searched model).

How a budget becomes a shape (Minitron-style, no training): enumerate every combination of the
width choices (within `max_width_prune` of the parent, in `granularity` steps) and depth choices
(drop the k least important droppable layers, k up to `max_depth_prune` of the layers) whose
parameter count lies in ``[(1 - tolerance) * target, target]``; take the `num_candidates` with the
most parameters; slice each with the importance ranking and keep the one with the lowest held-out
loss. Everything is recorded in ``prune/<name>.candidates.json``.

Output: ``prune/<name>/`` (safetensors weights, config.json derived from the kept sizes, tokenizer)
that ``AutoModelForCausalLM.from_pretrained`` and serving engines load as it is; beside it
``<name>.arch.json``, ``<name>.candidates.json``, ``<name>.ranking.safetensors`` and the sidecar;
``prune/latest.json`` points at it for the next stage.

After a crash the same command finishes the job without ``force``: it replaces its own unfinished folder (no
sidecar, or a sidecar with this run's fingerprint), removes a killed run's temporaries, and an extraction skips
the budgets already cut from the same search; a finished model of another setting under the same name is refused.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from omegaconf import OmegaConf

from elastic import grid, kernels
from elastic.arch import ArchError, sizes_from_config, sizes_from_dict
from elastic.inputs import token_batches
from elastic.models import family_for
from elastic.models.family import Ranking, Sizes
from elastic.parent import load_model, load_tokenizer, resolve_device, resolve_parent_path
from elastic.rundir import RunDir, read_json, remove_temps, write_json
from elastic.search_space import Space, parse_budget, read_budget

STAGE = "prune"


def get_ranking(kind: str, run: RunDir, arch: Sizes, seed: int) -> Ranking:
    if kind == "importance":
        from elastic.stages.importance import load_ranking

        ranking = load_ranking(run)
    elif kind == "identity":
        ranking = Ranking.identity(arch)
    elif kind == "random":
        ranking = Ranking.random(arch, torch.Generator().manual_seed(int(seed)))
    else:
        raise ValueError(f"prune.ranking must be importance, identity or random, got {kind!r}")
    ranking.validate(arch)
    return ranking


def arch_from_sizes(parent: Sizes, ranking: Ranking, sizes: dict[str, Any], protect_kinds: str) -> Sizes:
    """An explicit `prune.arch` mapping (the family's config field names, plus ``drop_layers`` or
    ``layers``) -> a validated child."""
    try:
        return parent.cut_fields(ranking, sizes, protect_kinds)
    except ArchError as e:
        raise ArchError(f"prune.arch: {e}") from None


def build_space(parent: Sizes, c: Any) -> Space:
    """The grid of `prune.granularity` / width and depth limits."""
    g = c.granularity
    return Space.build(parent, granularity=OmegaConf.to_container(g, resolve=True) if OmegaConf.is_config(g) else dict(g),
                       max_width_prune=float(c.max_width_prune), max_depth_prune=float(c.max_depth_prune),
                       protect_kinds=c.protect_kinds)


COUNTS = Sizes.COUNTS


def counter(c: Any):
    """What `prune.target` counts (`prune.count`): all parameters, all but the vocabulary's share, or those one
    token touches (mixture-of-experts layers count their top-k routed experts; = params for a dense model)."""
    kind = c.get("count") or "params"
    if kind not in COUNTS:
        raise ArchError(f"prune.count must be one of {', '.join(COUNTS)}, got {kind!r}")
    return lambda a: a.count_of(kind)


def grid_candidates(parent: Sizes, ranking: Ranking, target: int, c: Any) -> list[Sizes]:
    """Every architecture of the grid whose size (`prune.count`) is within the budget band, largest first."""
    return grid.candidates(parent, build_space(parent, c), ranking, target, counter(c), float(c.tolerance), c.protect_kinds)


def save_pruned(run: RunDir, name: str, child, tok, arch: Sizes, ranking: Ranking, record: dict, *, parent: Sizes,
                config, inputs: dict, fingerprint: dict, force: bool):
    """Write ``prune/<name>/`` (weights, config, tokenizer) atomically with its sidecar, and beside it
    ``<name>.arch.json``, ``<name>.candidates.json`` and the child's ``<name>.ranking.safetensors``;
    point ``prune/latest.json`` at it.

    An existing ``prune/<name>`` is replaced when `force`, when it has no sidecar (a crash came before the
    sidecar: unfinished) or when its sidecar's `fingerprint` is this one (a crash came after it, before
    ``DONE.json``); another run's model of that name is refused, so that no setting silently replaces it."""
    out = run.path("prune", name)
    if out.exists() and not force and not _replaceable(run, out, fingerprint):
        raise FileExistsError(f"{out} exists from another prune (other settings or input); force=true replaces it, "
                              "or set prune.name=<another name>")
    remove_temps(out.parent, (name, "latest.json"))  # what a killed run left half-written
    with run.artifact_dir(f"prune/{name}", stage=STAGE, config=config, inputs=inputs, overwrite=True,
                          fingerprint=fingerprint, arch=arch.to_dict(), params=arch.num_params(),
                          parent_params=parent.num_params()) as (tmp, _):
        child.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # ours go beside the folder: serving engines read every *.safetensors inside it as weights
        write_json(run.beside(out, "arch.json"), arch.to_dict())
        write_json(run.beside(out, "candidates.json"), record)
        # the child's own ranking (identity on widths, the parent's depth order renumbered) lets a
        # later stage prune it again consistently
        run.save_tensors(str(run.beside(out, "ranking.safetensors")), ranking.child(arch).to_tensors(), stage=STAGE)
    point_latest(run, name, arch)
    return out


def point_latest(run: RunDir, name: str, arch: Sizes) -> None:
    """``prune/latest.json``: the model the next stage takes."""
    write_json(run.path("prune/latest.json"), {"name": name, "path": str(run.path("prune", name)), "arch": arch.to_dict(),
                                               "params": arch.num_params()})


def _plain(obj: Any) -> Any:
    return OmegaConf.to_container(obj, resolve=True) if OmegaConf.is_config(obj) else obj


def _replaceable(run: RunDir, out, fingerprint: dict) -> bool:
    side = run.sidecar_path(out)
    return not side.exists() or read_json(side).get("fingerprint") == json.loads(json.dumps(fingerprint))


def finished(run: RunDir, out, fingerprint: dict) -> bool:
    """Whether ``prune/<name>`` and everything beside it are complete and made from this very input: an
    extraction interrupted by a crash skips the budgets it finished."""
    side = run.sidecar_path(out)
    beside = [run.beside(out, a) for a in ("arch.json", "candidates.json", "ranking.safetensors")]
    return (out.is_dir() and all(p.is_file() for p in beside) and side.is_file()
            and read_json(side).get("fingerprint") == json.loads(json.dumps(fingerprint)))


def default_name(arch: Sizes) -> str:
    """e.g. ``hidden3136-ffn12544-mamba96-L42``: every width axis, then the layer count."""
    return "-".join(f"{a.name}{arch.axis_size(a.name)}" for a in arch.axes()) + f"-L{arch.num_layers}"


def run(cfg, run: RunDir) -> dict:
    c = cfg.prune
    remove_temps(run.path(STAGE), [run.done_path(STAGE).name])  # a marker half-written by a killed run
    if c.target is not None and c.arch is not None:
        raise ArchError("set only one of prune.target (a parameter budget, e.g. 0.6) or prune.arch (explicit sizes)")
    # An explicit target or shape wins over `budget` (which a recipe may set for stage=all): the user
    # asked for this one shape from the parent. Otherwise `budget` cuts the search's trained family.
    if c.target is None and c.arch is None:
        if cfg.get("budget") is not None:
            return extract_budgets(cfg, run)
        raise ArchError("set exactly one of prune.target (a parameter budget, e.g. 0.6), prune.arch (explicit sizes) "
                        "or, after the search stage, budget=<b>")
    if c.target is not None:  # a typo in the budget is refused before the parent is loaded
        read_budget(c.target, "prune.target")
    parent_path = resolve_parent_path(cfg)
    tok = load_tokenizer(parent_path)
    model = load_model(parent_path, cfg.parent.dtype, resolve_device(cfg.device))
    kernels.announce(STAGE, model, model.device)
    parent = sizes_from_config(model)
    slice_model = family_for(model).slice_model
    ranking = get_ranking(c.ranking, run, parent, cfg.seed)

    record: dict[str, Any] = {"parent": str(parent_path), "parent_params": parent.num_params(), "ranking": c.ranking}
    if c.arch is not None:
        sizes = OmegaConf.to_container(c.arch, resolve=True) if OmegaConf.is_config(c.arch) else dict(c.arch)
        arch = arch_from_sizes(parent, ranking, sizes, c.protect_kinds)
        record["rule"] = "explicit sizes"
    else:
        target = parse_budget(c.target, counter(c)(parent))
        cands = grid_candidates(parent, ranking, target, c)
        record.update(rule="grid", target=target, count=c.get("count") or "params", grid_matches=len(cands))
        cands = cands[: int(c.num_candidates)]
        batches = None
        if int(c.score_sequences) > 0 and len(cands) > 1:
            batches = token_batches(cfg, tok, "heldout", num_sequences=int(c.score_sequences), batch_size=int(c.score_batch_size))
        arch, scored = grid.pick(model, cands, ranking, batches, slice_model, desc="prune: scoring candidates")
        record["candidates"] = ([{"arch": a.to_dict(), "params": a.num_params(), "heldout_loss": l} for l, a in scored]
                                if scored else [{"arch": a.to_dict(), "params": a.num_params()} for a in cands])

    t0 = time.time()
    child = slice_model(model, arch, ranking)
    name = c.name or default_name(arch)
    record.update(arch=arch.to_dict(), params=arch.num_params(), summary=arch.short(), name=name)
    # what the folder is made of: a rerun after a crash replaces its own unfinished output without force
    fingerprint = {"prune": _plain(c), "parent": _plain(cfg.parent), "parent_path": str(parent_path), "data": _plain(cfg.data),
                   "seed": cfg.seed, "ranking": (run.done_record("importance") or {}).get("fingerprint")
                   if c.ranking == "importance" else c.ranking}
    out = save_pruned(run, name, child, tok, arch, ranking, record, parent=parent, config=c, force=bool(cfg.force),
                      fingerprint=fingerprint, inputs={"parent": str(parent_path), "ranking": c.ranking})
    print(f"prune: {arch.short()} ({arch.num_params() / parent.num_params():.1%} of the parent) -> {out} [{time.time() - t0:.1f}s]")
    return {"name": name, "path": str(out), "params": arch.num_params(), "parent_params": parent.num_params()}


# ---------------------------------------------------------------------------------------------
# extraction after the search stage: `python -m elastic.run stage=prune budget=0.5|[0.5,0.7]|all`
# ---------------------------------------------------------------------------------------------
def parse_budget_list(spec, trained: list[float]) -> list[float]:
    """`budget=0.5`, `budget=[0.5,0.7]` or `budget=all` (every budget the search trained)."""
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return sorted(trained)
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    # fractions only: the search trained (and archs.json keys) fractions of the parent's resource
    out = [read_budget(b, "budget", counts=False) for b in items]
    if not out:
        raise ArchError("budget is an empty list")
    return out


def extract_budgets(cfg, run: RunDir) -> dict:
    """Each budget's architecture from ``search/archs.json`` (an untrained budget: the router's argmax
    on the interpolated budget input), sliced zero-shot from the search's trained elastic checkpoint."""
    from safetensors.torch import load_file

    from elastic.rundir import read_json
    from elastic.stages.search import load_search

    doc, ckpt = load_search(run)
    trained = {float(k): v for k, v in doc["budgets"].items()}
    budgets = parse_budget_list(cfg.budget, list(trained))
    model = load_model(ckpt, cfg.parent.dtype, resolve_device(cfg.device))
    kernels.announce(STAGE, model, model.device)
    tok = load_tokenizer(ckpt)
    ranking = Ranking.from_tensors(load_file(str(run.beside(ckpt, "ranking.safetensors"))))
    parent = sizes_from_config(model)
    slice_model = family_for(model).slice_model
    search = (run.done_record("search") or {}).get("fingerprint")  # which search made the checkpoint's weights
    router = None
    out = {}
    for b in budgets:
        name = (cfg.prune.name if cfg.prune.name and len(budgets) == 1 else None) or f"budget-{b:g}"
        # the budget's model depends on the search's weights, the budget and how they were loaded; a budget
        # finished by an extraction that then crashed is not cut again (`finished` checks this fingerprint)
        fingerprint = {"search": search, "source": str(ckpt), "budget": b, "dtype": str(cfg.parent.dtype)}
        path = run.path(STAGE, name)
        if search is not None and not cfg.force and finished(run, path, fingerprint):
            arch = sizes_from_dict(read_json(run.beside(path, "arch.json")))
            point_latest(run, name, arch)
            print(f"prune: budget {b:g} already extracted by this search -> {path}")
            out[f"{b:g}"] = {"name": name, "path": str(path), "params": arch.num_params(), "parent_params": parent.num_params()}
            continue
        match = [k for k in trained if abs(k - b) < 1e-9]
        if match:
            arch = sizes_from_dict(trained[match[0]]["arch"])
            rule = "search/archs.json"
        else:  # an untrained budget: interpolate the router's one-hot inputs
            if router is None:
                from elastic.router import Router

                rcfg = read_json(run.beside(ckpt, "router.json"))
                router = Router.from_config(rcfg, parent)
                router.load_state_dict(load_file(str(run.beside(ckpt, "router.safetensors"))))
            from elastic.router import Cost

            protect = parent.protected(rcfg["protect_kinds"])
            cost = Cost(router_space(router, parent), [ranking.layers_after_dropping(d, parent.num_layers, protect) for d in router.sizes["depth"]],
                        rcfg["resource"], context=rcfg["context"], batch=rcfg["memory_batch"])
            idx, _ = router.constrained_argmax(b, cost, rcfg["band"])
            size = {a: router.sizes[a][i] for a, i in idx.items()}
            arch = parent.cut(ranking, sizes={a: v for a, v in size.items() if a != "depth"}, drop_layers=size["depth"],
                              protect_kinds=rcfg["protect_kinds"])
            rule = "router argmax (interpolated budget input)"
        arch.check_within(parent)
        child = slice_model(model, arch, ranking)
        rec = {"budget": b, "rule": rule, "source": str(ckpt), "arch": arch.to_dict(), "params": arch.num_params(),
               "parent_params": parent.num_params(), "summary": arch.short(), "name": name}
        path = save_pruned(run, name, child, tok, arch, ranking, rec, parent=parent, config={"budget": b},
                           force=True, fingerprint=fingerprint, inputs={"search": str(ckpt)})
        print(f"prune: budget {b:g} -> {arch.short()} ({arch.num_params() / parent.num_params():.1%} of the parent) -> {path}")
        out[f"{b:g}"] = {"name": name, "path": str(path), "params": arch.num_params(), "parent_params": parent.num_params()}
    return {"extracted": out}


def router_space(router, parent: Sizes) -> Space:
    z = router.sizes
    return Space(parent=parent, choices={a: tuple(v) for a, v in z.items() if a != "depth"}, drops=tuple(z["depth"]))
