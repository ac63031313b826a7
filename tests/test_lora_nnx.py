"""Tests of LoraConfig and the NNX transform (qlora_jax.lora, qlora_jax.nnx).

The model below is ordinary Flax NNX code that knows nothing about LoRA: attention with
q/k/v/o ``nnx.Linear``, an MLP whose up-projection is an ``nnx.LinearGeneral`` and whose
down-projection is an ``nnx.Einsum``, norms, an embedding and an output head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qlora_jax import QuantPolicy, dequantize
from qlora_jax import nnx as qnnx
from qlora_jax.lora import LoraConfig

F32 = jnp.float32
VOCAB, D, F, H, LAYERS = 50, 40, 72, 4, 2


class Attention(nnx.Module):
    def __init__(self, d, h, rngs):
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)
        self.o_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.h = h

    def __call__(self, x):
        b, t, d = x.shape
        hd = d // self.h
        q = self.q_proj(x).reshape(b, t, self.h, hd)
        k = self.k_proj(x).reshape(b, t, self.h, hd)
        v = self.v_proj(x).reshape(b, t, self.h, hd)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)
        return self.o_proj(o.reshape(b, t, d))


class Block(nnx.Module):
    def __init__(self, d, f, h, rngs):
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = Attention(d, h, rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.LinearGeneral(d, (2, f // 2), rngs=rngs)
        self.down = nnx.Einsum("btgf,gfd->btd", (2, f // 2, d), (d,), rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.layers = nnx.List([Block(D, F, H, rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


ALL = [f"layers.{i}.{m}" for i in range(LAYERS)
       for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "up", "down")] + ["lm_head"]
IDS = jax.random.randint(jax.random.key(1), (4, 6), 0, VOCAB)
POLICY = QuantPolicy(min_size=0)          # quantize every kernel (default exclude: heads, embeddings)


def _model(seed=0):
    m = TinyLM(nnx.Rngs(seed))
    m.layers[0].attn.q_proj.bias.set_value(jax.random.normal(jax.random.key(5), (D,)))
    m.layers[1].down.bias.set_value(jax.random.normal(jax.random.key(6), (D,)))
    return m


def _at(model, path):
    node = model
    for p in path.split("."):
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    return node


def _inject(config, quantize=POLICY, name="default", seed=0, **kw):
    m = _model(seed)
    orig = nnx.clone(m)
    paths = qnnx.inject(m, config, quantize=quantize, adapter_name=name, compute_dtype=F32,
                        rngs=nnx.Rngs(10 + seed), **kw)
    return m, orig, paths


def _reference(model, orig, deltas=None):
    """``orig`` with each swapped layer's kernel set to ``deq(W)ᵀ (+ delta)`` (float64 sum)."""
    ref = nnx.clone(orig)
    for p, layer in qnnx._quant_layers(model).items():
        w = np.asarray(layer.dense_weight(F32), np.float64).T                     # [K, N]
        if deltas and p in deltas:
            w = w + deltas[p]
        k = _at(ref, p).kernel
        k.set_value(jnp.asarray(w.reshape(k.get_value().shape), F32))
    return ref


def _delta(layer, name, weight=1.0):
    """``weight · s · A·B`` ``[K, N]`` float64 for adapter ``name`` of ``layer``."""
    a = np.asarray(layer.lora_a[name].get_value(), np.float64)
    b = np.asarray(layer.lora_b[name].get_value(), np.float64)
    return weight * layer.specs[name].scale * (a @ b)


def _deltas(model, weights):
    out = {}
    for p, layer in qnnx.lora_layers(model).items():
        for name, w in weights.items():
            if name in layer.specs:
                out[p] = out.get(p, 0.0) + _delta(layer, name, w)
    return out


def _randomize(model, name="default", seed=0, scale=0.2):
    weights = {}
    for i, (p, layer) in enumerate(qnnx.lora_layers(model).items()):
        if name in layer.specs:
            a = layer.lora_a[name].get_value()
            b = layer.lora_b[name].get_value()
            weights[p] = {"lora_a": scale * jax.random.normal(jax.random.key(seed * 1000 + 2 * i), a.shape),
                          "lora_b": scale * jax.random.normal(jax.random.key(seed * 1000 + 2 * i + 1), b.shape)}
    qnnx.load_adapter_weights(model, weights, name)


