"""Serving benchmark: a live `vllm serve` per system, driven by `vllm bench serve`.

    python -m benchmarks serve --preset cpu-smoke --out DIR
    python -m benchmarks serve --preset h200-1b --out DIR
    python -m benchmarks serve --shape llama-1b --device cuda \
        --systems 'vllm-async,async_executor[decode_window=8]' \
        --rates 8,32,64 --max-concurrency 256 --input-len 256 --output-len 128:512 \
        --attention-backend FLASH_ATTN --out DIR

For each system (named as in benchmarks/systems.py): start `vllm serve` on a
free loopback port, then for each request rate run `vllm bench serve` on the
random dataset (Poisson arrivals at each rate, then rate inf at a fixed
max concurrency), and read our pipeline's counters around each rate. Writes
DIR/serve.json (one record per system and rate, rewritten after every
rate), prints a table, draws DIR/serve.png. benchmarks/SERVING.md has the
fields.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .serve_client import BenchClient
from .serve_records import (
    PERCENTILE_METRICS,
    PERCENTILES,
    BenchResultError,
    metrics_from_bench,
    paired_ratios,
    paired_table,
    rate_label,
    stats_delta,
    summary_table,
    trim_detail,
)
from .serve_server import (
    VLLM_CLI,
    Server,
    ServerError,
    log_facts,
    machine_name,
    read_pipeline_stats,
    running_server,
    running_servers,
    serve_flags,
)
from .shapes import Model, materialize
from .systems import System, parse_systems

PRESETS: dict[str, dict[str, Any]] = {
    # The tiny model on CPU: about two minutes on a 2-core machine; CI runs it.
    # Windows with the latency bounds off: a slow machine's step time must not
    # decide whether they open.
    "cpu-smoke": dict(
        shape="tiny", device="cpu",
        systems="vllm-async,async_executor[decode_window=4,max_token_gap_ms=0,"
        "max_admission_delay_ms=0]",
        rates=[8.0, 48.0], max_concurrency=8, num_prompts=24,
        input_len=32, output_len=(32, 96),
    ),
    # Dummy weights on one H200. Per system about 5-6 minutes: about 140 s to
    # start, and per rate 20 s of Poisson arrivals (at least num_prompts) and
    # the queue's drain; max(num_prompts, 4 x 256) requests at rate inf.
    # Rates run from light load past the point where vLLM async's queue
    # grows (1B: between 48 and 64 req/s, run 20261128-225506-h200); 1B's 96
    # is meant to lie past ours.
    "h200-1b": dict(
        shape="llama-1b", device="cuda", attention_backend="FLASH_ATTN",
        systems="vllm-async,async_executor,async_executor[decode_window=8]",
        rates=[16.0, 32.0, 48.0, 64.0, 96.0], max_concurrency=256, num_prompts=160,
        seconds=20.0, input_len=256, output_len=(128, 512),
    ),
    "h200-8b": dict(
        shape="llama-8b", device="cuda", attention_backend="FLASH_ATTN",
        systems="vllm-async,async_executor,async_executor[decode_window=8]",
        rates=[4.0, 16.0, 32.0, 48.0], max_concurrency=256, num_prompts=100,
        seconds=20.0, input_len=256, output_len=(128, 512),
    ),
}  # fmt: skip

# CPU engines: the flags the tests use (tests/conftest.py ENGINE_DEFAULTS).
CPU_FLAGS = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)]
CUDA_FLAGS = ["--dtype", "bfloat16"]


@dataclass(frozen=True)
class Sweep:
    rates: list[float]  # Poisson arrivals, requests per second; inf last
    max_concurrency: int  # of the rate-inf run only
    num_prompts: int
    seconds: float | None  # a Poisson rate draws max(num_prompts, rate x seconds)
    input_len: int
    output_len: tuple[int, int]  # drawn uniformly, both ends included
    seed: int

    def prompts_at(self, rate: float) -> int:
        if self.seconds is None:
            return self.num_prompts
        if math.isinf(rate):
            return max(self.num_prompts, 4 * self.max_concurrency)
        return max(self.num_prompts, math.ceil(rate * self.seconds))

    def output_mean_and_ratio(self) -> tuple[int, float]:
        """`--random-output-len` and the output part of `--random-range-ratio`
        that make vLLM draw from exactly [lo, hi] (its bounds are
        floor(mean x (1 - ratio)) and ceil(mean x (1 + ratio)))."""
        lo, hi = self.output_len
        mean, ratio = (lo + hi) // 2, round((hi - lo) / (hi + lo), 6)
        got = (max(1, math.floor(mean * (1 - ratio))), math.ceil(mean * (1 + ratio)))
        if got != (lo, hi) or ratio >= 1:
            raise SystemExit(f"--output-len {lo}:{hi}: vLLM's random dataset would draw "
                             f"{got[0]}:{got[1]}; pick ends with an even sum")  # fmt: skip
        return mean, ratio


def _output_len(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want N or LO:HI, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"want 1 <= LO <= HI, got {text!r}")
    return pair


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers, got {text!r}") from None
    if any(not 0 < r < math.inf for r in rates):
        raise argparse.ArgumentTypeError("Poisson rates are finite and > 0 (rate inf is "
                                         "the --max-concurrency run)")  # fmt: skip
    return rates


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks serve",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--shape", help="tiny, llama-1b, llama-8b, or a config.json path")
    p.add_argument("--systems", help="comma-separated (see benchmarks/systems.py)")
    p.add_argument("--rates", type=_rates, help="Poisson request rates, e.g. 4,16,64")
    p.add_argument("--max-concurrency", type=int, help="of the rate-inf run; 0: no such run")
    p.add_argument("--num-prompts", type=int, help="requests per rate (the least, with --seconds)")
    p.add_argument("--seconds", type=float,
                   help="a Poisson rate r sends max(num_prompts, r x seconds) requests, "
                   "rate inf max(num_prompts, 4 x max concurrency)")  # fmt: skip
    p.add_argument("--input-len", type=int, help="prompt tokens")
    p.add_argument("--output-len", type=_output_len, help="output tokens: N or LO:HI")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present")
    p.add_argument("--attention-backend", help="e.g. FLASH_ATTN (GPU)")
    p.add_argument("--serve-args", default="", help="more `vllm serve` flags, one string")
    p.add_argument("--seed", type=int, default=0, help="of the prompts (rate i uses seed + i)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--models-dir", help="where model directories are written")
    p.add_argument("--start-timeout", type=int, default=600, help="seconds for a server to start")
    p.add_argument("--rate-timeout", type=int, default=900, help="seconds per `vllm bench serve`")
    p.add_argument("--fresh-bench-process", action="store_true",
                   help="start `vllm bench serve` afresh for every rate (by default one "
                   "client process runs them all; benchmarks/serve_client.py)")  # fmt: skip
    p.add_argument("--interleave", action="store_true",
                   help="start every system's server at once and run each rate on all of "
                   "them in turn, in an order that rotates from rate to rate")  # fmt: skip
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --interleave: sweeps through all rates (paired ratios per round)",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=16.0,
        help="with --interleave on a GPU: each server's fixed KV cache",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.rounds > 1 and not args.interleave:
        p.error("--rounds needs --interleave")
    if args.kv_cache_gib <= 0:
        p.error("--kv-cache-gib must be positive")
    return args


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for key in ("shape", "systems", "rates", "max_concurrency", "num_prompts", "seconds",
                "input_len", "output_len", "device", "attention_backend"):  # fmt: skip
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.setdefault("shape", "tiny")
    cfg.setdefault("systems", "vllm-async,async_executor")
    cfg.setdefault("rates", [1.0, 4.0])
    cfg.setdefault("max_concurrency", 16)
    cfg.setdefault("num_prompts", 64)
    cfg.setdefault("input_len", 128)
    cfg.setdefault("output_len", (64, 128))
    if "device" not in cfg:
        import torch

        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def _model_dir(shape: str, root: Path) -> Model:
    """The shape's model directory with a tokenizer of its vocabulary (the
    random dataset writes prompts as text)."""
    model = materialize(shape, root)
    if model.dummy:
        from .word_tokenizer import write_word_tokenizer

        write_word_tokenizer(Path(model.path), model.vocab_size)
    return model


def engine_flags(cfg: dict[str, Any], model: Model, sweep: Sweep) -> list[str]:
    longest = sweep.input_len + sweep.output_len[1]
    max_len = max(512, -(-(longest + 16) // 256) * 256)
    flags = [*(CPU_FLAGS if cfg["device"] == "cpu" else CUDA_FLAGS),
             "--max-model-len", str(max_len), "--seed", "0"]  # fmt: skip
    if model.dummy:
        flags += ["--load-format", "dummy"]
    if cfg.get("attention_backend"):
        flags += ["--attention-backend", cfg["attention_backend"]]
    return flags


def bench_argv(server: Server, model: Model, sweep: Sweep, index: int, rate: float,
               result: Path) -> list[str]:  # fmt: skip
    mean, ratio = sweep.output_mean_and_ratio()
    argv = [
        *VLLM_CLI, "bench", "serve", "--backend", "vllm", "--base-url", server.base_url,
        "--model", model.path, "--served-model-name", server.served_name,
        "--dataset-name", "random", "--random-input-len", str(sweep.input_len),
        "--random-output-len", str(mean),
        "--random-range-ratio", json.dumps({"input": 0.0, "output": ratio}),
        "--num-prompts", str(sweep.prompts_at(rate)), "--request-rate", rate_label(rate),
        # Each rate its own prompts: no prefix-cache hits on an earlier rate's.
        "--seed", str(sweep.seed + index),
        # Greedy and every request to its drawn length, for every system.
        "--temperature", "0", "--ignore-eos",
        "--percentile-metrics", ",".join(PERCENTILE_METRICS),
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
        # Per-request latencies for the records' confidence intervals (the
        # bulky lists are dropped from the kept file: `trim_detail`).
        "--save-detailed",
        "--disable-tqdm",
    ]  # fmt: skip
    if math.isinf(rate):
        argv += ["--max-concurrency", str(sweep.max_concurrency)]
    return argv


def _run_bench(argv: list[str], log: Path, timeout_s: int) -> str | None:
    """Run `vllm bench serve` in its own process group; why it failed, or None."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"`vllm bench serve` timed out after {timeout_s} s (--rate-timeout)"
    finally:  # also on Ctrl-C: its own session does not get the terminal's SIGINT
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return None if code == 0 else f"`vllm bench serve` exited with {code}"


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


