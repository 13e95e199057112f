#!/usr/bin/env python3
"""GPU check: what only a GPU shows, measured on one lent GPU (H100 80 GB or H200) in under 8 minutes.

The lead's command (the device tool's ``run``), from the repository root. First, here, once:
``bash scripts/gpu_check_wheels.sh`` (puts the few pure-Python wheels the distill stage needs into the
ignored folder ``wheels/``); then::

    run(command="python3 -m pip install -q --no-index --no-deps wheels/*.whl && HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT",
        carry=["wheels"], timeout_s=540)

and copy ``gpu_<card>.md`` / ``.json`` from the reply's ``files_at`` into ``benchmarks/`` (``gpu_<card>.log``
holds every check's output). Without the wheels, drop the ``pip install ... &&`` part: the two
distill-stage checks then fail with one line each and the others still run.

The GPU host has torch, transformers, accelerate, safetensors, tokenizers and triton but no hydra,
omegaconf, datasets, modelopt, mamba-ssm or causal-conv1d, and no network. Nothing here imports hydra or
modelopt; omegaconf and datasets are imported only by the distill stage (``elastic.stages.distill``
builds its data through ``elastic.data``, which imports datasets at module level, and reads an omegaconf
config), so only the two ``distill_stage*`` checks need the carried wheels.

Checks, in order, each in its own process with its own time budget (a crash, an out-of-memory error or
a hang of one is recorded as one line and the next still runs; the whole run stops at ``--budget``):

* ``environment`` -- card, memory, library versions, which optional packages import.
* ``kernel_path`` -- which Mamba-2 scan ran (mamba-ssm, transformers' hub kernels, or transformers'
  pure-torch path), observed from the Python functions a training forward calls, against what
  ``elastic/kernels.py`` (and so the plan) assumes.
* ``distill_stage`` / ``distill_stage_fsdp`` -- the real ``elastic.stages.distill.run`` at tiny size on
  the device: first held-out evaluation, one step per phase, checkpoints, outputs. One process picks the
  ``single`` strategy; the ``_fsdp`` variant makes ``elastic.parallel.resolve_strategy`` answer ``fsdp`` (what
  the plan picks for the 9B -> 4B on 8 GPUs) over a one-rank process group, so the stage's FSDP code path
  (student loading, evaluation, sharding) runs on one GPU: the class of defect 1 of issue #20.
* ``masked_sliced`` -- for one block of each kind (Mamba, attention, MLP) at the 9B's width cut to the 4B's,
  the masked (elastic) model in bf16 against the physical slice in bf16, both against the slice in fp32:
  masking must add no more error than bf16 itself.
* ``distill_step`` -- distillation steps with the student at the 4B's real width and the teacher at the 9B's,
  both at reduced depth (as many layers as the plan says fit this card), 8K tokens, the recipe's
  activation checkpointing and loss chunks, through the project's own loop (``elastic.train.train``):
  measured peak (``torch.cuda.max_memory_allocated``) against the plan's prediction
  (``elastic.plan.plan_training``) for the same config on 1 GPU, tokens/s and MFU. After an out-of-memory
  error it halves the depth, then the context (recorded in ``attempts``; the check then fails, with the
  figures of the shorter context).

It writes ``OUT/gpu_<card>.md`` (card from ``torch.cuda.get_device_name``, sanitized) and ``.json`` with the
command, card, date, versions and every figure, and ``OUT/gpu_<card>.log``. Exit status 0 when every check
passed, 1 when one failed (the report is written either way), 2 on bad usage.

``--smoke`` runs the same code on the CPU at tiny widths (``tests/test_gpu_check.py`` runs it in the suite,
also with hydra, omegaconf, datasets, modelopt, mamba-ssm and causal-conv1d hidden, as on the GPU host).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's `elastic`, not an installed one (a script's sys.path starts at scripts/)
CONFIGS = REPO / "tests" / "data"  # the real 4B / 9B config.json files travel with the working tree there
STUDENT_JSON, TEACHER_JSON = "nemotron-3-nano-4b.config.json", "nemotron-nano-9b-v2.config.json"
KINDS = {"M": "linear_attention", "-": "mlp", "*": "full_attention"}
GiB = 2**30
WALL_LIMIT_S = 450  # the default --budget: under the brief's 8 minutes with room for the wheels' install and start-up

# name -> (budget on a GPU, budget in --smoke on a busy CPU), seconds; the run's --budget caps the sum
CHECKS = {
    "environment": (45, 240),
    "kernel_path": (60, 240),
    "distill_stage": (90, 400),
    "distill_stage_fsdp": (90, 400),
    "masked_sliced": (90, 300),
    "distill_step": (300, 400),
}
MIN_START_S = 20  # a check is not started with less time than this left


class CheckFailed(Exception):
    """A check ran but the property it checks does not hold (or it cannot run here); `figures` are kept."""

    def __init__(self, why: str, figures: dict | None = None):
        super().__init__(why)
        self.figures = figures or {}


def one_line(e: BaseException) -> str:
    """The exception as one line: its type and the first line of its message."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return (f"{type(e).__name__}: {text}" if text else type(e).__name__)[:400]


