"""Device-side busy time, and the spans behind the timeline picture.

GPU: kernel intervals from the CUDA profiler (CUPTI, kernels only, no host
activity traced) in the process that launches the kernels, reached over
vLLM's `collective_rpc`. GPU busy = the union of kernel intervals inside the
traced window divided by its length: a whole call, or for long runs a sampled
window of seconds in the middle of one. NVML's utilisation (polled every
20 ms) is kept as a second opinion. `gap_breakdown` says which kernels the
device was waiting for when it idled.

CPU: the model's forward pass is the device work; busy = the union of the
`forward` spans of `async_executor.tracing` inside the window.

Kernel timestamps are put on the host's `perf_counter_ns` clock by a marker
kernel launched right after the profiler starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

Interval = tuple[int, ...]  # (start_ns, end_ns, ...)


def union_length(intervals: Iterable[Interval], lo: int, hi: int) -> int:
    total, end = 0, lo
    for interval in sorted(intervals):
        start, stop = max(interval[0], end), min(interval[1], hi)
        if stop > start:
            total += stop - start
            end = stop
    return total


def busy_share(intervals: Iterable[Interval], lo: int, hi: int) -> float:
    return union_length(intervals, lo, hi) / max(1, hi - lo)


# -- run inside the engine's worker process via collective_rpc ------------------

# A kernel on the host clock: (start_ns, end_ns, index into the name table).
Kernel = tuple[int, int, int]

# Kernels queued before the profiler starts are not traced, and a pipeline may
# have a whole window of steps queued ahead: a sampled window's first part is
# left out of the busy share.
SAMPLE_LEAD_IN_S = 0.5


class _KernelTrace:
    """The CUDA profiler in this process: all of one call, or a sampled window."""

    def __init__(self) -> None:
        self.profiler: Any = None
        self.marker_ns = 0
        self.stop_ns = 0
        self.thread: threading.Thread | None = None
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CUDA])
        self.profiler.start()
        # The marker maps the kernel clock onto perf_counter_ns. Its own stream,
        # so that it does not queue behind work already in flight.
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            marker = torch.empty(1, device="cuda")
            self.marker_ns = time.perf_counter_ns()
            marker.fill_(1.0)
        stream.synchronize()

    def stop(self) -> dict[str, Any]:
        import torch

        # Every kernel launched before this point has ended once synchronize
        # returns, so [marker, stop] is traced completely.
        self.stop_ns = time.perf_counter_ns()
        torch.cuda.synchronize()
        self.profiler.stop()
        names: dict[str, int] = {}
        raw = []
        for event in self.profiler.profiler.kineto_results.events():
            if event.device_type() == torch.autograd.DeviceType.CUDA:
                index = names.setdefault(event.name()[:120], len(names))
                raw.append((event.start_ns(), event.start_ns() + event.duration_ns(), index))
        self.profiler = None
        raw.sort()
        kernels: list[Kernel] = []
        if raw:
            # The first kernel is the marker, launched right after marker_ns.
            # Hazard: in a sampled window the engine keeps launching while the
            # profiler starts, so one of its kernels may run first; the clock
            # offset is then off by at most the profiler's start-up time (busy
            # over seconds barely moves; the timeline's device lane may shift).
            offset = self.marker_ns - raw[0][0]
            kernels = [(s + offset, e + offset, n) for s, e, n in raw[1:]]
        return {"kernels": kernels, "names": list(names),
                "window_ns": [self.marker_ns, self.stop_ns]}  # fmt: skip

    def sample(self, delay_s: float, length_s: float) -> None:
        try:
            time.sleep(delay_s)
            self.start()
            time.sleep(length_s)
            self.result = self.stop()
            lo, hi = self.result["window_ns"]
            self.result["window_ns"] = [min(hi, lo + int(SAMPLE_LEAD_IN_S * 1e9)), hi]
        except BaseException as exc:  # reported by profiler_stop
            self.error = exc


_trace: _KernelTrace | None = None


def profiler_start(_worker: Any = None, delay_s: float | None = None,
                   length_s: float | None = None) -> bool:  # fmt: skip
    """Trace kernels in this process: from now on, or (with delay_s and
    length_s) over a window of a call that is about to start, from a
    background thread, for runs too long to trace whole."""
    global _trace
    import torch

    _trace = _KernelTrace()
    if delay_s is None or length_s is None:
        torch.cuda.synchronize()
        _trace.start()
    else:
        _trace.thread = threading.Thread(
            target=_trace.sample, args=(delay_s, length_s), daemon=True)  # fmt: skip
        _trace.thread.start()
    return True


def profiler_stop(_worker: Any = None) -> dict[str, Any]:
    """Stop tracing. Returns {"kernels": [(start_ns, end_ns, name index)] on the
    host perf_counter_ns clock, "names": [...], "window_ns": [lo, hi]}, where
    window_ns is the traced window (for a sampled trace, without its lead-in)."""
    global _trace
    trace, _trace = _trace, None
    assert trace is not None, "profiler_start was not called in this process"
    if trace.thread is None:
        return trace.stop()
    trace.thread.join()
    if trace.error is not None:
        raise RuntimeError("sampled kernel trace failed") from trace.error
    if trace.result is None:
        raise RuntimeError("the call ended before the sampled kernel trace began")
    return trace.result


def _gap_bucket(gap_ns: int) -> str:
    return "lt_10us" if gap_ns < 10_000 else "10us_100us" if gap_ns < 100_000 else "ge_100us"


def gap_breakdown(kernels: Iterable[Kernel], names: list[str], lo: int, hi: int,
                  top: int = 8) -> dict[str, Any]:  # fmt: skip
    """Where the device idled in [lo, hi]: each gap is charged to the kernel
    that ended it (the work the device was waiting for)."""
    charged: dict[int, list[int]] = {}
    sizes = {"lt_10us": 0, "10us_100us": 0, "ge_100us": 0}
    end = lo
    first: int | None = None
    for start, stop, name in sorted(kernels):
        if stop <= lo or start >= hi:
            continue
        first = max(lo, start) if first is None else first
        if start > end:
            gap = start - end
            entry = charged.setdefault(name, [0, 0])
            entry[0] += gap
            entry[1] += 1
            sizes[_gap_bucket(gap)] += gap
        end = max(end, min(stop, hi))
    if hi > end:
        sizes[_gap_bucket(hi - end)] += hi - end
    idle = sum(sizes.values())
    worst = sorted(charged.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "window_s": (hi - lo) / 1e9,
        "idle_share": idle / max(1, hi - lo),
        "idle_ns_by_gap_size": sizes,
        # Of which: before the first kernel and after the last (a whole call's
        # request intake and output collection).
        "idle_ns_at_edges": [(first if first is not None else hi) - lo, hi - end],
        "before_kernel": [
            {"kernel": names[n], "idle_ns": ns, "gaps": count} for n, (ns, count) in worst
        ],
    }


# -- NVML second opinion ------------------------------------------------------


class NvmlPoller:
    """Polls GPU utilisation every 20 ms in a background thread."""

    def __init__(self, index: int = 0, period_s: float = 0.02) -> None:
        from vllm.third_party import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._period = period_s
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def card(self) -> str:
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def __enter__(self) -> NvmlPoller:
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self._samples.append(int(rates.gpu))
            time.sleep(self._period)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self._samples) / len(self._samples) / 100 if self._samples else None


# --- host profile of the thread that runs engine steps ------------------------


def host_profile_start(_worker: Any = None) -> bool:
    """cProfile the calling thread from now on. Reached through
    `collective_rpc`, that is the thread that runs the engine's steps where
    the worker shares it (vLLM's uniproc executor, ours inline), and the
    worker's RPC thread where the worker has its own process (the engine's
    own thread is reached through `tracing.ENGINE_PROFILE_START`)."""
    from async_executor import tracing

    return tracing.profile_start()


def host_profile_stop(_worker: Any = None, top: int = 40) -> str:
    """Stop the profile; the `top` functions by own time, then by
    cumulative time, as pstats prints them."""
    from async_executor import tracing

    return tracing.profile_stop(top)
