"""The byte-permute lookup (`pallas_kernels.byte_lut`): its jnp model against the code tables on
every byte value, the model of ``prmt`` against the PTX ISA's definition, and (marked ``gpu``)
the PTX the kernels emit against the model, compiled for real inside a Pallas kernel."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import _common, byte_lut
from qlora_jax import formats
from triton_lowering import lowers_for_h100

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
ON_GPU = jax.default_backend() == "gpu"
TABLES = {name: tuple(float(v) for v in formats.get_format(name).values) for name in formats.FORMATS}


@pytest.fixture(autouse=True)
def _skip_gpu_tests_off_gpu(request):
    if request.node.get_closest_marker("gpu") and not ON_GPU:
        pytest.skip("needs a GPU (jax.default_backend() == 'gpu')")


def _tile(seed: int) -> np.ndarray:
    """uint8 [64, 32] (Triton tiles have power-of-two sizes): every byte value in every position
    of a 4-byte word, then random bytes."""
    rng = np.random.default_rng(seed)
    every = np.arange(256, dtype=np.uint8)
    shifted = np.concatenate([np.roll(every, s) for s in range(4)])   # each value at each offset
    return np.concatenate([shifted, rng.integers(0, 256, 1024, dtype=np.uint8)]).reshape(64, 32)


def _scales(shape, dtype, seed):
    s = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.asarray(jnp.asarray(s, dtype).astype(jnp.float32))


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _ref_pairs(packed, table, dtype, scale):
    t = np.asarray(table, np.float32)
    even = t[packed >> 4].astype(dtype)
    odd = t[packed & 0xF].astype(dtype)
    if scale is not None:   # 16-bit * 16-bit is exact in float32: one rounding, as fma.rn
        even = (np.asarray(even, np.float32) * scale).astype(dtype)
        odd = (np.asarray(odd, np.float32) * scale).astype(dtype)
    return even, odd


@pytest.mark.parametrize("fmt", sorted(TABLES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_pairs_model_matches_table(fmt, dtype, scaled):
    packed = _tile(1)
    scale = _scales(packed.shape, dtype, 2) if scaled else None
    got = byte_lut.decode_pairs(jnp.asarray(packed), TABLES[fmt], dtype,
                                None if scale is None else jnp.asarray(scale, dtype), interpret=True)
    for g, r in zip(got, _ref_pairs(packed, TABLES[fmt], dtype, scale)):
        np.testing.assert_array_equal(_bits(g), _bits(r))


@pytest.mark.parametrize("fmt", sorted(TABLES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_words_model_matches_float32_product(fmt, dtype):
    packed = _tile(3)
    scale = np.abs(np.random.default_rng(4).standard_normal(packed.shape)).astype(np.float32) * 3
    got = byte_lut.decode_words(jnp.asarray(packed), TABLES[fmt], dtype, jnp.asarray(scale), interpret=True)
    t = np.asarray(TABLES[fmt], np.float32)
    lo = (t[packed >> 4] * scale).astype(dtype).view(np.uint16).astype(np.uint32)
    hi = (t[packed & 0xF] * scale).astype(dtype).view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), lo | (hi << 16))


def _prmt_isa(a: int, b: int, c: int) -> int:
    """PTX ISA prmt.b32 (generic mode), written from the definition, one word at a time."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    d = 0
    for i in range(4):
        s = (c >> 4 * i) & 0xF
        byte = src[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        d |= byte << 8 * i
    return d


def test_prmt_model_matches_isa_definition():
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(0, 2**32, 2000, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    got = np.asarray(byte_lut._prmt(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)))
    want = np.array([_prmt_isa(int(x), int(y), int(z)) for x, y, z in zip(a, b, c)], np.uint32)
    np.testing.assert_array_equal(got, want)


def test_ptx_text_names_every_operand():
    prog = byte_lut.pairs_program(TABLES["nf4"], "bfloat16", True)
    text = prog.ptx()
    assert text.startswith("{") and text.rstrip().endswith("}")
    for i in range(prog.n_out + prog.n_in):
        assert f"${i}" in text
    assert "fma.rn.bf16x2" in text and "prmt.b32" in text
    words = byte_lut.words_program(TABLES["nf4"], "float16").ptx()
    assert "cvt.rn.f16x2.f32" in words and "mul.rn.f32" in words


def test_bad_tiles_raise():
    with pytest.raises(ValueError, match="uint8"):
        byte_lut.decode_pairs(jnp.zeros((4, 6), jnp.uint8), TABLES["nf4"], jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        byte_lut.decode_pairs(jnp.zeros((4, 8), jnp.uint8), TABLES["nf4"], jnp.float32, interpret=True)


def _pair_dot_inputs(seed: int):
    """(packed uint8 [64, 32], its int32 words [64, 8], the 4 x tiles [64, 8] (tile j: the bf16
    pair of x of byte j of each word), scale [64, 1], acc [64, 8], x float32 [64, 64])."""
    rng = np.random.default_rng(seed)
    packed = _tile(seed)
    words = np.ascontiguousarray(packed).view("<u4").view(np.int32)       # byte j at bits 8j..
    x = np.asarray(jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32), jnp.bfloat16))
    xb = x.view(np.uint16).astype(np.uint32)
    x_pairs = (xb[:, 0::2] | (xb[:, 1::2] << 16)).view(np.int32)          # one a byte: (x[2b], x[2b+1])
    x_tiles = [np.ascontiguousarray(x_pairs[:, j::4]) for j in range(4)]
    scale = np.abs(rng.standard_normal((64, 1))).astype(np.float32) + 0.1
    acc = rng.standard_normal((64, 8)).astype(np.float32)
    return packed, words, x_tiles, scale, acc, x.astype(np.float32)


