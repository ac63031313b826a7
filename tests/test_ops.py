"""Tests of qlora_jax.ops: the frozen 4-bit linear, the QLoRA matmul and its custom VJP."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qlora_jax import dequantize, quantize_linear_kernel
from qlora_jax import ops
from qlora_jax.ops import qlora_matmul, qlora_matmul_multi, quant_matmul

F32 = jnp.float32


def enable_x64():
    """Float64 inside a block (``jax.enable_x64`` on new JAX, ``jax.experimental`` on old)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as _old  # noqa: PLC0415
    return _old()


def _rand(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape, F32) * scale


@functools.cache
def _weight(k, n, fmt, dq, block_size, seed):
    # Cached: each new (shape, format) compiles the quantizer, the bulk of this file's run time.
    w_q = quantize_linear_kernel(_rand(seed, (k, n), 0.5), format=fmt, double_quant=dq, block_size=block_size)
    return w_q, np.asarray(dequantize(w_q, F32), np.float64)


def _problem(k, n, r, lead, *, fmt="nf4", dq=True, block_size=64, seed=0):
    """x [*lead, K], W_q [N, K], A [K, r], B [r, N], bias [N] and W_deq as float64 numpy."""
    w_q, w64 = _weight(k, n, fmt, dq, block_size, 0)
    x = _rand(seed + 1, (*lead, k))
    a = _rand(seed + 2, (k, r), 0.3)
    b = _rand(seed + 3, (r, n), 0.3)
    bias = _rand(seed + 4, (n,))
    return x, w_q, a, b, bias, w64


def _ref(x, w64, a, b, scale, bias=None):
    """Float64 numpy ``x·Wᵀ + scale·x·A·B (+ bias)``."""
    x64 = np.asarray(x, np.float64)
    y = x64 @ w64.T + scale * (x64 @ np.asarray(a, np.float64)) @ np.asarray(b, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def _close(y, ref, rel):
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < rel, f"relative error {err:.3g} >= {rel}"


# --------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("k,n,fmt,dq,bs,lead", [
    (100, 70, "nf4", True, 64, (2, 3)),     # ragged K and N: blocks straddle rows
    (100, 70, "nf4", True, 64, ()),
    (96, 130, "fp4", False, 32, (5,)),
    (72, 40, "fp4", True, 128, (3,)),
    (72, 40, "nf4", False, 128, (1, 1, 2)),
])
def test_qlora_matmul_fp32_matches_float64(k, n, fmt, dq, bs, lead):
    x, w_q, a, b, bias, w64 = _problem(k, n, 4, lead, fmt=fmt, dq=dq, block_size=bs)
    y = qlora_matmul(x, w_q, a, b, 0.75, bias=bias, compute_dtype=F32)
    assert y.dtype == F32 and y.shape == (*lead, n)
    ref = _ref(x, w64, a, b, 0.75, bias)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    yq = quant_matmul(x, w_q, compute_dtype=F32)
    np.testing.assert_allclose(np.asarray(yq, np.float64), _ref(x, w64, a, b, 0.0),
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_bf16_compute_within_bf16_tolerance():
    x, w_q, a, b, bias, w64 = _problem(100, 70, 8, (4, 6))
    y = qlora_matmul(x, w_q, a, b, 2.0, bias=bias)            # default compute dtype: bf16
    assert y.dtype == jnp.bfloat16
    _close(y, _ref(x, w64, a, b, 2.0, bias), 1e-2)
    yq = quant_matmul(x, w_q)
    assert yq.dtype == jnp.bfloat16
    _close(yq, _ref(x, w64, a, b, 0.0), 1e-2)


def test_dense_base_and_vector_input():
    x, _, a, b, bias, _ = _problem(100, 70, 2, ())
    w = _rand(9, (70, 100))                                    # a dense [N, K] base
    y = qlora_matmul(x, w, a, b, 0.5, bias=bias, compute_dtype=F32)
    assert y.shape == (70,)
    np.testing.assert_allclose(np.asarray(y, np.float64), _ref(x, np.asarray(w, np.float64), a, b, 0.5, bias),
                               rtol=1e-5, atol=1e-5)


def test_jit_and_traced_scale():
    x, w_q, a, b, bias, w64 = _problem(100, 70, 4, (3,))
    f = jax.jit(lambda x, a, b, s: qlora_matmul(x, w_q, a, b, s, bias=bias, compute_dtype=F32))
    np.testing.assert_allclose(np.asarray(f(x, a, b, 1.5), np.float64), _ref(x, w64, a, b, 1.5, bias),
                               rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# gradients


def _naive64(w64):
    w = jnp.asarray(w64)

    def f(x, a, b, bias, s):
        return x @ w.T + s * (x @ a) @ b + bias
    return f


@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_grads_match_float64_autodiff(lead):
    x, w_q, a, b, bias, w64 = _problem(100, 70, 4, lead, seed=3)
    cot = _rand(11, (*lead, 70))
    loss = lambda x, a, b, bias: jnp.sum(qlora_matmul(x, w_q, a, b, 0.6, bias=bias, compute_dtype=F32) * cot)
    got = jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, bias)
    with enable_x64():
        f64 = _naive64(w64)
        args64 = [jnp.asarray(np.asarray(v), jnp.float64) for v in (x, a, b, bias)]
        c64 = jnp.asarray(np.asarray(cot), jnp.float64)
        want = jax.grad(lambda *z: jnp.sum(f64(*z, 0.6) * c64), argnums=(0, 1, 2, 3))(*args64)
        want = [np.asarray(w) for w in want]
    for g, w, name in zip(got, want, ("x", "A", "B", "bias")):
        assert g.dtype == F32, name
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4, atol=1e-4 * np.abs(w).max(),
                                   err_msg=name)


