"""What the engine thread hands a device-stage thread of its own process.

The thread reads a batch after the engine thread has moved on: it schedules
the next batch and updates requests from the previous one. What the engine
keeps changing is copied at the hand-off:
- the structured-output bitmask: a view of the structured-output manager's
  buffer, refilled for the next batch;
- a new request's token lists. `NewRequestData.prompt_token_ids` is the
  request's own prompt list (a streaming-input session extends it), and
  under Model Runner V2 `prefill_token_ids` is the request's own
  `_all_token_ids`, which `update_from_output` appends sampled tokens to.
  vLLM's runners copy both when they add the request, which the stock
  executors do before the engine moves on; the device thread may do it
  later.
A worker process receives pickled copies of all of it, so only the thread
stage needs this.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput


def detach_scheduler_output(scheduled: SchedulerOutput) -> SchedulerOutput:
    """`scheduled`, or a shallow copy whose new requests own their token
    lists (the copy keeps the class: a decode window stays one)."""
    if not scheduled.scheduled_new_reqs:
        return scheduled
    detached = copy.copy(scheduled)
    new_reqs = []
    for req in scheduled.scheduled_new_reqs:
        req = copy.copy(req)
        if req.prompt_token_ids is not None:
            req.prompt_token_ids = list(req.prompt_token_ids)
        if req.prefill_token_ids is not None:
            req.prefill_token_ids = list(req.prefill_token_ids)
        new_reqs.append(req)
    detached.scheduled_new_reqs = new_reqs
    return detached


def detach_grammar_output(grammar_output: GrammarOutput | None) -> Any:
    if grammar_output is None:
        return None
    return dataclasses.replace(
        grammar_output, grammar_bitmask=grammar_output.grammar_bitmask.copy()
    )
