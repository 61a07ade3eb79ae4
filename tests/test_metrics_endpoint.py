"""The pipeline's counters on vLLM's Prometheus endpoint (`/metrics`).

Units: the mapping of counters to series, both sinks, the exporter thread,
the counters hook, the stat logger. End to end: a real `vllm serve` on our
executor, scraped without dev mode, and in Prometheus's multiprocess mode
compared with the counters read through `collective_rpc`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from async_executor.pipeline import counters as counters_module
from async_executor.pipeline.counters import PipelineCounters, PipelineStats
from async_executor.pipeline.metrics import (
    COUNTERS,
    CountersExporter,
    PrometheusSink,
    SnapshotCollector,
    SnapshotFileSink,
    read_snapshot,
    window_size_buckets,
    write_snapshot,
)
from tests.conftest import corpus_prompts, deterministic_windows
from tests.serve_util import Job, Result, run_job, sync_reference, vllm_server

REPO = Path(__file__).resolve().parents[1]
PLUGIN_GROUP = "vllm.stat_logger_plugins"

# Series name (as exposed) -> PipelineStats field.
COUNTER_SERIES = {spec.name + "_total": spec.field for spec in COUNTERS}


def _stats(**kw: Any) -> PipelineStats:
    # Batches by window size; batches and device steps follow from them.
    sizes = {1: 5, 3: 3, 4: 12, 64: 2}
    base = dict(
        batches_launched=sum(sizes.values()),
        launched_before_predecessor_resolved=11,
        carry_over_tokens=40,
        device_steps=sum(k * n for k, n in sizes.items()),
        windowed_batches=sum(n for k, n in sizes.items() if k > 1),
        wasted_tokens_dropped=3,
        max_in_flight=2,
        window_sizes=sizes,
    )
    base.update(kw)
    return PipelineStats(**base)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("async_executor_")
    }


def _series_of(samples: dict[Any, float], labels: dict[str, str]) -> dict[str, float]:
    """{name or name{le=..}: value} of the samples that carry `labels`."""
    out = {}
    for (name, sample_labels), value in samples.items():
        d = dict(sample_labels)
        if all(d.get(k) == v for k, v in labels.items()):
            out[name + (f"{{le={d['le']}}}" if "le" in d else "")] = value
    return out


def _expected_series(s: PipelineStats) -> dict[str, float]:
    out = {name: float(getattr(s, field)) for name, field in COUNTER_SERIES.items()}
    out["async_executor_max_in_flight"] = float(s.max_in_flight)
    for le, n in window_size_buckets(s.window_sizes):
        out[f"async_executor_window_size_bucket{{le={le}}}"] = n
    out["async_executor_window_size_count"] = float(s.batches_launched)
    out["async_executor_window_size_sum"] = float(s.device_steps)
    return out


# -- units ----------------------------------------------------------------


def test_every_counter_has_a_series() -> None:
    """A counter added to PipelineStats reaches /metrics too."""
    from dataclasses import fields

    from async_executor.pipeline import metrics
    from async_executor.pipeline.counters import PipelineStats

    exported = {
        spec.field for spec in (*metrics.COUNTERS, metrics.MAX_IN_FLIGHT, metrics.WINDOW_SIZE)
    }
    assert {f.name for f in fields(PipelineStats)} == exported


def test_window_size_buckets_are_cumulative_up_to_inf() -> None:
    buckets = window_size_buckets({1: 5, 3: 3, 4: 12, 64: 2})
    assert buckets == [
        ("1.0", 5.0),
        ("2.0", 5.0),
        ("4.0", 20.0),
        ("8.0", 20.0),
        ("16.0", 20.0),
        ("32.0", 20.0),
        ("64.0", 22.0),
        ("+Inf", 22.0),
    ]
    assert window_size_buckets({})[-1] == ("+Inf", 0.0)
    assert window_size_buckets({100: 1})[-2:] == [("64.0", 0.0), ("+Inf", 1.0)]


def test_snapshot_files_reach_a_registry_as_series(tmp_path: Path) -> None:
    s0, s1 = _stats(), _stats(batches_launched=1, window_sizes={1: 1}, device_steps=1)
    write_snapshot(tmp_path / "engine-0.json", s0)
    write_snapshot(tmp_path / "engine-1.json", s1)
    assert read_snapshot(tmp_path / "engine-0.json") == s0  # window sizes keyed by int again
    assert read_snapshot(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_snapshot(tmp_path / "bad.json") is None

    collector = SnapshotCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    for i, name in enumerate(["engine-0.json", "engine-1.json", "missing.json", "bad.json"]):
        collector.add_source(tmp_path / name, ["m", str(i)])
    samples = _samples(generate_latest(registry).decode())
    assert _series_of(samples, {"engine": "0"}) == _expected_series(s0)
    assert _series_of(samples, {"engine": "1"}) == _expected_series(s1)
    # No engine that has no snapshot; every series labelled like vLLM's.
    assert {dict(labels)["engine"] for _, labels in samples} == {"0", "1"}
    assert all(dict(labels)["model_name"] == "m" for _, labels in samples)


def test_file_sink_writes_only_while_the_reader_directory_exists(tmp_path: Path) -> None:
    sink = SnapshotFileSink(tmp_path / "instance" / "engine-0.json")
    assert sink.export(_stats()) is False
    assert not (tmp_path / "instance").exists()
    (tmp_path / "instance").mkdir()
    assert sink.export(_stats()) is True
    assert read_snapshot(sink.path) == _stats()
    sink.close()
    assert not sink.path.exists()


def test_prometheus_sink_moves_metrics_by_the_change(tmp_path: Path) -> None:
    # prometheus_client's metrics are per process: labels of this run only.
    labels = [f"sink-test-{uuid.uuid4()}", "7"]
    sink = PrometheusSink(labels)
    first = _stats(
        batches_launched=3, device_steps=6, windowed_batches=1, window_sizes={1: 2, 4: 1}
    )
    assert sink.export(first)
    second = _stats()
    assert sink.export(second)
    assert sink.export(second)  # unchanged: nothing moves

    from async_executor.pipeline.metrics import _prometheus_metrics

    registry = CollectorRegistry()
    for metric in _prometheus_metrics().values():
        registry.register(metric)
    samples = _samples(generate_latest(registry).decode())
    got = _series_of(samples, {"model_name": labels[0], "engine": "7"})
    got = {k: v for k, v in got.items() if not k.endswith("_created")}
    # The same series as the snapshot files give.
    assert got == _expected_series(second)


class _Sink:
    def __init__(self) -> None:
        self.accept = False
        self.offered: list[PipelineStats] = []
        self.closed = False
        self.delivered = threading.Event()

    def export(self, stats: PipelineStats) -> bool:
        self.offered.append(stats)
        if self.accept:
            self.delivered.set()
        return self.accept

    def close(self) -> None:
        self.closed = True


def test_exporter_offers_changes_until_delivered_and_flushes_on_stop() -> None:
    counters = PipelineCounters()
    sink = _Sink()
    exporter = CountersExporter(counters, sink, interval=3600.0)
    exporter.start()  # offers the zero snapshot at once; refused
    assert sink.offered == [PipelineStats()]
    exporter.export_now()  # refused before: offered again
    sink.accept = True
    exporter.export_now()
    assert len(sink.offered) == 3
    exporter.export_now()  # delivered and unchanged: not offered
    assert len(sink.offered) == 3
    counters.launched(ahead=True, device_steps=4, in_flight=2)
    exporter.stop()  # the last change reaches the sink before it closes
    assert sink.offered[-1] == counters.snapshot() and sink.closed
    assert sink.offered[-1].window_sizes == {4: 1}


def test_exporter_thread_exports_without_being_asked() -> None:
    counters = PipelineCounters()
    sink = _Sink()
    sink.accept = True
    exporter = CountersExporter(counters, sink, interval=0.01)
    exporter.start()
    sink.delivered.clear()
    counters.add(wasted_tokens_dropped=5)
    try:
        # Generous: only that it happens, not how fast.
        deadline = time.monotonic() + 60
        while sink.offered[-1].wasted_tokens_dropped != 5:
            assert time.monotonic() < deadline, "the exporter thread never exported"
            time.sleep(0.01)
    finally:
        exporter.stop()


def test_counters_hook_runs_once_per_set_and_its_result_on_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(counters_module, "_HOOKS", [])
    calls: list[tuple[str, object]] = []

    def hook(config: object, counters: PipelineCounters) -> Any:
        calls.append(("created", config))
        return lambda: calls.append(("released", config))

    counters_module.on_counters_created(hook)
    counters_module.on_counters_created(hook)  # idempotent, as register() is
    config = object()
    a = counters_module.counters_for(config)
    assert counters_module.counters_for(config) is a
    assert calls == [("created", config)]
    counters_module.release_counters(config)
    counters_module.release_counters(config)
    assert calls == [("created", config), ("released", config)]


def _fake_vllm_config(backend: Any, instance_id: str = "123") -> Any:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(distributed_executor_backend=backend),
        model_config=SimpleNamespace(served_model_name="served"),
        instance_id=instance_id,
    )


def test_stat_logger_reads_the_engines_of_our_executor_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_executor.vllm_glue import metrics as glue

    monkeypatch.setenv(glue.DIR_ENV, str(tmp_path / "root"))
    monkeypatch.delenv(glue.MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(glue.EXPORT_FLAG, raising=False)
    monkeypatch.setattr(glue, "snapshot_collector", lambda: collector)
    collector = SnapshotCollector()

    assert not glue.AsyncExecutorStatLogger(_fake_vllm_config("mp"), [0]).exporting
    assert not (tmp_path / "root").exists()
    for backend in ("async_executor", "async_executor.vllm_glue.executor.AsyncExecutor"):
        assert glue.uses_async_executor(_fake_vllm_config(backend))

    config = _fake_vllm_config("async_executor")
    logger = glue.AsyncExecutorStatLogger(config, [0, 1])
    assert logger.exporting
    assert (tmp_path / "root" / "123").is_dir()
    assert collector._sources == {
        tmp_path / "root" / "123" / "engine-0.json": ("served", "0"),
        tmp_path / "root" / "123" / "engine-1.json": ("served", "1"),
    }
    monkeypatch.setenv(glue.MULTIPROC_ENV, str(tmp_path / "prom"))
    assert not glue.AsyncExecutorStatLogger(_fake_vllm_config("async_executor", "9"), [0]).exporting
    monkeypatch.delenv(glue.MULTIPROC_ENV)
    monkeypatch.setenv(glue.EXPORT_FLAG, "0")
    assert not glue.AsyncExecutorStatLogger(_fake_vllm_config("async_executor", "8"), [0]).exporting


def test_stat_logger_is_declared_as_a_vllm_plugin() -> None:
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase, PrometheusStatLogger

    from async_executor.vllm_glue.metrics import AsyncExecutorStatLogger

    declared = _declared_stat_logger_plugins()
    assert declared == {
        "async_executor": "async_executor.vllm_glue.metrics:AsyncExecutorStatLogger"
    }
    # An aggregate logger (one per AsyncLLM, all engines) that is not a
    # PrometheusStatLogger (which would replace vLLM's own).
    assert issubclass(AsyncExecutorStatLogger, AggregateStatLoggerBase)
    assert not issubclass(AsyncExecutorStatLogger, PrometheusStatLogger)


# -- end to end -----------------------------------------------------------


def _declared_stat_logger_plugins() -> dict[str, str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    return dict(project["entry-points"][PLUGIN_GROUP])


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Where the `vllm serve` subprocess finds the stat logger entry point.
    An install made before pyproject.toml declared it (a stale editable
    install) lacks it: then a metadata-only distribution carrying exactly
    pyproject's declaration goes on the path."""
    declared = _declared_stat_logger_plugins()
    installed = {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    if all(installed.get(k) == v for k, v in declared.items()):
        return []
    root = tmp_path_factory.mktemp("plugin-metadata")
    dist = root / "async_executor_stat_logger_metadata-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: async-executor-stat-logger-metadata\nVersion: 0\n"
    )
    lines = [f"[{PLUGIN_GROUP}]", *(f"{k} = {v}" for k, v in declared.items())]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return [str(root)]


