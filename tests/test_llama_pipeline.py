"""Every stage on a Llama parent, from the same entry point as NemotronH (`parent.path=<llama dir>`):
nothing in the stages knows the family. A tiny Llama (GQA, tied embeddings) with the toy tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from elastic.arch import sizes_from_config
from elastic.run import pipeline
from elastic.rundir import RunDir

from test_pipeline import make_cfg
from test_quantize import TINY_RUN, model_folders

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.smoke]

LOADER_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "hf_quant_config.json"}


@pytest.fixture(scope="module")
def llama_parent(toy_parent, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(toy_parent)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("llama-parent")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_run(llama_parent, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("llama-run")
    results = {}
    common = ["budget=all", "search.budgets=[0.6,0.8]", "prune.granularity.hidden=8", "search.granularity.hidden=8",
              "search.granularity.ffn=16", *TINY_RUN]
    for stage in ("importance", "search", "prune", "distill", "quantize"):
        results |= pipeline(make_cfg(llama_parent, run_dir, f"stage={stage}", *common))
    return run_dir, results


def test_every_stage_runs_on_a_llama_and_exports_plain_checkpoints(llama_run, llama_parent):
    run_dir, results = llama_run
    run = RunDir(run_dir)
    parent = sizes_from_config(AutoModelForCausalLM.from_pretrained(llama_parent))
    assert parent.MODEL_TYPE == "llama"
    doc = json.loads(run.path("search/archs.json").read_text())
    for b, rec in doc["budgets"].items():
        # the router's cost and the exported checkpoint count the same parameters
        child = AutoModelForCausalLM.from_pretrained(run.path("prune", f"budget-{b}"))
        assert sum(p.numel() for p in child.parameters()) == rec["params"] == sizes_from_config(child).num_params()
        assert child.config.num_attention_heads % child.config.num_key_value_heads == 0  # GQA stays valid
        assert child.config.tie_word_embeddings and child.lm_head.weight is child.model.embed_tokens.weight
        assert rec["params"] < parent.num_params()
    distilled = AutoModelForCausalLM.from_pretrained(results["distill"]["output"])
    ids = torch.tensor([[5, 6, 7]])
    assert distilled.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
    for folder in model_folders(run_dir):
        assert {p.name for p in folder.iterdir()} <= LOADER_FILES, folder


def test_evaluate_reports_the_llama_family(llama_run, llama_parent):
    run_dir, _ = llama_run
    out = pipeline(make_cfg(llama_parent, run_dir, "stage=evaluate", "evaluate.heldout_sequences=8",
                            "evaluate.batch_size=8", "evaluate.task_limit=8", "evaluate.passkey.lengths=[48]",
                            "evaluate.passkey.depths=[0.5]", "evaluate.passkey.trials=2", "evaluate.cost.lengths=[32]",
                            "evaluate.cost.decode_tokens=2", "evaluate.cost.curve_points=2", "tracking.backends=[]"))
    report = RunDir(run_dir).path("evaluate/report/report.md").read_text()
    assert out["evaluate"]["failed"] == [] and out["evaluate"]["models"] >= 5, out  # parent, 2 budgets, distilled, FP8
    assert "budget-0.6" in report and "budget-0.8" in report
