"""The pipeline's counters on vLLM's Prometheus endpoint (`/metrics`).

How vLLM 0.32 gets metrics to `/metrics`, and why this module looks as it
does:
- The counters live in the EngineCore process (executor and scheduler bump
  them); `/metrics` is served by the API server process, from
  `vllm.v1.metrics.prometheus.get_prometheus_registry()`: prometheus_client's
  global `REGISTRY`, or, when `PROMETHEUS_MULTIPROC_DIR` is set (vLLM sets
  it for `--api-server-count` > 1; a user may set it), a fresh registry
  holding only a `MultiProcessCollector` over that directory.
- vLLM's own engine-side numbers reach the API server only as
  `SchedulerStats` inside `EngineCoreOutputs`; msgspec decodes that class's
  declared fields and drops anything else, so a plugin cannot add to it.
- The supported hook in the API server is a `vllm.stat_logger_plugins`
  entry point (loaded by `AsyncLLM` only, that is by `vllm serve`): a
  `StatLoggerBase` subclass built with the config and the engine indexes.

So:
- EngineCore: when the pipeline's counters are created (`counters_for`), a
  hook installed by `register()` starts a `CountersExporter` thread that
  offers a snapshot once a second while the counters change. The engine
  step loop gains no work, lock or syscall.
- Default (no `PROMETHEUS_MULTIPROC_DIR`): the snapshot goes to
  `<dir>/<instance_id>/engine-<index>.json`; `AsyncExecutorStatLogger`, in the
  API server, creates `<dir>/<instance_id>/` (the engine writes only while it
  exists, so an offline `LLM` leaves no files) and registers one
  `SnapshotCollector` on `REGISTRY` that reads the files at scrape time.
  `<dir>`: `$ASYNC_EXECUTOR_METRICS_DIR`, else `<tmp>/async_executor_metrics-<uid>`.
- Multiprocess mode: the engine moves prometheus_client metrics in its own
  process, which prometheus_client writes to `PROMETHEUS_MULTIPROC_DIR`
  (inherited from the API server's launcher), and vLLM's
  `MultiProcessCollector` serves them; the stat logger does nothing.

Hazards:
- Values on `/metrics` lag the counters by up to `EXPORT_INTERVAL_S`.
- Any installed stat logger plugin makes `AsyncLLM` collect stats even under
  `--disable-log-stats` (vLLM's rule); `ASYNC_EXECUTOR_METRICS=0` does not
  undo that, `VLLM_PLUGINS` does.
- The engine and the API server must share a filesystem (`--headless`
  engines on other nodes export nothing in the default mode).
- Two engines in one process with the same `instance_id` and data parallel
  index would write one file; in multiprocess mode their counts add up.
- A killed server leaves `<dir>/<instance_id>/`; multiprocess files are
  prometheus_client's (vLLM warns that a user-set directory must be wiped
  between runs).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from async_executor.pipeline.counters import PipelineCounters
from async_executor.pipeline.metrics import (
    CountersExporter,
    PrometheusSink,
    SnapshotCollector,
    SnapshotFileSink,
)

logger = logging.getLogger(__name__)

EXPORT_FLAG = "ASYNC_EXECUTOR_METRICS"  # "0": no export
DIR_ENV = "ASYNC_EXECUTOR_METRICS_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXPORT_INTERVAL_S = 1.0


def export_enabled() -> bool:
    return os.environ.get(EXPORT_FLAG, "1").strip().lower() not in ("0", "false", "no", "off")


def multiprocess_mode() -> bool:
    return os.environ.get(MULTIPROC_ENV) is not None


def uses_async_executor(vllm_config: Any) -> bool:
    backend = vllm_config.parallel_config.distributed_executor_backend
    if isinstance(backend, str):
        return backend in ("async_executor", "async-executor") or backend.startswith(
            "async_executor."
        )
    return str(getattr(backend, "__module__", "")).startswith("async_executor.")


def metric_labels(vllm_config: Any, engine_index: int) -> tuple[str, str]:
    # vLLM's PrometheusStatLogger: model_name=served_model_name, engine=index.
    return str(vllm_config.model_config.served_model_name), str(engine_index)


def snapshot_root() -> Path:
    configured = os.environ.get(DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"async_executor_metrics-{os.getuid()}"


def snapshot_dir(vllm_config: Any) -> Path:
    # instance_id is set once where the config is made (the API server) and
    # travels with the pickled config to the EngineCore processes.
    return snapshot_root() / str(vllm_config.instance_id)


def snapshot_path(vllm_config: Any, engine_index: int) -> Path:
    return snapshot_dir(vllm_config) / f"engine-{engine_index}.json"


# --- EngineCore side --------------------------------------------------------


def start_export(config: object, counters: PipelineCounters) -> Callable[[], None] | None:
    """The `counters_for` hook: start exporting a new set of counters;
    returns what stops it."""
    vllm_config: Any = config
    if not export_enabled() or not hasattr(vllm_config, "parallel_config"):
        return None
    try:
        index = int(getattr(vllm_config.parallel_config, "data_parallel_index", 0) or 0)
        labels = metric_labels(vllm_config, index)
        sink: PrometheusSink | SnapshotFileSink
        if multiprocess_mode():
            sink = PrometheusSink(labels)
        else:
            sink = SnapshotFileSink(snapshot_path(vllm_config, index))
        exporter = CountersExporter(counters, sink, EXPORT_INTERVAL_S)
        exporter.start()
    except Exception:
        logger.warning("async_executor: metrics export not started", exc_info=True)
        return None
    return exporter.stop


# --- API server side --------------------------------------------------------

_COLLECTOR_LOCK = threading.Lock()
_COLLECTOR: SnapshotCollector | None = None


def snapshot_collector() -> SnapshotCollector:
    """The process's one collector on prometheus_client's REGISTRY (one
    family per name per registry: engines and servers share it)."""
    global _COLLECTOR
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            from prometheus_client import REGISTRY

            collector = SnapshotCollector()
            REGISTRY.register(collector)
            _COLLECTOR = collector
        return _COLLECTOR


def _private_dir(path: Path) -> bool:
    """Create `path` (and its parent) for this user only; refuse a parent
    that someone else owns (a shared temp dir)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        logger.warning("async_executor: metrics not exported: %s is not private", path.parent)
        return False
    path.mkdir(mode=0o700, exist_ok=True)
    return True


class AsyncExecutorStatLogger(AggregateStatLoggerBase):
    """The `vllm.stat_logger_plugins` entry point: in the API server, puts
    the engines' pipeline counters on `/metrics`. The counters come from the
    engines' snapshots, not from `record`'s SchedulerStats."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int]) -> None:
        self.exporting = False
        if not (export_enabled() and uses_async_executor(vllm_config)) or multiprocess_mode():
            return
        directory = snapshot_dir(vllm_config)
        try:
            if not _private_dir(directory):
                return
        except OSError:
            logger.warning("async_executor: metrics not exported", exc_info=True)
            return
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        collector = snapshot_collector()
        for index in engine_indexes or [0]:
            collector.add_source(
                snapshot_path(vllm_config, index), metric_labels(vllm_config, index)
            )
        self.exporting = True

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass
