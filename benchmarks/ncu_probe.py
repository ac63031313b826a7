"""Runs each Pallas kernel of interest once, for Nsight Compute to profile (GPU only).

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section SchedulerStats --section WarpStateStats -k regex:'quantize|nf4_' \
        python benchmarks/ncu_probe.py

``--decode-configs table block_n=16,split_k=1,prefetch=3 ...`` runs only the decode kernel at
M=1 (K=4096, N=11008) with the tuning table's config and each set of overrides, twice each.
``--quantize-configs ENC:ROWS:WARPS ...`` runs only the first-level quantize kernel in each of
those configurations (encoder, blocks a program, warps), twice each.
``--pipeline`` runs only ``qlora_jax.quantize(x, "nf4", double_quant=True, backend="pallas")`` on
the same input (twice: compile, then the launch worth profiling), for a per-kernel breakdown of
the whole call, XLA's kernels included:

    ncu --clock-control none --metrics gpu__time_duration.sum python benchmarks/ncu_probe.py --pipeline

Each kernel is compiled and run once before the profiled call, so ncu sees one steady launch of
each (``--launch-skip`` is not needed; ``-k`` picks the Pallas kernels by name). Shapes: 8192 x
8192 bf16 for quantize/dequantize; K=4096 N=11008 for the matmuls (decode M=1, forward and
input gradient M=4096).
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import quantize as pq  # noqa: E402
from pallas_kernels import tuning  # noqa: E402
from pallas_kernels.tuning import TileConfig  # noqa: E402
import qlora_jax as qj  # noqa: E402


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (8192 * 8192,), jnp.float32).astype(jnp.bfloat16)
    if "--quantize-configs" in sys.argv[1:]:
        # the first-level kernel by encoder and tile: "encoder:rows:warps" after the flag
        specs = sys.argv[sys.argv.index("--quantize-configs") + 1:]
        for spec in specs:
            enc, rows, warps = spec.split(":")
            f = jax.jit(lambda a, enc=enc, rows=int(rows), warps=int(warps): pq.quantize_blocks_pallas(
                a, "nf4", 64, encoder=enc, rows_per_program=rows, num_warps=warps))
            for _ in range(2):
                jax.block_until_ready(f(x))
            print(f"ran quantize {spec}", flush=True)
        return
    if "--decode-configs" in sys.argv[1:]:
        # decode at M=1, K=4096 N=11008, the tuning table's config with "key=val,key=val"
        # overrides after the flag (one launch worth profiling each; "table" for none)
        k, n = 4096, 11008
        w = (0.02 * jax.random.normal(jax.random.key(1), (k, n), jnp.float32)).astype(jnp.bfloat16)
        q = qj.quantize_linear_kernel(w, format="nf4", block_size=64, double_quant=True, dq_block_size=256)
        lay = dict(n=n, k=k, block_size=64, dq_block_size=256, code_table=qj.get_format("nf4").values)
        x1 = jax.random.normal(jax.random.key(2), (1, k), jnp.bfloat16)
        base = tuning.get_config("decode", 1, n, k, 64)
        for item in sys.argv[sys.argv.index("--decode-configs") + 1:]:
            cfg = base.with_overrides(item.split(",") if item != "table" else [])
            f = jax.jit(lambda a, *w, cfg=cfg: pk.matmul_nt(a, *w, **lay, config=cfg))
            for _ in range(2):
                jax.block_until_ready(f(x1, q.codes, q.absmax, q.absmax_scale, q.absmax_offset))
            print(f"ran decode {item}", flush=True)
        return
    if "--pipeline" in sys.argv[1:]:
        for _ in range(2):
            jax.block_until_ready(qj.quantize(x, "nf4", 64, double_quant=True, backend="pallas"))
        print("ran quantize nf4+dq pipeline", flush=True)
        return
    runs = []
    runs.append(("quantize", lambda a: pq.quantize_blocks_pallas(a, "nf4", 64), (x,)))
    packed, absmax = jax.block_until_ready(pq.quantize_blocks_pallas(x, "nf4", 64))
    for lut in ("tree", "prmt"):
        runs.append((f"dequantize {lut}",
                     lambda p, a, lut=lut: pq.dequantize_blocks_pallas(p, a, "nf4", lut=lut), (packed, absmax)))
    k, n = 4096, 11008
    w = (0.02 * jax.random.normal(jax.random.key(1), (k, n), jnp.float32)).astype(jnp.bfloat16)
    q = qj.quantize_linear_kernel(w, format="nf4", block_size=64, double_quant=True, dq_block_size=256)
    lay = dict(n=n, k=k, block_size=64, dq_block_size=256, code_table=qj.get_format("nf4").values)
    args = (q.codes, q.absmax, q.absmax_scale, q.absmax_offset)
    x1 = jax.random.normal(jax.random.key(2), (1, k), jnp.bfloat16)
    xm = jax.random.normal(jax.random.key(3), (4096, k), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(4), (4096, n), jnp.bfloat16)
    # the tuning table's configs, and the select-tree decode of 2026-11-23 as the baseline
    dec = {"tree": TileConfig(block_n=32, block_k=64, split_k=8, num_warps=2, num_stages=3, lut="tree", use_dot=False),
           "table": tuning.get_config("decode", 1, n, k, 64)}
    for name, cfg in dec.items():
        runs.append((f"decode {name}", lambda a, *w, cfg=cfg: pk.matmul_nt(a, *w, **lay, config=cfg), (x1, *args)))
    fwd = tuning.get_config("forward", 4096, n, k, 64)
    runs.append(("forward table", lambda a, *w: pk.matmul_nt(a, *w, **lay, config=fwd), (xm, *args)))
    bwd = tuning.get_config("input_grad", 4096, n, k, 64)
    runs.append(("input_grad table", lambda a, *w: pk.matmul_nn(a, *w, **lay, config=bwd), (dy, *args)))
    for name, fn, a in runs:
        f = jax.jit(fn)
        try:
            jax.block_until_ready(f(*a))   # compile + warm
            jax.block_until_ready(f(*a))   # the launch worth profiling
            print(f"ran {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
