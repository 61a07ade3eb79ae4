"""What an install puts into site-packages: our two packages, no generic
top-level `benchmarks` (it would collide with other projects'), and a
benchmark console script that works outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Build from a copy: an in-tree build would leave build/ and *.egg-info here.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*_cache", "results", "out"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=_NOT_SOURCES)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(tmp / "dist"), str(tmp / "src")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = (tmp / "dist").glob("async_executor-*.whl")
    return path


def test_wheel_has_no_top_level_benchmarks_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert not any(name.startswith("benchmarks/") for name in names), sorted(top)
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    assert top == {"async_executor", "async_executor_bench", dist_info}, sorted(top)
    # Every module of the checkout is in it, under its installed name.
    for source in ROOT.glob("async_executor/**/*.py"):
        assert source.relative_to(ROOT).as_posix() in names, source
    for source in ROOT.glob("benchmarks/*.py"):
        assert f"async_executor_bench/{source.name}" in names, source
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "async-executor-bench = async_executor_bench.__main__:main" in entry_points


def test_installed_benchmark_runs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed, the console script runs a benchmark away from the checkout:
    the orchestrator starts its per-system runner under the installed
    package's name."""
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
         str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (target / "benchmarks").exists()
    script = target / "bin" / "async-executor-bench"
    run = subprocess.run(
        [sys.executable, str(script), "--shape", "tiny", "--batch", "2", "--prompt-len", "8",
         "--gen-len", "8", "--device", "cpu", "--systems", "vllm-sync",
         "--out", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = "\n".join(p.read_text() for p in (tmp_path / "out").glob("*.log"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs[-3000:]
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["system"] == "vllm-sync" and record["tokens_per_s"] > 0, record
