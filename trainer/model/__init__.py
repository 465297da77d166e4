"""The base model: loading from a local path, 4-bit quantisation, the bitsandbytes CPU guard, the
transform order that turns it into a trainable adapter model, and the tiny built-in model of the demo.

This package and the adapter layer over a 4-bit base (trainer/adapters/base_layers.py) are the only
places that import bitsandbytes.
"""

from trainer.model.load import (
    DTYPES,
    BaseDigest,
    count_parameters,
    guard_4bit_gradients,
    load_base_model,
    load_tokenizer,
    prepare_model,
    prepare_model_from_pretrained,
    quantization_supported,
    quantized_digest,
)
from trainer.model.tiny import (
    StaleModelError,
    build_tiny_model,
    corpus_texts,
    ensure_tiny_model,
    pretrain,
    train_tokenizer,
)

__all__ = [
    "DTYPES",
    "BaseDigest",
    "StaleModelError",
    "build_tiny_model",
    "corpus_texts",
    "count_parameters",
    "ensure_tiny_model",
    "guard_4bit_gradients",
    "load_base_model",
    "load_tokenizer",
    "prepare_model",
    "prepare_model_from_pretrained",
    "pretrain",
    "quantization_supported",
    "quantized_digest",
    "train_tokenizer",
]
