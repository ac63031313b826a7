"""Multi-device checks of `qlora_jax.sharding`, run in a fresh process with 8 CPU devices.

The test session's processes have already initialized JAX with one CPU device, so
tests/test_sharding.py runs this script in a subprocess and asserts on the JSON it prints (one
line starting with ``RESULT ``). Measurements only: the assertions live in the test file.

    python tests/sharding_worker.py all [--out-dir D]
    python tests/sharding_worker.py gather
    python tests/sharding_worker.py multiprocess --process-id I --num-processes N --port P --out-dir D

``all``: one process with 8 CPU devices. ``gather``: the all-gathers in the compiled HLO of the
sharded step (unrolled layers on fsdp=8, stacked scanned layers on data=2,fsdp=4), and one step
of the stacked model sharded and on one device. ``multiprocess`` runs under ``jax.distributed.initialize``
(N processes on localhost sharing one 8-device mesh with a tensor axis, 8/N CPU devices each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("check", choices=("all", "gather", "multiprocess"))
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where to write trained adapters (npz) and checkpoints")
    return p.parse_args()


ARGS = _args()
# Must happen before JAX creates its CPU backend.
_n_local = 8 // ARGS.num_processes
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_n_local}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if ARGS.check == "multiprocess":
    jax.distributed.initialize(f"localhost:{ARGS.port}", num_processes=ARGS.num_processes,
                               process_id=ARGS.process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qlora_jax import QuantPolicy, dequantize_tree, is_quantized  # noqa: E402
from qlora_jax.models.build import stack_layers  # noqa: E402
from qlora_jax import data as qd  # noqa: E402
from qlora_jax import nnx as qnnx  # noqa: E402
from qlora_jax import sharding as qs  # noqa: E402
from qlora_jax import train as qt  # noqa: E402
from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.models import LlamaConfig, LlamaForCausalLM  # noqa: E402
from qlora_jax.quantize import QuantizedArray, dequantize, tree_path_str  # noqa: E402

# Tiny one-layer Llama whose bases are all whole numbers of 32-element blocks (DQ blocks of
# 64 scales). On 4-way splits the attention bases (16,384 elements = 512 blocks) give every
# device 2 whole DQ blocks, so their second-level scales are split too; the MLP bases (12,288
# elements = 384 blocks, 96 a device = 1.5 DQ blocks) keep their scales replicated: both rules
# run. Weights come from numpy (an abstract model filled in), which skips compiling JAX's
# random initializers: the whole check is dominated by compile time.
CFG = LlamaConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
POLICY = QuantPolicy(min_size=1, block_size=32, dq_block_size=64)
B, T = 8, 16
STEPS = 4


def _numpy_fill(state, seed: int, scale: float):
    rng = np.random.default_rng(seed)

    def leaf(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        base = 1.0 if len(x.shape) == 1 else 0.0  # norm weights around 1
        return jnp.asarray(base + rng.normal(0, scale, x.shape), x.dtype)
    return jax.tree.map(leaf, state)


def make_model(dropout: float = 0.05, cfg: LlamaConfig = CFG) -> nnx.Module:
    """The tiny Llama with NF4+DQ bases and r=4 LoRA (A and B random) on every linear layer."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, _numpy_fill(state, 0, 0.05))
    qnnx.inject(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"),
                quantize=POLICY, compute_dtype=jnp.float32, rngs=nnx.Rngs(params=1, dropout=2))
    # Random B as well, so every adapter changes the loss from step 0.
    nnx.update(model, _numpy_fill(nnx.state(model, nnx.LoRAParam), 1, 0.1))
    return model


