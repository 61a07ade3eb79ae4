#!/usr/bin/env bash
# One GPU session: the runs behind benchmarks/RESULTS.md, one run id.
# Usage on the GPU host (after `source .gpukit/device.sh`), detached:
#   setsid nohup bash benchmarks/gpu_session.sh $HOME/res > $HOME/res.log 2>&1 &
# Not into the device tool's $OUT (/root/out there): it is emptied at every
# call, under a running session. Each poll copies a tarball into $OUT.
# Stop a session with `pkill -f "bash benchmarks/gpu_sessio[n]"` and
# `pkill -9 -f "VLLM:[:]"` (the engine processes rename themselves; the
# brackets keep pkill from matching its own command line), and check that
# nvidia-smi shows the memory freed before starting the next one.
# Hazard: `source .gpukit/device.sh | tail` sources it in a subshell (a
# pipe), so vLLM is missing afterwards; source it alone, then `&&`.
# Engine start is 70-110 s on an H200; the interleaved steps start all their
# engines at once (about 100 s for seven 1B engines), the serving step one
# server after another (about 3.5 minutes per system for the short sweep).
# STEPS names the steps and their order (put first what matters most if the
# session's device time runs out); each step runs even if an earlier one
# failed, and an unknown name stops the session before anything runs.
# Hazard: `pkill -f PATTERN` also matches the shell of the device command
# that runs it when that command's text contains the pattern unbracketed
# (e.g. a watcher script written inline that starts gpu_session.sh): the
# call then dies with rc -1. Put such scripts in a file first.
set -u
OUT=${1:?output directory}
STEPS=${STEPS:-"serve-8b-check serve-1b-check"}
# Also: serve-1b-frontend (run 20261129-065520-h200), serve-1b-gain (run 20261129-043423-h200), serve-8b-interleaved serve-1b-interleaved (run 20261129-015639-h200), serve-8b-short (the same one server after another), serve-1b-short ab-1b-w1 exactness-process (run 20261128-225506-h200),
# ab-1b ab-8b ab-8b-process exactness (run 20261128-200939-h200), profile
# llama-1b llama-8b serve-1b (the one-system-after-another runs)
# On two GPUs (nvidia-h200-x2): STEPS="tp-exactness tp"
mkdir -p "$OUT"
export ASYNC_EXECUTOR_RUN_ID=${ASYNC_EXECUTOR_RUN_ID:-$(date +%Y%m%d-%H%M%S)-h200}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
UNBOUNDED=max_token_gap_ms=0,max_admission_delay_ms=0
step() { echo "=== $(date +%T) $*"; }

run_profile() {
  # Where the host time of a step goes, vLLM async against ours with windows
  # off and with windows of 2 (cProfile of one in-process generate each).
  step profile
  for system in vllm-async "async_executor[decode_window=1]" "async_executor[decode_window=2]"; do
    python3 -m benchmarks.profile_host --shape llama-1b --batch 128 --prompt-len 256 \
      --gen-len 256 --system "$system" --attention-backend FLASH_ATTN --out "$OUT/profile" --top 40
  done
}

run_ab_1b() {
  # Every system's engine up at once on the card, calls alternated round by
  # round (benchmarks/interleave.py): vLLM async (uniproc and mp) against ours
  # with windows off, the default window, the worker-process stage, and the
  # throughput window; kernel ceiling per row; a host profile of batch 32.
  step ab-1b
  python3 -m benchmarks interleave --shape llama-1b --workloads 128x256x1024,32x256x1024 \
    --systems "vllm-async,vllm-async-mp,async_executor[decode_window=1],async_executor,async_executor[stage=process],async_executor[decode_window=1,stage=process],async_executor[decode_window=16,$UNBOUNDED]" \
    --rounds 3 --trace --profile --profile-top 60 --attention-backend FLASH_ATTN \
    --kv-cache-gib 8 --out "$OUT/ab-1b" --timeout 600
}

run_ab_1b_w1() {
  # The open gap: windows off in the worker process against vLLM's mp
  # executor, with both profiles (the worker's thread, the engine's thread).
  step ab-1b-w1
  python3 -m benchmarks interleave --shape llama-1b --workloads 128x256x1024,32x256x1024 \
    --systems "vllm-async-mp,async_executor[decode_window=1]" \
    --warmup-rounds 1 --rounds 5 --profile --profile-top 80 --attention-backend FLASH_ATTN \
    --kv-cache-gib 8 --out "$OUT/ab-1b-w1" --timeout 600
}

