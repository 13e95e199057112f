"""Stage `search`: Nemotron Elastic -- a router picks a sub-network per budget, all trained at once.

    python -m elastic.run stage=search run_dir=RUN                       # after stage=importance
    python -m elastic.run stage=search 'search.budgets=[0.5,0.7,1.0]' search.steps=90    # the toy default, ~45 s on 2 CPU cores
    python -m elastic.run stage=prune budget=all run_dir=RUN             # then cut every budget out, zero-shot

Setup: the parent is reordered by the importance ranking (its family's `Elastic.from_parent`), so every
sub-network is a prefix of each axis; a `Router` maps each budget to a distribution over every
axis's choices (`Space`, the same choice grid as the prune stage). Each micro-batch of an optimizer
step on each process (its random decisions are a function of ``(seed, step, micro-batch, process)``
only, so a resumed run with the same process count makes the same ones):

1. with probability ``full_model_share`` (null: see `full_model_share`) the full model trains (no
   masks); otherwise a budget is drawn -- uniformly during the first ``phase1_share`` of the steps,
   then with ``phase2_weights`` (largest budget first; the paper's 0.5 / 0.3 / 0.2). With gradient
   accumulation and data parallelism (each process draws its own) one optimizer step therefore
   blends several budgets' gradients (as slimmable networks accumulate every width's before
   updating) instead of jerking the shared weights toward one budget at a time;
2. the router samples an architecture by Gumbel-softmax (soft masks, a straight-through hard
   sample with probability ``hard_prob``); temperature and logit scale follow `router.Schedule`;
3. loss = forward KL(frozen parent || masked student) on the logits + ``lambda_budget`` x the budget
   loss of the expected architecture; the router (lr ``router.lr``) and the model (lr ``lr``) train
   together through `elastic.train.train` -- the one training loop of the project (checkpoints hold
   the one set of weights + the router; exact resume);
4. settle (the last ``settle_share`` of the steps; our addition, not in the paper): the router is
   frozen and a drawn budget trains with the hard mask of exactly the architecture that will be
   extracted (`Router.constrained_argmax`). Without it the weights are trained on soft mixtures
   around the router's argmax, and when that argmax is outside the budget's band the extracted
   in-band neighbour has seen little training (measured in benchmarks/search_toy.md).

Router prior (``search.router.prior=grid``, our addition, off by default): before training, each budget's
grid shape -- the prune stage's rule (`elastic.grid`) applied to the search's own space and resource, the
``prior_candidates`` largest in-band architectures scored by held-out loss -- is added to that budget's router
logits with weight ``prior_strength`` (`Router.set_prior`). The router starts where the grid ends and leaves the
grid's shape only when its trained logits outweigh the prior. Why: with an uninformed router, the distillation
loss pulls every axis toward its largest choice and the budget loss pulls hardest on the axis whose step removes
the most resource -- the residual stream (one hidden step removes ~4x the parameters of one FFN step on SmolLM2)
-- which is also the most damaging cut (benchmarks/router_ablation.md).

Outputs: ``search/elastic/`` (plain HF checkpoint of the importance-ordered, trained weights) and beside
it ``search/elastic.ranking.safetensors``, ``elastic.router.safetensors``, ``elastic.router.json``; ``search/archs.json`` (per budget
the router's argmax architecture, ``params``, ``parent_params``, the cost when the resource is memory, the
held-out loss of the hard-masked model; ``prior``: the grid shape each budget started from), ``search/widths.png`` (chosen sizes per budget over
training) and ``search/logs/`` (tensorboard / wandb offline / metrics.jsonl).

Crash-resume: checkpoints (the last step's included) stay until ``archs.json``, written last with the run's
fingerprint in its sidecar, is on disk; the weights are written before any scoring. So a rerun after a crash
resumes training, or resumes the last checkpoint with no step left and rewrites the outputs, or -- every
output written, only DONE missing -- returns without training; each path gives the uninterrupted results.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, NamedTuple

import torch
from omegaconf import OmegaConf
from torch import nn

from elastic.arch import ArchError, sizes_from_config, sizes_from_dict
from elastic.models import family_for
from elastic.models.family import ElasticBase
from elastic.router import Cost, Router, Schedule, budget_loss, check_budgets
from elastic.rundir import RunDir, write_json
from elastic.schedule import settle_steps  # noqa: F401 - shared with the plan, which prices the router steps
from elastic.search_space import Space

STAGE = "search"


def budget_name(b: float | None) -> str:
    return "full" if b is None else f"b{b:g}"


# ---------------------------------------------------------------------------------------------
# building blocks (plain arguments; used by the stage, the tests and the benchmark)
# ---------------------------------------------------------------------------------------------
def build_space(parent, c) -> Space:
    """The per-axis choices from `search.granularity` / limits, or explicit `search.choices` lists."""
    g = c.granularity
    space = Space.build(
        parent, granularity=OmegaConf.to_container(g, resolve=True) if OmegaConf.is_config(g) else dict(g),
        max_width_prune=float(c.max_width_prune), max_depth_prune=float(c.max_depth_prune), protect_kinds=c.protect_kinds,
    )
    explicit = {k: v for k, v in (c.get("choices") or {}).items() if v is not None}
    if explicit:
        try:  # with_choices names any key this family has no axis for (typos included)
            space = space.with_choices(explicit, c.protect_kinds)
        except ArchError as e:
            raise ArchError(f"search.choices: {e}") from None
    return space


def full_model_share(share, budgets) -> float:
    """The share of steps that train the unmasked full model; ``None`` = one more member of the family:
    0 when budget 1.0 is listed (its steps are the full model's), else ``1 / (len(budgets) + 1)``.

    The paper samples the full model ~1/3 of the steps next to two smaller budgets, i.e. uniformly with
    them; a fixed 1/3 on top of a listed 1.0 budget would train the model that needs it least over half
    of the time.
    """
    if share is not None:
        return float(share)
    return 0.0 if any(math.isclose(float(b), 1.0) for b in budgets) else 1.0 / (len(budgets) + 1)


class SearchModel(nn.Module):
    """The elastic model and the router in one module, so one optimizer / DDP wrap trains both.

    ``forward(input_ids, step)`` draws this micro-batch's budget and architecture and returns
    a `SearchOutput` (hidden states, KD loss, budget loss, info). Each micro-batch of a step draws its own budget (the k-th forward
    of a step is micro-batch k), so with gradient accumulation one optimizer step blends several
    budgets' gradients instead of following one budget at a time. Under data parallelism process r of
    W draws for the global micro-batch slot ``micro * W + r``, so the processes train different
    budgets and one step blends W times as many draws (one process: slot = micro, as before).
    """

    def __init__(self, elastic: ElasticBase, router: Router, cost: Cost, schedule: Schedule, c, seed: int):
        super().__init__()
        self.elastic, self.router, self.cost, self.schedule = elastic, router, cost, schedule
        self.seed = int(seed)
        self.steps = int(c.steps)
        self.full_share, self.hard_prob = full_model_share(c.full_model_share, router.budgets), float(c.hard_prob)
        self.phase1_steps = int(round(float(c.phase1_share) * self.steps))
        self.settle_start = self.steps - settle_steps(c)
        self.band = float(c.band)
        n = len(router.budgets)
        w = c.get("phase2_weights")
        if w is None:  # largest budget first: the paper's 0.5/0.3/0.2 for three, rank-proportional otherwise
            w = [0.5, 0.3, 0.2] if n == 3 else [n - i for i in range(n)]
        w = [float(x) for x in w]
        if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
            raise ArchError(f"search.phase2_weights needs {n} non-negative weights (largest budget first), got {w}")
        self.phase2 = torch.tensor(w[::-1]) / sum(w)  # aligned with router.budgets (ascending)
        self.temperature = float(c.get("temperature", 1.0))
        self.loss_chunk_size = int(c.get("loss_chunk_size") or 1024)
        self._step, self._micro = None, 0  # which forward of the current step this is (not state: a step restarts it)
        self.rank, self.world = 0, 1  # this process and the process count (set_process): the draws' slot

    def set_process(self, rank: int, world: int) -> None:
        """Draw as process `rank` of `world` (data parallelism): each process its own budgets."""
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"process {rank} of {world}")
        self.rank, self.world = int(rank), int(world)

    def plan(self, step: int, micro: int = 0) -> tuple[float | None, bool, torch.Generator]:
        """Micro-batch `micro` of `step` on this process: its budget (None = full model), whether the
        sample is hard, and its noise generator -- a function of (seed, step, slot) only, slot = micro x
        processes + rank, so a resumed run with the same process count draws the same."""
        slot = int(micro) * self.world + self.rank
        if slot >= 1024:  # the seed packs (step, slot) as step * 1024 + slot
            raise ValueError(f"search: {slot + 1} micro-batch draws per step (micro-batches x processes) exceed 1024; "
                             "raise search.micro_batch_size")
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) * 1024 + slot)
        if float(torch.rand((), generator=g)) < self.full_share:
            return None, False, g
        n = len(self.router.budgets)
        probs = torch.full((n,), 1.0 / n) if step < self.phase1_steps else self.phase2
        b = self.router.budgets[int(torch.multinomial(probs, 1, generator=g))]
        hard = float(torch.rand((), generator=g)) < self.hard_prob
        return b, hard, g

    def forward(self, input_ids: torch.Tensor, step: int, teacher_hidden: torch.Tensor | None = None,
                teacher_head: torch.Tensor | None = None) -> "SearchOutput":
        """Draw this micro-batch's sub-network, run it, and (given the teacher's final hidden states and
        head) compute the chunked KD loss here, inside the module's forward: DDP/FSDP only see parameter
        uses that happen in it (FSDP gathers ``lm_head`` for this forward), and the logits are built a
        ``loss_chunk_size`` chunk of tokens at a time, never as ``[batch, seq, vocab]``."""
        from elastic.losses import chunked_kd_loss, hidden_states

        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        budget, hard, g = self.plan(step, self._micro)
        info: dict[str, Any] = {"budget": budget, "tau": self.schedule.tau(step), "scale": self.schedule.scale(step)}
        if budget is None:
            self.elastic.set_full()
            bl = input_ids.new_zeros((), dtype=torch.float32)
        elif step >= self.settle_start:
            # settle: the router is frozen (it gets no gradient) and the budget trains exactly the
            # architecture that extraction will cut out -- the constrained argmax of `chosen_archs`
            idx, _ = self.router.constrained_argmax(budget, self.cost, self.band)
            self.elastic.set_indices(idx)
            bl = input_ids.new_zeros((), dtype=torch.float32)
            info["ratio"] = self.cost.of_arch(self.elastic.arch_from_indices(idx)) / (budget * self.cost.full)
        else:
            probs = self.router.sample(budget, tau=info["tau"], scale=info["scale"], hard=hard, generator=g)
            self.elastic.set_probs(**probs)
            bl, ratio = budget_loss(self.cost.expected(probs), budget, self.cost.full, self.band)
            bl = bl.float()
            info["ratio"] = ratio.detach() if isinstance(ratio, torch.Tensor) else float(ratio)  # no host sync
        try:
            hidden = hidden_states(self.elastic.model, input_ids)  # masked final norm included
            kd = None
            if teacher_hidden is not None:
                kd = chunked_kd_loss(hidden, teacher_hidden, self.elastic.model.get_output_embeddings(), teacher_head,
                                     temperature=self.temperature, chunk_size=self.loss_chunk_size)
        finally:
            # blocks captured their masks for any recompute in backward (activation checkpointing)
            self.elastic.set_full()
        return SearchOutput(hidden, kd, bl, info)


class SearchOutput(NamedTuple):
    """What `SearchModel.forward` returns: the masked model's final hidden states, the KD loss (None
    without a teacher), the budget loss and what was drawn."""

    hidden: torch.Tensor
    kd: Any
    budget_loss: torch.Tensor
    info: dict


def make_cost(parent, ranking, space: Space, c) -> Cost:
    """The budget's resource over `space`, depth choices dropping the least important unprotected layers."""
    protect = parent.protected(c.protect_kinds)
    kept = [ranking.layers_after_dropping(d, parent.num_layers, protect) for d in space.drops]
    return Cost(space, kept, c.resource, context=int(c.context), batch=int(c.memory_batch))


