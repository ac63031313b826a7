"""Tests of qlora_jax.sharding: partition rules (in this process, from axis sizes alone) and, on 8
CPU devices in a subprocess (tests/sharding_worker.py), the sharded train step against the
single-device step, block-aligned sharding of the 4-bit codes, checkpoints restored onto other
meshes, and the errors for bad meshes and batches. A slow test repeats the training under
``jax.distributed`` with two processes and a tensor axis."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qlora_jax as qj
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


@pytest.fixture(scope="session")
def worker(tmp_path_factory) -> dict:
    """The ``all`` checks' results (and their output folder under ``"out_dir"``).

    Under pytest-xdist each worker process has its own session: a lock in the shared base
    folder makes the first one run the subprocess and the others read its result.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "sharding_worker"
    out.mkdir(exist_ok=True)
    with open(root / "sharding_worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = out / "result.json"
        if not result.exists():
            result.write_text(json.dumps(_run(["all", "--out-dir", str(out)])))
        res = json.loads(result.read_text())
    res["out_dir"] = str(out)
    return res


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
