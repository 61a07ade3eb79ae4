"""Host-side spans of each engine step, for timelines and busy shares.

Off unless the environment variable `ASYNC_EXECUTOR_TRACE` names a
directory in the engine's processes (`1` means `<tmp>/async_executor_trace`);
the plugin entry point then calls `install()` in each vLLM process. It wraps, by delegation and for
every executor alike (vLLM's and ours), the methods that make up a step:

  lane       method
  schedule   Scheduler.schedule
  prepare    model runner execute_model (input preparation + forward launch;
             on CPU the forward itself)
  launch     model runner sample_tokens (sampling launch + device-to-host copy)
  advance    a decode window's steps after the first, advanced on the device
             (their host work: kernel launches, graph replays, sampling)
  resolve    waiting for a step's sampled ids on the host (get_output)
  update     Scheduler.update_from_output
  forward    the model's forward pass (V1 runner; on CPU this is the device
             work, on CUDA only its launch)

Spans are (lane, start_ns, end_ns, thread id) on `time.perf_counter_ns`,
which is CLOCK_MONOTONIC and so comparable across processes. Every traced
process appends its spans to `<dir>/<pid>.jsonl` twice a second (nothing
piles up in memory, and spans of every process are kept, also where no RPC
reaches: vLLM's EngineCore when its worker runs elsewhere);
`read_span_files(dir)` collects them; `flush()` writes this process's now.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_FLAG = "ASYNC_EXECUTOR_TRACE"

_spans: list[tuple[str, int, int, int]] = []
_installed = False
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(ENV_FLAG, "") not in ("", "0")


def _wrap(cls: type, name: str, lane: str) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "_async_executor_traced", False):
        return

    @functools.wraps(original)
    def traced(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            _spans.append((lane, start, time.perf_counter_ns(), threading.get_ident()))

    traced._async_executor_traced = True  # type: ignore[attr-defined]
    setattr(cls, name, traced)


def _targets() -> list[tuple[Callable[[], type], str, str]]:
    def scheduler() -> type:
        from vllm.v1.core.sched.scheduler import Scheduler

        return Scheduler

    def v1_runner() -> type:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner

    def v2_runner() -> type:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner

        return GPUModelRunner

    def v1_output() -> type:
        from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

        return AsyncGPUModelRunnerOutput

    def v2_output() -> type:
        from vllm.v1.worker.gpu.async_utils import AsyncOutput

        return AsyncOutput

    def device_window() -> type:
        from async_executor.vllm_glue.device_window import DeviceWindow

        return DeviceWindow

    return [
        (scheduler, "schedule", "schedule"),
        (scheduler, "update_from_output", "update"),
        (v1_runner, "execute_model", "prepare"),
        (v1_runner, "sample_tokens", "launch"),
        (v1_runner, "_model_forward", "forward"),
        (v2_runner, "execute_model", "prepare"),
        (v2_runner, "sample_tokens", "launch"),
        (v1_output, "get_output", "resolve"),
        (v2_output, "get_output", "resolve"),
        (device_window, "run_later_steps", "advance"),
    ]


def install() -> None:
    """Wrap the step methods in this process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        for get_cls, name, lane in _targets():
            try:
                cls = get_cls()
            except Exception:  # a runner this vLLM build lacks (e.g. V2 on CPU)
                continue
            _wrap(cls, name, lane)
        _installed = True
        trace_dir().mkdir(parents=True, exist_ok=True)
        _start_flusher()
        # vLLM forks its EngineCore and worker processes from this one: a
        # forked child keeps the wrapped methods but not the thread.
        os.register_at_fork(after_in_child=_start_flusher)


def trace_dir() -> Path:
    value = os.environ.get(ENV_FLAG, "")
    if value == "1":
        return Path(tempfile.gettempdir()) / "async_executor_trace"
    return Path(value)


_directory: Path | None = None
_flush_lock = threading.Lock()


def _start_flusher() -> None:
    global _spans, _directory, _flush_lock
    _spans = []
    # A forked child gets a fresh lock: the parent's flusher may hold its copy.
    _flush_lock = threading.Lock()
    _directory = trace_dir()
    threading.Thread(target=_flush_forever, daemon=True).start()


def _flush_forever() -> None:
    while True:
        time.sleep(0.5)
        flush()


def flush() -> None:
    """Append this process's spans to its file now (the flusher does it twice
    a second); a no-op where the tracer is not installed."""
    global _spans
    with _flush_lock:
        spans, _spans = _spans, []
        if spans and _directory is not None:
            with (_directory / f"{os.getpid()}.jsonl").open("a") as fh:
                fh.write(json.dumps(spans) + "\n")


def read_span_files(directory: str | Path) -> list[tuple[str, int, int, int]]:
    spans: list[tuple[str, int, int, int]] = []
    for path in Path(directory).glob("*.jsonl"):
        spans.extend(read_span_file(path))
    return spans


def read_span_file(path: str | Path) -> list[tuple[str, int, int, int]]:
    """The spans of one process (its file is named by its pid). A line
    still being written by a live process (no newline yet) is left out."""
    spans: list[tuple[str, int, int, int]] = []
    for line in Path(path).read_text().split("\n")[:-1]:
        spans.extend(tuple(s) for s in json.loads(line))  # type: ignore[misc]
    return spans


# --- a host profile of one thread, on demand ---------------------------------
#
# Diagnostics for benchmarks: cProfile of the thread that calls
# `profile_start`, until `profile_stop`. With `ASYNC_EXECUTOR_ENGINE_PROFILE=1`
# in the engine's environment the plugin also gives vLLM's EngineCore two
# utility methods (`ENGINE_PROFILE_START`, `ENGINE_PROFILE_STOP`), which an
# engine client's `call_utility` runs on the engine's busy-loop thread: the
# thread that schedules and updates, whichever process runs the worker.

ENGINE_PROFILE_FLAG = "ASYNC_EXECUTOR_ENGINE_PROFILE"
ENGINE_PROFILE_START = "async_executor_profile_start"
ENGINE_PROFILE_STOP = "async_executor_profile_stop"

_profile: Any = None


def profile_start() -> bool:
    """Start a cProfile of the calling thread (one at a time per process)."""
    global _profile
    import cProfile

    if _profile is not None:
        raise RuntimeError("a host profile is already running in this process")
    _profile = cProfile.Profile()
    _profile.enable()
    return True


def profile_stop(top: int = 40) -> str:
    """Stop the profile; its `top` functions by own time, then by cumulative
    time, as pstats prints them."""
    global _profile
    import io
    import pstats

    profile, _profile = _profile, None
    if profile is None:
        raise RuntimeError("profile_start was not called in this process")
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def engine_profiler_enabled() -> bool:
    return os.environ.get(ENGINE_PROFILE_FLAG, "") not in ("", "0")


def install_engine_profiler() -> None:
    """Add the profile utility methods to vLLM's EngineCore (idempotent)."""
    from vllm.v1.engine.core import EngineCore

    def start(_engine: Any) -> bool:
        return profile_start()

    def stop(_engine: Any, top: int = 40) -> str:
        return profile_stop(top)

    setattr(EngineCore, ENGINE_PROFILE_START, start)
    setattr(EngineCore, ENGINE_PROFILE_STOP, stop)
