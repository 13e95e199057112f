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
#     wheel-<v>-<stamp>/llama_cpp_python-<v>-*.whl        the wheel built here (CPU, -march=native, no AMX)
#     wheel-<v>-<stamp>/build-flags.txt                   the flags that <stamp> hashes
# <stamp> hashes every build input (version, CMAKE_ARGS, CFLAGS, CXXFLAGS, BUILD_RECIPE), so a wheel built
# with other flags -- such as the AMX builds this script made before, whose wheel sat directly in gguf/ --
# is never reused: changing a flag rebuilds. Old wheels are left where they are (delete them at will).
# Cost on 2 CPU cores: the first build compiles llama.cpp (8-10 min idle; 52 min on cores shared with 3 other
# jobs), later installs use the cached wheel (under a minute).
# The wheel is tuned to the CPU it was built on (GGML_NATIVE, -march=native): delete the cache folder on
# another CPU.
# AMX is off (-mno-amx-*): -march=native on a CPU that advertises AMX (these VMs do) compiles ggml's AMX
# matmul kernels (ggml-cpu/amx/mmq.cpp), which killed the export of the toy parent with SIGILL (exit 132,
# "trap invalid opcode" in the kernel log, no Python traceback). The cause is not a missing
# arch_prctl(ARCH_REQ_XCOMP_PERM): ggml requests the tile state (ggml_amx_init) and the kernel grants it
# here, and using AMX without it raises SIGILL with no "trap invalid opcode" line. What gives exactly that
# line (C probe on these VMs) is a `tilezero` after the tile configuration was reset by a `tilerelease`:
# ggml loads its configuration once per thread (ggml_tile_config_init's thread_local flag) and never again,
# so anything else in the process that releases the tiles on that thread breaks its next matmul (PyTorch's
# oneDNN AMX kernels end with a tilerelease; which caller did it here was not traced). Without AMX ggml
# runs the same types with its AVX-512 kernels, and elastic runs llama.cpp in a child process of its own
# (elastic/gguf.py, in_child), so any crash is one error line naming the signal.
# CMAKE_ARGS adds llama.cpp build options (e.g. -DGGML_CUDA=on on a GPU host; the stamp changes, so it
# rebuilds).
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
# Bump BUILD_RECIPE when this script changes how the wheel is built in a way the flags below do not show.
BUILD_RECIPE=2
NO_AMX=""
case "$(uname -m)" in
  x86_64|amd64)
    # Only where the compiler knows AMX (GCC >= 11, clang >= 12); one that does not cannot emit it either.
    if echo 'int main(void){return 0;}' | "${CC:-cc}" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c -o /dev/null - 2>/dev/null; then
      NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi ;;
esac
# GGML_NATIVE passes only -march=native to GCC/clang (ggml's GGML_AMX_* options apply to non-native builds),
# so AMX goes off through the compiler flags: an explicit -mno-amx-* wins over -march=native in any order.
# The multimodal library (LLAVA_BUILD) is not needed for text models and costs build time.
BUILD_CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}"
BUILD_CFLAGS="${CFLAGS:-} $NO_AMX"
BUILD_CXXFLAGS="${CXXFLAGS:-} $NO_AMX"
FLAGS="llama-cpp-python=$VERSION recipe=$BUILD_RECIPE CMAKE_ARGS=$BUILD_CMAKE_ARGS CFLAGS=$BUILD_CFLAGS CXXFLAGS=$BUILD_CXXFLAGS"
STAMP=$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheel-$VERSION-$STAMP"
WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
  echo "building llama-cpp-python $VERSION (llama.cpp for this CPU, AMX off; ~10 min on 2 cores, once; cached in $WHEELS)"
  mkdir -p "$WHEELS"
  CMAKE_ARGS="$BUILD_CMAKE_ARGS" CFLAGS="$BUILD_CFLAGS" CXXFLAGS="$BUILD_CXXFLAGS" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    nice -n 15 "${PIP[@]}" wheel -q --no-deps -w "$WHEELS" "$SDIST"
  echo "$FLAGS" > "$WHEELS/build-flags.txt"
  WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
# --force-reinstall: a venv holding the same version built with other flags (an old AMX build) gets this one;
# --no-deps keeps its dependencies (numpy, ...) as they are, and the second line adds those still missing.
"${PIP[@]}" install -q --force-reinstall --no-deps "$WHEEL"
"${PIP[@]}" install -q "$WHEEL"
# The [gguf] extra pins the same llama-cpp-python (already satisfied by the wheel) and adds gguf.
"${PIP[@]}" install -q -e ".[gguf]"
.venv/bin/python -c "import llama_cpp, gguf; print('gguf extra installed: llama-cpp-python', llama_cpp.__version__, '| converter in $SRC/vendor/llama.cpp')"
