"""The upstreaming proposals under patches/ apply to the vLLM this project
runs against (its Python sources are 0.32.0's in both builds)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("*.patch"))


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_to_vllm(patch: Path, tmp_path: Path) -> None:
    import vllm

    site = Path(vllm.__file__).resolve().parent.parent
    targets = set(re.findall(r"^--- a/(\S+)", patch.read_text(), re.M))
    assert targets, f"{patch.name} names no file"
    for target in targets:
        (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / target, tmp_path / target)
    out = subprocess.run(
        ["git", "apply", "--check", "-p1", str(patch)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_every_patch_has_a_row_in_the_index() -> None:
    index = (ROOT / "patches" / "README.md").read_text()
    for patch in PATCHES:
        assert f"`{patch.name}`" in index, patch.name
