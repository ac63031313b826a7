"""Tests of the fused NF4 dequant-matmul kernels (`pallas_kernels`).

On CPU every kernel runs in the Pallas HLO interpreter (``interpret=True``): the same kernel
body, evaluated by XLA. Each result is compared with the kernel's plain-JAX reference and with an
independent float64 numpy computation from the raw packed arrays, on fresh random inputs.

Poisoning: (1) outputs — the interpreter fills a pallas_call output with NaN before the kernel
runs (checked by `test_interpreter_poisons_unwritten_outputs`), so a finite result proves every
element was written; (2) inputs — buffers are passed larger than the logical problem with NaN /
garbage beyond it (x and dy columns, weight rows past N, trailing second-level scales), so a
kernel that reads past the valid region, or fails to mask a reduction tail, produces NaN.

Tests marked ``gpu`` compile the kernels for real; an autouse fixture skips them unless
``jax.default_backend() == "gpu"`` (run on the GPU machine:
``python -m pytest tests/test_pallas_kernels.py -m gpu``). Interpret mode cannot prove that a
kernel lowers to Triton, so run those before trusting a change.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import pallas_kernels as pk
from pallas_kernels import _common
from pallas_kernels import nf4_matmul_mgpu as mg
from pallas_kernels.tuning import TileConfig
from qlora_jax import formats, quantize, dequantize
from triton_lowering import lowers_for_h100

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


@pytest.fixture(autouse=True)
def _skip_gpu_tests_off_gpu(request):
    if request.node.get_closest_marker("gpu") and not ON_GPU:
        pytest.skip("needs a GPU (jax.default_backend() == 'gpu')")


# ------------------------------------------------------------------------------------------
# Problem construction and independent references


class Problem:
    """A random weight W[n, k] quantized by qlora_jax, stored in buffers with poisoned tails.

    The weight is quantized with ``pad_rows`` extra rows; their code bytes are replaced by
    random garbage and their float scales by NaN, and NaN second-level scales are appended, so
    that any read of a row past n poisons the result.
    """

    def __init__(self, seed, n, k, block_size, dq_block_size, fmt="nf4", pad_rows=8):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.n, self.k = n, k
        w = rng.standard_normal((n + pad_rows, k)).astype(np.float32)
        q = quantize(w, fmt, block_size=block_size, double_quant=dq_block_size is not None,
                     dq_block_size=dq_block_size or 256)
        self.table = formats.get_format(fmt).values
        self.spec = _common.make_spec(n, k, block_size, dq_block_size, self.table)
        codes = np.array(q.codes)
        codes[n * k // 2:] = rng.integers(0, 256, codes.size - n * k // 2, dtype=np.uint8)
        nb = n * k // block_size
        absmax = np.array(q.absmax)
        if dq_block_size is None:
            absmax[nb:] = np.nan
            scale = offset = None
        else:
            absmax[nb:] = rng.integers(0, 256, absmax.size - nb, dtype=np.uint8)
            scale = np.concatenate([np.array(q.absmax_scale), np.full(2, np.nan, np.float32)])
            offset = np.array(q.absmax_offset)
        self.arrays = tuple(None if a is None else jnp.asarray(a) for a in (codes, absmax, scale, offset))
        self.q = q  # the library's own quantization (before poisoning), to tie the decode to it
        self.w64 = self._decode64(codes, absmax, scale, offset, block_size, dq_block_size)

    def _decode64(self, codes, absmax, scale, offset, bs, dqbs):
        n, k = self.n, self.k
        b = codes[: n * k // 2]
        nib = np.stack([b >> 4, b & 0xF], axis=-1).reshape(-1)
        vals = self.table.astype(np.float64)[nib]
        a = absmax[: n * k // bs]
        if dqbs is None:
            a64 = a.astype(np.float64)
        else:
            idx = np.arange(a.size) // dqbs
            a64 = _common.DYNAMIC_MAP.astype(np.float64)[a] * scale[idx].astype(np.float64) + float(offset)
        return (vals.reshape(-1, bs) * a64[:, None]).reshape(n, k)

    def activations(self, rows, cols, pad_cols=16, dtype=jnp.bfloat16):
        """(array [rows, cols + pad_cols] with NaN past cols, float64 copy of the valid part)."""
        a = self.rng.standard_normal((rows, cols)).astype(np.float32)
        a = np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))  # exact values the kernel sees
        padded = np.concatenate([a, np.full((rows, pad_cols), np.nan, np.float32)], axis=1)
        return jnp.asarray(padded, dtype), a.astype(np.float64)


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def check(out, shape, ref_jax, ref64, tol_ref=5e-3, tol64=1e-2):
    assert out.shape == shape
    o = np.asarray(jnp.asarray(out).astype(jnp.float32))
    assert np.all(np.isfinite(o)), f"{np.sum(~np.isfinite(o))} non-finite outputs (unwritten or poisoned)"
    ref_jax = np.asarray(jnp.asarray(ref_jax).astype(jnp.float32), np.float64)
    assert rel_err(out, ref_jax) <= tol_ref, rel_err(out, ref_jax)
    assert rel_err(out, ref64) <= tol64, rel_err(out, ref64)


# ------------------------------------------------------------------------------------------
# Premises of the poisoning


def test_interpreter_poisons_unwritten_outputs():
    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 16), jnp.float32), grid=(2,),
                         in_specs=[pl.BlockSpec((4, 16), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((4, 16), lambda i: (i, 0)), interpret=True,
                         compiler_params=_common.compiler_params(4, 1))(jnp.ones((8, 16)))
    out = np.asarray(out)
    assert np.all(out[:4] == 1) and np.all(np.isnan(out[4:]))


def test_decodes_match_library():
    """This file's float64 decode and `pallas_kernels.dequantize_reference` both equal
    qlora_jax's own `dequantize` on the valid rows (double quant with several scale blocks)."""
    p = Problem(0, 24, 128, 32, 64)
    lib = np.asarray(dequantize(p.q, jnp.float32), np.float64)[: p.n]
    np.testing.assert_allclose(p.w64, lib, rtol=2e-6, atol=1e-7)
    ref = np.asarray(pk.dequantize_reference(*p.arrays, p.spec))
    assert ref.shape == (24, 128)
    np.testing.assert_allclose(ref, lib, rtol=1e-6, atol=1e-7)


def test_dynamic_map_copy_matches_library():
    np.testing.assert_array_equal(_common.DYNAMIC_MAP.view(np.uint32), formats.dynamic_map().view(np.uint32))


