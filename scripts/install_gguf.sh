#!/usr/bin/env bash
# The gguf extra: llama.cpp (through llama-cpp-python, built from source for this CPU) and its converter.
#   bash scripts/install.sh --gguf        # the usual way (installs elastic first, then this)
#   bash scripts/install_gguf.sh          # into an existing ./.venv
# PyPI ships llama-cpp-python as an sdist that vendors llama.cpp: its converter (convert_hf_to_gguf.py,
# conversion/, gguf-py/) is not installed by the wheel, so the unpacked sdist is kept in the cache and
# elastic/gguf.py runs the converter from there. The compiled wheel is cached beside it:
#   $ELASTIC_CACHE/gguf/ (default ~/.cache/elastic/gguf/)
#     llama_cpp_python-<v>.tar.gz                         the sdist
#     llama_cpp_python-<v>/vendor/llama.cpp/              llama.cpp's sources, converter and gguf-py
#     llama_cpp_python-<v>-*.whl                          the wheel built here (CPU, -march=native)
# Cost on 2 CPU cores: the first build compiles llama.cpp (8-10 min idle; 52 min on cores shared with 3 other
# jobs), later installs use the cached wheel (under a minute).
# The wheel is tuned to the CPU it was built on (GGML_NATIVE): delete the cache folder on another CPU.
# CMAKE_ARGS adds llama.cpp build options (e.g. -DGGML_CUDA=on on a GPU host; then delete the cached wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE="${ELASTIC_CACHE:-$HOME/.cache/elastic}/gguf"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE/llama_cpp_python-$VERSION"
PIP=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || { echo "no ./.venv: run bash scripts/install.sh --gguf" >&2; exit 2; }
mkdir -p "$CACHE"

if [ ! -f "$SDIST" ]; then
  "${PIP[@]}" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
fi
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  tar -xzf "$SDIST" -C "$CACHE"
fi
WHEEL=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
  echo "building llama-cpp-python $VERSION (llama.cpp for this CPU; ~10 min on 2 cores, once; cached in $CACHE)"
  # The multimodal library (LLAVA_BUILD) is not needed for text models and costs build time.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    nice -n 15 "${PIP[@]}" wheel -q --no-deps -w "$CACHE" "$SDIST"
  WHEEL=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
"${PIP[@]}" install -q "$WHEEL"
# The [gguf] extra pins the same llama-cpp-python (already satisfied by the wheel) and adds gguf.
"${PIP[@]}" install -q -e ".[gguf]"
.venv/bin/python -c "import llama_cpp, gguf; print('gguf extra installed: llama-cpp-python', llama_cpp.__version__, '| converter in $SRC/vendor/llama.cpp')"
