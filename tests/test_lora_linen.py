"""The Linen transform (`qlora_jax.linen`) on unmodified transformer-like Linen models.

Two models built from stock Linen layers, whose code the transform never touches: one with a
Python list of blocks (Linen names them ``layers_0``, ``layers_1``), one whose blocks are
stacked with ``nn.scan`` over ``nn.remat``. References are independent of the transform: the
dequantized kernels are rebuilt here from `qlora_jax.dequantize` by the plain rule "``[N, K]`` →
transpose → reshape to the kernel shape" (every kernel below has its contracted axes first), and
the adapted kernel is ``deq(W)ᵀ + s·A·B`` in that same 2-D view.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.linen import LORA_A, LORA_B, inject
from qlora_jax.lora import LoraConfig
from qlora_jax.quantize import QuantizedArray, QuantPolicy, dequantize

D, H, HD, F, V, L = 32, 4, 8, 64, 48, 2      # width, heads, head dim, MLP width, vocab, layers
BATCH, SEQ = 2, 8
# Block sizes chosen so that both stacked-kernel views are exercised: the MLP kernels have 64
# scale blocks a layer (a multiple of dq_block_size=64: 8-bit scales are sliced per layer), the
# attention kernels 32 (second-level blocks straddle layers: decoded scales).
POLICY = QuantPolicy(min_size=0, block_size=32, dq_block_size=64)
ATTN = ("query", "key", "value", "out")
MLP = ("up", "down")


# --------------------------------------------------------------------------------------------
# The models (plain Linen; the transform must work on them as they are)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((H, HD), name="query")(x)
        k = nn.DenseGeneral((H, HD), use_bias=False, name="key")(x)
        # Kernel axes (d, h, n): the output "btnh" puts them in another order than the kernel.
        v = nn.Einsum((D, HD, H), "btd,dhn->btnh", name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(HD), axis=-1)
        o = jnp.einsum("bnqk,bknh->bqnh", w, v)
        return nn.DenseGeneral(D, axis=(-2, -1), name="out")(o)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="down")(nn.gelu(nn.Dense(F, name="up")(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        x = x + Attention(name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + Mlp(name="mlp")(nn.LayerNorm(name="ln2")(x)), None


class ListModel(nn.Module):
    def setup(self):
        self.embed = nn.Embed(V, D)
        self.layers = [Block() for _ in range(L)]
        self.norm = nn.LayerNorm()
        self.lm_head = nn.Dense(V)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x, _ = layer(x)
        return self.lm_head(self.norm(x))


class ScanModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True}, length=L)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(V, name="lm_head")(nn.LayerNorm(name="norm")(x))


def _linear_names(kind: str) -> list[str]:
    mods = [f"attn.{m}" for m in ATTN] + [f"mlp.{m}" for m in MLP]
    sep = "_" if kind == "list" else "."
    return [f"layers{sep}{i}.{m}" for i in range(L) for m in mods] + ["lm_head"]


def _randomize(tree, seed, std=0.3, add=False):
    """Random normal values (numpy: no PRNG code to compile) for every leaf of ``tree`` (arrays or
    ShapeDtypeStructs); biases included, so their layouts are checked. ``add`` adds them."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) if add else 0) + jnp.asarray(
        std * rng.standard_normal(x.shape), x.dtype), tree)


def _init_params(model, *args):
    return _randomize(jax.eval_shape(model.init, jax.random.key(0), *args)["params"], 1)


def _layer_index(kind: str, name: str) -> int:
    seg = name.split(".")
    return int(seg[0].split("_")[-1]) if kind == "list" else int(seg[1])


def _expected_scale(kind: str, name: str) -> float:
    """The fixture config's scale for ``name``, written out by hand: all-linear, rank 2 for
    "value" (rank_pattern), alpha 8, and in the scanned model layer 1 only."""
    if name == "lm_head" or (kind == "scan" and _layer_index(kind, name) != 1):
        return 0.0
    return 8 / (2 if name.endswith(".value") else 4)