run_ab_8b() {
  step ab-8b
  python3 -m benchmarks interleave --shape llama-8b --workloads 32x256x1024 \
    --systems "vllm-async,async_executor[decode_window=1],async_executor,async_executor[decode_window=16,$UNBOUNDED]" \
    --rounds 3 --trace --attention-backend FLASH_ATTN --kv-cache-gib 6 \
    --out "$OUT/ab-8b" --timeout 600
}

run_exactness_process() {
  # The exactness check on the default (worker-process) stage.
  step exactness-process
  python3 -m benchmarks.gpu_exactness --out "$OUT/exactness-process" \
    --variants "decode_window=2,stage=process;decode_window=16,depth=3,stage=process"
}

run_ab_8b_process() {
  # The worker-process stage at 8B, against vLLM's uniproc and mp executors.
  step ab-8b-process
  python3 -m benchmarks interleave --shape llama-8b --workloads 32x256x1024 \
    --systems "vllm-async,vllm-async-mp,async_executor[stage=process],async_executor[decode_window=1,stage=process]" \
    --rounds 3 --trace --attention-backend FLASH_ATTN --kv-cache-gib 6 \
    --out "$OUT/ab-8b-process" --timeout 600
}

run_exactness() {
  # Device-resident windows against vLLM's synchronous path, CUDA graphs on:
  # windows 2 and 16 at depth 2 and 3; EOS, stop strings, logprobs, seeded
  # sampling, n > 1, preemption under a small KV cache.
  step exactness
  python3 -m benchmarks.gpu_exactness --out "$OUT/exactness" \
    --variants "${EXACT_VARIANTS:-decode_window=2;decode_window=16;decode_window=2,depth=3;decode_window=16,depth=3}"
}

run_llama_1b() {
  # 1B shape at batch 128 and 32 (one engine per system for both): where
  # vLLM's host work per step exceeds the GPU's.
  step llama-1b
  python3 -m benchmarks --shape llama-1b --workloads 128x256x1024,32x256x1024 \
    --systems "vllm-async,async_executor,async_executor[decode_window=2,$UNBOUNDED],async_executor[decode_window=4,$UNBOUNDED],async_executor[decode_window=16,$UNBOUNDED],async_executor[decode_window=2,depth=3,$UNBOUNDED]" \
    --reps 2 --attention-backend FLASH_ATTN --out "$OUT/llama-1b" --timeline --timeout 360
}

run_llama_8b() {
  # 8B shape at batch 32: GPU-bound already; windows must not cost anything.
  step llama-8b
  python3 -m benchmarks --shape llama-8b --workloads 32x256x1024 \
    --systems "vllm-async,async_executor,async_executor[decode_window=2,$UNBOUNDED],async_executor[decode_window=16,$UNBOUNDED]" \
    --reps 2 --attention-backend FLASH_ATTN --out "$OUT/llama-8b" --timeout 420
}

run_serve_1b() {
  # A live server: vLLM async against ours (defaults, and a window of 8 with
  # the default latency bounds), Poisson rates and rate inf (SERVING.md).
  step serve-1b
  python3 -m benchmarks serve --preset h200-1b --out "$OUT/serve-1b"
}

# A serving sweep cut to fit a session: 15 s of Poisson arrivals per rate,
# then rate inf at max concurrency 256; 256-token prompts, 128-512 new tokens.
# Arguments: shape, systems, rates, requests per rate at least, output dir,
# then any more flags of `python -m benchmarks serve`.
serve_sweep() {
  python3 -m benchmarks serve --shape "$1" --device cuda --attention-backend FLASH_ATTN \
    --systems "$2" --rates "$3" --max-concurrency 256 --num-prompts "$4" --seconds 15 \
    --input-len 256 --output-len 128:512 --out "$5" "${@:6}"
}

run_serve_1b_short() {
  # vLLM async against our defaults and a window of 8 (default latency
  # bounds), light load to vLLM async's saturation (48-64 req/s, run
  # 20261128-225506-h200).
  step serve-1b-short
  serve_sweep llama-1b "vllm-async,async_executor,async_executor[decode_window=8]" \
    16,32,48,64 160 "$OUT/serve-1b"
}

run_serve_8b_short() {
  # The same at 8B (about 6 minutes per system): the GPU is the bound here,
  # so windows must cost nothing.
  step serve-8b-short
  serve_sweep llama-8b "vllm-async,async_executor,async_executor[decode_window=8]" \
    4,16,32,48 100 "$OUT/serve-8b"
}

