"""The vLLM executors that run the overlapped pipeline.

Where each stage runs:

  engine thread   schedule N+1 -> execute_model(N+1) -> sample_tokens(N+1)
                  -> wait for N's sampled ids -> update_from_output(N) -> ...
  device stage    N: device step 0 [, 1 .. w-1]   N+1: device step 0 ...

`execute_model` and `sample_tokens` only hand the batch to the device stage;
they return futures at once, so the engine schedules batch N+2 while N+1
computes. The engine blocks only when it needs the oldest batch's sampled ids
(`ResolvingFuture.result`). A one-step batch is vLLM's own pair of worker
calls (`execute_model` + `sample_tokens`), whose async-scheduling path
reconciles carry-over tokens on the device: the input ids of requests that
the previous batch is still sampling are gathered from its device output. A
decode window is one worker call for all its steps
(`window_worker.run_window`), which returns one output.

Faults end the engine, as in vLLM's own executors, and never hang it: a
device step's exception reaches the engine from the batch it belongs to (a
one-step batch's `execute_model` error is raised by its sampling, where the
engine waits); a step that does not finish within vLLM's
`VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS` raises `DeviceStepTimeout` (the worker
process stage through vLLM's message queue, the thread stage through
`DeviceStage.wait`; an inline step runs on the engine thread and cannot be
timed out, as with vLLM's uniproc executor); a worker process that dies
fails the batches in flight with an error that says so.

Two device stages, one pipeline (`_Pipeline`):
- `AsyncExecutor`: the worker in the engine process, its steps on a
  dedicated thread (`stage="thread"`) or on the engine thread (`"inline"`;
  on CUDA launches return before the device finishes);
- `AsyncMultiprocExecutor`: the worker in its own process (`"process"`,
  what `auto` picks), reached through vLLM's multiprocess executor; its
  message queue keeps the calls in order, and the engine and the runner no
  longer share a GIL: the runner prepares batch N+1's inputs while the
  engine thread updates from batch N and schedules N+2.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import vllm.envs as envs
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.executor.multiproc_executor import MultiprocExecutor
from vllm.v1.executor.uniproc_executor import UniProcExecutor

from async_executor.pipeline.counters import counters_for, release_counters
from async_executor.pipeline.in_flight import InFlightBatch, InFlightTracker
from async_executor.pipeline.stage import DeviceStage, StageTimeout
from async_executor.pipeline.window import payoff_for, release_payoff
from async_executor.settings import PipelineSettings
from async_executor.vllm_glue.compatibility import (
    IN_PROCESS_EXECUTOR,
    MULTIPROC_EXECUTOR,
    in_process_stage,
)
from async_executor.vllm_glue.cpu_runner import install_cpu_runner_fixes
from async_executor.vllm_glue.engine_config import apply_pipeline_config
from async_executor.vllm_glue.handoff import detach_grammar_output, detach_scheduler_output
from async_executor.vllm_glue.window_steps import ran_on_device, window_of
from async_executor.vllm_glue.window_worker import run_window, to_host

# collective_rpc method name answered by the executor itself.
STATS_RPC = "async_executor_stats"

# A worker call: a worker method's name, or a function of (worker, arg).
WorkerCall = str | Callable[[Any, Any], Any]

TIMEOUT_ENV = "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"


class DeviceStepTimeout(TimeoutError):
    """A device step did not finish in time: the device stage is hung."""


def _timeout_error(timeout_s: float) -> DeviceStepTimeout:
    return DeviceStepTimeout(
        f"async_executor: a device step did not finish within {timeout_s:g} s "
        f"({TIMEOUT_ENV}); the device stage is hung and the engine stops"
    )


class ResolvingFuture(Future[Any]):
    """A future whose value is computed on the first `result()` call, on the
    caller's thread: that is where the engine waits for sampled ids."""

    def __init__(self, resolve: Callable[[], Any]) -> None:
        super().__init__()
        self._resolve: Callable[[], Any] | None = resolve
        self._resolve_lock = threading.Lock()

    def result(self, timeout: float | None = None) -> Any:
        with self._resolve_lock:
            if self._resolve is not None:
                resolve, self._resolve = self._resolve, None
                try:
                    self.set_result(resolve())
                except BaseException as exc:
                    self.set_exception(exc)
        return super().result(timeout)


@dataclasses.dataclass(frozen=True, slots=True)
class _Launched:
    job: Future[Any]
    window: bool
    in_flight: InFlightBatch | None
    # Every scheduled token is a decode step's (no prefill in the batch).
    decode_only: bool
    num_requests: int


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


