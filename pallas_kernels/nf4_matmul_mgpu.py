"""Fused NF4 dequant-matmul for training shapes on Hopper, in Mosaic GPU: ``y[M, N] = x[M, K] ·
deq(W)ᵀ`` with the decoded weight as wgmma's register operand, warp-specialised so that one
warpgroup's decode overlaps the other's tensor-core work.

Why Mosaic GPU here (the other kernels are Triton): the fused Triton kernels decode each weight
tile and run its MMA in the same warps and cannot overlap the two (Nsight Compute, 2026-12-01:
warps stalled at CTA barriers; 1.8-1.9x cuBLAS bf16 at M=4096). Mosaic GPU expresses the
structure: a persistent kernel (one CTA an SM walking the output tiles) of three warpgroups,
one issuing the TMA copies of x, the packed codes and the block scales several K steps ahead,
and two computing. Hopper's wgmma takes a register operand only on its left, so the kernel
computes ``yᵀ = deq(W) · xᵀ``: each computing warpgroup decodes its own ``block_n`` weight rows
of a K step into registers in wgmma's operand layout and issues
``wgmma(accᵀ, deq(W) tile, x tileᵀ)`` with the CTA's ``block_m`` rows of x (up to 256, wgmma's
widest N) from shared memory; while one warpgroup decodes, the other's wgmma runs. The
accumulator, ``yᵀ``'s ``block_n × block_m`` tile, is written back through a transposed
shared-memory view (stmatrix.trans) in 64x64 tiles and a TMA store.

The decode (`_decode_tile_mgpu`) is the byte-permute lookup of `pallas_kernels.byte_lut`,
emitted as inline PTX on the registers of a Mosaic GPU fragmented array (``plgpu.inline_mgpu``).
The codes are loaded 4 bytes (8 consecutive codes) a register (layout ``WGMMA_8BIT``), viewed
as a 4-bit array in layout ``WGMMA_UPCAST_4X`` (the same registers), and moved into the WGMMA
layout by Mosaic GPU's own 4-bit relayout, which moves whole bytes; then 4 bytes of a row and
block make one word for the program, whose 4 output words are the operand's bf16 pairs. With
``lut="prmt"`` the table values and the scale are bf16 and multiplied in bf16x2 arithmetic
(`byte_lut.pairs_program`, one more rounding than the reference: ~3.5e-3 relative to it);
``"prmt32"`` is exact, float32 values times the float32 scale rounded once, bit for bit
`pallas_kernels._common.dequantize_reference` (`byte_lut.words_program`, ~1.6x the instructions).

Clusters (``cluster_n=2``): two CTAs with the same rows of x and neighbouring weight rows form
a cluster and load their x tile once, by TMA multicast (x is 64 of a step's 73 KB at the
table's tiles).

Measured on one H200 (jax 0.11.2; `benchmarks/gpu/mgpu_probe.py` runs 30-34, 37-40,
`experiments/bench_kernels.py` runs 35-36, 41; benchmarks/README.md). 2026-12-03: ``block_m=256,
block_n=64, block_k=64``, 4 stages, "prmt": 1.02-1.25x cuBLAS bf16 at M=2048-4096, about as fast
as the decode-then-cuBLAS path (`pallas_kernels.dequant_first`). 2026-12-04: 128-wide K steps
(2 stages: 3 do not fit beside 256 rows of x) and clusters of 2: 1.05-1.19x at M=2048-8192 in
the kernel table (run41; bitsandbytes 1.01-1.22x in the same run; dequant_first 1.07-1.23x
at M=4096-8192 and 1.21-1.23x at M=2048 in the probe and sweep runs), 1.06x at M=1024,
K=4096 N=11008; at M=512 it loses to dequant_first (1.5-2.0x against 1.6-1.7x, run40).
"prmt32" costs 1.26-1.47x: the decode is on the critical path. Once dequant_first's dot asked
for a bf16 result (2026-12-04, third session; XLA had autotuned slower GEMMs for a float32
result rounded after), dequant_first was level with this kernel at M=2048 and faster at
M=4096 (run55), so the tuning table gives the kernel 512 < M <= 2048: 1.06-1.13x at M=2048 in
the table run (run56; bitsandbytes 1.17-1.40x).
Float32 output (``out_dtype``) is written as two bf16 parts, the accumulator's bf16 rounding
and the rounding of the rest, summed by XLA (16 significant bits; Mosaic GPU stores no
transposed float32 tile): in a QLoRA training step, which asks for float32 products, that
made the step 0.5-6% slower than dequant_first (run42), so `pallas_kernels.matmul_nt` sends
float32 requests to dequant_first.
Designs measured and not kept: each warpgroup decoding its own tile into shared memory for a
``wgmma(acc, x tile, w tileᵀ)`` (1.45-1.6x: shared-memory traffic, twice the decode per
product); the two warpgroups sharing one such tile, each decoding half, a barrier a step
(1.29-1.45x); the register operand with the step's wgmma left in flight over the next step's
decode (``wgmma_wait(1)``, the x tile released a step later): wrong results (NaN/inf) on the
H200, also with the last step's operand kept alive through the loop carry and an empty
inline-PTX use after the wait, and no faster (1.12-1.22x against 1.16-1.18x, run37); the cause
was not found.

It computes what `pallas_kernels.nf4_matmul` does, so its plain-JAX reference is
`pallas_kernels.nf4_matmul.nf4_matmul_reference`.

Interpret mode: Mosaic GPU's CPU interpreter runs no inline Mosaic GPU code and no register
operand, so there the decode is the same `byte_lut` program evaluated with jnp
(`byte_lut.decode_words` / `decode_pair_words`) and the decoded tile goes through shared memory
to the wgmma; the
pipeline, the indexing, the tiles, the persistent walk and the transposed epilogue are the
compiled kernel's.

Shapes (`servable`): bf16 x, ``M % block_m == 0``, ``N % (2 * block_n * cluster_n) == 0``,
``K % block_k == 0`` (``block_k`` a multiple of 64), and blocks of at least 32 that are a
multiple or a divisor of ``block_k``; other shapes take another path
(`pallas_kernels.dequant_first`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common, byte_lut
from pallas_kernels._common import QuantSpec
from pallas_kernels.tuning import MOSAIC_COMPUTE_WGS, TileConfig

__all__ = ["servable", "nf4_matmul_mgpu"]

_SMEM_BYTES = 227 * 1024   # shared memory a CTA can have on Hopper
_EPI = 64                  # the epilogue stores the output in 64x64 tiles


def _smem_bytes(config: TileConfig, scale_rows: int, epilogue_slots: int, out_bytes: int, interpret: bool) -> int:
    """Shared memory of a config: the pipeline's stages (x, codes, scales), the epilogue's tiles
    (``out_bytes`` an element) and, in interpret mode, one decoded tile a warpgroup (barriers
    aside)."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    cta_n = MOSAIC_COMPUTE_WGS * bn
    stage = bm * bk * 2 + cta_n * bk // 2 + scale_rows * cta_n * 4
    staged = MOSAIC_COMPUTE_WGS * bn * bk * 2 if interpret else 0
    return config.num_stages * stage + staged + MOSAIC_COMPUTE_WGS * epilogue_slots * _EPI * _EPI * out_bytes