@functools.lru_cache(maxsize=None)
def _build(kind: str):
    model = ListModel() if kind == "list" else ScanModel()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (BATCH, SEQ)), jnp.int32)
    params = _init_params(model, tokens)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"value": 2},
                     layers_to_transform=[1] if kind == "scan" else None, lora_dropout=0.1)
    qm = inject(model, cfg, tokens, quantize=POLICY, compute_dtype=jnp.float32)
    qparams = qm.quantize_params(params)
    lora0 = qm.init_lora(jax.random.key(3))
    lora = _random_lora(lora0, 4)
    return dict(kind=kind, model=model, tokens=tokens, params=params, qm=qm, qparams=qparams,
                lora0=lora0, lora=lora, apply=jax.jit(qm.apply), ref_apply=jax.jit(model.apply))


@pytest.fixture(params=["list", "scan"])
def built(request):
    return _build(request.param)


def _deq_params(qparams, float_params):
    """qparams with each QuantizedArray [*L, N, K] decoded and put back as a kernel [*L, K, ...]
    (shapes from the float params)."""
    def walk(node, shapes):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out[k] = walk(v, shapes[k])
            elif isinstance(v, QuantizedArray):
                out[k] = jnp.swapaxes(dequantize(v, jnp.float32), -1, -2).reshape(shapes[k].shape)
            else:
                out[k] = v
        return out
    return walk(qparams, float_params)


def _effective_params(kind, dense, lora):
    """Dense params with kernel = deq(W)ᵀ + s·A·B per layer (s from `_expected_scale`)."""
    dense = jax.tree.map(lambda x: x, dense)

    def walk(node, lnode, path):
        for k, v in lnode.items():
            if isinstance(v, dict) and LORA_A not in v:
                walk(node[k], v, path + (k,))
            elif isinstance(v, dict):
                kern, a, b = node[k]["kernel"], v[LORA_A], v[LORA_B]
                stacked = a.ndim == 3
                if not stacked:
                    a, b, kern = a[None], b[None], kern[None]
                ws = []
                for i in range(a.shape[0]):
                    name = ".".join(path + (k,))
                    if stacked:
                        name = name.replace("layers.", f"layers.{i}.", 1)
                    w2 = kern[i].reshape(a.shape[1], -1) + _expected_scale(kind, name) * a[i] @ b[i]
                    ws.append(w2.reshape(kern[i].shape))
                node[k]["kernel"] = jnp.stack(ws) if stacked else ws[0]
    walk(dense, lora, ())
    return dense


def _random_lora(lora, seed, std=0.2):
    return _randomize(lora, seed, std, add=True)


# --------------------------------------------------------------------------------------------
# Which layers get adapters


def _names_of(qm):
    return sorted(qm.adapted_names)


