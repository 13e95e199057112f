"""Compare a virtualenv with the dependency lock, or write the lock from it.

    python scripts/lock_diff.py requirements.lock --venv .venv                 # what differs, one line a package
    python scripts/lock_diff.py requirements.lock --venv /tmp/latest --write   # make the lock from that venv

The lock (``requirements.lock``) is a pip constraints file: one ``name==version`` line per package that the
install script puts in a venv (every extra included), sorted, with a header saying how it was made. It pins
only what was installed together and tested; build-time tools (pip, setuptools, wheel) are left out, and so is
elastic itself (installed editable from the checkout).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import sys
from pathlib import Path

# Never pinned: the installer's own tools (a pinned setuptools would also constrain every package's isolated
# build environment through PIP_CONSTRAINT) and the project itself.
UNPINNED = {"pip", "setuptools", "wheel", "elastic"}


def canonical(name: str) -> str:
    """PEP 503 name: `Llama_CPP.python` and `llama-cpp-python` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"lock_diff: {path}:{n}: expected name==version, got {line!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed(venv: Path) -> dict[str, str]:
    """Name -> version of every distribution in the venv but editable ones (asked of the venv's own pip)."""
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"lock_diff: {py} does not exist")
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=json", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    return {canonical(d["name"]): d["version"] for d in json.loads(out) if canonical(d["name"]) not in UNPINNED}


def same_version(locked: str, have: str) -> bool:
    # torch's CPU wheel is `2.13.0+cpu`: `torch==2.13.0` accepts it (a local label is ignored), so do we.
    return locked == have or have.split("+", 1)[0] == locked


def diff(lock: dict[str, str], venv: dict[str, str]) -> dict[str, list]:
    changed = [(n, lock[n], venv[n]) for n in sorted(lock.keys() & venv.keys()) if not same_version(lock[n], venv[n])]
    added = [(n, venv[n]) for n in sorted(venv.keys() - lock.keys())]
    missing = [(n, lock[n]) for n in sorted(lock.keys() - venv.keys())]
    return {"changed": changed, "added": added, "missing": missing}


def render(d: dict[str, list], title: str, show_missing: bool) -> str:
    lines = [f"{title}:"]
    lines += [f"  {n:32s} {a} -> {b}" for n, a, b in d["changed"]]
    lines += [f"  {n:32s} (not in the lock) {v}" for n, v in d["added"]]
    if show_missing:
        lines += [f"  {n:32s} {v} -> (not installed)" for n, v in d["missing"]]
    if len(lines) == 1:
        lines.append("  nothing")
    return "\n".join(lines)


def write_lock(path: Path, venv: dict[str, str], note: str) -> None:
    stamp = _dt.date.today().isoformat()
    head = [
        "# The dependency lock: exact versions installed together and tested (a pip constraints file).",
        "# Used by scripts/install.sh and CI; `bash scripts/install.sh --latest` ignores it.",
        f"# Written {stamp} by: python scripts/lock_diff.py {path.name} --venv VENV --write  ({note})",
        "# Bump: bash scripts/check_latest.sh --write-lock, then the full test suite with the new lock (README).",
    ]
    body = [f"{n}=={v.split('+', 1)[0]}" for n, v in sorted(venv.items())]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(head + body) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lock", type=Path, help="the lock file (requirements.lock)")
    ap.add_argument("--venv", type=Path, default=Path(".venv"), help="the virtualenv to compare (default .venv)")
    ap.add_argument("--write", action="store_true", help="write the lock from the venv instead of comparing")
    ap.add_argument("--keep-missing", action="store_true", help="with --write: keep the old lock's pins of packages "
                    "the venv does not have (an extra that was not installed there)")
    ap.add_argument("--note", default="", help="with --write: a few words for the lock's header (e.g. the test run)")
    ap.add_argument("--title", default="differences from the lock", help="heading of the printed list")
    ap.add_argument("--missing", action="store_true", help="also list locked packages the venv does not have "
                    "(normal for extras that were not installed)")
    ap.add_argument("--quiet-if-same", action="store_true", help="print nothing when nothing changed or was added")
    ap.add_argument("--json", type=Path, help="also write the differences as JSON to this file")
    args = ap.parse_args(argv)

    have = installed(args.venv)
    if args.write:
        if args.keep_missing and args.lock.exists():
            have = {**read_lock(args.lock), **have}
        write_lock(args.lock, have, args.note or f"{len(have)} packages")
        print(f"wrote {args.lock}: {len(have)} packages")
        return 0
    d = diff(read_lock(args.lock), have)
    if args.json:
        args.json.write_text(json.dumps(d, indent=2) + "\n")
    if args.quiet_if_same and not d["changed"] and not d["added"]:
        return 0
    print(render(d, args.title, args.missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
