"""Prints the kernels XLA compiles for bench_kernels' timing loop around one decode call (GPU).

The timing loop (`experiments/bench_kernels.timing_loop`) reads only ``out[0, 0]`` of each
call. This shows whether XLA keeps the whole split-K sum (a reduce over [splits, 1, N]) and the
x-plane transpose per call, or shrinks/shares them: the fusions and custom calls of the loop
body with their output shapes. (Before the loop's output barrier, 2026-12-03, XLA fused the
split-K sum into the loop's scalar add, for the one element read.)

    python benchmarks/gpu/loop_hlo.py
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_kernels as bk  # noqa: E402


def main() -> None:
    k, n = 4096, 11008
    _, q = bk.make_weight(k, n)
    fn = bk.jax_ops(k, n)["pallas"]
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32).astype(jnp.bfloat16)
    calls = [(q,), (q,)]

    text = jax.jit(bk.timing_loop(fn)).lower([x, x + 1], calls, 3).compile().as_text()
    for line in text.splitlines():
        if re.search(r"= \S+ (fusion|custom-call)\(", line) and "ENTRY" not in line:
            print(re.sub(r", metadata=.*", "", line.strip())[:220])


if __name__ == "__main__":
    main()