@pytest.mark.parametrize("kind", ["list", "scan"])
@pytest.mark.parametrize("case", ["list", "regex", "all-linear", "exclude", "layers", "patterns"])
def test_adapted_paths_follow_target_modules(kind, case):
    model = ListModel() if kind == "list" else ScanModel()
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    names = _linear_names(kind)
    leaf = lambda n: n.split(".")[-1]  # noqa: E731
    layer_of = lambda n: int(n.split(".")[0].split("_")[-1]) if kind == "list" else int(n.split(".")[1])  # noqa: E731
    kw, expect = {}, []
    if case == "list":
        kw = dict(target_modules=["query", "value"])
        expect = [n for n in names if leaf(n) in ("query", "value")]
    elif case == "regex":
        kw = dict(target_modules=r".*mlp\.(up|down)")
        expect = [n for n in names if ".mlp." in n]
    elif case == "all-linear":
        kw = dict(target_modules="all-linear")
        expect = [n for n in names if n != "lm_head"]
    elif case == "exclude":
        kw = dict(target_modules="all-linear", exclude_modules=["key", "down"])
        expect = [n for n in names if n != "lm_head" and leaf(n) not in ("key", "down")]
    elif case == "layers":
        kw = dict(target_modules=["query", "up"], layers_to_transform=[1])
        expect = [n for n in names if leaf(n) in ("query", "up") and layer_of(n) == 1]
    elif case == "patterns":
        kw = dict(target_modules=["query", "value", "up"], rank_pattern={"value": 2}, alpha_pattern={"up": 12})
        expect = [n for n in names if leaf(n) in ("query", "value", "up")]
    cfg = LoraConfig(r=4, lora_alpha=8, **kw)
    qm = inject(model, cfg, tokens, quantize=POLICY)
    assert _names_of(qm) == sorted(expect)
    lora = jax.eval_shape(qm.init_lora, jax.random.key(0))
    # The LoRA tree mirrors the module paths: one entry a module (a stack shares one).
    got_paths = sorted(".".join(p[:-1]) for p, _ in _flat(lora) if p[-1] == LORA_A)
    strip = (lambda n: n) if kind == "list" else (lambda n: n.replace(f"layers.{n.split('.')[1]}.", "layers."))
    assert got_paths == sorted({strip(n) for n in expect})
    for layer in qm.layers.values():
        for nm, r, s in zip(layer.names, layer.ranks, layer.scales):
            want_r = (2 if leaf(nm) == "value" and case == "patterns" else 4) if nm in expect else 0
            want_alpha = 12 if leaf(nm) == "up" and case == "patterns" else 8
            assert r == want_r, nm
            assert s == (want_alpha / want_r if want_r else 0.0), nm


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _flat(v, prefix + (k,))]
    return [(prefix, tree)]


# --------------------------------------------------------------------------------------------
# Numerics


