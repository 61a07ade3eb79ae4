"""Every way a user selects the executor, through vLLM's own entry points."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from vllm import SamplingParams

from async_executor import PipelineStats
from async_executor.vllm_glue.executor import AsyncExecutor, AsyncMultiprocExecutor
from tests.conftest import (
    ENGINE_DEFAULTS,
    corpus_prompts,
    deterministic_windows,
    engine,
    generate,
    stats,
)
from tests.serve_util import post, vllm_server

PROMPTS = corpus_prompts(8)
PARAMS = SamplingParams(temperature=0.0, max_tokens=16)


def _executor_of(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.model_executor


@pytest.mark.e2e
@pytest.mark.parametrize(
    "backend,expected",
    [
        # The short name picks the device stage: on CPU a worker process.
        pytest.param("async_executor", AsyncMultiprocExecutor, id="short-name"),
        pytest.param(
            "async_executor.vllm_glue.executor.AsyncExecutor", AsyncExecutor, id="qualname"
        ),
        pytest.param(AsyncExecutor, AsyncExecutor, id="class"),
        pytest.param(AsyncMultiprocExecutor, AsyncMultiprocExecutor, id="class-multiproc"),
    ],
)
def test_llm_selects_our_executor(tiny_model: str, backend: Any, expected: type) -> None:
    from vllm import LLM

    llm = LLM(tiny_model, distributed_executor_backend=backend, **ENGINE_DEFAULTS)
    try:
        assert type(_executor_of(llm)) is expected
        generate(llm, PROMPTS, PARAMS)
        s = stats(llm)
        assert s.batches_launched > 0 and s.launched_before_predecessor_resolved > 0, s
        # vLLM's CPU platform forces async scheduling off; ours turns it on.
        assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is True
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.e2e
def test_unknown_executor_name_lists_valid_ones(tiny_model: str) -> None:
    from vllm import LLM

    with pytest.raises(ValueError) as err:
        LLM(tiny_model, distributed_executor_backend="asyncexecutor", **ENGINE_DEFAULTS)
    message = str(err.value)
    assert "unknown executor 'asyncexecutor'" in message
    for name in ("mp", "uni", "ray", "external_launcher", "async_executor"):
        assert name in message


def _serve_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("flag", ["--executor", "--distributed-executor-backend"])
def test_serve_flags_select_our_executor(tiny_model: str, flag: str) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.executor.abstract import Executor

    args = _serve_parser().parse_args(
        ["--model", tiny_model, flag, "async_executor", "--dtype", "float32"]
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.distributed_executor_backend == "async_executor"
    config = engine_args.create_engine_config()
    assert Executor.get_class(config) is AsyncMultiprocExecutor  # CPU: worker process


def test_serve_rejects_unknown_executor(tiny_model: str) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _serve_parser().parse_args(["--model", tiny_model, "--executor", "nope"])
    with pytest.raises(ValueError, match="unknown executor 'nope'; valid executors: mp, uni"):
        AsyncEngineArgs.from_cli_args(args).create_engine_config()


def test_executor_flag_is_in_serve_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "--help=all"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "--executor NAME" in out.stdout, out.stderr[-2000:]


def _stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        url,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        lines = resp.read().decode().splitlines()
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(event)["choices"][0] for event in events[:-1]]


def _check_streaming(base: str, model: str, prompt: str) -> None:
    """A streamed greedy completion delivers the same tokens as the
    non-streamed one, completely, in order, and in more than one chunk.

    Each chunk's `logprobs.tokens` lists the tokens it carries, so the stream
    is checked token by token. Invariants: the chunks' tokens, concatenated,
    are the non-streamed completion's tokens (a lost, repeated or reordered
    token of a window fails this, as a truncated stream does), and so are
    the texts; every chunk but the final one carries at least one token (not
    always text: a special token decodes to none), so 2 <= chunks <= tokens.

    Not invariants: a chunk per window of 4 tokens, or at most 4 tokens a
    chunk: vLLM's API server merges the outputs its stream has not taken yet
    (seen here even without windows), so a busy machine gets fewer, larger
    chunks. The windows are proved by the counters instead. A single chunk
    would take the server stalled for the whole completion, 128 tokens in
    over 30 windows: that is a server that does not stream."""
    body = {"model": model, "prompt": prompt, "max_tokens": 128, "temperature": 0,
            "ignore_eos": True, "logprobs": 1}  # fmt: skip
    status, whole = post(base + "/v1/completions", body)
    assert status == 200, whole
    tokens = whole["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == whole["usage"]["completion_tokens"] == 128, whole["usage"]

    chunks = _stream(base + "/v1/completions", body)
    per_chunk = [(c["logprobs"] or {}).get("tokens") or [] for c in chunks]
    assert [t for chunk in per_chunk for t in chunk] == tokens, per_chunk
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(per_chunk[:-1]), per_chunk
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1), chunks
    assert chunks[-1]["finish_reason"] == "length", chunks[-1]
    assert 2 <= len(chunks) <= len(tokens), per_chunk


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_vllm_serve_with_executor_flag(tiny_model: str, tmp_path: Path) -> None:
    """The `vllm` console script starts a server on our executor (default
    multiprocess engine) with decode windows of 4, answers exactly like the
    synchronous path, streams, turns a bad request into a 400 and keeps
    serving; its counters show the windows."""
    with engine(tiny_model, ours=False, max_model_len=256) as llm:
        expected = [o.outputs[0].text for o in generate(llm, PROMPTS, PARAMS)]
        # A stop string from the middle of an unstopped greedy completion, so
        # that the streamed request stops inside a window.
        long = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        (full,) = generate(llm, [PROMPTS[2]], long)
        words = full.outputs[0].text.split()
        stop = " " + words[len(words) // 2]
        stop_params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop])
        (stopped,) = generate(llm, [PROMPTS[2]], stop_params)
        assert stopped.outputs[0].finish_reason == "stop", stopped.outputs[0]

    pipeline = deterministic_windows({"decode_window": 4})
    with vllm_server(tiny_model, tmp_path / "serve.log", pipeline=pipeline) as server:
        base = server.base
        got = []
        for prompt in PROMPTS:
            status, body = post(
                base + "/v1/completions",
                {
                    "model": tiny_model,
                    "prompt": prompt,
                    "max_tokens": 16,
                    "temperature": 0,
                },
            )
            assert status == 200, body
            got.append(body["choices"][0]["text"])
        assert got == expected

        status, body = post(
            base + "/v1/completions",
            {"model": tiny_model, "prompt": [1, 5, 10_000], "max_tokens": 4},
        )
        assert status == 400 and "out of vocabulary" in json.dumps(body), body
        status, body = post(
            base + "/v1/completions",
            {
                "model": tiny_model,
                "prompt": PROMPTS[0],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
        assert status == 200 and body["choices"][0]["text"] == expected[0], body

        _check_streaming(base, tiny_model, PROMPTS[1])

        # A stop string cuts a stream where vLLM's synchronous path cuts it.
        body = {"model": tiny_model, "prompt": PROMPTS[2], "max_tokens": 48,
                "temperature": 0, "ignore_eos": True, "stop": [stop]}  # fmt: skip
        chunks = _stream(base + "/v1/completions", body)
        assert "".join(c["text"] for c in chunks) == stopped.outputs[0].text, chunks
        assert chunks[-1]["finish_reason"] == "stop", chunks[-1]

        status, body = post(base + "/collective_rpc", {"method": "async_executor_stats"})
        assert status == 200, body
        counters = PipelineStats(**body["results"][0])
        assert counters.batches_launched > 0, counters
        assert counters.launched_before_predecessor_resolved > 0, counters
        assert counters.carry_over_tokens > 0, counters
        # The served run opened decode windows of the configured size.
        assert counters.windowed_batches > 0, counters
        assert counters.window_sizes.get(4, 0) > 0, counters


@pytest.mark.e2e
def test_in_process_executor_refuses_the_process_stage(tiny_model: str) -> None:
    from vllm import LLM

    with pytest.raises(Exception, match="stage='process' runs the worker in its own process"):
        LLM(
            tiny_model,
            distributed_executor_backend=AsyncExecutor,
            additional_config={"async_executor": {"stage": "process"}},
            **ENGINE_DEFAULTS,
        )
