"""The Llama family (Llama, Qwen2, Qwen3, Mistral) on tiny random models: exact sizes, slicing, masking, export."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from elastic.arch import ArchError
from elastic.models import family_for
from elastic.models.family import Ranking
from elastic.models.llama import Elastic, Sizes, slice_model
from elastic.router import Cost
from elastic.search_space import Space

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=64)
# GQA (6 query heads over 2 KV heads) everywhere; head_dim 8 given explicitly (48 / 6 would also be 8)
MODELS = {
    "llama-tied": (LlamaForCausalLM, LlamaConfig, dict(head_dim=8, tie_word_embeddings=True)),
    "llama-untied-bias": (LlamaForCausalLM, LlamaConfig,
                          dict(head_dim=12, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    # sliding-window layers from layer 2 on: the exported layer_types must follow the kept layers
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=2)),
    # q_norm / k_norm over head_dim, biases on q/k/v/o
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=8, tie_word_embeddings=True, attention_bias=True)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(head_dim=8, tie_word_embeddings=True, sliding_window=None)),
}


def tiny(name: str, seed: int = 0):
    cls, cfg_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**COMMON, **extra)).eval()
    # random init leaves norms at 1 and biases at 0: perturb them so that a wrong index shows up
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", ".bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def space_of(parent: Sizes) -> Space:
    # hidden in steps of 12: every hidden choice divisible by every heads choice (4, 6), as LlamaConfig requires
    return Space.build(parent, granularity={"hidden": 12, "ffn": 16, "heads": 1}, max_width_prune=0.5,
                       max_depth_prune=0.5)


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    model = tiny(request.param)
    parent = Sizes.from_config(model.config)
    ranking = Ranking.random(parent, torch.Generator().manual_seed(0))
    space = space_of(parent)
    return request.param, model, parent, ranking, space, Elastic.from_parent(model, ranking, space)


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def test_registry_and_sizes_types(setup):
    name, model, parent, *_ = setup
    assert family_for(model).Sizes is Sizes
    assert parent.MODEL_TYPE == model.config.model_type and parent.pattern == "LLLL"
    assert parent.head_dim == model.model.layers[0].self_attn.head_dim
    assert Sizes.from_dict(json.loads(parent.to_json())) == parent  # the subclass survives the round trip


def test_num_params_is_exact_for_parent_and_slices(setup):
    _, model, parent, ranking, _, _ = setup
    assert parent.num_params() == n_params(model)
    for sizes, drop in (({"hidden": 36}, 0), ({"ffn": 32, "heads": 4}, 1), ({"hidden": 24, "ffn": 16, "heads": 2}, 2)):
        arch = parent.cut(ranking, sizes=sizes, drop_layers=drop)
        child = slice_model(model, arch, ranking)
        assert arch.num_params() == n_params(child), arch
        assert Sizes.from_config(child.config) == arch.replace(layers=())  # the config is derived from the sizes


def test_kv_cache_and_memory(setup):
    _, _, parent, ranking, _, _ = setup
    arch = parent.cut(ranking, sizes={"heads": 2}, drop_layers=1)
    # K and V per layer per token; query heads do not change the cache, layers do
    assert arch.kv_cache_bytes_per_token(2) == 3 * 2 * parent.num_key_value_heads * parent.head_dim * 2
    assert arch.state_bytes() == 0
    assert arch.memory_bytes(context=10, batch=3) == arch.num_params() * 2 + 3 * 10 * arch.kv_cache_bytes_per_token()


def test_gqa_stays_valid(setup):
    _, model, parent, ranking, space, _ = setup
    kv = parent.num_key_value_heads
    assert all(h % kv == 0 for h in space.choices["heads"]) and len(space.choices["heads"]) > 1
    with pytest.raises(ArchError, match="num_key_value_heads"):
        parent.cut(ranking, sizes={"heads": 5})
    with pytest.raises(ArchError, match="num_key_value_heads"):
        Elastic(model, Space(parent, {**space.choices, "heads": (3, 6)}, space.drops), torch.arange(parent.num_layers))
    with pytest.raises(ArchError, match="(?i)fixed"):
        parent.cut(ranking).replace(num_key_value_heads=1).check_within(parent)
    # every KV group keeps the same number of query heads, the top ones of its own group
    arch = parent.cut(ranking, sizes={"heads": 4})
    kept = ranking.index("heads", 0, 4)
    per_group = parent.num_attention_heads // kv
    assert [int(h) // per_group for h in kept] == [0, 0, 1, 1]
    child = slice_model(model, arch, ranking)
    attn = child.model.layers[0].self_attn
    assert child.config.num_attention_heads == 4 and child.config.num_key_value_heads == kv
    assert attn.num_key_value_groups == 2 and attn.k_proj.out_features == kv * parent.head_dim
    ids = tokens()
    assert torch.isfinite(logits(child, ids)).all()


def test_llama_hidden_must_divide_by_heads():
    """transformers' LlamaConfig refuses hidden % heads != 0 (even with head_dim given): such a child
    could not be loaded, so its sizes are refused up front; Qwen2 / Mistral configs accept it."""
    llama, qwen = (Sizes.from_config(tiny(n).config) for n in ("llama-tied", "qwen2"))
    with pytest.raises(ArchError, match="not a multiple of num_attention_heads"):
        llama.cut(sizes={"hidden": 40})
    assert not llama.allows({"hidden": 40, "heads": 6}) and llama.allows({"hidden": 40, "heads": 4})
    assert qwen.cut(sizes={"hidden": 40}).to_config(tiny("qwen2").config).hidden_size == 40
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        LlamaConfig(**{**COMMON, "hidden_size": 40}, head_dim=8)  # the rule is transformers' own


# ---------------------------------------------------------------------------------------------
# slicing
# ---------------------------------------------------------------------------------------------
def test_identity_slice_is_the_parent(setup):
    _, model, parent, ranking, _, _ = setup
    ids = tokens()
    same = slice_model(model, parent)  # identity ranking: the same weights, bit for bit
    for (n1, p1), (n2, p2) in zip(same.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert_close(logits(same, ids), logits(model, ids), rtol=0, atol=0)
    # any ranking at full size only permutes channels: the same function
    assert_close(logits(slice_model(model, parent, ranking), ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_slicing_twice_equals_slicing_once(seed):
    model, ids = tiny("llama-untied-bias", seed=seed), tokens()
    parent = Sizes.from_config(model.config)
    ranking = Ranking.random(parent, torch.Generator().manual_seed(seed))
    mid = parent.cut(ranking, sizes={"hidden": 40, "ffn": 48, "heads": 4}, drop_layers=1)
    mid_model = slice_model(model, mid, ranking)
    small = mid.cut(ranking.child(mid), sizes={"hidden": 24, "ffn": 32, "heads": 2}, drop_layers=1)
    twice = slice_model(mid_model, small, ranking.child(mid))
    once_arch = parent.cut(ranking, sizes={"hidden": 24, "ffn": 32, "heads": 2},
                           layers=tuple(mid.layers[i] for i in small.layers))
    once = slice_model(model, once_arch, ranking)
    for (n1, p1), (n2, p2) in zip(twice.state_dict().items(), once.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert_close(logits(twice, ids), logits(once, ids), rtol=0, atol=0)


# Qwen2's config, unlike Llama's, takes a hidden size that is no multiple of the heads (40 / 6)
@pytest.mark.parametrize("name,hidden,heads", [("llama-tied", 32, 4), ("qwen2", 40, 6)])
def test_save_and_reload_with_plain_from_pretrained(tmp_path, name, hidden, heads):
    model, ids = tiny(name), tokens()
    parent = Sizes.from_config(model.config)
    ranking = Ranking.random(parent, torch.Generator().manual_seed(1))
    arch = parent.cut(ranking, sizes={"hidden": hidden, "ffn": 48, "heads": heads}, layers=(0, 2, 3))
    child = slice_model(model, arch, ranking)
    child.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors"}, files
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"],
            cfg["head_dim"]) == (hidden, 48, heads, 3, parent.head_dim)
    if "layer_types" in model.config.to_dict():
        assert cfg["layer_types"] == [model.config.layer_types[i] for i in (0, 2, 3)]
        assert "sliding_attention" in cfg["layer_types"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == parent.tie_word_embeddings
    assert_close(logits(reloaded, ids), logits(child, ids), rtol=0, atol=0)
    out = reloaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)  # a cached generate works too
    assert out.shape == (1, 8)


def test_dtype_is_kept():
    model = tiny("llama-tied").to(torch.bfloat16)
    parent = Sizes.from_config(model.config)
    child = slice_model(model, parent.cut(sizes={"hidden": 36}))
    assert {p.dtype for p in child.parameters()} == {torch.bfloat16}


def test_set_decoder_layers_keeps_per_layer_attention_types():
    """Depth importance runs the model with one layer left out: the remaining layers keep their own
    (sliding / full) attention masks, i.e. it equals the model sliced without that layer."""
    from elastic.models import llama

    model, ids = tiny("qwen2"), tokens(length=12)
    parent = Sizes.from_config(model.config)
    layers = llama.decoder_layers(model)
    ref = logits(slice_model(model, parent.cut(layers=(0, 2, 3))), ids)
    llama.set_decoder_layers(model, [b for i, b in enumerate(layers) if i != 1])
    try:
        skipped = logits(model, ids)
    finally:
        llama.set_decoder_layers(model, layers)
    assert_close(skipped, ref, rtol=1e-5, atol=1e-5)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2


def test_width_hooks_score_every_axis():
    from elastic.models import llama

    model = tiny("llama-untied-bias")
    parent = Sizes.from_config(model.config)
    got: dict[str, list] = {}
    hooks = llama.width_hooks(model, parent, lambda k, v: got.setdefault(k, []).append(v))
    try:
        logits(model, tokens(batch=3))
    finally:
        for h in hooks:
            h.remove()
    assert len(got["hidden"]) == 2 * parent.num_layers + 1 and got["hidden"][0].shape == (3, parent.hidden_size)
    for i in range(parent.num_layers):
        assert got[f"ffn.{i}"][0].shape == (3, parent.intermediate_size)
        assert got[f"heads.{i}"][0].shape == (3, parent.num_attention_heads)
    scores = {k: torch.stack(v).sum(0).sum(0) for k, v in got.items()}
    scores["depth_mse"] = torch.rand(parent.num_layers)
    Ranking.from_scores(scores, parent).validate(parent)


# ---------------------------------------------------------------------------------------------
# the elastic (masked) model
# ---------------------------------------------------------------------------------------------
def random_indices(el, g):
    return {a: int(torch.randint(len(el.choices(a)), (1,), generator=g)) for a in el.axes}


def test_full_is_parent(setup):
    _, model, _, _, _, el = setup
    ids = tokens()
    el.set_full()
    assert_close(el(ids).logits, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_hard_mask_equals_slice(setup):
    _, model, parent, ranking, space, el = setup
    ids = tokens()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = random_indices(el, g)
        sub = el.arch_from_indices(idx)
        # the same architecture expressed on the parent: importance ranking, depth by dropping
        ref_arch = parent.cut(ranking, sizes={a: sub.axis_size(a) for a in space.choices},
                              drop_layers=space.drops[idx["depth"]])
        assert ref_arch == sub
        ref = logits(slice_model(model, ref_arch, ranking), ids)
        el.set_arch(sub)
        with torch.no_grad():
            assert_close(el(ids).logits, ref, rtol=1e-4, atol=1e-4)
        assert_close(logits(el.extract(sub), ids), ref, rtol=1e-4, atol=1e-4)
    # the smallest corner too: every axis at its least, the most layers dropped
    small = el.arch_from_indices({a: 0 for a in space.choices} | {"depth": len(space.drops) - 1})
    assert small.num_layers == parent.num_layers - 2
    el.set_arch(small)
    with torch.no_grad():
        assert_close(el(ids).logits, logits(slice_model(model, small, ranking), ids), rtol=1e-4, atol=1e-4)
    el.set_full()


def test_soft_masks_give_finite_gradients(setup):
    _, _, _, _, _, el = setup
    ids = tokens()
    logit = {a: torch.randn(len(el.choices(a)), generator=torch.Generator().manual_seed(i), requires_grad=True)
             for i, a in enumerate(el.axes)}
    el.set_probs(**{a: torch.softmax(v, -1) for a, v in logit.items()})
    el.train()
    try:
        out = el(ids).logits
        out.square().mean().backward()
    finally:
        el.eval()
        el.set_full()
    for a, v in logit.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, a
    grads = [p.grad for p in el.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    el.zero_grad()


def test_cost_at_one_hot_equals_num_params(setup):
    _, _, _, _, space, el = setup
    cost = Cost(space, el.kept_layers)
    mem = Cost(space, el.kept_layers, resource="memory", context=64, batch=2)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        idx = random_indices(el, g)
        arch = el.arch_from_indices(idx)
        probs = {a: el.one_hot(a, i) for a, i in idx.items()}
        assert int(round(float(cost.expected(probs)))) == arch.num_params()
        assert int(round(float(mem.expected(probs)))) == arch.memory_bytes(64, 2)
    assert cost.full == el.arch.num_params()


def test_checkpointed_gradients_equal_plain_ones(setup):
    """Activation checkpointing recomputes each decoder layer in backward under the masks it ran with."""
    _, _, _, _, _, el = setup
    ids = tokens()
    probs = {a: torch.softmax(torch.randn(len(el.choices(a)), generator=torch.Generator().manual_seed(i)), -1)
             for i, a in enumerate(el.axes)}
    grads, calls = [], []
    count = [0]
    hook = el.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    el.train()
    try:
        for ckpt in (False, True):
            count[0] = 0
            el.enable_activation_checkpointing(ckpt)
            el.set_probs(**probs)
            out = el(ids).logits
            el.set_full()  # as the search does between steps: the recompute must not see this
            out.square().mean().backward()
            calls.append(count[0])
            grads.append({n: p.grad.clone() for n, p in el.named_parameters() if p.grad is not None})
            el.zero_grad()
    finally:
        hook.remove()
        el.enable_activation_checkpointing(False)
        el.eval()
    assert calls == [1, 2]  # the checkpointed run really recomputed the layer in backward
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
