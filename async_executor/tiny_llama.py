"""A small Llama the project builds itself: no download, no network.

Used by the demo, the tests and the CPU benchmark preset. The tokenizer is a
word-level tokenizer trained with `tokenizers` on a few sentences; the model
is a randomly initialised `LlamaForCausalLM` saved with `save_pretrained`.
Head dim is 32 because vLLM's CPU attention needs head_dim >= 32.

Building is deterministic (fixed seed), so two builds give identical weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "the gpu waits for the cpu and the cpu waits for the gpu",
    "overlap the next batch with the current one to keep the device busy",
    "tokens sampled in one step feed the inputs of the next step",
    "every request gets its own cache blocks and its own stop condition",
    "small models are cheap to run and quick to build for tests",
    "the scheduler picks requests and the runner prepares their inputs",
    "json objects have keys and values separated by colons",
    "numbers like 0 1 2 3 4 5 6 7 8 9 10 100 and 1000 appear too",
    '{ "name" : "value" , "count" : 3 , "ok" : true , "list" : [ 1 , 2 ] }',
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Shape: 2 layers, hidden 128, 4 heads of 32, 2 KV heads.
DEFAULT_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def _build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    # Decoding joins words with spaces so that stop strings can be matched.
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(out)
    return int(tok.get_vocab_size())


def corpus_prompts(n: int) -> list[str]:
    """n distinct prompts made of words the tokenizer knows."""
    words = " ".join(CORPUS).split()
    prompts = []
    for i in range(n):
        start = (i * 7) % (len(words) - 12)
        prompts.append(" ".join(words[start : start + 3 + i % 9]))
    return prompts


def build_tiny_llama(
    out: str | Path,
    *,
    seed: int = 0,
    initializer_range: float = 0.5,
    shape: dict[str, int] | None = None,
) -> Path:
    """Write a tokenizer and a random-weight Llama to `out`; return the path.

    `initializer_range` is large on purpose: it makes the next-token
    distribution peaked, so greedy decoding is far from ties and
    token-for-token comparisons test the pipeline, not float rounding.
    Rebuilding into a directory that already holds the same build is a no-op.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    stamp = {"seed": seed, "initializer_range": initializer_range, "shape": shape}
    stamp_file = out / "async_executor_build.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_tokenizer(out)
    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "initializer_range": initializer_range,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **(shape or DEFAULT_SHAPE),
    }
    cfg = LlamaConfig(**values)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    stamp_file.write_text(json.dumps(stamp))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_llama(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
