"""Fused NF4 dequant-matmul for decode (small M, 1..16): ``y[M, N] = x[M, K] · deq(W)ᵀ``.

Memory-bound: the whole packed weight (~4.13 bits a weight with double quant) is streamed once,
so the kernel spreads it over many programs: a program owns ``block_n`` weight rows and one of
``split_k`` slices of K, and writes float32 partial sums ``[split_k, M, N]`` that XLA adds
(``split_k == 1`` writes ``y`` directly). Two inner products:

- ``use_dot=True``: ``acc[block_n, 16] += deq(W)tile · x_tileᵀ`` on the tensor cores, with the
  weight tile as the A operand (rows of x past M are masked to 0; Triton dots need dims >= 16);
- ``use_dot=False``: multiply-accumulate on the CUDA cores into ``[block_n, sb/2]`` float32
  accumulators per row of x (even and odd weight columns apart, reduced once after the loop),
  for M <= 4, where a padded dot would waste 16/M of its work.

Backend: Triton lowering of ``pl.pallas_call`` with explicit ``CompilerParams`` (see
`pallas_kernels.nf4_matmul`): a memory-bound streaming kernel needs no wgmma, and Triton's
vectorised, pipelined loads are what it needs; it is also checkable in CPU interpret mode.

The word-pair form of the CUDA-core path (``use_dot=False`` with ``lut="prmt"`` on bf16 x,
`uses_x_words`): byte j of a weight row decodes to the bf16 pair of weights 2j, 2j+1, and x
comes in as int32 words of bf16 pairs, so weight and x pairs line up word for word. Each half
becomes float32 by one shift or mask, with one accumulator per row of x. There is no dot, so
nothing goes through shared memory (Nsight Compute had put the dot path's limit in the L1/shared
pipe, not DRAM).

With ``pair_fma`` (bf16 x) the word path instead reads the packed weight as int32 words of 4
bytes and sums each word's 8 products as two bf16 lanes in packed FMAs inside the lookup's
inline PTX (`byte_lut.pair_dot_program`), then adds them to a float32 sum: ~11 SASS
instructions a packed byte instead of ~18, at ~1e-3 more relative error (bf16 rounding of
4-term partial sums). With ``prefetch`` the K loop carries the next step's weight tiles in
registers, so their loads go out before this step's arithmetic. (Carried as uint8 tiles, they
had been unpacked to a byte a register and re-packed for the PTX: 255 registers; as words, 96.)

With ``x_planes`` as well (`TileConfig.x_planes`), x comes in byte planes, ``[M * 4, k/8]``
int32 (plane j holds the x word of byte j of each weight word; one small transpose of x in
XLA, which can join x's producer fusion), and each K step is one ``[block_n, block_k/8]`` word
tile. Every plane's slice is then contiguous, loaded as a row-broadcast ``[block_n, ...]`` tile
in the weight tile's own layout, so that a thread loads its x in 16-byte vectors once for all
the rows it holds (without planes: four scalar loads a weight word, for each row). The words'
unscaled sums (`byte_lut.pair_dot_sums`) are added a block and scaled once a block. The table
words come as ``[1, block_k/32, 1]`` tiles against ``[rows, words/4, 4]`` views of the tiles:
one register a table word in each thread (168 -> 86 registers at 16 rows, 1 warp).

With ``x_direct`` instead (`TileConfig.x_direct`), x is read in its own order, as int32 words:
a thread's vector of 4 packed words (32 weights of one block) and the 16 contiguous x words
they pair with (4 16-byte loads, in the weight tile's layout) go into one ``pack=4`` program
call (`byte_lut.pair_dot4_accumulate`) with the vector's block scale, which adds each word's
scaled dot to a float32 sum a word; the sums are reduced once, after the loop. K steps are
whole blocks and need not divide K (the last one is masked), so a program can take all of K:
with ``split_k=1`` the call is this one kernel, with no transpose of x and no split-K sum.

On the pair_fma paths a step loaded ahead carries its scales' loads (the 8-bit codes and the
second-level scales, `_common.gather_block_scale_parts`), and the step that uses them looks
the codes up (`_common.finish_block_scales`): done where the step was loaded, the lookup waited
on the load it had just issued, a memory latency every iteration.

Measured (H200, jax 0.11.2, NF4 + double quant, bitsandbytes 0.50 in the same run, device-side,
each call timed whole: `experiments/bench_kernels.timing_loop`; 2026-12-04, runs 44-50,
`benchmarks/README.md`): at M=1, K <= N, the x_direct row (2 rows, 2048-wide K steps, no split,
2 warps, one step ahead: two vectors a thread, 66 registers) takes 0.0152 ms = 0.54x XLA cuBLAS
bf16 at K=4096 N=11008 (1.53 TB/s of packed weight; bitsandbytes 0.85x; 0.58x in run47, where
cuBLAS took 0.0269 ms instead of 0.0282; 0.57x in run50), 0.68-0.70x at K=N=4096
(bitsandbytes 0.99-1.01x) and 0.65-0.68x at K=N=8192 (bitsandbytes 1.01-1.04x); past K = N
the x_planes row (8 rows, 256-wide K steps, 8 K splits, 1 warp, one step ahead) takes
0.69-0.71x at K=11008 N=4096 (bitsandbytes 0.93x;
x_direct 0.78-0.85x there, with or without K splits). Before x_direct
(2026-12-03, run29) the x_planes row took 0.66x / 0.90x / 0.66x (K=4096 N=11008 / K=N=4096 /
K=11008 N=4096). At M=4 and M=16 the dot config (128 rows, 64-wide steps, 16 splits, 4 warps)
takes 0.98-1.14x (bitsandbytes 2.2-3.5x); x_direct at M=4 took 2.1-2.9x. Plain XLA
dequantize->dot takes 7-9x. The target, 0.40x bf16 at M=1, is not reached: Nsight Compute
(run26) put the x_planes kernel at ~28% of DRAM bandwidth with 0.5 instructions issued a cycle
per scheduler (~36 SASS instructions a weight word, of them ~22 for the lookup; x_direct's loop
is 38-44 a word in offline SASS), so it is bound by latency and issue, not bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common, byte_lut, tuning
from pallas_kernels._common import QuantSpec
from pallas_kernels.tuning import TileConfig

__all__ = ["nf4_decode", "nf4_decode_reference", "MAX_M"]

MAX_M = 16  # rows of x the decode kernel handles (a dot pads M to 16)
_DOT_M = 16


def uses_x_words(cfg: TileConfig, dtype) -> bool:
    """Whether the kernel takes x as int32 words of bf16 pairs (the CUDA-core path with the
    "prmt" lookup on bf16 x: weight and x pairs line up word for word)."""
    return not cfg.use_dot and cfg.lut == "prmt" and jnp.dtype(dtype) == jnp.bfloat16


def uses_pair_fma(cfg: TileConfig, dtype) -> bool:
    """Whether the word path sums 4 bytes' products in bf16x2 FMAs (`byte_lut.pair_dot_program`)."""
    return cfg.pair_fma and uses_x_words(cfg, dtype)


