"""In-flight batches: what was launched, what it will sample, what it carried.

vLLM-independent bookkeeping for the counters. A batch is *in flight* from
its launch until the engine has its sampled tokens on the host (resolved).
Batches resolve in launch order (the device stage runs them in order, and
the engine pops its batch queue in order).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from async_executor.pipeline.counters import PipelineCounters


@dataclass(slots=True)
class InFlightBatch:
    seq: int
    # Requests that sample a token in this batch: their next input token is
    # this batch's output.
    samplers: frozenset[str]
    device_steps: int
    resolved: bool = False


class InFlightTracker:
    def __init__(self, counters: PipelineCounters) -> None:
        self._counters = counters
        self._lock = threading.Lock()
        self._unresolved: deque[InFlightBatch] = deque()
        self._latest: InFlightBatch | None = None
        self._seq = 0

    def launch(
        self,
        *,
        decode_inputs: Iterable[str],
        samplers: Iterable[str],
        device_steps: int,
        carried_within: int,
    ) -> InFlightBatch:
        """Record a launch. `decode_inputs`: requests whose first input token
        in this batch is an output token (not a prompt token).
        `carried_within`: inputs of device steps after the first that are the
        previous device step's sampled token (decode windows)."""
        with self._lock:
            self._seq += 1
            batch = InFlightBatch(self._seq, frozenset(samplers), device_steps)
            predecessor = self._latest
            ahead = predecessor is not None and not predecessor.resolved
            carried = 0
            if ahead:
                assert predecessor is not None
                carried = sum(1 for r in decode_inputs if r in predecessor.samplers)
            self._unresolved.append(batch)
            self._latest = batch
            in_flight = len(self._unresolved)
        self._counters.launched(
            ahead=ahead,
            carried=carried + carried_within,
            device_steps=device_steps,
            in_flight=in_flight,
        )
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
