"""The elastic (masked) NemotronH against the physical slice: hard mask == slice, soft -> hard."""

import pytest
import torch

from elastic.arch import ArchError
from elastic.models.nemotron_h import Ranking, arch_of, make_arch, slice_model
from elastic.models.nemotron_h.masking import ElasticNemotronH
from elastic.router import Router
from elastic.search_space import Space
from tiny import tiny_model, tokens

PATTERN = "M-*M-M-"


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(PATTERN)
    arch = arch_of(model)
    ranking = Ranking.random(arch, torch.Generator().manual_seed(0))
    space = Space.build(arch, granularity={"hidden": 8, "ffn": 16}, max_width_prune=0.5, max_depth_prune=0.5, protect_kinds="*")
    return model, arch, ranking, space, ElasticNemotronH.from_parent(model, ranking, space, "*")


def random_indices(space, g):
    return {a: int(torch.randint(len(space.drops if a == "depth" else space.choices[a]), (1,), generator=g)) for a in ("hidden", "ffn", "mamba", "depth")}


def test_full_is_parent(setup):
    model, _, _, _, el = setup
    ids = tokens()
    el.set_full()
    torch.testing.assert_close(el(ids).logits, model(ids, use_cache=False).logits)


def test_hard_mask_equals_slice(setup):
    model, arch, ranking, space, el = setup
    ids = tokens()
    g = torch.Generator().manual_seed(1)
    seen_drop = False
    for _ in range(6):
        idx = random_indices(space, g)
        sub = el.arch_from_indices(idx)
        # the same architecture expressed on the parent: importance ranking, depth by dropping
        ref_arch = make_arch(arch, ranking, hidden_size=sub.hidden_size, intermediate_size=sub.intermediate_size,
                             mamba_num_heads=sub.mamba_num_heads, drop_layers=space.drops[idx["depth"]], protect_kinds="*")
        assert ref_arch == sub
        seen_drop |= sub.num_layers < arch.num_layers
        ref = slice_model(model, ref_arch, ranking)(ids, use_cache=False).logits
        el.set_arch(sub)
        torch.testing.assert_close(el(ids).logits, ref, rtol=1e-4, atol=1e-4)
        # extraction from the elastic weights is the same model too
        torch.testing.assert_close(el.extract(sub)(ids, use_cache=False).logits, ref, rtol=1e-4, atol=1e-4)
    el.set_full()
    assert seen_drop


def test_hard_mask_in_training_mode_with_grad(setup):
    """Straight-through one-hots (values 0/1 but with gradients) give the same function, and gradients flow."""
    model, arch, ranking, space, el = setup
    ids = tokens()
    idx = {"hidden": 1, "ffn": 0, "mamba": 0, "depth": len(space.drops) - 1}
    sub = el.arch_from_indices(idx)
    el.set_arch(sub)
    ref = el(ids).logits.detach()
    probs = {a: el.one_hot(a, i).requires_grad_(True) for a, i in idx.items()}
    el.set_probs(**probs)
    el.train()
    out = el(ids).logits
    el.eval()
    el.set_full()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probs.values())
    el.zero_grad()


def test_soft_masks_approach_hard_as_tau_goes_to_zero(setup):
    _, _, _, space, el = setup
    ids = tokens()
    router = Router([0.5, 1.0], space)
    torch.manual_seed(0)
    errs = []
    for tau in (1.0, 0.1, 0.01):
        g = torch.Generator().manual_seed(3)
        soft = router.sample(0.5, tau=tau, scale=1.0, generator=g)
        el.set_probs(**soft)
        out = el(ids).logits
        el.set_probs(**{a: el.one_hot(a, int(p.argmax())) for a, p in soft.items()})
        hard = el(ids).logits
        errs.append(float((out - hard).abs().max()))
    el.set_full()
    assert errs[0] > errs[-1] and errs[-1] < 1e-3, errs


def test_bad_spaces(setup):
    model, arch, _, space, _ = setup
    with pytest.raises(ArchError, match="n_groups"):
        ElasticNemotronH(slice_model(model, arch), Space(arch, space.choices | {"mamba": (3, 8)}, space.drops), torch.arange(arch.num_layers))
    with pytest.raises(ArchError, match="empty"):
        ElasticNemotronH(slice_model(model, arch), Space(arch, space.choices | {"hidden": ()}, space.drops), torch.arange(arch.num_layers))


def test_checkpointed_gradients_equal_plain_ones_under_soft_masks():
    """Activation checkpointing recomputes every block in backward AFTER `SearchModel.forward` has reset
    the masks; each block captured the (soft, router-sampled) masks it ran with, so the gradients of the
    model and of the router are the ones of the plain backward."""
    from omegaconf import OmegaConf

    from elastic.losses import hidden_states
    from elastic.models.nemotron_h import Ranking
    from elastic.run import CONF_DIR
    from elastic.stages.search import make_search_model

    model = tiny_model("M-*M-M-")
    c = OmegaConf.load(CONF_DIR / "search/default.yaml")
    c.steps, c.settle_share, c.full_model_share, c.hard_prob = 4, 0.0, 0.0, 0.0
    c.granularity.hidden, c.granularity.ffn = 16, 32
    ranking = Ranking.random(arch_of(model), torch.Generator().manual_seed(0))
    ids = tokens(vocab=model.config.vocab_size)
    with torch.no_grad():
        t_hidden = hidden_states(model, ids)
    grads, calls = [], []
    for ckpt in (False, True):
        sm = make_search_model(model, ranking, c, seed=0).train()
        sm.elastic.enable_activation_checkpointing(ckpt)
        mixer = sm.elastic.model.model.layers[0].mixer
        count = [0]
        inner = mixer.forward
        mixer.forward = lambda *a, _f=inner, **k: (count.__setitem__(0, count[0] + 1), _f(*a, **k))[1]
        out = sm(ids, 0, t_hidden, model.lm_head.weight)
        assert out.info["budget"] is not None  # a masked sub-network, not the full model
        (out.kd.loss + out.budget_loss).backward()
        calls.append(count[0])
        grads.append({n: p.grad.clone() for n, p in sm.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # the checkpointed run really recomputed the block in backward
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("router.") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
