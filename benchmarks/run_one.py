"""Run one system on one workload in this process and write its record.

    python -m benchmarks.run_one SPEC.json OUT.json

The orchestrator (`python -m benchmarks`) starts one such process per system,
so that every engine starts from a clean process and device. Each run: build
the engine, warm up, `reps` timed `generate` calls of the whole workload
(wall time, NVML), then one more with the device-side profiler and the step
tracer on (busy share, idle gaps, timeline spans). For runs too long to trace
whole, `busy_window` = [delay_s, length_s] traces that window of the last timed
call instead of making another. Token ids of the first timed call are hashed,
so records of different systems show whether the outputs agree.
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

from . import measure  # noqa: E402
from .systems import System, parse_system  # noqa: E402


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the lowest ids (special tokens in most vocabularies).
    low = min(16, vocab // 4)
    return [[rng.randrange(low, vocab) for _ in range(prompt_len)] for _ in range(batch)]


def token_prompts(batch: int, prompt_len: int, vocab: int) -> list[Any]:
    """A workload's prompts (`make_prompts`) as vLLM token-id prompts."""
    return [{"prompt_token_ids": p} for p in make_prompts(batch, prompt_len, vocab)]


def warm_up(llm: Any, prompts: list[Any]) -> None:
    """A short untimed call on up to 8 of a workload's prompts."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts[: min(len(prompts), 8)], params, use_tqdm=False)


def digest(token_lists: list[list[int]]) -> str:
    h = hashlib.sha256()
    for tokens in token_lists:
        h.update(json.dumps(list(tokens)).encode())
    return h.hexdigest()[:16]


def _timeline_window(spans: list[Any], kernels: list[Any], lo: int, hi: int,
                     step_ns: float, steps: int = 12) -> dict[str, Any]:  # fmt: skip
    """Spans within about `steps` decode steps in the middle of [lo, hi]."""
    mid = lo + (hi - lo) // 2
    w0, w1 = int(mid - steps * step_ns / 2), int(mid + steps * step_ns / 2)
    return {
        "window_ns": [w0, w1],
        "spans": [s for s in spans if s[2] > w0 and s[1] < w1],
        "kernels": [k[:2] for k in kernels if k[1] > w0 and k[0] < w1],
    }


@dataclass
class Busy:
    """The device-side measurement: the window it covers and what ran in it."""

    lo: int
    hi: int
    share: float
    method: str
    gaps: dict[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        return {"gpu_busy": self.share, "busy_method": self.method,
                "busy_window_s": (self.hi - self.lo) / 1e9, "idle_gaps": self.gaps}  # fmt: skip

    def ceiling_s(self, wall_s: float, sampled: bool) -> float | None:
        """The kernel-time ceiling of one call: its kernel time plus the gaps
        under 10 us between kernels (inside CUDA graphs), which no executor
        running these kernels can remove. A whole traced call gives it in
        seconds; a sampled window gives its share of the window, scaled to the
        timed call. None without a kernel trace (CPU)."""
        if self.gaps is None:
            return None
        window_ns = self.hi - self.lo
        bound_ns = self.share * window_ns + self.gaps["idle_ns_by_gap_size"]["lt_10us"]
        return bound_ns / window_ns * wall_s if sampled else bound_ns / 1e9


def busy_from_trace(trace: dict[str, Any], method: str, call: tuple[int, int],
                    sampled: bool) -> Busy:  # fmt: skip
    """Busy share and idle gaps of a kernel trace (measure.profiler_stop): over
    the whole call, or over the trace's sampled window, which must lie inside
    the call."""
    lo, hi = trace["window_ns"] if sampled else call
    if sampled:
        _check_inside(hi, call)
    # One pass over the kernels: busy is what the gaps leave.
    gaps = measure.gap_breakdown(trace["kernels"], trace["names"], lo, hi)
    return Busy(lo, hi, 1.0 - gaps["idle_share"], method, gaps)


def busy_from_spans(spans: list[Any], lo: int, hi: int, method: str) -> Busy:
    """CPU: the forward pass is the device work."""
    forward = [(s[1], s[2]) for s in spans if s[0] == "forward"]
    if not any(start < hi and end > lo for start, end in forward):
        raise RuntimeError("no forward pass in the busy window: pass a later or longer "
                           "--busy-window")  # fmt: skip
    return Busy(lo, hi, measure.busy_share(forward, lo, hi), method)


def sampled_window(busy_window: list[float], call: tuple[int, int]) -> tuple[int, int]:
    """The CPU analogue of a sampled kernel trace: the same window of the call."""
    delay, length = busy_window
    lo = call[0] + int((delay + measure.SAMPLE_LEAD_IN_S) * 1e9)
    hi = call[0] + int((delay + length) * 1e9)
    _check_inside(hi, call)
    return lo, hi


def _check_inside(hi: int, call: tuple[int, int]) -> None:
    if hi > call[1]:
        raise RuntimeError("the busy window ran past the end of the call: pass a "
                           "shorter or earlier --busy-window")  # fmt: skip


@dataclass
class Timed:
    """The timed calls of one system: wall times, NVML means, outputs."""

    walls: list[float]
    nvml: list[float | None]
    digest: str
    gen_tokens: int
    last_call: tuple[int, int] = (0, 0)  # perf_counter_ns

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)


def timed_reps(
    generate: Callable[[], list[list[int]]],
    reps: int,
    poller: measure.NvmlPoller | None,
    before_last: Callable[[], object] | None = None,
) -> Timed:
    timed = Timed([], [], "", 0)
    for rep in range(reps):
        if poller is not None:
            poller.__enter__()
        if rep == reps - 1 and before_last is not None:
            before_last()
        t0 = time.perf_counter_ns()
        tokens = generate()
        t1 = time.perf_counter_ns()
        timed.walls.append((t1 - t0) / 1e9)
        timed.last_call = (t0, t1)
        if poller is not None:
            poller.__exit__()
            timed.nvml.append(poller.mean)
        if rep == 0:
            timed.digest, timed.gen_tokens = digest(tokens), sum(len(t) for t in tokens)
    return timed


@dataclass
class Measured:
    """What one system's runs measured: wall times, busy, timeline material."""

    timed: Timed
    busy: Busy
    spans: list[Any]
    kernels: list[Any]
    # Tensor parallelism: every rank's busy, rank 0 first (`busy` is rank 0's).
    ranks: list[Busy] | None = None

    def rank_fields(self) -> dict[str, Any]:
        if not self.ranks or len(self.ranks) < 2:
            return {}
        sampled = self.busy.method.startswith("sampled")
        return {
            "gpu_busy_by_rank": [b.share for b in self.ranks],
            "ceiling_s_by_rank": [b.ceiling_s(self.timed.wall, sampled) for b in self.ranks],
        }

    def timeline(self, gen_len: int) -> dict[str, Any]:
        step_ns = 1e9 * self.timed.wall / gen_len
        return _timeline_window(self.spans, self.kernels, self.busy.lo, self.busy.hi, step_ns)


