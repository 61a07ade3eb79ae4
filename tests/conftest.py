"""Shared fixtures: a tiny Llama built locally, engines, output comparison.

The baseline everywhere is vLLM's synchronous path: the stock executor with
`async_scheduling=False`. "Ours" is the same engine with
`distributed_executor_backend="async_executor"`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Fast in-process engines unless a test asks for the multiprocess one.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from async_executor import PipelineStats, pipeline_config, pipeline_stats
from async_executor.tiny_llama import build_tiny_llama, corpus_prompts  # noqa: F401 (re-exported to the tests)

# Engine settings shared by the baseline and ours.
ENGINE_DEFAULTS: dict[str, Any] = dict(
    dtype="float32",
    max_model_len=512,
    seed=0,
    enforce_eager=True,
    kv_cache_memory_bytes=64 << 20,
    disable_log_stats=False,
)

# vLLM's own consistency test compares logprobs with these tolerances: the
# batch around a request differs between the paths (the extra token of a
# finished request), which changes float reduction order.
LOGPROB_REL_TOL = 1e-3
LOGPROB_ABS_TOL = 1e-6


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = os.environ.get("ASYNC_EXECUTOR_TEST_MODEL_DIR")
    path = Path(cache) if cache else tmp_path_factory.mktemp("tiny-llama")
    return str(build_tiny_llama(path))


@contextlib.contextmanager
def engine(
    model: str, *, ours: bool, settings: dict[str, Any] | None = None, **kwargs: Any
) -> Iterator[Any]:
    """An `LLM`: vLLM's synchronous baseline, or ours with `settings`."""
    from vllm import LLM

    args = {**ENGINE_DEFAULTS, **kwargs}
    if ours:
        args["distributed_executor_backend"] = "async_executor"
        args["additional_config"] = pipeline_config(**deterministic_windows(settings or {}))
    else:
        assert not settings
        args["async_scheduling"] = False
    llm = LLM(model, **args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def deterministic_windows(settings: dict[str, Any]) -> dict[str, Any]:
    """Window settings whose windows do not depend on the machine's speed.

    The latency bounds size windows from the measured time of a device step,
    which on a shared CI machine varies from run to run; tests of anything but
    those bounds turn them off, so that the window a test asks for is the
    window it gets."""
    if settings.get("decode_window", 1) <= 1:
        return settings
    return {"max_token_gap_ms": 0, "max_admission_delay_ms": 0, **settings}


def generate(llm: Any, prompts: list[Any], params: Any) -> list[Any]:
    return llm.generate(prompts, params, use_tqdm=False)


def completions(outputs: list[Any]) -> list[list[Any]]:
    """Per request, per completion: (token_ids, text, finish_reason, logprobs)."""
    return [
        [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs
    ]


def _logprobs_equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for pa, pb in zip(a, b, strict=True):
        if pa.keys() != pb.keys():
            return False
        for token, la in pa.items():
            lb = pb[token]
            if la.rank != lb.rank or la.decoded_token != lb.decoded_token:
                return False
            tol = max(LOGPROB_REL_TOL * abs(lb.logprob), LOGPROB_ABS_TOL)
            if abs(la.logprob - lb.logprob) > tol:
                return False
    return True


def assert_same_outputs(baseline: list[Any], ours: list[Any], what: str = "") -> None:
    """Token for token: ids, text, finish reason; logprobs within vLLM's
    own test tolerance (same top-k ids, ranks and decoded tokens)."""
    base, mine = completions(baseline), completions(ours)
    assert len(base) == len(mine), what
    for i, (b, m) in enumerate(zip(base, mine, strict=True)):
        assert len(b) == len(m), f"{what} request {i}: {len(b)} vs {len(m)} completions"
        for j, (cb, cm) in enumerate(zip(b, m, strict=True)):
            where = f"{what} request {i} completion {j}"
            assert list(cm[0]) == list(cb[0]), (
                f"{where}: tokens differ\n base {list(cb[0])}\n ours {list(cm[0])}"
            )
            assert cm[1] == cb[1], f"{where}: text differs"
            assert cm[2] == cb[2], f"{where}: finish reason {cm[2]} != {cb[2]}"
            assert _logprobs_equal(cm[3], cb[3]), f"{where}: logprobs differ"


def stats(llm: Any) -> PipelineStats:
    return pipeline_stats(llm)


def assert_overlapped(s: PipelineStats, *, windows: bool = False) -> None:
    """Our executor ran, launched batches ahead of their predecessor's
    result, and reconciled carry-over tokens: a silent fallback to the stock
    path leaves these at zero."""
    assert s.batches_launched > 0, s
    assert s.launched_before_predecessor_resolved > 0, s
    assert s.carry_over_tokens > 0, s
    assert s.max_in_flight >= 2, s
    if windows:
        assert s.windowed_batches > 0, s
        assert s.device_steps > s.batches_launched, s


def metric(llm: Any, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def make_scheduled(windows: dict[str, int], *, finished: set[str] | None = None,
                   new_blocks: bool = False) -> Any:  # fmt: skip
    """A SchedulerOutput of running requests in a decode window (request ->
    window length, all equal), as our scheduler hands it to the executor."""
    from vllm.v1.core.sched.output import CachedRequestData

    from async_executor.vllm_glue.window_steps import WindowedSchedulerOutput

    ids = list(windows)
    (window,) = set(windows.values()) or {1}
    return WindowedSchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData(
            req_ids=ids,
            resumed_req_ids=set(),
            new_token_ids=[],
            all_token_ids={},
            new_block_ids=[([7],) if new_blocks else None for _ in ids],
            num_computed_tokens=[10 * (i + 1) for i in range(len(ids))],
            num_output_tokens=[i + 1 for i in range(len(ids))],
        ),
        num_scheduled_tokens=dict(windows),
        total_num_scheduled_tokens=sum(windows.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(finished or ()),
        free_encoder_mm_hashes=[],
        window=window,
    )
