"""Frozen 4-bit linear layers and the QLoRA matmul, with memory-lean custom VJPs.

Layout (torch/bitsandbytes order, as `qlora_jax.quantize_linear_kernel` writes it):

- a frozen base weight ``w`` is a `QuantizedArray` of shape ``[N, K]`` = ``[out, in]`` with its
  quantization blocks running along ``K``; a dense ``[N, K]`` array is accepted too (plain LoRA on
  a float base, e.g. the 16-bit LoRA baseline);
- LoRA ``A`` is ``[K, r]`` and ``B`` is ``[r, N]`` (Flax orientation; PEFT's ``lora_A.weight`` is
  ``A.T`` and ``lora_B.weight`` is ``B.T``).

``qlora_matmul`` computes ``y = x·deq(W)ᵀ + scale·(drop(x)·A)·B (+ bias)``. Its custom VJP returns
gradients for ``x``, ``A``, ``B`` (and ``bias``) only. What it keeps between forward and backward
is ``drop(x)``, ``scale·drop(x)·A`` (``[..., r]``), ``A``, ``B``, the packed weight and the dropout
key: never a dequantized copy of ``W`` (the backward dequantizes again, or calls a fused kernel)
and never the dense ``A·B``. Matmuls take operands in ``compute_dtype`` and accumulate in float32.

Backends: ``"xla"`` decodes the weight and calls ``dot_general``; an optimization barrier ties
each decode to the activation it multiplies, so that XLA neither merges the backward's decode
with the forward's (CSE) nor hoists all decodes to the start of the program, either of which
would keep every layer's decoded weight alive until the backward. ``"pallas"`` calls the kernels
of `pallas_kernels` (GPU only: fused dequant-matmuls, or its dequantize kernel followed by XLA's
dot where its tuning table says ``dequant_first``; the input gradient falls back to XLA where no
kernel claims it); ``"auto"`` picks a kernel wherever that package is importable, the platform is GPU and the
kernel claims the shape (its tuning table says where it beats XLA), and XLA otherwise. The
decision lives in `_dispatch`.

The contract this module expects of `pallas_kernels` (any of it missing means "not supported"):
``supports(m, k, n, w, *, compute_dtype, transposed) -> bool``,
``dequant_matmul(x[M, K], w, *, compute_dtype, out_dtype) -> [M, N]`` (``x·deq(W)ᵀ``) and
``dequant_matmul_t(dy[M, N], w, *, compute_dtype, out_dtype) -> [M, K]`` (``dy·deq(W)``). We ask
for float32 results, as the XLA path gives: rounding each base product to bf16 first changes the
first optimizer steps measurably (Adam's first update is nearly the gradient's sign).

Meshes: when the weight's matmul is traced for a device mesh of several devices (inside `on_mesh`,
which `qlora_jax.sharding.make_sharded_train_step` enters; under ``jax.set_mesh``; or with the
weight's codes placed on such a mesh), the packed fields of a `QuantizedArray` are constrained to
their decode layout (`qlora_jax.sharding.gathered_spec`: the ``fsdp`` split undone, a ``tensor``
split kept) *before* they are decoded, right after the optimization barrier. So the collective
that FSDP needs moves the uint8 codes and the small scales, not the decoded weight (4x the bytes
in bfloat16, 8x in float32), and every layer's gather stays next to its matmul (forward and
backward each gather again; nothing decoded lives across the step). Under such a mesh the XLA
path is always taken: a Pallas kernel is an opaque custom call to XLA's SPMD partitioner.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qlora_jax.quantize import BACKENDS, QuantizedArray, dequantize

__all__ = ["quant_matmul", "qlora_matmul", "qlora_matmul_multi", "on_mesh", "BACKENDS"]


Weight = QuantizedArray | jax.Array


# --------------------------------------------------------------------------------------------
# Meshes

_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("qlora_jax_ops_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh: Any):
    """Within this context, QLoRA matmuls are traced for ``mesh`` (a ``jax.sharding.Mesh`` with the
    axes of `qlora_jax.sharding`): each 4-bit weight is gathered as packed codes and scales right
    before it is decoded, and the XLA path is used (see the module docstring). Enter it around the
    *tracing* of a jitted function whose inputs are placed on ``mesh``;
    `qlora_jax.sharding.make_sharded_train_step` does. ``None`` (or a one-device mesh) turns it off.
    """
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def _mesh_size(mesh: Any) -> int:
    return math.prod(int(s) for s in dict(mesh.shape).values())


def _context_mesh() -> Any:
    """The mesh set by ``jax.set_mesh`` (an ``AbstractMesh`` during tracing), or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    try:
        mesh = get() if get is not None else None
    except Exception:  # noqa: BLE001 - an API that differs between JAX versions
        return None
    return None if mesh is None or getattr(mesh, "empty", False) else mesh


