#!/usr/bin/env bash
# One GPU session: every benchmark behind benchmarks/RESULTS.md, one run id.
# Usage on the GPU host (after `source .gpukit/device.sh`):
#   setsid nohup bash benchmarks/gpu_session.sh OUTDIR > OUTDIR.log 2>&1 &
set -u
OUT=${1:?output directory}
mkdir -p "$OUT"
export ASYNC_EXECUTOR_RUN_ID=${ASYNC_EXECUTOR_RUN_ID:-$(date +%Y%m%d-%H%M%S)-h100}
OURS='async_executor[decode_window=16],async_executor[decode_window=32]'
# 1B shape, batch 32 and 128: where vLLM is CPU-bound.
python3 -m benchmarks --preset cpu-bound --systems "vllm-async,$OURS" --reps 2 \
  --out "$OUT/llama-1b" --timeline --timeout 400
# 8B shape, batch 32: near the HBM floor; no regression, and vs synchronous.
python3 -m benchmarks --shape llama-8b --batch 32 --prompt-len 256 --gen-len 1024 \
  --systems 'vllm-sync,vllm-async,async_executor[decode_window=16]' --reps 2 \
  --attention-backend TRITON_ATTN --out "$OUT/llama-8b" --timeline --timeout 500
# Exactness with EOS and stop strings.
python3 -m benchmarks.gpu_exactness --out "$OUT/exactness" --settings decode_window=16
# Transformers continuous batching, for reference (short run).
python3 -m benchmarks --shape llama-1b --batch 32 --prompt-len 256 --gen-len 256 \
  --systems 'hf-sync,hf-async,vllm-async,async_executor[decode_window=16]' --reps 1 \
  --attention-backend TRITON_ATTN --out "$OUT/hf" --timeout 400
echo "session done: $ASYNC_EXECUTOR_RUN_ID"
