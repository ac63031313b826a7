"""Reference device-copy bandwidth on the 8192 x 8192 bf16 size of experiments/bench_quantize.py:
torch ``copy_`` timed with CUDA events, and a jitted JAX ``x * 2`` dispatched back to back (GPU
only; run with a Python that has torch and jax, e.g. the GPU machine's).

Gives the copy rate that `experiments/bench_quantize.py`'s in-run ``x + 0`` baseline should be
read against (benchmarks/README.md)."""

import time

import jax
import jax.numpy as jnp
import torch

N = 8192 * 8192


def torch_copy(reps: int = 50) -> float:
    """Seconds per ``y.copy_(x)`` of N bf16 values, by CUDA events over ``reps`` copies."""
    x = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(5):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def jax_scale(reps: int = 100) -> float:
    """Seconds per jitted ``x * 2`` of N bf16 values, ``reps`` calls dispatched back to back."""
    x = jax.random.normal(jax.random.key(0), (N,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    for _ in range(3):
        f(x).block_until_ready()
    t = time.perf_counter()
    jax.block_until_ready([f(x) for _ in range(reps)])
    return (time.perf_counter() - t) / reps


if __name__ == "__main__":
    for name, fn in (("torch copy_", torch_copy), ("jax x*2", jax_scale)):
        s = fn()
        torch.cuda.empty_cache()
        print(f"{name}: {s * 1e6:.1f} us, {2 * N * 2 / s / 1e12:.3f} TB/s moved, {N * 2 / s / 1e12:.3f} TB/s of input")
