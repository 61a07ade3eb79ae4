"""Pipeline settings: what a user can turn, and where they come from.

Settings travel inside vLLM's own config, under
`additional_config["async_executor"]`, so they reach the EngineCore process
whatever way the engine was started (`LLM(...)`, `vllm serve
--additional-config`, or a benchmark). Environment variables
(`ASYNC_EXECUTOR_<NAME>`) fill in what the config leaves unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

CONFIG_KEY = "async_executor"
ENV_PREFIX = "ASYNC_EXECUTOR_"

StageMode = Literal["auto", "thread", "inline", "process"]


class SettingsError(ValueError):
    """A pipeline setting has a wrong name, type or value."""


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    # Batches in flight at once: batch N+1 is scheduled and launched while up
    # to depth-1 earlier batches are still computing. 2 is double buffering.
    depth: int = 2
    # The A/B switch: False runs vLLM's synchronous step loop through this
    # executor (schedule, run, wait, update), everything else unchanged.
    overlap: bool = True
    # Decode steps per scheduled step ("decode window"), at most. With 4, a
    # request in steady decode is scheduled once and decodes 4 tokens back to
    # back on the device, each step's token carried over to the next on the
    # device. 1 turns windows off. The default, 2, halves the host's
    # scheduling and output work per token (measured faster than vLLM's async
    # scheduling where the host bounds it, and equal where the GPU does) and
    # costs a stream at most one extra step of latency (README, "Settings").
    decode_window: int = 2
    # Latency bounds on decode windows, for serving (0 turns a bound off).
    # A window's tokens reach a stream together: the largest gap between a
    # stream's tokens that a window may cause, in milliseconds.
    max_token_gap_ms: float = 50.0
    # A request that arrives while windows are in flight is admitted after
    # them: the largest extra delay a window may add to its admission, while
    # requests keep arriving.
    max_admission_delay_ms: float = 25.0
    # While requests keep arriving, a window opens only if windows were
    # measured to make decode steps of batches that size at least this much
    # faster than one-token steps (0.05: 5%). Where the device bounds the
    # step (a large model at a small batch) they gain nothing and would only
    # delay tokens and arrivals (`pipeline/window.py`, `WindowPayoff`). 0
    # turns the check off; so does max_admission_delay_ms=0 (an arrival's
    # delay is accepted then).
    min_window_gain: float = 0.05
    # Where the runner's work runs. "process": the worker in its own process,
    # so the engine schedules batch N+1 while N computes, without sharing a
    # GIL with it. "thread": a device-stage thread in the engine process.
    # "inline": on the engine thread (on CUDA, launches return before the
    # device finishes). "auto": process (measured fastest on CPU and on an
    # H200; README, "Settings").
    stage: StageMode = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or isinstance(self.depth, bool):
            raise SettingsError(f"depth must be an int, got {self.depth!r}")
        if not 2 <= self.depth <= 8:
            raise SettingsError(f"depth must be between 2 and 8, got {self.depth}")
        if not isinstance(self.overlap, bool):
            raise SettingsError(f"overlap must be true or false, got {self.overlap!r}")
        if not isinstance(self.decode_window, int) or isinstance(self.decode_window, bool):
            raise SettingsError(f"decode_window must be an int, got {self.decode_window!r}")
        if not 1 <= self.decode_window <= 64:
            raise SettingsError(f"decode_window must be between 1 and 64, got {self.decode_window}")
        for name in ("max_token_gap_ms", "max_admission_delay_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SettingsError(f"{name} must be a number of milliseconds, got {value!r}")
            if not 0 <= value <= 60_000:
                raise SettingsError(f"{name} must be between 0 and 60000 ms, got {value}")
        gain = self.min_window_gain
        if isinstance(gain, bool) or not isinstance(gain, int | float) or not 0 <= gain <= 10:
            raise SettingsError(
                f"min_window_gain must be a number between 0 and 10 (a fraction: 0.1 is 10%), "
                f"got {gain!r}"
            )
        if self.stage not in ("auto", "thread", "inline", "process"):
            raise SettingsError(
                f"stage must be 'auto', 'thread', 'inline' or 'process', got {self.stage!r}"
            )

    @property
    def in_flight_batches(self) -> int:
        """Batches the engine keeps in flight (vLLM's max_concurrent_batches)."""
        return self.depth if self.overlap else 1

    def to_config(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> PipelineSettings:
        """Build from a config mapping; environment variables fill the gaps."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(
                f"unknown async_executor setting(s) {unknown}; valid settings: {sorted(known)}"
            )
        merged: dict[str, Any] = {}
        env = os.environ if env is None else env
        for name, f in known.items():
            env_value = env.get(ENV_PREFIX + name.upper())
            if env_value is not None and env_value != "":
                merged[name] = _parse_env(name, env_value, f.default)
        merged.update(values)
        return cls(**merged)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> PipelineSettings:
        extra = getattr(vllm_config, "additional_config", None) or {}
        values = extra.get(CONFIG_KEY, {}) if isinstance(extra, Mapping) else {}
        if not isinstance(values, Mapping):
            raise SettingsError(
                f"additional_config[{CONFIG_KEY!r}] must be a mapping, got {type(values).__name__}"
            )
        return cls.from_mapping(values)


def _parse_env(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not an integer") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    return raw
