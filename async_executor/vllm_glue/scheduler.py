"""vLLM scheduler glue: decode windows and the wasted-token count.

`WindowScheduler` (overlap on) extends vLLM's `AsyncScheduler`;
`SyncWindowScheduler` (overlap off) extends `Scheduler`. Both add only:
- before each `schedule()`, one decode window length w for the batch,
  expressed as w-1 placeholder drafts per request, so that vLLM allocates KV
  slots for w tokens and accounts the w sampled tokens as accepted drafts;
- a check after scheduling that every scheduled request got the same window
  (the runner needs it, see `pipeline/window.py`), shrinking them if not;
- a count of tokens computed on the device and dropped on the host.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from async_executor.pipeline.counters import PipelineCounters, counters_for
from async_executor.pipeline.window import DecodeState, uniform_window
from async_executor.settings import PipelineSettings

# One shared placeholder list per length; vLLM only reads their count.
_PLACEHOLDERS: dict[int, list[int]] = {}


def _placeholders(n: int) -> list[int]:
    if n not in _PLACEHOLDERS:
        _PLACEHOLDERS[n] = [-1] * n
    return _PLACEHOLDERS[n]


def _decode_state(r: Request) -> DecodeState:
    return DecodeState(
        num_output_tokens=r.num_output_tokens + r.num_output_placeholders,
        max_tokens=r.max_tokens,
        num_computed_tokens=r.num_computed_tokens,
        num_pending_inputs=r.num_tokens + r.num_output_placeholders - r.num_computed_tokens,
        needs_host_per_token=r.use_structured_output,
    )


class _WindowMixin:
    # Provided by vLLM's Scheduler.
    vllm_config: Any
    scheduler_config: Any
    running: list[Request]
    requests: dict[str, Request]
    max_model_len: int
    max_num_scheduled_tokens: int
    connector: Any
    num_spec_tokens: int
    current_step: int

    def _init_window(self) -> None:
        settings = PipelineSettings.from_vllm_config(self.vllm_config)
        self._counters: PipelineCounters = counters_for(self.vllm_config)
        self._max_window = settings.decode_window
        self._depth = self.vllm_config.max_concurrent_batches
        self._unresolved_batches = 0
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

    def _open_windows(self) -> None:
        num_waiting = self.get_request_counts()[1]  # type: ignore[attr-defined]
        if num_waiting:
            return
        states = [(r, _decode_state(r)) for r in self.running]
        live = [(r, s) for r, s in states if not s.exhausted]
        window = uniform_window(
            (s for _, s in live),
            max_window=self._max_window,
            num_waiting=num_waiting,
            max_model_len=self.max_model_len,
            token_budget=self.max_num_scheduled_tokens,
        )
        if window <= 1:
            return
        for r, s in states:
            if s.exhausted:
                # All its tokens up to max_tokens are in flight: skip it this
                # step (vLLM's own skip only covers one token in flight). Its
                # last batch resolves and finishes it.
                r.next_decode_eligible_step = self.current_step + 2
        placeholders = _placeholders(window - 1)
        for r, _ in live:
            r.spec_token_ids = placeholders

    def _hold_back_structured_output(self) -> None:
        # Hazard (depth > 2): vLLM defers a structured-output request's
        # sampling until the engine has popped the oldest in-flight batch and
        # fed its tokens to the grammar. That is the request's previous batch
        # only while at most one batch is in flight; with more (including the
        # empty batches scheduled while grammars compile) the bitmask would
        # miss tokens. So such a request waits until one batch is in flight.
        if self._unresolved_batches < 2:
            return
        for r in self.running:
            if r.use_structured_output and r.num_output_placeholders > 0:
                r.next_decode_eligible_step = self.current_step + 2

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        if self._depth > 2:
            self._hold_back_structured_output()
        if self._max_window > 1:
            self._open_windows()
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        # Every scheduled step, empty or not, is queued by the engine and
        # later passed to update_from_output exactly once.
        self._unresolved_batches += 1
        return output

    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        drafts = scheduler_output.scheduled_spec_decode_tokens
        if drafts and not self.num_spec_tokens:
            _make_windows_uniform(scheduler_output)
        super()._update_after_schedule(scheduler_output)  # type: ignore[misc]

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> Any:
        # Tokens of requests that finished (stopped, aborted) while this batch
        # was in flight: vLLM skips them; count them before it does.
        sampled = model_runner_output.sampled_token_ids
        if sampled:
            index = model_runner_output.req_id_to_index
            wasted = 0
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests.get(req_id)
                if request is None or request.is_finished():
                    i = index.get(req_id)
                    if i is not None:
                        wasted += len(sampled[i])
            if wasted:
                self._counters.add(wasted_tokens_dropped=wasted)
        self._unresolved_batches -= 1
        return super().update_from_output(  # type: ignore[misc]
            scheduler_output, model_runner_output
        )

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], *args: Any, **kwargs: Any
    ) -> tuple[list[int], bool]:
        computed = len(new_token_ids)
        kept, stopped = super()._update_request_with_output(  # type: ignore[misc]
            request, new_token_ids, *args, **kwargs
        )
        if len(kept) < computed:
            # The tail of a decode window after a stop token or max_tokens.
            self._counters.add(wasted_tokens_dropped=computed - len(kept))
        return kept, stopped

    def make_spec_decoding_stats(self, spec_decoding_stats: Any, *args: Any, **kwargs: Any) -> Any:
        # Window placeholders are not speculative drafts: no acceptance stats.
        if not self.num_spec_tokens:
            return spec_decoding_stats
        return super().make_spec_decoding_stats(  # type: ignore[misc]
            spec_decoding_stats, *args, **kwargs
        )


def _make_windows_uniform(scheduler_output: SchedulerOutput) -> None:
    """Cut every scheduled request's window to the shortest one.

    vLLM may schedule fewer tokens than asked (token budget, model length).
    This runs before the scheduler advances its counters, so cutting the
    scheduled tokens here is as if they had never been asked for; the extra
    KV slots stay allocated and are used by the request's next tokens.
    """
    drafts = scheduler_output.scheduled_spec_decode_tokens
    scheduled = scheduler_output.num_scheduled_tokens
    shortest = min(1 + len(drafts.get(req_id, ())) for req_id in scheduled)
    if all(1 + len(drafts.get(req_id, ())) == shortest for req_id in scheduled):
        return
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


class _WindowUpdate(Scheduler):
    """vLLM's per-token output update, done once per window.

    For each sampled token vLLM appends it to the request (re-hashing KV
    blocks) and runs `check_stop`. A window of w tokens is checked here in
    one pass with the same order of conditions (EOS, stop token ids, then the
    length caps; a stop token wins a tie with a length cap) and appended at
    once. Requests with repetition detection, and single tokens, take
    vLLM's own path.
    """

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], *args: Any, **kwargs: Any
    ) -> tuple[list[int], bool]:
        params = request.sampling_params
        n = len(new_token_ids)
        if n <= 1 or params is None or params.repetition_detection is not None:
            return super()._update_request_with_output(request, new_token_ids, *args, **kwargs)
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
                self.max_model_len - request.num_tokens,
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


class WindowScheduler(_WindowMixin, AsyncScheduler, _WindowUpdate):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_window()


class SyncWindowScheduler(_WindowMixin, _WindowUpdate):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_window()