def measure_runs(
    generate: Callable[[], list[list[int]]],
    spec: dict[str, Any],
    poller: measure.NvmlPoller | None,
    start_trace: Callable[..., object],
    stop_trace: Callable[[], dict[str, Any] | list[dict[str, Any]]],
    read_spans: Callable[[int, int], list[Any]],
) -> Measured:
    """The timed calls, then busy: from a kernel trace on GPU (start_trace and
    stop_trace run measure.profiler_start/stop in the process that launches
    kernels), from forward spans on CPU (read_spans); over one more call traced
    whole, or over spec["busy_window"] of the last timed call."""
    on_gpu = spec["device"] == "cuda"
    window = spec.get("busy_window")
    before_last = None
    if window and on_gpu:

        def before_last() -> object:
            return start_trace(delay_s=window[0], length_s=window[1])

    timed = timed_reps(generate, spec["reps"], poller, before_last)
    if window:
        method = f"sampled {window[1]:g} s from {window[0]:g} s into the last timed call"
        call = timed.last_call
    else:
        method = "one more call, traced whole"
        if on_gpu:
            start_trace()
        lo = time.perf_counter_ns()
        generate()
        call = (lo, time.perf_counter_ns())
    spans = read_spans(*call)
    if on_gpu:
        traces = stop_trace()
        # One trace per rank that launches kernels (several with tensor parallelism).
        traces = traces if isinstance(traces, list) else [traces]
        ranks = [busy_from_trace(t, method, call, sampled=bool(window)) for t in traces]
        return Measured(timed, ranks[0], spans, traces[0]["kernels"], ranks)
    lo, hi = sampled_window(window, call) if window else call
    return Measured(timed, busy_from_spans(spans, lo, hi, method), spans, [])