# ------------------------------------------------------------------------------------------
# Kernels in interpret mode


FORWARD_CASES = [
    # seed, m, n, k, block_size, dq_block_size, format, config
    (10, 64, 128, 256, 64, 256, "nf4", TileConfig(block_m=32, block_n=64, block_k=64, lut="poly")),
    (11, 37, 72, 256, 32, 64, "nf4", TileConfig(block_m=16, block_n=32, block_k=128, lut="gather")),
    (12, 20, 48, 256, 128, None, "fp4", TileConfig(block_m=16, block_n=16, block_k=64, group_m=2)),
    (13, 64, 128, 256, 64, 256, "nf4", TileConfig(block_m=32, block_n=64, block_k=128, lut="prmt")),
    (14, 37, 72, 256, 32, None, "fp4", TileConfig(block_m=16, block_n=32, block_k=64, lut="prmt")),
    # swap_ab: the transposed product (decoded tile as the left operand), ragged M and N
    (15, 37, 72, 256, 64, 256, "nf4", TileConfig(block_m=16, block_n=64, block_k=128, lut="prmt", swap_ab=True)),
    (16, 20, 48, 256, 32, None, "fp4", TileConfig(block_m=32, block_n=16, block_k=64, group_m=2, swap_ab=True)),
]


@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,fmt,cfg", FORWARD_CASES)
def test_nf4_matmul_forward(seed, m, n, k, bs, dqbs, fmt, cfg):
    p = Problem(seed, n, k, bs, dqbs, fmt)
    x, x64 = p.activations(m, k)
    y = pk.nf4_matmul(x, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    ref = pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec)
    check(y, (m, n), ref, x64 @ p.w64.T)


DECODE_CASES = [
    (20, 1, 72, 256, 64, 256, TileConfig(block_n=32, block_k=64, split_k=3, use_dot=False, lut="poly")),
    (21, 3, 64, 128, 32, None, TileConfig(block_n=16, block_k=64, split_k=1, use_dot=False)),
    (22, 7, 80, 256, 64, 64, TileConfig(block_n=32, block_k=64, split_k=2, use_dot=True, lut="gather")),
    (23, 16, 64, 256, 128, None, TileConfig(block_n=64, block_k=64, split_k=1, use_dot=True, lut="poly")),
    (24, 1, 72, 256, 64, 256, TileConfig(block_n=32, block_k=128, split_k=2, use_dot=False, lut="prmt")),
    (25, 9, 80, 256, 32, 64, TileConfig(block_n=16, block_k=64, split_k=1, use_dot=True, lut="prmt")),
    # the word-pair path (bf16 x as int32 words, "prmt"), several rows and blocks of 32 in a step
    (26, 3, 72, 256, 32, 256, TileConfig(block_n=32, block_k=128, split_k=1, use_dot=False, lut="prmt")),
    # the even/odd float32 path with "prmt32"
    (27, 2, 72, 256, 64, 256, TileConfig(block_n=32, block_k=64, split_k=2, use_dot=False, lut="prmt32")),
    # the word path with the bf16x2 dot of 4 bytes (pair_fma): ragged N, blocks of 32 and 128
    (28, 1, 72, 256, 64, 256, TileConfig(block_n=32, block_k=128, split_k=2, use_dot=False, lut="prmt",
                                         pair_fma=True)),
    (29, 3, 40, 512, 128, None, TileConfig(block_n=16, block_k=256, split_k=1, use_dot=False, lut="prmt",
                                           pair_fma=True)),
    (19, 2, 64, 256, 32, 64, TileConfig(block_n=32, block_k=64, split_k=4, use_dot=False, lut="prmt",
                                        pair_fma=True)),
    # with the register double buffer: 3 and 2 K steps a program (the last step reloads itself)
    (18, 1, 72, 768, 64, 256, TileConfig(block_n=32, block_k=128, split_k=2, use_dot=False, lut="prmt",
                                         pair_fma=True, prefetch=1)),
    (17, 4, 40, 512, 128, None, TileConfig(block_n=16, block_k=128, split_k=2, use_dot=False, lut="prmt",
                                           pair_fma=True, prefetch=1)),
    # a deeper register pipeline: 3 steps ahead with 6 steps a program (no split), and with 2
    # steps a program (the steps past the end reload the last one)
    (16, 1, 40, 768, 64, 256, TileConfig(block_n=8, block_k=128, split_k=1, use_dot=False, lut="prmt",
                                         pair_fma=True, prefetch=3)),
    (15, 2, 72, 512, 64, 256, TileConfig(block_n=32, block_k=128, split_k=2, use_dot=False, lut="prmt",
                                         pair_fma=True, prefetch=3)),
    # x in byte planes, one word tile a K step (x_planes): ragged N, blocks of 32/64/128, double
    # quant with 64 and 256 blocks a scale and without, no split and 2-3 splits, prefetch 0-2
    (14, 1, 72, 1024, 64, 256, TileConfig(block_n=16, block_k=256, split_k=1, num_warps=2, use_dot=False,
                                          lut="prmt", pair_fma=True, prefetch=1, x_planes=True)),
    (13, 3, 40, 512, 32, 64, TileConfig(block_n=8, block_k=128, split_k=2, num_warps=1, use_dot=False,
                                        lut="prmt", pair_fma=True, x_planes=True)),
    (12, 2, 64, 768, 128, None, TileConfig(block_n=32, block_k=256, split_k=1, use_dot=False, lut="prmt",
                                           pair_fma=True, prefetch=2, x_planes=True)),
    (11, 1, 100, 768, 64, 256, TileConfig(block_n=16, block_k=128, split_k=3, num_warps=2, use_dot=False,
                                          lut="prmt", pair_fma=True, prefetch=1, x_planes=True)),
    # x in its own order, 4 words and their 16 x words a program call (x_direct): ragged N, K not
    # a multiple of block_k (the last step masked), blocks of 32/64/128, with and without double
    # quant, no split and 2 splits, prefetch 0-2, 1-3 rows of x
    (10, 1, 72, 1024, 64, 256, TileConfig(block_n=16, block_k=256, split_k=1, num_warps=2, use_dot=False,
                                          lut="prmt", pair_fma=True, prefetch=1, x_direct=True)),
    (9, 3, 40, 640, 32, 64, TileConfig(block_n=8, block_k=256, split_k=2, num_warps=1, use_dot=False,
                                       lut="prmt", pair_fma=True, x_direct=True)),
    (8, 2, 100, 896, 128, None, TileConfig(block_n=32, block_k=512, split_k=1, use_dot=False, lut="prmt",
                                           pair_fma=True, prefetch=2, x_direct=True)),
]