def uses_x_planes(cfg: TileConfig, dtype) -> bool:
    """Whether the pair_fma path takes x in byte planes and each K step as one word tile
    (`TileConfig.x_planes`)."""
    return cfg.x_planes and uses_pair_fma(cfg, dtype)


def uses_x_direct(cfg: TileConfig, dtype) -> bool:
    """Whether the pair_fma path reads x in its own order, a thread's vector of 4 packed words
    (32 weights) with its 16 x words in one program call (`TileConfig.x_direct`)."""
    return cfg.x_direct and uses_pair_fma(cfg, dtype)


def _kernel(x_ref, *refs, spec: QuantSpec, cfg: TileConfig, m: int, n_in: int, steps_per_split: int,
            x_words: bool, pair_fma: bool, x_planes: bool, x_direct: bool, interpret: bool):
    *w_refs, o_ref = refs
    codes_ref, scale_refs, lut_ref = _common.split_weight_refs(spec, w_refs[:n_in], cfg.lut)
    bn, bk = cfg.block_n, cfg.block_k
    sb = min(bk, spec.block_size)
    n, k = spec.n, spec.k
    pid_n, pid_s = pl.program_id(0), pl.program_id(1)
    n0 = pid_n * bn
    mask_n = (n0 + jnp.arange(bn) < n) if n % bn else None
    total = -(-k // bk)   # x_direct: the last step may run past k (masked)
    lo = pid_s * steps_per_split
    hi = jnp.minimum(lo + steps_per_split, total)
    mp = _DOT_M if cfg.use_dot else m
    # A traced 0: rows past M of a dot's 16-row x tile are masked, and a static slice past
    # x's M rows would be rejected at trace time even though it is never dereferenced.
    row0 = pid_n * 0

    def offsets(step, j):
        """(column, byte, block column) of sub-step j of K step ``step``."""
        return _common.k_offsets(step, bk, j * sb, spec.block_size)

    def packed_tile(kbyte, kblock, width=sb // 2):
        """(packed tile [bn, width], float32 scales [bn]) of the sub-step at these offsets: uint8
        bytes, or int32 words of 4 bytes on the pair_fma path (``kbyte``, ``width`` in words)."""
        ws = codes_ref.at[pl.ds(n0, bn), pl.ds(kbyte, width)]
        wp = ws[...] if mask_n is None else pltriton.load(ws, mask=mask_n[:, None], other=0)
        return wp, _common.load_block_scales(spec, scale_refs, n0, bn, kblock, mask_n)

    def weight_tile(kbyte, kblock, dtype):
        wp, scales = packed_tile(kbyte, kblock)
        return _common.dequant_tile(spec, wp, scales, dtype, cfg.lut, lut_ref, interpret=interpret)

    if cfg.use_dot:
        mask_x = (jnp.arange(mp) < m)[:, None] if m < mp else None

        def body(step, acc):
            for j in range(bk // sb):
                kk, kbyte, kblock = offsets(step, j)
                xs = x_ref.at[pl.ds(row0, mp), pl.ds(kk, sb)]
                xt = xs[...] if mask_x is None else pltriton.load(xs, mask=mask_x, other=0)
                w = weight_tile(kbyte, kblock, xt.dtype)
                acc += jax.lax.dot_general(w, xt, (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
            return acc

        acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((bn, mp), jnp.float32))
        accs = [acc.T]  # [mp, bn]
    elif pair_fma:
        # As the word path below, but the packed weight comes in as int32 words of 4 bytes and
        # each word's 8 products are summed in bf16x2 FMAs inside one inline-asm block
        # (`byte_lut.pair_dot_program`); x word j of each weight word is a stride-4 tile. The
        # table words are loaded once, as [1, q] tiles, so that they live in ordinary
        # registers. With ``cfg.prefetch = d`` the loop carries the weight tiles of the next d
        # steps (a register pipeline) so that their loads are in flight during this step's
        # arithmetic; x is small and cache-resident, and is loaded where it is used.
        table_ref = w_refs[n_in]
        if x_direct:
            # A K step is a [bn, v, 4] word tile (v vectors of 4 words, 32 weights of one block,
            # a row), the last step masked where K is not a multiple of block_k. x comes as its own
            # int32 words: operand q of a vector is the 16 contiguous bytes of x that word q's
            # bytes pair with, loaded in the weight tile's layout (a zero row stride), so there is
            # no transpose of x; the block scale goes into the same program call, which adds the
            # scaled dot to a float32 sum a word (`byte_lut.pair_dot4_accumulate`).
            w = bk // 8
            v, kw = w // 4, spec.k // 8
            acc_shape = (bn, v, 4)
            rows3 = (n0 + jnp.arange(bn, dtype=jnp.int32))[:, None, None]
            vec = jnp.arange(v, dtype=jnp.int32)[None, :, None]
            lane = jnp.arange(4, dtype=jnp.int32)[None, None, :]
            # the table operands as [bn, v, 4] tiles (a zero row stride), so that they load in the
            # weight tile's layout: [1, v, 4] tiles got another, converted through shared memory
            table = [pltriton.load(table_ref.at[jnp.full(acc_shape, a, jnp.int32), jnp.broadcast_to(vec, acc_shape),
                                                jnp.broadcast_to(lane, acc_shape)])
                     for a in range(byte_lut.DOT4_TABLE_OPERANDS)]
            # block column of each vector within a step (steps are whole blocks; vec >= 0, so the
            # truncating divide is the floor)
            vec_block = jax.lax.div(vec * 32, jnp.int32(spec.block_size))
            ragged = kw % w != 0

            def step_mask(step, width):
                """bool mask of a step's [bn, v, width] tile: rows < n and words < k/8."""
                mask = None if mask_n is None else mask_n[:, None, None]
                if ragged:
                    mk = (step * w + 4 * vec) < kw
                    mask = mk if mask is None else mask & mk
                return None if mask is None else jnp.broadcast_to(mask, (bn, v, width))

            def load_step(step):
                """The step's weight words and its scales' loads (what a step loaded ahead carries)."""
                mask = step_mask(step, 4)
                wt = pltriton.load(codes_ref.at[jnp.broadcast_to(rows3, acc_shape), step * w + 4 * vec + lane],
                                   mask=mask, other=0 if mask is not None else None)
                parts = _common.gather_block_scale_parts(spec, scale_refs, rows3,
                                                         step * (bk // spec.block_size) + vec_block, step_mask(step, 1))
                return wt, parts

            def add_step(step, tiles, accs):
                wt, parts = tiles
                sc = _common.finish_block_scales(scale_refs, parts)
                mask = step_mask(step, 4)
                other = 0 if mask is not None else None
                out = []
                for r in range(m):
                    # x words 4q..4q+3 of each vector (x word 4t+j pairs with byte j of word t), in
                    # the weight tile's layout; x is small and cache-resident, so it is loaded here
                    # rather than carried ahead in registers (16 a vector)
                    xrow = jnp.full(acc_shape, r, jnp.int32)
                    xs = [pltriton.load(x_ref.at[xrow, step * (4 * w) + 16 * vec + 4 * q + lane], mask=mask, other=other)
                          for q in range(4)]
                    out.append(byte_lut.pair_dot4_accumulate(wt, xs, sc, accs[r], table, interpret=interpret))
                return tuple(out)
        elif x_planes:
            # A K step is one [bn, bk/8] word tile (nb whole blocks of q words) and x comes as
            # byte planes [M * 4, k/8] (plane j holds the x word of byte j of each weight word),
            # so that each plane's tile is a contiguous slice, loaded in 16-byte vectors, that
            # every row of the weight shares: a thread holding several rows loads its x once for
            # all of them. The words' unscaled dots are summed a block, then scaled once a block,
            # into [bn, nb] float32 sums.
            q, nb, w = spec.block_size // 8, bk // spec.block_size, bk // 8
            # The pair dots run on [bn, w/4, 4] views (4 words: a thread's 16-byte vector), with
            # the table words as [1, w/4, 1] tiles: one register a table word in each thread, from
            # addresses that differ between threads (a [1, w] tile would hold a copy for each of
            # a thread's 4 words; a [1, 1] tile is warp-uniform, and ptxas then keeps it in a
            # uniform register and copies it back before every permute that reads it).
            table = [table_ref[pl.ds(i, 1), :, :] for i in range(byte_lut.N_TABLE_WORDS)]
            acc_shape = (bn, nb)

            def load_step(step):
                ws = codes_ref.at[pl.ds(n0, bn), pl.ds(step * w, w)]
                wt = ws[...] if mask_n is None else pltriton.load(ws, mask=mask_n[:, None], other=0)
                rows = (n0 + jnp.arange(bn, dtype=jnp.int32))[:, None]
                kb = step * nb + jnp.arange(nb, dtype=jnp.int32)[None, :]
                return wt, _common.gather_block_scale_parts(spec, scale_refs, rows, kb,
                                                            None if mask_n is None else mask_n[:, None])

            def add_step(step, tiles, accs):
                wt, parts = tiles
                # the scales' lookup here, not where the step is loaded ahead: it waits on a load
                scales = _common.finish_block_scales(scale_refs, parts)
                cols = step * w + jnp.arange(w, dtype=jnp.int32)[None, :]
                out = []
                for r in range(m):
                    # [bn, w] tiles of one x row (a zero row stride): loaded in the weight tile's
                    # own layout (a [1, w] tile gets another, and the weight tile would be
                    # converted to it through shared memory every step)
                    xs = [pltriton.load(x_ref.at[jnp.full((bn, 1), 4 * r + j, jnp.int32), cols])
                          for j in range(4)]
                    dots = byte_lut.pair_dot_sums(wt.reshape(bn, w // 4, 4), [x.reshape(bn, w // 4, 4) for x in xs],
                                                  table, interpret=interpret)
                    out.append(accs[r] + dots.reshape(bn, nb, q).sum(axis=2) * scales)
                return tuple(out)
        else:
            q = sb // 8
            table = [table_ref[pl.ds(i, 1), :] for i in range(byte_lut.N_TABLE_WORDS)]
            acc_shape = (bn, q)

            def word_offsets(step, j):
                """(x word = packed byte, packed word, block column) of sub-step j of ``step``."""
                _, kbyte, kblock = offsets(step, j)
                return kbyte, step * (bk // 8) + j * (sb // 8), kblock

            def load_step(step):
                tiles = []
                for j in range(bk // sb):
                    _, kw, kblock = word_offsets(step, j)
                    tiles.append(packed_tile(kw, kblock, q))
                return tuple(tiles)

            def add_step(step, tiles, accs):
                accs = list(accs)
                for j, (wt, scales) in enumerate(tiles):
                    kx, _, _ = word_offsets(step, j)
                    for r in range(m):
                        xs = [x_ref[pl.ds(row0 + r, 1), pl.ds(kx + b, q, stride=4)] for b in range(4)]
                        accs[r] = byte_lut.pair_dot_accumulate(wt, xs, scales[:, None], accs[r], table,
                                                               interpret=interpret)
                return tuple(accs)

        acc0 = tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(m))
        depth = int(cfg.prefetch)
        if depth:
            # steps past the split's last reload that last step (in bounds; an L2 hit) rather
            # than branching
            def ahead(step):
                return load_step(jnp.minimum(step, hi - 1))

            def body(step, carry):
                accs, tiles = carry   # tiles[d] holds step + d
                nxt = ahead(step + depth)
                return add_step(step, tiles[0], accs), (*tiles[1:], nxt)

            first = tuple(ahead(lo + d) for d in range(depth))
            acc2, _ = jax.lax.fori_loop(lo, hi, body, (acc0, first))
        else:
            acc2 = jax.lax.fori_loop(lo, hi, lambda step, accs: add_step(step, load_step(step), accs), acc0)
        accs = [jnp.sum(a, axis=tuple(range(1, a.ndim))) for a in acc2]
    elif x_words:
        # Word for word: byte j of a weight row decodes (byte permutes) to the bf16 pair of
        # weights 2j, 2j+1 (unscaled table values), and word j of x's row is the bf16 pair
        # x[2j], x[2j+1]; both halves become float32 by a shift or a mask. One float32
        # accumulator [bn, sb/2] per row of x, reduced once after the loop.
        h = sb // 2

        def body(step, accs):
            accs = list(accs)
            for j in range(bk // sb):
                _, kword, kblock = offsets(step, j)   # a weight byte lines up with an x word
                wp, scales = packed_tile(kword, kblock)
                words = byte_lut.decode_pair_words(wp, spec.code_table, jnp.bfloat16, interpret=interpret)
                w_even, w_odd = byte_lut.bf16_halves_f32(words)
                s = scales[:, None]
                for r in range(m):
                    x_even, x_odd = byte_lut.bf16_halves_f32(x_ref[pl.ds(row0 + r, 1), pl.ds(kword, h)])
                    accs[r] = accs[r] + (w_even * x_even + w_odd * x_odd) * s
            return tuple(accs)

        acc2 = jax.lax.fori_loop(lo, hi, body, tuple(jnp.zeros((bn, h), jnp.float32) for _ in range(m)))
        accs = [jnp.sum(a, axis=1) for a in acc2]
    else:
        # Per row of x, float32 accumulators over the even and odd weight columns, [bn, sb/2]
        # each: one FMA a weight, no interleave of the two nibbles, and a single reduction
        # after the loop instead of one every step.
        h = sb // 2
        cols = 2 * jnp.arange(h, dtype=jnp.int32)[None, :]

        def body(step, accs):
            accs = list(accs)
            for j in range(bk // sb):
                kk, kbyte, kblock = offsets(step, j)
                wp, scales = packed_tile(kbyte, kblock)
                # float32 weights: no rounding of the weight at all
                w_even, w_odd = _common.dequant_pair(spec, wp, scales, jnp.float32, cfg.lut, lut_ref,
                                                     interpret=interpret)
                for r in range(m):
                    row = jnp.full((1, 1), r, jnp.int32)
                    x_even = pltriton.load(x_ref.at[row, kk + cols]).astype(jnp.float32)
                    x_odd = pltriton.load(x_ref.at[row, kk + 1 + cols]).astype(jnp.float32)
                    accs[2 * r] = accs[2 * r] + w_even * x_even
                    accs[2 * r + 1] = accs[2 * r + 1] + w_odd * x_odd
            return tuple(accs)

        acc2 = jax.lax.fori_loop(lo, hi, body, tuple(jnp.zeros((bn, h), jnp.float32) for _ in range(2 * m)))
        accs = [jnp.sum(acc2[2 * r] + acc2[2 * r + 1], axis=1) for r in range(m)]

    split = cfg.split_k > 1
    if cfg.use_dot:
        out = (o_ref.at[pid_s, pl.ds(row0, mp), pl.ds(n0, bn)] if split
               else o_ref.at[pl.ds(row0, mp), pl.ds(n0, bn)])
        mask = None
        if m < mp:
            mask = jnp.broadcast_to((jnp.arange(mp) < m)[:, None], (mp, bn))
        if mask_n is not None:
            mn = jnp.broadcast_to(mask_n[None, :], (mp, bn))
            mask = mn if mask is None else mask & mn
        val = accs[0].astype(o_ref.dtype)
        if mask is None:
            out[...] = val
        else:
            pltriton.store(out, val, mask=mask)
    else:
        for r in range(m):
            # a 1-row slice, not an int index: interpret mode rejects masked stores at static ints
            out = (o_ref.at[pid_s, pl.ds(r, 1), pl.ds(n0, bn)] if split
                   else o_ref.at[pl.ds(r, 1), pl.ds(n0, bn)])
            val = accs[r].astype(o_ref.dtype)[None, :]
            if mask_n is None:
                out[...] = val
            else:
                pltriton.store(out, val, mask=mask_n[None, :])


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def nf4_decode(x: jax.Array, codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
               absmax_offset: jax.Array | None, *, spec: QuantSpec, config: TileConfig,
               interpret: bool = False) -> jax.Array:
    """``y[M, N] = x[M, K] · deq(W)ᵀ`` for small M (1..16), streaming the packed weight once.

    Args:
      x: [M, K'] float (bf16/f16/f32), 1 <= M <= 16, K' >= spec.k.
      codes, absmax, absmax_scale, absmax_offset: the packed weight (see `nf4_matmul`).
      spec: the weight's static description.
      config: ``block_n``, ``block_k`` (power of two dividing k; with ``x_direct`` a power of
        two of whole blocks, the last step masked), ``split_k``, ``use_dot`` (forced on for
        M > 4, where ``x_direct`` is dropped), ``lut``, ``pair_fma``, ``prefetch``, ``x_planes``
        (``block_k`` a multiple of the block size), ``x_direct``, ``num_warps``, ``num_stages``.
      interpret: run with the Pallas HLO interpreter (CPU tests).
    Returns:
      y: [M, spec.n] with x's dtype.
    """
    m = x.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"nf4_decode handles 1..{MAX_M} rows, got M={m}")
    if m > 4 and not config.use_dot:   # the CUDA-core paths hold a sum a row of x: the dot takes M > 4
        config = config.replace(use_dot=True)
    if config.x_direct and not uses_x_direct(config, x.dtype):
        # x_direct serves bf16 x on the CUDA-core path; the other paths need K steps dividing K
        config = tuning.fit_block_k(config.replace(x_direct=False), spec.k, spec.block_size)
    bk = config.block_k
    x_direct = config.x_direct   # after the fallback above: set only where it serves
    if x_direct:
        # K steps of whole blocks, the last one masked where it runs past k
        if config.x_planes:
            raise ValueError("x_direct and x_planes are two layouts of x: set one")
        if bk % spec.block_size or bk & (bk - 1) or spec.block_size < 32 or x.shape[1] < spec.k:
            raise ValueError(f"x_direct needs K steps of whole blocks of >= 32 weights, a power of two wide: "
                             f"block_k={bk}, block_size={spec.block_size}; x has shape {x.shape}")
    elif spec.k % bk or bk & (bk - 1) or x.shape[1] < spec.k:
        raise ValueError(f"block_k={bk} must be a power of two dividing k={spec.k}; x has shape {x.shape}")
    total = -(-spec.k // bk)
    split_k = max(1, min(config.split_k, total))
    steps = -(-total // split_k)
    split_k = -(-total // steps)  # no empty splits
    config = config.replace(split_k=split_k)
    ins, n_in = _common.kernel_inputs(spec, codes, absmax, absmax_scale, absmax_offset, config.lut)
    x_words = uses_x_words(config, x.dtype)
    pair_fma = uses_pair_fma(config, x.dtype)
    x_planes = uses_x_planes(config, x.dtype)
    if pair_fma:
        # the packed weight as int32 words of 4 bytes (a bitcast of the same bytes), and the
        # table words the kernel loads once, as tiles of the width its word tiles have
        sb = min(config.block_k, spec.block_size)
        if sb % 8:
            raise ValueError(f"pair_fma needs K sub-steps of >= 8 weights, got {sb}")
        if x_planes and bk % spec.block_size:
            raise ValueError(f"x_planes needs K steps of whole blocks: block_k={bk} is not a multiple "
                             f"of block_size={spec.block_size}")
        rows = ins[0].shape[0]
        ins[0] = jax.lax.bitcast_convert_type(ins[0].reshape(rows, spec.k // 8, 4), jnp.int32)
        if x_direct:   # [DOT4_TABLE_OPERANDS, bk/32, 4]: a thread's vector has its own copy
            table = byte_lut.dot4_table_tile(spec.code_table, jnp.bfloat16, bk // 32)
        elif x_planes:   # [N_TABLE_WORDS, bk/32, 1], one word a thread's 4-word vector
            table = byte_lut.table_tile(spec.code_table, jnp.bfloat16, bk // 32)[:, :, None]
        else:
            table = byte_lut.table_tile(spec.code_table, jnp.bfloat16, sb // 8)
        ins = [*ins, jnp.asarray(table)]
    x_in = x
    if x_words:   # int32 [M, k/2] view of the bf16 pairs (a bitcast; no copy when K' == k)
        x_in = jax.lax.bitcast_convert_type(x[:, : spec.k].reshape(m, spec.k // 2, 2), jnp.int32)
    if x_planes:
        # x as byte planes [M * 4, k/8] (row 4r + j for row r of x): x word 4i + j pairs with
        # byte j of weight word i. One small transpose of x, which XLA can fuse into x's
        # producer (in the kernel, Triton would convert the weight tile to x's layout instead).
        x_in = x_in.reshape(m, spec.k // 8, 4).transpose(0, 2, 1).reshape(m * 4, spec.k // 8)
    kernel = functools.partial(_kernel, spec=spec, cfg=config, m=m, n_in=n_in, steps_per_split=steps,
                               x_words=x_words, pair_fma=pair_fma, x_planes=x_planes, x_direct=x_direct,
                               interpret=interpret)
    if split_k > 1:
        out_shape = jax.ShapeDtypeStruct((split_k, m, spec.n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, spec.n), x.dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(spec.n, config.block_n), split_k),
        interpret=interpret,
        compiler_params=_common.compiler_params(config.num_warps, config.num_stages),
        name="nf4_decode",
    )(x_in, *ins)
    return out.sum(axis=0).astype(x.dtype) if split_k > 1 else out


def nf4_decode_reference(x: jax.Array, codes: jax.Array, absmax: jax.Array,
                         absmax_scale: jax.Array | None, absmax_offset: jax.Array | None, *,
                         spec: QuantSpec) -> jax.Array:
    """Plain-JAX reference: the same product as `nf4_matmul_reference` (float32 weight here,
    since the kernel's multiply-and-reduce path does not round the weight)."""
    w = _common.dequantize_reference(codes, absmax, absmax_scale, absmax_offset, spec)
    y = jnp.dot(x[:, : spec.k].astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
