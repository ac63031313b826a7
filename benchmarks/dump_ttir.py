"""Writes the Triton IR of a Pallas kernel as lowered for an H100/H200, on a machine without a GPU.

Offline instruction counting: lower ``nf4_decode`` (or another kernel) for CUDA with the Triton
lowering patched to record each module, write the ``.ttir`` files, then compile them with the
``triton`` package in a scratch venv and read the SASS (`benchmarks/README.md`, "Offline SASS"):

    python benchmarks/dump_ttir.py --out /tmp/ttir decode --m 1 --k 4096 --n 11008

The kernel's config is the tuning table's unless flags override it. Lowering only: nothing runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import gpu_info as gpu_info_lib  # noqa: E402
from jax._src.pallas.triton import lowering as tl_lowering  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as reg  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import _common, tuning  # noqa: E402


def _capture(out_dir: str, tag: str, meta: dict) -> None:
    """Patches the lowering so that each Triton module is written to ``out_dir``."""
    original = tl_lowering.lower_jaxpr_to_triton_module
    count = [0]

    def lower(*args, **kwargs):
        result = original(*args, **kwargs)
        path = os.path.join(out_dir, f"{tag}_{count[0]}.ttir")
        with open(path, "w") as f:
            f.write(result.module.operation.get_asm(enable_debug_info=False))
        with open(path + ".meta", "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in meta.items()) + "\n")
        print(f"wrote {path} ({meta})")
        count[0] += 1
        return result

    reg.lowering.lower_jaxpr_to_triton_module = lower
    info = gpu_info_lib.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
    reg.gpu_info_lib.get_gpu_info = lambda: info


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
    for item in a.set:
        key, val = item.split("=")
        cur = getattr(cfg, key)
        cfg = cfg.replace(**{key: type(cur)(int(val)) if not isinstance(cur, str) else val})
    spec = _common.make_spec(a.n, a.k, 64, 256, _common.CODE_TABLES["nf4"])
    _capture(a.out, f"{a.op}_m{a.m}_k{a.k}_n{a.n}",
             {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    x = jax.ShapeDtypeStruct((a.m, a.k), jnp.bfloat16)
    codes = jax.ShapeDtypeStruct((a.n * a.k // 2,), jnp.uint8)
    absmax = jax.ShapeDtypeStruct((a.n * a.k // 64,), jnp.uint8)
    nsc = -(-a.n * a.k // 64 // 256)
    scale = jax.ShapeDtypeStruct((nsc,), jnp.float32)
    offset = jax.ShapeDtypeStruct((), jnp.float32)
    kernel = {"decode": pk.nf4_decode, "forward": pk.nf4_matmul, "input_grad": pk.nf4_matmul_dx}[a.op]
    if a.op == "input_grad":
        x = jax.ShapeDtypeStruct((a.m, a.n), jnp.bfloat16)
    f = lambda x, c, am, s, o: kernel(x, c, am, s, o, spec=spec, config=cfg)  # noqa: E731
    jax.jit(f).trace(x, codes, absmax, scale, offset).lower(lowering_platforms=("cuda",))
    print(cfg)


if __name__ == "__main__":
    main()