def _placed_mesh(w: Any) -> Any:
    """The mesh that the codes of ``w`` are placed on, as recorded in their abstract value (JAX
    versions whose avals carry a sharding), or None."""
    if not isinstance(w, QuantizedArray):
        return None
    try:
        return jax.typeof(w.codes).sharding.mesh
    except Exception:  # noqa: BLE001 - no sharding in the aval (older JAX), or not an array
        return None


def _active_mesh(w: Weight) -> Any:
    """The mesh of several devices that the matmul of ``w`` is traced for, or None: `on_mesh`'s,
    else ``jax.set_mesh``'s, else the one ``w``'s codes are placed on."""
    for get in (_MESH.get, _context_mesh, lambda: _placed_mesh(w)):
        mesh = get()
        if mesh is not None and _mesh_size(mesh) > 1:
            return mesh
    return None


def _gathered(w: Weight, mesh: Any) -> Weight:
    """``w`` constrained to the layout it is decoded in on ``mesh`` (`qlora_jax.sharding.gathered_spec`):
    an ``fsdp`` split of the codes and scales is undone here, so XLA all-gathers the packed bytes
    rather than the decoded weight. The identity without a mesh, for a dense weight, and on a
    mesh whose axis names are not the library's."""
    if mesh is None or not isinstance(w, QuantizedArray):
        return w
    from qlora_jax import sharding  # noqa: PLC0415 - sharding imports the models, which import this module

    sizes = {str(n): int(s) for n, s in dict(mesh.shape).items()}
    if not set(sizes) <= set(sharding.AXES):
        return w
    spec = sharding.gathered_spec(w, sizes)

    def fix(x: Any, p: Any) -> Any:
        return None if x is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, p))

    return dataclasses.replace(w, codes=fix(w.codes, spec.codes), absmax=fix(w.absmax, spec.absmax),
                               absmax_scale=fix(w.absmax_scale, spec.absmax_scale),
                               absmax_offset=fix(w.absmax_offset, spec.absmax_offset))


def _gathered_lora(a: jax.Array, b: jax.Array, mesh: Any) -> tuple[jax.Array, jax.Array]:
    """The adapters ``A [K, r]``, ``B [r, N]`` constrained to their use layout on ``mesh``: not split
    over ``fsdp`` (``B`` keeps a ``tensor`` split of ``N``, `qlora_jax.sharding.dense_spec` without
    ``fsdp``), as FSDP gathers every parameter before use. Left to itself, XLA may keep ``A`` split
    along ``K`` inside a scan over stacked layers and split the activations' hidden dimension to
    match, all-gathering activations instead of the (small) adapters."""
    if mesh is None:
        return a, b
    from qlora_jax import sharding  # noqa: PLC0415 - see _gathered

    sizes = {str(n): int(s) for n, s in dict(mesh.shape).items()}
    if not set(sizes) <= set(sharding.AXES):
        return a, b
    sizes.pop("fsdp", None)
    spec_a = sharding.dense_spec(a.shape, sizes, path="lora_a", min_shard_size=0)
    spec_b = sharding.dense_spec(b.shape, sizes, path="lora_b", min_shard_size=0)
    return (jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec_a)),
            jax.lax.with_sharding_constraint(b, NamedSharding(mesh, spec_b)))


# --------------------------------------------------------------------------------------------
# Backend dispatch


@functools.cache
def _pallas_module() -> Any:
    """The `pallas_kernels` package, or None when it cannot be imported."""
    try:
        import pallas_kernels  # noqa: PLC0415 - optional, GPU-only dependency
    except Exception:  # ImportError, or a kernel module failing to import on this platform
        return None
    return pallas_kernels


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _pallas_supported(m: int, k: int, n: int, w: Weight, compute_dtype: Any, transposed: bool) -> bool:
    """True if we run on GPU, `pallas_kernels` is importable and its kernels claim this shape."""
    if not _on_gpu() or not isinstance(w, QuantizedArray):
        return False
    mod = _pallas_module()
    fn_name = "dequant_matmul_t" if transposed else "dequant_matmul"
    if mod is None or not (hasattr(mod, "supports") and hasattr(mod, fn_name)):
        return False
    try:
        return bool(mod.supports(m, k, n, w, compute_dtype=jnp.dtype(compute_dtype), transposed=transposed))
    except (TypeError, ValueError):
        return False