def _request(
    url: str, body: dict[str, Any] | None = None, timeout: float = 120
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def _serve(
    model: str,
    log_path: Path,
    env_changes: dict[str, str | None],
    extra_path: list[str],
    extra_args: list[str] | None = None,
) -> Iterator[str]:
    path = [str(REPO), *extra_path, *filter(None, [os.environ.get("PYTHONPATH")])]
    with vllm_server(
        model, log_path, pipeline=deterministic_windows({"decode_window": 4}),
        startup_timeout=600, extra_args=extra_args,
        env_changes={**env_changes, "PYTHONPATH": os.pathsep.join(path)},
    ) as server:  # fmt: skip
        yield server.base


def _completions(base: str, model: str, n: int) -> int:
    """n requests one after the other; returns the tokens generated."""
    generated = 0
    for prompt in corpus_prompts(n):
        status, body = _request(
            base + "/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0},
        )
        assert status == 200, body
        generated += json.loads(body)["usage"]["completion_tokens"]
    return generated


def _scrape(base: str, model: str) -> dict[str, float]:
    status, body = _request(base + "/metrics")
    assert status == 200
    text = body.decode()
    assert "vllm:" in text  # vLLM's own metrics are still there
    return _series_of(_samples(text), {"model_name": model, "engine": "0"})


def _eventually(check: Any, what: str) -> Any:
    """Polls `check` (exported values trail the counters by up to a second)."""
    deadline = time.monotonic() + 120
    while True:
        result = check()
        if result is not None:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_metrics_endpoint_without_dev_mode(
    tiny_model: str, tmp_path: Path, plugin_path: list[str]
) -> None:
    """The default setup (one API server, EngineCore in its own process, no
    dev mode): every async_executor_* series on /metrics, consistent within
    itself and with what the requests imply."""
    env = {
        "VLLM_SERVER_DEV_MODE": None,
        "PROMETHEUS_MULTIPROC_DIR": None,
        "ASYNC_EXECUTOR_METRICS_DIR": str(tmp_path / "metrics"),
    }
    with _serve(tiny_model, tmp_path / "serve.log", env, plugin_path) as base:
        # Dev mode is off: the old way of reading the counters is closed.
        assert _request(base + "/collective_rpc", {"method": "async_executor_stats"})[0] == 404
        generated = _completions(base, tiny_model, 4)

        def settled() -> dict[str, float] | None:
            m = _scrape(base, tiny_model)
            if m.get("async_executor_device_steps_total", 0) >= generated:
                return m
            return None

        m = _eventually(settled, "device steps never reached the tokens generated")

    expected_names = {
        *COUNTER_SERIES,
        "async_executor_max_in_flight",
        "async_executor_window_size_count",
        "async_executor_window_size_sum",
        *(f"async_executor_window_size_bucket{{le={le}}}" for le, _ in window_size_buckets({})),
    }
    assert set(m) == expected_names, m
    launched = m["async_executor_batches_launched_total"]
    steps = m["async_executor_device_steps_total"]
    # One snapshot: the histogram agrees with the counters exactly.
    assert m["async_executor_window_size_count"] == launched
    assert m["async_executor_window_size_sum"] == steps
    assert m["async_executor_window_size_bucket{le=+Inf}"] == launched
    unwindowed = m["async_executor_window_size_bucket{le=1.0}"]
    assert m["async_executor_windowed_batches_total"] == launched - unwindowed
    # Requests one at a time: one token per request per device step, at most
    # a window of 4 device steps per batch; windows opened, batches overlapped.
    assert steps >= generated
    assert launched * 4 >= steps
    assert m["async_executor_window_size_bucket{le=4.0}"] == launched
    assert m["async_executor_windowed_batches_total"] > 0
    assert m["async_executor_launched_ahead_total"] > 0
    assert m["async_executor_carry_over_tokens_total"] > 0
    assert 1 <= m["async_executor_max_in_flight"] <= 2  # depth 2
    assert m["async_executor_wasted_tokens_total"] >= 0
    # The server's snapshot directory is gone with it.
    assert list((tmp_path / "metrics").iterdir()) == []


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_metrics_endpoint_in_multiprocess_mode_equals_the_counters(
    tiny_model: str, tmp_path: Path, plugin_path: list[str]
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (what `--api-server-count` > 1 sets),
    vLLM serves /metrics from prometheus_client's multiprocess files: the
    engine's series equal the counters read through collective_rpc."""
    (tmp_path / "prom").mkdir()
    env = {
        "VLLM_SERVER_DEV_MODE": "1",  # for the counters read the old way
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "ASYNC_EXECUTOR_METRICS_DIR": str(tmp_path / "metrics"),
    }
    with _serve(tiny_model, tmp_path / "serve.log", env, plugin_path) as base:
        generated = _completions(base, tiny_model, 4)

        def agreed() -> tuple[dict[str, float], PipelineStats] | None:
            status, body = _request(base + "/collective_rpc", {"method": "async_executor_stats"})
            assert status == 200, body
            counters = PipelineStats(**json.loads(body)["results"][0])
            m = _scrape(base, tiny_model)
            return (m, counters) if m == _expected_series(counters) else None

        m, counters = _eventually(agreed, "/metrics never matched the counters")
    assert counters.device_steps >= generated and counters.windowed_batches > 0, counters
    assert m["async_executor_window_size_count"] == counters.batches_launched
    # No snapshot files in this mode.
    assert not (tmp_path / "metrics").exists()


async def _run_all(base: str, model: str, jobs: list[Job]) -> list[Result]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        url = base + "/v1/completions"
        return list(await asyncio.gather(*(run_job(session, url, model, job) for job in jobs)))


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_several_api_servers_serve_exactly_and_export_once(
    tiny_model: str, tmp_path: Path, plugin_path: list[str]
) -> None:
    """`--api-server-count 2`, which README advises under high concurrency
    (at rate inf one API server process bounded both executors, run
    20261129-065520-h200): concurrent requests, streamed and not, equal
    vLLM's synchronous path token for token, and /metrics, served by
    whichever API server answers from prometheus_client's multiprocess
    files (vLLM sets the directory), carries each pipeline series once,
    equal to the engine's counters."""
    prompts = corpus_prompts(8)
    jobs = [Job(p, n, stream=(i + j) % 2 == 1)
            for i, p in enumerate(prompts) for j, n in enumerate((1, 5, 16, 40))]  # fmt: skip
    reference = sync_reference(tiny_model, jobs, max_model_len=256)

    env = {"VLLM_SERVER_DEV_MODE": "1", "PROMETHEUS_MULTIPROC_DIR": None}
    extra = ["--api-server-count", "2"]
    with _serve(tiny_model, tmp_path / "serve.log", env, plugin_path, extra) as base:
        results = asyncio.run(_run_all(base, tiny_model, jobs))
        for job, r in zip(jobs, results, strict=True):
            want = reference[(job.prompt, job.max_tokens)]
            assert r.status == 200, (job, r)
            assert r.token_ids == list(want.token_ids), (job, r)
            assert r.text == want.text and r.finish_reason == want.finish_reason, (job, r)
            assert r.usage_tokens == len(r.token_ids), (job, r)
            assert r.done_marker is job.stream, (job, r)

        def agreed() -> tuple[list[Any], PipelineStats] | None:
            status, body = _request(base + "/collective_rpc", {"method": "async_executor_stats"})
            assert status == 200, body
            counters = PipelineStats(**json.loads(body)["results"][0])
            status, text = _request(base + "/metrics")
            assert status == 200
            samples = _samples(text.decode())
            m = _series_of(samples, {"model_name": tiny_model, "engine": "0"})
            return (list(samples), counters) if m == _expected_series(counters) else None

        samples, counters = _eventually(agreed, "/metrics never matched the counters")
    # One engine: each series once, whichever process wrote or served it.
    assert len(samples) == len(_expected_series(counters)), samples
    assert counters.windowed_batches > 0 and counters.launched_before_predecessor_resolved > 0
    assert counters.device_steps >= max(j.max_tokens for j in jobs), counters
