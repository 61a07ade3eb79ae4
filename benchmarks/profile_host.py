"""Where the host time goes: cProfile of one system's generate, in-process.

    python -m benchmarks.profile_host --shape llama-1b --batch 32 \
        --system 'async_executor[decode_window=16]' --out DIR

Runs vLLM's engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that
the profiler sees the scheduler and the runner; writes DIR/<system>.prof and
prints the functions with the most own and cumulative time per decode step.
The profiler slows Python-heavy code: read the proportions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--system", default="async_executor")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--attention-backend")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch
    from vllm import LLM, SamplingParams

    from .run_one import token_prompts
    from .shapes import materialize
    from .systems import parse_system

    model = materialize(args.shape, Path(tempfile.gettempdir()) / "async_executor_models")
    system = parse_system(args.system)
    on_gpu = torch.cuda.is_available()
    kwargs = dict(seed=0, max_model_len=args.prompt_len + args.gen_len + 16,
                  max_num_seqs=max(args.batch, 8), disable_log_stats=True)  # fmt: skip
    if model.dummy:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    if args.attention_backend:
        kwargs["attention_config"] = {"backend": args.attention_backend}
    kwargs.update(
        dict(dtype="bfloat16", gpu_memory_utilization=0.85)
        if on_gpu
        else dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20)
    )
    kwargs.update(system.engine_kwargs)
    llm = LLM(model.path, **kwargs)
    prompts = token_prompts(args.batch, args.prompt_len, model.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in f"{system.name}_b{args.batch}")
    profiler.dump_stats(out / f"{tag}.prof")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(args.top)
        text = buf.getvalue()
        (out / f"{tag}.{key}.txt").write_text(text)
        print(f"== {system.name} batch {args.batch}: by {key} ({args.gen_len} steps)")
        print("\n".join(text.splitlines()[: 12 + args.top]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
