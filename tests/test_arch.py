"""`Arch` is the one source of sizes: exact parameter counts, invariants, config round trips."""

import json
from pathlib import Path

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from elastic.arch import ArchError
from elastic.models.nemotron_h import Arch

DATA = Path(__file__).parent / "data"
NANO_9B = json.loads((DATA / "nemotron-nano-9b-v2.config.json").read_text())
NANO_4B = json.loads((DATA / "nemotron-3-nano-4b.config.json").read_text())


def meta_params(cfg) -> int:
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("raw, expected", [(NANO_9B, 8_888_227_328), (NANO_4B, 3_973_556_832)])
def test_real_configs_param_count(raw, expected):
    arch = Arch.from_config(raw)
    assert arch.num_params() == expected
    assert meta_params(arch.to_config(NemotronHConfig(**raw))) == expected


def test_4b_is_the_9b_with_4b_sizes():
    parent_cfg = NemotronHConfig(**NANO_9B)
    parent = Arch.from_config(parent_cfg)
    child = parent.replace(
        hidden_size=3136, intermediate_size=12544, mamba_num_heads=96, pattern=NANO_4B["hybrid_override_pattern"], layers=()
    )
    cfg = child.to_config(parent_cfg)
    ref = NemotronHConfig(**NANO_4B)
    for key in ("hidden_size", "intermediate_size", "mamba_num_heads", "layers_block_type", "num_attention_heads",
                "num_key_value_heads", "head_dim", "mamba_head_dim", "n_groups", "ssm_state_size", "vocab_size"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert cfg.num_hidden_layers == 42
    assert Arch.from_config(cfg).num_params() == meta_params(cfg) == 3_973_556_832


def test_exported_config_has_no_stale_fields(tmp_path):
    parent_cfg = NemotronHConfig(**NANO_9B)
    child = Arch.from_config(parent_cfg).replace(mamba_num_heads=96, pattern="M-M*", layers=())
    child.to_config(parent_cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mamba_num_heads"] == 96 and saved["layers_block_type"] == ["linear_attention", "mlp", "linear_attention", "full_attention"]
    assert "hybrid_override_pattern" not in saved or saved["hybrid_override_pattern"] == "M-M*"
    assert Arch.from_config(saved).pattern == "M-M*"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mamba_num_heads=100), "multiple of n_groups"),
        (dict(num_attention_heads=30), "multiple of"),
        (dict(pattern="MXM", layers=()), "unknown layer kinds"),
        (dict(layers=(0, 0, 1)), "strictly increasing"),
        (dict(hidden_size=0), "positive"),
    ],
)
def test_invalid_archs_are_rejected(change, message):
    base = Arch.from_config(NANO_9B).replace(pattern="M*-", layers=())
    with pytest.raises(ArchError, match=message):
        base.replace(**change)


def test_check_within_parent():
    parent = Arch.from_config(NANO_9B)
    with pytest.raises(ArchError, match="exceeds"):
        parent.replace(hidden_size=5000).check_within(parent)
    with pytest.raises(ArchError, match="fixed"):
        parent.replace(n_groups=4).check_within(parent)
    with pytest.raises(ArchError, match="is '-' in the parent"):
        parent.replace(pattern="*", layers=(1,)).check_within(parent)


def test_memory_cost_of_the_4b():
    arch = Arch.from_config(NANO_4B)
    assert arch.kv_cache_bytes_per_token() == 16 * 1024  # 4 attention layers x 8 KV heads x 128 x (K, V) x bf16
    assert arch.memory_bytes(context=0) == 2 * arch.num_params() + arch.mamba_state_bytes()
    # 21 Mamba layers x (conv state 3 x conv_dim in bf16 + SSM state 96 x 80 x 128 in fp32)
    assert arch.mamba_state_bytes() == 21 * (3 * (96 * 80 + 2 * 8 * 128) * 2 + 96 * 80 * 128 * 4)
    assert arch.memory_bytes(context=1000, batch=2) - arch.memory_bytes(context=0, batch=2) == 2 * 1000 * 16 * 1024


def test_dict_round_trip():
    arch = Arch.from_config(NANO_4B)
    assert Arch.from_dict(json.loads(arch.to_json())) == arch
