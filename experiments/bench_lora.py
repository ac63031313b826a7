"""Forward+backward time and memory of one QLoRA layer, side by side with its two baselines.

Variants (the same layer ``y = x·Wᵀ + s·(x·A)·B``, W ``[N, K]``, x ``[M, K]``, compute bf16,
LoRA weights float32, gradients for x, A, B):

- ``bf16_lora`` (a): a resident bf16 weight, plain autodiff (the 16-bit LoRA baseline);
- ``naive_qlora`` (b): ``W = dequantize(W_q)`` inside the differentiated function, plain autodiff
  (what autodiff saves for the backward includes the decoded bf16 weight);
- ``qlora``: `qlora_jax.ops.qlora_matmul` with ``backend="auto"`` (the real path);
- ``qlora_xla``: the same with ``backend="xla"``, shown only when "auto" picks Pallas.

Measured for each:

- ``ms``: one jitted forward+backward step (``jax.vjp`` of the layer, forward output returned),
  device-side in effect: ``--reps`` calls dispatched back to back with one block at the end,
  median over ``--trials``; each call's step is long enough (>1 ms on the GPU at full size)
  that dispatch overlaps device work.
- ``saved_mib``: bytes autodiff keeps between the forward and the backward (the residuals of
  ``jax.vjp``, run eagerly) that are not the inputs or weights themselves: per layer, what a
  model holds for every layer until its backward runs.
- ``compiled_*_mib``: ``jit(step).lower(...).compile().memory_analysis()`` (arguments, outputs,
  temporaries): works on every backend.
- ``peak_mib`` (GPU, ``--fresh``): ``peak_bytes_in_use`` of a fresh process that runs only this
  variant, minus what was in use before its first step.

A second table (``--scan-layers L``, 0 to skip) runs a stack of L MLP blocks
``x + f(gelu(f(x, W_up)), W_down)`` (``W_up [N, K]``, ``W_down [K, N]``) under ``lax.scan`` with
``jax.grad``: there the decoded weights that the naive path saves add up layer after layer.

    python experiments/bench_lora.py                      # CPU here: 512x1024, M=256
    python experiments/bench_lora.py --save               # GPU: 4096x11008, M=4096, fresh processes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import ops
from qlora_jax.quantize import dequantize, quantize

MIB = 2.0 ** 20
VARIANTS = ("bf16_lora", "naive_qlora", "qlora", "qlora_xla")


# --------------------------------------------------------------------------------------------
# The layer, three ways


def _plain(x, w_nk, a, b, s):
    """``x·Wᵀ + s·(x·A)·B`` with bf16 operands and float32 accumulation (plain autodiff)."""
    cd = jnp.bfloat16
    y = jax.lax.dot_general(x, w_nk.astype(cd), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    u = (jnp.dot(x, a.astype(cd), preferred_element_type=jnp.float32) * s).astype(cd)
    return (y + jnp.dot(u, b.astype(cd), preferred_element_type=jnp.float32)).astype(cd)


def _layer_fn(variant: str) -> Callable:
    """``f(x, a, b, w, s) -> y``; ``w`` is a bf16 ``[N, K]`` array or a `QuantizedArray`."""
    if variant == "bf16_lora":
        return lambda x, a, b, w, s: _plain(x, w, a, b, s)
    if variant == "naive_qlora":
        return lambda x, a, b, w, s: _plain(x, dequantize(w, jnp.bfloat16), a, b, s)
    backend = "xla" if variant == "qlora_xla" else "auto"
    return lambda x, a, b, w, s: ops.qlora_matmul(x, w, a, b, s, compute_dtype=jnp.bfloat16, backend=backend)


def _step_fn(variant: str) -> Callable:
    """One forward+backward: ``(x, dy, a, b, w, s) -> (y, dx, da, db)``."""
    f = _layer_fn(variant)

    def step(x, dy, a, b, w, s):
        y, vjp = jax.vjp(lambda x, a, b: f(x, a, b, w, s), x, a, b)
        return (y, *vjp(dy))

    return step


def _inputs(k: int, n: int, m: int, r: int, variant: str, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n), np.float32), jnp.bfloat16)
    a = jnp.asarray(rng.uniform(-1, 1, (k, r)).astype(np.float32) / np.sqrt(k))
    b = jnp.asarray(0.01 * rng.standard_normal((r, n), np.float32))
    w32 = jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02)
    w = w32.astype(jnp.bfloat16) if variant == "bf16_lora" else quantize(w32)
    del w32
    return x, dy, a, b, w, jnp.float32(2.0)


def _is_input(leaf: jax.Array, inputs: list[jax.Array]) -> bool:
    """True if ``leaf`` is one of ``inputs``: the same buffer, or an equal copy (eager autodiff may
    copy an input through a reshape; under jit that copy does not exist)."""
    try:
        ptr = leaf.unsafe_buffer_pointer()
    except Exception:  # not a plain single-device array
        ptr = None
    for x in inputs:
        try:
            if ptr is not None and ptr == x.unsafe_buffer_pointer():
                return True
        except Exception:
            pass
        if leaf.shape == x.shape and leaf.dtype == x.dtype and bool(jnp.array_equal(leaf, x)):
            return True
    return False


def _saved_bytes(variant: str, args: tuple) -> int:
    """Bytes of the jax.vjp residuals that are not the inputs or weights themselves."""
    x, dy, a, b, w, s = args
    f = _layer_fn(variant)
    _, vjp = jax.vjp(lambda x, a, b: f(x, a, b, w, s), x, a, b)
    inputs = [v for v in jax.tree.leaves((x, a, b, w)) if getattr(v, "ndim", 0) > 0]
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(vjp)
               if hasattr(leaf, "nbytes") and leaf.ndim > 0 and not _is_input(leaf, inputs))


def _time(fn: Callable, args: tuple, reps: int, trials: int) -> float:
    """Median over trials of (reps back-to-back calls, one block) / reps, in seconds."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    per = []
    for _ in range(trials):
        t = time.perf_counter()
        out = None
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / reps)
    return statistics.median(per)


