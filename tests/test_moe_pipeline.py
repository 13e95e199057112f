"""Every stage on a tiny MoE NemotronH (layer type "moe": routed experts as 3-D tensors, a shared expert, a
sigmoid router), from the same entry point as the dense toy; exports load with plain `from_pretrained`."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic import fp8
from elastic.export_check import check, tensor_headers
from elastic.run import CONF_DIR, pipeline

from tiny import MOE, save_tiny_moe, tiny_moe_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_moe_runs_trains_generates_and_round_trips(tmp_path):
    model = tiny_moe_model()
    moe = [l.mixer for l in model.model.layers if l.block_type == "moe"]
    assert len(moe) == 3 and {l.block_type for l in model.model.layers} == {"linear_attention", "moe", "full_attention", "mlp"}
    assert moe[0].experts.up_proj.shape == (MOE["n_routed_experts"], MOE["moe_intermediate_size"], 64)
    ids = tokens(batch=4, length=32)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    # top-2 of 8 over 128 tokens: every expert of every MoE layer gets tokens, hence a gradient
    for m in moe:
        assert (m.experts.up_proj.grad.flatten(1).abs().sum(1) > 0).all()
        assert m.gate.weight.grad.abs().sum() > 0 and m.shared_experts.up_proj.weight.grad.abs().sum() > 0
    assert model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model.eval()(ids).logits)


def moe_presets():
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "quantize" / "default.yaml").presets)


def test_presets_on_moe_are_modelopts_hybrid_moe_layouts():
    """On a MoE NemotronH our `nvidia_nano` / `conservative` presets quantize exactly what modelopt's
    MAMBA_MOE_FP8_AGGRESSIVE_CFG / _CONSERVATIVE_CFG do: routed experts (one unit per layer) and the shared
    expert FP8 in both; never the router; attention BF16; Mamba in/out projections FP8 only in `nvidia_nano`."""
    mtq = fp8._modelopt()
    presets = moe_presets()
    calib = [tokens(batch=2, length=16)]
    experts = {f"model.layers.{i}.mixer.experts" for i in (1, 3, 6)}
    shared = {f"model.layers.{i}.mixer.shared_experts.{p}" for i in (1, 3, 6) for p in ("up_proj", "down_proj")}
    for preset, theirs in (("nvidia_nano", mtq.MAMBA_MOE_FP8_AGGRESSIVE_CFG), ("conservative", mtq.MAMBA_MOE_FP8_CONSERVATIVE_CFG)):
        ours_model, their_model = tiny_moe_model(), tiny_moe_model()
        kept, unmatched = fp8.keep_bf16(ours_model, presets[preset])
        assert unmatched == []
        assert experts <= set(fp8.quantizable(ours_model))
        fp8.quantize(ours_model, fp8.quant_config(kept), calib)
        fp8.quantize(their_model, theirs, calib)
        ours = fp8.quantized_modules(ours_model)
        assert ours == fp8.quantized_modules(their_model), preset
        assert experts | shared <= set(ours) and not [n for n in ours if n.endswith((".gate", "q_proj", "o_proj"))]
        assert ("model.layers.0.mixer.in_proj" in ours) == (preset == "nvidia_nano")
    # a glob keeps a layer's routed experts BF16 as one unit, like any module
    model = tiny_moe_model()
    kept, _ = fp8.keep_bf16(model, ["backbone.layers.3.mixer.experts"])
    fp8.quantize(model, fp8.quant_config(kept), calib)
    assert kept == ["model.layers.3.mixer.experts"] and "model.layers.3.mixer.experts" not in fp8.quantized_modules(model)
    assert "model.layers.1.mixer.experts" in fp8.quantized_modules(model)


def test_moe_fp8_export_is_per_expert_and_reads_back_as_the_fake_quant_model(tmp_path):
    model = tiny_moe_model()
    calib, held = [tokens(batch=4, length=32, seed=2)], tokens(batch=4, length=32, seed=3)
    fp8.round_to_export_dtype(model, torch.bfloat16, torch.float32)
    with torch.no_grad():
        bf16 = model(held, use_cache=False).logits
    to_hub = fp8.hub_namer(model)
    kept, _ = fp8.keep_bf16(model, moe_presets()["nvidia_nano"], to_hub)
    fp8.quantize(model, fp8.quant_config(kept), calib)
    with torch.no_grad():
        fake = model(held, use_cache=False).logits
    fp8.export(model, tmp_path, torch.bfloat16, to_hub)
    assert check(tmp_path) == []
    heads = tensor_headers(tmp_path)
    e = "backbone.layers.1.mixer.experts"
    for i in range(MOE["n_routed_experts"]):  # the hub's per-expert layout, each expert with its own weight scale
        for proj in ("up_proj", "down_proj"):
            assert heads[f"{e}.{i}.{proj}.weight"][0] == "F8_E4M3" and f"{e}.{i}.{proj}.weight_scale" in heads
    assert not [k for k in heads if k.startswith(f"{e}.up_proj") or k.startswith(f"{e}.down_proj")]
    assert heads["backbone.layers.1.mixer.shared_experts.up_proj.weight"][0] == "F8_E4M3"
    # the router stays in the fp32 transformers computes it in, and is excluded from FP8 for vLLM
    assert heads["backbone.layers.1.mixer.gate.weight"][0] == "F32"
    assert heads["backbone.layers.1.mixer.gate.e_score_correction_bias"][0] == "F32"
    assert heads["backbone.layers.2.mixer.q_proj.weight"][0] == "BF16"
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert "backbone.layers.1.mixer.gate" in ignore and not [x for x in ignore if "experts" in x]

    deq = fp8.load_dequantized(tmp_path)
    with torch.no_grad():
        dq = deq(held, use_cache=False).logits
        weight_only = fp8.load_dequantized(tmp_path, activations=False)(held, use_cache=False).logits
    # FP8 rounding is discontinuous: compare against how far FP8 moved the logits from BF16
    moved = (bf16 - fake).abs().mean()
    assert (dq - fake).abs().mean() < 0.15 * moved
    # the experts' inputs are rounded too: without that, the dequantized model is further from the fake quant
    deq.model.layers[1].mixer.experts._forward_pre_hooks.clear()
    with torch.no_grad():
        assert (deq(held, use_cache=False).logits - fake).abs().mean() > (dq - fake).abs().mean()
    assert (weight_only - dq).abs().max() > 0
    assert deq.generate(held[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


# ------------------------------------------------------------------------------------------------ GGUF


def gguf_cfg(run_dir, *overrides):
    from test_gguf import make_cfg as export_cfg

    return export_cfg(run_dir, "export.quant=[q8_0]", "export.heldout_sequences=4", "export.max_new_tokens=8", *overrides)


def test_moe_with_dense_mlp_layers_is_refused_for_gguf_in_one_line(toy_parent, tmp_path):
    """llama.cpp's nemotron_h_moe has no dense MLP layers: its converter would write one with feed-forward
    length 0 and llama.cpp would then look for Mamba tensors there; refused before anything is converted."""
    from elastic.gguf import GGUFError
    from test_gguf import llama_cpp

    llama_cpp()
    ckpt = save_tiny_moe(tmp_path / "moe", toy_parent, pattern="ME*E-ME")
    with pytest.raises(GGUFError, match=r"no dense MLP layers \('-'\) beside MoE layers \('E'\).*\(ME\*E-ME\)"):
        pipeline(gguf_cfg(tmp_path / "run", f"export.model={ckpt}"))
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "config.yaml"]
