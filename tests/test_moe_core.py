"""MoE NemotronH (pattern letter ``E``): sizes and active parameters against built models, the slice, the
masked forward (hard mask == slice, soft mask == mixture over choices), the importance hooks."""

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from elastic.arch import ArchError
from elastic.importance import width_scores
from elastic.models.nemotron_h import Ranking, Sizes, arch_of, make_arch, slice_model
from elastic.models.nemotron_h.masking import ElasticNemotronH
from elastic.models.nemotron_h.surgery import expert_scores
from elastic.router import Cost
from elastic.search_space import Space
from tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"M": "linear_attention", "-": "mlp", "*": "full_attention", "E": "moe"}
PATTERN = "ME*E-"


def moe_model(pattern: str = PATTERN, seed: int = 0, **overrides) -> NemotronHForCausalLM:
    """A tiny MoE NemotronH whose routing is not uniform: router weights, correction biases and norms perturbed."""
    kw = dict(n_routed_experts=8, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, num_experts_per_tok=2,
              routed_scaling_factor=2.5, layers_block_type=[KINDS[c] for c in pattern])
    kw.update(overrides)
    model = tiny_model(seed=seed, **kw)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("gate.weight", "e_score_correction_bias")):
                t.add_(0.5 * torch.randn_like(t))
    return model


def stored(model) -> int:
    """Every tensor of the checkpoint: parameters (a tied one once) and the routers' correction biases (buffers)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("pattern,overrides", [
    (PATTERN, {}),
    ("EE", {"n_routed_experts": 4, "moe_intermediate_size": 24}),
    ("M*E", {"mlp_bias": True, "n_routed_experts": 6, "num_experts_per_tok": 3}),
    ("EME", {"n_group": 2, "topk_group": 1, "n_routed_experts": 8}),
])
def test_params_and_active_params_of_built_models(pattern, overrides):
    model = moe_model(pattern, **overrides)
    arch = arch_of(model)
    assert arch.num_params() == stored(model)
    # active: what one token's forward reads -- every tensor but the routed experts the router did not pick for it
    picked = []
    hooks = [b.mixer.gate.register_forward_hook(lambda _m, _i, out: picked.append(out[2]))
             for b in model.model.layers if b.block_type == "moe"]
    model(tokens(batch=1, length=1), use_cache=False)
    for h in hooks:
        h.remove()
    unused = 0
    for block, idx in zip([b for b in model.model.layers if b.block_type == "moe"], picked):
        ex = block.mixer.experts
        per_expert = ex.up_proj[0].numel() + ex.down_proj[0].numel()
        unused += (ex.num_experts - idx.unique().numel()) * per_expert
    assert arch.active_params() == stored(model) - unused
    assert arch.active_params() < arch.num_params()
    # children: the closed form against the sliced model
    g = torch.Generator().manual_seed(0)
    ranking = Ranking.random(arch, g)
    fewest = max(arch.num_experts_per_tok, 2 * arch.n_group)
    fewest += -fewest % arch.n_group
    fe, fs = arch.moe_intermediate_size, arch.moe_shared_expert_intermediate_size
    for e, fe, fs, h in [(fewest, fe // 2, fs // 2, 32), (arch.n_routed_experts - arch.n_group, fe, fs, 64),
                         (arch.n_routed_experts, 8, 8, 48)]:
        child = make_arch(arch, ranking, hidden_size=h, n_routed_experts=e, moe_intermediate_size=fe,
                          moe_shared_expert_intermediate_size=fs)
        sliced = slice_model(model, child, ranking)
        assert child.num_params() == stored(sliced)
        assert arch_of(sliced) == child.replace(layers=())
        assert sliced.config.n_routed_experts == e and sliced.config.moe_intermediate_size == fe


def test_dense_sizes_unchanged():
    """A dense parent: no MoE axes, no MoE fields in its record, the parent config's MoE keys left as they were."""
    model = tiny_model("M-*M-", n_routed_experts=5, moe_intermediate_size=3)
    arch = arch_of(model)
    assert [a.name for a in arch.axes()] == ["hidden", "ffn", "mamba"]
    assert not set(arch.to_dict()) & set(Sizes.MOE_FIELDS)
    assert Sizes.from_dict(arch.to_dict()) == arch
    assert arch.active_params() == arch.num_params() == sum(p.numel() for p in model.parameters())
    child = make_arch(arch, hidden_size=32, intermediate_size=48)
    cfg = child.to_config(model.config)
    assert (cfg.n_routed_experts, cfg.moe_intermediate_size) == (5, 3)
    assert set(Space.build(arch).choices) == {"hidden", "ffn", "mamba"}