def make_batches(k: int = STEPS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(48):
        p, c = int(rng.integers(2, 6)), int(rng.integers(1, 6))
        ids = rng.integers(3, CFG.vocab_size, p + c).astype(np.int32)
        seqs.append(qd.TokenizedSequence(ids, np.r_[np.zeros(p), np.ones(c)].astype(np.int32), f"s{i}"))
    rows = qd.pack_sequences(seqs, T, pad_id=0, split=False)
    it = qd.BatchIterator(rows, B, seed=0)
    return [next(it) for _ in range(k)]


# eps=1: Adam's first update is then nearly linear in the gradient (not sign(g)), so parameter
# differences reflect gradient differences. Two micro-steps an update (optax.MultiSteps: its
# accumulated gradients are optimizer state that mirrors the params too).
TX = qt.make_optimizer(0.05, eps=1.0, accumulation_steps=2)
STEP_KW = dict(accumulation_steps=2)


def host_params(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(qs.to_host(params))[0]
    return {tree_path_str(p): np.asarray(x) for p, x in flat}


def train_single(model, batches):
    graphdef, state, frozen, _ = qt.init_train_state(model, TX)
    step = qt.make_train_step(graphdef, TX, **STEP_KW)
    out = []
    for b in batches:
        state, m = step(state, frozen, b)
        out.append({k: float(v) for k, v in m.items()})
    return out, host_params(state.params)


def train_sharded(model, batches, mesh, min_shard_size=1):
    """Every leaf split where it can be (min_shard_size=1), optimizer state in host memory."""
    graphdef, state, frozen, _ = qt.init_train_state(model, TX)
    run = qs.shard_training(state, frozen, TX, mesh, min_shard_size=min_shard_size,
                            offload=qt.OffloadConfig(optimizer_state=True))
    state, frozen, sh = run.state, run.frozen, run.shardings
    step = qs.make_sharded_train_step(graphdef, TX, sh, offload=run.offload, **STEP_KW)
    out = []
    for b in batches:
        state, m = step(state, frozen, qs.shard_batch(b, mesh))
        out.append({k: float(v) for k, v in m.items()})
    expected = qt.TrainState(sh.state.step, sh.state.params, run.offload[0] if run.offload else sh.state.opt_state,
                             sh.state.rngs)
    kept = all(x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(expected)))
    sharded_params = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    sharded_opt = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.opt_state))
    return out, host_params(state.params), {"shardings_kept": kept, "sharded_param_leaves": sharded_params,
                                            "sharded_opt_leaves": sharded_opt,
                                            "param_leaves": len(jax.tree.leaves(state.params)),
                                            "opt_memory_kinds": sorted({x.sharding.memory_kind for x in
                                                                        jax.tree.leaves(state.opt_state)})}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def check_step(model, batches) -> dict:
    single, p_single = train_single(model, batches)
    save_params(p_single, "single")
    res = {"single": single, "devices": jax.device_count(), "layers": CFG.num_hidden_layers,
           "param_change": max_diff(p_single, host_params(nnx.state(model, nnx.LoRAParam)))}
    metrics, p, info = train_sharded(model, batches, qs.make_mesh("data=2,fsdp=4"))
    res["sharded"] = {"metrics": metrics, "param_diff": max_diff(p, p_single), **info}
    return res


def shard_layout(x: jax.Array) -> list[list[int]]:
    """``[[start, stop], ...]`` of each addressable shard of a 1-D (or 0-D) array, by device id."""
    out = []
    for s in sorted(x.addressable_shards, key=lambda s: s.device.id):
        sl = s.index[0] if s.index else slice(None)
        out.append([sl.start or 0, x.shape[0] if sl.stop is None else sl.stop] if x.ndim else [0, 0])
    return out


def local_decode_ok(q: QuantizedArray, ref_flat: np.ndarray) -> bool:
    """Each device decodes its own codes/absmax/scale shards into exactly its slice of the
    dequantized leaf (no data from other devices)."""
    by_dev = lambda arr: {s.device.id: s for s in arr.addressable_shards}  # noqa: E731
    codes, absmax, scale, offset = by_dev(q.codes), by_dev(q.absmax), by_dev(q.absmax_scale), by_dev(q.absmax_offset)
    for dev, cs in codes.items():
        start = (cs.index[0].start or 0) * 2
        n = cs.data.shape[0] * 2
        local = QuantizedArray(cs.data, absmax[dev].data, scale[dev].data, offset[dev].data,
                               shape=(n,), dtype="float32", format=q.format, block_size=q.block_size,
                               dq_block_size=q.dq_block_size)
        got = np.asarray(dequantize(local)).view(np.uint32)
        if not np.array_equal(got, ref_flat[start:start + n].view(np.uint32)):
            return False
    return True


