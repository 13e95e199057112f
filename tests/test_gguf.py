"""GGUF export: hub-style NemotronH configs, the pre-tokenizer mapping, and the stage run in llama.cpp.

The llama.cpp tests need the gguf extra (`bash scripts/install.sh --gguf`, which the README's test
command and CI run); without it they skip with that reason instead of passing. llama.cpp's native code
runs only in child processes (`elastic.gguf.in_child`), never in the pytest worker: a crash in it fails
one test instead of killing the worker.
"""

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from elastic import toy
from elastic.gguf import GGUFError, NativeCrash, _llama_tokenize, hub_style_config, in_child, llama_cpp_dir, pretokenizer_type
from elastic.run import CONF_DIR, pipeline
from tiny import tiny_model, tokens

NEEDS_LLAMA = "llama-cpp-python is not installed: `bash scripts/install.sh --gguf` installs the gguf extra (CI does)"


def llama_cpp():
    """Skip unless llama-cpp-python is installed (found, not imported: its native library stays out of this process)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(NEEDS_LLAMA)


# ------------------------------------------------------------------------------------------------ hub-style config


def test_hub_style_config_is_the_same_model(tmp_path):
    model = tiny_model("M-*M-")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "num_experts_per_tok" in written  # what transformers 5.x writes for a dense NemotronH

    hub = hub_style_config(written)
    assert hub["hybrid_override_pattern"] == "M-*M-" and hub["num_hidden_layers"] == 5
    assert "layers_block_type" not in hub
    moe = [k for k in hub if "expert" in k or k.startswith(("moe_", "mtp_", "n_routed", "n_shared"))]
    assert not moe, moe
    assert hub["n_groups"] == written["n_groups"]  # the Mamba groups are not MoE's n_group

    (tmp_path / "config.json").write_text(json.dumps(hub))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layers_block_type == model.config.layers_block_type
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_hub_style_config_keeps_moe_keys_of_a_moe_model_and_refuses_unknown_kinds():
    moe = {"model_type": "nemotron_h", "layers_block_type": ["linear_attention", "moe"], "num_experts_per_tok": 2}
    assert hub_style_config(moe) == {"model_type": "nemotron_h", "hybrid_override_pattern": "ME", "num_hidden_layers": 2,
                                     "num_experts_per_tok": 2}
    with pytest.raises(GGUFError, match="sliding_attention"):
        hub_style_config({"model_type": "nemotron_h", "layers_block_type": ["linear_attention", "sliding_attention"]})
    other = {"model_type": "llama", "num_experts_per_tok": 2}
    assert hub_style_config(other) == other


# ------------------------------------------------------------------------------------------------ pre-tokenizer


def test_toy_tokenizer_maps_to_gpt2_and_other_splits_are_refused(toy_parent):
    from tokenizers import normalizers, pre_tokenizers

    tok = AutoTokenizer.from_pretrained(toy_parent)
    assert pretokenizer_type(tok) == "gpt-2"
    refused = {
        "prefix space": pre_tokenizers.ByteLevel(add_prefix_space=True),
        "whitespace": pre_tokenizers.Whitespace(),
        "no regex": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    }
    for what, pre in refused.items():
        tok.backend_tokenizer.pre_tokenizer = pre
        with pytest.raises(GGUFError, match="not GPT-2's byte-level split"):
            pretokenizer_type(tok)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert pretokenizer_type(tok) == "gpt-2"
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(GGUFError, match="normalizes"):
        pretokenizer_type(tok)


# ------------------------------------------------------------------------------------------------ the stage in llama.cpp


def make_cfg(run_dir, *overrides):
    held = toy.toy_files("heldout")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            f"run_dir={run_dir}", "parent.path=/unused", f"data.heldout_files=[{','.join(held)}]",
            "stage=export", "export.format=gguf", "export.heldout_sequences=4", "export.seq_len=64",
            "export.max_new_tokens=16", *overrides,
        ])


def test_export_format_null_writes_nothing(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "export.format=null")
    assert pipeline(cfg)["export"] == {"format": None}
    assert "nothing exported" in capsys.readouterr().out
    assert not list((tmp_path / "export").glob("*.gguf"))


@pytest.fixture(scope="module")
def exported(toy_parent, tmp_path_factory):
    llama_cpp()
    run_dir = tmp_path_factory.mktemp("run")
    summary = pipeline(make_cfg(run_dir, f"export.model={toy_parent}", "export.name=toy", "export.quant=[q8_0,q4_k_m]"))["export"]
    return run_dir, summary


def test_export_writes_ggufs_that_llama_cpp_runs_like_transformers(exported, toy_parent):
    run_dir, summary = exported
    out = run_dir / "export"
    ggufs = {p.name for p in out.glob("*.gguf")}
    assert ggufs == {"toy-q8_0.gguf", "toy-q4_k_m.gguf"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files or folders left

    sizes = {}
    for quant, type_name in (("q8_0", "Q8_0"), ("q4_k_m", "Q4_K")):
        path = out / f"toy-{quant}.gguf"
        meta = json.loads((out / f"toy-{quant}.gguf.meta.json").read_text())
        assert meta["quant"] == quant and meta["size_bytes"] == path.stat().st_size
        assert meta["inputs"]["checkpoint"] == str(toy_parent.resolve())
        assert meta["architecture"] == "nemotron_h"  # dense, not nemotron_h_moe
        assert meta["tokenizer_pre"] == "gpt-2"
        assert {"llama_cpp_python", "gguf", "transformers"} <= set(meta["tool_versions"])
        assert type_name in meta["tensor_types"], meta["tensor_types"]
        sizes[quant] = path.stat().st_size
    assert sizes["q4_k_m"] < sizes["q8_0"] < meta["source_size_bytes"]

    report = json.loads((out / "toy.check.json").read_text())
    hf, q8, q4 = (report["models"][k] for k in ("hf", "q8_0", "q4_k_m"))
    assert report["heldout"]["tokens"] == 4 * 63
    assert all(len(t) > 0 for t in hf["tokens"])
    # Q8_0 keeps the greedy tokens of the float32 model and its perplexity within 1%
    assert q8["all_identical"], (q8["tokens"], hf["tokens"])
    assert abs(q8["ppl"] - hf["ppl"]) / hf["ppl"] < 0.01
    assert abs(q4["ppl"] - hf["ppl"]) < abs(q4["ppl"] - 512)  # Q4_K_M still models the text (512 = uniform guess)
    assert summary["files"]["q8_0"] == str(out / "toy-q8_0.gguf")


def test_llama_cpp_tokenizes_unseen_text_like_transformers(exported, toy_parent):
    run_dir, _ = exported
    tok = AutoTokenizer.from_pretrained(toy_parent)
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n\tDeny thy father   and refuse thy name; 1599 🌹"
    ref = tok(text, add_special_tokens=False)["input_ids"]
    (got,), (back,) = in_child(_llama_tokenize, str(run_dir / "export" / "toy-q8_0.gguf"), [text], [ref], what="tokenizing")
    assert got == ref
    assert back == text.encode()


def _system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


def test_installed_llama_cpp_has_no_amx_kernels():
    # scripts/install_gguf.sh builds with -mno-amx-*: ggml's AMX kernels killed the toy export with SIGILL on
    # these AMX CPUs (the README's GGUF section). An old AMX build (cached wheel keyed on other flags) fails here.
    llama_cpp()
    info = in_child(_system_info, what="reading llama.cpp's system info")
    assert "AVX" in info, info  # the CPU backend's feature list is there
    assert "AMX_INT8 = 1" not in info, info


@pytest.fixture
def no_core_files():
    """Children of this test dump no core when they die of a signal (the soft limit is inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def _die_by_sigill(*args) -> None:
    """Stands in for a llama.cpp call that dies of SIGILL, as ggml's AMX kernels did (takes any arguments)."""
    signal.raise_signal(signal.SIGILL)


@pytest.mark.parametrize("sig, name, desc", [(signal.SIGILL, "SIGILL", "illegal instruction"),
                                             (signal.SIGSEGV, "SIGSEGV", "segmentation fault")], ids=["SIGILL", "SIGSEGV"])
def test_llama_cpp_dying_of_a_signal_is_one_error_line_naming_it(sig, name, desc, no_core_files):
    # the child dies by the signal itself, as a native crash kills a process: no Python exception, no result
    with pytest.raises(NativeCrash) as e:
        in_child(signal.raise_signal, sig, what="loading toy-q8_0.gguf")
    msg = str(e.value)
    assert msg.startswith(f"llama.cpp died with {name} ({desc}) while loading toy-q8_0.gguf: "), msg
    assert "\n" not in msg and "bash scripts/install_gguf.sh" in msg
    assert isinstance(e.value, GGUFError)  # elastic.run prints GGUFErrors as one `elastic: error:` line, exit 2


def test_child_returns_results_and_raises_its_errors_here(tmp_path, monkeypatch):
    assert in_child(divmod, 7, 2, what="dividing") == (3, 1)
    with pytest.raises(ZeroDivisionError) as e:  # a bug keeps its child traceback, as a note
        in_child(divmod, 1, 0, what="dividing")
    assert "in llama.cpp's child process" in "".join(e.value.__notes__)
    monkeypatch.setenv("ELASTIC_LLAMA_CPP", str(tmp_path))  # the environment reaches the child
    with pytest.raises(GGUFError, match="llama.cpp's converter is not at") as e:  # bad input stays one line, no note
        in_child(llama_cpp_dir, what="finding the converter")
    assert not getattr(e.value, "__notes__", None)


def test_export_stage_dying_in_llama_cpp_exits_2_with_one_line(tmp_path, toy_parent, no_core_files):
    # A user's `stage=export` whose llama.cpp run dies of SIGILL (the AMX crash): the stage's own process
    # survives and says so in one line, exit 2. The run is replaced by _die_by_sigill in the stage process,
    # so the child the stage starts for it dies as llama.cpp did.
    llama_cpp()
    held = ",".join(toy.toy_files("heldout"))
    code = ("import sys, elastic.gguf, test_gguf; elastic.gguf._run_llama = test_gguf._die_by_sigill; "
            "from elastic.run import main; main()")
    args = [f"run_dir={tmp_path}", "stage=export", "export.format=gguf", "export.quant=[q8_0]", f"export.model={toy_parent}",
            "export.name=toy", f"data.heldout_files=[{held}]", "export.heldout_sequences=2", "export.seq_len=32",
            "export.max_new_tokens=4"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "elastic: error: llama.cpp died with SIGILL (illegal instruction) while loading and running toy-q8_0.gguf: "), proc.stderr[-2000:]
    assert not list(tmp_path.glob("export/**/*.gguf"))  # nothing half-exported


def test_unknown_quant_is_one_error_line(tmp_path, toy_parent):
    proc = subprocess.run(
        [sys.executable, "-m", "elastic.run", f"run_dir={tmp_path}", "stage=export", "export.format=gguf",
         "export.quant=[q8_0,q9_9]", f"export.model={toy_parent}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("elastic: error: unknown GGUF type(s) ['q9_9']")
    assert not list(tmp_path.glob("export/*.gguf"))


def test_checkpoint_llama_cpp_cannot_convert_is_refused(tmp_path, toy_parent):
    llama_cpp()
    from transformers import OPTConfig, OPTForCausalLM

    ckpt = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(toy_parent).save_pretrained(ckpt)
    with pytest.raises(GGUFError, match="OPTForCausalLM is not supported"):
        pipeline(make_cfg(tmp_path / "run", f"export.model={ckpt}"))
    assert not list((tmp_path / "run").glob("export/**/*.gguf"))


def test_tokenizer_llama_cpp_cannot_take_is_refused(tmp_path, toy_parent):
    llama_cpp()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_parent, ckpt)
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFError, match="not GPT-2's byte-level split"):
        pipeline(make_cfg(tmp_path / "run", f"export.model={ckpt}"))
    assert not list((tmp_path / "run").glob("export/**/*.gguf"))