@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,cfg", DECODE_CASES)
def test_nf4_decode(seed, m, n, k, bs, dqbs, cfg):
    p = Problem(seed, n, k, bs, dqbs)
    x, x64 = p.activations(m, k)
    y = pk.nf4_decode(x, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    ref = pk.nf4_decode_reference(x, *p.arrays, spec=p.spec)
    check(y, (m, n), ref, x64 @ p.w64.T)


DX_CASES = [
    (30, 64, 128, 256, 64, 256, "nf4", TileConfig(block_m=32, block_n=64, block_k=128, lut="poly")),
    # ragged everywhere: M % 16, N % 32 (the reduction), K % 128 (a whole 64-wide sub-tile past K)
    (31, 37, 72, 192, 32, 64, "nf4", TileConfig(block_m=16, block_n=32, block_k=128, lut="gather")),
    (32, 20, 48, 256, 128, None, "int4", TileConfig(block_m=16, block_n=16, block_k=64)),
    (33, 37, 72, 192, 64, 256, "nf4", TileConfig(block_m=16, block_n=32, block_k=128, lut="prmt")),
    # swap_ab, ragged everywhere, and with one sub-tile
    (34, 37, 72, 192, 64, 256, "nf4", TileConfig(block_m=16, block_n=32, block_k=128, lut="prmt", swap_ab=True)),
    (35, 20, 48, 256, 128, None, "int4", TileConfig(block_m=32, block_n=16, block_k=64, swap_ab=True)),
]


@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,fmt,cfg", DX_CASES)
def test_nf4_matmul_dx(seed, m, n, k, bs, dqbs, fmt, cfg):
    p = Problem(seed, n, k, bs, dqbs, fmt)
    dy, dy64 = p.activations(m, n)
    dx = pk.nf4_matmul_dx(dy, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    ref = pk.nf4_matmul_dx_reference(dy, *p.arrays, spec=p.spec)
    check(dx, (m, k), ref, dy64 @ p.w64)


# ------------------------------------------------------------------------------------------
# Dispatch API


def _layout(p):
    return dict(n=p.n, k=p.k, block_size=p.spec.block_size, dq_block_size=p.spec.dq_block_size,
                code_table=p.table)


def test_matmul_nt_decode_path_with_leading_dims():
    p = Problem(40, 96, 256, 64, 256, pad_rows=0)
    x, x64 = p.activations(10, 256, pad_cols=0)
    x3 = x.reshape(2, 5, 256)
    y = pk.matmul_nt(x3, *p.arrays, **_layout(p), interpret=INTERPRET)
    assert y.shape == (2, 5, 96) and y.dtype == jnp.bfloat16
    ref = pk.nf4_decode_reference(x, *p.arrays, spec=p.spec)
    check(y.reshape(10, 96), (10, 96), ref, x64 @ p.w64.T)


def test_matmul_nt_and_nn_forward_path():
    p = Problem(41, 80, 192, 64, None, pad_rows=0)
    x, x64 = p.activations(40, 192, pad_cols=0)
    y = pk.matmul_nt(x, *p.arrays, **_layout(p), interpret=INTERPRET)
    check(y, (40, 80), pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T)
    dy, dy64 = p.activations(40, 80, pad_cols=0)
    dx = pk.matmul_nn(dy, *p.arrays, **_layout(p), interpret=INTERPRET)
    check(dx, (40, 192), pk.nf4_matmul_dx_reference(dy, *p.arrays, spec=p.spec), dy64 @ p.w64)


DEQUANT_FIRST_CASES = [
    # block_size, dq_block_size, dtype, config: the [n, k] dequantize kernel, then the [k, n]
    # tile decoder with ragged N (80 = 2.5 tiles of 32), sub-tiles of a 128-wide step, "tree"
    (64, 256, jnp.bfloat16, TileConfig(block_m=16, block_n=16, block_k=64, dequant_first=True)),
    (64, None, jnp.float16, TileConfig(block_m=16, block_n=16, block_k=64, dequant_first=True)),
    (64, 256, jnp.bfloat16, TileConfig(block_n=32, block_k=128, lut="prmt", dequant_first=True, decode_kn=True)),
    (32, None, jnp.float16, TileConfig(block_n=64, block_k=64, lut="tree", dequant_first=True, decode_kn=True)),
]


@pytest.mark.parametrize("bs,dqbs,dtype,cfg", DEQUANT_FIRST_CASES)
def test_dequant_first_path(bs, dqbs, dtype, cfg):
    """A ``dequant_first`` config: the decoder writes exactly the library's values (transposed
    with ``decode_kn``), then both products match the references (poisoned weight rows, scales
    and activation columns)."""
    p = Problem(42, 80, 256, bs, dqbs)
    if cfg.decode_kn:
        w = pk.dequant_first.decoded_weight_kn(*p.arrays, spec=p.spec, dtype=dtype, config=cfg,
                                               interpret=INTERPRET)
        assert w.shape == (p.k, p.n)
        w = w.T
    else:
        w = pk.dequant_first.decoded_weight(*p.arrays, spec=p.spec, dtype=dtype, interpret=INTERPRET)
    lib = dequantize(p.q, dtype, backend="xla")[: p.n]
    assert w.shape == (p.n, p.k) and w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(w).view(np.uint16), np.asarray(lib).view(np.uint16))
    x, x64 = p.activations(40, 256, dtype=dtype)
    y = pk.matmul_nt(x[:, :256], *p.arrays, **_layout(p), config=cfg, interpret=INTERPRET)
    assert y.dtype == dtype
    check(y, (40, 80), pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T)
    dy, dy64 = p.activations(40, 80, dtype=dtype)
    dx = pk.matmul_nn(dy[:, :80], *p.arrays, **_layout(p), config=cfg, interpret=INTERPRET)
    check(dx, (40, 256), pk.nf4_matmul_dx_reference(dy, *p.arrays, spec=p.spec), dy64 @ p.w64)
    # out_dtype=float32 hands over the accumulator unrounded (what qlora_jax.ops asks for): the
    # product of the exact decoded values, to float32 accuracy, not bf16's
    w64 = np.asarray(w, np.float64)
    for fn, a, ref in ((pk.matmul_nt, x[:, :256], x64 @ w64.T), (pk.matmul_nn, dy[:, :80], dy64 @ w64)):
        got = fn(a, *p.arrays, **_layout(p), config=cfg, out_dtype=jnp.float32, interpret=INTERPRET)
        assert got.dtype == jnp.float32
        assert rel_err(got, ref) <= 1e-6, rel_err(got, ref)
    # the raw entry point reads only the first k (or n) columns of a wider operand
    y2 = pk.dequant_first.dequant_first_matmul(x, *p.arrays, spec=p.spec, transposed=False, config=cfg,
                                               interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))


