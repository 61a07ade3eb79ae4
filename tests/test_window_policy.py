"""The window policy against vLLM's scheduler, end to end: windows never
cost a preemption, waiters that cannot be admitted do not close them, and an
admissible arrival closes them at once. Each schedule() is recorded (window
size, requests waiting, requests scheduled) while vLLM's engine is stepped.
Latency bounds are off (`deterministic_windows`): these tests are about the
scheduler's decisions, not the machine's speed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from vllm import SamplingParams

from async_executor.vllm_glue.window_steps import window_of
from tests.conftest import assert_same_outputs, corpus_prompts, engine, metric, stats

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Scheduled:
    window: int
    running: int
    waiting: int
    new: frozenset[str]
    tokens: int


def _record_schedules(llm: Any) -> list[Scheduled]:
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    schedule = scheduler.schedule
    log: list[Scheduled] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        running, waiting = scheduler.get_request_counts()
        out = schedule(*args, **kwargs)
        new = frozenset(r.req_id.rsplit("-", 1)[0] for r in out.scheduled_new_reqs)
        log.append(Scheduled(window_of(out), running, waiting, new, out.total_num_scheduled_tokens))
        return out

    scheduler.schedule = recording
    return log


def _vocab(model: str) -> int:
    import json
    from pathlib import Path

    return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])


def test_windows_cost_no_preemption(tiny_model: str) -> None:
    """Two requests share a KV cache of 4 blocks of 32 tokens, each holding
    2. A stops on a stop token after s tokens; B needs its third block a few
    tokens later, when A's blocks are free again: one-token steps never
    preempt. A window of 8 would take B's third block up to 7 tokens early,
    while A still holds its blocks (its stop is not known in advance); the
    window is cut to the free blocks instead, so it preempts no more."""
    import random

    rng = random.Random(7)
    vocab = _vocab(tiny_model)
    a_prompt = [rng.randrange(4, vocab) for _ in range(10)]
    cache = dict(block_size=32, num_gpu_blocks_override=5, max_model_len=128)
    with engine(tiny_model, ours=False, **cache) as llm:
        (probe,) = llm.generate(
            [{"prompt_token_ids": a_prompt}],
            SamplingParams(temperature=0.0, max_tokens=54, ignore_eos=True),
            use_tqdm=False,
        )
    tokens = list(probe.outputs[0].token_ids)
    # A's stop: the first token in its output from position 40 on that it
    # has not produced before, so A stops exactly there.
    s = next(i for i in range(40, 54) if tokens[i] not in tokens[:i]) + 1
    b_prompt = [rng.randrange(4, vocab) for _ in range(60 - s)]
    prompts = [{"prompt_token_ids": a_prompt}, {"prompt_token_ids": b_prompt}]
    params = [
        SamplingParams(temperature=0.0, max_tokens=200, stop_token_ids=[tokens[s - 1]]),
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
    ]
    with engine(tiny_model, ours=False, **cache) as llm:
        baseline = llm.generate(prompts, params, use_tqdm=False)
    assert len(baseline[0].outputs[0].token_ids) == s, "A did not stop where planned"
    preempted = {}
    for window in (1, 8):
        settings = {"decode_window": window}
        with engine(tiny_model, ours=True, settings=settings, **cache) as llm:
            ours = llm.generate(prompts, params, use_tqdm=False)
            preempted[window] = metric(llm, "vllm:num_preemptions")
            s_ = stats(llm)
        assert_same_outputs(baseline, ours, f"window {window}")
        if window > 1:
            assert s_.window_sizes.get(8, 0) > 0, s_
    assert preempted == {1: 0, 8: 0}, preempted


def test_waiters_that_cannot_be_admitted_keep_windows_open(tiny_model: str) -> None:
    """max_num_seqs=2 and 6 requests: four wait while two decode. They
    cannot be admitted before a running request finishes, so the two decode
    in windows meanwhile."""
    prompts = corpus_prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    with engine(tiny_model, ours=False, max_num_seqs=2) as llm:
        baseline = llm.generate(prompts, params, use_tqdm=False)
    with engine(tiny_model, ours=True, settings={"decode_window": 8}, max_num_seqs=2) as llm:
        log = _record_schedules(llm)
        ours = llm.generate(prompts, params, use_tqdm=False)
    assert_same_outputs(baseline, ours)
    while_waiting = [s.window for s in log if s.waiting and s.running >= 2 and s.tokens]
    assert while_waiting and max(while_waiting) == 8, while_waiting
    # Nearly every decode step ran in a window: single steps are the
    # prefills of the three admission waves and the short tails.
    single = sum(1 for s in log if s.tokens and s.window == 1)
    assert single <= 12, [(s.window, s.waiting, s.tokens) for s in log]


def test_an_admissible_arrival_closes_windows_at_once(tiny_model: str) -> None:
    """Requests decode in windows; a request arrives. It can be admitted, so
    the next step scheduled after its arrival prefills it: it waits only for
    the windows already in flight (at most the pipeline depth)."""
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    late = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with engine(tiny_model, ours=True, settings={"decode_window": 8}) as llm:
        eng = llm.llm_engine
        log = _record_schedules(llm)
        for i, prompt in enumerate(corpus_prompts(4)):
            eng.add_request(f"r{i}", prompt, params)
        while stats(llm).windowed_batches < 3:
            eng.step()
        arrival = len(log)
        eng.add_request("late", corpus_prompts(5)[-1], late)
        first_token_at = None
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.request_id == "late" and out.outputs[0].token_ids:
                    first_token_at = first_token_at or len(log)
        depth = eng.vllm_config.max_concurrent_batches
    admitted = next(i for i, s in enumerate(log) if "late" in s.new)
    assert admitted == arrival, [(s.window, s.new) for s in log[arrival - 2 : admitted + 1]]
    # Windows were open right up to the arrival.
    assert log[arrival - 1].window == 8, log[arrival - 1]
    # Its first token is out once the windows in flight and its own step are.
    assert first_token_at is not None and first_token_at - arrival <= depth + 1, (
        first_token_at,
        arrival,
    )


@pytest.mark.parametrize(
    "settings", [{"decode_window": 8}, {"decode_window": 1, "depth": 3}], ids=["window", "depth3"]
)
def test_an_arrival_does_not_reschedule_a_request_whose_last_tokens_are_in_flight(
    tiny_model: str, settings: dict[str, Any]
) -> None:
    """A window (or a third batch in flight) holds a request's last tokens
    when an admissible request arrives. The arrival closes windows, but the
    finished request must not be scheduled again: vLLM's own skip of such a
    request assumes one token in flight; with more in flight it would run one
    more step for it, computed and dropped (seen as wasted tokens under
    `vllm serve`)."""
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (13, 21, 29, 37)
    ]
    late = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with engine(tiny_model, ours=True, settings=settings) as llm:
        eng = llm.llm_engine
        scheduler = eng.engine_core.engine_core.scheduler

        def last_tokens_in_flight() -> bool:
            return any(
                r.num_output_placeholders > 1
                and r.max_tokens - r.num_output_tokens - r.num_output_placeholders <= 0
                for r in scheduler.running
            )

        for i, (prompt, p) in enumerate(zip(corpus_prompts(4), params, strict=True)):
            eng.add_request(f"r{i}", prompt, p)
        lengths: dict[str, int] = {}
        arrivals = 0
        while eng.has_unfinished_requests():
            if arrivals < 3 and last_tokens_in_flight():
                arrivals += 1
                eng.add_request(f"late{arrivals}", corpus_prompts(5)[-1], late)
            for out in eng.step():
                if out.finished:
                    lengths[out.request_id] = len(out.outputs[0].token_ids)
        counts = stats(llm)
    assert arrivals == 3, "no request had several last tokens in flight"
    assert lengths == {"r0": 13, "r1": 21, "r2": 29, "r3": 37} | {
        f"late{i}": 8 for i in (1, 2, 3)
    }, lengths
    assert counts.wasted_tokens_dropped == 0, counts


def _arrive_while_full(llm: Any, n_requests: int) -> dict[str, list[int]]:
    """Two requests decode (max_num_seqs=2) while a new request arrives at
    every engine step until `n_requests` were added: arrivals are always
    recent, but none can be admitted, so windows may open."""
    eng = llm.llm_engine
    prompts = corpus_prompts(n_requests)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    added = 0
    while added < n_requests or eng.has_unfinished_requests():
        if added < n_requests:
            eng.add_request(f"r{added}", prompts[added], params)
            added += 1
        for out in eng.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    return tokens


@pytest.mark.parametrize("min_gain", [0.0, 10.0], ids=["check-off", "gain-10x"])
def test_windows_that_do_not_pay_stay_closed_while_requests_arrive(
    tiny_model: str, min_gain: float
) -> None:
    """`min_window_gain`: while requests arrive, a window opens only if windows
    were measured to make decode steps that much faster. No window can make
    them 11x faster (a window of 8 at most 8x), so with 10 the probes are
    the only windows and the rest are declined; with 0 (the check off) every
    decode step may run in a window. The outputs do not change."""
    settings = {
        "decode_window": 8,
        "max_token_gap_ms": 0,
        # The admission bound on, but far above any step time: it caps no window.
        "max_admission_delay_ms": 60_000,
        "min_window_gain": min_gain,
    }
    with engine(tiny_model, ours=False, max_num_seqs=2) as llm:
        baseline = _arrive_while_full(llm, 10)
    with engine(tiny_model, ours=True, settings=settings, max_num_seqs=2) as llm:
        ours = _arrive_while_full(llm, 10)
        counts = stats(llm)
    assert ours == baseline
    if min_gain == 0:
        assert counts.windows_declined == 0 and counts.windowed_batches > 0, counts
    else:
        # Declined at every step that could have opened one, but for the
        # probes that measure windows: three windows in a row per bucket of
        # batch sizes (1 and 2 requests here), again at most once per 64
        # batches of the bucket.
        assert counts.windows_declined > 0, counts
        assert counts.windowed_batches <= 3 * (2 + counts.batches_launched // 64), counts