def _table_args(dtype=jnp.bfloat16):
    return [jnp.int32(w) for w in byte_lut.table_words(TABLES["nf4"], dtype)]


def _pair_dot(words, x_tiles, scale, acc):
    return np.asarray(byte_lut.pair_dot_accumulate(jnp.asarray(words), [jnp.asarray(t) for t in x_tiles],
                                                   jnp.asarray(scale), jnp.asarray(acc), _table_args(),
                                                   interpret=True))


def test_pair_dot_model_is_the_bf16_fma_chain():
    """The model of `pair_dot_program` equals, bit for bit, the sequence it claims: per word
    and per lane (even, odd weights), a bf16 product and three bf16 FMAs, then float32
    ``acc + s * even + s * odd``. Written here in numpy on the table's bf16 values (float32
    sums rounded to bf16)."""
    packed, words, x_tiles, scale, acc, x = _pair_dot_inputs(3)
    got = _pair_dot(words, x_tiles, scale, acc)
    t = np.asarray(jnp.asarray(np.asarray(TABLES["nf4"], np.float32), jnp.bfloat16).astype(jnp.float32))
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    want = np.empty_like(acc)
    for g in range(8):
        b = slice(4 * g, 4 * g + 4)
        w_even, w_odd = t[packed[:, b] >> 4], t[packed[:, b] & 0xF]     # [64, 4]
        x_even, x_odd = x[:, 8 * g:8 * g + 8:2], x[:, 8 * g + 1:8 * g + 8:2]
        lanes = []
        for w, xx in ((w_even, x_even), (w_odd, x_odd)):
            p = bf(w[:, 0] * xx[:, 0])
            for j in (1, 2, 3):
                p = bf(w[:, j] * xx[:, j] + p)
            lanes.append(p)
        s = scale[:, 0]
        want[:, g] = (lanes[1] * s + (lanes[0] * s + acc[:, g])).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_pair_dot_is_close_to_the_exact_dot():
    """Against the float64 dot of the float32 table values: each word's sum is within the
    rounding of its bf16 table values and of 4 bf16 steps, |error| <= 6 * 2^-8 * sum |terms|."""
    packed, words, x_tiles, scale, acc, x = _pair_dot_inputs(4)
    got = _pair_dot(words, x_tiles, scale, np.zeros_like(acc)).astype(np.float64)
    t = np.asarray(TABLES["nf4"], np.float64)
    w = np.stack([t[packed >> 4], t[packed & 0xF]], axis=-1).reshape(64, 64)   # memory order
    terms = (w * x * scale).reshape(64, 8, 8)
    exact, size = terms.sum(-1), np.abs(terms).sum(-1)
    err = np.abs(got - exact)
    assert np.all(err <= 6 * 2.0**-8 * size + 1e-30), float(np.max(err / size))
    assert np.max(err / size) > 0   # the bf16 chain does round


