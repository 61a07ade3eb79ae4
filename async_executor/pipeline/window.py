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
