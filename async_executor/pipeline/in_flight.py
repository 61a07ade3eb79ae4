"""In-flight batches: launched, not yet resolved.

vLLM-independent bookkeeping for the counters. A batch is *in flight* from
its launch until the engine has its sampled tokens on the host (resolved).
Batches resolve in launch order (the device stage runs them in order, and
the engine pops its batch queue in order). Carry-over tokens are counted by
the scheduler, which knows which requests still wait on an in-flight token.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from async_executor.pipeline.counters import PipelineCounters


@dataclass(slots=True)
class InFlightBatch:
    seq: int
    device_steps: int
    resolved: bool = False


class InFlightTracker:
    """O(1) per batch: it runs on the engine thread's launch path."""

    def __init__(self, counters: PipelineCounters) -> None:
        self._counters = counters
        self._lock = threading.Lock()
        self._unresolved: deque[InFlightBatch] = deque()
        self._latest: InFlightBatch | None = None
        self._seq = 0

    def launch(self, *, device_steps: int) -> InFlightBatch:
        """Record a launch of `device_steps` device steps (a decode window of
        that size, or 1)."""
        with self._lock:
            self._seq += 1
            batch = InFlightBatch(self._seq, device_steps)
            predecessor = self._latest
            ahead = predecessor is not None and not predecessor.resolved
            self._unresolved.append(batch)
            self._latest = batch
            in_flight = len(self._unresolved)
        self._counters.launched(ahead=ahead, device_steps=device_steps, in_flight=in_flight)
        return batch

    def resolve(self, batch: InFlightBatch) -> None:
        with self._lock:
            batch.resolved = True
            # Resolution is in launch order; tolerate a batch resolved twice.
            while self._unresolved and self._unresolved[0].resolved:
                self._unresolved.popleft()

    def reset(self) -> None:
        with self._lock:
            for batch in self._unresolved:
                batch.resolved = True
            self._unresolved.clear()
