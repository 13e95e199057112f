"""How the training stages spread over processes: one process, DDP (accelerate), or FSDP2 (torch ``fully_shard``).

``parallel.strategy`` picks one (``auto``: the plan decides -- DDP when a full replica of the student's
training state fits on one GPU, FSDP2 otherwise; DDP on CPU). With one process there is nothing to
spread and the model runs as is.

FSDP2 here is torch's composable ``fully_shard`` applied directly, not through accelerate's plugin
(which has no CPU path, so it could never be tested on the development machines):

* every decoder block (the classes a Hugging Face model lists in ``_no_split_modules``, found
  generically) is one shard unit, and the root module (embeddings, final norm, output head, and the
  loss computed inside the root's ``forward``) is another. Weights, gradients and AdamW state are
  split evenly over the processes; a block's weights are gathered just before it runs and freed right
  after (``reshard_after_forward``), so a process holds its shard plus about two gathered blocks.
* master weights stay fp32; with ``mixed_precision=bf16`` the gathered weights are bf16 and gradients
  are reduced in fp32 (``MixedPrecisionPolicy``) -- no autocast needed.
* parameters that must stay whole on every process (the search's tiny router, read outside the
  model's forward to decode architectures) are ``ignored``: they are replicated and their gradients
  are averaged here (`average_gradients`), like DDP would.
* a frozen teacher is either replicated (a plain module on every GPU) or sharded block by block
  (`shard_frozen`: no gradients, no optimizer state, weights gathered per block during its forward).
* checkpoints are sharded (``torch.distributed.checkpoint``: every process writes its own shard) and
  resume exactly; the final Hugging Face checkpoint is gathered one tensor at a time, cast to the save
  dtype as it arrives, so the main process never holds more than one full copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp")
TEACHER_MODES = ("auto", "replicate", "shard")

__all__ = [
    "STRATEGIES", "TEACHER_MODES", "ParallelError", "block_class_names", "is_sharded", "shard_model", "shard_frozen",
    "full_state_dict", "clip_grad_norm", "average_gradients", "save_sharded", "load_sharded", "resolve_strategy",
    "is_main_rank", "build_on_meta", "materialize", "skeleton", "load_frozen",
]


class ParallelError(ValueError):
    """A parallel setting that cannot work (an unknown strategy, a model without decoder blocks, ...)."""


def block_class_names(model: nn.Module) -> set[str]:
    """Decoder-block class names of every Hugging Face model inside `model` (their ``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def is_sharded(model: nn.Module) -> bool:
    """True once `fully_shard` has turned the parameters into DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _mesh(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ParallelError("FSDP needs an initialised process group: launch with accelerate or torchrun")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def _policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision in ("bf16", "bfloat16"):
        # bf16 weights for compute, gradients reduced (and kept) in fp32 next to the fp32 master weights
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mixed_precision in ("no", "fp32", "float32", None):
        return MixedPrecisionPolicy()
    raise ParallelError(f"FSDP mixed precision must be bf16 or no, got {mixed_precision!r}")


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = block_class_names(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ParallelError(f"{type(model).__name__} has no decoder blocks to shard (no `_no_split_modules`)")
    return blocks


def shard_model(model: nn.Module, device: torch.device, *, mixed_precision: str = "no",
                ignored_params: Iterable[nn.Parameter] = ()) -> nn.Module:
    """FSDP2 in place: one shard unit per decoder block, the rest in the root unit; returns `model`."""
    from torch.distributed.fsdp import fully_shard

    mesh, mp = _mesh(device), _policy(mixed_precision)
    ignored = set(ignored_params)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True, ignored_params=ignored or None)
    return model


def shard_frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard a frozen model (the teacher) block by block; embeddings and head stay whole on every process.

    Its blocks' weights are gathered for their own forward only; nothing of it is trained, so there are
    no gradients or optimizer state to shard. Keeping the (small) root whole lets the loss read the
    head's weight directly.
    """
    from torch.distributed.fsdp import fully_shard

    from torch.distributed.tensor import DTensor

    mesh = _mesh(device)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # fully_shard placed the blocks' shards on the device; the unsharded rest goes there whole
    for t in list(model.parameters()) + list(model.buffers()):
        if not isinstance(t, DTensor) and not t.is_meta:  # meta (the plan's rehearsal): materialised by to_empty later
            t.data = t.data.to(device)
    return model


@torch.no_grad()
def full_state_dict(model: nn.Module, *, dtype: torch.dtype | None = None, main: bool = True,
                    prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The whole state dict on the main process, one tensor gathered at a time; None elsewhere.

    Call it on EVERY process (gathering a shard is a collective). Each tensor is cast to `dtype`
    (floating tensors only) and moved to the CPU as soon as it is whole, so the main process holds one
    full copy in the save dtype and never the fp32 master weights in full. Keys not starting with
    `prefix` are dropped, and `prefix` is stripped.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] | None = {} if main else None
    for name, t in model.state_dict().items():
        if prefix and not name.startswith(prefix):
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if out is not None:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name[len(prefix):]] = t.detach().cpu().clone()
        del t
    return out


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 grad norm of sharded (DTensor) and replicated gradients together, clipped to `max_norm`.

    ``torch.nn.utils.clip_grad_norm_`` refuses a mix of DTensor and plain gradients (the search's
    router is replicated next to the sharded model), so the two parts' norms are combined here. Everything
    stays on the device (the scale is a tensor, 1 when no clipping is needed): reading the norm back to the
    host every step would stall the CPU until the GPU caught up (issue #20, defect 7).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    sq = None
    for part in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if part:
            n = get_total_norm(part, 2.0)
            n = (n.full_tensor() if isinstance(n, DTensor) else n).detach().double().pow(2)
            sq = n if sq is None else sq + n.to(sq.device)
    total = sq.sqrt()
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    with implicit_replication():  # a plain scalar tensor scaling DTensor gradients
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return total


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of replicated (FSDP-ignored) parameters over the processes, as DDP would.

    Every rank enters the same all_reduce whatever it holds: a rank can have no gradient for a parameter (the router
    when all its micro-batches were full-model ones), and a rank that skipped the collective would pair the others'
    all_reduce with its next one (wrong sums on gloo, a hang or silent corruption on NCCL). A missing gradient counts
    as zero in the average, as in DDP; a parameter no rank has a gradient for keeps none (the optimizer skips it).
    """
    import torch.distributed as dist

    params = list(params)
    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    ref = params[0]
    # one flat buffer: each parameter's gradient (zeros where missing), then one has-a-gradient count per parameter
    parts = [p.grad.reshape(-1).to(ref.dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=ref.dtype, device=ref.device)
             for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)
    flat = torch.cat(parts + [present])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    i = 0
    world = dist.get_world_size()
    counts = flat[-len(params):]
    # One host sync per optimizer step (DDP makes the same one for its globally-unused map). Under the plan's
    # rehearsal (fake tensors, no data) it cannot read the counts and needs none: every gradient is taken as present.
    from torch._subclasses.fake_tensor import is_fake

    present = [1.0] * len(params) if is_fake(counts) else counts.tolist()
    for p, n in zip(params, present):
        g = flat[i : i + p.numel()].view_as(p) / world
        i += p.numel()
        if n == 0:
            continue
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.copy_(g)


# ------------------------------------------------------------------------------------------------ loading on one process
# Every process reading the checkpoint costs a node 8 host copies of each model (the 9B search: bf16 teacher, fp32
# student and its importance-reordered copy, ~90 GB per process, ~720 GB per node) and 16 reads of the files. Under
# FSDP only process 0 reads the weights; the others build the same module with its parameters on the meta device
# (no memory, no read), every process shards it, allocates only its own shards on the GPU, and process 0's tensors
# are broadcast into them one at a time (torch.distributed.checkpoint's set_model_state_dict, broadcast_from_rank0).


def is_main_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def build_on_meta(build):
    """``build()`` with its parameters created on the meta device and its buffers (masks, rotary tables: small, and
    not all in a state dict) real, on the CPU. Anything `build` moves or copies stays meta."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


@torch.no_grad()
def materialize(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> nn.Module:
    """Give `model`'s meta parameters memory on `device` (under FSDP only this process's shards) and fill every
    parameter and persistent buffer from `full_state`, which process 0 passes (its whole state dict, on the host)
    and the others leave None; collective. Tensors that were not meta (buffers, the search's replicated router)
    keep their values where process 0 sends none. Returns `model`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    real = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}
    if len(real) < len(list(model.parameters())) + len(list(model.buffers())):
        model.to_empty(device=device)
        for name, t in real.items():  # to_empty emptied these too
            mod, _, leaf = name.rpartition(".")
            getattr(model.get_submodule(mod), leaf).data.copy_(t)
    del real
    set_model_state_dict(model, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))
    return model


def skeleton(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of checkpoint `path`'s config.json, parameters on the meta device, in eval mode as
    `parent.load_model` returns it: what the processes other than 0 build instead of reading the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    return build_on_meta(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype)).eval()


def load_frozen(path: str | Path, dtype: torch.dtype, device: torch.device, *, shard: bool) -> nn.Module:
    """A frozen model (the teacher) on every process: whole on each GPU, or sharded (`shard_frozen`), read from
    disk by process 0 only and broadcast (one process: an ordinary load)."""
    import torch.distributed as dist

    from elastic.parent import load_model

    if not dist.is_initialized() or dist.get_world_size() == 1:
        model = load_model(path, dtype=dtype, device="cpu" if shard else device).requires_grad_(False)
        return shard_frozen(model, device) if shard else model
    full = load_model(path, dtype=dtype, device="cpu").state_dict() if is_main_rank() else None
    model = skeleton(path, dtype).requires_grad_(False)
    if shard:
        shard_frozen(model, device)
    materialize(model, full, device)
    del full  # process 0's host copy, consumed
    return model


def save_sharded(path: str | Path, model: nn.Module, optimizer) -> None:
    """Model and optimizer shards of every process into `path` (torch.distributed.checkpoint); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer) -> None:
    """Load what `save_sharded` wrote into the (already sharded) model and its optimizer; collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def resolve_strategy(cfg, stage: str, accelerator) -> str:
    """``single`` (one process), ``ddp`` or ``fsdp`` for a training stage under this launch."""
    p = cfg.get("parallel") or {}
    strategy = str(p.get("strategy", "auto"))
    if strategy not in STRATEGIES:
        raise ParallelError(f"parallel.strategy must be one of {STRATEGIES}, got {strategy!r}")
    teacher = str(p.get("teacher", "auto"))
    if teacher not in TEACHER_MODES:
        raise ParallelError(f"parallel.teacher must be one of {TEACHER_MODES}, got {teacher!r}")
    if accelerator.num_processes == 1:
        return "single"
    if strategy != "auto":
        return strategy
    if accelerator.device.type != "cuda":
        return "ddp"
    from elastic.plan import choose_strategy

    return choose_strategy(cfg, stage, accelerator.num_processes, gpu_memory_bytes(accelerator.device))


def resolve_teacher_mode(cfg, stage: str, accelerator, strategy: str) -> str:
    """``replicate`` or ``shard`` for the frozen teacher (only FSDP runs shard it)."""
    mode = str((cfg.get("parallel") or {}).get("teacher", "auto"))
    if strategy != "fsdp":
        return "replicate"
    if mode != "auto":
        return mode
    if accelerator.device.type != "cuda":
        return "replicate"
    from elastic.plan import choose_teacher

    return choose_teacher(cfg, stage, accelerator.num_processes, gpu_memory_bytes(accelerator.device), strategy=strategy)


def gpu_memory_bytes(device: torch.device) -> int:
    """Total memory of the GPU a process trains on: what the plan sizes its check and choices against."""
    return torch.cuda.get_device_properties(device).total_memory


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

