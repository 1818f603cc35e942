#!/usr/bin/env bash
# Packs, for an offline GPU machine whose transformers predates this year's families, the newer
# transformers (5.23: qwen3_5, gemma4) with the hub/tokenizers it needs (the hub 2.4 imports httpx2), and flash-linear-attention
# (Qwen3.5's Gated DeltaNet kernels), into .gpu/site-newer.tgz. Run it on a machine with PyPI.
# On the GPU machine, put it before the other site on PYTHONPATH:
#   mkdir -p /tmp/site-newer && tar xzf .gpu/site-newer.tgz -C /tmp/site-newer
#   export PYTHONPATH=/tmp/site-newer:/tmp/site:$PWD
# (scripts/gpu_tests.sh does this when the archive is there.)
set -euo pipefail
cd "$(dirname "$0")/.."
DL=$(mktemp -d); SITE=$(mktemp -d)
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $DL"
PKGS="transformers==5.23.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0
      fla-core==0.5.2 flash-linear-attention==0.5.2 einops==0.8.2
      httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5"
for p in $PKGS; do python3 -m pip download -q $P "$p"; done
for w in "$DL"/*.whl; do unzip -q -o "$w" -d "$SITE"; done
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .gpu && tar czf .gpu/site-newer.tgz -C "$SITE" . && rm -rf "$DL" "$SITE"
ls -la .gpu/site-newer.tgz