def base_record(system: System, spec: dict[str, Any], measured: Measured,
                card: str) -> dict[str, Any]:  # fmt: skip
    import torch

    timed = measured.timed
    ceiling = measured.busy.ceiling_s(timed.wall, sampled=bool(spec.get("busy_window")))
    return {
        "system": system.name,
        "tokens_per_s": timed.gen_tokens / timed.wall,
        "wall_s": timed.wall,
        # The fastest this call could run on these kernels, and how close the
        # system came to it (ceiling_s / wall_s).
        "ceiling_s": ceiling,
        "ceiling_share": ceiling / timed.wall if ceiling is not None else None,
        **measured.busy.fields(),
        **measured.rank_fields(),
        "gpu_busy_nvml": _mean(timed.nvml),
        "card": card,
        "torch_version": torch.__version__,
        "decode_step_ms": 1000 * timed.wall / spec["gen_len"],
        "reps_wall_s": timed.walls,
        "generated_tokens": timed.gen_tokens,
        "output_digest": timed.digest,
    }


def engine_kwargs(spec: dict[str, Any], system: System) -> dict[str, Any]:
    """`LLM(...)` arguments for every workload of the spec. On a GPU the KV
    cache takes `gpu_mem` of the card, or exactly `kv_cache_bytes` (for
    engines that share a card: vLLM then skips its memory profiling)."""
    workloads = spec["workloads"]
    kwargs: dict[str, Any] = dict(
        seed=0,
        max_model_len=max(p + g for _, p, g in workloads) + 16,
        max_num_seqs=max(8, *(b for b, _, _ in workloads)),
        tensor_parallel_size=spec["tp"],
        disable_log_stats=True,
    )
    if spec["dummy"]:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    if spec.get("attention_backend"):
        kwargs["attention_config"] = {"backend": spec["attention_backend"]}
    if spec["device"] == "cuda":
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=spec.get("gpu_mem", 0.85))
        if spec.get("kv_cache_bytes"):
            kwargs["kv_cache_memory_bytes"] = spec["kv_cache_bytes"]
    else:
        kwargs.update(dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=spec.get("kv_cache_bytes") or 256 << 20)  # fmt: skip
    kwargs.update(system.engine_kwargs)
    return kwargs


def run_vllm(spec: dict[str, Any], system: System) -> list[dict[str, Any]]:
    """Every workload of the spec on one engine (started once: compile and
    graph capture take a minute on a GPU), one record each."""
    import vllm
    from vllm import LLM, SamplingParams

    on_gpu = spec["device"] == "cuda"
    workloads = spec["workloads"]
    t_start = time.perf_counter()
    llm = LLM(spec["model"], **engine_kwargs(spec, system))
    startup_s = time.perf_counter() - t_start
    config = llm.llm_engine.vllm_config
    poller = measure.NvmlPoller() if on_gpu else None
    card = poller.card() if poller is not None else _cpu_name()
    records = []
    stats_before = pipeline_stats_of(llm, system)
    for batch, prompt_len, gen_len in workloads:
        workload = {**spec, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
        prompts = token_prompts(batch, prompt_len, spec["vocab_size"])
        params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
        warm_up(llm, prompts)

        def generate(prompts: list[Any] = prompts, params: Any = params) -> list[list[int]]:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outputs]

        measured = measure_runs(
            generate, workload, poller,
            start_trace=lambda **kw: llm.collective_rpc(measure.profiler_start, kwargs=kw),
            stop_trace=lambda: llm.collective_rpc(measure.profiler_stop),
            read_spans=_spans,
        )  # fmt: skip
        stats_after = pipeline_stats_of(llm, system)
        records.append(
            base_record(system, workload, measured, card)
            | {
                "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                "vllm_version": vllm.__version__,
                "startup_s": startup_s,
                "async_scheduling": bool(config.scheduler_config.async_scheduling),
                "model_runner": "v2" if config.use_v2_model_runner else "v1",
                "attention_backend": spec.get("attention_backend"),
                "settings": system.settings,
                # This workload's share of the counters (its timed and traced calls).
                "pipeline_stats": _stats_delta(stats_before, stats_after),
                "timeline": measured.timeline(gen_len),
            }
        )  # fmt: skip
        stats_before = stats_after
    llm.llm_engine.engine_core.shutdown()
    return records


