"""Run one system on one workload in this process and write its record.

    python -m benchmarks.run_one SPEC.json OUT.json

The orchestrator (`python -m benchmarks`) starts one such process per system,
so that every engine starts from a clean process and device. Each run: build
the engine, warm up, `reps` timed `generate` calls of the whole workload
(wall time, NVML), then one more with the device-side profiler and the step
tracer on (busy share, timeline spans). Token ids of the first timed call are
hashed, so records of different systems show whether the outputs agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before vLLM is imported, so that the engine's processes inherit them: the
# step tracer (spans go to a directory, from every process), and callables
# over collective_rpc.
# (vLLM's spawned processes re-run this module's top level: keep the parent's.)
if not os.environ.get("ASYNC_EXECUTOR_TRACE", "").startswith(tempfile.gettempdir()):
    os.environ["ASYNC_EXECUTOR_TRACE"] = tempfile.mkdtemp(prefix="async_executor_trace_")
TRACE_DIR = os.environ["ASYNC_EXECUTOR_TRACE"]
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from benchmarks import measure  # noqa: E402
from benchmarks.systems import System, parse_system  # noqa: E402


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the lowest ids (special tokens in most vocabularies).
    low = min(16, vocab // 4)
    return [[rng.randrange(low, vocab) for _ in range(prompt_len)] for _ in range(batch)]


def digest(token_lists: list[list[int]]) -> str:
    h = hashlib.sha256()
    for tokens in token_lists:
        h.update(json.dumps(list(tokens)).encode())
    return h.hexdigest()[:16]


def _timeline_window(spans: list[Any], kernels: list[Any], lo: int, hi: int,
                     steps: int, gen_len: int) -> dict[str, Any]:  # fmt: skip
    """Spans within about `steps` decode steps in the middle of the run."""
    step_ns = (hi - lo) / max(1, gen_len)
    mid = lo + (hi - lo) // 2
    w0, w1 = int(mid - steps * step_ns / 2), int(mid + steps * step_ns / 2)
    return {
        "window_ns": [w0, w1],
        "spans": [s for s in spans if s[2] > w0 and s[1] < w1],
        "kernels": [k for k in kernels if k[1] > w0 and k[0] < w1],
    }


@dataclass
class Timed:
    """The timed calls of one system: wall times, NVML means, outputs."""

    walls: list[float]
    nvml: list[float | None]
    digest: str
    gen_tokens: int

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)


def timed_reps(
    generate: Callable[[], list[list[int]]], reps: int, poller: measure.NvmlPoller | None
) -> Timed:
    timed = Timed([], [], "", 0)
    for rep in range(reps):
        if poller is not None:
            poller.__enter__()
        t0 = time.perf_counter()
        tokens = generate()
        timed.walls.append(time.perf_counter() - t0)
        if poller is not None:
            poller.__exit__()
            timed.nvml.append(poller.mean)
        if rep == 0:
            timed.digest, timed.gen_tokens = digest(tokens), sum(len(t) for t in tokens)
    return timed


def base_record(system: System, spec: dict[str, Any], timed: Timed, busy: float,
                lo: int, hi: int, card: str) -> dict[str, Any]:  # fmt: skip
    import torch

    return {
        "system": system.name,
        "tokens_per_s": timed.gen_tokens / timed.wall,
        "wall_s": timed.wall,
        "gpu_busy": busy,
        "gpu_busy_nvml": _mean(timed.nvml),
        "card": card,
        "torch_version": torch.__version__,
        "decode_step_ms": 1000 * timed.wall / spec["gen_len"],
        "reps_wall_s": timed.walls,
        "profiled_wall_s": (hi - lo) / 1e9,
        "generated_tokens": timed.gen_tokens,
        "output_digest": timed.digest,
    }


def run_vllm(spec: dict[str, Any], system: System) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams

    from async_executor import tracing

    on_gpu = spec["device"] == "cuda"
    kwargs: dict[str, Any] = dict(
        seed=0,
        max_model_len=spec["prompt_len"] + spec["gen_len"] + 16,
        max_num_seqs=max(spec["batch"], 8),
        tensor_parallel_size=spec["tp"],
        disable_log_stats=True,
    )
    if spec["dummy"]:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    if spec.get("attention_backend"):
        kwargs["attention_config"] = {"backend": spec["attention_backend"]}
    if on_gpu:
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=spec.get("gpu_mem", 0.85))
    else:
        kwargs.update(dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=256 << 20)  # fmt: skip
    kwargs.update(system.engine_kwargs)

    t_start = time.perf_counter()
    llm = LLM(spec["model"], **kwargs)
    startup_s = time.perf_counter() - t_start
    prompts: list[Any] = [{"prompt_token_ids": p} for p in make_prompts(
        spec["batch"], spec["prompt_len"], spec["vocab_size"])]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=spec["gen_len"], ignore_eos=True)
    llm.generate(prompts[: min(len(prompts), 8)],
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # fmt: skip

    poller = measure.NvmlPoller() if on_gpu else None

    def generate() -> list[list[int]]:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    timed = timed_reps(generate, spec["reps"], poller)

    # One more run with the device-side measurement on.
    if on_gpu:
        llm.collective_rpc(measure.profiler_start)
    lo = time.perf_counter_ns()
    llm.generate(prompts, params, use_tqdm=False)
    hi = time.perf_counter_ns()
    kernels = llm.collective_rpc(measure.profiler_stop)[0] if on_gpu else []
    time.sleep(1.2)  # every process flushes its spans twice a second
    spans = [s for s in tracing.read_span_files(TRACE_DIR) if lo <= s[1] <= hi]
    if on_gpu:
        busy = measure.busy_share(kernels, lo, hi)
    else:
        busy = measure.busy_share([(s[1], s[2]) for s in spans if s[0] == "forward"], lo, hi)

    config = llm.llm_engine.vllm_config
    stats = None
    if system.ours:
        from async_executor import pipeline_stats

        stats = pipeline_stats(llm).as_dict()
    card = poller.card() if poller is not None else _cpu_name()
    record = base_record(system, spec, timed, busy, lo, hi, card) | {
        "vllm_version": vllm.__version__,
        "startup_s": startup_s,
        "async_scheduling": bool(config.scheduler_config.async_scheduling),
        "model_runner": "v2" if config.use_v2_model_runner else "v1",
        "settings": system.settings,
        "pipeline_stats": stats,
        "timeline": _timeline_window(spans, kernels, lo, hi, 12, spec["gen_len"]),
    }
    llm.llm_engine.engine_core.shutdown()
    return record


def run_hf(spec: dict[str, Any], system: System) -> dict[str, Any]:
    """Hugging Face transformers continuous batching (paged attention)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if spec["device"] != "cuda":
        raise RuntimeError("transformers continuous batching is benchmarked on CUDA only")
    from transformers import ContinuousBatchingConfig  # type: ignore[attr-defined]

    config = AutoConfig.from_pretrained(spec["model"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            config, torch_dtype=torch.bfloat16, attn_implementation="paged|sdpa"
        )
    with torch.no_grad():
        # Same distribution as vLLM's dummy loader.
        for p in model.parameters():
            p.uniform_(-1e-3, 1e-3)
    model.eval()
    generation = GenerationConfig(
        max_new_tokens=spec["gen_len"], do_sample=False, eos_token_id=-1,
        pad_token_id=0,
    )  # fmt: skip
    cb = ContinuousBatchingConfig(use_async_batching=system.hf_async)
    prompts = make_prompts(spec["batch"], spec["prompt_len"], spec["vocab_size"])
    model.generate_batch(prompts[:8], generation_config=generation,
                         continuous_batching_config=cb)  # fmt: skip
    poller = measure.NvmlPoller()

    def generate() -> list[list[int]]:
        out = model.generate_batch(prompts, generation_config=generation,
                                   continuous_batching_config=cb)  # fmt: skip
        return [list(v.generated_tokens) for _, v in sorted(out.items())]

    timed = timed_reps(generate, spec["reps"], poller)
    measure.profiler_start()
    lo = time.perf_counter_ns()
    model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    hi = time.perf_counter_ns()
    kernels = measure.profiler_stop()
    busy = measure.busy_share(kernels, lo, hi)
    return base_record(system, spec, timed, busy, lo, hi, poller.card()) | {
        "vllm_version": None,
        "transformers_version": transformers.__version__,
        "settings": {"use_async_batching": system.hf_async},
        "timeline": _timeline_window([], kernels, lo, hi, 12, spec["gen_len"]),
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU x{os.cpu_count()}"


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    system = parse_system(spec["system"])
    record: dict[str, Any] = {k: spec[k] for k in ("run_id", "shape", "batch", "tp",
                                                   "prompt_len", "gen_len")}  # fmt: skip
    try:
        result = run_hf(spec, system) if system.kind == "hf" else run_vllm(spec, system)
        record.update(result)
    except Exception as exc:  # recorded, the orchestrator goes on with the others
        if system.kind != "hf":
            raise
        record.update(system=system.name, skipped=f"{type(exc).__name__}: {exc}")
    record["command"] = spec.get("command")
    Path(sys.argv[2]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