# Runs one `vllm bench serve` (its full command line, its log, a timeout):
# why it failed, or None.
RunBench = Callable[[list[str], Path, int], "str | None"]


def measure_rate(server: Server, system: System, model: Model, sweep: Sweep, index: int,
                 rate: float, out: Path, timeout_s: int, run_bench: RunBench,
                 suffix: str = "") -> dict[str, Any]:  # fmt: skip
    """One `vllm bench serve` of one rate; `index` picks its prompts' seed."""
    tag = f"{_tag(system.name)}-{model.shape}-rate{rate_label(rate)}{suffix}"
    result = out / "bench" / f"{tag}.json"
    result.unlink(missing_ok=True)
    log = out / "logs" / f"{tag}.bench.log"
    argv = bench_argv(server, model, sweep, index, rate, result)
    before = _counters(server) if system.ours else None
    failure = run_bench(argv, log, timeout_s)
    record: dict[str, Any] = {"request_rate": "inf" if math.isinf(rate) else rate,
                              "max_concurrency": sweep.max_concurrency if math.isinf(rate)
                              else None, "bench_command": shlex.join(argv),
                              "bench_log": str(log), "bench_result": str(result)}  # fmt: skip
    if failure is None and not result.exists():
        failure = "`vllm bench serve` wrote no result"
    if failure is not None:
        tail = log.read_text(errors="replace")[-2000:]
        print(f"\n{system.name} at rate {rate_label(rate)}: {failure}; log {log}:\n{tail}")
        return record | {"error": failure}
    try:
        bench = trim_detail(json.loads(result.read_text()))
        result.write_text(json.dumps(bench))
        record |= metrics_from_bench(bench)
    except BenchResultError as e:
        return record | {"error": str(e)}
    if before is not None:
        # Includes the CLI's one test request before the timed run.
        record["pipeline_stats"] = stats_delta(before, _counters(server))
    return record


