"""Decode windows: how many device steps one scheduled step may run.

A batch in steady decode can be scheduled once for w tokens per request and
decoded w times back to back on the device, each step's sampled token
carried over to the next step's input without a trip to the host.
Scheduling, output processing and host bookkeeping are then paid once per w
tokens instead of once per token.

The policy keeps greedy outputs equal to vLLM's one-token-per-step path and
keeps a server's latency within its settings:
- Each device step is an ordinary one-token decode step, so each token is
  computed as vLLM computes it.
- Windows open only when one-token stepping would not change the batch
  either: no request is being prefilled and no waiting request could be
  admitted (a waiter that cannot be admitted anyway - the batch is full, its
  grammar is still compiling - does not close windows).
- Requests whose next token the host must constrain (structured output)
  force one token per step.
- A window never runs past a request's max_tokens or the model length, and
  never needs more KV blocks than are free: a window causes no preemption
  that one-token steps would not.
- While requests arrive, windows open only where they make decode steps
  faster (`WindowPayoff`): where the device bounds the step they save
  nothing and would only cost the latency below.
- Latency bounds (`WindowBounds`): tokens of a window reach a stream
  together, so a window of w widens the gap between a stream's tokens to
  about w device steps; and a request that arrives while windows are in
  flight waits behind them, up to depth x (w - 1) extra steps.

Invariant: one window length for every request scheduled in the step. The
runner's persistent batch must hold the same requests in every device step
of a window; a request missing from the last step would lose its carry-over
into the next scheduled step.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """What the policy needs to know about the running requests that will be
    scheduled, one array entry per request."""

    # Output tokens each request may still produce (max_tokens minus the
    # tokens sampled or in flight).
    remaining_tokens: np.ndarray
    # Tokens whose KV is computed or being computed: the next input position.
    num_computed_tokens: np.ndarray
    # Some request is prefilling or needs the host between its tokens.
    needs_single_steps: bool = False

    @property
    def size(self) -> int:
        return len(self.remaining_tokens)


@dataclass(frozen=True, slots=True)
class WindowBounds:
    """Limits of one scheduling step."""

    max_window: int
    max_model_len: int
    token_budget: int
    block_size: int
    free_blocks: int
    # The latency caps in device steps (None: no cap). See `latency_cap`.
    latency_cap: int | None = None


def choose_window(batch: DecodeBatch, bounds: WindowBounds) -> int:
    """The window length for the next scheduled step (1: no window)."""
    window = bounds.max_window
    if bounds.latency_cap is not None:
        window = min(window, bounds.latency_cap)
    if window <= 1 or batch.size == 0 or batch.needs_single_steps:
        return 1
    computed = batch.num_computed_tokens
    # A step at position p samples the token for p + 1; the last position a
    # token may be fed at is max_model_len - 1.
    window = min(
        window,
        int(batch.remaining_tokens.min()),
        int(bounds.max_model_len - 1 - computed.max()),
        bounds.token_budget // batch.size,
    )
    if window <= 1:
        return 1
    return _largest_fitting_window(computed, window, bounds.block_size, bounds.free_blocks)


def _largest_fitting_window(computed: np.ndarray, window: int, block_size: int, free: int) -> int:
    """The largest w <= window whose new KV blocks fit in the free blocks.

    Each request holds blocks for its first `computed` tokens; w more tokens
    need cdiv(computed + w, block_size) - cdiv(computed, block_size) new
    blocks. If even w = 1 does not fit, one-token stepping (vLLM's own
    behaviour, preemption included) is what runs.
    """
    held = -(-computed // block_size)
    for w in range(window, 1, -1):
        needed = int((-(-(computed + w) // block_size) - held).sum())
        if needed <= free:
            return w
    return 1


def latency_cap(
    *,
    step_ms: float | None,
    depth: int,
    max_token_gap_ms: float,
    max_admission_delay_ms: float,
    arrivals_recent: bool,
) -> int | None:
    """The largest window the latency settings allow, from the measured time
    of one device step; None when nothing caps it (no estimate yet, or both
    bounds off).

    - A stream receives a window's tokens together: w steps apart.
    - A request that arrives while windows are in flight is admitted after
      them: up to depth x (w - 1) more steps than with one-token steps. Only
      while requests are arriving (an offline batch admits everything first).
    """
    if step_ms is None or step_ms <= 0:
        return None
    caps = []
    if max_token_gap_ms > 0:
        caps.append(math.floor(max_token_gap_ms / step_ms))
    if arrivals_recent and max_admission_delay_ms > 0:
        caps.append(1 + math.floor(max_admission_delay_ms / (depth * step_ms)))
    return max(1, min(caps)) if caps else None


def _average(mean: float | None, sample: float, alpha: float) -> float:
    """Exponential moving average; the first sample starts it."""
    return sample if mean is None else mean + alpha * (sample - mean)


class StepClock:
    """Host-observed time of one device step: the interval between
    consecutive batch results divided by the batch's device steps, averaged
    (exponentially). An interval after an idle engine is not a step time, so
    intervals longer than `idle_after_s` restart the measurement."""

    def __init__(self, alpha: float = 0.2, idle_after_s: float = 0.5) -> None:
        self.alpha = alpha
        self.idle_after_ns = int(idle_after_s * 1e9)
        self.step_ms: float | None = None
        self._last_ns: int | None = None

    def observe(self, now_ns: int, device_steps: int) -> None:
        last, self._last_ns = self._last_ns, now_ns
        if last is None or device_steps <= 0:
            return
        interval = now_ns - last
        if interval > self.idle_after_ns:
            return
        self.step_ms = _average(self.step_ms, interval / 1e6 / device_steps, self.alpha)


class WindowChoice(enum.Enum):
    """What `WindowPayoff.decide` says of a window the scheduler may open."""

    OPEN = "open"  # measured to pay
    DECLINE = "decline"  # measured not to pay, or not known to (no estimate)
    PROBE_WINDOW = "probe-window"  # open, to measure windows
    PROBE_ONE_TOKEN = "probe-one-token"  # one-token step, to measure those

    @property
    def opens(self) -> bool:
        return self in (WindowChoice.OPEN, WindowChoice.PROBE_WINDOW)


@dataclass(slots=True)
class StepTimes:
    """Time per decode step, with and without windows, in one bucket of batch
    sizes. Positions count the bucket's pure-decode batches."""

    one_token_ms: float | None = None
    window_ms: float | None = None
    batches: int = 0
    one_token_at: int | None = None  # position of the last sample of each kind
    window_at: int | None = None
    one_token_probed_at: int | None = None  # position when a probe of each kind began
    window_probed_at: int | None = None


