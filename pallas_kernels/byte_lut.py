"""A 16-entry lookup for packed 4-bit codes in a few byte-permute instructions (PTX ``prmt``).

What: `decode_pair_words` turns a tile of packed bytes (two 4-bit codes a byte, the first
element in the HIGH nibble, as qlora_jax and bitsandbytes store them) into one 32-bit word a
byte holding the bf16/f16 table values of its even (high-nibble, low half) and odd (low-nibble,
high half) elements, optionally times a per-byte scale in that type; `decode_pairs` splits the
words into the even and odd tiles; `decode_words` gives ``table[code] * scale`` computed in
float32 and rounded once, packed the same way (the dense array's words, what the XLA path
writes); `pair_dot_accumulate` decodes 4 bytes and, in the same PTX block, sums their 8
products with x in packed bf16x2 FMAs into a float32 sum (the decode kernel's M=1 path).

Why: a select tree on the 16 constants costs ~25 integer/select instructions a weight, which
made every earlier NF4 kernel issue-bound. ``prmt d, a, b, s`` picks, for each of the four bytes
of ``d``, one of the 8 bytes of ``{b, a}`` by a 3-bit index in a nibble of ``s`` (the nibble's
bit 3 instead replicates the picked byte's sign bit). The codes of a 32-bit word of packed
bytes already ARE such nibbles, so with the table split into byte planes (byte ``p`` of the
16 values = 16 bytes = 4 registers):

- ``prmt(T0, T1, w)`` gives plane bytes of the codes 0-7 and ``prmt(T2, T3, w ^ 0x8888)`` those
  of 8-15 for four codes at once; a byte mask of "code < 8" (``prmt(0x01010101, .., w) * 255``)
  blends the two (one LOP3 after ptxas merges the three logic ops);
- two more ``prmt`` interleave the planes into the values' bytes.

For 16-bit values that is ~3 instructions a weight (plus one packed ``fma`` when scaled), for
exact float32 values ~6. The instruction list is data (`Program`): rendered to PTX for the GPU
(``pltriton.elementwise_inline_asm``) and evaluated with jnp bit operations in interpret mode, so
the CPU tests run the very sequence of operations the GPU runs, and only the PTX rendering of
each single operation is left to a GPU test.

Measured on an H200 (2026-12-01, against the select tree in the same kernels): the decode
kernel at M=1 (K=4096 N=11008) 0.0745 -> 0.0353 ms, the training forward at M=4096 1.87 ->
1.32 ms, the dequantize kernel (8192 x 8192 bf16, Nsight Compute) 77 -> 44 us; the scaled bf16
pairs add ~0.3% relative error to a matmul's output over the float32 product (3.1e-3 vs
2.3e-3 against float64 on N(0,1) data), which "prmt32" (float32 scale) removes at ~5% more time.

Element order inside a word ``w`` of 4 packed bytes (little-endian, byte ``j`` at bits
``8j..8j+7``): nibble ``2j`` (low) is the odd element ``o_j`` of byte ``j``, nibble ``2j + 1``
the even element ``e_j``; so ``w``'s low 16 bits select ``[o0, e0, o1, e1]`` and ``w >> 16``
``[o2, e2, o3, e3]``. Every output element depends on its own byte only, so the result is right
whatever order Triton packs four bytes of a tile into one register.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Program", "pairs_program", "words_program", "pair_dot_program", "table_words", "table_tile",
           "dot4_table_tile", "decode_pair_words", "decode_pairs", "split_pair_words", "decode_words",
           "pair_dot_accumulate", "pair_dot_sums", "pair_dot4_program", "pair_dot4_accumulate", "run_program",
           "DTYPES", "N_TABLE_WORDS", "DOT4_TABLE_OPERANDS"]

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_NEG_ZERO2 = 0x80008000   # (-0, -0) in bf16x2 and f16x2 alike: the addend of a plain product
_ONES = 0x01010101        # the byte source of the "code < 8" masks


@dataclasses.dataclass(frozen=True)
class Program:
    """A straight-line list of 32-bit operations: ``(op, dst, *sources)``; a source is a register
    name or an int immediate. Inputs are ``in0, in1, ...``, outputs ``out0, out1, ...``.

    Ops: ``xor and shr shl mul mov`` (u32; ``mul`` keeps the low 32 bits), ``prmt a b sel``,
    ``fma2 a b c`` / ``mul2 a b`` (packed bf16x2/f16x2 ``a*b+c`` / ``a*b``, per ``half``),
    ``fmul a b`` / ``fadd a b`` / ``fma a b c`` (f32), ``cvt2 a b`` (two f32 -> one bf16x2/f16x2 word: ``a``
    high half, ``b`` low half)."""

    ops: tuple[tuple, ...]
    n_in: int
    n_out: int
    half: str   # "bfloat16" or "float16": the packed type of fma2 / cvt2

    def ptx(self) -> str:
        """The program as a PTX block for ``elementwise_inline_asm`` (outputs ``$0..``, inputs
        after them)."""
        names: dict[str, str] = {f"out{i}": f"${i}" for i in range(self.n_out)}
        names.update({f"in{i}": f"${self.n_out + i}" for i in range(self.n_in)})
        temps = sorted({op[1] for op in self.ops if op[1] not in names})
        names.update({t: f"%t{i}" for i, t in enumerate(temps)})
        h = "bf16x2" if self.half == "bfloat16" else "f16x2"
        # immediates of prmt's byte sources and of packed-float operands go through a register
        # (PTX takes immediates there less reliably than in the logic ops; ptxas folds the movs)
        consts: dict[int, str] = {}
        for op, _, *args in self.ops:
            for i, a in enumerate(args):
                if isinstance(a, int) and _immediate_in_register(op, i):
                    consts.setdefault(a & 0xFFFFFFFF, f"%c{len(consts)}")

        def src(op: str, i: int, a: str | int) -> str:
            if isinstance(a, str):
                return names[a]
            if op in ("shr", "shl"):
                return str(a)
            return consts[a & 0xFFFFFFFF] if _immediate_in_register(op, i) else f"0x{a & 0xFFFFFFFF:08x}"

        lines = ["{", f".reg .b32 %t<{max(1, len(temps))}>;", f".reg .b32 %c<{max(1, len(consts))}>;"]
        lines += [f"mov.b32 {r}, 0x{v:08x};" for v, r in consts.items()]
        for op, dst, *args in self.ops:
            operands = ", ".join([names[dst]] + [src(op, i, a) for i, a in enumerate(args)])
            lines.append(f"{_PTX_OPS[op].format(h=h, op=op)} {operands};")
        lines.append("}")
        return "\n".join(lines)


# The PTX instruction of each op (``{h}``: the packed 16-bit float type).
_PTX_OPS = {"xor": "xor.b32", "and": "and.b32", "shr": "shr.u32", "shl": "shl.b32", "mul": "mul.lo.u32",
            "mov": "mov.b32", "prmt": "prmt.b32", "fma2": "fma.rn.{h}", "mul2": "mul.rn.{h}",
            "fmul": "mul.rn.f32", "fadd": "add.rn.f32", "fma": "fma.rn.f32", "cvt2": "cvt.rn.{h}.f32"}


def _immediate_in_register(op: str, i: int) -> bool:
    """Whether an immediate source ``i`` of ``op`` is first moved into a register."""
    return (op == "prmt" and i < 2) or op in ("fma2", "mul2", "fma", "fmul", "fadd")


def _prmt(a: jax.Array, b: jax.Array, sel: jax.Array) -> jax.Array:
    """jnp model of PTX ``prmt.b32`` (default mode) on uint32 arrays."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = jnp.zeros_like(a)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        idx = s & 7
        byte = src[0]
        for j in range(1, 8):
            byte = jnp.where(idx == j, src[j], byte)
        byte = jnp.where((s & 8) != 0, jnp.where((byte & 0x80) != 0, jnp.uint32(0xFF), jnp.uint32(0)), byte)
        out = out | (byte << (8 * i))
    return out


