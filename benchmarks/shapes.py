"""Model shapes: named presets or a user's config.json.

`tiny` is the project's own small Llama with real (random) weights and a
tokenizer. The Llama presets are config.json files of the public models'
shapes, run with `load_format="dummy"` (random weights, no download) and
token-id prompts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LLAMA3_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B
    "llama-1b": {
        **_LLAMA3_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # meta-llama/Llama-3.1-8B
    "llama-8b": {
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


@dataclass(frozen=True)
class Model:
    shape: str
    path: str
    # Random weights from vLLM's dummy loader, prompts as token ids.
    dummy: bool
    vocab_size: int


def materialize(shape: str, root: Path) -> Model:
    """Write (or reuse) the model directory for `shape` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    if shape == "tiny":
        from async_executor.tiny_llama import build_tiny_llama

        path = build_tiny_llama(root / "tiny")
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        return Model("tiny", str(path), dummy=False, vocab_size=int(vocab))
    if shape in PRESETS:
        config = PRESETS[shape]
        path = root / shape
    else:
        source = Path(shape)
        if source.is_dir():
            source = source / "config.json"
        if not source.is_file():
            raise SystemExit(
                f"unknown shape {shape!r}: use tiny, {', '.join(PRESETS)}, "
                "or a path to a config.json"
            )
        config = json.loads(source.read_text())
        path = root / source.parent.name
        shape = source.parent.name
        generation = source.parent / "generation_config.json"
        if generation.exists():
            path.mkdir(parents=True, exist_ok=True)
            shutil.copy(generation, path / "generation_config.json")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return Model(shape, str(path), dummy=True, vocab_size=int(config["vocab_size"]))
