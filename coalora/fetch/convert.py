"""A GGUF checkpoint → an ordinary Hugging Face model folder (float32 safetensors, tokenizer beside it).

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package):
it maps llama.cpp's tensor names to its own, undoes llama.cpp's q/k row permutation, dequantizes every
block (Q4_1: w = d·q + m per block of 32; Q8_0: w = d·q) and rebuilds the config and the tokenizer from the
file's metadata. The loaded model carries a gguf ``quantization_config``, and ``save_pretrained`` refuses
to write it ("quantized with gguf and is not serializable"). So the weights go into a fresh model of the
same class built from that config without ``quantization_config``, and that model is saved: a folder every
later stage loads with ``AutoModelForCausalLM.from_pretrained(folder)``, exactly like any local model.

The weights stay exactly the dequantized values (float32 holds every Q4_1/Q8_0 value with its fp16 scale
exactly); the rounding the GGUF applied is baked in, which the README states.
"""

from __future__ import annotations

from pathlib import Path

from coalora.errors import UserError


def _plain_config(config):
    """A copy of ``config`` without the gguf ``quantization_config`` (so the model is ordinary)."""
    from transformers import AutoConfig

    values = config.to_dict()
    values.pop("quantization_config", None)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def load_gguf(gguf_file: Path):
    """``(model, tokenizer)`` read from a GGUF file, dequantized to float32 (model in eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except ImportError as exc:
        raise UserError(f"coalora fetch: reading {gguf_file.name} needs the `gguf` package ({exc}); "
                        "reinstall coalora (`make venv`), which depends on it") from None
    return model.eval(), tokenizer


def plain_model(loaded):
    """The same weights in a model of the same class built without ``quantization_config``.

    Tied embeddings stay tied: the new model ties ``lm_head`` to ``embed_tokens`` from its config, and the
    state dict holds the one tensor both names point at.
    """
    config = _plain_config(loaded.config)
    model = type(loaded)(config)   # built normally (its buffers, e.g. RoPE frequencies, come from the config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def tied(model) -> bool:
    """Whether the output head shares its tensor with the input embeddings."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def convert_gguf(gguf_file: Path, out: Path) -> dict:
    """Write ``out`` (an existing empty folder): config.json, model.safetensors, the tokenizer files.

    Returns:
        what was written: ``parameters`` (unique), ``dtype``, ``tied_embeddings``, ``architecture``,
        ``quant_types`` (the GGUF's ggml types, tensor counts), ``vocab_size``.

    Raises:
        UserError: the tied head did not survive (a model that would silently differ from the GGUF's).
    """
    loaded, tokenizer = load_gguf(gguf_file)
    model = plain_model(loaded)
    if model.config.tie_word_embeddings and not tied(model):
        raise UserError(f"coalora fetch: converting {Path(gguf_file).name}: lm_head lost its tie to embed_tokens")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)      # saved as read; coalora's loader sets pad = eos when it has none
    parameters = sum(p.numel() for p in model.parameters())   # a tied tensor is counted once
    del loaded
    return {"parameters": parameters, "dtype": "float32", "tied_embeddings": tied(model),
            "architecture": type(model).__name__, "quant_types": gguf_types(gguf_file),
            "vocab_size": model.config.vocab_size}


def gguf_types(gguf_file: Path) -> dict[str, int]:
    """``{ggml type name: number of tensors}`` in a GGUF file (how its weights were rounded)."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    return dict(sorted(Counter(tensor.tensor_type.name for tensor in reader.tensors).items()))
