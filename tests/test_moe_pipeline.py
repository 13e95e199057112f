"""Every stage on a tiny MoE NemotronH (layer type "moe": routed experts as 3-D tensors, a shared expert, a
sigmoid router), from the same entry point as the dense toy; exports load with plain `from_pretrained`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny import MOE, save_tiny_moe, tiny_moe_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_moe_runs_trains_generates_and_round_trips(tmp_path):
    model = tiny_moe_model()
    moe = [l.mixer for l in model.model.layers if l.block_type == "moe"]
    assert len(moe) == 3 and {l.block_type for l in model.model.layers} == {"linear_attention", "moe", "full_attention", "mlp"}
    assert moe[0].experts.up_proj.shape == (MOE["n_routed_experts"], MOE["moe_intermediate_size"], 64)
    ids = tokens(batch=4, length=32)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    # top-2 of 8 over 128 tokens: every expert of every MoE layer gets tokens, hence a gradient
    for m in moe:
        assert (m.experts.up_proj.grad.flatten(1).abs().sum(1) > 0).all()
        assert m.gate.weight.grad.abs().sum() > 0 and m.shared_experts.up_proj.weight.grad.abs().sum() > 0
    assert model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model.eval()(ids).logits)
