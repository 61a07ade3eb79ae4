"""Device-resident decode windows on vLLM's Model Runner V2 (CUDA).

A window's batch does not change between its steps, so after step 0 (an
ordinary call of the runner: request updates, KV blocks for the whole window,
input preparation, the decode graph, sampling) every later step follows from
the device state alone:

  step k   positions, seq_lens   <- num_computed_tokens      (advanced by step k-1)
           input ids             <- last_sampled_tokens      (written by step k-1)
           slot mappings         <- the request's block table on the device
           attention metadata    <- seq_lens (the backend's persistent buffers)
           forward               =  replay of step 0's FULL CUDA graph
           sample, post_update   -> num_computed_tokens, last_sampled_tokens, ...

So the host does no input preparation and no synchronisation inside a window:
per step it launches a few Triton kernels (V2's own), refreshes the attention
metadata, replays the graph and launches sampling, all O(1) in Python. The
sampled ids of all steps stay on the device and reach the host in one copy.

What each step reads, and why it is right:
- The block tables gathered for step 0 hold every block of the window: the
  scheduler allocated KV slots for all w tokens before step 0 and the runner
  appended them in step 0 (`input_block_tables` is persistent and no other
  batch runs in between: the device stage runs batches in launch order).
- The host-side upper bound of the sequence lengths (`seq_lens_cpu_upper_bound`,
  which sets the attention backend's max_seq_len) advances by exactly one per
  step, as it would in one-token steps, so the attention metadata equals
  vLLM's own for the same step (exactness with the synchronous path).
- Each step's sampled ids and logprobs are kept as device tensors until the
  window's single device-to-host copy; step 0's output object is kept alive
  with it, since its own copy still reads them on the copy stream.

Anything this path does not cover (another runner, eager or piecewise
graphs, LoRA, speculative decoding, pipeline/decode-context parallelism,
sampling masks, EPLB) runs the window as host-prepared steps instead
(`window_worker.py`); `unsupported_reason()` says why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import LogprobsTensors
from vllm.v1.worker.gpu.async_utils import AsyncOutput
from vllm.v1.worker.gpu.input_batch import (
    InputBatch,
    combine_sampled_and_draft_tokens,
    prepare_pos_seq_lens,
)
from vllm.v1.worker.gpu.sample.output import SamplerOutput

from async_executor.vllm_glue.window_steps import DEVICE_WINDOW_MARK

_ATTR = "_async_executor_device_window"


class _GraphRecorder:
    """Remembers the FULL graph descriptor the runner replays, so that later
    steps replay exactly the graph vLLM chose for step 0."""

    def __init__(self, manager: Any) -> None:
        self.last: Any = None
        replay = manager.run_fullgraph

        def run_fullgraph(desc: Any) -> Any:
            self.last = desc
            return replay(desc)

        # An instance attribute shadows the method for this manager only.
        manager.run_fullgraph = run_fullgraph


class WindowAsyncOutput(AsyncOutput):
    """vLLM's async output over a whole window (the spec-decode layout: w
    sampled tokens per request), holding step 0's output until its copy is
    done."""

    def __init__(self, *args: Any, keep_alive: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Hazard: step 0's own device-to-host copy reads the step's tensors on
        # the copy stream; they must outlive it. Ours is recorded after it on
        # the same stream, so once ours is done, so is that one.
        self._keep_alive = keep_alive

    def get_output(self) -> Any:
        output = super().get_output()
        setattr(output, DEVICE_WINDOW_MARK, True)
        return output


def unsupported_reason(runner: Any) -> str | None:
    """Why this runner cannot advance windows on the device (None: it can)."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    except ImportError:  # pragma: no cover - a vLLM without the V2 runner
        return "vLLM's Model Runner V2 is not available"
    if not isinstance(runner, GPUModelRunner):
        return f"{type(runner).__name__} is not vLLM's Model Runner V2"
    checks = {
        "the runner has no CUDA graphs": runner.cudagraph_manager is None,
        "speculative decoding": runner.speculator is not None or runner.num_speculative_steps,
        "pipeline parallelism": runner.pp_handler is not None,
        "prefill/decode context parallelism": runner.pcp_manager is not None or runner.dcp_size > 1,
        "LoRA": runner.lora_config is not None,
        "batch-sharded sampling": runner.batch_sharder is not None,
        "sampling masks": getattr(runner.sampler, "return_sampling_mask", False),
        "auxiliary outputs": runner.aux_output_connector is not None,
        "KV-sharing fast prefill": runner.fast_prefill is not None,
        "expert load balancing": runner.parallel_config.enable_eplb,
        "a model state other than the default": not isinstance(
            runner.model_state, DefaultModelState
        ),
    }
    for reason, present in checks.items():
        if present:
            return reason
    return None


def device_window_for(runner: Any) -> DeviceWindow | None:
    """The runner's device-resident window loop, or None if unsupported
    (decided once per runner)."""
    cached = runner.__dict__.get(_ATTR, False)
    if cached is False:
        cached = None if unsupported_reason(runner) else DeviceWindow(runner)
        setattr(runner, _ATTR, cached)
    return cached


