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

Faults: `wait(future, timeout_s)` gives up on a threaded job after
`timeout_s` and raises `StageTimeout`; the stage is then hung, and
`shutdown` does not wait for its thread (a daemon, so a hung job cannot keep
the process alive either). An inline job runs on the caller's thread and
cannot be timed out.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[object, ...]]


class StageTimeout(TimeoutError):
    """A job of a threaded stage did not finish in time."""


class DeviceStage:
    def __init__(
        self,
        threaded: bool,
        initializer: Callable[[], None] | None = None,
        name: str = "async-executor-device-stage",
    ) -> None:
        self.threaded = threaded
        self.hung = False
        self._closed = False
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._serve, args=(initializer,), name=name, daemon=True
            )
            self._thread.start()

    def _serve(self, initializer: Callable[[], None] | None) -> None:
        failed: BaseException | None = None
        if initializer is not None:
            try:
                initializer()
            except BaseException as exc:
                failed = exc
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            if failed is not None:
                future.set_exception(RuntimeError(f"device stage failed to start: {failed!r}"))
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on it
                future.set_exception(exc)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        future: Future[T] = Future()
        if not self.threaded:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)
            return future
        if self._closed:
            raise RuntimeError("the device stage is shut down")
        self._jobs.put((future, fn, args))
        return future

    def wait(self, future: Future[T], timeout_s: float | None = None) -> T:
        """The job's value (or its exception); on a threaded stage waits at
        most `timeout_s` (None: no limit), then raises `StageTimeout`."""
        if not self.threaded or timeout_s is None:
            return future.result()
        try:
            return future.result(timeout_s)
        except TimeoutError:
            if future.done():
                raise  # the job itself raised a TimeoutError
            self.hung = True
            raise StageTimeout(f"a job did not finish within {timeout_s:g} s") from None

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run on the stage and wait: for control calls that must not race
        with batches in flight."""
        return self.wait(self.submit(fn, *args))

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Cancel the jobs not started, let the running one finish (at most
        `timeout_s`; not at all once hung) and stop the thread."""
        thread = self._thread
        if thread is None or self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        if not self.hung:
            thread.join(timeout_s)