def _epilogue_slots(config: TileConfig, scale_rows: int, out_bytes: int, interpret: bool) -> int:
    """Two epilogue tiles a warpgroup (one stored while the next is written) where shared memory
    allows, else one; ValueError naming the sizes when even one does not fit."""
    for slots in (2, 1):
        if _smem_bytes(config, scale_rows, slots, out_bytes, interpret) <= _SMEM_BYTES - 1024:   # 1 KiB: barriers
            return slots
    raise ValueError(f"the Mosaic GPU kernel's config {config} needs "
                     f"{_smem_bytes(config, scale_rows, 1, out_bytes, interpret)} bytes of shared memory, more than "
                     f"the {_SMEM_BYTES} a CTA has: fewer stages or smaller tiles")


def servable(spec: QuantSpec, m: int, dtype: Any, config: TileConfig) -> bool:
    """Whether `nf4_matmul_mgpu` computes ``x[m, k] · deq(W)ᵀ`` for this weight, x dtype and
    config: bf16 x; ``block_m`` (rows of x a CTA, wgmma's N) a multiple of 64 up to 256 dividing
    M; ``2 * block_n * cluster_n`` (weight rows a CTA, times the CTAs of a cluster) dividing N
    with ``block_n`` a multiple of 64 and ``cluster_n`` 1 or 2;
    ``block_k`` a multiple of 64 up to 256 dividing K (a codes tile's rows must be 32 bytes or
    more: Mosaic GPU swizzles no narrower tile); blocks of at least 32 that are a multiple or a
    divisor of ``block_k``."""
    bm, bn, bk, bs = config.block_m, config.block_n, config.block_k, spec.block_size
    return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and bm % 64 == 0 and bm <= 256 and m % bm == 0
            and bn % 64 == 0 and config.cluster_n in (1, 2)
            and spec.n % (MOSAIC_COMPUTE_WGS * bn * config.cluster_n) == 0 and bk % 64 == 0 and bk <= 256
            and spec.k % bk == 0 and bs >= 32 and (bk % bs == 0 or bs % bk == 0))


