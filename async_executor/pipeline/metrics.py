"""The pipeline's counters as Prometheus metrics (vLLM-independent).

The counters live in the process that runs the engine; Prometheus is scraped
in another one (vLLM's API server). An exporter thread next to the counters
hands a snapshot to a sink once per interval when the counters changed; the
engine's step loop pays nothing for it. Two sinks, one per way the scraping
process reads metrics:
- `SnapshotFileSink`: a JSON file per engine, read at scrape time by a
  `SnapshotCollector` registered in the scraping process;
- `PrometheusSink`: prometheus_client metrics in the counters' process, for
  Prometheus's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`), where every
  process's metrics reach the scrape through files that prometheus_client
  itself writes.
Both expose the same series, named by one table (`COUNTERS`, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from async_executor.pipeline.counters import PipelineCounters, PipelineStats

# Labelled the way vLLM labels its own per-engine metrics.
LABEL_NAMES = ("model_name", "engine")
WINDOW_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # counters: without the `_total` that the exposition adds
    field: str  # the PipelineStats field
    doc: str


COUNTERS = (
    MetricSpec(
        "async_executor_batches_launched", "batches_launched", "Batches handed to the device."
    ),
    MetricSpec(
        "async_executor_launched_ahead",
        "launched_before_predecessor_resolved",
        "Batches launched while the previous batch's sampled ids were not yet on the host.",
    ),
    MetricSpec(
        "async_executor_carry_over_tokens",
        "carry_over_tokens",
        "Input tokens filled in on the device from a predecessor's sampled ids.",
    ),
    MetricSpec("async_executor_device_steps", "device_steps", "One-token device steps run."),
    MetricSpec(
        "async_executor_windowed_batches",
        "windowed_batches",
        "Batches that ran a decode window of more than one device step.",
    ),
    MetricSpec(
        "async_executor_device_windows",
        "device_windows",
        "Windows whose steps after the first were advanced on the device alone.",
    ),
    MetricSpec(
        "async_executor_windows_declined",
        "windows_declined",
        "Scheduling steps, while requests arrived, that opened no window because windows "
        "were measured not to make decode steps faster.",
    ),
    MetricSpec(
        "async_executor_wasted_tokens",
        "wasted_tokens_dropped",
        "Tokens computed for a request that had already stopped, dropped on the host.",
    ),
)
MAX_IN_FLIGHT = MetricSpec(
    "async_executor_max_in_flight", "max_in_flight", "Most batches in flight at once."
)
WINDOW_SIZE = MetricSpec(
    "async_executor_window_size",
    "window_sizes",
    "Launched batches by device steps (decode window size; 1 = no window).",
)


def window_size_buckets(window_sizes: Mapping[int, int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (`le`, count) of {window size: batches},
    +Inf last; bounds spelled as prometheus_client's Histogram spells them."""
    bounds = [*map(float, WINDOW_SIZE_BUCKETS), float("inf")]
    return [
        (floatToGoString(b), float(sum(n for size, n in window_sizes.items() if size <= b)))
        for b in bounds
    ]


def metric_families(series: Iterable[tuple[Sequence[str], PipelineStats]]) -> list[Metric]:
    """One family per metric, one sample set per (labels, stats)."""
    series = list(series)
    families: list[Metric] = []
    for spec in COUNTERS:
        counter = CounterMetricFamily(spec.name, spec.doc, labels=LABEL_NAMES)
        for labels, stats in series:
            counter.add_metric(labels, getattr(stats, spec.field))
        families.append(counter)
    gauge = GaugeMetricFamily(MAX_IN_FLIGHT.name, MAX_IN_FLIGHT.doc, labels=LABEL_NAMES)
    for labels, stats in series:
        gauge.add_metric(labels, stats.max_in_flight)
    families.append(gauge)
    histogram = HistogramMetricFamily(WINDOW_SIZE.name, WINDOW_SIZE.doc, labels=LABEL_NAMES)
    for labels, stats in series:
        histogram.add_metric(
            labels,
            window_size_buckets(stats.window_sizes),
            sum_value=sum(size * n for size, n in stats.window_sizes.items()),
        )
    families.append(histogram)
    return families


# --- snapshot files ---------------------------------------------------------


