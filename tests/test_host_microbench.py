"""Per-step host work on CPU, at batch 32, 128 and 512 with a decode window
of 8:

- batch preparation: a window's device steps as vLLM data;
- output resolution: merging the device steps' outputs;
- launch bookkeeping: recording a launch and its resolution;
- the window's output update, next to vLLM's per-token update of the same
  tokens.

The `test_bench_*` tests time these with pytest-benchmark (its table puts
the window update next to vLLM's per-token update) and check their results;
no test asserts on time, which depends on the machine. What is asserted is
the cost model, counted: the calls the window update makes into vLLM's
request, and the Python calls of the executor's per-step work as the batch
and the window grow.
"""

from __future__ import annotations

import random
import sys
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
from async_executor.vllm_glue.scheduler import window_update as update_window
from async_executor.vllm_glue.window_steps import first_step, later_steps, merge_outputs
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
    requests, windows = _requests(batch), _windows(batch)

    def run() -> None:
        for request, window in zip(requests, windows, strict=True):
            update_window(request, list(window), 100_000)

    return run


def window_steps(out: SchedulerOutput) -> list[SchedulerOutput]:
    return [first_step(out), *later_steps(out, WINDOW)]


def pipeline_overhead(batch: int) -> Callable[[], None]:
    """Everything the executor adds per window: its device steps as vLLM
    data, the launch bookkeeping, the merge of the steps' outputs."""
    out = scheduled(batch)
    outputs = step_outputs(batch, logprobs=False)
    tracker = InFlightTracker(PipelineCounters())

    def run() -> None:
        steps = window_steps(out)
        launched = tracker.launch(device_steps=len(steps))
        merge_outputs(outputs)
        tracker.resolve(launched)

    return run


def python_calls(fn: Callable[[], Any]) -> int:
    """Python-level calls (functions, comprehensions, generator resumes) made
    by one run of `fn`, after a warm-up run: a count, the same on every
    machine."""
    fn()
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_batch_preparation(benchmark: Any, batch: int) -> None:
    out = scheduled(batch)
    steps = benchmark(window_steps, out)
    assert [s.total_num_scheduled_tokens for s in steps] == [batch] * WINDOW
    # Step k decodes each request's k-th token of the window.
    assert [s.scheduled_cached_reqs.num_computed_tokens[1] for s in steps] == [
        20 + k for k in range(WINDOW)
    ]


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_output_resolution(benchmark: Any, batch: int) -> None:
    outputs = step_outputs(batch, logprobs=True)
    merged = benchmark(merge_outputs, outputs)
    # step_outputs: request i samples k * 1000 + i at step k.
    assert merged.sampled_token_ids == [[k * 1000 + i for k in range(WINDOW)]
                                        for i in range(batch)]  # fmt: skip
    lp = merged.logprobs
    assert lp is not None and lp.cu_num_generated_tokens == list(range(0, batch * WINDOW, WINDOW))
    assert lp.logprob_token_ids[:WINDOW, 0].tolist() == list(range(WINDOW))


@pytest.mark.parametrize("batch", BATCHES)
def test_bench_launch_bookkeeping(benchmark: Any, batch: int) -> None:
    counters = PipelineCounters()
    tracker = InFlightTracker(counters)
    rounds = 0

    def launch_and_resolve() -> None:
        nonlocal rounds
        tracker.resolve(tracker.launch(device_steps=WINDOW))
        rounds += 1

    benchmark(launch_and_resolve)
    s = counters.snapshot()
    # Each batch resolves before the next one launches.
    assert (s.batches_launched, s.launched_before_predecessor_resolved) == (rounds, 0)
    assert s.device_steps == rounds * WINDOW and s.window_sizes == {WINDOW: rounds}
    assert s.max_in_flight == 1


@pytest.mark.parametrize("path", ["window", "vllm-per-token"])
@pytest.mark.parametrize("batch", BATCHES)
def test_bench_output_update(benchmark: Any, batch: int, path: str) -> None:
    benchmark.group = f"output update, batch {batch}"
    benchmark(window_update(batch) if path == "window" else per_token_update(batch))


@pytest.mark.parametrize("batch", BATCHES)
def test_window_update_appends_once_per_request(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's per-token update appends each token to the request (re-hashing
    its KV blocks) and runs `check_stop` after each; the window update checks
    the window in one pass and appends it at once, with the same result."""
    import vllm.v1.core.sched.scheduler as vllm_scheduler

    counts = {"append": 0, "check_stop": 0}
    append, check_stop = Request.append_output_token_ids, vllm_scheduler.check_stop

    def counted_append(self: Request, token_ids: Any) -> None:
        counts["append"] += 1
        append(self, token_ids)

    def counted_check_stop(*args: Any, **kwargs: Any) -> bool:
        counts["check_stop"] += 1
        return check_stop(*args, **kwargs)

    monkeypatch.setattr(Request, "append_output_token_ids", counted_append)
    monkeypatch.setattr(vllm_scheduler, "check_stop", counted_check_stop)
    fake = types.SimpleNamespace(max_model_len=100_000)
    windows = _windows(batch)
    states = []
    for path in ("vllm", "window"):
        requests = _requests(batch)
        counts.update(append=0, check_stop=0)
        for request, window in zip(requests, windows, strict=True):
            if path == "vllm":
                Scheduler._update_request_with_output(fake, request, list(window))  # type: ignore[arg-type]
            else:
                update_window(request, list(window), fake.max_model_len)
        states.append(([list(r.output_token_ids) for r in requests], dict(counts)))
    (vllm_tokens, vllm_calls), (window_tokens, window_calls) = states
    assert window_tokens == vllm_tokens == windows
    assert vllm_calls == {"append": batch * WINDOW, "check_stop": batch * WINDOW}
    assert window_calls == {"append": batch, "check_stop": 0}


def test_pipeline_host_work_grows_per_step_not_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the executor adds per window (its steps, bookkeeping, merge)
    makes at most one Python call per request, whatever the window; a longer
    window adds the same few calls per device step at every batch size.
    vLLM's per-token update, for contrast, makes several calls per token."""
    calls: dict[tuple[int, int], int] = {}
    vllm_calls: dict[int, int] = {}
    for window in (2, 16):
        monkeypatch.setattr(sys.modules[__name__], "WINDOW", window)
        for batch in (32, 512):
            calls[batch, window] = python_calls(pipeline_overhead(batch))
        vllm_calls[window] = python_calls(per_token_update(32))
    for window in (2, 16):
        per_request = (calls[512, window] - calls[32, window]) / (512 - 32)
        assert per_request <= 1, calls
    per_step = {batch: (calls[batch, 16] - calls[batch, 2]) / (16 - 2) for batch in (32, 512)}
    assert per_step[32] == per_step[512] <= 10, calls
    assert all(vllm_calls[w] >= 4 * 32 * w for w in (2, 16)), vllm_calls
