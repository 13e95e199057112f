"""Distillation: data streams, the training loop (exact resume, 2-process DDP == 1 process) and the stage.

Run as a script, this file is the worker of the 2-process test (started by `accelerate launch`).
"""

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `tiny` when run as a script
from launch import launch_two_processes  # noqa: E402
from tiny import tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 320            # model vocabulary; the test tokenizer has 300 tokens
WORDS = "the king queen lord love death night day sword crown blood heart fair sweet good my lady".split()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ helpers


def write_docs(folder: Path, n: int, *, seed: int = 0, lines: int = 60) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(lines))
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.read_text() for p in sorted(folder.glob("*.txt"))], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def teacher_model(seed=1, **kw):
    return tiny_model("M-*M-", seed=seed, vocab_size=kw.pop("vocab_size", VOCAB), **kw)


def student_model(seed=2, **kw):
    return tiny_model("M*-", seed=seed, hidden_size=48, mamba_num_heads=4, intermediate_size=64,
                      vocab_size=kw.pop("vocab_size", VOCAB), **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Text files, a tokenizer, and teacher / student checkpoints (tiny, untrained)."""
    root = tmp_path_factory.mktemp("distill")
    text = write_docs(root / "text", 8)
    tok = make_tokenizer(text)
    paths = {"root": root, "text": text, "tokenizer": tok}
    for name, model in [("teacher", teacher_model()), ("teacher2", teacher_model(seed=5)),
                        ("student", student_model()), ("student_vocab", student_model(vocab_size=384))]:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def make_cfg(world, run_dir, *, teacher="teacher", **distill):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "stage": "distill", "run_dir": str(run_dir), "force": False, "seed": 0, "device": "cpu",
        "parent": {"path": str(world[teacher])},
        "data": OmegaConf.load(REPO / "conf/data/default.yaml"),
        "distill": OmegaConf.load(REPO / "conf/distill/default.yaml"),
        "tracking": OmegaConf.merge(OmegaConf.load(REPO / "conf/tracking/default.yaml"), {"backends": []}),
    })
    cfg.data.files = str(world["text"] / "*.txt")
    cfg.distill.student = str(world["student"])
    cfg.distill.eval_sequences = 4
    cfg.distill.checkpoint_every = 2
    cfg.distill.phases[0].update(seq_len=32, batch_size=4, micro_batch_size=2, max_steps=4, warmup_steps=1)
    cfg.distill.phases[1].update(seq_len=256, batch_size=2, micro_batch_size=1, max_steps=2, warmup_steps=0)
    for k, v in distill.items():
        OmegaConf.update(cfg, f"distill.{k}", v, merge=False)
    return cfg


def run_stage(cfg):
    from elastic.rundir import RunDir
    from elastic.stages import distill

    return distill.run(cfg, RunDir(cfg.run_dir))


# ------------------------------------------------------------------------------------------------ data


def test_mixture_is_weighted_deterministic_and_resumable():
    from elastic.data import Mixture, PackedRows

    a = torch.arange(40).view(20, 2)
    b = 1000 + torch.arange(40).view(20, 2)

    def mix():
        return Mixture([PackedRows(a, seed=0), PackedRows(b, seed=1)], [0.7, 0.3], seed=3)

    m = mix()
    rows = m.fetch(m.take(2000))
    share = (rows[:, 0] < 1000).float().mean().item()
    assert 0.66 < share < 0.74
    again = mix()
    assert torch.equal(again.fetch(again.take(2000)), rows)
    # a fresh mixture loaded from a mid-stream state continues with the same rows
    m1 = mix()
    m1.fetch(m1.take(123))
    state = json.loads(json.dumps(m1.state_dict()))
    m2 = mix()
    m2.load_state_dict(state)
    assert torch.equal(m2.fetch(m2.take(50)), m1.fetch(m1.take(50)))
    # every row of a source appears once per epoch
    src = PackedRows(a, seed=0)
    assert sorted(int(src.row(j)[0]) for j in range(20)) == list(range(0, 40, 2))


def test_streaming_rows_pack_like_pack_tokens_and_resume(world, tmp_path):
    from elastic.data import DataError, StreamingRows, load_text, stream_text

    tok = world["tokenizer"]
    ds = stream_text(str(world["text"] / "*.txt"))
    stream = StreamingRows(ds, tok, 16)
    streamed = torch.stack([stream.row(j) for j in range(40)])
    # the token stream pack_tokens cuts (documents in file order, EOS after each), before its shuffle
    expected = []
    for text in load_text(str(world["text"] / "*.txt"))["text"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert streamed.flatten().tolist() == expected[: 40 * 16]
    # resume from a state mid-stream; shuffled streams too
    for buf in (0, 4):
        s1 = StreamingRows(ds, tok, 16, seed=7, shuffle_buffer=buf)
        for j in range(25):
            s1.row(j)
        state = json.loads(json.dumps(s1.state_dict()))
        s2 = StreamingRows(ds, tok, 16, seed=7, shuffle_buffer=buf)
        s2.load_state_dict(state)
        assert all(torch.equal(s1.row(j), s2.row(j)) for j in range(25, 400))  # crosses into epoch 2
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(DataError):
        StreamingRows(stream_text(str(tmp_path / "blank.txt")), tok, 16).row(0)


def test_unshuffled_stream_resumes_from_the_dataset_state_without_rereading(world, monkeypatch):
    """An unshuffled stream saves the dataset's own position: a resume jumps there (no `skip` over every
    earlier document) and reads exactly the rows the uninterrupted stream reads, across epochs."""
    import datasets

    from elastic.data import StreamingRows, stream_text

    tok = world["tokenizer"]
    ds = stream_text(str(world["text"] / "*.txt"))
    s1 = StreamingRows(ds, tok, 16)
    for j in range(25):
        s1.row(j)
    state = json.loads(json.dumps(s1.state_dict()))
    assert state["dataset"] is not None
    monkeypatch.setattr(datasets.IterableDataset, "skip", lambda *a, **k: pytest.fail("resume re-read documents"))
    s2 = StreamingRows(ds, tok, 16)
    s2.load_state_dict(state)
    assert all(torch.equal(s1.row(j), s2.row(j)) for j in range(25, 400))  # crosses into epoch 2


def test_two_ranks_split_each_step_exactly_like_one_rank():
    from elastic.data import Mixture, PackedRows
    from elastic.train import StepBatches

    rows = torch.arange(64 * 3).view(64, 3)

    def batches(rank, world, micro):
        return StepBatches(Mixture([PackedRows(rows)]), batch_size=8, micro_batch_size=micro, rank=rank, world_size=world)

    one = batches(0, 1, 2)
    r0, r1 = batches(0, 2, 2), batches(1, 2, 2)
    assert one.grad_accum == 4 and r0.grad_accum == 2
    for _ in range(10):
        single = torch.cat(one.next_step())
        a, b = r0.next_step(), r1.next_step()
        assert torch.equal(single, torch.cat([a[0], b[0], a[1], b[1]]))
    with pytest.raises(ValueError, match="multiple"):
        batches(0, 3, 2)


# ------------------------------------------------------------------------------------------------ the loop


def _loop_losses(checkpoint_dir, *, steps=6, fail_at_step=None, batch_size=4, micro=2, fingerprint=None, strategy="auto"):
    """Train a tiny student against a tiny teacher on random rows; per-step losses (main process)."""
    from elastic.data import Mixture, PackedRows
    from elastic.losses import KDStudent
    from elastic.stages.distill import make_step_fn
    from elastic.train import StepBatches, TrainConfig, make_accelerator, train

    acc = make_accelerator(device="cpu")
    teacher = teacher_model().requires_grad_(False)
    model = KDStudent(student_model(), chunk_size=40)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (48, 24), generator=g)
    mix = Mixture([PackedRows(rows[:36], seed=0), PackedRows(rows[36:], seed=1)], [0.7, 0.3], seed=0)
    batches = StepBatches(mix, batch_size=batch_size, micro_batch_size=micro, rank=acc.process_index,
                          world_size=acc.num_processes)
    cfg = TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=2, checkpoint_every=2, fail_at_step=fail_at_step,
                      log_every=0, seed=0)
    result = train(model, make_step_fn(0.0), batches, cfg, accelerator=acc, checkpoint_dir=checkpoint_dir,
                   teacher=teacher, fingerprint=fingerprint or {"run": "a"}, strategy=strategy)
    return result


def test_resume_after_a_crash_gives_the_same_loss_at_every_later_step(tmp_path):
    from elastic.train import ResumeError, SimulatedCrash

    full = _loop_losses(tmp_path / "full").losses
    with pytest.raises(SimulatedCrash):
        _loop_losses(tmp_path / "crash", fail_at_step=5)
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == ["step_00000002", "step_00000004"]
    resumed = _loop_losses(tmp_path / "crash")
    assert resumed.resumed_from == 4
    assert resumed.losses == full  # bit-identical
    assert full[-1] < full[0]
    # a checkpoint folder of another run is refused, and left as it was
    with pytest.raises(SimulatedCrash):
        _loop_losses(tmp_path / "other", fail_at_step=3)
    before = sorted(p.name for p in (tmp_path / "other").rglob("*"))
    with pytest.raises(ResumeError, match="another run"):
        _loop_losses(tmp_path / "other", fingerprint={"run": "b"})
    assert sorted(p.name for p in (tmp_path / "other").rglob("*")) == before


@pytest.mark.slow
def test_two_process_ddp_gives_the_loss_curve_of_one_process(tmp_path):
    """A real 2-process gloo DDP run (accelerate launch) vs one process, same global batch."""
    one = _loop_losses(tmp_path / "one", steps=4, batch_size=4, micro=2).losses  # 1 process: accumulation 2
    proc = launch_two_processes(__file__, str(tmp_path / "two"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout + proc.stderr  # really two processes (not a silent single one)
    two = json.loads((tmp_path / "two" / "losses.json").read_text())  # 2 processes: accumulation 1
    assert len(two) == len(one) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 (per-block fully_shard, gloo, fp32) over 2 processes: the loss of every step equals one
    unsharded process's; killed after step 3, it resumes from its sharded step-2 checkpoint exactly."""
    one = _loop_losses(tmp_path / "one", steps=4, batch_size=4, micro=2).losses
    crashed = launch_two_processes(__file__, str(tmp_path / "two"), "fsdp", "3", timeout=300)
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stdout, crashed.stderr[-3000:]
    assert (tmp_path / "two/ckpt/step_00000002/sharded/.metadata").exists()  # torch.distributed.checkpoint shards
    proc = launch_two_processes(__file__, str(tmp_path / "two"), "fsdp", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2 (FSDP2" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "two/resumed_from.json").read_text()) == 2
    two = json.loads((tmp_path / "two/losses.json").read_text())
    assert len(two) == len(one) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-6, (one, two)


@pytest.mark.slow
def test_distill_stage_under_two_process_fsdp_matches_one_process(world, tmp_path):
    """The whole stage under FSDP2 with a sharded teacher: the same per-step losses as one process, and
    each phase's output is a plain checkpoint (gathered one tensor at a time) with the same weights."""
    from transformers import AutoModelForCausalLM

    run_stage(make_cfg(world, tmp_path / "one"))
    proc = launch_two_processes(
        "-m", "elastic.run", "stage=distill", f"run_dir={tmp_path / 'two'}", f"parent.path={world['teacher']}",
        f"data.files={world['text']}/*.txt", f"distill.student={world['student']}", "distill.eval_sequences=4",
        "distill.checkpoint_every=2", "tracking.backends=[]", "device=cpu", "parallel.strategy=fsdp",
        "parallel.teacher=shard",
        *[f"distill.phases.0.{k}={v}" for k, v in dict(seq_len=32, batch_size=4, micro_batch_size=2, max_steps=4, warmup_steps=1).items()],
        *[f"distill.phases.1.{k}={v}" for k, v in dict(seq_len=256, batch_size=2, micro_batch_size=1, max_steps=2, warmup_steps=0).items()],
        timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2 (FSDP2" in proc.stdout + proc.stderr and "shard)" in proc.stdout + proc.stderr

    def losses(run):
        lines = [json.loads(x) for x in (run / "distill/logs/metrics.jsonl").read_text().splitlines()]
        return [x[k] for x in lines for k in ("phase1/loss", "phase2/loss") if k in x]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    for phase in ("phase1", "phase2"):
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "one/distill" / phase)
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "two/distill" / phase)  # plain HF, no project code
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------ the stage


def test_stage_two_phases_long_context_outputs_reload(world, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(world, tmp_path / "run")
    summary = run_stage(cfg)
    run_dir = tmp_path / "run" / "distill"
    assert set(summary["phases"]) == {"phase1", "phase2"}
    p1, p2 = summary["phases"]["phase1"], summary["phases"]["phase2"]
    assert p1["steps"] == 4 and p1["tokens"] == 4 * 4 * 32
    assert p2["steps"] == 2 and p2["tokens"] == 2 * 2 * 256  # phase 2 at 8x the context of phase 1
    assert p2["heldout_after"]["kl"] < p1["heldout_before"]["kl"]
    for phase in ("phase1", "phase2"):
        meta = json.loads((run_dir / f"{phase}.meta.json").read_text())
        assert meta["stage"] == "distill" and meta["fingerprint"]["phase"] == phase
        model = AutoModelForCausalLM.from_pretrained(run_dir / phase)  # plain HF, no project code
        assert model.config.hidden_size == 48 and model.config.vocab_size == VOCAB
        assert (run_dir / phase / "tokenizer.json").exists()
    assert json.loads((run_dir / "phase2.meta.json").read_text())["inputs"]["student"] == str(run_dir / "phase1")
    assert not (run_dir / "checkpoints").exists()  # removed once the outputs are written
    lines = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "phase1/loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "phase2/loss" in x] == [5, 6]  # one curve across the phases
    assert {"phase1/kl", "phase1/lr", "phase1/tokens_per_s", "phase1/mem_gb"} <= set(lines[0])
    # the distilled student changed; rerunning a finished stage is a no-op
    w0 = AutoModelForCausalLM.from_pretrained(world["student"]).lm_head.weight
    assert not torch.equal(model.lm_head.weight, w0)
    mtime = (run_dir / "phase2" / "model.safetensors").stat().st_mtime_ns
    assert run_stage(cfg) == json.loads((run_dir / "DONE.json").read_text())["summary"]
    assert (run_dir / "phase2" / "model.safetensors").stat().st_mtime_ns == mtime


def test_the_entry_point_config_runs_the_stage(world, tmp_path):
    """Composed from conf/ like `python -m elastic.run stage=distill ...` (every key of the group)."""
    from hydra import compose, initialize_config_dir

    from elastic.run import CONF_DIR, pipeline

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "stage=distill", f"run_dir={tmp_path / 'run'}", f"parent.path={world['teacher']}", "device=cpu",
            f"distill.student={world['student']}", f"data.files={world['text']}/*.txt", "tracking.backends=[]",
            "distill.max_steps=2", "distill.phases.0.seq_len=32", "distill.phases.0.batch_size=4",
            "distill.phases.0.micro_batch_size=2", "distill.phases.1.seq_len=64", "distill.phases.1.batch_size=2",
            "distill.phases.1.micro_batch_size=1",
        ])
    results = pipeline(cfg)
    assert results["distill"]["output"] == str(tmp_path / "run" / "distill" / "phase2")
    assert json.loads((tmp_path / "run" / "distill" / "DONE.json").read_text())["summary"]["phases"]["phase1"]["steps"] == 2


