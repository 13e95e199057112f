#!/usr/bin/env bash
# The few pure-Python wheels scripts/gpu_check.py needs on the lent GPU host (Python 3.12, torch,
# transformers, accelerate, tokenizers, pyarrow, pandas, fsspec, ... but no omegaconf or datasets, and no
# network), downloaded here into the ignored folder wheels/ (about 1.2 MB):
#   omegaconf + antlr4-python3-runtime   the distill stage reads an omegaconf config
#   datasets + dill + multiprocess       elastic/data.py imports datasets (its other needs are on the host)
# hydra is not needed: gpu_check composes conf/ with omegaconf alone. The device command then carries the
# folder and installs it first (see the docstring of scripts/gpu_check.py):
#   run(command="python3 -m pip install -q --no-index --no-deps wheels/*.whl && ... scripts/gpu_check.py --out $OUT",
#       carry=["wheels"], ...)
# Usage: bash scripts/gpu_check_wheels.sh [DEST]     (DEST defaults to wheels/ in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
# the versions the test suite runs with here
"$PY" -m pip download --no-deps --only-binary :all: --python-version 3.12 --implementation py --abi none \
    --platform any -d "$DEST" omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1
# multiprocess ships one wheel per Python version (py312 for the host's 3.12)
"$PY" -m pip download --no-deps --only-binary :all: --python-version 3.12 -d "$DEST" multiprocess==0.70.19
# antlr4-python3-runtime 4.9.3 (omegaconf pins 4.9.*) is published as a source archive only: build its
# pure-Python wheel here (py3-none-any, the same file for every Python 3)
"$PY" -m pip wheel --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
ls -l "$DEST"
