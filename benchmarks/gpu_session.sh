#!/usr/bin/env bash
# One GPU session: the benchmarks behind benchmarks/RESULTS.md, one run id.
# Usage on the GPU host (after `source .gpukit/device.sh`):
#   setsid nohup bash benchmarks/gpu_session.sh OUTDIR > OUTDIR.log 2>&1 &
# Ordered by what matters most if the session's device time runs out.
set -u
OUT=${1:?output directory}
mkdir -p "$OUT"
export ASYNC_EXECUTOR_RUN_ID=${ASYNC_EXECUTOR_RUN_ID:-$(date +%Y%m%d-%H%M%S)-h100}
step() { echo "=== $(date +%T) $*"; }
# The reference design's headline: 8B shape, batch 32, 8192 new tokens.
step reference
python3 -m benchmarks --preset reference --out "$OUT/reference" --timeout 700
# Exactness with EOS and stop strings, tiny model and the 1B shape.
step exactness
python3 -m benchmarks.gpu_exactness --out "$OUT/exactness" --settings decode_window=16
# 1B shape, batch 128: where vLLM is CPU-bound; the current code, and depth 3.
step llama-1b
python3 -m benchmarks --shape llama-1b --batch 128 --prompt-len 256 --gen-len 1024 \
  --systems 'vllm-async,async_executor[decode_window=16],async_executor[decode_window=16,depth=3]' \
  --reps 2 --attention-backend TRITON_ATTN --out "$OUT/llama-1b" --timeline --timeout 400
# Transformers continuous batching next to vLLM (short run).
step hf
python3 -m benchmarks --shape llama-1b --batch 32 --prompt-len 256 --gen-len 256 \
  --systems 'vllm-async,hf-sync,hf-async' --reps 1 \
  --attention-backend TRITON_ATTN --out "$OUT/hf" --timeout 400
step "session done: $ASYNC_EXECUTOR_RUN_ID"
