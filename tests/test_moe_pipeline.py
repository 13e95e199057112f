"""Every stage on a tiny MoE NemotronH (layer type "moe": routed experts as 3-D tensors, a shared expert, a
sigmoid router), from the same entry point as the dense toy; exports load with plain `from_pretrained`."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic import fp8
from elastic.arch import sizes_from_config
from elastic.export_check import check, tensor_headers
from elastic.run import CONF_DIR, pipeline
from elastic.rundir import RunDir

from test_pipeline import make_cfg
from test_quantize import TINY_RUN

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


# ------------------------------------------------------------------------------------------------ every stage


# Widths in steps of 8: transformers' grouped_mm expert kernel (its default on CPU with torch >= 2.11 as on GPU)
# needs 16-byte aligned rows, so an expert width such as 27 fails in training with "strides should be multiple of 16
# bytes". Mamba head_dim 64 as in the real parent: llama.cpp's converter needs heads x head_dim a multiple of 64.
MOE_RUN = ["budget=all", "search.budgets=[0.6,0.8]", "prune.granularity.hidden=8", "search.granularity.hidden=8",
           "search.granularity.moe_ffn=8", "search.granularity.shared_ffn=8", "prune.granularity.moe_ffn=8",
           "prune.granularity.shared_ffn=8", *TINY_RUN]
STAGE_RUN = {
    "export": ["export.format=gguf", "export.quant=[q8_0]", "export.heldout_sequences=4", "export.seq_len=64",
               "export.max_new_tokens=8"],
    "evaluate": ["evaluate.heldout_sequences=8", "evaluate.batch_size=8", "evaluate.task_limit=8", "evaluate.passkey.lengths=[48]",
                 "evaluate.passkey.depths=[0.5]", "evaluate.passkey.trials=2", "evaluate.cost.lengths=[32]",
                 "evaluate.cost.decode_tokens=2", "evaluate.cost.curve_points=2"],
}
STAGES = ("importance", "search", "prune", "distill", "quantize", "export", "evaluate")


@pytest.fixture(scope="module")
def moe_parent(toy_parent, tmp_path_factory):
    """A tiny MoE parent with the real one's layer kinds (Mamba, MoE, attention; no dense MLP: llama.cpp's
    nemotron_h_moe has none) and the toy tokenizer."""
    return save_tiny_moe(tmp_path_factory.mktemp("moe-parent"), toy_parent, pattern="ME*EME", mamba_num_heads=4,
                         mamba_head_dim=64)


@pytest.fixture(scope="module")
def moe_run(moe_parent, tmp_path_factory):
    from test_gguf import llama_cpp

    llama_cpp()
    run_dir = tmp_path_factory.mktemp("moe-run")
    results = {}
    for stage in STAGES:
        results |= pipeline(make_cfg(moe_parent, run_dir, f"stage={stage}", *MOE_RUN, *STAGE_RUN.get(stage, [])))
    return run_dir, results


@pytest.mark.smoke
def test_every_stage_runs_on_a_moe_and_exports_plain_checkpoints(moe_run, moe_parent):
    run_dir, results = moe_run
    run = RunDir(run_dir)
    assert list(results) == list(STAGES)
    parent = sizes_from_config(AutoModelForCausalLM.from_pretrained(moe_parent))
    assert parent.is_moe and parent.n_routed_experts == MOE["n_routed_experts"]
    children = [run.path("prune", f"budget-{b}") for b in ("0.6", "0.8")] + [Path(results["distill"]["output"])]
    ids = torch.tensor([[5, 6, 7]])
    for folder in children:
        child = AutoModelForCausalLM.from_pretrained(folder).eval()
        sizes = sizes_from_config(child)
        # the exported config is the kept weights': router rows, correction bias and stacked experts agree
        for layer in child.model.layers:
            if layer.block_type == "moe":
                m = layer.mixer
                assert m.gate.weight.shape[0] == m.gate.e_score_correction_bias.numel() == m.experts.up_proj.shape[0] \
                    == sizes.n_routed_experts >= sizes.num_experts_per_tok
                assert m.experts.up_proj.shape[1] == sizes.moe_intermediate_size
        stored = sum(p.numel() for p in child.parameters()) + sum(
            b.numel() for n, b in child.named_buffers() if n.endswith("e_score_correction_bias"))
        assert stored == sizes.num_params() < parent.num_params()
        assert sizes.active_params() < sizes.num_params()
        assert child.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
        assert check(folder) == []
    budgets = json.loads(run.path("search/archs.json").read_text())["budgets"]
    assert any(r["choices"]["experts"] < parent.n_routed_experts or r["choices"]["moe_ffn"] < parent.moe_intermediate_size
               for r in budgets.values()), budgets  # the MoE axes are searched, not only the dense ones


@pytest.mark.smoke
def test_moe_fp8_export_of_the_run(moe_run):
    run_dir, results = moe_run
    q = results["quantize"]
    report = json.loads(RunDir(run_dir).beside(Path(q["path"]), "report.json").read_text())
    assert "backbone.layers.1.mixer.experts" in report["quantized"]
    assert not [n for n in report["quantized"] + report["kept_bf16"] if n.endswith(".gate")]  # no linear: never FP8
    loss = report["heldout_loss"]
    assert abs(loss["dequantized_export"] - loss["fake_quant"]) < 2e-3 and loss["fake_quant"] - loss["bf16"] < 0.02
    assert check(q["path"]) == []
    deq = fp8.load_dequantized(q["path"])
    assert deq.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.smoke
def test_moe_gguf_export_of_the_run_runs_in_llama_cpp(moe_run):
    run_dir, results = moe_run
    out = run_dir / "export"
    meta = json.loads((out / "distill-phase2-q8_0.gguf.meta.json").read_text())
    assert meta["architecture"] == "nemotron_h_moe" and meta["inputs"]["checkpoint"] == results["distill"]["output"]
    report = json.loads((out / "distill-phase2.check.json").read_text())
    hf, q8 = report["models"]["hf"], report["models"]["q8_0"]
    assert abs(q8["ppl"] - hf["ppl"]) / hf["ppl"] < 0.01
    # an untrained model's next-token logits are nearly flat: greedy paths may part only at near-ties
    assert all(g is None or abs(g) < 0.05 for g in q8["hf_logit_gap_at_divergence"]), q8
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.smoke
def test_moe_evaluate_reports_active_params(moe_run):
    run_dir, results = moe_run
    run = RunDir(run_dir)
    assert results["evaluate"]["failed"] == [] and results["evaluate"]["models"] == 6  # parent, 2 budgets, 2 phases, FP8
    doc = json.loads(run.path("evaluate/results.json").read_text())
    for m in doc["models"]:
        sizes = sizes_from_config(json.loads((Path(m["path"]) / "config.json").read_text()))
        assert m["cost"]["active_params"] == sizes.active_params() < m["cost"]["params"] == sizes.num_params(), m["name"]
    table = run.path("evaluate/report/report.md").read_text()
    assert "| model | params | active params |" in table


def test_active_params_column_only_where_a_model_has_experts():
    """A dense run's model table keeps its columns; a run with a MoE model adds active params after params."""
    from elastic.evaluation.report import model_table

    def entry(name, params, active):
        return {"name": name, "status": "ok", "cost": {"params": params, "active_params": active, "non_embedding_params": 1,
                                                        "weight_bytes": 2, "kv_bytes_per_token": 3, "mamba_state_bytes": 4}}

    dense_cols, dense_rows = model_table({"models": [entry("parent", 2_000_000, 2_000_000)]})
    assert "active params" not in dense_cols and len(dense_rows[0]) == len(dense_cols)
    cols, rows = model_table({"models": [entry("parent", 2_000_000, 1_000_000), entry("child", 900_000, 900_000)]})
    assert cols[:3] == ["model", "params", "active params"] and cols[3:] == dense_cols[2:]
    assert [r[2] for r in rows] == ["1.00M", "900.00K"] and all(len(r) == len(cols) for r in rows)
