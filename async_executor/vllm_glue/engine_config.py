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

# Our schedulers by (overlap, decode windows). Without windows the per-token
# output update is vLLM's own, with nothing of ours in its per-request loop.
_SCHEDULERS = {
    (True, True): "async_executor.vllm_glue.scheduler.WindowScheduler",
    (False, True): "async_executor.vllm_glue.scheduler.SyncWindowScheduler",
    (True, False): "async_executor.vllm_glue.scheduler.StepScheduler",
    (False, False): "async_executor.vllm_glue.scheduler.SyncStepScheduler",
}
_OUR_SCHEDULERS = tuple(_SCHEDULERS.values())

# vLLM's scheduler classes we may replace with our subclass of the same one.
_STOCK_SCHEDULERS = (
    None,
    "vllm.v1.core.sched.scheduler.Scheduler",
    "vllm.v1.core.sched.async_scheduler.AsyncScheduler",
)


def executor_class_for(vllm_config: Any) -> type:
    """The class the short executor name selects for this config."""
    from async_executor.vllm_glue.compatibility import MULTIPROC_EXECUTOR, short_name_executor
    from async_executor.vllm_glue.executor import AsyncExecutor, AsyncMultiprocExecutor

    executor = short_name_executor(PipelineSettings.from_vllm_config(vllm_config))
    return AsyncMultiprocExecutor if executor == MULTIPROC_EXECUTOR else AsyncExecutor


def apply_pipeline_config(vllm_config: Any, settings: PipelineSettings, executor: str) -> None:
    """`executor`: the class name of the executor being built (compatibility.py)."""
    from async_executor.vllm_glue.compatibility import deployment_of_config, refuse

    # The front end refused these already (registration.py); this catches
    # engines built from a VllmConfig without EngineArgs.
    deployment = deployment_of_config(vllm_config, executor)
    assert deployment is not None
    refuse(deployment)
    scheduler_config = vllm_config.scheduler_config
    scheduler_config.async_scheduling = settings.overlap

    chosen = scheduler_config.scheduler_cls
    if chosen in _STOCK_SCHEDULERS or chosen in _OUR_SCHEDULERS:
        scheduler_config.scheduler_cls = _SCHEDULERS[(settings.overlap, settings.decode_window > 1)]
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
    config object's class becomes a subclass whose property returns the
    depth; nothing else changes and other engines' configs are untouched.
    The subclasses are defined at import time so that the config pickles to
    worker processes, which must see the same depth (V2 sizes its rotating
    staging buffers by it). patches/0001 proposes a real setting.
    """
    from vllm.config import VllmConfig

    if not isinstance(vllm_config, VllmConfig) or type(vllm_config) not in (
        VllmConfig,
        *_DEPTH_CLASSES.values(),
    ):
        raise TypeError(f"cannot set the pipeline depth of a {type(vllm_config).__name__}")
    if depth not in _DEPTH_CLASSES:
        raise ValueError(f"depth {depth} is outside 1..8")
    vllm_config.__class__ = _DEPTH_CLASSES[depth]


def _make_depth_classes() -> dict[int, type]:
    from vllm.config import VllmConfig

    def fixed(depth: int) -> property:
        return property(lambda self: depth)

    classes: dict[int, type] = {}
    for depth in range(1, 9):
        name = f"VllmConfigDepth{depth}"
        cls = type(
            name,
            (VllmConfig,),
            {
                "__module__": __name__,
                "__qualname__": name,
                "max_concurrent_batches": fixed(depth),
            },
        )
        globals()[name] = cls
        classes[depth] = cls
    return classes


_DEPTH_CLASSES: dict[int, type] = _make_depth_classes()