def grid_prior(parent_model, ranking, c, batches=None) -> dict[float, dict]:
    """``search.router.prior=grid``: per budget, the shape the prune stage's rule picks from the search's own
    space (every architecture within the band below the budget, the ``prior_candidates`` largest scored by
    held-out loss on `batches`; None = the largest, unscored), as choice indices per axis (depth included)."""
    from elastic import grid

    parent = sizes_from_config(parent_model)
    space = build_space(parent, c)
    cost = make_cost(parent, ranking, space, c)
    slice_model = family_for(parent_model).slice_model
    out = {}
    for b in check_budgets(c.budgets):
        cands = grid.candidates(parent, space, ranking, b * cost.full, cost.of_arch, float(c.band), c.protect_kinds)
        cands = cands[: max(1, int(c.router.prior_candidates))]
        arch, scored = grid.pick(parent_model, cands, ranking, batches, slice_model, desc=f"search: grid prior, budget {b:g}")
        idx = {a: space.choices[a].index(arch.axis_size(a)) for a in space.choices}
        idx["depth"] = space.drops.index(parent.num_layers - arch.num_layers)
        out[b] = {"choices": idx, "arch": arch.to_dict(), "summary": arch.short(), "ratio": cost.of_arch(arch) / (b * cost.full),
                  "candidates": [{"summary": a.short(), "heldout_loss": l} for l, a in scored] if scored else None}
    return out