def test_stage_killed_mid_phase_resumes_to_the_uninterrupted_result(world, tmp_path):
    from elastic.train import SimulatedCrash

    full = run_stage(make_cfg(world, tmp_path / "full"))
    with pytest.raises(SimulatedCrash):
        run_stage(make_cfg(world, tmp_path / "crash", fail_at_step=3))
    assert not (tmp_path / "crash" / "distill" / "phase1").exists()  # nothing half-written
    resumed = run_stage(make_cfg(world, tmp_path / "crash"))
    assert resumed["phases"]["phase1"]["resumed_from"] == 2
    for phase in ("phase1", "phase2"):
        assert resumed["phases"][phase]["final_train_loss"] == full["phases"][phase]["final_train_loss"]
        assert resumed["phases"][phase]["heldout_after"] == full["phases"][phase]["heldout_after"]


def test_resume_accepts_settings_that_keep_the_trajectory_and_names_those_that_do_not(world, tmp_path):
    """Issue #20, defect 4: after an out-of-memory crash the fix is often activation checkpointing, a smaller loss
    chunk or micro-batch, fewer evaluation sequences: the run resumes across them. A change of the trajectory
    (the learning rate) is refused, and the refusal names the key with both values."""
    from elastic.train import ResumeError, SimulatedCrash

    with pytest.raises(SimulatedCrash):
        run_stage(make_cfg(world, tmp_path / "run", fail_at_step=3))  # checkpoint at step 2
    with pytest.raises(ResumeError, match=r"optimizer\.lr: checkpoint 0\.002 vs now 0\.003") as e:
        run_stage(make_cfg(world, tmp_path / "run", **{"phases.0.lr": 3.0e-3}))
    assert "\n" not in str(e.value)
    harmless = {"gradient_checkpointing": True, "loss_chunk_size": 8, "eval_sequences": 2, "eval_batch_size": 1,
                "log_every": 2, "checkpoint_every": 1, "keep_checkpoints": 1, "phases.0.micro_batch_size": 1}
    resumed = run_stage(make_cfg(world, tmp_path / "run", **harmless))
    assert resumed["phases"]["phase1"]["resumed_from"] == 2 and resumed["phases"]["phase1"]["steps"] == 4


