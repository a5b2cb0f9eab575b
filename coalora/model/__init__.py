"""Base models: the built-in tokenizer and Llama, and loading of hub / local / base-stage models.

Light to import: transformers and tokenizers are imported inside the functions that use them.
"""

from coalora.model.builtin import build_model, builtin_config, pretrain
from coalora.model.load import load_base, load_model
from coalora.model.tokenizer import train_tokenizer

__all__ = ["build_model", "builtin_config", "load_base", "load_model", "pretrain", "train_tokenizer"]
