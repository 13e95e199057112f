"""Every config composes, and every key in conf/ says what it does."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from elastic.run import CONF_DIR, RECIPES_DIR

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
KEY = re.compile(r"^\s*(?:- )?([A-Za-z_][A-Za-z0-9_]*):")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={recipe}", "parent.path=/x", "data.files=/y"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["recipe_name"] == recipe
    for group in ("importance", "search", "prune", "distill", "tracking"):
        assert group in resolved, group


def test_real_recipe_targets_the_4b_budget():
    import json

    from elastic.models.nemotron_h import Arch

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=nemotron_9b_to_4b", "parent.path=/x", "data.files=/y"])
    data = Path(__file__).parent / "data"
    p9 = Arch.from_config(json.loads((data / "nemotron-nano-9b-v2.config.json").read_text())).num_params()
    p4 = Arch.from_config(json.loads((data / "nemotron-3-nano-4b.config.json").read_text())).num_params()
    assert cfg.budget == cfg.search.budgets[0] == pytest.approx(p4 / p9, abs=1e-4)
    assert cfg.distill.phases[0].seq_len == 8192 and cfg.distill.phases[1].seq_len == 49152



def test_moe_granularity_defaults_build_the_spaces_their_comments_state():
    """conf/prune and conf/search name a step for every MoE axis (what check_granularity accepts); prune's default
    on the real 30B-A3B at its recipe's bounds gives the choices the comment states (the recipe's own), search's
    default keeps a tiny 8-expert MoE's expert and width choices, every expert width a multiple of 8 (grouped_mm)."""
    import json

    from elastic.models.nemotron_h import Sizes
    from elastic.search_space import Space, check_granularity

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
        a3b = compose("config", overrides=["recipe=nemotron3_nano_30b_a3b", "parent.path=/x", "data.files=/y"])
    config = json.loads((Path(__file__).parent / "data" / "nemotron-3-nano-30b-a3b.config.json").read_text())
    real = Sizes.from_config(config)
    moe = ("experts", "moe_ffn", "shared_ffn")
    for stage in ("prune", "search"):
        granularity = dict(cfg[stage].granularity)
        assert set(moe) <= set(granularity), stage
        assert check_granularity(granularity, real.axes()) == {a.name: int(granularity.get(a.name, 1)) for a in real.axes()}
    space = Space.build(real, granularity=dict(cfg.prune.granularity), max_width_prune=0.3, max_depth_prune=0.15,
                        protect_kinds="*")
    assert space.choices["experts"] == (96, 104, 112, 120, 128)
    assert space.choices["moe_ffn"] == (1344, 1408, 1472, 1536, 1600, 1664, 1728, 1792, 1856)
    assert space.choices["shared_ffn"][-1] == 3712 and all(c % 64 == 0 for c in space.choices["shared_ffn"])
    recipe = Space.build(real, granularity=dict(a3b.search.granularity), max_width_prune=0.3, max_depth_prune=0.15,
                         protect_kinds="*")
    assert {a: recipe.choices[a] for a in moe} == {a: space.choices[a] for a in moe}
    tiny = Sizes.from_config(config | dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                           moe_shared_expert_intermediate_size=48))
    small = Space.build(tiny, granularity=dict(cfg.search.granularity), max_width_prune=0.4)
    assert small.choices["experts"] == (5, 6, 7, 8)
    assert small.choices["moe_ffn"] == (24, 32) and small.choices["shared_ffn"] == (32, 40, 48)


# conf/recipe links to recipes/, whose files override keys documented here
CONF_FILES = sorted(p for p in CONF_DIR.glob("**/*.yaml") if not p.is_relative_to(CONF_DIR / "recipe"))


@pytest.mark.parametrize("path", CONF_FILES, ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_key_is_commented(path):
    in_help = False
    undocumented = set()
    documented = set()
    for line in path.read_text().splitlines():
        if line.startswith("  help:"):
            in_help = True  # Hydra's --help template is prose, not keys
        if in_help or line.lstrip().startswith("#") or line.strip() in ("", "defaults:"):
            continue
        m = KEY.match(line)
        if m:
            (documented if "#" in line else undocumented).add(m.group(1))
    missing = undocumented - documented - {"hydra", "run", "job"}
    assert not missing, f"{path.name}: keys without a comment: {sorted(missing)}"
