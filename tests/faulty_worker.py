"""A test-only vLLM worker that fails on purpose: the fault tests' hook.

Selected with vLLM's own `worker_cls` setting; the fault comes from the
environment variable `ASYNC_EXECUTOR_TEST_FAULT="ACTION@WHERE"`, read in the
process the worker runs in (the engine process or a worker process):
- ACTION: `raise` (a RuntimeError naming the fault), `hang` (the step sleeps
  for `ASYNC_EXECUTOR_TEST_HANG_S` seconds, default 600), `kill` (the worker's
  process kills itself with SIGKILL);
- WHERE: `first` (the first device step that computes tokens: a one-step
  batch, the prompts' prefill), `step:N` (the N-th such step, from 0, for
  any executor) or `window:K` (device step K of the first decode window; a
  window runs inside `window_worker.run_window`).
Nothing of this is in the product.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from vllm.v1.worker.cpu_worker import CPUWorker

FAULT_ENV = "ASYNC_EXECUTOR_TEST_FAULT"
HANG_ENV = "ASYNC_EXECUTOR_TEST_HANG_S"
QUALNAME = f"{__name__}.FaultyCPUWorker"
MESSAGE = "injected fault"


def _window_frame() -> Any:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "run_window":
            return frame
        frame = frame.f_back
    return None


class FaultyCPUWorker(CPUWorker):
    _fired = False
    _window: Any = None
    _window_step = 0
    _steps = 0

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if scheduler_output.total_num_scheduled_tokens and self._hits(scheduler_output):
            self._fire()
        return super().execute_model(scheduler_output, *args, **kwargs)

    def _hits(self, scheduler_output: Any) -> bool:
        spec = os.environ.get(FAULT_ENV, "")
        if not spec or self._fired:
            return False
        where = spec.partition("@")[2]
        step, self._steps = self._steps, self._steps + 1
        if where == "first":
            return True
        if where.startswith("step:"):
            return step == int(where.removeprefix("step:"))
        if not where.startswith("window:"):
            raise ValueError(f"bad {FAULT_ENV}={spec!r}")
        frame = _window_frame()
        if frame is None:
            return False
        if self._window is None:
            self._window = frame
        elif frame is not self._window:
            return False
        step, self._window_step = self._window_step, self._window_step + 1
        return step == int(where.removeprefix("window:"))

    def _fire(self) -> None:
        self._fired = True
        spec = os.environ[FAULT_ENV]
        action = spec.partition("@")[0]
        if action == "raise":
            raise RuntimeError(f"{MESSAGE} ({spec}) in pid {os.getpid()}")
        if action == "hang":
            time.sleep(float(os.environ.get(HANG_ENV, "600")))
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"bad {FAULT_ENV}={spec!r}")
