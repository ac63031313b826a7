"""qlora-jax: QLoRA for JAX.

Blockwise 4-bit quantization (NF4, FP4, Int4) with double quantization, byte-compatible with
bitsandbytes; LoRA adapters for Flax models; Pallas GPU kernels; training utilities.

Submodules (imported on demand): `qlora_jax.ops` (qlora_matmul), `qlora_jax.lora` (LoraConfig),
`qlora_jax.nnx` / `qlora_jax.linen` (the model transforms), `qlora_jax.models`, `qlora_jax.io`,
`qlora_jax.train`, `qlora_jax.data`, `qlora_jax.sharding` (meshes and partition rules).
"""

from qlora_jax.formats import FORMATS, Format, dynamic_map, get_format
from qlora_jax.quantize import (
    Footprint,
    QuantizedArray,
    QuantPolicy,
    dequantize,
    dequantize_tree,
    decode_absmax,
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
    "Footprint", "QuantizedArray", "QuantPolicy", "dequantize", "dequantize_tree", "decode_absmax", "double_quantize",
    "footprint", "is_quantized", "quantize", "quantize_linear_kernel", "quantize_tree",
]
