"""Benchmark: FP8 quantization (modelopt) of the toy model: held-out loss and size on disk (issue 11).

    python scripts/bench_quantize.py                          # the toy parent (built and cached on first use)
    python scripts/bench_quantize.py --model runs/toy/distill/phase2 --out benchmarks/quantize_toy.json

For each preset (default, nvidia_nano, conservative) without and with the FP8 KV cache, runs the real
`quantize` stage on `--model` in a scratch run directory and collects its report: held-out loss of
the BF16 model (weights rounded to bf16, fp32 compute on CPU), of modelopt's fake-quant model, and
of the exported folder read back with `elastic.fp8.load_dequantized` (FP8 weights x scales, inputs
rounded to FP8 with the calibrated scales); bytes of the weight files. Writes JSON, prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from hydra import compose, initialize_config_dir  # noqa: E402

from elastic.parent import resolve_parent_path  # noqa: E402
from elastic.run import CONF_DIR, pipeline  # noqa: E402
from elastic.rundir import read_json  # noqa: E402

CONFIGS = [(p, kv) for p in ("default", "nvidia_nano", "conservative") for kv in (False, True)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to quantize (default: the toy parent)")
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences")
    ap.add_argument("--heldout", type=int, default=64, help="held-out sequences")
    ap.add_argument("--out", default="benchmarks/quantize_toy.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the toy recipe, e.g. data.seq_len=256")
    args = ap.parse_args(argv)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=list(args.overrides))
    model = args.model or str(resolve_parent_path(base))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, (preset, kv) in enumerate(CONFIGS):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[
                    "stage=quantize", f"run_dir={scratch}/{i}", f"quantize.model={model}", f"quantize.preset={preset}",
                    f"quantize.kv_cache={str(kv).lower()}", f"quantize.calib_sequences={args.calib}",
                    f"quantize.eval_sequences={args.heldout}", *args.overrides])
            summary = pipeline(cfg)["quantize"]
            report = read_json(summary["report"])
            rows.append({"preset": preset, "kv_cache": kv, "fp8_linears": len(report["quantized"]),
                         "bf16_linears": len(report["kept_bf16"]), **report["heldout_loss"], "bytes": report["bytes"],
                         "max_logit_diff_export_vs_fake_quant": report["dequantized_vs_fake_quant_max_logit_diff"],
                         "calibration": report["calibration"], "seconds": report["seconds"]})
    result = {"model": model, "nemotron_3_nano_4b_bytes": shape_bytes(base), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU" ,
              "date": dt.date.today().isoformat(), "command": " ".join(["python", "scripts/bench_quantize.py", *(argv or sys.argv[1:])]),
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    return result


def shape_bytes(cfg) -> dict:
    """Weight bytes of the Nemotron 3 Nano 4B shape (tests/data config, built on the meta device) per
    preset: computed from the parameter counts (1 byte in FP8, 2 in BF16), not measured."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from elastic import fp8

    config = AutoConfig.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                     "nemotron-3-nano-4b.config.json"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    out = {"bf16": 2 * total}
    for preset, globs in OmegaConf.to_container(cfg.quantize.presets).items():
        kept, _ = fp8.keep_bf16(model, globs)
        in_fp8 = sum(m.weight.numel() for n, m in model.named_modules() if n in set(fp8.quantizable(model)) - set(kept))
        out[preset] = 2 * total - in_fp8
    return out


def markdown(result: dict) -> str:
    r0 = result["rows"][0]
    lines = [
        f"model: {result['model']}; {r0['calibration']['sequences']} x {r0['calibration']['seq_len']} calibration tokens, "
        f"{r0['sequences']} held-out sequences; BF16 weights: {r0['bytes']['source_bf16']:,} bytes",
        "",
        "| preset | KV cache | FP8 / BF16 linears | BF16 loss | fake-quant loss | dequantized export loss | FP8 - BF16 | weights on disk | vs BF16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['preset']} | {'FP8' if r['kv_cache'] else 'BF16'} | {r['fp8_linears']} / {r['bf16_linears']} | "
            f"{r['bf16']:.4f} | {r['fake_quant']:.4f} | {r['dequantized_export']:.4f} | "
            f"{r['dequantized_export'] - r['bf16']:+.4f} | {r['bytes']['export']:,} | "
            f"{r['bytes']['export'] / r['bytes']['source_bf16']:.0%} |")
    b = result["nemotron_3_nano_4b_bytes"]
    lines += ["", "Nemotron 3 Nano 4B shape (computed from its config, not measured): BF16 "
              f"{b['bf16'] / 1e9:.2f} GB; " + ", ".join(f"{k} {v / 1e9:.2f} GB ({v / b['bf16']:.0%})"
                                                       for k, v in b.items() if k != "bf16")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
