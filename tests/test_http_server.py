"""`vllm serve --executor async_executor` against bad input: every bad
request is a 4xx with a JSON error naming the problem, exactly as vLLM's own
front end answers it, and the server keeps serving the same answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.serve_util import Server, counters, post, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MAX_MODEL_LEN = 256
DECODE_WINDOW = 4
DEPTH = 2  # the default pipeline depth
# The tiny tokenizer has no chat template; this one joins the messages.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
TOO_LONG_TEXT = " ".join(["the"] * (MAX_MODEL_LEN + 20))
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("http-server")
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    with vllm_server(
        tiny_model,
        tmp / "serve.log",
        pipeline={"decode_window": DECODE_WINDOW},
        max_model_len=MAX_MODEL_LEN,
        extra_args=["--chat-template", str(template)],
    ) as s:
        yield s


# --- the table of bad requests ---------------------------------------------


@dataclass(frozen=True)
class Bad:
    endpoint: str
    body: dict[str, Any] | str  # a str is sent as it is (malformed JSON)
    status: int
    message: str  # a fragment of vLLM's error message

    def payload(self, model: str) -> bytes:
        if isinstance(self.body, str):
            return self.body.replace("MODEL", model).encode()
        return json.dumps({"model": model, **self.body}).encode()


def _completion(status: int, message: str, **body: Any) -> Bad:
    return Bad(COMPLETIONS, {"prompt": "the quick", "max_tokens": 4, **body}, status, message)


def _chat(status: int, message: str, **body: Any) -> Bad:
    messages = [{"role": "user", "content": "the quick"}]
    return Bad(CHAT, {"messages": messages, "max_tokens": 4, **body}, status, message)


BAD = {
    # Malformed JSON and wrong types: FastAPI's validation, a 400.
    "completion-malformed-json": Bad(
        COMPLETIONS, '{"model": "MODEL", "prompt": "the", "max_tokens": 4', 400, "JSON decode error"
    ),
    "chat-malformed-json": Bad(CHAT, '{"model": "MODEL", "messages": [', 400, "JSON decode error"),
    "completion-prompt-is-a-number": _completion(
        400, "'loc': 'body.prompt', 'msg': 'Input should be a valid string'", prompt=123
    ),
    "completion-max-tokens-is-a-word": _completion(
        400, "'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer", max_tokens="four"
    ),
    "chat-messages-is-a-string": _chat(
        400, "'loc': 'body.messages', 'msg': 'Input should be a valid list'", messages="the quick"
    ),
    "chat-content-is-a-number": _chat(
        400, "Input should be a valid string", messages=[{"role": "user", "content": 5}]
    ),
    "chat-max-tokens-is-a-word": _chat(400, "Input should be a valid integer", max_tokens="x"),
    # Token ids outside the vocabulary (97 words).
    "completion-id-outside-vocab": _completion(
        400, "Token id 10000 is out of vocabulary", prompt=[1, 5, 10_000]
    ),
    "completion-negative-id": _completion(
        400,
        "'loc': 'body.prompt.1', 'msg': 'Input should be greater than or equal to 0'",
        prompt=[1, -3],
    ),
    "completion-batch-with-one-id-outside-vocab": _completion(
        400, "Token id 100000 is out of vocabulary", prompt=[[1, 2], [3, 100_000]]
    ),
    "completion-logit-bias-outside-vocab": _completion(
        400,
        "token_id(s) [100000] in logit_bias contain out-of-vocab token ids",
        logit_bias={"100000": 5},
    ),
    # Empty prompts.
    "completion-empty-text": _completion(
        400, "Either prompt or prompt_embeds must be provided and non-empty", prompt=""
    ),
    "completion-empty-list": _completion(400, "You must pass at least one prompt", prompt=[]),
    "chat-no-messages": _chat(
        400, "Cannot apply chat template to an empty conversation", messages=[]
    ),
    "chat-empty-content": _chat(
        400, "The decoder prompt cannot be empty", messages=[{"role": "user", "content": ""}]
    ),
    # Longer than the context.
    "completion-text-longer-than-context": _completion(
        400, f"maximum context length is {MAX_MODEL_LEN} tokens", prompt=TOO_LONG_TEXT
    ),
    "completion-ids-longer-than-context": _completion(
        400, "your prompt contains 300 input tokens", prompt=[5] * 300
    ),
    "completion-batch-with-one-too-long": _completion(
        400, f"maximum context length is {MAX_MODEL_LEN} tokens", prompt=["the", TOO_LONG_TEXT]
    ),
    "chat-longer-than-context": _chat(
        400,
        f"maximum context length is {MAX_MODEL_LEN} tokens",
        messages=[{"role": "user", "content": TOO_LONG_TEXT}],
    ),
    # max_tokens < 1, or more than the context.
    "completion-max-tokens-0": _completion(
        400, "max_tokens must be at least 1, got 0", max_tokens=0
    ),
    "completion-max-tokens-negative": _completion(
        400, "max_tokens must be at least 1, got -1", max_tokens=-1
    ),
    "completion-max-tokens-0-streamed": _completion(
        400, "max_tokens must be at least 1, got 0", max_tokens=0, stream=True
    ),
    "completion-max-tokens-over-context": _completion(
        400, f"max_tokens=300 cannot be greater than max_model_len={MAX_MODEL_LEN}", max_tokens=300
    ),
    "completion-min-tokens-over-max-tokens": _completion(
        400, "min_tokens must be less than or equal to max_tokens=4, got 10", min_tokens=10
    ),
    "chat-max-tokens-0": _chat(400, "max_tokens must be at least 1, got 0", max_tokens=0),
    "chat-max-completion-tokens-negative": _chat(
        400, "max_tokens must be at least 1, got -1", max_completion_tokens=-1, max_tokens=None
    ),
    # Absurd n.
    "completion-n-huge": _completion(400, "n must be at most 16384, got 100000", n=100_000),
    "completion-n-0": _completion(400, "n must be at least 1, got 0", n=0),
    "completion-n-greedy": _completion(
        400, "n must be 1 when using greedy sampling, got 64", n=64, temperature=0
    ),
    "chat-n-huge": _chat(400, "n must be at most 16384, got 100000", n=100_000),
    "chat-n-0-streamed": _chat(400, "n must be at least 1, got 0", n=0, stream=True),
    # Bad logprobs.
    "completion-logprobs-huge": _completion(
        400,
        "Requested sample logprobs of 100000, which is greater than max allowed: 20",
        logprobs=100_000,
    ),
    "completion-logprobs-is-a-word": _completion(
        400, "`logprobs` must be an integer", logprobs="many"
    ),
    "completion-prompt-logprobs-huge": _completion(
        400,
        "Requested prompt logprobs of 100, which is greater than max allowed: 20",
        prompt_logprobs=100,
    ),
    "chat-top-logprobs-huge": _chat(
        400,
        "Requested sample logprobs of 100, which is greater than max allowed: 20",
        logprobs=True,
        top_logprobs=100,
    ),
    "chat-top-logprobs-without-logprobs": _chat(
        400, "when using `top_logprobs`, `logprobs` must be set to true", top_logprobs=3
    ),
    # Other sampling parameters out of range.
    "completion-temperature-negative": _completion(
        400, "temperature must be non-negative, got -1.0", temperature=-1
    ),
    "completion-empty-stop-string": _completion(
        400, "stop cannot contain an empty string", stop=[""]
    ),
    "completion-bad-regex": _completion(400, "Grammar error", structured_outputs={"regex": "(("}),
    # An unknown model: 404.
    "completion-unknown-model": Bad(
        COMPLETIONS,
        {"model": "nope", "prompt": "the", "max_tokens": 4},
        404,
        "The model `nope` does not exist",
    ),
    "chat-unknown-model": Bad(
        CHAT,
        {"model": "nope", "messages": [{"role": "user", "content": "the"}]},
        404,
        "The model `nope` does not exist",
    ),
}

GOOD = {
    COMPLETIONS: {"prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0},
    CHAT: {
        "messages": [{"role": "user", "content": "the quick brown fox"}],
        "max_tokens": 12,
        "temperature": 0,
    },
}


def _send(server: Server, endpoint: str, payload: bytes) -> tuple[int, Any]:
    return post(server.base + endpoint, payload)


def _good_text(server: Server, endpoint: str) -> str:
    status, body = post(server.base + endpoint, {"model": server.model, **GOOD[endpoint]})
    assert status == 200, body
    choice = body["choices"][0]
    return str(choice["text"] if endpoint == COMPLETIONS else choice["message"]["content"])


@pytest.fixture(scope="module")
def good_answers(server: Server) -> dict[str, str]:
    """The server's answers to the good requests before any bad one."""
    return {endpoint: _good_text(server, endpoint) for endpoint in GOOD}