# ================================================================================================ shapes


class Ctx:
    """What every check needs to know: the device, and the real or the smoke shapes."""

    def __init__(self, smoke: bool, deadline: float | None = None):
        import torch

        self.smoke = smoke
        self.deadline = deadline or float("inf")  # time.time() at which the runner kills this check
        self.result_path: Path | None = None  # where the runner reads this check's record
        if not smoke and not torch.cuda.is_available():
            raise CheckFailed("no CUDA device here: run the real check on a GPU, or --smoke on a CPU")
        self.device = torch.device("cpu" if smoke else "cuda")
        self.seq = 64 if smoke else 8192          # distill_step tokens per sequence (the recipe's phase 1: 8K)
        self.loss_chunk = 32 if smoke else 1024   # the recipe's distill.loss_chunk_size
        self.masked_seq = 48 if smoke else 1024   # masked_sliced tokens
        self.max_layers = 4 if smoke else None    # distill_step depth cap (None: the student's full depth)

    def save_partial(self, figures: dict) -> None:
        """Write the figures known so far: a check killed at its budget still reports them."""
        if self.result_path is not None:
            self.result_path.write_text(json.dumps({"status": "failed", "why": None, "summary": "", "figures": figures,
                                                    "partial": True}, default=str))

    def config_dict(self, name: str) -> dict:
        """A real config.json; at smoke size its widths shrunk (layer pattern and every other field kept)."""
        d = json.loads((CONFIGS / name).read_text())
        if self.smoke:
            student = name == STUDENT_JSON
            d.update(vocab_size=256, hidden_size=48 if student else 64, intermediate_size=64 if student else 96,
                     mamba_num_heads=4 if student else 8, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, chunk_size=16,
                     max_position_embeddings=4096)
        return d


def pattern_of(d: dict) -> str:
    if d.get("layers_block_type"):
        return "".join({v: k for k, v in KINDS.items()}[t] for t in d["layers_block_type"])
    return d["hybrid_override_pattern"]


def reduced_pattern(pattern: str, k: int) -> str:
    """The first `k` layers of `pattern`, the last ones swapped for any kind the prefix lacks (so a reduced
    NemotronH keeps its attention layers once it has room for every kind)."""
    out = list(pattern[:k])
    missing = [kind for kind in dict.fromkeys(pattern) if kind not in out]
    if k >= len(set(pattern)):
        for i, kind in enumerate(missing):
            out[k - 1 - i] = kind
    return "".join(out)


def hf_config(d: dict, pattern: str | None = None):
    """A `NemotronHConfig` from a config.json dict, with `pattern` as its layers when given."""
    from transformers import NemotronHConfig

    d = dict(d)
    pattern = pattern or pattern_of(d)
    for stale in ("hybrid_override_pattern", "num_hidden_layers", "layers_block_type", "architectures"):
        d.pop(stale, None)
    return NemotronHConfig(**d, layers_block_type=[KINDS[c] for c in pattern])


def build_model(config, device, dtype, seed: int = 0):
    """A randomly initialised NemotronH made directly on `device` in `dtype` (no CPU copy, no cast)."""
    import torch
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return NemotronHForCausalLM(config)
    finally:
        torch.set_default_dtype(old)


def perturb(model, seed: int = 0) -> None:
    """Random init leaves norms at 1 and Mamba biases uniform: perturb them so a wrong index shows."""
    import torch

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "dt_bias", "D", "A_log", "conv1d.bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))


def gib(n: float | None) -> float | None:
    """Bytes as GiB, 4 significant digits (the smoke's sizes are kilobytes)."""
    return None if n is None else float(f"{n / GiB:.4g}")


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ================================================================================================ checks