class DeviceWindow:
    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.graphs = _GraphRecorder(runner.cudagraph_manager)

    def run_first_step(self, worker: Any, first: SchedulerOutput) -> tuple[Any, Any, Any]:
        """Step 0 through vLLM's own runner calls. Returns its async output,
        its InputBatch and the FULL graph it replayed (None where the step did
        not run as one FULL graph: the rest must then be host steps)."""
        self.graphs.last = None
        if worker.execute_model(first) is not None:
            raise RuntimeError("a decode window's first step returned an output before sampling")
        state = self.runner.execute_model_state
        output = worker.sample_tokens(None)
        desc = self.graphs.last
        if (
            state is None
            or not isinstance(output, AsyncOutput)
            or desc is None
            or desc.cg_mode != CUDAGraphMode.FULL
            or desc.num_ubatches != 1
        ):
            return output, None, None
        return output, state.input_batch, desc

    @torch.inference_mode()
    def run_later_steps(
        self, first_output: AsyncOutput, batch: InputBatch, desc: Any, window: int
    ) -> WindowAsyncOutput:
        """Steps 1..window-1 on the device; one async output for the window."""
        runner = self.runner
        n = batch.num_reqs
        upper_bound = batch.seq_lens_cpu_upper_bound.numpy()
        computed = batch.num_computed_tokens_np
        block_tables = tuple(
            bt[: batch.num_reqs_after_padding] for bt in runner.block_tables.input_block_tables
        )
        samples = [first_output.sampler_output]
        for k in range(1, window):
            step_bound = upper_bound.copy()
            step_bound[:n] += k
            step = dataclasses.replace(
                batch,
                seq_lens_cpu_upper_bound=torch.from_numpy(step_bound),
                num_computed_tokens_np=computed + k,
            )
            self._advance_inputs(step)
            slot_mappings = runner.block_tables.compute_slot_mappings(
                step.idx_mapping,
                step.query_start_loc,
                step.positions,
                num_tokens_padded=step.num_tokens_after_padding,
            )
            runner.model_state.prepare_attn(
                step,
                CUDAGraphMode.FULL,
                block_tables,
                slot_mappings,
                runner.attn_groups,
                runner.kv_cache_config,
            )
            runner.model_state.prepare_inputs(step, runner.req_states)
            hidden_states = runner.cudagraph_manager.run_fullgraph(desc)
            # Sampling reads the graph's output buffer before the next replay
            # overwrites it: both are on this stream, in this order.
            sampled, num_sampled, num_rejected = runner.sample(hidden_states, step, None)
            runner.postprocess_sampled(
                step.idx_mapping,
                sampled.sampled_token_ids,
                num_sampled,
                num_rejected,
                step.query_start_loc,
            )
            samples.append(sampled)
        return self._window_output(first_output, samples, window)

    def _advance_inputs(self, step: InputBatch) -> None:
        """Positions, sequence lengths and input ids of the next step, from
        the device state the previous step's post_update left."""
        runner = self.runner
        states = runner.req_states
        prepare_pos_seq_lens(
            step.idx_mapping,
            step.query_start_loc,
            states.num_computed_tokens.gpu,
            runner.input_buffers.positions,
            runner.input_buffers.seq_lens,
        )
        # Writes each request's last sampled token into the persistent input
        # ids; the logits indices it returns equal step 0's.
        combine_sampled_and_draft_tokens(
            runner.input_buffers.input_ids,
            step.idx_mapping,
            states.last_sampled_tokens,
            step.query_start_loc,
            step.seq_lens,
            states.prefill_len.gpu,
            states.draft_tokens,
            step.cu_num_logits,
            int(step.cu_num_logits_np[-1]),
            runner.model_state.num_new_sampled_tokens_per_step,
        )

    def _window_output(
        self, first_output: AsyncOutput, samples: list[SamplerOutput], window: int
    ) -> WindowAsyncOutput:
        runner = self.runner
        sampled = torch.cat([s.sampled_token_ids for s in samples], dim=1)
        num_sampled = torch.full_like(samples[0].num_sampled, window)
        nans = [s.num_nans for s in samples if s.num_nans is not None]
        merged = SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=_stack_logprobs([s.logprobs_tensors for s in samples]),
            num_nans=torch.stack(nans).sum(dim=0) if nans else None,
            num_sampled=num_sampled,
            num_rejected=torch.zeros_like(num_sampled),
        )
        return WindowAsyncOutput(
            model_runner_output=first_output.model_runner_output,
            sampler_output=merged,
            num_sampled_tokens=num_sampled,
            main_stream=runner.main_stream,
            copy_stream=runner.output_copy_stream,
            check_ep_fault=runner.check_ep_fault,
            pending_aux_output=None,
            keep_alive=first_output,
        )


def _stack_logprobs(steps: list[LogprobsTensors | None]) -> LogprobsTensors | None:
    """Per-step logprob rows [num_reqs, k] as one request-major block
    [num_reqs * window, k] with each request's rows in step order."""
    present = [lp for lp in steps if lp is not None]
    if not present:
        return None
    if len(present) != len(steps):
        raise RuntimeError("logprobs were computed for some steps of a window and not others")
    num_reqs, window = present[0].selected_token_ranks.shape[0], len(present)

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.stack(tensors, dim=1)  # [num_reqs, window, ...]
        return joined.reshape(num_reqs * window, *joined.shape[2:])

    return LogprobsTensors(
        logprob_token_ids=stack([lp.logprob_token_ids for lp in present]),
        logprobs=stack([lp.logprobs for lp in present]),
        selected_token_ranks=stack([lp.selected_token_ranks for lp in present]),
        cu_num_generated_tokens=list(range(0, num_reqs * window + 1, window)),
    )