class _Pipeline:
    """The pipeline over a device stage that runs worker calls in order.

    Subclasses provide `_submit(call, arg) -> Future` (a worker call on the
    device stage; the future's value may still be an AsyncModelRunnerOutput)
    and `_wait(job)` (its value; raises the step's error, a timeout, or the
    loss of the worker).
    """

    vllm_config: Any
    settings: PipelineSettings

    def _init_pipeline(self) -> None:
        self.counters = counters_for(self.vllm_config)
        self.tracker = InFlightTracker(self.counters)
        # Each batch timed as it resolves: whether windows pay.
        self.payoff = payoff_for(self.vllm_config)
        # The batch launched by execute_model whose sampling is next: its
        # job (the whole window, or a one-step batch's execute_model).
        self._launched: _Launched | None = None

    def _submit(self, call: WorkerCall, arg: Any) -> Future[Any]:
        raise NotImplementedError

    def _wait(self, job: Future[Any]) -> Any:
        raise NotImplementedError

    @property
    def _hands_off(self) -> bool:
        """Whether the device stage reads a batch after the engine thread
        has moved on, in the engine's process (`handoff.py`)."""
        return False

    def execute_model(  # type: ignore[override]
        self, scheduler_output: SchedulerOutput, non_block: bool = False
    ) -> Any:
        window = window_of(scheduler_output)
        in_flight = None
        total = scheduler_output.total_num_scheduled_tokens
        if total:
            in_flight = self.tracker.launch(device_steps=window)
        num_requests = len(scheduler_output.num_scheduled_tokens)
        decode_only = total == window * num_requests
        if self._hands_off:
            scheduler_output = detach_scheduler_output(scheduler_output)
        if window > 1:
            # The whole window in one worker call; sample_tokens hands out
            # its output (a window never has a grammar to apply).
            job = self._submit(run_window, scheduler_output)
            self._launched = _Launched(job, True, in_flight, decode_only, num_requests)
            future: Future[Any] = _done(None)
        else:
            job = self._submit("execute_model", scheduler_output)
            self._launched = _Launched(job, False, in_flight, decode_only, num_requests)
            future = ResolvingFuture(functools.partial(self._resolve_execute, job, in_flight))
        if not non_block:
            return future.result()
        if job.done() and job.exception() is not None:
            # Surface launch errors at once, as vLLM's uniproc executor does.
            job.result()
        return future

    def _resolve_execute(self, job: Future[Any], in_flight: InFlightBatch | None) -> Any:
        output = to_host(self._wait(job))
        if output is not None and in_flight is not None:
            # No sampling step follows (pooling, nothing to sample).
            self.tracker.resolve(in_flight)
        return output

    def sample_tokens(  # type: ignore[override]
        self, grammar_output: GrammarOutput | None, non_block: bool = False
    ) -> Any:
        launched, self._launched = self._launched, None
        if launched is None:
            raise RuntimeError("sample_tokens called without a preceding execute_model")
        if launched.window:
            if grammar_output is not None:
                raise RuntimeError("a decode window was given a grammar bitmask")
            executed, job = None, launched.job
        else:
            if self._hands_off:
                grammar_output = detach_grammar_output(grammar_output)
            executed, job = launched.job, self._submit("sample_tokens", grammar_output)
        resolve = functools.partial(self._resolve_sample, executed, job, launched)
        future = ResolvingFuture(resolve)
        return future if non_block else future.result()

    def _resolve_sample(
        self, executed: Future[Any] | None, job: Future[Any], launched: _Launched
    ) -> Any:
        # Runs on the engine thread, where it waits for the batch's sampled ids.
        if executed is not None:
            # A failed execute_model leaves vLLM's runner nothing to sample,
            # and its sample_tokens answers with an empty output that the
            # engine would take for the batch's: raise the cause instead.
            self._wait(executed)
        output = to_host(self._wait(job))
        in_flight = launched.in_flight
        if in_flight is not None:
            self.tracker.resolve(in_flight)
            if in_flight.device_steps > 1 and ran_on_device(output):
                self.counters.add(device_windows=1)
            self.payoff.observe(
                time.perf_counter_ns(),
                in_flight.device_steps,
                launched.decode_only,
                launched.num_requests,
            )
        return output

    def _stats_reply(self, single_value: bool, non_block: bool) -> Any:
        stats = self.counters.snapshot().as_dict()
        result = stats if single_value else [stats]
        return _done(result) if non_block else result

    def _release_pipeline(self) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.reset()
            release_counters(self.vllm_config)
            release_payoff(self.vllm_config)

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True


