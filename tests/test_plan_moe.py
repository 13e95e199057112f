"""The MoE NemotronH parent (NVIDIA-Nemotron-3-Nano-30B-A3B, issue #22): its parameter counts by hand, and the
plan of the `nemotron3_nano_30b_a3b` recipe from its config.json alone.

The hand count below is written out term by term from transformers' NemotronH modules (5.x):
``NemotronHMamba2Mixer``, ``NemotronHAttention``, and ``NemotronHMoE`` = ``NemotronHTopkRouter`` (``gate``: a
``[E, h]`` fp32 weight and the ``e_score_correction_bias`` buffer) + ``NemotronHExperts`` (3-D ``up_proj``
``[E, f, h]`` and ``down_proj`` ``[E, h, f]``: relu2 experts have no gate projection) + ``shared_experts``
(a ``NemotronHMLP`` of width ``moe_shared_expert_intermediate_size``). It is compared with the family's closed
form (`Sizes.num_params` / `Sizes.active_params`) and with the model transformers builds on the meta device.

The router's ``e_score_correction_bias`` is counted, as issue #22's contract says (total and active both include
it); transformers holds it as a buffer, so the built model's ``parameters()`` are 128 per MoE layer fewer
(31,577,937,344: ``num_parameters()``, the model card's "31.6B") and the comparisons add the buffers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_rehearse import _folder  # a folder holding one config.json

DATA = Path(__file__).parent / "data"
CONFIG = json.loads((DATA / "nemotron-3-nano-30b-a3b.config.json").read_text())


def _sizes(config: dict):
    from elastic.models import family_for

    return family_for(config).Sizes.from_config(config)


def _counted(model) -> int:
    """The built model's parameters plus its routers' correction biases (buffers; counted by the contract)."""
    return (sum(p.numel() for p in model.parameters())
            + sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")))


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in config.items() if k != "transformers_version"}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**d))


# ------------------------------------------------------------------------------------------------ the hand count


def hand_count() -> dict[str, int]:
    """Total and active parameters of the 30B-A3B, term by term (the numbers of its config.json)."""
    h, vocab = 2688, 131072
    pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    n_m, n_e, n_a = pattern.count("M"), pattern.count("E"), pattern.count("*")
    assert (n_m, n_e, n_a) == (23, 23, 6)

    embedding = vocab * h  # model.embeddings
    lm_head = vocab * h  # tie_word_embeddings false: its own matrix
    norm_f = h

    # Mamba-2: 64 heads x 64 head_dim, 8 groups, state 128, conv kernel 4, no in/out bias, conv bias
    heads, head_dim, groups, state, kernel = 64, 64, 8, 128, 4
    inner = heads * head_dim  # 4096
    conv_dim = inner + 2 * groups * state  # x | B | C = 6144
    mamba = (
        h  # block RMSNorm
        + h * (inner + conv_dim + heads)  # in_proj -> [z | xBC | dt] = 2688 x 10304
        + conv_dim * kernel  # conv1d weight (depthwise, [6144, 1, 4])
        + conv_dim  # conv1d bias
        + heads  # dt_bias
        + heads  # A_log
        + heads  # D
        + inner  # gated RMSNorm weight
        + inner * h  # out_proj
    )

    # attention: 32 query heads, 2 KV heads, head_dim 128, no bias
    q, kv = 32 * 128, 2 * 128
    attention = h + h * q + h * kv + h * kv + q * h  # norm, q, k, v, o

    # MoE: 128 routed experts of width 1856 (relu2: up + down, no gate proj), 6 per token, 1 shared expert of 3712
    experts, top_k, f, shared_f = 128, 6, 1856, 3712
    gate = experts * h  # router weight [128, 2688]
    correction_bias = experts  # e_score_correction_bias [128] (an nn.Buffer in transformers; counted, see the docstring)
    one_expert = f * h + h * f  # up_proj[e] + down_proj[e]
    shared = shared_f * h + h * shared_f  # shared_experts.up_proj + down_proj
    moe_norm = h
    moe_total = moe_norm + gate + correction_bias + experts * one_expert + shared
    moe_active = moe_norm + gate + correction_bias + top_k * one_expert + shared

    fixed = embedding + lm_head + norm_f + n_m * mamba + n_a * attention
    return {
        "embedding": embedding, "mamba": mamba, "attention": attention, "moe": moe_total, "moe_active": moe_active,
        "correction_bias": n_e * correction_bias,
        "total": fixed + n_e * moe_total,
        "active": fixed + n_e * moe_active,
    }


def test_hand_count_of_the_30b_a3b():
    c = hand_count()
    assert c["mamba"] == 38_744_896 and c["attention"] == 23_399_040
    assert c["moe"] == 1_297_468_160 and c["moe_active"] == 80_169_728
    assert c["total"] == 31_577_940_288  # the model card's "31.6B" (31,577,937,344 parameters + 2,944 bias entries)
    assert c["active"] == 3_580_076_352  # 3.58B with both vocabulary matrices: Model Optimizer's "A3.6B" / "3.58B"
    # the card's "3.2B active" leaves the input embedding out (a lookup, no FLOPs): 3.23B
    assert c["active"] - c["embedding"] == 3_227_754_816


def test_family_closed_form_equals_the_hand_count():
    """`Sizes.num_params` / `active_params` (the one closed form of moe-core) on the real config."""
    s = _sizes(CONFIG)
    c = hand_count()
    assert s.num_params() == c["total"]
    assert s.active_params() == c["active"]
    assert s.layer_params("E") == c["moe"] and s.layer_params("M") == c["mamba"] and s.layer_params("*") == c["attention"]


def test_meta_model_of_the_real_config_has_the_hand_count():
    """transformers' own model of the config.json (meta device: no memory) holds exactly the counted parameters;
    the routed experts' share gives the active count a second way."""
    model = _meta_model(CONFIG)
    c = hand_count()
    total = _counted(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(p.numel() for p in model.parameters()) == 31_577_937_344 == c["total"] - c["correction_bias"]
    assert total == c["total"]
    assert total - routed * (128 - 6) // 128 == c["active"]


@pytest.mark.parametrize("overrides", [
    {"hybrid_override_pattern": "ME*EM", "n_routed_experts": 16, "moe_intermediate_size": 256,
     "moe_shared_expert_intermediate_size": 384, "num_experts_per_tok": 4, "hidden_size": 512, "vocab_size": 1000},
    {"hybrid_override_pattern": "MEM*E", "n_routed_experts": 64, "num_experts_per_tok": 6},
], ids=["shrunk", "64-experts"])
def test_closed_form_equals_a_built_model_of_a_shrunken_copy(overrides):
    """A different expert count, widths and depth: the closed form still equals the built model (meta device)."""
    config = CONFIG | overrides | {"num_hidden_layers": len(overrides["hybrid_override_pattern"])}
    model = _meta_model(config)
    s = _sizes(config)
    total = _counted(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    e, k = config["n_routed_experts"], config["num_experts_per_tok"]
    assert s.num_params() == total
    assert s.active_params() == total - routed * (e - k) // e


def test_the_rehearsal_builds_the_fp32_student_in_fp32_whatever_the_config_says():
    """A hub config.json names its dtype (``torch_dtype: bfloat16``); ``from_config`` builds in it unless told,
    which rehearsed the stages' fp32 student in bf16 -- and, with the MoE router built fp32 regardless, gave
    FSDP2 a block of mixed dtypes it refuses."""
    import torch

    from elastic.rehearse import _build_meta, _hf_config

    config = CONFIG | {"hybrid_override_pattern": "ME*", "num_hidden_layers": 3}
    assert {p.dtype for p in _build_meta(_hf_config(config), torch.float32).parameters()} == {torch.float32}
    teacher = {n: p.dtype for n, p in _build_meta(_hf_config(config), torch.bfloat16).named_parameters()}
    assert {n for n, d in teacher.items() if d != torch.bfloat16} == {"model.layers.1.mixer.gate.weight"}  # transformers' own choice


# ------------------------------------------------------------------------------------------------ the plan


def _cfg(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from elastic.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["recipe=nemotron3_nano_30b_a3b", f"run_dir={tmp_path / 'run'}",
                                            "data.files=/x", "data.heldout_files=/y", *overrides])


def test_plan_of_the_30b_recipe_from_config_json_alone(tmp_path, capsys):
    """`stage=plan` on 8 x 80 GB from a folder holding only config.json: every row, the experts sharded like any
    parameter, the student sized by active parameters, FLOPs from active parameters; what does not fit is refused
    naming the term (the elastic 31.6B parent's AdamW state does not fit 8 GPUs beside the teacher), 16 GPUs fit."""
    from elastic.plan import GiB, PlanError
    from elastic.rundir import RunDir
    from elastic.stages import plan as stage

    parent = _folder(tmp_path, "a3b", CONFIG)
    cfg = _cfg(tmp_path, f"parent.path={parent}", "plan.gpus=8", "plan.mamba_path=kernel")
    with pytest.raises(PlanError, match=r"^search: optimizer .* overflow 80 GiB per GPU .* raise plan.gpus"):
        stage.run(cfg, RunDir(cfg.run_dir))
    out = capsys.readouterr().out
    doc = json.loads((Path(cfg.run_dir) / "plan" / "plan.json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == {"importance", "search", "distill phase1", "distill phase2"}
    c = hand_count()
    assert doc["teacher"] == doc["teacher"] | {"params": c["total"], "active_params": c["active"]}
    search = rows["search"]
    assert search["strategy"] == "fsdp" and search["teacher_mode"] == "shard"
    # every expert is a parameter like any other: fp32 weights, gradients and AdamW's two moments, all / 8
    for term, per_param in (("parameters", 4), ("gradients", 4), ("optimizer", 8)):
        assert search["terms"][term]["bytes"] == per_param * c["total"] // 8
    # the student: at most the searched 0.838 of the active parameters (3.0B), within the router's band
    student = rows["distill phase1"]
    assert 0.95 * 0.838 * c["active"] <= student["student_active_params"] <= 0.838 * c["active"]
    assert student["student_params"] > 6 * student["student_active_params"]  # a MoE: most experts idle per token
    # FLOPs per token follow the active parameters (~8 x for a checkpointed student step + the teacher's 2 x),
    # not the total (10 x more)
    for r in (search, student):
        assert r["flops_per_token"] < 12 * r["student_active_params"] < r["student_params"] * 2
    assert "distill phase2" in out and "GPU-hours" in out
    assert not search["fits"] and rows["importance"]["fits"] and student["fits"]
    assert doc["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in rows.values()))

    from elastic.plan import plan_all

    sixteen = plan_all(_cfg(tmp_path, f"parent.path={parent}", "plan.gpus=16", "plan.mamba_path=kernel"))
    assert sixteen["fits"], [r.refusal() for r in sixteen["_rows"] if not r.fits]
    assert all(r["peak_gib"] < 74 for r in sixteen["rows"]) and max(r["peak_gib"] for r in sixteen["rows"]) > 40
    assert sixteen["rows"][1]["terms"]["optimizer"]["bytes"] == 8 * c["total"] // 16
    assert sixteen["gpu_hours"] == pytest.approx(doc["gpu_hours"])  # GPU-hours do not depend on the GPU count
    assert GiB


def _moe_row(config: dict, *, checkpointing: bool = False):
    from elastic.models import family_for
    from elastic.plan import Shape, plan_training

    s = family_for(config).Sizes.from_config(config)
    return plan_training("t", "distill", s, s, shape=Shape(1, 4096), batch_size=16, steps=1, world_size=8,
                         gpu_memory_bytes=80 * 2**30, reserve_bytes=0, strategy="fsdp", teacher_mode="shard",
                         path="kernel", chunk=128, teacher_chunk=128, checkpointing=checkpointing, loss_chunk=1024,
                         elastic=False, peak_tflops=989, mfu=0.35, keys={}), s


def test_moe_memory_terms_scale_as_designed():
    """Doubling the routed experts doubles the expert weights' bytes (sharded like every parameter) but adds to the
    activations only the router's per-expert columns, and nothing to the FLOPs but the router's matmul; doubling
    top-k doubles the routed experts' activations and their FLOPs, not the weights."""
    import elastic.models.nemotron_h.plan as pm

    small = {"hybrid_override_pattern": "MEM*E", "num_hidden_layers": 5}
    base, s1 = _moe_row(CONFIG | small)
    wide, s2 = _moe_row(CONFIG | small | {"n_routed_experts": 256})
    deep, s3 = _moe_row(CONFIG | small | {"num_experts_per_tok": 12})
    h, f, n_e = 2688, 1856, 2
    tokens = 4096

    def term(r, name):
        return r.term(name).bytes

    expert_weights = n_e * 128 * 2 * h * f  # the routed experts' up + down of 128 experts
    router = n_e * 128 * (h + 1)  # gate rows and correction bias of 128 experts
    assert s2.num_params() - s1.num_params() == expert_weights + router
    assert term(wide, "parameters") - term(base, "parameters") == pytest.approx(4 * (expert_weights + router) / 8)
    # activations: only the router's sigmoid output (bf16) and group mask (1 byte) per expert, per MoE layer
    assert term(wide, "activations") - term(base, "activations") == pytest.approx(tokens * n_e * 128 * (2 + 1))
    assert term(wide, "activations") < 1.01 * term(base, "activations")
    # FLOPs: the router's matmul grows, the experts' do not (top-k fixed)
    assert wide.flops_per_token < 1.01 * base.flops_per_token
    assert s2.active_params() - s1.active_params() == router
    # top-k 6 -> 12: the routed rows double, the weights stay
    assert s3.num_params() == s1.num_params()
    e1 = pm.moe_terms(s1, residual=2)["experts"]
    assert pm.moe_terms(s3, residual=2)["experts"] == 2 * e1
    assert pm.moe_terms(s2, residual=2)["experts"] == e1
    assert deep.flops_per_token - base.flops_per_token == pytest.approx(
        (3 * 2 + 2) * n_e * 6 * 2 * h * f)  # student fwd + bwd (3 x 2 FLOPs per weight) and the teacher's forward


def test_moe_block_dominates_fsdp_gathering_but_alternates():
    """FSDP2 gathers a whole MoE block (all its experts: no expert parallelism); two neighbouring blocks are in
    flight, and in the 30B's M E M E pattern that is one MoE block and one Mamba block, not two MoE blocks."""
    from elastic.plan import _block_pair_max

    s = _sizes(CONFIG)
    c = hand_count()
    assert _block_pair_max(s) == c["moe"] + c["mamba"]
    row, _ = _moe_row(CONFIG)
    root = 2 * c["embedding"] + 2688
    assert row.term("fsdp_gathered").bytes == 2 * (c["moe"] + c["mamba"] + root) + 4 * c["moe"]
    # the sharded teacher keeps its shards and root; its two gathered blocks only during its forward
    assert row.term("teacher").bytes == pytest.approx(2 * c["total"] / 8 + 2 * root)
    assert row.grad_accum == 2  # the optimizer step then holds only the fixed state
    assert row.phases["teacher forward"] - row.phases["optimizer step"] > 2 * (c["moe"] + c["mamba"]) - 1


def test_reduced_depth_rehearsal_of_the_30b_recipe_distill_at_world_size_8(tmp_path):
    """transformers' MoE modules run under FakeTensorMode and a fake process group of 8 ranks (the experts' default
    grouped_mm path has static shapes): each distill phase of the recipe, at the real widths of the 30B teacher and
    a 3.0B-active student (Model Optimizer's best: hidden 2304, 104 experts, shared 3072), one MoE / Mamba / MoE /
    attention block, the recipe's 8K and 32K contexts. The plan is within 20% of the rehearsal (measured: +15% at
    8K, where the plan's loss phase counts gathered blocks already resharded, -2% at 32K)."""
    from elastic.plan import plan_rows
    from elastic.rehearse import rehearse_rows

    pattern = {"hybrid_override_pattern": "EME*", "num_hidden_layers": 4}
    parent = _folder(tmp_path, "p", CONFIG | pattern)
    student = _folder(tmp_path, "s", CONFIG | pattern | {"hidden_size": 2304, "n_routed_experts": 104,
                                                          "moe_shared_expert_intermediate_size": 3072})
    cfg = _cfg(tmp_path, f"parent.path={parent}", f"distill.student={student}", "plan.gpus=8", "plan.mamba_path=torch",
               "parallel.strategy=fsdp", "parallel.teacher=shard")
    rows = plan_rows(cfg, "distill")
    measured = rehearse_rows(cfg, rows, log=lambda *a: None)
    for r in rows:
        m = measured[r.row]
        assert m.world_size == 8 and m.strategy == "fsdp"
        assert m.by_category["sharded_param"] == pytest.approx(r.term("parameters").bytes, rel=1e-3)
        assert m.by_category["optstate"] == pytest.approx(r.term("optimizer").bytes, rel=1e-3)
        # the prefetched MoE block: all 104 experts of the student gathered in bf16
        assert m.by_category["all_gather"] == pytest.approx(2 * _sizes(json.loads((student / "config.json").read_text()))
                                                            .layer_params("E"), rel=0.02)
        ratio = r.peak_bytes / m.peak_bytes
        assert abs(ratio - 1) <= 0.2, f"{r.row}: plan {r.peak_bytes / 2**30:.2f} vs rehearsal {m.peak_gib:.2f} GiB"


def test_plan_rehearse_traces_the_moe_recipe_search_row(tmp_path):
    """`stage=plan plan.rehearse=true` on the MoE recipe (reduced depth, the real widths, 8 ranks of FSDP) rehearses
    every training row, the search included: its masked MoE router has static shapes (the union of the expert
    choices' top-k sets at the fixed width min(E, top_k x choices)), so fake tensors run it. The search row's
    sharded training state is the plan's and its peak is within the dense tests' 15% of the plan's."""
    from elastic.rundir import RunDir
    from elastic.stages import plan as stage

    pattern = {"hybrid_override_pattern": "ME*", "num_hidden_layers": 3}
    parent = _folder(tmp_path, "p", CONFIG | pattern)
    cfg = _cfg(tmp_path, f"parent.path={parent}", "plan.rehearse=true", "plan.gpus=8", "plan.mamba_path=torch",
               "parallel.strategy=fsdp")
    stage.run(cfg, RunDir(cfg.run_dir))
    doc = json.loads((Path(cfg.run_dir) / "plan" / "plan.json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    for name in ("search", "distill phase1", "distill phase2"):
        assert rows[name]["rehearsal_peak_gib"] is not None, name
    search = rows["search"]
    cats = search["rehearsal"]["by_category_gib"]
    assert search["rehearsal"]["world_size"] == 8 and search["rehearsal"]["strategy"] == "fsdp"
    assert cats["sharded_param"] == pytest.approx(search["terms"]["parameters"]["gib"], abs=0.01)
    assert cats["optstate"] == pytest.approx(search["terms"]["optimizer"]["gib"], abs=0.01)
    ratio = search["peak_gib"] / search["rehearsal_peak_gib"]
    assert abs(ratio - 1) <= 0.15, f"search: plan {search['peak_gib']} vs rehearsal {search['rehearsal_peak_gib']} GiB"
