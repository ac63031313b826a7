"""Building a QLoRA Llama straight into FSDP shardings, measured in a fresh process with 4 CPU devices.

tests/test_build_sharded.py runs this script in a subprocess (the test session's JAX already has
one CPU device) and asserts on the JSON it prints (one line starting with ``RESULT ``).
Measurements only: the assertions live in the test file.

    python tests/build_sharded_worker.py

What it measures, for a tiny stacked 4-layer Llama on ``fsdp=4``:

- ``direct``: `init_quantized_llama(..., stack=True, shardings=...)` with the shardings that
  `qlora_jax.sharding.train_shardings` gives for the abstract model (as experiments/bench_train.py
  does); ``ref``: the same call on one device, then `shard_training`.
- leaf-by-leaf byte equality of the two models, and whether each built leaf has its target sharding;
- bytes on each device (``jax.live_arrays()``, addressable shards) at every ``on_param`` call and
  after every stacked leaf group, for both builds: all bytes and uint8 bytes (the 4-bit codes and
  the 8-bit absmax codes, which nothing else in the model is);
- whether `shard_training` moves the already placed frozen arrays;
- two training steps on each (losses);
- the same equality and placement for `load_quantized_llama` from an HF folder, and for an
  unstacked `init_quantized_llama` build.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

N_DEV = 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={N_DEV}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qlora_jax import QuantPolicy  # noqa: E402
from qlora_jax import sharding as qs  # noqa: E402
from qlora_jax import train as qt  # noqa: E402
from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.models import LlamaConfig  # noqa: E402
from qlora_jax.models import build  # noqa: E402
from qlora_jax.quantize import tree_path_str  # noqa: E402
from hf_folder import write_hf_folder  # noqa: E402  (sys.path[0] is tests/)

# Every base a whole number of 32-element blocks that 4 devices split (q/o: 512 blocks, k/v: 256,
# MLP: 1024), so the codes are really split; lm_head and the embedding stay float.
HF = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
CFG = LlamaConfig.from_hf(HF)
POLICY = QuantPolicy(min_size=1, block_size=32, dq_block_size=64)
LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", init_lora_weights=False)
KEY = jax.random.key(3)
KW = dict(policy=POLICY, dtype=jnp.float32, param_dtype=jnp.float32)
TX = qt.make_optimizer(1e-2)
B, T = 8, 16


def _rngs() -> nnx.Rngs:
    return nnx.Rngs(params=5, dropout=6)


def _bytes(x) -> int:
    return int(x.size) * x.dtype.itemsize


def device_bytes() -> tuple[list[int], list[int]]:
    """(all bytes, uint8 bytes) of the live arrays' shards on each device. Each buffer counts
    once: ``jax.live_arrays()`` also lists the single-device arrays that stand for the shards of
    a sharded one (``addressable_shards``)."""
    devs = jax.devices()
    total, codes = [0] * len(devs), [0] * len(devs)
    seen = set()
    for x in jax.live_arrays():
        if x.is_deleted():
            continue
        for sh in x.addressable_shards:
            buf = (sh.device.id, sh.data.unsafe_buffer_pointer())
            if buf in seen:
                continue
            seen.add(buf)
            i = devs.index(sh.device)
            n = _bytes(sh.data)
            total[i] += n
            if sh.data.dtype == jnp.uint8:
                codes[i] += n
    return total, codes


class Probe:
    """Per-device maxima over the build: called from on_param and after each stacked leaf group."""

    def __init__(self):
        self.total = [0] * N_DEV
        self.codes = [0] * N_DEV
        self.calls = 0

    def __call__(self, *_):
        total, codes = device_bytes()
        self.total = [max(a, b) for a, b in zip(self.total, total)]
        self.codes = [max(a, b) for a, b in zip(self.codes, codes)]
        self.calls += 1


def build_with(probe: Probe, **kw):
    orig = build._stack_leaves

    def stack_and_probe(xs, sharding=None):
        out = orig(xs, sharding)
        del xs
        probe()
        return out

    build._stack_leaves = stack_and_probe
    try:
        return build.init_quantized_llama(CFG, LORA, key=KEY, rngs=_rngs(), stack=True, on_param=probe, **KW, **kw)
    finally:
        build._stack_leaves = orig


def host_leaves(model) -> dict[str, tuple[str, bytes]]:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        a = np.asarray(x)
        out[tree_path_str(path)] = (f"{a.dtype}{a.shape}", a.tobytes())
    return out


def compare(a, b) -> dict:
    la, lb = host_leaves(a), host_leaves(b)
    return {"same_paths": sorted(la) == sorted(lb), "n_leaves": len(la),
            "differ": [p for p in la if p in lb and la[p] != lb[p]],
            "same_graphdef": nnx.graphdef(a) == nnx.graphdef(b)}


def misplaced(model, lookup) -> list[str]:
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        p = tree_path_str(path)
        s = lookup(p, x)
        if s is None or not (x.sharding == s or x.sharding.is_equivalent_to(s, x.ndim)):
            bad.append(p)
    return bad


def model_stats(model) -> dict:
    codes = [0] * N_DEV
    total = [0] * N_DEV
    codes_total = 0
    devs = jax.devices()
    for x in jax.tree.leaves(nnx.state(model)):
        if x.dtype == jnp.uint8:
            codes_total += _bytes(x)
        for sh in x.addressable_shards:
            i = devs.index(sh.device)
            total[i] += _bytes(sh.data)
            if sh.data.dtype == jnp.uint8:
                codes[i] += _bytes(sh.data)
    return {"codes_total": codes_total, "codes_per_device": codes, "bytes_per_device": total}


def abstract_shardings(mesh, make):
    """`train_shardings` of the abstract model ``make()`` builds: (params, rngs, frozen) trees."""
    model = nnx.eval_shape(make)
    _, params, rngs, frozen = qt.split_model(model)
    sds = lambda x, dt=None: jax.ShapeDtypeStruct(x.shape, dt or x.dtype)  # noqa: E731
    params = jax.tree.map(lambda x: sds(x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else None), params)
    state = qt.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(TX.init, params),
                          jax.tree.map(sds, rngs))
    sh = qs.train_shardings(state, jax.tree.map(sds, frozen), TX, mesh)
    return sh, (sh.state.params, sh.state.rngs, sh.frozen)


def batch(mesh):
    rng = np.random.default_rng(0)
    b = {"input_ids": rng.integers(0, HF["vocab_size"], (B, T)).astype(np.int32),
         "loss_mask": np.ones((B, T), np.int32)}
    return qs.shard_batch(b, mesh)


def train_losses(model, mesh, step=None):
    graphdef, state, frozen, _ = qt.init_train_state(model, TX)
    before = jax.tree.leaves(frozen)
    run = qs.shard_training(state, frozen, TX, mesh)
    after = jax.tree.leaves(run.frozen)
    kept = sum(a is b for a, b in zip(before, after))
    if step is None:
        step = qs.make_sharded_train_step(graphdef, TX, run.shardings)
    st, losses, b = run.state, [], batch(mesh)
    for _ in range(2):
        st, m = step(st, run.frozen, b)
        losses.append(float(m["loss"]))
    return losses, step, {"frozen_leaves": len(before), "frozen_kept": kept,
                          "frozen_already_placed": sum(x.sharding == s for x, s in
                                                       zip(before, jax.tree.leaves(run.shardings.frozen)))}, run


def main() -> None:
    mesh = qs.make_mesh("fsdp=4")
    res: dict = {"devices": jax.device_count()}
    make = lambda: build.init_quantized_llama(CFG, LORA, key=KEY, rngs=_rngs(), stack=True, **KW)  # noqa: E731
    sh, targets = abstract_shardings(mesh, make)
    lookup = build.sharding_lookup(targets)

    p_direct = Probe()
    direct = build_with(p_direct, shardings=targets)
    res["direct_probe"] = {"total": p_direct.total, "codes": p_direct.codes, "calls": p_direct.calls}
    res["direct_stats"] = model_stats(direct)
    res["direct_misplaced"] = misplaced(direct, lookup)

    p_ref = Probe()
    ref = build_with(p_ref)
    res["ref_probe"] = {"total": p_ref.total, "codes": p_ref.codes, "calls": p_ref.calls}
    res["ref_stats"] = model_stats(ref)
    res["compare"] = compare(direct, ref)
    # One decoder layer's float weights (param dtype float32): the build's per-layer transient bound.
    lin = sum(k * n for k, n in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)])
    res["layer_float_bytes"] = 4 * (lin + 2 * HF["hidden_size"])

    losses_d, step, noop_d, run_d = train_losses(direct, mesh)
    res["losses_direct"], res["noop_direct"] = losses_d, noop_d
    res["train_shardings_match"] = (jax.tree.structure(run_d.shardings.frozen) == jax.tree.structure(sh.frozen)
                                    and all(a == b for a, b in zip(jax.tree.leaves(run_d.shardings.frozen),
                                                                   jax.tree.leaves(sh.frozen))))
    del run_d
    losses_r, _, noop_r, _ = train_losses(ref, mesh, step)
    res["losses_ref"], res["noop_ref"] = losses_r, noop_r
    x = jax.device_put(np.arange(64.0), sh.frozen["model"]["embed_tokens"]["embedding"].sharding
                       if hasattr(sh.frozen["model"]["embed_tokens"]["embedding"], "sharding")
                       else qs.NamedSharding(mesh, qs.P("fsdp")))
    res["device_put_same_sharding_is_identity"] = jax.device_put(x, x.sharding) is x

    # Unstacked build into (tree) shardings of the final unstacked model.
    flat = build.init_quantized_llama(CFG, LORA, key=KEY, rngs=_rngs(), **KW)
    flat_sh = qs.tree_shardings(nnx.state(flat), mesh)
    flat_direct = build.init_quantized_llama(CFG, LORA, key=KEY, rngs=_rngs(), shardings=flat_sh, **KW)
    res["unstacked_compare"] = compare(flat_direct, flat)
    res["unstacked_misplaced"] = misplaced(flat_direct, build.sharding_lookup(flat_sh))

    # Streamed checkpoint, stacked, into the shardings of the stacked loaded model.
    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "hf")
        write_hf_folder(folder, build.init_llama(CFG, KEY), HF)
        lkw = dict(policy=POLICY, dtype=jnp.float32, param_dtype=jnp.float32, stack=True)
        loaded, _ = build.load_quantized_llama(folder, LORA, rngs=_rngs(), **lkw)
        load_sh = qs.tree_shardings(nnx.state(loaded), mesh)
        loaded_direct, _ = build.load_quantized_llama(folder, LORA, rngs=_rngs(), shardings=load_sh, **lkw)
        res["load_compare"] = compare(loaded_direct, loaded)
        res["load_misplaced"] = misplaced(loaded_direct, build.sharding_lookup(load_sh))
        res["load_stats"] = model_stats(loaded_direct)

    # A tree that lacks leaves is an error, not a silent half-placed model.
    try:
        build.init_quantized_llama(CFG, LORA, key=KEY, rngs=_rngs(), stack=True, shardings=targets[2], **KW)
        res["partial_tree_error"] = None
    except ValueError as e:
        res["partial_tree_error"] = str(e)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
