"""Units of the benchmark's device-side measurement (ours alone, no vLLM)."""

from __future__ import annotations

import pytest

from benchmarks import measure
from benchmarks.run_one import busy_from_trace, sampled_window


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
