#!/usr/bin/env bash
# Runs the test suite on a CUDA machine (real Triton, no interpreter) and keeps the log.
# Usage (repo root, GPU machine): bash scripts/gpu_tests.sh [pytest args...]
set -uo pipefail
export PYTHONPATH=$PWD
if [ -f .gpu/site.tgz ]; then
  mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -f .gpu/site-newer.tgz ]; then  # scripts/gpu_site_newer.sh: transformers 5.23, fla (first)
  mkdir -p /tmp/site-newer && tar xzf .gpu/site-newer.tgz -C /tmp/site-newer
  export PYTHONPATH=/tmp/site-newer:$PYTHONPATH
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
python3 - <<'PY' | tee "$OUTDIR/gpu-tests-env.txt"
import torch, triton, transformers, peft
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
try:
    import trl; print("trl", trl.__version__)
except ImportError as e: print("trl missing", e)
PY
# Each failure's report is written as it happens (tests/conftest.py), so a run cut short by a
# time limit still says what failed and why.
export FASTLM_FAILURE_LOG="$OUTDIR/gpu-failures.txt"
python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$OUTDIR/gpu-tests.log"
