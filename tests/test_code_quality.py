"""The repository's own checks: lint, format, types, and the CI entry point
running exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_ruff_lint() -> None:
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format() -> None:
    out = _run("ruff", "format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy() -> None:
    out = _run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\n```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README must mark its test command"
    command = match.group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()
