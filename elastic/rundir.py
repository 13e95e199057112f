"""The run directory: the only channel between stages.

Every artifact (a rankings file, `archs.json`, a checkpoint folder) is written atomically -- into a
temporary sibling first, fsynced, then renamed into place and the parent folder fsynced -- so a crash
never leaves a half-written artifact that a later stage could mistake for a finished one. Each
artifact gets a JSON sidecar ``<name>.meta.json`` beside it (never inside a model folder: serving
engines read every file there) describing how it was made (stage, config, inputs, library versions,
git sha).

The pair is committed in one order: the old artifact (if any) is moved out of the way, the new
sidecar is written, and the artifact's rename comes last. So an artifact that exists always has the
sidecar describing it, whatever the crash point; a sidecar without its artifact, a leftover temporary
sibling (``.<name>.<random>.tmp``) or a moved-aside ``.<name>.old`` are crash debris: ignored, and
removed by the next write of that artifact. An artifact without a sidecar (a crash under the older
order, which wrote the sidecar last) counts as unfinished (`RunDir.is_complete`) and is overwritten.
A stage is finished when its ``<stage>/DONE.json`` marker exists; rerunning a finished stage is a
no-op unless forced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

SIDE = ".meta.json"


def versions() -> dict[str, str]:
    """Library versions worth recording beside every artifact."""
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "datasets", "accelerate", "nvidia-modelopt", "elastic"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def to_jsonable(obj: Any) -> Any:
    """OmegaConf configs, Paths, tuples and dataclasses as plain JSON values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in folder `path` durable (a rename is only in the page cache until
    its folder is fsynced: after a power cut the old name could come back)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (some network mounts) refuse fsync on a folder: best effort there
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (e.g. what `save_pretrained` wrote, before the folder's
    rename makes it a finished artifact: the rename must never reach the disk before the data)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _temp_name(name: str) -> re.Pattern:
    # what tempfile.mkstemp / mkdtemp make below: ".<name>.<8 random chars>.tmp" (the sidecar's own temps,
    # ".<name>.meta.json.<random>.tmp", do not match: the random part has no dots)
    return re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp$")


def clean_stale(final: str | Path) -> None:
    """Remove what a crashed write of `final` left beside it: temporary siblings and a moved-aside old copy.
    Call it only from the one process that writes `final` (the main one)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    pats = (_temp_name(final.name), _temp_name(final.name + SIDE))  # its own temporaries and its sidecar's
    for p in final.parent.iterdir():
        if any(pat.match(p.name) for pat in pats) or p.name == f".{final.name}.old":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as pretty JSON."""
    path = Path(path)
    _atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())
    return path


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _retire(final: Path) -> None:
    """Move an existing artifact out of its name (`.<name>.old`, removed by the caller or the next write),
    durably, before a new sidecar is written: the old artifact must never sit beside the new sidecar."""
    if not (final.exists() or final.is_symlink()):
        return
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    else:
        final.unlink()
    fsync_dir(final.parent)


