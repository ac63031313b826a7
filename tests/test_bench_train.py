"""Building QLoRA models directly in 4-bit (qlora_jax.models.build), stacked decoder layers, and the
training benchmark experiments/bench_train.py (run through its main on CPU).

References are independent of the code under test where it matters: the float model built from
the same per-parameter keys then `inject` (the documented equivalent), numpy float64 norms for
the quantization error, parameter counts read off the built model for the FLOP formula, and a
stub step whose memory limit is known for the sequence-length search.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from hf_folder import write_hf_folder

from qlora_jax import QuantPolicy, dequantize
from qlora_jax import nnx as qnnx
from qlora_jax.io import load_llama
from qlora_jax.lora import LoraConfig
from qlora_jax.models import LlamaConfig
from qlora_jax.models.build import (
    init_llama,
    init_quantized_llama,
    is_stacked,
    load_quantized_llama,
    stack_layers,
    unstack_layers,
)

ROOT = Path(__file__).resolve().parents[1]
# Non-square projections and GQA, so a transposed or mis-ordered kernel cannot pass unnoticed.
HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
CFG = LlamaConfig.from_hf(HF)
POLICY = QuantPolicy(min_size=1)  # every projection quantized (norms, embedding, lm_head excluded)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
KEY = jax.random.key(7)
IDS = (jnp.arange(2 * 12).reshape(2, 12) * 37) % HF["vocab_size"]


def _load_script(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_script("bench_train", "experiments/bench_train.py")


def _rngs() -> nnx.Rngs:
    return nnx.Rngs(params=3, dropout=4)


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _assert_same_model(a, b) -> None:
    assert nnx.graphdef(a) == nnx.graphdef(b)
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_layer_by_layer_build_equals_float_then_inject_and_never_holds_the_float_model():
    base = _live_bytes()
    peak = [0]

    def probe(path: str) -> None:
        peak[0] = max(peak[0], _live_bytes() - base)

    m1 = init_quantized_llama(CFG, LORA, key=KEY, policy=POLICY, rngs=_rngs(), dtype=jnp.float32,
                              param_dtype=jnp.float32, on_param=probe)
    built = _live_bytes() - base

    m0 = init_llama(CFG, KEY)                          # the float model from the same keys
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(m0)))
    kernels = {".".join(map(str, p)): n.kernel.get_value() for p, n in nnx.iter_graph(m0) if type(n) is nnx.Linear}
    biggest = max(k.nbytes for k in kernels.values())
    # Held between parameters: the quantized model so far plus at most a few float kernels, far
    # below the float model (the float-then-inject route holds all of it).
    assert peak[0] <= built + 3 * biggest, (peak[0], built, biggest)
    assert peak[0] < 0.5 * float_bytes, (peak[0], float_bytes)

    # Independent properties of the draw: HF init std, and each 4-bit base encodes its own float
    # kernel in [out, in] order with NF4's error on Gaussian data (~0.092, bitsandbytes' figure).
    q_kernel = np.asarray(kernels["model.layers.2.mlp.up_proj"], np.float64)
    assert abs(q_kernel.std() - 0.02) < 0.002
    layer = m1.model.layers[2].mlp.up_proj
    assert isinstance(layer, qnnx.LoraLinear) and layer.quantized
    deq = np.asarray(dequantize(layer.base.get_value(), jnp.float32), np.float64)
    assert deq.shape == q_kernel.T.shape
    rel = np.linalg.norm(deq - q_kernel.T) / np.linalg.norm(q_kernel)
    assert 0.07 < rel < 0.12, rel
    assert not np.array_equal(np.asarray(kernels["model.layers.2.mlp.up_proj"]),
                              np.asarray(kernels["model.layers.3.mlp.up_proj"]))

    # Bit-for-bit the model that inject makes of the float model, and the same outputs.
    m2 = m0
    qnnx.inject(m2, LORA, quantize=POLICY, compute_dtype=jnp.float32, rngs=_rngs())
    _assert_same_model(m1, m2)
    y1, y2 = _forward(m1, IDS), _forward(m2, IDS)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))

    # The FLOP count's parameter numbers equal what the built model holds.
    fl = bench.flops_per_token(HF, seq=12, r=LORA.r)
    assert fl["linear_params"] == sum(k.size for k in kernels.values())
    assert fl["lora_params"] == sum(x.size for x in jax.tree.leaves(nnx.state(m1, nnx.LoRAParam)))

    # Stacked layers: one module, leaves [L, ...], the same function; unstacking restores the list.
    stack_layers(m1)
    assert is_stacked(m1) and m1.model.remat_policy is None
    up = m1.model.layers[0].layer.mlp.up_proj.base.get_value()
    assert up.codes.shape[0] == HF["num_hidden_layers"]
    y3 = _forward(m1, IDS)
    np.testing.assert_allclose(np.asarray(y3), np.asarray(y1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(m1)
    unstack_layers(m1)
    assert not is_stacked(m1)
    _assert_same_model(m1, m2)


def test_offload_inputs_keeps_the_saved_layer_inputs_in_host_memory():
    """Remat "offload_inputs" of the stacked scan: the per-layer inputs saved for the backward pass
    ([L, B, T, D]) are host-resident values in the gradient's program; with "full" the same stack is
    in device memory. (Traced only: the numbers are "full"'s, as checkpoint_name is the identity.)"""
    import re

    from qlora_jax import train as qt

    m = init_quantized_llama(CFG, LORA, key=KEY, policy=POLICY, rngs=_rngs(), dtype=jnp.float32,
                             param_dtype=jnp.float32)
    stack_layers(m, remat_policy="full")
    batch = {"input_ids": IDS, "loss_mask": jnp.ones_like(IDS)}
    stacked = r"\[{},{},{},{}\]".format(HF["num_hidden_layers"], *IDS.shape, HF["hidden_size"])
    texts = {}
    for policy in ("full", "offload_inputs"):
        m.model.layers[0].remat_policy = policy
        graphdef, params, rngs, frozen = qt.split_model(m)

        def loss(p):
            logits = qt.default_forward(nnx.merge(graphdef, p, rngs, frozen), batch)
            s, c = qt.masked_nll(logits, batch["input_ids"], batch["loss_mask"])
            return s / c

        texts[policy] = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert re.search(r"f32" + stacked, texts["full"]) and not re.search(r"f32<host>" + stacked, texts["full"])
    assert re.search(r"f32<host>" + stacked, texts["offload_inputs"])
    assert not re.search(r"f32" + stacked, texts["offload_inputs"])
    with pytest.raises(ValueError, match="not supported"):
        stack_layers(init_llama(CFG, KEY), remat_policy="offload_everything")


def test_streamed_checkpoint_is_quantized_as_it_loads(tmp_path):
    cfg = dict(HF, num_hidden_layers=2)
    folder = tmp_path / "hf"
    write_hf_folder(folder, init_llama(LlamaConfig.from_hf(cfg), KEY), cfg)
    ours, _ = load_quantized_llama(folder, LORA, policy=POLICY, rngs=_rngs(), dtype=jnp.float32,
                                   param_dtype=jnp.float32)
    ref, _ = load_llama(folder)
    qnnx.inject(ref, LORA, quantize=POLICY, compute_dtype=jnp.float32, rngs=_rngs())
    _assert_same_model(ours, ref)
    assert all(l.quantized for l in qnnx.lora_layers(ours).values())


def test_bench_train_main_reports_and_trains(tmp_path, monkeypatch):
    from pallas_kernels import tuning

    monkeypatch.setattr(tuning, "MOSAIC_MIN_TILES", tuning.MOSAIC_MIN_TILES)   # --no-mosaic sets it
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = bench.main(["--shapes", "tiny", "--steps", "3", "--lr", "1e-2", "--ceiling-size", "128",
                      "--no-mosaic", "--out", str(out), "--plot", str(png)])
    # --no-mosaic: the tuning table's Mosaic GPU row is dropped even for a shape of 256 tiles
    assert not tuning.get_config("forward", 2048, 2048, 2048, 64, device_kind="NVIDIA H200").mosaic
    data = json.loads(out.read_text())
    for key in ("benchmark", "device", "jax", "date", "command", "rows", "ceiling_tflop_s"):
        assert key in data, key
    assert data["benchmark"] == "bench_train" and data["ceiling_tflop_s"] > 0
    (row,) = data["rows"]
    assert "error" not in row, row.get("error")
    assert row["shape"] == "tiny" and row["batch"] == 2 and row["seq"] == 32
    assert row["tok_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0 and row["plan_gib"] > 0
    assert row["peak_gib"] is None            # CPU: no device memory stats ("n/a" in the table)
    assert 0 < row["mfu"] < row["hfu"]        # remat "full" recomputes the forward
    assert row["layout"] == "stacked" and row["lora_params"] == bench.flops_per_token(
        bench.SHAPES["tiny"]["hf"], 32, 16)["lora_params"]
    losses = row["losses"]                    # warm-up step + 3 timed steps, one fixed batch
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert all(b <= a + 1e-4 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses
    assert png.stat().st_size > 0 and res["rows"][0]["tok_s"] == row["tok_s"]


def _bench_on_host_devices(tmp_path: Path, args: list[str], devices: int = 2, timeout: float = 150) -> tuple[dict, str]:
    """experiments/bench_train.py in a subprocess on ``devices`` CPU devices (this process's JAX has
    one). The children of ``--scaling`` share a persistent compilation cache (the model build's
    programs are the same), which keeps the run well under a minute on two cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"), *args, "--out", str(out),
                        "--plot", str(tmp_path / "bench.png")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text()), r.stdout


def test_bench_train_mesh_scaling_on_two_host_devices(tmp_path):
    """--mesh fsdp=2 --scaling on 2 CPU devices: one process on one device (--mesh data=1, half the
    global batch), one on the FSDP mesh (the global batch): the same rows a device; both rows carry
    devices, mesh, per-device peaks; the scaling entry is their tokens/s ratio. With the stacked
    layout, remat "full" and the optimizer state offloaded, the FSDP run trains and holds half of
    the 4-bit base a device."""
    data, stdout = _bench_on_host_devices(tmp_path, [
        "--shapes", "tiny", "--steps", "2", "--lr", "1e-2", "--ceiling-size", "64", "--mesh", "fsdp=2",
        "--scaling", "--offload-optimizer"])
    assert data["complete"] and data["isolated"]
    one, two = data["rows"]
    for row in (one, two):
        assert "error" not in row, row.get("error")
        assert row["layout"] == "stacked" and row["remat"] == "full" and row["offloaded"]
        assert row["tok_s"] > 0 and row["plan_gib"] > 0 and 0 < row["mfu"] < row["hfu"]
        assert len(row["peak_gib_per_device"]) == row["devices"]
        losses = row["losses"]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert (one["scaling_run"], one["devices"], one["mesh"], one["batch"], one["batch_per_device"]) == (
        "1 device", 1, {"data": 1, "fsdp": 1, "tensor": 1}, 1, 1)
    assert (two["scaling_run"], two["devices"], two["mesh"], two["batch"], two["batch_per_device"]) == (
        "2 devices", 2, {"data": 1, "fsdp": 2, "tensor": 1}, 2, 1)
    assert two["tok_s_per_device"] == pytest.approx(two["tok_s"] / 2)
    assert two["backend_used"].startswith("xla")
    # FSDP: each device holds half of the 4-bit codes and block scales (the tiny second-level
    # scales and offsets may stay whole); one device holds all of it.
    assert one["frozen_gib_per_device"] == pytest.approx(one["frozen_gib"])
    assert 0.45 * two["frozen_gib"] < two["frozen_gib_per_device"] < 0.6 * two["frozen_gib"]
    (sc,) = data["scaling"]
    assert (sc["shape"], sc["devices"], sc["mesh_spec"], sc["batch"], sc["batch_per_device"]) == ("tiny", 2, "fsdp=2", 2, 1)
    assert (sc["tok_s_1"], sc["tok_s_n"]) == (one["tok_s"], two["tok_s"])
    assert sc["ratio"] == pytest.approx(two["tok_s"] / one["tok_s"]) and sc["efficiency"] == pytest.approx(sc["ratio"] / 2)
    assert "mesh" in stdout and "peak GiB per device" in stdout and f"ratio {sc['ratio']:.2f}" in stdout


def test_bench_train_mesh_compile_only(tmp_path):
    """--compile-only on a (data=1, fsdp=2) mesh: the abstract state's shardings and the offloaded
    optimizer state's host shardings come from the rules; XLA's per-device plan is reported."""
    data, _ = _bench_on_host_devices(tmp_path, [
        "--shapes", "tiny", "--compile-only", "--mesh", "data=1,fsdp=2", "--remat", "offload_inputs",
        "--offload-optimizer"])
    (row,) = data["rows"]
    assert "error" not in row, row.get("error")
    assert row["devices"] == 2 and row["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and row["batch_per_device"] == 1
    assert row["compile_only"] and row["offloaded"] and row["plan_gib"] > 0 and "tok_s" not in row
    assert data["mesh_spec"] == "data=1,fsdp=2" and data["device_count"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--scaling"], "--scaling needs --mesh"),
    (["--mesh", "data=two"], "--mesh: mesh spec"),
    (["--mesh", "fsdp=-1", "--scaling"], "explicit mesh sizes"),
    (["--mesh", "data=2", "--scaling", "--compile-only"], "does not combine with --compile-only"),
])
def test_bench_train_mesh_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "tiny", *argv])
    assert message in capsys.readouterr().err


def test_max_seq_search_doubles_then_bisects_and_catches_oom():
    """A stub step that runs out of memory above 700 tokens: the search must find 672 (the
    longest multiple of 32 that fits) by doubling from 128, then bisecting."""
    limit, tried = 700, []

    class Compiled:
        def __init__(self, T):
            self.T = T

        def __call__(self, st, frozen, b):
            if self.T > limit:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
            return st, {"loss": jnp.float32(1.0)}

    class Step:
        def lower(self, st, frozen, b):
            tried.append(b["input_ids"].shape[1])
            return argparse.Namespace(compile=lambda: Compiled(tried[-1]))

    args = argparse.Namespace(search_max=4096, search_step=32, seed=0)
    state = {"w": jnp.zeros(3)}
    host, shardings = jax.device_get(state), jax.tree.map(lambda x: x.sharding, state)
    trials = bench.max_seq_search(Step(), host, shardings, None, {"vocab_size": 16}, 1, 64, args)
    assert tried == [128, 256, 512, 1024, 768, 640, 704, 672]
    assert max(t["seq"] for t in trials if t["fits"]) == 672
    assert all(t["oom"] for t in trials if not t["fits"])

    class Broken(Step):
        def lower(self, st, frozen, b):
            raise ValueError("not a memory problem")

    trials = bench.max_seq_search(Broken(), host, shardings, None, {"vocab_size": 16}, 1, 64, args)
    assert len(trials) == 1 and not trials[0]["fits"] and trials[0]["oom"] is False


def test_anchor_shares_the_shape_table_and_anchor_rows_attach():
    anchor = _load_script("torch_anchor_train", "benchmarks/torch_anchor_train.py")  # imports no torch
    assert anchor.SHAPES == bench.SHAPES and "tinyllama-1.1b" in bench.SHAPES
    tl = bench.SHAPES["tinyllama-1.1b"]  # the shape the anchor figures were measured on
    assert (tl["hf"]["num_hidden_layers"], tl["hf"]["hidden_size"], tl["hf"]["intermediate_size"],
            tl["batch"], tl["seq"]) == (22, 2048, 5632, 4, 1024)
    rows = [{"shape": "tinyllama-1.1b", "batch": 4, "seq": 1024, "tok_s": 20000.0, "peak_gib": 4.0,
             "flops_per_token": 1e10}]
    bench.attach_anchor(rows, {"rows": [{"shape": "tinyllama-1.1b", "batch": 4, "seq": 1024, "tok_s": 9320.0,
                                         "peak_gib": 4.91}]}, ceiling=600.0)
    assert rows[0]["speedup_vs_anchor"] == pytest.approx(20000 / 9320)
    assert rows[0]["peak_vs_anchor"] == pytest.approx(4.0 / 4.91)
    assert rows[0]["anchor_mfu"] == pytest.approx(9320 * 1e10 / 600e12)


@pytest.mark.slow
@pytest.mark.interop
def test_torch_anchor_smoke_on_cpu(tmp_path):
    """The anchor recipe (bitsandbytes 4-bit on CPU: backward through Linear4bit works) on the tiny
    shape, in the interop venv."""
    python = ROOT / ".venv-interop" / "bin" / "python"
    if not python.exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "interop_venv.sh")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        python = Path(r.stdout.strip().splitlines()[-1])
    out = tmp_path / "anchor.json"
    r = subprocess.run([str(python), str(ROOT / "benchmarks" / "torch_anchor_train.py"), "--shapes", "tiny",
                        "--steps", "2", "--warmup", "1", "--lr", "1e-2", "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["linear4bit_layers"] == 7 * bench.SHAPES["tiny"]["hf"]["num_hidden_layers"]
    assert row["nf4_double_quant"] and row["tok_s"] > 0
    assert row["lora_params"] == bench.flops_per_token(bench.SHAPES["tiny"]["hf"], 32, 16)["lora_params"]
    assert row["losses"][-1] < row["losses"][0]
