"""Fused NF4 (4-bit, optionally double-quantized) dequant-matmul kernels for NVIDIA GPUs, in Pallas.

Usable on its own: the kernels take plain arrays in qlora_jax's packed layout (the bytes
bitsandbytes writes for a ``Linear.weight``): ``W`` is ``[n, k]`` (out, in), row-major,
two 4-bit codes a byte (first element in the high nibble), one scale per ``block_size``
consecutive elements along ``k``; with double quantization the scales are uint8 codes decoded as
``absmax_table[code] * absmax_scale[i // dq_block_size] + absmax_offset``.

Entry points:

- `supported` — whether a kernel serves this op/shape/platform and was measured faster than
  plain XLA there (else use XLA; on an H100/H200: the decode kernel for M <= 16 and the
  ``dequant_first`` path above);
- `matmul_nt` — ``y = x · deq(W)ᵀ`` (forward; the decode kernel for M <= 16);
- `matmul_nn` — ``dx = dy · deq(W)`` (input gradient).

Above the decode sizes a tuning-table row may say ``mosaic``: then `matmul_nt` runs the
warp-specialised Mosaic GPU kernel, `pallas_kernels.nf4_matmul_mgpu`, where it serves the
shape and the result is not asked for in float32 (`qlora_jax.ops` asks for float32, so a
training step takes dequant_first); or ``dequant_first``: then `matmul_nt` and `matmul_nn`
decode the weight with a Pallas kernel and leave the product to XLA's dot (cuBLAS),
`pallas_kernels.dequant_first`; that path holds the decoded weight in device memory for the
call, which the fused kernels never do.

The same, for a weight object with ``codes, absmax, absmax_scale, absmax_offset, shape, format,
block_size, dq_block_size`` attributes (a ``qlora_jax.QuantizedArray``, duck-typed: no import):
`supports`, `dequant_matmul`, `dequant_matmul_t` (the contract ``qlora_jax.ops`` currently calls).

Kernels (one a module, each with a plain-JAX ``*_reference`` beside it): `nf4_matmul`,
`nf4_matmul_dx`, `nf4_decode`, `nf4_matmul_mgpu`; `dequant_first` (a decode kernel, then XLA's
dot); tile configurations in `tuning`; the 4-bit lookup they share in `byte_lut` (byte permutes
in inline PTX, with a jnp model of the same operations for interpret mode). `nf4_matmul_mgpu` is
Mosaic GPU (``plgpu.kernel``; its module docstring says why); the others use the Triton lowering
of ``pl.pallas_call`` with explicit compiler params (see `pallas_kernels.nf4_matmul` for why).
All run on CPU in an interpreter for tests (``interpret=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common, dequant_first, tuning
from pallas_kernels._common import DYNAMIC_MAP, QuantSpec, dequantize_reference, make_spec
from pallas_kernels.nf4_decode import nf4_decode, nf4_decode_reference
from pallas_kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from pallas_kernels.nf4_matmul_dx import nf4_matmul_dx, nf4_matmul_dx_reference
from pallas_kernels.tuning import DECODE_MAX_M, TileConfig, get_config

__all__ = [
    "OPS",
    "supported",
    "matmul_nt",
    "matmul_nn",
    "supports",
    "dequant_matmul",
    "dequant_matmul_t",
    "nf4_matmul",
    "nf4_matmul_reference",
    "nf4_matmul_dx",
    "nf4_matmul_dx_reference",
    "nf4_decode",
    "nf4_decode_reference",
    "dequantize_reference",
    "make_spec",
    "QuantSpec",
    "TileConfig",
    "get_config",
    "DYNAMIC_MAP",
    "DECODE_MAX_M",
]

OPS = ("matmul_nt", "matmul_nn")
_PLATFORMS = ("gpu", "cuda")
_MAX_ELEMENTS = 2**31 - 1  # the kernels' own index arithmetic is int32


def supported(op: str, m: int, n: int, k: int, block_size: int, double_quant: bool,
              platform: str, *, only_if_faster: bool = True) -> bool:
    """True if a kernel serves ``op`` for this shape on ``platform``; False means: use XLA.

    Args:
      op: "matmul_nt" (``x[m,k] · deq(W[n,k])ᵀ``) or "matmul_nn" (``dy[m,n] · deq(W[n,k])``).
      m, n, k: problem sizes (m = rows of x / dy, all leading dims flattened).
      block_size: first-level block size of the weight.
      double_quant: whether the scales are double-quantized (both are supported).
      platform: ``jax.default_backend()``-style name; only "gpu"/"cuda" run the kernels (CPU and
        TPU use XLA; interpret mode is for tests only).
      only_if_faster: also require that the tuning table records the kernel as measured faster
        than the plain XLA path at this M on this device (default); False asks only whether
        the kernel can compute it.
    Raises:
      ValueError for an unknown op.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    del double_quant
    if str(platform).lower() not in _PLATFORMS:
        return False
    if min(m, n, k) <= 0:
        return False
    if block_size < 32 or block_size & (block_size - 1) or k % block_size:
        return False
    if n * k > _MAX_ELEMENTS or m * max(n, k) > _MAX_ELEMENTS:
        return False
    if only_if_faster:
        kernel_op = "input_grad" if op == "matmul_nn" else ("decode" if m <= DECODE_MAX_M else "forward")
        return tuning.get_entry(kernel_op, m, n, k).beats_xla
    return True


