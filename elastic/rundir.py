"""The run directory: the only channel between stages.

Every artifact (a rankings file, `archs.json`, a checkpoint folder) is written atomically -- into a
temporary sibling first, then renamed into place -- so a crash never leaves a half-written artifact
that a later stage could mistake for a finished one. Each artifact gets a JSON sidecar
``<name>.meta.json`` describing how it was made (stage, config, inputs, library versions, git sha).
A stage is finished when its ``<stage>/DONE.json`` marker exists; rerunning a finished stage is a
no-op unless forced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
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


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as pretty JSON."""
    path = Path(path)
    _atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())
    return path


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block finishes.

    On an exception the temporary directory is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass force=true to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # Move the old artifact aside first so there is no moment with neither copy on disk.
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


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
        p = Path(artifact)
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

    # ---------------------------------------------------------------- artifacts
    def save_json(self, rel: str, obj: Any, *, stage: str, config: Any = None, inputs: Any = None, **extra) -> Path:
        """Write a JSON artifact and its sidecar. The sidecar goes last: an artifact without one is unfinished."""
        p = write_json(self.path(rel), obj)
        self.write_sidecar(p, stage=stage, config=config, inputs=inputs, **extra)
        return p

    def save_tensors(self, rel: str, tensors: dict, *, stage: str, config: Any = None, inputs: Any = None, **extra) -> Path:
        """Write a safetensors artifact (contiguous CPU tensors) and its sidecar."""
        from safetensors.torch import save

        p = self.path(rel)
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _atomic_write_bytes(p, data)
        self.write_sidecar(p, stage=stage, config=config, inputs=inputs, **extra)
        return p

    def load_tensors(self, rel: str) -> dict:
        from safetensors.torch import load_file

        p = self.path(rel)
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run the stage that writes it first")
        return load_file(p)

    @contextlib.contextmanager
    def artifact_dir(self, rel: str, *, stage: str, config: Any = None, inputs: Any = None, overwrite: bool = False, **extra):
        """Yield a temp dir to fill (e.g. `save_pretrained`); it becomes `rel` (with sidecar) on success."""
        final = self.path(rel)
        extra_holder: dict = {}
        with atomic_dir(final, overwrite=overwrite) as tmp:
            yield tmp, extra_holder
        self.write_sidecar(final, stage=stage, config=config, inputs=inputs, **extra, **extra_holder)

    # ---------------------------------------------------------------- stage markers
    def done_path(self, stage: str) -> Path:
        return self.path(stage, "DONE.json")

    def is_done(self, stage: str) -> bool:
        return self.done_path(stage).exists()

    def mark_done(self, stage: str, summary: Any = None, config: Any = None, **extra) -> Path:
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


def remove_temps(folder: str | Path, names) -> list[Path]:
    """Delete what a killed writer of the artifacts `names` left in `folder` and return it: their temporaries
    (``.<name>.*.tmp``, files or folders, sidecars' included) and a replaced copy (``.<name>.old``).

    A crash inside Python removes its temporary (see `atomic_dir`); a SIGKILL or a power cut cannot, and
    every retry would add one more. Call it before writing `names` again, from the one process that writes them.
    """
    import glob

    gone = []
    for name in names:
        esc = glob.escape(str(name))
        for p in [*Path(folder).glob(f".{esc}.*.tmp"), *Path(folder).glob(f".{esc}.old")]:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
