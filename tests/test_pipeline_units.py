"""Units that are ours alone: settings, the window policy, the device stage,
in-flight bookkeeping, and splitting/merging a decode window."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from async_executor.pipeline.counters import PipelineCounters, PipelineStats
from async_executor.pipeline.in_flight import InFlightTracker
from async_executor.pipeline.stage import DeviceStage
from async_executor.pipeline.window import DecodeState, uniform_window
from async_executor.settings import PipelineSettings, SettingsError

# -- settings -------------------------------------------------------------


def test_settings_defaults_and_env_fallback() -> None:
    s = PipelineSettings.from_mapping({}, env={})
    assert (s.depth, s.overlap, s.decode_window, s.stage) == (2, True, 1, "auto")
    env = {"ASYNC_EXECUTOR_DEPTH": "3", "ASYNC_EXECUTOR_OVERLAP": "off"}
    s = PipelineSettings.from_mapping({"decode_window": 8}, env=env)
    assert (s.depth, s.overlap, s.decode_window) == (3, False, 8)
    assert s.in_flight_batches == 1
    # The config wins over the environment.
    assert PipelineSettings.from_mapping({"depth": 4}, env=env).depth == 4
    for stage in ("auto", "thread", "inline", "process"):
        assert PipelineSettings(stage=stage).stage == stage


@pytest.mark.parametrize(
    "values,message",
    [
        ({"depth": 9}, "depth must be between 2 and 8"),
        ({"depth": True}, "depth must be an int"),
        ({"overlap": "yes"}, "overlap must be true or false"),
        ({"decode_window": 65}, "decode_window must be between 1 and 64"),
        ({"stage": "gpu"}, "stage must be"),
        ({"windows": 2}, r"unknown async_executor setting\(s\) \['windows'\]"),
    ],
)
def test_bad_settings_name_the_problem(values: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        PipelineSettings.from_mapping(values, env={})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="ASYNC_EXECUTOR_DEPTH='two'"):
        PipelineSettings.from_mapping({}, env={"ASYNC_EXECUTOR_DEPTH": "two"})


# -- window policy --------------------------------------------------------


def _state(out: int = 5, max_tokens: int = 100, computed: int = 20, pending: int = 1,
           host: bool = False) -> DecodeState:  # fmt: skip
    return DecodeState(out, max_tokens, computed, pending, host)


def _window(states: list[DecodeState], **kw: int) -> int:
    args = dict(max_window=8, num_waiting=0, max_model_len=512, token_budget=8192)
    args.update(kw)
    return uniform_window(states, **args)


def test_window_opens_for_steady_decode() -> None:
    assert _window([_state(), _state(out=9)]) == 8


@pytest.mark.parametrize(
    "states,kw,expected",
    [
        ([_state()], {"max_window": 1}, 1),  # windows off
        ([_state()], {"num_waiting": 1}, 1),  # a request waits to be admitted
        ([_state(), _state(pending=40)], {}, 1),  # a prompt is being prefilled
        ([_state(), _state(host=True)], {}, 1),  # structured output in the batch
        ([_state(out=95)], {}, 5),  # capped by max_tokens
        ([_state(computed=508)], {}, 3),  # capped by max_model_len
        ([_state()] * 100, {"token_budget": 300}, 3),  # capped by the token budget
        ([_state(out=99)], {}, 1),  # one token left
        ([], {}, 1),
    ],
)
def test_window_closes_or_shrinks(
    states: list[DecodeState], kw: dict[str, int], expected: int
) -> None:
    assert _window(states, **kw) == expected


def test_exhausted_means_all_tokens_in_flight() -> None:
    assert _state(out=100, max_tokens=100).exhausted
    assert not _state(out=99, max_tokens=100).exhausted


# -- device stage ---------------------------------------------------------


def test_threaded_stage_runs_in_order_off_the_caller_thread() -> None:
    stage = DeviceStage(threaded=True)
    seen: list[tuple[int, str]] = []
    gate = threading.Event()

    def job(i: int) -> int:
        if i == 0:
            gate.wait(5)
        seen.append((i, threading.current_thread().name))
        return i * i

    futures = [stage.submit(job, i) for i in range(20)]
    # The caller got its futures back while the first job still blocks.
    assert not any(f.done() for f in futures)
    gate.set()
    assert [f.result(timeout=5) for f in futures] == [i * i for i in range(20)]
    assert [i for i, _ in seen] == list(range(20))
    assert all(name.startswith("async-executor-device-stage") for _, name in seen)
    stage.shutdown()


def test_inline_stage_runs_now_and_captures_errors() -> None:
    stage = DeviceStage(threaded=False)
    assert stage.submit(lambda: 7).result() == 7

    def boom() -> None:
        raise RuntimeError("device step failed")

    future = stage.submit(boom)
    assert future.done()
    with pytest.raises(RuntimeError, match="device step failed"):
        future.result()


def test_stage_run_waits_behind_in_flight_jobs() -> None:
    stage = DeviceStage(threaded=True)
    order: list[str] = []
    stage.submit(lambda: (time.sleep(0.05), order.append("batch")))
    stage.run(lambda: order.append("control"))
    assert order == ["batch", "control"]
    stage.shutdown()


# -- in-flight bookkeeping ------------------------------------------------


def test_tracker_counts_overlap_and_carry_over() -> None:
    counters = PipelineCounters()
    tracker = InFlightTracker(counters)
    # N: a and b prefill their last chunk and sample; c is mid-prompt.
    n = tracker.launch(decode_inputs=[], samplers=["a", "b"], device_steps=1,
                       carried_within=0)  # fmt: skip
    # N+1 launched before N resolved: a's and b's inputs are N's samples.
    n1 = tracker.launch(decode_inputs=["a", "b"], samplers=["a", "b"], device_steps=4,
                        carried_within=6)  # fmt: skip
    tracker.resolve(n)
    tracker.resolve(n1)
    # N+2 launched after everything resolved: nothing carried, no overlap.
    tracker.launch(decode_inputs=["a"], samplers=["a"], device_steps=1, carried_within=0)
    s = counters.snapshot()
    assert s.batches_launched == 3
    assert s.launched_before_predecessor_resolved == 1
    assert s.carry_over_tokens == 2 + 6
    assert s.device_steps == 6 and s.windowed_batches == 1
    assert s.max_in_flight == 2
    assert s.window_sizes == {1: 2, 4: 1}


def test_stats_merge() -> None:
    a = PipelineStats(batches_launched=2, max_in_flight=2)
    b = PipelineStats(batches_launched=3, max_in_flight=3, wasted_tokens_dropped=1)
    m = a.merged(b)
    assert (m.batches_launched, m.max_in_flight, m.wasted_tokens_dropped) == (5, 3, 1)
    # The window-size histogram adds bucket by bucket; JSON's string keys are read back.
    c = PipelineStats(window_sizes={1: 2, 4: 1}).merged(PipelineStats(window_sizes={"4": 2}))
    assert c.window_sizes == {1: 2, 4: 3}


# -- decode window split and merge (vLLM's data classes, no engine) ----------


def _scheduled(windows: dict[str, int]):  # type: ignore[no-untyped-def]
    from tests.conftest import make_scheduled

    return make_scheduled(windows, finished={"gone"}, new_blocks=True)


def test_plan_window_splits_into_one_token_steps() -> None:
    from async_executor.vllm_glue.substeps import plan_window

    plan = plan_window(_scheduled({"a": 3, "b": 3}))
    assert plan.num_steps == 3 and plan.carried_tokens == 4
    first, *rest = plan.steps
    assert first.num_scheduled_tokens == {"a": 1, "b": 1}
    assert first.total_num_scheduled_tokens == 2
    assert first.scheduled_spec_decode_tokens == {}
    assert first.finished_req_ids == {"gone"}  # step 0 carries the batch's news
    for k, step in enumerate(rest, start=1):
        cached = step.scheduled_cached_reqs
        assert cached.req_ids == ["a", "b"]
        assert cached.num_computed_tokens == [10 + k, 20 + k]
        assert cached.num_output_tokens == [1 + k, 2 + k]
        assert cached.new_block_ids == [None, None]  # blocks came with step 0
        assert step.finished_req_ids == set() and step.scheduled_new_reqs == []


def test_plan_without_window_is_the_scheduled_step_itself() -> None:
    from async_executor.vllm_glue.substeps import plan_window

    scheduled = _scheduled({"a": 1})
    plan = plan_window(scheduled)
    assert plan.steps == [scheduled] and plan.num_steps == 1


def test_merge_concatenates_tokens_and_logprobs_per_request() -> None:
    from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput

    from async_executor.vllm_glue.substeps import merge_outputs

    def out(order: list[str], tokens: list[int], width: int) -> ModelRunnerOutput:
        n = len(order)
        return ModelRunnerOutput(
            req_ids=order,
            req_id_to_index={r: i for i, r in enumerate(order)},
            sampled_token_ids=[[t] for t in tokens],
            logprobs=LogprobsLists(
                logprob_token_ids=np.array([[t] * width for t in tokens]),
                logprobs=np.full((n, width), -1.0),
                sampled_token_ranks=np.array(tokens),
            ),
        )

    merged = merge_outputs(
        [
            out(["a", "b"], [1, 2], 3),
            out(["b", "a"], [20, 10], 2),
            out(["a", "b"], [100, 200], 2),
        ]
    )
    assert merged.sampled_token_ids == [[1, 10, 100], [2, 20, 200]]
    lp = merged.logprobs
    assert lp is not None and lp.cu_num_generated_tokens == [0, 3]
    assert lp.sampled_token_ranks.tolist() == [1, 10, 100, 2, 20, 200]
    # Rows from narrower steps are padded beyond every request's own width.
    assert lp.logprobs.shape == (6, 3) and np.isneginf(lp.logprobs[1, 2])
    assert lp.slice_request(1, 3).sampled_token_ranks.tolist() == [2, 20, 200]


# -- the window's output update against vLLM's per-token one -----------------


@pytest.mark.parametrize("seed", range(300))
def test_window_update_equals_per_token_update(seed: int) -> None:
    import random
    import types

    from vllm import SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    from async_executor.vllm_glue.scheduler import _WindowUpdate

    rng = random.Random(seed)
    prompt = [rng.randrange(5, 50) for _ in range(rng.randint(1, 20))]
    stop_ids = rng.sample(range(5, 50), rng.randint(0, 3))
    max_tokens = rng.randint(1, 40)
    params = SamplingParams(
        max_tokens=max_tokens,
        stop_token_ids=stop_ids,
        ignore_eos=rng.random() < 0.3,
        min_tokens=rng.randint(0, min(5, max_tokens)),
    )
    if not params.ignore_eos:
        params._eos_token_id = rng.randrange(5, 50)
    fake = types.SimpleNamespace(max_model_len=len(prompt) + rng.randint(1, 60))
    earlier = [rng.randrange(5, 50) for _ in range(rng.randint(0, 3))]
    made = []
    for _ in range(2):
        request = Request(f"r{seed}", list(prompt), params, None)
        request.append_output_token_ids(list(earlier))
        made.append(request)
    window = [rng.randrange(5, 50) for _ in range(rng.randint(2, 16))]
    base_tokens, base_stop = Scheduler._update_request_with_output(fake, made[0], list(window))
    fast_tokens, fast_stop = _WindowUpdate._update_request_with_output(fake, made[1], list(window))
    assert (fast_tokens, fast_stop) == (base_tokens, base_stop)
    assert list(made[1].output_token_ids) == list(made[0].output_token_ids)
    assert made[1].status == made[0].status
    assert made[1].stop_reason == made[0].stop_reason
