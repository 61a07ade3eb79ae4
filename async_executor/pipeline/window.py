"""Decode windows: how many device steps one scheduled step may run.

A batch in steady decode can be scheduled once for w tokens per request and
decoded w times back to back on the device, each step's sampled token
carried over to the next step's input without a trip to the host.
Scheduling, output processing and host bookkeeping are then paid once per w
tokens instead of once per token.

The policy keeps greedy outputs equal to vLLM's one-token-per-step path:
- Each device step is an ordinary one-token decode step of vLLM's runner, so
  each token is computed as vLLM computes it.
- Windows open only when one-token stepping would not change the batch
  either: nothing waits to be admitted and no prompt is being prefilled. A
  request that stops inside a window computes the rest of the window as
  wasted tokens, dropped on the host.
- Requests whose next token the host must constrain (structured output)
  force one token per step.
- A window never runs past a request's max_tokens or the model length.

Invariant: one window length for every request scheduled in the step. The
runner's persistent batch must hold the same requests in every device step
of a window; a request missing from the last step would lose its carry-over
into the next scheduled step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecodeState:
    """What the window policy needs to know about one running request."""

    # Output tokens sampled so far, including the ones still in flight.
    num_output_tokens: int
    max_tokens: int
    # Tokens whose KV is computed or being computed: the next input position.
    num_computed_tokens: int
    # Tokens still to feed before the request decodes one token per step
    # (more than 1 while its prompt is being prefilled).
    num_pending_inputs: int
    # The host must see each token before the next is sampled.
    needs_host_per_token: bool

    @property
    def exhausted(self) -> bool:
        """Every token up to max_tokens is already sampled or in flight."""
        return self.num_output_tokens >= self.max_tokens


def uniform_window(
    states: Iterable[DecodeState],
    *,
    max_window: int,
    num_waiting: int,
    max_model_len: int,
    token_budget: int,
) -> int:
    """The window length for the next scheduled step (1: no window).

    `states` are the running requests that will be scheduled (not exhausted).
    """
    if max_window <= 1 or num_waiting > 0:
        return 1
    window = max_window
    count = 0
    for s in states:
        if s.needs_host_per_token or s.num_pending_inputs > 1:
            return 1
        count += 1
        # A step at position p samples the token for p + 1, and the last
        # position a token may be fed at is max_model_len - 1.
        window = min(
            window,
            s.max_tokens - s.num_output_tokens,
            max_model_len - 1 - s.num_computed_tokens,
        )
        if window <= 1:
            return 1
    if count == 0:
        return 1
    return max(1, min(window, token_budget // count))
