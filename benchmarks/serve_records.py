"""Records of the serving benchmark: from a `vllm bench serve` result file to
one record per system and request rate, counter deltas, the printed table.

Pure data handling (no vLLM import), so that it is unit-tested on a saved
result file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any

import numpy as np

# What `vllm bench serve --percentile-metrics ... --metric-percentiles ...`
# must be asked for, and the record keys its result keys become.
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)

# Every record of a measured rate carries these (SERVING.md says what each means).
REQUIRED_FIELDS = (
    "mode", "system", "shape", "card", "run_id", "request_rate", "max_concurrency",
    "num_prompts", "completed", "failed", "output_tokens_per_s",
    *(f"{m}_ms_p{p}" for m in ("ttft", "tpot", "itl") for p in PERCENTILES),
    "e2el_ms_p50", "e2el_ms_p99",
)  # fmt: skip

# Result key of `vllm bench serve` -> record key.
_SCALARS = {
    "completed": "completed",
    "failed": "failed",
    "duration": "duration_s",
    "total_input_tokens": "input_tokens",
    "total_output_tokens": "output_tokens",
    "request_throughput": "requests_per_s",
    "output_throughput": "output_tokens_per_s",
    "total_token_throughput": "total_tokens_per_s",
}


# Per-request lists of a `--save-detailed` result dropped from the kept file
# (megabytes per rate at rate inf): every inter-token gap, every generated
# text, and the prompt lengths (all equal). Kept: the per-request ttfts,
# latencies, output_lens, start_times and queue_times.
DROPPED_DETAIL = ("itls", "generated_texts", "input_lens")

# Bootstrap of the per-request latencies: resamples, seed, interval.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 90


class BenchResultError(ValueError):
    """A `vllm bench serve` result without what the record needs."""


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def metrics_from_bench(result: Mapping[str, Any]) -> dict[str, Any]:
    """The record's measured fields from a `vllm bench serve` result (its
    `--save-result` JSON). Latencies stay in milliseconds, as vLLM reports
    them; a missing key raises, so that a changed result format is caught."""
    try:
        out: dict[str, Any] = {mine: result[theirs] for theirs, mine in _SCALARS.items()}
        for metric in PERCENTILE_METRICS:
            out[f"{metric}_ms_mean"] = result[f"mean_{metric}_ms"]
            for p in PERCENTILES:
                out[f"{metric}_ms_p{p}"] = result[f"p{p}_{metric}_ms"]
    except KeyError as e:
        raise BenchResultError(
            f"`vllm bench serve` result has no {e.args[0]!r}; it must be run with "
            f"--percentile-metrics {','.join(PERCENTILE_METRICS)} "
            f"--metric-percentiles {','.join(map(str, PERCENTILES))}"
        ) from None
    out |= latency_intervals(result)
    rate = result.get("request_rate")
    out["request_rate"] = "inf" if rate in (None, "inf") else float(rate)
    out["max_concurrency"] = result.get("max_concurrency")
    out["num_prompts"] = result.get("num_prompts")
    return out


def trim_detail(result: dict[str, Any]) -> dict[str, Any]:
    """A `--save-detailed` result without the lists no record needs; an
    `errors` list is kept only if some request failed."""
    trimmed = {k: v for k, v in result.items() if k not in DROPPED_DETAIL}
    if not any(trimmed.get("errors") or ()):
        trimmed.pop("errors", None)
    return trimmed


def latency_intervals(result: Mapping[str, Any]) -> dict[str, Any]:
    """Bootstrap confidence intervals (`CI_LEVEL`%) of TTFT p50/p99 and TPOT
    p50 from a result's per-request lists (`--save-detailed`); nothing for a
    result without them. A p99 of 60 requests is about the largest one or
    two: the interval says how far another sample of the same load could
    move it.

    Requests are resampled in blocks of neighbours in start order
    (`block_length`), not one by one: under load, first tokens come in
    waves (requests sent together wait together behind the same prefills),
    so neighbours' latencies are not independent, and resampling them one by
    one gives intervals too narrow (SERVING.md, run 20261129-040704-h200)."""
    ttfts, latencies, lens = (result.get(k) for k in ("ttfts", "latencies", "output_lens"))
    if not ttfts or not latencies or not lens:
        return {}
    ttft = np.asarray(ttfts, dtype=float) * 1000
    lat = np.asarray(latencies, dtype=float) * 1000
    n = np.asarray(lens, dtype=float)
    starts = result.get("start_times")
    if starts is not None and len(starts) == len(ttft):
        order = np.argsort(np.asarray(starts, dtype=float), kind="stable")
        ttft, lat, n = ttft[order], lat[order], n[order]
    block = block_length(len(ttft))
    out: dict[str, Any] = {
        f"ttft_ms_p{p}_ci{CI_LEVEL}": bootstrap_interval(ttft, p, block) for p in (50, 99)
    }
    # TPOT as vLLM computes it: the time after the first token over the
    # tokens after it, for requests of more than one token.
    several = n > 1
    if several.any():
        tpot = (lat[several] - ttft[several]) / (n[several] - 1)
        out[f"tpot_ms_p50_ci{CI_LEVEL}"] = bootstrap_interval(tpot, 50, block_length(len(tpot)))
    return out


def block_length(n: int) -> int:
    """Requests per resampled block: the square root of their number (32 of
    1024, 8 of 60), long enough to hold a wave of first tokens."""
    return max(1, math.ceil(math.sqrt(n)))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, percentile: float, block: int = 1
) -> list[float]:
    """[low, high] of the percentile over resamples of `values` (numpy's
    default, linear, method: the one `vllm bench serve` reports). With
    `block` > 1, a moving-block bootstrap: each resample joins blocks of
    `block` neighbouring values from random starts, cut to the length of
    `values`, so that dependence between neighbours is kept."""
    data = np.asarray(values, dtype=float)
    size = len(data)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    if block <= 1 or size <= block:
        draws = rng.integers(0, size, size=(BOOTSTRAP_RESAMPLES, size))
    else:
        blocks = -(-size // block)
        first = rng.integers(0, size - block + 1, size=(BOOTSTRAP_RESAMPLES, blocks))
        draws = (first[:, :, None] + np.arange(block)).reshape(BOOTSTRAP_RESAMPLES, -1)[:, :size]
    stats = np.percentile(data[draws], percentile, axis=1)
    tail = (100 - CI_LEVEL) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return [round(float(low), 3), round(float(high), 3)]


def ratio_bounds(
    value_ci: Sequence[float] | None, base_ci: Sequence[float] | None
) -> list[float] | None:
    """Conservative bounds of a ratio of two independently measured figures,
    from their intervals: [low / base high, high / base low]."""
    if not value_ci or not base_ci or base_ci[0] <= 0 or base_ci[1] <= 0:
        return None
    return [round(value_ci[0] / base_ci[1], 4), round(value_ci[1] / base_ci[0], 4)]


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Counters of our pipeline (`async_executor_stats`) accrued between two
    reads. `max_in_flight` is a high-water mark since the server started, so
    it is taken as read after, not subtracted."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        if key == "max_in_flight":
            out[key] = value
        elif isinstance(value, Mapping):
            old = before.get(key, {})
            out[key] = {k: v - old.get(k, 0) for k, v in value.items() if v != old.get(k, 0)}
        else:
            out[key] = value - before.get(key, 0)
    return out


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def summary_table(records: list[dict[str, Any]]) -> str:
    """One block per shape: a row per system and rate."""
    lines: list[str] = []
    header = (f"{'system':36} {'rate':>6} {'conc':>5} {'done':>5} {'fail':>4} "
              f"{'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
              f"{'TPOT p99':>9} {'ITL p50':>8} {'E2EL p50':>9} {'windows':>8}")  # fmt: skip
    shapes: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        shapes.setdefault(r.get("shape", "?"), []).append(r)
    for shape, group in shapes.items():
        card = next((r["card"] for r in group if r.get("card")), "?")
        lines += [f"\nshape {shape} [{card}] (latencies in ms)", header]
        for r in group:
            rate = r.get("request_rate")
            rate_s = "-" if rate is None else rate_label(float(rate))
            if r.get("error"):
                lines.append(f"{r['system']:36} {rate_s:>6}  -- {r['error']}")
                continue
            stats = r.get("pipeline_stats") or {}
            conc = r.get("max_concurrency")
            lines.append(
                f"{r['system']:36} {rate_s:>6} {conc if conc is not None else '-':>5} "
                f"{r['completed']:>5} {r['failed']:>4} {r['output_tokens_per_s']:>10.0f} "
                f"{_ms(r['ttft_ms_p50']):>9} {_ms(r['ttft_ms_p99']):>9} "
                f"{_ms(r['tpot_ms_p50']):>9} {_ms(r['tpot_ms_p99']):>9} "
                f"{_ms(r['itl_ms_p50']):>8} {_ms(r['e2el_ms_p50']):>9} "
                f"{stats.get('windowed_batches', '-'):>8}"
            )
    return "\n".join(lines)


# What the paired summary of an interleaved run compares, per round.
PAIRED_RATIOS = (
    ("output_tokens_per_s", "output"),
    ("ttft_ms_p99", "ttft_p99"),
    ("tpot_ms_p50", "tpot_p50"),
)


def paired_ratios(records: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """Per system and rate of an interleaved run: each figure of
    `PAIRED_RATIOS` over the base system's in the same round, the median of
    those ratios and the ratios by round (rounds where either side failed
    are left out), and the median ITL p99."""
    measured = {(r["system"], str(r["request_rate"]), r.get("round", 0)): r
                for r in records if not r.get("error") and r.get("completed")}  # fmt: skip
    out: list[dict[str, Any]] = []
    systems = list(dict.fromkeys(s for s, _, _ in measured))
    rates = sorted({q for _, q, _ in measured}, key=lambda q: float(q))
    for system, rate in ((s, q) for q in rates for s in systems):
        rounds = sorted(k for s, q, k in measured if (s, q) == (system, rate)
                        and (base, rate, k) in measured)  # fmt: skip
        if not rounds:
            continue
        row: dict[str, Any] = {"system": system, "request_rate": measured[(system, rate, rounds[0])]
                               ["request_rate"], "rounds": rounds}  # fmt: skip
        for key, name in PAIRED_RATIOS:
            # None where the base's figure is 0 (on CPU a TPOT can be).
            by_round = [_ratio(measured[(system, rate, k)][key], measured[(base, rate, k)][key])
                        for k in rounds]  # fmt: skip
            known = [x for x in by_round if x is not None]
            row[f"{name}_ratio"] = float(median(known)) if known else None
            row[f"{name}_ratio_by_round"] = by_round
        ci = f"ttft_ms_p99_ci{CI_LEVEL}"
        row["ttft_p99_ratio_bounds_by_round"] = [
            ratio_bounds(measured[(system, rate, k)].get(ci), measured[(base, rate, k)].get(ci))
            for k in rounds
        ]
        row["itl_ms_p99"] = float(median([measured[(system, rate, k)]["itl_ms_p99"]
                                          for k in rounds]))  # fmt: skip
        out.append(row)
    return out


def _bounds(row: dict[str, Any]) -> str:
    known = [b for b in row.get("ttft_p99_ratio_bounds_by_round", ()) if b]
    if not known:
        return "-"
    return f"{min(b[0] for b in known):.2f}-{max(b[1] for b in known):.2f}"


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 4) if base else None


def paired_table(rows: list[dict[str, Any]], base: str) -> str:
    lines = [f"\npaired with {base}, same round (median over rounds; range; TTFT p99: "
             f"the widest {CI_LEVEL}% bounds over rounds)",
             f"{'system':36} {'rate':>6} {'output':>15} {'TTFT p99':>15} {'bounds':>11} "
             f"{'TPOT p50':>15} {'ITL p99 ms':>10}"]  # fmt: skip

    def cell(row: dict[str, Any], name: str) -> str:
        known = [x for x in row[f"{name}_ratio_by_round"] if x is not None]
        if not known:
            return "-"
        return f"{row[f'{name}_ratio']:.2f}x ({min(known):.2f}-{max(known):.2f})"

    for row in rows:
        rate = rate_label(float(row["request_rate"]))
        lines.append(f"{row['system']:36} {rate:>6} {cell(row, 'output'):>15} "
                     f"{cell(row, 'ttft_p99'):>15} {_bounds(row):>11} "
                     f"{cell(row, 'tpot_p50'):>15} {row['itl_ms_p99']:>10.1f}")  # fmt: skip
    return "\n".join(lines)
