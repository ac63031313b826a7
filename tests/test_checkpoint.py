"""Saving and restoring quantized trees: safetensors files and Orbax checkpoints.

Every round trip is compared leaf by leaf, bit for bit (dtype, shape, bytes) and container by
container (types, key order); corrupt inputs must fail with an error that names the file or leaf.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy as st_numpy
from flax import nnx

import qlora_jax as qj
from qlora_jax.io import checkpoint as ck


@functools.cache  # built once: each quantize configuration costs a compilation
def _mixed_tree():
    k = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k[0], (40, 33))  # 1320 elements: a partial last block at 64
    return {
        "layers": [
            {"kernel": qj.quantize(w), "bias": jnp.arange(33, dtype=jnp.float32)},
            {"kernel": qj.quantize(w * 3, "fp4", 128, double_quant=False),
             "bias": None},
        ],
        "int4": qj.quantize(jax.random.normal(k[1], (3, 5, 7)).astype(jnp.bfloat16), "int4", 32),
        "e3m0": qj.quantize(jax.random.normal(k[2], (1,)), "fp4_e3m0", 4096, dq_block_size=64),
        "dense": {
            "bf16": jax.random.normal(k[3], (4, 6)).astype(jnp.bfloat16),
            "f16": np.linspace(-1, 1, 7, dtype=np.float16),
            "i64": np.array([2**40, -3], np.int64),
            "f64": np.array([np.pi], np.float64),
            "mask": np.array([True, False]),
            "scalar0d": jnp.float32(2.5),
            "npscalar": np.float32(-0.0),
            "empty": np.zeros((0, 3), np.float32),
        },
        "by_int": {3: jnp.ones((2,)), 1: jnp.zeros((1,))},  # int keys, deliberately unsorted
        "tuple": (1, 2.5, "name", True, None),
    }


def _filled_model(make, seed=0):
    """``make()`` built abstractly and filled with random numbers (eager init compiles every op)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), abstract)
    return nnx.merge(graphdef, state)


def _assert_same_tree(a, b, path="root"):
    """Containers (type, key order) and leaves (type class, dtype, shape, bytes) all equal."""
    if isinstance(a, qj.QuantizedArray):
        assert isinstance(b, qj.QuantizedArray), path
        assert a.metadata() == b.metadata(), path
        for f in ("codes", "absmax", "absmax_scale", "absmax_offset"):
            _assert_same_tree(getattr(a, f), getattr(b, f), f"{path}.{f}")
    elif isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}.{i}")
    elif a is None or isinstance(a, (bool, int, float, str)) and not isinstance(a, np.generic):
        assert type(b) is type(a) and b == a, path
    else:
        x, y = np.asarray(a), np.asarray(b)
        assert x.dtype == y.dtype and x.shape == y.shape, (path, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), path


# ------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip_bit_exact(tmp_path):
    tree = _mixed_tree()
    f = tmp_path / "model.safetensors"
    ck.save_safetensors(f, tree, metadata={"note": "hello"})
    assert f.stat().st_mode & 0o777 == 0o644  # not the temporary file's 0600
    back = ck.load_safetensors(f)
    _assert_same_tree(tree, back)
    assert back["layers"][1]["kernel"].absmax_scale is None  # no-DQ fields stay None
    assert ck.load_safetensors_metadata(f) == {"note": "hello"}
    # dequantized values equal too (the rebuilt nodes decode identically)
    for a, b in [(tree["layers"][0]["kernel"], back["layers"][0]["kernel"]), (tree["int4"], back["int4"])]:
        assert np.array_equal(np.asarray(qj.dequantize(a)), np.asarray(qj.dequantize(b)))
    as_np = ck.load_safetensors(f, as_numpy=True)
    assert isinstance(as_np["layers"][0]["kernel"].codes, np.ndarray)
    _assert_same_tree(tree, as_np)


def test_safetensors_file_is_standard(tmp_path):
    """The reference safetensors parser reads our file: same names, dtypes, shapes and bytes."""
    tree = _mixed_tree()
    f = tmp_path / "m.safetensors"
    ck.save_safetensors(f, tree)
    ref = dict(safetensors.deserialize(f.read_bytes()))
    q = tree["layers"][0]["kernel"]
    assert ref["layers.0.kernel.codes"]["dtype"] == "U8"
    assert ref["layers.0.kernel.codes"]["shape"] == [q.codes.shape[0]]
    assert bytes(ref["layers.0.kernel.codes"]["data"]) == np.asarray(q.codes).tobytes()
    assert ref["layers.0.kernel.absmax_offset"]["shape"] == []
    assert ref["dense.bf16"]["dtype"] == "BF16"
    assert bytes(ref["dense.bf16"]["data"]) == np.asarray(tree["dense"]["bf16"]).tobytes()
    assert "layers.1.kernel.absmax_scale" not in ref and "dense.empty" not in ref
    with safetensors.safe_open(f, framework="np") as h:
        spec = json.loads(h.metadata()[ck.SPEC_KEY])
    assert spec["tree"]["t"] == "dict"