def _compiled_memory(fn: Callable, args: tuple) -> dict[str, float]:
    ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    if ma is None:
        return {}
    get = lambda name: float(getattr(ma, name, 0) or 0) / MIB  # noqa: E731
    arg, out, tmp, alias = (get(f"{n}_size_in_bytes") for n in ("argument", "output", "temp", "alias"))
    return dict(compiled_args_mib=arg, compiled_out_mib=out, compiled_temp_mib=tmp,
                compiled_total_mib=arg + out + tmp - alias)


def _live_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def measure_layer(variant: str, k: int, n: int, m: int, r: int, reps: int, trials: int) -> dict[str, Any]:
    """Time and memory of one variant (in this process)."""
    args = _inputs(k, n, m, r, variant)
    step = _step_fn(variant)
    row: dict[str, Any] = dict(variant=variant)
    if variant.startswith("qlora"):
        backend = "xla" if variant == "qlora_xla" else "auto"
        row["backend"] = ops._dispatch(backend, m, k, n, args[4], jnp.bfloat16)
    before = _live_bytes()
    fn = jax.jit(step)
    row["ms"] = _time(fn, args, reps, trials) * 1e3
    stats = jax.devices()[0].memory_stats()
    if stats and before is not None and "peak_bytes_in_use" in stats:
        row["peak_mib"] = (stats["peak_bytes_in_use"] - before) / MIB
    row["saved_mib"] = _saved_bytes(variant, args) / MIB
    row.update(_compiled_memory(step, args))
    flops = 4 * m * k * n + 6 * m * r * (k + n)     # y and dx (no weight gradient); LoRA fwd+bwd
    row["tflop_s"] = flops / (row["ms"] * 1e-3) / 1e12
    return row