def test_lm_only_baseline_and_mixture_sources(world, tmp_path):
    extra = write_docs(tmp_path / "extra", 3, seed=9)
    sources = [{"name": "post", "files": str(world["text"] / "*.txt"), "weight": 0.7},
               {"name": "pre", "files": str(extra / "*.txt"), "weight": 0.3}]
    summary = run_stage(make_cfg(world, tmp_path / "run", lm_weight=1.0, sources=sources, phases=[
        {"name": "short", "seq_len": 32, "batch_size": 4, "micro_batch_size": 4, "lr": 3e-3, "max_tokens": 300}]))
    assert summary["phases"]["short"]["steps"] == 3  # ceil(300 / (4 x 32))
    meta = json.loads((tmp_path / "run" / "distill" / "short.meta.json").read_text())
    assert [s["weight"] for s in meta["fingerprint"]["data"]["sources"]] == [0.7, 0.3]


def test_streaming_stage_runs(world, tmp_path):
    from elastic.data import DataError

    cfg = make_cfg(world, tmp_path / "run", streaming=True, shuffle_buffer=4, max_steps=2)
    with pytest.raises(DataError, match="heldout_files"):  # a stream cannot leave out data.files' held-out tail
        run_stage(cfg)
    cfg.data.heldout_files = str(write_docs(tmp_path / "held", 2, seed=1))
    summary = run_stage(cfg)
    assert summary["phases"]["phase2"]["steps"] == 2


