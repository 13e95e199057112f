"""`search.router.prior=grid`: each budget's router starts at the shape the prune stage's grid rule picks, and
leaves it only when training moves its logits (issue #21: the search starts where the grid ends)."""

import pytest
import torch

from elastic.arch import ArchError, sizes_from_dict
from elastic.router import Router
from elastic.rundir import read_json
from elastic.run import pipeline
from elastic.search_space import Space

from test_pipeline import make_cfg

# the same space for both stages: the search's limits and steps given to the prune stage's grid
SPACE = ["search.max_width_prune=0.5", "search.max_depth_prune=0.25", "prune.max_width_prune=0.5",
         "prune.max_depth_prune=0.25", "prune.tolerance=0.05", "search.band=0.05",
         "prune.granularity.hidden=8", "prune.granularity.ffn=32", "prune.granularity.mamba=1"]
SEARCH = ["search.steps=4", "search.batch_size=2", "search.micro_batch_size=2", "search.seq_len=32",
          "search.train_sequences=16", "search.checkpoint_every=0", "search.eval_sequences=0", "tracking.backends=[]",
          "search.budgets=[0.5,0.7]", "search.router.prior=grid", "search.router.prior_candidates=1"]


def test_router_with_a_prior_starts_at_the_prior_choice():
    space = Space(parent=None, choices={"hidden": (32, 48, 64), "ffn": (64, 96, 128)}, drops=(0, 1, 2))
    torch.manual_seed(0)
    r = Router([0.5, 0.7], space)
    torch.manual_seed(0)
    untouched = Router([0.5, 0.7], space)
    want = {"hidden": 0, "ffn": 2, "depth": 1}
    assert r.argmax(0.5) != want  # so the assertion below shows the prior's effect
    r.set_prior(0.5, want, strength=3.0)
    assert r.argmax(0.5) == want  # the prior outweighs the network's initial logits (std 0.1)
    for a, lg in r.logits(0.7).items():  # another budget's input does not see it
        torch.testing.assert_close(lg, untouched.logits(0.7)[a])
    with pytest.raises(ArchError, match="trained budget"):
        r.set_prior(0.6, want, strength=3.0)
    # the prior travels with the router's state (router.safetensors), so extraction sees the same logits
    r2 = Router([0.5, 0.7], space)
    r2.load_state_dict(r.state_dict())
    assert r2.argmax(0.5) == want


def test_search_starts_where_the_grid_ends(toy_parent, tmp_path):
    run = tmp_path / "run"
    pipeline(make_cfg(toy_parent, run, "stage=importance", *SPACE, *SEARCH))
    # the router frozen (lr 0): what it extracts is its starting point, which must be the grid's shape
    pipeline(make_cfg(toy_parent, run, "stage=search", "search.router.lr=0", *SPACE, *SEARCH))
    doc = read_json(run / "search/archs.json")
    assert set(doc["prior"]) == {"0.5", "0.7"}
    for b in ("0.5", "0.7"):
        out = pipeline(make_cfg(toy_parent, run, "stage=prune", "force=true", f"prune.target={b}", "prune.num_candidates=1",
                                f"prune.name=grid-{b}", *SPACE, *SEARCH))["prune"]
        grid_arch = sizes_from_dict(read_json(run / "prune" / f"grid-{b}.arch.json"))
        prior_arch = sizes_from_dict(doc["prior"][b]["arch"])
        assert prior_arch == grid_arch, (b, prior_arch.short(), grid_arch.short(), out)
        assert sizes_from_dict(doc["budgets"][b]["arch"]) == grid_arch
