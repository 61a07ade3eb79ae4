"""Turn the pipeline on in a VllmConfig, in the EngineCore process.

The executor is built first in `EngineCore.__init__`; the scheduler and the
engine's batch queue are built right after it from the same config object.
So the executor's constructor is the place to switch vLLM's async scheduling
on (vLLM's CPU platform forces it off, vLLM issue #31525), pick our
scheduler, and set the pipeline depth.
"""

from __future__ import annotations

import logging
from typing import Any

from async_executor.settings import PipelineSettings

logger = logging.getLogger(__name__)

WINDOW_SCHEDULER = "async_executor.vllm_glue.scheduler.WindowScheduler"
SYNC_WINDOW_SCHEDULER = "async_executor.vllm_glue.scheduler.SyncWindowScheduler"
_OUR_SCHEDULERS = (WINDOW_SCHEDULER, SYNC_WINDOW_SCHEDULER)

# vLLM's scheduler classes we may replace with our subclass of the same one.
_STOCK_SCHEDULERS = (
    None,
    "vllm.v1.core.sched.scheduler.Scheduler",
    "vllm.v1.core.sched.async_scheduler.AsyncScheduler",
)


def apply_pipeline_config(vllm_config: Any, settings: PipelineSettings) -> None:
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(
            "async_executor does not support pipeline parallelism "
            f"(pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size})"
        )
    if vllm_config.parallel_config.world_size > 1:
        raise ValueError(
            "async_executor runs one worker in the engine process; "
            f"tensor_parallel_size={vllm_config.parallel_config.tensor_parallel_size} "
            "is not supported yet"
        )
    scheduler_config = vllm_config.scheduler_config
    scheduler_config.async_scheduling = settings.overlap

    chosen = scheduler_config.scheduler_cls
    if chosen in _STOCK_SCHEDULERS or chosen in _OUR_SCHEDULERS:
        scheduler_config.scheduler_cls = (
            WINDOW_SCHEDULER if settings.overlap else SYNC_WINDOW_SCHEDULER
        )
    else:
        # A user's own scheduler keeps working; it just gets no decode windows
        # and no wasted-token count.
        logger.warning(
            "async_executor: keeping user scheduler %s; decode windows are off",
            chosen,
        )

    if settings.in_flight_batches != vllm_config.max_concurrent_batches:
        _set_max_concurrent_batches(vllm_config, settings.in_flight_batches)


def _set_max_concurrent_batches(vllm_config: Any, depth: int) -> None:
    """Make `vllm_config.max_concurrent_batches` return `depth`.

    vLLM 0.32 derives it (a read-only property) from async scheduling: 2 with
    the V1 runner, pipeline size + 1 with V2. There is no setting, so this
    config object gets a subclass whose property returns our depth; nothing
    else changes and other engines' configs are untouched.
    patches/0001-max-concurrent-batches-setting.patch proposes a real setting.
    """
    base = type(vllm_config)
    base = getattr(base, "_async_executor_base", base)
    subclass = _DEPTH_CLASSES.get((base, depth))
    if subclass is None:
        subclass = type(
            base.__name__,
            (base,),
            {
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "_async_executor_base": base,
                "max_concurrent_batches": property(lambda self: depth),
            },
        )
        _DEPTH_CLASSES[(base, depth)] = subclass
    vllm_config.__class__ = subclass


_DEPTH_CLASSES: dict[tuple[type, int], type] = {}
