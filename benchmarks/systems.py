"""The systems a benchmark compares, by name.

vllm-sync                  vLLM, synchronous (async_scheduling=False)
vllm-async                 vLLM's default executor with async scheduling
                           (vLLM forces it off on CPU; the record says so)
vllm-async-mp              vLLM's multiprocess executor, async scheduling
async_executor             ours, default settings
async_executor[k=v,...]    ours with settings, e.g. async_executor[decode_window=8]
hf-sync, hf-async          Hugging Face transformers continuous batching,
                           use_async_batching False / True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

VLLM_SYSTEMS: dict[str, dict[str, Any]] = {
    "vllm-sync": {"async_scheduling": False},
    "vllm-async": {},
    "vllm-async-mp": {"distributed_executor_backend": "mp"},
}
HF_SYSTEMS = {"hf-sync": False, "hf-async": True}
_OURS = re.compile(r"^async_executor(?:\[(?P<settings>[^\]]*)\])?$")


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "vllm" or "hf"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    hf_async: bool = False

    @property
    def ours(self) -> bool:
        return self.name.startswith("async_executor")


def _value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(raw)
    except ValueError:
        return raw


def parse_systems(text: str) -> list[System]:
    """A comma-separated list; commas inside brackets separate settings."""
    return [parse_system(name) for name in re.split(r",(?![^\[]*\])", text)]


def parse_system(name: str) -> System:
    name = name.strip()
    if name in VLLM_SYSTEMS:
        return System(name, "vllm", dict(VLLM_SYSTEMS[name]))
    if name in HF_SYSTEMS:
        return System(name, "hf", hf_async=HF_SYSTEMS[name])
    match = _OURS.match(name)
    if match:
        settings: dict[str, Any] = {}
        for item in filter(None, (match.group("settings") or "").split(",")):
            key, sep, raw = item.partition("=")
            if not sep:
                raise SystemExit(f"system {name!r}: expected key=value, got {item!r}")
            settings[key.strip()] = _value(raw.strip())
        from async_executor import pipeline_config

        kwargs = {
            "distributed_executor_backend": "async_executor",
            "additional_config": pipeline_config(**settings),
        }
        return System(name, "vllm", kwargs, settings)
    valid = [*VLLM_SYSTEMS, "async_executor", "async_executor[k=v,...]", *HF_SYSTEMS]
    raise SystemExit(f"unknown system {name!r}; valid: {', '.join(valid)}")