def test_output_at_init_equals_dequantized_base(built):
    b = built
    for p, v in _flat(b["lora0"]):
        if p[-1] == LORA_B or (b["kind"] == "scan"):
            # B = 0 everywhere; in the stack, layer 0 (not in layers_to_transform) is all zero.
            assert not np.any(np.asarray(v if p[-1] == LORA_B else v[0])), p
    y = b["apply"](b["qparams"], b["lora0"], b["tokens"])
    dense = _deq_params(b["qparams"], b["params"])
    ref = b["ref_apply"]({"params": dense}, b["tokens"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # The base really is 4-bit: the float model's output differs by the quantization error.
    y_float = b["ref_apply"]({"params": b["params"]}, b["tokens"])
    assert float(jnp.max(jnp.abs(y_float - ref))) > 1e-3


@pytest.mark.parametrize("kind", ["Dense", "DenseGeneral", "Einsum"])
def test_one_layer_matches_float64_formula(kind):
    # Each layer's own semantics in float64 numpy: output from a kernel, and the kernel's gradient.
    # (K = 32 and N = 64 throughout, the MLP's shape: no new quantizer compile.)
    if kind == "Dense":
        layer, x_shape, kshape = nn.Dense(F), (3, 5, D), (D, F)
        fwd = lambda x, k: x @ k                                        # noqa: E731
        dkernel = lambda x, ct: np.einsum("abk,abn->kn", x, ct)         # noqa: E731
    elif kind == "DenseGeneral":
        layer, x_shape, kshape = nn.DenseGeneral((8, 8), axis=(-2, -1)), (3, 4, 8), (4, 8, 8, 8)
        fwd = lambda x, k: np.tensordot(x, k, axes=((1, 2), (0, 1)))     # noqa: E731
        dkernel = lambda x, ct: np.tensordot(x, ct, axes=((0,), (0,)))  # noqa: E731
    else:
        layer, x_shape, kshape = nn.Einsum((D, 16, 4), "btd,dhn->btnh"), (3, 5, D), (D, 16, 4)
        fwd = lambda x, k: np.einsum("btd,dhn->btnh", x, k)              # noqa: E731
        dkernel = lambda x, ct: np.einsum("btd,btnh->dhn", x, ct)        # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape), jnp.float32)
    params = _init_params(layer, x)
    cfg = LoraConfig(r=3, lora_alpha=7, target_modules="all-linear", init_lora_weights=False)
    qm = inject(layer, cfg, x, quantize=POLICY, compute_dtype=jnp.float32)
    assert len(qm.adapted_names) == 1
    qparams = qm.quantize_params(params)
    lora = qm.init_lora(jax.random.key(3))
    y = np.asarray(qm.apply(qparams, lora, x), np.float64)

    s = 7 / 3
    w = np.asarray(dequantize(qparams["kernel"], jnp.float32), np.float64)        # [N, K]
    a, b = (np.asarray(lora[k], np.float64) for k in (LORA_A, LORA_B))
    merged2 = w.T + s * a @ b                                                      # [K, N]
    xd, bias = np.asarray(x, np.float64), np.asarray(params["bias"], np.float64)   # Einsum: bias [n, h]
    ref = fwd(xd, merged2.reshape(kshape)) + bias
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    # Without adapters: the frozen 4-bit layer alone.
    np.testing.assert_allclose(np.asarray(qm.apply(qparams, None, x), np.float64),
                               fwd(xd, w.T.reshape(kshape)) + bias, rtol=2e-5, atol=2e-5)
    # Gradients of <y, ct>: d kernel = G, so dA = s·G·Bᵀ and dB = s·Aᵀ·G (G in [K, N] form).
    ct = np.random.default_rng(1).standard_normal(y.shape)
    g = jax.grad(lambda l: jnp.sum(qm.apply(qparams, l, x) * jnp.asarray(ct, jnp.float32)))(lora)
    g2 = dkernel(xd, ct).reshape(merged2.shape)
    np.testing.assert_allclose(np.asarray(g[LORA_A]), s * g2 @ b.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g[LORA_B]), s * a.T @ g2, rtol=1e-4, atol=1e-4)
    # Merge: the float kernel deq(W)ᵀ + s·A·B in the layer's own shape; re-quantized, the report
    # gives the error the re-quantization adds.
    merged, report = qm.merge(qparams, lora)
    np.testing.assert_allclose(np.asarray(merged["kernel"]), merged2.reshape(kshape), rtol=1e-5, atol=1e-6)
    rq, report = qm.merge(qparams, lora, requantize=True)
    w_rq = np.asarray(dequantize(rq["kernel"], jnp.float32), np.float64)
    err = np.linalg.norm(w_rq - merged2.T) / np.linalg.norm(merged2)
    assert report.requantized and report.rel_errors[qm.adapted_names[0]] == pytest.approx(err, rel=1e-3)
    assert 0 < err < 0.2
    # The default bf16 compute dtype: same function within bf16 rounding.
    qm16 = inject(layer, cfg, x, quantize=POLICY)
    y16 = qm16.apply(qparams, lora, x)
    assert y16.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(y16, np.float64) - ref) / np.linalg.norm(ref) < 1e-2


def test_adapted_model_equals_merged_and_effective_dense(built):
    b = built
    qm, qparams, lora = b["qm"], b["qparams"], b["lora"]
    y = b["apply"](qparams, lora, b["tokens"])
    eff = _effective_params(b["kind"], _deq_params(qparams, b["params"]), lora)
    np.testing.assert_allclose(np.asarray(y), np.asarray(b["ref_apply"]({"params": eff}, b["tokens"])),
                               rtol=1e-4, atol=1e-4)
    merged, report = qm.merge(qparams, lora)
    assert jax.tree.structure(merged) == jax.tree.structure(b["params"])
    assert sorted(report.merged) == sorted(qm.adapted_names)
    np.testing.assert_allclose(np.asarray(b["ref_apply"]({"params": merged}, b["tokens"])), np.asarray(y),
                               rtol=1e-4, atol=1e-4)


