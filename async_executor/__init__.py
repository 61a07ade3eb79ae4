"""async_executor: an overlapped-batching executor plugin for vLLM.

    from vllm import LLM
    llm = LLM(model, distributed_executor_backend="async_executor")
    ...
    print(async_executor.pipeline_stats(llm))

This module stays import-light: vLLM imports the package in every process
when it loads the plugin entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from async_executor.pipeline.counters import PipelineStats
from async_executor.settings import PipelineSettings, SettingsError

if TYPE_CHECKING:
    from async_executor.vllm_glue.executor import AsyncExecutor

__all__ = [
    "AsyncExecutor",
    "PipelineSettings",
    "PipelineStats",
    "SettingsError",
    "pipeline_config",
    "pipeline_stats",
]
__version__ = "0.1.0"


def pipeline_config(**settings: Any) -> dict[str, Any]:
    """`additional_config` for vLLM carrying validated pipeline settings:
    `LLM(..., additional_config=async_executor.pipeline_config(depth=3))`."""
    from async_executor.settings import CONFIG_KEY

    return {CONFIG_KEY: PipelineSettings(**settings).to_config()}


def pipeline_stats(llm: Any) -> PipelineStats:
    """The pipeline's counters of an `LLM` (or an LLM engine) using our
    executor; works with the in-process and the multiprocess engine."""
    from async_executor.vllm_glue.executor import STATS_RPC

    engine = getattr(llm, "llm_engine", llm)
    results = engine.collective_rpc(STATS_RPC)
    stats = PipelineStats()
    for result in results:
        stats = stats.merged(PipelineStats(**result))
    return stats


def __getattr__(name: str) -> Any:
    if name == "AsyncExecutor":
        from async_executor.vllm_glue.executor import AsyncExecutor

        return AsyncExecutor
    raise AttributeError(f"module 'async_executor' has no attribute {name!r}")
