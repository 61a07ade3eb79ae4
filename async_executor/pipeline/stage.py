"""The device stage: where the runner's work runs, strictly in launch order.

Two modes share one interface:
- threaded: a single dedicated thread. The engine thread hands it batch N+1
  and goes back to scheduling while the thread is still computing batch N.
  This is what overlaps host and device on platforms whose forward pass
  blocks the calling thread (CPU).
- inline: the call runs on the caller's thread and returns a finished
  future. On CUDA a launch returns as soon as the kernels are queued, so the
  device already runs ahead of the host without a second thread.

Invariant: jobs run one at a time in submission order. The pipeline relies on
it for three hazards: batch N+1's inputs read N's sampled ids, a request's
wasted tokens in N+1 write KV blocks that are freed only after N resolves,
and a block freed when N resolves is handed out again only to a batch
launched after N+1, so it is written after N+1's last use of it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DeviceStage:
    def __init__(
        self,
        threaded: bool,
        initializer: Callable[[], None] | None = None,
        name: str = "async-executor-device-stage",
    ) -> None:
        self.threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        if threaded:
            self._pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=name, initializer=initializer
            )

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        if self._pool is None:
            future: Future[T] = Future()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on it
                future.set_exception(exc)
            return future
        return self._pool.submit(fn, *args)

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run on the stage and wait: for control calls that must not race
        with batches in flight."""
        return self.submit(fn, *args).result()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
