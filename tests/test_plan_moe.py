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
