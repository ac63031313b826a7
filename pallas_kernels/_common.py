"""Pieces shared by the NF4 kernels: argument checks, the in-kernel dequantization of a weight
tile, the plain-JAX dequantization reference, and the 8-bit table of double quantization.

The weight layout (qlora_jax's, the bytes bitsandbytes writes for a ``Linear.weight``):
``W`` is ``[n, k]`` (out, in), row-major, flattened, packed two 4-bit codes a byte with the first
element in the HIGH nibble; blocks of ``block_size`` consecutive elements along ``k`` share one
scale, so with ``k % block_size == 0`` a block never crosses a row and the scales reshape to
``[n, k // block_size]``. With double quantization the scales are uint8 codes and
``absmax[i] = absmax_table[code[i]] * absmax_scale[i // dq_block_size] + absmax_offset``
(``i`` the flat block index).

Everything here is usable inside a Pallas kernel body (Triton lowering) and in interpret mode:
no ``jnp.take``/gather on values (the Triton lowering has none); lookups are a select tree on
constants, or loads from a small table *ref* (a pointer gather, which Triton does lower).
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

from pallas_kernels import byte_lut

__all__ = [
    "DYNAMIC_MAP",
    "QuantSpec",
    "dequantize_reference",
    "compiler_params",
]

# The signed 8-bit dynamic map of bitsandbytes (``create_dynamic_map(signed=True)``), as float32
# bit patterns: the default table of the 8-bit absmax codes. The same data as
# ``qlora_jax.formats.dynamic_map()`` (tests/test_pallas_kernels.py checks they are equal); kept
# here because pallas_kernels must not import qlora_jax. 256 entries, sorted, [127] == 0.
_DYNAMIC_MAP_BITS = (
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a,
    0xbf650000, 0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666,
    0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334,
    0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000,
    0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc,
    0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333,
    0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc,
    0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8,
    0xbda75c2a, 0xbda1999a, 0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd,
    0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3,
    0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7,
    0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418,
    0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d,
    0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705,
    0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034,
    0x388aefb3, 0x38ba1f4b, 0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1,
    0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d, 0x3af1a9fc, 0x3b1db22d, 0x3b428f5c,
    0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b, 0x3be24dd3,
    0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3,
    0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f,
    0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b,
    0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333,
    0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000,
    0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000, 0x3eb13333, 0x3eb86666,
    0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a, 0x3eeacccc,
    0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd,
    0x3f2b6666, 0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000,
    0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333,
    0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000
)
DYNAMIC_MAP: np.ndarray = np.array(_DYNAMIC_MAP_BITS, np.uint32).view(np.float32)
DYNAMIC_MAP.setflags(write=False)

# How a kernel turns a 4-bit code into its value:
# "tree": a select tree on the 16 constants (15 selects + 4 bit tests; integer/logic pipe);
# "poly": two degree-7 polynomials (codes 0-7 and 8-15) in Horner form, 14 FMAs on the float
#         pipe + 1 select, exact to ~1 float32 ulp (checked per table by `poly_coefficients`);
# "gather": a load from a 16-entry table ref (through L1).
# "prmt": byte permutes on the packed bytes (`pallas_kernels.byte_lut`): ~3 instructions a
#         weight for bf16/f16 tiles, scaled in packed 16-bit arithmetic (GPU: inline PTX;
#         interpret mode: the same operations in jnp);
# "prmt32": the same lookup of float16 table values, scaled in float32 and rounded once
#         (~2 more instructions a weight; within 2**-12 of the exact float32 product).
# On an H100 "tree" beat "poly" (7-20%) and "gather" (20-100%) in every kernel.
LUT_MODES = ("tree", "poly", "gather", "prmt", "prmt32")

# Code tables by format name, for callers that hand over a weight object naming its format
# (`pallas_kernels.dequant_matmul`). The NF4 values of bitsandbytes (``get_4bit_type("nf4")``),
# equal to ``qlora_jax.formats.get_format("nf4").values`` (checked in the tests).
CODE_TABLES: dict[str, tuple[float, ...]] = {
    "nf4": tuple(float(v) for v in np.array([
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)),
}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Static description of a packed 4-bit weight ``W[n, k]`` (hashable: a jit static argument).

    Attributes:
      n, k: logical shape of ``W`` (out, in).
      block_size: elements a first-level block, along ``k``; ``k % block_size == 0``.
      dq_block_size: first-level scales a second-level block, or None without double quant.
      code_table: the 16 float values of the 4-bit codes, indexed by nibble.
      absmax_table: the 256 float values of the 8-bit absmax codes (double quant only).
    """

    n: int
    k: int
    block_size: int
    dq_block_size: int | None
    code_table: tuple[float, ...]
    absmax_table: tuple[float, ...] | None = None

    @property
    def double_quant(self) -> bool:
        return self.dq_block_size is not None

    @property
    def blocks_per_row(self) -> int:
        return self.k // self.block_size

    @property
    def n_blocks(self) -> int:
        return self.n * self.blocks_per_row


