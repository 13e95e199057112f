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