def check_quant(model) -> dict:
    _, _, frozen, _ = qt.init_train_state(model, TX)
    ref = dequantize_tree(frozen)
    mesh = qs.make_mesh("data=2,fsdp=4")
    sh = qs.tree_shardings(frozen, mesh, min_shard_size=1)
    placed = qs.place(frozen, sh)
    got = jax.jit(dequantize_tree)(placed)
    leaves = {}
    for (path, q), qp, r, g in zip(
            jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_quantized)[0],
            jax.tree.leaves(placed, is_leaf=is_quantized), jax.tree.leaves(ref), jax.tree.leaves(got)):
        if not is_quantized(q):
            continue
        r, g = np.asarray(r), np.asarray(g)
        scale_sharded = not qp.absmax_scale.sharding.is_fully_replicated
        leaves[tree_path_str(path)] = {
            "shape": list(q.shape), "n_blocks": q.n_blocks, "block_size": q.block_size,
            "dq_block_size": q.dq_block_size,
            "codes": shard_layout(qp.codes), "absmax": shard_layout(qp.absmax),
            "absmax_scale": shard_layout(qp.absmax_scale), "offset_replicated":
                qp.absmax_offset.sharding.is_fully_replicated,
            "dequant_bit_equal": bool(np.array_equal(r.view(np.uint32), g.view(np.uint32))),
            "local_decode_ok": local_decode_ok(qp, r.reshape(-1)) if scale_sharded else None,
        }
    quant_only = lambda t: [x for x in jax.tree.leaves(t, is_leaf=is_quantized) if is_quantized(x)]  # noqa: E731
    per_dev = qs.bytes_per_device(quant_only(placed))
    total = sum(int(a.size) * a.dtype.itemsize for q in quant_only(frozen) for a in q.arrays())
    return {"leaves": leaves, "quant_bytes_total": total, "quant_bytes_per_device": per_dev}