def test_pair_dot_sums_are_the_unscaled_chain():
    """`pair_dot_sums` (no scale, no running sum) is, bit for bit, `pair_dot_accumulate` with
    scale 1 and a zero sum (``fma(even, 1, 0) = even`` exactly, then ``odd + even`` rounded
    once either way), on 2-d tiles and on the kernel's [rows, w/4, 4] views with [1, w/4, 1]
    table tiles."""
    packed, words, x_tiles, scale, acc, x = _pair_dot_inputs(6)
    want = _pair_dot(words, x_tiles, np.ones_like(scale), np.zeros_like(acc))
    got = np.asarray(byte_lut.pair_dot_sums(jnp.asarray(words), [jnp.asarray(t) for t in x_tiles], _table_args(),
                                            interpret=True))
    np.testing.assert_array_equal(got, want)
    table3 = [jnp.full((1, 2, 1), w, jnp.int32) for w in _table_args()]
    got3 = byte_lut.pair_dot_sums(jnp.asarray(words).reshape(64, 2, 4),
                                  [jnp.asarray(t).reshape(64, 2, 4) for t in x_tiles], table3, interpret=True)
    np.testing.assert_array_equal(np.asarray(got3).reshape(64, 8), want)
    assert np.all(np.isfinite(got)) and np.any(got != 0)
    with pytest.raises(ValueError, match="4 x word tiles"):
        byte_lut.pair_dot_sums(jnp.asarray(words), x_tiles[:3], _table_args(), interpret=True)


def _dot4_operands(x_tiles, scale, acc):
    """The pack-4 operands of the same data: words as [64, 2, 4] (2 vectors of 4 words a row), x
    operand q holding x words 4q..4q+3 of each vector (x's own order), scale a vector, the sums,
    and the table as [1, 2, 4] tiles."""
    x_pairs = np.stack(x_tiles, axis=-1).reshape(64, 2, 16)     # x word 4t+j = x_tiles[j][:, t]
    xs = [jnp.asarray(x_pairs[..., 4 * q:4 * q + 4]) for q in range(4)]
    tab = byte_lut.dot4_table_tile(TABLES["nf4"], jnp.bfloat16, 2)
    table = [jnp.asarray(tab[a:a + 1]) for a in range(byte_lut.DOT4_TABLE_OPERANDS)]
    return xs, jnp.asarray(scale[:, :, None]), jnp.asarray(acc.reshape(64, 2, 4)), table


def test_pair_dot4_is_pair_dot_on_each_word():
    """`pair_dot4_accumulate` (a vector of 4 words a program, x in its own order) is, bit for
    bit, `pair_dot_accumulate` on each word, and its program reads every operand register."""
    packed, words, x_tiles, scale, acc, x = _pair_dot_inputs(8)
    want = _pair_dot(words, x_tiles, np.broadcast_to(scale, acc.shape), acc)
    xs, sc, ac, table = _dot4_operands(x_tiles, np.broadcast_to(scale, (64, 2)), acc)
    got = byte_lut.pair_dot4_accumulate(jnp.asarray(words).reshape(64, 2, 4), xs, sc, ac, table, interpret=True)
    np.testing.assert_array_equal(np.asarray(got).reshape(64, 8), want)
    ptx = byte_lut.pair_dot4_program().ptx()
    n_in = byte_lut.pair_dot4_program().n_in
    used = {f"${i}" for i in range(4 + n_in)} - {f"${4 + 28 + t}" for t in range(byte_lut.N_TABLE_WORDS, 12)}
    assert all(f"{r}," in ptx or f"{r};" in ptx for r in used)
    with pytest.raises(ValueError, match="4 x operands and 3 table operands"):
        byte_lut.pair_dot4_accumulate(jnp.asarray(words).reshape(64, 2, 4), xs[:3], sc, ac, table, interpret=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\] tile"):
        byte_lut.pair_dot4_accumulate(jnp.asarray(words), xs, sc, ac, table, interpret=True)


def test_pair_dot_rejects_bad_operands():
    _, words, x_tiles, scale, acc, _ = _pair_dot_inputs(5)
    with pytest.raises(ValueError, match="int32"):
        byte_lut.pair_dot_accumulate(jnp.asarray(words).astype(jnp.uint8), x_tiles, scale, acc, _table_args(),
                                     interpret=True)
    with pytest.raises(ValueError, match="4 x word tiles"):
        byte_lut.pair_dot_accumulate(jnp.asarray(words), x_tiles[:3], scale, acc, _table_args(), interpret=True)


# ------------------------------------------------------------------------------------------
# Compiled (GPU)


