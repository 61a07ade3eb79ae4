"""Tensor parallelism at TP=2 through the worker-process executor (stage
"process") on vLLM's CPU build, equal token for token to vLLM's synchronous
path at TP=2.

Every rank runs every batch and every window (vLLM's message queue
broadcasts each call to all ranks; only the output rank replies), so each
rank runs each device step's forward pass: the step tracer's `forward` spans
of the two worker processes show it, a run on one rank cannot."""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import Any

import pytest
from vllm import SamplingParams

from async_executor import pipeline_config
from async_executor.tracing import ENV_FLAG, read_span_file
from tests.conftest import (
    assert_pipelined,
    assert_same_outputs,
    corpus_prompts,
    engine,
    generate,
    stats,
)

pytestmark = pytest.mark.e2e

TP = 2
# The tiny model splits over 2 ranks: 4 attention heads, 2 KV heads, hidden
# 128, intermediate 256 (tiny_llama.DEFAULT_SHAPE).
PROMPTS = corpus_prompts(8)


def _one_core_per_rank() -> str:
    """vLLM's CPU workers bind their OpenMP threads to one NUMA node each by
    default; this machine may have one node, so each rank gets a core."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"{cpus[0]}|{cpus[-1]}"


@pytest.fixture(autouse=True)
def _bind_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", _one_core_per_rank())


def _workload(llm: Any) -> list[SamplingParams]:
    """Greedy requests of mixed lengths; every other one stops at a token of
    its own free run, a few steps in (at a different step for each)."""
    free_run = generate(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    params = []
    for i, out in enumerate(free_run):
        if i % 2:
            stop_id = out.outputs[0].token_ids[1 + i % 7]
            params.append(SamplingParams(temperature=0.0, max_tokens=14, stop_token_ids=[stop_id]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=3 + 2 * i))
    return params


@pytest.fixture(scope="module")
def baseline(tiny_model: str) -> tuple[list[SamplingParams], list[Any]]:
    """vLLM's synchronous path at TP=2 (stock multiprocess executor)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", _one_core_per_rank())
        with engine(tiny_model, ours=False, tensor_parallel_size=TP) as llm:
            params = _workload(llm)
            outputs = generate(llm, PROMPTS, params)
    reasons = collections.Counter(o.outputs[0].finish_reason for o in outputs)
    assert reasons["stop"] >= 1 and reasons["length"] >= 1, reasons
    assert len({len(o.outputs[0].token_ids) for o in outputs}) > 3
    return params, outputs


def _runner_fixed(worker: Any) -> bool:
    from async_executor.vllm_glue.cpu_runner import _SeededDiscardFix

    return isinstance(worker.worker.model_runner, _SeededDiscardFix)


def _forward_steps_per_worker(trace: Path, expected: int) -> list[int]:
    """Forward passes per worker process (one span file per pid), from the
    step tracer. Workers flush twice a second: wait for the counts to settle."""
    counts: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        per_pid = [
            sum(1 for span in read_span_file(path) if span[0] == "forward")
            for path in trace.glob("*.jsonl")
        ]
        per_pid = sorted(n for n in per_pid if n)
        if per_pid == counts and len(counts) >= TP and min(counts) >= expected:
            break
        counts = per_pid
        time.sleep(1.0)
    return counts


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"decode_window": 1}, id="window1"),
        pytest.param({"decode_window": 4}, id="window4"),
    ],
)
def test_tp2_is_exact_and_every_rank_runs_every_step(
    tiny_model: str,
    baseline: tuple[list[SamplingParams], list[Any]],
    settings: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params, expected = baseline
    # The worker processes (spawned) trace their steps into tmp_path.
    monkeypatch.setenv(ENV_FLAG, str(tmp_path))
    with engine(tiny_model, ours=True, settings=settings, tensor_parallel_size=TP) as llm:
        assert llm.collective_rpc(_runner_fixed) == [True] * TP
        ours = generate(llm, PROMPTS, params)
        s = stats(llm)
        forwards = _forward_steps_per_worker(tmp_path, s.device_steps)
    assert_same_outputs(expected, ours, "TP=2")
    window = settings.get("decode_window", 1)
    assert_pipelined(s, windows=window > 1)
    if window > 1:
        assert s.window_sizes.get(window, 0) > 0, s
        assert s.device_steps == sum(w * n for w, n in s.window_sizes.items()), s
    else:
        assert s.windowed_batches == 0 and s.device_steps == s.batches_launched, s
    # Each rank ran each device step: one forward pass per step per rank.
    assert forwards == [s.device_steps] * TP, (forwards, s)


@pytest.mark.parametrize("stage", ["thread", "inline"])
def test_tp_with_an_in_process_stage_is_refused(tiny_model: str, stage: str) -> None:
    from vllm import LLM

    with pytest.raises(Exception, match="needs the device stage 'process'"):
        LLM(
            tiny_model,
            tensor_parallel_size=TP,
            distributed_executor_backend="async_executor",
            additional_config=pipeline_config(stage=stage),
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            kv_cache_memory_bytes=64 << 20,
        )


@pytest.mark.parametrize("by_class", [False, True], ids=["by-name", "by-class"])
def test_pipeline_parallelism_is_refused(tiny_model: str, by_class: bool) -> None:
    """By name vLLM refuses it (an executor without `supports_pp`); the class
    inherits MultiprocExecutor's `supports_pp` and gets our refusal."""
    from vllm import LLM

    from async_executor.vllm_glue.executor import AsyncMultiprocExecutor

    backend: Any = AsyncMultiprocExecutor if by_class else "async_executor"
    with pytest.raises(Exception, match=r"(?i)pipeline parallelism"):
        LLM(
            tiny_model,
            pipeline_parallel_size=2,
            distributed_executor_backend=backend,
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            kv_cache_memory_bytes=64 << 20,
        )
