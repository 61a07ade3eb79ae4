"""Counters that prove what the pipeline did.

Every test reads them: a run that silently fell back to vLLM's stock path
leaves them at zero, and fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class PipelineStats:
    """A snapshot of the counters (plain data, picklable)."""

    # Batches handed to the device stage.
    batches_launched: int = 0
    # Batches launched while the previous batch's sampled tokens were not yet
    # resolved on the host: the overlap itself.
    launched_before_predecessor_resolved: int = 0
    # Input tokens that were not yet known on the host when their batch was
    # launched, and were filled in on the device from a predecessor's
    # sampled ids (between batches and between the steps of a decode window).
    carry_over_tokens: int = 0
    # Device steps run (a decode window of w counts w).
    device_steps: int = 0
    # Batches that ran a decode window of more than one step.
    windowed_batches: int = 0
    # Windows whose steps after the first were advanced on the device alone
    # (no host input preparation); the others ran host-prepared steps.
    device_windows: int = 0
    # Tokens computed on the device and never delivered: the extra token of a
    # request that finished in an earlier in-flight batch, and the tail of a
    # decode window after a stop.
    wasted_tokens_dropped: int = 0
    # Scheduling steps that could have opened a window but did not, while
    # requests kept arriving, because windows were measured not to make decode
    # steps faster (`min_window_gain`).
    windows_declined: int = 0
    # Largest number of batches in flight at once.
    max_in_flight: int = 0
    # Launched batches by device steps: {window size: batches}; 1 = no window.
    window_sizes: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Keys arrive as strings after a trip through JSON (the HTTP RPC).
        self.window_sizes = {int(k): int(v) for k, v in self.window_sizes.items()}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merged(self, other: PipelineStats) -> PipelineStats:
        values: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "max_in_flight":
                values[f.name] = max(mine, theirs)
            elif isinstance(mine, Mapping):
                values[f.name] = _add_counts(mine, theirs)
            else:
                values[f.name] = mine + theirs
        return PipelineStats(**values)


def _add_counts(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


class PipelineCounters:
    """Thread-safe counters, bumped from the engine and device-stage threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = PipelineStats()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def launched(self, *, ahead: bool, device_steps: int, in_flight: int) -> None:
        """One batch launched: every launch-time counter under one lock."""
        with self._lock:
            s = self._stats
            s.batches_launched += 1
            s.launched_before_predecessor_resolved += ahead
            s.device_steps += device_steps
            s.windowed_batches += device_steps > 1
            s.window_sizes[device_steps] = s.window_sizes.get(device_steps, 0) + 1
            if in_flight > s.max_in_flight:
                s.max_in_flight = in_flight

    def observe_in_flight(self, n: int) -> None:
        with self._lock:
            if n > self._stats.max_in_flight:
                self._stats.max_in_flight = n

    def snapshot(self) -> PipelineStats:
        with self._lock:
            s = self._stats
            copy = PipelineStats(**{f.name: getattr(s, f.name) for f in fields(s)})
            copy.window_sizes = dict(s.window_sizes)
            return copy


# The executor and the scheduler of one engine are built from the same
# VllmConfig object in the EngineCore process; the counters are keyed by it so
# both bump the same set.
_BY_CONFIG: dict[int, PipelineCounters] = {}
_REGISTRY_LOCK = threading.Lock()

# Run once per set of counters, when it is created (the metrics export,
# `vllm_glue/metrics.py`); what a hook returns is called when the set is
# released. Hooks run under the registry lock: they must be quick and must not
# call `counters_for`.
CountersHook = Callable[[object, PipelineCounters], Callable[[], None] | None]
_HOOKS: list[CountersHook] = []
_ON_RELEASE: dict[int, list[Callable[[], None]]] = {}


def on_counters_created(hook: CountersHook) -> None:
    with _REGISTRY_LOCK:
        if hook not in _HOOKS:
            _HOOKS.append(hook)


def counters_for(config: object) -> PipelineCounters:
    with _REGISTRY_LOCK:
        counters = _BY_CONFIG.get(id(config))
        if counters is None:
            counters = _BY_CONFIG[id(config)] = PipelineCounters()
            releases = [hook(config, counters) for hook in _HOOKS]
            _ON_RELEASE[id(config)] = [r for r in releases if r is not None]
        return counters


def release_counters(config: object) -> None:
    with _REGISTRY_LOCK:
        _BY_CONFIG.pop(id(config), None)
        releases = _ON_RELEASE.pop(id(config), [])
    for release in releases:
        release()
