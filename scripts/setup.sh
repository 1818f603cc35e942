#!/usr/bin/env bash
# Creates .venv and installs fastlm with everything the demo and the tests need.
# On a machine without an NVIDIA GPU it installs the CPU build of torch 2.13.0 first (an
# unpinned torch would pull a multi-GB CUDA build). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch>=2.11,<2.14"
  else
    .venv/bin/python -m pip install -q torch==2.13.0
  fi
fi
.venv/bin/python -m pip install -q -e '.[test,demo,quant,export,embeddings]'