def write_snapshot(path: Path, stats: PipelineStats) -> None:
    """Replace `path` atomically: a reader sees the old or the new snapshot."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(stats.as_dict()))
    os.replace(tmp, path)


def read_snapshot(path: Path) -> PipelineStats | None:
    try:
        return PipelineStats(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        # Missing (the engine has not written yet, or has shut down).
        return None


class Sink(Protocol):
    def export(self, stats: PipelineStats) -> bool:
        """Deliver a snapshot; False: not delivered, offer it again."""
        ...

    def close(self) -> None: ...


class SnapshotFileSink:
    """Writes the snapshot to `path`, but only while `path`'s directory
    exists: the reading side creates it, so an engine nobody scrapes (an
    offline `LLM`) leaves no files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, stats: PipelineStats) -> bool:
        try:
            write_snapshot(self.path, stats)
        except OSError:  # FileNotFoundError: no reader (yet)
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class SnapshotCollector(Collector):
    """The reading side of `SnapshotFileSink`: the snapshots of the
    registered files, read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[Path, tuple[str, ...]] = {}

    def add_source(self, path: Path, labels: Sequence[str]) -> None:
        with self._lock:
            self._sources[path] = tuple(labels)

    def describe(self) -> list[Metric]:
        return metric_families([])

    def collect(self) -> list[Metric]:
        with self._lock:
            sources = list(self._sources.items())
        series = []
        for path, labels in sources:
            stats = read_snapshot(path)
            if stats is not None:
                series.append((labels, stats))
        return metric_families(series)


# --- prometheus_client metrics (multiprocess mode) --------------------------

_PROM_LOCK = threading.Lock()
_PROM: dict[str, Any] = {}


def _prometheus_metrics() -> dict[str, Any]:
    """The process's metric objects, made once: two objects of one name would
    each write the same multiprocess file entry and overwrite each other."""
    with _PROM_LOCK:
        if not _PROM:
            for spec in COUNTERS:
                _PROM[spec.field] = Counter(spec.name, spec.doc, LABEL_NAMES, registry=None)
            _PROM[MAX_IN_FLIGHT.field] = Gauge(
                MAX_IN_FLIGHT.name,
                MAX_IN_FLIGHT.doc,
                LABEL_NAMES,
                registry=None,
                multiprocess_mode="max",
            )
            _PROM[WINDOW_SIZE.field] = Histogram(
                WINDOW_SIZE.name,
                WINDOW_SIZE.doc,
                LABEL_NAMES,
                registry=None,
                buckets=WINDOW_SIZE_BUCKETS,
            )
        return _PROM


class PrometheusSink:
    """Moves prometheus_client metrics (labelled `labels`) by the change
    since the last snapshot. Several sinks with the same labels in one
    process add up."""

    def __init__(self, labels: Sequence[str]) -> None:
        metrics = _prometheus_metrics()
        self._children = {name: metric.labels(*labels) for name, metric in metrics.items()}
        self._last = PipelineStats()

    def export(self, stats: PipelineStats) -> bool:
        last, children = self._last, self._children
        for spec in COUNTERS:
            delta = getattr(stats, spec.field) - getattr(last, spec.field)
            if delta > 0:
                children[spec.field].inc(delta)
        if stats.max_in_flight != last.max_in_flight:
            children[MAX_IN_FLIGHT.field].set(stats.max_in_flight)
        histogram = children[WINDOW_SIZE.field]
        for size, n in stats.window_sizes.items():
            # prometheus_client has no bulk observe; this runs on the
            # exporter thread, once per batch launched since the last export.
            for _ in range(n - last.window_sizes.get(size, 0)):
                histogram.observe(size)
        self._last = stats
        return True

    def close(self) -> None:
        pass


# --- the exporter thread ----------------------------------------------------


class CountersExporter:
    """Offers a snapshot of `counters` to `sink` every `interval` seconds
    while it differs from the last one delivered, and once more on `stop`."""

    def __init__(self, counters: PipelineCounters, sink: Sink, interval: float) -> None:
        self._counters = counters
        self._sink = sink
        self._interval = interval
        self._stopped = threading.Event()
        self._delivered: PipelineStats | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="async_executor-metrics", daemon=True
        )

    def start(self) -> None:
        self.export_now()
        self._thread.start()

    def export_now(self) -> None:
        with self._lock:
            stats = self._counters.snapshot()
            if stats != self._delivered and self._sink.export(stats):
                self._delivered = stats

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.export_now()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self.export_now()
        self._sink.close()