def _dispatch(backend: str, m: int, k: int, n: int, w: Weight, compute_dtype: Any,
              transposed: bool = False) -> str:
    """Resolves ``backend`` to "xla" or "pallas" for one matmul of an ``[m, k]`` input with the
    ``[n, k]`` weight (``transposed``: the input gradient ``[m, n] · W``).

    "auto" takes the kernel wherever `pallas_kernels` claims the shape. "pallas" insists on the
    forward kernel (ValueError if there is none) and takes the input-gradient kernel where there
    is one, XLA otherwise.
    """
    if backend == "xla":
        return "xla"
    supported = _pallas_supported(m, k, n, w, compute_dtype, transposed)
    if backend == "pallas" and not supported and not transposed:
        raise ValueError(
            f"backend='pallas' was requested but no Pallas kernel is available for m={m}, k={k}, "
            f"n={n} on platform {jax.default_backend()!r} (pallas_kernels importable: "
            f"{_pallas_module() is not None}); use backend='auto' to fall back to XLA")
    return "pallas" if supported else "xla"


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# --------------------------------------------------------------------------------------------
# The two base matmuls (2-D, float32 results)


def _dense(w: Weight, dtype: Any) -> jax.Array:
    """The base weight ``[N, K]`` as a dense array of ``dtype`` (decoded on the fly if quantized)."""
    if isinstance(w, QuantizedArray):
        return dequantize(w, dtype)
    return w.astype(dtype)


