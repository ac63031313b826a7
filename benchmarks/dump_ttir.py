"""Writes the Triton IR of a Pallas kernel as lowered for an H100/H200, on a machine without a GPU.

Offline instruction counting: lower ``nf4_decode`` (or another kernel) for CUDA through the
tests' H100 lowering helper (`tests/triton_lowering.py`, which keeps each module), write the
``.ttir`` files, then compile them with the
``triton`` package in a scratch venv and read the SASS (`benchmarks/README.md`, "Offline SASS"):

    python benchmarks/dump_ttir.py --out /tmp/ttir decode --m 1 --k 4096 --n 11008

The kernel's config is the tuning table's unless flags override it. Lowering only: nothing runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from pallas_kernels import _common, tuning  # noqa: E402
from triton_lowering import lowers_for_h100  # noqa: E402  (the tests' H100 lowering, modules kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("op", choices=["decode", "forward", "input_grad"])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. block_n=32 use_dot=0")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cfg = tuning.get_config(a.op, a.m, a.n, a.k, 64, device_kind="NVIDIA H200")
    cfg = cfg.with_overrides(a.set)
    spec = _common.make_spec(a.n, a.k, 64, 256, _common.CODE_TABLES["nf4"])
    x = jax.ShapeDtypeStruct((a.m, a.n if a.op == "input_grad" else a.k), jnp.bfloat16)
    codes = jax.ShapeDtypeStruct((a.n * a.k // 2,), jnp.uint8)
    absmax = jax.ShapeDtypeStruct((a.n * a.k // 64,), jnp.uint8)
    scale = jax.ShapeDtypeStruct((-(-a.n * a.k // 64 // 256),), jnp.float32)
    offset = jax.ShapeDtypeStruct((), jnp.float32)
    kernel = {"decode": pk.nf4_decode, "forward": pk.nf4_matmul, "input_grad": pk.nf4_matmul_dx}[a.op]
    f = lambda x, c, am, s, o: kernel(x, c, am, s, o, spec=spec, config=cfg)  # noqa: E731
    modules: list[str] = []
    lowers_for_h100(f, x, codes, absmax, scale, offset, modules=modules)
    for i, text in enumerate(modules):
        path = os.path.join(a.out, f"{a.op}_m{a.m}_k{a.k}_n{a.n}_{i}.ttir")
        with open(path, "w") as fh:
            fh.write(text)
        with open(path + ".meta", "w") as fh:   # what triton.compile needs besides the IR
            fh.write(f"num_warps={cfg.num_warps} num_stages={cfg.num_stages}\n")
        print(f"wrote {path}")
    print(cfg)


if __name__ == "__main__":
    main()
