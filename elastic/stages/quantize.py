"""Stage `quantize`: FP8 post-training quantization with NVIDIA Model Optimizer, exported for serving.

    python -m elastic.run stage=quantize run_dir=RUN                                # the last distilled model
    python -m elastic.run stage=quantize quantize.model=/ckpt/any-nemotron-h quantize.preset=nvidia_nano \\
        quantize.kv_cache=true quantize.calib_sequences=1024 data.files='/data/calib/*.jsonl' run_dir=RUN
    python -m elastic.run stage=quantize quantize.calib_sequences=16 quantize.eval_sequences=8   # tiny CPU variant (toy, ~15 s)

What it does: `mtq.quantize` with per-tensor FP8 E4M3 weights and activations (optionally the KV
cache), max calibration on ``calib_sequences`` sequences of the data's calib split; the modules the
preset's globs (``quantize.presets``) and ``quantize.keep_bf16`` name stay in ``quantize.dtype``.
On a CPU this is fake quant (the model computes in fp32 with FP8-rounded weights and inputs); the
export still writes float8 weights. modelopt's HF export writes the folder; its files are then read
back, known modelopt defects repaired (`elastic.fp8.repair`) and the folder checked the way vLLM
reads it (`elastic.export_check`): anything not repairable stops the stage, with nothing written.

MoE layers (NemotronH layer type "moe", pattern letter ``E``), following modelopt's hybrid MoE configs
(`MAMBA_MOE_FP8_AGGRESSIVE_CFG` = preset ``nvidia_nano``, `MAMBA_MOE_FP8_CONSERVATIVE_CFG` = ``conservative``;
``default`` also FP8s attention):
- FP8 in every preset: the routed experts, one unit per layer (``mixer.experts``; each expert's
  ``up_proj`` and ``down_proj`` with its own ``weight_scale``, one ``input_scale`` per projection shared by
  the layer's experts, written per expert as ``experts.<i>.up_proj.weight`` like the hub checkpoints), and
  the shared expert (``mixer.shared_experts.up_proj`` / ``down_proj``);
- never FP8: the router (``mixer.gate.weight`` and ``e_score_correction_bias``: no linear module, kept in
  fp32 as transformers computes them, listed in the export's exclusions; modelopt's ``*router*``), and as for
  dense models ``lm_head``, the embeddings and ``mixer.conv1d`` BF16. A glob such as
  ``"*.mixer.experts"`` in ``quantize.keep_bf16`` keeps routed experts BF16. (modelopt's configs also keep
  ``fc1/fc2_latent_proj`` BF16: NemotronH with ``moe_latent_size`` is not supported here.)

Inputs: ``quantize.model``, else the last distilled phase (``distill/DONE.json``), else the model
``prune/latest.json`` names. Outputs: ``RUN/quantize/<name>/`` (FP8 weights with ``weight_scale`` and
``input_scale``, config.json with ``quantization_config``, hf_quant_config.json, tokenizer) and
beside it ``<name>.report.json`` (held-out loss of the BF16 model, the fake-quant model and the
dequantized export; what stayed BF16; sizes on disk; repairs) and the ``.meta.json`` sidecar.
Evaluate the export without FP8 hardware with `elastic.fp8.load_dequantized`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from elastic.fp8 import EXPORT_DTYPES, QuantizeError
from elastic.rundir import RunDir, read_json, remove_temps, write_json

STAGE = "quantize"


def resolve_source(cfg: Any, run: RunDir) -> Path:
    """`quantize.model`, else the last distilled phase, else prune's latest model."""
    from elastic.parent import check_checkpoint

    if cfg.quantize.get("model"):
        return check_checkpoint(cfg.quantize.model)
    output = ((run.done_record("distill") or {}).get("summary") or {}).get("output")
    if output:
        return check_checkpoint(output)
    latest = run.path("prune", "latest.json")
    if latest.exists():
        return check_checkpoint(read_json(latest)["path"])
    raise QuantizeError(f"nothing to quantize in {run.root}: set quantize.model=<checkpoint> or run stage=distill "
                        "(or stage=prune) first")