def _tile_transforms(row_bytes: int, itemsize_bits: int) -> tuple:
    """Tiling and swizzle of a TMA/wgmma tile whose rows are ``row_bytes`` long (>= 32)."""
    swizzle = plgpu.find_swizzle(row_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle * 8 // itemsize_bits)), plgpu.SwizzleTransform(swizzle))


_LUTS = ("prmt32", "prmt")


def _program(spec: QuantSpec, lut: str) -> byte_lut.Program:
    """The decode of one word of 4 packed bytes: with "prmt32" the exact float32 table values
    times the float32 scale, rounded once to bf16 (`byte_lut.words_program`); with "prmt" the
    bf16 table values times the scale rounded to bf16, in bf16x2 arithmetic
    (`byte_lut.pairs_program`: about half the instructions, one more rounding)."""
    values = tuple(float(v) for v in spec.code_table)
    if lut == "prmt32":
        return byte_lut.words_program(values, "bfloat16")
    if lut == "prmt":
        return byte_lut.pairs_program(values, "bfloat16", True)
    raise ValueError(f"the Mosaic GPU kernel's lut must be one of {_LUTS}, got {lut!r}")


def _decode_tile_mgpu(codes: Any, scales_ref: Any, *, spec: QuantSpec, lut: str, rows: int,
                      block_k: int) -> Any:
    """bf16 ``[rows, block_k]`` in the WGMMA layout (wgmma's register operand) from this
    warpgroup's packed codes (uint8 ``[rows, block_k/2]`` in layout WGMMA_8BIT) and the step's
    scales (float32 smem ``[scale_rows, 2*rows]``, this warpgroup's rows from column
    ``warpgroup * rows``), with the byte-permute program as inline PTX (module docstring)."""
    import jax.experimental.mosaic.gpu as mgpu  # noqa: PLC0415
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector  # noqa: PLC0415

    bs = spec.block_size
    ptx = _program(spec, lut).ptx()

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((rows, block_k), jnp.bfloat16, layout=plgpu.Layout.WGMMA),
    )
    def decode(ctx, codes_fa, s_ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        index = ir.IndexType.get()
        struct = llvm.StructType.get_literal([i32] * 4)
        wg = arith.index_cast(index, mgpu.utils.warpgroup_idx(sync=False))
        col0 = arith.muli(wg, arith.constant(index, rows))
        # the same registers as a 4-bit [rows, block_k] array (8 codes a register, in order),
        # moved into the WGMMA layout (2 codes, one whole byte, a register)
        i4x8 = ir.VectorType.get((8,), ir.IntegerType.get_signless(4))
        nib = np.empty(codes_fa.registers.shape, dtype=object)
        for ridx in np.ndindex(codes_fa.registers.shape):
            nib[ridx] = vector.bitcast(i4x8, codes_fa.registers[ridx])
        nib = mgpu.FragmentedArray(_registers=nib, _layout=mgpu.WGMMA_LAYOUT_UPCAST_4X,
                                   _is_signed=False).to_layout(mgpu.WGMMA_LAYOUT)
        src = nib.registers   # [row tiles, 8-column tiles, ..., row halves, ...]
        col_axis = 1
        assert src.shape[col_axis] % 4 == 0, src.shape
        first = dict(zip(np.ndindex(src.shape), nib.layout.thread_idxs(nib.shape), strict=True))
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        one_word = ir.VectorType.get((1,), i32)
        regs = np.empty(src.shape, dtype=object)
        for ridx in np.ndindex(src.shape):
            if ridx[col_axis] % 4:
                continue
            # 4 neighbouring column tiles of a row: 32 codes, one block (blocks >= 32)
            group = [ridx[:col_axis] + (ridx[col_axis] + j,) + ridx[col_axis + 1:] for j in range(4)]
            word = mgpu.utils.bitcast(mgpu.utils.vector_concat([src[g] for g in group]), i32)
            row, col = first[ridx]
            s = memref.load(s_ref, [arith.divui(col, arith.constant(index, bs)), arith.addi(col0, row)])
            s = arith.bitcast(i32, s)
            if lut == "prmt":   # the scale as bf16 in both halves of a word
                s = llvm.inline_asm(i32, [s], "cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", has_side_effects=False)
            res = llvm.inline_asm(struct, [word, s, s, s, s], ptx, "=r,=r,=r,=r,r,r,r,r,r",
                                  has_side_effects=False)
            for j, g in enumerate(group):
                w = llvm.extractvalue(i32, res, [j])
                regs[g] = vector.bitcast(pair, vector.from_elements(one_word, [w]))
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return decode(codes, scales_ref)


def _decode_tile_interpret(codes: jax.Array, scales: jax.Array, *, spec: QuantSpec, lut: str,
                           block_k: int) -> jax.Array:
    """The same tile as `_decode_tile_mgpu` with `byte_lut`'s jnp model of the same program
    (interpret mode): codes uint8 ``[rows, block_k/2]``, scales float32 ``[scale_rows, rows]``."""
    # byte c of a row holds codes 2c and 2c+1, of block 2c // block_size
    per_byte = scales[jnp.arange(block_k // 2) * 2 // spec.block_size, :].T
    decode = {"prmt32": byte_lut.decode_words, "prmt": byte_lut.decode_pair_words}[lut]
    words = decode(codes, spec.code_table, jnp.bfloat16, per_byte, interpret=True)
    return jax.lax.bitcast_convert_type(words, jnp.bfloat16).reshape(codes.shape[0], block_k)


@functools.partial(jax.jit, static_argnames=("spec", "config", "out_dtype", "num_sms", "interpret"))
def nf4_matmul_mgpu(x: jax.Array, codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
                    absmax_offset: jax.Array | None, *, spec: QuantSpec, config: TileConfig,
                    out_dtype: Any = jnp.bfloat16, num_sms: int | None = None,
                    interpret: bool = False) -> jax.Array:
    """``y[m, n] = x[m, k] · deq(W)ᵀ`` (float32 accumulation) by the Mosaic GPU kernel.

    Args:
      x: bf16 [m, k].
      codes: uint8, the packed ``[n, k]`` weight (n*k/2 bytes, any shape).
      absmax, absmax_scale, absmax_offset: the block scales (see `pallas_kernels._common`);
        double quantization is undone in plain jnp first, a pass over the ``n*k/block_size``
        scales, not over the weight.
      spec: the weight's static description.
      config: ``block_m`` rows of x a CTA (wgmma's N, <= 256), ``block_n`` weight rows for each
        of the CTA's two computing warpgroups, ``block_k`` the K step, ``num_stages`` K steps in
        flight, ``group_m`` the band width of the persistent grid's walk over the output
        tiles, ``lut`` "prmt" or "prmt32", ``cluster_n`` CTAs a cluster along N (1 or 2), which
        share their tile of x by TMA multicast.
      out_dtype: y's dtype, bfloat16 or float32 (the accumulator to 16 significant bits: two
        bf16 parts, summed by XLA; twice the bytes written and in the epilogue's shared memory).
      num_sms: CTAs of the persistent grid (default: the device's SM count; 4 in interpret mode),
        rounded down to whole clusters.
      interpret: run in Mosaic GPU's CPU interpreter (tests), with its race detector on.
    Returns:
      y: [m, n] ``out_dtype``.
    Raises:
      ValueError if `servable` is False, for an unknown ``lut`` or ``out_dtype``, a config that
      needs more shared memory than a CTA has, or x not 2-D; ValueError/TypeError for weight
      arrays that do not match ``spec`` (`pallas_kernels._common.check_operands`).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [m, k], got shape {x.shape}")
    _common.check_operands(spec, codes, absmax, absmax_scale, absmax_offset)
    m, k = x.shape
    n = spec.n
    if k != spec.k:
        raise ValueError(f"x has {k} features, expected k={spec.k}")
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if not servable(spec, m, x.dtype, config):
        raise ValueError(
            f"the Mosaic GPU kernel cannot compute M={m} x {n}x{k} (block {spec.block_size}) in {x.dtype} "
            f"with tiles {bm}x{bn}x{bk}: it needs bf16 x, M % block_m, N % (2*block_n), K % block_k == 0 "
            f"(see servable)")
    bs = spec.block_size
    lut = config.lut
    _program(spec, lut)   # refuses a lookup this kernel has no program for
    cta_n = MOSAIC_COMPUTE_WGS * bn
    cluster = config.cluster_n
    m_iters, n_iters, k_iters = m // bm, n // (cta_n * cluster), k // bk
    scale_rows = max(1, bk // bs)           # scale rows (K blocks) a step
    steps_per_scale_row = max(1, bs // bk)
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"the Mosaic GPU kernel writes bfloat16 or float32, not {out_dtype}")
    n_slots = _epilogue_slots(config, scale_rows, out_dtype.itemsize, interpret)

    packed = codes.reshape(-1)[: n * k // 2].reshape(n, k // 2)
    scales_t = _common.decode_scales(absmax, absmax_scale, absmax_offset, spec).reshape(n, k // bs).T

    x_tf = _tile_transforms(bk * 2, 16)
    c_tf = _tile_transforms(bk // 2, 8)
    parts = out_dtype.itemsize // 2   # bf16 tiles written a float32 output: 2 (see the end)
    o_tf = _tile_transforms(_EPI * 2, 16)
    if num_sms is None:
        num_sms = 4 if interpret else jax.devices()[0].core_count   # the interpreter runs CTAs in turn

    def kernel(x_gmem, c_gmem, s_gmem, *o_gmems, o_smem, w_smem=None):
        def get_pipeline(body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(k_iters,),
                memory_registers=40,
                in_specs=[
                    # a cluster's CTAs share their rows of x: one TMA multicast loads them for all
                    plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=x_tf, memory_space=plgpu.SMEM,
                                    collective_axes=("cluster",) if cluster > 1 else ()),
                    plgpu.BlockSpec((cta_n, bk // 2), lambda kk: (0, kk), transforms=c_tf,
                                    memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((scale_rows, cta_n), lambda kk: (kk // steps_per_scale_row, 0),
                                    memory_space=plgpu.SMEM),
                ],
                wg_axis="wg",
                num_compute_wgs=MOSAIC_COMPUTE_WGS,
                max_concurrent_steps=config.num_stages,
                compute_context=compute_context,
            )

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(pl.run_scoped,
                           allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, c_gmem, s_gmem),
                           collective_axes="wg")
        def _scope(allocs):
            wg = lax.axis_index("wg")
            wn = pl.ds(wg * bn, bn)   # this warpgroup's weight rows (y's columns) in the CTA's

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, config.group_m)
                m_sl = pl.ds(mi * bm, bm)
                n_sl = pl.ds((ni * cluster + lax.axis_index("cluster")) * cta_n, cta_n)

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((bn, bm), jnp.float32))
                    def _acc(acc):
                        eval_pipeline(acc)
                        out = acc[...]   # yᵀ's tile
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        n_tiles = bn // _EPI
                        for ei in range((bm // _EPI) * n_tiles):
                            e_m = slice((ei // n_tiles) * _EPI, (ei // n_tiles + 1) * _EPI)
                            e_n = slice((ei % n_tiles) * _EPI, (ei % n_tiles + 1) * _EPI)
                            slot = ei % n_slots
                            part = out[e_n, e_m]
                            hi = part.astype(jnp.bfloat16)
                            vals = [hi] if parts == 1 else [hi, (part - hi.astype(jnp.float32)).astype(jnp.bfloat16)]
                            plgpu.wait_smem_to_gmem(n_slots - 1, wait_read_only=True)
                            for p, v in enumerate(vals):
                                o_smem.at[wg, slot, p].T[...] = v
                            plgpu.commit_smem()
                            for p, o_gmem in enumerate(o_gmems):   # one bulk group a tile
                                plgpu.copy_smem_to_gmem(o_smem.at[wg, slot, p],
                                                        o_gmem.at[m_sl, n_sl].at[:, wn].at[e_m, e_n],
                                                        commit_group=p == parts - 1)

                def body(_, x_smem, c_smem, s_smem, acc):
                    c_wg = c_smem.at[wn]
                    if interpret:   # the interpreter's wgmma reads no register operand
                        w_smem[wg] = _decode_tile_interpret(c_wg[...], s_smem[:, wn], spec=spec, lut=lut,
                                                            block_k=bk)
                        plgpu.commit_smem()
                        w = w_smem.at[wg]
                    else:
                        w = _decode_tile_mgpu(plgpu.load(c_wg, layout=plgpu.Layout.WGMMA_8BIT), s_smem,
                                              spec=spec, lut=lut, rows=bn, block_k=bk)
                    plgpu.wgmma(acc, w, x_smem.T)
                    # awaited in its own step: left in flight over the next step's decode, the
                    # results were wrong on an H200 (runs 34, 37; module docstring)
                    plgpu.wgmma_wait(0)
                    return acc

                get_pipeline(body, compute_context)(
                    x_gmem.at[m_sl, :], c_gmem.at[n_sl, :], s_gmem.at[:, n_sl], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    scratch = dict(o_smem=plgpu.SMEM((MOSAIC_COMPUTE_WGS, n_slots, parts, _EPI, _EPI), jnp.bfloat16,
                                     transforms=o_tf))
    if interpret:
        scratch["w_smem"] = plgpu.SMEM((MOSAIC_COMPUTE_WGS, bn, bk), jnp.bfloat16,
                                       transforms=_tile_transforms(bk * 2, 16))
    kern = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((m, n), jnp.bfloat16),) * parts,
        grid=(max(1, num_sms // cluster),),
        grid_names=("sm",),
        cluster=(cluster,),
        cluster_names=("cluster",),
        num_threads=MOSAIC_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        scratch_types=scratch,
        **({"interpret": plgpu.InterpretGPUParams(detect_races=True)} if interpret else {}),
    )
    ys = kern(x, packed, scales_t)
    # float32: the accumulator as the sum of its bf16 rounding and the rounding of the rest
    # (16 significant bits), since Mosaic GPU stores no transposed float32 tile
    return ys[0] if parts == 1 else ys[0].astype(jnp.float32) + ys[1].astype(jnp.float32)
