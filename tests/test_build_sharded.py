"""Building a QLoRA Llama straight into its FSDP shardings (`init_quantized_llama(..., shardings=)`,
`load_quantized_llama(..., shardings=)`, `stack_layers(..., shardings=)`).

The multi-device part runs tests/build_sharded_worker.py in a subprocess with 4 CPU devices (this
session's JAX has one) and asserts on its JSON. The reference is the documented path: build on one
device, then `qlora_jax.sharding.shard_training`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax import QuantPolicy
from qlora_jax.lora import LoraConfig
from qlora_jax.models import LlamaConfig
from qlora_jax.models.build import init_quantized_llama, sharding_lookup, stack_layers

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "build_sharded_worker.py"
CFG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=32)
KW = dict(policy=QuantPolicy(min_size=1), dtype=jnp.float32, param_dtype=jnp.float32)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


@pytest.fixture(scope="module")
def worker() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_direct_build_equals_one_device_build_bit_for_bit(worker):
    for key in ("compare", "unstacked_compare", "load_compare"):
        c = worker[key]
        assert c["same_paths"] and c["same_graphdef"] and c["n_leaves"] > 0, key
        assert c["differ"] == [], (key, c["differ"][:5])


def test_every_built_leaf_already_has_its_target_sharding(worker):
    assert worker["direct_misplaced"] == []
    assert worker["unstacked_misplaced"] == []
    assert worker["load_misplaced"] == []
    # train_shardings of the built model is the one computed from the abstract model beforehand.
    assert worker["train_shardings_match"]
    assert worker["noop_direct"]["frozen_already_placed"] == worker["noop_direct"]["frozen_leaves"]
    assert worker["noop_ref"]["frozen_already_placed"] == 0
    # What shard_training's placement does on an accelerator for an already placed array.
    assert worker["device_put_same_sharding_is_identity"]
    for stats in (worker["direct_stats"], worker["load_stats"]):
        share = stats["codes_total"] // worker["devices"]
        assert stats["codes_per_device"] == [share] * worker["devices"]


def test_no_device_holds_more_than_its_share_during_the_build(worker):
    n = worker["devices"]
    final = worker["direct_stats"]
    codes_total = final["codes_total"]
    layer_float = worker["layer_float_bytes"]
    probe = worker["direct_probe"]
    assert probe["calls"] > 50  # every parameter and every stacked leaf group was measured
    for d in range(n):
        # 4-bit codes (uint8): never more than the device's own share of the final model.
        assert probe["codes"][d] <= final["codes_per_device"][d], (d, probe["codes"])
        # Everything: its share plus at most one layer's float weights.
        assert probe["total"][d] <= final["bytes_per_device"][d] + layer_float, (d, probe["total"])
    assert max(probe["codes"]) <= codes_total / n < codes_total
    # The measurement sees the problem it guards against: the one-device build holds every code
    # on device 0 (and more, while stacking).
    assert worker["ref_probe"]["codes"][0] >= codes_total
    assert worker["ref_probe"]["total"][0] > final["bytes_per_device"][0] + layer_float


def test_training_step_on_the_direct_build_matches(worker):
    assert len(worker["losses_direct"]) == 2
    assert worker["losses_direct"] == worker["losses_ref"]
    assert worker["losses_direct"][1] < worker["losses_direct"][0]


def test_partial_shardings_tree_is_an_error(worker):
    assert worker["partial_tree_error"] and "no sharding" in worker["partial_tree_error"]


# --------------------------------------------------------------------------------------------
# One device (this process)


def _bytes_of(model):
    out = []
    for x in jax.tree.leaves(nnx.state(model)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x).tobytes())
    return out


def test_one_device_sharding_gives_the_same_model_and_lookup_forms():
    dev = jax.devices()[0]
    single = jax.sharding.SingleDeviceSharding(dev)
    ref = init_quantized_llama(CFG, LORA, key=jax.random.key(1), stack=True, **KW)
    got = init_quantized_llama(CFG, LORA, key=jax.random.key(1), stack=True, shardings=single, **KW)
    assert nnx.graphdef(ref) == nnx.graphdef(got)
    assert _bytes_of(ref) == _bytes_of(got)
    # A callable returning None leaves a leaf where it was made; a pytree lacks no path here.
    seen = []
    got2 = init_quantized_llama(CFG, LORA, key=jax.random.key(1), stack=True,
                                shardings=lambda p, x: seen.append(p) or None, **KW)
    assert _bytes_of(ref) == _bytes_of(got2)
    assert any(p.startswith("model.layers.0.layer.") for p in seen) and "model.norm.weight" in seen
    tree = jax.tree.map(lambda x: single, nnx.state(ref))
    look = sharding_lookup(tree)
    assert look("model.layers.0.layer.mlp.up_proj.base.codes", None) is single
    assert look("no.such.leaf", None) is None
    with pytest.raises(TypeError, match="not a jax.sharding.Sharding"):
        sharding_lookup({"a": 1})


def test_stack_layers_with_shardings_places_the_stacked_leaves():
    dev = jax.devices()[0]
    single = jax.sharding.SingleDeviceSharding(dev)
    a = init_quantized_llama(CFG, LORA, key=jax.random.key(2), **KW)
    b = init_quantized_llama(CFG, LORA, key=jax.random.key(2), **KW)
    stack_layers(a)
    paths = []
    stack_layers(b, shardings=lambda p, x: paths.append((p, x.shape)) or single)
    assert _bytes_of(a) == _bytes_of(b)
    assert all(p.startswith("model.layers.0.layer.") and s[0] == CFG.num_hidden_layers for p, s in paths)


def test_bench_train_mesh_builds_straight_into_the_shardings(tmp_path):
    """experiments/bench_train.py --mesh fsdp=2 on 2 CPU devices: the model is built into the
    shardings computed from the abstract model, then trains; half the codes a device."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"), "--shapes", "tiny", "--steps",
                        "1", "--lr", "1e-2", "--ceiling-size", "64", "--mesh", "fsdp=2", "--remat", "offload_inputs",
                        "--out", str(out), "--plot", str(tmp_path / "b.png")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row.get("error")
    assert row["build_sharded"] and row["devices"] == 2 and row["remat"] == "offload_inputs"
    assert "build_peak_gib" in row and len(row["build_peak_gib_per_device"]) == 2  # None on CPU
    assert row["shard_training_moved_frozen_gib"] == 0  # the base was built in place: nothing moves
    assert 0.45 * row["frozen_gib"] < row["frozen_gib_per_device"] < 0.6 * row["frozen_gib"]
    assert all(math.isfinite(x) for x in row["losses"])