def test_dequant_first_falls_back_to_the_fused_kernel():
    """float32 activations (no dequantize kernel for them) take the fused kernel with the same
    tiles; asked directly, the decode refuses float32 by name."""
    p = Problem(43, 48, 128, 64, 256, pad_rows=0)
    assert not pk.dequant_first.servable(p.spec, jnp.float32)
    x, x64 = p.activations(24, 128, pad_cols=0, dtype=jnp.float32)
    cfg = TileConfig(block_m=16, block_n=16, block_k=64, dequant_first=True)
    y = pk.matmul_nt(x, *p.arrays, **_layout(p), config=cfg, interpret=INTERPRET)
    assert y.dtype == jnp.float32
    check(y, (24, 48), pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T)
    with pytest.raises(ValueError, match="to float32"):
        pk.dequant_first.decoded_weight(*p.arrays, spec=p.spec, dtype=jnp.float32, interpret=INTERPRET)
    kn = cfg.replace(decode_kn=True, block_k=96)
    assert not pk.dequant_first.servable(p.spec, jnp.bfloat16, kn)   # block_k does not divide k
    with pytest.raises(ValueError, match="block_k=96"):
        pk.dequant_first.decoded_weight_kn(*p.arrays, spec=p.spec, dtype=jnp.bfloat16, config=kn,
                                           interpret=INTERPRET)


LOWERING_CASES = [
    # op, m, n, k, block_size, dq_block_size, dtype, config ("decode_kn": the [k, n] decoder of
    # the dequant_first path, then XLA's dot)
    ("decode_kn", 300, 200, 256, 64, 256, jnp.bfloat16,
     TileConfig(block_n=64, block_k=128, lut="prmt", dequant_first=True, decode_kn=True)),
    ("decode_kn", 300, 200, 256, 32, None, jnp.float16,
     TileConfig(block_n=64, block_k=64, lut="tree", dequant_first=True, decode_kn=True)),
    ("forward", 300, 192, 256, 64, 256, jnp.bfloat16,
     TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, lut="prmt", swap_ab=True)),
    ("input_grad", 300, 200, 256, 64, 256, jnp.bfloat16,
     TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, lut="prmt", swap_ab=True)),
    ("forward", 300, 192, 256, 64, 256, jnp.bfloat16, TileConfig(block_m=128, block_n=64, block_k=128, lut="prmt")),
    ("forward", 64, 128, 256, 64, None, jnp.float16, TileConfig(block_m=64, block_n=64, block_k=64, lut="prmt32")),
    ("input_grad", 300, 200, 256, 64, 256, jnp.bfloat16, TileConfig(block_m=64, block_n=64, block_k=128, lut="prmt")),
    ("decode", 1, 200, 512, 64, 256, jnp.bfloat16,
     TileConfig(block_n=32, block_k=256, split_k=1, use_dot=True, lut="prmt")),
    ("decode", 3, 200, 512, 64, 256, jnp.bfloat16,
     TileConfig(block_n=32, block_k=128, split_k=2, use_dot=False, lut="prmt")),
    ("decode", 2, 200, 512, 64, 256, jnp.float16,
     TileConfig(block_n=32, block_k=128, split_k=2, use_dot=False, lut="prmt")),
    ("decode", 1, 200, 512, 64, 256, jnp.bfloat16,
     TileConfig(block_n=64, block_k=128, split_k=2, use_dot=False, lut="prmt32")),
    ("decode", 2, 200, 512, 64, 256, jnp.bfloat16,
     TileConfig(block_n=64, block_k=256, split_k=2, use_dot=False, lut="prmt", pair_fma=True)),
    ("decode", 1, 200, 1024, 64, 256, jnp.bfloat16,
     TileConfig(block_n=64, block_k=256, split_k=2, use_dot=False, lut="prmt", pair_fma=True, prefetch=1)),
    ("decode", 1, 200, 2048, 64, 256, jnp.bfloat16,
     TileConfig(block_n=8, block_k=256, split_k=1, use_dot=False, lut="prmt", pair_fma=True, prefetch=3)),
    ("decode", 1, 200, 2048, 64, 256, jnp.bfloat16,
     TileConfig(block_n=16, block_k=1024, split_k=1, use_dot=False, lut="prmt", pair_fma=True, prefetch=1,
                x_planes=True)),
    ("decode", 2, 200, 1024, 64, 256, jnp.bfloat16,
     TileConfig(block_n=32, block_k=256, split_k=2, num_warps=2, use_dot=False, lut="prmt", pair_fma=True,
                x_planes=True)),
    ("decode", 1, 200, 2560, 64, 256, jnp.bfloat16,
     TileConfig(block_n=8, block_k=1024, split_k=1, num_warps=4, use_dot=False, lut="prmt", pair_fma=True,
                prefetch=1, x_direct=True)),
    ("decode", 4, 200, 1024, 64, 256, jnp.bfloat16,
     TileConfig(block_n=4, block_k=512, split_k=1, num_warps=2, use_dot=False, lut="prmt", pair_fma=True,
                x_direct=True)),
    ("forward", 300, 192, 256, 64, 256, jnp.bfloat16, TileConfig(block_m=128, block_n=64, block_k=128, lut="tree")),
]


