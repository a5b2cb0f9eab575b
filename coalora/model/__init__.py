"""Base models: the built-in tokenizer and Llama, and loading of hub / local / base-stage models; and the
models built on them:

    coa           CoAModel: CoA-LoRA layers on fake-quantized weights, θ, configuration switching
    weight_cache  the LRU of quantized weights per (layer, spec) that makes switching cheap
    bnb_lora      peft LoRA on bitsandbytes NF4 (the classic QLoRA reference point)
    rebuild       one way to build a method's model (fresh or from its adapter), dispatching per backend
    adapter       the adapter file (write, read, header, split into A, B, θ)
    export        the deployment files: the folded peft adapter, the quantized model folder

Light to import: transformers and tokenizers are imported inside the functions that use them.
"""

from coalora.model.builtin import build_model, builtin_config, pretrain
from coalora.model.load import load_base, load_model
from coalora.model.tokenizer import train_tokenizer

__all__ = ["build_model", "builtin_config", "load_base", "load_model", "pretrain", "train_tokenizer"]