def check_unquantized(path: Path) -> None:
    """Refuse a checkpoint that already holds quantized weights: quantize the one it came from."""
    from elastic.export_check import FP8_DTYPES, tensor_headers
    from elastic.fp8 import quantization_config

    q = quantization_config(path)
    if q is not None:
        raise QuantizeError(f"{path} is already quantized (quant_method {q.get('quant_method')!r}, quant_algo "
                            f"{q.get('quant_algo')!r}): quantize the unquantized checkpoint it was made from")
    fp8 = [k for k, (d, _) in tensor_headers(path).items() if d in FP8_DTYPES]
    if fp8:
        raise QuantizeError(f"{path} already holds {len(fp8)} FP8 tensors (e.g. {fp8[0]}): quantize the "
                            "unquantized checkpoint it was made from")


def export_dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise QuantizeError(f"quantize.dtype {name!r} is not supported: the unquantized weights of an FP8 export "
                            f"are {' or '.join(EXPORT_DTYPES)} (the activation dtypes vLLM's FP8 kernels take)")
    return EXPORT_DTYPES[name]


def weights_bytes(path: Path) -> dict[str, int]:
    """Bytes of the weight files as stored, and what the same tensors take in 16 bits."""
    import math

    from elastic.export_check import tensor_headers, weight_files

    stored = sum((path / f).stat().st_size for f in weight_files(path))
    bf16 = sum(2 * math.prod(shape) for _, shape in tensor_headers(path).values())
    return {"stored": stored, "bf16": bf16}


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def run(cfg: Any, run: RunDir) -> dict:
    from elastic import fp8, kernels
    from elastic.export_check import check
    from elastic.inputs import heldout_loss, token_batches
    from elastic.parent import load_model, load_tokenizer, resolve_device

    c = cfg.quantize
    # ---- every check of the input, before a model is loaded or anything written
    dtype = export_dtype(str(c.dtype))
    presets = OmegaConf.to_container(c.presets, resolve=True) if OmegaConf.is_config(c.presets) else dict(c.presets or {})
    extra = OmegaConf.to_container(c.keep_bf16, resolve=True) if OmegaConf.is_config(c.keep_bf16) else list(c.keep_bf16 or [])
    globs = fp8.resolve_globs(presets, c.preset, extra)
    if int(c.calib_sequences) < 1:
        raise QuantizeError(f"quantize.calib_sequences is {c.calib_sequences}: max calibration needs at least one sequence")
    source = resolve_source(cfg, run)
    check_unquantized(source)
    name = c.name or f"{source.name}-fp8"
    if "/" in name or name.startswith("."):
        raise QuantizeError(f"quantize.name {name!r} must be a plain folder name")
    tok = load_tokenizer(source)
    seq_len = int(c.seq_len or cfg.data.seq_len)
    calib = token_batches(cfg, tok, "calib", num_sequences=int(c.calib_sequences), batch_size=int(c.calib_batch_size),
                          seq_len=seq_len)
    if not calib:
        raise QuantizeError(f"no calibration data: the calib split has no sequence of {seq_len} tokens")
    held = token_batches(cfg, tok, "heldout", num_sequences=int(c.eval_sequences), batch_size=int(c.eval_batch_size),
                         seq_len=seq_len) if int(c.eval_sequences) > 0 else []

    # ---- the model, with the weights the export will hold: on CPU fp32 compute (bf16 matmuls are slow
    # there) on weights rounded to the export dtype, on GPU the export dtype itself
    t0 = time.time()
    device = resolve_device(cfg.device)
    model = load_model(source, "float32", device)
    kernels.announce(STAGE, model, device)
    fp8.round_to_export_dtype(model, dtype, torch.float32 if device.type == "cpu" else None)
    to_hub = fp8.hub_namer(model)
    kept, unmatched = fp8.keep_bf16(model, globs, to_hub)
    for g in unmatched:
        print(f"elastic: warning: quantize glob {g!r} matches no module of {source}", file=sys.stderr)
    todo = [n for n in fp8.quantizable(model) if n not in kept]
    if not todo:
        raise QuantizeError(f"the preset {c.preset!r} and quantize.keep_bf16 keep every linear layer of {source} "
                            "in BF16: nothing would be quantized")

    losses: dict[str, float | None] = {"bf16": heldout_loss(model, held) if held else None}
    fp8.quantize(model, fp8.quant_config(kept, kv_cache=bool(c.kv_cache)), calib)
    done = fp8.quantized_modules(model)
    if sorted(done) != sorted(todo):  # modelopt decides by its own patterns: they must agree with ours
        raise QuantizeError(f"modelopt quantized {sorted(set(done) ^ set(todo))} against the plan "
                            f"(keep BF16: {kept}); refusing to export")
    losses["fake_quant"] = heldout_loss(model, held) if held else None
    probe = held[0][:2] if held else calib[0][:2]
    fake_logits = _logits(model, probe)
    print(f"quantize: {len(done)} linear layers FP8, {len(kept)} kept {c.dtype}, calibrated on "
          f"{sum(len(b) for b in calib)} x {seq_len} tokens [{time.time() - t0:.1f}s]")

    out = run.path(STAGE, name)
    # a rerun after a crash redoes the whole quantization (the export replaces any earlier one whole): only
    # the temporaries a killed run left (the folder, the report, a sidecar or the marker half-written) need removing
    remove_temps(out.parent, (name, run.done_path(STAGE).name))
    report: dict[str, Any] = {
        "source": str(source), "export": str(out), "preset": c.preset, "globs": globs, "unmatched_globs": unmatched,
        "dtype": str(c.dtype), "kv_cache": bool(c.kv_cache), "device": str(device),
        "calibration": {"sequences": sum(len(b) for b in calib), "seq_len": seq_len},
        "quantized": [to_hub(n) for n in done], "kept_bf16": [to_hub(n) for n in kept],
    }
    with run.artifact_dir(f"{STAGE}/{name}", stage=STAGE, config=c, inputs={"model": str(source)},
                          overwrite=True) as (tmp, extra):
        report["repairs"] = fp8.export(model, tmp, dtype, to_hub)
        del model  # converted in place by the export: it cannot run any more
        tok.save_pretrained(tmp)
        problems = check(tmp)
        if problems:
            raise QuantizeError(f"the export is not loadable as it is: {'; '.join(problems)}")
        deq = fp8.load_dequantized(tmp, "float32", device)
        losses["dequantized_export"] = heldout_loss(deq, held) if held else None
        report["dequantized_vs_fake_quant_max_logit_diff"] = (_logits(deq, probe) - fake_logits).abs().max().item()
        del deq
        report["heldout_loss"] = losses | {"sequences": sum(len(b) for b in held)}
        src = weights_bytes(source)
        report["bytes"] = {"source": src["stored"], "source_bf16": src["bf16"], "export": weights_bytes(tmp)["stored"]}
        report["seconds"] = round(time.time() - t0, 1)
        extra.update(heldout_loss=report["heldout_loss"], bytes=report["bytes"])
        write_json(run.beside(out, "report.json"), report)  # ours: beside the folder, not inside
    if held:
        print(f"quantize: held-out loss BF16 {losses['bf16']:.4f}, fake quant {losses['fake_quant']:.4f}, "
              f"dequantized export {losses['dequantized_export']:.4f}")
    print(f"quantize: {out} ({report['bytes']['export'] / 2**20:.1f} MiB vs {report['bytes']['source_bf16'] / 2**20:.1f} "
          f"MiB in BF16); check it any time with `python -m elastic.export_check {out}`")
    return {"name": name, "path": str(out), "report": str(run.beside(out, "report.json")), "quantized": len(done),
            "kept_bf16": len(kept), "heldout_loss": report["heldout_loss"], "bytes": report["bytes"]}