def test_grads_numerical_check_fp32():
    x, w_q, a, b, bias, _ = _problem(100, 70, 3, (4,), seed=5)
    f = lambda x, a, b, bias: qlora_matmul(x, w_q, a, b, 0.8, bias=bias, compute_dtype=F32)
    check_grads(f, (x, a, b, bias), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)
    g = lambda x: quant_matmul(x, w_q, compute_dtype=F32)
    check_grads(g, (x,), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_bf16_grads_within_tolerance():
    x, w_q, a, b, bias, w64 = _problem(100, 70, 8, (16,), seed=8)
    cot = _rand(12, (16, 70))
    got = jax.grad(lambda x, a, b: jnp.sum(qlora_matmul(x, w_q, a, b, 1.0).astype(F32) * cot),
                   argnums=(0, 1, 2))(x, a, b)
    with enable_x64():
        f64 = _naive64(w64)
        args64 = [jnp.asarray(np.asarray(v), jnp.float64) for v in (x, a, b)]
        want = jax.grad(lambda x, a, b: jnp.sum(f64(x, a, b, 0.0, 1.0) * jnp.asarray(np.asarray(cot), jnp.float64)),
                        argnums=(0, 1, 2))(*args64)
        want = [np.asarray(w) for w in want]
    for g, w in zip(got, want):
        _close(g, w, 2e-2)


def _float_leaves(tree):
    return [l for l in jax.tree_util.tree_leaves(tree)
            if hasattr(l, "dtype") and jnp.issubdtype(l.dtype, jnp.floating)]


def test_residuals_hold_no_dense_weight():
    k, n = 100, 70                     # N·K larger than any activation or adapter below
    x, w_q, a, b, bias, _ = _problem(k, n, 4, (6,))
    dense = n * k

    f = lambda x, a, b: qlora_matmul(x, w_q, a, b, 0.5, bias=bias, compute_dtype=F32)
    _, vjp_fn = jax.vjp(f, x, a, b)
    sizes = [l.size for l in _float_leaves(vjp_fn)]
    assert sizes and max(sizes) < dense, sizes
    # the residuals include the packed codes (uint8) rather than a decoded copy
    assert any(l.dtype == jnp.uint8 and l.size == dense // 2 for l in jax.tree_util.tree_leaves(vjp_fn))

    _, vjp_q = jax.vjp(lambda x: quant_matmul(x, w_q, compute_dtype=F32), x)
    assert all(l.size < dense for l in _float_leaves(vjp_q))

    # the same probe finds the decoded weight in the naive "dequantize then dot" path
    naive = lambda x, a, b: x @ dequantize(w_q, F32).T + 0.5 * (x @ a) @ b
    _, vjp_naive = jax.vjp(naive, x, a, b)
    assert any(l.size >= dense for l in _float_leaves(vjp_naive))


def test_jitted_chain_keeps_no_decoded_weight_alive():
    """Under jit, XLA must not keep each layer's decoded weight from forward to backward (by CSE
    of the two decodes, or by hoisting the decodes): the program's scratch memory grows by less
    than one decoded weight per layer (only activations). On CPU, "dequantize then dot under
    jax.grad" grows by a whole weight per layer, which shows the probe can see them (XLA:GPU may
    fuse the naive decode into each consumer instead)."""
    d, m = 512, 32
    ws = [_weight(d, d, "nf4", True, 64, i)[0] for i in range(5)]
    x = _rand(0, (m, d))
    w_bytes = d * d * 4

    def scratch(layer, n_layers):
        a, b = jnp.zeros((n_layers, d, 4)), jnp.zeros((n_layers, 4, d))

        def loss(a, b, x, ws):
            h = x
            for i in range(n_layers):
                h = jnp.tanh(layer(h, ws[i], a[i], b[i]))
            return jnp.sum(h * h)

        c = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(a, b, x, ws[:n_layers]).compile()
        analysis = c.memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis is not available on this backend")
        return analysis.temp_size_in_bytes

    def per_layer(layer):
        return (scratch(layer, 5) - scratch(layer, 1)) / 4

    assert per_layer(lambda h, w, a, b: qlora_matmul(h, w, a, b, 1.0, compute_dtype=F32)) < 0.5 * w_bytes
    if jax.default_backend() == "cpu":
        naive = per_layer(lambda h, w, a, b: h @ dequantize(w, F32).T + (h @ a) @ b)
        assert naive >= 0.9 * w_bytes                        # the probe sees each decoded weight


def test_no_gradient_for_quantized_base():
    x, w_q, a, b, _, _ = _problem(100, 70, 4, (3,))
    g = jax.grad(lambda w: jnp.sum(qlora_matmul(x, w, a, b, 1.0, compute_dtype=F32)), allow_int=True)(w_q)
    for leaf in jax.tree_util.tree_leaves(g):
        if leaf.dtype != jax.dtypes.float0:
            assert not np.any(np.asarray(leaf)), "the quantized base got a non-zero gradient"


# --------------------------------------------------------------------------------------------
# dropout


def test_dropout_rate_zero_or_no_rng_is_identity():
    x, w_q, a, b, bias, _ = _problem(100, 70, 4, (5,))
    y = qlora_matmul(x, w_q, a, b, 1.0, bias=bias, compute_dtype=F32)
    y0 = qlora_matmul(x, w_q, a, b, 1.0, bias=bias, dropout_rate=0.0, dropout_rng=jax.random.key(1),
                      compute_dtype=F32)
    yn = qlora_matmul(x, w_q, a, b, 1.0, bias=bias, dropout_rate=0.3, dropout_rng=None, compute_dtype=F32)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(yn), np.asarray(y))


def test_dropout_masks_lora_branch_only_and_preserves_mean():
    p, k = 0.25, 8
    x = _rand(0, (4096, k)) + 3.0       # away from 0 so that kept/dropped entries are distinct
    w_q, _ = _weight(k, k, "nf4", True, 32, 1)
    eye = jnp.eye(k, dtype=F32)          # A = B = I: the LoRA branch is drop(x) itself
    key = jax.random.key(7)
    y = qlora_matmul(x, w_q, eye, eye, 1.0, dropout_rate=p, dropout_rng=key, compute_dtype=F32)
    base = quant_matmul(x, w_q, compute_dtype=F32)
    ratio = np.asarray((y - base) / x, np.float64)
    kept = np.abs(ratio - 1.0 / (1.0 - p)) < 1e-3
    dropped = np.abs(ratio) < 1e-3
    assert np.all(kept | dropped), "LoRA branch entries must be 0 or x/(1-p)"
    assert abs(dropped.mean() - p) < 0.01
    assert abs(ratio.mean() - 1.0) < 0.02                     # inverted dropout keeps the mean
    # with B = 0 the output is the base output whatever the mask: the base is never masked
    yz = qlora_matmul(x, w_q, eye, jnp.zeros_like(eye), 1.0, dropout_rate=p, dropout_rng=key, compute_dtype=F32)
    np.testing.assert_allclose(np.asarray(yz), np.asarray(base), rtol=1e-6, atol=1e-5)
    # same key → same output; another key → another mask
    y2 = qlora_matmul(x, w_q, eye, eye, 1.0, dropout_rate=p, dropout_rng=key, compute_dtype=F32)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    y3 = qlora_matmul(x, w_q, eye, eye, 1.0, dropout_rate=p, dropout_rng=jax.random.key(8), compute_dtype=F32)
    assert not np.allclose(np.asarray(y3), np.asarray(y))


def test_dropout_gradients():
    x, w_q, a, b, bias, _ = _problem(100, 70, 4, (6,), seed=2)
    key = jax.random.key(3)
    f = lambda x, a, b: qlora_matmul(x, w_q, a, b, 1.0, bias=bias, dropout_rate=0.5, dropout_rng=key,
                                     compute_dtype=F32)
    check_grads(f, (x, a, b), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------
# several adapters per batch


def test_multi_adapter_rows_equal_single_runs():
    k, n, r, nad = 100, 70, 4, 3
    x, w_q, _, _, bias, _ = _problem(k, n, r, (5, 3))
    a = _rand(20, (nad, k, r), 0.3)
    b = _rand(21, (nad, r, n), 0.3)
    scales = jnp.asarray([0.5, 2.0, 1.0])
    ids = jnp.asarray([2, -1, 0, 1, 0], jnp.int32)
    y = qlora_matmul_multi(x, w_q, a, b, scales, ids, bias=bias, compute_dtype=F32)
    assert y.shape == (5, 3, n)
    for i, j in enumerate(np.asarray(ids)):
        if j < 0:
            want = quant_matmul(x[i], w_q, compute_dtype=F32) + bias
        else:
            want = qlora_matmul(x[i], w_q, a[j], b[j], scales[j], bias=bias, compute_dtype=F32)
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(want), rtol=1e-5, atol=1e-5)
    # also differentiable (x and the stacked adapters)
    g = jax.grad(lambda a: jnp.sum(qlora_matmul_multi(x, w_q, a, b, scales, ids, compute_dtype=F32)))(a)
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g[0]))