# An all-gather instruction of the compiled (post-SPMD) HLO: its name, output type(s), opcode.
_ALL_GATHER = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+(all-gather(?:-start)?)\(")
_ARRAY_TYPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_all_gathers(text: str) -> list[list]:
    """``[[dtype, [dims], in_loop], ...]``: one entry per array an all-gather of the HLO ``text``
    produces (a combined all-gather produces several; of an async ``all-gather-start`` only the
    outputs); ``in_loop``: the instruction is in the body of a while loop (a layer scan)."""
    bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", text))
    out, computation = [], None
    for line in text.splitlines():
        c = _COMPUTATION.match(line)
        if c and not line.startswith(" "):
            computation = c.group(1)
            continue
        m = _ALL_GATHER.match(line)
        if not m:
            continue
        arrays = [[dt, [int(d) for d in dims.split(",") if d]] for dt, dims in _ARRAY_TYPE.findall(m.group(2))]
        if m.group(3) == "all-gather-start":  # ((operands...), (outputs...))
            arrays = arrays[len(arrays) // 2:]
        out.extend([dt, dims, computation in bodies] for dt, dims in arrays)
    return out


def quantized_bases(frozen) -> list[dict]:
    """Shape facts of every 4-bit base of a frozen state (one layer's ``shape`` for stacked ones)."""
    out = []
    for q in jax.tree.leaves(frozen, is_leaf=is_quantized):
        if is_quantized(q):
            out.append({"shape": list(q.shape), "stacked": int(q.codes.shape[0]) if q.codes.ndim > 1 else None,
                        "code_bytes": int(q.codes.shape[-1]), "n_blocks": q.n_blocks,
                        "n_scales": int(q.absmax_scale.shape[-1])})
    return out


def check_gather() -> dict:
    """The compiled sharded step's all-gathers, for the unrolled one-layer model on (fsdp=8) and
    a two-layer model with stacked, scanned decoder layers on (data=2, fsdp=4); for the stacked
    one also the first step's metrics sharded and on one device."""
    res = {}
    batch = make_batches(1)[0]
    for name, spec, layers in (("unrolled", "fsdp=8", 1), ("stacked", "data=2,fsdp=4", 2)):
        model = make_model(cfg=dataclasses.replace(CFG, num_hidden_layers=layers))
        if name == "stacked":
            stack_layers(model)
        graphdef, state, frozen, _ = qt.init_train_state(model, TX)
        mesh = qs.make_mesh(spec)
        run = qs.shard_training(state, frozen, TX, mesh, min_shard_size=1)
        step = qs.make_sharded_train_step(graphdef, TX, run.shardings, **STEP_KW)
        b = qs.shard_batch(batch, mesh)
        compiled = step.lower(run.state, run.frozen, b).compile()
        hlo = compiled.as_text()
        r = {"mesh": dict(mesh.shape), "layers": layers, "bases": quantized_bases(frozen),
             "all_gathers": hlo_all_gathers(hlo), "hlo_while_loops": len(re.findall(r"\bwhile\(", hlo)),
             "codes_sharded": all(not q.codes.sharding.is_fully_replicated
                                  for q in jax.tree.leaves(run.frozen, is_leaf=is_quantized) if is_quantized(q))}
        if name == "stacked":
            _, m = compiled(run.state, run.frozen, b)
            r["sharded_metrics"] = {k: float(v) for k, v in m.items()}
            graphdef1, state1, frozen1, _ = qt.init_train_state(model, TX)
            _, m1 = qt.make_train_step(graphdef1, TX, **STEP_KW)(state1, frozen1, batch)
            r["single_metrics"] = {k: float(v) for k, v in m1.items()}
        res[name] = r
    return res


def perturbed_state(state: qt.TrainState, seed: int) -> qt.TrainState:
    """``state`` with every float leaf replaced by random values and the step set to 7."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(rng.normal(size=x.shape), x.dtype)
        return x
    state = jax.tree.map(leaf, state)
    return qt.TrainState(jnp.asarray(7, jnp.int32), state.params, state.opt_state, state.rngs)


def snapshot(tree) -> list[np.ndarray]:
    leaves = jax.tree.leaves(qs.to_host(jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)))
    return [np.asarray(x) for x in leaves]


def unequal_leaves(a: list[np.ndarray], b: list[np.ndarray]) -> list[int]:
    """Indices of the leaves that differ in dtype, shape or any bit (all of them if the counts differ)."""
    if len(a) != len(b):
        return list(range(max(len(a), len(b))))
    return [i for i, (x, y) in enumerate(zip(a, b)) if x.dtype != y.dtype or x.shape != y.shape or
            not np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))]


def check_ckpt(model) -> dict:
    _, state0, frozen0, _ = qt.init_train_state(model, TX)
    state0 = perturbed_state(state0, 1)
    tree0 = {"state": state0, "frozen": frozen0}
    saved_values = snapshot(tree0)

    def on_mesh(spec):
        mesh = qs.make_mesh(spec)
        sh = qs.train_shardings(state0, frozen0, TX, mesh, min_shard_size=1)
        return {"state": qs.place(state0, sh.state), "frozen": qs.place(frozen0, sh.frozen)}

    res = {}
    with tempfile.TemporaryDirectory() as d:
        with qt.CheckpointManager(d) as ckpt:
            src = on_mesh("data=2,fsdp=4")
            ckpt.save(3, src, data={"epoch": 0, "index": 3})
        # Templates: a differently initialised state (other values, same structure) on each target.
        _, other, _, _ = qt.init_train_state(model, TX)
        other = perturbed_state(other, 2)
        with qt.CheckpointManager(d) as ckpt:
            for name, spec in (("mesh_4x2", "data=4,fsdp=2"), ("single", None)):
                if spec is None:
                    templ = {"state": other, "frozen": frozen0}
                else:
                    mesh = qs.make_mesh(spec)
                    sh = qs.train_shardings(other, frozen0, TX, mesh, min_shard_size=1)
                    templ = {"state": qs.place(other, sh.state), "frozen": qs.place(frozen0, sh.frozen)}
                r = ckpt.restore(templ)
                got = r.state
                same_sharding = all(x.sharding == t.sharding for x, t in
                                    zip(jax.tree.leaves(got), jax.tree.leaves(templ)))
                codes = [x.codes for x in jax.tree.leaves(got["frozen"], is_leaf=is_quantized) if is_quantized(x)]
                res[name] = {
                    "unequal_leaves": unequal_leaves(snapshot(got), saved_values),
                    "template_unequal_leaves": len(unequal_leaves(snapshot(templ["state"]), snapshot(tree0["state"]))),
                    "shardings_as_template": same_sharding,
                    "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(got)}),
                    "mesh_shape": dict(codes[0].sharding.mesh.shape) if spec else None,
                    "first_codes_layout": shard_layout(codes[0]),
                    "step": r.step, "data": r.data,
                }
    return res


def check_errors(model) -> dict:
    res = {}

    def catch(name, fn):
        try:
            fn()
            res[name] = None
        except Exception as e:  # noqa: BLE001 - the test inspects type and message
            res[name] = f"{type(e).__name__}: {e}"

    graphdef, state, frozen, _ = qt.init_train_state(model, TX)
    mesh = qs.make_mesh("data=2,fsdp=4")
    sh = qs.train_shardings(state, frozen, TX, mesh)
    step = qs.make_sharded_train_step(graphdef, TX, sh)
    batch6 = {k: v[:6] for k, v in make_batches(1)[0].items()}
    catch("step_batch_6_rows", lambda: step(qs.place(state, sh.state), qs.place(frozen, sh.frozen), batch6))
    catch("shard_batch_6_rows", lambda: qs.shard_batch(batch6, mesh))
    catch("mesh_too_big", lambda: qs.make_mesh("data=3,fsdp=4"))
    catch("mesh_unknown_axis", lambda: qs.make_mesh({"data": 2, "model": 4}))
    foreign = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
    catch("foreign_mesh_rules", lambda: qs.tree_shardings(frozen, foreign))
    catch("foreign_mesh_batch", lambda: qs.batch_sharding(foreign))
    res["fill_axis_mesh"] = dict(qs.make_mesh("data=2,fsdp=-1").shape)
    return res


def check_multiprocess() -> dict:
    """Every process runs the same program on one mesh spanning all processes, with a tensor
    axis: (data=2 across the processes when there are 2, fsdp=2, tensor=2). The test compares
    with the single-device run of ``all`` (same model, batches and optimizer)."""
    model = make_model()
    mesh = qs.make_mesh("data=2,fsdp=2,tensor=2")
    metrics, params, info = train_sharded(model, make_batches(), mesh)
    res = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "local_devices": jax.local_device_count(), "devices": jax.device_count(),
           "mesh": dict(mesh.shape), "metrics": metrics, **info}
    save_params(params, "multiprocess")
    # Save from this mesh, restore onto (data=4, fsdp=2) in the same processes.
    _, state, frozen, _ = qt.init_train_state(model, TX)
    state = perturbed_state(state, 1)
    saved = snapshot(state)
    sh = qs.train_shardings(state, frozen, TX, mesh, min_shard_size=1)
    ckpt_dir = os.path.join(ARGS.out_dir, "ckpt")
    with qt.CheckpointManager(ckpt_dir) as ckpt:
        ckpt.save(1, qs.place(state, sh.state))
    mesh2 = qs.make_mesh("data=4,fsdp=2")
    other = perturbed_state(qt.init_train_state(model, TX).state, 2)
    with qt.CheckpointManager(ckpt_dir) as ckpt:
        got = ckpt.restore(qs.place(other, qs.train_shardings(other, frozen, TX, mesh2, min_shard_size=1).state))
    res["ckpt_unequal_leaves"] = unequal_leaves(snapshot(got.state), saved)
    res["ckpt_mesh_shape"] = dict(jax.tree.leaves(got.state.params)[0].sharding.mesh.shape)
    return res


def save_params(params: dict[str, np.ndarray], name: str) -> None:
    """Adapters after training, for the test to compare across runs (process 0 writes)."""
    if ARGS.out_dir and jax.process_index() == 0:
        np.savez(os.path.join(ARGS.out_dir, f"params_{name}.npz"), **params)


def check_all() -> dict:
    """step, quant, ckpt and errors on one model (one process start, shared compiles)."""
    model = make_model()
    timings, res = {}, {}
    for name, fn in (("step", lambda: check_step(model, make_batches())), ("quant", lambda: check_quant(model)),
                     ("ckpt", lambda: check_ckpt(model)), ("errors", lambda: check_errors(model))):
        t = time.perf_counter()
        res[name] = fn()
        timings[name] = time.perf_counter() - t
    res["timings_s"] = timings
    return res


def main() -> None:
    res = {"all": check_all, "gather": check_gather, "multiprocess": check_multiprocess}[ARGS.check]()
    res["jax"] = jax.__version__
    print("RESULT " + json.dumps(res), flush=True)
    if ARGS.check == "multiprocess":
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