def _counters(server: Server) -> dict[str, Any]:
    try:
        return read_pipeline_stats(server.base_url)
    except (OSError, KeyError, ValueError) as e:  # URLError is an OSError
        raise ServerError(f"pipeline counters unreadable: {e!r}") from e


Save = Callable[[dict[str, Any]], None]


def _server_facts(server: Server) -> dict[str, Any]:
    """What every record of a started server carries about it."""
    return log_facts(server.log) | {"server_start_s": round(server.start_s, 1),
                                    "serve_command": shlex.join(server.argv)}  # fmt: skip


def _run_one_after_another(args: argparse.Namespace, cfg: dict[str, Any], model: Model,
                           systems: list[System], sweep: Sweep, flags: list[str],
                           common: dict[str, Any], out: Path, save: Save,
                           run_bench: RunBench) -> None:  # fmt: skip
    """Each system's server in turn, through every rate."""
    for system in systems:
        base = common | {"system": system.name, "settings": system.settings}
        log = out / "logs" / f"{_tag(system.name)}-{model.shape}.serve.log"
        print(f"{system.name}: starting `vllm serve` (log {log})", flush=True)
        try:
            with running_server(model.path, flags + serve_flags(system), log,
                                args.start_timeout) as server:  # fmt: skip
                base |= _server_facts(server)
                print(f"{system.name}: ready in {server.start_s:.0f} s", flush=True)
                for index, rate in enumerate(sweep.rates):
                    began = time.monotonic()
                    record = base | measure_rate(server, system, model, sweep, index, rate,
                                                 out, args.rate_timeout, run_bench)  # fmt: skip
                    save(record)
                    print(f"{system.name}: rate {rate_label(rate)} done in "
                          f"{time.monotonic() - began:.0f} s", flush=True)  # fmt: skip
                    if not server.alive():
                        raise ServerError(f"server died at rate {rate_label(rate)}:\n"
                                          f"{server.log_tail()}")  # fmt: skip
        except ServerError as e:
            print(f"\n{system.name}: {e}")
            save(base | {"error": str(e).splitlines()[0], "serve_log": str(log)})


