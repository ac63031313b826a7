"""qlora-jax: QLoRA for JAX.

Blockwise 4-bit quantization (NF4, FP4, Int4) with double quantization, byte-compatible with
bitsandbytes; LoRA adapters for Flax models; Pallas GPU kernels; training utilities.
"""

from qlora_jax.formats import FORMATS, Format, dynamic_map, get_format
from qlora_jax.quantize import (
    Footprint,
    QuantizedArray,
    QuantPolicy,
    dequantize,
    dequantize_tree,
    double_quantize,
    footprint,
    is_quantized,
    quantize,
    quantize_linear_kernel,
    quantize_tree,
)

__version__ = "0.1.0"

__all__ = [
    "FORMATS", "Format", "dynamic_map", "get_format",
    "Footprint", "QuantizedArray", "QuantPolicy", "dequantize", "dequantize_tree", "double_quantize",
    "footprint", "is_quantized", "quantize", "quantize_linear_kernel", "quantize_tree",
]
