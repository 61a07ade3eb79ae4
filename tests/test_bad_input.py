"""Bad input: a clear error naming the problem, and the engine keeps serving
the other requests with the same outputs as before."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from tests.conftest import assert_same_outputs, corpus_prompts, engine, generate, stats

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MAX_MODEL_LEN = 128
BAD_PROMPTS = [
    pytest.param(
        {"prompt_token_ids": [1, 5, 10_000]},
        "Token id 10000 is out of vocabulary",
        id="id-outside-vocab",
    ),
    pytest.param(
        {"prompt_token_ids": [1, -3]},
        "Token id -3 is out of vocabulary",
        id="negative-id",
    ),
    pytest.param({"prompt_token_ids": []}, "prompt cannot be empty", id="empty-prompt"),
    pytest.param(
        {"prompt_token_ids": [5] * (MAX_MODEL_LEN + 10)},
        f"maximum context length is {MAX_MODEL_LEN}",
        id="longer-than-max-model-len",
    ),
]


@pytest.fixture(scope="module")
def served(tiny_model: str):  # type: ignore[no-untyped-def]
    settings = {"decode_window": 4}
    with engine(tiny_model, ours=True, settings=settings, max_model_len=MAX_MODEL_LEN) as llm:
        yield llm


GOOD = corpus_prompts(6)
PARAMS = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.mark.parametrize("bad,message", BAD_PROMPTS)
def test_bad_prompt_is_rejected_and_others_still_served(served, bad, message) -> None:  # type: ignore[no-untyped-def]
    before = generate(served, GOOD, PARAMS)
    with pytest.raises(VLLMValidationError, match=message):
        served.generate([GOOD[0], bad, GOOD[1]], PARAMS, use_tqdm=False)
    after = generate(served, GOOD, PARAMS)
    assert_same_outputs(before, after)
    assert not served.llm_engine.has_unfinished_requests(), "a request was left hanging"
    s = stats(served)
    assert s.launched_before_predecessor_resolved > 0 and s.windowed_batches > 0, s


def test_prompt_that_exactly_fits_is_served(served) -> None:  # type: ignore[no-untyped-def]
    out = generate(served, [{"prompt_token_ids": [5] * (MAX_MODEL_LEN - 1)}], PARAMS)
    assert len(out[0].outputs[0].token_ids) == 1
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "settings,env,message",
    [
        ({"depth": 1}, {}, "depth must be between 2 and 8, got 1"),
        ({"decode_window": 0}, {}, "decode_window must be between 1 and 64, got 0"),
        ({"stage": "gpu"}, {}, "stage must be 'auto', 'thread', 'inline' or 'process'"),
        ({"dept": 3}, {}, r"unknown async_executor setting\(s\) \['dept'\]; valid settings"),
        # Settings from the environment (what `vllm serve` users set) are
        # checked as strictly, and name the variable.
        ({}, {"ASYNC_EXECUTOR_DEPTH": "two"}, "ASYNC_EXECUTOR_DEPTH='two' is not an integer"),
        (
            {},
            {"ASYNC_EXECUTOR_OVERLAP": "maybe"},
            "ASYNC_EXECUTOR_OVERLAP='maybe' is not a boolean",
        ),
        ("fast", {}, r"additional_config\['async_executor'\] must be a mapping, got str"),
    ],
    ids=["depth", "window", "stage", "unknown-name", "env-int", "env-bool", "not-a-mapping"],
)
def test_bad_pipeline_settings_name_the_problem(
    served, settings, env, message, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Our settings are checked when the engine is built, with an error that
    names the setting; an engine already serving is not disturbed."""
    from vllm import LLM

    before = generate(served, GOOD, PARAMS)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Exception, match=message):
        LLM(
            served.llm_engine.model_config.model,
            dtype="float32",
            max_model_len=128,
            enforce_eager=True,
            kv_cache_memory_bytes=32 << 20,
            distributed_executor_backend="async_executor",
            additional_config={"async_executor": settings},
        )
    monkeypatch.undo()
    assert_same_outputs(before, generate(served, GOOD, PARAMS))
