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
exact-at-scale-new  the same for Gemma-4 4B and Qwen3.5-9B (site-newer)
flash-tiles    flash-attention launch shapes, one kernel at a time (Gemma-2 head_dim 256)
offload        weight streaming: 8B exactness and cost, 32B shape under an 8 GiB cap
multi-gpu      DDP and FSDP2 on 2 GPUs, 8B shape, LoRA and QLoRA (needs 2 GPUs)
packing-4b     real example lengths, padded vs padding-free: qwen3-4b LoRA and QLoRA (hf padded,
               hf padding-free, unsloth, fastlm padded, fastlm padding-free)
packing-8b     the same, llama-3.1-8b
embeddings-varlen  InfoNCE on variable-length pairs, Qwen3-Embedding-0.6B LoRA: hf, fastlm padded
               and padding-free, unsloth, in one run
graphs-memory  layer CUDA graphs: the pool's reserve for the loss (GPU test), then suite rows 3
               and 5 (Qwen3-4B, Llama-3.2-1B QLoRA) beside Unsloth
new-families   Qwen3.5 / Gemma 4 (needs .gpu/site-newer.tgz, scripts/gpu_site_newer.sh): their
               GPU tests
issue17        Qwen3.5-9B / Gemma-4 4B LoRA and QLoRA, hf, fastlm, unsloth (site-newer; ROWS=1-4
               by default; Unsloth compiles each layer for minutes first: where a row does not
               fit a call, SYSTEMS=hf,fastlm then SYSTEMS=unsloth into the same OUT)
issue18        Qwen3-30B-A3B (24 layers) / gpt-oss-20b LoRA and QLoRA, hf, fastlm, unsloth
               (site-newer; ROWS=1-2, then 3-4 with the checkpoint cache emptied: the two
               checkpoints, 31 and 42 GB, do not fit a 64 GB disk together)
moe-streaming  a 48-layer Qwen3-30B-A3B QLoRA step under an 8 GiB cap, and the resident step
step-8b        where the 8B rows' time and memory go: the bf16 GEMM ceiling of the shape
               (step_flops), step profiles of LoRA for fastlm and Unsloth, the allocator
               snapshot of fastlm's QLoRA step
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
newer=$(case $group in new-families | issue17 | issue18 | moe-streaming | exact-at-scale-new) echo 1 ;; esac)
if [ -n "$newer" ] && [ -f .gpu/site-newer.tgz ]; then  # transformers 5.23, fla
  mkdir -p /tmp/site-newer && tar xzf .gpu/site-newer.tgz -C /tmp/site-newer
  export PYTHONPATH=/tmp/site-newer:$PYTHONPATH
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
  exact-at-scale | exact-at-scale-new)
    shapes="llama-3.1-8b mistral-7b qwen3-4b gemma2-2b"
    [ $group = exact-at-scale-new ] && shapes="gemma4-4b qwen3.5-9b"
    for shape in $shapes; do
      python benchmarks/exactness_at_scale.py --shape $shape --seq 1024 \
        --out "$out/exact-$shape.json"
    done ;;
  flash-tiles) python benchmarks/flash_tile_sweep.py --out "$out/flash_tile_sweep.json" ;;
  offload) python benchmarks/offload_capacity.py --out "$out" ;;
  packing-4b | packing-8b)
    shape=$([ $group = packing-4b ] && echo qwen3-4b || echo llama-3.1-8b)
    python benchmarks/packing_bench.py --shapes $shape --modes lora,qlora --out "$out" \
      --child-timeout 120 ;;
  embeddings-varlen)
    python benchmarks/embedding_bench.py --shapes qwen3-embedding-0.6b --lengths alpaca_en_demo \
      --mode lora --systems hf,fastlm-padded,fastlm-padding-free,unsloth --profile \
      --child-timeout 200 --out "$out" ;;
  graphs-memory)
    OUT=$out bash scripts/gpu_tests.sh tests/offload/test_layer_graphs.py -k reserve
    python benchmarks/suite.py --rows 3,5 --systems fastlm,unsloth --fastlm-graphs \
      --child-timeout 150 --out "$out/suite" ;;
  new-families)
    OUT=$out bash scripts/gpu_tests.sh tests/kernels/test_gated_delta_dqkwg.py \
      tests/models/test_gemma4.py tests/models/test_qwen3_5.py ;;
  issue17 | issue18)
    python benchmarks/suite.py --suite $group --rows "${ROWS:-1-4}" \
      --systems "${SYSTEMS:-hf,fastlm,unsloth}" \
      --warmup 2 --steps 6 --child-timeout 480 --out "$out" ;;
  step-8b)
    python benchmarks/step_flops.py --shape llama-3.1-8b --measure-ceiling \
      --out "$out/step-flops.json"
    for system in fastlm unsloth; do
      python benchmarks/profile_step.py --shape llama-3.1-8b --mode lora --system $system \
        --rows 40 > "$out/profile-lora-$system.txt"
    done
    python benchmarks/profile_step.py --shape llama-3.1-8b --mode qlora --system fastlm \
      --no-graphs --rows 30 --memory-snapshot "$out/snapshot-qlora.pickle" \
      > "$out/memory-qlora-fastlm.txt" ;;
  moe-streaming)
    python benchmarks/offload_capacity.py --parts capacity --capacity-shape qwen3-30b-a3b-24l \
      --layers 48 --resident --out "$out" ;;
  multi-gpu)
    for mode in lora qlora; do
      for parallel in ddp fsdp2; do
        python benchmarks/multi_gpu_bench.py --shape llama-3.1-8b --systems hf,fastlm \
          --gpus 2 --parallel $parallel --mode $mode --out "$out/$mode-$parallel"
      done
    done ;;
esac 2>&1 | tee "$out/run.log"