def _flatten_rows(a: jax.Array, name: str) -> tuple[jax.Array, tuple[int, ...]]:
    if a.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., features], got shape {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating (bf16/f16/f32), got {a.dtype}")
    lead = a.shape[:-1]
    return a.reshape(math.prod(lead), a.shape[-1]), lead


def _pick(config: TileConfig | None, op: str, m: int, n: int, k: int, block_size: int) -> TileConfig:
    if config is None:
        return get_config(op, m, n, k, block_size)
    return tuning.fit_block_k(config, k, block_size)


def _training_product(a: jax.Array, weight: tuple, spec: QuantSpec, cfg: TileConfig, transposed: bool,
                      out_dtype: Any, interpret: bool) -> jax.Array:
    """The product above the decode sizes (``transposed``: the input gradient): the Mosaic GPU
    forward kernel where ``cfg`` asks for it, the result is not float32 and it serves the shape
    and dtype, else the dequant_first path where ``cfg`` asks for it and it can serve ``a``'s
    dtype, else the fused Triton kernel."""
    # not for float32 results: the kernel writes them as two bf16 parts summed by XLA, and the
    # training step (which asks for float32) ran 0.5-6% slower on it than on dequant_first (run42)
    if cfg.mosaic and not transposed and out_dtype != jnp.float32:
        # imported here: Mosaic GPU's Pallas module adds ~0.4 s to importing this package
        from pallas_kernels import nf4_matmul_mgpu  # noqa: PLC0415

        if nf4_matmul_mgpu.servable(spec, a.shape[0], a.dtype, cfg):
            return nf4_matmul_mgpu.nf4_matmul_mgpu(a, *weight, spec=spec, config=cfg, interpret=interpret)
    if cfg.dequant_first and dequant_first.servable(spec, a.dtype, cfg):
        return dequant_first.dequant_first_matmul(a, *weight, spec=spec, transposed=transposed, config=cfg,
                                                  out_dtype=out_dtype, interpret=interpret)
    kernel = nf4_matmul_dx if transposed else nf4_matmul
    return kernel(a, *weight, spec=spec, config=cfg, interpret=interpret)


def matmul_nt(x: jax.Array, codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
              absmax_offset: jax.Array | None, *, n: int, k: int, block_size: int,
              dq_block_size: int | None, code_table: Sequence[float] | np.ndarray,
              absmax_table: Sequence[float] | np.ndarray | None = None,
              config: TileConfig | None = None, out_dtype: Any = None,
              interpret: bool = False) -> jax.Array:
    """``y[..., n] = x[..., k] · deq(W)ᵀ`` with ``W[n, k]`` packed; forward or decode kernel by M.

    Args:
      x: [..., k] bf16 (or f16/f32); leading dims are flattened into M.
      codes: uint8 [n*k/2] packed codes (any shape with that many elements).
      absmax: float32 [n*k/block_size] scales, or uint8 codes with double quant.
      absmax_scale: float32 [ceil(n_blocks/dq_block_size)] or None.
      absmax_offset: float32 [] or None.
      n, k, block_size, dq_block_size: static layout (``k % block_size == 0``).
      code_table: the 16 values of the 4-bit codes (e.g. NF4's), compiled in as constants.
      absmax_table: the 256 values of the 8-bit absmax codes (default: bitsandbytes' dynamic map).
      config: override the tuning table's `TileConfig`.
      out_dtype: the result's dtype (default: x's). The ``dequant_first`` path hands its float32
        accumulator over in this dtype directly (float32: no rounding to x's dtype), and a
        float32 request takes it instead of the Mosaic GPU kernel; the fused Triton kernels write
        x's dtype, which is then cast.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      y: [..., n], ``out_dtype``.
    """
    spec = make_spec(n, k, block_size, dq_block_size, code_table, absmax_table)
    _common.check_operands(spec, codes, absmax, absmax_scale, absmax_offset)
    x2, lead = _flatten_rows(x, "x")
    if x2.shape[1] != k:
        raise ValueError(f"x has {x2.shape[1]} features, expected k={k}")
    m = x2.shape[0]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if m == 0:
        return jnp.zeros((*lead, n), out_dtype)
    if m <= tuning.DECODE_MAX_M:
        cfg = _pick(config, "decode", m, n, k, block_size)
        y = nf4_decode(x2, codes, absmax, absmax_scale, absmax_offset, spec=spec, config=cfg,
                       interpret=interpret)
    else:
        cfg = _pick(config, "forward", m, n, k, block_size)
        y = _training_product(x2, (codes, absmax, absmax_scale, absmax_offset), spec, cfg, False,
                              out_dtype, interpret)
    return y.astype(out_dtype).reshape(*lead, n)


def matmul_nn(dy: jax.Array, codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
              absmax_offset: jax.Array | None, *, n: int, k: int, block_size: int,
              dq_block_size: int | None, code_table: Sequence[float] | np.ndarray,
              absmax_table: Sequence[float] | np.ndarray | None = None,
              config: TileConfig | None = None, out_dtype: Any = None,
              interpret: bool = False) -> jax.Array:
    """``dx[..., k] = dy[..., n] · deq(W)`` with ``W[n, k]`` packed (the input gradient of
    `matmul_nt`); arguments as `matmul_nt`, ``dy`` in place of ``x``.

    Returns:
      dx: [..., k], ``out_dtype`` (default: dy's).
    """
    spec = make_spec(n, k, block_size, dq_block_size, code_table, absmax_table)
    _common.check_operands(spec, codes, absmax, absmax_scale, absmax_offset)
    dy2, lead = _flatten_rows(dy, "dy")
    if dy2.shape[1] != n:
        raise ValueError(f"dy has {dy2.shape[1]} features, expected n={n}")
    m = dy2.shape[0]
    out_dtype = jnp.dtype(dy.dtype if out_dtype is None else out_dtype)
    if m == 0:
        return jnp.zeros((*lead, k), out_dtype)
    cfg = _pick(config, "input_grad", m, n, k, block_size)
    dx = _training_product(dy2, (codes, absmax, absmax_scale, absmax_offset), spec, cfg, True,
                           out_dtype, interpret)
    return dx.astype(out_dtype).reshape(*lead, k)


# --------------------------------------------------------------------------------------------
# The same entry points for a quantized-array object (duck-typed qlora_jax.QuantizedArray)

_COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _weight_layout(w) -> dict:
    n, k = w.shape
    return dict(n=n, k=k, block_size=w.block_size, dq_block_size=w.dq_block_size,
                code_table=_common.CODE_TABLES[w.format])


def supports(m: int, k: int, n: int, w, *, compute_dtype, transposed: bool = False) -> bool:
    """`supported` for a quantized weight object ``w`` ([n, k]); False for formats without a
    compiled-in table (only "nf4"), for compute dtypes other than bf16/f16, and off GPU."""
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2 or tuple(shape) != (n, k):
        return False
    if getattr(w, "format", None) not in _common.CODE_TABLES:
        return False
    if jnp.dtype(compute_dtype) not in _COMPUTE_DTYPES:
        return False
    op = "matmul_nn" if transposed else "matmul_nt"
    return supported(op, m, n, k, w.block_size, w.dq_block_size is not None, jax.default_backend())


def dequant_matmul(x: jax.Array, w, *, compute_dtype=jnp.bfloat16, out_dtype=None,
                   interpret: bool = False) -> jax.Array:
    """``x[M, K] · deq(W)ᵀ -> [M, N]`` with operands in ``compute_dtype`` for a quantized weight
    object; result in ``out_dtype`` (default ``compute_dtype``; see `matmul_nt`)."""
    return matmul_nt(x.astype(compute_dtype), w.codes, w.absmax, w.absmax_scale, w.absmax_offset,
                     **_weight_layout(w), out_dtype=out_dtype, interpret=interpret)


def dequant_matmul_t(dy: jax.Array, w, *, compute_dtype=jnp.bfloat16, out_dtype=None,
                     interpret: bool = False) -> jax.Array:
    """``dy[M, N] · deq(W) -> [M, K]`` with operands in ``compute_dtype`` for a quantized weight
    object; result in ``out_dtype`` (default ``compute_dtype``)."""
    return matmul_nn(dy.astype(compute_dtype), w.codes, w.absmax, w.absmax_scale, w.absmax_offset,
                     **_weight_layout(w), out_dtype=out_dtype, interpret=interpret)