def test_lora_gradient_matches_merged_dense_gradient():
    # Through nn.scan and nn.remat (each layer kind's gradient is checked alone above).
    b = _build("scan")
    qm, qparams, lora, tokens = b["qm"], b["qparams"], b["lora"], b["tokens"]
    target = jnp.asarray(np.random.default_rng(6).standard_normal((BATCH, SEQ, V)), jnp.float32)
    dense = _deq_params(qparams, b["params"])

    def loss(lora):
        return jnp.mean((qm.apply(qparams, lora, tokens) - target) ** 2)

    def loss_ref(lora):
        eff = _effective_params(b["kind"], dense, lora)
        return jnp.mean((b["model"].apply({"params": eff}, tokens) - target) ** 2)

    g = jax.jit(jax.grad(loss))(lora)
    g_ref = jax.jit(jax.grad(loss_ref))(lora)
    assert jax.tree.structure(g) == jax.tree.structure(lora)
    for (p, a), (_, r) in zip(_flat(g), _flat(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-3, atol=1e-6, err_msg=str(p))
        # Layer 0 is outside layers_to_transform: its slot gets no gradient (stays zero).
        assert not np.any(np.asarray(a[0])) and np.any(np.asarray(a[1])), p


def test_jit_vmap_and_remat(built):
    b = built
    y = b["apply"](b["qparams"], b["lora"], b["tokens"])
    yv = jax.jit(jax.vmap(lambda t: b["qm"].apply(b["qparams"], b["lora"], t[None])[0]))(b["tokens"])
    np.testing.assert_allclose(np.asarray(yv), np.asarray(y), rtol=1e-5, atol=1e-5)
    if b["kind"] == "scan":
        fn = jax.grad(lambda l: jnp.sum(b["qm"].apply(b["qparams"], l, b["tokens"])))
        jaxpr = str(jax.make_jaxpr(fn)(b["lora"]))
        assert "scan" in jaxpr and ("remat" in jaxpr or "checkpoint" in jaxpr)


class Small(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        x = x + nn.Dense(D, name="up")(x)
        return nn.Dense(V, name="lm_head")(x)


@functools.lru_cache(maxsize=None)
def _build_small():
    model = Small()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (BATCH, SEQ)), jnp.int32)
    params = _init_params(model, tokens)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["up"], modules_to_save=["lm_head"],
                     bias="lora_only", lora_dropout=0.2)
    qm = inject(model, cfg, tokens, quantize=POLICY, compute_dtype=jnp.float32)
    return model, tokens, params, qm, qm.quantize_params(params)


def test_modules_to_save_and_trainable_biases():
    model, tokens, params, qm, qparams = _build_small()
    assert qm.layers["up"].quantize and not qm.layers["lm_head"].quantize
    with pytest.raises(ValueError, match="params="):
        qm.init_lora(jax.random.key(3))
    lora = qm.init_lora(jax.random.key(3), params)
    paths = {".".join(p) for p, _ in _flat(lora)}
    assert paths == {"lm_head.kernel", "lm_head.bias", "up.lora_a", "up.lora_b", "up.bias"}
    g = jax.jit(jax.grad(lambda l: jnp.sum(qm.apply(qparams, l, tokens) ** 2)))(lora)
    assert all(np.any(np.asarray(v)) for p, v in _flat(g) if p[-1] != LORA_A)   # A: B is still 0
    # The trained copies are what the model uses, and what merge exports.
    lora2 = jax.tree.map(lambda x: x + 0.05, lora)
    merged, _ = qm.merge(qparams, lora2)
    np.testing.assert_array_equal(np.asarray(merged["lm_head"]["kernel"]), np.asarray(lora2["lm_head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(merged["up"]["bias"]), np.asarray(lora2["up"]["bias"]))
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, tokens)),
                               np.asarray(qm.apply(qparams, lora2, tokens)), rtol=1e-4, atol=1e-4)


