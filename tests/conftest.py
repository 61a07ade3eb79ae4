"""Shared fixtures: a tiny Llama built locally, engines, output comparison.

The baseline everywhere is vLLM's synchronous path: the stock executor with
`async_scheduling=False`. "Ours" is the same engine with
`distributed_executor_backend="async_executor"`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

# Fast in-process engines unless a test asks for the multiprocess one.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Worker processes are spawned, not forked: the test process is long-lived and
# has threads (step-trace flushers, tqdm's monitor, engines of earlier tests);
# a fork while one of them holds a lock left a worker blocked at start-up
# once in a full run (until pytest-timeout).
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from async_executor import PipelineStats, pipeline_config, pipeline_stats
from async_executor.tiny_llama import SPECIAL_TOKENS, build_tiny_llama, corpus_prompts  # noqa: F401 (re-exported to the tests)

# The first token id of the test model's vocabulary that is no special token.
VOCAB_START = len(SPECIAL_TOKENS)

# Engine settings shared by the baseline and ours.
ENGINE_DEFAULTS: dict[str, Any] = dict(
    dtype="float32",
    max_model_len=512,
    seed=0,
    enforce_eager=True,
    kv_cache_memory_bytes=64 << 20,
    disable_log_stats=False,
)

# vLLM's own consistency test compares logprobs with these tolerances: the
# batch around a request differs between the paths (the extra token of a
# finished request), which changes float reduction order.
LOGPROB_REL_TOL = 1e-3
LOGPROB_ABS_TOL = 1e-6


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = os.environ.get("ASYNC_EXECUTOR_TEST_MODEL_DIR")
    path = Path(cache) if cache else tmp_path_factory.mktemp("tiny-llama")
    return str(build_tiny_llama(path))


@contextlib.contextmanager
def engine(
    model: str, *, ours: bool, settings: dict[str, Any] | None = None, **kwargs: Any
) -> Iterator[Any]:
    """An `LLM`: vLLM's synchronous baseline, or ours with `settings`."""
    from vllm import LLM

    args = {**ENGINE_DEFAULTS, **kwargs}
    if ours:
        args["distributed_executor_backend"] = "async_executor"
        args["additional_config"] = pipeline_config(**deterministic_windows(settings or {}))
    else:
        assert not settings
        args["async_scheduling"] = False
    llm = LLM(model, **args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def deterministic_windows(settings: dict[str, Any]) -> dict[str, Any]:
    """Window settings whose windows do not depend on the machine's speed.

    The latency bounds size windows from the measured time of a device step,
    which on a shared CI machine varies from run to run; tests of anything but
    those bounds turn them off, so that the window a test asks for is the
    window it gets."""
    if settings.get("decode_window", 1) <= 1:
        return settings
    return {"max_token_gap_ms": 0, "max_admission_delay_ms": 0, **settings}


def generate(llm: Any, prompts: list[Any], params: Any) -> list[Any]:
    return llm.generate(prompts, params, use_tqdm=False)


def completions(outputs: list[Any]) -> list[list[Any]]:
    """Per request, per completion: (token_ids, text, finish_reason, logprobs)."""
    return [
        [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs
    ]


def _logprobs_equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for pa, pb in zip(a, b, strict=True):
        if pa.keys() != pb.keys():
            return False
        for token, la in pa.items():
            lb = pb[token]
            if la.rank != lb.rank or la.decoded_token != lb.decoded_token:
                return False
            tol = max(LOGPROB_REL_TOL * abs(lb.logprob), LOGPROB_ABS_TOL)
            if abs(la.logprob - lb.logprob) > tol:
                return False
    return True


def assert_same_outputs(baseline: list[Any], ours: list[Any], what: str = "") -> None:
    """Token for token: ids, text, finish reason; logprobs within vLLM's
    own test tolerance (same top-k ids, ranks and decoded tokens)."""
    base, mine = completions(baseline), completions(ours)
    assert len(base) == len(mine), what
    for i, (b, m) in enumerate(zip(base, mine, strict=True)):
        assert len(b) == len(m), f"{what} request {i}: {len(b)} vs {len(m)} completions"
        for j, (cb, cm) in enumerate(zip(b, m, strict=True)):
            where = f"{what} request {i} completion {j}"
            assert list(cm[0]) == list(cb[0]), (
                f"{where}: tokens differ\n base {list(cb[0])}\n ours {list(cm[0])}"
            )
            assert cm[1] == cb[1], f"{where}: text differs"
            assert cm[2] == cb[2], f"{where}: finish reason {cm[2]} != {cb[2]}"
            assert _logprobs_equal(cm[3], cb[3]), f"{where}: logprobs differ"


def stats(llm: Any) -> PipelineStats:
    return pipeline_stats(llm)


def assert_pipelined(s: PipelineStats, *, windows: bool = False) -> None:
    """The cheap check from the counters: our executor ran, launched batches
    ahead of their predecessor's result, and reconciled carry-over tokens (a
    silent fallback to the stock path leaves these at zero). This is launch
    order, not concurrency: `stage="inline"` on CPU passes it while nothing
    overlaps. `assert_overlapped` proves concurrency from the step trace."""
    assert s.batches_launched > 0, s
    assert s.launched_before_predecessor_resolved > 0, s
    assert s.carry_over_tokens > 0, s
    assert s.max_in_flight >= 2, s
    if windows:
        assert s.windowed_batches > 0, s
        assert s.device_steps > s.batches_launched, s


# -- concurrency, from the step tracer (async_executor/tracing.py) -------------

# (pid, thread id, lane, start_ns, end_ns); the clock is CLOCK_MONOTONIC, one
# clock for every process of the engine.
Span = tuple[int, int, str, int, int]
Thread = tuple[int, int]  # (pid, thread id)
# The engine thread's own work, and the device stage's: the runner's
# execute_model (input preparation and, on CPU, the forward pass) and the
# model's forward inside it.
HOST_LANES = ("schedule", "update")
DEVICE_LANES = ("prepare", "forward")
T = TypeVar("T")


@dataclass
class StepTrace:
    """The host spans of one traced call, from every process of the engine."""

    spans: list[Span]

    def of(self, lanes: tuple[str, ...]) -> list[Span]:
        return [s for s in self.spans if s[2] in lanes]

    def threads(self, lanes: tuple[str, ...]) -> set[Thread]:
        return {(s[0], s[1]) for s in self.of(lanes)}

    def overlaps(self) -> list[tuple[Span, Span]]:
        """(host span, device span) pairs of different threads whose
        intervals intersect: the engine scheduled or updated while the
        device stage ran a batch."""
        device = self.of(DEVICE_LANES)
        return [
            (h, d)
            for h in self.of(HOST_LANES)
            for d in device
            if (d[0], d[1]) != (h[0], h[1]) and d[3] < h[4] and h[3] < d[4]
        ]

    def summary(self) -> str:
        counts = {lane: len(self.of((lane,))) for lane in (*HOST_LANES, *DEVICE_LANES)}
        return (f"spans {counts}, host threads {sorted(self.threads(HOST_LANES))}, "
                f"device threads {sorted(self.threads(DEVICE_LANES))}")  # fmt: skip


class StepTracer:
    """Traces calls on an engine started after this tracer was made (the
    engine's processes read `ASYNC_EXECUTOR_TRACE` when they start)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def call(self, llm: Any, fn: Callable[[], T]) -> tuple[T, StepTrace]:
        from async_executor import tracing

        before = stats(llm)
        t0 = time.perf_counter_ns()
        result = fn()
        t1 = time.perf_counter_ns()
        after = stats(llm)
        batches = after.batches_launched - before.batches_launched
        device_steps = after.device_steps - before.device_steps
        tracing.flush()  # this process's spans (the in-process engine's)
        # Other processes flush twice a second. Every launched batch was
        # scheduled once and every device step is one `prepare` span, so the
        # trace is whole once all of them are in.
        deadline = time.monotonic() + 120
        while True:
            trace = StepTrace(_read_spans(self.directory, t0, t1))
            if (len(trace.of(("schedule",))) >= batches > 0
                    and len(trace.of(("prepare",))) >= device_steps):  # fmt: skip
                return result, trace
            assert time.monotonic() < deadline, (
                f"{batches} batches, {device_steps} device steps, trace incomplete: "
                f"{trace.summary()}"
            )
            time.sleep(0.2)


def _read_spans(directory: Path, lo: int, hi: int) -> list[Span]:
    spans: list[Span] = []
    for path in directory.glob("*.jsonl"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            for lane, start, end, tid in json.loads(line):
                if lo <= start <= hi:
                    spans.append((pid, tid, lane, start, end))
    return spans


@pytest.fixture(scope="session")
def _trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from async_executor import tracing

    # One directory for the session: the tracer, once installed in this
    # process, keeps writing where it started. Calls are told apart by time.
    if tracing.enabled():
        return tracing.trace_dir()
    return tmp_path_factory.mktemp("step-trace")


@pytest.fixture
def step_tracer(_trace_dir: Path, monkeypatch: pytest.MonkeyPatch) -> StepTracer:
    from async_executor import tracing

    # Worker processes started from now on install the tracer themselves
    # (vLLM runs the plugin entry point in each); this process may have
    # loaded the plugins already.
    monkeypatch.setenv(tracing.ENV_FLAG, str(_trace_dir))
    tracing.install()
    return StepTracer(_trace_dir)


def assert_overlapped(trace: StepTrace) -> None:
    """Real concurrency: a host span of the engine thread (schedule, update)
    intersects in time a device-stage span (prepare, forward) of another
    thread or process. Stages `process` and `thread`."""
    host, device = trace.threads(HOST_LANES), trace.threads(DEVICE_LANES)
    assert len(host) == 1, f"one engine thread expected: {trace.summary()}"
    assert device and not device & host, f"device stage on the engine thread: {trace.summary()}"
    overlaps = len(trace.overlaps())
    assert overlaps > 0, f"host and device work never overlapped: {trace.summary()}"


def assert_not_overlapped(trace: StepTrace) -> None:
    """No concurrency: every device-stage span lies outside every host span
    of the engine thread (vLLM's synchronous loop, or `stage="inline"`)."""
    assert trace.of(HOST_LANES) and trace.of(DEVICE_LANES), trace.summary()
    overlaps = trace.overlaps()
    first = overlaps[0] if overlaps else None
    assert first is None, f"{len(overlaps)} overlaps, first {first}: {trace.summary()}"


def metric(llm: Any, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def make_scheduled(windows: dict[str, int], *, finished: set[str] | None = None,
                   new_blocks: bool = False) -> Any:  # fmt: skip
    """A SchedulerOutput of running requests in a decode window (request ->
    window length, all equal), as our scheduler hands it to the executor."""
    from vllm.v1.core.sched.output import CachedRequestData

    from async_executor.vllm_glue.window_steps import WindowedSchedulerOutput

    ids = list(windows)
    (window,) = set(windows.values()) or {1}
    return WindowedSchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData(
            req_ids=ids,
            resumed_req_ids=set(),
            new_token_ids=[],
            all_token_ids={},
            new_block_ids=[([7],) if new_blocks else None for _ in ids],
            num_computed_tokens=[10 * (i + 1) for i in range(len(ids))],
            num_output_tokens=[i + 1 for i in range(len(ids))],
        ),
        num_scheduled_tokens=dict(windows),
        total_num_scheduled_tokens=sum(windows.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(finished or ()),
        free_encoder_mm_hashes=[],
        window=window,
    )
