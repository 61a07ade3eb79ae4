"""Per-step host work, measured on CPU (pytest-benchmark), at batch 32, 128
and 512 with a decode window of 8:

- batch preparation: splitting a scheduled step into device steps;
- output resolution: merging the device steps' outputs;
- carry-over bookkeeping: recording a launch and its resolution;
- the window's output update.

The regression checks compare with vLLM's own per-token output update for
the same tokens, in the same process: a ratio, never an absolute time.
"""

from __future__ import annotations

import random
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from vllm import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput
from vllm.v1.request import Request

from async_executor.pipeline.counters import PipelineCounters
from async_executor.pipeline.in_flight import InFlightTracker
from async_executor.vllm_glue.scheduler import _WindowUpdate
from async_executor.vllm_glue.substeps import merge_outputs, plan_window
from tests.conftest import make_scheduled

WINDOW = 8
BATCHES = [32, 128, 512]


def scheduled(batch: int) -> SchedulerOutput:
    return make_scheduled({f"req-{i}": WINDOW for i in range(batch)})


def step_outputs(batch: int, logprobs: bool) -> list[ModelRunnerOutput]:
    ids = [f"req-{i}" for i in range(batch)]
    outs = []
    for k in range(WINDOW):
        lp = None
        if logprobs:
            lp = LogprobsLists(
                logprob_token_ids=np.full((batch, 3), k),
                logprobs=np.zeros((batch, 3), dtype=np.float32),
                sampled_token_ranks=np.ones(batch, dtype=np.int64),
            )
        outs.append(
            ModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[k * 1000 + i] for i in range(batch)],
                logprobs=lp,
            )
        )
    return outs


def _requests(batch: int) -> list[Request]:
    params = SamplingParams(max_tokens=10_000, stop_token_ids=[7])
    params._eos_token_id = 3
    return [Request(f"req-{i}", list(range(10, 60)), params, None) for i in range(batch)]


def _windows(batch: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(10, 90) for _ in range(WINDOW)] for _ in range(batch)]


def per_token_update(batch: int) -> Callable[[], None]:
    """vLLM's stock path: one update per sampled token."""
    fake = types.SimpleNamespace(max_model_len=100_000)
    requests, windows = _requests(batch), _windows(batch)

    def run() -> None:
        for request, window in zip(requests, windows, strict=True):
            for token in window:
                Scheduler._update_request_with_output(fake, request, [token])

    return run


def window_update(batch: int) -> Callable[[], None]:
    fake = types.SimpleNamespace(max_model_len=100_000)
    requests, windows = _requests(batch), _windows(batch)

    def run() -> None:
        for request, window in zip(requests, windows, strict=True):
            _WindowUpdate._update_request_with_output(fake, request, list(window))

    return run


def pipeline_overhead(batch: int) -> Callable[[], None]:
    """Everything the executor adds per scheduled step: plan, bookkeeping, merge."""
    out = scheduled(batch)
    outputs = step_outputs(batch, logprobs=False)
    tracker = InFlightTracker(PipelineCounters())
    ids = list(out.num_scheduled_tokens)

    def run() -> None:
        plan = plan_window(out)
        batch_ = tracker.launch(decode_inputs=ids, samplers=ids,
                                device_steps=plan.num_steps,
                                carried_within=plan.carried_tokens)  # fmt: skip
        merge_outputs(outputs)
        tracker.resolve(batch_)

    return run


def _best(fn: Callable[[], Any], repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_batch_preparation(benchmark: Any, batch: int) -> None:
    out = scheduled(batch)
    plan = benchmark(plan_window, out)
    assert plan.num_steps == WINDOW


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_output_resolution(benchmark: Any, batch: int) -> None:
    outputs = step_outputs(batch, logprobs=True)
    merged = benchmark(merge_outputs, outputs)
    assert len(merged.sampled_token_ids[0]) == WINDOW


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_carry_over_bookkeeping(benchmark: Any, batch: int) -> None:
    tracker = InFlightTracker(PipelineCounters())
    ids = [f"req-{i}" for i in range(batch)]

    def launch_and_resolve() -> None:
        b = tracker.launch(decode_inputs=ids, samplers=ids, device_steps=WINDOW,
                           carried_within=batch * (WINDOW - 1))  # fmt: skip
        tracker.resolve(b)

    benchmark(launch_and_resolve)


@pytest.mark.parametrize("batch", BATCHES)
def test_window_update_is_cheaper_than_per_token_update(batch: int) -> None:
    ratio = _best(window_update(batch)) / _best(per_token_update(batch))
    assert ratio < 0.7, f"window update costs {ratio:.2f}x vLLM's per-token update"


@pytest.mark.parametrize("batch", BATCHES)
def test_pipeline_overhead_is_small_next_to_vllm_update(batch: int) -> None:
    """What the executor adds per scheduled step (plan, bookkeeping, merge of
    a window) must stay well below what vLLM itself spends updating the same
    tokens one by one."""
    ratio = _best(pipeline_overhead(batch)) / _best(per_token_update(batch))
    assert ratio < 0.6, f"pipeline overhead is {ratio:.2f}x vLLM's per-token update"