def _run_in_kernel(fn, packed, *extra, out_shapes):
    """``fn(packed_tile, *extra_tiles)`` inside a one-program Pallas (Triton) kernel."""
    def kernel(*refs):
        ins, outs = refs[: 1 + len(extra)], refs[1 + len(extra):]
        res = fn(*(r[...] for r in ins))
        for o, v in zip(outs, res):
            o[...] = v

    return pl.pallas_call(kernel, out_shape=out_shapes, grid=(1,),
                          compiler_params=_common.compiler_params(4, 1))(packed, *extra)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", sorted(TABLES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_ptx_matches_model(fmt, dtype):
    packed = jnp.asarray(_tile(6))
    scale = jnp.asarray(_scales(packed.shape, dtype, 7), dtype)
    shp = [jax.ShapeDtypeStruct(packed.shape, dtype)] * 2
    for sc in (None, scale):
        fn = functools.partial(byte_lut.decode_pairs, values=TABLES[fmt], dtype=dtype, interpret=False)
        got = _run_in_kernel(lambda p, *s: fn(p, scale=s[0] if s else None), packed,
                             *(() if sc is None else (sc,)), out_shapes=shp)
        want = byte_lut.decode_pairs(packed, TABLES[fmt], dtype, sc, interpret=True)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(_bits(g), _bits(w))
    s32 = jnp.asarray(np.abs(_scales(packed.shape, jnp.float32, 8)))
    got = _run_in_kernel(lambda p, s: (byte_lut.decode_words(p, TABLES[fmt], dtype, s, interpret=False),),
                         packed, s32, out_shapes=[jax.ShapeDtypeStruct(packed.shape, jnp.int32)])[0]
    want = byte_lut.decode_words(packed, TABLES[fmt], dtype, s32, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_ptx_kernels_lower_to_triton(dtype):
    """The kernels of `test_gpu_ptx_matches_model` lower to verified Triton IR without a GPU."""
    tile = jax.ShapeDtypeStruct((64, 32), jnp.uint8)
    shp = [jax.ShapeDtypeStruct(tile.shape, dtype)] * 2
    fn = functools.partial(byte_lut.decode_pairs, values=TABLES["nf4"], dtype=dtype, interpret=False)
    lowers_for_h100(lambda p: _run_in_kernel(fn, p, out_shapes=shp), tile)
    lowers_for_h100(lambda p, s: _run_in_kernel(lambda p, s: fn(p, scale=s), p, s, out_shapes=shp),
                    tile, jax.ShapeDtypeStruct(tile.shape, dtype))
    words = lambda p, s: (byte_lut.decode_words(p, TABLES["nf4"], dtype, s, interpret=False),)  # noqa: E731
    lowers_for_h100(lambda p, s: _run_in_kernel(words, p, s, out_shapes=[jax.ShapeDtypeStruct(tile.shape, jnp.int32)]),
                    tile, jax.ShapeDtypeStruct(tile.shape, jnp.float32))


def test_pair_dot_kernel_lowers_to_triton():
    """The kernel of `test_gpu_pair_dot_ptx_matches_model` lowers to verified Triton IR."""
    i32, f32 = jax.ShapeDtypeStruct((64, 8), jnp.int32), jax.ShapeDtypeStruct((64, 8), jnp.float32)
    lowers_for_h100(_pair_dot_kernel, i32, i32, i32, i32, i32, jax.ShapeDtypeStruct((64, 1), jnp.float32), f32,
                    jax.ShapeDtypeStruct((byte_lut.N_TABLE_WORDS, 8), jnp.int32))


def test_bf16_halves_f32_equals_the_split_halves():
    """The shift/mask float32 view of bf16 pair words equals splitting them and converting, for
    int32 and uint32 words (random patterns, NaN/Inf/subnormal halves included)."""
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    for words in (jnp.asarray(bits), jnp.asarray(bits.view(np.int32))):
        lo, hi = byte_lut.bf16_halves_f32(words)
        want_lo, want_hi = byte_lut.split_pair_words(jnp.asarray(bits.view(np.int32)), jnp.bfloat16)
        for got, want in ((lo, want_lo), (hi, want_hi)):
            g = np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint32))
            w = np.asarray(jax.lax.bitcast_convert_type(want, jnp.uint16)).astype(np.uint32) << 16
            np.testing.assert_array_equal(g, w)