# --------------------------------------------------------------------------------------------
# A stack of MLP blocks under lax.scan


def _stack_inputs(k: int, n: int, m: int, r: int, layers: int, variant: str) -> tuple:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)

    def lora(kk, nn_):
        a = jnp.asarray(rng.uniform(-1, 1, (layers, kk, r)).astype(np.float32) / np.sqrt(kk))
        return a, jnp.asarray(0.01 * rng.standard_normal((layers, r, nn_), np.float32))

    def weight(rows, cols):
        ws = [jnp.asarray(rng.standard_normal((rows, cols), np.float32) * 0.02) for _ in range(layers)]
        if variant == "bf16_lora":
            return jnp.stack([w.astype(jnp.bfloat16) for w in ws])
        # Quantized per layer; stacking the fields gives arrays with a leading layer axis that
        # lax.scan slices (the static shape stays one layer's).
        return jax.tree.map(lambda *f: jnp.stack(f), *[quantize(w) for w in ws])

    return x, (lora(k, n), lora(n, k)), (weight(n, k), weight(k, n))


def _stack_loss(variant: str) -> Callable:
    f = _layer_fn(variant)

    def loss(x, loras, weights):
        def block(h, layer):
            (au, bu), (ad, bd), wu, wd = layer
            up = jax.nn.gelu(f(h, au, bu, wu, 2.0))
            return (h.astype(jnp.float32) + f(up, ad, bd, wd, 2.0).astype(jnp.float32)).astype(h.dtype), None

        (up_l, down_l), (wu, wd) = loras, weights
        h, _ = jax.lax.scan(block, x, (up_l, down_l, wu, wd))
        return jnp.mean(h.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1))


def measure_stack(variant: str, k: int, n: int, m: int, r: int, layers: int, reps: int,
                  trials: int) -> dict[str, Any]:
    args = _stack_inputs(k, n, m, r, layers, variant)
    fn = _stack_loss(variant)
    row: dict[str, Any] = dict(variant=variant, layers=layers)
    before = _live_bytes()
    row["ms"] = _time(jax.jit(fn), args, reps, trials) * 1e3
    stats = jax.devices()[0].memory_stats()
    if stats and before is not None and "peak_bytes_in_use" in stats:
        row["peak_mib"] = (stats["peak_bytes_in_use"] - before) / MIB
    row.update(_compiled_memory(fn, args))
    return row


# --------------------------------------------------------------------------------------------
# Driver


def _variants() -> list[str]:
    out = ["bf16_lora", "naive_qlora", "qlora"]
    if ops._pallas_module() is not None and jax.default_backend() == "gpu":
        out.append("qlora_xla")
    return out


