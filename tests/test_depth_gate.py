"""The search's depth gate under activation checkpointing keeps one tensor per layer: the block's input.

`family.gated_block_forward` computes ``x + g * (block(x) - x)``. Outside the checkpoint, the product kept
``block(x) - x`` for the gate's gradient in every layer through the whole forward: one more residual-sized
tensor per layer (8192 tokens of the 9B, bf16: 3.8 GiB over its 56 layers, measured by the plan's rehearsal).
"""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _search_model(pattern: str, checkpointing: bool):
    from omegaconf import OmegaConf

    from elastic.models.nemotron_h import Ranking, arch_of
    from elastic.run import CONF_DIR
    from elastic.stages.search import make_search_model

    model = tiny_model(pattern)
    c = OmegaConf.load(CONF_DIR / "search/default.yaml")
    # router steps drawing soft masks: every layer's gate carries a gradient (the case that kept block(x) - x)
    c.steps, c.settle_share, c.full_model_share, c.hard_prob = 4, 0.0, 0.0, 0.0
    c.max_depth_prune = 0.25
    c.granularity.hidden, c.granularity.ffn = 16, 32
    sm = make_search_model(model, Ranking.identity(arch_of(model)), c, seed=0).train()
    sm.elastic.enable_activation_checkpointing(checkpointing)
    return model, sm


def _kept_bytes(sm, ids) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for the backward of one forward of the masked model (distinct storages, so views
    and tensors saved twice count once), and the final hidden states."""
    from elastic.losses import hidden_states

    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    budget, hard, g = sm.plan(1, 0)
    probs = sm.router.sample(budget, tau=1.0, scale=1.0, hard=hard, generator=g)
    sm.elastic.set_probs(**probs)
    assert sm.elastic.state()["gates"].requires_grad
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hidden_states(sm.elastic.model, ids)
    sm.elastic.set_full()
    return sum(storages.values()), out


def test_checkpointed_gated_blocks_keep_only_their_input_per_layer():
    """With 4 more layers the forward keeps 4 more block inputs (batch x seq x hidden, fp32 here), nothing else:
    the gate's ``block(x) - x`` is recomputed in backward with the block, not kept."""
    ids = tokens(vocab=256)
    kept = {}
    for pattern in ("M-M-", "M-M-M-M-"):
        model, sm = _search_model(pattern, checkpointing=True)
        kept[len(pattern)], _ = _kept_bytes(sm, ids)
    block_input = ids.numel() * model.config.hidden_size * 4  # fp32 residual stream (the tiny model's dtype)
    # plus one fp32 scalar per layer: the gates vector the blocks read their gate from
    assert (kept[8] - kept[4]) / 4 == block_input + 4, (kept, block_input)


def test_the_gate_inside_the_checkpoint_changes_no_output_or_gradient():
    """Same outputs and the same gradients of the weights and of the router (through the gates) as without
    checkpointing, where the gate runs eagerly."""
    from elastic.losses import hidden_states

    ids = tokens(vocab=256)
    outs, grads = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        _, sm = _search_model("M-*M-M-", checkpointing=ckpt)
        budget, hard, g = sm.plan(1, 0)
        probs = sm.router.sample(budget, tau=1.0, scale=1.0, hard=hard, generator=g)
        sm.elastic.set_probs(**probs)
        out = hidden_states(sm.elastic.model, ids)
        sm.elastic.set_full()  # as SearchModel.forward does before the backward: the blocks captured their masks
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in sm.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("router.") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
