"""`vllm serve` as a subprocess on the loopback, for the HTTP tests: the
server, a completions request as a client sends it (streamed or not), and
vLLM's synchronous path to compare its answers with."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from vllm import SamplingParams

from async_executor import PipelineStats
from tests.conftest import engine

# The engine flags of tests/conftest.py's ENGINE_DEFAULTS, as `vllm serve`
# arguments, so that a server answers like `engine(...)` in-process.
SERVE_ENGINE_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--seed", "0",
    "--kv-cache-memory-bytes", str(64 << 20),
]  # fmt: skip


@dataclass(frozen=True)
class Server:
    base: str
    model: str
    log: Path
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any] | bytes, timeout: float = 120) -> tuple[int, Any]:
    """POST JSON (or raw bytes); the status and the decoded JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


@contextlib.contextmanager
def vllm_server(
    model: str,
    log: Path,
    *,
    executor: str | None = "async_executor",
    pipeline: dict[str, Any] | None = None,
    max_model_len: int = 256,
    extra_args: list[str] | None = None,
    startup_timeout: float = 300,
    env_changes: dict[str, str | None] | None = None,
) -> Iterator[Server]:
    """Start the `vllm` console script on 127.0.0.1 (multiprocess engine,
    dev mode for `/collective_rpc`), wait until `/health` answers, stop it
    on exit. `executor=None` is vLLM's default executor; `env_changes` sets
    (or, with None, removes) environment variables of the server."""
    vllm_script = Path(sys.executable).parent / "vllm"
    assert vllm_script.exists(), "the vllm console script is not installed"
    port = free_port()
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_SERVER_DEV_MODE": "1",  # exposes /collective_rpc for the counters
    }
    for key, value in (env_changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    args = [str(vllm_script), "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(max_model_len), *SERVE_ENGINE_ARGS]  # fmt: skip
    if executor is not None:
        args += ["--executor", executor]
    if pipeline is not None:
        args += ["--additional-config", json.dumps({"async_executor": pipeline})]
    args += extra_args or []
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", model, log, proc)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                assert proc.poll() is None, server.log_tail()
                try:
                    with urllib.request.urlopen(server.base + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass
                assert time.monotonic() < deadline, "server did not start\n" + server.log_tail()
                time.sleep(1)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def counters(server: Server) -> PipelineStats:
    """The pipeline's counters, through vLLM's dev-mode RPC endpoint."""
    status, body = post(server.base + "/collective_rpc", {"method": "async_executor_stats"})
    assert status == 200, body
    (result,) = body["results"]
    return PipelineStats(**result)


def metrics(server: Server) -> dict[str, float]:
    """vLLM's Prometheus samples by name, the values of all labels summed;
    a counter of finished requests also by reason, as `name[reason]`."""
    out: dict[str, float] = {}
    for line in get_text(server.base + "/metrics").splitlines():
        if line.startswith("vllm:"):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            keys = [name]
            if reason := re.search(r'finished_reason="(\w+)"', name_labels):
                keys.append(f"{name}[{reason.group(1)}]")
            for key in keys:
                out[key] = out.get(key, 0.0) + float(value)
    return out


@dataclass(frozen=True)
class Job:
    """One `/v1/completions` request, greedy."""

    prompt: str | tuple[int, ...]  # text, or token ids (sent as they are)
    max_tokens: int
    stream: bool
    drop_after_chunks: int = 0  # 0: read to the end

    def body(self, model: str) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "return_token_ids": True}  # fmt: skip
        if self.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body


@dataclass
class Result:
    status: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    chunks: int = 0
    usage_tokens: int | None = None
    dropped: bool = False  # the client went away before the end
    done_marker: bool = False


async def run_job(session: aiohttp.ClientSession, url: str, model: str, job: Job) -> Result:
    """Send `job` and read its answer: the whole body, or the stream chunk by
    chunk (a chunk after the finish fails), going away after
    `drop_after_chunks` chunks if the job says so."""
    result = Result()
    async with session.post(url, json=job.body(model)) as resp:
        result.status = resp.status
        if resp.status != 200 or not job.stream:
            body = await resp.json(content_type=None)
            if resp.status == 200:
                choice = body["choices"][0]
                result.token_ids, result.text = choice["token_ids"], choice["text"]
                result.finish_reason = choice["finish_reason"]
                result.usage_tokens = body["usage"]["completion_tokens"]
            else:
                result.text = json.dumps(body)
            return result
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                result.done_marker = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                assert result.finish_reason is None, "a chunk after the finish"
                result.chunks += 1
                result.token_ids += choice["token_ids"]
                result.text += choice["text"]
                result.finish_reason = choice["finish_reason"]
            dropping = job.drop_after_chunks and result.chunks >= job.drop_after_chunks
            if dropping and result.finish_reason is None:
                result.dropped = True
                resp.close()  # the connection, not back to the pool
                return result
    return result


def sync_reference(model: str, jobs: list[Job], max_model_len: int) -> dict[tuple[Any, int], Any]:
    """vLLM's synchronous path, in process with the server's engine flags,
    once per distinct (prompt, max_tokens) of `jobs`: its completion output."""
    pairs = sorted({(j.prompt, j.max_tokens) for j in jobs}, key=repr)
    inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p, _ in pairs]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for _, n in pairs]
    with engine(model, ours=False, max_model_len=max_model_len) as llm:
        outputs = llm.generate(inputs, params, use_tqdm=False)
    return {pair: o.outputs[0] for pair, o in zip(pairs, outputs, strict=True)}
