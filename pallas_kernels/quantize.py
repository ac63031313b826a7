"""Single-pass blockwise 4-bit quantize and dequantize of bf16/f16 arrays, in Pallas (GPU).

What: `quantize_blocks_pallas` turns a bf16/f16 array into packed 4-bit codes and float32 block
scales (absmax) in one pass over the input; `dequantize_blocks_pallas` turns them back into a
bf16/f16 array in one pass. Both compute exactly what ``qlora_jax.quantize`` computes with plain
XLA (the bytes bitsandbytes writes): per block ``absmax = max |x|``; ``x * (1 / absmax)`` with the
correctly rounded float32 reciprocal (0 for an absmax below 2**-126); the code is the sorted rank
``#{midpoints m : v > m}`` of the scaled value (ties go to the lower code) mapped back through
the format's sort order; two codes a byte, the first element in the HIGH nibble. Decoding is
``table[code] * absmax`` in float32, rounded once to the output dtype. `double_quantize_pallas`
is the second level of double quantization in one pass over the float32 scales, given the offset
(centre, per-block absmax, exact reciprocal, 8-bit code of the signed dynamic map; see its
docstring). Plain-jnp references sit beside the kernels (`quantize_blocks_reference`,
`dequantize_blocks_reference`, `double_quantize_reference`). This module does
not import ``qlora_jax``: a format is its 16-value code table (or a name in
`pallas_kernels._common.CODE_TABLES`); midpoints and sort order are derived here the same way as
in ``qlora_jax.formats`` (the tests check they are equal).

Layout. The plain XLA path makes several passes (absmax reduction, scale and encode, nibble
interleave and pack). Here a program owns ``rows`` whole blocks and does all of it in registers,
with no strided access: the 16-bit input is viewed as uint32 words (``bitcast_convert_type`` of
``x.reshape(-1, 2)``, free in XLA), so word ``i`` holds element ``2i`` in its LOW 16 bits and
element ``2i + 1`` in its HIGH 16 bits (little-endian; checked in the tests). A tile is
``uint32 [rows, block_size / 2]``: its low halves are the even elements (high nibbles), its high
halves the odd ones (low nibbles), so the packed byte is ``(code(lo) << 4) | code(hi)`` at the
same ``[row, column]``, written as ``uint8 [rows, block_size / 2]``; absmax is ``float32 [rows]``.
Dequantization mirrors it: ``uint8 [rows, block_size / 2]`` in, ``uint32`` words out whose low
half is the value of the high nibble, bitcast back to ``bf16/f16 [n]`` by the wrapper.

In-kernel details that keep the bytes equal to the XLA path:

- absmax is an integer max over the 16-bit patterns with the sign bit cleared (monotone in the
  value for non-NaN), so NaN cannot be dropped by a float max; a block whose max pattern is
  Inf/NaN gets a NaN absmax (as in the XLA path); a block whose largest value is subnormal
  (only possible for bf16) stores absmax 0, as XLA:CPU (which flushes denormals) does. XLA:GPU
  may store that subnormal itself; the codes are the zero code either way.
- The reciprocal is correctly rounded, not a float division (Triton's and XLA:GPU's float32
  division is approximate): IEEE ``rcp.rn.f32`` on the GPU, and in the interpreter and the
  references integer long division of ``2**47`` by the 24-bit mantissa (three 8-bit steps in
  uint32), the same bits. At ``2**126`` it is ``2**-126``, above that 0 (the XLA path's result
  there is an artefact of flushing; no weight comes near 8.5e37).
- The code of a scaled value ``v`` is the number of midpoints below it, counted exactly
  (`_encode_count`); a subnormal ``v`` counts as 0, as XLA:CPU's flushing compare sees it. The
  only float adds after multiplies add exact small integers or an exactly scaled ``v``, so FMA
  contraction cannot change a result. The ``[-1, 1]`` clip of the XLA path is left out: it
  cannot change a finite value's rank (every midpoint lies strictly inside ``(-1, 1)``).
- Codes of a block holding Inf/NaN are unspecified (its absmax is NaN, which marks it).
- Float32 input stays on the XLA path: it has no free two-elements-per-word view.

Why the Triton lowering of ``pl.pallas_call`` (with explicit ``CompilerParams``, see
`pallas_kernels.nf4_matmul`): these are memory-bound elementwise-plus-row-reduction kernels that
need no wgmma or TMA, only wide coalesced loads and stores and register math, which Triton
generates; the same kernel body runs in CPU interpret mode for the tests, and the lowering is
the same on jax 0.11.2 and 0.12.

Where the instructions go (Nsight Compute on an H200, 2026-12-01 and 2026-12-02): the first
versions were bound by the integer/logic pipe (SM throughput 92%, memory 34%; "waiting for the
execution pipe"), which issues at half the FMA pipe's rate on Hopper. So the hot paths now
avoid it:

- bf16 NF4/Int4 quantize (``encoder="f16x2"``, the default there) encodes both elements of a
  word at once in packed float16 arithmetic against per-block thresholds looked up by the
  absmax mantissa (`_f16x2_table`, `_encode_f16x2`): ~43 SASS instructions a word where the
  "count" encoder takes ~65, and no reciprocal. Its table is stored word-major so that one
  warp-wide lookup touches a few cache lines: stored block-major it made the kernel L1-bound
  (L1 pipe 79% busy, slower than "count");
- other quantize calls (f16 input, FP4, any table) count midpoints with saturating FMAs
  (``encoder="count"``, `_encode_count`: one compare and 8 selects a value for sorted tables,
  7 counted midpoints on |v| for FP4's sign-symmetric table), and take the block reciprocal
  from one IEEE ``rcp.rn.f32`` (the same correctly rounded bits as the integer long division
  of `_exact_reciprocal`, which the interpreter and the references use);
- dequantize looks codes up by byte permutes (``lut="prmt"``, `pallas_kernels.byte_lut`: the
  exact float32 table values, times the scale, rounded once: the same bits as "tree").

All reach the GPU as inline PTX; in interpret mode the same arithmetic runs as jnp, so the CPU
tests check the algorithm bit for bit (the "f16x2" one exhaustively: every bf16 value under
every absmax mantissa) and the GPU tests the PTX.

Tuning knobs are arguments: ``rows_per_program`` (default: a tile of ~4K elements, `default_rows`),
``num_warps`` (default 4 for tiles up to 4K elements, else 8), ``num_stages`` (1: no loop
to pipeline), ``tiles_per_program`` (default 1: consecutive tiles walked in a loop, with
``num_stages > 1`` to prefetch; it did not help on the H200). The defaults are the best of the
tile sweeps on an H200 (``experiments/bench_quantize.py --sweep``; ``--sweep-quantize`` for the
quantize kernel by encoder: 64 blocks of 64 with 4 warps is the best for "f16x2" and within
2% of the best for "count").

Measured (H200, jax 0.11.2, 8192 x 8192 bf16, block 64, TB/s of bf16 input, device time of calls
in a jitted loop, two runs of 2026-12-02; XLA path in brackets): quantize NF4 2.22 / 2.21 (0.82),
FP4 1.87 / 1.78 (0.51), NF4 + double quant 1.96 / 1.88 (0.60); dequantize NF4 3.03 / 3.56 (0.56),
NF4 + double quant 2.79 / 2.59, FP4 3.12 / 3.06. A torch ``copy_`` moves 4.07 TB/s there (bytes
read + written), so 40% of it is 1.63 TB/s of input: every kernel clears it. The NF4 first level
takes ~60 µs ("count": ~71 µs); the mean and the second level add 8-11 µs (benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common, byte_lut

__all__ = [
    "CodeTables",
    "code_tables",
    "supported",
    "default_rows",
    "quantize_blocks_pallas",
    "dequantize_blocks_pallas",
    "quantize_blocks_reference",
    "dequantize_blocks_reference",
    "double_quantize_pallas",
    "double_quantize_reference",
    "default_dq_blocks",
    "dq_supported",
    "resolve_encoder",
    "encoders_for",
    "ENCODERS",
    "INPUT_DTYPES",
    "BLOCK_SIZES",
    "DQ_BLOCK_SIZES",
    "MAX_ELEMENTS",
    "MAX_DQ_SCALES",
]

INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Scales a second-level block of double quantization (as ``qlora_jax.formats.DQ_BLOCK_SIZES``).
DQ_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# Word offsets inside the kernels are int32 (``row * block_size / 2 + column``); this keeps every
# offset, including those of masked rows past the end, far below 2**31.
MAX_ELEMENTS = 2**31
_TILE_ELEMENTS = 4096
# How the dequantize kernel looks up a code's value (see `dequantize_blocks_pallas`).
DEQUANT_LUTS = ("prmt", "tree")
DEQUANT_LUT = "prmt"

# Bit pattern of +Inf of each 16-bit input format (a sign-cleared pattern >= it is Inf or NaN),
# and the smallest normal bf16 pattern (below it a bf16 is zero or subnormal in float32 too).
_INF_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}
_BF16_MIN_NORMAL = 0x0080


# --------------------------------------------------------------------------------------------
# Formats


@dataclasses.dataclass(frozen=True)
class CodeTables:
    """A 4-bit format as the kernels use it (hashable, so it can be a static argument).

    Attributes:
      values: the 16 float32 values, indexed by code.
      midpoints: the 15 float32 midpoints between consecutive sorted values.
      order: the 16 codes sorted by value (stable: of two equal values the smaller code first).
    """

    values: tuple[float, ...]
    midpoints: tuple[float, ...]
    order: tuple[int, ...]

    @property
    def sorted_is_identity(self) -> bool:
        return self.order == tuple(range(16))


@functools.lru_cache(maxsize=32)
def _tables_from_values(values: tuple[float, ...]) -> CodeTables:
    v = np.asarray(values, np.float32)
    if v.shape != (16,) or not np.all(np.isfinite(v)):
        raise ValueError(f"a code table must hold 16 finite values, got {values!r}")
    order = np.argsort(v, kind="stable")
    s = v[order]
    mid = ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32)
    return CodeTables(tuple(float(x) for x in v), tuple(float(x) for x in mid),
                      tuple(int(i) for i in order))


def code_tables(fmt: str | Sequence[float] | np.ndarray | CodeTables) -> CodeTables:
    """`CodeTables` for a format name in `pallas_kernels._common.CODE_TABLES` or a table of 16
    values (e.g. ``qlora_jax.formats.get_format("fp4").values``)."""
    if isinstance(fmt, CodeTables):
        return fmt
    if isinstance(fmt, str):
        if fmt not in _common.CODE_TABLES:
            raise ValueError(f"unknown format {fmt!r}: pass its 16 code values instead "
                             f"(names known here: {sorted(_common.CODE_TABLES)})")
        fmt = _common.CODE_TABLES[fmt]
    return _tables_from_values(tuple(float(x) for x in np.asarray(fmt, np.float32).reshape(-1)))


def supported(dtype: Any, n: int, block_size: int) -> bool:
    """Whether the kernels serve ``n`` elements of ``dtype`` in blocks of ``block_size``:
    bf16/f16, ``block_size`` in `BLOCK_SIZES`, ``n`` a positive multiple of it below
    `MAX_ELEMENTS`. (The platform is the caller's business: compiled on GPU, interpreted elsewhere.)"""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        return False
    return (dt in INPUT_DTYPES and block_size in BLOCK_SIZES and 0 < n < MAX_ELEMENTS
            and n % block_size == 0)


def default_rows(block_size: int, n_blocks: int | None = None) -> int:
    """Blocks a program: a tile of ~4K elements, at most the next power of two of ``n_blocks``."""
    rows = max(1, _TILE_ELEMENTS // block_size)
    if n_blocks is not None:
        rows = min(rows, 1 << max(0, (n_blocks - 1).bit_length()))
    return rows


def _check_launch(rows: int, num_warps: int, num_stages: int, tiles: int = 1) -> None:
    if not isinstance(tiles, (int, np.integer)) or tiles < 1:
        raise ValueError(f"tiles_per_program must be a positive int, got {tiles!r}")
    if not isinstance(rows, (int, np.integer)) or rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows_per_program must be a power of two >= 1, got {rows!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two in 1..32, got {num_warps!r}")
    if not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")


def _default_warps(rows: int, block_size: int) -> int:
    return 4 if rows * block_size <= 4096 else 8


# --------------------------------------------------------------------------------------------
# Kernel-side helpers


def _select_tree(bits: Sequence[jax.Array], leaves: Sequence[Any]) -> jax.Array:
    """``leaves[i]`` where ``i`` is the integer whose binary digits, most significant first, are
    the bools ``bits``: a tree of ``len(leaves) - 1`` two-way selects on constants (no gather)."""
    level = list(leaves)
    for b in reversed(bits):
        level = [jnp.where(b, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
    return level[0]


def _encode(scaled: jax.Array, tables: CodeTables) -> jax.Array:
    """int32 code of float32 scaled values: the sorted rank ``#{m : v > m}`` among the 15
    midpoints (a value on a midpoint goes lower), mapped to the code holding that value.

    The rank is found by binary search with 4 compares: bit ``k`` of the rank is
    ``v > midpoints[r + 2**k - 1]``, where ``r`` is the rank with only its bits above ``k`` (found
    already) set; the threshold is picked by a select tree on constants (1 + 3 + 7 selects), so
    ~22 operations instead of 15 compares and 15 adds. Exact for any non-decreasing midpoints
    (FP4's two zeros give the midpoint 0 between equal values)."""
    mids = [np.float32(m) for m in tables.midpoints]
    bits: list[jax.Array] = []
    for k in (3, 2, 1, 0):
        # thresholds for every value of the bits found so far (most significant first)
        leaves = [mids[(r << (k + 1)) + (1 << k) - 1] for r in range(1 << len(bits))]
        bits.append(scaled > _select_tree(bits, leaves))
    if tables.sorted_is_identity:
        rank = jnp.where(bits[0], np.int32(8), np.int32(0))
        for k, b in zip((4, 2, 1), bits[1:]):
            rank = rank | jnp.where(b, np.int32(k), np.int32(0))
        return rank
    return _select_tree(bits, [np.int32(c) for c in tables.order])


def _f32_hex(v: float) -> str:
    return "0f%08X" % int(np.float32(v).view(np.uint32))


def _ptx_f32(ptx: str, x: jax.Array) -> jax.Array:
    """float32 result (``$0``) of an inline-PTX block over one float32 operand (``$1``), element
    by element (GPU only; the callers model the same arithmetic in jnp for interpret mode)."""
    (out,) = pltriton.elementwise_inline_asm(
        ptx, args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return out


@functools.lru_cache(maxsize=32)
def _count_terms(tables: CodeTables) -> tuple:
    """The terms of the arithmetic encoder (`_encode_count`): per midpoint ``m`` a power of two
    ``B >= 2**24 / 2**floor(log2 |m|)`` (2**126 for ``m == 0``) and ``C = -m * B`` (exact), so that
    ``sat(v * B + C)`` is exactly 1 for every float ``v > m`` (``v - m`` is at least the spacing of
    floats just above ``m``, ``2**(e - 24)``) and 0 for ``v <= m``, with subnormal ``v`` counted as 0
    (flushed, as XLA:CPU's compare sees it).

    Returns ``("split", m7, [(B, C_low, C_high)] * 7)`` for a sorted-identity table (NF4, Int4):
    ``rank = 8 [v > m7] + sum_j sat(v B_j + C_j)``, the seven midpoints of the half ``v`` lies in;
    ``("mirror", (P0, N0, P1, N1), [(B, C, weight)] * 7)`` for a sign-symmetric table whose codes
    step alike on both sides (FP4; `_mirror_codes`): the seven positive midpoints counted on
    ``a = |v|`` (one float step up when ``v < 0``, so that ``a > m`` means ``|v| >= m`` there,
    the side a tie goes to), ``code = (N1 if v < 0 else P1) + sum_{j >= 1} weight_j * [a > m_j]``,
    or ``P0``/``N0`` (``v`` positive normal / not) when ``a <= m_0``; else ``("linear",
    order[0], [(B, C, weight)] * 15)``: ``code = order[0] + sum_i weight_i * sat(v B_i + C_i)``
    with ``weight_i = order[i + 1] - order[i]``."""
    mids = [float(m) for m in tables.midpoints]

    def power(ms):
        exps = [np.floor(np.log2(abs(m))) for m in ms if m != 0]
        if len(exps) < len(ms):
            return 2.0 ** 126
        return 2.0 ** (24 - min(exps))

    if tables.sorted_is_identity:
        terms = []
        for j in range(7):
            b = power([mids[j], mids[8 + j]])
            terms.append((b, -mids[j] * b, -mids[8 + j] * b))
        return ("split", mids[7], tuple(terms))
    mirror = _mirror_codes(tables)
    if mirror is not None:
        pos, neg = mirror
        bs = [power([mids[8 + j]]) for j in range(7)]
        terms = tuple((b, -mids[8 + j] * b, float(pos[j + 1] - pos[j]) if j else 0.0)
                      for j, b in enumerate(bs))
        return ("mirror", (float(pos[0]), float(neg[0]), float(pos[1]), float(neg[1])), terms)
    terms = []
    for i, m in enumerate(mids):
        b = power([m])
        w = tables.order[i + 1] - tables.order[i]
        terms.append((b, -m * b, float(w)))
    return ("linear", float(tables.order[0]), tuple(terms))


def _mirror_codes(tables: CodeTables) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(P, N)``: the codes of ranks 8 + r and 7 - r (r = 0..7; the positive and the negative
    side, outward from 0) when the "mirror" encoder applies, else None. It needs midpoints that
    are sign-symmetric with ``m7 == 0`` (so that ``v < 0`` has rank ``7 - #{i >= 8 :
    |v| >= m_i}``), and codes that step alike on both sides (``N[r] - N[r-1] == P[r] - P[r-1]``
    for r >= 2), as FP4's sign-magnitude codes do."""
    if tables.sorted_is_identity:
        return None
    m = np.asarray(tables.midpoints, np.float32)
    if not (np.array_equal(m[::-1], -m) and m[7] == 0):   # value for value (0 == -0)
        return None
    pos = tuple(tables.order[8 + r] for r in range(8))
    neg = tuple(tables.order[7 - r] for r in range(8))
    if any(neg[r] - neg[r - 1] != pos[r] - pos[r - 1] for r in range(2, 8)):
        return None
    return pos, neg


def _encode_count(scaled: jax.Array, tables: CodeTables, interpret: bool) -> jax.Array:
    """float32 code (an exact integer 0..15) of float32 scaled values: the same code as
    `_encode`, counted with saturating FMAs instead of found by compares and selects.

    Why: `_encode`'s ~22 compares and selects a value all go to the ALU pipe (compares, selects,
    logic), which issues half as fast as the FMA pipe on Hopper and made the quantize kernel
    pipe-bound. Here one compare and 8 selects (sorted tables), ~8 integer/select operations
    (the "mirror" form, FP4) or none (any other table) remain, and 13-30 FMA-pipe operations do
    the rest (`_count_terms`). On the GPU one inline-PTX block a value
    (``fma.rn.ftz.sat``); in interpret mode the same sums with jnp (``clip(v * B + C, 0, 1)``:
    ``v * B`` is exact for a power of two ``B``, so the unfused form rounds the same)."""
    kind, first, terms = _count_terms(tables)
    if kind == "mirror":
        return _encode_mirror(scaled, first, terms, interpret)
    if interpret:
        def sat(b, c):   # c: a constant, or per value
            return jnp.clip(scaled * np.float32(b) + c, np.float32(0), np.float32(1))

        if kind == "split":
            hi = scaled > np.float32(first)
            acc = jnp.where(hi, np.float32(8), np.float32(0))
            for b, c_lo, c_hi in terms:
                acc = acc + sat(b, jnp.where(hi, np.float32(c_hi), np.float32(c_lo)))
            return acc
        acc = jnp.full(scaled.shape, np.float32(first))
        for b, c, w in terms:
            acc = acc + np.float32(w) * sat(b, np.float32(c))
        return acc
    lines = ["{", ".reg .pred %p;", ".reg .f32 %c, %s, %a;"]
    if kind == "split":
        lines += [f"setp.gt.f32 %p, $1, {_f32_hex(first)};",
                  f"selp.f32 %a, {_f32_hex(8.0)}, {_f32_hex(0.0)}, %p;"]
        for b, c_lo, c_hi in terms:
            lines += [f"selp.f32 %c, {_f32_hex(c_hi)}, {_f32_hex(c_lo)}, %p;",
                      f"fma.rn.ftz.sat.f32 %s, $1, {_f32_hex(b)}, %c;",
                      "add.rn.f32 %a, %a, %s;"]
    else:
        lines.append(f"mov.f32 %a, {_f32_hex(first)};")
        for b, c, w in terms:
            lines.append(f"fma.rn.ftz.sat.f32 %s, $1, {_f32_hex(b)}, {_f32_hex(c)};")
            if w:
                lines.append(f"fma.rn.f32 %a, %s, {_f32_hex(w)}, %a;")
    lines += ["mov.f32 $0, %a;", "}"]
    return _ptx_f32("\n".join(lines), scaled)


def _encode_mirror(scaled: jax.Array, ends: tuple[float, ...], terms: tuple, interpret: bool) -> jax.Array:
    """The "mirror" form of `_encode_count` (see `_count_terms`): 7 saturating FMAs, 6 FMAs and
    ~8 integer/select operations a value, where the "linear" form takes 30 FMA-pipe operations.
    The end test ``v >= 2**-126`` counts a subnormal ``v`` as 0, as XLA's flushing compare does."""
    p0, n0, p1, n1 = ends
    if interpret:
        bits = jax.lax.bitcast_convert_type(scaled, jnp.uint32)
        neg = bits >> 31
        a = jax.lax.bitcast_convert_type((bits & np.uint32(0x7FFFFFFF)) + neg, jnp.float32)
        ind = [jnp.clip(a * np.float32(b) + np.float32(c), np.float32(0), np.float32(1)) for b, c, _ in terms]
        acc = jnp.where(neg == 1, np.float32(n1), np.float32(p1))
        for (_, _, w), r in zip(terms[1:], ind[1:]):
            acc = acc + np.float32(w) * r
        end = jnp.where(scaled >= np.float32(2.0 ** -126), np.float32(p0), np.float32(n0))
        return jnp.where(ind[0] == 0, end, acc)
    lines = ["{", ".reg .pred %pn, %pp, %pz;", ".reg .b32 %u, %n;", ".reg .f32 %a, %s, %r, %acc, %e;",
             "mov.b32 %u, $1;", "shr.u32 %n, %u, 31;", "and.b32 %u, %u, 0x7FFFFFFF;",
             "add.u32 %u, %u, %n;", "mov.b32 %a, %u;", "setp.ne.u32 %pn, %n, 0;",
             f"fma.rn.ftz.sat.f32 %r, %a, {_f32_hex(terms[0][0])}, {_f32_hex(terms[0][1])};",
             f"selp.f32 %acc, {_f32_hex(n1)}, {_f32_hex(p1)}, %pn;"]
    for b, c, w in terms[1:]:
        lines += [f"fma.rn.ftz.sat.f32 %s, %a, {_f32_hex(b)}, {_f32_hex(c)};",
                  f"fma.rn.f32 %acc, %s, {_f32_hex(w)}, %acc;"]
    lines += [f"setp.ge.f32 %pp, $1, {_f32_hex(2.0 ** -126)};",
              f"selp.f32 %e, {_f32_hex(p0)}, {_f32_hex(n0)}, %pp;",
              "setp.eq.f32 %pz, %r, 0f00000000;",
              "selp.f32 $0, %e, %acc, %pz;", "}"]
    return _ptx_f32("\n".join(lines), scaled)


# The "f16x2" encoder: both elements of an input word at once, in packed half-precision
# arithmetic, against per-block thresholds (`_f16x2_table`).
ENCODERS = ("f16x2", "count")
_F16X2_ROWS = 129        # one a 7-bit bf16 absmax mantissa, then the row of scale-0 blocks
_F16X2_WORDS = 8         # threshold words a row
_F16X2_ZERO_ROW = 128


def _f16_bits(v: float) -> int:
    return int(np.float16(v).view(np.uint16))


def _bf16_grid_below_two() -> np.ndarray:
    """Every bf16 value of magnitude below 2, ascending (one zero), as float32."""
    pos = (np.arange(0x4000, dtype=np.uint32) << 16).view(np.float32)   # exponent field <= 127
    return np.concatenate([-pos[:0:-1], pos])


@functools.lru_cache(maxsize=32)
def _f16x2_table(tables: CodeTables) -> tuple[np.ndarray, tuple[float, ...]] | None:
    """(int32 [8 * 129] threshold words, (B_7, B_0, .., B_6)) of the "f16x2" encoder
    (`_encode_f16x2`), or None where it does not apply (it needs a sorted-identity table, as
    NF4 and Int4 are, whose midpoints all lie at least 2**-6 from 0).

    Why it is exact. A bf16 block with absmax ``A = M * 2**E`` (``M`` in [1, 2), 7 mantissa
    bits; normal, at most 2**126) encodes ``v = RN32(x * RN32(1 / A))``. Scaling by 2**E is
    exact, so ``v = RN32(x' * RN32(1 / M))`` for ``x' = x * 2**-E``, a bf16 value in [-M, M]
    (held exactly by float16 unless below 2**-14, where it is far from every threshold). ``v``
    is monotone in ``x'``, so ``v > m_j`` iff ``x' > T_j(M)``, the largest bf16 ``x'`` whose ``v``
    is at most ``m_j``: a table of 128 mantissas x 15 midpoints, found here by searching all bf16
    values below 2 (subnormals flushed, as XLA:CPU does). A bf16 ``x' > T`` exceeds ``T`` by at
    least ``2**(floor(log2 |T|) - 8)``, so with a power of two ``B`` at least the inverse of that,
    ``sat(x' * B - T * B)`` is exactly 1 for ``x' > T`` and 0 otherwise: in float16 too, as long
    as ``T * B`` has at most 11 significant bits (it has 8) and stays below 65504 (checked here).
    Blocks of scale 0 (absmax 0, subnormal, above 2**126, or NaN) use row 128 with ``x' = 0``:
    thresholds that give every element the code of 0, as ``v = 0`` does.

    Layout, word-major (word ``k`` of row ``r`` at ``k * 129 + r``, so that one load across a
    warp's blocks touches a few cache lines, not one a block): word 0 holds ``B_7 * T_7`` in
    both float16 halves (the upper-half test ``x' > T_7``); word ``1 + j`` (j < 7) holds
    ``-B_j * T_j`` in its low and ``-B_j * T_{8+j}`` in its high half (midpoint j of the lower
    and of the upper half, ``B_j`` shared by both).
    """
    if not tables.sorted_is_identity:
        return None
    mids = np.asarray(tables.midpoints, np.float32)
    if np.min(np.abs(mids)) < 2.0 ** -6:
        return None
    grid = _bf16_grid_below_two()
    flushed = np.where(np.abs(grid) < np.float32(2.0 ** -126), np.float32(0), grid)
    thr = np.empty((128, 15), np.float64)
    for k in range(128):
        m = np.float32(1 + k / 128)
        v = flushed * (np.float32(1) / m)                     # float32 product, one rounding
        v = np.where(np.abs(v) < np.float32(2.0 ** -126), np.float32(0), v)
        i = np.searchsorted(v, mids, side="right") - 1
        # no bf16 below 2 has v <= m (an outer Int4 midpoint below -1 at large M): every x' in
        # [-M, M] lies above -2, a bf16 threshold that counts that midpoint for all of them
        thr[k] = np.where(i >= 0, grid[np.maximum(i, 0)], -2.0)
    exps = np.floor(np.log2(np.abs(thr)))                     # no threshold is 0 (|m| >= 2**-6)
    b7 = 2.0 ** (8 - exps[:, 7].min())
    bs = [2.0 ** (8 - min(exps[:, j].min(), exps[:, 8 + j].min())) for j in range(7)]
    # halves [row, word, (low, high)]: the test word, then the seven midpoint pairs
    halves = np.zeros((_F16X2_ROWS, _F16X2_WORDS, 2))
    halves[:128, 0, :] = (b7 * thr[:, 7])[:, None]
    for j, b in enumerate(bs):
        halves[:128, 1 + j, 0] = -b * thr[:, j]
        halves[:128, 1 + j, 1] = -b * thr[:, 8 + j]
    # scale-0 row: x' = 0 gives sat(c) = [0 > m], and the test word's sign is [0 > m_7]
    halves[_F16X2_ZERO_ROW, 0, :] = -1.0 if mids[7] < 0 else 1.0
    for j in range(7):
        halves[_F16X2_ZERO_ROW, 1 + j] = (float(mids[j] < 0), float(mids[8 + j] < 0))
    reach = 2 * max([b7] + bs) + np.abs(halves).max()          # |x' B| + |c| for |x'| < 2
    if np.any(np.float16(halves).astype(np.float64) != halves) or reach > 65504:
        return None
    bits = np.float16(halves).view(np.uint16).astype(np.uint32)
    words = bits[..., 0] | (bits[..., 1] << 16)                 # [row, word]
    return np.ascontiguousarray(words.T).reshape(-1).view(np.int32), (b7, *bs)


def _f16x2_rows(absmax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int32 row of `_f16x2_table`, float32 ``2**-E``) from the bf16 absmax of blocks: the row
    of its 7-bit mantissa, or the scale-0 row (and scale 0) where the reciprocal is 0 (absmax
    0, subnormal, above 2**126, or NaN)."""
    bits = jax.lax.bitcast_convert_type(absmax, jnp.int32)
    live = (absmax >= np.float32(2.0 ** -126)) & (absmax <= np.float32(2.0 ** 126))   # False for NaN
    row = jnp.where(live, (bits >> 16) & 0x7F, np.int32(_F16X2_ZERO_ROW))
    scale = jnp.where(live, jax.lax.bitcast_convert_type((254 - (bits >> 23)) << 23, jnp.float32), np.float32(0))
    return row, scale


def _f16x2_words(thresholds: Any, row: jax.Array) -> list[jax.Array]:
    """The 8 threshold words of each block's ``row`` (gathers from the `_f16x2_table` ref)."""
    return [thresholds[row + np.int32(k * _F16X2_ROWS)] for k in range(_F16X2_WORDS)]


def _encode_f16x2(w: jax.Array, scale: jax.Array, words: Sequence[jax.Array], factors: tuple[float, ...],
                  interpret: bool) -> jax.Array:
    """int32 ``16 * code(even) + code(odd)`` (in the low byte) for uint32 words of bf16 pairs
    (low half the even element), given per block ``scale = 2**-E`` (0 for scale-0 blocks) and
    its 8 threshold words (`_f16x2_table`), each broadcastable to ``w``.

    Per word on the GPU, one inline-PTX block of ~32 instructions for both elements (the
    "count" encoder takes ~46): the halves to float32 (a shift, a mask), times ``scale``
    (``mul.rn.ftz``: a subnormal element counts as 0, as in XLA:CPU), packed to float16x2; the
    upper-half test ``t = B_7 * (T_7 - x')``, whose sign bits make a ``prmt`` selector that picks
    each half's threshold from a midpoint's word; per midpoint ``fma.rn.sat.f16x2`` gives the
    two 0/1 indicators and an ``fma.rn.f16x2`` adds 16 times them onto ``1024 + 128 * upper``
    (exact small integers; float16 ``1024 + k`` has the bits ``0x6400 + k``), so the byte is the
    low byte of ``lo + (hi >> 4) + 0xC0`` of the two halves' bit patterns. In interpret mode the
    same arithmetic in float32 jnp (every intermediate is exact, or rounds on the same side of
    0 and 1, so the indicators are the same)."""
    b7, *bs = factors
    if interpret:
        even, odd = byte_lut.bf16_halves_f32(w)

        # (low, high) float16 halves of each threshold word, as float32
        halves = [tuple(h.astype(jnp.float32) for h in byte_lut.split_pair_words(k, jnp.float16))
                  for k in words]

        def code(x):
            x = (x * scale).astype(jnp.float16).astype(jnp.float32)
            upper = x * np.float32(-b7) + halves[0][0] < 0
            count = jnp.where(upper, np.float32(8), np.float32(0))
            for b, (lo, hi) in zip(bs, halves[1:]):
                c = jnp.where(upper, hi, lo)
                count = count + jnp.clip(x * np.float32(b) + c, np.float32(0), np.float32(1))
            return count.astype(jnp.int32)

        return code(even) * 16 + code(odd)
    hx = lambda v: f"0x{v & 0xFFFFFFFF:08x}"
    pair = lambda v: hx(_f16_bits(v) * 0x10001)
    lines = ["{", ".reg .b32 %e, %o, %x, %t, %m, %sel, %a, %c, %s, %k<6>;", ".reg .f32 %fe, %fo;",
             "shl.b32 %e, $1, 16;", "and.b32 %o, $1, 0xFFFF0000;",
             "mov.b32 %fe, %e;", "mov.b32 %fo, %o;",
             "mul.rn.ftz.f32 %fe, %fe, $2;", "mul.rn.ftz.f32 %fo, %fo, $2;",
             "cvt.rn.f16x2.f32 %x, %fo, %fe;",
             f"mov.b32 %k0, {pair(-b7)};", "fma.rn.f16x2 %t, %x, %k0, $3;",
             # m: byte 0 = 0xFF if the low half is upper, byte 1 the same for the high half
             "mov.b32 %k1, 0;", "mov.b32 %k2, 0x44B9;", "prmt.b32 %m, %t, %k1, %k2;",
             # selector: each half takes bytes 0-1 (lower-half threshold) or 2-3 (upper) of a word
             "lop3.b32 %sel, %m, 0x2222, 0x1010, 0xEA;",
             f"mov.b32 %k3, {hx(_f16_bits(1152.0) << 16 | _f16_bits(1024.0))};",
             "prmt.b32 %a, %k3, %k3, %sel;",
             f"mov.b32 %k4, {pair(16.0)};"]
    for j, b in enumerate(bs):
        lines += [f"mov.b32 %k5, {pair(b)};",
                  f"prmt.b32 %c, ${4 + j}, ${4 + j}, %sel;",
                  "fma.rn.sat.f16x2 %s, %x, %k5, %c;",
                  "fma.rn.f16x2 %a, %s, %k4, %a;"]
    lines += ["shr.b32 %t, %a, 20;", "add.u32 %a, %a, %t;", "add.u32 $0, %a, 0xC0;", "}"]
    args = [jax.lax.bitcast_convert_type(w, jnp.int32), jnp.broadcast_to(scale, w.shape)]
    args += [jnp.broadcast_to(k, w.shape) for k in words]
    (out,) = pltriton.elementwise_inline_asm(
        "\n".join(lines), args=args, constraints=",".join(["=r", "r", "f"] + ["r"] * len(words)),
        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)])
    return out


def _exact_reciprocal(a: jax.Array) -> jax.Array:
    """Correctly rounded float32 ``1 / a`` for float32 ``a`` in [2**-126, 2**126] (normal), by
    integer arithmetic only: ``1/a = (2**47 / am) * 2**(103 - ea)`` with ``am`` the 24-bit mantissa
    and ``ea`` the biased exponent; the quotient is formed by long division in three 8-bit steps
    (every partial remainder times 2**8 fits in uint32) and rounded to nearest (a tie cannot
    occur: ``am * (2q + 1) = 2**48`` has no solution with ``am > 2**23``). ``a`` above 2**126
    gives 0 (the true result would be subnormal)."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    ea = (bits >> 23) & 0xFF
    am = (bits & 0x7FFFFF) | 0x800000
    q1 = jax.lax.div(jnp.uint32(1 << 31), am)          # < 2**8 for am > 2**23
    r = jnp.uint32(1 << 31) - q1 * am
    q2 = jax.lax.div(r << 8, am)
    r = (r << 8) - q2 * am
    q3 = jax.lax.div(r << 8, am)
    r = (r << 8) - q3 * am
    q = (q1 << 16) | (q2 << 8) | q3                    # floor(2**47 / am), in [2**23, 2**24)
    q = q + (r + r > am).astype(jnp.uint32)            # round to nearest (stays < 2**24)
    general = ((253 - ea) << 23) | (q & 0x7FFFFF)      # ea <= 252: a normal result
    pow2 = (254 - ea) << 23                            # am == 2**23: 1/a = 2**(127 - (ea - 127))
    is_pow2 = am == 0x800000
    out = jnp.where(is_pow2, pow2, general)
    ok = jnp.where(is_pow2, ea <= 253, ea <= 252)
    return jnp.where(ok, jax.lax.bitcast_convert_type(out, jnp.float32), jnp.float32(0))


def _reciprocal(a: jax.Array, interpret: bool) -> jax.Array:
    """`_exact_reciprocal` of normal float32 ``a``: on the GPU one IEEE ``rcp.rn.f32`` (correctly
    rounded, the same bits; ~10 instructions where the integer long division takes ~60), with
    the result past 2**126 set to 0 as there; in interpret mode the integer version itself."""
    if interpret:
        return _exact_reciprocal(a)
    r = _ptx_f32("rcp.rn.f32 $0, $1;", a)
    return jnp.where(a <= np.float32(2.0 ** 126), r, jnp.float32(0))


def _halves_to_f32(w: jax.Array, dtype: str) -> tuple[jax.Array, jax.Array]:
    """float32 values of the low (even element) and high (odd element) halves of uint32 words."""
    if dtype == "bfloat16":
        return byte_lut.bf16_halves_f32(w)
    return tuple(h.astype(jnp.float32) for h in byte_lut.split_pair_words(w, jnp.float16))


def _pattern_to_f32(bits: jax.Array, dtype: str) -> jax.Array:
    """float32 value of non-negative 16-bit patterns held in int32."""
    u = bits.astype(jnp.uint32)
    if dtype == "bfloat16":
        return jax.lax.bitcast_convert_type(u << 16, jnp.float32)
    return jax.lax.bitcast_convert_type(u.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _block_absmax(amax_bits: jax.Array, dtype: str) -> jax.Array:
    """absmax float32 [r] from the max |x| bit patterns of blocks (NaN for Inf/NaN blocks)."""
    absmax = _pattern_to_f32(amax_bits, dtype)
    if dtype == "bfloat16":
        # a subnormal max: 0, as XLA:CPU's flushing max stores it (the codes do not change)
        absmax = jnp.where(amax_bits < _BF16_MIN_NORMAL, jnp.float32(0), absmax)
    return jnp.where(amax_bits >= _INF_BITS[dtype], jnp.float32(jnp.nan), absmax)


def _inverse_scale(absmax: jax.Array, interpret: bool) -> jax.Array:
    """The correctly rounded ``1 / absmax`` (`_reciprocal`), 0 for 0 and NaN."""
    normal = absmax >= np.float32(2.0 ** -126)   # False for 0 and NaN
    return jnp.where(normal, _reciprocal(jnp.where(normal, absmax, jnp.float32(1)), interpret), jnp.float32(0))


def _row_mask(r0: jax.Array, rows: int, n_blocks: int) -> jax.Array | None:
    if n_blocks % rows == 0:
        return None
    return r0 + jnp.arange(rows, dtype=jnp.int32) < n_blocks


def _load(ref: Any, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return ref[...]
    return pltriton.load(ref, mask=mask if ref.shape == mask.shape else mask[:, None], other=0)


def _store(ref: Any, value: jax.Array, mask: jax.Array | None) -> None:
    if mask is None:
        ref[...] = value
    else:
        pltriton.store(ref, value, mask=mask if value.ndim == 1 else mask[:, None])


# --------------------------------------------------------------------------------------------
# Quantize


def _tiles(body, rows: int, tiles: int, n_blocks: int) -> None:
    """Runs ``body(r0, mask)`` on this program's ``tiles`` consecutive tiles of ``rows`` blocks
    (a loop Triton software-pipelines when ``num_stages > 1``); ``mask`` is None when no tile
    of any program can run past ``n_blocks``."""
    first = pl.program_id(0) * (rows * tiles)
    ragged = n_blocks % (rows * tiles) != 0
    if tiles == 1:
        body(first, _row_mask(first, rows, n_blocks))
        return

    def step(t, carry):
        r0 = first + t * rows
        body(r0, (r0 + jnp.arange(rows, dtype=jnp.int32) < n_blocks) if ragged else None)
        return carry

    jax.lax.fori_loop(0, tiles, step, jnp.int32(0))


def _quantize_kernel(w_ref, *refs, tables: CodeTables, dtype: str, rows: int, n_blocks: int,
                     tiles: int, encoder: str, interpret: bool):
    packed_ref, absmax_ref = refs[-2:]   # any refs before them are aliased output buffers
    thr_ref = refs[0] if encoder == "f16x2" else None
    _tiles(functools.partial(_quantize_tile, w_ref, thr_ref, packed_ref, absmax_ref, tables, dtype, rows,
                             interpret), rows, tiles, n_blocks)


def _quantize_tile(w_ref, thr_ref, packed_ref, absmax_ref, tables: CodeTables, dtype: str, rows: int,
                   interpret: bool, r0: jax.Array, mask: jax.Array | None) -> None:
    half = w_ref.shape[1]
    w = _load(w_ref.at[pl.ds(r0, rows), pl.ds(0, half)], mask)                  # uint32 [rows, half]
    # max |x| per block as an integer max of the sign-cleared 16-bit patterns of both halves
    mag = jnp.maximum(w & 0x7FFF, (w >> 16) & 0x7FFF).astype(jnp.int32)
    absmax = _block_absmax(jnp.max(mag, axis=1), dtype)
    if thr_ref is not None:
        row, scale = _f16x2_rows(absmax)
        words = [k[:, None] for k in _f16x2_words(thr_ref, row)]
        byte = _encode_f16x2(w, scale[:, None], words, _f16x2_table(tables)[1], interpret)
    else:
        inv = _inverse_scale(absmax, interpret)
        even, odd = _halves_to_f32(w, dtype)
        code_even = _encode_count(even * inv[:, None], tables, interpret)
        code_odd = _encode_count(odd * inv[:, None], tables, interpret)
        # the byte 16 * even + odd, read off the mantissa of 2**23 + byte (exact small integers)
        byte = jax.lax.bitcast_convert_type(code_even * np.float32(16) + code_odd + np.float32(2.0 ** 23),
                                            jnp.int32)
    packed = byte.astype(jnp.uint8)
    _store(packed_ref.at[pl.ds(r0, rows), pl.ds(0, half)], packed, mask)
    _store(absmax_ref.at[pl.ds(r0, rows)], absmax, mask)


@functools.partial(jax.jit, static_argnames=("tables", "block_size", "rows", "num_warps",
                                             "num_stages", "tiles", "encoder", "interpret"))
def _quantize_call(x: jax.Array, init: tuple[jax.Array, jax.Array] | None = None, *,
                   tables: CodeTables, block_size: int, rows: int, num_warps: int,
                   num_stages: int, tiles: int = 1, encoder: str = "count", interpret: bool):
    """The launch. ``init`` (tests): buffers (uint8 [nb, bs/2], float32 [nb]) the outputs start
    from (aliased), so that an element the kernel never writes keeps a known pattern."""
    n = x.size
    nb, half = n // block_size, block_size // 2
    words = jax.lax.bitcast_convert_type(x.reshape(-1, 2), jnp.uint32).reshape(nb, half)
    kernel = functools.partial(_quantize_kernel, tables=tables, dtype=jnp.dtype(x.dtype).name,
                               rows=rows, n_blocks=nb, tiles=tiles, encoder=encoder, interpret=interpret)
    out_shape = (jax.ShapeDtypeStruct((nb, half), jnp.uint8), jax.ShapeDtypeStruct((nb,), jnp.float32))
    args, aliases = [words], {}
    if encoder == "f16x2":
        args.append(jnp.asarray(_f16x2_table(tables)[0]))
    if init is not None:
        aliases = {len(args): 0, len(args) + 1: 1}
        args += [init[0].reshape(nb, half), init[1].reshape(nb)]
    packed, absmax = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(nb, rows * tiles),),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_common.compiler_params(num_warps, num_stages),
        name="quantize_blocks",
    )(*args)
    return packed.reshape(-1), absmax


def quantize_blocks_pallas(x: jax.Array, fmt: str | Sequence[float] | np.ndarray | CodeTables,
                           block_size: int, *, rows_per_program: int | None = None,
                           num_warps: int | None = None, num_stages: int = 1,
                           tiles_per_program: int = 1, encoder: str | None = None,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Blockwise 4-bit quantization of a bf16/f16 array in one pass.

    Args:
      x: bfloat16 or float16 array of any shape, ``x.size`` a multiple of ``block_size``;
        blocks are consecutive elements in row-major order.
      fmt: the format: a name in `pallas_kernels._common.CODE_TABLES` ("nf4"), 16 code values,
        or `CodeTables`.
      block_size: elements a block, a power of two in 32..4096.
      rows_per_program: blocks a program (power of two; default `default_rows`).
      num_warps, num_stages: Triton launch parameters (default warps: 4 for tiles of up to 4K
        elements, else 8).
      tiles_per_program: consecutive tiles a program walks in a loop (with ``num_stages > 1``
        Triton prefetches the next tile's input while the current one is encoded).
      encoder: how codes are found, in `ENCODERS` (the same bytes either way): "f16x2" (both
        elements of a word in packed float16 arithmetic against per-block thresholds,
        `_encode_f16x2`; bf16 input with a format `_f16x2_table` serves: NF4, Int4) or
        "count" (one element at a time, `_encode_count`). Default: "f16x2" where it applies.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      (packed uint8 [x.size // 2], first element of each pair in the high nibble;
       absmax float32 [x.size // block_size], NaN for a block holding Inf/NaN).
    """
    tables = code_tables(fmt)
    if not supported(x.dtype, x.size, block_size):
        raise ValueError(f"quantize_blocks_pallas needs a bf16/f16 array whose size is a positive "
                         f"multiple of block_size in {BLOCK_SIZES} (below {MAX_ELEMENTS}); got "
                         f"{x.dtype} of size {x.size} with block_size={block_size}")
    nb = x.size // block_size
    rows = default_rows(block_size, nb) if rows_per_program is None else rows_per_program
    warps = _default_warps(rows, block_size) if num_warps is None else num_warps
    _check_launch(rows, warps, num_stages, tiles_per_program)
    return _quantize_call(x, tables=tables, block_size=int(block_size), rows=int(rows),
                          num_warps=int(warps), num_stages=int(num_stages),
                          tiles=int(tiles_per_program), encoder=resolve_encoder(encoder, tables, x.dtype),
                          interpret=bool(interpret))


def encoders_for(fmt: str | Sequence[float] | np.ndarray | CodeTables, dtype: Any) -> list[str]:
    """The encoders of `ENCODERS` that serve this format and input dtype, the default first:
    "f16x2" where it applies (bf16 input, a format `_f16x2_table` serves), then "count"."""
    fits = jnp.dtype(dtype) == jnp.bfloat16 and _f16x2_table(code_tables(fmt)) is not None
    return ["f16x2", "count"] if fits else ["count"]


def resolve_encoder(encoder: str | None, fmt: str | Sequence[float] | np.ndarray | CodeTables,
                    dtype: Any) -> str:
    """The encoder `quantize_blocks_pallas` runs: ``encoder`` itself (ValueError for a name not
    in `ENCODERS`, or one that does not serve this input), or for None the first of
    `encoders_for`."""
    serving = encoders_for(fmt, dtype)
    if encoder is None:
        return serving[0]
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS} or None, got {encoder!r}")
    if encoder not in serving:
        raise ValueError("encoder 'f16x2' needs bf16 input and a sorted code table whose midpoints all "
                         f"lie at least 2**-6 from 0 (NF4, Int4); got {jnp.dtype(dtype).name} input")
    return encoder


# --------------------------------------------------------------------------------------------
# Dequantize


def _dequantize_kernel(p_ref, a_ref, *refs, values: tuple[float, ...], dtype: str, rows: int,
                       n_blocks: int, lut: str, tiles: int, dq_block_size: int | None, interpret: bool):
    o_ref = refs[-1]   # a ref before it is an aliased output buffer
    dq_refs = tuple(refs[:3]) if dq_block_size else None   # second-level scales, offset, code table
    _tiles(functools.partial(_dequantize_tile, p_ref, a_ref, dq_refs, dq_block_size, o_ref, values, dtype, rows,
                             lut, interpret), rows, tiles, n_blocks)


def _block_scales(a_ref, dq_refs, dq_block_size: int | None, r0: jax.Array, rows: int,
                  mask: jax.Array | None) -> jax.Array:
    """float32 [rows] scales of blocks ``r0 ..``: loaded, or with double quantization decoded
    from their 8-bit codes in the kernel (`pallas_kernels._common.finish_block_scales`)."""
    raw = _load(a_ref.at[pl.ds(r0, rows)], mask)
    if dq_refs is None:
        return raw
    s_ref, off_ref, tab_ref = dq_refs
    refs = _common.ScaleRefs(a_ref, scale=s_ref, offset=off_ref, table=tab_ref)
    dq = _common.load_dq_scales(refs, r0 + jnp.arange(rows, dtype=jnp.int32), dq_block_size, mask)
    return _common.finish_block_scales(refs, (raw, dq))


def _dequantize_tile(p_ref, a_ref, dq_refs, dq_block_size: int | None, o_ref, values: tuple[float, ...], dtype: str,
                     rows: int, lut: str, interpret: bool, r0: jax.Array, mask: jax.Array | None) -> None:
    half = p_ref.shape[1]
    packed = _load(p_ref.at[pl.ds(r0, rows), pl.ds(0, half)], mask)                # [rows, half]
    scale = _block_scales(a_ref, dq_refs, dq_block_size, r0, rows, mask)[:, None]   # [rows, 1]
    out_dtype = jnp.dtype(dtype)
    if lut == "prmt":
        words = byte_lut.decode_words(packed, values, out_dtype, scale, interpret=interpret)
        _store(o_ref.at[pl.ds(r0, rows), pl.ds(0, half)], jax.lax.bitcast_convert_type(words, jnp.uint32),
               mask)
        return
    b = packed.astype(jnp.int32)

    def bits(codes):
        v = (_common.select_lut(codes, values) * scale).astype(out_dtype)
        return jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)

    words = bits(b >> 4) | (bits(b & 0xF) << 16)
    _store(o_ref.at[pl.ds(r0, rows), pl.ds(0, half)], words, mask)


@functools.partial(jax.jit, static_argnames=("values", "dtype", "rows", "num_warps", "num_stages",
                                             "lut", "tiles", "dq_block_size", "interpret"))
def _dequantize_call(packed: jax.Array, absmax: jax.Array, init: jax.Array | None = None, *,
                     values: tuple[float, ...], dtype: str, rows: int, num_warps: int,
                     num_stages: int, lut: str = DEQUANT_LUT, tiles: int = 1,
                     dq: tuple[jax.Array, jax.Array, jax.Array] | None = None, dq_block_size: int | None = None,
                     interpret: bool):
    """The launch. ``init`` (tests): a uint32 [nb, bs/2] buffer the output starts from (aliased).
    ``dq``: (second-level scales, offset, absmax code table) when ``absmax`` holds 8-bit codes, a
    second-level scale every ``dq_block_size`` of them."""
    nb = absmax.size
    half = packed.size // nb
    kernel = functools.partial(_dequantize_kernel, values=values, dtype=dtype, rows=rows, n_blocks=nb,
                               lut=lut, tiles=tiles, dq_block_size=dq_block_size if dq else None,
                               interpret=interpret)
    args, aliases = [packed.reshape(nb, half), absmax.reshape(nb) if dq else absmax.reshape(nb).astype(jnp.float32)], {}
    if dq:
        args += [dq[0].reshape(-1).astype(jnp.float32), dq[1].reshape(1).astype(jnp.float32),
                 dq[2].reshape(256).astype(jnp.float32)]
    if init is not None:
        aliases = {len(args): 0}
        args.append(init.reshape(nb, half))
    words = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nb, half), jnp.uint32),
        grid=(pl.cdiv(nb, rows * tiles),),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_common.compiler_params(num_warps, num_stages),
        name="dequantize_blocks",
    )(*args)
    return jax.lax.bitcast_convert_type(words, jnp.dtype(dtype)).reshape(-1)


