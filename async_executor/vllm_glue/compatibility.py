"""What the pipeline can run: every configuration it refuses, and why.

`unsupported(deployment)` holds every rule, each with its message: the
setting (as the `LLM(...)` argument and the `vllm serve` flag) and what to
do instead. The rules read a `Deployment`, the few facts of a configuration
they need, built from vLLM's `EngineArgs` (in the front end, before vLLM
validates anything: `registration.py` wraps `create_engine_config`) or from
a `VllmConfig` (after vLLM resolved it, and again in EngineCore as a second
line for engines built without EngineArgs).

To lift a refusal, change its rule here; `TENSOR_PARALLEL_STAGES` is the
switch for tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from async_executor.settings import CONFIG_KEY, PipelineSettings

# The device stages that run a tensor-parallel worker group: one worker
# process per rank, each receiving every batch and window.
TENSOR_PARALLEL_STAGES: frozenset[str] = frozenset({"process"})

# Devices whose runners the pipeline drives (CUDA covers ROCm).
SUPPORTED_DEVICES = ("cpu", "cuda")

MULTIPROC_EXECUTOR = "AsyncMultiprocExecutor"
IN_PROCESS_EXECUTOR = "AsyncExecutor"

_DEFAULT_EXECUTOR = "vLLM's default executor (leave out --executor / distributed_executor_backend)"


class UnsupportedConfigError(ValueError):
    """A configuration the pipeline cannot run."""


@dataclass(frozen=True)
class Deployment:
    """The facts of an engine configuration that the rules read."""

    executor: str  # MULTIPROC_EXECUTOR or IN_PROCESS_EXECUTOR
    stage_setting: str  # the `stage` setting as given ("auto", ...)
    device: str  # the platform's device type: "cpu", "cuda", ...
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    speculative_method: str | None = None  # set: speculative decoding is on
    # The user's own async_scheduling choice; None: not given (or not known).
    async_scheduling: bool | None = None
    overlap: bool = True

    @property
    def stage(self) -> str:
        """The device stage the executor runs."""
        if self.executor == MULTIPROC_EXECUTOR:
            return "process"
        return in_process_stage(self.stage_setting, self.device)

    @classmethod
    def of_engine_args(cls, args: Any, executor: str, settings: PipelineSettings) -> Deployment:
        from vllm.platforms import current_platform

        spec = args.speculative_config or {}
        method = spec.get("method") or args.spec_method
        if method is None and (spec or args.spec_model or args.spec_tokens):
            method = "auto"
        return cls(
            executor=executor,
            stage_setting=settings.stage,
            device=str(current_platform.device_type),
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            data_parallel_size=args.data_parallel_size,
            prefill_context_parallel_size=args.prefill_context_parallel_size,
            decode_context_parallel_size=args.decode_context_parallel_size or 1,
            speculative_method=method,
            async_scheduling=args.async_scheduling,
            overlap=settings.overlap,
        )

    @classmethod
    def of_config(cls, vllm_config: Any, executor: str, settings: PipelineSettings) -> Deployment:
        parallel = vllm_config.parallel_config
        spec = vllm_config.speculative_config
        return cls(
            executor=executor,
            stage_setting=settings.stage,
            device=str(vllm_config.device_config.device_type),
            tensor_parallel_size=parallel.tensor_parallel_size,
            pipeline_parallel_size=parallel.pipeline_parallel_size,
            data_parallel_size=parallel.data_parallel_size,
            prefill_context_parallel_size=parallel.prefill_context_parallel_size,
            decode_context_parallel_size=parallel.decode_context_parallel_size,
            speculative_method=None if spec is None else str(spec.method or "auto"),
            overlap=settings.overlap,
        )


def unsupported(d: Deployment) -> list[str]:
    """One message per rule the deployment breaks; empty if it can run."""
    problems: list[str] = []
    if d.device not in SUPPORTED_DEVICES:
        problems.append(
            f"the device type is {d.device!r}: async_executor drives the runners of "
            f"{' and '.join(SUPPORTED_DEVICES)} devices only; use {_DEFAULT_EXECUTOR}"
        )
    if d.executor == MULTIPROC_EXECUTOR and d.stage_setting in ("thread", "inline"):
        problems.append(
            f"stage={d.stage_setting!r} runs the worker in the engine process, but the "
            f"executor {MULTIPROC_EXECUTOR} runs it in its own process: select the "
            "executor as 'async_executor' (it follows the stage setting) or "
            f"async_executor.vllm_glue.executor.{IN_PROCESS_EXECUTOR}"
        )
    if d.executor == IN_PROCESS_EXECUTOR and d.stage_setting == "process":
        problems.append(
            f"stage='process' runs the worker in its own process, but the executor "
            f"{IN_PROCESS_EXECUTOR} runs it in the engine process: select the executor as "
            "'async_executor' (it follows the stage setting) or "
            f"async_executor.vllm_glue.executor.{MULTIPROC_EXECUTOR}"
        )
    if d.speculative_method is not None:
        problems.append(
            f"speculative decoding (speculative_config / --speculative-config, method "
            f"{d.speculative_method!r}) is not supported: decode windows use the draft-token "
            f"slots; remove the speculative config, or run speculative decoding with "
            f"{_DEFAULT_EXECUTOR}"
        )
    if d.data_parallel_size > 1:
        problems.append(
            f"data parallelism (data_parallel_size / --data-parallel-size = "
            f"{d.data_parallel_size}) is not supported: the ranks of a MoE model step "
            "together (a collective on every forward pass), which decode windows break; run "
            "one engine per replica (separate `vllm serve` instances behind a load "
            f"balancer), or use {_DEFAULT_EXECUTOR}"
        )
    if d.pipeline_parallel_size > 1:
        problems.append(
            f"pipeline parallelism (pipeline_parallel_size / --pipeline-parallel-size = "
            f"{d.pipeline_parallel_size}) is not supported: a decode window runs every "
            "running request step after step, each step needing the previous step's sampled "
            "ids on the first stage at once, while vLLM's pipeline splits the requests into "
            "micro-batches whose sampled ids reach the first stage pipeline_parallel_size "
            f"steps later; use {_DEFAULT_EXECUTOR}"
        )
    if d.tensor_parallel_size > 1 and d.stage not in TENSOR_PARALLEL_STAGES:
        setting = (
            f"tensor parallelism (tensor_parallel_size / --tensor-parallel-size = "
            f"{d.tensor_parallel_size})"
        )
        if TENSOR_PARALLEL_STAGES:
            stages = " or ".join(f"{s!r}" for s in sorted(TENSOR_PARALLEL_STAGES))
            problems.append(
                f"{setting} needs the device stage {stages} (the async_executor setting "
                f"`stage`; the executor 'async_executor' follows it); this configuration runs "
                f"the {d.stage!r} stage, whose one worker runs in the engine process"
            )
        else:
            problems.append(
                f"{setting} is not supported yet: async_executor runs one worker; use "
                f"{_DEFAULT_EXECUTOR}"
            )
    context = {
        "prefill_context_parallel_size": d.prefill_context_parallel_size,
        "decode_context_parallel_size": d.decode_context_parallel_size,
    }
    for name, size in context.items():
        if size > 1:
            flag = "--" + name.replace("_", "-")
            problems.append(
                f"context parallelism ({name} / {flag} = {size}) is not supported: the "
                f"pipeline runs one worker; use {_DEFAULT_EXECUTOR}"
            )
    if d.async_scheduling is not None and d.async_scheduling != d.overlap:
        wanted = "false" if d.overlap else "true"
        problems.append(
            f"async_scheduling={d.async_scheduling} (--{'' if d.async_scheduling else 'no-'}"
            f"async-scheduling) contradicts the async_executor setting overlap="
            f"{str(d.overlap).lower()}, which decides it: leave async_scheduling out and set "
            f"overlap={wanted} (additional_config "
            f'{{"{CONFIG_KEY}": {{"overlap": {wanted}}}}}) if that is what you want'
        )
    return problems


def refuse(d: Deployment) -> None:
    """Raise one error listing every reason the deployment cannot run."""
    problems = unsupported(d)
    if problems:
        raise UnsupportedConfigError(
            "async_executor cannot run this configuration:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


SHORT_NAME = "short name"


def executor_kind(backend: Any) -> str | None:
    """Which of our executors `distributed_executor_backend` names:
    MULTIPROC_EXECUTOR, IN_PROCESS_EXECUTOR, SHORT_NAME (the stage setting
    decides), or None when it is not ours."""
    from async_executor.vllm_glue.registration import SHORT_NAMES, VLLM_BUILTIN_EXECUTORS

    cls = backend
    if isinstance(backend, str):
        if backend in SHORT_NAMES:
            return SHORT_NAME
        if backend in VLLM_BUILTIN_EXECUTORS or "." not in backend:
            return None
        try:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            cls = resolve_obj_by_qualname(backend)
        except Exception:
            return None  # vLLM reports a name it cannot import
    if not isinstance(cls, type):
        return None
    from async_executor.vllm_glue.executor import AsyncExecutor, AsyncMultiprocExecutor

    if issubclass(cls, AsyncMultiprocExecutor):
        return MULTIPROC_EXECUTOR
    if issubclass(cls, AsyncExecutor):
        return IN_PROCESS_EXECUTOR
    return None


# The stage `auto` picks: a worker process per rank, everywhere. CPU: the
# forward pass holds the calling thread and much of it is Python, so only a
# separate process overlaps it with scheduling. CUDA, one GPU: launches are
# asynchronous, so the engine thread could launch the steps itself
# (`inline`), but then scheduling, the output update and the runner's input
# preparation share one thread and one GIL; in a worker process the runner's
# host work runs beside the scheduler's. Measured on an H200 with every engine
# up at once and calls alternated (run 20261128-200939-h200, median walls):
# at 1B, batches 128 and 32, the worker process is 1.18-1.21x inline with
# windows of 2 and 1.20-1.32x with windows off; equal at 8B. Several ranks
# need a process each anyway.
AUTO_STAGE = "process"


def in_process_stage(stage_setting: str, device: str) -> str:
    """The stage of a worker in the engine's process (`IN_PROCESS_EXECUTOR`,
    selected by its class name): the one set, or for `auto` a device-stage
    thread on CPU (the forward pass holds the calling thread) and the engine
    thread on CUDA (launches are asynchronous)."""
    if stage_setting in ("thread", "inline"):
        return stage_setting
    return "thread" if device == "cpu" else "inline"


def short_name_executor(settings: PipelineSettings) -> str:
    """The executor the short name selects: it follows the stage
    (`engine_config.executor_class_for` builds this one)."""
    stage = AUTO_STAGE if settings.stage == "auto" else settings.stage
    return MULTIPROC_EXECUTOR if stage == "process" else IN_PROCESS_EXECUTOR


def _executor(kind: str, settings: PipelineSettings) -> str:
    return short_name_executor(settings) if kind == SHORT_NAME else kind


def deployment_of_engine_args(args: Any) -> Deployment | None:
    """The deployment `EngineArgs` asks for, or None if the executor is not ours."""
    kind = executor_kind(args.distributed_executor_backend)
    if kind is None:
        return None
    settings = PipelineSettings.from_vllm_config(args)
    return Deployment.of_engine_args(args, _executor(kind, settings), settings)


def deployment_of_config(vllm_config: Any, executor: str | None = None) -> Deployment | None:
    """The deployment a `VllmConfig` describes, or None if the executor is not
    ours; `executor`: the executor class running it, when known."""
    kind = executor or executor_kind(vllm_config.parallel_config.distributed_executor_backend)
    if kind is None:
        return None
    settings = PipelineSettings.from_vllm_config(vllm_config)
    return Deployment.of_config(vllm_config, _executor(kind, settings), settings)