def test_safetensors_plain_file_loads_flat(tmp_path):
    f = tmp_path / "hf.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    f.write_bytes(st_numpy.save({"model.w": a}))
    back = ck.load_safetensors(f)
    assert list(back) == ["model.w"] and np.array_equal(np.asarray(back["model.w"]), a)


def test_safetensors_nnx_state_round_trip(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 64, rngs=rngs)
            self.up = nnx.Linear(64, 96, rngs=rngs)
            self.down = nnx.Linear(96, 64, rngs=rngs)

        def __call__(self, ids):
            return self.down(jax.nn.gelu(self.up(self.embed(ids))))

    model = _filled_model(lambda: Net(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    qstate = qj.quantize_tree(state, qj.QuantPolicy(min_size=1024))
    f = tmp_path / "nnx.safetensors"
    ck.save_safetensors(f, qstate)
    back = ck.load_safetensors(f)
    _assert_same_tree(nnx.to_pure_dict(qstate), back)
    assert isinstance(back["up"]["kernel"], qj.QuantizedArray)
    dense_state = nnx.state(nnx.merge(graphdef, state))
    nnx.replace_by_pure_dict(dense_state, qj.dequantize_tree(back))
    ids = jnp.arange(7)
    forward = nnx.jit(lambda m, i: m(i))
    want = forward(nnx.merge(graphdef, qj.dequantize_tree(qstate)), ids)
    got = forward(nnx.merge(graphdef, dense_state), ids)
    assert np.array_equal(np.asarray(want), np.asarray(got))


def test_safetensors_atomic_write(tmp_path, monkeypatch):
    f = tmp_path / "good.safetensors"
    tree = _mixed_tree()
    ck.save_safetensors(f, tree)
    good = f.read_bytes()

    # a failure in the middle of writing: the old file stays, no temporary file is left behind
    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_safetensors(f, {"other": jnp.ones(3)})
    monkeypatch.undo()
    assert f.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]

    # a tree that cannot be saved fails before anything is written
    with pytest.raises(TypeError, match=r"'bad\.0'.*object"):
        ck.save_safetensors(f, {"bad": [object()]})
    assert f.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]
    # a fresh file never appears on failure either
    with pytest.raises(TypeError):
        ck.save_safetensors(tmp_path / "new.safetensors", {"w": jnp.zeros(2, jnp.complex64)})
    assert not (tmp_path / "new.safetensors").exists()


def test_safetensors_save_rejects(tmp_path):
    f = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="reserved"):
        ck.save_safetensors(f, {"a": jnp.ones(2)}, metadata={ck.SPEC_KEY: "x"})
    with pytest.raises(TypeError, match="str to str"):
        ck.save_safetensors(f, {"a": jnp.ones(2)}, metadata={"n": 3})
    with pytest.raises(ValueError, match=r"'a\.b'.*unique"):
        ck.save_safetensors(f, {"a.b": jnp.ones(2), "a": {"b": jnp.ones(2)}})
    with pytest.raises(TypeError, match="complex64"):
        ck.save_safetensors(f, {"w": jnp.zeros(2, jnp.complex64)})
    with pytest.raises(TypeError, match="key"):
        ck.save_safetensors(f, {(1, 2): jnp.ones(2)})
    bad = qj.quantize(jnp.ones((8, 8)))
    bad = qj.QuantizedArray(bad.codes[:-1], bad.absmax, bad.absmax_scale, bad.absmax_offset,
                            **dict(bad.metadata(), shape=(8, 8)))
    with pytest.raises(ValueError, match=r"'w'.*codes"):
        ck.save_safetensors(f, {"w": bad})
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ck.save_safetensors(tmp_path / "no_such_dir" / "x.safetensors", {"a": jnp.ones(2)})
    assert not f.exists()