def dequantize_blocks_pallas(packed: jax.Array, absmax: jax.Array,
                             fmt: str | Sequence[float] | np.ndarray | CodeTables,
                             out_dtype: Any = jnp.bfloat16, *, rows_per_program: int | None = None,
                             num_warps: int | None = None, num_stages: int = 1,
                             tiles_per_program: int = 1, lut: str = DEQUANT_LUT,
                             absmax_scale: jax.Array | None = None, absmax_offset: jax.Array | None = None,
                             dq_block_size: int | None = None, absmax_table: Any = None,
                             interpret: bool = False) -> jax.Array:
    """Decodes packed 4-bit codes with their block scales to bf16/f16 in one pass.

    Args:
      packed: uint8, ``n_blocks * block_size / 2`` bytes (any shape, e.g. ``[n_blocks,
        block_size / 2]`` or flat), first element of each pair in the high nibble.
      absmax: float32 [n_blocks] first-level scales; or, with ``absmax_scale`` given, their
        uint8 [n_blocks] codes (double quantization), decoded in the kernel:
        ``absmax_table[code] * absmax_scale[i // dq_block_size] + absmax_offset``, the multiply
        and the add rounded apart (the bits `pallas_kernels._common.decode_scales` gives).
      absmax_scale: float32 [>= ceil(n_blocks / dq_block_size)] second-level scales, or None.
      absmax_offset: float32 scalar (any shape of size 1); with ``absmax_scale`` only.
      dq_block_size: first-level scales a second-level scale; with ``absmax_scale`` only.
      absmax_table: the 256 float values of the 8-bit codes (default: the signed dynamic map).
      fmt: the format (as in `quantize_blocks_pallas`).
      out_dtype: bfloat16 or float16.
      rows_per_program, num_warps, num_stages, tiles_per_program, interpret: as in
        `quantize_blocks_pallas`.
      lut: how a code becomes its float32 table value: "prmt" (byte permutes on the packed
        bytes, `pallas_kernels.byte_lut`; ~8 instructions a value with the multiply and
        rounding) or "tree" (a select tree, ~25); both exact, so the bits are the same.
    Returns:
      ``out_dtype [n_blocks * block_size]``: ``table[code] * absmax`` in float32, rounded once.
    """
    if lut not in DEQUANT_LUTS:
        raise ValueError(f"lut must be one of {DEQUANT_LUTS}, got {lut!r}")
    tables = code_tables(fmt)
    out_dtype = jnp.dtype(out_dtype)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    dq = None
    if absmax_scale is not None:
        if absmax.dtype != jnp.uint8:
            raise TypeError(f"with absmax_scale (double quantization) absmax must hold uint8 codes, got {absmax.dtype}")
        table = _common.DYNAMIC_MAP if absmax_table is None else np.asarray(absmax_table, np.float32).reshape(-1)
        if absmax_offset is None or np.size(absmax_offset) != 1:
            raise ValueError("double quantization needs absmax_offset, one float32 value, got "
                             f"{None if absmax_offset is None else np.shape(absmax_offset)}")
        if not isinstance(dq_block_size, (int, np.integer)) or dq_block_size < 1:
            raise ValueError(f"double quantization needs a positive int dq_block_size, got {dq_block_size!r}")
        if table.size != 256:
            raise ValueError(f"absmax_table must hold 256 values, got {table.size}")
        if absmax_scale.size < -(-absmax.size // dq_block_size):
            raise ValueError(f"{absmax.size} blocks with dq_block_size={dq_block_size} need "
                             f"{-(-absmax.size // dq_block_size)} absmax_scale values, got {absmax_scale.size}")
        dq = (absmax_scale, jnp.asarray(absmax_offset), jnp.asarray(table))
    elif absmax_offset is not None or dq_block_size is not None or absmax_table is not None:
        raise ValueError("absmax_offset, dq_block_size and absmax_table go with absmax_scale (double quantization)")
    elif absmax.dtype != jnp.float32:
        raise TypeError(f"absmax must be float32 (or uint8 codes with absmax_scale), got {absmax.dtype}")
    nb = absmax.size
    block_size = 2 * packed.size // nb if nb else 0
    if (nb == 0 or block_size * nb != 2 * packed.size
            or not supported(out_dtype, nb * block_size, block_size)):
        raise ValueError(f"dequantize_blocks_pallas needs bf16/f16 output and packed.size = "
                         f"n_blocks * block_size / 2 with block_size in {BLOCK_SIZES}; got "
                         f"{out_dtype}, {packed.size} bytes for {nb} blocks")
    rows = default_rows(block_size, nb) if rows_per_program is None else rows_per_program
    warps = _default_warps(rows, block_size) if num_warps is None else num_warps
    _check_launch(rows, warps, num_stages, tiles_per_program)
    return _dequantize_call(packed, absmax, values=tables.values, dtype=out_dtype.name, rows=int(rows),
                            num_warps=int(warps), num_stages=int(num_stages), lut=lut,
                            tiles=int(tiles_per_program), dq=dq,
                            dq_block_size=int(dq_block_size) if dq else None, interpret=bool(interpret))


# --------------------------------------------------------------------------------------------
# Double quantization: the second level, float32 block scales -> 8-bit codes


def _dq_midpoints() -> np.ndarray:
    """float32 [255] midpoints of the signed dynamic map (derived as ``qlora_jax.formats.
    dynamic_map_midpoints`` does; the tests check they are equal), checked to have the symmetry
    `_encode_dynamic` relies on: ``mid[127 + j] == -mid[126 - j]`` (j < 127), all of
    ``mid[127:]`` positive and strictly increasing."""
    m = _common.DYNAMIC_MAP
    mid = ((m[:-1] + m[1:]) / np.float32(2)).astype(np.float32)
    pos = mid[127:]
    if not (mid.size == 255 and np.array_equal(mid[127:254].view(np.uint32), (-mid[126::-1]).view(np.uint32))
            and pos[0] > 0 and np.all(np.diff(pos) > 0)):
        raise AssertionError("the dynamic map's midpoints lost the symmetry _encode_dynamic needs")
    return mid


DQ_MIDPOINTS = _dq_midpoints()
# the 128 positive midpoints as int32 bit patterns (ascending, as the values are)
_DQ_POS_BITS = tuple(int(b) for b in DQ_MIDPOINTS[127:].view(np.int32))
DQ_POSITIVE_BITS = np.asarray(_DQ_POS_BITS, np.int32)
# How the second-level kernel searches the midpoints (`_encode_dynamic`).
DQ_SEARCHES = ("gather", "tree")
_DQ_TILE_ELEMENTS = 512
# Element offsets are int32 (``block * dq_block_size + column``, masked tail included).
MAX_DQ_SCALES = 2**30


def _encode_dynamic(v: jax.Array, thresholds: Any = None) -> jax.Array:
    """int32 8-bit code of float32 values: the rank ``#{m : v > m}`` among the 255 midpoints of
    the dynamic map (a value on a midpoint goes lower), what ``jnp.searchsorted(midpoints, v,
    side="left")`` gives, for every finite v (no clip needed: a value a little past ±1 gets
    the same rank as ±1). NaN: unspecified.

    The midpoints are symmetric about 0 (checked at import), so one search over the 128
    positive ones ``P`` serves both signs, on integer keys (non-negative float32 bit patterns
    order like the values; no float compare, so no denormal flushing can change a result):
    with ``u = |v|``, ``v >= 0`` has rank ``127 + #{j : u > P[j]}`` and ``v < 0`` (or -0) has
    ``#{i < 127 : v > -P[126 - i]} = 127 - #{j < 127 : u >= P[j]}``; ``u >= P[j]`` is ``key >
    P[j]`` for ``key = bits(u) + 1``. The count over ``P[0..126]`` is a 7-level branch-free
    binary search, plus one compare with ``P[127]`` for the positive side.

    ``thresholds``: where the search reads ``P``. None: select trees on constants (120
    selects and 7 compares a value; no memory access). A ref (or array) of the 128 int32
    patterns (`DQ_POSITIVE_BITS`): the first three levels from constants (1 + 2 + 4 leaves;
    a select tree that small costs about what a gather does, without its latency), the other
    four as gathers from it (one small table, cached on chip): about 25 operations a value."""
    vb = jax.lax.bitcast_convert_type(v, jnp.int32)
    neg = vb < 0
    key = (vb & np.int32(0x7FFFFFFF)) + jnp.where(neg, np.int32(1), np.int32(0))
    thr = _DQ_POS_BITS
    levels = 7 if thresholds is None else 3
    bits: list[jax.Array] = []
    for k in range(6, 6 - levels, -1):
        leaves = [np.int32(thr[(r << (k + 1)) + (1 << k) - 1]) for r in range(1 << len(bits))]
        bits.append(key > _select_tree(bits, leaves))
    count = jnp.zeros(key.shape, jnp.int32)
    for w, b in zip((64, 32, 16, 8, 4, 2, 1), bits):
        count = count | jnp.where(b, np.int32(w), np.int32(0))
    for w in (32, 16, 8, 4, 2, 1)[levels - 1:]:
        t = thresholds[count + np.int32(w - 1)]
        count = jnp.where(key > t, count + np.int32(w), count)
    above = jnp.where(key > np.int32(thr[127]), np.int32(1), np.int32(0))
    return jnp.where(neg, np.int32(127) - count, np.int32(127) + count + above)


def _dq_block_scales(centred: jax.Array, interpret: bool = True) -> tuple[jax.Array, jax.Array]:
    """(scale float32 [r], inverse float32 [r]) of centred blocks [r, dq]: ``max |c|``, and its
    exact reciprocal (`_reciprocal`: ``rcp.rn`` in a compiled kernel, the integer division
    otherwise; the same bits), 0 for a scale below 2**-126 (zero or subnormal), as ``_scale`` of
    qlora_jax.quantize. The max is an integer max of the sign-cleared bit patterns (monotone in
    |c| for non-NaN), so a subnormal or NaN element is kept as it is, whatever a float max or
    abs would flush or drop."""
    mag = jax.lax.bitcast_convert_type(centred, jnp.int32) & np.int32(0x7FFFFFFF)
    scale = jax.lax.bitcast_convert_type(jnp.max(mag, axis=1), jnp.float32)
    normal = scale >= np.float32(2.0 ** -126)
    inv = jnp.where(normal, _reciprocal(jnp.where(normal, scale, np.float32(1)), interpret), np.float32(0))
    return scale, inv


def _double_quantize_kernel(a_ref, off_ref, thr_ref, *refs, block: int, rows: int, n: int, search: str,
                            interpret: bool):
    codes_ref, scale_ref = refs[-2:]   # any refs before them are aliased output buffers
    r0 = pl.program_id(0) * rows       # first second-level block of this program
    row = r0 + jnp.arange(rows, dtype=jnp.int32)
    idx = row[:, None] * block + jnp.arange(block, dtype=jnp.int32)[None, :]   # [rows, block]
    mask = (idx < n) if n % (rows * block) else None
    a = _load(a_ref.at[idx], mask)
    centred = a - off_ref[0]
    if mask is not None:
        centred = jnp.where(mask, centred, np.float32(0))   # the XLA path pads centred with 0
    scale, inv = _dq_block_scales(centred, interpret)
    codes = _encode_dynamic(centred * inv[:, None], thr_ref if search == "gather" else None)
    codes = codes.astype(jnp.uint8)
    if mask is None:
        codes_ref[idx] = codes
    else:
        pltriton.store(codes_ref.at[idx], codes, mask=mask)
    _store(scale_ref.at[pl.ds(r0, rows)], scale, _row_mask(r0, rows, -(-n // block)))


@functools.partial(jax.jit, static_argnames=("block", "rows", "num_warps", "num_stages", "interpret",
                                             "search"))
def _double_quantize_call(absmax: jax.Array, offset: jax.Array,
                          init: tuple[jax.Array, jax.Array] | None = None, *, block: int, rows: int,
                          num_warps: int, num_stages: int, interpret: bool, search: str = "gather"):
    """The launch. ``init`` (tests): buffers (uint8 [n], float32 [n_scales]) the outputs start
    from (aliased), so that an element the kernel never writes keeps a known pattern."""
    n = absmax.size
    n_scales = -(-n // block)
    kernel = functools.partial(_double_quantize_kernel, block=block, rows=rows, n=n, search=search,
                               interpret=interpret)
    out_shape = (jax.ShapeDtypeStruct((n,), jnp.uint8), jax.ShapeDtypeStruct((n_scales,), jnp.float32))
    args = [absmax.reshape(n).astype(jnp.float32), jnp.asarray(offset, jnp.float32).reshape(1),
            jnp.asarray(DQ_POSITIVE_BITS)]
    aliases = {}
    if init is not None:
        args += [init[0].reshape(n), init[1].reshape(n_scales)]
        aliases = {3: 0, 4: 1}
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n_scales, rows),),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_common.compiler_params(num_warps, num_stages),
        name="double_quantize",
    )(*args)


def dq_supported(n: int, dq_block_size: int) -> bool:
    """Whether `double_quantize_pallas` serves ``n`` first-level scales in second-level blocks
    of ``dq_block_size`` (in `DQ_BLOCK_SIZES`; ``0 < n < MAX_DQ_SCALES``; any n, ragged too)."""
    return dq_block_size in DQ_BLOCK_SIZES and 0 < n < MAX_DQ_SCALES


def default_dq_blocks(dq_block_size: int, n_scales: int | None = None) -> int:
    """Second-level blocks a program: a tile of ~512 scales (the best of the H200 sweep; a
    1M-scale vector makes ~2K programs), at most the next power of two of ``n_scales``."""
    rows = max(1, _DQ_TILE_ELEMENTS // dq_block_size)
    if n_scales is not None:
        rows = min(rows, 1 << max(0, (n_scales - 1).bit_length()))
    return rows


def double_quantize_pallas(absmax: jax.Array, offset: jax.Array | float, dq_block_size: int = 256, *,
                           blocks_per_program: int | None = None, num_warps: int | None = None,
                           num_stages: int = 1, search: str = "gather",
                           interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The second level of double quantization in one pass, given the offset: centre, per-block
    absmax, exact reciprocal scale, 8-bit encode (what ``qlora_jax.quantize.double_quantize``
    computes with that ``offset``, bit for bit).

    Per second-level block of ``dq_block_size`` scales: ``c = absmax - offset`` (float32),
    ``scale = max |c|`` (a ragged last block counts its missing elements as 0, as the XLA path's
    zero padding does), ``inv`` = the correctly rounded ``1 / scale`` (`_reciprocal`; 0
    for a scale below 2**-126, so such a block encodes every value as code 127, the zero of the
    map), and ``code = #{m : c * inv > m}`` over the 255 midpoints of the signed dynamic map
    (ties go to the lower code; `_encode_dynamic`). A program owns ``blocks_per_program`` whole
    blocks and reads each scale once: it loads a ``[blocks, dq_block_size]`` tile through int32
    element offsets (the masked tail needs no padding copy), reduces along the rows, and stores
    the codes and one scale a block. No float add follows a multiply, so FMA contraction cannot
    change a result.

    Divergences, all outside what first-level scales can be: codes of NaN/Inf scales are
    unspecified (a block holding NaN gets a NaN scale); a block scale above 2**126 gets
    reciprocal 0 (codes 127) where the XLA path's flushed reciprocal is an artefact; a subnormal
    centred value (absmax and offset both below ~2**-102) is flushed or not as the platform's
    float subtract does, as in XLA.

    Measured on an H200 (1M scales, dq 256, the kernel alone from L2, 512 scales a program, 8
    warps; second session of 2026-12-01). The "gather" search takes 3-5 µs and "tree" 7-11 µs in
    four runs. XLA's centre + block scales + encode takes 53-57 µs. Inside a whole NF4+DQ quantize
    the gather kernel costs about 7 µs under ncu.

    Args:
      absmax: float32 first-level scales (any shape; flattened), ``0 < size < MAX_DQ_SCALES``.
      offset: float32 scalar subtracted first (the stored ``absmax_offset``).
      dq_block_size: scales a second-level block, in `DQ_BLOCK_SIZES`.
      blocks_per_program: second-level blocks a program (power of two; default
        `default_dq_blocks`).
      num_warps, num_stages: Triton launch parameters.
      search: how the encode searches the midpoints, in `DQ_SEARCHES` (`_encode_dynamic`):
        "gather" (default; four gathers from a 512-byte table) or "tree" (select trees on
        constants); the same codes.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      (codes uint8 [absmax.size], scale float32 [ceil(absmax.size / dq_block_size)]).
    """
    absmax = jnp.asarray(absmax)
    if absmax.dtype != jnp.float32:
        raise TypeError(f"double_quantize_pallas needs float32 scales, got {absmax.dtype}")
    if jnp.size(offset) != 1:
        raise ValueError(f"offset must be a scalar, got shape {jnp.shape(offset)}")
    n = absmax.size
    if not dq_supported(n, dq_block_size):
        raise ValueError(f"double_quantize_pallas needs dq_block_size in {DQ_BLOCK_SIZES} and "
                         f"0 < size < {MAX_DQ_SCALES}; got dq_block_size={dq_block_size!r}, size {n}")
    n_scales = -(-n // dq_block_size)
    rows = default_dq_blocks(dq_block_size, n_scales) if blocks_per_program is None else blocks_per_program
    warps = 8 if num_warps is None else num_warps
    _check_launch(rows, warps, num_stages)
    if search not in DQ_SEARCHES:
        raise ValueError(f"search must be one of {DQ_SEARCHES}, got {search!r}")
    return _double_quantize_call(absmax, offset, block=int(dq_block_size), rows=int(rows),
                                 num_warps=int(warps), num_stages=int(num_stages),
                                 interpret=bool(interpret), search=search)


# --------------------------------------------------------------------------------------------
# Plain-jnp references (XLA), the definitions the kernels meet


def quantize_blocks_reference(x: jax.Array, fmt: str | Sequence[float] | np.ndarray | CodeTables,
                              block_size: int) -> tuple[jax.Array, jax.Array]:
    """`quantize_blocks_pallas` in plain jnp: float32 upcast, float max, exact reciprocal."""
    tables = code_tables(fmt)
    blocks = x.astype(jnp.float32).reshape(-1, block_size)
    finite = jnp.all(jnp.isfinite(blocks), axis=1)
    absmax = jnp.where(finite, jnp.max(jnp.abs(blocks), axis=1), jnp.float32(jnp.nan))
    normal = absmax >= np.float32(2.0 ** -126)
    inv = jnp.where(normal, _exact_reciprocal(jnp.where(normal, absmax, jnp.float32(1))), jnp.float32(0))
    codes = _encode(blocks * inv[:, None], tables).reshape(-1, 2)
    return ((codes[:, 0] << 4) | codes[:, 1]).astype(jnp.uint8), absmax


def dequantize_blocks_reference(packed: jax.Array, absmax: jax.Array,
                                fmt: str | Sequence[float] | np.ndarray | CodeTables,
                                out_dtype: Any = jnp.bfloat16) -> jax.Array:
    """`dequantize_blocks_pallas` in plain jnp (a gather on the code table)."""
    tables = code_tables(fmt)
    b = packed.reshape(-1)
    codes = jnp.stack([b >> 4, b & 0xF], axis=-1).reshape(absmax.size, -1).astype(jnp.int32)
    vals = jnp.asarray(np.asarray(tables.values, np.float32))[codes] * absmax.reshape(-1, 1)
    return vals.astype(out_dtype).reshape(-1)


def double_quantize_reference(absmax: jax.Array, offset: jax.Array | float,
                              dq_block_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """`double_quantize_pallas` in plain jnp: zero-padded centred blocks, the same block scales
    and encoder."""
    a = jnp.asarray(absmax, jnp.float32).reshape(-1)
    n = a.size
    n_scales = -(-n // dq_block_size)
    centred = jnp.pad(a - jnp.asarray(offset, jnp.float32).reshape(()), (0, n_scales * dq_block_size - n))
    centred = centred.reshape(n_scales, dq_block_size)
    scale, inv = _dq_block_scales(centred)
    codes = _encode_dynamic(centred * inv[:, None]).reshape(-1)[:n]
    return codes.astype(jnp.uint8), scale
