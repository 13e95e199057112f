"""Bad input answers in one line: exit code 2, the file or key named, no traceback, nothing left behind.

The CLI cases run the real entry point (`python -m elastic.run`) in a subprocess, on tiny untrained
checkpoints: a stage that reads a broken checkpoint must refuse it before it starts a tracker run or
writes any artifact (README, "What bad input answers").
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_model

from elastic.arch import ArchError
from elastic.parent import ModelError, check_checkpoint, check_weights

REPO = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat while dogs ran far away and birds sang over green hills".split()
VOCAB = 300
# tiny distill phases: the old code got as far as the student's weights (trackers started) on these
PHASES = [f"distill.phases.0.{k}={v}" for k, v in dict(seq_len=32, batch_size=2, micro_batch_size=1, max_steps=1).items()] + \
         [f"distill.phases.1.{k}={v}" for k, v in dict(seq_len=64, batch_size=2, micro_batch_size=1, max_steps=1).items()]


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Text, and whole tiny checkpoints (with a tokenizer): a teacher, a student and a sharded teacher."""
    root = tmp_path_factory.mktemp("bad_input")
    rng = random.Random(0)
    (root / "text").mkdir()
    texts = []
    for i in range(4):
        texts.append("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(80)))
        (root / "text" / f"doc{i}.txt").write_text(texts[-1])
    tok = make_tokenizer(texts)
    models = {"teacher": tiny_model("M-*M-", seed=1, vocab_size=VOCAB),
              "student": tiny_model("M*-", seed=2, hidden_size=48, mamba_num_heads=4, intermediate_size=64, vocab_size=VOCAB)}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    models["teacher"].save_pretrained(root / "sharded", max_shard_size="100KB")
    tok.save_pretrained(root / "sharded")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 2
    return root


def broken_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of checkpoint `src` whose weights are broken in one way; returns the broken file."""
    shutil.copytree(src, dst)
    if how == "none":
        return dst
    if how == "missing-shard":
        f = sorted(dst.glob("model-*.safetensors"))[1]
        f.unlink()
        return f
    f = dst / "model.safetensors"
    data = f.read_bytes()
    if how == "truncated":  # an interrupted copy: the header is whole, the data is not
        f.write_bytes(data[: len(data) // 2])
    elif how == "header":  # garbage where the JSON header is
        n = int.from_bytes(data[:8], "little")
        f.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    elif how == "empty":
        f.write_bytes(b"")
    return f


def cli(*args: str, run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("ELASTIC_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "elastic.run", *args, f"run_dir={run_dir}", "device=cpu"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("elastic: error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def left_behind(run_dir: Path) -> list[str]:
    """What a run left in its run directory besides Hydra's own logs (`.hydra/`)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.relative_to(run_dir).parts[0] != ".hydra")


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("how, why", [("truncated", "truncated or corrupt: its header says"),
                                      ("header", "not a safetensors JSON header"),
                                      ("empty", "truncated or corrupt"),
                                      ("missing-shard", "is missing (1 of the")])
def test_broken_parent_is_one_line_and_leaves_nothing(world, tmp_path, how, why):
    """importance reads the parent first: a broken model.safetensors (or a shard the index lists that is
    not there) is named in one line, exit 2, before any importance output exists."""
    src = world / ("sharded" if how == "missing-shard" else "teacher")
    f = broken_copy(src, tmp_path / "parent", how)
    run_dir = tmp_path / "run"
    r = cli("stage=importance", f"parent.path={tmp_path / 'parent'}", f"data.files={world / 'text'}/*.txt", run_dir=run_dir)
    assert_one_line(r, str(f), why, "re-run the stage that wrote it or fix the path")
    assert left_behind(run_dir) == []


def test_distill_refuses_a_broken_student_before_any_tracker_run(world, tmp_path):
    """The student is checked with the teacher, before the accelerator and its trackers (tensorboard,
    wandb) exist: no logs folder, no phase output, no tracker run to clean up."""
    f = broken_copy(world / "student", tmp_path / "student", "truncated")
    run_dir = tmp_path / "run"
    r = cli("stage=distill", f"parent.path={world / 'teacher'}", f"distill.student={tmp_path / 'student'}",
            f"data.files={world / 'text'}/*.txt", "tracking.backends=[tensorboard,wandb]", *PHASES, run_dir=run_dir)
    assert_one_line(r, str(f), "truncated or corrupt")
    assert left_behind(run_dir) == []


def test_quantize_refuses_a_broken_model(world, tmp_path):
    f = broken_copy(world / "student", tmp_path / "student", "truncated")
    run_dir = tmp_path / "run"
    r = cli("stage=quantize", f"quantize.model={tmp_path / 'student'}", f"data.files={world / 'text'}/*.txt",
            run_dir=run_dir)
    assert_one_line(r, str(f), "truncated or corrupt")
    assert left_behind(run_dir) == []


def test_export_refuses_a_broken_model_before_the_converter(world, tmp_path):
    f = broken_copy(world / "sharded", tmp_path / "model", "missing-shard")
    run_dir = tmp_path / "run"
    r = cli("stage=export", "export.format=gguf", f"export.model={tmp_path / 'model'}", run_dir=run_dir)
    assert_one_line(r, str(f), "is missing")
    assert left_behind(run_dir) == []


def test_a_broken_cached_toy_parent_says_how_to_rebuild_it(world, tmp_path, monkeypatch):
    """The toy parent is reused from its cache as it is: re-running a stage would not repair it."""
    from omegaconf import OmegaConf

    import elastic.parent as parent

    broken = tmp_path / "parent-0123456789"
    broken_copy(world / "teacher", broken, "truncated")
    monkeypatch.setattr(parent, "toy_parent", lambda settings, cache_dir: broken)
    cfg = OmegaConf.create({"parent": {"path": None}, "toy": {"cache_dir": str(tmp_path), "steps": 1}})
    with pytest.raises(ModelError, match=f"truncated or corrupt.*delete {broken} and it is rebuilt"):
        parent.resolve_parent_path(cfg)


@pytest.mark.parametrize("case, needle", [("missing", "does not exist"), ("no-config", "no config.json"),
                                          ("no-weights", "has no weights")])
def test_a_parent_that_is_not_a_checkpoint_is_one_line(world, tmp_path, case, needle):
    parent = tmp_path / "parent"
    if case == "no-config":
        parent.mkdir()
        (parent / "model.safetensors").write_bytes(b"")
    elif case == "no-weights":  # e.g. a download that stopped after the small files
        parent.mkdir()
        shutil.copy(world / "teacher" / "config.json", parent)
    run_dir = tmp_path / "run"
    r = cli("stage=importance", f"parent.path={parent}", f"data.files={world / 'text'}/*.txt", run_dir=run_dir)
    assert_one_line(r, str(parent), needle)
    assert left_behind(run_dir) == []


def test_whole_checkpoints_pass_the_weight_check(world, tmp_path):
    """No false alarm: single-file and sharded checkpoints, and a float8 file (FP8 exports)."""
    from safetensors.torch import save_file

    for name in ("teacher", "student", "sharded"):
        assert check_checkpoint(world / name) == (world / name).resolve()
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    save_file({"w": torch.zeros(4, 8, dtype=torch.float8_e4m3fn), "weight_scale": torch.ones(())},
              str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    check_weights(fp8)
    with open(fp8 / "model.safetensors", "ab") as fh:  # trailing bytes: safetensors refuses these too
        fh.write(b"\0")
    with pytest.raises(ModelError, match="its header says 2\\d+ bytes, the file has"):
        check_weights(fp8)


def test_a_sharded_index_that_is_not_json_is_named(world, tmp_path):
    broken_copy(world / "sharded", tmp_path / "p", "none")
    (tmp_path / "p" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelError, match="model.safetensors.index.json is not a readable safetensors index"):
        check_checkpoint(tmp_path / "p")


# ------------------------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("value, expected", [(0.6, 0.6), ("0.6", 0.6), (1, 1.0), (4e9, 4e9), ("4e9", 4e9),
                                             ("4B", 4e9), ("600M", 6e8), ("1.5B", 1.5e9), ("250K", 2.5e5), (1000, 1000.0)])