def make_spec(n: int, k: int, block_size: int, dq_block_size: int | None,
              code_table: Sequence[float] | np.ndarray,
              absmax_table: Sequence[float] | np.ndarray | None = None) -> QuantSpec:
    """Validates the static description of a packed weight and returns it as a `QuantSpec`.

    Raises ValueError naming the bad argument.
    """
    for name, v in (("n", n), ("k", k), ("block_size", block_size)):
        if not isinstance(v, (int, np.integer)) or int(v) <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    n, k, block_size = int(n), int(k), int(block_size)
    if block_size < 32 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 32, got {block_size}")
    if k % block_size:
        raise ValueError(f"k={k} must be a multiple of block_size={block_size} (blocks must not "
                         "cross rows for the kernels)")
    if dq_block_size is not None:
        if not isinstance(dq_block_size, (int, np.integer)) or int(dq_block_size) <= 0:
            raise ValueError(f"dq_block_size must be a positive int or None, got {dq_block_size!r}")
        dq_block_size = int(dq_block_size)
    table = np.asarray(code_table, np.float32).reshape(-1)
    if table.shape != (16,) or not np.all(np.isfinite(table)):
        raise ValueError(f"code_table must hold 16 finite values, got shape {np.shape(code_table)}")
    atab = None
    if dq_block_size is not None:
        atab = DYNAMIC_MAP if absmax_table is None else np.asarray(absmax_table, np.float32).reshape(-1)
        if atab.shape != (256,) or not np.all(np.isfinite(atab)):
            raise ValueError("absmax_table must hold 256 finite values")
        atab = tuple(float(v) for v in atab)
    return QuantSpec(n, k, block_size, dq_block_size, tuple(float(v) for v in table), atab)


