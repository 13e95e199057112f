"""`stage=plan` and the pre-flight check: per-GPU memory, tokens, FLOPs and GPU-hours of every stage, from the config alone.

Nothing is loaded: the parent's `config.json` gives its family's sizes (`parent.path` may be a folder
holding only that file), the student of each stage is derived from the config (search: the parent
itself, masked; distill: ``prune.arch``, ``prune.target`` or the searched ``budget``), and every
parameter count comes from the sizes' ``num_params`` / ``layer_params``.

This module models the training step for any family; what one block keeps and needs comes from the
family's memory model, reached through the registry (``elastic.models.<family>.plan_model``; NemotronH:
``elastic/models/nemotron_h/plan.py``): bytes saved per token per layer kind, the sequence mixer's
transient workspace on each kernel path, one block's transient, the matmul parameters and the mixer's
FLOPs, and the grid's largest architecture within a budget. A family without one gets a clear error
from ``stage=plan`` and an unchecked pre-flight.

The training step modelled (what ``stages/search.py`` and ``stages/distill.py`` run):

* the student's trainable weights are fp32 master weights with bf16 compute. ``ddp`` (or one
  process): every GPU holds fp32 weights + fp32 gradients + AdamW's two fp32 moments, DDP's
  gradient buckets (about one more copy of the fp32 gradients) and, while the forward runs under
  autocast, a bf16 copy of every matmul weight (autocast's weight cache). ``fsdp`` (torch FSDP2
  ``fully_shard`` on every decoder block and the root; ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``, ``reshard_after_forward=True``): weights, gradients and moments / N, plus the
  all-gathered bf16 weights of two blocks (current + prefetch) and of the root group (embeddings,
  the final norm, the LM head), and one block's unsharded gradient (bf16 + its fp32 copy for the reduce).
* the frozen teacher in bf16: replicated (2 bytes x P per GPU) or FSDP2-sharded (2 P / N + two
  gathered blocks + its root group).
* activations: what autograd keeps for the backward, per layer kind (the family's
  ``saved_per_token``, read off transformers' modules); with activation checkpointing only each
  block's input is kept and one block is recomputed at a time. Under autocast with fp32 weights the
  residual stream is fp32 (NemotronH's block casts its input to the norm weight's dtype); under FSDP's
  bf16 params it is bf16.
* the KD loss: final hidden states of student and teacher, logits ``loss_chunk_size`` tokens at a
  time (``losses.chunked_kd_loss``): about 7 (forward) to 9.5 (backward) fp32 ``chunk x vocab`` tensors at once.
* the sequence mixer's workspace on the kernel path that runs (``plan.mamba_path``; the family's
  ``workspace``; term ``mamba_scan``): NemotronH's fused Mamba-2 kernel (mamba-ssm: chunk states only)
  or transformers' pure-torch ``mamba2_chunk_scan``, whose segment sums ``[B, heads, S/Q, Q, Q]`` in
  fp32 grow with the context.

Peak per GPU = the largest of the step's moments (`StagePlan.phases`): the teacher's forward, the
student's forward (bf16 weight copies + activations + one layer's workspace), the loss's forward and
backward (activations + logits chunks), the blocks' backward (activations + lm_head's gradient + one
layer's backward workspace) and the optimizer step (all gradients), each on top of the fixed state
(weights, AdamW moments, teacher, DDP buckets or FSDP-gathered blocks). Matmuls and einsums run in bf16
under autocast (accelerate's ``mixed_precision=bf16``, also under FSDP). Left out: the CUDA context,
NCCL buffers and allocator fragmentation (``plan.reserve_gib``), tensors smaller than one token's row,
the data loader. `tests/test_plan.py` checks the peak against fake-tensor traces of the project's own
steps (within 15%; measured 0-11% above, `benchmarks/plan_9b_to_4b.md`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elastic.arch import ArchError, human_count
from elastic.models.family import Sizes as Arch  # any family's sizes type
from elastic.schedule import parse_phases

GiB = 2**30
FP32, BF16 = 4, 2


class PlanError(ValueError):
    """A stage that does not fit: names the overflowing term and the config key to change."""


class NoMemoryModel(PlanError):
    """The parent's family declares no memory model (`plan_model`): nothing can be planned or checked."""


# ------------------------------------------------------------------------------------------------ config


def _get(cfg, dotted: str, default=None):
    from omegaconf import OmegaConf

    try:
        v = OmegaConf.select(cfg, dotted, default=default, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - a missing mandatory value reads as unset here
        return default
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    return default if v is None else v


def parent_config(cfg) -> dict:
    """The parent's config.json (the only file the plan reads)."""
    from elastic.parent import resolve_parent_path

    path = Path(resolve_parent_path(cfg)) if _get(cfg, "parent.path") is None else Path(str(cfg.parent.path)).expanduser()
    f = path / "config.json" if path.is_dir() else path
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: parent.path must be a checkpoint folder (config.json is enough for stage=plan)")
    return json.loads(f.read_text())


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}.get(str(name), 4)


def plan_model(config: dict):
    """The memory/FLOP model of the parent's family (`elastic.models.<family>.plan_model`); a clear
    error for a family that has none yet."""
    from elastic.models import family_for, model_type_of

    model = getattr(family_for(config), "plan_model", None)
    if model is None:
        raise NoMemoryModel(f"stage=plan has no memory model for model_type {model_type_of(config)!r} yet "
                            "(the pre-flight memory check is skipped for it)")
    return model