def test_budgets_read_as_fractions_or_counts(value, expected):
    from elastic.search_space import read_budget

    assert read_budget(value, "prune.target") == expected


@pytest.mark.parametrize("value, match", [(2.0, "ambiguous"), (1.5, "ambiguous"), ("1.5", "ambiguous"), (999, "ambiguous"),
                                          (0, "positive"), (-0.5, "positive"), ("4 bn", "cannot read"), (True, "cannot read")])
def test_budgets_that_could_mean_two_things_are_refused(value, match):
    from elastic.search_space import parse_budget

    with pytest.raises(ArchError, match=match) as e:
        parse_budget(value, 9_000_000_000)
    msg = str(e.value)
    assert "\n" not in msg and "prune.target=" in msg
    assert 'write a fraction of the parent (0.6), or a parameter count (4e9, "4B", "600M")' in msg


def test_fraction_only_budgets_share_the_reader():
    """search.budgets and budget (extraction) are fractions of the parent: a count or 2.0 is refused in the
    same words, naming the key."""
    from elastic.router import check_budgets
    from elastic.stages.prune import parse_budget_list

    for bad in ([0.5, 2.0], [0.5, "4B"]):
        with pytest.raises(ArchError, match=r"search\.budgets=.* is not a fraction of the parent in \(0, 1\]"):
            check_budgets(bad)
    with pytest.raises(ArchError, match=r"budget='600M' is not a fraction of the parent in \(0, 1\]"):
        parse_budget_list("600M", [0.5])
    assert check_budgets(["0.7", 0.5]) == (0.5, 0.7) and parse_budget_list([0.5, "0.7"], [0.5]) == [0.5, 0.7]


@pytest.mark.parametrize("target", ["2.0", "1.5"])
def test_cli_ambiguous_target_is_one_line(world, tmp_path, target):
    """`prune.target=2.0` used to end in "no architecture of the grid has between 2 and 2 parameters"."""
    run_dir = tmp_path / "run"
    r = cli("stage=prune", f"parent.path={world / 'teacher'}", "prune.ranking=identity", f"prune.target={target}",
            f"data.files={world / 'text'}/*.txt", run_dir=run_dir)
    assert_one_line(r, f"prune.target={target} is ambiguous", '(4e9, "4B", "600M")')
    assert left_behind(run_dir) == []
