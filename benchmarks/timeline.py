"""The timeline picture: host stages and device work of a few steps.

One panel per system (vLLM synchronous, or else vLLM's default, above
async_executor) of the first workload, one lane per host stage (schedule,
prepare, launch, advance, resolve, update) and one for the device
(kernels on GPU; the forward pass on CPU). Gaps in the device lane are the
device idling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LANES = ["schedule", "prepare", "launch", "advance", "resolve", "update", "device"]
COLORS = {
    "schedule": "#4c72b0",
    "prepare": "#55a868",
    "launch": "#8172b2",
    "advance": "#64b5cd",
    "resolve": "#c44e52",
    "update": "#ccb974",
    "device": "#222222",
}


def _pick(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    usable = [r for r in records if r.get("timeline")]
    if usable:
        # One workload: the first one's records.
        first = usable[0]
        key = ("batch", "prompt_len", "gen_len")
        usable = [r for r in usable if all(r[k] == first[k] for k in key)]
    # The baseline: vLLM synchronous if it ran, else vLLM's default.
    sync = next((r for r in usable if r["system"] == "vllm-sync"), None) or next(
        (r for r in usable if r["system"] == "vllm-async"), None
    )
    ours = [r for r in usable if r["system"].startswith("async_executor")]
    # The most tuned of ours: the last one listed.
    chosen = [r for r in (sync, ours[-1] if ours else None) if r is not None]
    return chosen or usable[:2]


def draw_timeline(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = _pick(records)
    if not chosen:
        raise ValueError("no record carries timeline data")
    fig, axes = plt.subplots(len(chosen), 1, figsize=(13, 2.2 + 1.6 * len(chosen)),
                             squeeze=False)  # fmt: skip
    for ax, record in zip(axes[:, 0], chosen, strict=True):
        tl = record["timeline"]
        w0, w1 = tl["window_ns"]
        rows: dict[str, list[tuple[float, float]]] = {lane: [] for lane in LANES}
        for lane, start, end, _tid in tl["spans"]:
            if lane == "forward":
                if not tl["kernels"]:  # CPU: the forward is the device work
                    rows["device"].append(((start - w0) / 1e6, (end - start) / 1e6))
                continue
            if lane in rows:
                rows[lane].append(((start - w0) / 1e6, (end - start) / 1e6))
        for start, end in tl["kernels"]:
            rows["device"].append(((start - w0) / 1e6, (end - start) / 1e6))
        for y, lane in enumerate(reversed(LANES)):
            ax.broken_barh(rows[lane], (y + 0.15, 0.7), facecolors=COLORS[lane])
        ax.set_yticks([y + 0.5 for y in range(len(LANES))])
        ax.set_yticklabels(list(reversed(LANES)))
        ax.set_xlim(0, (w1 - w0) / 1e6)
        busy = record.get("gpu_busy")
        ax.set_title(
            f"{record['system']}  batch {record['batch']}, {record['shape']}: "
            f"{record.get('tokens_per_s', 0):.0f} tok/s, device busy "
            f"{busy:.0%} ({record.get('card', '')})",
            fontsize=9, loc="left",
        )  # fmt: skip
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms (a window of about 12 decode steps mid-run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
