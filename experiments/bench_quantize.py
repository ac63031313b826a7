"""Throughput of quantize and dequantize, side by side with a plain device copy.

GB/s of float input (bf16 by default) for NF4, NF4+DQ and FP4 at block 64, on the default JAX
device. Timing is device-side in effect: ``--reps`` calls are dispatched back to back and the
clock stops once the last result is ready, so host dispatch overlaps device work; the copy
baseline (``x * 1`` materialised by XLA) is timed the same way in the same run.

    python experiments/bench_quantize.py                         # CPU here: small defaults
    python experiments/bench_quantize.py --shape 8192 8192 --reps 50 --save   # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import qlora_jax as qj


def _time(fn, arg, reps: int) -> float:
    """Median-free steady-state seconds a call: warm up, then reps calls dispatched back to back."""
    jax.block_until_ready(fn(arg))
    jax.block_until_ready(fn(arg))
    t = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(arg)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=None, help="default 1024x1024 on CPU, 8192x8192 on GPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--save", action="store_true", help="write benchmarks/results/bench_quantize_<device>_<date>.json")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    shape = tuple(args.shape or ((8192, 8192) if on_gpu else (1024, 1024)))
    reps = args.reps or (50 if on_gpu else 5)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    in_bytes = x.size * dtype.itemsize

    copy = jax.jit(lambda a: a * jnp.asarray(1, a.dtype))
    t_copy = _time(copy, x, reps)
    rows = [dict(op="copy (x*1)", format="-", gb_s=in_bytes / t_copy / 1e9, ms=t_copy * 1e3, frac_of_copy=1.0)]
    for fmt, dq in (("nf4", False), ("nf4", True), ("fp4", False)):
        label = fmt + ("+dq" if dq else "")
        qfn = jax.jit(lambda a, fmt=fmt, dq=dq: qj.quantize(a, fmt, 64, dq))
        t_q = _time(qfn, x, reps)
        q = qfn(x)
        dfn = jax.jit(lambda q: qj.dequantize(q))
        t_d = _time(dfn, q, reps)
        rows.append(dict(op="quantize", format=label, gb_s=in_bytes / t_q / 1e9, ms=t_q * 1e3,
                         frac_of_copy=t_copy / t_q))
        rows.append(dict(op="dequantize", format=label, gb_s=in_bytes / t_d / 1e9, ms=t_d * 1e3,
                         frac_of_copy=t_copy / t_d))

    print(f"device {dev.device_kind}, jax {jax.__version__}, input {shape} {dtype.name} "
          f"({in_bytes / 2**20:.0f} MiB), {reps} reps")
    print(f"{'op':<12}{'format':<9}{'ms':>10}{'GB/s':>10}{'x copy':>9}")
    for r in rows:
        print(f"{r['op']:<12}{r['format']:<9}{r['ms']:>10.3f}{r['gb_s']:>10.1f}{r['frac_of_copy']:>9.2f}")

    result = dict(benchmark="bench_quantize", device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  date=datetime.date.today().isoformat(), shape=list(shape), dtype=dtype.name, reps=reps,
                  command="python experiments/bench_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  rows=rows)
    if args.save:
        os.makedirs(args.out, exist_ok=True)
        name = f"bench_quantize_{dev.platform}_{result['date']}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.join(args.out, name)}")
    return result


if __name__ == "__main__":
    main()