def check_environment(ctx: Ctx):
    import importlib
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "missing"

    def imports(module: str) -> str:
        try:
            importlib.import_module(module)
            return "ok"
        except Exception as e:  # noqa: BLE001 - a broken CUDA extension counts as not there
            return f"fails ({one_line(e)[:120]})"

    f = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cuda_available": torch.cuda.is_available()}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        f.update(card=torch.cuda.get_device_name(ctx.device), memory_gib=round(props.total_memory / GiB, 2),
                 capability=f"sm_{props.major}{props.minor}", multiprocessors=props.multi_processor_count)
    else:
        f.update(card="cpu", memory_gib=None)
    for dist in ("transformers", "accelerate", "safetensors", "tokenizers", "triton", "numpy", "pyarrow", "fsspec",
                 "huggingface-hub", "pandas"):
        f[dist] = version(dist)
    # what the host lacks and the project may use: present or not, and whether it imports
    f["optional"] = {dist: (version(dist), imports(mod)) for dist, mod in (
        ("omegaconf", "omegaconf"), ("hydra-core", "hydra"), ("datasets", "datasets"), ("nvidia-modelopt", "modelopt"),
        ("mamba-ssm", "mamba_ssm"), ("causal-conv1d", "causal_conv1d"), ("kernels", "kernels"))}
    return f"{f['card']}, torch {f['torch']}, transformers {f['transformers']}", f


# ---------------------------------------------------------------------------------------- kernel path


