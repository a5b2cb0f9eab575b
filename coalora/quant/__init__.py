"""Quantization for coalora: specs, NF-k double quantization, packing, optional bitsandbytes backend.

    spec       QuantSpec, SPEC_FIELDS, all_specs, QLORA_SPEC, storage_bits
    nf         nf_levels (NF-k tables)
    quantizer  the NF-k double quantizer: quantize_parts/dequantize_parts (the one implementation),
               fake_quantize (their composition), quantization_error
    packed     quantize -> QuantizedTensor (bit-packed, safetensors-ready)
    bnb        bitsandbytes NF4 layers and the CPU repack guard (imported lazily; bitsandbytes optional)
"""

from .bnb import bnb_available, bnb_nf4_linear, bnb_nf4_roundtrip, guard_bnb_cpu_repack
from .nf import NF_DELTA, nf_levels, nf_midpoints
from .quantizer import QuantParts, dequantize_parts, fake_quantize, quantization_error, quantize_parts
from .packed import QuantizedTensor, pack_bits, quantize, unpack_bits
from .spec import QLORA_SPEC, SPEC_FIELDS, QuantSpec, all_specs, block_counts, storage_bits

__all__ = [
    "NF_DELTA",
    "QLORA_SPEC",
    "SPEC_FIELDS",
    "QuantParts",
    "QuantSpec",
    "QuantizedTensor",
    "all_specs",
    "block_counts",
    "bnb_available",
    "bnb_nf4_linear",
    "bnb_nf4_roundtrip",
    "dequantize_parts",
    "fake_quantize",
    "guard_bnb_cpu_repack",
    "nf_levels",
    "nf_midpoints",
    "pack_bits",
    "quantization_error",
    "quantize",
    "quantize_parts",
    "storage_bits",
    "unpack_bits",
]
