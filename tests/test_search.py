"""The search stage end to end on the trained toy parent: archs.json within the budgets, zero-shot
extraction that reloads with plain transformers and equals the hard-masked elastic model, exact resume."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic.arch import ArchError
from elastic.models.nemotron_h import Arch
from elastic.data import DataError
from elastic.models.nemotron_h import arch_of
from elastic.models.nemotron_h.masking import ElasticNemotronH
from elastic.router import Router
from elastic.rundir import RunDir, read_json
from elastic.run import pipeline
from elastic.stages.prune import router_space
from elastic.train import ResumeError, SimulatedCrash
from tiny import tokens

from test_pipeline import make_cfg

SEARCH = [
    "search.steps=10", "search.batch_size=4", "search.micro_batch_size=2", "search.seq_len=32",
    "search.train_sequences=64", "search.checkpoint_every=4", "search.eval_sequences=4", "search.log_choices_every=2",
    "tracking.backends=[]",
]


@pytest.fixture(scope="module")
def search_run(toy_parent, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("search")
    cfg = make_cfg(toy_parent, run_dir, "stage=importance", *SEARCH)
    pipeline(cfg)
    cfg = make_cfg(toy_parent, run_dir, "stage=search", *SEARCH)
    pipeline(cfg)
    return run_dir


def test_archs_within_budgets(search_run):
    doc = read_json(search_run / "search/archs.json")
    assert set(doc["budgets"]) == {"0.5", "0.7", "1"}
    for b, rec in doc["budgets"].items():
        arch = Arch.from_dict(rec["arch"])
        assert rec["params"] == arch.num_params() and rec["parent_params"] == doc["parent_params"]
        assert abs(arch.num_params() / (float(b) * doc["parent_params"]) - 1) <= 0.05, (b, rec["summary"])
        assert rec["within_band"]
    for f in ("elastic/model.safetensors", "elastic.ranking.safetensors", "elastic.router.safetensors",
              "elastic.router.json", "widths.png", "archs.json.meta.json", "history.json"):
        assert (search_run / "search" / f).exists(), f
    hist = read_json(search_run / "search/history.json")
    assert any("choice/b0.5/hidden" in h for h in hist) and any("budget_loss" in h for h in hist)


def test_extraction_reloads_and_matches_the_masked_model(search_run, toy_parent):
    cfg = make_cfg(toy_parent, search_run, "stage=prune", "budget=[0.5,0.6,0.7]", "force=true", *SEARCH)
    out = pipeline(cfg)["prune"]["extracted"]
    assert set(out) == {"0.5", "0.6", "0.7"}
    elastic_hf = AutoModelForCausalLM.from_pretrained(search_run / "search/elastic").eval()
    rcfg = read_json(search_run / "search/elastic.router.json")
    from safetensors.torch import load_file

    depth = load_file(str(search_run / "search/elastic.ranking.safetensors"))["depth"]
    el = ElasticNemotronH(elastic_hf, router_space(Router.from_config(rcfg, arch_of(elastic_hf)), arch_of(elastic_hf)),
                          depth, rcfg["protect_kinds"])
    ids = tokens(vocab=elastic_hf.config.vocab_size)
    for b in ("0.5", "0.7"):
        child = AutoModelForCausalLM.from_pretrained(out[b]["path"]).eval()
        arch = Arch.from_dict(json.loads((search_run / "prune" / f"budget-{b}.arch.json").read_text()))
        assert arch_of(child).replace(layers=()) == arch.replace(layers=())
        el.set_arch(arch)
        with torch.no_grad():
            torch.testing.assert_close(child(ids, use_cache=False).logits, el(ids).logits, rtol=1e-4, atol=1e-4)
    # an untrained budget comes from the router on the interpolated input, within its band
    assert abs(out["0.6"]["params"] / (0.6 * out["0.6"]["parent_params"]) - 1) <= 0.05


def test_resume_reproduces_losses_and_refuses_another_parent(search_run, toy_parent, tmp_path):
    full = read_json(search_run / "search/history.json")
    cfg = make_cfg(toy_parent, tmp_path, "stage=search", *SEARCH, "+search.fail_at_step=6")
    shutil.copytree(search_run / "importance", tmp_path / "importance")
    with pytest.raises(SimulatedCrash):
        pipeline(cfg)
    other = tmp_path / "other_parent"
    shutil.copytree(toy_parent, other)
    with pytest.raises(ResumeError, match="parent"):
        pipeline(make_cfg(other, tmp_path, "stage=search", *SEARCH))
    pipeline(make_cfg(toy_parent, tmp_path, "stage=search", *SEARCH))
    resumed = read_json(tmp_path / "search/history.json")
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full], rel=1e-6, abs=1e-7)


def test_resume_accepts_settings_that_keep_the_trajectory_and_names_those_that_do_not(search_run, toy_parent, tmp_path,
                                                                                       capsys):
    """Issue #20, defect 4: the fingerprint held every search.* key, so turning on activation checkpointing after an
    out-of-memory crash (or a smaller loss chunk, fewer eval sequences, other logging or checkpoint periods)
    restarted the search from step 0. Those resume now, to the uninterrupted run's losses; a key that changes
    the trajectory is refused with its name and both values."""
    full = read_json(search_run / "search/history.json")
    shutil.copytree(search_run / "importance", tmp_path / "importance")
    with pytest.raises(SimulatedCrash):
        pipeline(make_cfg(toy_parent, tmp_path, "stage=search", *SEARCH, "+search.fail_at_step=6"))  # checkpoint at 4
    with pytest.raises(ResumeError, match=r"search\.lr: checkpoint 0\.001 vs now 0\.002") as e:
        pipeline(make_cfg(toy_parent, tmp_path, "stage=search", *SEARCH, "search.lr=2e-3"))
    assert "\n" not in str(e.value)
    harmless = ["search.gradient_checkpointing=true", "search.loss_chunk_size=16", "search.eval_sequences=2",
                "search.log_every=3", "search.checkpoint_every=3", "search.log_choices_every=3"]
    capsys.readouterr()
    pipeline(make_cfg(toy_parent, tmp_path, "stage=search", *SEARCH, *harmless))
    assert "resuming at step 4/10" in capsys.readouterr().out
    resumed = read_json(tmp_path / "search/history.json")
    assert [h["loss"] for h in resumed[:4]] == [h["loss"] for h in full[:4]]  # the step-4 checkpoint's, bit-identical
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full], rel=1e-4, abs=1e-6)


def test_streamed_mixture_search_resumes_exactly(search_run, toy_parent, tmp_path):
    from elastic import toy

    def cfg_for(run_dir, *extra):
        cfg = make_cfg(toy_parent, run_dir, "stage=search", *SEARCH, "search.steps=4", "search.checkpoint_every=2",
                       "search.eval_sequences=0", "search.streaming=true", "search.shuffle_buffer=4", *extra)
        cfg.search.sources = [{"name": "calib", "files": toy.toy_files("calib"), "weight": 0.7},
                              {"name": "train", "files": toy.toy_files("train"), "weight": 0.3}]
        shutil.copytree(search_run / "importance", run_dir / "importance", dirs_exist_ok=True)
        return cfg

    pipeline(cfg_for(tmp_path / "a"))
    with pytest.raises(SimulatedCrash):
        pipeline(cfg_for(tmp_path / "b", "+search.fail_at_step=3"))
    pipeline(cfg_for(tmp_path / "b"))
    full, resumed = (read_json(tmp_path / r / "search/history.json") for r in "ab")
    assert len(full) == 4
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full], rel=1e-6, abs=1e-7)
    bad = cfg_for(tmp_path / "c")
    bad.search.sources = [{"name": "nofiles", "weight": 1.0}]
    with pytest.raises(DataError, match=r"search.sources\[0\] needs `files`"):
        pipeline(bad)


@pytest.mark.parametrize("override, match", [
    ("search.budgets=[0.5,1.5]", r"\(0, 1\]"),
    ("search.budgets=[]", "empty"),
    ("search.choices.hidden=[]", "empty"),
    ("search.choices.mamba=[3,16]", "n_groups"),
])
def test_bad_search_input(search_run, toy_parent, override, match):
    with pytest.raises(ArchError, match=match):
        pipeline(make_cfg(toy_parent, search_run, "stage=search", "force=true", *SEARCH, override))


def test_settle_trains_exactly_the_extracted_architecture():
    """In the settle phase the router is frozen (no gradient) and a budget's masked forward is the very
    model that extraction cuts out; before it, the router learns."""
    from omegaconf import OmegaConf

    from elastic.models.nemotron_h import Ranking
    from elastic.run import CONF_DIR
    from elastic.stages.search import chosen_archs, make_search_model
    from tiny import tiny_model

    model = tiny_model("M-*M-M-")
    c = OmegaConf.load(CONF_DIR / "search/default.yaml")
    c.steps, c.settle_share, c.full_model_share = 8, 0.5, None
    c.granularity.hidden, c.granularity.ffn = 16, 32
    sm = make_search_model(model, Ranking.random(arch_of(model), torch.Generator().manual_seed(0)), c, seed=0)
    assert sm.settle_start == 4 and sm.full_share == 0.0  # budget 1.0 is listed: no extra full-model steps
    ids = tokens(vocab=model.config.vocab_size)
    chosen = chosen_archs(sm)
    seen = set()
    for step in range(8):
        sm.zero_grad()
        out = sm(ids, step)
        logits, bl, info = sm.elastic.model.lm_head(out.hidden), out.budget_loss, out.info
        (logits.float().pow(2).mean() + bl).backward()
        router_grads = [p.grad for p in sm.router.parameters()]
        if step < 4:
            assert any(g is not None and g.abs().sum() > 0 for g in router_grads)
            continue
        assert all(g is None for g in router_grads)
        b = info["budget"]
        seen.add(b)
        with torch.no_grad():
            want = sm.elastic.extract(Arch.from_dict(chosen[b]["arch"]))(ids, use_cache=False).logits
        torch.testing.assert_close(logits.detach(), want, rtol=1e-4, atol=1e-4)
    assert seen  # at least one settle step drew a budget


def test_each_micro_batch_draws_its_own_budget():
    """With gradient accumulation the k-th forward of a step is micro-batch k and draws its own budget,
    a function of (seed, step, micro) only: a resumed run (a fresh model) draws the same."""
    from omegaconf import OmegaConf

    from elastic.models.nemotron_h import Ranking
    from elastic.run import CONF_DIR
    from elastic.stages.search import make_search_model
    from tiny import tiny_model

    model = tiny_model("M-*M-M-")
    c = OmegaConf.load(CONF_DIR / "search/default.yaml")
    c.steps = 6
    c.granularity.hidden, c.granularity.ffn = 16, 32
    ranking = Ranking.random(arch_of(model), torch.Generator().manual_seed(0))
    sm = make_search_model(model, ranking, c, seed=3)
    ids = tokens(vocab=model.config.vocab_size)
    drawn = []
    with torch.no_grad():
        for step in range(6):
            drawn.append([sm(ids, step).info["budget"] for _ in range(4)])
    assert drawn == [[sm.plan(s, m)[0] for m in range(4)] for s in range(6)]
    assert any(len(set(d)) > 1 for d in drawn)  # one step mixes budgets
    fresh = make_search_model(model, ranking, c, seed=3)
    with torch.no_grad():
        assert [fresh(ids, 4).info["budget"] for _ in range(4)] == drawn[4]  # resume at step 4
    # two processes with 2 micro-batches each share the 4 draws of one process: slot = micro x 2 + rank
    ranks = [make_search_model(model, ranking, c, seed=3) for _ in range(2)]
    for r, m in enumerate(ranks):
        m.set_process(r, 2)
    assert [[ranks[r].plan(s, m)[0] for m in range(2) for r in range(2)] for s in range(6)] == \
        [[d[m * 2 + r] for m in range(2) for r in range(2)] for d in drawn]
    with pytest.raises(ValueError, match="1024"):
        ranks[1].plan(0, 512)


@pytest.mark.slow
def test_search_under_two_process_ddp(search_run, toy_parent, tmp_path):
    """The search stage under a real 2-process gloo DDP launch: the processes draw different budgets
    (some train the full model or settle, leaving the router without gradient) and still finish."""
    from elastic import toy
    from launch import launch_two_processes

    shutil.copytree(search_run / "importance", tmp_path / "importance")
    files, held = toy.toy_files("calib"), toy.toy_files("heldout")
    overrides = [o for o in SEARCH if not o.startswith(("search.steps", "search.micro_batch_size", "search.checkpoint_every"))]
    proc = launch_two_processes(
        "-m", "elastic.run", "stage=search", f"run_dir={tmp_path}", f"parent.path={toy_parent}",
        f"data.files=[{','.join(files)}]", f"data.heldout_files=[{','.join(held)}]", "data.seq_len=64",
        *overrides, "search.steps=4", "search.micro_batch_size=1", "search.checkpoint_every=0", "device=cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # really two processes, each reading its half of the global batch of 4 (not all of it)
    assert "micro 1 x accumulation 2 x 2 processes" in proc.stdout + proc.stderr
    archs = read_json(tmp_path / "search/archs.json")
    assert len(read_json(tmp_path / "search/history.json")) == 4
    assert {float(b) for b in archs["budgets"]} == {0.5, 0.7, 1.0}


@pytest.mark.slow
def test_search_under_two_process_fsdp_matches_one_process_and_resumes(search_run, toy_parent, tmp_path):
    """FSDP2 search over 2 processes (the router replicated, its gradients averaged): each step draws
    the same budgets and rows as one process (slot = micro x processes + rank), so the losses match one
    unsharded process step by step; killed after step 3 it resumes exactly from its sharded checkpoint,
    and the gathered elastic checkpoint and the extracted budgets load with plain transformers."""
    from elastic import toy
    from launch import launch_two_processes

    common = [o for o in SEARCH if not o.startswith(("search.steps", "search.micro_batch_size", "search.checkpoint_every"))]
    common += ["search.steps=4", "search.micro_batch_size=1", "search.checkpoint_every=2"]
    for name in ("one", "two"):
        shutil.copytree(search_run / "importance", tmp_path / name / "importance")
    pipeline(make_cfg(toy_parent, tmp_path / "one", "stage=search", *common))
    files, held = toy.toy_files("calib"), toy.toy_files("heldout")
    args = ["-m", "elastic.run", "stage=search", f"run_dir={tmp_path / 'two'}", f"parent.path={toy_parent}",
            f"data.files=[{','.join(files)}]", f"data.heldout_files=[{','.join(held)}]", "data.seq_len=64",
            *common, "device=cpu", "parallel.strategy=fsdp"]
    crashed = launch_two_processes(*args, "+search.fail_at_step=3", timeout=400)
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stdout + crashed.stderr
    proc = launch_two_processes(*args, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "world size 2 (FSDP2" in out and "resuming at step 2/4" in out
    one = [h["loss"] for h in read_json(tmp_path / "one/search/history.json")]
    two = [h["loss"] for h in read_json(tmp_path / "two/search/history.json")]
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one/search/elastic")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two/search/elastic")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=k)
    extracted = pipeline(make_cfg(toy_parent, tmp_path / "two", "stage=prune", "budget=all", *common))["prune"]["extracted"]
    for rec in extracted.values():
        assert AutoModelForCausalLM.from_pretrained(rec["path"]).num_parameters() == rec["params"]