class WindowPayoff:
    """Whether decode windows make decode steps faster, measured: the time per
    step of pure-decode batches that ran as windows against that of
    one-token batches of about the same size.

    A window saves host work (the engine schedules and processes outputs once
    per w device steps), not device work. Where the device bounds the step (a
    large model at a small batch) a window saves nothing and only costs
    latency: a stream gets its tokens w at a time, and an arrival waits
    behind the windows in flight. How much it saves depends on how the
    engine's work, the worker's input preparation and the device overlap,
    which no model of the pipeline predicts well (an estimate from the
    engine's wait alone declined windows at 1B on an H200 where they pay;
    benchmarks/SERVING.md), so the gain is measured, not modelled:

        gain = (time per step, one-token batches)
               / (time per step, window batches) - 1

    per bucket of batch sizes (half octaves: a step's time grows with the
    batch). A batch's time is the interval between its result and the
    previous batch's on the engine thread, per device step: with batches in
    flight back to back that is the pipeline's time per batch.

    Only steady batches are timed: pure-decode batches that follow a
    pure-decode batch of the same kind. The first batch after a switch was
    launched while a batch of the other kind ran, and its interval mixes the
    two. So a kind with no recent sample in the bucket is probed with
    `probe_batches` batches of it in a row - windows first - at most once per
    `reprobe_batches` batches of the bucket: one-token batches while windows
    keep opening, windows while they keep being declined (a load that grows
    past the point where windows pay is found again).
    """

    def __init__(
        self,
        alpha: float = 0.2,
        idle_after_s: float = 0.5,
        reprobe_batches: int = 64,
        probe_batches: int = 3,
    ) -> None:
        if probe_batches < 2:
            raise ValueError("a probe needs two batches in a row: the first is not steady")
        self.alpha = alpha
        self.idle_after_ns = int(idle_after_s * 1e9)
        self.reprobe_batches = reprobe_batches
        self.probe_batches = probe_batches
        self._buckets: dict[int, StepTimes] = {}
        self._last_ns: int | None = None
        # Whether the previous batch was a window; None if it was no
        # pure-decode batch.
        self._last_window: bool | None = None
        # The probe under way: its bucket, its kind and the batches left.
        self._probe: tuple[int, WindowChoice, int] | None = None

    @staticmethod
    def bucket(batch_size: int) -> int:
        """Half octaves: 1, 2, 3, 4, 5-6, 7-9, 10-13, ..., 27-38, ..., 216-304
        requests."""
        return round(2 * math.log2(max(1, batch_size)))

    def times(self, batch_size: int) -> StepTimes:
        key = self.bucket(batch_size)
        times = self._buckets.get(key)
        if times is None:
            times = self._buckets[key] = StepTimes()
        return times

    def observe(self, now_ns: int, device_steps: int, decode_only: bool, batch_size: int) -> None:
        """A batch of `batch_size` requests and `device_steps` steps resolved
        on the engine thread at `now_ns`. Batches that prefill teach nothing:
        their steps are not decode steps."""
        last, self._last_ns = self._last_ns, now_ns
        pure_decode = decode_only and device_steps > 0 and batch_size > 0
        window = device_steps > 1
        previous, self._last_window = self._last_window, window if pure_decode else None
        if not pure_decode:
            return
        times = self.times(batch_size)
        times.batches += 1
        if last is None or previous is not window:
            return  # not steady
        interval = now_ns - last
        if interval <= 0 or interval > self.idle_after_ns:
            return  # after an idle engine: not a step
        sample = interval / device_steps / 1e6
        if window:
            times.window_ms = _average(times.window_ms, sample, self.alpha)
            times.window_at = times.batches
        else:
            times.one_token_ms = _average(times.one_token_ms, sample, self.alpha)
            times.one_token_at = times.batches

    def gain(self, batch_size: int) -> float | None:
        """How much faster decode steps of this batch size ran in windows
        (negative: slower); None while either kind is unmeasured."""
        times = self._buckets.get(self.bucket(batch_size))
        if times is None or times.one_token_ms is None or not times.window_ms:
            return None
        return times.one_token_ms / times.window_ms - 1.0

    def decide(self, min_gain: float, batch_size: int) -> WindowChoice:
        """For a pure-decode batch of `batch_size` requests that could run as
        a window: open it if windows measured at least `min_gain` faster; or
        probe the kind whose measurement is missing or old."""
        key = self.bucket(batch_size)
        if self._probe is not None:
            probe_key, kind, left = self._probe
            self._probe = (probe_key, kind, left - 1) if left > 1 else None
            if probe_key == key:
                return kind
        times = self.times(batch_size)
        for kind, sampled_at, probed_at in (
            (WindowChoice.PROBE_WINDOW, times.window_at, times.window_probed_at),
            (WindowChoice.PROBE_ONE_TOKEN, times.one_token_at, times.one_token_probed_at),
        ):
            if self._due(times, sampled_at) and self._due(times, probed_at):
                if kind is WindowChoice.PROBE_WINDOW:
                    times.window_probed_at = times.batches
                else:
                    times.one_token_probed_at = times.batches
                self._probe = (key, kind, self.probe_batches - 1)
                return kind
        gain = self.gain(batch_size)
        return WindowChoice.OPEN if gain is not None and gain >= min_gain else WindowChoice.DECLINE

    def _due(self, times: StepTimes, position: int | None) -> bool:
        return position is None or times.batches - position >= self.reprobe_batches


# The executor (which sees each batch resolve) and the scheduler (which opens
# windows) of one engine share a WindowPayoff, keyed by their VllmConfig
# object as the counters are (`counters.py`).
_PAYOFFS: dict[int, WindowPayoff] = {}


def payoff_for(config: object) -> WindowPayoff:
    payoff = _PAYOFFS.get(id(config))
    if payoff is None:
        payoff = _PAYOFFS.setdefault(id(config), WindowPayoff())
    return payoff


def release_payoff(config: object) -> None:
    _PAYOFFS.pop(id(config), None)
