"""Races of the overlapped pipeline, driven step by step through vLLM's
engine: aborts while their batches are in flight, and KV blocks freed by
finished or aborted requests reused under a small cache while later batches
are still in flight. The surviving requests must equal the synchronous path.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm import SamplingParams

from tests.conftest import (
    assert_pipelined,
    assert_same_outputs,
    corpus_prompts,
    engine,
    stats,
)

pytestmark = pytest.mark.e2e

PROMPTS = corpus_prompts(40)
PARAMS = SamplingParams(temperature=0.0, max_tokens=40, logprobs=1)
# A cache for about a third of the requests: finished and aborted requests'
# blocks are handed to waiting ones while the pipeline is full.
SMALL_CACHE: dict[str, Any] = dict(block_size=32, num_gpu_blocks_override=12, max_model_len=256)


def _engine_core(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core


def _run_with_aborts(
    llm: Any, abort_at_step: int, to_abort: set[str]
) -> tuple[dict[str, Any], int]:
    """Step the engine by hand; abort `to_abort` at the given step. Returns
    the finished outputs by id, and how many batches were in flight holding
    a request to abort when the abort was issued."""
    eng = llm.llm_engine
    for i, prompt in enumerate(PROMPTS):
        eng.add_request(f"r{i}", prompt, PARAMS)
    core = _engine_core(llm)
    finished: dict[str, Any] = {}
    in_flight_with_victims = 0
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
        steps += 1
        if steps == abort_at_step:
            queue = core.batch_queue or []
            # The engine suffixes request ids internally ("r3-1a2b3c4d").
            in_flight_with_victims = sum(
                1
                for _, scheduler_output, _ in queue
                if to_abort & {r.rsplit("-", 1)[0] for r in scheduler_output.num_scheduled_tokens}
            )
            eng.abort_request(sorted(to_abort))
        assert steps < 10_000, "engine did not finish"
    return finished, in_flight_with_victims


@pytest.mark.parametrize(
    "settings",
    [pytest.param({}, id="default"), pytest.param({"decode_window": 4}, id="window4")],
)
def test_abort_while_in_flight_leaves_others_exact(
    tiny_model: str, settings: dict[str, Any]
) -> None:
    with engine(tiny_model, ours=False, **SMALL_CACHE) as llm:
        baseline = llm.generate(PROMPTS, PARAMS, use_tqdm=False)

    to_abort = {f"r{i}" for i in range(0, len(PROMPTS), 3)}
    with engine(tiny_model, ours=True, settings=settings, **SMALL_CACHE) as llm:
        finished, in_flight_with_victims = _run_with_aborts(llm, 8, to_abort)
        s = stats(llm)
        scheduler = _engine_core(llm).scheduler
        assert scheduler.get_num_unfinished_requests() == 0, "requests left hanging"

    # The abort hit requests whose batches were on the device.
    assert in_flight_with_victims >= 1
    kept = [i for i in range(len(PROMPTS)) if f"r{i}" not in to_abort]
    assert all(f"r{i}" in finished for i in kept), "a surviving request was lost"
    for rid in to_abort:
        out = finished.get(rid)
        assert out is None or out.outputs[0].finish_reason == "abort"
    assert_same_outputs([baseline[i] for i in kept], [finished[f"r{i}"] for i in kept])
    assert_pipelined(s, windows=bool(settings))
    # Tokens computed for aborted requests in flight were dropped.
    assert s.wasted_tokens_dropped > 0, s


def _record_block_handouts(llm: Any) -> list[tuple[int, dict[str, list[int]]]]:
    """From now on, per scheduled batch: how many batches were in flight when
    it was scheduled, and the KV blocks it newly handed to each request."""
    core = _engine_core(llm)
    schedule = core.scheduler.schedule
    log: list[tuple[int, dict[str, list[int]]]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        in_flight = len(core.batch_queue or ())
        out = schedule(*args, **kwargs)
        handed = {new.req_id: [b for group in new.block_ids for b in group]
                  for new in out.scheduled_new_reqs}  # fmt: skip
        cached = out.scheduled_cached_reqs
        for req_id, block_ids in zip(cached.req_ids, cached.new_block_ids, strict=True):
            if block_ids:
                handed[req_id] = [b for group in block_ids for b in group]
        log.append((in_flight, handed))
        return out

    core.scheduler.schedule = recording
    return log


def _recycled_in_flight(log: list[tuple[int, dict[str, list[int]]]]) -> dict[int, int]:
    """Per block: how often it was handed to another request than its last
    owner while a batch was in flight (the batch that may still write the
    last owner's wasted token into it runs first: the device stage's order)."""
    owner: dict[int, str] = {}
    recycled: dict[int, int] = {}
    for in_flight, handed in log:
        for req_id, blocks in handed.items():
            for block in blocks:
                if in_flight and owner.get(block, req_id) != req_id:
                    recycled[block] = recycled.get(block, 0) + 1
                owner[block] = req_id
    return recycled


def test_block_reuse_under_small_cache_stays_exact(tiny_model: str) -> None:
    """Every block is recycled many times while batches are in flight."""
    params = SamplingParams(temperature=0.0, max_tokens=48, logprobs=2)
    prompts = PROMPTS * 2
    with engine(tiny_model, ours=False, **SMALL_CACHE) as llm:
        baseline = llm.generate(prompts, params, use_tqdm=False)
    with engine(tiny_model, ours=True, settings={"decode_window": 3}, **SMALL_CACHE) as llm:
        log = _record_block_handouts(llm)
        ours = llm.generate(prompts, params, use_tqdm=False)
        s = stats(llm)
        cache_blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert_same_outputs(baseline, ours)
    assert_pipelined(s, windows=True)
    recycled = _recycled_in_flight(log)
    # Block 0 is vLLM's null block, never handed out.
    assert set(recycled) == set(range(1, cache_blocks)), (cache_blocks, recycled)
    assert min(recycled.values()) >= 3, recycled


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["thread", "inline"])
def test_device_step_failure_surfaces_instead_of_hanging(tiny_model: str, stage: str) -> None:
    """A device step that raises inside a window reaches the caller as an
    error (the engine does not wait forever on the in-flight batch)."""
    with engine(tiny_model, ours=True, settings={"decode_window": 4, "stage": stage}) as llm:
        executor = _engine_core(llm).model_executor
        worker = executor.driver_worker
        real = worker.execute_model
        calls = {"n": 0}

        def failing(scheduler_output: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 12:
                raise RuntimeError("injected device failure")
            return real(scheduler_output)

        worker.execute_model = failing
        with pytest.raises(Exception, match="injected device failure"):
            llm.generate(PROMPTS[:8], PARAMS, use_tqdm=False)
        assert calls["n"] >= 12
