"""A decode window as vLLM data: the scheduled step that carries it, the
one-token device steps it is run as, and the one output it returns.

The scheduler hands the executor a `WindowedSchedulerOutput`: a vLLM
`SchedulerOutput` whose every scheduled request decodes `window` tokens, one
per device step. Its `num_scheduled_tokens` counts all `window` tokens of each
request (vLLM's own accounting: KV slots, computed tokens, tokens in flight);
its `scheduled_spec_decode_tokens` holds no window, so a window is never taken
for speculative drafts and vLLM's draft accounting never sees one.

vLLM's model runners know only one-token decode steps, so the worker runs a
window as:
- step 0: the scheduled step itself with every request cut to one token
  (`first_step`): new and finished requests, the window's KV blocks;
- steps 1..w-1: the same requests, one token each, at num_computed_tokens + k;
  each step's input token is the one step k-1 sampled, filled in on the device.
The device-resident path (`device_window.py`) advances steps 1..w-1 on the
device alone; the host path builds them as vLLM data (`later_steps`) for any
runner. Either way the window's w outputs become one (`merge_outputs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput


@dataclass
class WindowedSchedulerOutput(SchedulerOutput):
    """A scheduled step that is a decode window of `window` device steps.

    Invariant: every scheduled request is a running request in steady decode
    scheduled for exactly `window` tokens (the runner's persistent batch must
    hold the same requests in every device step of the window).
    """

    window: int = 1


def mark_window(scheduled: SchedulerOutput, window: int) -> None:
    """Make the scheduler's own output object a window, in place (the engine
    passes this object on to the executor and back to the scheduler)."""
    scheduled.__class__ = WindowedSchedulerOutput
    scheduled.window = window  # type: ignore[attr-defined]


def window_of(scheduled: SchedulerOutput) -> int:
    return scheduled.window if isinstance(scheduled, WindowedSchedulerOutput) else 1


# Set on a window's output when its later steps ran on the device; the
# attribute travels with the output from a worker process.
DEVICE_WINDOW_MARK = "async_executor_device_window"


def ran_on_device(output: Any) -> bool:
    return bool(getattr(output, DEVICE_WINDOW_MARK, False))


def first_step(scheduled: SchedulerOutput) -> SchedulerOutput:
    """Device step 0 of a window: the scheduled step with one token per
    request. A plain `SchedulerOutput` (the runner must not see a window)."""
    first = SchedulerOutput.__new__(SchedulerOutput)
    first.__dict__.update(scheduled.__dict__)
    first.__dict__.pop("window", None)
    first.num_scheduled_tokens = dict.fromkeys(scheduled.num_scheduled_tokens, 1)
    first.total_num_scheduled_tokens = len(first.num_scheduled_tokens)
    return first


def later_steps(scheduled: SchedulerOutput, window: int) -> list[SchedulerOutput]:
    """Device steps 1..window-1 as vLLM data, for runners without a
    device-resident window: the same requests, in the persistent batch's
    order, one token each, no news (requests, blocks) beyond step 0's."""
    cached = scheduled.scheduled_cached_reqs
    ids = list(cached.req_ids)
    if len(ids) != len(scheduled.num_scheduled_tokens):
        raise RuntimeError(
            "a decode window holds only running requests; "
            f"{len(scheduled.num_scheduled_tokens) - len(ids)} new request(s) were scheduled in it"
        )
    computed = np.asarray(cached.num_computed_tokens)
    outputs = np.asarray(cached.num_output_tokens)
    steps = []
    for k in range(1, window):
        steps.append(
            SchedulerOutput(
                scheduled_new_reqs=[],
                scheduled_cached_reqs=CachedRequestData(
                    req_ids=ids,
                    resumed_req_ids=set(),
                    new_token_ids=[],
                    all_token_ids={},
                    new_block_ids=[None] * len(ids),
                    num_computed_tokens=(computed + k).tolist(),
                    num_output_tokens=(outputs + k).tolist(),
                ),
                num_scheduled_tokens=dict.fromkeys(ids, 1),
                total_num_scheduled_tokens=len(ids),
                scheduled_spec_decode_tokens={},
                scheduled_encoder_inputs={},
                finished_req_ids=set(),
                free_encoder_mm_hashes=[],
            )
        )
    return steps


def merge_outputs(outputs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    """One output for the window: each request's tokens in step order."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    index = first.req_id_to_index
    sampled = [list(tokens) for tokens in first.sampled_token_ids]
    for out in outputs[1:]:
        for req_id, i in out.req_id_to_index.items():
            sampled[index[req_id]].extend(out.sampled_token_ids[i])

    merged = copy.copy(first)
    merged.sampled_token_ids = sampled
    merged.logprobs = _merge_logprobs(outputs)
    if first.num_nans_in_logits is not None:
        nans = dict(first.num_nans_in_logits)
        for out in outputs[1:]:
            for req_id, n in (out.num_nans_in_logits or {}).items():
                nans[req_id] = nans.get(req_id, 0) + n
        merged.num_nans_in_logits = nans
    return merged


def _merge_logprobs(outputs: list[ModelRunnerOutput]) -> LogprobsLists | None:
    """Rows request by request (the first step's order), each request's rows
    in step order; vectorised over the batch."""
    present_lists = [out.logprobs for out in outputs if out.logprobs is not None]
    if not present_lists:
        return None
    first = outputs[0]
    num_reqs, num_steps = len(first.req_ids), len(outputs)
    width = max(lp.logprobs.shape[1] for lp in present_lists)
    ref = present_lists[0]
    tokens = np.zeros((num_steps, num_reqs, width), dtype=ref.logprob_token_ids.dtype)
    # Padding columns lie beyond every request's own num_logprobs; the front
    # end reads only the first num_logprobs + 1.
    logprobs = np.full((num_steps, num_reqs, width), -np.inf, dtype=ref.logprobs.dtype)
    ranks = np.zeros((num_steps, num_reqs), dtype=ref.sampled_token_ranks.dtype)
    present = np.zeros((num_steps, num_reqs), dtype=bool)
    for k, out in enumerate(outputs):
        lp = out.logprobs
        if lp is None:
            continue
        index = out.req_id_to_index
        rows = np.fromiter(
            (index.get(req_id, -1) for req_id in first.req_ids), dtype=np.int64, count=num_reqs
        )
        if lp.cu_num_generated_tokens:
            cu = np.asarray(lp.cu_num_generated_tokens, dtype=np.int64)
            rows = np.where(rows >= 0, cu[np.maximum(rows, 0)], -1)
        valid = (rows >= 0) & (rows < len(lp.sampled_token_ranks))
        picked = rows[valid]
        w = lp.logprobs.shape[1]
        tokens[k, valid, :w] = lp.logprob_token_ids[picked]
        logprobs[k, valid, :w] = lp.logprobs[picked]
        ranks[k, valid] = lp.sampled_token_ranks[picked]
        present[k, valid] = True
    by_request = present.T
    counts = by_request.sum(axis=1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).tolist()
    return LogprobsLists(
        logprob_token_ids=tokens.transpose(1, 0, 2)[by_request],
        logprobs=logprobs.transpose(1, 0, 2)[by_request],
        sampled_token_ranks=ranks.T[by_request],
        cu_num_generated_tokens=starts,
    )
