"""Llama-family causal language model in Flax NNX (Llama 1/2/3, SmolLM2, Qwen2).

The module tree mirrors Hugging Face names so that parameter paths read like
``model.layers[3].self_attn.q_proj.kernel``; every projection is a plain
:class:`flax.nnx.Linear` (kernel ``[in, out]``) and is only ever *called*
(``self.q_proj(x)``), so another module can swap it in place for a quantized or
LoRA layer by walking the graph.

Shapes use: ``B`` batch, ``T`` query length, ``S`` key length (cache size),
``D`` hidden size, ``N`` query heads, ``K`` key/value heads, ``H`` head dim,
``V`` vocab size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "LlamaConfig",
    "KVCache",
    "RMSNorm",
    "LlamaAttention",
    "LlamaMLP",
    "DecoderLayer",
    "LlamaModel",
    "LlamaForCausalLM",
    "REMAT_POLICIES",
    "rope_inv_freq",
    "apply_rope",
    "rope_cos_sin",
    "init_cache",
]

_SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_SUPPORTED_ROPE_TYPES = (None, "default", "linear", "llama3")


def _module_list(modules: list) -> Any:
    """A list of submodules that flax 0.12.x treats as graph data.

    flax >= 0.12 refuses plain lists of modules on pytree-style Modules and offers
    ``nnx.List``; fall back to ``nnx.data(list)`` if an older 0.12 lacks it.
    """
    if hasattr(nnx, "List"):
        return nnx.List(modules)
    return nnx.data(list(modules))  # pragma: no cover - older flax


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family model (field names follow HF ``config.json``).

    ``rope_scaling`` is ``None`` or a dict with ``rope_type`` in {"linear", "llama3"}
    and its parameters (``factor``; for llama3 also ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"

    def __hash__(self) -> int:
        # rope_scaling (dict) / eos_token_id (list) are unhashable; the config is static
        # metadata of the module graph, which jit hashes.
        return hash(repr(sorted(self.to_hf().items(), key=lambda kv: kv[0])))

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.head_dim is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}) when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported (supported: {_SUPPORTED_MODEL_TYPES})"
            )
        if self.rope_scaling is not None:
            rtype = self.rope_type
            if rtype not in _SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling type {rtype!r} is not supported (supported: linear, llama3)"
                )
            if rtype in ("linear", "llama3"):
                f = self.rope_scaling.get("factor")
                if f is None or not float(f) > 0:
                    raise ValueError(f"rope_scaling.factor must be > 0, got {f!r}")
            if rtype == "llama3":
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in self.rope_scaling:
                        raise ValueError(f"rope_scaling.{k} is required for rope_type 'llama3'")
                if float(self.rope_scaling["high_freq_factor"]) <= float(self.rope_scaling["low_freq_factor"]):
                    raise ValueError("rope_scaling.high_freq_factor must exceed low_freq_factor")

    @property
    def rope_type(self) -> str | None:
        """Normalised RoPE scaling type: None, "linear" or "llama3"."""
        if self.rope_scaling is None:
            return None
        t = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        return None if t == "default" else t

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, (list, tuple)):
            return tuple(int(i) for i in self.eos_token_id)
        return (int(self.eos_token_id),)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
        """Build from an HF ``config.json`` dict; missing required keys raise ``ValueError``.

        Accepts both the classic layout (``rope_theta``/``rope_scaling`` at top level) and
        the newer ``rope_parameters`` dict. ``model_type == "qwen2"`` implies q/k/v biases.
        """
        cfg = dict(cfg)
        model_type = cfg.get("model_type", "llama")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: {_SUPPORTED_MODEL_TYPES})"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        for k in required:
            if k not in cfg:
                raise ValueError(f"config is missing required field {k!r}")
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        rp = cfg.get("rope_parameters")
        if isinstance(rp, Mapping):  # transformers >= 5 layout
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            if rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
                rope_scaling = None
        if model_type == "qwen2":
            attention_bias = True  # Qwen2 has q/k/v biases but no config key for them
        else:
            attention_bias = bool(cfg.get("attention_bias", False))
        nh = cfg["num_attention_heads"]
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=nh,
            num_key_value_heads=cfg.get("num_key_value_heads") or nh,
            vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this config."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = dict(
            architectures=[arch], model_type=self.model_type, hidden_act="silu",
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            vocab_size=self.vocab_size, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        return d


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` float64, with linear / llama3 scaling applied."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rtype = config.rope_type
    if rtype == "linear":
        inv = inv / float(config.rope_scaling["factor"])
    elif rtype == "llama3":
        rs = config.rope_scaling
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones untouched, the band between
        # interpolated smoothly (Llama 3.1 recipe).
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` tables ``[B,T,1,H]`` float32 for ``positions [B,T]`` and ``inv_freq [H/2]``.

    Computed once per forward and shared by every layer.
    """
    ang = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B,T,H/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B,T,1,H]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B,T,heads,H]`` with tables from :func:`rope_cos_sin` (HF rotate_half convention).

    Computed in float32; the result has ``x.dtype``.
    """
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


# --------------------------------------------------------------------------- KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated key/value cache for all layers.

    Attributes:
      k, v: tuples (one per layer) of ``[B, S, K, H]`` arrays in the compute dtype.
      valid: ``[B, S]`` bool, True for slots holding a real (non-padding) token.
      index: int32 scalar, number of slots written so far (same for the whole batch).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """Zeroed :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens."""
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    zeros_v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return KVCache(k=zeros, v=zeros_v, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (HF Llama convention)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype: Any = None, param_dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., D]`` -> same shape, in ``self.dtype`` (or ``x.dtype`` if None)."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = y * self.weight[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class LlamaAttention(nnx.Module):
    """Multi-head attention with GQA and RoPE; q/k/v/o are plain ``nnx.Linear``."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any,
                 attn_implementation: str | None, rngs: nnx.Rngs):
        c = config
        D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(D, N * H, use_bias=c.attention_bias, **lin)
        self.k_proj = nnx.Linear(D, K * H, use_bias=c.attention_bias, **lin)
        self.v_proj = nnx.Linear(D, K * H, use_bias=c.attention_bias, **lin)
        # HF Llama's attention_bias also covers o_proj; Qwen2 has q/k/v biases only.
        self.o_proj = nnx.Linear(N * H, D, use_bias=c.attention_bias and c.model_type == "llama", **lin)
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.dtype = dtype
        self.attn_implementation = attn_implementation

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 mask: jax.Array | None, cache_kv: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | None = None):
        """Attention over ``x [B,T,D]`` with RoPE tables ``rope = (cos, sin)`` (``[B,T,1,H]``).

        ``mask`` is a bool ``[B,1,T,S]`` (True = attend) or None for plain causal attention.
        With ``cache_kv = (k, v)`` (each ``[B,S,K,H]``), the new keys/values are written at
        ``cache_index`` and attention runs over the whole cache; returns ``(y, (k, v))``.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            new_kv = (k, v)
        dt = self.dtype or q.dtype
        out = jax.nn.dot_product_attention(
            q.astype(dt), k.astype(dt), v.astype(dt),
            mask=mask, is_causal=mask is None,
            implementation=self.attn_implementation,
        )
        y = self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))
        return y if cache_kv is None else (y, new_kv)


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        D, F = config.hidden_size, config.intermediate_size
        lin = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(D, F, **lin)
        self.up_proj = nnx.Linear(D, F, **lin)
        self.down_proj = nnx.Linear(F, D, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B,T,D]`` -> ``[B,T,D]``."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, norm_dtype: Any,
                 attn_implementation: str | None, rngs: nnx.Rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps, dtype=dtype, param_dtype=norm_dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype,
                                        attn_implementation=attn_implementation, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(D, eps, dtype=dtype, param_dtype=norm_dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, rope, mask, cache_kv=None, cache_index=None):
        """``h [B,T,D]`` -> ``[B,T,D]`` (and the updated ``(k, v)`` when ``cache_kv`` is given)."""
        a = self.self_attn(self.input_layernorm(h), rope, mask, cache_kv, cache_index)
        new_kv = None
        if cache_kv is not None:
            a, new_kv = a
        h = h + a.astype(h.dtype)
        h = h + self.mlp(self.post_attention_layernorm(h)).astype(h.dtype)
        return h if cache_kv is None else (h, new_kv)


def _policy(name: str | None) -> Callable | None:
    if name == "full":
        return None  # save nothing: recompute the whole layer in the backward pass
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat_policy {name!r} is not supported (use one of {REMAT_POLICIES})")


REMAT_POLICIES = (None, "full", "save_dots", "offload_dots")


def _call_layer(layer: DecoderLayer, h, rope, mask):
    return layer(h, rope, mask)


class LlamaModel(nnx.Module):
    """Embedding, decoder stack and final norm (HF ``LlamaModel``)."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, norm_dtype: Any,
                 attn_implementation: str | None, remat_policy: str | None, rngs: nnx.Rngs):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r} is not supported (use one of {REMAT_POLICIES})")
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = _module_list([
            DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, norm_dtype=norm_dtype,
                         attn_implementation=attn_implementation, rngs=rngs)
            for _ in range(config.num_hidden_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=norm_dtype)
        self.remat_policy = remat_policy
        # Stored as a tuple of Python floats (static) so the module holds no extra array state.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(config))

    def __call__(self, input_ids, positions, mask, cache: KVCache | None = None):
        """``input_ids [B,T]`` -> hidden states ``[B,T,D]`` (and updated cache if given)."""
        rope = rope_cos_sin(positions, jnp.asarray(self.inv_freq, jnp.float32))
        h = self.embed_tokens(input_ids)
        new_k, new_v = [], []
        if cache is None and self.remat_policy is not None:
            layer_fn = nnx.remat(_call_layer, policy=_policy(self.remat_policy))
        else:
            layer_fn = _call_layer
        for i, layer in enumerate(self.layers):
            if cache is None:
                h = layer_fn(layer, h, rope, mask)
            else:
                h, (k, v) = layer(h, rope, mask, (cache.k[i], cache.v[i]), cache.index)
                new_k.append(k)
                new_v.append(v)
        h = self.norm(h)
        if cache is None:
            return h
        return h, (tuple(new_k), tuple(new_v))


class LlamaForCausalLM(nnx.Module):
    """Llama causal LM: ``model`` (HF ``LlamaModel``) plus ``lm_head`` (None when tied).

    Args:
      config: model hyper-parameters.
      dtype: compute dtype of matmuls and the residual stream (None = param dtype).
      param_dtype: storage dtype of projection and embedding params.
      norm_dtype: storage dtype of RMSNorm weights (float32 by default).
      attn_implementation: passed to ``jax.nn.dot_product_attention`` (None, "xla", "cudnn").
      remat_policy: None, "full", "save_dots" or "offload_dots"; rematerialises each
        decoder layer (training forward only; ignored when a KV cache is used).
      rngs: initialisation RNGs.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 norm_dtype: Any = jnp.float32, attn_implementation: str | None = None,
                 remat_policy: str | None = None, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, norm_dtype=norm_dtype,
                                attn_implementation=attn_implementation, remat_policy=remat_policy,
                                rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: KVCache | None = None, *,
                 segment_ids: jax.Array | None = None):
        """Next-token logits.

        Args:
          input_ids: ``[B,T]`` int token ids.
          positions: ``[B,T]`` int RoPE positions; default ``cache.index + arange(T)``.
          attention_mask: ``[B,T]`` bool/int padding mask (1 = real token, 0 = padding;
            padding keys are never attended), or a full bool mask ``[B,1|N,T,S]``
            (True = may attend) that is combined with the causal mask.
          cache: a :class:`KVCache`; the T new tokens are written at ``cache.index``.
          segment_ids: ``[B,T]`` int ids for packed sequences; a token only attends to
            earlier tokens with the same segment id (no cache support).

        Returns:
          ``logits [B,T,V]`` float32, or ``(logits, new_cache)`` when ``cache`` is given.
        """
        input_ids = jnp.asarray(input_ids)
        B, T = input_ids.shape
        offset = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(T, dtype=jnp.int32), (B, T))
        mask, new_valid = self._build_mask(B, T, attention_mask, segment_ids, cache)
        if cache is None:
            h = self.model(input_ids, positions, mask)
            return self._logits(h)
        h, (ks, vs) = self.model(input_ids, positions, mask, cache)
        new_cache = KVCache(k=ks, v=vs, valid=new_valid, index=cache.index + T)
        return self._logits(h), new_cache

    def _build_mask(self, B, T, attention_mask, segment_ids, cache):
        """Bool mask ``[B,1,T,S]`` or None (pure causal); also the cache's new ``valid``."""
        if cache is None:
            if attention_mask is None and segment_ids is None:
                return None, None
            q_idx = jnp.arange(T)
            mask = (q_idx[:, None] >= q_idx[None, :])[None, None]  # causal [1,1,T,T]
            if segment_ids is not None:
                seg = jnp.asarray(segment_ids)
                mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
            if attention_mask is not None:
                am = jnp.asarray(attention_mask)
                if am.ndim == 2:
                    mask = mask & am.astype(bool)[:, None, None, :]
                elif am.ndim == 4:
                    mask = mask & am.astype(bool)
                else:
                    raise ValueError(f"attention_mask must be [B,T] or [B,1|N,T,S], got shape {am.shape}")
            return jnp.broadcast_to(mask, (B, mask.shape[1], T, T)), None
        if segment_ids is not None:
            raise ValueError("segment_ids are not supported together with a KV cache")
        S = cache.max_len
        new_tok = jnp.ones((B, T), bool)
        am4 = None
        if attention_mask is not None:
            am = jnp.asarray(attention_mask)
            if am.ndim == 2:
                new_tok = am.astype(bool)
            elif am.ndim == 4:
                am4 = am.astype(bool)
            else:
                raise ValueError(f"attention_mask must be [B,T] or [B,1|N,T,S], got shape {am.shape}")
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_tok, cache.index, axis=1)
        slot = jnp.arange(S)
        q_slot = cache.index + jnp.arange(T)
        mask = (slot[None, :] <= q_slot[:, None])[None, None] & valid[:, None, None, :]  # [B,1,T,S]
        if am4 is not None:
            mask = mask & am4
        return mask, valid

    def _logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            emb = self.model.embed_tokens.embedding[...]
            dt = self.dtype or emb.dtype
            return jnp.einsum("btd,vd->btv", h.astype(dt), emb.astype(dt),
                              preferred_element_type=jnp.float32).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)
