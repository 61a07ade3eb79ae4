"""Exactness on the GPU: async_executor's outputs equal vLLM's synchronous
path, with CUDA graphs on, for several pipeline settings.

    python -m benchmarks.gpu_exactness --out DIR \
        --variants 'decode_window=2;decode_window=16,depth=3'

The Llama-3.2-1B shape with vLLM's dummy weights and a generated word-level
tokenizer of the full 128256-token vocabulary ("w0", "w1", ...). A first
synchronous run picks an EOS token and stop words from what the model
actually generates, so that requests do end on them. Then one synchronous
baseline engine and one engine per variant run the same workloads:
- greedy: requests ending on EOS, on stop strings and on length; some with
  logprobs (ids and ranks compared exactly, values within a tolerance);
- seeded: temperature/top-p sampling with a seed per request;
- n > 1: three seeded completions per request;
- preemption: more requests than the KV cache holds (the cache is sized so
  that this workload preempts and the others do not; asserted from vLLM's
  preemption counter).
Engines run with CUDA graphs (FULL graphs for decode) and, by default,
without torch.compile, so that each starts in seconds; `--compile` turns it
on. Each variant's counters must show device-resident windows. Writes
DIR/exactness.json and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from .shapes import PRESETS
from .word_tokenizer import write_word_tokenizer


def _settings(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        out[key.strip()] = int(raw) if raw.strip().isdigit() else raw.strip()
    return out


def _engine(model: str, settings: dict[str, Any] | None, args: argparse.Namespace) -> Any:
    from vllm import LLM

    import async_executor

    kwargs: dict[str, Any] = dict(
        dtype="bfloat16", max_model_len=512, seed=0, gpu_memory_utilization=0.5,
        load_format="dummy", max_num_seqs=128, num_gpu_blocks_override=args.kv_blocks,
        tensor_parallel_size=args.tp,
        attention_config={"backend": args.attention_backend}, disable_log_stats=False,
    )  # fmt: skip
    if not args.compile:
        from vllm.config.compilation import CompilationMode, CUDAGraphMode

        # FULL graphs for decode (what device-resident windows replay)
        # without torch.compile's minute of start-up.
        kwargs["compilation_config"] = {
            "mode": CompilationMode.NONE,
            "cudagraph_mode": CUDAGraphMode.FULL_DECODE_ONLY,
        }
    if settings is None:
        kwargs["async_scheduling"] = False
    else:
        kwargs["distributed_executor_backend"] = "async_executor"
        # Latency bounds off: the window asked for is the window run.
        settings = {"max_token_gap_ms": 0, "max_admission_delay_ms": 0, **settings}
        kwargs["additional_config"] = async_executor.pipeline_config(**settings)
    return LLM(model, **kwargs)


def _close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _preemptions(llm: Any) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _ending(c: Any) -> str:
    if c.finish_reason != "stop":
        return str(c.finish_reason)
    if c.stop_reason is None:
        return "eos"
    return "stop-string" if isinstance(c.stop_reason, str) else "stop-token"


def _compare(base: list[Any], mine: list[Any]) -> dict[str, Any]:
    """Mismatched requests (tokens, text, finish reason, logprob ids/ranks)
    and the largest logprob value difference."""
    bad: list[int] = []
    worst = 0.0
    for i, (a, b) in enumerate(zip(base, mine, strict=True)):
        if len(a.outputs) != len(b.outputs):
            bad.append(i)
            continue
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            same = (
                list(ca.token_ids) == list(cb.token_ids)
                and ca.text == cb.text
                and ca.finish_reason == cb.finish_reason
            )
            if same and ca.logprobs is not None:
                for pa, pb in zip(ca.logprobs, cb.logprobs or [], strict=True):
                    if pa.keys() != pb.keys() or any(pa[t].rank != pb[t].rank for t in pa):
                        same = False
                        break
                    worst = max(worst, *(abs(pa[t].logprob - pb[t].logprob) for t in pa))
            if not same:
                bad.append(i)
                break
    return {"mismatched_requests": bad, "max_logprob_diff": worst}


def _workloads(model_dir: Path, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prompts and sampling parameters; picks EOS and stop words first."""
    from vllm import SamplingParams

    from .run_one import make_prompts

    rng = random.Random(0)
    prompts: list[Any] = [
        {"prompt_token_ids": t[: rng.randint(8, 200)]} for t in make_prompts(64, 200, vocab, seed=1)
    ]
    llm = _engine(str(model_dir), None, args)
    probe = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
    _close(llm)
    # Tokens generated mid-sequence by many requests: one becomes EOS, others
    # stop words, so that requests end at different steps for each reason.
    counts = collections.Counter(t for o in probe for t in set(list(o.outputs[0].token_ids)[4:40]))
    common = [t for t, _ in counts.most_common(12)]
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = common[0]
    (model_dir / "config.json").write_text(json.dumps(config))
    # vLLM takes the primary EOS from the tokenizer: declare it there too.
    write_word_tokenizer(model_dir, vocab, eos=f"w{common[0]}")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": common[0]}))

    # Per request, a token of its own probe output that it has not produced
    # before, at a position drawn in 4..48: a third of the requests stop on
    # it as a stop token, a third on it as a stop string (the word-level
    # tokenizer spells token t as "wt"), a third run to EOS or length.
    def own_stop(tokens: list[int]) -> int | None:
        at = rng.randint(4, min(48, max(4, len(tokens) - 1)))
        fresh = [i for i in range(at, len(tokens)) if tokens[i] not in tokens[:i]]
        return tokens[fresh[0]] if fresh else None

    greedy = []
    for i, out in enumerate(probe):
        stop = own_stop(list(out.outputs[0].token_ids))
        kind = i % 3 if stop is not None else 2
        greedy.append(
            SamplingParams(
                temperature=0.0, max_tokens=64,
                stop_token_ids=[stop] if kind == 0 and stop is not None else None,
                stop=[f" w{stop} "] if kind == 1 else None,
                logprobs=3 if i % 4 == 0 else None,
            )
        )  # fmt: skip
    seeded = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1000 + i, max_tokens=48, ignore_eos=True)
        for i in range(32)
    ]
    several = [
        SamplingParams(n=3, temperature=1.0, seed=2000 + i, max_tokens=32, ignore_eos=True)
        for i in range(16)
    ]
    crowd: list[Any] = [
        {"prompt_token_ids": t} for t in make_prompts(args.preempt_requests, 200, vocab, seed=2)
    ]
    return {
        "greedy": (prompts, greedy),
        "seeded": (prompts[:32], seeded),
        "n3": (prompts[:16], several),
        "preemption": (
            crowd,
            SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True),
        ),
    }