def make_search_model(parent_model, ranking, c, seed: int, prior: dict[float, dict] | None = None) -> SearchModel:
    parent = sizes_from_config(parent_model)
    budgets = check_budgets(c.budgets)
    space = build_space(parent, c)
    elastic = family_for(parent_model).Elastic.from_parent(parent_model, ranking, space, c.protect_kinds)
    cost = Cost(space, elastic.kept_layers, c.resource, context=int(c.context), batch=int(c.memory_batch))
    r = c.router
    with torch.random.fork_rng(devices=[]):  # the router's init depends on the seed only, not on what ran before
        torch.manual_seed(int(seed))
        router = Router(budgets, space, hidden=int(r.hidden), init_std=float(r.init_std))
    for b, rec in (prior or {}).items():
        router.set_prior(b, rec["choices"], float(r.prior_strength))
    # the temperature and logit scale anneal over the router's part of the run; it is frozen while settling
    router_steps = max(1, int(c.steps) - settle_steps(c))
    schedule = Schedule(router_steps, tau0=float(c.tau0), tau_min=float(c.tau_min),
                        decay=None if c.tau_decay is None else float(c.tau_decay), scale_max=float(c.logit_scale_max))
    return SearchModel(elastic, router, cost, schedule, c, seed)


def chosen_archs(sm: SearchModel, budgets=None) -> dict[float, dict]:
    """The router's argmax architecture per budget, with its cost."""
    out = {}
    parent_params = sm.elastic.arch.num_params()
    for b in budgets or sm.router.budgets:
        raw = sm.router.argmax(b)
        idx, constrained = sm.router.constrained_argmax(b, sm.cost, sm.band)
        arch = sm.elastic.arch_from_indices(idx)
        cost = sm.cost.of_arch(arch)
        # the plain per-axis argmax, costed from its sizes: it may be a combination the model class refuses
        raw_sizes = {a: sm.router.sizes[a][i] for a, i in raw.items() if a != "depth"}
        raw_counts = sm.cost.kind_counts[raw["depth"]]
        raw_params = int(sm.elastic.arch.params_of(raw_sizes, dict(zip(sm.cost.kinds, raw_counts.tolist()))))
        rec = {
            "arch": arch.to_dict(), "summary": arch.short(), "params": arch.num_params(), "parent_params": parent_params,
            "ratio": cost / (b * sm.cost.full), "choices": {a: sm.router.sizes[a][i] for a, i in idx.items()},
            "rule": "most probable architecture within the band" if constrained else "most probable architecture (nothing in the band)",
            "argmax": {"choices": {a: sm.router.sizes[a][i] for a, i in raw.items()}, "params": raw_params,
                       "ratio": float(sm.cost.of_sizes(raw_sizes, raw_counts)) / (b * sm.cost.full)},
        }
        rec["within_band"] = abs(rec["ratio"] - 1) <= sm.band
        if sm.cost.resource == "memory":
            rec.update(memory_bytes=cost, parent_memory_bytes=sm.cost.full,
                       memory_context=sm.cost.context, memory_batch=sm.cost.batch)
        out[b] = rec
    return out


