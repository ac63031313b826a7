"""Tests of qlora_jax.sharding: partition rules (in this process, from axis sizes alone) and, on 8
CPU devices in a subprocess (tests/sharding_worker.py), the sharded train step against the
single-device step, block-aligned sharding of the 4-bit codes, checkpoints restored onto other
meshes, the errors for bad meshes and batches, and the collectives of the compiled step (FSDP
all-gathers the packed 4-bit codes, not decoded weights; unrolled and stacked layers). A slow
test repeats the training under ``jax.distributed`` with two processes and a tensor axis."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qlora_jax as qj
from qlora_jax import ops
from qlora_jax import sharding as qs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharding_worker.py"


# --------------------------------------------------------------------------------------------
# Rules, in this process (axis sizes need no devices)


def _q(n_elements: int, block_size: int = 32, dq_block_size: int | None = 64) -> qj.QuantizedArray:
    """A `QuantizedArray` of ``n_elements`` with zero-filled fields of the right shapes (the rules
    read shapes only; nothing to compile)."""
    n_blocks = -(-n_elements // block_size)
    dq = dq_block_size is not None
    q = qj.QuantizedArray(np.zeros(-(-n_elements // 2), np.uint8), np.zeros(n_blocks, np.uint8 if dq else np.float32),
                          np.zeros(-(-n_blocks // dq_block_size), np.float32) if dq else None,
                          np.zeros((), np.float32) if dq else None, shape=(n_elements,), dtype="float32",
                          format="nf4", block_size=block_size, dq_block_size=dq_block_size)
    q.validate()
    return q


def _ranges(length: int, k: int) -> list[tuple[int, int]]:
    """The ``k`` equal contiguous ranges a 1-D array of ``length`` is cut into by a k-way split."""
    assert length % k == 0
    return [(i * length // k, (i + 1) * length // k) for i in range(k)]


@pytest.mark.parametrize("n, k, sizes, split, scale_split", [
    (16384, 4, {"data": 2, "fsdp": 4}, "fsdp", True),              # 512 blocks: 128 a device = 2 DQ blocks
    (12288, 4, {"data": 2, "fsdp": 4}, "fsdp", False),             # 384 blocks: 96 a device = 1.5 DQ blocks
    (16384, 8, {"fsdp": 4, "tensor": 2}, ("tensor", "fsdp"), True),  # tensor-major 8-way split
    (1152, 4, {"fsdp": 4, "tensor": 2}, "fsdp", False),            # 36 blocks: not 8-way, 4-way fits
])
def test_quantized_spec_splits_whole_blocks_consistently(n, k, sizes, split, scale_split):
    """Codes and absmax are cut into the same k block ranges; the DQ scales too when every range
    is whole DQ blocks; the offset stays replicated."""
    q = _q(n)
    spec = qs.quantized_spec(q, sizes)
    assert spec.codes == P(split) and spec.absmax == P(split)
    assert spec.absmax_scale == (P(split) if scale_split else P())
    assert spec.absmax_offset == P()
    assert (spec.shape, spec.block_size, spec.dq_block_size) == (q.shape, q.block_size, q.dq_block_size)
    # Independent check of the layout: device i's code bytes hold exactly its absmax blocks, and
    # (when split) its DQ scales are exactly those of its absmax values.
    for (c0, c1), (a0, a1) in zip(_ranges(q.codes.shape[0], k), _ranges(q.n_blocks, k)):
        assert (c0 * 2 // q.block_size, c1 * 2 // q.block_size) == (a0, a1)
    if scale_split:
        for (a0, a1), (s0, s1) in zip(_ranges(q.n_blocks, k), _ranges(q.absmax_scale.shape[0], k)):
            assert (a0 // q.dq_block_size, a1 // q.dq_block_size) == (s0, s1)


@pytest.mark.parametrize("n, block_size, why", [
    (96, 32, "3 blocks do not split 4 ways"),
    (100, 32, "a partial last block: byte ranges would cut blocks"),
])
def test_quantized_spec_replicates_what_does_not_split(n, block_size, why):
    q = _q(n, block_size)
    spec = qs.quantized_spec(q, {"data": 2, "fsdp": 4})
    assert (spec.codes, spec.absmax, spec.absmax_scale, spec.absmax_offset) == (P(), P(), P(), P()), why


def test_quantized_spec_without_double_quant_and_without_fsdp():
    q = _q(4096, 64, None)
    spec = qs.quantized_spec(q, {"fsdp": 2})
    assert spec.absmax_scale is None and spec.absmax_offset is None and spec.codes == P("fsdp")
    rep = qs.quantized_spec(q, {"data": 8, "fsdp": 1})  # pure data parallelism: replicated
    assert (rep.codes, rep.absmax) == (P(), P())


def _stacked(q: qj.QuantizedArray, layers: int) -> qj.QuantizedArray:
    """``q`` with every field given a leading ``[layers]`` axis, as `stack_layers` makes them."""
    import dataclasses

    stack = lambda a: None if a is None else np.stack([a] * layers)  # noqa: E731
    return dataclasses.replace(q, codes=stack(q.codes), absmax=stack(q.absmax),
                               absmax_scale=stack(q.absmax_scale), absmax_offset=stack(q.absmax_offset))


def test_gathered_spec_undoes_fsdp_only_and_stacked_leaves_split_their_last_axis():
    """Where a base is decoded: no fsdp split (that is the all-gather of the codes), a tensor
    split kept; stacked leaves keep the per-layer block split on their last axis."""
    q = _q(16384)
    g = qs.gathered_spec(q, {"data": 2, "fsdp": 4})
    assert (g.codes, g.absmax, g.absmax_scale, g.absmax_offset) == (P(), P(), P(), P())
    g = qs.gathered_spec(q, {"fsdp": 4, "tensor": 2})             # split over (tensor, fsdp): keep tensor
    assert (g.codes, g.absmax, g.absmax_scale, g.absmax_offset) == (P("tensor"), P("tensor"), P("tensor"), P())
    g = qs.gathered_spec(_q(1152), {"fsdp": 4, "tensor": 2})      # split over fsdp alone
    assert (g.codes, g.absmax, g.absmax_scale) == (P(), P(), P())
    g = qs.gathered_spec(_q(4096, 64, None), {"fsdp": 2})
    assert g.codes == P() and g.absmax_scale is None and g.absmax_offset is None
    # Stacked: [L, ...] fields, metadata of one layer.
    st = qs.quantized_spec(_stacked(q, 3), {"data": 2, "fsdp": 4})
    assert (st.codes, st.absmax, st.absmax_scale, st.absmax_offset) == (
        P(None, "fsdp"), P(None, "fsdp"), P(None, "fsdp"), P())
    st = qs.quantized_spec(_stacked(_q(12288), 3), {"fsdp": 4})   # 1.5 DQ blocks a device: scales whole
    assert (st.codes, st.absmax_scale) == (P(None, "fsdp"), P())
    assert qs.quantized_spec(_stacked(_q(96), 3), {"fsdp": 4}).codes == P()
    g = qs.gathered_spec(_stacked(q, 3), {"fsdp": 4})
    assert (g.codes, g.absmax, g.absmax_scale) == (P(), P(), P())


def test_matmuls_traced_for_a_mesh_take_the_xla_path(monkeypatch):
    """Under a mesh of several devices no Pallas kernel is used (XLA cannot partition one): "auto"
    resolves to XLA, "pallas" warns and uses XLA; the mesh is part of the static plan. A
    one-device mesh changes nothing."""
    import types

    mod = types.SimpleNamespace(supports=lambda *a, **k: True, dequant_matmul=None, dequant_matmul_t=None)
    monkeypatch.setattr(ops, "_pallas_module", lambda: mod)
    monkeypatch.setattr(ops, "_on_gpu", lambda: True)
    w = _q(64 * 32)
    w = qj.QuantizedArray(w.codes, w.absmax, w.absmax_scale, w.absmax_offset, shape=(64, 32), dtype="float32",
                          format="nf4", block_size=32, dq_block_size=64)
    assert ops._resolve("auto", 8, w, jnp.float32) == ("pallas", "pallas", None)
    mesh = jax.sharding.AbstractMesh((1, 2, 1), qs.AXES)
    with ops.on_mesh(mesh):
        assert ops._resolve("auto", 8, w, jnp.float32) == ("xla", "xla", mesh)
        with pytest.warns(UserWarning, match="XLA path"):
            assert ops._resolve("pallas", 8, w, jnp.float32) == ("xla", "xla", mesh)
        with ops.on_mesh(jax.sharding.AbstractMesh((1, 1, 1), qs.AXES)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert ops._resolve("auto", 8, w, jnp.float32) == ("pallas", "pallas", None)
    assert ops._resolve("auto", 8, w, jnp.float32)[2] is None


def test_dense_spec_rules():
    sizes = {"data": 2, "fsdp": 4}
    assert qs.dense_spec((128, 4), sizes, min_shard_size=1) == P("fsdp", None)       # lora_a [K, r]
    assert qs.dense_spec((4, 96), sizes, min_shard_size=1) == P(None, "fsdp")        # lora_b [r, N]
    assert qs.dense_spec((12, 8), sizes, min_shard_size=1) == P("fsdp", None)        # tie: first dim
    assert qs.dense_spec((6, 10), sizes, min_shard_size=1) == P()                    # nothing divides
    assert qs.dense_spec((), sizes, min_shard_size=0) == P()                         # scalars
    assert qs.dense_spec((128,), sizes) == P()                                       # below the minimum
    assert qs.dense_spec((49152, 576), sizes) == P("fsdp", None)                     # an embedding
    tp = {"data": 2, "fsdp": 2, "tensor": 2}
    assert qs.dense_spec((4, 96), tp, path="a.q_proj.lora_b.default", min_shard_size=1) == P(None, ("tensor", "fsdp"))
    assert qs.dense_spec((4, 6), tp, path="a.q_proj.lora_b.default", min_shard_size=1) == P(None, "tensor")
    assert qs.dense_spec((128, 4), tp, path="a.q_proj.lora_a.default", min_shard_size=1) == P("fsdp", None)


def test_partition_specs_of_an_injected_model():
    """On a real NNX state: quantized bases get QuantizedArray specs, adapters dense specs, and
    optimizer moments the specs of their parameters."""
    import optax
    from flax import nnx

    from qlora_jax import nnx as qnnx
    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)

    def build():
        model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        qnnx.inject(model, LoraConfig(r=4, target_modules="all-linear"), quantize=qj.QuantPolicy(min_size=1),
                    compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
        return model

    model = nnx.eval_shape(build)  # shapes only: rules can run before anything is materialised
    frozen = nnx.state(model, qnnx.BaseWeight)
    specs = qs.partition_specs(frozen, {"data": 2, "fsdp": 4})
    layer = lambda tree: tree["model"]["layers"][0]  # noqa: E731
    q_spec = layer(specs)["mlp"]["up_proj"]["base"].get_value()
    assert isinstance(q_spec, qj.QuantizedArray) and q_spec.codes == P("fsdp")   # 8192 / 64 = 128 blocks
    assert q_spec.absmax_scale == P()                                            # 32 scales a device < 256
    params = nnx.state(model, nnx.LoRAParam)
    pspecs = qs.partition_specs(params, {"fsdp": 4}, min_shard_size=1)
    assert layer(pspecs)["mlp"]["up_proj"]["lora_b"]["default"].get_value() == P(None, "fsdp")
    assert layer(pspecs)["mlp"]["up_proj"]["lora_a"]["default"].get_value() == P("fsdp", None)
    tx = optax.adam(1e-3)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    psh = qs.tree_shardings(params, mesh, min_shard_size=1)
    osh = qs.opt_state_shardings(tx, jax.eval_shape(tx.init, params), psh, mesh)
    lora_b = lambda tree: layer(tree)["mlp"]["up_proj"]["lora_b"]["default"].get_value()  # noqa: E731
    assert lora_b(osh[0].mu) is lora_b(psh) and lora_b(osh[0].nu) is lora_b(psh)
    assert osh[0].count.spec == P()


@pytest.mark.parametrize("spec, message", [
    ("data=2,fdsp=4", "unknown mesh axis 'fdsp'"),
    ("data=2,model=4", "unknown mesh axis 'model'"),
    ("data=two", "is not name=size"),
    ("data=2,data=2", "given twice"),
])
def test_parse_mesh_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        qs.parse_mesh(spec)


def test_parse_mesh_and_make_mesh_on_one_device():
    assert qs.parse_mesh(" data=2 , fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    mesh = qs.make_mesh("fsdp=-1")
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    with pytest.raises(ValueError, match=r"needs 2 devices, there are 1"):
        qs.make_mesh({"data": 2})
    with pytest.raises(ValueError, match="integers >= 1"):
        qs.make_mesh({"data": 0})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        qs.quantized_spec(_q(4096), {"model": 2})


# --------------------------------------------------------------------------------------------
# 8 CPU devices, in a subprocess


def _run(args: list[str], timeout: float = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise AssertionError(f"{WORKER.name} {' '.join(args)} failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _shared_run(tmp_path_factory, check: str) -> dict:
    """The results of ``sharding_worker.py <check>`` (and its output folder under ``"out_dir"``).

    Under pytest-xdist each worker process has its own session: a lock in the shared base
    folder makes the first one run the subprocess and the others read its result.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    name = "sharding_worker" if check == "all" else f"sharding_worker_{check}"
    out = root / name
    out.mkdir(exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = out / "result.json"
        if not result.exists():
            result.write_text(json.dumps(_run([check, "--out-dir", str(out)])))
        res = json.loads(result.read_text())
    res["out_dir"] = str(out)
    return res


@pytest.fixture(scope="session")
def worker(tmp_path_factory) -> dict:
    """The ``all`` checks' results (and their output folder under ``"out_dir"``)."""
    return _shared_run(tmp_path_factory, "all")


def test_sharded_step_matches_single_device(worker):
    """Four micro-steps (two updates) on a (data=2, fsdp=4) mesh with every leaf split and the
    optimizer state in host memory: the same losses, gradient norms and trained adapters as on
    one device (NF4+DQ bases, LoRA dropout on, gradient accumulation)."""
    r = worker["step"]
    assert r["devices"] == 8
    single, sharded = r["single"], r["sharded"]
    assert len(single) == len(sharded["metrics"]) == 4
    for a, b in zip(single, sharded["metrics"]):
        assert a["tokens"] == b["tokens"] and a["target_tokens"] == b["target_tokens"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    assert single[0]["loss"] != single[-1]["loss"]          # training moved
    # Adapters: the two updates moved them by ~1e-3; the two runs agree to float32 rounding.
    assert r["param_change"] > 5e-4
    assert sharded["param_diff"] < 1e-6
    assert sharded["shardings_kept"]                          # out shardings == in shardings
    n_params = r["layers"] * 7 * 2                            # A and B of 7 linears a layer
    assert sharded["sharded_param_leaves"] == sharded["param_leaves"] == n_params
    assert sharded["sharded_opt_leaves"] == 3 * n_params      # Adam's mu, nu and accumulated grads
    assert sharded["opt_memory_kinds"] == ["pinned_host"]


def test_quantized_codes_are_sharded_along_blocks(worker):
    r = worker["quant"]
    layers = worker["step"]["layers"]
    assert len(r["leaves"]) == 7 * layers
    n_scale_split = 0
    for path, leaf in r["leaves"].items():
        assert leaf["dequant_bit_equal"], path                # sharded dequantize == unsharded, bitwise
        assert leaf["offset_replicated"], path
        codes, absmax = leaf["codes"], leaf["absmax"]
        n_bytes = -(-int(np.prod(leaf["shape"])) // 2)
        assert len(codes) == 8
        # fsdp=4: four distinct quarters of the codes, each held by the 2 data replicas.
        quarters = sorted({tuple(c) for c in codes})
        assert quarters == [(i * n_bytes // 4, (i + 1) * n_bytes // 4) for i in range(4)], path
        for (c0, c1), (a0, a1) in zip(codes, absmax):         # same device, same blocks
            assert (c0 * 2 // leaf["block_size"], c1 * 2 // leaf["block_size"]) == (a0, a1), path
        if leaf["local_decode_ok"] is not None:
            n_scale_split += 1
            assert leaf["local_decode_ok"], path              # each device decodes its own range
            for (a0, a1), (s0, s1) in zip(absmax, leaf["absmax_scale"]):
                assert (a0 // leaf["dq_block_size"], a1 // leaf["dq_block_size"]) == (s0, s1), path
        else:
            n_dq = -(-leaf["n_blocks"] // leaf["dq_block_size"])
            assert all(s == [0, n_dq] for s in leaf["absmax_scale"]), path
    assert n_scale_split == 4 * layers                        # q, k, v, o; the MLP keeps its scales whole
    per_dev = r["quant_bytes_per_device"]
    assert len(per_dev) == 8
    # Each device holds a quarter of codes and absmax (plus the small replicated scales).
    assert all(r["quant_bytes_total"] / 4 <= b < r["quant_bytes_total"] / 3 for b in per_dev.values())


def test_checkpoint_restores_onto_other_meshes(worker):
    """Saved from (data=2, fsdp=4): the training state and the 4-bit frozen state restore onto
    (data=4, fsdp=2) and onto one device with every bit equal."""
    r = worker["ckpt"]
    for name in ("mesh_4x2", "single"):
        got = r[name]
        assert got["unequal_leaves"] == [], name
        assert got["template_unequal_leaves"] > 0, name      # the template's own values were different
        assert got["shardings_as_template"], name
        assert got["step"] == 3 and got["data"] == {"epoch": 0, "index": 3}
    assert r["mesh_4x2"]["devices"] == [8] and r["mesh_4x2"]["mesh_shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    halves = sorted({tuple(c) for c in r["mesh_4x2"]["first_codes_layout"]})
    assert len(halves) == 2 and halves[0][0] == 0 and halves[0][1] == halves[1][0]
    assert r["single"]["devices"] == [1] and len(r["single"]["first_codes_layout"]) == 1


def test_bad_mesh_and_batch_errors(worker):
    e = worker["errors"]
    for key in ("step_batch_6_rows", "shard_batch_6_rows"):
        assert e[key].startswith("ValueError") and "batch of 6 rows" in e[key] and "multiple of 8" in e[key]
    assert e["mesh_too_big"].startswith("ValueError") and "needs 12 devices, there are 8" in e["mesh_too_big"]
    for key in ("mesh_unknown_axis", "foreign_mesh_rules", "foreign_mesh_batch"):
        assert e[key].startswith("ValueError") and "unknown mesh axis 'model'" in e[key]
    assert e["fill_axis_mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}   # fsdp=-1: the remaining devices


@pytest.fixture(scope="session")
def gather_worker(tmp_path_factory) -> dict:
    """The ``gather`` check's results: HLO all-gathers of the compiled sharded steps."""
    return _shared_run(tmp_path_factory, "gather")


_FLOATS = ("f16", "bf16", "f32", "f64")


def _squeeze(dims) -> tuple[int, ...]:
    return tuple(d for d in dims if d != 1)


@pytest.mark.parametrize("layout", ["unrolled", "stacked"])
def test_fsdp_all_gathers_move_4bit_codes_not_decoded_weights(gather_worker, layout):
    """The compiled sharded step (HLO after SPMD partitioning): every 4-bit base reaches its
    matmul through all-gathers of its uint8 codes and uint8 block scales (and the float32
    second-level scales where those are split), and no all-gather produces a float array shaped
    like a decoded base ([N, K], [K, N] or flat, per layer or stacked). Unrolled layers on
    (fsdp=8); two stacked layers scanned on (data=2, fsdp=4), where the gathers sit in the scan
    body: one layer's codes at a time."""
    r = gather_worker[layout]
    assert r["codes_sharded"] and r["mesh"]["fsdp"] == (8 if layout == "unrolled" else 4)
    bases = r["bases"]
    assert len(bases) == 7 * (r["layers"] if layout == "unrolled" else 1)
    assert all(b["stacked"] == (r["layers"] if layout == "stacked" else None) for b in bases)
    gathers = [(dt, tuple(dims), in_loop) for dt, dims, in_loop in r["all_gathers"]]
    u8 = Counter(dims for dt, dims, _ in gathers if dt == "u8")
    u8_in_loop = Counter(dims for dt, dims, in_loop in gathers if dt == "u8" and in_loop)
    f32 = Counter(dims for dt, dims, _ in gathers if dt == "f32")
    floats = [(dt, _squeeze(dims)) for dt, dims, _ in gathers if dt in _FLOATS]
    for shape in {tuple(b["shape"]) for b in bases}:
        same = [b for b in bases if tuple(b["shape"]) == shape]
        b, n_bases = same[0], len(same)
        n, k = shape
        decoded = {(n, k), (k, n), (n * k,)}
        decoded |= {(r["layers"], *d) for d in decoded} | {(r["layers"] * n * k,)}
        assert not [g for g in floats if g[1] in decoded], (shape, floats)
        # Every base of this shape: its codes and its 8-bit block scales, whole, as uint8 (the
        # forward's gather; the backward gathers again where the input gradient is needed).
        assert u8[(b["code_bytes"],)] >= n_bases, (shape, u8)
        assert u8[(b["n_blocks"],)] >= n_bases, (shape, u8)
        if layout == "stacked":
            assert u8_in_loop[(b["code_bytes"],)] >= n_bases, (shape, u8_in_loop)
        if (b["n_blocks"] // r["mesh"]["fsdp"]) % 64 == 0:         # second-level scales split too
            assert f32[(b["n_scales"],)] >= n_bases, (shape, f32)


def test_stacked_layers_train_on_a_mesh_like_one_device(gather_worker):
    """Two stacked, scanned layers on (data=2, fsdp=4): the first step's loss and gradient norm
    equal the single-device step's."""
    r = gather_worker["stacked"]
    a, b = r["single_metrics"], r["sharded_metrics"]
    assert a["tokens"] == b["tokens"] and a["target_tokens"] == b["target_tokens"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_process_tensor_parallel_matches_single_device(worker, tmp_path):
    """Two processes under jax.distributed (4 CPU devices each) train on one (data=2, fsdp=2,
    tensor=2) mesh with the same code: same losses and adapters as one device; a checkpoint
    saved from that mesh restores onto (data=4, fsdp=2) across the processes."""
    port, out = str(_free_port()), str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "multiprocess", "--process-id", str(i),
                               "--num-processes", "2", "--port", port, "--out-dir", out],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"exit {p.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    single = worker["step"]["single"]
    for r in results:
        assert (r["process_count"], r["local_devices"], r["devices"]) == (2, 4, 8)
        assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        for a, b in zip(single, r["metrics"]):
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6)
        assert r["shardings_kept"] and r["sharded_param_leaves"] == r["param_leaves"]
        assert r["opt_memory_kinds"] == ["pinned_host"]
        assert r["ckpt_unequal_leaves"] == [] and r["ckpt_mesh_shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    with np.load(Path(out) / "params_multiprocess.npz") as mp, \
            np.load(Path(worker["out_dir"]) / "params_single.npz") as ref:
        assert sorted(mp.files) == sorted(ref.files)
        assert max(float(np.max(np.abs(mp[k] - ref[k]))) for k in ref.files) < 1e-6