def pipeline_stats_of(llm: Any, system: System) -> dict[str, Any] | None:
    """Our counters of an in-process engine (None for a system not ours)."""
    if not system.ours:
        return None
    from async_executor import pipeline_stats

    return pipeline_stats(llm).as_dict()


def _stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> Any:
    if before is None or after is None:
        return after
    delta: dict[str, Any] = {}
    for key, value in after.items():
        if key == "max_in_flight":
            delta[key] = value
        elif isinstance(value, dict):
            delta[key] = {k: v - before[key].get(k, 0) for k, v in value.items()
                          if v - before[key].get(k, 0)}  # fmt: skip
        else:
            delta[key] = value - before[key]
    return delta


def _spans(lo: int, hi: int) -> list[Any]:
    from async_executor import tracing

    time.sleep(1.2)  # every process flushes its spans twice a second
    return [s for s in tracing.read_span_files(TRACE_DIR) if lo <= s[1] <= hi]


def run_hf(spec: dict[str, Any], system: System) -> dict[str, Any]:
    """Hugging Face transformers continuous batching (paged attention).

    Its own random weights (same distribution as vLLM's dummy loader, not the
    same values), so its tokens are not compared with vLLM's."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    on_gpu = spec["device"] == "cuda"
    if system.hf_async and not on_gpu:
        raise RuntimeError("transformers' async batching (use_async_batching=True) "
                           "needs a CUDA device; skipped on CPU")  # fmt: skip
    from transformers import ContinuousBatchingConfig  # type: ignore[attr-defined]

    config = AutoConfig.from_pretrained(spec["model"])
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if on_gpu else torch.float32,
            attn_implementation="paged|sdpa",
        )  # fmt: skip
    if spec["dummy"]:
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-1e-3, 1e-3)
    model.eval()
    forward_spans: list[tuple[str, int, int]] = []
    if not on_gpu:  # the CPU analogue of busy: time inside the forward pass
        forward = model.forward

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return forward(*args, **kwargs)
            finally:
                forward_spans.append(("forward", t0, time.perf_counter_ns()))

        model.forward = timed_forward  # type: ignore[method-assign]
    generation = GenerationConfig(
        max_new_tokens=spec["gen_len"], do_sample=False, eos_token_id=-1,
        pad_token_id=0,
    )  # fmt: skip
    cb = ContinuousBatchingConfig(use_async_batching=system.hf_async)
    prompts = make_prompts(spec["batch"], spec["prompt_len"], spec["vocab_size"])
    order = {tuple(p): i for i, p in enumerate(prompts)}
    poller = measure.NvmlPoller() if on_gpu else None

    def generate() -> list[list[int]]:
        # One manager (KV cache, CUDA graphs) for every call, sized for the
        # workload by the first one, as vLLM's engine is built once.
        out = model.generate_batch(prompts, generation_config=generation,
                                   continuous_batching_config=cb,
                                   persistent_manager=True)  # fmt: skip
        by_prompt = sorted(out.values(), key=lambda v: order[tuple(v.prompt_ids)])
        return [list(v.generated_tokens) for v in by_prompt]

    generate()  # warm-up: builds the manager
    measured = measure_runs(
        generate, spec, poller,
        start_trace=measure.profiler_start, stop_trace=measure.profiler_stop,
        read_spans=lambda lo, hi: [s for s in forward_spans if lo <= s[1] <= hi],
    )  # fmt: skip
    card = poller.card() if poller is not None else _cpu_name()
    return base_record(system, spec, measured, card) | {
        "vllm_version": None,
        "transformers_version": transformers.__version__,
        "settings": {"use_async_batching": system.hf_async},
        "timeline": measured.timeline(spec["gen_len"]),
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
    common = {k: spec[k] for k in ("run_id", "shape", "tp")}
    records: list[dict[str, Any]] = []
    if system.kind == "hf":
        for batch, prompt_len, gen_len in spec["workloads"]:
            workload = {**spec, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
            record = {**common, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
            try:
                record.update(run_hf(workload, system))
            except Exception as exc:  # recorded, the orchestrator goes on with the others
                record.update(system=system.name, skipped=f"{type(exc).__name__}: {exc}")
            records.append(record)
    else:
        records = [{**common, **r} for r in run_vllm(spec, system)]
    for record in records:
        record["command"] = spec.get("command")
    Path(sys.argv[2]).write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