def param_groups_fn(c):
    from elastic.train import default_param_groups

    def groups(model: SearchModel) -> list[dict]:
        out = [{"params": list(model.router.parameters()), "lr": float(c.router.lr), "weight_decay": 0.0,
                "warmup_steps": int(c.router.warmup_steps), "min_lr_ratio": 1.0, "name": "router"}]
        for g in default_param_groups(model.elastic):
            g.update(lr=float(c.lr), name=f"model_{g['name']}")
            out.append(g)
        return out

    return groups


def make_step_fn(accelerator, c):
    from elastic.losses import hidden_states

    lam = float(c.lambda_budget)
    log_choices_every = max(1, int(c.log_choices_every))

    def step_fn(batch, model, teacher, step):
        with torch.no_grad():
            t_hidden = hidden_states(teacher, batch)
        out = model(batch, step, t_hidden, teacher.get_output_embeddings().weight)
        kd, bl, info = out.kd, out.budget_loss, out.info
        loss = kd.loss + lam * bl
        name = budget_name(info["budget"])
        # metrics stay tensors: the loop sums them on the device and reads them back once per log window
        kl = kd.kl.detach() if isinstance(kd.kl, torch.Tensor) else kd.kl
        m = {"kl": kl, f"kl/{name}": kl, "tau": info["tau"], "logit_scale": info["scale"]}
        if info["budget"] is not None:
            m.update({"budget_loss": bl.detach(), f"budget_loss/{name}": bl.detach(), f"cost_ratio/{name}": info["ratio"]})
        sm = accelerator.unwrap_model(model)
        # the router does not change within a step: its decode (which reads the router back) once, on micro-batch 0
        if sm._micro == 0 and (step % log_choices_every == 0 or step == int(c.steps) - 1):
            for b in sm.router.budgets:  # what extraction would cut out now (the in-band decode of the router)
                idx, _ = sm.router.constrained_argmax(b, sm.cost, sm.band)
                for axis, i in idx.items():
                    m[f"choice/{budget_name(b)}/{axis}"] = float(sm.router.sizes[axis][i])
        return loss, m

    return step_fn


