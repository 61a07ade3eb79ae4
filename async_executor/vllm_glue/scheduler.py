"""vLLM scheduler glue: decode windows, carry-over and wasted-token counts.

`WindowScheduler` (overlap on) extends vLLM's `AsyncScheduler`;
`SyncWindowScheduler` (overlap off) extends `Scheduler`. Both add only:
- before each `schedule()`, one decode window length w for the batch
  (`pipeline/window.py` decides it);
- after scheduling, the window made explicit: the step leaves the scheduler
  as a `WindowedSchedulerOutput` (`window_steps.py`) whose requests are each
  scheduled for w tokens and carry no speculative drafts;
- counts: carry-over tokens (scheduled inputs still being sampled by an
  in-flight batch, and the steps of a window after the first) and tokens
  computed on the device but dropped on the host.

How vLLM is made to schedule w tokens: the window's w-1 extra tokens are put
where vLLM expects draft tokens (`request.spec_token_ids`) just before
`schedule()`, so that vLLM's own code allocates KV slots for w tokens,
advances `num_computed_tokens` and the async placeholders by w, and counts w
tokens in flight. The drafts are taken out of the scheduled step again before
it leaves the scheduler: update_from_output then sees w sampled tokens for a
request scheduled for w tokens and no drafts, which is exactly vLLM's
accounting for w accepted tokens (nothing to roll back), and no speculative
decoding statistics are produced. Real speculative decoding is refused by the
front end (windows would take its draft slots).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from async_executor.pipeline.counters import PipelineCounters, counters_for
from async_executor.pipeline.window import (
    DecodeBatch,
    StepClock,
    WindowBounds,
    WindowChoice,
    choose_window,
    latency_cap,
    payoff_for,
)
from async_executor.settings import PipelineSettings
from async_executor.vllm_glue.window_steps import mark_window, window_of

# One shared placeholder list per length; vLLM only reads their count.
_PLACEHOLDERS: dict[int, list[int]] = {}

# Waiting requests that vLLM would not admit whatever the window.
_BLOCKED_WAITING = frozenset(
    {
        RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR,
        RequestStatus.WAITING_FOR_REMOTE_KVS,
        RequestStatus.WAITING_FOR_STREAMING_REQ,
    }
)

# How long after a request arrives the admission bound keeps applying.
_ARRIVAL_LOOKBACK_NS = 1_000_000_000


def _placeholders(n: int) -> list[int]:
    if n not in _PLACEHOLDERS:
        _PLACEHOLDERS[n] = [-1] * n
    return _PLACEHOLDERS[n]


class _PipelineScheduling:
    """What our schedulers add to vLLM's, windows or not: the carry-over and
    wasted-token counts and the step clock; with windows, opening them."""

    # Provided by vLLM's Scheduler.
    vllm_config: Any
    scheduler_config: Any
    running: list[Request]
    waiting: Any
    requests: dict[str, Request]
    max_model_len: int
    max_num_scheduled_tokens: int
    max_num_running_reqs: int
    num_waiting_for_streaming_input: int
    block_size: int
    kv_cache_manager: Any
    kv_cache_config: Any
    connector: Any
    lora_config: Any
    num_spec_tokens: int
    current_step: int

    def _init_pipeline_scheduling(self) -> None:
        settings = PipelineSettings.from_vllm_config(self.vllm_config)
        self._settings = settings
        self._counters: PipelineCounters = counters_for(self.vllm_config)
        self._max_window = settings.decode_window
        self._depth = self.vllm_config.max_concurrent_batches
        self._clock = StepClock()
        # Fed by the executor (each batch timed as it resolves).
        self._payoff = payoff_for(self.vllm_config)
        self._last_arrival_ns = 0
        # Steps scheduled and steps whose output was processed: every
        # scheduled step, empty or not, is queued by the engine and passed to
        # update_from_output exactly once, in order.
        self._num_scheduled = 0
        self._num_updated = 0
        # Finished requests that in-flight steps may still hold tokens of:
        # request id -> number of steps scheduled when it finished.
        self._finished_in_flight: dict[str, int] = {}
        model_config = self.vllm_config.model_config
        if (
            self.num_spec_tokens
            or self.connector is not None
            or model_config.runner_type == "pooling"
            or model_config.is_multimodal_model
            or model_config.is_hybrid
        ):
            # Draft slots are taken by speculative decoding; KV connectors,
            # multimodal encoders and hybrid (mamba) state expect one token
            # per decode step; pooling models do not decode.
            self._max_window = 1
        threshold = self.scheduler_config.long_prefill_token_threshold
        if threshold > 0:
            # vLLM cuts any request's tokens to this; a window must not be.
            self._max_window = min(self._max_window, threshold)

    # -- opening windows ---------------------------------------------------

    def _admissible_waiter(self) -> bool:
        """Whether a waiting request could be admitted by this step: only such
        a request closes windows."""
        if len(self.running) + self.num_waiting_for_streaming_input >= self.max_num_running_reqs:
            return False
        # vLLM admits no request whose adapter would exceed max_loras.
        full_loras: set[int] | None = None
        if self.lora_config:
            loras = {
                r.lora_request.lora_int_id
                for r in self.running
                if r.lora_request and r.lora_request.lora_int_id > 0
            }
            if len(loras) >= self.lora_config.max_loras:
                full_loras = loras
        queues = (getattr(self, "kv_holding_waiting", ()), self.waiting)
        for queue in queues:
            for r in queue:
                if r.status in _BLOCKED_WAITING:
                    continue
                lora = r.lora_request
                if full_loras is not None and lora and lora.lora_int_id not in full_loras:
                    continue
                return True
        return False

    def _plan_decode_steps(self) -> None:
        """Skip requests whose last tokens are all in flight; then, if no
        admissible request waits, choose one window for the batch."""
        live: list[Request] = []
        remaining: list[int] = []
        computed: list[int] = []
        single = False
        for r in self.running:
            left = r.max_tokens - r.num_output_tokens - r.num_output_placeholders
            if left <= 0:
                # All its tokens up to max_tokens are in flight: skip it this
                # step, windows or not. Hazard: vLLM's own skip of such a
                # request assumes one token in flight; with a window's w in
                # flight it schedules one step more, computed and dropped.
                # Its last batch resolves and finishes it.
                r.next_decode_eligible_step = self.current_step + 2
                continue
            if single:
                continue
            if (
                r.use_structured_output
                or r.num_tokens + r.num_output_placeholders - r.num_computed_tokens > 1
            ):
                single = True
                continue
            live.append(r)
            remaining.append(left)
            computed.append(r.num_computed_tokens)
        if self._max_window <= 1 or single or not live or self._admissible_waiter():
            return
        now = time.perf_counter_ns()
        arrivals_recent = now - self._last_arrival_ns < _ARRIVAL_LOOKBACK_NS
        # Every KV cache group takes its blocks from the one pool.
        groups = max(1, len(self.kv_cache_config.kv_cache_groups))
        cap = latency_cap(
            step_ms=self._clock.step_ms,
            depth=self._depth,
            max_token_gap_ms=self._settings.max_token_gap_ms,
            max_admission_delay_ms=self._settings.max_admission_delay_ms,
            arrivals_recent=arrivals_recent,
        )
        window = choose_window(
            DecodeBatch(np.asarray(remaining), np.asarray(computed)),
            WindowBounds(
                max_window=self._max_window,
                max_model_len=self.max_model_len,
                token_budget=self.max_num_scheduled_tokens,
                block_size=self.block_size,
                free_blocks=self.kv_cache_manager.block_pool.get_num_free_blocks() // groups,
                latency_cap=cap,
            ),
        )
        if window <= 1:
            return
        settings = self._settings
        min_gain = settings.min_window_gain
        if arrivals_recent and min_gain > 0 and settings.max_admission_delay_ms > 0:
            # Windows measured not to make steps faster would only delay
            # tokens and arrivals. (With the admission bound off, an
            # arrival's delay is accepted and the window asked for is the
            # window run.)
            choice = self._payoff.decide(min_gain, len(live))
            if not choice.opens:
                if choice is WindowChoice.DECLINE:
                    self._counters.add(windows_declined=1)
                return
        placeholders = _placeholders(window - 1)
        for r in live:
            r.spec_token_ids = placeholders

    def _hold_back_structured_output(self) -> None:
        # Hazard (depth > 2): vLLM defers a structured-output request's
        # sampling until the engine has popped the oldest in-flight batch and
        # fed its tokens to the grammar. That is the request's previous batch
        # only while at most one batch is in flight; with more (including the
        # empty batches scheduled while grammars compile) the bitmask would
        # miss tokens. So such a request waits until one batch is in flight.
        if self._num_scheduled - self._num_updated < 2:
            return
        for r in self.running:
            if r.use_structured_output and r.num_output_placeholders > 0:
                r.next_decode_eligible_step = self.current_step + 2

    def add_request(self, request: Request) -> None:
        self._last_arrival_ns = time.perf_counter_ns()
        super().add_request(request)  # type: ignore[misc]

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        if self._depth > 2:
            self._hold_back_structured_output()
        # More than one token of a request can be in flight only in a window
        # or with more than two batches in flight.
        if self._max_window > 1 or self._depth > 2:
            self._plan_decode_steps()
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        self._num_scheduled += 1
        return output

    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        window = 1
        if scheduler_output.scheduled_spec_decode_tokens and not self.num_spec_tokens:
            window = _uniform_window(scheduler_output)
        # Inputs still being sampled by an in-flight batch: requests with
        # output placeholders before this step adds its own.
        requests = self.requests
        carried = sum(
            1
            for req_id in scheduler_output.num_scheduled_tokens
            if requests[req_id].num_output_placeholders > 0
        )
        super()._update_after_schedule(scheduler_output)  # type: ignore[misc]
        if window > 1:
            # Out of the draft fields: from here on the window is explicit.
            scheduler_output.scheduled_spec_decode_tokens = {}
            mark_window(scheduler_output, window)
            carried += len(scheduler_output.num_scheduled_tokens) * (window - 1)
        if carried:
            self._counters.add(carry_over_tokens=carried)

    # -- results -----------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> Any:
        self._num_updated += 1
        if scheduler_output.total_num_scheduled_tokens:
            self._clock.observe(time.perf_counter_ns(), window_of(scheduler_output))
        if self._finished_in_flight:
            self._count_tokens_of_finished(scheduler_output, model_runner_output)
        return super().update_from_output(  # type: ignore[misc]
            scheduler_output, model_runner_output
        )

    def _count_tokens_of_finished(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> None:
        """Tokens of requests that finished (stopped, aborted) while this
        step was in flight: vLLM skips them; count them before it does."""
        finished = self._finished_in_flight
        sampled = model_runner_output.sampled_token_ids
        if sampled:
            index = model_runner_output.req_id_to_index
            hits = finished.keys() & scheduler_output.num_scheduled_tokens.keys()
            wasted = sum(len(sampled[index[r]]) for r in hits if r in index)
            if wasted:
                self._counters.add(wasted_tokens_dropped=wasted)
        # A request finished after n steps were scheduled is in none after
        # them: once step n is processed it can be forgotten.
        done = [r for r, n in finished.items() if n <= self._num_updated]
        for r in done:
            del finished[r]

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        if self._num_scheduled > self._num_updated:
            self._finished_in_flight[request.request_id] = self._num_scheduled
        return super()._free_request(request, *args, **kwargs)  # type: ignore[misc]


def _uniform_window(scheduler_output: SchedulerOutput) -> int:
    """The step's window length, every scheduled request cut to the shortest.

    vLLM may schedule fewer tokens than asked (token budget, model length).
    This runs before the scheduler advances its counters, so cutting the
    scheduled tokens here is as if they had never been asked for; the extra
    KV slots stay allocated and are used by the request's next tokens. A
    step with a new or resumed request is no window.
    """
    drafts = scheduler_output.scheduled_spec_decode_tokens
    scheduled = scheduler_output.num_scheduled_tokens
    shortest = min(1 + len(drafts.get(req_id, ())) for req_id in scheduled)
    cached = scheduler_output.scheduled_cached_reqs
    if scheduler_output.scheduled_new_reqs or cached.resumed_req_ids:
        shortest = 1
    cut = 0
    for req_id, tokens in list(drafts.items()):
        extra = len(tokens) - (shortest - 1)
        if extra <= 0:
            continue
        scheduled[req_id] -= extra
        cut += extra
        if shortest == 1:
            del drafts[req_id]
        else:
            drafts[req_id] = tokens[: shortest - 1]
    scheduler_output.total_num_scheduled_tokens -= cut
    return shortest


def window_update(
    request: Request, new_token_ids: list[int], max_model_len: int
) -> tuple[list[int], bool]:
    """vLLM's per-token output update (`Scheduler._update_request_with_output`)
    for a window of tokens, in one pass.

    For each sampled token vLLM appends it to the request (re-hashing KV
    blocks) and runs `check_stop`. Here the window is checked with the same
    order of conditions (EOS, stop token ids, then the length caps; a stop
    token wins a tie with a length cap) and appended at once.
    """
    params = request.sampling_params
    assert params is not None
    n = len(new_token_ids)
    # 1-based position of the token at which the request stops, if any.
    stop_at, reason = n + 1, RequestStatus.FINISHED_STOPPED
    stop_token: int | None = None
    eos, stop_ids = params.eos_token_id, params.stop_token_ids
    if eos is not None or stop_ids:
        for i, token in enumerate(new_token_ids, 1):
            if token == eos:
                stop_at = i
                break
            if stop_ids and token in stop_ids:
                stop_at, stop_token = i, token
                break
    length_cap = max(
        1,
        min(
            max_model_len - request.num_tokens,
            request.max_tokens - request.num_output_tokens,
        ),
    )
    if length_cap < stop_at:
        stop_at, reason, stop_token = length_cap, RequestStatus.FINISHED_LENGTH_CAPPED, None
    del new_token_ids[stop_at:]
    request.append_output_token_ids(new_token_ids)
    if stop_at > n:
        return new_token_ids, False
    request.status = reason
    if stop_token is not None:
        request.stop_reason = stop_token
    return new_token_ids, True


class _WindowTokenUpdate(Scheduler):
    """A window's tokens through `window_update`; single tokens, and requests
    with repetition detection, through vLLM's own per-token path.

    Hazard (method order): this class must come after `AsyncScheduler` in a
    scheduler's bases, so that AsyncScheduler's override (which releases the
    output placeholders of the tokens kept) wraps this one and sees the
    window's tokens already cut at a stop.
    """

    _counters: PipelineCounters

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], is_stale: bool = False
    ) -> tuple[list[int], bool]:
        n = len(new_token_ids)
        params = request.sampling_params
        if n <= 1 or params is None or params.repetition_detection is not None:
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        kept, stopped = window_update(request, new_token_ids, self.max_model_len)
        if len(kept) < n:
            # The tail of a decode window after a stop token or max_tokens.
            self._counters.add(wasted_tokens_dropped=n - len(kept))
        return kept, stopped


class WindowScheduler(_PipelineScheduling, AsyncScheduler, _WindowTokenUpdate):
    """Overlap on, decode windows on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_pipeline_scheduling()


class SyncWindowScheduler(_PipelineScheduling, _WindowTokenUpdate):
    """Overlap off (vLLM's synchronous loop), decode windows on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_pipeline_scheduling()


class StepScheduler(_PipelineScheduling, AsyncScheduler):
    """Overlap on, one token per step: vLLM's own output update."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_pipeline_scheduling()


class SyncStepScheduler(_PipelineScheduling, Scheduler):
    """Overlap off, one token per step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_pipeline_scheduling()