def _assert_close(y, want, rel=1e-5):
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    assert y.shape == want.shape
    err = np.abs(y - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < rel, f"max relative error {err:.3g} >= {rel}"


# --------------------------------------------------------------------------------------------
# LoraConfig


def test_config_matching_rules():
    c = LoraConfig(target_modules=["q_proj", "attn.o_proj"])
    assert c.matches("layers.0.attn.q_proj") and c.matches("q_proj") and c.matches("layers.1.attn.o_proj")
    assert not c.matches("layers.0.attn.q_proj_x") and not c.matches("layers.0.xq_proj")
    c = LoraConfig(target_modules=r"layers\.\d\.attn\.(q|v)_proj")
    assert c.matches("layers.3.attn.v_proj") and not c.matches("x.layers.3.attn.v_proj")   # fullmatch
    c = LoraConfig(target_modules="all-linear", exclude_modules=["down"])
    assert c.matches("layers.0.up") and not c.matches("layers.0.down") and not c.matches("lm_head")
    c = LoraConfig(r=8, rank_pattern={"q_proj": 2, r"layers\.1\..*": 5}, alpha_pattern={"v_proj": 3.0})
    assert c.rank_for("layers.0.attn.q_proj") == 2 and c.rank_for("layers.0.attn.xq_proj") == 8
    assert c.rank_for("layers.1.attn.k_proj") == 5 and c.rank_for("layers.0.attn.k_proj") == 8
    assert c.scale_for("layers.0.attn.v_proj") == 3.0 / 8 and c.scale_for("layers.0.attn.q_proj") == 8 / 2
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scale_for("x") == 8 / 4
    c = LoraConfig(target_modules=["q_proj"], layers_to_transform=[1])
    assert c.matches("model.layers.1.attn.q_proj") and not c.matches("model.layers.0.attn.q_proj")
    assert not c.matches("q_proj")                                   # no layer index: skipped
    c = LoraConfig(target_modules=["q_proj"], layers_to_transform=2, layers_pattern="h")
    assert c.layer_index("blocks.0.h.2.q_proj") == 2 and c.matches("blocks.0.h.2.q_proj")


def test_config_dict_roundtrip():
    c = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}, use_rslora=True,
                   layers_to_transform=[0, 2], bias="lora_only", modules_to_save=["lm_head"],
                   init_lora_weights="gaussian")
    d = c.to_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q_proj", "v_proj"]
    assert LoraConfig.from_dict(d) == c
    peft_json = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"],
                 "task_type": "CAUSAL_LM", "some_future_field": 1, "use_dora": False}
    assert LoraConfig.from_dict(peft_json).r == 16
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig.from_dict({**peft_json, "use_dora": True})
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({**peft_json, "peft_type": "IA3"})


# --------------------------------------------------------------------------------------------
# which layers get adapters


def _p(suffixes, layers=range(LAYERS)):
    return {p for p in ALL if any(p == f"layers.{i}.{s}" for i in layers for s in suffixes)}


@pytest.mark.parametrize("config,expected", [
    (LoraConfig(target_modules=["q_proj", "v_proj"]), _p(["attn.q_proj", "attn.v_proj"])),
    (LoraConfig(target_modules=None), _p(["attn.q_proj", "attn.v_proj"])),          # PEFT llama default
    (LoraConfig(target_modules=["attn.o_proj", "up"]), _p(["attn.o_proj", "up"])),
    (LoraConfig(target_modules=r"layers\.1\.attn\.(q|k)_proj"), _p(["attn.q_proj", "attn.k_proj"], [1])),
    (LoraConfig(target_modules="all-linear"), set(ALL) - {"lm_head"}),
    (LoraConfig(target_modules="all-linear", exclude_modules=["down", "k_proj"]),
     _p(["attn.q_proj", "attn.v_proj", "attn.o_proj", "up"])),
    (LoraConfig(target_modules="all-linear", exclude_modules=r".*\.attn\..*"), _p(["up", "down"])),
    (LoraConfig(target_modules=["q_proj", "up"], layers_to_transform=1), _p(["attn.q_proj", "up"], [1])),
    (LoraConfig(target_modules=["down"], layers_to_transform=[0], layers_pattern="layers"), _p(["down"], [0])),
    (LoraConfig(target_modules=["lm_head", "q_proj"]), _p(["attn.q_proj"]) | {"lm_head"}),
])
def test_adapted_paths_follow_target_modules(config, expected):
    m, _, paths = _inject(config, quantize=None)
    assert set(paths) == expected and len(paths) == len(expected)
    for p in ALL:
        layer = _at(m, p)
        assert isinstance(layer, qnnx.LoraLinear) == (p in expected), p
        if p in expected:
            assert list(layer.specs) == ["default"] and not layer.quantized