def train_batches(cfg, tok, batch_size: int, micro_batch_size: int, seq_len: int, num_sequences: int,
                  rank: int = 0, world_size: int = 1):
    """This process's share of the search's training stream (`search.sources` / `search.streaming`, as
    distill reads its own), step by step."""
    from elastic.inputs import training_stream
    from elastic.train import StepBatches

    return StepBatches(training_stream(cfg, tok, "search", seq_len, num_sequences=num_sequences),
                       batch_size=batch_size, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size)


def plot_choices(history: list[dict], budgets, path, labels: dict[str, str]) -> None:
    """Chosen size per axis per budget over training (the in-band decode that extraction would take);
    `labels` maps each axis (depth included) to its plot title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(labels)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, axis in zip(axes, names):
        for b in budgets:
            key = f"choice/{budget_name(b)}/{axis}"
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.step(*zip(*pts), where="post", label=f"budget {b:g}")
        ax.set_title(labels[axis])
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# search.* keys that do not change the trajectory (weights, router, draws) of a run: memory and speed
# (activation checkpointing, the loss's chunk), logging, checkpointing and the final scoring. A run resumes
# across a change of these -- after an out-of-memory crash the first fix is often one of them -- while any
# other key (a new one included, until it is listed here) makes its checkpoints another run's.
HARMLESS_KEYS = ("resume", "fail_at_step", "gradient_checkpointing", "loss_chunk_size", "eval_sequences", "log_every",
                 "log_choices_every", "checkpoint_every", "tracking_backends")


def trajectory_settings(c) -> dict:
    """The `search` section minus `HARMLESS_KEYS`: the part of the resume fingerprint it contributes."""
    return {k: v for k, v in OmegaConf.to_container(c, resolve=True).items() if k not in HARMLESS_KEYS}


def validate_config(c) -> None:
    check_budgets(c.budgets)
    for key in ("full_model_share", "hard_prob", "phase1_share", "settle_share"):
        if c.get(key) is not None and not 0.0 <= float(c[key]) <= 1.0:
            raise ArchError(f"search.{key} must be in [0, 1], got {c[key]}")
    if int(c.steps) < 1:
        raise ArchError(f"search.steps must be >= 1, got {c.steps}")
    from elastic.router import RESOURCES

    if c.resource not in RESOURCES:
        raise ArchError(f"search.resource must be one of {', '.join(RESOURCES)}, got {c.resource!r}")


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run(cfg, run: RunDir) -> dict:
    from elastic import tracking
    from elastic.inputs import heldout_loss, stream_spec, token_batches
    from elastic.parallel import is_main_rank, load_frozen, materialize, resolve_strategy, resolve_teacher_mode, skeleton
    from elastic.parent import (checkpoint_dtype, load_model, load_tokenizer, resolve_parent_path, save_checkpoint,
                                torch_dtype)
    from elastic.stages.importance import load_ranking
    from elastic.train import TrainConfig, clear_checkpoints, gather_state_dict, make_accelerator, preflight, train
    from transformers import AutoConfig

    c = cfg.search
    validate_config(c)
    t0 = time.time()
    parent_path = resolve_parent_path(cfg)
    tok = load_tokenizer(parent_path)
    ranking = load_ranking(run)
    parent = sizes_from_config(AutoConfig.from_pretrained(parent_path))
    # what the checkpoints belong to (compared on resume): the trajectory's inputs only
    fingerprint = {
        "parent": str(parent_path), "parent_arch": parent.to_dict(), "search": trajectory_settings(c),
        "seed": int(cfg.seed), "data": stream_spec(cfg, "search", int(c.seq_len)),
        "ranking": hashlib.sha256(run.path("importance/ranking.safetensors").read_bytes()).hexdigest()[:16],
    }
    # what the outputs belong to (compared before skipping a finished search): the scores depend on the eval size too
    outputs_fingerprint = fingerprint | {"eval_sequences": int(c.eval_sequences)}
    done = finished(run, outputs_fingerprint)
    if done is not None and not cfg.get("force", False):
        # every output was written (archs.json is the last) but the run died before DONE: nothing to redo
        print(f"[search] outputs already written by this run (force=true reruns it): {run.path('search/archs.json')}")
        return _summary(run, done, time.time() - t0)

    tcfg = cfg.get("tracking") or OmegaConf.create({"backends": list(c.get("tracking_backends") or [])})
    from accelerate.utils import DistributedDataParallelKwargs

    # full-model and settle steps leave the router without gradient: DDP must not wait for it
    acc = make_accelerator(device=cfg.device, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                           **tracking.accelerator_kwargs(tcfg, run.path("search/logs")))
    strategy = resolve_strategy(cfg, STAGE, acc)
    teacher_mode = resolve_teacher_mode(cfg, STAGE, acc, strategy)
    preflight(cfg, STAGE, acc)
    mixed = "bf16" if acc.device.type == "cuda" else "no"
    # data first: bad data is one error line, before any model is loaded or tracker run started
    batches = train_batches(cfg, tok, int(c.batch_size), int(c.micro_batch_size), int(c.seq_len), int(c.train_sequences),
                            rank=acc.process_index, world_size=acc.num_processes)

    ranking.validate(parent)
    # Several processes: process 0 alone reads the parent (the bf16 teacher, then the fp32 student and its
    # importance-reordered copy, ~90 GB for the 9B); the others build both on the meta device and get the weights
    # by broadcast into their shards (issue #20, defect 5). The teacher's host copy goes once broadcast, the
    # parent's as soon as it is reordered, the reordered one once broadcast (in `train`'s on_prepared).
    teacher = load_frozen(parent_path, torch_dtype(cfg.parent.dtype), acc.device, shard=teacher_mode == "shard")
    multi = acc.num_processes > 1
    host: list[dict | None] = [None]

    def prior_of(model) -> dict | None:
        """The grid's shape per budget (`search.router.prior`), before the model is reordered into the elastic one."""
        if c.router.get("prior") in (None, "none"):
            return None
        if c.router.prior != "grid":
            raise ArchError(f"search.router.prior must be null or grid, got {c.router.prior!r}")
        n = int(c.router.prior_score_sequences)
        held = token_batches(cfg, tok, "heldout", num_sequences=n, batch_size=int(c.micro_batch_size), seq_len=int(c.seq_len)) if n else None
        return grid_prior(model, ranking, c, held)

    if multi:
        prior = [None]
        if is_main_rank():
            model = load_model(parent_path, "float32", "cpu")
            prior[0] = prior_of(model)
            host[0] = make_search_model(model, ranking, c, int(cfg.seed), prior[0]).state_dict()
        torch.distributed.broadcast_object_list(prior, src=0)  # every process's router starts at the same prior
        prior = prior[0]
        sm = make_search_model(skeleton(parent_path, torch.float32), ranking, c, int(cfg.seed), prior)
    else:
        model = load_model(parent_path, "float32", "cpu")
        prior = prior_of(model)
        sm = make_search_model(model, ranking, c, int(cfg.seed), prior)
        del model

    def fill(prepared):  # the model is sharded (FSDP) or still whole (DDP): its meta parameters get memory here
        if multi:
            materialize(prepared, host[0], acc.device)
            host[0] = None
    tracking.init_trackers(acc, tcfg, run_name="search", config=c)
    sm.set_process(acc.process_index, acc.num_processes)
    tc = TrainConfig(
        max_steps=int(c.steps), lr=float(c.lr), warmup_steps=int(c.warmup_steps), min_lr_ratio=float(c.min_lr_ratio),
        weight_decay=float(c.weight_decay), grad_clip=float(c.grad_clip) or None, checkpoint_every=int(c.checkpoint_every),
        resume=c.resume, log_every=int(c.log_every), seed=int(cfg.seed), desc="search",
        fail_at_step=c.get("fail_at_step"), gradient_checkpointing=bool(c.get("gradient_checkpointing", False)),
    )
    result = train(sm, make_step_fn(acc, c), batches, tc, accelerator=acc, checkpoint_dir=run.path("search/checkpoints"),
                   teacher=teacher, param_groups=param_groups_fn(c), fingerprint=fingerprint, strategy=strategy,
                   mixed_precision=mixed, replicated_params=lambda m: list(m.router.parameters()), on_prepared=fill)
    sm = acc.unwrap_model(result.model)
    sm.eval()
    archs = chosen_archs(sm)  # the router is whole on every process

    # The trained elastic weights, whole, in the parent's dtype, on the main process only (FSDP gathers
    # one tensor at a time): saved FIRST, so scoring below can fail without losing the search.
    save_dtype = checkpoint_dtype(parent_path)
    state = gather_state_dict(acc, result.model, prefix="elastic.model.", dtype=save_dtype)
    meta = dict(stage=STAGE, config=c, inputs={"parent": str(parent_path), "ranking": "importance"})
    elastic_model = None
    if acc.is_main_process:
        ckpt = run.path("search/elastic")
        with run.artifact_dir("search/elastic", overwrite=True, arch=parent.to_dict(), **meta) as (tmp, _):
            save_checkpoint(sm.elastic.model.config, state, tmp, dtype=save_dtype, tokenizer=tok)
            # ranking and router go beside the HF folder (search/elastic.<artifact>): engines read every *.safetensors inside it
            run.save_tensors(str(run.beside(ckpt, "ranking.safetensors")), sm.elastic.ranking.to_tensors(), **meta)
            run.save_tensors(str(run.beside(ckpt, "router.safetensors")), sm.router.state_dict(), **meta)
            write_json(run.beside(ckpt, "router.json"), sm.router.config() | {
                "resource": sm.cost.resource, "context": sm.cost.context, "memory_batch": sm.cost.batch, "band": sm.band,
                "protect_kinds": sm.elastic.protect_kinds})
        # the saved checkpoint, reloaded as a plain model (the gathered tensors are freed): budgets are sliced from it for scoring
        elastic_model = load_model(run.path("search/elastic"), save_dtype, acc.device)
        del state

    archs_parent = None
    if int(c.eval_sequences) > 0:
        eval_bs = int(c.micro_batch_size)
        held = token_batches(cfg, tok, "heldout", num_sequences=int(c.eval_sequences), batch_size=eval_bs, seq_len=int(c.seq_len))
        archs_parent = heldout_loss(teacher, held)  # every process: a sharded teacher needs them all
        if acc.is_main_process:
            for b, rec in archs.items():
                child = family_for(elastic_model).slice_model(elastic_model, sizes_from_dict(rec["arch"]), sm.elastic.ranking)
                rec["heldout_loss"] = heldout_loss(child, held)
                del child

    # under data parallelism every process holds the same router: one writes, all wait for it. archs.json goes
    # last (with the fingerprint in its sidecar): once it exists every output does, and a rerun skips the search
    if acc.is_main_process:
        doc = {
            "resource": sm.cost.resource, "parent_params": parent.num_params(), "parent_cost": sm.cost.full,
            "parent_heldout_loss": archs_parent, "checkpoint": "search/elastic", "steps": result.steps,
            "tokens": result.tokens, "strategy": strategy, "budgets": {f"{b:g}": rec for b, rec in archs.items()},
            "prior": {f"{b:g}": rec for b, rec in prior.items()} if prior else None,
        }
        run.save_json("search/history.json", result.history, **meta)
        labels = {a.name: a.label for a in parent.axes()} | {"depth": "layers dropped"}
        plot_choices(result.history, sm.router.budgets, run.path("search/widths.png"), labels)
        run.save_json("search/archs.json", doc, fingerprint=outputs_fingerprint, **meta)
        # only now: until archs.json exists a rerun resumes the final-step checkpoint (no training left)
        clear_checkpoints(run.path("search/checkpoints"))
    acc.wait_for_everyone()
    acc.end_training()  # last: it also tears down the process group the barrier above needs
    for b, rec in archs.items():
        flag = "" if rec["within_band"] else f"  (outside the {sm.band:.0%} band!)"
        acc.print(f"search: budget {b:g}: {rec['summary']} = {rec['ratio'] * b:.1%} of the parent's {sm.cost.resource}{flag}")
    return _summary(run, {"steps": result.steps, "budgets": {f"{b:g}": r for b, r in archs.items()}}, time.time() - t0)


def finished(run: RunDir, fingerprint: dict) -> dict | None:
    """archs.json of a search with this fingerprint whose outputs are all written, or None."""
    from elastic.rundir import read_json, to_jsonable

    archs = run.path("search/archs.json")
    if not (run.is_complete(archs) and run.is_complete("search/elastic")):
        return None
    if run.read_sidecar(archs).get("fingerprint") != json.loads(json.dumps(to_jsonable(fingerprint))):
        return None
    return read_json(archs)


def _summary(run: RunDir, doc: dict, seconds: float) -> dict:
    return {
        "archs": str(run.path("search/archs.json")), "steps": doc["steps"], "seconds": round(seconds, 1),
        "budgets": {b: {"params": r["params"], "ratio": round(r["ratio"], 4)} for b, r in doc["budgets"].items()},
    }


def load_search(run: RunDir):
    """(archs.json document, path of the elastic checkpoint) of a finished search stage."""
    from elastic.rundir import read_json

    p = run.path("search/archs.json")
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run `python -m elastic.run stage=search run_dir={run.root}` first")
    return read_json(p), run.path("search/elastic")
