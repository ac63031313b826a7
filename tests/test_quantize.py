"""Blockwise 4-bit quantization against an independent numpy reference, property tests, and errors.

The reference (``ref_*`` below) is written from the storage-layout description in
``qlora_jax/quantize.py`` and torch_anchors.md §1(b)-(e), not from the implementation:
blockwise absmax over the row-major flattened array, ``scaled = x * (1/absmax)`` in float32
(clamped to [-1, 1]), nearest code by brute-force argmin over float64 distances with ties to the
lower value, two codes a byte with the first element in the high nibble, and for double
quantization an 8-bit nearest-entry search in the dynamic map after subtracting the mean.

The argmin and the midpoint rule of the implementation (rank among the float32 midpoints) can
only disagree where a scaled value sits exactly on a float32 midpoint that differs from the exact
midpoint, or between two codes of equal value (FP4's and E3M0's two zeros); `assert_codes_match`
allows exactly those cases and nothing else.

Compilation dominates the run time on CPU (about 1 s per distinct (length, format, block size,
DQ)), so the tests share a few shapes and configurations; the full format x block-size x DQ
sweep is marked slow.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qlora_jax as qj
from qlora_jax import formats
from qlora_jax.quantize import tree_path_str

F32 = np.float32
TINY = F32(2.0**-126)  # smallest normal float32: XLA flushes anything below to zero
EPS = float(np.finfo(np.float32).eps)
FORMAT_NAMES = ("nf4", "fp4", "fp4_e3m0", "int4")
HYPO = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

# ------------------------------------------------------------------------------------------
# Independent numpy reference


def ref_nearest(scaled: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Code of the nearest table value (float64 distance); ties go to the lower value."""
    order = np.argsort(table, kind="stable")
    values = table[order].astype(np.float64)
    dist = np.abs(np.asarray(scaled, np.float64)[:, None] - values[None, :])
    return order[np.argmin(dist, axis=1)].astype(np.uint8)  # argmin takes the first minimum


