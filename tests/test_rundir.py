"""The run directory's commit protocol: a crash at any point leaves a state the next run accepts and reads right.

A crash is real here: the write runs in a forked child that dies (`os._exit`, no cleanup, no `finally`)
just before its N-th `os.replace` or `os.fsync`, for every N until the write completes.
"""

import os

import pytest
import torch

from elastic.rundir import SIDE, RunDir, atomic_dir, read_json

CRASHED = 77


def write(run: RunDir, kind: str, tag: str, overwrite: bool) -> None:
    """One artifact of each kind, tagged in its content and in its sidecar (so a mismatch is visible)."""
    if kind == "dir":
        with run.artifact_dir("stage/model", stage="stage", overwrite=overwrite, tag=tag) as (tmp, _):
            (tmp / "weights.txt").write_text(tag)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "config.json").write_text("{}")
    elif kind == "json":
        run.save_json("stage/archs.json", {"tag": tag}, stage="stage", tag=tag)
    else:
        run.save_tensors("stage/ranking.safetensors", {"tag": torch.tensor([float(len(tag))])}, stage="stage", tag=tag)


ARTIFACT = {"dir": "stage/model", "json": "stage/archs.json", "tensors": "stage/ranking.safetensors"}


def content_tag(run: RunDir, kind: str) -> str:
    p = run.path(ARTIFACT[kind])
    if kind == "dir":
        return (p / "weights.txt").read_text()
    if kind == "json":
        return read_json(p)["tag"]
    return {3.0: "old", 4.0: "new!"}[float(run.load_tensors(ARTIFACT[kind])["tag"][0])]  # the tags' lengths


def crash_at(n: int, fn) -> bool:
    """Run `fn` in a forked child killed just before its n-th os.replace / os.fsync; True if it died there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        calls = [0]
        real_replace, real_fsync = os.replace, os.fsync

        def hook(real):
            def f(*a, **k):
                calls[0] += 1
                if calls[0] == n:
                    os._exit(CRASHED)
                return real(*a, **k)
            return f

        os.replace, os.fsync = hook(real_replace), hook(real_fsync)
        try:
            fn()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, CRASHED), f"the write failed without a crash (exit {code})"
    return code == CRASHED


def stage(run: RunDir, kind: str, tag: str, force: bool) -> None:
    """What a stage does on a rerun: keep a finished artifact of this run, else (re)write it."""
    if run.is_complete(ARTIFACT[kind]) and run.read_sidecar(ARTIFACT[kind])["tag"] == tag and not force:
        return
    write(run, kind, tag, overwrite=force)


@pytest.mark.parametrize("kind", ["dir", "json", "tensors"])
@pytest.mark.parametrize("scenario", ["fresh", "overwrite"])
def test_a_crash_at_any_point_is_never_misread_and_the_rerun_proceeds(tmp_path, kind, scenario):
    """fresh: the first write of the artifact dies; the same stage rerun WITHOUT force completes it.
    overwrite: replacing an old artifact (force) dies; the old artifact is never paired with the new sidecar."""
    crashes = 0
    for n in range(1, 100):
        run = RunDir(tmp_path / f"{n}")
        if scenario == "overwrite":
            write(run, kind, "old", overwrite=False)
        if not crash_at(n, lambda: write(run, kind, "new!", overwrite=scenario == "overwrite")):
            break
        crashes += 1
        p = run.path(ARTIFACT[kind])
        if p.exists():  # whatever exists under the artifact's name is described by the sidecar beside it
            assert run.sidecar_path(p).exists(), f"crash {n}: artifact without its sidecar"
            assert run.read_sidecar(p)["tag"] == content_tag(run, kind), f"crash {n}: sidecar of another artifact"
        stage(run, kind, "new!", force=scenario == "overwrite")
        assert run.is_complete(p) and content_tag(run, kind) == "new!" and run.read_sidecar(p)["tag"] == "new!"
        debris = [x.name for x in p.parent.iterdir() if x.name.startswith(".")]
        assert not debris, f"crash {n}: left behind {debris}"
    assert crashes >= 3  # really crashed at several points (temporaries, sidecar, rename, fsyncs)


def test_an_artifact_without_sidecar_is_unfinished_and_redone_a_finished_one_is_kept(tmp_path):
    run = RunDir(tmp_path)
    (run.path("stage/model")).mkdir(parents=True)  # what the older order (sidecar last) left after a crash
    assert not run.is_complete("stage/model")
    write(run, "dir", "new!", overwrite=False)
    assert run.is_complete("stage/model")
    with pytest.raises(FileExistsError, match="force=true"):
        write(run, "dir", "other", overwrite=False)
    assert content_tag(run, "dir") == "new!"
    (run.path("stage") / f"gone{SIDE}").write_text("{}")  # a sidecar whose artifact never arrived: not finished
    assert not run.is_complete("stage/gone")


def test_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without these, a power cut can keep the rename but lose the data (or the other way round)."""
    events = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = RunDir(tmp_path)
    write(run, "dir", "new!", overwrite=False)
    final = str(run.path("stage/model"))
    i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    tmp = events[i][1]
    synced_before = {e[1] for e in events[:i] if e[0] == "fsync"}
    assert {tmp + "/weights.txt", tmp + "/sub/config.json", tmp + "/sub", tmp} <= synced_before
    assert str(run.sidecar_path(final)) in {e[2] for e in events[:i] if e[0] == "replace"}  # sidecar first
    assert ("fsync", str(run.path("stage"))) in events[i + 1:]
    for rel, fn in [("stage/archs.json", lambda: run.save_json("stage/archs.json", {}, stage="s")),
                    ("stage/DONE.json", lambda: run.mark_done("stage"))]:
        events.clear()
        fn()
        i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(run.path(rel)))
        assert any(e[0] == "fsync" and e[1].startswith(str(run.path("stage", "."))) for e in events[:i])
        assert ("fsync", str(run.path("stage"))) in events[i + 1:]


def test_atomic_dir_keeps_the_old_copy_when_the_block_fails(tmp_path):
    final = tmp_path / "report"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
