"""Fused NF4 dequant-matmul, input gradient: ``dx[M, K] = dy[M, N] · deq(W)``.

Reads the same packed ``W[N, K]`` as the forward kernel (no transposed copy is stored): an
output tile ``block_m × block_k`` of ``dx`` walks the reduction dimension N in steps of
``block_n`` weight rows; each step decodes a ``block_n × block_k`` weight tile in registers.
When ``block_k`` spans several quantization blocks the tile is handled as ``block_k / sb``
sub-tiles (``sb = min(block_k, block_size)``), each with its own accumulator, so that one scale
per (row, sub-tile) suffices and no per-element scale gather is needed.

Backend: Triton lowering of ``pl.pallas_call`` with explicit ``CompilerParams``, for the reasons
given in `pallas_kernels.nf4_matmul` (interpret mode on CPU, same code on jax 0.11.2 and 0.12).

Masking: N is the reduction here, so both the ``dy`` columns and the weight rows past N are
loaded as 0 (a NaN there would otherwise reach valid outputs); rows past M and column sub-tiles
past K are masked on load and store.

Measured (H200, jax 0.11.2, K=4096 N=11008 M=4096, 2026-12-02, 16-byte tile loads, tile
256×128 with a 64-wide output, 8 warps, "prmt" lookup): 1.16 ms = 2.29x XLA cuBLAS bf16
(0.506 ms); plain XLA dequantize->dot 0.65 ms (1.29x), so the tuning table does not pick it
(the same overlap limit as the forward kernel). The earlier 256×128×128 tile needs 233 KB of
shared memory once its loads are pipelined, over the 227 KB an H100/H200 program may have.

With ``swap_ab`` (``dxᵀ = deq(W)ᵀ · dyᵀ``, 2026-12-03) it is slower still (2.3-4.5x bf16);
training shapes are served by `pallas_kernels.dequant_first` (1.01-1.30x bf16 from M=2048).
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

__all__ = ["nf4_matmul_dx", "nf4_matmul_dx_reference"]


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _kernel(dy_ref, *refs, spec: QuantSpec, cfg: TileConfig, m: int, n_in: int, interpret: bool):
    *w_refs, o_ref = refs
    codes_ref, scale_refs, lut_ref = _common.split_weight_refs(spec, w_refs[:n_in], cfg.lut)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    sb = min(bk, spec.block_size)
    n_sub = bk // sb
    n, k = spec.n, spec.k
    pid_m, pid_k = _common.grouped_program_ids(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(k, bk),
                                               cfg.group_m)
    m0, k0 = pid_m * bm, pid_k * bk
    mask_m = (m0 + jnp.arange(bm) < m) if m % bm else None
    ragged_n = n % bn != 0
    ragged_k = k % bk != 0  # then whole sub-tiles (k % sb == 0) may lie past K

    def body(step, accs):
        n0 = step * bn
        mask_n = (n0 + jnp.arange(bn) < n) if ragged_n else None
        dys = dy_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)]
        dmask = _and(None if mask_m is None else mask_m[:, None],
                     None if mask_n is None else mask_n[None, :])
        dyt = dys[...] if dmask is None else pltriton.load(dys, mask=dmask, other=0)
        new = []
        for j in range(n_sub):
            kk, kbyte, kblock = _common.k_offsets(pid_k, bk, j * sb, spec.block_size)
            rows_ok = mask_n
            if ragged_k:
                in_k = jnp.full((bn,), kk < k)
                rows_ok = _and(rows_ok, in_k)
            ws = codes_ref.at[pl.ds(n0, bn), pl.ds(kbyte, sb // 2)]
            wp = ws[...] if rows_ok is None else pltriton.load(ws, mask=rows_ok[:, None], other=0)
            scales = _common.load_block_scales(spec, scale_refs, n0, bn, kblock, rows_ok)
            w = _common.dequant_tile(spec, wp, scales, dyt.dtype, cfg.lut, lut_ref, interpret=interpret)
            if cfg.swap_ab:   # dxᵀ tile [sb, bm] = wᵀ · dytᵀ: the decoded tile is the left operand
                part = jax.lax.dot_general(w, dyt, (((0,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
            else:
                part = jax.lax.dot_general(dyt, w, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
            new.append(accs[j] + part)
        return tuple(new)

    shape = (sb, bm) if cfg.swap_ab else (bm, sb)
    accs = jax.lax.fori_loop(0, pl.cdiv(n, bn), body, tuple(jnp.zeros(shape, jnp.float32) for _ in range(n_sub)))
    for j in range(n_sub):
        kk = k0 + j * sb
        out = o_ref.at[pl.ds(m0, bm), pl.ds(kk, sb)]
        val = (accs[j].T if cfg.swap_ab else accs[j]).astype(o_ref.dtype)
        mask = None if mask_m is None else mask_m[:, None]
        if ragged_k:
            mask = _and(mask, jnp.full((1, sb), kk < k))
        if mask is None:
            out[...] = val
        else:
            pltriton.store(out, val, mask=jnp.broadcast_to(mask, (bm, sb)))


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def nf4_matmul_dx(dy: jax.Array, codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
                  absmax_offset: jax.Array | None, *, spec: QuantSpec, config: TileConfig,
                  interpret: bool = False) -> jax.Array:
    """``dx[M, K] = dy[M, N] · deq(W)`` with the packed ``W[N, K]`` decoded inside the kernel.

    Args:
      dy: [M, N'] float (bf16/f16/f32), N' >= spec.n; only the first spec.n columns are read.
      codes, absmax, absmax_scale, absmax_offset: the packed weight (see `nf4_matmul`).
      spec: the weight's static description.
      config: tile configuration (``block_m``, ``block_n`` reduction step, ``block_k`` output
        columns; powers of two).
      interpret: run with the Pallas HLO interpreter (CPU tests).
    Returns:
      dx: [M, spec.k] with dy's dtype.
    """
    m = dy.shape[0]
    for name, v in (("block_m", config.block_m), ("block_n", config.block_n), ("block_k", config.block_k)):
        if v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    if dy.shape[1] < spec.n:
        raise ValueError(f"dy has {dy.shape[1]} columns, need n={spec.n}")
    ins, n_in = _common.kernel_inputs(spec, codes, absmax, absmax_scale, absmax_offset, config.lut)
    grid = (pl.cdiv(m, config.block_m) * pl.cdiv(spec.k, config.block_k),)
    kernel = functools.partial(_kernel, spec=spec, cfg=config, m=m, n_in=n_in, interpret=interpret)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, spec.k), dy.dtype),
        grid=grid,
        interpret=interpret,
        compiler_params=_common.compiler_params(config.num_warps, config.num_stages),
        name="nf4_matmul_dx",
    )(dy, *ins)


def nf4_matmul_dx_reference(dy: jax.Array, codes: jax.Array, absmax: jax.Array,
                            absmax_scale: jax.Array | None, absmax_offset: jax.Array | None, *,
                            spec: QuantSpec) -> jax.Array:
    """Plain-JAX ``dy[:, :n] · deq(W)``: dequantize to dy's dtype, dot with float32 accumulation."""
    w = _common.dequantize_reference(codes, absmax, absmax_scale, absmax_offset, spec).astype(dy.dtype)
    dx = jax.lax.dot_general(dy[:, : spec.n], w, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype)
