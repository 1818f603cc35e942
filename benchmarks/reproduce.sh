#!/usr/bin/env bash
# Re-runs the GPU measurements the docs quote, one group at a time (each fits in ~10 minutes on
# an H100, the multi-GPU group needs two GPUs of one host). Results go to $OUT/<group>/.
#
# Usage (repo root, CUDA machine, packages from .gpu/site.tgz when the machine lacks them):
#   OUT=/tmp/out bash benchmarks/reproduce.sh families-a
#   bash benchmarks/reproduce.sh --list
set -uo pipefail

GROUPS_HELP="
exactness      the test suite on the GPU (real Triton, bf16 checks): kernels, autograd, models,
               offload (CUDA copy engine), embeddings
families-a     LoRA, side by side: qwen3-4b, mistral-7b (hf, fastlm, liger, unsloth)
families-b     LoRA, side by side: gemma2-2b, qwen2.5-7b, gemma-2b (hf, fastlm, liger, unsloth)
core           LoRA, side by side: llama-3.2-1b, llama-3.1-8b (hf, fastlm, liger, unsloth)
qlora          QLoRA, side by side: llama-3.2-1b, qwen3-4b, llama-3.1-8b (hf, fastlm, unsloth)
long-context   longest 8B QLoRA step (batch 1) by bisection: hf and fastlm
attention      soft-capped flash attention vs eager and SDPA, Gemma-2 head shapes
embeddings     InfoNCE LoRA on Qwen3-Embedding shapes: hf, fastlm, sentence-transformers
exact-at-scale fastlm bf16 and HF bf16 LoRA gradients vs HF fp32, four families at full size
flash-tiles    flash-attention launch shapes, one kernel at a time (Gemma-2 head_dim 256)
offload        weight streaming: 8B exactness and cost, 32B shape under an 8 GiB cap
multi-gpu      DDP and FSDP2 on 2 GPUs, 8B shape, LoRA and QLoRA (needs 2 GPUs)
"

if [ $# -ne 1 ] || [ "$1" = "--list" ] || [ "$1" = "-h" ]; then
  echo "usage: OUT=<folder> bash benchmarks/reproduce.sh <group>"
  echo "$GROUPS_HELP"
  exit $([ $# -eq 1 ] && echo 0 || echo 2)
fi
group=$1
if ! grep -q "^$group " <<<"$GROUPS_HELP"; then
  echo "unknown group '$group'"; echo "$GROUPS_HELP"; exit 2
fi
out=${OUT:-benchmarks/results/$(date -u +%F)}/$group
mkdir -p "$out"

if [ -f .gpu/site.tgz ]; then
  mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
peers=hf,fastlm,liger,unsloth
train() { python benchmarks/train_bench.py --child-timeout 240 --out "$out" "$@"; }

case $group in
  exactness)
    OUT=$out bash scripts/gpu_tests.sh tests/kernels tests/autograd tests/models tests/offload \
      tests/embeddings ;;
  families-a) train --shapes qwen3-4b,mistral-7b --systems $peers ;;
  families-b) train --shapes gemma2-2b,qwen2.5-7b,gemma-2b --systems $peers ;;
  core) train --shapes llama-3.2-1b,llama-3.1-8b --systems $peers ;;
  qlora) train --mode qlora --shapes llama-3.2-1b,qwen3-4b,llama-3.1-8b --systems hf,fastlm,unsloth ;;
  long-context)
    python benchmarks/long_context.py --shape llama-3.1-8b --mode qlora --systems hf fastlm \
      --out "$out" ;;
  attention)
    python benchmarks/attention_bench.py --model-layers 4 --model-seq 4096 \
      --out "$out/attention.json" ;;
  embeddings)
    python benchmarks/embedding_bench.py --shapes qwen3-embedding-0.6b,qwen3-embedding-4b \
      --systems hf,fastlm,st --child-timeout 240 --out "$out" ;;
  exact-at-scale)
    for shape in llama-3.1-8b mistral-7b qwen3-4b gemma2-2b; do
      python benchmarks/exactness_at_scale.py --shape $shape --seq 1024 \
        --out "$out/exact-$shape.json"
    done ;;
  flash-tiles) python benchmarks/flash_tile_sweep.py --out "$out/flash_tile_sweep.json" ;;
  offload) python benchmarks/offload_capacity.py --out "$out" ;;
  multi-gpu)
    for mode in lora qlora; do
      for parallel in ddp fsdp2; do
        python benchmarks/multi_gpu_bench.py --shape llama-3.1-8b --systems hf,fastlm \
          --gpus 2 --parallel $parallel --mode $mode --out "$out/$mode-$parallel"
      done
    done ;;
esac 2>&1 | tee "$out/run.log"