def assert_names_the_problem(bad: Bad, status: int, body: Any) -> None:
    assert status == bad.status, f"expected {bad.status}, got {status}: {body}"
    error = body["error"]
    assert error["code"] == bad.status, body
    assert bad.message in error["message"], f"{bad.message!r} not in {error['message']!r}"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_4xx_naming_the_problem(
    server: Server, good_answers: dict[str, str], case: str
) -> None:
    bad = BAD[case]
    before = counters(server)
    status, body = _send(server, bad.endpoint, bad.payload(server.model))
    assert_names_the_problem(bad, status, body)
    # The server keeps serving, through our executor, the same answer.
    assert server.alive(), server.log_tail()
    assert _good_text(server, bad.endpoint) == good_answers[bad.endpoint]
    after = counters(server)
    assert after.batches_launched > before.batches_launched, (before, after)


@pytest.mark.timeout(600)
def test_bad_requests_while_a_stream_is_in_flight(
    server: Server, good_answers: dict[str, str]
) -> None:
    """Every bad request at once, while a long greedy stream has batches in
    flight: each is rejected as alone, the stream is unharmed."""
    body = {"model": server.model, "prompt": "the quick brown fox", "temperature": 0,
            "max_tokens": 200, "return_token_ids": True}  # fmt: skip
    status, whole = post(server.base + COMPLETIONS, body)
    assert status == 200, whole
    expected_ids = whole["choices"][0]["token_ids"]

    async def run() -> tuple[list[int], list[tuple[int, Any]]]:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            stream = await session.post(server.base + COMPLETIONS, json={**body, "stream": True})
            assert stream.status == 200
            ids: list[int] = []
            first = await stream.content.readline()  # the stream has started
            assert first.startswith(b"data: "), first
            ids += json.loads(first[6:])["choices"][0]["token_ids"]

            async def one(bad: Bad) -> tuple[int, Any]:
                async with session.post(
                    server.base + bad.endpoint,
                    data=bad.payload(server.model),
                    headers={"Content-Type": "application/json"},
                ) as r:
                    return r.status, await r.json(content_type=None)

            answers = await asyncio.gather(*(one(bad) for bad in BAD.values()))
            async for line in stream.content:
                if line.startswith(b"data: {"):
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
            return ids, answers

    ids, answers = asyncio.run(run())
    for bad, (status, answer) in zip(BAD.values(), answers, strict=True):
        assert_names_the_problem(bad, status, answer)
    assert ids == expected_ids
    assert server.alive(), server.log_tail()
    assert _good_text(server, COMPLETIONS) == good_answers[COMPLETIONS]