def test_rank_and_alpha_patterns_and_rslora():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                     rank_pattern={"q_proj": 2, r"layers\.1\.up": 6}, alpha_pattern={"v_proj": 3})
    m, _, paths = _inject(cfg, quantize=None)
    for p in paths:
        layer = _at(m, p)
        r = 2 if p.endswith("q_proj") else 6 if p == "layers.1.up" else 4
        alpha = 3 if p.endswith("v_proj") else 8
        assert layer.lora_a["default"].get_value().shape == (layer.in_features, r), p
        assert layer.lora_b["default"].get_value().shape == (r, layer.out_features), p
        assert layer.specs["default"].scale == pytest.approx(alpha / math.sqrt(r)), p
    # without rsLoRA the scale is alpha / r
    m2, _, _ = _inject(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), quantize=None)
    assert m2.layers[0].attn.q_proj.specs["default"].scale == 2.0


def test_init_weights_follow_peft():
    m, _, _ = _inject(LoraConfig(r=8, target_modules="all-linear"), quantize=None)
    down = m.layers[0].down                      # K = 72: Kaiming-uniform bound 1/sqrt(72)
    a = np.asarray(down.lora_a["default"].get_value())
    assert np.abs(a).max() <= 1 / math.sqrt(72) and np.abs(a).max() > 0.8 / math.sqrt(72)
    assert not np.any(np.asarray(down.lora_b["default"].get_value()))
    m, _, _ = _inject(LoraConfig(r=8, target_modules="all-linear", init_lora_weights="gaussian"), quantize=None)
    a = np.concatenate([np.asarray(l.lora_a["default"].get_value()).ravel() for l in qnnx.lora_layers(m).values()])
    assert abs(a.std() - 1 / 8) < 0.01                             # PEFT: normal with std 1/r


# --------------------------------------------------------------------------------------------
# outputs


