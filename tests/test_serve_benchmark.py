"""The serving benchmark (`python -m benchmarks serve`): its records from a
real `vllm bench serve` result, the flags it hands to vLLM's own parsers,
and the CPU preset end to end (what CI runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.serve import (
    CPU_FLAGS,
    PRESETS,
    Sweep,
    bench_argv,
    engine_flags,
    interleaved_flags,
    rotated,
)
from benchmarks.serve_plot import draw_serving
from benchmarks.serve_records import (
    PERCENTILES,
    REQUIRED_FIELDS,
    BenchResultError,
    block_length,
    bootstrap_interval,
    latency_intervals,
    metrics_from_bench,
    paired_ratios,
    paired_table,
    ratio_bounds,
    stats_delta,
    summary_table,
    trim_detail,
)
from benchmarks.serve_server import Server, serve_flags
from benchmarks.shapes import Model
from benchmarks.systems import parse_system, parse_systems

ROOT = Path(__file__).resolve().parent.parent
# A `vllm bench serve --save-result` file of the CPU preset (vLLM 0.32.0,
# rate inf at max concurrency 8), per-request lists cut to 3 entries.
FIXTURE = Path(__file__).parent / "fixtures" / "vllm_bench_serve_result.json"
SAMPLE = json.loads(FIXTURE.read_text())
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(**kw: Any) -> Sweep:
    args: dict[str, Any] = dict(rates=[8.0, math.inf], max_concurrency=8, num_prompts=24,
                                seconds=None, input_len=32, output_len=(32, 96),
                                seed=0)  # fmt: skip
    return Sweep(**(args | kw))


def _assert_ordered(record: dict[str, Any]) -> None:
    for metric in ("ttft", "tpot", "itl"):
        values = [record[f"{metric}_ms_p{p}"] for p in PERCENTILES]
        assert 0 <= values[0] <= values[1] <= values[2], (record["system"], metric, values)
    assert 0 < record["e2el_ms_p50"] <= record["e2el_ms_p99"], record


def test_a_saved_bench_result_becomes_the_record_fields() -> None:
    got = metrics_from_bench(SAMPLE)
    assert got["request_rate"] == "inf" and got["max_concurrency"] == 8
    assert got["completed"] == 24 and got["failed"] == 0 and got["num_prompts"] == 24
    assert got["output_tokens_per_s"] == SAMPLE["output_throughput"]
    assert got["output_tokens"] == SAMPLE["total_output_tokens"]
    assert got["duration_s"] == SAMPLE["duration"]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert got[f"{metric}_ms_mean"] == SAMPLE[f"mean_{metric}_ms"]
        for p in PERCENTILES:
            assert got[f"{metric}_ms_p{p}"] == SAMPLE[f"p{p}_{metric}_ms"]
    record = got | {"mode": "serve", "system": "x", "shape": "tiny", "card": "c", "run_id": "r"}
    assert set(REQUIRED_FIELDS) <= set(record)
    _assert_ordered(record)
    assert metrics_from_bench(SAMPLE | {"request_rate": 4.0})["request_rate"] == 4.0


def test_per_request_latencies_give_confidence_intervals() -> None:
    """With `--save-detailed` lists, TTFT p50/p99 and TPOT p50 get bootstrap
    intervals; the bulky lists are dropped from the kept file."""
    rng = np.random.default_rng(1)
    n = 60
    ttfts = list(0.030 + 0.005 * rng.standard_normal(n))
    lens = [int(x) for x in rng.integers(128, 513, n)]
    latencies = [t + 0.005 * (k - 1) for t, k in zip(ttfts, lens, strict=True)]
    detailed = SAMPLE | {
        "ttfts": ttfts, "latencies": latencies, "output_lens": lens, "input_lens": [256] * n,
        "itls": [[0.005] * (k - 1) for k in lens], "generated_texts": ["x"] * n,
        "errors": [""] * n, "start_times": list(range(n)), "queue_times": [0.0] * n,
    }  # fmt: skip
    kept = trim_detail(detailed)
    assert not {"itls", "generated_texts", "input_lens", "errors"} & set(kept)
    assert kept["ttfts"] == ttfts and kept["output_lens"] == lens
    assert trim_detail(detailed | {"errors": [""] * (n - 1) + ["timeout"]})["errors"][-1]
    got = metrics_from_bench(kept)
    p50 = float(np.percentile(np.asarray(ttfts) * 1000, 50))
    p99 = float(np.percentile(np.asarray(ttfts) * 1000, 99))
    low, high = got["ttft_ms_p50_ci90"]
    assert low <= p50 <= high and high - low < 5
    low99, high99 = got["ttft_ms_p99_ci90"]
    # A p99 of 60 is about the largest one or two: its interval is wide.
    assert low99 <= p99 <= high99 and high99 - low99 > high - low
    assert got["tpot_ms_p50_ci90"] == pytest.approx([5.0, 5.0], abs=1e-3)
    # A result without the lists (no --save-detailed) has no intervals.
    assert not any(k.endswith("_ci90") for k in metrics_from_bench(SAMPLE))
    assert bootstrap_interval([7.0] * 10, 99) == [7.0, 7.0]


def test_block_bootstrap_keeps_waves_of_first_tokens_together() -> None:
    """At rate inf the slowest first tokens are neighbours in start order
    (one group waited behind the same prefills). Resampled one by one, every
    resample holds about as many of them and the p99 hardly moves; resampled
    in blocks of neighbours, a resample may hold the wave twice or miss it,
    which is what another run of the same load can do."""
    wave = [100.0 + i for i in range(20)]
    values = [10.0] * 500 + wave + [10.0] * 500
    assert block_length(len(values)) == 32 and block_length(60) == 8 and block_length(1) == 1
    one_by_one = bootstrap_interval(values, 99)
    blocks = bootstrap_interval(values, 99, block_length(len(values)))
    assert blocks[1] - blocks[0] > 2 * (one_by_one[1] - one_by_one[0]), (one_by_one, blocks)
    assert blocks[0] < one_by_one[0]
    # The order is the requests' start order, not the order of the lists.
    shuffled = list(range(len(values)))
    np.random.default_rng(1).shuffle(shuffled)
    result = {
        "ttfts": [values[i] / 1000 for i in shuffled],
        "latencies": [values[i] / 1000 + 1.0 for i in shuffled],
        "output_lens": [11] * len(values),
        "start_times": [float(i) for i in shuffled],
    }
    assert latency_intervals(result)["ttft_ms_p99_ci90"] == pytest.approx(blocks)


def test_ratio_bounds_of_two_intervals() -> None:
    assert ratio_bounds([45.0, 75.0], [50.0, 60.0]) == [0.75, 1.5]
    assert ratio_bounds(None, [50.0, 60.0]) is None
    assert ratio_bounds([1.0, 2.0], [0.0, 1.0]) is None


def test_a_result_without_the_percentiles_is_refused() -> None:
    partial = {k: v for k, v in SAMPLE.items() if k != "p90_itl_ms"}
    with pytest.raises(BenchResultError, match=r"'p90_itl_ms'.*--metric-percentiles 50,90,99"):
        metrics_from_bench(partial)


def test_counter_deltas() -> None:
    before = {"batches_launched": 10, "windowed_batches": 4, "max_in_flight": 2,
              "window_sizes": {1: 6, 4: 4}}  # fmt: skip
    after = {"batches_launched": 25, "windowed_batches": 16, "max_in_flight": 3,
             "window_sizes": {1: 6, 4: 14, 2: 3}}  # fmt: skip
    assert stats_delta(before, after) == {
        "batches_launched": 15, "windowed_batches": 12, "max_in_flight": 3,
        "window_sizes": {4: 10, 2: 3},
    }  # fmt: skip


def test_output_lengths_are_drawn_from_exactly_the_asked_range() -> None:
    from vllm.benchmarks.datasets.utils import get_sampling_params

    class Tokenizer:
        vocab_size = 1000

        def num_special_tokens_to_add(self) -> int:
            return 0

    for lo, hi in [(128, 512), (32, 96)]:
        mean, ratio = _sweep(output_len=(lo, hi)).output_mean_and_ratio()
        _, outs, _ = get_sampling_params(np.random.default_rng(0), 20_000,
                                         {"input": 0.0, "output": ratio}, 256, mean,
                                         Tokenizer())  # fmt: skip
        assert (outs.min(), outs.max()) == (lo, hi)
    with pytest.raises(SystemExit, match="would draw"):
        _sweep(output_len=(100, 301)).output_mean_and_ratio()


def test_prompts_per_rate() -> None:
    assert _sweep().prompts_at(8.0) == 24
    timed = _sweep(seconds=20.0, num_prompts=100, max_concurrency=256)
    assert [timed.prompts_at(r) for r in (2.0, 32.0, math.inf)] == [100, 640, 1024]


def _serve_args(flags: list[str]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *flags])
    return AsyncEngineArgs.from_cli_args(parsed)


def test_systems_become_vllm_serve_flags() -> None:
    ours = _serve_args(serve_flags(parse_system("async_executor[decode_window=8,depth=3]")))
    assert ours.distributed_executor_backend == "async_executor"
    assert ours.additional_config["async_executor"]["decode_window"] == 8
    assert ours.additional_config["async_executor"]["depth"] == 3
    assert _serve_args(serve_flags(parse_system("vllm-sync"))).async_scheduling is False
    assert _serve_args(serve_flags(parse_system("vllm-async"))).async_scheduling is None
    mp = _serve_args(serve_flags(parse_system("vllm-async-mp")))
    assert mp.distributed_executor_backend == "mp"
    with pytest.raises(RuntimeError, match="not served by `vllm serve`"):
        serve_flags(parse_system("hf-sync"))
    names = "vllm-async,async_executor[decode_window=8,depth=3]"
    assert [s.name for s in parse_systems(names)] == ["vllm-async", names.split(",", 1)[1]]


def test_engine_flags_per_device() -> None:
    gpu = dict(PRESETS["h200-1b"])
    dummy = Model("llama-1b", "/m", dummy=True, vocab_size=128256)
    args = _serve_args(engine_flags(gpu, dummy, _sweep(input_len=256, output_len=(128, 512))))
    assert (args.load_format, args.dtype, args.max_model_len) == ("dummy", "bfloat16", 1024)
    assert args.attention_backend == "FLASH_ATTN"
    tiny = Model("tiny", "/t", dummy=False, vocab_size=97)
    args = _serve_args(engine_flags(dict(PRESETS["cpu-smoke"]), tiny, _sweep()))
    assert (args.load_format, args.dtype, args.max_model_len) == ("auto", "float32", 512)
    assert args.enforce_eager and args.kv_cache_memory_bytes == int(CPU_FLAGS[-1])


def test_bench_flags_parse_as_vllm_bench_serve_reads_them(tmp_path: Path) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    server = Server("http://127.0.0.1:1", "bench-serve-x", [], tmp_path, 0.0, None)  # type: ignore[arg-type]
    model = Model("tiny", "/t", dummy=False, vocab_size=97)
    sweep = _sweep(output_len=(128, 512))
    parser = FlexibleArgumentParser()
    add_cli_args(parser)

    def parsed(index: int, rate: float) -> Any:
        argv = bench_argv(server, model, sweep, index, rate, tmp_path / "r.json")
        assert argv[argv.index("bench") + 1] == "serve"
        return parser.parse_args(argv[argv.index("bench") + 2 :])

    inf = parsed(1, math.inf)
    assert inf.request_rate == math.inf and inf.max_concurrency == 8 and inf.seed == 1
    assert (inf.random_output_len, json.loads(inf.random_range_ratio)) == (
        320, {"input": 0.0, "output": 0.6})  # fmt: skip
    assert inf.served_model_name == "bench-serve-x" and inf.model == "/t"
    assert inf.ignore_eos and inf.temperature == 0.0 and inf.save_result
    assert inf.percentile_metrics == "ttft,tpot,itl,e2el" and inf.metric_percentiles == "50,90,99"
    poisson = parsed(0, 8.0)
    assert poisson.request_rate == 8.0 and poisson.max_concurrency is None and poisson.seed == 0


def test_table_and_picture_from_records(tmp_path: Path) -> None:
    measured = metrics_from_bench(SAMPLE) | {"mode": "serve", "shape": "tiny", "card": "cpu"}
    records = [
        measured | {"system": "vllm-async"},
        measured | {"system": "vllm-async", "request_rate": 8.0, "max_concurrency": None},
        measured | {"system": "ours", "pipeline_stats": {"windowed_batches": 7}},
        {"system": "broken", "shape": "tiny", "error": "server exited with 1"},
    ]
    table = summary_table(records)
    assert "broken" in table and "server exited with 1" in table
    (ours,) = [line for line in table.splitlines() if line.startswith("ours ")]
    assert ours.split()[-1] == "7", ours
    png = draw_serving(records, tmp_path / "serve.png")
    assert png is not None and png.read_bytes()[:8] == PNG
    assert draw_serving(records[-1:], tmp_path / "none.png") is None


def test_interleaved_order_rotates_and_servers_share_the_gpu() -> None:
    systems = ["a", "b", "c"]
    orders = [rotated(systems, turn) for turn in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    # Over n turns every system runs once in every position.
    for position in range(3):
        assert sorted(order[position] for order in orders[:3]) == systems
    assert rotated([], 5) == []
    assert interleaved_flags("cpu", 3, 16) == []
    flags = interleaved_flags("cuda", 3, 1.5)
    assert flags == ["--gpu-memory-utilization", "0.267",
                     "--kv-cache-memory-bytes", str(3 << 29)]  # fmt: skip


def test_paired_ratios_pair_each_round_with_the_base() -> None:
    def rec(system: str, rate: Any, round_: int, tok: float, ttft: float, tpot: float,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
        return {"system": system, "request_rate": rate, "round": round_, "completed": 10,
                "output_tokens_per_s": tok, "ttft_ms_p99": ttft, "tpot_ms_p50": tpot,
                "itl_ms_p99": 5.0 * (round_ + 1)} | extra  # fmt: skip

    records = [
        rec("base", 8.0, 0, 100, 50, 2.0), rec("ours", 8.0, 0, 110, 25, 1.0),
        rec("base", "inf", 0, 200, 80, 0.0), rec("ours", "inf", 0, 300, 40, 1.0),
        rec("base", 8.0, 1, 100, 50, 2.0), rec("ours", 8.0, 1, 130, 50, 1.5),
        # Round 1 at inf: ours failed, so only round 0 pairs there.
        rec("base", "inf", 1, 200, 80, 1.0), {"system": "ours", "request_rate": "inf",
                                             "round": 1, "error": "server died"},
    ]  # fmt: skip
    rows = {(r["system"], str(r["request_rate"])): r for r in paired_ratios(records, "base")}
    assert list(rows) == [("base", "8.0"), ("ours", "8.0"), ("base", "inf"), ("ours", "inf")]
    at8 = rows[("ours", "8.0")]
    assert at8["rounds"] == [0, 1] and at8["output_ratio_by_round"] == [1.1, 1.3]
    assert at8["output_ratio"] == pytest.approx(1.2)
    assert at8["ttft_p99_ratio_by_round"] == [0.5, 1.0] and at8["tpot_p50_ratio"] == 0.625
    assert at8["itl_ms_p99"] == 7.5
    at_inf = rows[("ours", "inf")]
    assert at_inf["rounds"] == [0] and at_inf["output_ratio"] == 1.5
    # The base's TPOT was 0 in that round: no ratio, not a division error.
    assert at_inf["tpot_p50_ratio_by_round"] == [None] and at_inf["tpot_p50_ratio"] is None
    assert rows[("base", "8.0")]["output_ratio"] == 1.0
    # Records without intervals have no bounds.
    assert at8["ttft_p99_ratio_bounds_by_round"] == [None, None]
    table = paired_table(list(rows.values()), "base")
    (line,) = [t for t in table.splitlines() if t.startswith("ours") and " 8 " in t]
    assert "1.20x (1.10-1.30)" in line and "0.62x (0.50-0.75)" in line
    # With intervals: the widest bounds over the rounds.
    ci = "ttft_ms_p99_ci90"
    records[0][ci], records[1][ci] = [40.0, 60.0], [20.0, 30.0]
    records[4][ci], records[5][ci] = [45.0, 55.0], [40.0, 66.0]
    rows = {(r["system"], str(r["request_rate"])): r for r in paired_ratios(records, "base")}
    bounds = rows[("ours", "8.0")]["ttft_p99_ratio_bounds_by_round"]
    assert bounds == [[0.3333, 0.75], [0.7273, 1.4667]]
    table = paired_table(list(rows.values()), "base")
    (line,) = [t for t in table.splitlines() if t.startswith("ours") and " 8 " in t]
    assert "0.33-1.47" in line, line
    (line,) = [t for t in table.splitlines() if t.startswith("ours") and " inf " in t]
    assert line.split()[-2] == "-", line


def test_rounds_need_an_interleaved_run(tmp_path: Path) -> None:
    from benchmarks.serve import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--rounds", "2", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def _leftover_processes(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(cmdline)
    return found


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_server_past_its_start_timeout_is_killed_and_the_sweep_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "serve", "--shape", "tiny", "--device", "cpu",
         "--systems", "vllm-async,async_executor", "--start-timeout", "3",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "serve.json").read_text())
    assert [r["system"] for r in records] == ["vllm-async", "async_executor"]
    for record in records:
        assert record["error"] == "server not ready in time (--start-timeout):", record
        assert Path(record["serve_log"]).exists()
    assert not _leftover_processes(str(tmp_path / "models")), "a server outlived its sweep"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_preset_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "serve", "--preset", "cpu-smoke",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "serve.json").read_text())
    preset = PRESETS["cpu-smoke"]
    expected_rates = [*preset["rates"], "inf"]
    systems = [
        "vllm-async",
        "async_executor[decode_window=4,max_token_gap_ms=0,max_admission_delay_ms=0]",
    ]
    assert [(r["system"], r["request_rate"]) for r in records] == [
        (s, rate) for s in systems for rate in expected_rates
    ]
    assert len({r["run_id"] for r in records}) == 1
    for r in records:
        where = (r["system"], r["request_rate"])
        assert set(REQUIRED_FIELDS) <= set(r), (where, set(REQUIRED_FIELDS) - set(r))
        assert r["mode"] == "serve" and r["shape"] == "tiny" and r["card"], where
        assert "error" not in r, (where, r["error"])
        assert r["completed"] == r["num_prompts"] == preset["num_prompts"], where
        assert r["failed"] == 0, where
        assert r["output_tokens_per_s"] > 0 and r["output_tokens"] > 0, where
        assert r["max_concurrency"] == (8 if r["request_rate"] == "inf" else None), where
        assert r["vllm_version"].startswith("0.32"), where
        assert r["server_start_s"] > 0, where
        _assert_ordered(r)
        # Per-request latencies kept (the bulky lists dropped) and intervals.
        low, high = r["ttft_ms_p99_ci90"]
        assert 0 < low <= high, (where, low, high)
        kept = json.loads(Path(r["bench_result"]).read_text())
        assert len(kept["ttfts"]) == r["completed"] and "itls" not in kept, where
        stats = r.get("pipeline_stats")
        if r["system"] == "vllm-async":
            assert stats is None, where
            continue
        # Our executor ran every rate, overlapped, and opened decode windows.
        assert r["settings"] == {
            "decode_window": 4,
            "max_token_gap_ms": 0,
            "max_admission_delay_ms": 0,
        }, where
        assert stats["windowed_batches"] > 0, (where, stats)
        assert stats["launched_before_predecessor_resolved"] > 0, (where, stats)
        assert sum(stats["window_sizes"].values()) == stats["batches_launched"], (where, stats)
    png = out / "serve.png"
    assert png.exists() and png.read_bytes()[:8] == PNG
    assert "TTFT p99" in proc.stdout and "async_executor[decode_window=4" in proc.stdout


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interleaved_servers_on_cpu(tmp_path: Path) -> None:
    """Both servers up at once, each rate run on both in turn for two
    rounds: every (system, rate, round) measured, the order rotating, the
    rounds paired, windows opened, no server left behind."""
    out = tmp_path / "out"
    ours = "async_executor[decode_window=4,max_token_gap_ms=0,max_admission_delay_ms=0]"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "serve", "--shape", "tiny", "--device", "cpu",
         "--systems", f"vllm-async,{ours}", "--rates", "8", "--max-concurrency", "8",
         "--num-prompts", "12", "--input-len", "32", "--output-len", "32:96",
         "--interleave", "--rounds", "2",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "serve.json").read_text())
    assert [(r["round"], r["request_rate"], r["system"]) for r in records] == [
        (0, 8.0, "vllm-async"), (0, 8.0, ours), (0, "inf", ours), (0, "inf", "vllm-async"),
        (1, 8.0, "vllm-async"), (1, 8.0, ours), (1, "inf", ours), (1, "inf", "vllm-async"),
    ]  # fmt: skip
    for r in records:
        where = (r["system"], r["request_rate"], r["round"])
        assert "error" not in r and r["interleaved"] is True, where
        assert set(REQUIRED_FIELDS) <= set(r), where
        assert r["completed"] == 12 and r["failed"] == 0, where
        _assert_ordered(r)
        if r["system"] == ours:
            assert r["pipeline_stats"]["windowed_batches"] > 0, where
    # One start per server, shared by both rounds.
    assert len({(r["system"], r["server_start_s"]) for r in records}) == 2
    paired = json.loads((out / "serve-paired.json").read_text())
    assert [(p["system"], p["request_rate"], p["rounds"]) for p in paired] == [
        ("vllm-async", 8.0, [0, 1]), (ours, 8.0, [0, 1]),
        ("vllm-async", "inf", [0, 1]), (ours, "inf", [0, 1]),
    ]  # fmt: skip
    assert all(p["output_ratio"] > 0 for p in paired)
    assert "paired with vllm-async" in proc.stdout
    assert (out / "serve.png").read_bytes()[:8] == PNG
    assert not _leftover_processes(str(tmp_path / "models")), "a server outlived its sweep"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_bench_client_reports_failures_and_outlives_a_timeout(
    tmp_path: Path, tiny_model: str
) -> None:
    """benchmarks/serve_client.py runs vLLM's own `vllm bench serve` in one
    process for many rates: a bad flag is that run's failure (its log says
    why), a run past its time is killed and the next run gets a new client."""
    import socket

    from benchmarks.serve_client import BenchClient

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    hang = ["--backend", "vllm", "--base-url", url, "--model", tiny_model,
            "--dataset-name", "random", "--num-prompts", "1",
            "--random-input-len", "4", "--random-output-len", "4"]  # fmt: skip
    with BenchClient(tmp_path / "client.log") as client:
        bad = client.run(["--no-such-flag"], tmp_path / "bad.log", 300)
        assert bad == "`vllm bench serve` exited with 2", bad
        assert "--no-such-flag" in (tmp_path / "bad.log").read_text()
        slow = client.run(hang, tmp_path / "hang.log", 20)
        assert slow is not None and "timed out after 20 s" in slow, slow
        again = client.run(["--no-such-flag"], tmp_path / "again.log", 300)
        assert again == "`vllm bench serve` exited with 2", again
    silent.close()
