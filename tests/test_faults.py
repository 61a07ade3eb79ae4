"""Faults in the device stage end the engine loudly and never hang it.

Faults are injected by a test-only worker class (`tests/faulty_worker.py`,
selected with vLLM's `worker_cls` setting) in whatever process the worker
runs in: an exception in a device step, for every stage, in a one-step
batch and in a decode window (at its step 0 and inside it); a worker
process killed (SIGKILL) inside a window; a device step that hangs, with a
short `VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`. `LLM.generate` raises an error
that names the cause, and `vllm serve` answers the requests in flight with
an error, fails its health check and exits, as it does with vLLM's own
multiprocess executor.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from vllm import SamplingParams

from async_executor.pipeline.stage import DeviceStage, StageTimeout
from async_executor.vllm_glue.handoff import detach_scheduler_output
from async_executor.vllm_glue.window_steps import WindowedSchedulerOutput, mark_window
from tests import faulty_worker
from tests.conftest import corpus_prompts, engine, generate
from tests.serve_util import Server, vllm_server

REPO = Path(__file__).resolve().parents[1]
PROMPTS = corpus_prompts(4)
PARAMS = SamplingParams(temperature=0.0, max_tokens=24)
WINDOW = {"decode_window": 4}
TIMEOUT_ENV = "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Arm a fault for the engines started next (their worker processes
    inherit the environment)."""

    def arm(spec: str, *, step_timeout_s: int | None = None) -> None:
        import vllm.envs as envs

        monkeypatch.setenv(faulty_worker.FAULT_ENV, spec)
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        if step_timeout_s is not None:
            monkeypatch.setenv(TIMEOUT_ENV, str(step_timeout_s))
        # vLLM caches its environment once an engine has started.
        envs.disable_envs_cache()

    return arm


def _faulty_engine(tiny_model: str, stage: str) -> Any:
    return engine(
        tiny_model,
        ours=True,
        settings={"stage": stage, **WINDOW},
        worker_cls=faulty_worker.QUALNAME,
    )


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["first", "window:0", "window:2"])
@pytest.mark.parametrize("stage", ["process", "thread", "inline"])
def test_device_step_exception_ends_generate_with_the_cause(
    tiny_model: str, inject: Callable[..., None], stage: str, where: str
) -> None:
    spec = f"raise@{where}"
    inject(spec)
    with _faulty_engine(tiny_model, stage) as llm, pytest.raises(Exception) as err:
        generate(llm, PROMPTS, PARAMS)
    # The fault's own message, not a consequence of it (a one-step batch's
    # failed execute_model used to surface as a KeyError in the scheduler).
    assert f"{faulty_worker.MESSAGE} ({spec})" in str(err.value), repr(err.value)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_worker_process_killed_in_a_window_ends_generate(
    tiny_model: str, inject: Callable[..., None]
) -> None:
    inject("kill@window:2")
    with _faulty_engine(tiny_model, "process") as llm, pytest.raises(RuntimeError) as err:
        generate(llm, PROMPTS, PARAMS)
    # vLLM's own executor reports only "cancelled" here.
    assert "the worker process died (VllmWorker-0 killed by signal 9)" in str(err.value)


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["process", "thread"])
def test_hung_device_step_times_out(
    tiny_model: str, inject: Callable[..., None], stage: str
) -> None:
    """The step sleeps (600 s); the engine gives up after 3 s and shuts
    down without waiting for it. (An inline step runs on the engine thread
    and cannot be timed out, as with vLLM's uniproc executor.)"""
    inject("hang@window:2", step_timeout_s=3)
    before = set(_stage_threads())
    with _faulty_engine(tiny_model, stage) as llm, pytest.raises(TimeoutError) as err:
        generate(llm, PROMPTS, PARAMS)
    assert f"did not finish within 3 s ({TIMEOUT_ENV})" in str(err.value), repr(err.value)
    if stage == "thread":
        # The engine shut down while its device thread still sleeps in the
        # step: nothing waited for it, and it cannot keep the process alive.
        (hung,) = set(_stage_threads()) - before
        assert hung.daemon


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("async-executor-device-stage")]


# -- vllm serve ------------------------------------------------------------


