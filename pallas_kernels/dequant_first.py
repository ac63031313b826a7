"""NF4 matmuls for training shapes by decoding first: a Pallas kernel writes ``deq(W)`` in
bf16/f16, then XLA's dot (cuBLAS on a GPU) multiplies.

This is the path a `TileConfig` with ``dequant_first=True`` selects for the forward
(``y = x · deq(W)ᵀ``) and input-gradient (``dx = dy · deq(W)``) ops. It is not fused: the
decoded weight exists in device memory for the duration of the call (2 bytes a weight, one
layer at a time), as in bitsandbytes' ``matmul_4bit`` for large batches. At large M the decode
is a small fraction of the matmul (``n·k`` elements against ``m·n·k`` multiply-adds), and the
dot runs at cuBLAS speed, which the fused Triton kernels do not reach there (see
`pallas_kernels.nf4_matmul`). It beats the plain XLA path because the decode is a Pallas kernel
(one pass, byte-permute lookup) instead of XLA's gathers.

Two decoders, by ``config.decode_kn``:

- False: ``[n, k]`` (the stored order) by the single-pass dequantize kernel
  (`pallas_kernels.quantize.dequantize_blocks_pallas`), which decodes double-quantized scales
  itself (until 2026-12-04 XLA decoded them first: a second kernel, 4 us of 17 at 4096 x 4096 on
  an H200, run59).
- True: ``[k, n]``, the layout of a Flax kernel, by `decoded_weight_kn` (tiles of
  ``block_n × block_k``, double quant decoded in the kernel, each tile stored transposed). The
  forward is then ``x · W`` and the input gradient ``dy · Wᵀ``, the products a bf16 model runs;
  cuBLAS's speed depends on the operand order at some shapes (on an H200 at K=4096 N=11008 the
  ``[n, k]`` forward product took 1.08x the bf16 model's). The decode itself is slower than the
  dequantize kernel's (0.042 against 0.034 ms there); in one sweep the whole call came out 0-5%
  faster, within the run-to-run spread, so the tuning table keeps the first decoder for now.

The values are those of the fused kernels and of `pallas_kernels._common.dequantize_reference`
rounded to the compute dtype: ``code_value * absmax`` in float32, rounded once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common, byte_lut
from pallas_kernels import quantize as _quantize
from pallas_kernels._common import QuantSpec
from pallas_kernels.tuning import TileConfig

__all__ = ["servable", "decoded_weight", "decoded_weight_kn", "decode", "dequant_first_matmul"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def servable(spec: QuantSpec, dtype: Any, config: TileConfig | None = None) -> bool:
    """Whether this path can decode the weight to ``dtype``: bf16/f16 only; with the dequantize
    kernel (``config.decode_kn`` false or no config) also a block size in
    `pallas_kernels.quantize.BLOCK_SIZES`; with ``decode_kn`` a ``block_k`` dividing k."""
    if jnp.dtype(dtype) not in _DTYPES:
        return False
    if config is not None and config.decode_kn:
        return spec.k % config.block_k == 0
    return _quantize.supported(dtype, spec.n * spec.k, spec.block_size)


def decoded_weight(codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
                   absmax_offset: jax.Array | None, *, spec: QuantSpec, dtype: Any,
                   interpret: bool = False) -> jax.Array:
    """``deq(W)`` as ``dtype [n, k]`` (bf16/f16), decoded by the single-pass dequantize kernel.

    Args:
      codes: uint8 packed codes (>= n*k/2 bytes, row-major ``[n, k]``, high nibble first).
      absmax: float32 [>= n_blocks] scales, or uint8 codes with double quant.
      absmax_scale, absmax_offset: float32 second-level scales / scalar offset, or None.
      spec: the weight's static description.
      dtype: bfloat16 or float16.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Raises:
      ValueError if `servable` is False for this weight and dtype.
    """
    if not servable(spec, dtype):
        raise ValueError(f"the dequantize kernel cannot decode a {spec.n}x{spec.k} weight with "
                         f"block_size={spec.block_size} to {jnp.dtype(dtype).name} (bf16/f16 and "
                         f"block sizes {_quantize.BLOCK_SIZES} only)")
    packed = codes.reshape(-1)[: spec.n * spec.k // 2]
    if spec.double_quant:
        # the scales decoded in the kernel, not by XLA first: one kernel, not two (0.0129 against
        # 0.0170 ms at 4096 x 4096 on an H200, run59)
        scales = absmax.reshape(-1)[: spec.n_blocks]
        dq = dict(absmax_scale=absmax_scale.reshape(-1), absmax_offset=absmax_offset,
                  dq_block_size=spec.dq_block_size, absmax_table=spec.absmax_table)
    else:
        scales, dq = _common.decode_scales(absmax, None, None, spec), {}
    w = _quantize.dequantize_blocks_pallas(packed, scales, spec.code_table, dtype, **dq, interpret=interpret)
    return w.reshape(spec.n, spec.k)


def _decode_kn_kernel(*refs, spec: QuantSpec, cfg: TileConfig, n_in: int, interpret: bool):
    *w_refs, o_ref = refs
    codes_ref, scale_refs, lut_ref = _common.split_weight_refs(spec, w_refs[:n_in], cfg.lut)
    bn, bk = cfg.block_n, cfg.block_k
    sb = min(bk, spec.block_size)   # a sub-tile lies inside one quantization block
    steps_k = spec.k // bk
    pid = pl.program_id(0)
    pid_n = jax.lax.div(pid, jnp.int32(steps_k))   # truncating: ids are >= 0
    pid_k = pid - pid_n * steps_k
    n0 = pid_n * bn
    mask_n = (n0 + jnp.arange(bn) < spec.n) if spec.n % bn else None
    for j in range(bk // sb):
        kk, kbyte, kblock = _common.k_offsets(pid_k, bk, j * sb, spec.block_size)
        ws = codes_ref.at[pl.ds(n0, bn), pl.ds(kbyte, sb // 2)]
        wp = ws[...] if mask_n is None else pltriton.load(ws, mask=mask_n[:, None], other=0)
        scales = _common.load_block_scales(spec, scale_refs, n0, bn, kblock, mask_n)
        if cfg.lut == "prmt":
            # byte permutes with the float32 product rounded once (`byte_lut.decode_words`):
            # the library's values bit for bit, which the fused kernels' bf16-scaled "prmt" is not
            words = byte_lut.decode_words(wp, spec.code_table, o_ref.dtype, scales[:, None], interpret=interpret)
            even, odd = byte_lut.split_pair_words(words, o_ref.dtype)
            w = jnp.stack([even, odd], axis=-1).reshape(bn, sb)
        else:
            w = _common.dequant_tile(spec, wp, scales, o_ref.dtype, cfg.lut, lut_ref, interpret=interpret)
        out = o_ref.at[pl.ds(kk, sb), pl.ds(n0, bn)]
        if mask_n is None:
            out[...] = w.T
        else:
            pltriton.store(out, w.T, mask=jnp.broadcast_to(mask_n[None, :], (sb, bn)))


@functools.partial(jax.jit, static_argnames=("spec", "dtype", "config", "interpret"))
def decoded_weight_kn(codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
                      absmax_offset: jax.Array | None, *, spec: QuantSpec, dtype: Any,
                      config: TileConfig, interpret: bool = False) -> jax.Array:
    """``deq(W)ᵀ`` as ``dtype [k, n]`` (bf16/f16): each program decodes a ``block_n × block_k``
    tile of the packed ``[n, k]`` weight (double quant decoded in the kernel, lookup
    ``config.lut``; every mode but "prmt32" gives the library's values bit for bit) and stores it
    transposed. Arguments as `decoded_weight`; ``config`` gives
    ``block_n``, ``block_k`` (a power of two dividing k), ``num_warps``, ``lut``.

    Raises:
      ValueError if `servable` is False for this weight, dtype and config.
    """
    bn, bk = config.block_n, config.block_k
    if not servable(spec, dtype, config) or bk & (bk - 1) or bn & (bn - 1):
        raise ValueError(f"decoded_weight_kn cannot decode a {spec.n}x{spec.k} weight to "
                         f"{jnp.dtype(dtype).name} with block_n={bn}, block_k={bk} "
                         f"(bf16/f16; powers of two, block_k dividing k)")
    ins, n_in = _common.kernel_inputs(spec, codes, absmax, absmax_scale, absmax_offset, config.lut)
    kernel = functools.partial(_decode_kn_kernel, spec=spec, cfg=config, n_in=n_in, interpret=interpret)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((spec.k, spec.n), jnp.dtype(dtype)),
        grid=(pl.cdiv(spec.n, bn) * (spec.k // bk),),
        interpret=interpret,
        compiler_params=_common.compiler_params(config.num_warps, 1),
        name="nf4_decode_kn",
    )(*ins)


def decode(codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
           absmax_offset: jax.Array | None, *, spec: QuantSpec, dtype: Any,
           config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """The first half of a dequant_first call: ``deq(W)`` by the decoder ``config`` picks,
    ``[k, n]`` with ``config.decode_kn`` (`decoded_weight_kn`), else ``[n, k]``
    (`decoded_weight`)."""
    if config is not None and config.decode_kn:
        return decoded_weight_kn(codes, absmax, absmax_scale, absmax_offset, spec=spec, dtype=dtype,
                                 config=config, interpret=interpret)
    return decoded_weight(codes, absmax, absmax_scale, absmax_offset, spec=spec, dtype=dtype,
                          interpret=interpret)


def dequant_first_matmul(a: jax.Array, codes: jax.Array, absmax: jax.Array,
                         absmax_scale: jax.Array | None, absmax_offset: jax.Array | None, *,
                         spec: QuantSpec, transposed: bool, config: TileConfig | None = None,
                         out_dtype: Any = None, interpret: bool = False) -> jax.Array:
    """``a[M, K] · deq(W)ᵀ -> [M, N]`` (``transposed=False``, the forward) or ``a[M, N] · deq(W)
    -> [M, K]`` (``transposed=True``, the input gradient) with ``a`` bf16/f16 and float32
    accumulation; the result in ``out_dtype`` (default ``a``'s; float32 is the accumulator
    itself, unrounded). Only the first K (or N) columns of ``a`` are read. ``config.decode_kn``
    picks the ``[k, n]`` decoder (see the module docstring)."""
    w = decode(codes, absmax, absmax_scale, absmax_offset, spec=spec, dtype=a.dtype, config=config,
               interpret=interpret)
    kn = config is not None and config.decode_kn
    # a's features (k, or n for the gradient) are w's axis 0 exactly when they lead w's layout
    contract = 0 if transposed != kn else 1
    out_dtype = jnp.dtype(a.dtype if out_dtype is None else out_dtype)
    # A result in a's dtype is asked for as such, not as float32 rounded after: XLA accumulates a
    # bf16/f16 dot in float32 either way (the same values), but its GEMM autotuner picked slower
    # kernels for the float32 form (H200, run54: 0.97-1.20x the bf16 model's product, mean 1.08x,
    # against 0.88-1.06x, mean 0.99x; benchmarks/gpu/dot_forms.py).
    y = jax.lax.dot_general(a[:, : spec.n if transposed else spec.k], w, (((1,), (contract,)), ((), ())),
                            preferred_element_type=None if out_dtype == a.dtype else jnp.float32)
    return y.astype(out_dtype)
