"""`vllm serve --executor async_executor` under a concurrent load on the
loopback: a few hundred greedy requests from dozens of clients, streaming and
not, a share of the streams dropped mid-way. Nothing is lost or hangs, every
completed request equals vLLM's synchronous path token for token, the KV
cache drains, and the pipeline's counters stay consistent."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import aiohttp
import pytest

from async_executor import PipelineStats
from tests.conftest import corpus_prompts
from tests.serve_util import (
    Job,
    Result,
    Server,
    counters,
    metrics,
    post,
    run_job,
    sync_reference,
    vllm_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_MODEL_LEN = 256
DECODE_WINDOW = 4
DEPTH = 2  # the pipeline's default
REQUESTS = 240
CLIENTS = 32
REQUEST_TIMEOUT_S = 240.0
LOAD_TIMEOUT_S = 600.0
SHORT_PROMPTS = corpus_prompts(24)
MAX_TOKENS = [1, 2, 3, 5, 8, 13, 16, 24, 32, 48]
# A dropped stream asks for many tokens, so that it is still running when
# the client goes away.
DROPPED_MAX_TOKENS = 200


def _jobs() -> list[Job]:
    rng = random.Random(0)
    # Two prompts near the context length, generating up to it exactly: the
    # last decode window meets max_model_len.
    long_prompts = [tuple(rng.randrange(4, 97) for _ in range(n)) for n in (237, 250)]
    jobs = []
    for i in range(REQUESTS):
        stream = i % 2 == 1
        if stream and (i // 2) % 5 == 2:  # a fifth of the streams
            prompt = rng.choice(SHORT_PROMPTS)
            jobs.append(Job(prompt, DROPPED_MAX_TOKENS, True, drop_after_chunks=1 + i % 3))
        elif i % 24 == 0:
            ids = long_prompts[(i // 24) % 2]
            jobs.append(Job(ids, MAX_MODEL_LEN - len(ids), stream))
        else:
            jobs.append(Job(rng.choice(SHORT_PROMPTS), rng.choice(MAX_TOKENS), stream))
    return jobs


JOBS = _jobs()


@pytest.fixture(scope="module")
def reference(tiny_model: str) -> dict[tuple[Any, int], Any]:
    return sync_reference(tiny_model, JOBS, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("http-load") / "serve.log"
    with vllm_server(
        tiny_model, log, pipeline={"decode_window": DECODE_WINDOW}, max_model_len=MAX_MODEL_LEN
    ) as s:
        yield s


async def _load(server: Server) -> list[Result | BaseException]:
    url = server.base + "/v1/completions"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(JOBS)):
        queue.put_nowait(i)
    results: list[Result | BaseException] = [TimeoutError("never ran")] * len(JOBS)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                results[i] = await asyncio.wait_for(
                    run_job(session, url, server.model, JOBS[i]), REQUEST_TIMEOUT_S
                )
            except Exception as e:  # recorded, reported by the test
                results[i] = e

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(
            asyncio.gather(*(client(session) for _ in range(CLIENTS))), LOAD_TIMEOUT_S
        )
    return results


DRAINED = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


def _drain(server: Server) -> tuple[dict[str, float], int]:
    """Wait (bounded) until no request runs or waits and no KV block is in
    use; the metrics then, and how many probes it took. Each round sends a
    one-token request: vLLM publishes its scheduler gauges only from engine
    steps, and an abort takes no step."""
    probe = {"model": server.model, "prompt": "the", "max_tokens": 1, "temperature": 0}
    for probes in range(1, 61):
        status, body = post(server.base + "/v1/completions", probe)
        assert status == 200, body
        m = metrics(server)
        gauges = {k: m[f"vllm:{k}"] for k in DRAINED}
        if not any(gauges.values()):
            return m, probes
        time.sleep(1)
    raise AssertionError(f"the server did not drain: {gauges}")


def assert_counters_consistent(before: PipelineStats, after: PipelineStats) -> None:
    """What holds for any run: monotone counters, the window histogram adds
    up to the launch counters, windows and depth within their settings."""
    for f in fields(PipelineStats):
        if f.name != "window_sizes":
            assert getattr(after, f.name) >= getattr(before, f.name), (f.name, before, after)
    for size, n in before.window_sizes.items():
        assert after.window_sizes.get(size, 0) >= n, (before, after)
    s = after
    assert sum(s.window_sizes.values()) == s.batches_launched, s
    assert sum(k * n for k, n in s.window_sizes.items()) == s.device_steps, s
    assert sum(n for k, n in s.window_sizes.items() if k > 1) == s.windowed_batches, s
    assert max(s.window_sizes) <= DECODE_WINDOW, s
    assert s.launched_before_predecessor_resolved <= s.batches_launched, s
    assert 1 <= s.max_in_flight <= DEPTH, s
    # Every step of a window after its first takes its input on the device.
    assert s.carry_over_tokens >= s.device_steps - s.batches_launched, s


@pytest.mark.timeout(1200)
def test_concurrent_load_with_dropped_streams(
    server: Server, reference: dict[tuple[Any, int], Any]
) -> None:
    m0, c0 = metrics(server), counters(server)
    results = asyncio.run(_load(server))

    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not errors, (
        f"{len(errors)} requests failed or hung, e.g. {[(JOBS[i], e) for i, e in errors[:3]]}"
    )
    done = [(j, r) for j, r in zip(JOBS, results, strict=True) if isinstance(r, Result)]
    dropped = [(j, r) for j, r in done if r.dropped]
    completed = [(j, r) for j, r in done if not r.dropped]
    assert len(dropped) >= REQUESTS // 20, "too few streams were dropped mid-way"
    for job, r in completed:
        want = reference[(job.prompt, job.max_tokens)]
        where = f"{job} -> {r}"
        assert r.status == 200, where
        assert r.token_ids == list(want.token_ids), where
        assert r.text == want.text, where
        assert r.finish_reason == want.finish_reason, where
        assert r.usage_tokens == len(r.token_ids), where
        if job.stream:
            assert r.done_marker, where
    for job, r in dropped:  # what arrived before the drop is the right prefix
        want = list(reference[(job.prompt, job.max_tokens)].token_ids)
        assert r.status == 200 and r.token_ids == want[: len(r.token_ids)], (job, r)

    m, probes = _drain(server)
    c = counters(server)

    def delta(name: str) -> float:
        return m[name] - m0[name]

    # vLLM counts a request finished when the engine finishes it, not one
    # that the front end aborts for a dropped client; a dropped stream whose
    # request had already finished is counted.
    engine_finished = len(completed) + probes
    counted = delta("vllm:request_success_total")
    assert engine_finished <= counted <= engine_finished + len(dropped), (
        counted, engine_finished, len(dropped)
    )  # fmt: skip
    assert delta("vllm:request_success_total[error]") == 0
    # A dropped stream had up to 200 tokens left: some of them must have
    # been aborted in the engine (if none was, disconnects are not seen).
    assert counted < engine_finished + len(dropped), "no dropped stream was aborted"
    assert delta("vllm:generation_tokens_total") >= sum(len(r.token_ids) for _, r in done)

    assert_counters_consistent(c0, c)
    assert c.batches_launched > c0.batches_launched, c
    assert c.launched_before_predecessor_resolved > c0.launched_before_predecessor_resolved, c
    assert c.windowed_batches > c0.windowed_batches, c
    # Each token of a request is sampled in its own device step.
    longest = max(len(r.token_ids) for _, r in completed)
    assert c.device_steps - c0.device_steps >= longest, c
