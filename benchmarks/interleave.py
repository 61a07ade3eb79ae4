"""Interleaved A/B benchmark: every system's engine up at once, calls alternated.

    python -m benchmarks interleave --shape llama-1b \
        --workloads 128x256x1024,32x256x1024 \
        --systems 'vllm-async,async_executor[decode_window=1],async_executor' \
        --rounds 3 --trace --attention-backend FLASH_ATTN --out DIR

Why: one timed call per system, systems run one after another, cannot tell a
system's cost from the machine's drift (host clocks, where the scheduler put
the engine's process, a neighbour's load): the same workload's step time
varied by 1.5x between sessions on the same kind of card. Here each system
has its own front-end process and engine (as in `python -m benchmarks`), all
started together and kept idle while another one runs; the orchestrator then
runs round after round, each round one call of every system per workload, in
an order that rotates from round to round (after `--warmup-rounds` untimed
ones: the first round after the engines start ran slower for every system).
A system's ratio is the median of its per-round ratios to the first system
(paired: both calls of a pair ran minutes apart at most, under the same
conditions).

As in `python -m benchmarks`, the step tracer (`async_executor.tracing`,
a few microseconds per step, the same methods wrapped in every system) is on
in every engine. On a GPU the engines share the card: each gets a fixed KV cache
(`--kv-cache-gib`), so vLLM skips its memory profiling and the engines can
start together. `--trace` adds one kernel-traced call per system and workload
after the rounds (busy share and the kernel-time ceiling, as in
`python -m benchmarks`); `--profile` two calls (of one workload) under
cProfile: one of the thread that runs the runner's steps (the engine thread
for vLLM's uniproc executor and ours inline, the worker's thread where the
worker has its own process), one of the engine's busy-loop thread (schedule,
update; the same thread where the worker shares it). Writes
DIR/interleaved.json (after every round) and, with --profile,
DIR/profile-<system>-b<batch>.txt and DIR/profile-engine-<system>-b<batch>.txt;
prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .__main__ import _workloads
from .shapes import materialize
from .systems import parse_systems

# Each reply must come within this many seconds of its request, or the
# system is dropped from the run (a hung engine must not hang the benchmark).
DEFAULT_CALL_TIMEOUT_S = 600


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks interleave",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--shape", default="tiny", help="tiny, llama-1b, llama-8b, or a config.json")
    p.add_argument("--workloads", type=_workloads, required=True, metavar="BxPxG,...")
    p.add_argument("--systems", required=True, help="comma-separated (benchmarks/systems.py)")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per system and workload")
    p.add_argument("--warmup-rounds", type=int, default=0,
                   help="untimed rounds first (to settle after the engines start)")  # fmt: skip
    p.add_argument("--trace", action="store_true", help="one kernel-traced call each (GPU)")
    p.add_argument("--profile", action="store_true", help="cProfiled calls (step, engine thread)")
    p.add_argument("--profile-top", type=int, default=40)
    p.add_argument("--profile-workload", type=int, default=-1,
                   help="which workload --profile runs (index; default the last)")  # fmt: skip
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--attention-backend")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--kv-cache-gib", type=float, default=8.0,
                   help="KV cache per engine on a GPU (the engines share the card)")  # fmt: skip
    p.add_argument("--models-dir")
    p.add_argument("--timeout", type=int, default=DEFAULT_CALL_TIMEOUT_S,
                   help="seconds for an engine to start, and for each call")  # fmt: skip
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.warmup_rounds < 0:
        p.error("--warmup-rounds must not be negative")
    if not -len(args.workloads) <= args.profile_workload < len(args.workloads):
        p.error(f"--profile-workload {args.profile_workload}: there are "
                f"{len(args.workloads)} workloads")  # fmt: skip
    return args


# --- one system: its own process, its own engine ------------------------------


class _Engine:
    """One system's LLM, driven call by call from the orchestrator."""

    def __init__(self, spec: dict[str, Any], system_name: str) -> None:
        from vllm import LLM

        from .run_one import engine_kwargs
        from .systems import parse_system

        self.spec = spec
        self.system = parse_system(system_name)
        t0 = time.perf_counter()
        self.llm = LLM(spec["model"], **engine_kwargs(spec, self.system))
        self.startup_s = time.perf_counter() - t0
        self.prompts: dict[int, list[Any]] = {}
        for index in range(len(spec["workloads"])):
            self._warm_up(index)

    def _prompts(self, index: int) -> list[Any]:
        from .run_one import token_prompts

        if index not in self.prompts:
            batch, prompt_len, _ = self.spec["workloads"][index]
            self.prompts[index] = token_prompts(batch, prompt_len, self.spec["vocab_size"])
        return self.prompts[index]

    def _warm_up(self, index: int) -> None:
        from .run_one import warm_up

        warm_up(self.llm, self._prompts(index))

    def info(self) -> dict[str, Any]:
        import torch
        import vllm

        config = self.llm.llm_engine.vllm_config
        if self.spec["device"] == "cuda":
            card = torch.cuda.get_device_name(0)
        else:
            from .run_one import _cpu_name

            card = _cpu_name()
        return {
            "startup_s": self.startup_s,
            "card": card,
            "vllm_version": vllm.__version__,
            "torch_version": torch.__version__,
            "async_scheduling": bool(config.scheduler_config.async_scheduling),
            "model_runner": "v2" if config.use_v2_model_runner else "v1",
            "kv_cache_bytes": config.cache_config.kv_cache_memory_bytes,
        }

    def stats(self) -> dict[str, Any] | None:
        from .run_one import pipeline_stats_of

        return pipeline_stats_of(self.llm, self.system)

    def call(self, index: int, mode: str, top: int) -> dict[str, Any]:
        """One call of workload `index`: "timed", "trace" (kernel trace),
        "profile" (cProfile of the step thread) or "profile-engine" (of the
        engine's busy-loop thread)."""
        from vllm import SamplingParams

        from async_executor import tracing

        from . import measure
        from .run_one import busy_from_trace, digest

        _, _, gen_len = self.spec["workloads"][index]
        params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
        prompts = self._prompts(index)
        before = self.stats()
        if mode == "trace":
            self.llm.collective_rpc(measure.profiler_start)
        elif mode == "profile":
            self.llm.collective_rpc(measure.host_profile_start)
        elif mode == "profile-engine":
            self._engine_utility(tracing.ENGINE_PROFILE_START)
        load = os.getloadavg()[0]
        t0 = time.perf_counter_ns()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        t1 = time.perf_counter_ns()
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        reply: dict[str, Any] = {
            "wall_s": (t1 - t0) / 1e9,
            "digest": digest(tokens),
            "generated_tokens": sum(len(t) for t in tokens),
            "loadavg_1m": load,
        }
        if mode == "trace":
            trace = self.llm.collective_rpc(measure.profiler_stop)[0]
            busy = busy_from_trace(trace, "one more call, traced whole", (t0, t1), sampled=False)
            reply |= busy.fields() | {"ceiling_s": busy.ceiling_s(reply["wall_s"], False)}
        elif mode == "profile":
            reply["profile"] = self.llm.collective_rpc(measure.host_profile_stop, args=(top,))[0]
        elif mode == "profile-engine":
            reply["profile"] = self._engine_utility(tracing.ENGINE_PROFILE_STOP, top)
        after = self.stats()
        if after is not None:
            from .run_one import _stats_delta

            reply["pipeline_stats"] = _stats_delta(before, after)
        return reply

    def _engine_utility(self, name: str, *args: Any) -> Any:
        """A method of vLLM's EngineCore, run on its busy-loop thread."""
        client: Any = self.llm.llm_engine.engine_core
        if hasattr(client, "call_utility"):  # the engine in its own process
            return client.call_utility(name, *args)
        return getattr(client.engine_core, name)(*args)  # in this process

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def _serve_system(conn: Connection, spec: dict[str, Any], system_name: str) -> None:
    """A system's process: build the engine, then answer the orchestrator's
    requests ({"op": "call", ...} or {"op": "stop"}) until told to stop."""
    # Engines that start together must not write one compile cache at once.
    os.environ["VLLM_CACHE_ROOT"] = os.path.join(spec["cache_root"], _tag(system_name))
    # The engine's profile methods (`--profile`), installed by the plugin.
    from async_executor.tracing import ENGINE_PROFILE_FLAG

    os.environ[ENGINE_PROFILE_FLAG] = "1"
    try:
        engine = _Engine(spec, system_name)
        conn.send({"ok": True, **engine.info()})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()[-4000:]})
        return
    while True:
        request = conn.recv()
        if request["op"] == "stop":
            engine.shutdown()
            conn.send({"ok": True})
            return
        try:
            reply = engine.call(request["workload"], request["mode"], request.get("top", 40))
            conn.send({"ok": True, **reply})
        except BaseException:
            conn.send({"ok": False, "error": traceback.format_exc()[-4000:]})