def _dot_kernel(fn, n_table, words, x0, x1, x2, x3, scale, acc, table, interpret=False):
    """``fn`` (`byte_lut.pair_dot_accumulate` or `pair_dot4_accumulate`) in a one-program Pallas
    (Triton) kernel, each of the ``n_table`` table rows loaded as a tile of its own (the way
    `nf4_decode` loads them)."""
    def kernel(w_ref, x0_ref, x1_ref, x2_ref, x3_ref, s_ref, a_ref, t_ref, o_ref):
        rows = [t_ref[pl.ds(i, 1)] for i in range(n_table)]
        xs = [r[...] for r in (x0_ref, x1_ref, x2_ref, x3_ref)]
        o_ref[...] = fn(w_ref[...], xs, s_ref[...], a_ref[...], rows, interpret=interpret)

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(acc.shape, jnp.float32), grid=(1,),
                          interpret=interpret, compiler_params=_common.compiler_params(4, 1))(
        words, x0, x1, x2, x3, scale, acc, table)


_pair_dot_kernel = functools.partial(_dot_kernel, byte_lut.pair_dot_accumulate, byte_lut.N_TABLE_WORDS)
_pair_dot4_kernel = functools.partial(_dot_kernel, byte_lut.pair_dot4_accumulate, byte_lut.DOT4_TABLE_OPERANDS)


def _assert_gpu_dot_matches_model(got, want, packed, x, scale, acc):
    """The GPU rounds each FMA once where the model rounds the float32 sum and then to the half
    type, so a rare lane may differ by one bf16 step: nearly all sums are equal and every one is
    within 2^-7 of its terms' size (``got``, ``want``: [64, 8] sums of `_pair_dot_inputs`)."""
    t = np.asarray(TABLES["nf4"], np.float64)
    wt = np.stack([t[packed >> 4], t[packed & 0xF]], axis=-1).reshape(64, 64)
    size = np.abs(wt * x * scale).reshape(64, 8, 8).sum(-1) + np.abs(acc)
    assert np.all(np.abs(got - want) <= 2.0**-7 * size)
    assert np.mean(np.abs(got - want) <= 1e-6 * size) >= 0.98


def test_pair_dot4_kernel_lowers_to_triton():
    """The kernel of `test_gpu_pair_dot4_ptx_matches_model` lowers to verified Triton IR."""
    i32, f32 = jax.ShapeDtypeStruct((64, 2, 4), jnp.int32), jax.ShapeDtypeStruct((64, 2, 4), jnp.float32)
    lowers_for_h100(_pair_dot4_kernel, i32, i32, i32, i32, i32, jax.ShapeDtypeStruct((64, 2, 1), jnp.float32), f32,
                    jax.ShapeDtypeStruct((byte_lut.DOT4_TABLE_OPERANDS, 2, 4), jnp.int32))


@pytest.mark.gpu
def test_gpu_pair_dot4_ptx_matches_model():
    """`pair_dot4_accumulate` compiled for real against its model."""
    packed, words, x_tiles, scale, acc, x = _pair_dot_inputs(9)
    xs, sc, ac, _ = _dot4_operands(x_tiles, np.broadcast_to(scale, (64, 2)), acc)
    table = jnp.asarray(byte_lut.dot4_table_tile(TABLES["nf4"], jnp.bfloat16, 2))
    args = [jnp.asarray(words).reshape(64, 2, 4), *xs, sc, ac]
    g = np.asarray(_pair_dot4_kernel(*args, table), np.float64).reshape(64, 8)
    w = np.asarray(_pair_dot4_kernel(*args, table, interpret=True), np.float64).reshape(64, 8)
    _assert_gpu_dot_matches_model(g, w, packed, x, scale, acc)


@pytest.mark.gpu
def test_gpu_pair_dot_ptx_matches_model():
    """`pair_dot_accumulate` compiled for real against its model."""
    packed, words, x_tiles, scale, acc, x = _pair_dot_inputs(5)
    table = jnp.asarray(byte_lut.table_tile(TABLES["nf4"], jnp.bfloat16, 8))
    args = [jnp.asarray(a) for a in (words, *x_tiles, scale, acc)]
    g = np.asarray(_pair_dot_kernel(*args, table), np.float64)
    w = np.asarray(_pair_dot_kernel(*args, table, interpret=True), np.float64)
    _assert_gpu_dot_matches_model(g, w, packed, x, scale, acc)
