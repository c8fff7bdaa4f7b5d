"""Model presets: Llama-style ``transformers.LlamaConfig`` sizes from a CPU test to 7B.

The vocabulary always comes from the prepared data (its sentencepiece model), never from the
preset, so a preset fits any corpus. Any other causal LM is a ``config.json`` path away
(``model: path/to/config.json``); ``model.overrides`` patches single fields either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megawsd.errors import ConfigError

# hidden, layers, heads, kv heads, intermediate, max positions, tied embeddings
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1-0.2M params with a 512 vocab: CPU tests, seconds per run
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    # ~3M params with a 4k vocab: the 2-CPU-rank demo, minutes
    "demo": dict(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=512,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "20m": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=1024,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # GPT-3 small / Pythia-160m shape
    "125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
        max_position_embeddings=2048,
    ),
    "350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2816,
        max_position_embeddings=2048,
    ),
    # TinyLlama-1.1B
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        max_position_embeddings=2048,
    ),
    # Llama-2-7B
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
    ),
}


def model_config(
    model_cfg, vocab_size: int, seq_len: int, bos_id: int | None = None, eos_id: int | None = None
):
    """The transformers config for a RunConfig.model block and the data's vocabulary."""
    from transformers import AutoConfig, LlamaConfig

    if model_cfg.preset is not None:
        kwargs = dict(PRESETS[model_cfg.preset])
        kwargs.update(rms_norm_eps=1e-5, rope_theta=10000.0, attention_dropout=0.0)
        config = LlamaConfig(**kwargs)
    else:
        path = Path(model_cfg.config)
        if not path.exists():
            raise ConfigError(
                f"model.config = {str(path)!r}: file not found; give a "
                "transformers config.json or a preset name"
            )
        try:
            # the file itself: its directory's config.json may be another model's
            config = AutoConfig.from_pretrained(path)
        except (ValueError, OSError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"model.config = {str(path)!r}: not a transformers config ({err})"
            ) from None
    for key, value in model_cfg.overrides.items():
        if not hasattr(config, key):
            raise ConfigError(
                f"model.overrides.{key} = {value!r}: {type(config).__name__} has no such field"
            )
        setattr(config, key, value)
    config.vocab_size = int(vocab_size)
    if bos_id is not None and bos_id >= 0:
        config.bos_token_id = int(bos_id)
    if eos_id is not None and eos_id >= 0:
        config.eos_token_id = int(eos_id)
    config.pad_token_id = None
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(
            f"seq_len = {seq_len}: longer than the model's max_position_embeddings "
            f"({max_pos}); shorten seq_len or set model.overrides.max_position_embeddings"
        )
    config.use_cache = False
    return config


def build_model(config, seed: int):
    """Instantiate with a fixed seed: every rank builds the same initial weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