def test_quantized_layers_and_output_at_init():
    m, orig, paths = _inject(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in ALL:
        layer = _at(m, p)
        if p in paths:
            assert isinstance(layer, qnnx.LoraLinear) and layer.quantized
        elif p == "lm_head":                      # the policy's default exclude keeps heads in float
            assert type(layer) is nnx.Linear
        else:
            assert type(layer) is qnnx.QuantLinear and layer.quantized
    assert isinstance(m.layers[0].attn.q_proj.base, qnnx.QuantWeight)
    ref = _reference(m, orig)
    _assert_close(m(IDS), ref(IDS), 1e-5)
    # the quantized model is not the float model: the test above can tell them apart
    assert np.abs(np.asarray(m(IDS)) - np.asarray(orig(IDS))).max() > 1e-3


def test_float_base_output_at_init_equals_original():
    m, orig, _ = _inject(LoraConfig(r=4, target_modules="all-linear"), quantize=None)
    assert isinstance(m.layers[1].up.base, qnnx.FrozenWeight)
    _assert_close(m(IDS), orig(IDS), 1e-5)


def test_manual_adapters_match_float64():
    m, orig, paths = _inject(LoraConfig(r=3, lora_alpha=5, target_modules="all-linear"))
    _randomize(m)
    _assert_close(m(IDS), _reference(m, orig, _deltas(m, {"default": 1.0}))(IDS), 1e-4)
    # layer level, in float64 numpy, for each layer type
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, D)), np.float64)
    for p, eq in (("layers.0.attn.q_proj", "btk,kn->btn"), ("layers.1.up", "btk,kgf->btgf")):
        layer = _at(m, p)
        kern = (np.asarray(layer.dense_weight(F32), np.float64).T + _delta(layer, "default"))
        kern = kern.reshape(_at(orig, p).kernel.get_value().shape)
        want = np.einsum(eq, x, kern) + np.asarray(_at(orig, p).bias.get_value(), np.float64)
        _assert_close(layer(jnp.asarray(x, F32)), want, 1e-5)
    down = m.layers[1].down
    h = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 2, F // 2)), np.float64)
    kern = (np.asarray(down.dense_weight(F32), np.float64).T + _delta(down, "default")).reshape(2, F // 2, D)
    want = np.einsum("btgf,gfd->btd", h, kern) + np.asarray(down.bias.get_value(), np.float64)
    _assert_close(down(jnp.asarray(h, F32)), want, 1e-5)


def test_training_updates_only_adapters():
    m, _, _ = _inject(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base_before = jax.tree.map(np.asarray, nnx.state(m, qnnx.BaseWeight))
    graphdef, lora, rest = nnx.split(m, nnx.LoRAParam, ...)
    tx = optax.adam(3e-2)
    opt_state = tx.init(lora)

    def loss_fn(lora, rest):
        logits = nnx.merge(graphdef, lora, rest)(IDS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS).mean()

    @jax.jit
    def step(lora, rest, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(lora, rest)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for _ in range(5):
        lora, opt_state, loss = step(lora, rest, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    nnx.update(m, lora)
    base_after = jax.tree.map(np.asarray, nnx.state(m, qnnx.BaseWeight))
    for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
        np.testing.assert_array_equal(x, y)
    n_lora = sum(l.size for l in jax.tree.leaves(lora))
    assert n_lora == sum(l.in_features * 4 + 4 * l.out_features for l in qnnx.lora_layers(m).values())

    # the nnx.Optimizer route (flax >= 0.12.10): optimizer state covers the adapters only
    opt = nnx.Optimizer(m, optax.adam(3e-3), wrt=nnx.LoRAParam)
    moments = [l for l in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if l.ndim > 0]
    assert sum(l.size for l in moments) == 2 * n_lora                # Adam's mu and nu, no more

    @nnx.jit
    def nnx_step(m, opt):
        def lf(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(IDS), IDS).mean()
        loss, grads = nnx.value_and_grad(lf, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return loss

    l0 = float(nnx_step(m, opt))
    l1 = [float(nnx_step(m, opt)) for _ in range(3)][-1]
    assert l1 < l0, (l0, l1)
    for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(nnx.state(m, qnnx.BaseWeight))):
        np.testing.assert_array_equal(x, np.asarray(y))


# --------------------------------------------------------------------------------------------
# merge


def test_merge_to_float_model():
    m, orig, paths = _inject(LoraConfig(r=4, target_modules="all-linear"))
    _randomize(m)
    y = m(IDS)
    merged, report = qnnx.merge(m)
    assert merged is m and set(report.merged) == set(paths) and report.adapters == ("default",)
    for p in ALL:
        assert type(_at(m, p)) is type(_at(orig, p)), p
        assert _at(m, p).kernel.get_value().shape == _at(orig, p).kernel.get_value().shape
    assert not jax.tree.leaves(nnx.state(m, nnx.LoRAParam))
    assert not jax.tree.leaves(nnx.state(m, qnnx.BaseWeight))
    _assert_close(m(IDS), y, 1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        qnnx.merge(m)


def test_merge_requantize_reports_error():
    m, _, paths = _inject(LoraConfig(r=4, target_modules=["q_proj", "up"]))
    _randomize(m)
    y = m(IDS)
    q = m.layers[1].up
    w_merged = np.asarray(q.dense_weight(F32), np.float64) + _delta(q, "default").T       # [N, K]
    _, report = qnnx.merge(m, requantize=True)
    assert report.requantized and set(report.rel_errors) == set(paths)
    assert all(0 < e < 0.2 for e in report.rel_errors.values()), report.rel_errors
    new = m.layers[1].up
    assert type(new) is qnnx.QuantLinear and new.quantized
    dq = np.asarray(dequantize(new.base.get_value(), F32), np.float64)
    want = np.linalg.norm(dq - w_merged) / np.linalg.norm(w_merged)
    assert report.rel_errors["layers.1.up"] == pytest.approx(want, rel=1e-4)
    err = np.abs(np.asarray(m(IDS)) - np.asarray(y)).max() / np.abs(np.asarray(y)).max()
    assert 0 < err < 0.2


def test_merge_adapter_and_unmerge_on_float_base():
    m, _, _ = _inject(LoraConfig(r=4, target_modules=["q_proj", "down"]), quantize=None)
    _randomize(m)
    y = m(IDS)
    w0 = np.asarray(m.layers[0].attn.q_proj.base.get_value())
    merged = qnnx.merge_adapter(m)
    assert set(merged) == {"layers.0.attn.q_proj", "layers.1.attn.q_proj", "layers.0.down", "layers.1.down"}
    assert not np.allclose(np.asarray(m.layers[0].attn.q_proj.base.get_value()), w0)
    _assert_close(m(IDS), y, 1e-5)
    qnnx.unmerge(m)
    np.testing.assert_allclose(np.asarray(m.layers[0].attn.q_proj.base.get_value()), w0, atol=1e-6)
    _assert_close(m(IDS), y, 1e-5)
    mq, _, _ = _inject(LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="4-bit"):
        qnnx.merge_adapter(mq)


# --------------------------------------------------------------------------------------------
# several adapters


def _two_adapters(r_b=2, quantize=POLICY):
    m, orig, _ = _inject(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down"]),
                         quantize=quantize)
    _randomize(m, "default", seed=1)
    qnnx.add_adapter(m, "b", LoraConfig(r=r_b, lora_alpha=4, target_modules=["q_proj", "up"]),
                     rngs=nnx.Rngs(3), compute_dtype=F32)
    _randomize(m, "b", seed=2)
    return m, orig


def test_switch_disable_and_delete_adapters():
    m, orig = _two_adapters()
    assert qnnx.adapter_names(m) == ["default", "b"] and qnnx.active_adapters(m) == "default"
    # up was a frozen QuantLinear after the first inject: it gains adapter b on the same 4-bit base
    assert isinstance(m.layers[0].up, qnnx.LoraLinear) and m.layers[0].up.quantized
    assert list(m.layers[0].up.specs) == ["b"]
    y_default = m(IDS)
    _assert_close(y_default, _reference(m, orig, _deltas(m, {"default": 1.0}))(IDS), 1e-4)
    qnnx.set_adapter(m, "b")
    _assert_close(m(IDS), _reference(m, orig, _deltas(m, {"b": 1.0}))(IDS), 1e-4)
    qnnx.set_adapter(m, None)
    _assert_close(m(IDS), _reference(m, orig)(IDS), 1e-5)
    qnnx.set_adapter(m, ["default", "b"])
    _assert_close(m(IDS), _reference(m, orig, _deltas(m, {"default": 1.0, "b": 1.0}))(IDS), 1e-4)
    qnnx.set_adapter(m, "b")
    qnnx.delete_adapter(m, "b")
    assert qnnx.adapter_names(m) == ["default"] and qnnx.active_adapters(m) == "default"
    _assert_close(m(IDS), y_default, 1e-6)


def test_weighted_adapters():
    m, orig = _two_adapters()
    qnnx.weighted_adapter(m, {"default": 0.7, "b": -1.3}, "mix")
    assert qnnx.active_adapters(m) == "default"                    # a new adapter is not activated
    qnnx.set_adapter(m, "mix")
    _assert_close(m(IDS), _reference(m, orig, _deltas(m, {"default": 0.7, "b": -1.3}))(IDS), 1e-4)
    assert m.layers[0].attn.q_proj.specs["mix"].r == 6             # cat: ranks add up
    with pytest.raises(ValueError, match="equal ranks"):
        qnnx.weighted_adapter(m, {"default": 1.0, "b": 1.0}, "lin", combination="linear")
    # "linear" (PEFT): A = Σ sign(w)·sqrt(|w|·s)·A_i, B = Σ sqrt(|w|·s)·B_i, scale 1
    m2, orig2 = _two_adapters(r_b=4)
    qnnx.weighted_adapter(m2, {"default": 0.5, "b": -2.0}, "lin", combination="linear")
    qnnx.set_adapter(m2, "lin")
    deltas = {}
    for p, layer in qnnx.lora_layers(m2).items():
        a = b = 0.0
        for n, w in (("default", 0.5), ("b", -2.0)):
            if n in layer.specs:
                c = math.sqrt(abs(w) * layer.specs[n].scale)
                a = a + math.copysign(c, w) * np.asarray(layer.lora_a[n].get_value(), np.float64)
                b = b + c * np.asarray(layer.lora_b[n].get_value(), np.float64)
        deltas[p] = a @ b
    _assert_close(m2(IDS), _reference(m2, orig2, deltas)(IDS), 1e-4)


def test_per_row_adapters_equal_per_row_runs():
    m, _ = _two_adapters()
    rows = [1, -1, 0, 1]
    qnnx.set_adapter(m, ["default", "b"], row_ids=jnp.asarray(rows))
    y = m(IDS)
    y_jit = nnx.jit(lambda m, ids: m(ids))(m, IDS)
    for i, j in enumerate(rows):
        qnnx.set_adapter(m, None if j < 0 else ["default", "b"][j])
        _assert_close(y[i], m(IDS[i:i + 1])[0], 1e-5)
        _assert_close(y_jit[i], m(IDS[i:i + 1])[0], 1e-5)
    with pytest.raises(ValueError, match="row_ids"):
        qnnx.set_adapter(m, ["default", "b"], row_ids=jnp.asarray([0, 2]))


# --------------------------------------------------------------------------------------------
# dropout, trainable extras, norms


def test_lora_dropout_train_and_eval():
    m, orig, _ = _inject(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    _randomize(m)
    y1, y2 = m(IDS), m(IDS)
    assert not np.allclose(np.asarray(y1), np.asarray(y2))          # a new mask each call
    m.eval()
    want = _reference(m, orig, _deltas(m, {"default": 1.0}))(IDS)
    _assert_close(m(IDS), want, 1e-4)
    m.train()
    assert not np.allclose(np.asarray(m(IDS)), np.asarray(want))


def test_modules_to_save_and_bias_modes():
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="lora_only")
    m, _, paths = _inject(cfg, quantize=QuantPolicy(min_size=0, exclude=None))
    assert type(m.lm_head) is nnx.Linear and isinstance(m.lm_head.kernel, qnnx.TrainableParam)
    assert isinstance(m.layers[0].attn.q_proj.bias, qnnx.TrainableParam)
    assert not isinstance(m.layers[0].attn.v_proj.bias, qnnx.TrainableParam)
    trained = nnx.state(m, nnx.LoRAParam)
    flat = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(trained)}
    assert "lm_head.kernel" in flat and "layers.0.attn.q_proj.bias" in flat
    m2, _, _ = _inject(LoraConfig(r=4, target_modules=["q_proj"], bias="all"), quantize=None)
    assert isinstance(m2.layers[0].norm2.bias, qnnx.TrainableParam)
    assert isinstance(m2.layers[1].attn.v_proj.bias, qnnx.TrainableParam)


def test_upcast_norms():
    m = _model()
    for path in ("norm", "layers.0.norm1", "layers.1.norm2"):
        for var in ("scale", "bias"):
            v = getattr(_at(m, path), var, None)
            if v is not None:
                v.set_value(v.get_value().astype(jnp.bfloat16))
    qnnx.inject(m, LoraConfig(target_modules=["q_proj"]), quantize=POLICY, rngs=nnx.Rngs(0))
    cast = qnnx.upcast_norms(m)
    want = {"norm.scale"} | {f"layers.{i}.norm1.scale" for i in range(LAYERS)} | \
        {f"layers.{i}.norm2.{v}" for i in range(LAYERS) for v in ("scale", "bias")}
    assert set(cast) == want
    assert m.norm.scale.get_value().dtype == F32 and m.layers[1].norm2.bias.get_value().dtype == F32
    assert m.embed.embedding.get_value().dtype == F32 and type(m.layers[0].attn.k_proj) is qnnx.QuantLinear


class Odd(nnx.Module):
    """Layouts that need more than a reshape: non-adjacent contracted axes, an ellipsis, an
    einsum whose output interleaves input and kernel dims, and one einsum that is not a plain
    linear map (a separate weight per head)."""

    def __init__(self, rngs):
        self.gen = nnx.LinearGeneral((2, 20), (3, 4), axis=(1, -1), rngs=rngs)
        self.ell = nnx.Einsum("...i,io->...o", (12, 24), (24,), rngs=rngs)
        self.heads = nnx.Einsum("btd,dkh->bhtk", (24, 8, 2), (2, 8), rngs=rngs)   # bias in out order
        self.per_head = nnx.Einsum("bhi,hio->bho", (2, 8, 5), rngs=rngs)

    def __call__(self, x):
        y = self.gen(x)                                       # [5, 7, 3, 4]
        z = self.ell(y.reshape(5, 7, 12))                     # [5, 7, 24]
        h = self.heads(z)                                     # [5, 2, 7, 8]
        return self.per_head(h[:, :, 0])                      # [5, 2, 5]


def test_general_layouts():
    x = jax.random.normal(jax.random.key(0), (5, 2, 7, 20))
    m = Odd(nnx.Rngs(0))
    orig = nnx.clone(m)
    paths = qnnx.inject(m, LoraConfig(r=2, target_modules=["gen", "ell", "heads"]), quantize=None,
                        compute_dtype=F32, rngs=nnx.Rngs(1))
    assert paths == ["ell", "gen", "heads"]
    m.heads.bias.set_value(jax.random.normal(jax.random.key(2), (2, 8)))
    orig.heads.bias.set_value(m.heads.bias.get_value())
    _randomize(m)
    ref = nnx.clone(orig)
    for p in paths:
        layer = _at(m, p)
        w = np.asarray(layer.dense_weight(F32), np.float64).T + _delta(layer, "default")    # [K, N]
        kern = _at(ref, p).kernel
        if p == "gen":      # kernel (2, 20, 3, 4): contracted dims first
            kern.set_value(jnp.asarray(w.reshape(2, 20, 3, 4), F32))
        elif p == "ell":
            kern.set_value(jnp.asarray(w, F32))
        else:               # kernel (d, k, h) = (24, 8, 2)
            kern.set_value(jnp.asarray(w.reshape(24, 8, 2), F32))
    _assert_close(m(x), ref(x), 1e-5)
    qnnx.merge(m)                                   # back to the original layer types and shapes
    assert type(m.gen) is nnx.LinearGeneral and type(m.heads) is nnx.Einsum
    _assert_close(m(x), ref(x), 1e-5)
    # a layer that is not a plain linear map stays in float even where the policy selects it
    m2 = Odd(nnx.Rngs(0))
    qnnx.inject(m2, LoraConfig(r=2, target_modules=["ell"]), rngs=nnx.Rngs(1),
                quantize=QuantPolicy(min_size=0, include="per_head"))
    assert type(m2.per_head) is nnx.Einsum and type(m2.gen) is nnx.LinearGeneral
    with pytest.raises(ValueError, match="cannot adapt 'per_head'"):
        qnnx.inject(Odd(nnx.Rngs(0)), LoraConfig(r=2, target_modules=["per_head"]), quantize=None,
                    rngs=nnx.Rngs(1))


# --------------------------------------------------------------------------------------------
# a real model of the library


def test_llama_default_targets():
    from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.arange(10).reshape(2, 5) % 64
    y0 = model(ids)
    paths = qnnx.inject(model, LoraConfig(r=4), quantize=None, compute_dtype=F32, rngs=nnx.Rngs(1))
    assert set(paths) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    _assert_close(model(ids), y0, 1e-5)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"(?s)target_modules \[.qproj.\].*layers\.0\.attn\.q_proj"):
        _inject(LoraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="match no linear layer"):
        _inject(LoraConfig(target_modules="q_proj"))                # fullmatch: needs the whole path
    with pytest.raises(ValueError, match="positive int"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"r=41 for 'layers\.0\.attn\.q_proj'"):
        _inject(LoraConfig(r=41, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no layer is left"):
        _inject(LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        qnnx.merge(_model())
    m, _, _ = _inject(LoraConfig(r=4, target_modules=["q_proj"]))
    good = qnnx.adapter_weights(m)
    bad = {p: {"lora_a": w["lora_a"], "lora_b": w["lora_b"][:, :-1]} for p, w in good.items()}
    with pytest.raises(ValueError, match=r"lora_b \[4, 40\]"):
        qnnx.load_adapter_weights(m, bad)
    with pytest.raises(ValueError, match="not layers with adapter"):
        qnnx.load_adapter_weights(m, {"layers.0.up": good["layers.0.attn.q_proj"]})
    with pytest.raises(ValueError, match="unknown adapter"):
        qnnx.set_adapter(m, "nope")
    with pytest.raises(ValueError, match="already exists"):
        qnnx.inject(m, LoraConfig(r=4, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.0)
