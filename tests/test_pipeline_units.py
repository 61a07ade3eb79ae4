"""Units that are ours alone: settings, the window policy, the device stage,
in-flight bookkeeping, and splitting/merging a decode window."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest

from async_executor.pipeline.counters import PipelineCounters, PipelineStats
from async_executor.pipeline.in_flight import InFlightTracker
from async_executor.pipeline.stage import DeviceStage
from async_executor.pipeline.window import (
    DecodeBatch,
    StepClock,
    WindowBounds,
    WindowChoice,
    WindowPayoff,
    choose_window,
    latency_cap,
    payoff_for,
    release_payoff,
)
from async_executor.settings import PipelineSettings, SettingsError

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

# -- settings -------------------------------------------------------------


def test_settings_defaults_and_env_fallback() -> None:
    s = PipelineSettings.from_mapping({}, env={})
    assert (s.depth, s.overlap, s.decode_window, s.stage) == (2, True, 2, "auto")
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
        ({"min_window_gain": -0.1}, "min_window_gain must be a number between 0 and 10"),
        ({"min_window_gain": "10%"}, "min_window_gain must be a number"),
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


def _batch(remaining: list[int], computed: list[int], single: bool = False) -> DecodeBatch:
    return DecodeBatch(np.array(remaining), np.array(computed), single)


def _window(batch: DecodeBatch, **kw: int | None) -> int:
    args: dict[str, int | None] = dict(
        max_window=8, max_model_len=512, token_budget=8192, block_size=16, free_blocks=10_000
    )
    args.update(kw)
    return choose_window(batch, WindowBounds(**args))  # type: ignore[arg-type]


def test_window_opens_for_steady_decode() -> None:
    assert _window(_batch([95, 90], [20, 30])) == 8


@pytest.mark.parametrize(
    "batch,kw,expected",
    [
        (_batch([95], [20]), {"max_window": 1}, 1),  # windows off
        (_batch([95, 95], [20, 20], single=True), {}, 1),  # prefill or structured output
        (_batch([5, 90], [20, 20]), {}, 5),  # capped by max_tokens
        (_batch([95], [508]), {}, 3),  # capped by max_model_len
        (_batch([95] * 100, [20] * 100), {"token_budget": 300}, 3),  # by the token budget
        (_batch([1], [20]), {}, 1),  # one token left
        (_batch([95], [20]), {"latency_cap": 3}, 3),  # the latency settings
        (_batch([], []), {}, 1),
    ],
)
def test_window_closes_or_shrinks(batch: DecodeBatch, kw: dict[str, int], expected: int) -> None:
    assert _window(batch, **kw) == expected


def test_window_never_needs_more_kv_blocks_than_are_free() -> None:
    # Block size 16. Request a holds 2 blocks (32 tokens), b holds 1 (10).
    batch = _batch([95, 95], [32, 10])
    # w=8: a needs 1 new block (40 tokens), b none (18 -> 2 blocks: 1 new).
    assert _window(batch, free_blocks=2) == 8
    # One free block: a's next token needs it (w=1 would too), b's window
    # must stay within its block: 10 + w <= 16.
    assert _window(batch, free_blocks=1) == 6
    # Nothing free: one-token steps, which vLLM would run (and preempt for).
    assert _window(batch, free_blocks=0) == 1


def test_latency_cap_from_step_time() -> None:
    def cap(step: float | None, *, arrivals: bool = False, gap: float = 50.0,
            admit: float = 20.0, depth: int = 2) -> int | None:  # fmt: skip
        return latency_cap(step_ms=step, depth=depth, max_token_gap_ms=gap,
                           max_admission_delay_ms=admit, arrivals_recent=arrivals)  # fmt: skip

    assert cap(None) is None  # no measurement yet
    assert cap(5.0) == 10  # 50 ms gap / 5 ms steps
    assert cap(5.0, arrivals=True) == 3  # 1 + 20 ms / (2 x 5 ms)
    assert cap(5.0, arrivals=True, depth=3) == 2
    assert cap(5.0, gap=0.0) is None and cap(5.0, gap=0.0, admit=0.0, arrivals=True) is None
    assert cap(80.0) == 1  # a step longer than the allowed gap


def test_step_clock_averages_intervals_per_device_step() -> None:
    clock = StepClock(alpha=0.5, idle_after_s=1.0)
    ms = 1_000_000
    clock.observe(0, 1)
    assert clock.step_ms is None
    clock.observe(8 * ms, 4)  # a window of 4 in 8 ms: 2 ms a step
    assert clock.step_ms == pytest.approx(2.0)
    clock.observe(12 * ms, 1)  # 4 ms
    assert clock.step_ms == pytest.approx(3.0)
    clock.observe(5_000 * ms, 1)  # after an idle engine: not a step time
    assert clock.step_ms == pytest.approx(3.0)


def _feed(payoff: WindowPayoff, t: int, step_ms: float, steps: int, batch: int, n: int) -> int:
    """n pure-decode batches of `steps` device steps, `step_ms` each, back to
    back from time t; returns the time after them."""
    for _ in range(n):
        t += int(step_ms * steps * 1_000_000)
        payoff.observe(t, steps, decode_only=True, batch_size=batch)
    return t


def test_window_payoff_compares_measured_step_times() -> None:
    """gain = one-token time per step / window time per step - 1, from steady
    batches only (the first after a switch mixes both kinds)."""
    payoff = WindowPayoff(alpha=1.0, idle_after_s=1.0, reprobe_batches=8, probe_batches=3)
    assert payoff.gain(32) is None
    t = _feed(payoff, 0, 4.0, 1, 32, 3)  # engine-bound one-token steps: 4 ms
    assert payoff.times(32).one_token_ms == pytest.approx(4.0)
    # The switch: this window's interval is not steady, and is not taken.
    t = _feed(payoff, t, 1.0, 2, 32, 1)
    assert payoff.gain(32) is None
    t = _feed(payoff, t, 2.5, 2, 32, 1)  # windows of 2 at 2.5 ms a step
    assert payoff.gain(32) == pytest.approx(4.0 / 2.5 - 1)
    assert payoff.decide(0.5, 32) is WindowChoice.OPEN
    assert payoff.decide(0.7, 32) is WindowChoice.DECLINE
    # Batches of other sizes are measured apart: 36 shares 32's half octave
    # (27-38), 40 does not.
    assert payoff.gain(36) == payoff.gain(32) and payoff.gain(40) is None
    # A prefill batch and an interval after an idle engine teach nothing;
    # after the prefill the next decode batch is not steady either.
    before = payoff.times(32).window_ms
    t += 30_000_000
    payoff.observe(t, 1, decode_only=False, batch_size=32)
    t = _feed(payoff, t, 9.0, 2, 32, 1)
    t += 2_000_000_000
    payoff.observe(t, 2, decode_only=True, batch_size=32)
    assert payoff.times(32).window_ms == before


def test_window_payoff_where_the_device_bounds_the_step() -> None:
    """A large model at a small batch: windows run at the one-token speed, so
    they are declined; the probes that measured that recur only once per
    `reprobe_batches` batches of the bucket, each `probe_batches` long."""
    payoff = WindowPayoff(alpha=1.0, idle_after_s=1.0, reprobe_batches=8, probe_batches=3)
    choices = [payoff.decide(0.05, 4)]
    assert choices == [WindowChoice.PROBE_WINDOW]  # nothing known: windows first
    t = 0
    for _ in range(40):
        steps = 2 if choices[-1].opens else 1
        t = _feed(payoff, t, 5.0, steps, 4, 1)
        choices.append(payoff.decide(0.05, 4))
    assert payoff.gain(4) == pytest.approx(0.0)
    # Three windows, then three one-token steps measured; then declined (a
    # declined step is a one-token step: no one-token probe is needed again)
    # until the window measurement is `reprobe_batches` batches old.
    assert choices[:6] == [WindowChoice.PROBE_WINDOW] * 3 + [WindowChoice.PROBE_ONE_TOKEN] * 3
    assert WindowChoice.OPEN not in choices
    assert WindowChoice.PROBE_ONE_TOKEN not in choices[6:]
    opened = [i for i, c in enumerate(choices) if c.opens]
    assert len(opened) == 12, choices  # 41 decisions: 4 probes of 3
    assert all(b - a >= 8 for a, b in zip(opened[2::3], opened[3::3], strict=False)), choices


def test_window_payoff_where_windows_pay() -> None:
    """A small model: windows twice as fast per step. They keep opening, and
    one-token steps are probed once per `reprobe_batches` to keep the
    comparison current; if windows stop paying (the load changed), they are
    declined from the next measurement on."""
    payoff = WindowPayoff(alpha=1.0, idle_after_s=1.0, reprobe_batches=8, probe_batches=3)
    one_token_ms, window_ms = 4.0, 2.0
    t = 0
    choices: list[WindowChoice] = []
    for _ in range(48):
        choice = payoff.decide(0.05, 128)
        choices.append(choice)
        t = _feed(
            payoff, t, window_ms if choice.opens else one_token_ms, 2 if choice.opens else 1, 128, 1
        )
    assert payoff.gain(128) == pytest.approx(1.0)
    assert choices[:6] == [WindowChoice.PROBE_WINDOW] * 3 + [WindowChoice.PROBE_ONE_TOKEN] * 3
    probes = [c for c in choices if c is WindowChoice.PROBE_ONE_TOKEN]
    assert choices.count(WindowChoice.OPEN) >= 30 and len(probes) <= 3 * (48 // 8 + 1)
    # Windows no longer pay: the next window samples say so.
    for _ in range(6):
        choice = payoff.decide(0.05, 128)
        t = _feed(payoff, t, 4.0, 2 if choice.opens else 1, 128, 1)
    assert payoff.gain(128) == pytest.approx(0.0)
    assert payoff.decide(0.05, 128) in (WindowChoice.DECLINE, WindowChoice.PROBE_ONE_TOKEN)


def test_window_payoff_is_shared_per_engine_config() -> None:
    config_a, config_b = object(), object()
    assert payoff_for(config_a) is payoff_for(config_a)
    assert payoff_for(config_a) is not payoff_for(config_b)
    first = payoff_for(config_a)
    release_payoff(config_a)
    assert payoff_for(config_a) is not first
    release_payoff(config_a)
    release_payoff(config_b)


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


def test_tracker_counts_overlap_and_window_sizes() -> None:
    counters = PipelineCounters()
    tracker = InFlightTracker(counters)
    n = tracker.launch(device_steps=1)
    # N+1 launched before N resolved: the overlap.
    n1 = tracker.launch(device_steps=4)
    tracker.resolve(n)
    tracker.resolve(n1)
    # N+2 launched after everything resolved: no overlap.
    tracker.launch(device_steps=1)
    s = counters.snapshot()
    assert s.batches_launched == 3
    assert s.launched_before_predecessor_resolved == 1
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


def _scheduled(windows: dict[str, int]) -> SchedulerOutput:
    from tests.conftest import make_scheduled

    return make_scheduled(windows, finished={"gone"}, new_blocks=True)


def test_window_steps_are_one_token_steps() -> None:
    from vllm.v1.core.sched.output import SchedulerOutput

    from async_executor.vllm_glue.window_steps import first_step, later_steps, window_of

    scheduled = _scheduled({"a": 3, "b": 3})
    assert window_of(scheduled) == 3
    first = first_step(scheduled)
    assert type(first) is SchedulerOutput and window_of(first) == 1
    assert first.num_scheduled_tokens == {"a": 1, "b": 1}
    assert first.total_num_scheduled_tokens == 2
    assert first.finished_req_ids == {"gone"}  # step 0 carries the batch's news
    assert first.scheduled_cached_reqs.new_block_ids == [([7],), ([7],)]
    # The scheduled step itself is untouched: the scheduler reads it back.
    assert scheduled.num_scheduled_tokens == {"a": 3, "b": 3}
    rest = later_steps(scheduled, 3)
    assert len(rest) == 2
    for k, step in enumerate(rest, start=1):
        cached = step.scheduled_cached_reqs
        assert cached.req_ids == ["a", "b"]
        assert cached.num_computed_tokens == [10 + k, 20 + k]
        assert cached.num_output_tokens == [1 + k, 2 + k]
        assert cached.new_block_ids == [None, None]  # blocks came with step 0
        assert step.finished_req_ids == set() and step.scheduled_new_reqs == []


def test_a_window_holds_only_running_requests() -> None:
    from async_executor.vllm_glue.window_steps import later_steps

    scheduled = _scheduled({"a": 2})
    scheduled.num_scheduled_tokens["new"] = 2
    with pytest.raises(RuntimeError, match="1 new request"):
        later_steps(scheduled, 2)


def test_merge_concatenates_tokens_and_logprobs_per_request() -> None:
    from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput

    from async_executor.vllm_glue.window_steps import merge_outputs

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

    from async_executor.vllm_glue.scheduler import window_update

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
    fast_tokens, fast_stop = window_update(made[1], list(window), fake.max_model_len)
    assert (fast_tokens, fast_stop) == (base_tokens, base_stop)
    assert list(made[1].output_token_ids) == list(made[0].output_token_ids)
    assert made[1].status == made[0].status
    assert made[1].stop_reason == made[0].stop_reason