class AsyncExecutor(_Pipeline, UniProcExecutor):
    """The worker in the engine process; its steps on a device-stage thread
    or inline on the engine thread."""

    def _init_executor(self) -> None:
        self.settings = PipelineSettings.from_vllm_config(self.vllm_config)
        apply_pipeline_config(self.vllm_config, self.settings, IN_PROCESS_EXECUTOR)
        # This class keeps the worker in the engine's process, whatever
        # `auto` picks for the short executor name.
        stage = in_process_stage(
            self.settings.stage, str(self.vllm_config.device_config.device_type)
        )
        super()._init_executor()
        install_cpu_runner_fixes(self.driver_worker.worker.model_runner)
        device = torch.device(str(self.vllm_config.device_config.device))
        initializer = None
        if stage == "thread" and device.type == "cuda":
            # The current CUDA device is per thread.
            initializer = functools.partial(torch.cuda.set_device, device)
        self.stage = DeviceStage(stage == "thread", initializer=initializer)
        self._init_pipeline()

    def _wait(self, job: Future[Any]) -> Any:
        timeout_s = float(envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)
        try:
            return self.stage.wait(job, timeout_s)
        except StageTimeout:
            raise _timeout_error(timeout_s) from None

    def _submit(self, call: WorkerCall, arg: Any) -> Future[Any]:
        worker = self.driver_worker
        if isinstance(call, str):
            return self.stage.submit(getattr(worker, call), arg)
        return self.stage.submit(call, worker, arg)

    @property
    def _hands_off(self) -> bool:
        return self.stage.threaded

    def collective_rpc(  # type: ignore[override]
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        non_block: bool = False,
        single_value: bool = False,
    ) -> Any:
        if method == STATS_RPC:
            return self._stats_reply(single_value, non_block)
        # Control calls run on the device stage, after the batches in flight.
        call = functools.partial(
            UniProcExecutor.collective_rpc,
            self, method, timeout, args, kwargs, False, single_value,
        )  # fmt: skip
        stage = getattr(self, "stage", None)
        if stage is None:  # during _init_executor
            return call()
        return stage.submit(call) if non_block else stage.run(call)

    def shutdown(self) -> None:
        stage = getattr(self, "stage", None)
        if stage is not None:
            # A hung stage is left behind (a daemon thread), not waited for.
            stage.shutdown(timeout_s=float(envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS))
        self._release_pipeline()
        if worker := self.driver_worker:
            worker.shutdown()


def _install_fixes_in_worker(worker: Any) -> bool:
    return install_cpu_runner_fixes(worker.worker.model_runner)


class AsyncMultiprocExecutor(_Pipeline, MultiprocExecutor):
    """The worker in its own process, as in vLLM's `mp` executor; vLLM's
    message queue is the device stage (it delivers calls in order)."""

    def _init_executor(self) -> None:
        self.settings = PipelineSettings.from_vllm_config(self.vllm_config)
        apply_pipeline_config(self.vllm_config, self.settings, MULTIPROC_EXECUTOR)
        super()._init_executor()
        MultiprocExecutor.collective_rpc(self, _install_fixes_in_worker)
        self._init_pipeline()

    def _submit(self, call: WorkerCall, arg: Any) -> Future[Any]:
        return MultiprocExecutor.collective_rpc(
            self,
            call,
            args=(arg,),
            unique_reply_rank=self.output_rank,
            non_block=True,
            timeout=envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS,
            kv_output_aggregator=self.kv_output_aggregator,
            ec_output_aggregator=self.ec_output_aggregator,
        )

    def _wait(self, job: Future[Any]) -> Any:
        # The job's deadline was set when it was sent (`_submit`).
        try:
            return job.result()
        except TimeoutError as exc:
            raise _timeout_error(float(envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)) from exc
        except Exception as exc:
            if not self.is_failed:
                raise
            # vLLM's worker monitor saw a worker process die and shut the
            # queues down; the wait itself reports only "cancelled".
            raise RuntimeError(
                f"async_executor: the worker process died ({self._worker_exits()}) "
                "while a batch was in flight; the engine stops"
            ) from exc

    def _worker_exits(self) -> str:
        exits = []
        for handle in getattr(self, "workers", None) or []:
            code = handle.proc.exitcode
            if code is not None and code < 0:
                exits.append(f"{handle.proc.name} killed by signal {-code}")
            elif code is not None:
                exits.append(f"{handle.proc.name} exit code {code}")
        return ", ".join(exits) or "exit status unknown"

    def collective_rpc(  # type: ignore[override]
        self, method: str | Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        if method == STATS_RPC:
            non_block = bool(kwargs.get("non_block", False))
            return self._stats_reply(kwargs.get("unique_reply_rank") is not None, non_block)
        return MultiprocExecutor.collective_rpc(self, method, *args, **kwargs)

    def shutdown(self) -> None:
        self._release_pipeline()
        MultiprocExecutor.shutdown(self)