run_serve_8b_interleaved() {
  # The 8B sweep with the three servers up at once on the card and each rate
  # run on all three in turn (SERVING.md, "Interleaved runs"): one start for
  # all (about 3 minutes), the systems measured minutes apart at most. A
  # fixed 20 GiB KV cache each (concurrency 256 x 576 tokens on average
  # needs about 18 GiB at 8B). If the servers do not all start, fall back
  # to serve-8b-short.
  step serve-8b-interleaved
  serve_sweep llama-8b "vllm-async,async_executor,async_executor[decode_window=8]" \
    4,16,32,48 100 "$OUT/serve-8b-interleaved" --interleave --kv-cache-gib 20
}

run_serve_1b_interleaved() {
  # The 1B sweep again, its three servers up at once (serve-1b-short ran them
  # one after another; vLLM async's rate-inf figure moved by 12% between two
  # sessions). 8 GiB of KV cache each (256 x 576 tokens need about 5 GiB at 1B).
  step serve-1b-interleaved
  serve_sweep llama-1b "vllm-async,async_executor,async_executor[decode_window=8]" \
    16,32,48,64 160 "$OUT/serve-1b-interleaved" --interleave --kv-cache-gib 8
}

run_serve_8b_check() {
  # The window payoff check (min_window_gain, on by default) at 8B against
  # vLLM async, two rounds, 200 requests at 4 req/s so that TTFT p99 rests
  # on more than one or two first tokens (about 12 minutes with the server
  # start; run 20261129-063343-h200). Run 20261129-040704-h200 ran it with
  # the earlier estimate (from the engine's wait) and with the check off as
  # a third server (CHECK_OFF=1 adds it back, about 4 minutes more).
  step serve-8b-check
  serve_sweep llama-8b "vllm-async,async_executor${CHECK_OFF:+,async_executor[min_window_gain=0]}" \
    4,16,32 200 "$OUT/serve-8b-check" --interleave --rounds 2 --kv-cache-gib 20
}

run_serve_1b_check() {
  # The same at 1B, where windows pay: the check must keep them open (about
  # 6 minutes; the earlier estimate did not, run 20261129-040704-h200), at
  # rates up to vLLM async's saturation (48-64 req/s).
  step serve-1b-check
  serve_sweep llama-1b "vllm-async,async_executor${CHECK_OFF:+,async_executor[min_window_gain=0]}" \
    16,32,48 160 "$OUT/serve-1b-check" --interleave --kv-cache-gib 8
}

run_serve_1b_gain() {
  # The measured window payoff (per batch size, windows against one-token
  # steps) at 1B, where windows pay and the earlier estimate from the
  # engine's wait declined them (run 20261129-040704-h200): vLLM async
  # against the defaults, one round (about 5 minutes with the kit).
  step serve-1b-gain
  serve_sweep llama-1b "vllm-async,async_executor" 16 160 "$OUT/serve-1b-gain" \
    --interleave --kv-cache-gib 8
}

run_serve_1b_frontend() {
  # Where the rate-inf figure goes at 1B: the same two servers at rate inf
  # only (max concurrency 256), first with four API server processes each
  # (`--api-server-count 4`: tokenizing, detokenizing and streaming spread
  # over four front ends), then with vLLM's one; one round each, about 7
  # minutes with the kit.
  step serve-1b-frontend
  serve_sweep llama-1b "vllm-async,async_executor" "" 160 "$OUT/serve-1b-front4" \
    --interleave --kv-cache-gib 8 --serve-args "--api-server-count 4"
  serve_sweep llama-1b "vllm-async,async_executor" "" 160 "$OUT/serve-1b-front1" \
    --interleave --kv-cache-gib 8
}

run_tp_exactness() {
  step tp-exactness
  python3 -m benchmarks.gpu_exactness --tp 2 --out "$OUT/tp-exactness" \
    --variants "decode_window=2;decode_window=16"
}

run_tp() {
  # Two GPUs, vLLM async through its multiprocess executor against ours (auto
  # picks the worker-process stage for several ranks); busy per rank.
  step tp
  python3 -m benchmarks --shape llama-1b --workloads 128x256x1024 --tp 2 \
    --systems "vllm-async-mp,async_executor,async_executor[decode_window=4,$UNBOUNDED]" \
    --reps 2 --attention-backend FLASH_ATTN --out "$OUT/tp-llama-1b" --timeout 420
  python3 -m benchmarks --shape llama-8b --workloads 64x256x1024 --tp 2 \
    --systems "vllm-async-mp,async_executor,async_executor[decode_window=4,$UNBOUNDED]" \
    --reps 1 --attention-backend FLASH_ATTN --out "$OUT/tp-llama-8b" --timeout 480
}

for name in $STEPS; do
  if ! declare -F "run_${name//-/_}" > /dev/null; then
    echo "unknown step: $name" >&2
    exit 2
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
for name in $STEPS; do
  "run_${name//-/_}"
done
step "session done: $ASYNC_EXECUTOR_RUN_ID"
