"""Model definitions (Llama family in Flax NNX) and generation."""

from qlora_jax.models.build import (
    ScannedLayers,
    init_llama,
    init_quantized_llama,
    is_stacked,
    layer_key,
    load_quantized_llama,
    stack_layers,
    unstack_layers,
)
from qlora_jax.models.generate import generate, sample_logits
from qlora_jax.models.llama import (
    REMAT_POLICIES,
    DecoderLayer,
    KVCache,
    LlamaAttention,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    RMSNorm,
    apply_rope,
    init_cache,
    rope_cos_sin,
    rope_inv_freq,
)

__all__ = [
    "REMAT_POLICIES", "DecoderLayer", "KVCache", "LlamaAttention", "LlamaConfig", "LlamaForCausalLM",
    "LlamaMLP", "LlamaModel", "RMSNorm", "apply_rope", "generate", "init_cache", "rope_cos_sin", "rope_inv_freq",
    "sample_logits",
    # build: 4-bit models built layer by layer, stacked decoder layers
    "ScannedLayers", "init_llama", "init_quantized_llama", "is_stacked", "layer_key", "load_quantized_llama",
    "stack_layers", "unstack_layers",
]
