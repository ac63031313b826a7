"""Fused NF4 dequant-matmul, training forward (large M): ``y[M, N] = x[M, K] · deq(W)ᵀ``.

``W`` is the packed 4-bit ``[N, K]`` weight (see `pallas_kernels._common`); ``x`` is bf16 (or
f16/f32), accumulation is float32, ``y`` has ``x``'s dtype. The bf16 weight never exists in
device memory: each program loads the packed bytes of a ``block_n × block_k`` tile, decodes the
4-bit codes (``lut``: by default byte permutes, `pallas_kernels.byte_lut`) and the block scales
(double quant decoded here, once per 64-element block), and feeds the tensor cores.

Backend: the Triton lowering of ``pl.pallas_call`` with explicit ``CompilerParams``. It runs
under ``interpret=True`` on CPU (so CI checks the exact kernel body), lowers the same on jax
0.11.2 and 0.12 (0.12 needs the explicit params to stay off Mosaic GPU's deprecated
``pallas_call`` path; 0.11's default would be Mosaic GPU), and Triton software-pipelines the K
loop and picks wgmma on Hopper by itself. The warp-specialised Mosaic GPU kernel with the decoded
weight as wgmma's register operand, `pallas_kernels.nf4_matmul_mgpu`, is the faster forward at
training shapes (1.02-1.25x cuBLAS bf16 against this kernel's 1.8-1.9x); this one serves what
neither that nor `pallas_kernels.dequant_first` can (float32 x).

Masking: rows of ``x`` past M and rows of ``W`` past N are masked on load and store (they only
touch outputs that are not stored); K needs no mask because ``K % block_k == 0`` is enforced.

Measured (H200, jax 0.11.2, K=4096 N=11008 M=4096, 2026-12-02, after the tile loads became
16-byte vectors (`pallas_kernels._common.k_offsets`; they had been single bytes), best of 8
swept tiles: 128×128×64, 4 warps, 3 stages, "prmt" lookup): 0.94 ms = 1.90x XLA cuBLAS bf16
(0.494 ms, 393 TFLOP/s); plain XLA dequantize->dot 0.69 ms (1.39x); bitsandbytes 0.53 ms
(2026-12-01: 1.34 ms = 2.55x with byte loads). So the tuning table does not pick this kernel
for training shapes. Nsight Compute (2026-12-01, byte loads) showed 236
registers a thread, one 8-warp program an SM and warps stalled at CTA barriers: the decode and
the MMAs do not overlap. Closing the gap needs warp specialisation (producer warps decoding
into shared memory while consumer warpgroups run wgmma), which this Triton path cannot express.

``swap_ab`` (2026-12-03) computes ``yᵀ = deq(W) · xᵀ`` so that the decoded tile is wgmma's
register operand and skips the shared-memory round trip (checked in the compiled TTGIR). It is
slower at every tile swept (2.4-3.6x bf16 at M=4096 against 1.8-1.9x for the row above; not
profiled: the decode and the MMA still share warps, so nothing hides one behind the other).
Training shapes are served by `pallas_kernels.dequant_first` (1.11-1.16x bf16 from M=2048 on
this H200).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common
from pallas_kernels._common import QuantSpec
from pallas_kernels.tuning import TileConfig

__all__ = ["nf4_matmul", "nf4_matmul_reference"]


def _kernel(x_ref, *refs, spec: QuantSpec, cfg: TileConfig, m: int, n_in: int, interpret: bool):
    *w_refs, o_ref = refs
    codes_ref, scale_refs, lut_ref = _common.split_weight_refs(spec, w_refs[:n_in], cfg.lut)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    sb = min(bk, spec.block_size)  # sub-block: lies inside one quantization block
    n, k = spec.n, spec.k
    pid_m, pid_n = _common.grouped_program_ids(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(n, bn),
                                               cfg.group_m)
    m0, n0 = pid_m * bm, pid_n * bn
    mask_m = (m0 + jnp.arange(bm) < m) if m % bm else None
    mask_n = (n0 + jnp.arange(bn) < n) if n % bn else None

    def body(step, acc):
        for j in range(bk // sb):
            kk, kbyte, kblock = _common.k_offsets(step, bk, j * sb, spec.block_size)
            xs = x_ref.at[pl.ds(m0, bm), pl.ds(kk, sb)]
            xt = xs[...] if mask_m is None else pltriton.load(xs, mask=mask_m[:, None], other=0)
            ws = codes_ref.at[pl.ds(n0, bn), pl.ds(kbyte, sb // 2)]
            wp = ws[...] if mask_n is None else pltriton.load(ws, mask=mask_n[:, None], other=0)
            scales = _common.load_block_scales(spec, scale_refs, n0, bn, kblock, mask_n)
            w = _common.dequant_tile(spec, wp, scales, xt.dtype, cfg.lut, lut_ref, interpret=interpret)
            # swap_ab: the yᵀ tile [bn, bm] = w · xtᵀ, so that the decoded tile is the register operand
            lhs, rhs = (w, xt) if cfg.swap_ab else (xt, w)
            acc += jax.lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, k // bk, body,
                            jnp.zeros((bn, bm) if cfg.swap_ab else (bm, bn), jnp.float32))
    out = o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)]
    y = (acc.T if cfg.swap_ab else acc).astype(o_ref.dtype)
    if mask_m is None and mask_n is None:
        out[...] = y
    else:
        mask = (jnp.ones((bm, 1), bool) if mask_m is None else mask_m[:, None]) & \
               (jnp.ones((1, bn), bool) if mask_n is None else mask_n[None, :])
        pltriton.store(out, y, mask=mask)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def nf4_matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
               absmax_offset: jax.Array | None, *, spec: QuantSpec, config: TileConfig,
               interpret: bool = False) -> jax.Array:
    """``y[M, N] = x[M, K] · deq(W)ᵀ`` with the packed weight decoded inside the kernel.

    Args:
      x: [M, K'] float (bf16/f16/f32), K' >= spec.k; only the first spec.k columns are read.
      codes: uint8 packed codes (>= n*k/2 bytes, row-major ``[n, k]``, high nibble first).
      absmax: float32 [>= n_blocks] scales, or uint8 codes with double quant.
      absmax_scale, absmax_offset: float32 second-level scales / scalar offset, or None.
      spec: the weight's static description (`pallas_kernels._common.make_spec`).
      config: tile configuration; ``block_k`` must divide ``spec.k`` and be a power of two.
      interpret: run the kernel body with the Pallas HLO interpreter (CPU tests).
    Returns:
      y: [M, spec.n] with x's dtype.
    """
    m = x.shape[0]
    bk = config.block_k
    if spec.k % bk or bk & (bk - 1) or x.shape[1] < spec.k:
        raise ValueError(f"block_k={bk} must be a power of two dividing k={spec.k}; x has shape {x.shape}")
    ins, n_in = _common.kernel_inputs(spec, codes, absmax, absmax_scale, absmax_offset, config.lut)
    grid = (pl.cdiv(m, config.block_m) * pl.cdiv(spec.n, config.block_n),)
    kernel = functools.partial(_kernel, spec=spec, cfg=config, m=m, n_in=n_in, interpret=interpret)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, spec.n), x.dtype),
        grid=grid,
        interpret=interpret,
        compiler_params=_common.compiler_params(config.num_warps, config.num_stages),
        name="nf4_matmul",
    )(x, *ins)


def nf4_matmul_reference(x: jax.Array, codes: jax.Array, absmax: jax.Array,
                         absmax_scale: jax.Array | None, absmax_offset: jax.Array | None, *,
                         spec: QuantSpec) -> jax.Array:
    """Plain-JAX ``x[:, :k] · deq(W)ᵀ``: dequantize to x's dtype, dot with float32 accumulation."""
    w = _common.dequantize_reference(codes, absmax, absmax_scale, absmax_offset, spec).astype(x.dtype)
    y = jax.lax.dot_general(x[:, : spec.k], w, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
