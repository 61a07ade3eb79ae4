"""`vllm serve` as a subprocess on the loopback, for the HTTP tests."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from async_executor import PipelineStats

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
