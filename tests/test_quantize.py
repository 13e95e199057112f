"""FP8 quantization (modelopt) end to end on the toy, the export checker, the dequantizing reader, and
the rule that every exported model folder of a run holds only what a loader expects."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from elastic import fp8
from elastic.data import DataError
from elastic.export_check import LOADER_FILES, check, main as check_main, stray_files, weight_files
from elastic.fp8 import QuantizeError
from elastic.inputs import heldout_loss, token_batches
from elastic.parent import load_model, load_tokenizer
from elastic.run import pipeline
from elastic.rundir import RunDir, read_json

from test_pipeline import make_cfg

TINY_RUN = [
    "importance.num_sequences=8", "importance.batch_size=8",
    "search.steps=4", "search.batch_size=4", "search.micro_batch_size=2", "search.seq_len=32",
    "search.train_sequences=32", "search.checkpoint_every=0", "search.eval_sequences=0", "tracking.backends=[]",
    "distill.max_steps=1", "distill.eval_sequences=0", "distill.phases.0.seq_len=32", "distill.phases.0.batch_size=2",
    "distill.phases.0.micro_batch_size=2", "distill.phases.1.seq_len=64", "distill.phases.1.batch_size=2",
    "distill.phases.1.micro_batch_size=2", "quantize.calib_sequences=16", "quantize.eval_sequences=8",
]
MARGIN = 0.02  # nats: the FP8 model's held-out loss may exceed the BF16 one by at most this (measured on the toy: +0.0004)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_run(toy_parent, tmp_path_factory):
    """The toy pipeline up to quantize, every budget extracted, everything tiny: every exported folder kind
    (export and evaluate, later in `stage=all`, write no model folder and have tests of their own)."""
    run_dir = tmp_path_factory.mktemp("toyrun")
    results = {}
    for stage in ("importance", "search", "prune", "distill", "quantize"):
        cfg = make_cfg(toy_parent, run_dir, f"stage={stage}", "budget=all", *TINY_RUN)
        results |= pipeline(cfg)
    return cfg, results


def model_folders(root):
    """Every folder of the run that holds a model (a config.json and weights; not e.g. a tracker's config.json)."""
    return sorted(p.parent for p in root.rglob("config.json") if weight_files(p.parent))


def test_no_exported_folder_holds_a_stray_file(toy_run):
    cfg, results = toy_run
    run = RunDir(cfg.run_dir)
    assert list(results) == ["importance", "search", "prune", "distill", "quantize"]
    folders = model_folders(run.root)
    kinds = {f.relative_to(run.root).parts[0] for f in folders}
    assert kinds == {"search", "prune", "distill", "quantize"}, folders
    assert len(folders) == 1 + 3 + 2 + 1  # search/elastic, 3 budgets, 2 phases, the FP8 export
    for folder in folders:
        assert stray_files(folder) == [], folder
        assert {p.name for p in folder.iterdir()} <= LOADER_FILES, folder
        assert check(folder) == [], folder
    # what used to live inside the folders now lives beside them
    for rel in ("search/elastic.ranking.safetensors", "search/elastic.router.safetensors", "search/elastic.router.json",
                "prune/budget-0.5.arch.json", "prune/budget-0.5.candidates.json", "prune/budget-0.5.ranking.safetensors",
                "quantize/phase2-fp8.report.json", "quantize/phase2-fp8.meta.json"):
        assert run.path(rel).is_file(), rel


def test_quantize_after_distill_report_and_export(toy_run):
    cfg, results = toy_run
    run = RunDir(cfg.run_dir)
    q = results["quantize"]
    out = run.path("quantize", "phase2-fp8")
    assert q["path"] == str(out) and results["distill"]["output"] == str(run.path("distill", "phase2"))
    report = read_json(run.beside(out, "report.json"))
    assert report["source"] == results["distill"]["output"]
    loss = report["heldout_loss"]
    assert loss["sequences"] == 8
    assert loss["fake_quant"] - loss["bf16"] < MARGIN, loss
    assert abs(loss["dequantized_export"] - loss["fake_quant"]) < 2e-3, loss
    assert report["bytes"]["export"] < 0.75 * report["bytes"]["source_bf16"], report["bytes"]
    # the default preset: every linear FP8 but lm_head; conv1d BF16
    assert not [n for n in report["quantized"] if "conv1d" in n or n == "lm_head"]
    assert "lm_head" in report["kept_bf16"] and all(n.startswith(("backbone.", "lm_head")) for n in report["quantized"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == "FP8"
    assert "lm_head" in config["ignore"] and not any("\x00" in e or "sentinel" in e for e in config["ignore"])
    assert (out / "hf_quant_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert fp8.is_modelopt_fp8(out) and not fp8.is_modelopt_fp8(run.path("distill", "phase2"))


def test_dequantized_export_reproduces_fake_quant(toy_parent, tmp_path):
    """Quantize the toy parent, export, read back: weights equal up to FP8 rounding ties, logits close."""
    cfg = make_cfg(toy_parent, tmp_path)
    tok = load_tokenizer(toy_parent)
    calib = token_batches(cfg, tok, "calib", num_sequences=16, batch_size=8, seq_len=64)
    held = token_batches(cfg, tok, "heldout", num_sequences=8, batch_size=8, seq_len=64)
    model = load_model(toy_parent)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).float()
        bf16 = model(held[0], use_cache=False).logits
    to_hub = fp8.hub_namer(model)
    kept, unmatched = fp8.keep_bf16(model, ["lm_head", "*embeddings", "*.mixer.conv1d", "backbone.nothing*"], to_hub)
    assert unmatched == ["backbone.nothing*"] and "lm_head" in kept
    fp8.quantize(model, fp8.quant_config(kept, kv_cache=True), calib)
    quantized = fp8.quantized_modules(model)
    fake_w = {n: m.weight_quantizer(m.weight).detach().clone() for n, m in model.named_modules() if n in quantized}
    w_scale = {n: (m.weight_quantizer.amax / fp8.FP8_MAX).item() for n, m in model.named_modules() if n in quantized}
    with torch.no_grad():
        fake = model(held[0], use_cache=False).logits
    fake_loss = heldout_loss(model, held)
    out = tmp_path / "export"
    fixes = fp8.export(model, out, torch.bfloat16, to_hub)
    assert any("sentinel" in f for f in fixes)  # modelopt 0.47 + transformers 5 writes that garbage: repaired
    assert check(out) == []

    deq = fp8.load_dequantized(out)
    state = deq.state_dict()
    ties = total = 0
    for n, w in fake_w.items():
        d = state[f"{n}.weight"]
        steps = ((w / w_scale[n]).to(torch.float8_e4m3fn).view(torch.int8).int()
                 - (d / w_scale[n]).to(torch.float8_e4m3fn).view(torch.int8).int()).abs()
        assert steps.max() <= 1, n  # export and fake quant round a value the other way only at exact ties
        ties, total = ties + int((steps > 0).sum()), total + w.numel()
    assert ties <= 1e-3 * total, (ties, total)
    with torch.no_grad():
        dq = deq(held[0], use_cache=False).logits
    # FP8 rounding is discontinuous: a tie or a last-bit difference flips a few values, so compare
    # against how far FP8 moved the logits from BF16, not against zero
    assert (dq - fake).abs().mean() < 0.15 * (bf16 - fake).abs().mean()
    assert abs(heldout_loss(deq, held) - fake_loss) < 2e-3
    # the FP8 KV cache scales are written and used
    names = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert names["kv_cache_quant_algo"] == "FP8"
    weight_only = fp8.load_dequantized(out, activations=False)
    with torch.no_grad():
        assert (weight_only(held[0], use_cache=False).logits - dq).abs().max() > 0


def test_nvidia_nano_preset_is_modelopts_aggressive_layout(toy_parent, tmp_path):
    """On HF NemotronH, modelopt's MAMBA_MOE_FP8_AGGRESSIVE_CFG keeps attention and conv1d BF16 (what our
    `nvidia_nano` does) and its CONSERVATIVE config also the Mamba in/out projections (our `conservative`)."""
    from omegaconf import OmegaConf

    mtq = fp8._modelopt()
    presets = OmegaConf.to_container(make_cfg(toy_parent, tmp_path).quantize.presets)
    calib = [torch.randint(0, 512, (1, 16))]
    for preset, theirs in (("nvidia_nano", mtq.MAMBA_MOE_FP8_AGGRESSIVE_CFG), ("conservative", mtq.MAMBA_MOE_FP8_CONSERVATIVE_CFG)):
        ours_model, their_model = load_model(toy_parent), load_model(toy_parent)
        kept, unmatched = fp8.keep_bf16(ours_model, presets[preset])
        assert unmatched == []
        fp8.quantize(ours_model, fp8.quant_config(kept), calib)
        fp8.quantize(their_model, theirs, calib)
        assert fp8.quantized_modules(ours_model) == fp8.quantized_modules(their_model), preset
        assert not [n for n in fp8.quantized_modules(ours_model) if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]


def test_checker_fails_on_bad_folders(toy_run, tmp_path, capsys):
    cfg, results = toy_run
    good = RunDir(cfg.run_dir).path("quantize", "phase2-fp8")
    assert check_main([str(good), results["distill"]["output"]]) == 0

    stray = tmp_path / "stray"
    shutil.copytree(good, stray)
    shutil.copy(RunDir(cfg.run_dir).path("prune", "budget-0.5.ranking.safetensors"), stray / "ranking.safetensors")
    no_scale = tmp_path / "no_scale"
    shutil.copytree(good, no_scale)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(no_scale / "model.safetensors"))
    dropped = next(k for k in tensors if k.endswith(".weight_scale"))
    del tensors[dropped]
    save_file(tensors, str(no_scale / "model.safetensors"), metadata={"format": "pt"})
    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    config = json.loads((garbage / "config.json").read_text())
    config["quantization_config"]["ignore"].append("lm_head.\x00backbone.pt_name_sentinel")
    (garbage / "config.json").write_text(json.dumps(config))

    capsys.readouterr()
    for folder, needle in ((stray, "stray file 'ranking.safetensors'"), (no_scale, f"{dropped[:-len('_scale')]} is FP8 but has no weight_scale"),
                           (garbage, "lists 'lm_head.\\x00backbone.pt_name_sentinel', which is no module")):
        assert check_main([str(folder)]) == 1, folder
        lines = capsys.readouterr().out.strip().splitlines()
        assert any(needle in line for line in lines), (needle, lines)
        assert all(line.startswith(f"{folder}: ") for line in lines)
    # the repair turns the garbage entry back into the module name
    fixes = fp8.repair(garbage)
    assert fixes and check(garbage) == []


def test_repair_renames_in_memory_keys(toy_run, tmp_path):
    """Older modelopt wrote transformers' in-memory names (`model.`); the repair renames them to the hub's."""
    cfg, _ = toy_run
    folder = tmp_path / "old"
    shutil.copytree(RunDir(cfg.run_dir).path("quantize", "phase2-fp8"), folder)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("backbone.", "model.", 1): v for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for name, path in (("config.json", ("quantization_config", "ignore")), ("hf_quant_config.json", ("quantization", "exclude_modules"))):
        doc = json.loads((folder / name).read_text())
        doc[path[0]][path[1]] = [e.replace("backbone.", "model.", 1) for e in doc[path[0]][path[1]]]
        (folder / name).write_text(json.dumps(doc))
    assert any("in-memory names" in p for p in check(folder))
    fixes = fp8.repair(folder, fp8.hub_namer(load_model(cfg.parent.path)))
    assert fixes and check(folder) == []
    assert set(load_file(str(folder / "model.safetensors"))) == set(tensors)


@pytest.mark.parametrize("overrides, error, match", [
    (["quantize.preset=bogus"], QuantizeError, "unknown quantize.preset 'bogus'; presets: conservative, default, nvidia_nano"),
    (["quantize.dtype=float32"], QuantizeError, "quantize.dtype 'float32' is not supported"),
    (["quantize.calib_sequences=0"], QuantizeError, "at least one sequence"),
    (["quantize.preset=null", "quantize.keep_bf16=[\"*\"]"], QuantizeError, "nothing would be quantized"),
    (["data.seq_len=10000000"], DataError, "fewer than one sequence of 10000000"),  # no calibration data
])
def test_bad_quantize_input(toy_run, toy_parent, overrides, error, match):
    cfg, _ = toy_run
    run = RunDir(cfg.run_dir)
    before = sorted(p.name for p in run.path("quantize").iterdir())
    bad = make_cfg(toy_parent, cfg.run_dir, "stage=quantize", "force=true", *TINY_RUN, *overrides)
    with pytest.raises(error, match=match):
        pipeline(bad)
    assert sorted(p.name for p in run.path("quantize").iterdir() if p.name != "DONE.json") == [n for n in before if n != "DONE.json"]
    assert not [p for p in run.path("quantize").iterdir() if p.name.endswith(".tmp")]


def test_already_quantized_and_unmatched_glob(toy_run, toy_parent, tmp_path, capsys):
    cfg, results = toy_run
    export = results["quantize"]["path"]
    with pytest.raises(QuantizeError, match="already quantized"):
        pipeline(make_cfg(toy_parent, tmp_path / "r", "stage=quantize", f"quantize.model={export}", *TINY_RUN))
    assert not (tmp_path / "r" / "quantize").exists()
    capsys.readouterr()
    out = pipeline(make_cfg(toy_parent, tmp_path / "r", "stage=quantize", f"quantize.model={toy_parent}",
                            "quantize.keep_bf16=[backbone.layers.99.*]", "quantize.eval_sequences=0",
                            "quantize.calib_sequences=4", *TINY_RUN[:-2]))["quantize"]
    assert "elastic: warning: quantize glob 'backbone.layers.99.*' matches no module" in capsys.readouterr().err
    assert out["name"] == f"{toy_parent.name}-fp8" and check(out["path"]) == []


def test_cli_unknown_preset_is_one_line(toy_parent, tmp_path):
    r = subprocess.run([sys.executable, "-m", "elastic.run", "stage=quantize", f"quantize.model={toy_parent}",
                        "quantize.preset=bogus", f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("elastic: error: unknown quantize.preset 'bogus'"), r.stderr
    assert not (tmp_path / "quantize").exists()
