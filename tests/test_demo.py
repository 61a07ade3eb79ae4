"""The demo, as a user runs it: our output, counters and exactness check,
not vLLM's log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent

# Every line the demo itself prints (blank lines aside).
DEMO_LINES = [
    r"model: .+",
    r"executor: async_executor \{.+\}",
    r"'.+' +-> '.*'",  # a prompt and its completion
    r"pipeline counters:",
    r"  \w+ +.+",  # a counter
    r"  \(windows_declined: .+\)",  # why no window opened, when none did
    r"same tokens as vLLM's synchronous path: (True|False)",
    r"generate time: .+",
]


def test_demo_prints_its_output_not_vllm_logs(tiny_model: str) -> None:
    env = dict(os.environ)
    # The test session lowers vLLM's logs its own way; the demo must do it alone.
    env.pop("VLLM_LOGGING_LEVEL", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run(
        [sys.executable, "-m", "async_executor.demo", "--out", tiny_model],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=550,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    lines = [line for line in output.splitlines() if line.strip()]
    warnings = [line for line in lines if "WARNING" in line]
    assert not warnings, "\n".join(warnings[:20])
    foreign = [line for line in lines if not any(re.fullmatch(p, line) for p in DEMO_LINES)]
    assert not foreign, "\n".join(foreign[:20])

    counters = dict(line.split(maxsplit=1) for line in lines if re.fullmatch(DEMO_LINES[4], line))
    assert int(counters["launched_before_predecessor_resolved"]) > 0, counters
    assert int(counters["carry_over_tokens"]) > 0, counters
    # Not asserted: windows. The demo keeps the latency bounds of serving,
    # which size windows from the measured step time (machine-dependent).
    assert "same tokens as vLLM's synchronous path: True" in lines
    assert sum(1 for line in lines if re.fullmatch(DEMO_LINES[2], line)) == 8