def _complete(server: Server, i: int, stream: bool, results: dict[int, tuple[int, str]]) -> None:
    body = {"model": server.model, "prompt": PROMPTS[i], "max_tokens": 32,
            "temperature": 0, "stream": stream}  # fmt: skip
    request = urllib.request.Request(
        server.base + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            results[i] = (resp.status, resp.read().decode())
    except urllib.error.HTTPError as e:
        results[i] = (e.code, e.read().decode())


def _health(server: Server) -> int | str:
    try:
        with urllib.request.urlopen(server.base + "/health", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return type(e).__name__


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "spec,stage,cause",
    [
        pytest.param(
            "raise@window:2", "process", f"{faulty_worker.MESSAGE} (raise@window:2)", id="raise"
        ),
        pytest.param(
            "kill@window:2", "process", "the worker process died (VllmWorker-0 killed by signal 9)",
            id="kill",
        ),
        pytest.param(
            "hang@window:2", "thread", f"did not finish within 5 s ({TIMEOUT_ENV})", id="hang"
        ),
    ],
)  # fmt: skip
def test_vllm_serve_fails_requests_and_exits(
    tiny_model: str,
    inject: Callable[..., None],
    tmp_path: Path,
    spec: str,
    stage: str,
    cause: str,
) -> None:
    inject(spec, step_timeout_s=5)
    pipeline = {"stage": stage, "max_token_gap_ms": 0, "max_admission_delay_ms": 0, **WINDOW}
    log = tmp_path / "serve.log"
    with vllm_server(tiny_model, log, pipeline=pipeline,
                     extra_args=["--worker-cls", faulty_worker.QUALNAME]) as server:  # fmt: skip
        results: dict[int, tuple[int, str]] = {}
        clients = [
            threading.Thread(target=_complete, args=(server, i, i == 1, results)) for i in (0, 1)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=180)
        assert not any(client.is_alive() for client in clients), "a request got no answer"
        status, body = results[0]
        assert status == 500 and "EngineCore encountered an issue" in body, results
        status, body = results[1]  # streaming: the error arrives as an event
        assert status == 200 and '"code": 500' in body and body.endswith("[DONE]\n\n"), results
        deadline = time.monotonic() + 120
        health = []
        while server.alive():
            health.append(_health(server))
            assert time.monotonic() < deadline, f"the server did not exit; /health: {health}"
            time.sleep(0.5)
        assert 200 not in health, health
    assert cause in log.read_text(errors="replace"), log.read_text(errors="replace")[-4000:]


# -- units -----------------------------------------------------------------


def test_threaded_stage_times_out_and_shuts_down_without_waiting() -> None:
    stage = DeviceStage(threaded=True)
    release = threading.Event()
    stuck = stage.submit(release.wait, 60)
    queued = stage.submit(lambda: "never runs")
    with pytest.raises(StageTimeout, match=r"did not finish within 0\.2 s"):
        stage.wait(stuck, 0.2)
    assert stage.hung
    stage.shutdown(timeout_s=60)
    assert not stuck.done()  # shutdown returned without waiting for it
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        stage.submit(lambda: None)
    release.set()


def test_threaded_stage_reports_a_job_error_and_keeps_order() -> None:
    stage = DeviceStage(threaded=True)

    def boom() -> None:
        raise RuntimeError("device step failed")

    failed, after = stage.submit(boom), stage.submit(lambda: 3)
    with pytest.raises(RuntimeError, match="device step failed"):
        stage.wait(failed, 30)
    assert stage.wait(after, 30) == 3 and not stage.hung
    stage.shutdown(timeout_s=30)


def test_threaded_stage_whose_initializer_fails_fails_its_jobs() -> None:
    def bad_device() -> None:
        raise OSError("no such device")

    stage = DeviceStage(threaded=True, initializer=bad_device)
    job: Future[int] = stage.submit(lambda: 1)
    with pytest.raises(RuntimeError, match="failed to start: OSError"):
        stage.wait(job, 30)
    stage.shutdown(timeout_s=30)


def _new_request(req_id: str, tokens: list[int]) -> Any:
    from vllm.v1.core.sched.output import NewRequestData

    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=tokens,
        mm_features=[],
        sampling_params=None,
        pooling_params=None,
        block_ids=([1],),
        num_computed_tokens=0,
        lora_request=None,
        prefill_token_ids=tokens,  # Model Runner V2: the request's own list
    )


@pytest.fixture
def scheduled_with_new_request() -> Iterator[tuple[Any, list[int]]]:
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    tokens = [5, 6, 7]
    scheduled = SchedulerOutput(
        scheduled_new_reqs=[_new_request("a", tokens)],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={"a": 3},
        total_num_scheduled_tokens=3,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )
    yield scheduled, tokens


def test_thread_hand_off_copies_what_the_engine_keeps_changing(
    scheduled_with_new_request: tuple[Any, list[int]],
) -> None:
    """The engine thread appends sampled tokens to a request's own list
    (V2 hands it out as `prefill_token_ids`) while the device thread may not
    have read the batch yet: the thread gets copies."""
    scheduled, tokens = scheduled_with_new_request
    mark_window(scheduled, 1)
    detached = detach_scheduler_output(scheduled)
    tokens.append(99)  # update_from_output of an earlier batch
    (req,) = detached.scheduled_new_reqs
    assert req.prefill_token_ids == [5, 6, 7] and req.prompt_token_ids == [5, 6, 7]
    assert isinstance(detached, WindowedSchedulerOutput) and detached is not scheduled
    # The engine's own object is untouched (it goes back to the scheduler).
    assert scheduled.scheduled_new_reqs[0].prefill_token_ids is tokens


def test_hand_off_without_new_requests_is_free() -> None:
    from tests.conftest import make_scheduled

    scheduled = make_scheduled({"a": 4, "b": 4})
    assert detach_scheduler_output(scheduled) is scheduled
