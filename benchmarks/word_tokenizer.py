"""A word-level tokenizer of a whole vocabulary ("w0", "w1", ...) for models
with dummy weights: text prompts (a serving benchmark, stop strings) need a
tokenizer whose vocabulary matches the config's `vocab_size`, and a
text round trip of any token sequence must give the same tokens back."""

from __future__ import annotations

from pathlib import Path


def write_word_tokenizer(path: Path, vocab: int, eos: str | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token=eos).save_pretrained(
        path
    )