def _run_fresh(which: str, variant: str, argv: list[str]) -> dict[str, Any]:
    """Runs one measurement in a new Python process (a clean peak-memory counter)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", f"{which}:{variant}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_table(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str, int, str]]) -> None:
    """cols: (key, header, width, format spec); the first column is left-aligned text."""
    print(title)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (_, h, w, _) in enumerate(cols)))
    for row in rows:
        cells = []
        for i, (key, _, w, fmt) in enumerate(cols):
            v = row.get(key)
            if i == 0:
                cells.append(f"{v:<{w}}")
            else:
                cells.append(f"{'-':>{w}}" if v is None else f"{v:>{w}{fmt}}")
        print("".join(cells))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=None, help="input features (default 4096 GPU, 512 CPU)")
    p.add_argument("--n", type=int, default=None, help="output features (default 11008 GPU, 1024 CPU)")
    p.add_argument("--m", type=int, default=None, help="batch x seq rows (default 4096 GPU, 256 CPU)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--reps", type=int, default=None, help="calls a trial (default 50 GPU, 5 CPU)")
    p.add_argument("--trials", type=int, default=None, help="trials, median taken (default 5 GPU, 3 CPU)")
    p.add_argument("--scan-layers", type=int, default=None, help="MLP blocks in the scan table (0: skip; "
                   "default 4 GPU, 2 CPU)")
    p.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process a variant, for live peak memory (default: on GPU)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/bench_lora_<platform>_<date>.json")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)   # internal: "layer:VARIANT" / "stack:VARIANT"
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    k = args.k or (4096 if gpu else 512)
    n = args.n or (11008 if gpu else 1024)
    m = args.m or (4096 if gpu else 256)
    reps = args.reps or (50 if gpu else 5)
    trials = args.trials or (5 if gpu else 3)
    layers = args.scan_layers if args.scan_layers is not None else (4 if gpu else 2)
    fresh = gpu if args.fresh is None else args.fresh
    stack_reps = max(1, reps // 5)

    if args.only:
        which, variant = args.only.split(":")
        if which == "layer":
            row = measure_layer(variant, k, n, m, args.r, reps, trials)
        else:
            row = measure_stack(variant, k, n, m, args.r, layers, stack_reps, trials)
        print(json.dumps(row))
        return row

    child_argv = [a for a in argv if a not in ("--save", "--fresh")]
    rows, stack_rows = [], []
    for v in _variants():
        rows.append(_run_fresh("layer", v, child_argv) if fresh
                    else measure_layer(v, k, n, m, args.r, reps, trials))
    if layers:
        for v in [v for v in _variants() if v != "qlora_xla"]:
            stack_rows.append(_run_fresh("stack", v, child_argv) if fresh
                              else measure_stack(v, k, n, m, args.r, layers, stack_reps, trials))
    for table in (rows, stack_rows):
        base = next((r for r in table if r["variant"] == "bf16_lora"), None)
        for r in table:
            r["time_vs_bf16"] = r["ms"] / base["ms"]
            for key in ("peak_mib", "compiled_total_mib", "compiled_temp_mib"):
                if key in r and base.get(key):
                    r[key.replace("_mib", "_vs_bf16")] = r[key] / base[key]

    print(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}; layer K={k} N={n}, "
          f"M={m}, r={args.r}, bf16 compute; {reps} reps x {trials} trials"
          f"{', one fresh process a variant' if fresh else ''}")
    cols = [("variant", "variant", 13, "s"), ("backend", "backend", 8, "s"), ("ms", "ms", 10, ".3f"),
            ("time_vs_bf16", "x (a)", 8, ".2f"), ("tflop_s", "TFLOP/s", 9, ".1f"),
            ("saved_mib", "saved MiB", 11, ".1f"), ("compiled_temp_mib", "temp MiB", 10, ".1f"),
            ("compiled_total_mib", "total MiB", 11, ".1f"), ("peak_mib", "peak MiB", 10, ".1f")]
    _print_table("forward+backward of one layer (saved = kept for the backward, beyond inputs):", rows, cols)
    if stack_rows:
        cols2 = [("variant", "variant", 13, "s"), ("ms", "ms", 10, ".3f"), ("time_vs_bf16", "x (a)", 8, ".2f"),
                 ("compiled_temp_mib", "temp MiB", 10, ".1f"), ("compiled_total_mib", "total MiB", 11, ".1f"),
                 ("compiled_total_vs_bf16", "x (a)", 8, ".2f"), ("peak_mib", "peak MiB", 10, ".1f"),
                 ("peak_vs_bf16", "x (a)", 8, ".2f")]
        _print_table(f"grad of {layers} scanned MLP blocks (K->N->K):", stack_rows, cols2)

    result = dict(benchmark="bench_lora", device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  date=datetime.date.today().isoformat(), k=k, n=n, m=m, r=args.r, reps=reps, trials=trials,
                  fresh_process=fresh, command="python experiments/bench_lora.py " + " ".join(argv),
                  rows=rows, scan_rows=stack_rows)
    if args.save:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"bench_lora_{dev.platform}_{result['date']}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
