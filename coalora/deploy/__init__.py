"""Deployed models: packed storage that transformers and peft load as they load any model.

    folder  the packed model folder (config.json ``quantization_config``, packed tensors) and its checks
    hf      the transformers quantization method ``"coalora"`` (imports transformers)
    hooks   registers ``hf`` when transformers' quantizer registry is imported (no heavy import)

Nothing here is imported eagerly except ``hooks`` (by ``import coalora``).
"""
