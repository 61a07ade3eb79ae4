"""Device-side busy time, and the spans behind the timeline picture.

GPU: kernel intervals from the CUDA profiler (CUPTI, kernels only, no host
activity traced) in the process that launches the kernels, reached over
vLLM's `collective_rpc`. GPU busy = the union of kernel intervals inside the
timed window divided by its length. NVML's utilisation (polled every 20 ms)
is kept as a second opinion.

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

Interval = tuple[int, int]


def union_length(intervals: Iterable[Interval], lo: int, hi: int) -> int:
    total, end = 0, lo
    for start, stop in sorted(intervals):
        start, stop = max(start, end), min(stop, hi)
        if stop > start:
            total += stop - start
            end = stop
    return total


def busy_share(intervals: Iterable[Interval], lo: int, hi: int) -> float:
    return union_length(intervals, lo, hi) / max(1, hi - lo)


# -- run inside the engine's worker process via collective_rpc ------------------

_profiler: Any = None
_marker_host_ns = 0


def profiler_start(_worker: Any = None) -> bool:
    """Start tracing kernels in this process."""
    global _profiler, _marker_host_ns
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    _profiler = profile(activities=[ProfilerActivity.CUDA])
    _profiler.start()
    marker = torch.empty(1, device="cuda")
    _marker_host_ns = time.perf_counter_ns()
    marker.fill_(1.0)
    torch.cuda.synchronize()
    return True


def profiler_stop(_worker: Any = None) -> list[Interval]:
    """Stop tracing; kernel (start, end) on the host perf_counter_ns clock."""
    global _profiler
    import torch

    torch.cuda.synchronize()
    assert _profiler is not None, "profiler_start was not called in this process"
    _profiler.stop()
    kernels = []
    for event in _profiler.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA:
            kernels.append((event.start_ns(), event.start_ns() + event.duration_ns()))
    _profiler = None
    if not kernels:
        return []
    kernels.sort()
    # The first kernel is the marker, launched right after _marker_host_ns.
    offset = _marker_host_ns - kernels[0][0]
    return [(s + offset, e + offset) for s, e in kernels[1:]]


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
