"""The single-pass Pallas quantize / dequantize kernels (`pallas_kernels.quantize`) against the
plain XLA path of `qlora_jax.quantize`: identical bytes, scales and decoded bits.

On CPU the kernels run in the Pallas interpreter (the same kernel body, evaluated by XLA), on
small arrays. Inputs hold what can go wrong: values whose scaled value lands exactly on a
midpoint between two codes (ties go to the lower code), all-zero and negative-zero blocks,
huge and tiny magnitudes, bf16 subnormals and f16 subnormals, and row counts that leave the last
program partly masked. Outputs are poisoned: each kernel runs twice with its output buffers
starting as 0x00.. and as 0xFF.. (aliased), and both runs must equal the reference, so no element
can be left unwritten. The second-level (double quantization) kernel is checked the same way
against `double_quantize`: scales whose scaled centred value lands exactly on a dynamic-map
midpoint, equal scales (centred to zero), zeros, huge + tiny values, ragged sizes.
`test_kernels_lower_to_triton` and `test_dq_kernel_lowers_to_triton` lower the kernels to Triton
IR for an H100 without a GPU (the interpreter cannot show that); tests marked ``gpu`` compile and
run them on a real GPU (``python -m pytest tests/test_quantize_pallas.py -m gpu``).
"""

from __future__ import annotations

import functools
import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from pallas_kernels import _common
from pallas_kernels import quantize as pq
from qlora_jax import formats
from triton_lowering import lowers_for_h100

qmod = importlib.import_module("qlora_jax.quantize")
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
FORMATS = tuple(formats.FORMATS)   # nf4, fp4 (E2M1), fp4_e3m0, int4
BF16, F16 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


@pytest.fixture(autouse=True)
def _skip_gpu_tests_off_gpu(request):
    if request.node.get_closest_marker("gpu") and not ON_GPU:
        pytest.skip("needs a GPU (jax.default_backend() == 'gpu')")


# ------------------------------------------------------------------------------------------
# Inputs


def _dtype_values(dtype: np.dtype) -> np.ndarray:
    """Every finite value of a 16-bit float dtype, as float32."""
    v = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype).astype(np.float32)
    return v[np.isfinite(v)]


def tie_values(fmt: str, dtype: np.dtype, absmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Values ``x`` of ``dtype`` with ``|x| <= absmax`` whose scaled value
    ``RN(x * RN(1 / absmax))`` is (exact ties) one of the format's float32 midpoints, and (near
    ties) the closest to each midpoint from either side."""
    a = np.float32(absmax)
    inv = np.float32(1) / a
    x = _dtype_values(dtype)
    x = np.unique(x[np.abs(x) <= a])
    scaled = x * inv                                  # increasing with x
    mids = formats.get_format(fmt).midpoints
    exact = x[np.isin(scaled, mids)]
    i = np.searchsorted(scaled, mids)
    near = np.concatenate([x[np.clip(i - 1, 0, x.size - 1)], x[np.clip(i, 0, x.size - 1)],
                           x[np.clip(i + 1, 0, x.size - 1)]])
    return exact, near


@functools.cache
def tie_scales(fmt: str, dtype: np.dtype) -> tuple[float, ...]:
    """Up to 4 block scales in [1, 2) (values of ``dtype``) that give exact ties, most first
    (none for NF4 in bf16: its midpoints need more mantissa bits than a bf16 times a scale can
    round to)."""
    v = _dtype_values(dtype)
    cands = v[(v >= 1) & (v < 2)]
    cands = cands[:: max(1, cands.size // 64)]
    found = sorted(((tie_values(fmt, dtype, a)[0].size, float(a)) for a in cands), reverse=True)
    return tuple(a for k, a in found[:4] if k)


def make_input(seed: int, fmt: str, dtype: np.dtype, block_size: int, n_blocks: int) -> np.ndarray:
    """float32 [n_blocks * block_size] of values exactly representable in ``dtype``: random
    blocks over a wide range of magnitudes interleaved with special blocks (exact and near ties
    on midpoints, zeros, negative zeros, extremes, subnormals)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    lo, hi = (-100, 100) if dtype == BF16 else (-12, 12)
    blocks = []
    special = []
    for absmax in (tie_scales(fmt, dtype) + (1.0, 1.3, 1.7, 1.1))[:4]:
        absmax = float(np.float32(absmax).astype(dtype))   # exactly representable
        exact, near = tie_values(fmt, dtype, absmax)
        ties = np.concatenate([exact, exact, near])[: block_size - 1]
        b = rng.uniform(-absmax, absmax, block_size).astype(np.float32)
        b[1:ties.size + 1] = ties
        b[0] = absmax if seed % 2 else -absmax   # the block's absmax, exactly
        special.append(b * np.float32(2.0 ** rng.integers(-3, 4)))   # ties survive a power of 2
    special.append(np.zeros(block_size, np.float32))
    special.append(np.full(block_size, -0.0, np.float32))
    b = np.full(block_size, -0.0, np.float32)
    b[block_size // 3] = 0.75
    special.append(b)
    if dtype == BF16:
        special.append(rng.standard_normal(block_size).astype(np.float32) * np.float32(2.0 ** 120))
        special.append(rng.standard_normal(block_size).astype(np.float32) * np.float32(2.0 ** -100))
        # subnormal bf16 values: a block of them only, and mixed under a small normal absmax
        special.append(rng.integers(-127, 128, block_size).astype(np.float32) * np.float32(2.0 ** -133))
        b = rng.integers(-127, 128, block_size).astype(np.float32) * np.float32(2.0 ** -133)
        b[0] = np.float32(2.0 ** -121)
        special.append(b)
    else:
        special.append(rng.uniform(-60000, 60000, block_size).astype(np.float32))
        # f16 subnormals (normal in float32)
        special.append(rng.integers(-1023, 1024, block_size).astype(np.float32) * np.float32(2.0 ** -24))
    for i in range(n_blocks):
        if i % 2 and special:
            blocks.append(special.pop(0))
        else:
            blocks.append(rng.standard_normal(block_size).astype(np.float32)
                          * np.float32(2.0 ** rng.uniform(lo, hi)))
    x = rng.permuted(np.stack(blocks), axis=1).reshape(-1)   # ties/absmax anywhere, even or odd
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))


def _seed(*parts) -> int:
    return sum(ord(c) for c in repr(parts))   # deterministic (str hashes are salted per process)