def test_bad_inputs_fail_clearly_and_write_nothing(world, tmp_path):
    from elastic.data import DataError
    from elastic.stages.distill import DistillError
    from elastic.train import ResumeError, SimulatedCrash

    with pytest.raises(DistillError, match="vocabulary"):
        run_stage(make_cfg(world, tmp_path / "vocab", student=str(world["student_vocab"])))
    with pytest.raises(DistillError, match="max_position_embeddings"):
        run_stage(make_cfg(world, tmp_path / "long", **{"phases.1.seq_len": 2048}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n \n")
    cfg = make_cfg(world, tmp_path / "empty_run")
    cfg.data.files = str(empty / "*.txt")
    with pytest.raises(DataError):
        run_stage(cfg)
    with pytest.raises(DistillError, match="multiple"):
        run_stage(make_cfg(world, tmp_path / "batch", **{"phases.1.micro_batch_size": 3}))
    with pytest.raises(DistillError, match="prune"):
        run_stage(make_cfg(world, tmp_path / "nostudent", student=None))
    for d in ("vocab", "long", "empty_run", "batch", "nostudent"):
        assert not (tmp_path / d / "distill").exists(), d
    # checkpoints of a run with another teacher: refused, and left untouched
    with pytest.raises(SimulatedCrash):
        run_stage(make_cfg(world, tmp_path / "other", fail_at_step=3))
    ckpt = tmp_path / "other" / "distill" / "checkpoints" / "phase1"
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    with pytest.raises(ResumeError, match="another run"):
        run_stage(make_cfg(world, tmp_path / "other", teacher="teacher2"))
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    # a finished phase of another run is not overwritten without force=true
    cfg = make_cfg(world, tmp_path / "done", max_steps=1)
    run_stage(cfg)
    (tmp_path / "done" / "distill" / "DONE.json").unlink()  # as the pipeline does when the config changed
    weights = tmp_path / "done" / "distill" / "phase1" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    with pytest.raises(DistillError, match="another run"):
        run_stage(make_cfg(world, tmp_path / "done", teacher="teacher2", max_steps=1))
    assert weights.stat().st_mtime_ns == mtime
    with pytest.raises(ResumeError, match="no checkpoint"):
        run_stage(make_cfg(world, tmp_path / "fresh", resume=True))


# ------------------------------------------------------------------------------------------------ worker


if __name__ == "__main__":  # the 2-process worker: `accelerate launch tests/test_distill.py OUT_DIR [ddp|fsdp] [CRASH_AT]`
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    crash = int(sys.argv[3]) if len(sys.argv) > 3 else None
    try:
        result = _loop_losses(out / "ckpt", steps=4, batch_size=4, micro=2, strategy=strategy, fail_at_step=crash)
    except Exception as e:  # the simulated crash: say so, exit non-zero
        print(f"worker stopped: {type(e).__name__}: {e}")
        sys.exit(3)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "losses.json").write_text(json.dumps(result.losses))
        (out / "resumed_from.json").write_text(json.dumps(result.resumed_from))