def rotated(items: list[Any], turn: int) -> list[Any]:
    """The order of turn k: items[k % n:] + items[:k % n], so that over n turns
    every item runs once in every position."""
    k = turn % len(items) if items else 0
    return items[k:] + items[:k]


def interleaved_flags(device: str, n_servers: int, kv_cache_gib: float) -> list[str]:
    """Per server, where several share one GPU: a fixed KV cache, and a
    memory share that only the start-up check reads (every server must pass
    it while the others start too), as the offline interleaved runs do."""
    if device != "cuda":
        return []  # the CPU flags fix the KV cache already
    return ["--gpu-memory-utilization", str(round(0.8 / n_servers, 3)),
            "--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]  # fmt: skip


def _run_interleaved(args: argparse.Namespace, cfg: dict[str, Any], model: Model,
                     systems: list[System], sweep: Sweep, flags: list[str],
                     common: dict[str, Any], out: Path, save: Save,
                     run_bench: RunBench) -> None:  # fmt: skip
    """Every system's server up at once; each rate runs on all of them in
    turn (one server busy at a time), the order rotating from rate to rate,
    for `--rounds` sweeps. Machine drift then lands on every system alike
    within minutes, rather than on whichever system ran last."""
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise SystemExit(f"a system is named twice in {cfg['systems']!r}")
    cache_root = Path(tempfile.mkdtemp(prefix="async_executor_serve_cache_"))
    shared = interleaved_flags(cfg["device"], len(systems), args.kv_cache_gib)
    logs = [out / "logs" / f"{_tag(s.name)}-{model.shape}.serve.log" for s in systems]
    specs = [
        # Compile caches apart: servers starting together must not race on one.
        (model.path, flags + shared + serve_flags(s), log,
         {"VLLM_CACHE_ROOT": str(cache_root / _tag(s.name))})
        for s, log in zip(systems, logs, strict=True)
    ]  # fmt: skip
    print(f"starting {len(systems)} servers at once (logs in {out / 'logs'})", flush=True)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, cache_root, ignore_errors=True)
        started = stack.enter_context(running_servers(specs, args.start_timeout))
        _interleaved_rounds(args, model, systems, logs, started, sweep, common, out, save,
                            run_bench)  # fmt: skip