def check_operands(spec: QuantSpec, codes: jax.Array, absmax: jax.Array,
                   absmax_scale: jax.Array | None, absmax_offset: jax.Array | None) -> None:
    """Checks dtypes and sizes of the packed arrays against ``spec`` (ValueError/TypeError)."""
    if codes.dtype != jnp.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.size < spec.n * spec.k // 2:
        raise ValueError(f"codes holds {codes.size} bytes, need n*k/2 = {spec.n * spec.k // 2}")
    if absmax.size < spec.n_blocks:
        raise ValueError(f"absmax holds {absmax.size} scales, need n*k/block_size = {spec.n_blocks}")
    if spec.double_quant:
        if absmax.dtype != jnp.uint8:
            raise TypeError(f"double-quantized absmax must be uint8 codes, got {absmax.dtype}")
        if absmax_scale is None or absmax_offset is None:
            raise ValueError("double quant needs absmax_scale and absmax_offset")
        need = -(-spec.n_blocks // spec.dq_block_size)
        if absmax_scale.size < need:
            raise ValueError(f"absmax_scale holds {absmax_scale.size} values, need {need}")
        if absmax_offset.size != 1:
            raise ValueError(f"absmax_offset must be a scalar, got shape {absmax_offset.shape}")
    else:
        if absmax.dtype != jnp.float32:
            raise TypeError(f"absmax must be float32 (or uint8 codes with dq_block_size), got {absmax.dtype}")
        if absmax_scale is not None or absmax_offset is not None:
            raise ValueError("absmax_scale/absmax_offset given but dq_block_size is None")


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Explicit Triton compiler params: on jax 0.11 ``pallas_call`` defaults to Mosaic GPU and on
    0.12 to Triton; passing these always selects Triton."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------------
# Kernel-side helpers (traced inside a Pallas kernel body)


def select_lut(codes: jax.Array, table: Sequence[float]) -> jax.Array:
    """float32 ``table[codes]`` for int32 codes in [0, 16) as a 4-level tree of 15 two-way
    selects on constants (no gather: lowers on every Pallas GPU backend)."""
    bits = [(codes & (1 << s)) != 0 for s in range(4)]
    level = [jnp.where(bits[0], np.float32(table[2 * j + 1]), np.float32(table[2 * j]))
             for j in range(8)]
    for s in (1, 2, 3):
        level = [jnp.where(bits[s], level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
    return level[0]


_POLY_MAGIC = 0x4A800000    # float32 2**22: its mantissa LSB is 0.5, so (2t | magic) == 2**22 + t
_POLY_SHIFT = 4194307.5     # 2**22 + 3.5: subtracting it leaves t - 3.5, exactly


@functools.lru_cache(maxsize=64)
def poly_coefficients(table: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients (low half, high half) of the degree-7 polynomials in ``u = (code & 7) - 3.5``
    that interpolate ``table[0:8]`` and ``table[8:16]``.

    Raises ValueError if float32 Horner evaluation misses a table value by more than 1e-6 of the
    table's largest magnitude (then the "poly" mode must not be used for this table).
    """
    t = np.asarray(table, np.float64)
    u = np.arange(8, dtype=np.float64) - 3.5
    vander = np.vander(u, 8, increasing=True)
    halves = tuple(tuple(float(c) for c in np.linalg.solve(vander, t[h * 8:(h + 1) * 8])) for h in (0, 1))
    u32 = u.astype(np.float32)
    for h, coeffs in enumerate(halves):
        c32 = np.asarray(coeffs, np.float32)
        acc = np.full(8, c32[7], np.float32)
        for c in c32[6::-1]:
            acc = (acc * u32 + c).astype(np.float32)
        err = float(np.max(np.abs(acc - t[h * 8:(h + 1) * 8])))
        if err > 1e-6 * float(np.max(np.abs(t))):
            raise ValueError(f"code table is not representable by the 'poly' LUT (error {err:.2e})")
    return halves


def poly_lut(codes: jax.Array, coeffs: tuple[tuple[float, ...], tuple[float, ...]]) -> jax.Array:
    """float32 table value of int32 codes in [0, 16) from `poly_coefficients`: the code's low 3
    bits become ``u = t - 3.5`` by a float bit trick (no int->float convert), then Horner."""
    bits = ((codes << 1) & 14) | _POLY_MAGIC
    u = jax.lax.bitcast_convert_type(bits, jnp.float32) - np.float32(_POLY_SHIFT)

    def horner(c):
        acc = jnp.full(u.shape, np.float32(c[7]))
        for ci in c[6::-1]:
            acc = acc * u + np.float32(ci)
        return acc

    return jnp.where((codes & 8) != 0, horner(coeffs[1]), horner(coeffs[0]))


def code_values(codes: jax.Array, spec: "QuantSpec", lut: str, lut_ref: Any = None) -> jax.Array:
    """float32 values of int32 4-bit codes by the chosen lookup (`LUT_MODES`)."""
    if lut == "tree":
        return select_lut(codes, spec.code_table)
    if lut == "poly":
        return poly_lut(codes, poly_coefficients(spec.code_table))
    if lut == "gather":
        return pltriton.load(lut_ref.at[codes])
    raise ValueError(f"lut must be one of {LUT_MODES}, got {lut!r}")


def dequant_pair(spec: "QuantSpec", packed: jax.Array, scales: jax.Array, dtype: Any,
                 lut: str, lut_ref: Any = None, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The even and odd columns of a dequantized tile, ``dtype [r, h]`` each, from packed uint8
    ``[r, h]`` (high nibbles are the even elements) and float32 per-row scales ``[r]``: no
    interleave, for kernels that pair them with the even/odd columns of the other operand.

    With ``lut="prmt"`` a bf16/f16 tile is scaled in that type (one more rounding than the
    float32 product of the other modes: within 1.5 ulp of it); with "prmt32", and for a float32
    tile, the float16 table value (within 2**-12: every table here lies in [-1, 1], inside
    float16's normal range) is scaled in float32. ``interpret``: the kernel runs in interpret
    mode."""
    if lut == "prmt" and jnp.dtype(dtype) in byte_lut.DTYPES:
        return byte_lut.decode_pairs(packed, spec.code_table, dtype, scales[:, None], interpret=interpret)
    if lut in ("prmt", "prmt32"):
        even, odd = byte_lut.decode_pairs(packed, spec.code_table, jnp.float16, interpret=interpret)
        s = scales[:, None]
        return ((even.astype(jnp.float32) * s).astype(dtype), (odd.astype(jnp.float32) * s).astype(dtype))
    b = packed.astype(jnp.int32)
    s = scales[:, None]
    return ((code_values(b >> 4, spec, lut, lut_ref) * s).astype(dtype),
            (code_values(b & 0xF, spec, lut, lut_ref) * s).astype(dtype))


def unpack_codes(packed: jax.Array) -> jax.Array:
    """int32 codes [r, 2h] from packed uint8 [r, h], element 2j from the high nibble of byte j.

    The interleave is a stack on a new last axis + reshape, which Triton lowers to
    ``tt.join`` + ``tt.reshape`` (a register-local interleave)."""
    b = packed.astype(jnp.int32)
    r, h = b.shape
    return jnp.stack([b >> 4, b & 0xF], axis=-1).reshape(r, 2 * h)


def k_offsets(i: jax.Array, stride: int, extra: int, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Offsets of weight column ``c = i * stride + extra`` (``i`` a traced non-negative int, a
    loop step or program id; ``stride``, ``extra`` static and even): ``(c, c / 2, c // block_size)``,
    the element, the packed byte (or bf16-pair word) and the block column.

    Why not ``c // 2``: jnp's floor division of a traced int lowers to divide, remainder and
    select, after which Triton no longer sees that the byte offset is a multiple of 16, and every
    tile load falls apart into single-byte loads with no software pipelining. Products and sums
    of static constants keep the alignment visible; the block column (a per-row scale gather,
    never vectorised) uses a truncating divide, exact for ``c >= 0``."""
    if stride % 2 or extra % 2:
        raise ValueError(f"column stride {stride} and offset {extra} must be even (two codes a byte)")
    col = i * stride + extra
    byte = i * (stride // 2) + extra // 2
    if stride % block_size == 0 and extra % block_size == 0:
        block = i * (stride // block_size) + extra // block_size
    else:
        block = jax.lax.div(col, jnp.int32(block_size))
    return col, byte, block


def load_block_scales(spec: QuantSpec, refs: "ScaleRefs", row0: jax.Array, rows: int,
                      kb: jax.Array, valid: jax.Array | None, cols: int | None = None) -> jax.Array:
    """float32 [rows] first-level scales of weight rows ``row0 .. row0+rows`` at block column
    ``kb`` (a traced scalar), decoding double quant in the kernel; with ``cols``, float32
    [rows, cols] of the block columns ``kb .. kb+cols``.

    ``valid`` (bool [rows] or None) masks rows that do not exist; their scale reads as a finite
    placeholder (0, or with double quant the offset).
    """
    rows_at = pl.ds(row0, rows)
    at = (rows_at, kb) if cols is None else (rows_at, pl.ds(kb, cols))
    mask = valid if valid is None or cols is None else valid[:, None]
    raw = refs.absmax[at] if mask is None else pltriton.load(refs.absmax.at[at], mask=mask, other=0)
    if not spec.double_quant:
        return raw
    flat = (row0 + jnp.arange(rows, dtype=jnp.int32)) * spec.blocks_per_row
    flat = flat + kb if cols is None else flat[:, None] + (kb + jnp.arange(cols, dtype=jnp.int32))[None, :]
    return finish_block_scales(refs, (raw, load_dq_scales(refs, flat, spec.dq_block_size, mask)))


def gather_block_scale_parts(spec: QuantSpec, refs: "ScaleRefs", rows: jax.Array, kb: jax.Array,
                             mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The loads behind the first-level scales at index arrays ``rows`` (weight rows) and ``kb``
    (block columns), broadcast against each other (e.g. ``[r, 1, 1]`` and ``[1, v, 1]``):
    ``(absmax, None)`` (float32) or, with double quant, ``(uint8 codes, float32 second-level
    scales)``. `finish_block_scales` makes the scales of them. Split so that a loop can load a
    later step's parts ahead and leave only the lookup of the codes, which depends on a load,
    to the step that uses them. Where ``mask`` (broadcastable, or None) is False nothing is read
    and the scale comes out as a finite placeholder (0, or with double quant the offset)."""
    shape = jnp.broadcast_shapes(rows.shape, kb.shape)
    rows, kb = jnp.broadcast_to(rows, shape), jnp.broadcast_to(kb, shape)
    if mask is not None:
        mask = jnp.broadcast_to(mask, shape)
    raw = pltriton.load(refs.absmax.at[rows, kb], mask=mask, other=0 if mask is not None else None)
    if not spec.double_quant:
        return raw, None
    return raw, load_dq_scales(refs, rows * spec.blocks_per_row + kb, spec.dq_block_size, mask)


def finish_block_scales(refs: "ScaleRefs", parts: tuple[jax.Array, jax.Array | None]) -> jax.Array:
    """float32 first-level scales from `gather_block_scale_parts`' loads: the loaded scales, or
    with double quant (second-level scales in ``parts``) the 8-bit code -> table (a gather from a
    256-entry ref, cached) -> * second-level scale + offset, the multiply and the add rounded
    apart (the bits `decode_scales` gives)."""
    raw, dq_scale = parts
    if dq_scale is None:
        return raw
    return pltriton.load(refs.table.at[raw.astype(jnp.int32)]) * dq_scale + refs.offset[0]


def load_dq_scales(refs: "ScaleRefs", flat: jax.Array, dq_block_size: int, mask: jax.Array | None) -> jax.Array:
    """float32 second-level scales of the blocks at flat block indices ``flat`` (>= 0)."""
    sidx = jax.lax.div(flat, jnp.int32(dq_block_size))  # flat >= 0: no floor-division select
    if mask is None:
        return pltriton.load(refs.scale.at[sidx])
    # clamp so that even a masked lane's address is inside the array
    sidx = jnp.minimum(sidx, refs.scale.shape[0] - 1)
    return pltriton.load(refs.scale.at[sidx], mask=jnp.broadcast_to(mask, sidx.shape), other=0)


@dataclasses.dataclass(frozen=True)
class ScaleRefs:
    """The refs holding a weight's scales inside a kernel: ``absmax`` [n, k/bs] (float32, or
    uint8 codes), and for double quant ``scale`` [n_scales], ``offset`` [1], ``table`` [256]."""

    absmax: Any
    scale: Any = None
    offset: Any = None
    table: Any = None


def dequant_tile(spec: QuantSpec, packed: jax.Array, scales: jax.Array, dtype: Any,
                 lut: str, lut_ref: Any = None, *, interpret: bool = False) -> jax.Array:
    """Dequantized weight tile ``dtype [r, 2h]`` from packed uint8 ``[r, h]`` and float32
    per-row scales ``[r]`` (the tile lies inside one block along k).

    ``lut``: one of `LUT_MODES` ("gather" loads from the 16-entry ``lut_ref``).
    Values are computed in float32 (``code_value * absmax``) and rounded once to ``dtype``,
    except with "prmt" (see `dequant_pair`), whose halves are interleaved by a stack + reshape
    (``tt.join``: register-local).
    """
    if lut in ("prmt", "prmt32"):
        even, odd = dequant_pair(spec, packed, scales, dtype, lut, interpret=interpret)
        r, h = packed.shape
        return jnp.stack([even, odd], axis=-1).reshape(r, 2 * h)
    vals = code_values(unpack_codes(packed), spec, lut, lut_ref)
    return (vals * scales[:, None]).astype(dtype)


def kernel_inputs(spec: QuantSpec, codes: jax.Array, absmax: jax.Array,
                  absmax_scale: jax.Array | None, absmax_offset: jax.Array | None,
                  lut: str) -> tuple[list[jax.Array], int]:
    """The weight operands as the kernels take them: codes [n, k/2], absmax [n, k/bs], then the
    double-quant arrays and the lookup tables the mode needs. Returns (arrays, count)."""
    ins = [_rows(codes, spec.n, spec.k // 2), _rows(absmax, spec.n, spec.blocks_per_row)]
    if spec.double_quant:
        ins += [absmax_scale.reshape(-1).astype(jnp.float32),
                absmax_offset.reshape(1).astype(jnp.float32),
                jnp.asarray(np.array(spec.absmax_table, np.float32))]
    if lut == "gather":
        ins.append(jnp.asarray(np.array(spec.code_table, np.float32)))
    return ins, len(ins)


def _rows(a: jax.Array, n: int, width: int) -> jax.Array:
    """``a`` flattened and viewed as rows of ``width``: all whole rows when the size allows (no
    copy; the kernels never read rows past ``n``), else exactly the first ``n`` rows."""
    flat = a.reshape(-1)
    if flat.size % width == 0:
        return flat.reshape(-1, width)
    return flat[: n * width].reshape(n, width)


def split_weight_refs(spec: QuantSpec, refs: Sequence[Any], lut: str) -> tuple[Any, ScaleRefs, Any]:
    """Inverse of `kernel_inputs` inside the kernel: (codes_ref, ScaleRefs, lut_ref or None)."""
    refs = list(refs)
    codes_ref, absmax_ref = refs[0], refs[1]
    rest = refs[2:]
    if spec.double_quant:
        scales = ScaleRefs(absmax_ref, rest[0], rest[1], rest[2])
        rest = rest[3:]
    else:
        scales = ScaleRefs(absmax_ref)
    lut_ref = rest[0] if lut == "gather" else None
    return codes_ref, scales, lut_ref


def grouped_program_ids(pid: jax.Array, n_rows: int, n_cols: int, group: int) -> tuple[jax.Array, jax.Array]:
    """Maps a 1-D program id to (row tile, column tile), walking ``group`` row tiles at a time
    so that programs running together share operand tiles in L2."""
    # truncating divides (ids are >= 0): jnp's floor division adds a remainder and a select
    per_group = group * n_cols
    group_id = jax.lax.div(pid, jnp.int32(per_group))
    first = group_id * group
    size = jnp.minimum(n_rows - first, group)
    local = pid - group_id * per_group
    col = jax.lax.div(local, size)
    return first + (local - col * size), col


# --------------------------------------------------------------------------------------------
# Plain-JAX reference (XLA; gathers are fine here)


def dequantize_reference(codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array | None,
                         absmax_offset: jax.Array | None, spec: QuantSpec) -> jax.Array:
    """float32 ``W[n, k]`` decoded with plain jnp (gathers), the definition every kernel meets."""
    n, k = spec.n, spec.k
    packed = codes.reshape(-1)[: n * k // 2]
    nib = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1).astype(jnp.int32)
    vals = jnp.asarray(np.array(spec.code_table, np.float32))[nib]
    a = decode_scales(absmax, absmax_scale, absmax_offset, spec)
    w = vals.reshape(spec.n_blocks, spec.block_size) * a[:, None]
    return w.reshape(n, k)


def decode_scales(absmax: jax.Array, absmax_scale: jax.Array | None, absmax_offset: jax.Array | None,
                  spec: QuantSpec) -> jax.Array:
    """float32 ``[n_blocks]`` first-level block scales, with double quantization undone
    (``absmax_table[code] * absmax_scale[i // dq_block_size] + absmax_offset``) in plain jnp."""
    a = absmax.reshape(-1)[: spec.n_blocks]
    if not spec.double_quant:
        return a.astype(jnp.float32)
    dec = jnp.asarray(np.array(spec.absmax_table, np.float32))[a.astype(jnp.int32)]
    s = absmax_scale.reshape(-1).astype(jnp.float32)[jnp.arange(spec.n_blocks) // spec.dq_block_size]
    return dec * s + absmax_offset.reshape(()).astype(jnp.float32)
