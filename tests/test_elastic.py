"""The elastic (masked) NemotronH against the physical slice: hard mask == slice, soft -> hard."""

import pytest
import torch

from elastic.arch import ArchError
from elastic.models.nemotron_h import Ranking, arch_of, make_arch, slice_model
from elastic.models.nemotron_h_elastic import ElasticNemotronH, space_sizes
from elastic.router import Router
from elastic.search_space import Space
from tiny import tiny_model, tokens

PATTERN = "M-*M-M-"


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(PATTERN)
    arch = arch_of(model)
    ranking = Ranking.random(arch, torch.Generator().manual_seed(0))
    space = Space.build(arch, hidden_step=8, ffn_step=16, max_width_prune=0.5, max_depth_prune=0.5, protect_kinds="*")
    return model, arch, ranking, space, ElasticNemotronH.from_parent(model, ranking, space, "*")


def random_indices(space, g):
    return {a: int(torch.randint(len(space_sizes(space, a)), (1,), generator=g)) for a in ("hidden", "ffn", "mamba", "depth")}


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
        ElasticNemotronH(slice_model(model, arch), Space(arch, space.hidden, space.ffn, (3, 8), space.drops), torch.arange(arch.num_layers))
    with pytest.raises(ArchError, match="empty"):
        ElasticNemotronH(slice_model(model, arch), Space(arch, (), space.ffn, space.mamba_heads, space.drops), torch.arange(arch.num_layers))