def count_ties(x: np.ndarray, fmt: str, block_size: int) -> int:
    """Elements whose scaled value is exactly a midpoint (float32, as the kernels scale)."""
    b = x.reshape(-1, block_size).astype(np.float32)
    a = np.abs(b).max(axis=1)
    ok = a >= np.float32(2.0 ** -126)
    inv = np.where(ok, np.float32(1) / np.where(ok, a, np.float32(1)), np.float32(0)).astype(np.float32)
    return int(np.isin(b * inv[:, None], formats.get_format(fmt).midpoints).sum())


def xla_quantize(x: jax.Array, fmt: str, block_size: int):
    q = qj.quantize(x, fmt, block_size, double_quant=False, backend="xla")
    return np.asarray(q.codes), np.asarray(q.absmax), q


def assert_bits_equal(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    ua = a.view(np.uint8 if a.dtype.itemsize == 1 else f"u{a.dtype.itemsize}")
    ub = b.view(ua.dtype)
    bad = np.flatnonzero(ua.reshape(-1) != ub.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {ua.size} differ, first at {bad[:8]}: " \
                          f"{ua.reshape(-1)[bad[:8]]} vs {ub.reshape(-1)[bad[:8]]}"


def run_quantize_poisoned(x, tables, block_size, rows, tiles=1, encoder="count"):
    """Runs the kernel twice, outputs starting all-0x00 and all-0xFF; returns the first result
    after checking the second equals it."""
    nb = x.size // block_size
    outs = []
    for fill in (0x00, 0xFF):
        init = (jnp.full((nb, block_size // 2), fill, jnp.uint8),
                jax.lax.bitcast_convert_type(jnp.full((nb,), fill * 0x01010101, jnp.uint32), jnp.float32))
        outs.append(pq._quantize_call(x, init, tables=tables, block_size=block_size, rows=rows,
                                      num_warps=4, num_stages=1 if tiles == 1 else 2, tiles=tiles,
                                      encoder=encoder, interpret=INTERPRET))
    for a, b in zip(*outs):
        assert_bits_equal(a, b, "poisoned runs")
    return outs[0]


def run_dequantize_poisoned(packed, absmax, tables, dtype, rows, lut=pq.DEQUANT_LUT, tiles=1, dq=None,
                            dq_block_size=None):
    nb = absmax.size
    outs = []
    for fill in (0x00, 0xFF):
        init = jnp.full((nb, packed.size // nb), fill * 0x01010101, jnp.uint32)
        outs.append(pq._dequantize_call(packed, absmax, init, values=tables.values,
                                        dtype=jnp.dtype(dtype).name, rows=rows, num_warps=4,
                                        num_stages=1 if tiles == 1 else 2, lut=lut, tiles=tiles, dq=dq,
                                        dq_block_size=dq_block_size, interpret=INTERPRET))
    assert_bits_equal(outs[0], outs[1], "poisoned runs")
    return outs[0]


# ------------------------------------------------------------------------------------------
# Premises and pieces


def test_words_are_little_endian():
    """Element 2i of a 16-bit array is the LOW half of uint32 word i (the kernels rely on it)."""
    w = jax.lax.bitcast_convert_type(jnp.array([[0x1234, 0xABCD]], jnp.uint16), jnp.uint32)
    assert int(w[0]) == 0xABCD1234
    back = jax.lax.bitcast_convert_type(jnp.array([0xABCD1234], jnp.uint32), jnp.uint16)
    np.testing.assert_array_equal(np.asarray(back).reshape(-1), [0x1234, 0xABCD])


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_tables_match_formats(fmt):
    f = formats.get_format(fmt)
    t = pq.code_tables(f.values)
    assert_bits_equal(np.asarray(t.values, np.float32), f.values, "values")
    assert_bits_equal(np.asarray(t.midpoints, np.float32), f.midpoints, "midpoints")
    np.testing.assert_array_equal(np.asarray(t.order), f.order)
    assert t.sorted_is_identity == f.sorted_is_identity
    if fmt in _common.CODE_TABLES:
        assert pq.code_tables(fmt) == t


def test_exact_reciprocal():
    rng = np.random.default_rng(0)
    a = (rng.uniform(1, 2, 50000) * 2.0 ** rng.integers(-126, 126, 50000)).astype(np.float32)
    a = np.concatenate([a, np.float32(2.0) ** np.arange(-126, 126).astype(np.float32),
                        np.nextafter(np.float32(2.0) ** np.arange(-125, 126).astype(np.float32), 0),
                        [np.float32(2.0 ** -126), np.float32(2.0 ** 126)]]).astype(np.float32)
    got = np.asarray(jax.jit(pq._exact_reciprocal)(jnp.asarray(a)))
    want = (1.0 / a.astype(np.float64)).astype(np.float32)
    assert_bits_equal(got, want, "reciprocal")
    # and the XLA path's reciprocal agrees wherever it is defined
    assert_bits_equal(got, np.asarray(jax.jit(qmod._reciprocal)(jnp.asarray(a))), "vs _reciprocal")


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_matches_xla(fmt):
    """The binary-search encoder equals the XLA path's rank-and-lookup on midpoints, their float32
    neighbours, the code values, ±0, ±1 and random values."""
    f = formats.get_format(fmt)
    m = f.midpoints
    v = np.concatenate([m, np.nextafter(m, np.float32(2)), np.nextafter(m, np.float32(-2)),
                        f.values, [0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001],
                        np.random.default_rng(1).uniform(-1, 1, 20000)]).astype(np.float32)
    t = pq.code_tables(f.values)
    got = jax.jit(lambda s: pq._encode(s, t))(jnp.asarray(v))
    want = jax.jit(lambda s: qmod._encode(s, f))(jnp.asarray(v))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.int32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_count_encoder_matches_xla(fmt):
    """The counting encoder the quantize kernel runs (here its interpret-mode model) equals the
    XLA path's rank-and-lookup on midpoints, their float32 neighbours, the code values, ±0, ±1,
    subnormals (counted as 0, as XLA:CPU's compare flushes them) and random values."""
    f = formats.get_format(fmt)
    m = f.midpoints
    tiny = np.float32(2.0 ** -140)
    v = np.concatenate([m, np.nextafter(m, np.float32(2)), np.nextafter(m, np.float32(-2)),
                        f.values, [0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, tiny, -tiny],
                        np.random.default_rng(2).uniform(-1, 1, 20000)]).astype(np.float32)
    t = pq.code_tables(f.values)
    got = jax.jit(lambda s: pq._encode_count(s, t, interpret=True))(jnp.asarray(v))
    want = jax.jit(lambda s: qmod._encode(s, f))(jnp.asarray(v))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.float32))


def test_encode_count_linear_form_on_a_permuted_table():
    """A table with permuted codes that is not sign-symmetric takes the "linear" form; it too
    equals the XLA path's rank-and-lookup (ties, neighbours of midpoints, ±0, random values)."""
    rng = np.random.default_rng(7)
    values = rng.permutation(formats.get_format("nf4").values).astype(np.float32)
    f = formats.Format("permuted nf4", values, None)
    t = pq.code_tables(values)
    assert pq._count_terms(t)[0] == "linear" and pq._mirror_codes(t) is None
    m = f.midpoints
    v = np.concatenate([m, np.nextafter(m, np.float32(2)), np.nextafter(m, np.float32(-2)), values,
                        [0.0, -0.0, 1.0, -1.0], rng.uniform(-1, 1, 5000)]).astype(np.float32)
    got = pq._encode_count(jnp.asarray(v), t, interpret=True)
    want = qmod._encode(jnp.asarray(v), f)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_count_terms_step_exactly_at_each_midpoint(fmt):
    """Each saturating term is exactly 0 at its midpoint and at least 1 at the next float above
    it (the smallest normal float above a midpoint 0), in float64 arithmetic (what the fused
    multiply-add computes before its one rounding)."""
    t = pq.code_tables(formats.get_format(fmt).values)
    kind, _, terms = pq._count_terms(t)
    mids = np.asarray(t.midpoints, np.float32)
    if kind == "split":
        pairs = ([(mids[j], b, c_lo) for j, (b, c_lo, _) in enumerate(terms)]
                 + [(mids[8 + j], b, c_hi) for j, (b, _, c_hi) in enumerate(terms)])
    elif kind == "mirror":   # the seven positive midpoints, counted on |v|
        pairs = [(mids[8 + j], b, c) for j, (b, c, _) in enumerate(terms)]
    else:
        pairs = [(mids[i], b, c) for i, (b, c, _) in enumerate(terms)]
    assert kind == ("split" if t.sorted_is_identity else "mirror" if fmt.startswith("fp4") else kind)
    for m, b, c in pairs:
        assert np.float32(c) == c and np.float32(b) == b   # exact float32 constants
        # above 0 the first float that counts is the smallest normal (subnormals count as 0)
        up = float(np.nextafter(m, np.float32(2))) if m != 0 else 2.0 ** -126
        assert float(m) * b + c == 0.0
        assert up * b + c >= 1.0, (fmt, m)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("exponent", [0, -126, -130, 100, 126, 127])
def test_f16x2_encoder_is_exhaustively_exact(fmt, exponent):
    """The "f16x2" encoder's model (interpret mode) gives the code of `_encode` for EVERY bf16
    value of every block whose absmax has one of the 128 bf16 mantissas, at several exponents:
    normal blocks at 2**0, 2**100 and 2**-126 (its subnormal members count as 0), a subnormal
    absmax (2**-130: a scale-0 block), and above 2**126 (reciprocal 0: also scale 0). Each row
    holds every bf16 value of magnitude up to its absmax, paired with the same values reversed
    (so each lands in both halves of a word)."""
    t = pq.code_tables(formats.get_format(fmt).values)
    words, factors = pq._f16x2_table(t)
    grid = pq._bf16_grid_below_two()
    m = (1 + np.arange(128) / 128).astype(np.float32)[:, None]
    x = np.where(np.abs(grid)[None, :] <= m, grid[None, :], 0).astype(np.float32)
    x[:, 0] = -m[:, 0]                                       # the block's absmax, exactly
    x = x * np.float32(2.0 ** exponent)

    @jax.jit
    def mismatches(x):
        xb = x.astype(BF16)
        bits = jax.lax.bitcast_convert_type(xb, jnp.uint16).astype(jnp.int32)
        absmax = pq._block_absmax(jnp.max(bits & 0x7FFF, axis=1), "bfloat16")
        want = pq._encode(xb.astype(jnp.float32) * pq._inverse_scale(absmax, True)[:, None], t)
        row, scale = pq._f16x2_rows(absmax)
        consts = [k[:, None] for k in pq._f16x2_words(jnp.asarray(words), row)]
        w = (bits | (bits[:, ::-1] << 16)).astype(jnp.uint32)
        got = pq._encode_f16x2(w, scale[:, None], consts, factors, interpret=True)
        return jnp.sum(got != want * 16 + want[:, ::-1]), jnp.sum(absmax == 0)

    bad, zero_rows = mismatches(jnp.asarray(x))
    assert int(bad) == 0
    assert int(zero_rows) == (128 if exponent < -126 else 0)


def test_f16x2_table_applies_where_it_is_exact():
    """The table exists for NF4 and Int4 (sorted, midpoints away from 0) and not for FP4 (a
    midpoint at 0) or a permuted table; its constants are exact float16 pairs; row 128 gives
    x' = 0 the code of 0."""
    for fmt in ("nf4", "int4"):
        t = pq.code_tables(formats.get_format(fmt).values)
        words, factors = pq._f16x2_table(t)
        test = words.view(np.uint32)[:129]      # word 0 of each row: the same value in both halves
        assert words.shape == (8 * 129,) and np.all(test & 0xFFFF == test >> 16)
        assert all(b == 2.0 ** round(np.log2(b)) for b in factors)
        zero = pq._encode_f16x2(jnp.zeros((1, 4), jnp.uint32), jnp.zeros((1, 1), jnp.float32),
                                pq._f16x2_words(jnp.asarray(words), jnp.int32(128)), factors, interpret=True)
        code0 = int(qmod._encode(jnp.zeros(1, jnp.float32), formats.get_format(fmt))[0])
        assert np.all(np.asarray(zero) == code0 * 17)
    assert pq._f16x2_table(pq.code_tables(formats.get_format("fp4").values)) is None
    permuted = np.random.default_rng(3).permutation(formats.get_format("nf4").values)
    assert pq._f16x2_table(pq.code_tables(permuted)) is None
    assert pq.resolve_encoder(None, "nf4", BF16) == "f16x2"
    assert pq.resolve_encoder(None, "nf4", F16) == "count"
    with pytest.raises(ValueError, match="f16x2"):
        pq.resolve_encoder("f16x2", "nf4", F16)
    with pytest.raises(ValueError, match="encoder must be one of"):
        pq.resolve_encoder("fast", "nf4", BF16)


def test_argument_checks():
    nf4 = formats.get_format("nf4").values
    with pytest.raises(ValueError, match="bf16/f16"):
        pq.quantize_blocks_pallas(jnp.ones(128, jnp.float32), nf4, 64)
    with pytest.raises(ValueError, match="multiple of block_size"):
        pq.quantize_blocks_pallas(jnp.ones(96, jnp.bfloat16), nf4, 64)
    with pytest.raises(ValueError, match="multiple of block_size"):
        pq.quantize_blocks_pallas(jnp.ones(128, jnp.bfloat16), nf4, 16)
    with pytest.raises(ValueError, match="rows_per_program"):
        pq.quantize_blocks_pallas(jnp.ones(128, jnp.bfloat16), nf4, 64, rows_per_program=3)
    with pytest.raises(ValueError, match="unknown format"):
        pq.code_tables("fp4")   # only NF4 has a name in _common.CODE_TABLES: pass the values
    with pytest.raises(TypeError, match="float32"):
        pq.dequantize_blocks_pallas(jnp.zeros(32, jnp.uint8), jnp.zeros(2, jnp.uint8), nf4)
    with pytest.raises(ValueError, match="bf16/f16 output"):
        pq.dequantize_blocks_pallas(jnp.zeros(32, jnp.uint8), jnp.zeros(2, jnp.float32), nf4, jnp.float32)
    with pytest.raises(ValueError, match="bf16/f16 output"):
        pq.dequantize_blocks_pallas(jnp.zeros(24, jnp.uint8), jnp.zeros(2, jnp.float32), nf4)
    assert pq.default_rows(64) == 64 and pq.default_rows(4096) == 1 and pq.default_rows(64, 5) == 8


# ------------------------------------------------------------------------------------------
# Kernels against the XLA path (interpreted on CPU)


KERNEL_CASES = [
    # format, block_size, dtype, n_blocks, rows per program (n_blocks % rows != 0: masked tail)
    ("nf4", 32, BF16, 52, 16),
    ("nf4", 4096, F16, 3, 2),
    ("fp4", 64, BF16, 27, 8),
    ("fp4", 256, F16, 13, 4),
    ("fp4_e3m0", 64, F16, 20, 8),
    ("fp4_e3m0", 4096, BF16, 3, 1),
    ("int4", 256, BF16, 15, 4),
    ("int4", 32, F16, 40, 32),
]


KERNEL_ENCODER_CASES = [(*case, enc) for case in KERNEL_CASES
                        for enc in pq.encoders_for(formats.get_format(case[0]).values, case[2])]


@pytest.mark.parametrize("fmt,block_size,dtype,n_blocks,rows,encoder", KERNEL_ENCODER_CASES)
def test_kernels_match_xla(fmt, block_size, dtype, n_blocks, rows, encoder):
    x64 = make_input(_seed(fmt, block_size), fmt, dtype, block_size, n_blocks)
    x = jnp.asarray(x64, dtype)
    tables = pq.code_tables(formats.get_format(fmt).values)
    packed, absmax = run_quantize_poisoned(x, tables, block_size, rows, encoder=encoder)
    codes_ref, absmax_ref, q = xla_quantize(x, fmt, block_size)
    assert_bits_equal(packed, codes_ref, "packed codes")
    assert_bits_equal(absmax, absmax_ref, "absmax")
    ref_p, ref_a = pq.quantize_blocks_reference(x, tables, block_size)
    assert_bits_equal(ref_p, codes_ref, "reference codes")
    assert_bits_equal(ref_a, absmax_ref, "reference absmax")
    if tie_scales(fmt, dtype):
        assert count_ties(x64, fmt, block_size) >= min(block_size // 2, 8)   # the inputs hold ties
    for out in (BF16, F16):
        want = qj.dequantize(q, out, backend="xla").reshape(-1)
        for lut in pq.DEQUANT_LUTS:
            got = run_dequantize_poisoned(packed, absmax, tables, out, rows, lut=lut)
            assert_bits_equal(got, want, f"dequantize to {out} ({lut})")
        assert_bits_equal(got, pq.dequantize_blocks_reference(packed, absmax, tables, out), "reference")


@pytest.mark.parametrize("fmt,n_blocks,rows,tiles", [("nf4", 37, 4, 3), ("fp4", 48, 8, 2), ("int4", 9, 2, 8)])
def test_kernels_walk_several_tiles(fmt, n_blocks, rows, tiles):
    """A program walking several tiles in a loop (``tiles_per_program``; the last program's tiles
    partly or wholly past the end) writes every element once, the same bits as XLA."""
    bs = 64
    x = jnp.asarray(make_input(_seed(fmt, bs) + 1, fmt, BF16, bs, n_blocks), BF16)
    tables = pq.code_tables(formats.get_format(fmt).values)
    packed, absmax = run_quantize_poisoned(x, tables, bs, rows, tiles=tiles)
    codes_ref, absmax_ref, q = xla_quantize(x, fmt, bs)
    assert_bits_equal(packed, codes_ref, "packed codes")
    assert_bits_equal(absmax, absmax_ref, "absmax")
    got = run_dequantize_poisoned(packed, absmax, tables, BF16, rows, tiles=tiles)
    assert_bits_equal(got, qj.dequantize(q, BF16, backend="xla").reshape(-1), "dequantize")


def test_dequantize_kernel_random_codes_and_scales():
    """Every code with scales of all sizes (zero, tiny, huge: f16 overflows to inf as XLA does)."""
    rng = np.random.default_rng(7)
    nb, bs = 37, 64
    packed = jnp.asarray(rng.integers(0, 256, nb * bs // 2, dtype=np.uint8))
    absmax = (rng.uniform(0.5, 1, nb) * 2.0 ** rng.integers(-130, 100, nb)).astype(np.float32)
    absmax[:3] = [0.0, 65504.0, 1e5]
    absmax = jnp.asarray(absmax)
    for fmt, out in (("fp4", F16), ("nf4", BF16)):
        tables = pq.code_tables(formats.get_format(fmt).values)
        got = run_dequantize_poisoned(packed, absmax, tables, out, 8)
        q = qmod.QuantizedArray(packed, absmax, None, None, shape=(nb * bs,), dtype=out.name, format=fmt,
                                block_size=bs, dq_block_size=None)
        assert_bits_equal(got, qj.dequantize(q, backend="xla"), f"{fmt} -> {out}")


@pytest.mark.parametrize("nb,rows,tiles,dqbs", [(37, 8, 1, 64), (300, 16, 2, 64), (300, 4, 3, 256)])
def test_dequantize_kernel_decodes_double_quant(nb, rows, tiles, dqbs):
    """Given the 8-bit scale codes with their second-level scales and offset, the kernel decodes
    the scales itself, bit for bit as the library does (`decode_absmax`, then the dense values):
    ragged tiles and second-level blocks, several tiles a program, every code, scales of many
    magnitudes, outputs poisoned before the call."""
    rng = np.random.default_rng(nb + rows)
    bs = 64
    packed = jnp.asarray(rng.integers(0, 256, nb * bs // 2, dtype=np.uint8))
    codes = rng.integers(0, 256, nb, dtype=np.uint8)
    codes[:2] = [0, 255]
    codes = jnp.asarray(codes)
    scale = jnp.asarray((rng.uniform(0.5, 1, -(-nb // dqbs)) * 2.0 ** rng.integers(-20, 20, -(-nb // dqbs)))
                        .astype(np.float32))
    offset = jnp.float32(rng.uniform(0.01, 0.5))
    values = formats.get_format("nf4").values
    q = qmod.QuantizedArray(packed, codes, scale, offset, shape=(nb * bs,), dtype="bfloat16", format="nf4",
                            block_size=bs, dq_block_size=dqbs)
    want = qj.dequantize(q, backend="xla")
    table = jnp.asarray(formats.dynamic_map())
    got = run_dequantize_poisoned(packed, codes, pq.code_tables(values), BF16, rows, tiles=tiles,
                                  dq=(scale, offset, table), dq_block_size=dqbs)
    assert_bits_equal(got, want, "in-kernel double quant")
    public = pq.dequantize_blocks_pallas(packed, codes, values, BF16, absmax_scale=scale, absmax_offset=offset,
                                         dq_block_size=dqbs, rows_per_program=rows, tiles_per_program=tiles,
                                         interpret=INTERPRET)
    assert_bits_equal(public, want, "public entry point")


def test_dequantize_double_quant_argument_checks():
    nf4 = formats.get_format("nf4").values
    packed, codes, scale = jnp.zeros(64, jnp.uint8), jnp.zeros(4, jnp.uint8), jnp.ones(1, jnp.float32)
    kw = dict(absmax_scale=scale, absmax_offset=jnp.float32(0), dq_block_size=4)
    with pytest.raises(TypeError, match="uint8 codes"):
        pq.dequantize_blocks_pallas(packed, codes.astype(jnp.float32), nf4, **kw)
    with pytest.raises(ValueError, match="absmax_offset"):
        pq.dequantize_blocks_pallas(packed, codes, nf4, **{**kw, "absmax_offset": None})
    with pytest.raises(ValueError, match="positive int dq_block_size"):
        pq.dequantize_blocks_pallas(packed, codes, nf4, **{**kw, "dq_block_size": 0})
    with pytest.raises(ValueError, match="need 2 absmax_scale values, got 1"):
        pq.dequantize_blocks_pallas(packed, codes, nf4, **{**kw, "dq_block_size": 2})
    with pytest.raises(ValueError, match="256 values"):
        pq.dequantize_blocks_pallas(packed, codes, nf4, **kw, absmax_table=np.ones(16))
    with pytest.raises(ValueError, match="go with absmax_scale"):
        pq.dequantize_blocks_pallas(packed, jnp.ones(4, jnp.float32), nf4, absmax_offset=jnp.float32(0))


# ------------------------------------------------------------------------------------------
# Double quantization: the second-level kernel against `double_quantize` (interpreted on CPU)


DQ_MIDS = formats.dynamic_map_midpoints()


def dq_scales(seed: int, n: int, block: int, offset: float) -> np.ndarray:
    """float32 first-level scales [n] built block by block in the centred domain (``c = a -
    offset`` as float32 computes it), cycling through: exact ties (``c * RN(1/scale)`` is a
    dynamic-map midpoint; power-of-two and arbitrary scales) with their float32 neighbours,
    random values over many magnitudes, a block of equal values, and a block equal to the
    offset (centred to zero)."""
    rng = np.random.default_rng(seed)
    off = np.float32(offset)
    out = []
    for j in range(-(-n // block)):
        m = min(block, n - j * block)
        kind = j % 4   # a single block holds ties
        sign = np.float32(1 if (j + seed) % 3 else -1)
        if kind == 0:   # ties
            s = (np.float32(2.0 ** rng.integers(-8, 0)) if j % 2 else
                 np.float32(rng.uniform(2.0 ** -8, 1)))
            a0 = np.float32(off + sign * s)
            s_act = np.abs(np.float32(a0 - off))
            inv = np.float32(1) / s_act
            near = []
            base = np.float32(off + (DQ_MIDS.astype(np.float64) / np.float64(inv)))
            for k in (-2, -1, 0, 1, 2):
                cand = base
                for _ in range(abs(k)):
                    cand = np.nextafter(cand, np.float32(np.inf if k > 0 else -np.inf))
                near.append(cand.astype(np.float32))
            near = np.concatenate(near)
            c = np.float32(near - off)
            near = near[np.abs(c) <= s_act]
            exact = near[np.isin(np.float32(np.float32(near - off) * inv), DQ_MIDS)]
            fill = rng.uniform(-1, 1, m).astype(np.float32) * s_act + off
            b = np.concatenate([[a0], rng.permutation(exact), rng.permutation(exact), rng.permutation(near),
                                fill]).astype(np.float32)[:m]
        elif kind == 1:   # random, many magnitudes
            b = (off + rng.standard_normal(m) * 2.0 ** rng.uniform(-12, 2)).astype(np.float32)
        elif kind == 2:   # equal values: centred +-s everywhere (codes 255 or 0)
            b = np.full(m, np.float32(off + sign * np.float32(0.37)), np.float32)
        else:             # equal to the offset: centred 0, scale 0 (code 127)
            b = np.full(m, off, np.float32)
        out.append(rng.permutation(b))
    return np.concatenate(out).astype(np.float32)


def count_dq_ties(a: np.ndarray, offset: float, block: int) -> int:
    """Scales whose scaled centred value is exactly a midpoint (float32, as the kernel scales)."""
    c = np.float32(a - np.float32(offset))
    pad = np.zeros(-c.size % block, np.float32)
    blocks = np.concatenate([c, pad]).reshape(-1, block)
    s = np.abs(blocks).max(axis=1)
    ok = s >= np.float32(2.0 ** -126)
    inv = np.where(ok, np.float32(1) / np.where(ok, s, np.float32(1)), np.float32(0)).astype(np.float32)
    v = (blocks * inv[:, None]).reshape(-1)[: c.size]
    return int(np.isin(v, DQ_MIDS).sum())


def run_dq_poisoned(a, offset, block, rows):
    """The second-level kernel twice, outputs starting all-0x00 and all-0xFF (aliased); returns
    the first result after checking the second equals it."""
    n = a.size
    n_scales = -(-n // block)
    outs = []
    for fill in (0x00, 0xFF):
        poison = jnp.full((n_scales,), fill * 0x01010101, jnp.uint32)
        init = (jnp.full((n,), fill, jnp.uint8), jax.lax.bitcast_convert_type(poison, jnp.float32))
        outs.append(pq._double_quantize_call(a, offset, init, block=block, rows=rows, num_warps=4,
                                             num_stages=1, interpret=INTERPRET))
    for x, y in zip(*outs):
        assert_bits_equal(x, y, "poisoned runs")
    return outs[0]


def test_dq_midpoints_match_formats():
    assert_bits_equal(pq.DQ_MIDPOINTS, formats.dynamic_map_midpoints(), "dynamic-map midpoints")
    assert_bits_equal(_common.DYNAMIC_MAP, formats.dynamic_map(), "dynamic map")


@pytest.mark.parametrize("search", pq.DQ_SEARCHES)
def test_encode_dynamic_matches_searchsorted(search):
    """The symmetric binary search (from constants, or gathering from the threshold table)
    equals the XLA path's ``searchsorted(compare_all)`` on the clipped values: midpoints (ties
    go lower), their float32 neighbours, the map's values, ±0, ±1 and just past, tiny and
    random values."""
    m = DQ_MIDS
    v = np.concatenate([m, np.nextafter(m, np.float32(2)), np.nextafter(m, np.float32(-2)),
                        formats.dynamic_map(), -formats.dynamic_map(),
                        [0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-30, -1e-30, 2.0 ** -126],
                        np.random.default_rng(2).uniform(-1, 1, 20000),
                        np.random.default_rng(3).uniform(-1, 1, 5000) * 1e-4]).astype(np.float32)
    table = jnp.asarray(pq.DQ_POSITIVE_BITS) if search == "gather" else None
    got = np.asarray(jax.jit(pq._encode_dynamic)(jnp.asarray(v), table))
    want = jnp.searchsorted(jnp.asarray(m), jnp.clip(jnp.asarray(v), -1, 1), side="left",
                            method="compare_all")
    np.testing.assert_array_equal(got, np.asarray(want))
    np.testing.assert_array_equal(got, np.searchsorted(m, v, side="left"))


DQ_CASES = [
    # n scales, dq_block_size, blocks a program, offset ("mean": `_exact_mean` of the scales)
    (1, 256, 1, 0.0375),
    (255, 256, 1, 0.0375),
    (256, 256, 1, "mean"),
    (257, 256, 2, 0.0375),        # ragged: the second block holds one scale
    (4096 + 3, 256, 4, "mean"),   # 17 blocks, 5 programs: masked rows and a ragged block
    (1000, 64, 8, 0.8),
    (4096, 4096, 1, 0.01),
]


@pytest.mark.parametrize("n,block,rows,offset", DQ_CASES)
def test_dq_kernel_matches_xla(n, block, rows, offset):
    fixed = 0.0375 if offset == "mean" else offset
    a = dq_scales(_seed(n, block), n, block, fixed)
    aj = jnp.asarray(a)
    off = qmod._exact_mean(aj) if offset == "mean" else jnp.float32(offset)
    codes, scale = run_dq_poisoned(aj, off, block, rows)
    want_codes, want_scale, _ = qmod.double_quantize(aj, block, offset=off)
    assert_bits_equal(codes, want_codes, "codes")
    assert_bits_equal(scale, want_scale, "scales")
    ref_codes, ref_scale = pq.double_quantize_reference(aj, off, block)
    assert_bits_equal(ref_codes, want_codes, "reference codes")
    assert_bits_equal(ref_scale, want_scale, "reference scales")
    if offset != "mean" and n >= block:
        assert count_dq_ties(a, offset, block) >= 16   # the inputs hold exact ties
    # the public wrapper, default tiles, each search
    for search in pq.DQ_SEARCHES:
        got = pq.double_quantize_pallas(aj, off, block, search=search, interpret=INTERPRET)
        assert_bits_equal(got[0], want_codes, f"codes (default tiles, search={search})")
        assert_bits_equal(got[1], want_scale, f"scales (default tiles, search={search})")


def _adversarial_scales() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "zeros": np.zeros(300, np.float32),
        "all equal 0.1": np.full(4096 + 3, 0.1, np.float32),
        "all equal 3": np.full(513, 3.0, np.float32),
        "huge + 1 + tiny": np.array([2.0 ** 24, 1.0] + [2.0 ** -25] * 1000, np.float32),
        "huge and tiny": rng.permutation(np.concatenate([np.full(7, 1e30), np.full(600, 1e-30),
                                                         rng.uniform(0, 1, 300)])).astype(np.float32),
        "random": (np.abs(rng.standard_normal(4096 + 3)) * 0.05).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(_adversarial_scales()))
def test_double_quant_paths_agree(name):
    """The "pallas" double quantization (mean in XLA, then the kernel) stores what
    `double_quantize` stores, offset included, on adversarial scales."""
    a = jnp.asarray(_adversarial_scales()[name])
    for block in (64, 256):
        got = qmod._double_quantize_backend(a, block, "pallas", INTERPRET)
        want = qmod.double_quantize(a, block)
        for g, w, what in zip(got, want, ("codes", "scales", "offset")):
            assert_bits_equal(g, w, f"{what} (dq_block_size={block})")
        assert_bits_equal(got[2], qmod._exact_mean(a), "offset is _exact_mean")
        if name in ("zeros", "all equal 3"):   # centred to zero: the zero code, scale 0
            assert np.all(np.asarray(got[0]) == 127) and np.all(np.asarray(got[1]) == 0)


def test_dq_argument_checks():
    a = jnp.ones(300, jnp.float32)
    with pytest.raises(TypeError, match="float32"):
        pq.double_quantize_pallas(a.astype(jnp.bfloat16), 0.5)
    with pytest.raises(ValueError, match="dq_block_size"):
        pq.double_quantize_pallas(a, 0.5, 32)
    with pytest.raises(ValueError, match="dq_block_size"):
        pq.double_quantize_pallas(jnp.ones(0, jnp.float32), 0.5)
    with pytest.raises(ValueError, match="scalar"):
        pq.double_quantize_pallas(a, jnp.ones(2))
    with pytest.raises(ValueError, match="rows_per_program"):
        pq.double_quantize_pallas(a, 0.5, 64, blocks_per_program=3)
    with pytest.raises(ValueError, match="search"):
        pq.double_quantize_pallas(a, 0.5, 64, search="linear")
    assert pq.default_dq_blocks(256) == 2 and pq.default_dq_blocks(64) == 8
    assert pq.default_dq_blocks(4096) == 1 and pq.default_dq_blocks(256, 1) == 1
    assert pq.dq_supported(1, 64) and not pq.dq_supported(1, 32) and not pq.dq_supported(0, 256)


# ------------------------------------------------------------------------------------------
# Through the public API


@pytest.mark.parametrize("fmt,dtype,block_size,dq_block_size,shape", [
    ("nf4", BF16, 64, 64, (24, 160)),      # 60 blocks: one ragged second-level block
    ("int4", F16, 32, 64, (40, 104)),      # 130 blocks: three second-level blocks, the last ragged
    ("fp4", F16, 128, None, (8, 3, 128)),
])
def test_public_api_backends_agree(fmt, dtype, block_size, dq_block_size, shape):
    n = int(np.prod(shape))
    x = jnp.asarray(make_input(3, fmt, dtype, block_size, n // block_size).reshape(shape), dtype)
    dq = dq_block_size is not None
    kw = dict(double_quant=dq, dq_block_size=dq_block_size or 256)
    qp = qj.quantize(x, fmt, block_size, backend="pallas", **kw)
    qx = qj.quantize(x, fmt, block_size, backend="xla", **kw)
    assert (qp.shape, qp.dtype, qp.dq_block_size) == (qx.shape, qx.dtype, qx.dq_block_size)
    for a, b in zip(qp.arrays(), qx.arrays()):
        assert_bits_equal(a, b, "stored arrays")
    for out in (BF16, F16):
        dp = qj.dequantize(qp, out, backend="pallas")
        assert dp.shape == shape and dp.dtype == out
        assert_bits_equal(dp, qj.dequantize(qx, out, backend="xla"), f"dequantize {out}")
    # under jit, with the backend forced
    qj_ = jax.jit(lambda a: qj.quantize(a, fmt, block_size, backend="pallas", interpret=INTERPRET, **kw))(x)
    for a, b in zip(qj_.arrays(), qx.arrays()):
        assert_bits_equal(a, b, "stored arrays (jit)")


def test_backend_resolution():
    x = jnp.ones((4, 64), jnp.bfloat16)
    res = qmod._resolve_backend
    assert res("xla", None, (x,), x.dtype, x.size, 64, "q") == ("xla", False)
    expect_auto = ("pallas", False) if ON_GPU else ("xla", False)
    assert res("auto", None, (x,), x.dtype, x.size, 64, "q") == expect_auto
    assert res("pallas", None, (x,), x.dtype, x.size, 64, "q") == ("pallas", INTERPRET)
    assert res("pallas", False, (x,), x.dtype, x.size, 64, "q") == ("pallas", False)
    # under jit "auto" never takes the kernel (placement and sharding unknown)
    seen = []
    jax.jit(lambda a: seen.append(res("auto", None, (a,), a.dtype, a.size, 64, "q")) or a)(x)
    assert seen == [("xla", False)]
    # what the kernels cannot serve: auto falls back, pallas refuses
    for dtype, n, bs in ((jnp.float32, 256, 64), (jnp.bfloat16, 100, 32), (jnp.bfloat16, 96, 64)):
        y = jnp.ones((n,), dtype)
        assert res("auto", None, (y,), y.dtype, n, bs, "q")[0] == "xla"
        with pytest.raises(ValueError, match="backend='pallas'"):
            res("pallas", None, (y,), y.dtype, n, bs, "q")
    with pytest.raises(ValueError, match="unknown backend"):
        qj.quantize(x, backend="triton")
    with pytest.raises(ValueError, match="backend='pallas'"):
        qj.dequantize(qj.quantize(x, backend="xla"), jnp.float32, backend="pallas")
    # default arguments keep working everywhere (a partial last block, float32)
    q = qj.quantize(jnp.ones((3, 5), jnp.bfloat16), "nf4", 32)
    assert qj.dequantize(q).shape == (3, 5)


def test_without_pallas_kernels(monkeypatch):
    """qlora_jax works where `pallas_kernels.quantize` cannot be imported: "auto" uses XLA,
    "pallas" says why it cannot."""
    import pallas_kernels

    monkeypatch.setitem(sys.modules, "pallas_kernels.quantize", None)   # import raises ImportError
    monkeypatch.delattr(pallas_kernels, "quantize")
    monkeypatch.setattr(qmod, "_PALLAS_MODULE", None)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(256), jnp.bfloat16)
    q = qj.quantize(x, "nf4", 64)
    assert_bits_equal(q.codes, qj.quantize(x, "nf4", 64, backend="xla").codes)
    with pytest.raises(ValueError, match="cannot be imported"):
        qj.quantize(x, "nf4", 64, backend="pallas")


def test_non_finite_input():
    x = np.random.default_rng(0).standard_normal(4 * 64).astype(np.float32)
    x[70] = np.inf
    x[200] = np.nan
    xb = jnp.asarray(x, jnp.bfloat16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qj.quantize(xb, "nf4", 64, backend="pallas")
    q = jax.jit(lambda a: qj.quantize(a, "nf4", 64, double_quant=False, backend="pallas",
                                      interpret=INTERPRET))(xb)
    qx = qj.quantize(xb.at[70].set(0).at[200].set(0), "nf4", 64, double_quant=False, backend="xla")
    a = np.asarray(q.absmax)
    assert np.isnan(a[1]) and np.isnan(a[3])
    assert_bits_equal(a[[0, 2]], np.asarray(qx.absmax)[[0, 2]], "finite blocks' scales")
    assert_bits_equal(np.asarray(q.codes)[:32], np.asarray(qx.codes)[:32], "finite block's codes")


# ------------------------------------------------------------------------------------------
# Lowering to Triton without a GPU


@pytest.mark.parametrize("fmt,block_size,dtype,n_blocks", [("fp4", 4096, BF16, 3), ("nf4", 32, F16, 1000),
                                                          ("permuted nf4", 64, BF16, 10), ("nf4", 64, BF16, 9),
                                                          ("int4", 256, BF16, 5)])
def test_kernels_lower_to_triton(fmt, block_size, dtype, n_blocks):
    """Both kernels (dequantize with each lookup) lower to verified Triton IR for an H100 (every
    primitive has a Triton lowering rule; compiling the IR to PTX still needs the GPU), with
    each encoder: "f16x2" (bf16 NF4 and Int4) and each form of "count" (split: NF4 f16, mirror:
    FP4, linear: a permuted table)."""
    if fmt == "permuted nf4":
        values = np.random.default_rng(7).permutation(formats.get_format("nf4").values)
    else:
        values = formats.get_format(fmt).values
    n = n_blocks * block_size
    lowers_for_h100(lambda a: pq.quantize_blocks_pallas(a, values, block_size),
                    jax.ShapeDtypeStruct((n,), dtype))
    lowers_for_h100(lambda a: pq.quantize_blocks_pallas(a, values, block_size, tiles_per_program=3,
                                                        num_stages=2),
                    jax.ShapeDtypeStruct((n,), dtype))
    for lut in pq.DEQUANT_LUTS:
        lowers_for_h100(lambda p, s, lut=lut: pq.dequantize_blocks_pallas(p, s, values, dtype, lut=lut),
                        jax.ShapeDtypeStruct((n // 2,), jnp.uint8),
                        jax.ShapeDtypeStruct((n_blocks,), jnp.float32))
    # the scales decoded in the kernel (their gathers from the code table and the second-level scales)
    lowers_for_h100(lambda p, c, s, o: pq.dequantize_blocks_pallas(p, c, values, dtype, absmax_scale=s, absmax_offset=o,
                                                                   dq_block_size=4),
                    jax.ShapeDtypeStruct((n // 2,), jnp.uint8), jax.ShapeDtypeStruct((n_blocks,), jnp.uint8),
                    jax.ShapeDtypeStruct((-(-n_blocks // 4),), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))


@pytest.mark.parametrize("search", pq.DQ_SEARCHES)
@pytest.mark.parametrize("n,dq_block_size", [(1 << 20, 256), (4096 + 3, 256), (1, 4096)])
def test_dq_kernel_lowers_to_triton(n, dq_block_size, search):
    """The second-level kernel lowers to verified Triton IR for an H100 (whole and ragged tiles,
    each search)."""
    lowers_for_h100(lambda a, o: pq.double_quantize_pallas(a, o, dq_block_size, search=search),
                    jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))


# ------------------------------------------------------------------------------------------
# On a real GPU (compiled)


GPU_CASES = [
    # shape, block_size, format, dtype: 8192x8192 in every format, then ragged shapes (the last
    # program's rows partly masked: 4097*192/64 = 12291 blocks, 1001 blocks of 256, 4095 of 4096)
    ((8192, 8192), 64, "nf4", BF16),
    ((8192, 8192), 64, "fp4", BF16),
    ((8192, 8192), 64, "int4", F16),
    ((8192, 8192), 4096, "fp4_e3m0", BF16),
    ((4097, 192), 64, "nf4", F16),
    ((1001, 256), 256, "int4", BF16),
    ((4095, 4096), 4096, "nf4", BF16),
    ((3, 7, 32), 32, "fp4", F16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,block_size,fmt,dtype", GPU_CASES)
def test_gpu_kernels_match_xla(shape, block_size, fmt, dtype):
    key = jax.random.key(sum(shape) + block_size)
    x = jax.random.normal(key, shape, jnp.float32).astype(dtype)
    assert qmod._resolve_backend("auto", None, (x,), x.dtype, x.size, block_size, "q") == ("pallas", False)
    for dq in (False, True):
        qp = qj.quantize(x, fmt, block_size, dq, backend="pallas")
        qx = qj.quantize(x, fmt, block_size, dq, backend="xla")
        for a, b in zip(qp.arrays(), qx.arrays()):
            assert_bits_equal(a, b, f"stored arrays dq={dq}")
        for out in (BF16, F16):
            assert_bits_equal(qj.dequantize(qp, out, backend="pallas"),
                              qj.dequantize(qx, out, backend="xla"), f"dequantize {out} dq={dq}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,block_size,dtype,n_blocks,rows,encoder", KERNEL_ENCODER_CASES)
def test_gpu_special_values(fmt, block_size, dtype, n_blocks, rows, encoder):
    """The CPU cases (ties, zeros, extremes, subnormals, masked tails) compiled, against XLA:GPU.
    One documented divergence is allowed: a bf16 block whose largest value is subnormal stores
    absmax 0 from the kernel, where XLA:GPU may keep the subnormal (the codes are equal)."""
    x = jnp.asarray(make_input(_seed(fmt, block_size), fmt, dtype, block_size, n_blocks), dtype)
    tables = pq.code_tables(formats.get_format(fmt).values)
    packed, absmax = run_quantize_poisoned(x, tables, block_size, rows, encoder=encoder)
    codes_ref, absmax_ref, q = xla_quantize(x, fmt, block_size)
    assert_bits_equal(packed, codes_ref, "packed codes")
    a, b = np.asarray(absmax), np.asarray(absmax_ref)
    tiny = (a == 0) & (np.abs(b) < np.float32(2.0 ** -126))
    assert_bits_equal(a[~tiny], b[~tiny], "absmax")
    for out in (BF16, F16):
        got = run_dequantize_poisoned(packed, absmax_ref, tables, out, rows)
        assert_bits_equal(got, qj.dequantize(q, out, backend="xla").reshape(-1), f"dequantize {out}")


@pytest.mark.gpu
def test_gpu_double_quantize_1m():
    """Double quantization of ~1M scales compiled: the "pallas" path (mean in XLA:GPU, then the
    kernel) against XLA:GPU's `double_quantize`, for the scales of a real 8192x8192 bf16 weight
    and adversarial ones (ties, equal values, huge + tiny, zeros), dq blocks of 64..4096, ragged
    sizes; and the bare kernel (poisoned outputs) at the default tiles."""
    x = jax.random.normal(jax.random.key(11), (8192, 8192), jnp.float32).astype(BF16)
    real = qj.quantize(x, "nf4", 64, double_quant=False, backend="pallas").absmax   # 1M scales
    n = 1 << 20
    cases = {
        "real": real,
        "real, ragged": real[: n - 5],
        "ties": jnp.asarray(dq_scales(17, n + 3, 256, 0.0375)),
        "all equal 0.1": jnp.full((n,), 0.1, jnp.float32),
        "huge + 1 + tiny": jnp.asarray(np.array([2.0 ** 24, 1.0] + [2.0 ** -25] * (n - 2), np.float32)),
        "zeros": jnp.zeros((n,), jnp.float32),
    }
    for name, a in cases.items():
        for block in (64, 256, 1024, 4096):
            got = qmod._double_quantize_backend(a, block, "pallas", False)
            want = qmod.double_quantize(a, block)
            for g, w, what in zip(got, want, ("codes", "scales", "offset")):
                assert_bits_equal(g, w, f"{name}: {what} (dq_block_size={block})")
        off = jnp.float32(0.0375)
        rows = pq.default_dq_blocks(256, -(-a.size // 256))
        codes, scale = run_dq_poisoned(a, off, 256, rows)
        want_codes, want_scale, _ = qmod.double_quantize(a, 256, offset=off)
        assert_bits_equal(codes, want_codes, f"{name}: kernel codes")
        assert_bits_equal(scale, want_scale, f"{name}: kernel scales")
        for search in pq.DQ_SEARCHES:
            got = pq.double_quantize_pallas(a, off, 256, search=search)
            assert_bits_equal(got[0], want_codes, f"{name}: codes (search={search})")
            assert_bits_equal(got[1], want_scale, f"{name}: scales (search={search})")
    assert count_dq_ties(np.asarray(cases["ties"]), 0.0375, 256) >= 1000