def observe_mamba_path(forward) -> dict:
    """Run `forward()` and say which Mamba-2 implementation it called, from the source files of the Python
    functions that ran (``sys.setprofile``: the fused kernels are reached through Python wrappers in
    ``mamba_ssm`` / ``causal_conv1d``, from site-packages or from the Hugging Face hub's kernel cache)."""
    files: set[str] = set()

    def prof(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(prof)
    try:
        forward()
    finally:
        sys.setprofile(None)
    norm = [f.replace(os.sep, "/") for f in files]
    hub = sorted(f for f in norm if "kernels-community" in f or ("/huggingface/hub/" in f and "/build/" in f))
    ssm = sorted(f for f in norm if "/mamba_ssm/" in f and f not in hub)
    conv = sorted(f for f in norm if "/causal_conv1d/" in f and f not in hub)
    ran = "hub kernels" if hub else "mamba-ssm" if ssm else "torch"
    return {"ran": ran, "causal_conv1d": bool(conv) or any("causal_conv1d" in f for f in hub),
            "kernel_files": (hub or ssm)[:5]}


def check_kernel_path(ctx: Ctx):
    import torch

    from elastic import kernels

    d = ctx.config_dict(STUDENT_JSON)
    config = hf_config(d, "M")
    model = build_model(config, ctx.device, torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    model.train()
    ids = torch.randint(0, config.vocab_size, (1, 256), device=ctx.device)
    seen = observe_mamba_path(lambda: model(input_ids=ids, use_cache=False).logits.float().sum().backward())
    predicted = kernels.path(config)  # what the training stages log and the plan sizes the workspace for
    f = {**seen, "elastic_kernels_path": predicted, "elastic_kernels_says": kernels.describe(config, predicted)}
    if (seen["ran"] == "torch") != (predicted == "torch"):
        raise CheckFailed(f"the {seen['ran']} scan ran but elastic.kernels says {predicted!r}: the plan sizes the wrong "
                          "Mamba workspace", f)
    return f"{seen['ran']} (elastic.kernels agrees: {predicted})", f


# ---------------------------------------------------------------------------------------- distill stage


WORDS = "the king queen lord love death night day sword crown blood heart fair sweet good my lady".split()


def tiny_world(root: Path) -> dict:
    """Text files, a byte-level BPE tokenizer trained on them, and tiny teacher / student checkpoints."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    text = root / "text"
    text.mkdir(parents=True)
    for i in range(6):
        (text / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(60)))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p.read_text() for p in sorted(text.glob("*.txt"))],
                            trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    small = dict(vocab_size=320, mamba_head_dim=8, n_groups=2, ssm_state_size=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, chunk_size=16, max_position_embeddings=1024, model_type="nemotron_h")
    paths = {"text": text}
    for name, pattern, widths, seed in (("teacher", "M-*M-", dict(hidden_size=64, intermediate_size=96, mamba_num_heads=8), 1),
                                        ("student", "M*-", dict(hidden_size=48, intermediate_size=64, mamba_num_heads=4), 2)):
        model = build_model(hf_config({**small, **widths}, pattern), "cpu", torch.float32, seed=seed)
        perturb(model, seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def stage_config(world: dict, run_dir: Path, device):
    """The root config as `python -m elastic.run` composes it (conf/config.yaml's keys and every group's
    default.yaml, no recipe), without hydra; tiny phases of one step each."""
    from omegaconf import OmegaConf

    conf = REPO / "conf"
    root = OmegaConf.load(conf / "config.yaml")
    cfg = OmegaConf.create({k: v for k, v in root.items() if k not in ("defaults", "hydra")})
    for group in sorted(p.name for p in conf.iterdir() if (p / "default.yaml").exists()):
        cfg[group] = OmegaConf.load(conf / group / "default.yaml")
    cfg.merge_with({
        "stage": "distill", "run_dir": str(run_dir), "recipe_name": "gpu_check", "device": device.type,
        "parent": {"path": str(world["teacher"])}, "data": {"files": str(world["text"] / "*.txt")},
        "tracking": {"backends": []},
        "distill": {"student": str(world["student"]), "eval_sequences": 4, "eval_batch_size": 2, "max_steps": 1,
                    "checkpoint_every": 1},
    })
    cfg.distill.phases[0].update(seq_len=32, batch_size=4, micro_batch_size=2, warmup_steps=0)
    cfg.distill.phases[1].update(seq_len=128, batch_size=2, micro_batch_size=1, warmup_steps=0)
    return cfg


def _distill_stage(ctx: Ctx, fsdp: bool):
    try:  # the stage's own imports: a clear line instead of a traceback where the wheels were not carried
        import datasets  # noqa: F401
        import omegaconf  # noqa: F401
    except ImportError as e:
        raise CheckFailed(f"{e.name} is not importable here: the distill stage needs omegaconf and datasets "
                          "(make the wheels with scripts/gpu_check_wheels.sh and carry wheels/)") from None
    import torch.distributed as dist

    import elastic.parallel as parallel
    from elastic.rundir import RunDir
    from elastic.stages import distill

    root = Path(tempfile.mkdtemp(prefix="gpu_check_distill_"))
    world = tiny_world(root)
    cfg = stage_config(world, root / "run", ctx.device)
    chosen: list[str] = []
    if fsdp:
        # One process would make the stage pick `single`; a one-rank process group and `fsdp` as the answer
        # run its FSDP path (load, evaluate, shard, step, gather) on this one device.
        if ctx.device.type == "cuda":
            import torch

            torch.cuda.set_device(ctx.device)
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", init_method=f"file://{root / 'pg'}",
                                rank=0, world_size=1)
        real = parallel.resolve_strategy

        def resolve_strategy(cfg_, stage, accelerator):
            real(cfg_, stage, accelerator)  # its checks of parallel.* still run
            chosen.append("fsdp")
            return "fsdp"

        parallel.resolve_strategy = resolve_strategy
    try:
        summary = distill.run(cfg, RunDir(cfg.run_dir))
    finally:
        if fsdp and dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(root, ignore_errors=True)
    if fsdp and not chosen:
        raise CheckFailed("the distill stage no longer asks elastic.parallel.resolve_strategy: update gpu_check's FSDP variant")
    f = {"strategy": "fsdp (forced, 1 rank)" if fsdp else "single", "device": str(ctx.device)}
    for name, m in summary["phases"].items():
        before, after = m.get("heldout_before") or {}, m.get("heldout_after") or {}
        f[name] = {"steps": m["steps"], "tokens": m["tokens"], "heldout_ce_before": before.get("ce"),
                   "heldout_ce_after": after.get("ce"), "final_train_loss": m["final_train_loss"]}
        if not before or not after:
            raise CheckFailed(f"{name}: no held-out evaluation ran (heldout_before / heldout_after empty)", f)
    return f"{len(summary['phases'])} phases: evaluation, 1 step, checkpoint and output each on {ctx.device}", f


def check_distill_stage(ctx: Ctx):
    return _distill_stage(ctx, fsdp=False)


def check_distill_stage_fsdp(ctx: Ctx):
    return _distill_stage(ctx, fsdp=True)


# ---------------------------------------------------------------------------------------- masked == sliced


def check_masked_sliced(ctx: Ctx):
    import torch

    from elastic.models.nemotron_h import Ranking, arch_of, make_arch, slice_model
    from elastic.models.nemotron_h.masking import ElasticNemotronH
    from elastic.search_space import Space

    parent_d, child_d = ctx.config_dict(TEACHER_JSON), ctx.config_dict(STUDENT_JSON)
    target = {"hidden": child_d["hidden_size"], "ffn": child_d["intermediate_size"], "mamba": child_d["mamba_num_heads"]}
    f, bad = {}, []
    for kind, label in (("M", "mamba"), ("*", "attention"), ("-", "mlp")):
        parent = build_model(hf_config(parent_d, kind), ctx.device, torch.float32)
        perturb(parent)
        parent.eval()
        arch = arch_of(parent)
        ranking = Ranking.random(arch, torch.Generator().manual_seed(0))
        # an axis of a kind this block lacks stays whole (it has a single choice)
        keep = {a.name: target[a.name] if not a.kinds or any(k in arch.pattern for k in a.kinds) else arch.axis_size(a.name)
                for a in arch.axes()}
        sub = make_arch(arch, ranking, hidden_size=keep["hidden"], intermediate_size=keep["ffn"], mamba_num_heads=keep["mamba"])
        space = Space(arch, {a: tuple(sorted({keep[a], arch.axis_size(a)})) for a in keep}, (0,))
        ids = torch.randint(0, arch.vocab_size, (1, ctx.masked_seq), generator=torch.Generator().manual_seed(1)).to(ctx.device)
        with torch.no_grad():
            ref = slice_model(parent, sub, ranking)(ids, use_cache=False).logits.float()
            parent.to(torch.bfloat16)
            sliced = slice_model(parent, sub, ranking)(ids, use_cache=False).logits.float()
            el = ElasticNemotronH.from_parent(parent, ranking, space).to(ctx.device).eval()
            el.set_arch(sub)
            masked = el(ids).logits.float()
        err = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
        r = {"rel_err_masked_bf16": err(masked), "rel_err_sliced_bf16": err(sliced),
             "max_abs_masked_vs_sliced": float((masked - sliced).abs().max()), "finite": bool(masked.isfinite().all())}
        f[label] = r
        # bf16 rounds at 2^-8 relative: masking may change the summation order, not add an error of its own
        if not r["finite"] or r["rel_err_masked_bf16"] > 2 * r["rel_err_sliced_bf16"] + 1e-3:
            bad.append(label)
        del parent, el, ref, sliced, masked
        free(ctx.device)
    f["sizes"] = {"parent": {k: parent_d[k] for k in ("hidden_size", "intermediate_size", "mamba_num_heads")}, "masked_to": target,
                  "tokens": ctx.masked_seq, "vocab": parent_d["vocab_size"]}
    if bad:
        raise CheckFailed(f"masked != sliced in bf16 for {', '.join(bad)} (relative error vs the fp32 slice above twice the "
                          "bf16 slice's)", f)
    return ("masked == sliced in bf16 for mamba, attention, mlp (relative error "
            + ", ".join(f"{f[k]['rel_err_masked_bf16']:.1e} vs {f[k]['rel_err_sliced_bf16']:.1e}" for k in ("mamba", "attention", "mlp"))
            + ")"), f


# ---------------------------------------------------------------------------------------- distill step


class RandomRows:
    """Random token rows for `train.StepBatches`: a step's cost does not depend on the text."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        self.vocab, self.seq_len, self.seed, self.pos = vocab, seq_len, seed, 0

    def take(self, n: int) -> list[int]:
        self.pos += n
        return list(range(self.pos - n, self.pos))

    def fetch(self, addresses) -> "torch.Tensor":  # noqa: F821
        import torch

        return torch.stack([torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(self.seed + a))
                            for a in addresses])

    def catch_up(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


# dense bf16 TFLOP/s by the vendor's datasheets (SXM parts; the H100 PCIe is slower); None: no MFU reported
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


def peak_tflops(card: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k.lower() in card.lower()), None)


def _plan(student, teacher, ctx: Ctx, seq: int, memory: float, path: str, s_cfg, t_cfg, checkpointing: bool = True):
    """The plan's row for this step on 1 GPU: what `stage=plan` computes for a distill phase of these shapes."""
    from elastic.plan import Shape, plan_training

    return plan_training("gpu check", "distill", student, teacher, shape=Shape(1, seq), batch_size=1, steps=1,
                         world_size=1, gpu_memory_bytes=memory, reserve_bytes=6 * GiB, strategy="ddp",
                         teacher_mode="replicate", path=path, chunk=s_cfg.chunk_size, teacher_chunk=t_cfg.chunk_size,
                         checkpointing=checkpointing, loss_chunk=ctx.loss_chunk, elastic=False, peak_tflops=989.0, mfu=0.35,
                         keys={})


def check_distill_step(ctx: Ctx):
    import torch

    from elastic import kernels
    from elastic.models.nemotron_h import Arch

    s_d, t_d = ctx.config_dict(STUDENT_JSON), ctx.config_dict(TEACHER_JSON)
    s_pat, t_pat = pattern_of(s_d), pattern_of(t_d)
    cuda = ctx.device.type == "cuda"
    card = torch.cuda.get_device_name(ctx.device) if cuda else "cpu"
    memory = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else 8 * GiB  # cpu: nominal, sizes the depth only
    path = kernels.path(hf_config(s_d)) or "torch"

    def shapes(k: int, seq: int):
        kt = max(1, min(len(t_pat), round(k * len(t_pat) / len(s_pat))))  # the teacher at the same share of its depth
        s_cfg, t_cfg = hf_config(s_d, reduced_pattern(s_pat, k)), hf_config(t_d, reduced_pattern(t_pat, kt))
        return s_cfg, t_cfg, _plan(Arch.from_config(s_cfg), Arch.from_config(t_cfg), ctx, seq, memory, path, s_cfg, t_cfg)

    def plan_depth(seq: int) -> int:
        """As many student layers as the plan says fit this card (with the plan's default 6 GiB reserve)."""
        k = min(len(s_pat), ctx.max_layers or len(s_pat))
        while k > 1 and not shapes(k, seq)[2].fits:
            k -= 1
        return k

    # After an out-of-memory error: half the depth, down to one layer; then half the context (the torch scan's
    # transient grows with the context, not the depth), so that a speed and a peak are measured somewhere.
    seqs = [ctx.seq // 2**i for i in range(4)]
    f = {"card": card, "micro_batch": 1, "gradient_checkpointing": True, "loss_chunk_size": ctx.loss_chunk,
         "attempts": []}
    attempts, result, si = f["attempts"], None, 0
    k = plan_depth(seqs[si])
    while True:
        seq = seqs[si]
        s_cfg, t_cfg, plan = shapes(k, seq)
        attempt = {"tokens": seq, "student_layers": reduced_pattern(s_pat, k), "teacher_layers": config_pattern(t_cfg),
                   "plan_peak_gib": gib(plan.peak_bytes), "plan_peak_phase": plan.peak_phase}
        attempts.append(attempt)
        ctx.save_partial(f)
        oom, t0 = None, time.time()
        try:
            result = _run_steps(ctx, s_cfg, t_cfg, seq)
        except torch.OutOfMemoryError as e:
            oom = one_line(e)
        if oom is None:
            break
        attempt["out_of_memory"] = oom[:300]
        attempt["measured_peak_gib_at_oom"] = gib(torch.cuda.max_memory_allocated(ctx.device)) if cuda else None
        ctx.save_partial(f)
        free(ctx.device)
        if k > 1:
            k //= 2
        elif si + 1 < len(seqs) and seqs[si + 1] >= 2:
            si += 1
            k = plan_depth(seqs[si])
        else:
            break
        if time.time() + (time.time() - t0) > ctx.deadline:  # a retry would not finish: report what is known
            break
    first_oom = next((a for a in attempts if a["tokens"] == ctx.seq and "out_of_memory" in a), None)
    if result is None:
        raise CheckFailed(f"out of memory in every attempt down to {len(attempt['student_layers'])} student layer(s) at "
                          f"{seq} tokens (plan {attempt['plan_peak_gib']} GiB): {attempt['out_of_memory']}", f)
    plan_model_flops = _plan(Arch.from_config(s_cfg), Arch.from_config(t_cfg), ctx, seq, memory, path, s_cfg, t_cfg,
                             checkpointing=False).flops_per_token
    tps = result["tokens_per_s"]
    peak = peak_tflops(card) if cuda else None
    measured = result["peak_bytes"]
    f.update(
        tokens_per_sequence=seq, student=Arch.from_config(s_cfg).short(), teacher=Arch.from_config(t_cfg).short(),
        mamba_path=result["mamba_path"], measured_peak_gib=gib(measured), measured_reserved_gib=gib(result["reserved_bytes"]),
        plan_peak_gib=gib(plan.peak_bytes), plan_peak_phase=plan.peak_phase,
        plan_terms_gib={t.name: gib(t.bytes) for t in plan.terms},
        measured_over_plan=round(measured / plan.peak_bytes, 3) if measured is not None else None,
        tokens_per_s=round(tps, 1), step_seconds=round(seq / tps, 3), losses=result["losses"],
        flops_per_token_model=plan_model_flops, flops_per_token_with_recompute=plan.flops_per_token,
        peak_tflops=peak,
        mfu=round(tps * plan_model_flops / (peak * 1e12), 4) if peak else None,
        hfu=round(tps * plan.flops_per_token / (peak * 1e12), 4) if peak else None,
    )
    where = (f"peak {f['measured_peak_gib']} GiB vs plan {f['plan_peak_gib']} GiB (x{f['measured_over_plan']}), "
             if measured is not None else f"plan {f['plan_peak_gib']} GiB (no allocator peak on cpu), ")
    mfu = f"MFU {f['mfu']:.1%}" if f["mfu"] is not None else "no MFU (no peak rate for this device)"
    summary = f"{len(attempt['student_layers'])} student layers at {seq} tokens: {where}{tps:.0f} tokens/s, {mfu}"
    if not all(math.isfinite(x) for x in result["losses"]):
        raise CheckFailed(f"non-finite distillation loss {result['losses']}", f)
    if seq != ctx.seq:
        raise CheckFailed(f"out of memory at {ctx.seq} tokens even with 1 student layer ({first_oom['out_of_memory'][:160]}; "
                          f"plan {first_oom['plan_peak_gib']} GiB); measured at {seq} tokens instead: {summary}", f)
    return summary, f


def config_pattern(config) -> str:
    """The layer pattern (``M``, ``-``, ``*``) of a built `NemotronHConfig`."""
    return pattern_of({"layers_block_type": list(config.layers_block_type)})


def _run_steps(ctx: Ctx, s_cfg, t_cfg, seq: int) -> dict:
    """Two steps of the project's loop (the first allocates the optimizer's state; the second is timed):
    the student fp32 with bf16 autocast, the teacher frozen in bf16, as the distill stage runs them."""
    import torch

    from elastic.losses import KDStudent
    from elastic.stages.distill import make_step_fn
    from elastic.train import StepBatches, TrainConfig, make_accelerator, train

    cuda = ctx.device.type == "cuda"
    teacher = build_model(t_cfg, ctx.device, torch.bfloat16 if cuda else torch.float32, seed=1).requires_grad_(False).eval()
    student = build_model(s_cfg, ctx.device, torch.float32, seed=2)
    # which scan runs, seen on a short training forward before the measured steps
    ids = torch.randint(0, s_cfg.vocab_size, (1, min(256, seq)), device=ctx.device)
    student.train()
    seen = observe_mamba_path(lambda: student(input_ids=ids, use_cache=False))
    model = KDStudent(student, chunk_size=ctx.loss_chunk)
    acc = make_accelerator(device=ctx.device.type, mixed_precision="bf16" if cuda else "no")
    batches = StepBatches(RandomRows(s_cfg.vocab_size, seq), batch_size=1, micro_batch_size=1)
    tcfg = TrainConfig(max_steps=2, lr=9e-5, gradient_checkpointing=True, grad_clip=1.0, desc="gpu check step")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    result = train(model, make_step_fn(0.0), batches, tcfg, accelerator=acc, teacher=teacher, strategy="single",
                   mixed_precision="bf16" if cuda else "no")
    out = {"tokens_per_s": result.history[-1]["tokens_per_s"], "losses": result.losses, "mamba_path": seen["ran"],
           "peak_bytes": torch.cuda.max_memory_allocated(ctx.device) if cuda else None,
           "reserved_bytes": torch.cuda.max_memory_reserved(ctx.device) if cuda else None}
    acc.free_memory()
    return out


# ================================================================================================ runner


def child_main(name: str, result_path: Path, smoke: bool, deadline: float | None) -> int:
    """Run one check in this process and write its record (status, why, summary, figures) as JSON."""
    rec = {"status": "failed", "why": None, "summary": "", "figures": {}}
    try:
        ctx = Ctx(smoke, deadline)
        ctx.result_path = result_path
        summary, figures = globals()[f"check_{name}"](ctx)
        rec.update(status="passed", summary=summary, figures=figures)
    except CheckFailed as e:
        rec.update(why=str(e), figures=e.figures)
    except BaseException as e:  # noqa: BLE001 - every failure is recorded as one line; the traceback goes to the log
        traceback.print_exc()
        rec["why"] = one_line(e)
    result_path.write_text(json.dumps(rec, default=str))
    return 0


def run_child(name: str, budget: float, smoke: bool, log) -> dict:
    """One check in its own process group, killed at `budget` seconds; its output appended to `log`."""
    fd, res = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".json")
    os.close(fd)
    res = Path(res)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(res),
           "--deadline", str(time.time() + budget)] + (["--smoke"] if smoke else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.monotonic()
    log.write(f"\n===== {name} (budget {budget:.0f} s)\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the check's own process group: it and anything it started
        rc, timed_out = proc.wait(), True
    seconds = time.monotonic() - t0
    try:
        rec = json.loads(res.read_text()) if res.stat().st_size else None
    finally:
        res.unlink(missing_ok=True)
    if timed_out:  # with the figures it had saved so far (`Ctx.save_partial`)
        rec = {"status": "failed", "why": f"timed out after its {budget:.0f} s budget", "summary": "",
               "figures": (rec or {}).get("figures", {})}
    elif rec is None:
        rec = {"status": "failed", "why": f"the check's process died (exit status {rc}) before writing its result",
               "summary": "", "figures": {}}
    rec.update(seconds=round(seconds, 1), budget_s=round(budget))
    log.write(f"===== {name}: {rec['status']} in {seconds:.0f} s{': ' + rec['why'] if rec['why'] else ''}\n")
    log.flush()
    return rec


def sanitize(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_") or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - the device host gets the working tree without .git
        return "unknown (no git metadata here)"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, default=str) + "`"
    return str(v)


def write_report(out: Path, report: dict) -> Path:
    card = report["card"]
    stem = out / f"gpu_{sanitize(card)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    env = report["checks"].get("environment", {}).get("figures", {})
    lines = [
        f"# GPU check: {card}{' (smoke, CPU, tiny widths)' if report['smoke'] else ''}", "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; commit {report['commit']}; {report['seconds']:.0f} s of the {report['budget_s']} s budget",
        f"- card: {card}" + (f", {env.get('memory_gib')} GiB, {env.get('capability')}" if env.get("memory_gib") else ""),
        "- versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "transformers", "accelerate", "triton",
                                                              "safetensors", "tokenizers") if k in env),
        "- optional packages: " + ", ".join(f"{k} {v[0]} ({v[1]})" for k, v in env.get("optional", {}).items()),
        "- written by `scripts/gpu_check.py`; the figures of each check follow the table.", "",
        "| check | status | seconds | result |", "|---|---|---|---|",
    ]
    for name, rec in report["checks"].items():
        res = rec["summary"] if rec["status"] == "passed" else rec["why"]
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {str(res).replace('|', '/')} |")
    for name, rec in report["checks"].items():
        if name == "environment" or not rec.get("figures"):
            continue
        lines += ["", f"## {name}", ""] + [f"- {k}: {_fmt(v)}" for k, v in rec["figures"].items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the same checks on the CPU at tiny widths (the test suite's run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks"), help="folder for gpu_<card>.md / .json / .log")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"total seconds before the hard stop (default {WALL_LIMIT_S}; --smoke: the checks' own budgets)")
    ap.add_argument("--only", default=None, help="comma-separated checks to run (environment always runs): " + ", ".join(CHECKS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, Path(args.result), args.smoke, args.deadline)

    names = list(CHECKS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(CHECKS))
        if unknown:
            print(f"gpu_check: unknown checks {unknown}; the checks are {', '.join(CHECKS)}", file=sys.stderr)
            return 2
        names = ["environment"] + [n for n in names if n in wanted and n != "environment"]
    budget = args.budget or (sum(CHECKS[n][1] for n in names) if args.smoke else WALL_LIMIT_S)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + budget
    report = {"command": " ".join(["python3", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
              "smoke": args.smoke, "budget_s": round(budget), "card": "unknown", "checks": {}}
    with tempfile.NamedTemporaryFile("w+", prefix="gpu_check_", suffix=".log", delete=False) as log:
        for name in names:
            left = deadline - time.monotonic() - 5  # 5 s kept for writing the report
            if left < MIN_START_S:
                rec = {"status": "failed", "why": f"not run: the run's {budget:.0f} s budget was spent", "summary": "",
                       "figures": {}, "seconds": 0, "budget_s": 0}
            else:
                rec = run_child(name, min(CHECKS[name][1 if args.smoke else 0], left), args.smoke, log)
            report["checks"][name] = rec
            print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s) {rec['summary'] or rec['why']}", flush=True)
            if name == "environment":
                report["card"] = rec["figures"].get("card", "unknown")
                if rec["status"] != "passed" and not args.smoke and "no CUDA device" in (rec["why"] or ""):
                    print(f"gpu_check: {rec['why']}", file=sys.stderr)
                    return 2
        report["seconds"] = round(time.monotonic() - t0, 1)
        md = write_report(out, report)
        log.flush()
        log_path = md.with_suffix(".log")
        log_path.write_text(Path(log.name).read_text())
    Path(log.name).unlink(missing_ok=True)
    print(Path(log_path).read_text()[-6000:])
    print(f"[gpu_check] wrote {md}, {md.with_suffix('.json')} and {log_path} in {report['seconds']:.0f} s")
    return 0 if all(r["status"] == "passed" for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