# --------------------------------------------------------------------------------------------
# backend dispatch


def test_backend_selection_on_cpu():
    x, w_q, a, b, _, _ = _problem(100, 70, 4, (3,))
    if jax.default_backend() == "cpu":
        assert ops._dispatch("auto", 3, 64, 32, w_q, F32) == "xla"
        with pytest.raises(ValueError, match="pallas"):
            qlora_matmul(x, w_q, a, b, 1.0, backend="pallas")
    with pytest.raises(ValueError, match="backend"):
        qlora_matmul(x, w_q, a, b, 1.0, backend="cuda")
    np.testing.assert_array_equal(
        np.asarray(qlora_matmul(x, w_q, a, b, 1.0, backend="auto", compute_dtype=F32)),
        np.asarray(qlora_matmul(x, w_q, a, b, 1.0, backend="xla", compute_dtype=F32)))


def _fake_pallas(supported=True):
    """A stand-in for pallas_kernels (plain JAX) that counts its calls."""
    calls = {"fwd": 0, "bwd": 0}

    def dequant_matmul(x, w, *, compute_dtype, out_dtype):
        calls["fwd"] += 1
        return jnp.dot(x, dequantize(w, compute_dtype).T, preferred_element_type=F32).astype(out_dtype)

    def dequant_matmul_t(dy, w, *, compute_dtype, out_dtype):
        calls["bwd"] += 1
        return jnp.dot(dy.astype(compute_dtype), dequantize(w, compute_dtype),
                       preferred_element_type=F32).astype(out_dtype)

    mod = types.SimpleNamespace(supports=lambda m, k, n, w, *, compute_dtype, transposed: supported,
                                dequant_matmul=dequant_matmul, dequant_matmul_t=dequant_matmul_t)
    return mod, calls


