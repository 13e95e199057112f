"""The importance and prune stages end to end on the trained toy parent, through the real entry point."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from elastic import toy
from elastic.arch import ArchError
from elastic.data import DataError
from elastic.importance import versus_random
from elastic.inputs import heldout_loss
from elastic.models.nemotron_h import Ranking, arch_of, make_arch
from elastic.parent import ModelError
from elastic.run import CONF_DIR, pipeline
from elastic.rundir import RunDir


def make_cfg(parent, run_dir, *overrides):
    files = toy.toy_files("calib")
    held = toy.toy_files("heldout")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            f"parent.path={parent}", f"run_dir={run_dir}", f"data.files=[{','.join(files)}]",
            f"data.heldout_files=[{','.join(held)}]", "data.seq_len=64", "importance.num_sequences=32",
            "importance.batch_size=16", "prune.score_sequences=8", "prune.num_candidates=3", *overrides,
        ])


@pytest.fixture(scope="module")
def pruned_run(toy_parent, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(toy_parent, run_dir, "stage=importance", "prune.target=0.6")
    results = pipeline(cfg)
    cfg.stage = "prune"
    results |= pipeline(cfg)
    return cfg, results


def test_stages_write_artifacts_with_sidecars(pruned_run):
    cfg, results = pruned_run
    run = RunDir(cfg.run_dir)
    for rel in ("importance/scores.safetensors", "importance/ranking.safetensors", "importance/summary.json"):
        assert run.path(rel).exists() and run.sidecar_path(run.path(rel)).exists(), rel
    meta = run.read_sidecar(run.path("importance/ranking.safetensors"))
    assert meta["stage"] == "importance" and "transformers" in meta["versions"] and meta["config"]["num_sequences"] == 32
    assert run.is_done("importance") and run.is_done("prune")
    assert not [p for p in run.root.rglob("*.tmp")], "no temporary leftovers"


def test_pruned_checkpoint_is_plain_hf_and_within_budget(pruned_run, toy_parent):
    cfg, results = pruned_run
    out = results["prune"]["path"]
    parent = AutoModelForCausalLM.from_pretrained(toy_parent)
    child = AutoModelForCausalLM.from_pretrained(out)
    n_child = sum(p.numel() for p in child.parameters())
    n_parent = sum(p.numel() for p in parent.parameters())
    assert 0.57 * n_parent <= n_child <= 0.6 * n_parent
    arch = json.loads(RunDir(cfg.run_dir).beside(results["prune"]["path"], "arch.json").read_text())
    assert arch_of(child).num_params() == n_child and arch["hidden_size"] == child.config.hidden_size
    assert json.loads(RunDir(cfg.run_dir).path("prune/latest.json").read_text())["path"] == out
    cands = json.loads(RunDir(cfg.run_dir).beside(results["prune"]["path"], "candidates.json").read_text())
    assert min(c["heldout_loss"] for c in cands["candidates"]) == pytest.approx(
        next(c["heldout_loss"] for c in cands["candidates"] if c["arch"]["hidden_size"] == arch["hidden_size"]
             and c["arch"]["layers"] == arch["layers"] and c["arch"]["intermediate_size"] == arch["intermediate_size"]
             and c["arch"]["mamba_num_heads"] == arch["mamba_num_heads"]))


def test_rerun_is_a_noop_and_force_reruns(pruned_run):
    cfg, _ = pruned_run
    run = RunDir(cfg.run_dir)
    before = run.path("importance/ranking.safetensors").stat().st_mtime_ns
    again = cfg.copy()
    again.stage = "importance"
    pipeline(again)
    assert run.path("importance/ranking.safetensors").stat().st_mtime_ns == before
    again.force = True
    pipeline(again)
    assert run.path("importance/ranking.safetensors").stat().st_mtime_ns != before


def test_importance_beats_random_pruning(pruned_run, toy_parent):
    cfg, _ = pruned_run
    run = RunDir(cfg.run_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_parent).eval()
    parent = arch_of(model)
    ranking = Ranking.from_tensors(run.load_tensors("importance/ranking.safetensors"))
    from elastic.inputs import token_batches

    held = token_batches(cfg, AutoTokenizer.from_pretrained(toy_parent), "heldout", num_sequences=16, batch_size=16)
    shape = json.loads(run.path("prune/latest.json").read_text())["arch"]
    n_drop = parent.num_layers - len(shape["layers"])

    def width(r):
        return make_arch(parent, r, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         mamba_num_heads=shape["mamba_num_heads"], drop_layers=n_drop, protect_kinds="*")

    def depth(r):
        return make_arch(parent, r, drop_layers=2, protect_kinds="*")

    seeds = range(4)
    w = versus_random(model, ranking, width, held, seeds)
    d = versus_random(model, ranking, depth, held, seeds)
    full = heldout_loss(model, held)
    assert full < w["importance"] < w["random_mean"] - 0.1, w
    assert d["importance"] < d["random_mean"], d
    assert w["importance"] < min(w["random"])


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["prune.target=0.05"], ArchError, "no architecture of the grid"),
        (["prune.target=null", "prune.arch={mamba_num_heads:5}"], ArchError, "multiple of n_groups"),
        (["prune.target=null", "prune.arch={hidden_size:100000}"], ArchError, "exceeds"),
        (["prune.target=2.0e12"], ArchError, "exceeds the parent"),
        (["prune.target=null", "budget=null"], ArchError, "exactly one of"),
        (["prune.target=0.5", "prune.arch={hidden_size:64}"], ArchError, "only one of"),
    ],
)
def test_bad_prune_input(pruned_run, toy_parent, tmp_path, overrides, error, match):
    cfg, _ = pruned_run
    bad = make_cfg(toy_parent, cfg.run_dir, "stage=prune", "force=true", *overrides)
    def artifacts():  # the DONE marker is cleared by a failed rerun on purpose: the stage is not done
        return sorted(p.name for p in RunDir(cfg.run_dir).path("prune").iterdir() if p.name != "DONE.json")

    before = artifacts()
    with pytest.raises(error, match=match):
        pipeline(bad)
    assert artifacts() == before


def test_bad_model_and_data(toy_parent, tmp_path):
    not_nemo = tmp_path / "gpt2"
    not_nemo.mkdir()
    (not_nemo / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="'gpt2'"):
        pipeline(make_cfg(not_nemo, tmp_path / "r1", "stage=importance"))
    with pytest.raises(ModelError, match="no config.json"):
        pipeline(make_cfg(tmp_path / "nowhere", tmp_path / "r2", "stage=importance"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError):
        pipeline(make_cfg(toy_parent, tmp_path / "r3", "stage=importance", f"data.files={empty}"))
    with pytest.raises(DataError):
        pipeline(make_cfg(toy_parent, tmp_path / "r4", "stage=importance", f"data.files={tmp_path}/missing*.txt"))
    assert not (tmp_path / "r3" / "importance").exists()


@pytest.mark.parametrize("args, match", [(["stage=bogus"], "unknown stage 'bogus'"), (["recipe=nope"], "unknown recipe 'nope'")])
def test_cli_reports_one_error_line(args, match, tmp_path):
    r = subprocess.run([sys.executable, "-m", "elastic.run", *args, f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], r.stderr


def test_cli_bad_budget_one_line(toy_parent, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "elastic.run", "stage=prune", f"parent.path={toy_parent}", "prune.ranking=identity",
         "prune.target=0.01", f"run_dir={tmp_path}", f"data.files={toy.toy_files('calib')[0]}"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("elastic: error: no architecture")
    assert not (tmp_path / "prune").exists() or not any((tmp_path / "prune").iterdir())


def test_help_lists_stages_and_recipes():
    r = subprocess.run([sys.executable, "-m", "elastic.run", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("importance", "prune", "search", "distill", "plan", "recipe: nemotron3_nano_30b_a3b, nemotron_12b_elastic, nemotron_9b_to_4b, toy",
                 "prune.target"):
        assert word in r.stdout, word


@pytest.mark.parametrize("stage", ["all", "importance", "prune"])
def test_a_multi_process_launch_runs_only_training_stages(stage, tmp_path):
    """Under a multi-process launch every process runs the entry point: stage=all (or a single-process
    stage) would load the parent in each and race on the run directory, so it is refused up front."""
    env = {**os.environ, "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-m", "elastic.run", f"stage={stage}", f"run_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "launched on 2 processes; only search and distill run multi-process" in r.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir()) or not (tmp_path / stage).exists()


def test_offline_defaults_belong_to_the_toy_recipe(monkeypatch):
    from elastic.run import offline_defaults

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    offline_defaults(["recipe=nemotron_9b_to_4b", "stage=importance"])
    assert "HF_HUB_OFFLINE" not in os.environ  # a cluster with a hub keeps it
    offline_defaults(["stage=importance"])  # the toy (default) recipe needs none
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_summary_names_the_least_important_layers(pruned_run):
    """The end-of-run table lists the layers depth pruning drops first: the tail of the ranking."""
    from elastic.summary import key_figure

    cfg, results = pruned_run
    order = json.loads(RunDir(cfg.run_dir).path("importance/summary.json").read_text())["depth_order"]
    assert key_figure("importance", results["importance"]) == f"layers, least important first: {order[::-1][:8]}"