def plan_model_of(sizes):
    """The plan model whose sizes type `sizes` is (by the model type it carries, when it carries one)."""
    from elastic.models import FAMILIES, family_for

    model_type = getattr(sizes, "MODEL_TYPE", None) or getattr(sizes, "model_type", None)
    if model_type is not None:
        return plan_model({"model_type": model_type})
    for name in FAMILIES:
        model = getattr(family_for(name), "plan_model", None)
        if model is not None and isinstance(sizes, model.SIZES):
            return model
    raise NoMemoryModel(f"stage=plan has no memory model for {type(sizes).__name__} sizes yet")


def _install_command(model) -> str:
    """The plan model's command that installs the family's fused kernels ("" when it has none)."""
    return getattr(getattr(model, "kernels", None), "INSTALL_HINT", "").split("#")[0].strip()


def mamba_path(cfg) -> str:
    """``plan.mamba_path`` (the sequence-mixer path the training stages run: fused kernel or torch);
    ``auto`` = what the family's kernel detection finds here."""
    p = str(_get(cfg, "plan.mamba_path", "auto"))
    if p not in ("auto", "kernel", "torch"):
        raise PlanError(f"plan.mamba_path must be auto, kernel or torch, got {p!r}")
    if p == "auto":
        p = plan_model(parent_config(cfg)).detected_path()  # the same detection the training stages log
    return p


# ------------------------------------------------------------------------------------------------ architectures


def student_arch(cfg, parent: Arch) -> tuple[Arch, str]:
    """The distillation student: ``prune.arch`` (explicit sizes, identity layer ranking), ``prune.target``
    or else ``budget`` (the largest grid architecture within the budget: a plan cannot know the
    importance ranking, so dropped layers are the last droppable ones)."""
    from omegaconf import OmegaConf

    from elastic.models.family import Ranking
    from elastic.search_space import Space, parse_budget

    c = cfg.prune
    sizes = _get(cfg, "prune.arch")
    if sizes:
        sizes = OmegaConf.to_container(sizes, resolve=True) if OmegaConf.is_config(sizes) else dict(sizes)
        arch = parent.cut_fields(Ranking.identity(parent), sizes, str(_get(cfg, "prune.protect_kinds", "")))
        return arch, "prune.arch"
    target = _get(cfg, "prune.target")
    src, grid = "prune.target", c
    if target is None:
        budget = _get(cfg, "budget")
        if budget is None or isinstance(budget, str) and budget == "all":
            budgets = _get(cfg, "search.budgets", [])
            budget = min(budgets) if budgets else None
        elif isinstance(budget, list):
            budget = min(budget)
        if budget is None:
            return parent, "parent (no prune.arch, prune.target or budget)"
        target, src, grid = budget, "budget (searched)", cfg.search
    n = parse_budget(target, parent.num_params())
    g = grid.granularity
    protect = str(grid.get("protect_kinds", "*"))
    space = Space.build(parent, granularity=OmegaConf.to_container(g, resolve=True) if OmegaConf.is_config(g) else dict(g),
                        max_width_prune=float(grid.max_width_prune), max_depth_prune=float(grid.max_depth_prune),
                        protect_kinds=protect)
    best = _largest_within(parent, space, protect, n)
    if best is None:
        raise ArchError(f"no architecture of the grid has at most {human_count(n)} parameters ({src})")
    return best, f"{src} {target}: largest grid architecture <= {human_count(n)}"


def distill_student(cfg, parent: Arch) -> tuple[Arch, str, dict | None]:
    """The student the distill stage will load, its source and its config.json (None when derived): the
    checkpoint ``distill.student`` names, else the one ``RUN/prune/latest.json`` points at (what
    `stages.distill.resolve_student` loads), read from its config.json when it exists; otherwise derived
    from the config (`student_arch`: ``prune.arch``, ``prune.target`` or the searched ``budget``)."""
    path, src = _get(cfg, "distill.student"), "distill.student"
    if not path:
        latest = Path(str(_get(cfg, "run_dir", "."))).expanduser() / "prune" / "latest.json"
        if latest.is_file():
            path, src = json.loads(latest.read_text()).get("path"), f"{latest}"
    f = Path(str(path)).expanduser() / "config.json" if path else None
    if f is not None and f.is_file():
        config = json.loads(f.read_text())
        return plan_model(config).sizes(config), f"{src}: {f}", config
    arch, how = student_arch(cfg, parent)
    if f is not None:
        how += f" ({f} does not exist yet)"
    return arch, how, None


def _largest_within(parent: Arch, space, protect: str, n: int) -> Arch | None:
    """The grid architecture with the most parameters <= n: the family's closed form evaluated on the
    whole width grid at once (float64 is exact for these integers), one depth choice at a time."""
    import torch

    droppable = [i for i, k in enumerate(parent.pattern) if k not in protect]
    axes = list(space.choices)
    grid = torch.meshgrid(*[torch.tensor(space.choices[a], dtype=torch.float64) for a in axes], indexing="ij")
    best = None
    for d in space.drops:
        dropped = set(droppable[len(droppable) - d:]) if d else set()
        kept = tuple(i for i in range(parent.num_layers) if i not in dropped)
        counts = {k: sum(parent.pattern[i] == k for i in kept) for k in parent.KINDS}
        sizes = dict(zip(axes, grid))
        p = parent.params_of(sizes, counts)
        p = torch.where((p <= n) & torch.as_tensor(parent.allows(sizes)), p, torch.tensor(-1.0, dtype=torch.float64))
        flat = int(p.argmax())
        if float(p.flatten()[flat]) >= 0 and (best is None or float(p.flatten()[flat]) > best[0]):
            idx = torch.unravel_index(torch.tensor(flat), p.shape)
            best = (float(p.flatten()[flat]), {a: space.choices[a][int(i)] for a, i in zip(axes, idx)}, kept)
    if best is None:
        return None
    a = parent.with_sizes(best[1], best[2])
    assert a.num_params() == int(best[0])
    return a


