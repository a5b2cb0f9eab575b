"""CoA-LoRA layers and the configuration-aware model (METHOD.md §3, §6).

    CoALoRALinear   y = x·W̃ᵀ + b + (α/r)·((drop(x)·Aᵀ)·Uᵀ)·Bᵀ: a quantized linear layer with its LoRA
    WeightCache     an LRU of quantized weights W̃, bounded in bytes (cheap configuration switching)
    CoAModel        a Hugging Face causal LM whose quantized layers are CoALoRALinear, θ (ConfigNet), and the
                    switch between configurations at run time

Only A, B (and θ) train. The base model's parameters are frozen and never modified: each layer keeps its
full-precision W (the source every configuration is quantized from) and holds the current W̃ beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from coalora.model.weight_cache import WeightCache
from coalora.model.confignet import ConfigNet, block_index, load_exact, spec_field_tensor, vocabulary
from coalora.quant import fake_quantize
from coalora.threads import serial_below

if TYPE_CHECKING:  # pragma: no cover
    from coalora.params import LoraParams
    from coalora.space import Config

LORA_A, LORA_B, CONFIGNET = "lora_A", "lora_B", "confignet"
MIB = 2**20


def lora_a_bound(in_features: int) -> float:
    """Half-width of A's uniform init: peft's ``kaiming_uniform_(a=√5)`` (nn.Linear's default) is
    U(−b, b) with b = gain·√(3/fan_in), gain = √(2/(1+5)) — that is b = 1/√fan_in."""
    return 1.0 / math.sqrt(in_features)


class CoALoRALinear(nn.Module):
    """A quantized linear layer with a configuration-aware LoRA:

        y = x·W̃ᵀ + b + (α/r)·((drop(x)·Aᵀ)·Uᵀ)·Bᵀ,     ΔW = (α/r)·B·U·A

    x (..., in) → y (..., out). W̃ (out, in) is the current configuration's quantized weight (set by
    CoAModel.set_config), A (r, in) starts kaiming-uniform like peft, B (out, r) starts at zero, U (r, r)
    comes from θ once per forward for all layers (``None`` → identity: plain LoRA).

    Attributes:
        weight, bias: the original layer's frozen parameters (W in full precision: the quantization source).
        weight_q: W̃ in the model's compute dtype (a non-persistent buffer, so it follows ``.to(device)``).
        lora_A, lora_B: the trainable factors, float32 whatever the compute dtype (as peft does).
        U: (r, r) or None.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("weight_q", None, persistent=False)
        self.U: torch.Tensor | None = None
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(−1/√in, 1/√in), B = 0. With a (CPU) ``generator`` A is drawn on the CPU from it, so a seed
        gives the same values on every device; without one, from torch's global RNG like any nn.Module."""
        bound = lora_a_bound(self.in_features)
        fresh = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype).uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(fresh)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → y (..., out).

        Evaluated as drop(x)·A'ᵀ·Bᵀ with A' = (α/r)·U·A (r, in), formed once per call: r²·in work instead of
        applying U and α/r to every token (2·N·r²), and autograd keeps exactly what plain LoRA keeps — x and
        the (..., r) activation — no extra per-token tensor.
        """
        if self.weight_q is None:
            raise RuntimeError("CoALoRALinear has no quantized weight: call CoAModel.set_config(config) first")
        out = F.linear(x, self.weight_q, self.bias)  # (..., out) in the compute dtype
        a = self.lora_A if self.U is None else self.U @ self.lora_A  # (r, in)
        h = F.linear(self.dropout(x).to(a.dtype), a * self.scaling)  # (..., r)
        return out + F.linear(h, self.lora_B).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}"


class CoAModel(nn.Module):
    """A causal LM with CoA-LoRA on its quantized layers and θ, switchable between configurations.

    Args:
        model: the Hugging Face model (its target ``nn.Linear`` layers are replaced in place by CoALoRALinear;
            every base parameter is frozen, none is modified).
        layers: the quantized layers, name → (out, in), in model order (``coalora.space.quantized_layers``).
        lora: ``LoraParams`` (rank, alpha, dropout, θ sizes, cache_mb).
        use_confignet: False gives plain LoRA (Shared-LoRA and per-configuration baselines): U = I, no θ.

    Attributes:
        model, layer_names, confignet (ConfigNet | None), config (the current Config | None), cache.

    Random init: A and θ are drawn from torch's global RNG like any nn.Module; call :meth:`reset_lora` (and
    seed torch) for a reproducible start.

    Train through ``coa(...)`` (:meth:`forward`): it recomputes U with gradients to θ. Evaluating through
    ``coa.model`` directly (lm-eval, perplexity code that wants a PreTrainedModel) also works: :meth:`set_config`
    sets U from the current θ (no graph); after θ changed (training), call :meth:`update_u` first.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, tuple[int, int]], lora: "LoraParams",
                 use_confignet: bool = True):
        super().__init__()
        self.model, self.lora = model, lora
        for p in model.parameters():
            p.requires_grad_(False)
        self.layer_names = list(layers)
        self.shapes = {n: (int(layers[n][0]), int(layers[n][1])) for n in self.layer_names}
        self.layers: dict[str, CoALoRALinear] = {n: self._wrap(n) for n in self.layer_names}
        self.cache = WeightCache(lora.cache_mb * MIB)
        self.confignet: ConfigNet | None = None
        if use_confignet:
            n_blocks, types = vocabulary(self.layer_names)
            c = lora.confignet
            self.confignet = ConfigNet(lora.rank, n_blocks, types, c.embed_dim, c.hidden, c.init_std)
            self.confignet.to(next(iter(self.layers.values())).weight.device)
        device = next(iter(self.layers.values())).weight.device
        blocks = torch.tensor([block_index(n) for n in self.layer_names], dtype=torch.int64, device=device)
        self.register_buffer("block_ids", blocks, persistent=False)  # (L,)
        types = self.confignet.type_index(self.layer_names) if self.confignet is not None else blocks * 0
        self.register_buffer("type_ids", types.to(device), persistent=False)  # (L,)
        self.register_buffer("spec_fields", None, persistent=False)  # (L, 5) once a config is set
        self.config: Config | None = None
        self._residuals: dict[str, torch.Tensor] | None = None
        self._current: dict[str, str] = {}  # layer → spec key of its current W̃

    def _wrap(self, name: str) -> CoALoRALinear:
        base = self.model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"CoAModel: {name!r} is {type(base).__name__}, not nn.Linear")
        if (base.out_features, base.in_features) != self.shapes[name]:
            raise ValueError(f"CoAModel: {name!r} is {(base.out_features, base.in_features)}, "
                             f"layers say {self.shapes[name]}")
        layer = CoALoRALinear(base, self.lora.rank, self.lora.alpha, self.lora.dropout)
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        return layer

    # ---------------------------------------------------------------------------------------------------
    # Configurations
    # ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_config(self, config: "Config") -> None:
        """Make every layer use W̃ = Q(source, config[layer]); also set U from the current θ.

        The source is W (or the residual of :meth:`set_residual_base`). W̃ is computed in float32 by
        ``fake_quantize`` and stored in the layer's compute dtype; a layer whose spec did not change is not
        touched, other layers come from the cache when there (an LRU bounded by ``lora.cache_mb`` MB).

        Raises:
            ValueError: the config is for other layers or shapes.
        """
        if set(config) != set(self.layer_names) or any(config.shapes[n] != self.shapes[n] for n in config):
            raise ValueError(f"CoAModel.set_config: config {config.id} is for other layers than this model's "
                             f"{len(self.layer_names)} quantized layers")
        for name in self.layer_names:
            spec = config[name]
            if self._current.get(name) != spec.key:
                self.layers[name].weight_q = self._quantized(name, spec)
                self._current[name] = spec.key
        self.spec_fields = spec_field_tensor([config[n] for n in self.layer_names]).to(self.block_ids.device)
        self.config = config
        self.update_u()

    def _quantized(self, name: str, spec) -> torch.Tensor:
        layer = self.layers[name]
        key = (name, spec.key)
        cached = self.cache.get(key, layer.weight.device)
        if cached is not None:
            return cached
        source = self._residuals[name] if self._residuals is not None else layer.weight
        with serial_below(source.numel()):
            w_q = fake_quantize(source.detach().to(torch.float32), spec).to(layer.weight.dtype)  # (out, in)
        self.cache.put(key, w_q)
        return w_q

    @torch.no_grad()
    def set_residual_base(self, residuals: Mapping[str, torch.Tensor] | None) -> None:
        """Quantize ``residuals[layer]`` (LQ-LoRA: W − (α/r)·B·A) instead of W from now on; None → W again.

        Clears the cache and re-quantizes the current config, if any.
        """
        if residuals is not None:
            if set(residuals) != set(self.layer_names):
                raise ValueError("set_residual_base: residuals must be given for exactly the quantized layers")
            bad = [n for n in self.layer_names if tuple(residuals[n].shape) != self.shapes[n]]
            if bad:
                raise ValueError(f"set_residual_base: wrong shapes for {bad[:4]}")
            residuals = {n: residuals[n].detach().to(self.layers[n].weight.device) for n in self.layer_names}
        self._residuals = residuals
        self.cache.clear()
        self._current.clear()
        if self.config is not None:
            self.set_config(self.config)

    # ---------------------------------------------------------------------------------------------------
    # θ and the forward pass
    # ---------------------------------------------------------------------------------------------------

    def compute_u(self) -> torch.Tensor | None:
        """U for all L layers in ONE θ call: (L, r, r), or None without θ (plain LoRA)."""
        if self.confignet is None:
            return None
        self._require_config()
        return self.confignet(self.spec_fields, self.block_ids, self.type_ids)

    def _set_u(self, u: torch.Tensor | None) -> None:
        # unbind: one backward node for all L slices (stack), not L index-backward scatters of (L, r, r).
        slices = u.unbind(0) if u is not None else [None] * len(self.layer_names)
        for name, u_i in zip(self.layer_names, slices):
            self.layers[name].U = u_i

    @torch.no_grad()
    def update_u(self) -> None:
        """Recompute U from the current θ (no graph) for forward calls that bypass :meth:`forward`."""
        if self.config is not None:
            self._set_u(self.compute_u())

    def _require_config(self) -> None:
        if self.config is None:
            raise RuntimeError("CoAModel: no configuration; call set_config(config) first")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kw: Any):
        """Compute U for all layers (one batched θ call), set it on the layers, run the HF model.

        Args:
            input_ids: (B, T) token ids; attention_mask (B, T); labels (B, T) for the loss.

        Returns:
            The HF model's output (``.loss`` when ``labels`` is given, ``.logits`` (B, T, V)).
        """
        self._require_config()
        self._set_u(self.compute_u())
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)

    # ---------------------------------------------------------------------------------------------------
    # Parameters and adapter state
    # ---------------------------------------------------------------------------------------------------

    def lora_parameters(self) -> list[nn.Parameter]:
        """A_1, B_1, A_2, B_2, … in model order."""
        return [p for n in self.layer_names for p in (self.layers[n].lora_A, self.layers[n].lora_B)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA factors, then θ's parameters (if any): everything that trains."""
        theta = list(self.confignet.parameters()) if self.confignet is not None else []
        return self.lora_parameters() + theta

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The live adapter tensors under their state-dict keys (no copies)."""
        sd = {}
        for n in self.layer_names:
            sd[f"{n}.{LORA_A}"] = self.layers[n].lora_A
            sd[f"{n}.{LORA_B}"] = self.layers[n].lora_B
        if self.confignet is not None:
            sd.update({f"{CONFIGNET}.{k}": v for k, v in self.confignet.state_dict().items()})
        return sd

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``<layer>.lora_A`` (r, in), ``<layer>.lora_B`` (out, r), ``confignet.<name>``: detached CPU copies,
        contiguous and unshared (safetensors-ready)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._adapter_tensors().items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load A, B and θ from :meth:`adapter_state_dict` output (exact keys and shapes), then refresh U.

        Raises:
            ValueError: naming missing, unexpected or mis-shaped tensors.
        """
        own = self._adapter_tensors()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"adapter state does not fit this model: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}, shape mismatches {shapes[:4]}")
        for n in self.layer_names:
            self.layers[n].lora_A.copy_(sd[f"{n}.{LORA_A}"])
            self.layers[n].lora_B.copy_(sd[f"{n}.{LORA_B}"])
        if self.confignet is not None:
            prefix = f"{CONFIGNET}."
            load_exact(self.confignet, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                       "ConfigNet state")
        self.update_u()

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The HF model for inference at the current config, each CoALoRALinear replaced by a plain
        ``nn.Linear`` with W' = W̃ + (α/r)·B·U·A (out, in) in the compute dtype: the same outputs up to float
        rounding, without the LoRA path's extra matmuls. The CoAModel is consumed (its layers are replaced).
        """
        self._require_config()
        for name in self.layer_names:
            layer = self.layers[name]
            a = layer.lora_A if layer.U is None else layer.U @ layer.lora_A  # (r, in)
            w = layer.weight_q.float() + layer.scaling * (layer.lora_B @ a)  # (out, in)
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=w.device, dtype=layer.weight_q.dtype)
            plain.weight.copy_(w)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
            plain.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, plain)
        return self.model

    @torch.no_grad()
    def reset_lora(self, seed: int) -> None:
        """Fresh A (uniform, drawn from ``seed`` layer by layer in model order) and B = 0; θ untouched."""
        generator = torch.Generator().manual_seed(seed)
        for n in self.layer_names:
            self.layers[n].reset_lora(generator)
        self.update_u()

    @torch.no_grad()
    def init_lqlora(self, seed: int) -> dict[str, torch.Tensor]:
        """LQ-LoRA init (METHOD.md §6): A, B from the rank-r SVD of W, so that (α/r)·B·A = W_r.

        With W = P·diag(σ)·Qᵀ (σ descending) and c = √(r/α), the split is balanced:

            B = P[:, :r]·diag(√σ_r)·c  (out, r),   A = diag(√σ_r)·Q[:, :r]ᵀ·c  (r, in),
            (α/r)·B·A = P_r·diag(σ_r)·Q_rᵀ = W_r.

        When r > min(out, in) the extra rows of A are drawn as in :meth:`reset_lora` from ``seed`` (with the
        matching columns of B zero), so they can still learn. Does NOT change what is quantized: pass the
        returned residuals to :meth:`set_residual_base`.

        Returns:
            layer → residual W − (α/r)·B·A, (out, in) float32 on W's device.
        """
        generator = torch.Generator().manual_seed(seed)
        residuals = {}
        for n in self.layer_names:
            layer = self.layers[n]
            w = layer.weight.detach().to(torch.float32)  # (out, in)
            p, sigma, qt = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
            k = min(layer.rank, sigma.numel())
            root = sigma[:k].sqrt() * math.sqrt(1.0 / layer.scaling)  # (k,) = √σ·c
            layer.reset_lora(generator)
            layer.lora_A[:k] = root[:, None] * qt[:k]
            layer.lora_B[:, :k] = p[:, :k] * root[None, :]
            residuals[n] = w - layer.scaling * (layer.lora_B @ layer.lora_A)
        self.update_u()
        return residuals