def ref_blocks(flat: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(absmax float32 [nb], scaled float32 [nb * block_size]) of zero-padded blocks."""
    n = flat.size
    nb = -(-n // block_size)
    blocks = np.zeros(nb * block_size, F32)
    blocks[:n] = flat
    blocks = blocks.reshape(nb, block_size)
    absmax = np.abs(blocks).max(axis=1)
    ok = absmax >= TINY
    inv = np.where(ok, F32(1) / np.where(ok, absmax, F32(1)), F32(0)).astype(F32)
    scaled = np.clip(blocks * inv[:, None], F32(-1), F32(1)).astype(F32)
    return absmax, scaled.reshape(-1)


def ref_double_quant(absmax: np.ndarray, dq_block_size: int, offset: np.float32) -> dict:
    centred = (absmax - F32(offset)).astype(F32)
    scale, scaled = ref_blocks(centred, dq_block_size)
    scaled = scaled[: absmax.size]
    return dict(codes=ref_nearest(scaled, formats.dynamic_map()), scale=scale, scaled=scaled)


def ref_quantize(x: np.ndarray, fmt: str, block_size: int, dq_block_size: int | None,
                 offset: np.float32 | None = None) -> dict:
    """Reference codes/absmax; ``offset`` defaults to the float64 mean rounded to float32."""
    flat = np.asarray(x, F32).reshape(-1)
    n = flat.size
    absmax, scaled = ref_blocks(flat, block_size)
    scaled = scaled[: n + n % 2]  # an odd count is padded with one 0 element
    codes = ref_nearest(scaled, formats.get_format(fmt).values)
    out = dict(codes=codes, scaled=scaled, absmax=absmax,
               packed=((codes[0::2] << 4) | codes[1::2]).astype(np.uint8))
    if dq_block_size is not None:
        exact = F32(np.mean(absmax.astype(np.float64)))
        out["offset_exact"] = exact
        out["dq"] = ref_double_quant(absmax, dq_block_size, exact if offset is None else offset)
    return out


def ref_decode_absmax(q: qj.QuantizedArray) -> np.ndarray:
    """First-level scales as float32, decoded as documented: map[code] * scale, then + offset."""
    if not q.double_quant:
        return np.asarray(q.absmax)
    m = formats.dynamic_map()[np.asarray(q.absmax)]
    s = np.repeat(np.asarray(q.absmax_scale), q.dq_block_size)[: q.n_blocks]
    return ((m * s).astype(F32) + np.asarray(q.absmax_offset)).astype(F32)


def unpack(q: qj.QuantizedArray) -> np.ndarray:
    """All stored nibbles, high nibble first: [ceil(n/2) * 2] uint8."""
    b = np.asarray(q.codes)
    return np.stack([b >> 4, b & 0xF], axis=-1).reshape(-1)


def ref_dequantize_f32(q: qj.QuantizedArray) -> np.ndarray:
    vals = formats.get_format(q.format).values[unpack(q)[: q.size]]
    a = np.repeat(ref_decode_absmax(q), q.block_size)[: q.size]
    return (vals * a).astype(F32).reshape(q.shape)


def half_widest_gap(table: np.ndarray) -> float:
    """Largest distance from a point of [-1, 1] to its nearest table value: half the widest gap
    between neighbouring values, or the distance from an end of [-1, 1] to the table's edge."""
    s = np.sort(table.astype(np.float64))
    return float(max(np.diff(s).max() / 2, s[0] + 1, 1 - s[-1]))


def assert_codes_match(got: np.ndarray, want: np.ndarray, scaled: np.ndarray, table: np.ndarray,
                       what: str) -> int:
    """got == want, except where the two decode to the same value, or where the scaled value is
    exactly the float32 midpoint of the two values and got is the lower. Returns the count of
    such midpoint ties."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    bad = np.flatnonzero(got != want)
    a, b = table[got[bad]].astype(np.float64), table[want[bad]].astype(np.float64)
    same = a == b
    mid = ((a + b) / 2).astype(F32)
    tie = (scaled[bad] == mid) & (a < b)
    wrong = bad[~(same | tie)]
    assert wrong.size == 0, (f"{what}: {wrong.size} codes differ from the reference, first at "
                             f"{wrong[:5]}: got {got[wrong[:5]]} want {want[wrong[:5]]} "
                             f"scaled {scaled[wrong[:5]]}")
    return int(tie.sum())


def check_against_reference(x: np.ndarray, fmt: str, block_size: int, dq_block_size: int | None):
    q = qj.quantize(x, fmt, block_size, dq_block_size is not None, dq_block_size or 256)
    q.validate()
    n = x.size
    ref = ref_quantize(x, fmt, block_size, dq_block_size,
                       offset=None if dq_block_size is None else np.asarray(q.absmax_offset))
    table = formats.get_format(fmt).values
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (-(-n // 2),)
    nibbles = unpack(q)
    assert_codes_match(nibbles, ref["codes"], ref["scaled"], table, f"{fmt}/{block_size} codes")
    if n % 2:  # the padding nibble encodes 0
        assert table[nibbles[-1]] == 0
    if dq_block_size is None:
        assert q.absmax.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint32), ref["absmax"].view(np.uint32))
        assert q.absmax_scale is None and q.absmax_offset is None
    else:
        offset = np.asarray(q.absmax_offset)
        assert offset.dtype == np.float32 and offset.shape == ()
        assert abs(int(offset.view(np.int32)) - int(ref["offset_exact"].view(np.int32))) <= 1
        dq = ref["dq"]
        assert q.absmax.dtype == jnp.uint8
        assert_codes_match(np.asarray(q.absmax), dq["codes"], dq["scaled"], formats.dynamic_map(),
                           f"{fmt}/{block_size} absmax codes")
        np.testing.assert_array_equal(np.asarray(q.absmax_scale), dq["scale"])
    return q


# ------------------------------------------------------------------------------------------
# Test data


def sample(shape, seed: int = 0) -> np.ndarray:
    """Normal values with per-element magnitudes spread over 6 decades, exact zeros, an all-zero
    stretch and a run of repeated values."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)
    x[rng.random(n) < 0.05] = 0.0
    x[64:128] = 0.0  # a whole block of zeros for block sizes 32 and 64
    x[200:260] = x[199]  # repeated values
    return x.astype(F32).reshape(shape)


S1 = (5, 33, 61)  # 10065 elements: odd, 3-D, a partial last block at every block size
# One (format, block size, DQ) per block size and both DQ modes for every format; the rest of
# the 4 x 8 x 2 sweep is slow.
FAST_CONFIGS = [("nf4", 32, True), ("fp4", 64, False), ("fp4_e3m0", 128, True), ("int4", 256, False),
                ("nf4", 512, False), ("fp4", 1024, True), ("fp4_e3m0", 2048, False), ("int4", 4096, True)]
ALL_CONFIGS = list(itertools.product(FORMAT_NAMES, formats.BLOCK_SIZES, (False, True)))
# The property tests reuse the first four (and so their compiled programs).
PROPERTY_CONFIGS = FAST_CONFIGS[:4]


def _dq_for(block_size: int) -> int:
    return 64 if block_size == 32 else 256  # a non-default second-level block size too


def quant(x, fmt: str, block_size: int, dq: bool) -> qj.QuantizedArray:
    """`qj.quantize` with this file's second-level block size for ``block_size``."""
    return qj.quantize(x, fmt, block_size, dq, _dq_for(block_size))


def _config_params(configs, slow=()):
    return [pytest.param(f, b, dq, id=f"{f}-{b}-{'dq' if dq else 'nodq'}",
                         marks=([pytest.mark.slow] if (f, b, dq) in slow else [])
                         )
            for f, b, dq in configs]


# ------------------------------------------------------------------------------------------
# Exact agreement with the reference


@pytest.mark.parametrize("fmt,block_size,dq", _config_params(FAST_CONFIGS))
def test_matches_reference(fmt, block_size, dq):
    check_against_reference(sample(S1, seed=block_size), fmt, block_size, _dq_for(block_size) if dq else None)


@pytest.mark.parametrize("fmt,block_size,dq", _config_params(
    [c for c in ALL_CONFIGS if c not in FAST_CONFIGS], slow=ALL_CONFIGS))
def test_matches_reference_full_sweep(fmt, block_size, dq):
    check_against_reference(sample(S1, seed=block_size), fmt, block_size, _dq_for(block_size) if dq else None)


@pytest.mark.parametrize("fmt,shape,block_size,dq", [
    ("nf4", (1,), 64, True),
    ("fp4", (1, 1), 32, False),
    ("int4", (3,), 4096, True),
    ("fp4_e3m0", (64, 128), 64, True),  # whole blocks; 128 scales: a partial DQ block
])
def test_matches_reference_small_and_exact_shapes(fmt, shape, block_size, dq):
    n = int(np.prod(shape))
    x = sample(shape, seed=7) if n > 260 else np.linspace(-3, 2, n, dtype=F32).reshape(shape)
    q = check_against_reference(x, fmt, block_size, 256 if dq else None)
    assert q.shape == shape and q.n_blocks == -(-int(np.prod(shape)) // block_size)


@pytest.mark.parametrize("fmt,block_size,dq", _config_params(PROPERTY_CONFIGS))
def test_midpoints_go_to_the_lower_code(fmt, block_size, dq):
    """Values exactly on a float32 midpoint take the lower code; one ulp either side decides."""
    table = formats.get_format(fmt).values
    s = np.sort(table)
    pairs = [(a, b) for a, b in zip(s[:-1], s[1:]) if a < b and a >= -1]
    probes, want = [], []
    for a, b in pairs:
        m = F32((np.float64(a) + np.float64(b)) / 2)
        for v, w in ((m, a), (np.nextafter(m, F32(2)), b), (np.nextafter(m, F32(-2)), a)):
            probes.append(v)
            want.append(w)
    n = int(np.prod(S1))
    x = np.zeros(n, F32)
    slots = [i for i in range(n) if i % 32]
    x[::32] = 1.0  # every block's absmax is exactly 1, so scaled == x
    reps = -(-len(slots) // len(probes))
    x[slots] = np.tile(probes, reps)[: len(slots)]
    expect = np.tile(want, reps)[: len(slots)]
    q = quant(x.reshape(S1), fmt, block_size, dq)
    got = table[unpack(q)[:n]]
    np.testing.assert_array_equal(got[slots], expect)
    assert np.all(got[::32] == 1.0)


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)


@st.composite
def arrays_s1(draw):
    """float32 arrays of shape S1 without subnormals, in a few flavours."""
    n = int(np.prod(S1))
    kind = draw(st.sampled_from(["generated", "hypothesis"]))
    if kind == "hypothesis":  # hypothesis' own element choices: repeats, extremes, zeros
        big = float(F32(1e30))
        x = draw(hnp.arrays(F32, n, elements=st.floats(-big, big, width=32, allow_subnormal=False)))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_normal(n) * 10.0 ** draw(st.floats(-25, 25))
        if draw(st.booleans()):
            x *= 10.0 ** rng.uniform(-6, 0, n)
        if draw(st.booleans()):
            start = draw(st.integers(0, n - 1))
            x[start: start + draw(st.integers(1, 300))] = 0.0
        if draw(st.booleans()):
            x = rng.choice(x[:5], n)
        x = x.astype(F32)
    x[np.abs(x) < TINY] = 0.0
    return x.reshape(S1)


def error_bound(x: np.ndarray, q: qj.QuantizedArray) -> np.ndarray:
    """Per-element bound on |dequantize(q) - x|: half the widest code gap times the block's
    absmax, plus the scale's own double-quantization error, plus float32 rounding slack."""
    flat = x.reshape(-1).astype(np.float64)
    absmax, _ = ref_blocks(x.reshape(-1), q.block_size)
    decoded = ref_decode_absmax(q).astype(np.float64)
    a = np.repeat(absmax.astype(np.float64), q.block_size)[: flat.size]
    d = np.repeat(decoded, q.block_size)[: flat.size]
    half = half_widest_gap(formats.get_format(q.format).values)
    return (half * a + np.abs(d - a) + 4 * EPS * np.maximum(a, np.abs(d)) + float(TINY)).reshape(x.shape)


@pytest.mark.parametrize("fmt,block_size,dq", _config_params(PROPERTY_CONFIGS))
@HYPO
@given(x=arrays_s1())
def test_error_bound_and_packing(fmt, block_size, dq, x):
    q = quant(x, fmt, block_size, dq)
    deq = np.asarray(qj.dequantize(q)).astype(np.float64)
    assert deq.shape == x.shape
    err = np.abs(deq - x.astype(np.float64))
    bound = error_bound(x, q)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (fmt, err.reshape(-1)[worst], bound.reshape(-1)[worst])
    # all-zero blocks decode to exactly 0, with or without DQ
    absmax, _ = ref_blocks(x.reshape(-1), block_size)
    zero_blocks = np.repeat(absmax == 0, block_size)[: x.size]
    assert np.all(deq.reshape(-1)[zero_blocks] == 0)
    # pack/unpack: the nibbles are the reference codes, high nibble first
    ref = ref_quantize(x, fmt, block_size, None)
    assert_codes_match(unpack(q), ref["codes"], ref["scaled"], formats.get_format(fmt).values, fmt)
    if dq:  # the decoded scales are within the 8-bit map's resolution
        dq_res = half_widest_gap(formats.dynamic_map())
        scale = np.repeat(np.asarray(q.absmax_scale, np.float64), q.dq_block_size)[: q.n_blocks]
        off = float(np.asarray(q.absmax_offset))
        dec = ref_decode_absmax(q).astype(np.float64)
        slack = 4 * EPS * (scale + abs(off)) + float(TINY)
        assert np.all(np.abs(dec - absmax) <= dq_res * scale + slack)


@pytest.mark.parametrize("fmt,block_size,dq", _config_params(PROPERTY_CONFIGS))
@HYPO
@given(x=arrays_s1())
def test_requantizing_is_idempotent(fmt, block_size, dq, x):
    d1 = np.asarray(qj.dequantize(quant(x, fmt, block_size, dq)))
    q2 = quant(d1, fmt, block_size, dq)
    d2 = np.asarray(qj.dequantize(q2))
    if not dq:
        # every block's extreme maps to +-1, so the block scale survives and every value is a code
        np.testing.assert_array_equal(d2, d1)
    else:
        err = np.abs(d2.astype(np.float64) - d1)
        assert np.all(err <= error_bound(d1, q2))


@pytest.mark.parametrize("fmt,block_size,dq", _config_params(PROPERTY_CONFIGS[:2]))
def test_jit_and_eager_agree(fmt, block_size, dq):
    x = sample(S1, seed=3)
    eager = quant(x, fmt, block_size, dq)
    jitted = jax.jit(functools.partial(quant, fmt=fmt, block_size=block_size, dq=dq))(x)
    assert jitted.metadata() == eager.metadata()
    for a, b in zip(eager.arrays(), jitted.arrays(), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow  # op by op compiles every primitive separately: ~20 s on 2 cores
@pytest.mark.parametrize("fmt,block_size,dq", _config_params(
    [FAST_CONFIGS[0], FAST_CONFIGS[1], FAST_CONFIGS[-1]]))
def test_op_by_op_agrees_with_jit(fmt, block_size, dq):
    x = sample(S1, seed=block_size)
    fused = quant(x, fmt, block_size, dq)
    with jax.disable_jit():
        unfused = quant(x, fmt, block_size, dq)
    for a, b in zip(fused.arrays(), unfused.arrays(), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# ------------------------------------------------------------------------------------------
# Double quantization


def test_dq_scales_are_centred_on_the_stored_offset():
    """The three block scales of the int4/4096 case of test_matches_reference, in isolation."""
    absmax = jnp.asarray(np.array([2588.7012, 2630.2473, 2308.842], F32))
    dq = functools.partial(qj.double_quantize, dq_block_size=256)
    codes, scale, offset = jax.jit(dq)(absmax)
    exact = F32(np.mean(np.asarray(absmax, np.float64)))
    centred = np.asarray(absmax) - np.asarray(offset)  # float32, with the offset as stored
    failures = []
    if np.asarray(scale)[0] != np.abs(centred).max():
        failures.append(f"scale {np.asarray(scale)[0]!r} != max|absmax - offset| {np.abs(centred).max()!r}")
    if np.asarray(offset) != np.asarray(dq(absmax)[2]):
        failures.append(f"jit offset {np.asarray(offset)!r} != eager offset {np.asarray(dq(absmax)[2])!r} "
                        f"(exact mean rounds to {exact!r})")
    assert not failures, "; ".join(failures)


def test_double_quant_offset_is_rounded_mean():
    exact = 0
    trials = 12
    for seed in range(trials):
        x = sample(S1, seed=100 + seed) * F32(10.0 ** (seed % 5 - 2))
        q = qj.quantize(x, "nf4", 32, True, 64)  # 315 scales in 5 second-level blocks
        absmax, _ = ref_blocks(x.reshape(-1), 32)
        want = F32(np.mean(absmax.astype(np.float64)))
        got = np.asarray(q.absmax_offset)
        ulps = abs(int(got.view(np.int32)) - int(want.view(np.int32)))
        assert ulps <= 1, (seed, got, want)
        exact += ulps == 0
    assert exact >= trials // 2  # the compensated mean is almost always the exact rounding


def test_double_quantize_with_given_offset():
    absmax = np.abs(sample((300,), seed=5)) + F32(0.5)
    offset = F32(0.75)
    codes, scale, off = jax.jit(qj.double_quantize, static_argnums=1)(jnp.asarray(absmax), 64, offset)
    assert np.asarray(off) == offset
    ref = ref_double_quant(absmax, 64, offset)
    np.testing.assert_array_equal(np.asarray(scale), ref["scale"])
    assert_codes_match(np.asarray(codes), ref["codes"], ref["scaled"], formats.dynamic_map(), "dq")


def _abstract_quantize(shape, **kw):
    return jax.eval_shape(lambda x: qj.quantize(x, **kw), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_bits_per_parameter():
    n = 4096 * 4096
    with_dq = qj.footprint(_abstract_quantize((4096, 4096), block_size=64, double_quant=True))
    nb = n // 64
    want = 8 * (n // 2 + nb + 4 * (-(-nb // 256)) + 4) / n  # codes, 8-bit scales, 2nd level, offset
    assert with_dq.bits_per_param == pytest.approx(want, rel=1e-12)
    assert abs(with_dq.bits_per_param - 4.127) <= 0.002
    no_dq = qj.footprint(_abstract_quantize((4096, 4096), block_size=64, double_quant=False))
    assert no_dq.bits_per_param == pytest.approx(4.5, abs=1e-12)
    assert with_dq.code_bytes == no_dq.code_bytes == n // 2


def test_footprint_splits_a_mixed_tree():
    x = sample(S1, seed=1)
    q1 = quant(x, *FAST_CONFIGS[0])  # nf4, block 32, DQ with 64 scales a second-level block
    q2 = quant(x, *FAST_CONFIGS[1])  # fp4, block 64, no DQ
    tree = {"a": q1, "b": [q2, jnp.ones((3, 4), jnp.bfloat16)], "c": np.zeros(5, np.float32), "d": None}
    fp = qj.footprint(tree)
    n = x.size
    nb1, nb2 = -(-n // 32), -(-n // 64)
    assert fp.code_bytes == 2 * -(-n // 2)
    assert fp.scale_bytes == (nb1 + 4 * -(-nb1 // 64) + 4) + 4 * nb2
    assert fp.dense_bytes == 3 * 4 * 2 + 5 * 4
    assert fp.quantized_params == 2 * n and fp.dense_params == 12 + 5
    assert fp.total_bytes == fp.code_bytes + fp.scale_bytes + fp.dense_bytes
    assert fp.bits_per_param == pytest.approx(8 * (fp.code_bytes + fp.scale_bytes) / (2 * n))


# ------------------------------------------------------------------------------------------
# Dequantize dtypes


@pytest.mark.parametrize("dq", [True, False])
def test_dequantize_dtypes_round_once(dq):
    x = sample(S1, seed=9) * F32(1e-3)  # keeps float16 in range
    cfg = PROPERTY_CONFIGS[0] if dq else PROPERTY_CONFIGS[1]
    q = quant(x, *cfg)
    f32 = ref_dequantize_f32(q)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        got = np.asarray(qj.dequantize(q, dtype))
        assert got.dtype == dtype and got.shape == S1
        want = f32.astype(dtype)  # one round-to-nearest-even from the float32 decode
        assert got.tobytes() == want.tobytes(), dtype
    assert np.asarray(qj.dequantize(q)).dtype == np.float32  # the input's dtype by default


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dequantize_defaults_to_input_dtype(dtype):
    x = jnp.asarray(sample(S1, seed=2) * F32(1e-3)).astype(dtype)
    q = quant(x, *FAST_CONFIGS[0])
    assert q.dtype == jnp.dtype(dtype).name
    out = qj.dequantize(q)
    assert out.dtype == dtype
    # the input is upcast exactly, so the stored arrays are those of its float32 values
    q32 = quant(np.asarray(x.astype(jnp.float32)), *FAST_CONFIGS[0])
    for a, b in zip(q.arrays(), q32.arrays(), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert np.asarray(out).tobytes() == ref_dequantize_f32(q).astype(dtype).tobytes()


# ------------------------------------------------------------------------------------------
# Pytrees


def _is_q(x):
    return isinstance(x, qj.QuantizedArray)


def test_quantize_tree_nested_dict_default_policy():
    rng = np.random.default_rng(0)
    tree = {
        "block": {"w": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
                  "b": jnp.zeros(128), "ln": {"scale": jnp.ones(128)}},
        "small": jnp.ones((8, 8)),  # below min_size
        "ids": jnp.ones((64, 128), jnp.int32),  # not floating
        "deep": [{"w3d": jnp.asarray(rng.standard_normal((2, 64, 64)), jnp.float32)}],
    }
    out = qj.quantize_tree(tree)
    assert _is_q(out["block"]["w"]) and _is_q(out["deep"][0]["w3d"])
    assert out["deep"][0]["w3d"].shape == (2, 64, 64)
    for keep in (out["block"]["b"], out["block"]["ln"]["scale"], out["small"], out["ids"]):
        assert not _is_q(keep)
    assert out["ids"] is tree["ids"]  # untouched leaves are the same objects
    np.testing.assert_array_equal(np.asarray(out["block"]["w"].codes),
                                  ref_quantize(np.asarray(tree["block"]["w"]), "nf4", 64, None)["packed"])
    back = qj.dequantize_tree(out)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert back["block"]["w"].dtype == jnp.float32


def _linen_params():
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"params": {
        "Embed_0": {"embedding": f(256, 64)},
        "Dense_0": {"kernel": f(64, 128), "bias": f(128)},
        "Dense_1": {"kernel": f(128, 64), "bias": f(64)},
        "LayerNorm_0": {"scale": f(64), "bias": f(64)},
        "lm_head": {"kernel": f(64, 256)},
        "head": {"kernel": f(64, 256)},
    }}


def _quantized_paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_q)[0]
    return sorted(tree_path_str(p) for p, leaf in leaves if _is_q(leaf))


def test_quantize_tree_linen_params_and_patterns():
    params = _linen_params()
    assert _quantized_paths(qj.quantize_tree(params)) == [
        "params.Dense_0.kernel", "params.Dense_1.kernel"]
    only0 = qj.quantize_tree(params, qj.QuantPolicy(include=r"Dense_0"))
    assert _quantized_paths(only0) == ["params.Dense_0.kernel"]
    # a custom exclude replaces the default one: the embedding becomes eligible, kernels do not
    no_kernels = qj.quantize_tree(params, qj.QuantPolicy(exclude=r"kernel"))
    assert _quantized_paths(no_kernels) == ["params.Embed_0.embedding"]
    # clearing the exclusions opts embeddings and heads in
    everything = qj.quantize_tree(params, qj.QuantPolicy(exclude=None, min_size=1))
    assert _quantized_paths(everything) == [
        "params.Dense_0.kernel", "params.Dense_1.kernel", "params.Embed_0.embedding",
        "params.head.kernel", "params.lm_head.kernel"]
    fp4 = qj.quantize_tree(params, qj.QuantPolicy(format="fp4", block_size=128, double_quant=False))
    k = fp4["params"]["Dense_0"]["kernel"]
    assert (k.format, k.block_size, k.dq_block_size) == ("fp4", 128, None)
    with pytest.raises(re.error):
        qj.QuantPolicy(include="(")


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(256, 64, rngs=rngs)
        layers = [nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 64, rngs=rngs)]
        self.layers = nnx.List(layers) if hasattr(nnx, "List") else layers
        self.norm = nnx.RMSNorm(64, rngs=rngs)
        self.small = nnx.Linear(64, 8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 256, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.lm_head(self.small(self.norm(h)))


def _tiny_model() -> _Tiny:
    # Initialising eagerly compiles every init op; filling an abstract model is much faster.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), abstract)
    return nnx.merge(graphdef, state)


def test_quantize_tree_nnx_state_and_merge_back():
    model = _tiny_model()
    graphdef, state = nnx.split(model)
    qstate = qj.quantize_tree(state)
    assert _quantized_paths(qstate) == ["layers.0.kernel", "layers.1.kernel"]
    deq = qj.dequantize_tree(qstate)
    merged = nnx.merge(graphdef, deq)
    k0 = qstate["layers"][0]["kernel"]
    k0 = k0.get_value() if hasattr(k0, "get_value") else k0.value
    np.testing.assert_array_equal(np.asarray(merged.layers[0].kernel[...]), np.asarray(qj.dequantize(k0)))
    np.testing.assert_array_equal(np.asarray(merged.embed.embedding[...]),
                                  np.asarray(model.embed.embedding[...]))
    ids = jnp.arange(5)
    forward = nnx.jit(lambda m, i: m(i))
    out, ref = forward(merged, ids), forward(model, ids)
    assert out.shape == ref.shape == (5, 256) and bool(jnp.all(jnp.isfinite(out)))
    # the quantized model tracks the float one (NF4 error is a few percent of the weights)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.2


def test_quantize_tree_donate_deletes_inputs():
    w = jnp.asarray(np.random.default_rng(3).standard_normal((64, 128)), jnp.float32)
    b = jnp.zeros(128)
    wn = np.asarray(w).copy()
    out = qj.quantize_tree({"w": w, "b": b, "wn": wn}, donate=True)
    assert w.is_deleted() and not b.is_deleted()
    assert _is_q(out["w"]) and _is_q(out["wn"])  # numpy leaves are quantized but cannot be deleted
    np.testing.assert_array_equal(np.asarray(out["w"].codes), np.asarray(out["wn"].codes))
    kept = jnp.asarray(wn)
    qj.quantize_tree({"w": kept})
    assert not kept.is_deleted()


# ------------------------------------------------------------------------------------------
# Bad input


def test_rejects_non_floating_input_naming_the_leaf():
    with pytest.raises(TypeError, match=r"'layers\.0\.w'.*int32.*floating"):
        qj.quantize(jnp.ones((64, 64), jnp.int32), name="layers.0.w")
    with pytest.raises(TypeError, match=r"'mask'.*bool"):
        qj.quantize(np.ones((64, 64), bool), name="mask")
    with pytest.raises(TypeError, match="list"):
        qj.quantize([1.0, 2.0])


def test_rejects_non_finite_input_small():
    for bad_value in (np.nan, np.inf, -np.inf):
        result = None
        with pytest.raises(ValueError, match=r"'emb\.w'.*NaN or Inf"):
            result = qj.quantize(np.array([[bad_value]], F32), "fp4", 32, False, name="emb.w")
        assert result is None, bad_value


def test_rejects_non_finite_input_large():
    x = sample(S1, seed=4)
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = x.copy()
        bad[3, 7, 11] = bad_value
        result = None
        with pytest.raises(ValueError, match=r"'emb\.w'.*NaN or Inf"):
            result = qj.quantize(bad, "fp4", 64, False, name="emb.w")  # FAST_CONFIGS[1]: 158 blocks
        assert result is None, bad_value


def test_jit_gives_non_finite_blocks_a_non_finite_scale():
    """quantize's documented behaviour under jit, where its check cannot raise."""
    bad = sample(S1, seed=4).reshape(-1)
    bad[5] = np.nan
    absmax = np.asarray(jax.jit(functools.partial(quant, fmt="fp4", block_size=64, dq=False))(bad).absmax)
    assert not np.isfinite(absmax[0]) and np.all(np.isfinite(absmax[1:]))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(block_size=48), r"unsupported block_size 48"),
    (dict(block_size=8192), r"unsupported block_size 8192"),
    (dict(block_size=16), r"unsupported block_size 16"),
    (dict(format="nf5"), r"unsupported format 'nf5'"),
    (dict(dq_block_size=32), r"unsupported dq_block_size 32"),
    (dict(block_size=64.0), r"unsupported block_size 64\.0"),
])
def test_rejects_bad_format_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        qj.quantize(jnp.ones((8, 8)), **kwargs)
    with pytest.raises(ValueError, match=pattern):
        qj.QuantPolicy(**kwargs)


def test_rejects_empty_input_and_bad_dequantize_dtype():
    with pytest.raises(ValueError, match=r"'e'.*empty.*\(0, 4\)"):
        qj.quantize(jnp.zeros((0, 4)), name="e")
    q = quant(sample(S1), *PROPERTY_CONFIGS[0])
    with pytest.raises(TypeError, match="int32 is not a floating-point dtype"):
        qj.dequantize(q, jnp.int32)
    with pytest.raises(TypeError, match="expects a QuantizedArray"):
        qj.dequantize(jnp.ones(3))


def test_validate_names_the_mismatch():
    q = quant(sample(S1), *FAST_CONFIGS[0])  # nf4, block 32, DQ 64: 315 blocks, 5 scales
    q.validate("ok")

    def variant(**changes):
        fields = dict(codes=q.codes, absmax=q.absmax, absmax_scale=q.absmax_scale,
                      absmax_offset=q.absmax_offset, **dict(q.metadata(), shape=q.shape))
        fields.update(changes)
        return qj.QuantizedArray(**fields)

    cases = [
        (variant(codes=q.codes[:-1]), r"'w'.*codes has shape \(5032,\).*expected \(5033,\)"),
        (variant(shape=(5, 33, 62)), r"'w'.*codes.*expected \(5115,\)"),
        (variant(absmax=q.absmax.astype(jnp.float32)), r"'w'.*absmax.*float32.*expected.*uint8"),
        (variant(absmax_scale=None), r"'w'.*absmax_scale is missing"),
        (variant(absmax_scale=q.absmax_scale[:4]), r"'w'.*absmax_scale has shape \(4,\).*expected \(5,\)"),
        (variant(absmax_offset=jnp.zeros(2)), r"'w'.*absmax_offset has shape \(2,\)"),
        (variant(dq_block_size=None), r"'w'.*(absmax.*uint8.*expected.*float32|present without double)"),
        (variant(dq_block_size=None, absmax=jnp.zeros(315)), r"'w'.*absmax_scale present without double"),
        (variant(block_size=48), r"unsupported block_size 48 for 'w'"),
        (variant(format="nf5"), r"unsupported format 'nf5'"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            bad.validate("w")