def test_optax_steps_reduce_loss_with_dropout():
    model, tokens, params, qm, qparams = _build_small()
    lora = qm.init_lora(jax.random.key(0), params)
    tx = optax.adam(1e-2)
    opt = tx.init(lora)
    labels = jnp.roll(tokens, -1, axis=1)

    def loss(lora, key):
        logits = qm.apply(qparams, lora, tokens, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(lora, opt, key):
        val, g = jax.value_and_grad(loss)(lora, key)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, val

    losses = []
    for i in range(8):
        lora, opt, val = step(lora, opt, jax.random.key(10 + i))
        losses.append(float(val))
    assert losses[-1] < losses[0] - 0.05, losses


def test_dropout_runs_with_a_dropout_stream_inside_scan():
    b = _build("scan")
    f = jax.jit(lambda l, k: b["qm"].apply(b["qparams"], l, b["tokens"], rngs={"dropout": k}))
    y1, y2 = f(b["lora"], jax.random.key(1)), f(b["lora"], jax.random.key(2))
    y0 = b["apply"](b["qparams"], b["lora"], b["tokens"])        # no "dropout" stream: no dropout
    assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-4
    assert float(jnp.max(jnp.abs(y1 - y0))) > 1e-4


def test_trees_round_trip_through_checkpoints(built, tmp_path):
    import orbax.checkpoint as ocp

    from qlora_jax.io.checkpoint import load_safetensors, save_safetensors

    b = built
    qparams, lora = b["qparams"], b["lora"]
    save_safetensors(tmp_path / "base.safetensors", qparams)
    qp2 = load_safetensors(tmp_path / "base.safetensors")
    ckpt = ocp.StandardCheckpointer()
    try:
        ckpt.save(tmp_path / "lora", lora)
        ckpt.wait_until_finished()
        lora2 = ckpt.restore(tmp_path / "lora", jax.tree.map(ocp.utils.to_shape_dtype_struct, lora))
    finally:
        ckpt.close()
    is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
    assert jax.tree.structure(qp2, is_leaf=is_q) == jax.tree.structure(qparams, is_leaf=is_q)
    for x, y in zip(jax.tree.leaves(qparams), jax.tree.leaves(qp2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(b["apply"](qp2, lora2, b["tokens"])),
                                  np.asarray(b["apply"](qparams, lora, b["tokens"])))


# --------------------------------------------------------------------------------------------
# Bad input


def test_errors():
    model = ListModel()
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer(.|\n)*layers_0\.attn\.query"):
        inject(model, LoraConfig(target_modules=["query", "nope"]), tokens)
    with pytest.raises(ValueError, match="rank r=40"):
        inject(model, LoraConfig(r=40, target_modules=["query"]), tokens)
    with pytest.raises(TypeError, match="LoraConfig"):
        inject(model, {"r": 4}, tokens)

    class Batched(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(4, axis=-1, batch_dims=0, name="per_row")(x)

    with pytest.raises(ValueError, match="per_row.*batch_dims"):
        inject(Batched(), LoraConfig(target_modules=["per_row"]), jnp.ones((3, 5)))

    x = jnp.zeros((BATCH, SEQ), jnp.int32)
    qm = inject(model, LoraConfig(r=4, target_modules=["up"]), tokens, quantize=POLICY)
    qparams = _build("list")["params"]          # float kernels are accepted too
    lora = jax.eval_shape(qm.init_lora, jax.random.key(1))
    lora = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), lora)
    bad = jax.tree.map(lambda a: a, lora)
    bad["layers_0"]["mlp"]["up"][LORA_A] = jnp.zeros((D, 3))
    with pytest.raises(ValueError, match=r"layers_0\.mlp\.up.*\(32, 3\).*\(32, 4\)"):
        qm.apply(qparams, bad, x)
    extra = jax.tree.map(lambda a: a, lora)
    extra["layers_0"]["mlp"]["down"] = {LORA_A: jnp.zeros((F, 4)), LORA_B: jnp.zeros((4, D))}
    with pytest.raises(ValueError, match="does not adapt"):
        qm.apply(qparams, extra, x)
    with pytest.raises(ValueError, match="no adapters to merge"):
        qm.merge(qparams, {})
