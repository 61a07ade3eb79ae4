"""One `vllm serve` of the serving benchmark: its flags for a system, start
on a free loopback port, wait until it answers, read our pipeline's
counters, stop it with its whole process group."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .systems import System

# `python -m` of vLLM's CLI rather than the `vllm` console script: the same
# interpreter as ours, whether or not the script is installed.
VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class ServerError(RuntimeError):
    """The server did not start, or died."""


def serve_flags(system: System) -> list[str]:
    """`vllm serve` flags of a system's engine arguments (benchmarks/systems.py)."""
    if system.kind != "vllm":
        raise ServerError(f"{system.name} is not served by `vllm serve`")
    flags: list[str] = []
    for key, value in system.engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key == "distributed_executor_backend" and value == "async_executor":
            flag = "--executor"  # the plugin's own flag, as users write it
        if value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def read_pipeline_stats(base_url: str) -> dict[str, Any]:
    """Our executor's counters (README "Counters"), summed over workers:
    `POST /collective_rpc {"method": "async_executor_stats"}`, which a server
    answers when started with VLLM_SERVER_DEV_MODE=1."""
    from async_executor import PipelineStats

    body = _request(base_url + "/collective_rpc", {"method": "async_executor_stats"})
    stats = PipelineStats()
    for result in body["results"]:
        stats = stats.merged(PipelineStats(**result))
    return stats.as_dict()


@dataclass
class Server:
    base_url: str
    # A name of this start only: a server found on the port under another
    # name is not ours (another process took the port first).
    served_name: str
    argv: list[str]
    log: Path
    start_s: float
    proc: subprocess.Popen[bytes]
    launched: float = 0.0  # time.monotonic() at spawn

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM to the process group (API server, engine core, workers), then
    SIGKILL to whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # The leader may be gone while its children are not.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Until the last of them is gone: the next server needs the device memory.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def launch_server(model: str, flags: list[str], log: Path,
                  env: dict[str, str] | None = None) -> Server:  # fmt: skip
    """Spawn `vllm serve` in its own process group; not yet ready (see
    `wait_ready`), and the caller stops it (`stop_group`)."""
    port = free_port()
    name = f"bench-serve-{uuid.uuid4().hex[:8]}"
    argv = [*VLLM_CLI, "serve", model, "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), *flags]  # fmt: skip
    full_env = {
        **os.environ,
        "VLLM_SERVER_DEV_MODE": "1",  # /collective_rpc, for our counters
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # a server's engine in its own process
        "VLLM_LOGGING_LEVEL": "INFO",  # the log names the attention backend
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    started = time.monotonic()
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)  # fmt: skip
    return Server(f"http://127.0.0.1:{port}", name, argv, log, 0.0, proc, started)


@contextlib.contextmanager
def running_server(model: str, flags: list[str], log: Path, timeout_s: float) -> Iterator[Server]:
    server = launch_server(model, flags, log)
    try:
        wait_ready(server, server.launched + timeout_s)
        yield server
    finally:
        stop_group(server.proc)


@contextlib.contextmanager
def running_servers(
    specs: list[tuple[str, list[str], Path, dict[str, str]]], timeout_s: float
) -> Iterator[list[Server | ServerError]]:
    """Several servers started at once (model, flags, log, extra environment
    each): per spec the ready server or why it is not. All are stopped on
    exit, also on an error or Ctrl-C."""
    servers: list[Server] = []
    try:
        for model, flags, log, env in specs:
            servers.append(launch_server(model, flags, log, env))
        deadline = time.monotonic() + timeout_s
        ready: list[Server | ServerError] = []
        for server in servers:
            try:
                wait_ready(server, deadline)
                ready.append(server)
            except ServerError as e:
                stop_group(server.proc)  # its memory, for the others
                ready.append(e)
        yield ready
    finally:
        for server in servers:
            stop_group(server.proc)


def wait_ready(server: Server, deadline: float) -> None:
    """Until the server answers as itself; ServerError if it exits or the
    deadline (time.monotonic) passes. Sets its start_s."""
    while True:
        if not server.alive():
            raise ServerError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=5) as r:
                healthy = r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            healthy = False
        if healthy:
            try:
                models = [m["id"] for m in _request(server.base_url + "/v1/models")["data"]]
            except (OSError, ValueError, KeyError) as e:  # URLError is an OSError
                raise ServerError(f"{server.base_url}/v1/models: {e!r}") from e
            if server.served_name not in models:
                raise ServerError(f"{server.base_url} answers for {models}: not our server")
            server.start_s = time.monotonic() - server.launched
            return
        if time.monotonic() > deadline:
            raise ServerError(f"server not ready in time (--start-timeout):\n{server.log_tail()}")
        time.sleep(1)


_VERSION = re.compile(r"Initializing a V1 LLM engine \(v([^)]+)\)")
_BACKEND = re.compile(r"Using (?:AttentionBackendEnum\.)?(\w+) (?:attention )?backend")


def log_facts(log: Path) -> dict[str, Any]:
    """What the server's log says it ran: vLLM's version, the attention
    backend (None where the platform does not log it, as on CPU)."""
    text = log.read_text(errors="replace")
    version, backend = _VERSION.search(text), _BACKEND.search(text)
    return {
        "vllm_version": version.group(1) if version else None,
        "attention_backend_used": backend.group(1) if backend else None,
    }


def machine_name(device: str) -> str:
    if device == "cuda" and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"{device} x{os.cpu_count()}"
