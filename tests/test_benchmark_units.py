"""Units of the benchmark's device-side measurement (ours alone, no vLLM)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from benchmarks import measure
from benchmarks.run_one import busy_from_spans, busy_from_trace, measure_runs, sampled_window


def test_busy_share_is_the_union_of_intervals_inside_the_window() -> None:
    kernels = [(0, 10, 0), (5, 20, 1), (30, 40, 0), (95, 120, 1)]
    assert measure.union_length(kernels, 0, 100) == 20 + 10 + 5
    assert measure.busy_share(kernels, 10, 40) == pytest.approx(20 / 30)


def test_gap_breakdown_charges_each_gap_to_the_kernel_that_ends_it() -> None:
    us = 1000
    names = ["gemm", "sample", "prepare"]
    kernels = [
        (0, 100 * us, 0),
        (105 * us, 200 * us, 1),  # 5 us gap before "sample"
        (250 * us, 300 * us, 2),  # 50 us gap before "prepare"
        (260 * us, 280 * us, 0),  # overlaps: no gap
        (500 * us, 600 * us, 2),  # 200 us gap before "prepare"
    ]
    gaps = measure.gap_breakdown(kernels, names, 0, 650 * us)
    assert gaps["idle_ns_by_gap_size"] == {
        "lt_10us": 5 * us, "10us_100us": 50 * us + 50 * us, "ge_100us": 200 * us,
    }  # fmt: skip
    assert gaps["idle_share"] == pytest.approx(305 / 650)
    # The same union as busy_share, seen from the gaps.
    assert 1.0 - gaps["idle_share"] == pytest.approx(measure.busy_share(kernels, 0, 650 * us))
    assert gaps["idle_ns_at_edges"] == [0, 50 * us]
    first = gaps["before_kernel"][0]
    assert first == {"kernel": "prepare", "idle_ns": 250 * us, "gaps": 2}
    assert gaps["before_kernel"][1]["kernel"] == "sample"


def test_sampled_window_leaves_out_the_lead_in_and_must_fit_the_call() -> None:
    second = 1_000_000_000
    lo, hi = sampled_window([1.0, 2.0], (10 * second, 20 * second))
    assert lo == 10 * second + int((1.0 + measure.SAMPLE_LEAD_IN_S) * second)
    assert hi == 13 * second
    with pytest.raises(RuntimeError, match="ran past the end of the call"):
        sampled_window([9.0, 2.0], (10 * second, 20 * second))


def test_busy_of_a_whole_call_is_over_the_call_not_the_trace() -> None:
    # The profiler starts before the call and stops well after it (the RPCs
    # around it): the call bounds the window.
    trace = {"kernels": [(15, 25, 0)], "names": ["k"], "window_ns": [0, 1000]}
    busy = busy_from_trace(trace, "whole", (10, 30), sampled=False)
    assert (busy.lo, busy.hi) == (10, 30)
    assert busy.share == pytest.approx(0.5)


def test_a_sampled_trace_that_outlives_the_call_is_an_error() -> None:
    trace = {"kernels": [(5, 6, 0)], "names": ["k"], "window_ns": [0, 100]}
    busy = busy_from_trace(trace, "sampled", (0, 100), sampled=True)
    assert busy.share == pytest.approx(0.01)
    with pytest.raises(RuntimeError, match="busy window ran past the end"):
        busy_from_trace(trace, "sampled", (0, 30), sampled=True)


def test_reference_preset_samples_busy_and_the_flag_is_checked() -> None:
    from benchmarks.__main__ import _parse, _settings

    cfg = _settings(_parse(["--preset", "reference", "--out", "x"]))
    assert cfg["workloads"] == [(32, 256, 8192)] and cfg["shape"] == "llama-8b"
    assert cfg["busy_window"] == (40.0, 10.0)
    assert cfg["systems"].split(",")[:2] == ["vllm-sync", "vllm-async"]
    cfg = _settings(_parse(["--preset", "smoke", "--busy-window", "0.5,2", "--out", "x"]))
    assert cfg["busy_window"] == (0.5, 2.0)
    for bad in ("2", "a,b", "-1,2", "1,0"):
        with pytest.raises(SystemExit):
            _parse(["--busy-window", bad, "--out", "x"])


MS = 1_000_000


def _cpu_call(forward_until_s: float, call_s: float = 1.6) -> tuple[Any, list[Any]]:
    """A timed call on CPU whose forward passes are known: 5 ms of every
    10 ms from its start up to `forward_until_s`, then idle; the call lasts
    at least `call_s` (sleep never returns early, so this holds on any
    machine)."""
    spans: list[Any] = []

    def generate() -> list[list[int]]:
        t0 = time.perf_counter_ns()
        spans.extend(("forward", t0 + k * 10 * MS, t0 + k * 10 * MS + 5 * MS)
                     for k in range(int(forward_until_s * 100)))  # fmt: skip
        while time.perf_counter_ns() < t0 + call_s * 1e9:
            time.sleep(0.05)
        return [[1, 2, 3]]

    return generate, spans


def _measure_cpu(generate: Any, spans: list[Any], window: list[float]) -> Any:
    def read_spans(lo: int, hi: int) -> list[Any]:
        return [s for s in spans if lo <= s[1] <= hi]

    def no_trace(**kwargs: Any) -> Any:
        raise AssertionError("no kernel trace on CPU")

    spec = {"device": "cpu", "busy_window": window, "reps": 1}
    return measure_runs(generate, spec, None, no_trace, no_trace, read_spans)


def test_sampled_busy_window_on_cpu_is_the_forward_share_of_that_window() -> None:
    """The reference preset's sampled busy window, on the CPU path, with a
    call of known forward passes: half of every 10 ms from 0 to 1.6 s."""
    generate, spans = _cpu_call(forward_until_s=1.6)
    measured = _measure_cpu(generate, spans, [0.5, 1.0])
    busy = measured.busy
    assert busy.method == "sampled 1 s from 0.5 s into the last timed call"
    call_start = measured.timed.last_call[0]
    # The lead-in of a sampled window is left out of it.
    assert busy.lo == call_start + int((0.5 + measure.SAMPLE_LEAD_IN_S) * 1e9)
    assert busy.hi == call_start + int(1.5e9)
    assert busy.share == pytest.approx(0.5, abs=0.02)
    assert measured.timed.walls[0] >= 1.6 and measured.timed.gen_tokens == 3


def test_a_busy_window_without_a_forward_pass_is_an_error() -> None:
    """A window that holds no forward pass (on a slow machine, a call still
    in its setup) is an error, not a busy share of 0."""
    generate, spans = _cpu_call(forward_until_s=0.2)
    with pytest.raises(RuntimeError, match="no forward pass in the busy window"):
        _measure_cpu(generate, spans, [0.5, 1.0])
    # A forward pass reaching into the window counts.
    busy = busy_from_spans([("forward", 0, 15)], 10, 30, "sampled")
    assert busy.share == pytest.approx(0.25)


def test_interleaved_round_order_rotates() -> None:
    from benchmarks.interleave import round_order

    names = ["a", "b", "c"]
    orders = [round_order(names, k) for k in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    # Over a full rotation every system runs first once.
    assert sorted(o[0] for o in orders[:3]) == names


def test_interleaved_ratios_are_paired_by_round() -> None:
    from benchmarks.interleave import summarize

    calls = {
        "base": [{"round": 0, "wall_s": 2.0}, {"round": 1, "wall_s": 4.0},
                 {"round": 2, "wall_s": 3.0}],
        # Twice as fast as base in every round, though its own walls vary.
        "fast": [{"round": 0, "wall_s": 1.0}, {"round": 1, "wall_s": 2.0},
                 {"round": 2, "wall_s": 1.5}],
        # Missed round 1: only the rounds both ran are paired.
        "gap": [{"round": 0, "wall_s": 4.0}, {"round": 2, "wall_s": 3.0}],
    }  # fmt: skip
    summary = summarize(calls, "base")
    assert summary["base"]["ratio_by_round"] == [1.0, 1.0, 1.0]
    assert summary["fast"]["ratio_by_round"] == [2.0, 2.0, 2.0]
    assert summary["fast"]["ratio"] == 2.0 and summary["fast"]["wall_s"] == 1.5
    assert summary["gap"]["ratio_by_round"] == [0.5, 1.0]
    assert summary["gap"]["reps_wall_s"] == [4.0, 3.0]


def test_interleaved_table_shows_failed_systems_and_mismatches() -> None:
    from benchmarks.interleave import table

    base = {"batch": 8, "prompt_len": 4, "gen_len": 16, "card": "CPU"}
    records = [
        base | {"system": "vllm-async", "wall_s": 1.0, "tokens_per_s": 128.0,
                "decode_step_ms": 62.5, "ratio": 1.0, "ratio_by_round": [1.0, 1.0],
                "same_output_as_first": True, "digests_agree": True},
        base | {"system": "ours", "wall_s": 0.5, "tokens_per_s": 256.0,
                "decode_step_ms": 31.2, "ratio": 2.0, "ratio_by_round": [1.8, 2.2],
                "ceiling_share": 0.9, "same_output_as_first": False, "digests_agree": True},
        base | {"system": "broken", "error": "its process exited (code 1)"},
    ]  # fmt: skip
    lines = table(records).splitlines()
    ours = next(line for line in lines if line.startswith("ours"))
    assert "1.80..2.20" in ours and "90.0%" in ours and ours.endswith("NO")
    broken = next(line for line in lines if line.startswith("broken"))
    assert "its process exited" in broken


def test_gpu_session_script_checks_its_steps_before_running_any(tmp_path: Any) -> None:
    """benchmarks/gpu_session.sh runs STEPS in the order given; a misspelt
    step must stop it before any GPU work starts (a GPU session has no time
    to lose on a typo found after the first ten minutes)."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    defined = set(re.findall(r"^run_([a-z0-9_]+)\(\) \{", text, re.M))
    default = re.search(r'STEPS=\$\{STEPS:-"([^"]*)"\}', text)
    assert default is not None
    for name in default.group(1).split():
        assert name.replace("-", "_") in defined, name
    env = {"PATH": "/usr/bin:/bin", "STEPS": "serve-8b-short no-such-step"}
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "unknown step: no-such-step" in done.stderr
    assert "===" not in done.stdout  # no step began
