"""The worker side of a decode window: one call per window.

`run_window(worker, scheduled)` runs every device step of a window inside the
worker and returns one output for all of them. The executor reaches it with
one call per window whichever stage the worker runs in (a direct call in the
engine process, or one message through vLLM's multiprocess message queue,
`collective_rpc` with this module-level function), so the engine's side of a
window costs the same for a window of 2 as for a window of 64.

Two ways to run the steps after step 0:
- on the device (`device_window.py`): vLLM's Model Runner V2 with CUDA
  graphs; the host only launches;
- as host-prepared steps: any runner (vLLM's V1 runner on CPU among them);
  each step is an ordinary one-token call of the runner built from vLLM data
  (`window_steps.later_steps`), its input token carried over on the device by
  the runner's async-scheduling path.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

from async_executor.vllm_glue.window_steps import (
    first_step,
    later_steps,
    merge_outputs,
    window_of,
)


def to_host(output: Any) -> Any:
    """Wait for a step's sampled ids to reach the host."""
    if isinstance(output, AsyncModelRunnerOutput):
        return output.get_output()
    return output


class HostStepsOutput(AsyncModelRunnerOutput):
    """The outputs of a window's steps, merged when the host asks for them."""

    def __init__(self, outputs: list[Any]) -> None:
        self.outputs = outputs

    def get_output(self) -> ModelRunnerOutput:
        return merge_outputs([to_host(output) for output in self.outputs])


def run_window(worker: Any, scheduled: SchedulerOutput) -> Any:
    """Run a window's device steps; `worker` is vLLM's worker wrapper (what
    `collective_rpc` hands a callable). Returns one (async) output."""
    window = window_of(scheduled)
    first = first_step(scheduled)
    device = _device_window(worker)
    if device is not None:
        output, batch, graph = device.run_first_step(worker, first)
        if batch is not None:
            return device.run_later_steps(output, batch, graph, window)
        outputs = [output]  # step 0 did not run as one FULL graph
    else:
        outputs = [_step(worker, first)]
    outputs.extend(_step(worker, step) for step in later_steps(scheduled, window))
    return HostStepsOutput(outputs)


def _step(worker: Any, step: SchedulerOutput) -> Any:
    if worker.execute_model(step) is not None:
        raise RuntimeError("a decode window's step returned an output before sampling")
    return worker.sample_tokens(None)


def _device_window(worker: Any) -> Any:
    runner = getattr(getattr(worker, "worker", worker), "model_runner", None)
    device = getattr(runner, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    from async_executor.vllm_glue.device_window import device_window_for

    return device_window_for(runner)
