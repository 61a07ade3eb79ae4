"""The consistency matrix of vLLM's own async-scheduling test
(tests/v1/e2e/test_async_scheduling.py), run against our executor.

preemption (forced by a small KV cache) x chunked prefill x sampling params,
each compared token for token with vLLM's synchronous path on the same
config, with the pipeline at its defaults, with decode windows, and deeper.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from tests.conftest import (
    assert_pipelined,
    assert_same_outputs,
    corpus_prompts,
    engine,
    generate,
    metric,
    stats,
)

pytestmark = pytest.mark.e2e

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}
_SO = StructuredOutputsParams(json=SCHEMA)

DEFAULT_PARAMS: dict[str, Any] = dict(temperature=0.0, max_tokens=30)
SAMPLING_PARAMS: list[dict[str, Any]] = [
    {},
    dict(presence_penalty=-1.0),
    dict(bad_words=["the", "a"]),
    dict(logprobs=2),
    dict(logprobs=2, presence_penalty=-1.0),
    dict(min_tokens=25),
    dict(structured_outputs=_SO),
    dict(structured_outputs=_SO, logprobs=2),
    dict(structured_outputs=_SO, presence_penalty=-1.0),
    dict(structured_outputs=_SO, logprobs=2, presence_penalty=-1.0),
]
PROMPTS = corpus_prompts(34)

# (force preemption, chunked prefill)
CONFIGS = [(False, False), (True, False), (False, True), (True, True)]


def _engine_args(preemption: bool, chunked: bool) -> dict[str, Any]:
    args: dict[str, Any] = dict(enable_chunked_prefill=chunked)
    if chunked:
        args["max_num_batched_tokens"] = 48
    if preemption:
        # CPU attention wants blocks of a multiple of 32 tokens; 24 blocks
        # hold about a third of the batch's KV, so requests get preempted.
        args["block_size"] = 32
        args["num_gpu_blocks_override"] = 24
    return args


def _run_all(llm: Any) -> list[list[Any]]:
    return [
        generate(llm, PROMPTS, SamplingParams(**DEFAULT_PARAMS, **extra))
        for extra in SAMPLING_PARAMS
    ]


_BASELINES: dict[tuple[bool, bool], list[list[Any]]] = {}


def _baseline(model: str, preemption: bool, chunked: bool) -> list[list[Any]]:
    key = (preemption, chunked)
    if key not in _BASELINES:
        with engine(model, ours=False, **_engine_args(*key)) as llm:
            results = _run_all(llm)
            if preemption:
                assert metric(llm, "vllm:num_preemptions") > 0, "no preemption forced"

        # The params must matter: each set changes the plain run's outputs.
        def seen(result: list[Any]) -> list[Any]:
            return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in result]

        for extra, result in zip(SAMPLING_PARAMS[1:], results[1:], strict=True):
            assert seen(result) != seen(results[0]), extra
        _BASELINES[key] = results
    return _BASELINES[key]


PIPELINES = [
    # Defaults: on CPU the device stage is a worker process.
    pytest.param({}, id="default"),
    pytest.param({"decode_window": 4}, id="window4"),
    # A device-stage thread in the engine process: shares buffers with the
    # engine thread (the structured-output bitmask hazard).
    pytest.param({"decode_window": 4, "stage": "thread"}, id="thread-window4"),
]


@pytest.mark.parametrize("preemption,chunked", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("settings", PIPELINES)
def test_matches_sync_path(
    tiny_model: str, preemption: bool, chunked: bool, settings: dict[str, Any]
) -> None:
    baseline = _baseline(tiny_model, preemption, chunked)
    with engine(
        tiny_model, ours=True, settings=settings, **_engine_args(preemption, chunked)
    ) as llm:
        results = _run_all(llm)
        s = stats(llm)
        if preemption:
            assert metric(llm, "vllm:num_preemptions") > 0, "no preemption forced"
    for extra, base, mine in zip(SAMPLING_PARAMS, baseline, results, strict=True):
        assert_same_outputs(base, mine, what=f"params={extra}")
    assert_pipelined(s, windows=settings.get("decode_window", 1) > 1)


def test_deeper_pipeline_matches_sync_path(tiny_model: str) -> None:
    baseline = _baseline(tiny_model, True, True)
    settings = {"depth": 3, "decode_window": 3}
    with engine(tiny_model, ours=True, settings=settings, **_engine_args(True, True)) as llm:
        assert llm.llm_engine.vllm_config.max_concurrent_batches == 3
        results = _run_all(llm)
        s = stats(llm)
    for extra, base, mine in zip(SAMPLING_PARAMS, baseline, results, strict=True):
        assert_same_outputs(base, mine, what=f"params={extra}")
    assert_pipelined(s, windows=True)
    assert s.max_in_flight == 3, s
