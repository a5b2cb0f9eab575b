"""coalora as a transformers quantization method: ``quant_method: "coalora"`` in a model's config.json.

``AutoModelForCausalLM.from_pretrained(folder)`` on a packed model folder (``coalora.deploy.folder``) then

    1. builds the model skeleton on the meta device, as for any model (no weight is allocated);
    2. calls ``CoaloraHfQuantizer._process_model_before_weight_loading``, which checks the folder
       (``check_folder``: recorded specs, file sizes and sha256, packed tensor dtypes/shapes, layer shapes) and
       replaces every target ``nn.Linear`` by a meta ``PackedLinear`` of its spec;
    3. loads the checkpoint: the packed tensors land in the PackedLinear buffers (integers are never cast), the
       other tensors where they always go.

So no dense target weight is ever materialised, and a bad folder fails before anything is loaded. This module
imports transformers; ``coalora.deploy.hooks`` imports it (and registers the classes) only when transformers'
quantizer registry is imported, so ``import coalora`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from coalora.deploy.folder import CONFIG_KEYS, QUANT_METHOD, check_folder, weight_files


class CoaloraQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed model folder (keys: ``coalora.deploy.folder.CONFIG_KEYS``).

    Stored as read; :func:`coalora.deploy.folder.parse_layout` validates it when the model is loaded.
    """

    def __init__(self, **fields: Any):
        self.quant_method = QUANT_METHOD
        for key in CONFIG_KEYS[1:]:
            setattr(self, key, fields.pop(key, None))
        self.unknown = {k: v for k, v in fields.items() if k != "quant_method"}  # reported by the check

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in CONFIG_KEYS} | dict(self.unknown)


class CoaloraHfQuantizer(HfQuantizer):
    """Loads packed model folders (module docstring). Only pre-quantized folders: nothing is quantized on load."""

    requires_calibration = True  # from_pretrained(dense, quantization_config=...) is refused: use `coalora adapt`

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Check the folder, then swap each target ``nn.Linear`` (meta) for a ``PackedLinear`` (meta)."""
        from coalora.deploy.folder import _fail
        from coalora.quant.linear import PackedLinear

        if self.quantization_config.unknown:
            raise _fail(f"quantization_config has unknown keys {sorted(self.quantization_config.unknown)}")
        if not checkpoint_files:  # transformers versions that do not pass them: the folder's own files
            folder = Path(model.config.name_or_path)
            checkpoint_files = [folder / name for name in weight_files(folder)]
        modules = dict(model.named_modules())
        self.layout = check_folder(self.quantization_config.to_dict(), checkpoint_files, modules)
        for name, spec in self.layout.config.items():
            linear = modules[name]
            model.set_submodule(name, PackedLinear(linear.in_features, linear.out_features, spec,
                                                   bias=linear.bias is not None, dtype=linear.weight.dtype,
                                                   device=linear.weight.device))
        return model

    def is_serializable(self) -> bool:
        # save_pretrained would write the buffers but not new digests: `coalora adapt` writes packed folders.
        return False

    @property
    def is_trainable(self) -> bool:
        # Gradients flow through x·Ŵᵀ to the input (Ŵ is a constant), so a LoRA on top trains.
        return True


def register() -> None:
    """Register the config and quantizer under ``"coalora"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CoaloraQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CoaloraHfQuantizer)
