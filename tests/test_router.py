"""Router: differentiable cost == Arch counts at one-hot, interpolation, budget loss band, schedule."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from elastic.arch import ArchError
from elastic.models.nemotron_h import Ranking, arch_of
from elastic.models.nemotron_h.masking import ElasticNemotronH
from elastic.router import Cost, Router, Schedule, budget_loss, check_budgets
from elastic.search_space import Space
from tiny import tiny_model


@pytest.fixture(scope="module")
def el():
    model = tiny_model("M-*M-M-")
    arch = arch_of(model)
    space = Space.build(arch, granularity={"hidden": 16, "ffn": 32}, max_width_prune=0.5, max_depth_prune=0.5, protect_kinds="*")
    return ElasticNemotronH.from_parent(model, Ranking.random(arch, torch.Generator().manual_seed(0)), space, "*")


def independent(arch, resource, el_config):
    """The resource from the model the sizes describe, not from the closed form."""
    from transformers import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(arch.to_config(el_config))
    n = sum(p.numel() for p in model.parameters())
    return n if resource == "params" else n - model.get_input_embeddings().weight.numel() * (1 if arch.tie_word_embeddings else 2)


@pytest.mark.parametrize("resource", ["params", "non_embedding_params", "memory"])
def test_cost_matches_arch_at_one_hot(el, resource):
    cost = Cost(el.space, el.kept_layers, resource, context=1000, batch=3)
    axes = ("hidden", "ffn", "mamba", "depth")
    for combo in itertools.product(*(range(len(el.choices(a))) for a in axes)):
        idx = dict(zip(axes, combo))
        probs = {a: F.one_hot(torch.tensor(i), len(el.choices(a))).double() for a, i in idx.items()}
        arch = el.arch_from_indices(idx)
        want = {"params": arch.num_params(), "non_embedding_params": arch.non_embedding_params(),
                "memory": arch.memory_bytes(1000, 3)}[resource]
        assert float(cost.expected(probs)) == want == cost.of_arch(arch)
        if resource != "memory" and combo[-1] == 0 and combo[1] == 0:  # a few checked against the built model
            assert want == independent(arch, resource, el.model.config)
    assert cost.full == cost.of_arch(el.arch)


def test_cost_is_differentiable(el):
    cost = Cost(el.space, el.kept_layers, "params")
    logits = {a: torch.zeros(len(el.choices(a)), requires_grad=True) for a in ("hidden", "ffn", "mamba", "depth")}
    c = cost.expected({a: l.softmax(-1) for a, l in logits.items()})
    c.backward()
    assert all(l.grad.abs().sum() > 0 for l in logits.values())


def test_interpolation_and_bad_budgets(el):
    r = Router([0.5, 0.7, 1.0], el.space)
    assert r.budget_input(0.7).tolist() == [0, 1, 0]
    torch.testing.assert_close(r.budget_input(0.6), torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(r.budget_input(0.9), torch.tensor([0.0, 1 / 3, 2 / 3]))
    with pytest.raises(ArchError, match="outside"):
        r.budget_input(0.3)
    for bad in ([0.0, 0.5], [1.2], [], [0.5, 0.5]):
        with pytest.raises(ArchError):
            check_budgets(bad)
    # architecture: two layers + LeakyReLU(0.1), hidden 256, output std ~0.1
    net = r.routers["hidden"].net
    assert net[0].out_features == 256 and net[1].negative_slope == 0.1
    assert 0.07 < float(net[2].weight.std()) < 0.13


def test_budget_loss_band():
    full = 1000.0
    for c, want in ((500.0, 0.0), (520.0, 0.0), (480.0, 0.0), (560.0, 0.12), (400.0, 0.2)):
        loss, ratio = budget_loss(torch.tensor(c), 0.5, full, band=0.05)
        assert float(loss) == pytest.approx(want)
        assert float(ratio) == pytest.approx(c / 500)


def test_schedule():
    s = Schedule(total_steps=101)
    assert s.tau(0) == 1.0 and s.tau(100) == pytest.approx(0.05) and s.tau(1000) == 0.05
    assert s.scale(0) == 1.0 and s.scale(100) == pytest.approx(10.0) and s.scale(50) == pytest.approx(5.5)
    assert Schedule(total_steps=10, decay=0.9999).tau(10) == pytest.approx(0.9999**10)
    with pytest.raises(ArchError):
        Schedule(total_steps=10, tau_min=2.0)


def test_hard_sample_is_one_hot_with_gradient(el):
    r = Router([0.5, 1.0], el.space)
    out = r.sample(0.5, tau=0.5, scale=2.0, hard=True, generator=torch.Generator().manual_seed(0))
    for p in out.values():
        assert sorted(p.detach().unique().tolist()) in ([0.0, 1.0], [1.0])
    sum(p @ torch.arange(p.numel(), dtype=p.dtype) for p in out.values()).backward()
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in r.parameters())