def _rewrite(src, dst, drop=(), replace=None, spec_edit=None):
    """Copies a safetensors file through the reference library, editing tensors or the spec."""
    with safetensors.safe_open(src, framework="np") as h:
        meta = dict(h.metadata())
        tensors = {name: h.get_tensor(name) for name in h.keys()}
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    if spec_edit:
        spec = json.loads(meta[ck.SPEC_KEY])
        spec_edit(spec)
        meta[ck.SPEC_KEY] = json.dumps(spec)
    dst.write_bytes(st_numpy.save(tensors, metadata=meta))


def test_safetensors_load_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    w = qj.quantize(jax.random.normal(jax.random.key(1), (16, 64)))
    ck.save_safetensors(good, {"blk": {"w": w}, "b": jnp.ones(3)})

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ck.load_safetensors(tmp_path / "missing.safetensors")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors.*not a safetensors"):
        ck.load_safetensors(junk)
    junk.write_bytes(b"abc")
    with pytest.raises(ValueError, match="junk.safetensors.*not a safetensors"):
        ck.load_safetensors(junk)
    n = struct.unpack("<Q", good.read_bytes()[:8])[0]
    junk.write_bytes(struct.pack("<Q", n) + b"\xff" * n + b"\0" * 64)
    with pytest.raises(ValueError, match="junk.safetensors.*header"):
        ck.load_safetensors(junk)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match="cut.safetensors.*truncated"):
        ck.load_safetensors(cut)
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.safetensors"):
        ck.load_safetensors(cut)

    edited = tmp_path / "edited.safetensors"
    _rewrite(good, edited, drop=["blk.w.absmax"])
    with pytest.raises(ValueError, match=r"blk\.w\.absmax.*'blk\.w'.*missing"):
        ck.load_safetensors(edited)
    _rewrite(good, edited, replace={"blk.w.codes": np.zeros(10, np.uint8)})
    with pytest.raises(ValueError, match=r"'blk\.w'.*codes"):
        ck.load_safetensors(edited)
    _rewrite(good, edited, replace={"blk.w.absmax": np.zeros(16, np.float32)})  # DQ wants uint8
    with pytest.raises(ValueError, match=r"'blk\.w'.*absmax"):
        ck.load_safetensors(edited)

    def bigger_shape(spec):
        spec["tree"]["items"][0][1]["items"][0][1]["meta"]["shape"] = [32, 64]

    _rewrite(good, edited, spec_edit=bigger_shape)
    with pytest.raises(ValueError, match=r"'blk\.w'.*codes.*shape"):
        ck.load_safetensors(edited)

    def bad_format(spec):
        spec["tree"]["items"][0][1]["items"][0][1]["meta"]["format"] = "nf5"

    _rewrite(good, edited, spec_edit=bad_format)
    with pytest.raises(ValueError, match=r"nf5.*'blk\.w'|'blk\.w'.*nf5|nf5"):
        ck.load_safetensors(edited)

    def dense_dtype(spec):
        spec["tree"]["items"][1][1]["dtype"] = "float16"

    _rewrite(good, edited, spec_edit=dense_dtype)
    with pytest.raises(ValueError, match=r"'b'.*float16"):
        ck.load_safetensors(edited)

    _rewrite(good, edited, replace={"stray": np.zeros(2, np.uint8)})
    with pytest.raises(ValueError, match="stray"):
        ck.load_safetensors(edited)


# ------------------------------------------------------------------------------------------
# Orbax


def test_orbax_round_trip_without_target(tmp_path):
    tree = _mixed_tree()
    ck.save_orbax(tmp_path / "ckpt", tree, step=5)
    back = ck.restore_orbax(tmp_path / "ckpt")
    _assert_same_tree(tree, back)
    assert back["layers"][1]["kernel"].absmax_offset is None
    assert back["dense"]["empty"].shape == (0, 3)


def test_orbax_trees_without_arrays_and_bare_quantized_root(tmp_path):
    only_spec = {"n": 3, "none": None, "empty": np.zeros((0, 2), np.int8), "t": ("a", 1.5)}
    ck.save_orbax(tmp_path / "a", only_spec)
    _assert_same_tree(only_spec, ck.restore_orbax(tmp_path / "a"))
    q = _mixed_tree()["layers"][0]["kernel"]
    ck.save_orbax(tmp_path / "b", q)
    _assert_same_tree(q, ck.restore_orbax(tmp_path / "b"))
    ck.save_safetensors(tmp_path / "q.safetensors", q)
    _assert_same_tree(q, ck.load_safetensors(tmp_path / "q.safetensors"))
    with pytest.raises(TypeError, match="bare dense array"):
        ck.save_safetensors(tmp_path / "x.safetensors", jnp.ones(3))