@contextlib.contextmanager
def _staged_dir(final: Path, overwrite: bool, before_rename=None) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass force=true to overwrite it")
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(f".{final.name}.old")
    sidecar_started = False
    try:
        yield tmp
        fsync_tree(tmp)
        _retire(final)
        if before_rename is not None:
            sidecar_started = True
            before_rename()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        # an exception (not a kill) after the old copy was moved aside: put it back, unless a new sidecar may
        # already sit beside its name (the old folder must never be read as the new one)
        if not sidecar_started and old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)
                fsync_dir(final.parent)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block finishes.

    On an exception the temporary directory is removed and `final` is left as it was. Its files are
    fsynced before the rename and the parent folder after it. An old `final` is moved aside to
    ``.<name>.old`` just before the rename (a crash right there leaves `final` missing, never half-written).
    """
    with _staged_dir(Path(final), overwrite) as tmp:
        yield tmp


class RunDir:
    """A run directory: ``<root>/<stage>/...`` artifacts, each with a ``.meta.json`` sidecar."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def beside(self, folder: str | Path, artifact: str) -> Path:
        """Where our own `artifact` of an exported model folder lives: ``<folder>.<artifact>`` next to
        it (``prune/budget-0.5.arch.json``), never inside, where serving engines would read it as the model's."""
        p = self.path(str(folder))
        return p.with_name(f"{p.name}.{artifact}")

    # ---------------------------------------------------------------- sidecars
    def sidecar_path(self, artifact: str | Path) -> Path:
        """``<artifact>.meta.json`` beside `artifact` (a path, or one relative to the run)."""
        p = self.path(str(artifact))
        return p.with_name(p.name + SIDE)

    def write_sidecar(self, artifact: str | Path, *, stage: str, config: Any = None, inputs: Any = None, **extra) -> Path:
        meta = {
            "artifact": Path(artifact).name,
            "stage": stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs or {},
            "versions": versions(),
            "git_sha": git_sha(),
            **extra,
            "config": config,
        }
        return write_json(self.sidecar_path(artifact), meta)

    def read_sidecar(self, artifact: str | Path) -> dict:
        return read_json(self.sidecar_path(artifact))

    def is_complete(self, artifact: str | Path) -> bool:
        """Whether `artifact` (a path, or one relative to the run) is finished: it and its sidecar exist. The
        sidecar is written first and the artifact renamed into place last, so this is also what the artifact's
        existence alone says -- except for an artifact left by a crash under the older order (sidecar last)."""
        p = self.path(str(artifact))
        return p.exists() and self.sidecar_path(p).exists()

    # ---------------------------------------------------------------- artifacts
    def _commit_file(self, p: Path, data: bytes, meta: dict) -> Path:
        # the payload is ready before anything on disk changes; then: old artifact out of the way, new
        # sidecar, the artifact's own rename last (see the module docstring for why in this order)
        p.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(p)
        _retire(p)
        self.write_sidecar(p, **meta)
        _atomic_write_bytes(p, data)
        return p

    def save_json(self, rel: str, obj: Any, *, stage: str, config: Any = None, inputs: Any = None, **extra) -> Path:
        """Write a JSON artifact and its sidecar (the sidecar first: the artifact's rename completes the pair)."""
        data = (json.dumps(to_jsonable(obj), indent=2) + "\n").encode()
        return self._commit_file(self.path(rel), data, dict(stage=stage, config=config, inputs=inputs, **extra))

    def save_tensors(self, rel: str, tensors: dict, *, stage: str, config: Any = None, inputs: Any = None, **extra) -> Path:
        """Write a safetensors artifact (contiguous CPU tensors) and its sidecar, committed like `save_json`."""
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        return self._commit_file(self.path(rel), data, dict(stage=stage, config=config, inputs=inputs, **extra))

    def load_tensors(self, rel: str) -> dict:
        from safetensors.torch import load_file

        p = self.path(rel)
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run the stage that writes it first")
        return load_file(p)

    @contextlib.contextmanager
    def artifact_dir(self, rel: str, *, stage: str, config: Any = None, inputs: Any = None, overwrite: bool = False, **extra):
        """Yield ``(temp dir, extra dict)`` to fill (e.g. `save_pretrained`; entries added to the dict go into the
        sidecar); on success the folder is fsynced, the sidecar written and the folder renamed to `rel`.

        An existing `rel` is replaced only with `overwrite` -- or when it is unfinished (no sidecar: what a crash
        under the older commit order left), which is never another run's result."""
        final = self.path(rel)
        extra_holder: dict = {}

        def sidecar() -> None:
            self.write_sidecar(final, stage=stage, config=config, inputs=inputs, **extra, **extra_holder)

        with _staged_dir(final, overwrite or not self.is_complete(final), before_rename=sidecar) as tmp:
            yield tmp, extra_holder

    # ---------------------------------------------------------------- stage markers
    def done_path(self, stage: str) -> Path:
        return self.path(stage, "DONE.json")

    def is_done(self, stage: str) -> bool:
        return self.done_path(stage).exists()

    def mark_done(self, stage: str, summary: Any = None, config: Any = None, **extra) -> Path:
        clean_stale(self.done_path(stage))  # a temporary of a marker write that a crash cut short
        return write_json(
            self.done_path(stage),
            {
                "stage": stage,
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "summary": summary,
                "git_sha": git_sha(),
                **extra,
                "config": config,
            },
        )

    def done_record(self, stage: str) -> dict | None:
        p = self.done_path(stage)
        return read_json(p) if p.exists() else None

    def clear_done(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.done_path(stage).unlink()
            fsync_dir(self.done_path(stage).parent)  # or the marker may come back after a power cut


def remove_temps(folder: str | Path, names) -> None:
    """`clean_stale` for each of the artifacts `names` of `folder`: what a killed writer left (its temporaries,
    its sidecar's, a moved-aside old copy). A crash inside Python removes its own temporary (see `atomic_dir`); a
    SIGKILL or a power cut cannot, and every retry would add one more. Call it before writing `names` again, from
    the one process that writes them."""
    for name in names:
        clean_stale(Path(folder) / name)