@pytest.mark.parametrize("op,m,n,k,bs,dqbs,dtype,cfg", LOWERING_CASES)
def test_kernels_lower_to_triton(op, m, n, k, bs, dqbs, dtype, cfg):
    """Each kernel, with each lookup, lowers to verified Triton IR for an H100 (the interpreter
    cannot show that: it runs the jnp model of the inline PTX, and accepts ops Triton has no
    rule for)."""
    spec = _common.make_spec(n, k, bs, dqbs, formats.get_format("nf4").values)
    nb = n * k // bs
    w = [jax.ShapeDtypeStruct((n * k // 2,), jnp.uint8),
         jax.ShapeDtypeStruct((nb,), jnp.uint8 if dqbs else jnp.float32)]
    w += [jax.ShapeDtypeStruct((-(-nb // dqbs),), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)] if dqbs else []
    kn_matmul = functools.partial(pk.dequant_first.dequant_first_matmul, transposed=False)
    fn = {"forward": pk.nf4_matmul, "input_grad": pk.nf4_matmul_dx, "decode": pk.nf4_decode,
          "decode_kn": kn_matmul}[op]
    rows = n if op == "input_grad" else k

    def call(a, codes, absmax, *dq):
        scale, offset = dq if dq else (None, None)
        return fn(a, codes, absmax, scale, offset, spec=spec, config=cfg)

    modules: list[str] = []
    lowers_for_h100(call, jax.ShapeDtypeStruct((m, rows), dtype), *w, modules=modules)
    # No floor division (divide, remainder, select) of a traced index anywhere: in the tile
    # offsets it hides their alignment from Triton, which then loads the packed weight one byte
    # at a time and does not pipeline the loop (measured: see pallas_kernels._common.k_offsets).
    assert modules and all("arith.remsi" not in t for t in modules)


def test_supported():
    ok = dict(m=512, n=4096, k=4096, block_size=64, double_quant=True)
    can = functools.partial(pk.supported, only_if_faster=False)
    assert can("matmul_nt", platform="gpu", **ok)
    assert can("matmul_nn", platform="cuda", **ok)
    assert not can("matmul_nt", platform="cpu", **ok)
    assert not can("matmul_nt", platform="tpu", **ok)
    assert not can("matmul_nt", platform="gpu", **{**ok, "k": 4096 + 32})   # k % block_size
    assert not can("matmul_nt", platform="gpu", **{**ok, "block_size": 48})
    assert not can("matmul_nt", platform="gpu", **{**ok, "m": 0})
    assert can("matmul_nt", platform="gpu", **{**ok, "m": 1, "n": 11008, "k": 11008})
    # by default a kernel is offered only where the table records it beating plain XLA
    for op, kernel_op, m in (("matmul_nt", "decode", 1), ("matmul_nt", "decode", 16),
                             ("matmul_nt", "forward", 17), ("matmul_nt", "forward", 4096),
                             ("matmul_nn", "input_grad", 4096)):
        args = {**ok, "m": m}
        verdict = pk.tuning.get_entry(kernel_op, m, 4096, 4096).beats_xla
        assert pk.supported(op, platform="gpu", **args) == verdict
        assert not pk.supported(op, platform="cpu", **args)
    with pytest.raises(ValueError, match="unknown op"):
        pk.supported("matmul_tn", platform="gpu", **ok)


@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp4_e3m0"])
def test_poly_lut_reproduces_code_table(fmt):
    table = tuple(float(v) for v in formats.get_format(fmt).values)
    got = np.asarray(_common.poly_lut(jnp.arange(16, dtype=jnp.int32), _common.poly_coefficients(table)))
    np.testing.assert_allclose(got, np.array(table), rtol=0, atol=2e-7)


def test_poly_lut_refuses_tables_it_cannot_fit():
    with pytest.raises(ValueError, match="not representable"):
        _common.poly_coefficients(tuple(float(v) for v in formats.get_format("fp4").values))


def test_bad_arguments_raise():
    p = Problem(42, 32, 128, 64, None, pad_rows=0)
    x, _ = p.activations(4, 128, pad_cols=0)
    codes, absmax, _, _ = p.arrays
    with pytest.raises(TypeError, match="codes must be uint8"):
        pk.matmul_nt(x, codes.astype(jnp.int32), absmax, None, None, **_layout(p))
    with pytest.raises(ValueError, match="multiple of block_size"):
        pk.matmul_nt(x, codes, absmax, None, None, **{**_layout(p), "block_size": 256})
    with pytest.raises(ValueError, match="expected k"):
        pk.matmul_nt(x[:, :64], codes, absmax, None, None, **_layout(p))
    with pytest.raises(ValueError, match="absmax_scale and absmax_offset"):
        pk.matmul_nt(x, codes, absmax.astype(jnp.uint8), None, None, **{**_layout(p), "dq_block_size": 256})
    with pytest.raises(ValueError, match="code_table"):
        pk.matmul_nt(x, codes, absmax, None, None, **{**_layout(p), "code_table": np.zeros(8)})


def test_nf4_table_copy_matches_library():
    np.testing.assert_array_equal(np.array(_common.CODE_TABLES["nf4"], np.float32),
                                  formats.get_format("nf4").values)


def test_quantized_array_entry_points():
    """`supports` / `dequant_matmul` / `dequant_matmul_t` on a qlora_jax.QuantizedArray (shapes
    as in the two tests above, so the kernels compiled there are reused)."""
    rng = np.random.default_rng(43)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    q = quantize(w, "nf4", block_size=64, double_quant=True)
    assert pk.supports(10, 256, 96, q, compute_dtype=jnp.bfloat16) == pk.supported(
        "matmul_nt", 10, 96, 256, 64, True, jax.default_backend())  # False on CPU: XLA path
    assert not pk.supports(10, 256, 96, quantize(w, "fp4"), compute_dtype=jnp.bfloat16)
    assert not pk.supports(10, 256, 96, q, compute_dtype=jnp.float32)
    assert not pk.supports(10, 128, 96, q, compute_dtype=jnp.bfloat16)  # shape mismatch
    w64 = np.asarray(dequantize(q, jnp.float32), np.float64)
    x = jnp.asarray(rng.standard_normal((10, 256)), jnp.float32)  # cast to bf16 inside
    x64 = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    y = pk.dequant_matmul(x, q, compute_dtype=jnp.bfloat16, interpret=INTERPRET)
    assert y.dtype == jnp.bfloat16 and y.shape == (10, 96)
    assert rel_err(y, x64 @ w64.T) <= 1e-2
    w2 = rng.standard_normal((80, 192)).astype(np.float32)
    q2 = quantize(w2, "nf4", block_size=64, double_quant=False)
    dy = jnp.asarray(rng.standard_normal((40, 80)), jnp.bfloat16)
    dx = pk.dequant_matmul_t(dy, q2, compute_dtype=jnp.bfloat16, interpret=INTERPRET)
    assert dx.shape == (40, 192)
    w2_64 = np.asarray(dequantize(q2, jnp.float32), np.float64)
    assert rel_err(dx, np.asarray(dy.astype(jnp.float32), np.float64) @ w2_64) <= 1e-2


def test_tuning_table_fits_k():
    for op in ("forward", "decode", "input_grad"):
        for m in ((1, 4, 16) if op == "decode" else (1, 4, 16, 17, 512, 8192)):
            for k, bs in ((4096, 64), (11008, 64), (192, 64), (96, 32), (4096, 4096)):
                cfg = pk.get_config(op, m, 4096, k, bs, device_kind="NVIDIA H100 80GB HBM3")
                if cfg.x_direct:   # whole blocks a step; the last step is masked
                    assert cfg.block_k % bs == 0, (op, m, k, bs, cfg)
                    continue
                sb = min(cfg.block_k, bs)
                assert k % cfg.block_k == 0 and cfg.block_k % sb == 0, (op, m, k, bs, cfg)
    direct = TileConfig(block_k=512, use_dot=False, lut="prmt", pair_fma=True, x_direct=True)
    assert pk.tuning.fit_block_k(direct, 11008, 64) == direct      # not halved to divide K
    assert pk.tuning.fit_block_k(direct, 4096, 1024).block_k == 1024   # rounded up to a block
    assert pk.tuning.fit_block_k(direct, 192, 64).block_k == 256          # no wider than K needs
    h200 = "NVIDIA H200"   # the decode row at M=1: x_direct where K <= N, x_planes' splits past that
    assert pk.get_config("decode", 1, 11008, 4096, 64, device_kind=h200).x_direct
    assert pk.get_config("decode", 1, 4096, 11008, 64, device_kind=h200).x_planes
    with pytest.raises(ValueError, match="unknown op"):
        pk.get_config("backward", 1, 1, 64, 64)
    with pytest.raises(ValueError, match="no 'decode' configuration"):
        pk.get_config("decode", pk.DECODE_MAX_M + 1, 64, 64, 64)


def test_tuning_table_keeps_the_mosaic_kernel_to_shapes_that_fill_the_device():
    h100 = "NVIDIA H100 80GB HBM3"
    big = pk.get_config("forward", 2048, 2048, 2048, 64, device_kind=h100)   # 8 x 16 tiles
    assert big.mosaic and big.dequant_first
    kv = pk.get_config("forward", 2048, 256, 2048, 64, device_kind=h100)    # 8 x 2 tiles
    assert not kv.mosaic and kv.dequant_first and kv.replace(mosaic=True) == big
    assert not pk.get_config("forward", 512, 4096, 4096, 64, device_kind=h100).mosaic   # the 512 row
    # past M=2048 decode-then-cuBLAS measured faster (run55)
    above = pk.get_config("forward", 4096, 4096, 4096, 64, device_kind=h100)
    assert above.dequant_first and not above.mosaic


def test_config_overrides():
    """The tools' "key=value" overrides keep each field's type and refuse unknown keys."""
    cfg = TileConfig(lut="prmt").with_overrides(["block_n=16", "use_dot=0", "prefetch=3", "lut=tree"])
    assert (cfg.block_n, cfg.use_dot, cfg.prefetch, cfg.lut) == (16, False, 3, "tree")
    assert cfg.with_overrides([]) == cfg
    with pytest.raises(ValueError, match="unknown TileConfig field 'blocks'"):
        cfg.with_overrides(["blocks=2"])


def test_x_planes_needs_whole_blocks():
    """x_planes takes K steps of whole quantization blocks; a narrower step is refused by name.
    On float16 x (no word path) the knob is ignored, and the result still matches."""
    p = Problem(9, 40, 256, 128, None)
    x, x64 = p.activations(1, 256)
    cfg = TileConfig(block_n=8, block_k=64, split_k=1, use_dot=False, lut="prmt", pair_fma=True, x_planes=True)
    with pytest.raises(ValueError, match="block_k=64 is not a multiple of block_size=128"):
        pk.nf4_decode(x, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    x16 = x.astype(jnp.float16)
    y = pk.nf4_decode(x16, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    check(y, (1, 40), pk.nf4_decode_reference(x16, *p.arrays, spec=p.spec), x64 @ p.w64.T)


def test_x_direct_refuses_partial_blocks_and_two_x_layouts():
    """x_direct takes K steps of whole blocks of >= 32 weights, and not together with x_planes;
    each refusal names the problem."""
    p = Problem(7, 40, 256, 128, None)
    x, _ = p.activations(1, 256)
    cfg = TileConfig(block_n=8, block_k=64, split_k=1, use_dot=False, lut="prmt", pair_fma=True, x_direct=True)
    with pytest.raises(ValueError, match="x_direct needs K steps of whole blocks .* block_k=64, block_size=128"):
        pk.nf4_decode(x, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    with pytest.raises(ValueError, match="a power of two wide: block_k=384"):
        pk.nf4_decode(x, *p.arrays, spec=p.spec, config=cfg.replace(block_k=384), interpret=INTERPRET)
    with pytest.raises(ValueError, match="x_direct and x_planes"):
        pk.nf4_decode(x, *p.arrays, spec=p.spec, config=cfg.replace(block_k=128, x_planes=True), interpret=INTERPRET)


@pytest.mark.parametrize("m,dtype", [(5, jnp.bfloat16), (1, jnp.float16)])
def test_x_direct_config_falls_back_where_it_does_not_serve(m, dtype):
    """Given more than 4 rows of x (the dot's) or float16 x (no bf16 word path), an x_direct
    config, whose K step need not divide K, becomes another path with a K step that does, and
    the result still matches."""
    p = Problem(6, 40, 640, 64, 256)
    x, x64 = p.activations(m, 640)
    x = x.astype(dtype)
    cfg = TileConfig(block_n=16, block_k=512, split_k=1, use_dot=False, lut="prmt", pair_fma=True, x_direct=True)
    y = pk.nf4_decode(x, *p.arrays, spec=p.spec, config=cfg, interpret=INTERPRET)
    check(y, (m, 40), pk.nf4_decode_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T)


# ------------------------------------------------------------------------------------------
# The Mosaic GPU forward kernel (pallas_kernels.nf4_matmul_mgpu), in Mosaic GPU's CPU interpreter:
# uninitialised memory is NaN (outputs too), out-of-bounds reads raise, races raise. The
# interpreter runs the jnp model of the decode and stages the decoded tile through shared
# memory (no register operand there); the inline-PTX decode and the register operand run in
# the GPU tests below.


def _mgpu_cfg(bm, bn, bk, stages, lut, cluster_n=1):
    return TileConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=stages, group_m=2, lut=lut, mosaic=True,
                      dequant_first=True, cluster_n=cluster_n)


# seed, m, n, k, bs, dqbs, config, CTAs of the persistent grid
MGPU_CASES = [
    (90, 128, 256, 256, 64, 256, _mgpu_cfg(128, 64, 64, 2, "prmt32"), 3),   # 2 tiles, 3 CTAs
    (91, 256, 256, 384, 32, None, _mgpu_cfg(64, 64, 128, 3, "prmt"), 2),   # 8 tiles walked by 2 CTAs
    (92, 128, 128, 512, 128, 64, _mgpu_cfg(128, 64, 64, 2, "prmt32"), 1),  # a block spans 2 K steps
    (97, 64, 128, 512, 256, 256, _mgpu_cfg(64, 64, 64, 2, "prmt"), 2),     # 4 K steps, 1 tile, 2 CTAs
    (98, 128, 512, 256, 64, 256, _mgpu_cfg(64, 64, 64, 2, "prmt", 2), 4),  # clusters of 2 share x's tile
]


@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,cfg,sms", MGPU_CASES)
def test_nf4_matmul_mgpu(seed, m, n, k, bs, dqbs, cfg, sms):
    p = Problem(seed, n, k, bs, dqbs)
    x, x64 = p.activations(m, k, pad_cols=0)
    y = mg.nf4_matmul_mgpu(x, *p.arrays, spec=p.spec, config=cfg, num_sms=sms, interpret=INTERPRET)
    # "prmt32" is exact (float32 table value times float32 scale, rounded once): only the
    # accumulation order differs from the reference, flipping a few bf16 roundings of y;
    # "prmt" rounds the scale to bf16 (~3.5e-3)
    tol = 1e-3 if cfg.lut == "prmt32" else 5e-3
    check(y, (m, n), pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T, tol_ref=tol)


def test_nf4_matmul_mgpu_float32_output(cluster_n=2, m=128, n=512, k=256, sms=4):
    """out_dtype float32: y is the float32 accumulator (written as two bf16 parts), not rounded
    to bf16: with the exact "prmt32" decode it matches float64 products of the decoded weight to
    2e-5 (2.5e-6 measured), where the bf16 output is ~1.7e-3 off."""
    p = Problem(99, n, k, 64, 256)
    x, x64 = p.activations(m, k, pad_cols=0)
    cfg = _mgpu_cfg(64, 64, 64, 2, "prmt32", cluster_n)
    run = functools.partial(mg.nf4_matmul_mgpu, x, *p.arrays, spec=p.spec, config=cfg, num_sms=sms,
                            interpret=INTERPRET)
    y32, y16 = run(out_dtype=jnp.float32), run()
    assert y32.dtype == jnp.float32 and y32.shape == (m, n) and y16.dtype == jnp.bfloat16
    # the weight as the kernel multiplies it: decoded, rounded to bf16
    wd = _common.dequantize_reference(*p.arrays, p.spec).astype(jnp.bfloat16)
    wd = np.asarray(wd.astype(jnp.float32), np.float64)
    ref = x64 @ wd.T
    assert rel_err(y32, ref) <= 2e-5, rel_err(y32, ref)
    assert rel_err(y16, ref) >= 1e-3, rel_err(y16, ref)   # the bf16 rounding the float32 path avoids


def test_matmul_nt_takes_the_mosaic_kernel_where_it_serves(monkeypatch):
    calls = []
    kernel = mg.nf4_matmul_mgpu
    monkeypatch.setattr(mg, "nf4_matmul_mgpu", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    p = Problem(93, 128, 256, 64, 256, pad_rows=0)
    cfg = _mgpu_cfg(64, 64, 64, 2, "prmt")
    for m in (128, 100):   # 100 is not a multiple of block_m: dequant_first serves it
        x, x64 = p.activations(m, 256, pad_cols=0)
        for out_dtype in (None, jnp.float32):
            y = pk.matmul_nt(x, *p.arrays, **_layout(p), config=cfg, out_dtype=out_dtype, interpret=INTERPRET)
            assert y.dtype == (out_dtype or jnp.bfloat16)
            check(y, (m, 128), pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T)
    assert calls == [(128, 256)]   # float32 results and M=100 take dequant_first


def test_mosaic_kernel_refuses_what_it_cannot_serve():
    p = Problem(94, 128, 256, 64, None, pad_rows=0)
    x, _ = p.activations(128, 256, pad_cols=0)
    run = functools.partial(mg.nf4_matmul_mgpu, spec=p.spec, interpret=True)
    with pytest.raises(ValueError, match="cannot compute M=100"):
        run(x[:100], *p.arrays, config=_mgpu_cfg(64, 64, 64, 2, "prmt"))
    with pytest.raises(ValueError, match="cannot compute"):
        run(x.astype(jnp.float32), *p.arrays, config=_mgpu_cfg(64, 64, 64, 2, "prmt"))
    with pytest.raises(ValueError, match="cannot compute"):   # N=128 is not 2 x 128
        run(x, *p.arrays, config=_mgpu_cfg(64, 128, 64, 2, "prmt"))
    with pytest.raises(ValueError, match="lut must be one of"):
        run(x, *p.arrays, config=_mgpu_cfg(64, 64, 64, 2, "tree"))
    with pytest.raises(ValueError, match="writes bfloat16 or float32"):
        run(x, *p.arrays, config=_mgpu_cfg(64, 64, 64, 2, "prmt"), out_dtype=jnp.float16)
    with pytest.raises(ValueError, match="shared memory"):
        run(x, *p.arrays, config=_mgpu_cfg(128, 64, 256, 8, "prmt"))
    with pytest.raises(ValueError, match="expected k=256"):
        run(x[:, :128], *p.arrays, config=_mgpu_cfg(64, 64, 64, 2, "prmt"))
    with pytest.raises(ValueError, match=r"x must be \[m, k\]"):
        run(x[None], *p.arrays, config=_mgpu_cfg(64, 64, 64, 2, "prmt"))
    codes, absmax, _, _ = p.arrays
    with pytest.raises(TypeError, match="codes must be uint8"):
        run(x, codes.astype(jnp.int32), absmax, None, None, config=_mgpu_cfg(64, 64, 64, 2, "prmt"))
    with pytest.raises(ValueError, match="codes holds"):
        run(x, codes[:100], absmax, None, None, config=_mgpu_cfg(64, 64, 64, 2, "prmt"))
    assert not mg.servable(p.spec, 128, jnp.bfloat16, _mgpu_cfg(512, 64, 64, 2, "prmt"))  # wgmma N <= 256
    assert not mg.servable(p.spec, 128, jnp.bfloat16, _mgpu_cfg(64, 64, 64, 2, "prmt", 2))  # N=128 < 2 CTAs' rows
    assert not mg.servable(p.spec, 128, jnp.bfloat16, _mgpu_cfg(64, 32, 64, 2, "prmt", 4))  # clusters of 1 or 2


# ------------------------------------------------------------------------------------------
# GPU: the same kernels compiled by Triton, at real shapes


# (m, n, k): decode and training M, Llama-7B-like N/K, and a ragged M/N at real scale
GPU_SHAPES = [(1, 4096, 4096), (4, 11008, 4096), (16, 4096, 11008), (333, 1000, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("dqbs", [256, None])
def test_gpu_matmul_nt_nn(m, n, k, dqbs):
    p = Problem(50 + m, n, k, 64, dqbs, pad_rows=0)
    x, x64 = p.activations(m, k, pad_cols=0)
    y = jax.jit(lambda x, *a: pk.matmul_nt(x, *a, **_layout(p)))(x, *p.arrays)
    ref = pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec)
    check(y, (m, n), ref, x64 @ p.w64.T)
    dy, dy64 = p.activations(m, n, pad_cols=0)
    dx = jax.jit(lambda d, *a: pk.matmul_nn(d, *a, **_layout(p)))(dy, *p.arrays)
    check(dx, (m, k), pk.nf4_matmul_dx_reference(dy, *p.arrays, spec=p.spec), dy64 @ p.w64)


@pytest.mark.gpu
@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,fmt,cfg", FORWARD_CASES)
def test_gpu_small_cases_compile(seed, m, n, k, bs, dqbs, fmt, cfg):
    """The interpret-mode cases (poisoned buffers, ragged tails, gather LUT) compiled for real."""
    test_nf4_matmul_forward(seed, m, n, k, bs, dqbs, fmt, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,cfg", DECODE_CASES)
def test_gpu_decode_cases_compile(seed, m, n, k, bs, dqbs, cfg):
    test_nf4_decode(seed, m, n, k, bs, dqbs, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,fmt,cfg", DX_CASES)
def test_gpu_dx_cases_compile(seed, m, n, k, bs, dqbs, fmt, cfg):
    test_nf4_matmul_dx(seed, m, n, k, bs, dqbs, fmt, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("bs,dqbs,dtype,cfg", DEQUANT_FIRST_CASES)
def test_gpu_dequant_first_path(bs, dqbs, dtype, cfg):
    test_dequant_first_path(bs, dqbs, dtype, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("seed,m,n,k,bs,dqbs,cfg,sms", MGPU_CASES)
def test_gpu_mgpu_cases_compile(seed, m, n, k, bs, dqbs, cfg, sms):
    """The interpret-mode cases compiled: the inline-PTX decode, the 4-bit relayout and the
    register operand, which the interpreter does not run."""
    test_nf4_matmul_mgpu(seed, m, n, k, bs, dqbs, cfg, sms)


@pytest.mark.gpu
@pytest.mark.parametrize("lut,cluster_n,bk,stages", [("prmt", 1, 64, 4), ("prmt32", 1, 64, 4), ("prmt", 2, 128, 2)])
@pytest.mark.parametrize("m,n,k", [(512, 11008, 4096), (256, 4096, 11008)])
def test_gpu_mgpu_at_real_shape(lut, cluster_n, bk, stages, m, n, k):
    """The Mosaic GPU kernel with the tuning sweeps' tiles at real shapes, all SMs."""
    p = Problem(95, n, k, 64, 256, pad_rows=0)
    x, x64 = p.activations(m, k, pad_cols=0)
    cfg = _mgpu_cfg(256, 64, bk, stages, lut, cluster_n)
    y = mg.nf4_matmul_mgpu(x, *p.arrays, spec=p.spec, config=cfg)
    ref = pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec)
    print(f"{lut} cluster {cluster_n} M={m} N={n} K={k}: rel. err. {rel_err(y, np.asarray(ref, np.float32))} "
          f"against the reference, {rel_err(y, x64 @ p.w64.T)} against float64")
    check(y, (m, n), ref, x64 @ p.w64.T, tol_ref=1e-3 if lut == "prmt32" else 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster_n", [1, 2])
def test_gpu_mgpu_float32_output(cluster_n):
    """The float32 output compiled (two bf16 parts), small and at a real shape with all SMs."""
    test_nf4_matmul_mgpu_float32_output(cluster_n)
    test_nf4_matmul_mgpu_float32_output(cluster_n, m=512, n=4096, k=11008, sms=None)


@pytest.mark.gpu
@pytest.mark.parametrize("swap_ab,dequant_first,decode_kn", [(True, False, False), (False, True, False),
                                                             (False, True, True)])
def test_gpu_training_paths_at_real_shape(swap_ab, dequant_first, decode_kn):
    """The training paths compiled at a real, ragged shape with real tile sizes."""
    p = Problem(60, 1000, 4096, 64, 256, pad_rows=0)
    cfg = TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, lut="prmt", swap_ab=swap_ab,
                     dequant_first=dequant_first, decode_kn=decode_kn)
    x, x64 = p.activations(333, 4096, pad_cols=0)
    y = jax.jit(lambda x, *a: pk.matmul_nt(x, *a, **_layout(p), config=cfg))(x, *p.arrays)
    check(y, (333, 1000), pk.nf4_matmul_reference(x, *p.arrays, spec=p.spec), x64 @ p.w64.T)
    dy, dy64 = p.activations(333, 1000, pad_cols=0)
    dx = jax.jit(lambda d, *a: pk.matmul_nn(d, *a, **_layout(p), config=cfg))(dy, *p.arrays)
    check(dx, (333, 4096), pk.nf4_matmul_dx_reference(dy, *p.arrays, spec=p.spec), dy64 @ p.w64)


def test_bench_kernels_sweep_overrides_keep_decode_paths_apart():
    """`bench_kernels --configs-from`: a forward sweep's config serves larger M too, but a decode
    sweep at M=1 (the CUDA-core path) says nothing of M > 1 (the dot), nor the reverse."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    one, dot, fwd = TileConfig(x_direct=True), TileConfig(block_n=128), TileConfig(mosaic=True)
    assert bench._override({("decode", 1): one}, "decode", 1) == one
    assert bench._override({("decode", 1): one}, "decode", 4) is None
    assert bench._override({("decode", 16): dot}, "decode", 1) is None
    assert bench._override({("decode", 1): one, ("decode", 16): dot}, "decode", 4) == dot
    assert bench._override({("forward", 4096): fwd}, "forward", 8192) == fwd
    assert bench._override(None, "forward", 8192) is None
