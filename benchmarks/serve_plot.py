"""The serving benchmark's picture: per shape, TTFT p99 and TPOT p50 against
output tokens/s, one line per system through its rates (inf last); with
several rounds, the median of each rate's."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

from .serve_records import rate_label

PANELS = (("ttft_ms_p99", "TTFT p99 (ms)"), ("tpot_ms_p50", "TPOT p50 (ms)"))


def _rate_order(record: dict[str, Any]) -> float:
    rate = record["request_rate"]
    return float("inf") if rate == "inf" else float(rate)


def _medians_by_rate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per rate, in rate order: the median of each plotted figure
    over the rounds of an interleaved run (a record as is where there is one)."""
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for r in records:
        by_rate.setdefault(_rate_order(r), []).append(r)
    keys = ("output_tokens_per_s", *(key for key, _ in PANELS))
    return [
        group[0] | {key: median(r[key] for r in group) for key in keys}
        for _, group in sorted(by_rate.items())
    ]


def draw_serving(records: list[dict[str, Any]], path: Path) -> Path | None:
    measured = [r for r in records if not r.get("error") and r.get("completed")]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in measured))
    fig, axes = plt.subplots(len(shapes), len(PANELS), figsize=(12, 4.5 * len(shapes)),
                             squeeze=False)  # fmt: skip
    for row, shape in zip(axes, shapes, strict=True):
        of_shape = [r for r in measured if r["shape"] == shape]
        card = of_shape[0].get("card", "")
        for system in dict.fromkeys(r["system"] for r in of_shape):
            points = _medians_by_rate([r for r in of_shape if r["system"] == system])
            xs = [r["output_tokens_per_s"] for r in points]
            for ax, (key, _) in zip(row, PANELS, strict=True):
                ys = [r[key] for r in points]
                (line,) = ax.plot(xs, ys, marker="o", label=system)
                for x, y, r in zip(xs, ys, points, strict=True):
                    ax.annotate(rate_label(_rate_order(r)), (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=line.get_color())  # fmt: skip
        for ax, (_, label) in zip(row, PANELS, strict=True):
            ax.set_xlabel("output tokens/s")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{shape}: {label} vs throughput\n{card}", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle("vllm serve: latency against throughput (point labels: request rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
