"""Benchmark: one workload, several systems, one invocation.

    python -m benchmarks --preset smoke --out DIR
    python -m benchmarks --shape llama-1b --batch 128 --prompt-len 256 \
        --gen-len 1024 --systems vllm-sync,vllm-async,async_executor[decode_window=8] \
        --out DIR --timeline
    python -m benchmarks interleave ...   (systems alternated: interleave.py)
    python -m benchmarks serve ...        (a live server: serve.py)

Each system runs in its own process (`benchmarks.run_one`) on the same
prompts (random token ids, fixed seed), greedy, ignore_eos. Writes
DIR/results.json (one record per system and workload, sharing a run_id),
prints a summary table, and with --timeline (always for the smoke preset)
draws DIR/timeline.png: the host stages and the device work of a few steps,
synchronous vLLM above async_executor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .shapes import materialize
from .systems import parse_system

# Window settings with the latency bounds off (offline throughput).
UNBOUNDED = "max_token_gap_ms=0,max_admission_delay_ms=0"

PRESETS: dict[str, dict[str, Any]] = {
    # A tiny model on CPU, minutes on a 2-core machine; CI runs it.
    "smoke": dict(
        shape="tiny", workloads=[(32, 64, 128)], device="cpu", reps=2, timeline=True,
        systems=f"vllm-sync,vllm-async,async_executor,async_executor[decode_window=4,{UNBOUNDED}]",
    ),
    # The 1B shape where vLLM's host work per step exceeds the GPU's; both
    # workloads on one engine per system. vLLM with its default (uniproc)
    # executor and with its mp executor (faster where the host bounds it).
    # Windows with the latency bounds off: the mechanism itself.
    "cpu-bound": dict(
        shape="llama-1b", workloads=[(128, 256, 1024), (32, 256, 1024)], device="cuda",
        reps=2, attention_backend="FLASH_ATTN",
        systems="vllm-async,vllm-async-mp,async_executor," + ",".join(
            f"async_executor[decode_window={w},{UNBOUNDED}]" for w in (2, 16)),
    ),
    # The reference design's headline: 8B, 32 sequences, 8K new tokens. Two
    # minutes a call: busy is sampled over 10 s of the timed call.
    "reference": dict(
        shape="llama-8b", workloads=[(32, 256, 8192)], device="cuda", reps=1,
        attention_backend="FLASH_ATTN", timeline=True, busy_window=(40.0, 10.0),
        systems=f"vllm-sync,vllm-async,async_executor[decode_window=16,{UNBOUNDED}]",
    ),
}  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--shape", help="tiny, llama-1b, llama-8b, or a config.json path")
    p.add_argument("--batch", type=int, help="sequences (one workload)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--gen-len", type=int)
    p.add_argument(
        "--workloads", type=_workloads, metavar="BxPxG,...",
        help="several workloads (batch x prompt x new tokens), each vLLM system's "
        "engine started once for all of them, e.g. 128x256x1024,32x256x1024",
    )  # fmt: skip
    p.add_argument("--systems", help="comma-separated (see benchmarks/systems.py)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--attention-backend", help="e.g. TRITON_ATTN (GPU host)")
    p.add_argument("--reps", type=int, help="timed repetitions per system")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--timeline", action="store_true", help="write timeline.png")
    p.add_argument(
        "--busy-window", type=_busy_window, metavar="DELAY,LENGTH",
        help="measure busy over LENGTH seconds starting DELAY seconds into the last "
        "timed call, instead of tracing one more call whole (for long runs)",
    )  # fmt: skip
    p.add_argument("--models-dir", help="where model configs are written")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    return p.parse_args(argv)


def _workloads(text: str) -> list[tuple[int, int, int]]:
    try:
        out = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want BxPxG,... got {text!r}") from None
    if not out or any(len(w) != 3 or min(w) <= 0 for w in out):
        raise argparse.ArgumentTypeError(f"want BxPxG,... with positive numbers, got {text!r}")
    return out  # type: ignore[return-value]


def _busy_window(text: str) -> tuple[float, float]:
    try:
        delay, length = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want DELAY,LENGTH in seconds, got {text!r}") from None
    if delay < 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"want DELAY >= 0 and LENGTH > 0, got {text!r}")
    return delay, length


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    if args.shape:
        cfg["shape"] = args.shape
    if args.workloads:
        cfg["workloads"] = args.workloads
    elif args.batch or args.prompt_len or args.gen_len:
        base = cfg.get("workloads", [(32, 256, 1024)])[0]
        cfg["workloads"] = [(args.batch or base[0], args.prompt_len or base[1],
                             args.gen_len or base[2])]  # fmt: skip
    for key in ("systems", "reps", "device", "attention_backend", "busy_window"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    cfg.setdefault("shape", "tiny")
    cfg.setdefault("workloads", [(32, 256, 1024)])
    cfg.setdefault("reps", 1)
    cfg.setdefault("systems", "vllm-sync,vllm-async,async_executor")
    if "device" not in cfg:
        import torch

        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    cfg["timeline"] = bool(args.timeline or cfg.get("timeline"))
    return cfg


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="run", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["serve"]:  # the serving benchmark: benchmarks/serve.py
        from .serve import main as serve_main

        return serve_main(given[1:])
    if given[:1] == ["interleave"]:  # systems alternated: benchmarks/interleave.py
        from .interleave import main as interleave_main

        return interleave_main(given[1:])
    args = _parse(argv)
    cfg = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "async_executor_models")
    model = materialize(cfg["shape"], models_dir)
    # Commas inside brackets separate settings, not systems.
    systems = [parse_system(s) for s in re.split(r",(?![^\[]*\])", cfg["systems"])]
    # Several invocations of one session may share a run id.
    run_id = os.environ.get("ASYNC_EXECUTOR_RUN_ID") or (
        time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    )
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    records: list[dict[str, Any]] = []
    workloads = [list(w) for w in cfg["workloads"]]
    # One process per vLLM system for all workloads (an engine starts once);
    # transformers builds its cache per workload, so one process per workload.
    jobs = [(system, [w]) for system in systems if system.kind == "hf" for w in workloads]
    jobs[:0] = [(system, workloads) for system in systems if system.kind != "hf"]
    bar = _progress(len(jobs))
    for system, job_workloads in jobs:
        if bar is not None:
            bar.set_description(system.name)
        spec = dict(
            run_id=run_id, system=system.name, shape=model.shape, model=model.path,
            dummy=model.dummy, vocab_size=model.vocab_size, workloads=job_workloads,
            tp=args.tp, attention_backend=cfg.get("attention_backend"), reps=cfg["reps"],
            device=cfg["device"], busy_window=cfg.get("busy_window"), command=command,
        )  # fmt: skip
        records.extend(_run(spec, out, args.timeout))
        # After every system: a session cut short keeps what it measured.
        records.sort(key=lambda r: workloads.index([r["batch"], r["prompt_len"], r["gen_len"]]))
        (out / "results.json").write_text(json.dumps(records, indent=1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    print(summary_table(records))
    if cfg["timeline"]:
        from .timeline import draw_timeline

        path = draw_timeline(records, out / "timeline.png")
        print(f"timeline: {path}")
    print(f"records: {out / 'results.json'}")
    failed = [r for r in records if r.get("error")]
    return 1 if failed else 0


def _run(spec: dict[str, Any], out: Path, timeout: int) -> list[dict[str, Any]]:
    batches = "-".join(str(w[0]) for w in spec["workloads"])
    tag = f"{spec['system']}-b{batches}".replace("[", "_").replace("]", "")
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    spec_path, rec_path = out / f".{tag}.spec.json", out / f".{tag}.record.json"
    spec_path.write_text(json.dumps(spec))
    log = out / f"{tag}.log"
    with log.open("w") as fh:
        # Its own session, so that a timeout takes the engine's processes too.
        proc = subprocess.Popen(
            [sys.executable, "-m", f"{__package__}.run_one", str(spec_path), str(rec_path)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            why = f"exit {proc.wait(timeout=timeout * len(spec['workloads']))}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            why = f"timed out after {timeout} s per workload (--timeout)"
    spec_path.unlink(missing_ok=True)
    if proc.returncode != 0 or not rec_path.exists():
        tail = log.read_text()[-3000:]
        print(f"\n{spec['system']} failed ({why}); log {log}:\n{tail}")
        common = {k: spec[k] for k in ("run_id", "system", "shape", "tp")}
        return [
            common | {"batch": b, "prompt_len": p, "gen_len": g, "error": why, "log": str(log)}
            for b, p, g in spec["workloads"]
        ]
    records: list[dict[str, Any]] = json.loads(rec_path.read_text())
    rec_path.unlink()
    return records


def summary_table(records: list[dict[str, Any]]) -> str:
    """One block per workload. ratio: tok/s against the block's first system;
    ceiling: the call's kernel time plus the sub-10 us gaps inside CUDA graphs
    (the fastest any executor of these kernels can run it), shown against the
    first system's wall time; of-ceil: how close this system came to its own
    ceiling (ceiling / wall)."""
    lines = []
    width = max([42, *(len(r.get("system", "")) for r in records)])
    header = (f"{'system':{width}} {'batch':>5} {'tok/s':>9} {'wall s':>7} {'step ms':>7} "
              f"{'busy':>6} {'nvml':>5} {'ratio':>6} {'ceil s':>7} {'ceil x':>6} "
              f"{'of-ceil':>7}  same-out")  # fmt: skip
    by_workload: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault((r["batch"], r["prompt_len"], r["gen_len"]), []).append(r)
    for (batch, plen, glen), group in by_workload.items():
        first = next((r for r in group if "tokens_per_s" in r), None)
        card = first.get("card", "?") if first else "?"
        lines.append(f"\nworkload: batch {batch}, prompt {plen}, gen {glen}  [{card}]")
        lines.append(header)
        for r in group:
            if "tokens_per_s" not in r:
                why = r.get("skipped") or r.get("error")
                lines.append(f"{r['system']:{width}} {batch:>5}  -- {why}")
                continue
            ratio = r["tokens_per_s"] / first["tokens_per_s"] if first else 1.0
            nvml = r.get("gpu_busy_nvml")
            same = "yes" if first and r["output_digest"] == first["output_digest"] else "NO"
            if bool(r.get("transformers_version")) != bool(
                (first or {}).get("transformers_version")
            ):
                same = "n/a (other weights)"
            ceiling = r.get("ceiling_s")
            ceil_cols = (
                f"{ceiling:>7.2f} {first['wall_s'] / ceiling:>5.2f}x {r['ceiling_share']:>7.1%}"
                if ceiling and first
                else f"{'-':>7} {'-':>6} {'-':>7}"
            )
            lines.append(
                f"{r['system']:{width}} {batch:>5} {r['tokens_per_s']:>9.0f} {r['wall_s']:>7.2f} "
                f"{r['decode_step_ms']:>7.2f} {r['gpu_busy']:>6.1%} "
                f"{(f'{nvml:.0%}' if nvml is not None else '-'):>5} {ratio:>6.2f} {ceil_cols}  "
                f"{same}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