def _halves(w: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The low and high 16 bits of 32-bit integer words as ``dtype`` (int16 views: Triton's
    integer ops are signless, and a bitcast to a 16-bit float needs a same-width type)."""
    lo = jax.lax.bitcast_convert_type((w & 0xFFFF).astype(jnp.int16), dtype)
    hi = jax.lax.bitcast_convert_type((w >> 16).astype(jnp.int16), dtype)
    return lo, hi


def _pack_halves(lo: jax.Array, hi: jax.Array) -> jax.Array:
    l16 = jax.lax.bitcast_convert_type(lo, jnp.uint16).astype(jnp.uint32)
    h16 = jax.lax.bitcast_convert_type(hi, jnp.uint16).astype(jnp.uint32)
    return l16 | (h16 << 16)


def run_program(prog: Program, inputs: Sequence[jax.Array]) -> list[jax.Array]:
    """Evaluates ``prog`` with jnp on uint32 arrays (all of one shape): the interpret-mode and
    test model of what the PTX computes."""
    regs: dict[str, jax.Array] = {f"in{i}": jnp.asarray(x, jnp.uint32) for i, x in enumerate(inputs)}
    shape = regs["in0"].shape
    half = jnp.dtype(prog.half)

    def val(s):
        return regs[s] if isinstance(s, str) else jnp.full(shape, s & 0xFFFFFFFF, jnp.uint32)

    for op, dst, *args in prog.ops:
        if op == "xor":
            r = val(args[0]) ^ val(args[1])
        elif op == "and":
            r = val(args[0]) & val(args[1])
        elif op == "shr":
            r = val(args[0]) >> args[1]
        elif op == "shl":
            r = val(args[0]) << args[1]
        elif op == "mov":
            r = val(args[0])
        elif op == "mul":
            r = val(args[0]) * val(args[1])   # uint32 wraps: the low 32 bits
        elif op == "prmt":
            r = _prmt(val(args[0]), val(args[1]), val(args[2]))
        elif op in ("fma2", "mul2"):
            # a*b of two 16-bit floats is exact in float32, so the sum below is rounded once
            # in float32 and once to the half type (the GPU rounds once; the two differ only
            # when the float32 sum is inexact and lands on a half-way point)
            halves = [_halves(val(s), half) for s in args]
            if op == "mul2":
                halves.append((jnp.zeros(shape, jnp.float32),) * 2)
            (al, ah), (bl, bh), (cl, ch) = halves
            lo = (al.astype(jnp.float32) * bl.astype(jnp.float32) + cl.astype(jnp.float32)).astype(half)
            hi = (ah.astype(jnp.float32) * bh.astype(jnp.float32) + ch.astype(jnp.float32)).astype(half)
            r = _pack_halves(lo, hi)
        elif op in ("fmul", "fadd"):
            a, b = (jax.lax.bitcast_convert_type(val(s), jnp.float32) for s in args)
            r = jax.lax.bitcast_convert_type(a * b if op == "fmul" else a + b, jnp.uint32)
        elif op == "fma":   # modelled with two roundings; the GPU's fma rounds once
            a, b, c = (jax.lax.bitcast_convert_type(val(s), jnp.float32) for s in args)
            r = jax.lax.bitcast_convert_type(a * b + c, jnp.uint32)
        elif op == "cvt2":
            a, b = (jax.lax.bitcast_convert_type(val(s), jnp.float32) for s in args)
            r = _pack_halves(b.astype(half), a.astype(half))
        else:  # pragma: no cover
            raise ValueError(f"unknown op {op!r}")
        regs[dst] = r
    return [regs[f"out{i}"] for i in range(prog.n_out)]


# --------------------------------------------------------------------------------------------
# Building the programs


def _planes(values_bits: Sequence[int], nbytes: int) -> list[tuple[int, int, int, int]]:
    """Per byte plane, the 4 registers holding that byte of the 16 values (value ``c`` in byte
    ``c % 4`` of register ``c // 4``)."""
    planes = []
    for p in range(nbytes):
        b = [(int(v) >> (8 * p)) & 0xFF for v in values_bits]
        planes.append(tuple(b[4 * r] | b[4 * r + 1] << 8 | b[4 * r + 2] << 16 | b[4 * r + 3] << 24
                            for r in range(4)))
    return planes


def _plane_ops(ops: list, tag: str, sel: str, selx: str, mask: str, regs: tuple[int, ...]) -> str:
    """Ops leaving in ``P{tag}`` one byte plane of the four codes of ``sel``: the codes 0-7 from
    ``regs[0:2]``, 8-15 from ``regs[2:4]``, blended by ``mask`` (0xFF where the code is < 8)."""
    lo, hi, x, d = f"lo{tag}", f"hi{tag}", f"x{tag}", f"P{tag}"
    ops += [("prmt", lo, regs[0], regs[1], sel),
            ("prmt", hi, regs[2], regs[3], selx),
            ("xor", x, lo, hi), ("and", x, x, mask), ("xor", d, hi, x)]   # mask ? lo : hi
    return d


def _selector_ops(ops: list, ones: int | str = _ONES) -> None:
    """Selectors and blend masks of the two nibble groups of ``in0`` (see the module docstring);
    ``ones``: 0x01010101, or the register holding it."""
    ops += [("shr", "sB", "in0", 16),
            ("xor", "xA", "in0", 0x8888), ("xor", "xB", "sB", 0x8888),
            ("prmt", "mA", ones, ones, "in0"), ("mul", "mA", "mA", 0xFF),
            ("prmt", "mB", ones, ones, "sB"), ("mul", "mB", "mB", 0xFF)]


def _bits16(values: Sequence[float], dtype: Any) -> list[int]:
    v = np.asarray(values, np.float32).astype(jnp.dtype(dtype))
    return [int(x) for x in v.view(np.uint16)]


@functools.lru_cache(maxsize=64)
def pairs_program(values: tuple[float, ...], dtype_name: str, scaled: bool) -> Program:
    """Input: a word of 4 packed bytes (``in0``), and if ``scaled`` one word a byte
    (``in1..in4``) holding that byte's 16-bit scale in both halves. Output: ``out0..out3`` =
    for byte ``j`` the ``dtype`` pair ``(table[e_j] low, table[o_j] high)``, i.e. the two dense
    elements of the byte in memory order, times the scale in ``dtype`` arithmetic if ``scaled``."""
    L, H = _planes(_bits16(values, dtype_name), 2)
    ops: list = []
    outs = [f"v{j}" if scaled else f"out{j}" for j in range(4)]
    _pair_word_ops(ops, outs, L, H, _ONES)
    if scaled:
        ops += [("fma2", f"out{j}", f"v{j}", f"in{1 + j}", _NEG_ZERO2) for j in range(4)]
    return Program(tuple(ops), 5 if scaled else 1, 4, dtype_name)


def _pair_word_ops(ops: list, outs: Sequence[str], L: Sequence[int | str], H: Sequence[int | str],
                   ones: int | str) -> None:
    """Ops leaving in ``outs[j]`` the 16-bit pair (even low, odd high) of byte ``j`` of ``in0``,
    from the table's low and high byte planes ``L``, ``H`` (immediates or registers)."""
    _selector_ops(ops, ones)
    pla = _plane_ops(ops, "LA", "in0", "xA", "mA", tuple(L))
    pha = _plane_ops(ops, "HA", "in0", "xA", "mA", tuple(H))
    plb = _plane_ops(ops, "LB", "sB", "xB", "mB", tuple(L))
    phb = _plane_ops(ops, "HB", "sB", "xB", "mB", tuple(H))
    # plane bytes hold [o0, e0, o1, e1]: byte 0's pair takes plane bytes 1 and 0, byte 1's 3, 2
    ops += [("prmt", outs[0], pla, pha, 0x4051), ("prmt", outs[1], pla, pha, 0x6273),
            ("prmt", outs[2], plb, phb, 0x4051), ("prmt", outs[3], plb, phb, 0x6273)]


# Inputs of `pair_dot_program`: the packed word, 4 x words, scale, sum, then the table words.
_DOT_X, _DOT_SCALE, _DOT_ACC, _DOT_TABLE = 1, 5, 6, 7
N_TABLE_WORDS = 9   # the low and high byte planes (4 words each) and 0x01010101


def table_words(values: Sequence[float], dtype: Any) -> np.ndarray:
    """int32 [N_TABLE_WORDS]: the registers `pair_dot_program` takes its table from (the byte
    planes of the 16 ``dtype`` values, then 0x01010101)."""
    L, H = _planes(_bits16(values, jnp.dtype(dtype).name), 2)
    return np.array([*L, *H, _ONES], np.uint32).view(np.int32)


def table_tile(values: Sequence[float], dtype: Any, q: int) -> np.ndarray:
    """int32 ``[N_TABLE_WORDS, q]``: `table_words` repeated along ``q``, for a kernel to load as
    one ``[1, q]`` tile a word (each thread then reads its own copy; see `pair_dot_accumulate`)."""
    return np.repeat(table_words(values, dtype)[:, None], q, axis=1)


@functools.lru_cache(maxsize=64)
def pair_dot_program(dtype_name: str, scaled: bool = True) -> Program:
    """The dot of one word of 4 packed bytes (8 weights) with their 8 activations, added to a
    float32 sum (one element a word: ``elementwise_inline_asm`` with ``pack=1``).

    Inputs: ``in0`` the word of 4 packed bytes (byte ``j`` at bits ``8j..8j+7``); ``in1..4``
    the x words of bytes 0..3 (each the ``dtype`` pair of x its byte's two weights multiply);
    ``in5`` the float32 block scale (the 4 bytes share a block); ``in6`` the float32 sum;
    ``in7..15`` the table words (`table_words`). Output: ``out0 = in6 + in5 * (sum of the 8
    products)``. With ``scaled=False`` there is no scale and no sum: the table words are
    ``in5..13`` and ``out0`` is the float32 sum of the 8 products.

    The 8 products are summed as 2 ``dtype`` lanes (even and odd weights) in one multiply and
    three packed FMAs; the two lanes then go to float32 exactly. The table comes in registers
    rather than as immediates: given immediates, ptxas keeps them in uniform registers and
    copies each one back before every permute that reads it (a quarter of the instructions
    of the float32 word path, counted in its SASS)."""
    if dtype_name != "bfloat16":
        raise ValueError(f"pair_dot_program supports bfloat16 pairs, got {dtype_name}")
    first_table = _DOT_TABLE if scaled else _DOT_SCALE
    t = [f"in{first_table + i}" for i in range(N_TABLE_WORDS)]
    ops: list = []
    _pair_word_ops(ops, [f"v{j}" for j in range(4)], t[0:4], t[4:8], t[8])
    ops += [("mul2", "p", "v0", f"in{_DOT_X}")]
    ops += [("fma2", "p", f"v{j}", f"in{_DOT_X + j}", "p") for j in (1, 2, 3)]
    ops += [("shl", "pe", "p", 16), ("and", "po", "p", 0xFFFF0000)]   # a bf16 is the top half of its float32
    if scaled:
        ops += [("fma", "a", "pe", f"in{_DOT_SCALE}", f"in{_DOT_ACC}"),
                ("fma", "out0", "po", f"in{_DOT_SCALE}", "a")]
    else:
        ops += [("fadd", "out0", "pe", "po")]
    return Program(tuple(ops), first_table + N_TABLE_WORDS, 1, dtype_name)


# Operands of `pair_dot4_program`, 4 registers each (``pack=4``): the packed words, 4 x operands,
# scale, sum, then the table words in DOT4_TABLE_OPERANDS operands (zero-padded to 12 words).
DOT4_TABLE_OPERANDS = -(-N_TABLE_WORDS // 4)


@functools.lru_cache(maxsize=8)
def pair_dot4_program() -> Program:
    """`pair_dot_program` (bf16, scaled) on a thread's vector of 4 packed words at once, taking
    its 16 x words in x's own order (``elementwise_inline_asm`` with ``pack=4``, 4 registers an
    operand, in operand order).

    Inputs: ``in0..3`` words ``u = 0..3`` (32 consecutive weights of one block); ``in4..19``
    x: operand ``q`` (``in{4+4q}..in{7+4q}``) holds x words ``4q..4q+3`` of the vector, the
    pairs of word ``q``'s bytes 0..3, so each operand is 16 contiguous bytes of x; ``in20..23``
    the float32 scale of each word; ``in24..27`` the float32 sums; ``in28..39`` the table words
    (`table_words`, then zeros). Output: ``out{u} = in{24+u} + in{20+u} * (word u's dot)``."""
    one = pair_dot_program("bfloat16", scaled=True)
    ops: list = []
    for u in range(4):
        names = {"in0": f"in{u}", f"in{_DOT_SCALE}": f"in{20 + u}", f"in{_DOT_ACC}": f"in{24 + u}",
                 "out0": f"out{u}"}
        names.update({f"in{_DOT_X + j}": f"in{4 + 4 * u + j}" for j in range(4)})
        names.update({f"in{_DOT_TABLE + t}": f"in{28 + t}" for t in range(N_TABLE_WORDS)})
        rename = lambda a: a if not isinstance(a, str) else names.get(a, f"u{u}{a}")  # noqa: E731,B023
        ops += [(op, rename(dst), *(rename(a) for a in args)) for op, dst, *args in one.ops]
    return Program(tuple(ops), 28 + 4 * DOT4_TABLE_OPERANDS, 4, "bfloat16")


def dot4_table_tile(values: Sequence[float], dtype: Any, v: int) -> np.ndarray:
    """int32 ``[DOT4_TABLE_OPERANDS, v, 4]``: the table operands of `pair_dot4_program` (table
    words ``4a..4a+3`` in operand ``a``), repeated for ``v`` vectors, for a kernel to load as
    ``[1, v, 4]`` tiles (addresses that differ between threads: see `pair_dot_accumulate`)."""
    words = np.zeros(4 * DOT4_TABLE_OPERANDS, np.int32)
    words[:N_TABLE_WORDS] = table_words(values, dtype)
    return np.ascontiguousarray(np.broadcast_to(words.reshape(DOT4_TABLE_OPERANDS, 1, 4),
                                                (DOT4_TABLE_OPERANDS, v, 4)))


@functools.lru_cache(maxsize=64)
def words_program(values: tuple[float, ...], dtype_name: str) -> Program:
    """Input: a word of 4 packed bytes (``in0``) and four float32 scales (``in1..in4``, one a
    byte). Output: ``out0..out3`` = for byte ``j`` the word ``(dtype(table[e_j] * s_j) low,
    dtype(table[o_j] * s_j) high)``: the exact float32 table value (four byte planes) times the
    scale in float32, rounded once."""
    bits = [int(b) for b in np.asarray(values, np.float32).view(np.uint32)]
    planes = _planes(bits, 4)
    ops: list = []
    _selector_ops(ops)
    vals = []
    for g, (sel, selx, mask) in enumerate((("in0", "xA", "mA"), ("sB", "xB", "mB"))):
        p = [_plane_ops(ops, f"{i}{g}", sel, selx, mask, planes[i]) for i in range(4)]
        # plane bytes hold [o, e, o', e']: gather the 4 bytes of each float32
        ops += [("prmt", f"E01{g}", p[0], p[1], 0x7351), ("prmt", f"E23{g}", p[2], p[3], 0x7351),
                ("prmt", f"O01{g}", p[0], p[1], 0x6240), ("prmt", f"O23{g}", p[2], p[3], 0x6240)]
        for j, sx in enumerate((0x5410, 0x7632)):   # first / second byte of the group
            ops += [("prmt", f"e{g}{j}", f"E01{g}", f"E23{g}", sx),
                    ("prmt", f"o{g}{j}", f"O01{g}", f"O23{g}", sx)]
            vals.append((f"e{g}{j}", f"o{g}{j}"))
    for j, (e, o) in enumerate(vals):
        s = f"in{1 + j}"
        ops += [("fmul", f"se{j}", e, s), ("fmul", f"so{j}", o, s), ("cvt2", f"out{j}", f"so{j}", f"se{j}")]
    return Program(tuple(ops), 5, 4, dtype_name)


# --------------------------------------------------------------------------------------------
# Tile-level entry points (inside a Pallas kernel body, or on plain arrays)


def _words_of(packed: jax.Array) -> jax.Array:
    """uint32 [r, h/4] little-endian words of a uint8 tile [r, h] (interpret mode only)."""
    r, h = packed.shape
    b = packed.astype(jnp.uint32).reshape(r, h // 4, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _check_tile(packed: jax.Array, dtype: Any) -> None:
    if packed.dtype != jnp.uint8 or packed.ndim != 2 or packed.shape[1] % 4:
        raise ValueError(f"packed must be a uint8 [rows, 4*j] tile, got {packed.dtype} {packed.shape}")
    if jnp.dtype(dtype) not in DTYPES:
        raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")


def _run(prog: Program, packed: jax.Array, per_byte: Sequence[jax.Array], interpret: bool) -> jax.Array:
    """int32 ``[r, h]``, one output word a byte of ``packed`` (uint8 ``[r, h]``), from ``prog``
    with ``per_byte`` 32-bit operands (``[r, h]`` each, one word a byte).

    On the GPU one Triton inline-asm op over 4 bytes at a time (one result and a signed type:
    jax's lowering of the op returns only its first result, and Triton's op takes signless
    integers); in interpret mode `run_program` on the words of 4 bytes, one input register a
    byte for each per-byte operand."""
    r, h = packed.shape
    if not interpret:
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

        cons = ",".join(["=r"] * 4 + ["r"] * prog.n_in)
        (words,) = pltriton.elementwise_inline_asm(
            prog.ptx(), args=[packed, *per_byte], constraints=cons, pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct((r, h), jnp.int32)])
        return words
    ins = [_words_of(packed)]
    for a in per_byte:
        a = jax.lax.bitcast_convert_type(a, jnp.uint32).reshape(r, h // 4, 4)
        ins += [a[..., j] for j in range(4)]
    out = run_program(prog, ins)
    return jax.lax.bitcast_convert_type(jnp.stack(out, axis=-1).reshape(r, h), jnp.int32)


def decode_pair_words(packed: jax.Array, values: Sequence[float], dtype: Any,
                      scale: jax.Array | None = None, *, interpret: bool) -> jax.Array:
    """int32 ``[r, h]``: for each byte of a uint8 ``[r, h]`` tile (``h % 4 == 0``) the ``dtype``
    pair ``(values[even] low half, values[odd] high half)`` rounded to ``dtype``, times ``scale``
    (``dtype [r, h]`` or ``[r, 1]``, one per byte) in ``dtype`` arithmetic when given.

    ``interpret``: evaluate with jnp (Pallas interpret mode / plain arrays) instead of emitting
    the PTX (Triton lowering on a GPU)."""
    _check_tile(packed, dtype)
    dtype = jnp.dtype(dtype)
    prog = pairs_program(tuple(float(v) for v in values), dtype.name, scale is not None)
    per_byte = []
    if scale is not None:
        # the scale's 16 bits in both halves of a word (per row when given as [r, 1]: then the
        # multiply and the broadcast cost nothing a weight)
        b = jax.lax.bitcast_convert_type(scale.astype(dtype), jnp.int16).astype(jnp.int32) & 0xFFFF
        per_byte.append(jnp.broadcast_to(b | (b << 16), packed.shape))
    return _run(prog, packed, per_byte, interpret)


def pair_dot_accumulate(words: jax.Array, x_words: Sequence[jax.Array], scale: jax.Array, acc: jax.Array,
                        table: Sequence[jax.Array], *, interpret: bool) -> jax.Array:
    """float32 ``[r, q]`` (or ``[r, b, q]``): ``acc + scale * dot`` for each word of packed
    weights, the dot of its 4 bytes' 8 weights (bf16 ``table`` values of their nibbles) with
    their x pairs; `pair_dot_program` on each word.

    Args:
      words: int32 ``[r, q]`` or ``[r, b, q]``, 4 packed bytes a word (each word within one
        block).
      x_words: 4 int32 arrays broadcastable to ``words``' shape (``[1, q]``, ``[1, b, q]``):
        ``x_words[j]`` holds the bf16 pair of activations of byte ``j`` of each word.
      scale: float32 broadcastable to ``words``' shape (``[r, 1]``, ``[r, b, 1]``), the block
        scale of each word.
      acc: float32 running sums, ``words``' shape.
      table: the `N_TABLE_WORDS` words of `table_words` (bf16 values), each a scalar or an
        int32 array broadcastable to ``[r, q]``. In a kernel, load them as ``[1, q]`` tiles
        (`table_tile`): a scalar is the same for every thread, and ptxas then keeps it in a
        uniform register and copies it back before each permute that reads it.
    """
    _check_dot_operands(words, x_words, table)
    args = _dot_args(words, x_words, scale, acc, table)
    return _run_dot(pair_dot_program("bfloat16"), args, interpret)


def pair_dot_sums(words: jax.Array, x_words: Sequence[jax.Array], table: Sequence[jax.Array], *,
                  interpret: bool) -> jax.Array:
    """float32, ``words``' shape: for each word of 4 packed bytes the sum of its 8 weights'
    (unscaled bf16 ``table`` values of their nibbles) products with their x pairs, as in
    `pair_dot_accumulate` but without the scale and the running sum (the caller adds the
    words of a block, then scales once a block)."""
    _check_dot_operands(words, x_words, table)
    shape = words.shape
    args = [words, *(jnp.broadcast_to(x, shape) for x in x_words), *(jnp.broadcast_to(t, shape) for t in table)]
    return _run_dot(pair_dot_program("bfloat16", scaled=False), args, interpret)


def pair_dot4_accumulate(words: jax.Array, x_words: Sequence[jax.Array], scale: jax.Array, acc: jax.Array,
                         table: Sequence[jax.Array], *, interpret: bool) -> jax.Array:
    """float32, ``words``' shape ``[..., 4]``: ``acc + scale * dot`` for each packed word, where
    the last axis holds a thread's vector of 4 words (32 weights in one block) and
    ``x_words[q]`` the x words ``4q..4q+3`` of that vector (x's own order: `pair_dot4_program`).

    Args:
      words: int32 ``[..., 4]``.
      x_words: 4 int32 arrays broadcastable to ``words``' shape.
      scale: float32 broadcastable to ``words``' shape (one block scale a vector).
      acc: float32 running sums, ``words``' shape.
      table: `DOT4_TABLE_OPERANDS` int32 arrays broadcastable to it (`dot4_table_tile`).
    """
    if words.dtype != jnp.int32 or words.ndim < 2 or words.shape[-1] != 4:
        raise ValueError(f"words must be an int32 [..., 4] tile, got {words.dtype} {words.shape}")
    if len(x_words) != 4 or len(table) != DOT4_TABLE_OPERANDS:
        raise ValueError(f"need 4 x operands and {DOT4_TABLE_OPERANDS} table operands, "
                         f"got {len(x_words)}, {len(table)}")
    args = _dot_args(words, x_words, scale, acc, table)
    return _run_dot(pair_dot4_program(), args, interpret, pack=4)


def _check_dot_operands(words: jax.Array, x_words: Sequence[jax.Array], table: Sequence[jax.Array]) -> None:
    if words.dtype != jnp.int32 or words.ndim < 2:
        raise ValueError(f"words must be an int32 [rows, ..., q] tile, got {words.dtype} {words.shape}")
    if len(x_words) != 4 or len(table) != N_TABLE_WORDS:
        raise ValueError(f"need 4 x word tiles and {N_TABLE_WORDS} table words, got {len(x_words)}, {len(table)}")


def _dot_args(words: jax.Array, x_words: Sequence[jax.Array], scale: jax.Array, acc: jax.Array,
              table: Sequence[jax.Array]) -> list[jax.Array]:
    """The scaled pair-dot programs' operands as int32 arrays of ``words``' shape: the words, the
    x words, scale, sum and table words (the floats as their bits)."""
    as_words = lambda a: jnp.broadcast_to(jax.lax.bitcast_convert_type(a, jnp.int32), words.shape)  # noqa: E731
    return [words, *(as_words(x) for x in x_words), as_words(scale.astype(jnp.float32)),
            as_words(acc.astype(jnp.float32)), *(as_words(t) for t in table)]


def _run_dot(prog: Program, args: Sequence[jax.Array], interpret: bool, pack: int = 1) -> jax.Array:
    """float32 result of a word program on int32 operands of one shape, one output an element:
    each instance takes ``pack`` consecutive elements (along the last axis) of every operand,
    ``pack`` registers an operand in operand order, and writes ``pack`` outputs."""
    shape = args[0].shape
    if interpret:   # element e of each group of pack: a[..., e::pack]
        ins = [jax.lax.bitcast_convert_type(a[..., e::pack], jnp.uint32) for a in args for e in range(pack)]
        out = jnp.stack(run_program(prog, ins), axis=-1).reshape(shape)
    else:
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

        (out,) = pltriton.elementwise_inline_asm(
            prog.ptx(), args=list(args), constraints=",".join(["=r"] * prog.n_out + ["r"] * prog.n_in), pack=pack,
            result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])
    return jax.lax.bitcast_convert_type(out, jnp.float32)


def bf16_halves_f32(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 values of the low and high bf16 halves of 32-bit integer words (int32 or uint32):
    a bf16 is the top half of its float32, so each is one shift or one mask (exact; no convert)."""
    mask = np.uint32(0xFFFF0000) if words.dtype == jnp.uint32 else np.int32(-65536)
    return (jax.lax.bitcast_convert_type(words << 16, jnp.float32),
            jax.lax.bitcast_convert_type(words & mask, jnp.float32))


def split_pair_words(words: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(even, odd)`` ``dtype`` halves of int32 pair words (low, high 16 bits)."""
    return _halves(words, dtype)


def decode_pairs(packed: jax.Array, values: Sequence[float], dtype: Any,
                 scale: jax.Array | None = None, *, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """``(even, odd)``: ``dtype [r, h]`` values of the high and low nibbles of a uint8 ``[r, h]``
    tile; `decode_pair_words` split into its halves."""
    return split_pair_words(decode_pair_words(packed, values, dtype, scale, interpret=interpret), dtype)


def decode_words(packed: jax.Array, values: Sequence[float], dtype: Any, scale: jax.Array, *,
                 interpret: bool) -> jax.Array:
    """int32 ``[r, h]``: for each byte of a uint8 ``[r, h]`` tile the word holding
    ``dtype(values[even] * scale)`` in its low and ``dtype(values[odd] * scale)`` in its high 16
    bits (float32 product, one rounding), i.e. the two dense elements of the byte in memory
    order. ``scale``: float32 ``[r, h]`` or ``[r, 1]`` (one per byte). ``interpret`` as in
    `decode_pair_words`."""
    _check_tile(packed, dtype)
    dtype = jnp.dtype(dtype)
    prog = words_program(tuple(float(v) for v in values), dtype.name)
    scale = jnp.broadcast_to(scale.astype(jnp.float32), packed.shape)
    return _run(prog, packed, [scale], interpret)
