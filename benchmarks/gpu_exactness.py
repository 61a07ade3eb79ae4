"""Exactness on the GPU: greedy outputs of async_executor equal vLLM's
synchronous path, with requests ending on EOS, on stop strings and on length.

    python -m benchmarks.gpu_exactness --out DIR [--settings decode_window=8]

Two models: the project's tiny Llama (real random weights, its own tokenizer)
and the Llama-3.2-1B shape with vLLM's dummy weights and a generated
word-level tokenizer of the full 128256-token vocabulary ("w0", "w1", ...).
For the 1B shape, a first synchronous run picks an EOS token and stop words
from what the model actually generates, so that requests do end on them;
then the synchronous baseline and ours run with that EOS. 64 prompts of
mixed lengths each. Writes DIR/exactness.json and exits non-zero on a
mismatch.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.shapes import PRESETS
from benchmarks.word_tokenizer import write_word_tokenizer


def _engine(model: str, ours: bool, settings: dict[str, Any], **kw: Any) -> Any:
    from vllm import LLM

    import async_executor

    args: dict[str, Any] = dict(
        dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True,
        gpu_memory_utilization=0.5, attention_config={"backend": "TRITON_ATTN"},
    )  # fmt: skip
    args.update(kw)
    if ours:
        args["distributed_executor_backend"] = "async_executor"
        args["additional_config"] = async_executor.pipeline_config(**settings)
    else:
        args["async_scheduling"] = False
    return LLM(model, **args)


def _close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _compare(base: list[Any], mine: list[Any]) -> list[int]:
    return [
        i
        for i, (a, b) in enumerate(zip(base, mine, strict=True))
        if list(a.outputs[0].token_ids) != list(b.outputs[0].token_ids)
        or a.outputs[0].text != b.outputs[0].text
        or a.outputs[0].finish_reason != b.outputs[0].finish_reason
    ]


def _check(name: str, model: str, prompts: list[Any], params: list[Any],
           settings: dict[str, Any], **kw: Any) -> dict[str, Any]:  # fmt: skip
    from async_executor import pipeline_stats

    llm = _engine(model, False, {}, **kw)
    base = llm.generate(prompts, params, use_tqdm=False)
    _close(llm)
    llm = _engine(model, True, settings, **kw)
    mine = llm.generate(prompts, params, use_tqdm=False)
    stats = pipeline_stats(llm).as_dict()
    _close(llm)

    def ending(o: Any) -> str:
        c = o.outputs[0]
        if c.finish_reason != "stop":
            return str(c.finish_reason)
        if c.stop_reason is None:
            return "eos"
        return "stop-string" if isinstance(c.stop_reason, str) else "stop-token"

    reasons = collections.Counter(ending(o) for o in base)
    mismatched = _compare(base, mine)
    result = {
        "model": name,
        "requests": len(prompts),
        "finish_reasons": dict(reasons),
        "mismatched_requests": mismatched,
        "same": not mismatched,
        "pipeline_stats": stats,
        "settings": settings,
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="decode_window=8")
    args = p.parse_args(argv)
    settings = {
        k: int(v) if v.isdigit() else v
        for k, v in (item.split("=") for item in args.settings.split(",") if item)
    }
    from vllm import SamplingParams

    from async_executor.tiny_llama import build_tiny_llama, corpus_prompts
    from benchmarks.run_one import make_prompts

    root = Path(tempfile.mkdtemp(prefix="exactness_"))
    results = []

    # The tiny model: its own tokenizer and EOS, stop strings on real words.
    tiny = str(build_tiny_llama(root / "tiny"))
    prompts = corpus_prompts(64)
    params = [
        SamplingParams(temperature=0.0, max_tokens=48, stop=[" the", " step"] if i % 2 else None)
        for i in range(64)
    ]
    results.append(_check("tiny", tiny, prompts, params, settings, dtype="float32"))

    # The 1B shape, dummy weights, a full-vocabulary word tokenizer.
    config = dict(PRESETS["llama-1b"])
    model_dir = root / "llama-1b"
    model_dir.mkdir()
    write_word_tokenizer(model_dir, config["vocab_size"])
    rng = random.Random(0)
    prompts_1b: list[Any] = [
        {"prompt_token_ids": t[: rng.randint(1, 200)]}
        for t in make_prompts(64, 200, config["vocab_size"], seed=1)
    ]
    (model_dir / "config.json").write_text(json.dumps(config))
    llm = _engine(str(model_dir), False, {}, load_format="dummy")
    probe = llm.generate(prompts_1b, SamplingParams(temperature=0.0, max_tokens=64),
                         use_tqdm=False)  # fmt: skip
    _close(llm)
    # Tokens generated mid-sequence by many requests: one becomes EOS, others
    # stop words, so that requests end at different steps for each reason.
    counts = collections.Counter(t for o in probe for t in set(list(o.outputs[0].token_ids)[4:40]))
    common = [t for t, _ in counts.most_common(12)]
    config["eos_token_id"] = common[0]
    (model_dir / "config.json").write_text(json.dumps(config))
    # vLLM takes the primary EOS from the tokenizer: declare it there too.
    write_word_tokenizer(model_dir, config["vocab_size"], eos=f"w{common[0]}")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": common[0]}))
    stop_words = [f" w{t} " for t in common[1:6]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=64, stop=stop_words if i % 2 else None)
        for i in range(64)
    ]
    results.append(
        _check("llama-1b-shape", str(model_dir), prompts_1b, params, settings, load_format="dummy")
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exactness.json").write_text(json.dumps(results, indent=1))
    ok = all(r["same"] for r in results)
    print("GPU exactness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    raise SystemExit(main())
