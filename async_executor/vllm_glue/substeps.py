"""Split a windowed scheduled step into device steps, and merge their outputs.

The scheduler marks a decode window of w tokens the way vLLM marks draft
tokens: the request is scheduled for w tokens with w-1 placeholder drafts in
`scheduled_spec_decode_tokens`. Nothing here verifies drafts. The window is
run as w ordinary one-token decode steps of vLLM's own model runner:

- step 0 is the scheduled step itself with every window cut to one token
  (new requests, finished requests, new KV blocks for the whole window);
- step k (k >= 1) holds the requests whose window is longer than k, one token
  each, at num_computed_tokens + k. Their input token is the one step k-1
  sampled: the runner's async-scheduling carry-over fills it in on the device.

The k outputs are merged into one ModelRunnerOutput with up to w tokens per
request. The scheduler's draft accounting then accepts all of them, stops at
a stop token or max_tokens inside the window, and drops the rest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput


@dataclass(slots=True)
class WindowPlan:
    """The device steps of one scheduled step."""

    steps: list[SchedulerOutput]
    # req_id -> window length, only for requests decoding more than 1 token.
    windows: dict[str, int] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def carried_tokens(self) -> int:
        """Inputs of steps 1.. that are the previous step's sampled token."""
        return sum(w - 1 for w in self.windows.values())


def plan_window(scheduled: SchedulerOutput) -> WindowPlan:
    drafts = scheduled.scheduled_spec_decode_tokens
    if not drafts:
        return WindowPlan([scheduled])

    windows = {req_id: len(tokens) + 1 for req_id, tokens in drafts.items()}
    first = copy.copy(scheduled)
    first.num_scheduled_tokens = {
        req_id: n - windows.get(req_id, 1) + 1
        for req_id, n in scheduled.num_scheduled_tokens.items()
    }
    first.total_num_scheduled_tokens = sum(first.num_scheduled_tokens.values())
    first.scheduled_spec_decode_tokens = {}

    cached = scheduled.scheduled_cached_reqs
    position = {req_id: i for i, req_id in enumerate(cached.req_ids)}
    missing = [req_id for req_id in windows if req_id not in position]
    if missing:
        raise RuntimeError(
            f"decode window for request(s) {missing} that are not running; "
            "windows are only opened for requests in steady decode"
        )

    # Keep the persistent batch's order: iterate the cached requests, not
    # the window dict.
    windowed = [req_id for req_id in cached.req_ids if req_id in windows]
    steps = [first]
    for k in range(1, max(windows.values())):
        ids = [req_id for req_id in windowed if windows[req_id] > k]
        steps.append(
            SchedulerOutput(
                scheduled_new_reqs=[],
                scheduled_cached_reqs=CachedRequestData(
                    req_ids=ids,
                    resumed_req_ids=set(),
                    new_token_ids=[],
                    all_token_ids={},
                    new_block_ids=[None] * len(ids),
                    num_computed_tokens=[cached.num_computed_tokens[position[r]] + k for r in ids],
                    num_output_tokens=[cached.num_output_tokens[position[r]] + k for r in ids],
                ),
                num_scheduled_tokens=dict.fromkeys(ids, 1),
                total_num_scheduled_tokens=len(ids),
                scheduled_spec_decode_tokens={},
                scheduled_encoder_inputs={},
                finished_req_ids=set(),
                free_encoder_mm_hashes=[],
                # A subset of requests shares at least the prefix they all
                # shared, so the full batch's count stays valid.
                num_common_prefix_blocks=scheduled.num_common_prefix_blocks,
            )
        )
    return WindowPlan(steps, windows)


def merge_outputs(outputs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    """One output for the scheduled step: each request's tokens in order."""
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