def _run_all(llm: Any, workloads: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    outputs, preempted = {}, {}
    for name, (prompts, params) in workloads.items():
        before = _preemptions(llm)
        outputs[name] = llm.generate(prompts, params, use_tqdm=False)
        preempted[name] = _preemptions(llm) - before
    return outputs, preempted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--variants", default="decode_window=2;decode_window=16;"
        "decode_window=2,depth=3;decode_window=16,depth=3",
        help="';'-separated async_executor settings, one engine each",
    )  # fmt: skip
    p.add_argument("--attention-backend", default="FLASH_ATTN")
    p.add_argument("--compile", action="store_true", help="torch.compile on (slower start)")
    p.add_argument("--kv-blocks", type=int, default=640, help="KV cache blocks (16 tokens)")
    p.add_argument("--preempt-requests", type=int, default=96)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (both engines)")
    args = p.parse_args(argv)
    variants = [_settings(v) for v in args.variants.split(";") if v.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from async_executor import pipeline_stats

    config = dict(PRESETS["llama-1b"])
    model_dir = Path(tempfile.mkdtemp(prefix="exactness_")) / "llama-1b"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    write_word_tokenizer(model_dir, config["vocab_size"])
    workloads = _workloads(model_dir, config["vocab_size"], args)

    t0 = time.perf_counter()
    llm = _engine(str(model_dir), None, args)
    base, base_preempted = _run_all(llm, workloads)
    _close(llm)
    report: dict[str, Any] = {
        "tensor_parallel_size": args.tp,
        "attention_backend": args.attention_backend,
        "compile": args.compile,
        "kv_blocks": args.kv_blocks,
        "baseline": {
            "preemptions": base_preempted,
            "finish_reasons": dict(
                collections.Counter(_ending(o.outputs[0]) for o in base["greedy"])
            ),
            "seconds": time.perf_counter() - t0,
        },
        "variants": [],
    }
    ok = True
    for settings in variants:
        t0 = time.perf_counter()
        try:
            llm = _engine(str(model_dir), settings, args)
            mine, preempted = _run_all(llm, workloads)
            stats = pipeline_stats(llm).as_dict()
            _close(llm)
        except Exception as exc:  # recorded; the other variants still run
            report["variants"].append({"settings": settings, "error": repr(exc)})
            ok = False
            print(json.dumps(report["variants"][-1]), flush=True)
            continue
        compared = {name: _compare(base[name], mine[name]) for name in workloads}
        same = all(not c["mismatched_requests"] for c in compared.values())
        device = stats.get("device_windows", 0) > 0
        entry = {
            "settings": settings,
            "same": same,
            "device_windows_ran": device,
            "compared": compared,
            "preemptions": preempted,
            "pipeline_stats": stats,
            "seconds": time.perf_counter() - t0,
        }
        ok = ok and same and device
        report["variants"].append(entry)
        print(json.dumps(entry), flush=True)
        (out / "exactness.json").write_text(json.dumps(report, indent=1))
    report["pass"] = ok
    (out / "exactness.json").write_text(json.dumps(report, indent=1))
    print("GPU exactness:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    raise SystemExit(main())