@pytest.mark.parametrize("supported", [True, False])
def test_pallas_dispatch_path_agrees_with_xla(monkeypatch, supported):
    x, w_q, a, b, bias, _ = _problem(100, 70, 4, (2, 3))
    f = lambda x, a, b, backend: qlora_matmul(x, w_q, a, b, 0.5, bias=bias, compute_dtype=F32, backend=backend)
    loss = lambda x, a, b, backend: jnp.sum(jnp.sin(f(x, a, b, backend)))
    y_xla = f(x, a, b, "xla")
    g_xla = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, "xla")
    mod, calls = _fake_pallas(supported)
    monkeypatch.setattr(ops, "_pallas_module", lambda: mod)
    monkeypatch.setattr(ops, "_on_gpu", lambda: True)
    y = f(x, a, b, "auto")
    g = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, "auto")
    assert calls == ({"fwd": 2, "bwd": 1} if supported else {"fwd": 0, "bwd": 0})
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_xla), rtol=1e-5, atol=1e-5)
    for gi, gx in zip(g, g_xla):
        np.testing.assert_allclose(np.asarray(gi), np.asarray(gx), rtol=1e-5, atol=1e-5)


def _auto_agrees_with_xla(m: int, seed: int):
    """qlora_matmul's value and vjp with backend "auto" against "xla" (relative 1e-2) on a
    512 -> 384 layer with M = m rows; returns the problem and the "auto" value."""
    x, w_q, a, b, bias, w64 = _problem(512, 384, 8, (m,), seed=seed)
    cot = _rand(seed + 9, (m, 384))

    def run(backend):
        f = lambda x, a, b: qlora_matmul(x, w_q, a, b, 0.5, bias=bias, backend=backend)
        y, vjp = jax.vjp(f, x, a, b)
        return (y, *vjp(cot.astype(y.dtype)))

    auto = run("auto")
    for got, want in zip(auto, run("xla")):
        _close(got.astype(F32), np.asarray(want.astype(F32), np.float64), 1e-2)
    return (x, w64, a, b, bias), auto[0]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [4, 16, 512])
