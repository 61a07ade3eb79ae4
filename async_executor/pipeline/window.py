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
        sample = interval / 1e6 / device_steps
        self.step_ms = (
            sample if self.step_ms is None else self.step_ms + self.alpha * (sample - self.step_ms)
        )


class WindowPayoff:
    """Whether decode windows make decode steps faster, learned from how long
    the engine thread waits for each batch's sampled ids.

    A window saves host work, not device work: the engine schedules and
    processes outputs once per w device steps instead of once per step. Per
    pure-decode batch of w device steps the engine sees the interval since
    the previous batch resolved and the part of it spent waiting:

        engine work per batch    E = interval - wait
        device time per step     D = interval / w    (while the engine waits)

    One-token steps run at max(E, D) each; windows of w at max(E / w, D). So
    windows speed decode steps up by at most E / D, and not at all where the
    device bounds the step (E <= D: a large model at a small batch). There
    they would only cost latency: a stream gets its tokens w at a time, and an
    arrival waits behind the windows in flight.

    Where the engine does not wait at all (wait <= `engine_bound` of the
    interval) D is not seen, only its upper bound interval / w. With one-token
    steps that bound is no estimate, so the next scheduling step may probe a
    window to measure D - at once when nothing is known, otherwise after
    `reprobe_batches` batches without one (a load that grows past the point
    where windows pay is found again; at the edge, windows open once per that
    many batches).

    Blind spot: with the worker in its own process, time the worker spends
    preparing a one-token step's inputs counts as device time here, and a
    device window saves that too. Windows may then close where they would
    still gain a little.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        idle_after_s: float = 0.5,
        engine_bound: float = 0.1,
        reprobe_batches: int = 32,
    ) -> None:
        self.alpha = alpha
        self.idle_after_ns = int(idle_after_s * 1e9)
        self.engine_bound = engine_bound
        self.reprobe_batches = reprobe_batches
        self.engine_ms: float | None = None
        self.device_ms: float | None = None
        self._last_ns: int | None = None
        self._since_window = 0

    def observe(self, now_ns: int, wait_ns: int, device_steps: int, decode_only: bool) -> None:
        """A batch of `device_steps` steps resolved at `now_ns` after the
        engine waited `wait_ns` for it. Batches that prefill are skipped: their
        steps are not decode steps."""
        last, self._last_ns = self._last_ns, now_ns
        if last is None or device_steps <= 0 or not decode_only:
            return
        interval = now_ns - last
        if interval <= 0 or interval > self.idle_after_ns:
            return  # after an idle engine: not a step
        wait = min(max(wait_ns, 0), interval)
        self.engine_ms = self._average(self.engine_ms, (interval - wait) / 1e6)
        if device_steps > 1:
            self._since_window = 0
        else:
            self._since_window += 1
            if wait <= self.engine_bound * interval:
                # Engine-bound one-token step: D is unknown below the interval.
                if self.device_ms is None or self._since_window >= self.reprobe_batches:
                    self.device_ms = None
                return
        self.device_ms = self._average(self.device_ms, interval / device_steps / 1e6)

    def gain(self) -> float | None:
        """How much faster decode steps can get with windows (E / D - 1, at
        least 0); None while there is no estimate."""
        if self.engine_ms is None or self.device_ms is None or self.device_ms <= 0:
            return None
        return max(0.0, self.engine_ms / self.device_ms - 1.0)

    def windows_pay(self, min_gain: float) -> bool:
        """Whether a window is worth its latency: gain >= `min_gain`, or no
        estimate yet (the window is the measurement)."""
        gain = self.gain()
        return gain is None or gain >= min_gain

    def _average(self, mean: float | None, sample: float) -> float:
        return sample if mean is None else mean + self.alpha * (sample - mean)


# The executor (which sees the engine wait) and the scheduler (which opens
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