def test_refusals():
    arch = arch_of(moe_model())
    with pytest.raises(ArchError, match="fewer than num_experts_per_tok=2"):
        make_arch(arch, n_routed_experts=1)
    with pytest.raises(ArchError, match="moe_latent_size"):
        arch.replace(moe_latent_size=16)
    space = Space.build(arch).with_choices({"experts": [1, 8]})
    with pytest.raises(ArchError, match="fewer than num_experts_per_tok"):
        ElasticNemotronH.from_parent(moe_model(), Ranking.identity(arch), space)
    assert not arch.allows({"experts": 1}) and arch.allows({"experts": 2})


def test_to_config_round_trip():
    model = moe_model(routed_scaling_factor=2.5, norm_topk_prob=False)
    arch = arch_of(model)
    child = make_arch(arch, n_routed_experts=4, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24)
    cfg = child.to_config(model.config)
    assert (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size) == (4, 16, 24)
    assert (cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob) == (2, 2.5, False)
    assert Sizes.from_config(cfg) == child.replace(layers=())
    assert Sizes.from_dict(child.to_dict()) == child


# ------------------------------------------------------------------------------------------------ masked == sliced


@pytest.fixture(scope="module")
def elastic_setup():
    model = moe_model("ME*E-E", n_group=2, topk_group=1)
    arch = arch_of(model)
    ranking = Ranking.random(arch, torch.Generator().manual_seed(0))
    space = Space.build(arch, granularity={"hidden": 16, "ffn": 32, "moe_ffn": 8, "shared_ffn": 16},
                        max_width_prune=0.5, max_depth_prune=0.4, protect_kinds="*")
    assert space.choices["experts"] == (4, 6, 8) and len(space.choices["moe_ffn"]) > 1 and len(space.drops) > 1
    return model, arch, ranking, space, ElasticNemotronH.from_parent(model, ranking, space, "*")


def test_full_is_parent(elastic_setup):
    model, arch, _, space, el = elastic_setup
    ids = tokens()
    parent = model(ids, use_cache=False).logits
    el.set_full()
    torch.testing.assert_close(el(ids).logits, parent)
    el.set_arch(arch)  # the one-hot masks of the full architecture
    torch.testing.assert_close(el(ids).logits, parent, rtol=1e-4, atol=1e-4)
    el.set_full()