def test_gpu_auto_backend_agrees_with_xla(m):
    """On the GPU, "auto" takes the Pallas kernels where they claim the shape (by the current
    tuning table: the decode kernel up to M=16, dequant_first above); values and gradients must
    equal the plain XLA path's."""
    (x, w64, a, b, bias), y = _auto_agrees_with_xla(m, seed=4)
    _close(y.astype(F32), _ref(x, w64, a, b, 0.5, bias), 1e-2)


@pytest.mark.gpu
def test_gpu_training_products_leave_the_mosaic_kernel_to_dequant_first(monkeypatch):
    """qlora_matmul asks for float32 base products; with a Mosaic GPU row in the tuning table for
    every M they go to dequant_first, not the kernel (whose float32 output made the training step
    slower, run42), and values and gradients equal the plain XLA path's."""
    import pallas_kernels
    from pallas_kernels import nf4_matmul_mgpu, tuning

    cfg = tuning.TileConfig(block_m=256, block_n=64, block_k=64, num_stages=4, group_m=8, lut="prmt", mosaic=True,
                            dequant_first=True)
    monkeypatch.setitem(tuning._HOPPER, "forward", (tuning.Entry(1 << 62, cfg, True),))
    monkeypatch.setattr(tuning, "MOSAIC_MIN_TILES", 1)   # this 512 x 384 layer has 6 tiles
    calls = []
    kernel = nf4_matmul_mgpu.nf4_matmul_mgpu
    monkeypatch.setattr(nf4_matmul_mgpu, "nf4_matmul_mgpu", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    # an earlier test of the same shape in this process left traces made with the real table
    jax.clear_caches()
    _auto_agrees_with_xla(512, seed=5)
    assert pallas_kernels.get_config("forward", 512, 384, 512, 64).mosaic
    assert calls == []


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs():
    x, w_q, a, b, bias, _ = _problem(100, 70, 4, (3,))
    with pytest.raises(ValueError, match="input features"):
        qlora_matmul(x[..., :60], w_q, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_a"):
        qlora_matmul(x, w_q, a[:60], b, 1.0)
    with pytest.raises(ValueError, match="lora_b"):
        qlora_matmul(x, w_q, a, b[:, :30], 1.0)
    with pytest.raises(ValueError, match="bias"):
        qlora_matmul(x, w_q, a, b, 1.0, bias=bias[:5])
    with pytest.raises(ValueError, match="dropout_rate"):
        qlora_matmul(x, w_q, a, b, 1.0, dropout_rate=1.0, dropout_rng=jax.random.key(0))
    with pytest.raises(TypeError, match="floating"):
        quant_matmul(x.astype(jnp.int32), w_q)
    with pytest.raises(TypeError, match="QuantizedArray"):
        quant_matmul(x, "not a weight")
    with pytest.raises(ValueError, match="adapter_ids"):
        qlora_matmul_multi(x, w_q, a[None], b[None], jnp.ones(1), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="scales"):
        qlora_matmul_multi(x, w_q, a[None], b[None], jnp.ones(2), jnp.zeros(3, jnp.int32))
