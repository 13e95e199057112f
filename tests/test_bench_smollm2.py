"""The SmolLM2 benchmark's pieces on a tiny random Llama (GQA, tied embeddings): the Torch-Pruning baseline
writes a plain HF folder that reloads with the pruned model's logits, held-out perplexity, the method registry.
Needs the [bench] extra (torch-pruning): `bash scripts/install.sh --bench`; skipped (and reported as skipped)
without it."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

tp = pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with 6 query / 3 KV heads and tied embeddings, with a tokenizer, as a plain HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from elastic.toy import train_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    text = d / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 50)
    tok = train_tokenizer(str(text), 300, d / "model")
    text.unlink()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=3, head_dim=16, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    return d / "model"


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_torch_pruning_folder_reloads_smaller_with_loader_files_only(tiny_llama, tmp_path, importance):
    import bench_smollm2
    from smollm2_torch_pruning import nonembed_params

    parent = _load(tiny_llama)
    parent_n = nonembed_params(parent)
    calib = torch.randint(4, parent.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    method = bench_smollm2.METHODS[f"torch_pruning_{importance}"].fn
    # save_plain inside reloads the folder and asserts its logits equal the pruned module's
    out = method(tiny_llama, round(0.6 * parent_n), calib, 0, out=tmp_path / "pruned", work=tmp_path / "work")
    bench_smollm2._loader_files_only(out)
    cfg = json.loads((out / "config.json").read_text())
    model = _load(out)
    n = nonembed_params(model)
    assert 0 < n < parent_n
    assert cfg["hidden_size"] < 96 and cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0  # GQA still valid
    assert cfg["tie_word_embeddings"] and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.shape == (parent.config.vocab_size, cfg["hidden_size"])
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(model(ids).logits).all()


def test_config_from_weights_refuses_layers_of_different_widths(tiny_llama):
    from smollm2_torch_pruning import config_from_weights

    model = _load(tiny_llama)
    state = dict(model.state_dict())
    state["model.layers.1.mlp.gate_proj.weight"] = state["model.layers.1.mlp.gate_proj.weight"][:100]
    with pytest.raises(ValueError, match="different shapes"):
        config_from_weights(state, model.config)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size(tiny_llama):
    from smollm2_text import perplexity

    model = _load(tiny_llama)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # tied: the LM head gives all-zero logits, a uniform distribution
    rows = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, rows, batch_size=2) == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_unknown_method_is_one_error_line(capsys):
    import bench_smollm2

    assert bench_smollm2.main(["--methods", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elastic: error: unknown methods")


@pytest.fixture
def splits(tmp_path):
    """Train / held-out JSONL in the benchmark's form, from the toy's disjoint plays (no gensim needed)."""
    from elastic import toy

    d = tmp_path / "data"
    d.mkdir()
    for name, split in (("train", "train"), ("heldout", "heldout")):
        rows = [{"title": Path(f).stem, "text": Path(f).read_text(errors="ignore")[:20000]} for f in toy.toy_files(split)[:3]]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.mark.slow
def test_quick_benchmark_writes_table_plot_and_json(tiny_llama, splits, tmp_path):
    """The one command end to end (--quick) on the tiny parent, every method through the real stages
    (importance, prune, search, distill) and Torch-Pruning: every row scored before and after the same
    distillation, the router's row after its own training, the report beside its plot."""
    import bench_smollm2

    md = tmp_path / "bench.md"
    methods = "ours_grid,ours_router,random,torch_pruning_magnitude"
    assert bench_smollm2.main(["--quick", "--parent", str(tiny_llama), "--methods", methods, "--budgets", "0.6",
                               "--work", str(tmp_path / "work"), "--data", str(splits), "--out", str(md)]) == 0
    result = json.loads(md.with_suffix(".json").read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["unpruned", "ours_grid", "ours_router", "random", "random", "random",
                                           "torch_pruning_magnitude"]
    parent = rows[0]
    for r in rows[1:]:
        assert r["nonembed"] < parent["nonembed"], r
        assert math.isfinite(r["ppl_distilled"]) and r["ppl_distilled"] > 1, r
        assert r["method"] == "ours_router" or math.isfinite(r["ppl"]), r
        folder = Path(r["folder"])
        assert {p.name for p in folder.iterdir()} <= {"config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert abs(rows[1]["nonembed"] / (0.6 * parent["nonembed"]) - 1) <= 0.05  # the grid counts non-embedding params
    assert md.with_suffix(".png").stat().st_size > 0 and "Torch-Pruning, magnitude" in md.read_text()
    # every row carries its training tokens: a distillation's, and the router's whole search (both budgets' share)
    distilled = [r for r in rows[1:] if r["method"] != "ours_router"]
    assert {r["tokens"] for r in distilled} == {bench_smollm2.distill_tokens(bench_smollm2.QUICK)}
    router = next(r for r in rows if r["method"] == "ours_router")
    assert router["tokens"] == bench_smollm2.distill_tokens(bench_smollm2.QUICK)  # one budget: the same tokens

    # the same command again picks up where it stopped: finished rows are kept, nothing is pruned or trained again
    stamp = {r["folder"]: Path(r["folder"], "model.safetensors").stat().st_mtime_ns for r in rows[1:]}
    assert bench_smollm2.main(["--quick", "--parent", str(tiny_llama), "--methods", methods, "--budgets", "0.6",
                               "--work", str(tmp_path / "work"), "--data", str(splits), "--out", str(md)]) == 0
    again = json.loads(md.with_suffix(".json").read_text())["rows"]
    assert [(r["method"], r["seed"], r["ppl_distilled"]) for r in again] == [(r["method"], r["seed"], r["ppl_distilled"]) for r in rows]
    assert {f: Path(f, "model.safetensors").stat().st_mtime_ns for f in stamp} == stamp


def test_torch_pruning_at_ratio_zero_keeps_the_parent_logits(tiny_llama):
    """Tracing with RoPE hidden (the upstream-hang workaround) must not change the model: ratio 0 is the identity."""
    from smollm2_torch_pruning import prune_in_memory

    parent = _load(tiny_llama)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        before = parent(ids).logits.clone()
    pruned = prune_in_memory(parent, 0.0, "magnitude")  # traces with autograd on
    with torch.no_grad():
        after = pruned(ids).logits
    torch.testing.assert_close(after, before)


def test_report_merges_rows_of_a_second_run_with_the_same_budgets(tmp_path):
    """Methods run as a second process beside the first (e.g. the router's rows) join the first run's file:
    rows are added once, commands kept; a file of other token budgets is refused."""
    import bench_smollm2

    def doc(rows, command, budgets=bench_smollm2.MEDIUM):
        return {"parent": "p", "parent_nonembed": 1000, "budgets": budgets.__dict__, "data": {}, "seconds": 60.0,
                "settings": {"budgets": budgets.__dict__, "seed": 0}, "command": command, "commands": [command],
                "machine": "m", "date": "d", "rows": rows}

    def row(method, budget, seed, ppl):
        return {"method": method, "label": method, "budget": budget, "seed": seed, "nonembed": int(1000 * budget),
                "params": 2000, "ppl": ppl, "ppl_distilled": ppl / 2, "tokens": 10, "prune_s": 0, "eval_s": 0,
                "shape": {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                          "num_hidden_layers": 2}, "folder": "", "variant": ""}

    md = tmp_path / "full.md"
    parent = row("unpruned", 1.0, 0, 10.0)
    md.with_suffix(".json").write_text(json.dumps(doc([parent, row("ours_grid", 0.6, 0, 40.0)], "A")))
    other = tmp_path / "router.json"
    other.write_text(json.dumps(doc([parent, row("ours_router", 0.6, 0, 30.0), row("ours_router", 0.6, 1, 32.0)], "B")))
    assert bench_smollm2.main(["--report-only", "--out", str(md), "--merge", str(other)]) == 0
    merged = json.loads(md.with_suffix(".json").read_text())
    assert [(r["method"], r["seed"]) for r in merged["rows"]] == [("unpruned", 0), ("ours_grid", 0), ("ours_router", 0),
                                                                   ("ours_router", 1)]
    assert merged["commands"] == ["A", "B"]
    text = md.read_text()
    assert "`A`" in text and "`B`" in text and "| ours_router | 60% | 2 | 15.50 |" in text  # the seeds' mean
    other.write_text(json.dumps(doc([parent], "C", budgets=bench_smollm2.REDUCED)))
    assert bench_smollm2.main(["--report-only", "--out", str(md), "--merge", str(other)]) == 2