def test_hard_mask_equals_slice(elastic_setup):
    model, arch, ranking, space, el = elastic_setup
    ids = tokens()
    cuts = [dict(experts=4), dict(experts=6, moe_ffn=16, shared_ffn=32),
            dict(experts=4, moe_ffn=24, shared_ffn=32, hidden=32, mamba=4, depth=2),
            dict(hidden=48, depth=1)]
    for cut in cuts:
        sizes = {a: cut.get(a, arch.axis_size(a)) for a in space.choices}
        idx = {a: space.choices[a].index(v) for a, v in sizes.items()} | {"depth": space.drops.index(cut.get("depth", 0))}
        sub = el.arch_from_indices(idx)
        ref_arch = make_arch(arch, ranking, hidden_size=sizes["hidden"], mamba_num_heads=sizes["mamba"],
                             n_routed_experts=sizes["experts"], moe_intermediate_size=sizes["moe_ffn"],
                             moe_shared_expert_intermediate_size=sizes["shared_ffn"], drop_layers=cut.get("depth", 0),
                             protect_kinds="*")
        assert ref_arch == sub
        ref = slice_model(model, ref_arch, ranking)(ids, use_cache=False).logits
        el.set_arch(sub)
        torch.testing.assert_close(el(ids).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(el.extract(sub)(ids, use_cache=False).logits, ref, rtol=1e-4, atol=1e-4)
        # straight-through one-hots (values 0/1, with gradients): every choice is routed, same function
        probs = {a: (el.one_hot(a, i).requires_grad_() * 1.0) for a, i in el.choice_indices(sub).items()}
        el.set_probs(**probs)
        torch.testing.assert_close(el(ids).logits, ref, rtol=1e-4, atol=1e-4)
    el.set_full()


def test_soft_experts_mask_is_the_mixture_over_choices_and_differentiable(elastic_setup):
    """One MoE layer under soft expert probabilities = sum_j p_j * (the layer with choice j), and the router gets
    a gradient: the mixture is exact because the experts' output is linear in the routing weights."""
    _, arch, _, space, el = elastic_setup
    mixer = next(b.mixer for b in el.model.model.layers if b.block_type == "moe")
    x = torch.randn(2, 7, arch.hidden_size, generator=torch.Generator().manual_seed(3))
    p = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    el.set_probs(experts=p)
    soft = mixer(x)
    per_choice = []
    for j in range(len(p)):
        el.set_probs(experts=el.one_hot("experts", j))
        per_choice.append(mixer(x))
    el.set_full()
    torch.testing.assert_close(soft, sum(p[j].detach() * per_choice[j] for j in range(len(p))), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(soft.square().sum(), p)
    assert g.abs().min() > 0



class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reads a tensor's value back on the host (``item`` / ``tolist`` / ``int(t)`` all
    dispatch ``_local_scalar_dense``; ``nonzero`` sizes its output by values): a sync on a GPU, and what fake
    tensors (the plan's rehearsal) cannot run."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_the_masked_forward_reads_no_value_on_the_host(elastic_setup):
    """The search's draws (soft and straight-through probabilities with gradients, every axis) and a hard
    architecture set by its indices run forward and backward reading no tensor value back beyond what the plain
    parent's forward reads (transformers' mask code checks for packed sequences when given no attention mask):
    the MoE router's union of the choices' top-k sets has a width fixed by the configuration, min(E, top_k x
    choices)."""
    _, arch, _, space, el = elastic_setup
    ids = tokens()
    g = torch.Generator().manual_seed(5)
    soft = {a: torch.softmax(torch.randn(len(el.choices(a)), generator=g), 0).requires_grad_() for a in el.axes}
    straight = {a: el.one_hot(a, i).requires_grad_() * 1.0 for a, i in enumerate_axes(el)}
    sub = el.arch_from_indices(dict(enumerate_axes(el)))

    def reads(select, backward: bool = True) -> list:
        with HostReads() as mode:
            select()
            out = el(ids).logits
            if backward:
                out.square().mean().backward()
        el.set_full()
        return mode.reads

    parent = reads(el.set_full)
    assert reads(lambda: el.set_probs(**soft)) == parent
    assert reads(lambda: el.set_probs(**straight)) == parent
    assert reads(lambda: el.set_arch(sub), backward=False) == reads(el.set_full, backward=False)


def enumerate_axes(el) -> list[tuple[str, int]]:
    """A choice index per axis that is neither the full nor the smallest one where the axis has three or more."""
    return [(a, min(1, len(el.choices(a)) - 1)) for a in el.axes]


def test_cost_at_one_hot_is_active_params(elastic_setup):
    _, arch, _, space, el = elastic_setup
    for resource, read in (("active_params", lambda a: a.active_params()), ("params", lambda a: a.num_params())):
        cost = Cost(space, el.kept_layers, resource)
        assert cost.full == read(arch)
        for idx in [{a: 0 for a in el.axes}, {a: len(el.choices(a)) - 1 for a in el.axes},
                    {a: i % len(el.choices(a)) for i, a in enumerate(el.axes)}]:
            probs = {a: el.one_hot(a, i) for a, i in idx.items()}
            assert float(cost.expected(probs)) == read(el.arch_from_indices(idx))
    # an expert more adds its router row and correction bias to what a token touches, not its weights
    few, more = (make_arch(arch, n_routed_experts=e) for e in (4, 6))
    assert more.active_params() - few.active_params() == 2 * (arch.hidden_size + 1) * arch.count("E")
    assert more.num_params() - few.num_params() == 2 * (arch.hidden_size + 1 + 2 * arch.hidden_size
                                                         * arch.moe_intermediate_size) * arch.count("E")
    active = Cost(space, el.kept_layers, "active_params")
    p = {a: torch.full((len(el.choices(a)),), 1 / len(el.choices(a)), requires_grad=True) for a in el.axes}
    (g,) = torch.autograd.grad(active.expected(p), [p["experts"]])
    assert g[0] < g[1] < g[2]  # differentiable, and more experts cost more


# ------------------------------------------------------------------------------------------------ importance


def test_importance_hooks_score_every_expert_and_beat_a_random_ranking():
    """Experts the router never picks (their router rows pushed far down) score 0 and rank last, so the importance
    ranking drops them and the child computes the parent's function; a random ranking drops routed ones."""
    model = moe_model("ME-E")
    arch = arch_of(model)
    dead = [1, 4, 6]
    with torch.no_grad():
        for b in model.model.layers:
            if b.block_type == "moe":
                b.mixer.gate.e_score_correction_bias.zero_()[dead] = -100.0
    batches = [tokens(batch=4, length=32, seed=s) for s in range(3)]
    scores = width_scores(model, batches, progress=False)
    for i in (1, 3):
        assert scores[f"experts.{i}"].shape == (arch.n_routed_experts,)
        assert scores[f"experts_frequency.{i}"].shape == (arch.n_routed_experts,)
        assert scores[f"moe_ffn.{i}"].shape == (arch.moe_intermediate_size,)
        assert scores[f"shared_ffn.{i}"].shape == (arch.moe_shared_expert_intermediate_size,)
        live = [e for e in range(arch.n_routed_experts) if e not in dead]
        assert (scores[f"experts.{i}"][dead] == 0).all() and (scores[f"experts.{i}"][live] > 0).all()
        assert scores[f"moe_ffn.{i}"].gt(0).any()
    scores["depth_mse"] = torch.arange(arch.num_layers, dtype=torch.float)
    child = make_arch(arch, n_routed_experts=5)
    ids = tokens(seed=9)
    parent = model(ids, use_cache=False).logits
    for statistic in ("share_gate_norm", "frequency"):
        ranking = Ranking.from_scores(expert_scores(scores, statistic), arch)
        assert set(ranking.width["experts"][1][0, :5].tolist()) == set(range(8)) - set(dead)
        torch.testing.assert_close(slice_model(model, child, ranking)(ids, use_cache=False).logits, parent)
    rand = Ranking.random(arch, torch.Generator().manual_seed(0))
    assert (slice_model(model, child, rand)(ids, use_cache=False).logits - parent).abs().max() > 1e-2
    with pytest.raises(ArchError, match="expert score must be one of"):
        expert_scores(scores, "norm")


def test_the_two_expert_statistics_differ_where_outputs_differ():
    """share_gate_norm weighs an expert's share by its output norm: an expert with a zero output scores 0 though
    routed, while its routed frequency stays positive."""
    model = moe_model("E")
    with torch.no_grad():
        model.model.layers[0].mixer.experts.down_proj[2].zero_()
    scores = width_scores(model, [tokens(batch=2, length=32)], progress=False)
    assert scores["experts.0"][2] == 0 and scores["experts_frequency.0"][2] > 0


def test_nemotron3_nano_30b_a3b_counts_match_nvidia():
    """NVIDIA's card for NVIDIA-Nemotron-3-Nano-30B-A3B: 31.6B parameters, 3.6B active with the embeddings."""
    cfg = dict(model_type="nemotron_h", hidden_size=2688, intermediate_size=1856, vocab_size=131072,
               hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", mamba_num_heads=64,
               mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, num_attention_heads=32,
               num_key_value_heads=2, head_dim=128, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=6,
               moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1,
               norm_topk_prob=True, routed_scaling_factor=2.5, tie_word_embeddings=False)
    sizes = Sizes.from_config(cfg)
    assert sizes.num_params() == pytest.approx(31.6e9, rel=0.005)
    assert sizes.active_params() == pytest.approx(3.6e9, rel=0.01)
