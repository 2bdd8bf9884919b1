"""Tiny offline model kit: bundled BPE tokenizer, tiny Llama causal LMs, reward and critic models."""
from rayllm.models.tiny import SIZES, count_parameters, resolve_model, tiny_model_path, value_model_from
from rayllm.models.tokenizer import bundled_tokenizer_path, load_tokenizer

__all__ = [
    "SIZES",
    "bundled_tokenizer_path",
    "count_parameters",
    "load_tokenizer",
    "resolve_model",
    "tiny_model_path",
    "value_model_from",
]