# ------------------------------------------------------------------------------------------------ memory model


@dataclass
class Shape:
    """One forward's tokens: micro-batch x sequence."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class StagePlan:
    """One row of the plan: a stage (or distill phase) on `world_size` GPUs of `gpu_memory_bytes` each."""

    row: str
    stage: str
    world_size: int
    gpu_memory_bytes: float
    reserve_bytes: float
    strategy: str
    teacher_mode: str
    mamba_path: str
    student: dict
    student_params: int
    teacher_params: int
    seq_len: int
    micro_batch: int
    batch_size: int
    grad_accum: int
    steps: int
    tokens_per_step: int
    tokens: int
    checkpointing: bool
    flops_per_token: float
    total_flops: float
    gpu_hours: float
    terms: list[Term] = field(default_factory=list)
    phases: dict = field(default_factory=dict)  # moment of the step -> bytes per GPU; the peak is the largest
    keys: dict = field(default_factory=dict)  # term name -> the config change that shrinks it (None: none here)
    activations_other_bytes: float | None = None  # activations with the other checkpointing setting
    notes: list[str] = field(default_factory=list)
    install_hint: str = ""  # the family's command that installs its fused kernels ("" when it has none)
    host_bytes: float = 0.0  # host RAM of the busiest node (`host_memory`): weights read on process 0 + per-process allowance
    host_limit_bytes: float | None = None  # plan.host_memory_gib; None = not checked
    host_note: str = ""

    @property
    def peak_bytes(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def budget_bytes(self) -> float:
        return self.gpu_memory_bytes - self.reserve_bytes

    @property
    def host_fits(self) -> bool:
        return self.host_limit_bytes is None or self.host_bytes <= self.host_limit_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes and self.host_fits

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("install_hint")
        d["terms"] = {t.name: {"bytes": int(t.bytes), "gib": round(t.gib, 2), "note": t.note} for t in self.terms}
        d["phases"] = {k: round(v / GiB, 2) for k, v in self.phases.items()}
        d.update(peak_bytes=int(self.peak_bytes), peak_gib=round(self.peak_bytes / GiB, 2), peak_phase=self.peak_phase,
                 budget_gib=round(self.budget_bytes / GiB, 2), fits=self.fits,
                 host_gib_per_node=round(self.host_bytes / GiB, 1),
                 host_limit_gib=None if self.host_limit_bytes is None else round(self.host_limit_bytes / GiB, 1))
        if self.activations_other_bytes is not None:
            d["activations_other_gib"] = round(self.activations_other_bytes / GiB, 2)
        return d

    def refusal(self) -> str:
        """The PlanError message: the overflowing term, by how much, and what to change."""
        if self.peak_bytes <= self.budget_bytes:  # the GPUs hold it: the host does not
            return (f"{self.row}: host RAM {self.host_bytes / GiB:.0f} GiB per node exceeds plan.host_memory_gib "
                    f"{self.host_limit_bytes / GiB:.0f} ({self.host_note}) -- use nodes with more RAM and raise "
                    f"plan.host_memory_gib, or fewer processes per node (plan.gpus_per_node)")
        big, what = self.gpu_advice()
        return (f"{self.row}: {big.name} {big.gib:.1f} GiB overflow {self.gpu_memory_bytes / GiB:.0f} GiB per GPU "
                f"(peak {self.peak_bytes / GiB:.1f} GiB > {self.budget_bytes / GiB:.1f} GiB usable after plan.reserve_gib; "
                f"{self.strategy}, {self.world_size} GPU(s), Mamba {self.mamba_path} path) -- {what}")

    def gpu_advice(self) -> tuple[Term, str]:
        """The largest term a key can shrink, and what to change to fit the GPU (also said when only the
        rehearsal of the real step overflows, where the arithmetic's own refusal would speak of host RAM)."""
        ranked = sorted(self.terms, key=lambda t: -t.bytes)
        big = next((t for t in ranked if self.keys.get(t.name)), ranked[0])
        what = self.keys.get(big.name) or "raise plan.gpu_memory_gib (a larger GPU)"
        hint = self.install_hint if self.mamba_path == "torch" else ""
        if hint and hint not in what:
            what += f" [the fused kernels need far less: {hint}]"
        return big, what


# ------------------------------------------------------------------------------------------------ the step model


def _train_flops_per_token(model, student: Arch, teacher: Arch | None, seq: int, chunk: int, t_chunk: int,
                           checkpointing: bool) -> float:
    """Student forward + backward (2x forward) + the recomputed forward under checkpointing, and the
    chunked loss's recomputed logits; teacher forward (logits included). `model`: the family's plan model."""
    fwd = 2 * model.matmul_params(student) + model.mixer_flops_per_token(student, seq, chunk)
    logits = 2 * student.vocab_size * student.hidden_size
    total = 3 * fwd + logits + (fwd - logits if checkpointing else 0)
    if teacher is not None:
        total += 2 * model.matmul_params(teacher) + model.mixer_flops_per_token(teacher, seq, t_chunk)
    return total


def _block_params_max(a: Arch) -> int:
    return max(a.layer_params(k) for k in set(a.pattern))


def _root_params(a: Arch) -> int:
    return a.num_params() - sum(a.layer_params(k) for k in a.pattern)


def _activations(model, a: Arch, shape: Shape, *, residual: int, path: str, elastic: bool, chunk: int,
                 checkpointing: bool) -> float:
    t = shape.tokens
    per_layer = {k: model.saved_per_token(a, k, residual=residual, path=path, elastic=elastic, chunk=chunk)
                 for k in set(a.pattern)}
    final = FP32 * a.hidden_size * 2 + BF16 * a.hidden_size  # the final norm's input and output, the loss's bf16 hidden
    if not checkpointing:
        return t * (sum(per_layer[k] for k in a.pattern) + final)
    # each block's input is kept; one block's activations are rebuilt at a time in backward
    return t * (residual * a.hidden_size * a.num_layers + max(per_layer.values()) + final)


def _loss_bytes(a: Arch, teacher: Arch | None, shape: Shape, loss_chunk: int, backward: bool) -> float:
    """The chunked KD loss (``losses._chunk_sums`` under checkpoint): per chunk the student's and the
    teacher's logits (bf16 from the matmul, then fp32), ``/ T``, two log-softmaxes and KL's element-wise
    terms -- about 7 fp32 ``chunk x vocab`` tensors at once in the forward, 9.5 in the backward
    (recomputed chunk + gradients). Plus the teacher's final hidden states (bf16) for the whole micro-batch."""
    c = min(loss_chunk, shape.tokens)
    hidden = BF16 * shape.tokens * (teacher.hidden_size if teacher else 0)
    return hidden + (9.5 if backward else 7) * FP32 * c * a.vocab_size


def plan_training(row: str, stage: str, student: Arch, teacher: Arch | None, *, shape: Shape, batch_size: int,
                  steps: int, world_size: int, gpu_memory_bytes: float, reserve_bytes: float, strategy: str,
                  teacher_mode: str, path: str, chunk: int, teacher_chunk: int, checkpointing: bool, loss_chunk: int,
                  elastic: bool, peak_tflops: float, mfu: float, keys: dict[str, str], extra_params: int = 0,
                  model=None) -> StagePlan:
    """Per-GPU memory by term and the compute of one training stage (or phase). `model`: the family's plan
    model (default: the student's family's)."""
    model = model or plan_model_of(student)
    n = world_size
    sharded = strategy == "fsdp" and n > 1
    p_s = student.num_params() + extra_params
    div = n if sharded else 1
    residual = BF16 if sharded else FP32
    terms = [
        Term("parameters", FP32 * p_s / div, f"fp32 master weights{' / %d' % n if sharded else ''}"),
        Term("gradients", FP32 * p_s / div, "fp32"),
        Term("optimizer", 2 * FP32 * p_s / div, "AdamW exp_avg + exp_avg_sq, fp32"),
    ]
    if strategy == "ddp" and n > 1:
        terms.append(Term("ddp_buckets", FP32 * p_s, "DDP gradient buckets, about one more fp32 copy of the gradients"))
    if sharded:
        # all-gathered in bf16: two blocks (current + prefetch) and the root group (embeddings, final norm, LM head:
        # FSDP2 keeps the root gathered from its forward to the end of its backward); one block's fp32
        # reduce-scatter input (its bf16 gradient cast to reduce_dtype), alive until the next reduce-scatter
        gathered = BF16 * (2 * _block_params_max(student) + _root_params(student)) + FP32 * _block_params_max(student)
        terms.append(Term("fsdp_gathered", gathered,
                          "bf16 all-gathered: 2 blocks (current + prefetch) + the root group; one block's fp32 reduce-scatter buffer"))
        weights_fwd = 0.0
    else:
        # autocast's cache of bf16 copies of the fp32 weights a matmul reads (not the embedding: a lookup), kept
        # until the forward leaves autocast
        weights_fwd = BF16 * (p_s - student.vocab_size * student.hidden_size)
        terms.append(Term("bf16_weights", weights_fwd, "autocast's bf16 copies of the fp32 matmul weights (forward only)"))
    if teacher is not None:
        p_t = teacher.num_params()
        if teacher_mode == "shard" and n > 1:
            t_bytes = BF16 * p_t / n + BF16 * (2 * _block_params_max(teacher) + _root_params(teacher))
            note = f"frozen bf16, FSDP2-sharded / {n} + 2 gathered blocks + root group"
        else:
            t_bytes = BF16 * p_t
            note = "frozen bf16, replicated"
        terms.append(Term("teacher", t_bytes, note))
    act = _activations(model, student, shape, residual=residual, path=path, elastic=elastic, chunk=chunk,
                       checkpointing=checkpointing)
    other = _activations(model, student, shape, residual=residual, path=path, elastic=elastic, chunk=chunk,
                         checkpointing=not checkpointing)
    terms.append(Term("activations", act, ("with" if checkpointing else "without") + " activation checkpointing"))
    loss_f = _loss_bytes(student, teacher, shape, loss_chunk, backward=False)
    loss_b = _loss_bytes(student, teacher, shape, loss_chunk, backward=True)
    terms.append(Term("logits_chunk", max(loss_f, loss_b),
                      f"KD loss, {min(loss_chunk, shape.tokens)} tokens x {student.vocab_size} vocab per chunk (+ teacher hidden states)"))
    tokens = shape.tokens
    ws_f = model.workspace(student, tokens, chunk, path, backward=False)
    ws_b = model.workspace(student, tokens, chunk, path, backward=True)
    ws_t = model.workspace(teacher, tokens, teacher_chunk, path, backward=False) if teacher else 0.0
    lt_f = max(model.layer_transient(student, k, tokens, False) for k in set(student.pattern))
    lt_b = max(model.layer_transient(student, k, tokens, True) for k in set(student.pattern))
    lt_t = max(model.layer_transient(teacher, k, tokens, False) for k in set(teacher.pattern)) if teacher else 0.0
    terms.append(Term("mamba_scan", max(ws_f, ws_b, ws_t), model.WORKSPACE_NOTE.format(path=path)))
    terms.append(Term("layer_transient", max(lt_f, lt_b, lt_t), "one block's outputs and gradients in flight"))

    t = {x.name: x.bytes for x in terms}
    fixed = t["parameters"] + t["optimizer"] + t.get("ddp_buckets", 0) + t.get("teacher", 0) + t.get("fsdp_gathered", 0)
    accum = max(1, batch_size // (shape.batch * n))
    if accum > 1:
        # Gradient accumulation: from the second micro-batch on, the step's gradients (sharded under FSDP, which
        # reduce-scatters every micro-batch -- `train.optimizer_step`; whole under DDP's no_sync) are alive
        # through every forward and backward.
        fixed += t["gradients"]
    if sharded:
        # the backward's unsharded bf16 gradients before their reduce-scatter: the LM head's (the root group is
        # reduce-scattered only once the whole backward is done) and the block in flight
        grad_head = BF16 * student.vocab_size * student.hidden_size
        grad_block = BF16 * _block_params_max(student)
    elif accum > 1:
        grad_head = grad_block = 0.0  # accumulated in place into the gradients counted above
    else:
        grad_head = FP32 * student.vocab_size * student.hidden_size  # lm_head's gradient: the first one the backward makes
        grad_block = FP32 * _block_params_max(student)
    t_hidden = BF16 * shape.tokens * teacher.hidden_size if teacher else 0.0
    # the step's moments, in order; the peak is the largest (activations are all alive from the end of the
    # forward to the start of the backward; gradients grow while they are freed)
    phases = {
        "teacher forward": fixed + ws_t + lt_t,
        "student forward": fixed + weights_fwd + act + t_hidden + ws_f + lt_f,
        "loss forward": fixed + weights_fwd + act + loss_f,
        "loss backward": fixed + act + loss_b,  # its first chunk, before lm_head's gradient exists (measured)
        "blocks backward": fixed + act + t_hidden + grad_head + grad_block + ws_b + lt_b,
        "optimizer step": fixed + (0.0 if accum > 1 else t["gradients"]),
    }

    tokens_per_step = batch_size * shape.seq
    fpt = _train_flops_per_token(model, student, teacher, shape.seq, chunk, teacher_chunk, checkpointing)
    total = fpt * tokens_per_step * steps
    hours = total / (peak_tflops * 1e12 * mfu) / 3600
    return StagePlan(
        row=row, stage=stage, world_size=n, gpu_memory_bytes=gpu_memory_bytes, reserve_bytes=reserve_bytes,
        strategy=strategy if n > 1 else "single", teacher_mode=teacher_mode if teacher is not None else "-", mamba_path=path,
        student=student.to_dict(), student_params=p_s, teacher_params=teacher.num_params() if teacher else 0,
        seq_len=shape.seq, micro_batch=shape.batch, batch_size=batch_size,
        grad_accum=accum, steps=steps, tokens_per_step=tokens_per_step,
        tokens=tokens_per_step * steps, checkpointing=checkpointing, flops_per_token=fpt, total_flops=total,
        gpu_hours=hours, terms=terms, phases=phases, keys=keys, activations_other_bytes=other,
        install_hint=_install_command(model),
    )


def plan_inference(row: str, model: Arch, *, shape: Shape, dtype_bytes: int, tokens: int, passes: int, world_size: int,
                   gpu_memory_bytes: float, reserve_bytes: float, path: str, chunk: int, logits_chunk: int,
                   peak_tflops: float, mfu: float, keys: dict[str, str], plan_model) -> StagePlan:
    """Importance: the parent in its dtype, forward only (no autograd state), `passes` forwards per batch
    (1 + one per skipped layer for depth scores), logits `logits_chunk` tokens at a time."""
    pm = plan_model
    t = shape.tokens
    h = model.hidden_size
    terms = [
        Term("parameters", dtype_bytes * model.num_params(), f"{dtype_bytes}-byte weights, inference"),
        Term("activations", t * (dtype_bytes * h * 3 + FP32 * h * 2), "residual stream, the reference final hidden states, a norm's fp32"),
        Term("logits_chunk", 3 * FP32 * min(logits_chunk, t) * model.vocab_size, "depth scoring: reference and skipped logits chunks in fp32 + a softmax"),
        Term("mamba_scan", pm.inference_workspace(model, t, chunk, path), pm.INFERENCE_WORKSPACE_NOTE.format(path=path)),
        Term("layer_transient", max(pm.layer_transient(model, k, t, False) for k in set(model.pattern)), "one block's outputs"),
    ]
    total = sum(x.bytes for x in terms)
    fpt = (2 * pm.matmul_params(model) + pm.mixer_flops_per_token(model, shape.seq, chunk)) * passes
    flops = fpt * tokens
    return StagePlan(
        row=row, stage="importance", world_size=1, gpu_memory_bytes=gpu_memory_bytes, reserve_bytes=reserve_bytes,
        strategy="single", teacher_mode="-", mamba_path=path, student=model.to_dict(), student_params=model.num_params(),
        teacher_params=0, seq_len=shape.seq, micro_batch=shape.batch, batch_size=shape.batch, grad_accum=1,
        steps=math.ceil(tokens / t), tokens_per_step=t, tokens=tokens, checkpointing=False, flops_per_token=fpt,
        total_flops=flops, gpu_hours=flops / (peak_tflops * 1e12 * mfu) / 3600, terms=terms, phases={"forward": total},
        keys=keys, notes=[f"one process (importance runs on one GPU); {passes} forwards per batch"],
        install_hint=_install_command(pm),
    )


# ------------------------------------------------------------------------------------------------ strategy choice


def _fits_replica(cfg, stage: str, world_size: int, gpu_memory_bytes: float, path: str | None) -> bool:
    p = _plan(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes, strategy="ddp", teacher="replicate", path=path)
    return all(r.fits for r in p)


def choose_strategy(cfg, stage: str, world_size: int, gpu_memory_bytes: float, mamba_path: str | None = None) -> str:
    """``parallel.strategy``, or for ``auto``: ddp when a full replica fits on every GPU, else fsdp (ddp for
    a family without a memory model: nothing tells that a replica does not fit)."""
    s = str(_get(cfg, "parallel.strategy", "auto"))
    if s not in ("auto", "ddp", "fsdp"):
        raise PlanError(f"parallel.strategy must be auto, ddp or fsdp, got {s!r}")
    if s != "auto":
        return s
    if world_size <= 1:
        return "ddp"
    try:
        return "ddp" if _fits_replica(cfg, stage, world_size, gpu_memory_bytes, mamba_path) else "fsdp"
    except NoMemoryModel:
        return "ddp"


def choose_teacher(cfg, stage: str, world_size: int, gpu_memory_bytes: float, strategy: str | None = None,
                   mamba_path: str | None = None) -> str:
    """``parallel.teacher``, or for ``auto``: replicate when the replicated bf16 teacher fits next to the
    student's share, else shard (only under fsdp; ddp always replicates; replicate for a family without a
    memory model)."""
    s = str(_get(cfg, "parallel.teacher", "auto"))
    if s not in ("auto", "replicate", "shard"):
        raise PlanError(f"parallel.teacher must be auto, replicate or shard, got {s!r}")
    strategy = strategy or choose_strategy(cfg, stage, world_size, gpu_memory_bytes, mamba_path)
    if strategy != "fsdp" or world_size <= 1:
        return "replicate"
    if s != "auto":
        return s
    try:
        rows = _plan(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes, strategy="fsdp",
                     teacher="replicate", path=mamba_path)
    except NoMemoryModel:
        return "replicate"
    return "replicate" if all(r.fits for r in rows) else "shard"


# ------------------------------------------------------------------------------------------------ stages


def _machine(cfg, world_size, gpu_memory_bytes):
    n = int(world_size if world_size is not None else _get(cfg, "plan.gpus", 1))
    mem = float(gpu_memory_bytes if gpu_memory_bytes is not None else float(_get(cfg, "plan.gpu_memory_gib", 80)) * GiB)
    if n < 1 or mem <= 0:
        raise PlanError(f"plan.gpus ({n}) and plan.gpu_memory_gib must be positive")
    return n, mem, float(_get(cfg, "plan.reserve_gib", 0)) * GiB


# Host RAM a training process needs besides the weights it reads: Python, torch and the CUDA libraries, the CUDA
# context, data loading. An allowance, not a measurement (no GPU host measured yet); a few GB per process.
HOST_PER_PROCESS = 4 * GiB


def host_memory(cfg, stage: str, parent: Arch, student: Arch | None, world_size: int) -> tuple[float, str]:
    """(bytes, what) of host RAM on the busiest node of `stage`: process 0 alone reads weights (`parallel.load_frozen`,
    the stages' `materialize`), one model at a time, and drops each host copy once broadcast or on the GPU; every
    process of the node adds `HOST_PER_PROCESS`. Before issue #20 every process read every model: the 9B search
    held ~90 GB per process, ~720 GB per 8-GPU node."""
    per_node = max(1, min(int(world_size), int(_get(cfg, "plan.gpus_per_node", 8))))
    p = parent.num_params()
    if stage == "importance":
        weights, what = _dtype_bytes(_get(cfg, "parent.dtype", "float32")) * p, "the parent, on its way to the GPU"
    elif stage == "search":
        teacher = _dtype_bytes(_get(cfg, "parent.dtype", "float32")) * p
        weights, what = max(teacher, 2 * FP32 * p), "process 0: the fp32 parent and its importance-reordered copy"
    else:
        t_dtype = str(_get(cfg, "distill.teacher_dtype", "auto"))
        teacher = _dtype_bytes("bfloat16" if t_dtype == "auto" else t_dtype) * p
        s = FP32 * (student.num_params() if student is not None else p)
        weights, what = max(teacher, s), ("process 0: the teacher" if teacher >= s else "process 0: the fp32 student")
    return weights + HOST_PER_PROCESS * per_node, f"{what} + {HOST_PER_PROCESS / GiB:.0f} GiB x {per_node} process(es)"


def _with_host(cfg, rows: list[StagePlan], stage: str, parent: Arch, student: Arch | None, n: int) -> list[StagePlan]:
    limit = _get(cfg, "plan.host_memory_gib")
    host, what = host_memory(cfg, stage, parent, student, n)
    for r in rows:
        r.host_bytes, r.host_note = host, what
        r.host_limit_bytes = None if limit is None else float(limit) * GiB
    return rows


def _plan(cfg, stage: str, *, world_size=None, gpu_memory_bytes=None, strategy=None, teacher=None,
          path: str | None = None) -> list[StagePlan]:
    rows = _plan_gpu(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes, strategy=strategy,
                     teacher=teacher, path=path)
    pcfg = parent_config(cfg)
    parent = plan_model(pcfg).sizes(pcfg)
    student = distill_student(cfg, parent)[0] if stage == "distill" else None
    return _with_host(cfg, rows, stage, parent, student, rows[0].world_size if rows else 1)


def _plan_gpu(cfg, stage: str, *, world_size=None, gpu_memory_bytes=None, strategy=None, teacher=None,
              path: str | None = None) -> list[StagePlan]:
    n, mem, reserve = _machine(cfg, world_size, gpu_memory_bytes)
    pcfg = parent_config(cfg)
    model = plan_model(pcfg)
    parent = model.sizes(pcfg)
    chunk = model.chunk(pcfg)
    path = path or mamba_path(cfg)
    peak, mfu = float(_get(cfg, "plan.peak_tflops", 989)), float(_get(cfg, "plan.mfu", 0.35))
    if stage == "importance":
        c = cfg.importance
        seq = int(_get(cfg, "importance.seq_len", _get(cfg, "data.seq_len", 256)))
        b = int(c.batch_size)
        passes = 1 + (parent.num_layers if bool(_get(cfg, "importance.depth", True)) else 0)
        return [plan_inference("importance", parent, shape=Shape(b, seq), dtype_bytes=_dtype_bytes(_get(cfg, "parent.dtype", "float32")),
                               tokens=int(c.num_sequences) * seq, passes=passes, world_size=1, gpu_memory_bytes=mem,
                               reserve_bytes=reserve, path=path, chunk=chunk,
                               logits_chunk=int(_get(cfg, "importance.logits_chunk_size", 1024)), peak_tflops=peak, mfu=mfu,
                               plan_model=model,
                               keys={"activations": "lower importance.batch_size", "logits_chunk": "lower importance.logits_chunk_size",
                                     "mamba_scan": "lower importance.batch_size or importance.seq_len (or install the fused kernels: "
                                                   "plan.mamba_path=kernel)",
                                     "parameters": "set parent.dtype=bfloat16 or use a larger GPU (plan.gpu_memory_gib)",
                                     "layer_transient": "lower importance.batch_size"})]
    strategy = strategy or choose_strategy(cfg, stage, n, mem, path)
    teacher = teacher or choose_teacher(cfg, stage, n, mem, strategy, path)
    common = dict(world_size=n, gpu_memory_bytes=mem, reserve_bytes=reserve, strategy=strategy, teacher_mode=teacher,
                  path=path, chunk=chunk, teacher_chunk=chunk, peak_tflops=peak, mfu=mfu, model=model)
    if stage == "search":
        c = cfg.search
        ckpt = bool(_get(cfg, "search.gradient_checkpointing", False))
        keys = _train_keys("search", "search", ckpt=ckpt, micro=int(c.micro_batch_size), n=n, strategy=strategy,
                           teacher=teacher, path=path, model=model)
        return [plan_training("search", "search", parent, parent, shape=Shape(int(c.micro_batch_size), int(c.seq_len)),
                              batch_size=int(c.batch_size), steps=int(c.steps), checkpointing=ckpt,
                              loss_chunk=int(_get(cfg, "search.loss_chunk_size", 1024)), elastic=True, keys=keys, **common)]
    if stage == "distill":
        student, _src, s_config = distill_student(cfg, parent)
        if s_config is not None:  # the student's own scan chunk (the 4B's is 256, the 9B's 128): its workspace grows with it
            common["chunk"] = model.chunk(s_config)
        ckpt = bool(_get(cfg, "distill.gradient_checkpointing", False))
        cap = _get(cfg, "distill.max_steps")
        rows = []
        for i, ph in enumerate(parse_phases(cfg.distill)):
            keys = _train_keys("distill", f"distill.phases.{i}", ckpt=ckpt, micro=ph.micro_batch_size, n=n,
                               strategy=strategy, teacher=teacher, path=path, model=model)
            rows.append(plan_training(f"distill {ph.name}", "distill", student, parent, shape=Shape(ph.micro_batch_size, ph.seq_len),
                                      batch_size=ph.batch_size, steps=ph.steps(cap), checkpointing=ckpt,
                                      loss_chunk=int(_get(cfg, "distill.loss_chunk_size", 1024)), elastic=False, keys=keys, **common))
        return rows
    raise PlanError(f"stage {stage!r} has no plan; plan rows exist for importance, search and distill")


def _train_keys(stage: str, batch_prefix: str, *, ckpt: bool, micro: int, n: int, strategy: str, teacher: str,
                path: str, model) -> dict[str, str | None]:
    """For each term, the config change that shrinks it here (None: nothing to change for this term, e.g. a
    micro-batch that is already 1); `StagePlan.refusal` names the largest term that has one."""
    lower_micro = f"lower {batch_prefix}.micro_batch_size" if micro > 1 else None
    if n == 1:
        shard = "use more GPUs: plan.gpus (with parallel.strategy=fsdp the weights, gradients and optimizer are sharded)"
    else:
        shard = "set parallel.strategy=fsdp" if strategy != "fsdp" else "raise plan.gpus"
    if not ckpt:
        act = f"set {stage}.gradient_checkpointing=true" + (f" or {lower_micro}" if lower_micro else "")
    else:
        act = lower_micro
    kernel = f"install the fused kernels ({_install_command(model)}; plan.mamba_path=kernel)"
    return {
        "parameters": shard, "gradients": shard, "optimizer": shard,
        "ddp_buckets": shard, "bf16_weights": shard, "fsdp_gathered": "raise plan.gpu_memory_gib (a larger GPU)",
        "teacher": shard if strategy != "fsdp" or n == 1 else ("set parallel.teacher=shard" if teacher != "shard" else "raise plan.gpus"),
        "activations": act if act or path != "torch" else kernel,
        "logits_chunk": f"lower {stage}.loss_chunk_size",
        "mamba_scan": kernel if path == "torch" else lower_micro,
        "layer_transient": lower_micro,
    }


def plan_stage(cfg, stage: str, *, world_size: int | None = None, gpu_memory_bytes: float | None = None,
               mamba_path: str | None = None) -> StagePlan:
    """The plan of one stage; for distill, the phase with the highest per-GPU peak (by share of the usable memory).
    `world_size`, `gpu_memory_bytes` and `mamba_path` (kernel | torch, what a training stage detected) override
    ``plan.gpus``, ``plan.gpu_memory_gib`` and ``plan.mamba_path``."""
    rows = _plan(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes, path=mamba_path)
    return max(rows, key=lambda r: r.peak_bytes / r.budget_bytes)


def plan_rows(cfg, stage: str, *, world_size=None, gpu_memory_bytes=None, mamba_path=None) -> list[StagePlan]:
    """Every row of a stage (distill: one per phase)."""
    return _plan(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes, path=mamba_path)


def check_stage(cfg, stage: str, *, world_size: int | None = None, gpu_memory_bytes: float | None = None,
                mamba_path: str | None = None) -> list[StagePlan]:
    """Raise `PlanError` naming the overflowing term and the change to make unless every row of `stage` fits
    (call it before a training stage loads anything, with the launch's world size, the GPU's memory and the
    Mamba path it detected); returns the rows otherwise."""
    rows = _plan(cfg, stage, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes, path=mamba_path)
    bad = [r for r in rows if not r.fits]
    if bad:
        raise PlanError("; ".join(r.refusal() for r in bad))
    return rows


# ------------------------------------------------------------------------------------------------ temperature schedule


def tau_at_router_end(search_cfg) -> dict[str, float]:
    """The Gumbel-softmax temperature at the last router step (before settling), from the search's own
    `router.Schedule` -- the number ``tau_decay`` must be chosen against. ``tau_decay: null`` reaches
    ``tau_min`` there by construction."""
    from elastic.router import Schedule
    from elastic.schedule import settle_steps

    c = search_cfg
    router_steps = max(1, int(c.steps) - settle_steps(c))
    decay = c.get("tau_decay")
    sched = Schedule(router_steps, tau0=float(c.tau0), tau_min=float(c.tau_min), decay=None if decay is None else float(decay))
    floor = Schedule(router_steps, tau0=float(c.tau0), tau_min=float(c.tau_min), decay=None)
    return {"router_steps": router_steps, "tau_end": sched.tau(router_steps - 1), "tau_min": float(c.tau_min),
            "decay_to_floor": floor.decay}


def check_tau_schedule(search_cfg, rel: float = 0.5) -> str | None:
    """A warning when the temperature ends the router phase well above its floor (``tau_end > tau_min``
    by more than `rel` of the floor): ``tau_decay`` was chosen for a longer run."""
    t = tau_at_router_end(search_cfg)
    if t["tau_end"] > t["tau_min"] * (1 + rel):
        return (f"search: the Gumbel temperature ends the {t['router_steps']} router steps at {t['tau_end']:.3f}, not at "
                f"tau_min={t['tau_min']}; set search.tau_decay={t['decay_to_floor']:.5f} (or null: reach tau_min at the last router step)")
    return None


# ------------------------------------------------------------------------------------------------ report


def plan_all(cfg, *, world_size=None, gpu_memory_bytes=None) -> dict[str, Any]:
    """Every row (importance, search, distill phases) and the recipe's headline numbers, as plain data."""
    n, mem, reserve = _machine(cfg, world_size, gpu_memory_bytes)
    pcfg = parent_config(cfg)
    model = plan_model(pcfg)
    parent = model.sizes(pcfg)
    student, src, _config = distill_student(cfg, parent)
    rows = []
    for stage in ("importance", "search", "distill"):
        rows += _plan(cfg, stage, world_size=n, gpu_memory_bytes=mem)
    tau = tau_at_router_end(cfg.search)
    return {
        "gpus": n, "gpu_memory_gib": mem / GiB, "reserve_gib": reserve / GiB, "mamba_path": mamba_path(cfg),
        "teacher": {"params": parent.num_params(), "arch": parent.short()},
        "student": {"params": student.num_params(), "arch": student.short(), "source": src},
        "tau": tau, "tau_warning": check_tau_schedule(cfg.search),
        "rows": [r.to_dict() for r in rows], "fits": all(r.fits for r in rows),
        "gpu_hours": sum(r.gpu_hours for r in rows),
        "_rows": rows,
    }
