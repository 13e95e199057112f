"""`stage=plan` / `elastic.plan`: the memory plan agrees with a fake-tensor trace of the real step, and the CLI
plans the real recipes from a folder holding only config.json.

Trace-vs-plan tolerance: the plan's per-GPU peak is within 15% of the peak `MemTracker` records for one
training step (``tests/memtrace.py``: the project's own distill and search step code under
``FakeTensorMode``, device "cpu", CPU bf16 autocast standing in for a GPU's). Reduced depth: three
layers (Mamba, MLP, attention) of the real widths (4B student / 9B teacher for distill; the 9B
elastic student for search, whose model is built for real before it is made fake, so its vocabulary is
cut to 4096 -- the real vocabulary's logits are checked by the distill trace). One process: the trace
cannot run FSDP, so the sharded terms are checked by arithmetic only. What the plan leaves out and the
trace does not have either: CUDA context, NCCL buffers, allocator fragmentation (`plan.reserve_gib`).
What the trace has and the plan does not: tensors smaller than a token row (masks, rotary tables, the
router), and transformers' S x S attention mask that fake tensors trigger (a tracing-only path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from elastic.models.nemotron_h import Arch
from elastic.plan import (GiB, PlanError, Shape, check_stage, check_tau_schedule, choose_strategy, choose_teacher,
                          plan_all, plan_rows, plan_training, tau_at_router_end)
from elastic.run import CONF_DIR

DATA = Path(__file__).parent / "data"
KINDS = {"M": "linear_attention", "-": "mlp", "*": "full_attention"}
TOLERANCE = 0.15


def _config(name: str, pattern: str, **overrides):
    from transformers import NemotronHConfig

    d = json.loads((DATA / name).read_text())
    d.pop("hybrid_override_pattern", None)
    d.pop("num_hidden_layers", None)
    d.update(layers_block_type=[KINDS[c] for c in pattern], **overrides)
    return NemotronHConfig(**d)


def _parent_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name.split(".")[0]
    d.mkdir()
    (d / "config.json").write_text((DATA / name).read_text())
    return d


def _cfg(recipe: str, parent: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"recipe={recipe}", f"parent.path={parent}", *overrides])


def _one_replica(student, teacher, shape, *, chunk, checkpointing, loss_chunk, elastic):
    return plan_training("trace", "test", student, teacher, shape=shape, batch_size=shape.batch, steps=1, world_size=1,
                         gpu_memory_bytes=1e15, reserve_bytes=0, strategy="ddp", teacher_mode="replicate", path="torch",
                         chunk=chunk, teacher_chunk=chunk, checkpointing=checkpointing, loss_chunk=loss_chunk,
                         elastic=elastic, peak_tflops=1.0, mfu=1.0, keys={})


def _report(plan, trace) -> str:
    return (f"plan {plan.peak_bytes / GiB:.2f} GiB at {plan.peak_phase} "
            f"{ {t.name: round(t.gib, 2) for t in plan.terms} } vs trace {trace['Total'] / GiB:.2f} GiB "
            f"{ {k: round(v / GiB, 2) for k, v in trace.items()} }")


def test_plan_matches_fake_tensor_trace_of_the_distill_step():
    from memtrace import trace_distill

    pattern, seq, micro, chunk = "M-*", 8192, 1, 1024
    s_cfg = _config("nemotron-3-nano-4b.config.json", pattern)
    t_cfg = _config("nemotron-nano-9b-v2.config.json", pattern)
    trace = trace_distill(s_cfg, t_cfg, seq_len=seq, micro_batch=micro, chunk_size=chunk, checkpointing=True)
    student, teacher = Arch.from_config(s_cfg), Arch.from_config(t_cfg)
    plan = _one_replica(student, teacher, Shape(micro, seq), chunk=s_cfg.chunk_size, checkpointing=True,
                        loss_chunk=chunk, elastic=False)
    print(_report(plan, trace))
    # the fixed state is exact: fp32 student + bf16 teacher weights, two fp32 AdamW moments
    assert trace["PARAM"] == pytest.approx(plan.term("parameters").bytes + plan.term("teacher").bytes, rel=0.01)
    assert trace["OPT"] == pytest.approx(plan.term("optimizer").bytes, rel=0.01)
    assert plan.peak_bytes == pytest.approx(trace["Total"], rel=TOLERANCE), _report(plan, trace)


def test_plan_matches_fake_tensor_trace_of_the_search_step(tmp_path):
    from memtrace import trace_search

    pattern, seq = "M-*", 8192
    p_cfg = _config("nemotron-nano-9b-v2.config.json", pattern, vocab_size=4096)
    cfg = _cfg("nemotron_9b_to_4b", tmp_path, f"search.seq_len={seq}", "search.micro_batch_size=1",
               "search.log_choices_every=1000")
    # the search step as the recipe runs it: activation checkpointing (each block recomputed under the masks it
    # captured) and the chunked KD loss inside SearchModel.forward
    trace = trace_search(p_cfg, cfg.search, micro_batch=1, checkpointing=True)
    parent = Arch.from_config(p_cfg)
    plan = _one_replica(parent, parent, Shape(1, seq), chunk=p_cfg.chunk_size, checkpointing=True,
                        loss_chunk=int(cfg.search.loss_chunk_size), elastic=True)
    print(_report(plan, trace))
    assert trace["OPT"] == pytest.approx(plan.term("optimizer").bytes, rel=0.01)  # the router's few K params aside
    assert plan.peak_bytes == pytest.approx(trace["Total"], rel=TOLERANCE), _report(plan, trace)


def test_plan_stage_on_a_config_only_folder_prints_and_writes_the_same_numbers(tmp_path, capsys):
    from elastic.run import pipeline

    parent = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")
    run_dir = tmp_path / "run"
    pipeline(_cfg("nemotron_9b_to_4b", parent, "stage=plan", f"run_dir={run_dir}", "plan.mamba_path=kernel"))
    out = capsys.readouterr().out
    assert "3,974M" in out and "8,888M" in out, out
    doc = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert [row["row"] for row in doc["rows"]] == ["importance", "search", "distill phase1", "distill phase2"]
    assert [row["seq_len"] for row in doc["rows"][2:]] == [8192, 49152]
    assert doc["fits"] and all(row["fits"] for row in doc["rows"])
    assert round(doc["student"]["params"] / 1e6) == 3974 and round(doc["teacher"]["params"] / 1e6) == 8888
    # the terminal table and plan.md show plan.json's numbers
    md = (run_dir / "plan" / "plan.md").read_text()
    for label, fmt in (("PEAK", lambda r: f"{r['peak_gib']:.1f} / {r['budget_gib']:.1f}"),
                       ("activations GiB", lambda r: f"{r['terms']['activations']['gib']:.1f}"),
                       ("GPU-hours", lambda r: f"{r['gpu_hours']:,.0f}")):
        want = [fmt(r) for r in doc["rows"]]
        line = next(x for x in md.splitlines() if x.startswith(f"| {label}"))
        assert [c.strip() for c in line.strip("|").split("|")[1:]] == want, label
        table_line = next(x for x in out.splitlines() if label in x)
        assert all(w in table_line for w in want), (label, table_line)
    # not part of stage=all: no DONE marker, nothing else written
    assert not (run_dir / "plan" / "DONE.json").exists()
    assert sorted(p.name for p in (run_dir / "plan").iterdir()) == ["plan.json", "plan.json.meta.json", "plan.md", "plan.md.meta.json"]


def test_cli_refuses_ddp_with_one_error_line_after_writing_the_plan(tmp_path):
    parent = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ELASTIC_TRACEBACK"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "elastic.run", "recipe=nemotron_9b_to_4b", "stage=plan", f"parent.path={parent}",
                        f"run_dir={run_dir}", "plan.mamba_path=kernel", "parallel.strategy=ddp"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("elastic: error: "), r.stderr
    assert "search: optimizer" in err[0] and "set parallel.strategy=fsdp" in err[0]
    assert "3,974M" in r.stdout and "8,888M" in r.stdout
    doc = json.loads((run_dir / "plan" / "plan.json").read_text())  # written before the refusal
    assert not doc["fits"] and {row["row"] for row in doc["rows"] if not row["fits"]} >= {"search", "distill phase1"}


def test_one_gpu_and_the_torch_path_are_refused_naming_the_term(tmp_path):
    parent = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")
    cfg = _cfg("nemotron_9b_to_4b", parent, "plan.mamba_path=kernel", "plan.gpus=1")
    with pytest.raises(PlanError, match=r"distill phase1: optimizer .* overflow 80 GiB per GPU"):
        check_stage(cfg, "distill")
    # the pure-torch scan keeps ~0.7 MB per token per Mamba layer: without checkpointing 49K tokens cannot fit
    cfg = _cfg("nemotron_9b_to_4b", parent, "plan.mamba_path=torch", "distill.gradient_checkpointing=false")
    with pytest.raises(PlanError, match=r"distill phase2: activations .* set distill.gradient_checkpointing=true"):
        check_stage(cfg, "distill")
    torch_rows = plan_rows(_cfg("nemotron_9b_to_4b", parent, "plan.mamba_path=torch"), "distill")
    kernel_rows = plan_rows(_cfg("nemotron_9b_to_4b", parent, "plan.mamba_path=kernel"), "distill")
    for t, k in zip(torch_rows, kernel_rows):
        assert t.term("activations").bytes > 2 * k.term("activations").bytes
        assert t.term("mamba_scan").bytes > k.term("mamba_scan").bytes


def test_auto_sharding_and_the_12b_recipe(tmp_path):
    p9 = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")
    cfg = _cfg("nemotron_9b_to_4b", p9, "plan.mamba_path=kernel")
    assert choose_strategy(cfg, "distill", 8, 80 * GiB) == "fsdp"  # a 4B replica with AdamW + the teacher: > 80 GiB
    assert choose_strategy(cfg, "distill", 8, 1024 * GiB) == "ddp"
    assert choose_teacher(cfg, "distill", 8, 80 * GiB) == "replicate"
    p12 = _parent_dir(tmp_path, "nemotron-nano-12b-v2.config.json")
    doc = plan_all(_cfg("nemotron_12b_elastic", p12, "plan.mamba_path=kernel"))
    assert doc["fits"], [r.refusal() for r in doc["_rows"] if not r.fits]
    assert doc["teacher"]["params"] == 12_310_001_152
    assert 0.95 * 6.0e9 <= doc["student"]["params"] <= 6.0e9
    assert doc["tau_warning"] is None and doc["tau"]["tau_end"] == pytest.approx(0.05, abs=0.005)


def test_tau_schedule_check_reports_the_temperature_at_the_end_of_the_router_steps(tmp_path):
    cfg = _cfg("nemotron_9b_to_4b", tmp_path, "search.tau_decay=0.9999")
    t = tau_at_router_end(cfg.search)
    assert t["router_steps"] == 1500 and t["tau_end"] == pytest.approx(0.9999 ** 1499, rel=1e-6)
    warning = check_tau_schedule(cfg.search)
    assert warning and "0.861" in warning and f"{t['decay_to_floor']:.5f}" in warning
    for recipe in ("nemotron_9b_to_4b", "nemotron_12b_elastic", "toy"):
        c = _cfg(recipe, tmp_path).search
        assert check_tau_schedule(c) is None, recipe
        assert tau_at_router_end(c)["tau_end"] <= 1.05 * float(c.tau_min), recipe


def test_the_distill_student_is_the_checkpoint_distill_will_load(tmp_path):
    """Defect 6: the distill rows size the model in `distill.student`, else the one `RUN/prune/latest.json`
    points at (read from its config.json), not a student derived from prune.* / budget; derived only when
    no such checkpoint exists yet."""
    from elastic.plan import distill_student, parent_config, plan_model

    parent = _parent_dir(tmp_path, "nemotron-nano-9b-v2.config.json")
    child = _parent_dir(tmp_path, "nemotron-3-nano-4b.config.json")
    four_b = Arch.from_config(json.loads((DATA / "nemotron-3-nano-4b.config.json").read_text())).num_params()
    cfg = _cfg("nemotron_9b_to_4b", parent, f"run_dir={tmp_path / 'run'}", "plan.mamba_path=kernel")
    derived = plan_rows(cfg, "distill")[0].student_params
    assert derived != four_b  # budget 0.4471's largest grid architecture, not NVIDIA's shape

    explicit = _cfg("nemotron_9b_to_4b", parent, f"run_dir={tmp_path / 'run'}", "plan.mamba_path=kernel",
                    f"distill.student={child}")
    assert {r.student_params for r in plan_rows(explicit, "distill")} == {four_b}
    assert plan_all(explicit)["student"]["source"].startswith("distill.student")

    latest = tmp_path / "run" / "prune" / "latest.json"
    latest.parent.mkdir(parents=True)
    latest.write_text(json.dumps({"name": "x", "path": str(child)}))
    assert {r.student_params for r in plan_rows(cfg, "distill")} == {four_b}
    pc = parent_config(cfg)
    _arch, src, config = distill_student(cfg, plan_model(pc).sizes(pc))
    assert "latest.json" in src and config["hidden_size"] == 3136

    gone = _cfg("nemotron_9b_to_4b", parent, f"run_dir={tmp_path / 'run'}", "plan.mamba_path=kernel",
                f"distill.student={tmp_path / 'not_yet'}")
    assert plan_rows(gone, "distill")[0].student_params == derived