# --- the orchestrator ----------------------------------------------------------


class _Remote:
    """The orchestrator's handle on one system's process."""

    def __init__(self, ctx: Any, spec: dict[str, Any], name: str, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.conn, child = ctx.Pipe()
        # Not a daemon: it starts vLLM's engine processes itself.
        self.proc = ctx.Process(target=_serve_system, args=(child, spec, name), daemon=False)
        self.proc.start()
        child.close()
        self.error: str | None = None
        self.info: dict[str, Any] = {}

    def reply(self) -> dict[str, Any] | None:
        """The next reply, or None (and `error` set) if the system failed."""
        if self.error is not None:
            return None
        if not self.conn.poll(self.timeout_s):
            self.fail(f"no reply within {self.timeout_s:g} s (--timeout)")
            return None
        try:
            message: dict[str, Any] = self.conn.recv()
        except EOFError:
            self.fail(f"its process exited (code {self.proc.exitcode})")
            return None
        if not message.pop("ok"):
            self.fail(message["error"])
            return None
        return message

    def request(self, **request: Any) -> dict[str, Any] | None:
        if self.error is not None:
            return None
        self.conn.send(request)
        return self.reply()

    def fail(self, why: str) -> None:
        self.error = why
        print(f"\n{self.name} failed: {why}", flush=True)
        self.kill()

    def stop(self) -> None:
        if self.error is None and self.proc.is_alive():
            self.request(op="stop")
        self.proc.join(timeout=60)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of one round: the systems rotated by the round's index, so
    that no system always runs first or right after the same neighbour."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def summarize(calls: dict[str, list[dict[str, Any]]], first: str) -> dict[str, dict[str, Any]]:
    """Per system, from its timed calls (one per round, in round order) and
    the first system's calls of the same rounds: median wall, paired ratios."""
    out: dict[str, dict[str, Any]] = {}
    reference = {c["round"]: c for c in calls.get(first, [])}
    for name, timed in calls.items():
        walls = [c["wall_s"] for c in timed]
        paired = [reference[c["round"]]["wall_s"] / c["wall_s"] for c in timed
                  if c["round"] in reference]  # fmt: skip
        out[name] = {
            "wall_s": statistics.median(walls),
            "reps_wall_s": walls,
            "ratio_by_round": paired,
            "ratio": statistics.median(paired) if paired else None,
        }
    return out


def _records(args: argparse.Namespace, spec: dict[str, Any], remotes: list[_Remote],
             calls: dict[tuple[str, int], list[dict[str, Any]]],
             extra: dict[tuple[str, int], dict[str, Any]],
             common: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    records = []
    names = [r.name for r in remotes]
    for index, (batch, prompt_len, gen_len) in enumerate(spec["workloads"]):
        workload = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
        timed = {name: calls.get((name, index), []) for name in names}
        timed = {name: c for name, c in timed.items() if c}
        summary = summarize(timed, names[0])
        reference_digest = next((c[0]["digest"] for c in timed.values()), None)
        for remote in remotes:
            record = common | workload | {"system": remote.name}
            record["settings"] = parse_systems(remote.name)[0].settings
            record |= remote.info
            mine = timed.get(remote.name)
            if not mine:
                records.append(record | {"error": remote.error or "no timed call"})
                continue
            digests = {c["digest"] for c in mine}
            record |= summary[remote.name] | {
                "tokens_per_s": mine[0]["generated_tokens"] / summary[remote.name]["wall_s"],
                "decode_step_ms": 1000 * summary[remote.name]["wall_s"] / gen_len,
                "generated_tokens": mine[0]["generated_tokens"],
                "output_digest": mine[0]["digest"],
                "digests_agree": len(digests) == 1,
                "same_output_as_first": digests == {reference_digest},
                "loadavg_1m_by_round": [c["loadavg_1m"] for c in mine],
            }
            stats = [c["pipeline_stats"] for c in mine if c.get("pipeline_stats")]
            if stats:
                record["pipeline_stats"] = stats[-1]  # the last timed call's share
            traced = extra.get((remote.name, index), {})
            if "ceiling_s" in traced:
                record |= {
                    k: traced[k]
                    for k in ("gpu_busy", "busy_method", "busy_window_s", "idle_gaps", "ceiling_s")
                }
                record["ceiling_share"] = traced["ceiling_s"] / record["wall_s"]
            if error := remote.error:
                record["error_after_rounds"] = error
            records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    """One block per workload; ratio: median of the per-round ratios to the
    first system (min..max beside it); of-ceil: ceiling / median wall."""
    lines = []
    width = max([24, *(len(r["system"]) for r in records)])
    by_workload: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault((r["batch"], r["prompt_len"], r["gen_len"]), []).append(r)
    for (batch, plen, glen), group in by_workload.items():
        card = next((r.get("card") for r in group if r.get("card")), "?")
        lines.append(f"\nworkload: batch {batch}, prompt {plen}, gen {glen}  [{card}], "
                     f"interleaved rounds")  # fmt: skip
        lines.append(f"{'system':{width}} {'tok/s':>9} {'wall s':>7} {'step ms':>7} "
                     f"{'ratio':>6} {'range':>11} {'of-ceil':>7}  same-out")  # fmt: skip
        for r in group:
            if "wall_s" not in r:
                lines.append(f"{r['system']:{width}}  -- {r.get('error', '?')[-200:]}")
                continue
            ratios = r["ratio_by_round"]
            span = f"{min(ratios):.2f}..{max(ratios):.2f}" if ratios else "-"
            share = f"{r['ceiling_share']:.1%}" if r.get("ceiling_share") else "-"
            same = "yes" if r["same_output_as_first"] and r["digests_agree"] else "NO"
            lines.append(f"{r['system']:{width}} {r['tokens_per_s']:>9.0f} {r['wall_s']:>7.2f} "
                         f"{r['decode_step_ms']:>7.2f} {r['ratio'] or 0:>6.2f} {span:>11} "
                         f"{share:>7}  {same}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # callables over RPC
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.trace and device != "cuda":
        raise SystemExit("--trace needs a GPU (a kernel trace); on CPU leave it out")
    names = [s.name for s in parse_systems(args.systems)]
    if len(set(names)) != len(names):
        raise SystemExit(f"a system is named twice in {args.systems!r}")
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "async_executor_models")
    model = materialize(args.shape, models_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "model": str(model.path), "dummy": model.dummy, "vocab_size": model.vocab_size,
        "workloads": args.workloads, "tp": args.tp, "device": device,
        "attention_backend": args.attention_backend,
        "kv_cache_bytes": int(args.kv_cache_gib * (1 << 30)) if device == "cuda" else None,
        # Only checked against free memory when an engine starts; with a fixed
        # KV cache nothing else reads it. Every engine must pass that check.
        "gpu_mem": round(0.8 / len(names), 3),
        "cache_root": tempfile.mkdtemp(prefix="async_executor_interleave_cache_"),
    }  # fmt: skip
    run_id = os.environ.get("ASYNC_EXECUTOR_RUN_ID") or (
        time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    )
    common = {
        "run_id": run_id, "mode": "interleaved", "shape": args.shape, "tp": args.tp,
        "attention_backend": args.attention_backend, "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "command": "python -m benchmarks interleave " + " ".join(shlex.quote(a) for a in argv),
    }  # fmt: skip

    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    remotes = [_Remote(ctx, spec, name, args.timeout) for name in names]
    for remote in remotes:
        remote.info = remote.reply() or {}
    print(f"engines up in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{r.name} {'ok' if r.error is None else 'FAILED'}" for r in remotes),
          flush=True)  # fmt: skip
    calls: dict[tuple[str, int], list[dict[str, Any]]] = {}
    extra: dict[tuple[str, int], dict[str, Any]] = {}
    path = out / "interleaved.json"
    try:
        for round_index in range(args.warmup_rounds):
            for index in range(len(args.workloads)):
                for name in round_order(names, round_index):
                    remotes[names.index(name)].request(op="call", workload=index, mode="timed")
            print(f"warm-up round {round_index + 1}/{args.warmup_rounds} done", flush=True)
        for round_index in range(args.rounds):
            for index in range(len(args.workloads)):
                for name in round_order(names, round_index):
                    remote = remotes[names.index(name)]
                    reply = remote.request(op="call", workload=index, mode="timed")
                    if reply is not None:
                        calls.setdefault((name, index), []).append(reply | {"round": round_index})
            path.write_text(json.dumps(_records(args, spec, remotes, calls, extra, common),
                                       indent=1))  # fmt: skip
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        modes = ["trace"] * args.trace + ["profile", "profile-engine"] * args.profile
        for mode in modes:
            indices = list(range(len(args.workloads)))
            if mode != "trace":
                indices = [indices[args.profile_workload]]
            for index in indices:
                batch = args.workloads[index][0]
                for remote in remotes:
                    reply = remote.request(op="call", workload=index, mode=mode,
                                           top=args.profile_top)  # fmt: skip
                    if reply is None:
                        continue
                    if mode == "trace":
                        extra[(remote.name, index)] = reply
                    else:
                        path_txt = out / f"{mode}-{_tag(remote.name)}-b{batch}.txt"
                        path_txt.write_text(reply["profile"])
    finally:
        for remote in remotes:
            remote.stop()
    records = _records(args, spec, remotes, calls, extra, common)
    path.write_text(json.dumps(records, indent=1))
    print(table(records))
    print(f"records: {path}")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
