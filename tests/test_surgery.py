"""NemotronH surgery: slicing is exact where it must be, and its checkpoints are plain HF ones."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from elastic.arch import ArchError
from elastic.models.nemotron_h import Arch
from elastic.models import family_for
from elastic.models.nemotron_h import Ranking, arch_of, make_arch, slice_model
from tiny import tiny_model, tokens


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_full_arch_identity_ranking_is_the_identity():
    model, ids = tiny_model(), tokens()
    arch = arch_of(model)
    child = slice_model(model, arch)
    assert arch_of(child) == arch
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), child.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert_close(logits(child, ids), logits(model, ids), rtol=0, atol=0)


def test_full_arch_any_ranking_keeps_the_function():
    """Reordering channels, FFN neurons and heads within their groups changes nothing."""
    model, ids = tiny_model(), tokens()
    arch = arch_of(model)
    ranking = Ranking.random(arch, torch.Generator().manual_seed(3))
    assert_close(logits(slice_model(model, arch, ranking), ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_sliced_sizes_follow_the_arch():
    model = tiny_model()
    parent = arch_of(model)
    ranking = Ranking.random(parent, torch.Generator().manual_seed(0))
    arch = make_arch(parent, ranking, hidden_size=40, intermediate_size=48, mamba_num_heads=4, drop_layers=1, protect_kinds="*")
    child = slice_model(model, arch, ranking)
    assert sum(p.numel() for p in child.parameters()) == arch.num_params() < parent.num_params()
    assert arch_of(child) == arch.replace(layers=())
    mixer = next(b.mixer for b in child.model.layers if b.block_type == "linear_attention")
    assert (mixer.num_heads, mixer.intermediate_size, mixer.norm.group_size) == (4, 32, 16)
    assert "*" in arch.pattern  # attention protected from depth pruning


def test_mamba_heads_are_kept_per_group():
    parent = arch_of(tiny_model())
    ranking = Ranking.random(parent, torch.Generator().manual_seed(0))
    heads = ranking.index("mamba", 0, 4)
    per_group = parent.mamba_num_heads // parent.n_groups
    assert [int(h) // per_group for h in heads] == [0, 0, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slicing_twice_equals_slicing_once(seed):
    model, ids = tiny_model(pattern="M-*M-M-", seed=seed), tokens()
    parent = arch_of(model)
    ranking = Ranking.random(parent, torch.Generator().manual_seed(seed))
    mid = make_arch(parent, ranking, hidden_size=48, intermediate_size=64, mamba_num_heads=6, drop_layers=1)
    mid_model = slice_model(model, mid, ranking)
    small = make_arch(mid, ranking.child(mid), hidden_size=32, intermediate_size=32, mamba_num_heads=4, drop_layers=1)
    twice = slice_model(mid_model, small, ranking.child(mid))
    once_arch = make_arch(parent, ranking, hidden_size=32, intermediate_size=32, mamba_num_heads=4,
                          layers=tuple(mid.layers[i] for i in small.layers))
    once = slice_model(model, once_arch, ranking)
    for (n1, p1), (n2, p2) in zip(twice.state_dict().items(), once.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert_close(logits(twice, ids), logits(once, ids), rtol=0, atol=0)


def test_save_and_reload_with_plain_from_pretrained(tmp_path):
    model, ids = tiny_model(), tokens()
    parent = arch_of(model)
    ranking = Ranking.random(parent, torch.Generator().manual_seed(1))
    arch = make_arch(parent, ranking, hidden_size=40, intermediate_size=32, mamba_num_heads=6, drop_layers=1)
    child = slice_model(model, arch, ranking)
    child.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_size"] == 40 and cfg["mamba_num_heads"] == 6 and len(cfg["layers_block_type"]) == arch.num_layers
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "NemotronHForCausalLM"
    assert_close(logits(reloaded, ids), logits(child, ids), rtol=0, atol=0)
    # and a cached generate works on the reloaded model
    out = reloaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_bad_sizes_are_rejected():
    model = tiny_model()
    parent = arch_of(model)
    with pytest.raises(ArchError, match="multiple of n_groups"):
        make_arch(parent, hidden_size=32, mamba_num_heads=5)
    with pytest.raises(ArchError, match="exceeds"):
        make_arch(parent, intermediate_size=1000)
    with pytest.raises(ArchError, match="cannot drop"):
        make_arch(parent, Ranking.identity(parent), drop_layers=5, protect_kinds="*")


def test_ranking_round_trip_and_validation():
    parent = arch_of(tiny_model())
    ranking = Ranking.random(parent, torch.Generator().manual_seed(0))
    again = Ranking.from_tensors(ranking.to_tensors())
    again.validate(parent)
    assert torch.equal(again.hidden, ranking.hidden) and again.width["mamba"].keys() == ranking.width["mamba"].keys()
    broken = Ranking.from_tensors(ranking.to_tensors() | {"hidden": torch.zeros(parent.hidden_size, dtype=torch.long)})
    with pytest.raises(ArchError, match="permutation"):
        broken.validate(parent)


def test_registry_rejects_other_models():
    assert "nemotron_h" in family_for(tiny_model()).MODEL_TYPES
    with pytest.raises(ValueError, match="not supported"):
        family_for({"model_type": "gpt2"})


def test_grid_counts_non_embedding_params_when_asked():
    from omegaconf import OmegaConf

    from elastic.stages.prune import grid_candidates

    parent = arch_of(tiny_model())
    ranking = Ranking.identity(parent)
    c = OmegaConf.create({"granularity": {"hidden": 8, "ffn": 16}, "max_width_prune": 0.5, "max_depth_prune": 0.3,
                          "protect_kinds": "*", "tolerance": 0.1, "count": "non_embedding_params"})
    target = round(0.6 * parent.non_embedding_params())
    cands = grid_candidates(parent, ranking, target, c)
    assert all(0.9 * target <= a.non_embedding_params() <= target for a in cands)
    # counted with the embeddings, the same target would pick other shapes
    c.count = "params"
    assert {a for a in grid_candidates(parent, ranking, target + parent.embedding_params(), c)} != set(cands)
    c.count = "bogus"
    with pytest.raises(ArchError, match="prune.count"):
        grid_candidates(parent, ranking, target, c)