def _interleaved_rounds(args: argparse.Namespace, model: Model, systems: list[System],
                        logs: list[Path], started: list[Server | ServerError], sweep: Sweep,
                        common: dict[str, Any], out: Path, save: Save,
                        run_bench: RunBench) -> None:  # fmt: skip
    """Each round: each rate on every started server in turn."""
    live: list[tuple[System, Server, dict[str, Any]]] = []
    for system, log, server in zip(systems, logs, started, strict=True):
        base = common | {"system": system.name, "settings": system.settings,
                         "interleaved": True}  # fmt: skip
        if isinstance(server, ServerError):
            print(f"\n{system.name}: {server}")
            save(base | {"error": str(server).splitlines()[0], "serve_log": str(log)})
            continue
        base |= _server_facts(server)
        live.append((system, server, base))
    print("servers up: " + ", ".join(f"{s.name} in {v.start_s:.0f} s" for s, v, _ in live),
          flush=True)  # fmt: skip
    dead: set[str] = set()
    for round_ in range(args.rounds):
        for index, rate in enumerate(sweep.rates):
            turn = round_ * len(sweep.rates) + index
            for position, (system, server, base) in enumerate(rotated(live, turn)):
                if system.name in dead or not server.alive():
                    if system.name not in dead:  # recorded once; the others go on
                        dead.add(system.name)
                        print(f"\n{system.name}: server died:\n{server.log_tail()}")
                        error = f"server died before rate {rate_label(rate)}, round {round_}"
                        save(base | {"error": error, "serve_log": str(server.log)})
                    continue
                began = time.monotonic()
                suffix = f"-round{round_}" if args.rounds > 1 else ""
                # Each round its own prompts: no prefix-cache hits on an
                # earlier round's.
                try:
                    record = base | measure_rate(server, system, model, sweep, turn, rate,
                                                 out, args.rate_timeout, run_bench,
                                                 suffix)  # fmt: skip
                except ServerError as e:  # its counters unreadable: the others go on
                    print(f"\n{system.name}: {e}")
                    dead.add(system.name)
                    record = base | {"error": str(e).splitlines()[0]}
                save(record | {"round": round_, "position": position})
                print(f"round {round_ + 1}/{args.rounds}, rate {rate_label(rate)}: "
                      f"{system.name} done in {time.monotonic() - began:.0f} s",
                      flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    cfg = _settings(args)
    out = Path(args.out)
    for sub in ("bench", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "async_executor_models")
    model = _model_dir(cfg["shape"], models_dir)
    systems = parse_systems(cfg["systems"])
    sweep = Sweep(rates=sorted(cfg["rates"]) + ([math.inf] if cfg["max_concurrency"] else []),
                  max_concurrency=cfg["max_concurrency"], num_prompts=cfg["num_prompts"],
                  seconds=cfg.get("seconds"), input_len=cfg["input_len"],
                  output_len=tuple(cfg["output_len"]), seed=args.seed)  # fmt: skip
    sweep.output_mean_and_ratio()  # bad lengths fail before any server starts
    flags = engine_flags(cfg, model, sweep) + shlex.split(args.serve_args)
    run_id = os.environ.get("ASYNC_EXECUTOR_RUN_ID") or (
        time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    )
    common = dict(
        mode="serve", run_id=run_id, shape=model.shape, card=machine_name(cfg["device"]),
        device=cfg["device"], attention_backend=cfg.get("attention_backend"),
        input_len=sweep.input_len, output_len_min=sweep.output_len[0],
        output_len_max=sweep.output_len[1], temperature=0.0,
        command="python -m benchmarks serve " + shlex.join(argv),
    )  # fmt: skip

    records: list[dict[str, Any]] = []

    def save(record: dict[str, Any]) -> None:
        records.append(record)
        # After every rate: a run cut short keeps what it measured.
        (out / "serve.json").write_text(json.dumps(records, indent=1))

    run = _run_interleaved if args.interleave else _run_one_after_another
    with contextlib.ExitStack() as stack:
        run_bench: RunBench = _run_bench
        if not args.fresh_bench_process:
            client = stack.enter_context(BenchClient(out / "logs" / "bench-client.log"))

            def run_bench(argv: list[str], log: Path, timeout_s: int) -> str | None:
                # What follows `vllm bench serve` in the command line.
                return client.run(argv[argv.index("bench") + 2 :], log, timeout_s)

        run(args, cfg, model, systems, sweep, flags, common, out, save, run_bench)

    print(summary_table(records))
    if args.interleave:
        paired = paired_ratios(records, systems[0].name)
        (out / "serve-paired.json").write_text(json.dumps(paired, indent=1))
        print(paired_table(paired, systems[0].name))
    from .serve_plot import draw_serving

    picture = draw_serving(records, out / "serve.png")
    if picture is not None:
        print(f"picture: {picture}")
    print(f"records: {out / 'serve.json'}")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
