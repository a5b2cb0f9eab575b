"""The classic QLoRA reference point: peft LoRA on bitsandbytes NF4 layers (METHOD.md §6, last bullet).

The ``bnb`` backend of ``coalora.model.rebuild`` (training and evaluation build it from there).

Every quantized layer becomes ``bitsandbytes.nn.Linear4bit`` (NF4, double-quantized scales, blocksize 64:
4.127 bits, the uniform spec ``QLORA_SPEC``), guarded against the CPU repack trap, and peft adds LoRA on
top. :class:`BnbLoraModel` gives it the interface the training loop expects of a CoAModel, so the one loop
trains it. bitsandbytes is optional: :func:`skip_reason` says why it cannot run here, and the stage
records that reason instead of training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from coalora.params import LoraParams
from coalora.quant import QLORA_SPEC, bnb_available, bnb_nf4_linear, guard_bnb_cpu_repack
from coalora.space import Config, Layers, config_from_rules

QUANTIZER = "bitsandbytes nf4, double quantization, blocksize 64"


def skip_reason() -> str | None:
    """None when bitsandbytes can build NF4 layers here, else why not."""
    if not bnb_available():
        return "bitsandbytes is not installed or does not import on this machine"
    return None


def uniform_config(layers: Layers) -> Config:
    """The config giving every quantized layer QLoRA's spec (4, 8, fp32, 64, 256)."""
    return config_from_rules(QLORA_SPEC, layers, source="qlora-bnb")


class BnbLoraModel(nn.Module):
    """A causal LM whose quantized layers are bitsandbytes NF4 with peft LoRA; trainable: the LoRA only.

    Args:
        model: the full-precision base model (modified in place: its target layers are replaced).
        layers: the quantized layers (name → (out, in)).
        lora: rank, alpha, dropout (θ does not apply).
    """

    def __init__(self, model: nn.Module, layers: Layers, lora: LoraParams):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        for name in layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, bnb_nf4_linear(getattr(parent, child)))
        guard_bnb_cpu_repack(model)
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(layers), bias="none")
        self.peft = get_peft_model(model, peft_config)
        guard_bnb_cpu_repack(self.peft)  # peft kept the Linear4bit objects as base layers; guard again anyway
        self.config = uniform_config(layers)

    def set_config(self, config: Config) -> None:
        """Only the uniform NF4 config exists here."""
        if config.id != self.config.id:
            raise ValueError(f"the bitsandbytes model holds only the uniform QLoRA config {self.config.id}, "
                             f"not {config.id}")

    def forward(self, **batch):
        return self.peft(**batch)

    def lora_modules(self) -> list[nn.Module]:
        return [m for m in self.peft.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter format (``…q_proj.lora_A.weight``), loadable by ``PeftModel``."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.adapter_state_dict())
        if set(sd) != expected:
            raise ValueError(f"adapter keys differ: missing {sorted(expected - set(sd))[:3]}, "
                             f"unexpected {sorted(set(sd) - expected)[:3]}")
        set_peft_model_state_dict(self.peft, sd)

    def adapter_metadata(self) -> dict:
        """The adapter file's header: peft's key format on bitsandbytes NF4 layers."""
        c = self.peft.peft_config["default"]
        return {"format": "peft", "rank": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                "use_confignet": False, "quantizer": QUANTIZER, "layers": {n: list(s) for n, s in
                                                                           self.config.shapes.items()}}

    @torch.no_grad()
    def reset_lora(self, seed: int) -> None:
        """peft's own initialisation, seeded: A ~ kaiming-uniform(a = √5), B = 0 (so ΔW = 0 at the start)."""
        generator = torch.Generator().manual_seed(seed)
        for module in self.lora_modules():
            nn.init.kaiming_uniform_(module.lora_A["default"].weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(module.lora_B["default"].weight)
