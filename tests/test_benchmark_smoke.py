"""The benchmark CLI's smoke preset, end to end on CPU (what CI runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import UNBOUNDED

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_preset_writes_records_and_timeline(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--preset", "smoke", "--out", str(out),
         "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    by_system = {r["system"]: r for r in records}
    assert {"vllm-sync", "async_executor"} <= set(by_system)
    required = {"run_id", "system", "shape", "batch", "tp", "prompt_len", "gen_len",
                "tokens_per_s", "wall_s", "gpu_busy", "card", "vllm_version",
                "torch_version"}  # fmt: skip
    for record in records:
        assert required <= set(record), required - set(record)
        assert 0.0 < record["gpu_busy"] <= 1.0, record["gpu_busy"]
        assert record["tokens_per_s"] > 0
    assert len({r["run_id"] for r in records}) == 1
    # Every system generated the same tokens.
    assert len({r["output_digest"] for r in records}) == 1
    ours = by_system["async_executor"]["pipeline_stats"]
    assert ours["launched_before_predecessor_resolved"] > 0, ours
    windowed = by_system[f"async_executor[decode_window=4,{UNBOUNDED}]"]["pipeline_stats"]
    assert windowed["windowed_batches"] > 0, windowed
    png = out / "timeline.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "async_executor" in proc.stdout and "tok/s" in proc.stdout


def test_transformers_rows_on_cpu(tmp_path: Path) -> None:
    """The transformers runner next to vLLM on CPU: what the GPU host runs,
    exercised in CI. Busy is over one more call traced whole, which holds
    every forward pass of the call however fast the machine is (a window
    sampled at a fixed time may hold none: the sampled window is covered by
    test_benchmark_units with calls of known forward passes)."""
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--shape", "tiny", "--batch", "32",
         "--prompt-len", "8", "--gen-len", "256", "--device", "cpu", "--reps", "1",
         "--systems", "vllm-sync,hf-sync,hf-async",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_system = {r["system"]: r for r in json.loads((out / "results.json").read_text())}
    for name in ("vllm-sync", "hf-sync"):
        record = by_system[name]
        assert "skipped" not in record and "error" not in record, record
        brief = {k: record.get(k) for k in ("system", "wall_s", "gpu_busy", "busy_window_s")}
        assert record["generated_tokens"] == 32 * 256, brief
        assert record["busy_method"] == "one more call, traced whole", record["busy_method"]
        assert 0.0 < record["gpu_busy"] <= 1.0, brief
        assert record["timeline"]["window_ns"], brief
    # vLLM decodes from its first step, so the middle of its call (the
    # timeline's steps) is decoding.
    assert by_system["vllm-sync"]["timeline"]["spans"]
    assert by_system["hf-sync"]["transformers_version"]
    assert "needs a CUDA device" in by_system["hf-async"]["skipped"]
    assert "n/a (other weights)" in proc.stdout


def test_a_system_past_its_timeout_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "timeout"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--shape", "tiny", "--batch", "2",
         "--prompt-len", "8", "--gen-len", "8", "--device", "cpu",
         "--systems", "vllm-sync,async_executor", "--timeout", "2",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    assert [r["system"] for r in records] == ["vllm-sync", "async_executor"]
    for record in records:
        assert record["error"] == "timed out after 2 s per workload (--timeout)", record
    assert "timed out after 2 s" in proc.stdout


def test_interleaved_rounds_on_cpu(tmp_path: Path) -> None:
    """`python -m benchmarks interleave`: both engines up at once, each round
    one call per system, a host profile of each; records say how each
    round's pair compared and that every call generated the same tokens."""
    out = tmp_path / "interleaved"
    systems = ["vllm-async", f"async_executor[decode_window=4,{UNBOUNDED}]"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "interleave", "--shape", "tiny",
         "--workloads", "8x16x24,4x8x12", "--systems", ",".join(systems), "--rounds", "2",
         "--warmup-rounds", "1",
         "--device", "cpu", "--profile", "--profile-top", "80", "--profile-workload", "0",
         "--out", str(out), "--models-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "interleaved.json").read_text())
    assert sorted((r["system"], r["batch"]) for r in records) == sorted(
        (s, b) for s in systems for b in (8, 4)
    )
    for record in records:
        assert "error" not in record, record
        assert record["mode"] == "interleaved" and record["rounds"] == 2
        assert record["warmup_rounds"] == 1
        assert len(record["reps_wall_s"]) == 2 and len(record["ratio_by_round"]) == 2
        assert record["generated_tokens"] == record["batch"] * record["gen_len"]
        assert record["digests_agree"] and record["same_output_as_first"], record
    first = [r for r in records if r["system"] == "vllm-async"]
    assert all(r["ratio_by_round"] == [1.0, 1.0] for r in first)
    windowed = next(r for r in records if r["system"] == systems[1] and r["batch"] == 8)
    assert windowed["pipeline_stats"]["windowed_batches"] > 0, windowed["pipeline_stats"]
    for system in ("vllm-async", "async_executor_decode_window=4_max_token_gap_ms=0_"
                   "max_admission_delay_ms=0_"):  # fmt: skip
        profile = (out / f"profile-{system}-b8.txt").read_text()
        assert "Ordered by: internal time" in profile and "execute_model" in profile
        # The engine's own thread: where the scheduler runs.
        engine_profile = (out / f"profile-engine-{system}-b8.txt").read_text()
        assert "Ordered by: internal time" in engine_profile
        assert "scheduler.py" in engine_profile and "(schedule)" in engine_profile
    assert "interleaved rounds" in proc.stdout
