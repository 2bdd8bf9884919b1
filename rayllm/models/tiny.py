"""Tiny Llama-style models built from config, for CPU runs and tests.

Sizes span ~1M to ~100M parameters. Causal LMs, reward models and critics (a scalar head on
the same trunk) are saved in Hugging Face format (safetensors) under the cache, keyed by the
hash of everything that determines their weights, so a second request reuses the first build.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from rayllm.env import cache_dir
from rayllm.io import atomic_dir
from rayllm.models.tokenizer import bundled_tokenizer_path, load_tokenizer

SIZES = {
    "tiny-1m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352),
    "tiny-8m": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, intermediate_size=704),
    "tiny-30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408),
    "tiny-100m": dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12, intermediate_size=2048),
}
Kind = Literal["causal_lm", "reward", "critic"]
_KIT_VERSION = 1  # bump when the build below changes what a given key produces


def llama_config(size: str, tokenizer):
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; known: {sorted(SIZES)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_key_value_heads=SIZES[size]["num_attention_heads"],
        **SIZES[size],
    )


def tiny_model_path(size: str = "tiny-1m", kind: Kind = "causal_lm", seed: int = 0) -> Path:
    """Build (once) and return a directory holding a tiny model and its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tok_path = bundled_tokenizer_path()
    tok = load_tokenizer(tok_path)
    cfg = llama_config(size, tok)
    if kind != "causal_lm":
        cfg.num_labels = 1
    key = json.dumps([cfg.to_dict(), tok_path.name, kind, seed, _KIT_VERSION], sort_keys=True, default=str)
    path = cache_dir() / "models" / f"{size}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if kind == "causal_lm" else LlamaForSequenceClassification
    model = cls(cfg)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return path


def value_model_from(trunk: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A reward/critic model whose trunk is an existing causal LM (e.g. the SFT checkpoint),
    with a fresh scalar head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(trunk), num_labels=1, local_files_only=True,
                                                               use_safetensors=True)  # never a pickle
    tok = load_tokenizer(trunk)
    model.config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out)


def resolve_model(model_cfg, kind: Kind = "causal_lm") -> tuple[Path, Path]:
    """(model dir, tokenizer dir) for a ModelConfig: the user's path, or a cached tiny build."""
    if model_cfg.path:
        path = Path(model_cfg.path)
    else:
        path = tiny_model_path(model_cfg.tiny, kind, model_cfg.seed)
    return path, Path(model_cfg.tokenizer or path)


def count_parameters(path: str | Path, kind: Kind = "causal_lm") -> int:
    """Parameter count from the config alone (meta device: no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = cls.from_config(cfg)
    return sum(p.numel() for p in model.parameters())