def _base_matmul(x: jax.Array, w: Weight, cd: Any, backend: str, mesh: Any = None) -> jax.Array:
    """``x[M, K] · deq(W)ᵀ -> [M, N]`` float32; ``backend`` is already resolved by `_dispatch`;
    ``mesh``: see `_gathered`."""
    if backend == "pallas":
        return _pallas_module().dequant_matmul(x, _after(w, x), compute_dtype=jnp.dtype(cd), out_dtype=jnp.float32)
    return jax.lax.dot_general(x, _dense(_gathered(_after(w, x), mesh), cd), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _base_matmul_t(dy: jax.Array, w: Weight, cd: Any, backend: str, mesh: Any = None) -> jax.Array:
    """``dy[M, N] · deq(W) -> [M, K]`` float32 (the input gradient of the base layer)."""
    if backend == "pallas":
        return _pallas_module().dequant_matmul_t(dy, _after(w, dy), compute_dtype=jnp.dtype(cd),
                                                 out_dtype=jnp.float32)
    return jax.lax.dot_general(dy, _dense(_gathered(_after(w, dy), mesh), cd), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _resolve(backend: str, m: int, w: Weight, cd: Any) -> tuple[str, str, Any]:
    """The static plan of an ``[m, K] x [N, K]ᵀ`` product: (forward backend, input-gradient
    backend, mesh or None). Under a mesh of several devices (`_active_mesh`) both backends are
    "xla" (a Pallas call is opaque to XLA's SPMD partitioner). The mesh is part of the plan, i.e.
    of the static arguments of the jitted entry points, so a trace made for one mesh is never
    reused for another (or for none)."""
    mesh = _active_mesh(w)
    if mesh is not None:
        if backend == "pallas":
            warnings.warn("backend='pallas' under a device mesh of several devices: using the XLA path "
                          "(a Pallas kernel cannot be partitioned by XLA)", stacklevel=3)
        return "xla", "xla", mesh
    n, k = w.shape
    return (_dispatch(backend, m, k, n, w, cd, transposed=False),
            _dispatch(backend, m, k, n, w, cd, transposed=True), None)


def _after(w: Weight, v: jax.Array) -> Weight:
    """``w``, made to depend on the activation ``v`` it multiplies, so that its decode is scheduled
    next to its matmul. Without this XLA merges the backward's decode with the forward's (CSE) and
    may hoist every layer's decode to the start of the program: either way the decoded weights
    stay alive from forward to backward, which is what the custom VJP exists to avoid."""
    w, _ = jax.lax.optimization_barrier((w, v))
    return w


def _mm(a: jax.Array, b: jax.Array, cd: Any) -> jax.Array:
    """``a[M, P] · b[P, Q]`` with operands in ``cd`` and float32 accumulation."""
    return jax.lax.dot_general(a.astype(cd), b.astype(cd), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _mm_tn(a: jax.Array, b: jax.Array, cd: Any) -> jax.Array:
    """``a[M, P]ᵀ · b[M, Q] -> [P, Q]`` (a weight gradient), float32 accumulation."""
    return jax.lax.dot_general(a.astype(cd), b.astype(cd), (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# Frozen 4-bit linear


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _quant_linear(x: jax.Array, w: Weight, cd: Any, out_dtype: Any, plan: tuple[str, str, Any]) -> jax.Array:
    return _base_matmul(x, w, cd, plan[0], plan[2]).astype(out_dtype)


def _quant_linear_fwd(x, w, cd, out_dtype, plan):
    # Only the packed weight is saved: the backward decodes it again.
    return _quant_linear(x, w, cd, out_dtype, plan), w


def _quant_linear_bwd(cd, out_dtype, plan, w, dy):
    return _base_matmul_t(dy.astype(cd), w, cd, plan[1], plan[2]).astype(cd), None


_quant_linear.defvjp(_quant_linear_fwd, _quant_linear_bwd)
# Jitted entry points: an eager call compiles one program instead of dispatching op by op; under
# an outer jit they are inlined.
_quant_linear_jit = jax.jit(_quant_linear, static_argnums=(2, 3, 4))


def _check_weight(w: Any, k: int, fn: str) -> tuple[int, int]:
    if isinstance(w, QuantizedArray):
        shape = w.shape
    elif isinstance(w, (jax.Array, np.ndarray)) and jnp.issubdtype(w.dtype, jnp.floating):
        shape = tuple(w.shape)
    else:
        raise TypeError(f"{fn}: the base weight must be a QuantizedArray or a floating array, "
                        f"got {type(w).__name__}")
    if len(shape) != 2:
        raise ValueError(f"{fn}: the base weight must be 2-D [out, in], got shape {shape}")
    if shape[1] != k:
        raise ValueError(f"{fn}: x has {k} input features but the base weight is [out, in] = {shape} "
                         f"(quantize a Flax [in, out] kernel with quantize_linear_kernel)")
    return shape


def _check_x(x: Any, fn: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim < 1:
        raise TypeError(f"{fn}: x must be an array with at least one dimension, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: x must be floating, got dtype {x.dtype}")


def quant_matmul(x: jax.Array, w_q: Weight, *, compute_dtype: Any = jnp.bfloat16,
                 backend: str = "auto") -> jax.Array:
    """Frozen 4-bit linear layer: ``x · deq(W)ᵀ``.

    Args:
      x: ``[..., K]`` floating input.
      w_q: the base weight, a `QuantizedArray` ``[N, K]`` (or a dense float ``[N, K]`` array).
      compute_dtype: dtype of the matmul operands and of the result; accumulation is float32.
      backend: "auto", "xla" or "pallas" (see the module docstring).
    Returns:
      ``[..., N]`` in ``compute_dtype``. Differentiable with respect to ``x`` only; the backward
      decodes ``W`` again instead of keeping a dense copy alive.
    """
    _check_backend(backend)
    _check_x(x, "quant_matmul")
    n, k = _check_weight(w_q, x.shape[-1], "quant_matmul")
    cd = jnp.dtype(compute_dtype)
    x2 = x.reshape(-1, k).astype(cd)
    return _quant_linear_jit(x2, w_q, cd, cd, _resolve(backend, x2.shape[0], w_q, cd)).reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------
# QLoRA matmul


def _dropout_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def _apply_dropout(v: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    # Inverted dropout: kept entries scaled by 1/(1-p), so the expectation is unchanged.
    return jnp.where(mask, v / (1.0 - rate), jnp.zeros((), v.dtype)).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _qlora(x, w, a, b, scale, bias, key, rate, cd, plan):
    y, _ = _qlora_fwd(x, w, a, b, scale, bias, key, rate, cd, plan)
    return y


def _qlora_fwd(x, w, a, b, scale, bias, key, rate, cd, plan):
    xd = _apply_dropout(x, _dropout_mask(key, rate, x.shape), rate) if rate > 0 else x
    y = _base_matmul(x, w, cd, plan[0], plan[2])
    ag, bg = _gathered_lora(a, b, plan[2])
    # The scale is applied on the r-wide projection (cheaper than on the N-wide output).
    u = (_mm(xd, ag, cd) * scale).astype(cd)
    y = y + _mm(u, bg, cd)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    # Residuals: drop(x), u = scale·drop(x)·A, A, B, the packed weight, scale, the dropout key.
    res = (xd, u, a, b, w, scale, key, None if bias is None else jnp.zeros((0,), bias.dtype))
    return y.astype(cd), res


def _qlora_bwd(rate, cd, plan, res, dy):
    xd, u, a, b, w, scale, key, bias_tag = res
    dx = _base_matmul_t(dy, w, cd, plan[1], plan[2])
    a, b = _gathered_lora(a, b, plan[2])   # the residuals are the (sharded) parameters themselves
    g_u = jax.lax.dot_general(dy, b.astype(cd), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)        # [M, r]
    g_xa = g_u * scale
    da = _mm_tn(xd, g_xa, cd)                                              # [K, r]
    dxd = jax.lax.dot_general(g_xa.astype(cd), a.astype(cd), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)        # [M, K]
    if rate > 0:
        dxd = _apply_dropout(dxd, _dropout_mask(key, rate, xd.shape), rate)
    dx = (dx + dxd).astype(cd)
    db = _mm_tn(u, dy, cd)                                                 # [r, N]
    dbias = None if bias_tag is None else jnp.sum(dy.astype(jnp.float32), axis=0).astype(bias_tag.dtype)
    return dx, None, da.astype(a.dtype), db.astype(b.dtype), None, dbias, None


_qlora.defvjp(_qlora_fwd, _qlora_bwd)
_qlora_jit = jax.jit(_qlora, static_argnums=(7, 8, 9))


def _check_lora(lora_a: Any, lora_b: Any, k: int, n: int, fn: str, stacked: bool = False) -> int:
    lead = 1 if stacked else 0
    what = "[n, K, r]" if stacked else "[K, r]"
    whatb = "[n, r, N]" if stacked else "[r, N]"
    for name, arr in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not hasattr(arr, "shape") or not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} must be a floating array")
    if lora_a.ndim != 2 + lead or lora_a.shape[lead] != k:
        raise ValueError(f"{fn}: lora_a must be {what} with K={k}, got shape {tuple(lora_a.shape)}")
    r = lora_a.shape[lead + 1]
    if lora_b.ndim != 2 + lead or lora_b.shape[lead:] != (r, n):
        raise ValueError(f"{fn}: lora_b must be {whatb} with r={r}, N={n}, got shape {tuple(lora_b.shape)}")
    if stacked and lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(f"{fn}: lora_a and lora_b stack {lora_a.shape[0]} and {lora_b.shape[0]} adapters")
    return r


def _check_bias(bias: Any, n: int, fn: str) -> None:
    if bias is not None and (not hasattr(bias, "shape") or tuple(bias.shape) != (n,)):
        raise ValueError(f"{fn}: bias must have shape ({n},), got {getattr(bias, 'shape', bias)}")


def qlora_matmul(x: jax.Array, w_q: Weight, lora_a: jax.Array, lora_b: jax.Array,
                 scale: float | jax.Array, *, bias: jax.Array | None = None,
                 dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                 compute_dtype: Any = jnp.bfloat16, backend: str = "auto") -> jax.Array:
    """QLoRA linear layer: ``y = x·deq(W)ᵀ + scale·(drop(x)·A)·B (+ bias)``.

    Args:
      x: ``[..., K]`` floating input (any number of leading dims).
      w_q: frozen base weight, `QuantizedArray` ``[N, K]`` (or a dense float ``[N, K]`` array).
      lora_a: ``[K, r]`` LoRA down-projection.
      lora_b: ``[r, N]`` LoRA up-projection.
      scale: LoRA scaling (``alpha/r`` or ``alpha/√r``); a Python float or a scalar array.
      bias: optional ``[N]`` bias of the base layer.
      dropout_rate: LoRA dropout probability in ``[0, 1)``, applied to the adapter's input only,
        with the inverted ``1/(1-p)`` scaling.
      dropout_rng: PRNG key for the mask; with ``None`` (or a rate of 0) there is no dropout.
      compute_dtype: matmul operand and output dtype (bf16 default); accumulation is float32.
      backend: "auto", "xla" or "pallas".
    Returns:
      ``[..., N]`` in ``compute_dtype``. The custom VJP gives gradients for ``x``, ``lora_a``,
      ``lora_b`` and ``bias`` (each in its own dtype); none for the base weight, the scale or the key.
    """
    fn = "qlora_matmul"
    _check_backend(backend)
    _check_x(x, fn)
    n, k = _check_weight(w_q, x.shape[-1], fn)
    _check_lora(lora_a, lora_b, k, n, fn)
    _check_bias(bias, n, fn)
    rate = float(dropout_rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{fn}: dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rng is None:
        rate = 0.0
    key = dropout_rng if rate > 0 else None
    cd = jnp.dtype(compute_dtype)
    x2 = x.reshape(-1, k).astype(cd)
    s = jnp.asarray(scale, jnp.float32)
    y = _qlora_jit(x2, w_q, lora_a, lora_b, s, bias, key, rate, cd, _resolve(backend, x2.shape[0], w_q, cd))
    return y.reshape(*x.shape[:-1], n)


def qlora_matmul_multi(x: jax.Array, w_q: Weight, lora_a: jax.Array, lora_b: jax.Array,
                       scales: jax.Array, adapter_ids: jax.Array, *, bias: jax.Array | None = None,
                       compute_dtype: Any = jnp.bfloat16, backend: str = "auto") -> jax.Array:
    """Batched multi-adapter QLoRA: row ``i`` of the batch uses adapter ``adapter_ids[i]``.

    ``y[i] = x[i]·deq(W)ᵀ + scales[j]·(x[i]·A[j])·B[j] (+ bias)`` with ``j = adapter_ids[i]``;
    an id of -1 (or any id outside ``[0, n)``) means no adapter for that row. The base matmul
    runs once for the whole batch; the adapters are gathered per row (``[B, K, r]``), so adapters
    of different ranks must be zero-padded to a common ``r`` (exact: padded columns add 0).

    Args:
      x: ``[B, ..., K]`` input; axis 0 is the row axis.
      w_q: `QuantizedArray` ``[N, K]`` (or dense ``[N, K]``).
      lora_a: ``[n, K, r]`` stacked down-projections.
      lora_b: ``[n, r, N]`` stacked up-projections.
      scales: ``[n]`` per-adapter scalings.
      adapter_ids: ``[B]`` int32 adapter index per row.
      bias: optional ``[N]``.
      compute_dtype, backend: as `qlora_matmul`.
    Returns:
      ``[B, ..., N]`` in ``compute_dtype``. Differentiable with respect to ``x``, the adapters and
      the bias by ordinary autodiff (no dropout: this is an inference path).
    """
    fn = "qlora_matmul_multi"
    _check_backend(backend)
    _check_x(x, fn)
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must be [B, ..., K] with a row axis, got shape {tuple(x.shape)}")
    n, k = _check_weight(w_q, x.shape[-1], fn)
    _check_lora(lora_a, lora_b, k, n, fn, stacked=True)
    _check_bias(bias, n, fn)
    n_ad = lora_a.shape[0]
    scales = jnp.asarray(scales, jnp.float32)
    if scales.shape != (n_ad,):
        raise ValueError(f"{fn}: scales must have shape ({n_ad},), got {tuple(scales.shape)}")
    ids = jnp.asarray(adapter_ids)
    if ids.shape != (x.shape[0],) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{fn}: adapter_ids must be an integer array of shape ({x.shape[0]},) "
                         f"(one id per row of x), got {ids.dtype} {tuple(ids.shape)}")
    cd = jnp.dtype(compute_dtype)
    m = math.prod(x.shape[:-1])
    y = _multi_jit(x.reshape(x.shape[0], -1, k), w_q, lora_a, lora_b, scales, ids, bias, cd,
                   _resolve(backend, m, w_q, cd))
    return y.reshape(*x.shape[:-1], n)


def _multi(x3, w, lora_a, lora_b, scales, ids, bias, cd, plan):
    k = x3.shape[-1]
    n_ad = lora_a.shape[0]
    x3 = x3.astype(cd)
    y = _quant_linear(x3.reshape(-1, k), w, cd, jnp.dtype(jnp.float32), plan)   # [B*M, N] f32
    valid = (ids >= 0) & (ids < n_ad)
    safe = jnp.where(valid, ids, 0)
    row_scale = jnp.where(valid, scales[safe], 0.0)                        # [B]
    a_rows = lora_a[safe].astype(cd)                                       # [B, K, r]
    b_rows = lora_b[safe].astype(cd)                                       # [B, r, N]
    xa = jnp.einsum("bmk,bkr->bmr", x3, a_rows, preferred_element_type=jnp.float32)
    u = (xa * row_scale[:, None, None]).astype(cd)
    lo = jnp.einsum("bmr,brn->bmn", u, b_rows, preferred_element_type=jnp.float32)
    y = y + lo.reshape(y.shape)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(cd)


_multi_jit = jax.jit(_multi, static_argnums=(7, 8))
