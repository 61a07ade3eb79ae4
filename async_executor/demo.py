"""Demo: generate with async_executor on a small Llama this project builds.

    python -m async_executor.demo [--out DIR] [--decode-window 4]

Builds a tokenizer and a random-weight Llama (no download), generates with
vLLM's `LLM` on our executor, prints the outputs and the pipeline's
counters, then runs vLLM's synchronous path on the same prompts and checks
that every token is the same. vLLM logs only errors here
(`VLLM_LOGGING_LEVEL=INFO python -m async_executor.demo` shows its logs).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

# The demo's own output, not vLLM's warnings (dozens per engine). Hazard: this
# must run before vLLM is imported, in this process and in the engine processes
# vLLM spawns, which import this module again before vLLM (module level for
# that reason); vLLM's logging config reads the level from the environment.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's NUMA notice on CPU
logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")

PROMPTS = [
    "the quick brown fox",
    "a journey of a thousand miles",
    "the gpu waits for the cpu",
    "overlap the next batch with the current one",
    "tokens sampled in one step feed",
    "the scheduler picks requests and",
    "small models are cheap to run",
    "json objects have keys and values",
]


def _generate(model: str, ours: bool, settings: dict[str, Any]) -> tuple[list[Any], float, Any]:
    from vllm import LLM, SamplingParams

    import async_executor

    kwargs: dict[str, Any] = dict(
        dtype="float32", max_model_len=512, seed=0, enforce_eager=True,
        kv_cache_memory_bytes=64 << 20, use_tqdm_on_load=False,
    )  # fmt: skip
    if ours:
        kwargs["distributed_executor_backend"] = "async_executor"
        kwargs["additional_config"] = async_executor.pipeline_config(**settings)
    else:
        kwargs["async_scheduling"] = False
    llm = LLM(model, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)  # warm up
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = async_executor.pipeline_stats(llm) if ours else None
    # A graceful window long enough for a busy machine: vLLM kills an engine
    # process that is still tearing down after 5 s, leaking its shared memory.
    llm.llm_engine.engine_core.shutdown(timeout=60)
    return outputs, elapsed, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.expanduser("~"), ".cache", "async_executor", "tiny-llama"),
        help="where to build the model (reused when already there)",
    )
    parser.add_argument("--decode-window", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args(argv)

    from async_executor.tiny_llama import build_tiny_llama

    model = str(build_tiny_llama(Path(args.out)))
    settings = {"decode_window": args.decode_window, "depth": args.depth}
    print(f"model: {model}\nexecutor: async_executor {settings}\n")

    ours, t_ours, stats = _generate(model, True, settings)
    for out in ours:
        print(f"{out.prompt!r:48} -> {out.outputs[0].text!r}")
    print("\npipeline counters:")
    for name, value in stats.as_dict().items():
        print(f"  {name:38} {value}")

    if stats.windows_declined:
        print(
            "  (windows_declined: windows were measured not to make this machine's decode "
            "steps faster, so they were declined while requests were arriving; min_window_gain=0 "
            "turns the check off)"
        )

    sync, t_sync, _ = _generate(model, False, {})
    same = all(
        a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ours, sync, strict=True)
    )
    print(f"\nsame tokens as vLLM's synchronous path: {same}")
    print(
        f"generate time: async_executor {t_ours:.3f} s, vLLM sync {t_sync:.3f} s "
        "(a toy model on CPU: this shows the mechanics, not a speedup)"
    )
    overlapped = stats.launched_before_predecessor_resolved > 0 and stats.carry_over_tokens > 0
    return 0 if same and overlapped else 1


if __name__ == "__main__":
    raise SystemExit(main())