def test_orbax_steps_manager_and_target(tmp_path):
    import orbax.checkpoint as ocp

    d = tmp_path / "ckpt"
    t0 = {"w": qj.quantize(jnp.linspace(-1, 1, 4096).reshape(64, 64)), "b": jnp.ones(4)}
    t1 = {"w": qj.quantize(jnp.linspace(-2, 3, 4096).reshape(64, 64)), "b": jnp.zeros(4)}
    with ocp.CheckpointManager(d.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=3)) as m:
        ck.save_orbax(d, t0, step=0, manager=m)
        ck.save_orbax(d, t1, step=1, manager=m)
    _assert_same_tree(t1, ck.restore_orbax(d))  # latest by default
    _assert_same_tree(t0, ck.restore_orbax(d, step=0))

    # an abstract target: QuantizedArray of ShapeDtypeStructs, as jax.eval_shape makes them
    abstract = jax.eval_shape(lambda: t1)
    assert isinstance(abstract["w"].codes, jax.ShapeDtypeStruct)
    restored = ck.restore_orbax(d, 1, target=abstract)
    _assert_same_tree(dict(sorted(t1.items())), restored)  # the target's (jax-sorted) structure
    assert isinstance(restored["w"].codes, jax.Array)

    with pytest.raises(FileNotFoundError, match="step 7"):
        ck.restore_orbax(d, 7)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ck.restore_orbax(tmp_path / "nowhere")
    wrong = jax.eval_shape(lambda: {"w": qj.quantize(jnp.ones((64, 64)), block_size=128), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"'w'.*metadata"):
        ck.restore_orbax(d, 1, target=wrong)
    with pytest.raises(ValueError, match=r"'b'.*\(5,\)"):
        ck.restore_orbax(d, 1, target={"w": abstract["w"], "b": jax.ShapeDtypeStruct((5,), jnp.float32)})
    with pytest.raises(ValueError, match=r"extra"):
        ck.restore_orbax(d, 1, target={**abstract, "extra": jax.ShapeDtypeStruct((5,), jnp.float32)})


def test_orbax_nnx_state_target(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(64, 64, rngs=rngs)
            self.b = nnx.Linear(64, 8, rngs=rngs)

    policy = qj.QuantPolicy(min_size=512)
    graphdef, state = nnx.split(_filled_model(lambda: Net(nnx.Rngs(1))))
    qstate = qj.quantize_tree(state, policy)
    ck.save_orbax(tmp_path / "c", qstate)
    abstract = jax.eval_shape(lambda: qj.quantize_tree(nnx.split(Net(nnx.Rngs(2)))[1], policy))
    restored = ck.restore_orbax(tmp_path / "c", target=abstract)
    assert type(restored) is type(qstate)
    _assert_same_tree(nnx.to_pure_dict(qstate), nnx.to_pure_dict(restored))
    x = jnp.ones((2, 64))
    want = nnx.merge(graphdef, qj.dequantize_tree(qstate))
    got = nnx.merge(graphdef, qj.dequantize_tree(restored))
    assert np.array_equal(np.asarray(want.b(want.a(x))), np.asarray(got.b(got.a(x))))


def test_orbax_corrupt_checkpoints(tmp_path):
    d = tmp_path / "ckpt"
    tree = {"blk": {"w": qj.quantize(jax.random.normal(jax.random.key(2), (32, 64)))}, "b": jnp.ones(3)}
    ck.save_orbax(d, tree, step=0)

    def fresh(name):
        dst = tmp_path / name
        shutil.copytree(d, dst)
        return dst

    # the JSON metadata no longer matches the arrays: the leaf is named
    c = fresh("meta_mismatch")
    meta_file = c / "0" / "meta" / "metadata"
    spec = json.loads(meta_file.read_text())
    spec["tree"]["items"][0][1]["items"][0][1]["meta"]["block_size"] = 128
    meta_file.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"meta_mismatch.*'blk\.w'.*absmax"):
        ck.restore_orbax(c)

    # garbled JSON
    c = fresh("meta_garbled")
    (c / "0" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta_garbled.*meta"):
        ck.restore_orbax(c)

    # deleted array data
    c = fresh("arrays_deleted")
    data = [p for p in (c / "0" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.unlink()
    with pytest.raises(ValueError, match=r"arrays_deleted.*arrays"):
        ck.restore_orbax(c)

    # garbled array data
    c = fresh("arrays_garbled")
    for p in (c / "0" / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"\0garbage" * 8)
    with pytest.raises(ValueError, match=r"arrays_garbled"):
        ck.restore_orbax(c)
