"""Times the forms of the dot behind the dequant_first path against the bf16 model's products (GPU).

dequant_first (`pallas_kernels.dequant_first`) decodes the weight, then XLA multiplies: until
2026-12-04 always as ``dot_general(..., preferred_element_type=float32).astype(bf16)``. This
probe asks whether that form costs XLA a float32 output and a separate convert, and which
operand order cuBLAS runs fastest, at training shapes: for each (M, K, N) it times, in one
process and with the timing loop of `experiments/bench_kernels`,

- the bf16 model's products ``x @ w_kn`` and ``dy @ w_kn.T`` (the ratios' baseline),
- the decoded ``[N, K]`` weight's products with a float32 result rounded after (``*_f32``) and
  with a bf16 result (``*_bf16``),
- the whole dequant_first call (decode, then the dot) with each,

and prints the kernels XLA compiles for the two forms of the forward product.

    python benchmarks/gpu/dot_forms.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_kernels as bk  # noqa: E402

F32 = jnp.float32


def forms(spec, cfg) -> dict:
    """name -> fn(a, weight): the products timed, on the weight they take."""
    import pallas_kernels as pk

    def dg(a, w, contract, f32):
        y = jax.lax.dot_general(a, w, (((1,), (contract,)), ((), ())), preferred_element_type=F32 if f32 else None)
        return y.astype(a.dtype)

    def dec(q):
        return pk.dequant_first.decode(q.codes, q.absmax, q.absmax_scale, q.absmax_offset, spec=spec,
                                       dtype=jnp.bfloat16, config=cfg)

    return {
        "fwd bf16 model x@w_kn": ("kn", lambda x, w: x @ w),
        "fwd nt_f32 (w_nk)": ("nk", lambda x, w: dg(x, w, 1, True)),
        "fwd nt_bf16 (w_nk)": ("nk", lambda x, w: dg(x, w, 1, False)),
        "fwd decode+nt_f32": ("q", lambda x, q: dg(x, dec(q), 1, True)),
        "fwd decode+nt_bf16": ("q", lambda x, q: dg(x, dec(q), 1, False)),
        "dx bf16 model dy@w_kn.T": ("kn", lambda dy, w: dy @ w.T),
        "dx nn_f32 (w_nk)": ("nk", lambda dy, w: dg(dy, w, 0, True)),
        "dx nn_bf16 (w_nk)": ("nk", lambda dy, w: dg(dy, w, 0, False)),
        "dx decode+nn_f32": ("q", lambda dy, q: dg(dy, dec(q), 0, True)),
        "dx decode+nn_bf16": ("q", lambda dy, q: dg(dy, dec(q), 0, False)),
    }


def kernels(fn, *args) -> list[str]:
    """The fusions and custom calls XLA compiles for ``fn(*args)``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [re.sub(r", metadata=.*", "", line.strip())[:200] for line in text.splitlines()
            if re.search(r"= \S+ (fusion|custom-call)\(", line)]


def main() -> None:
    import pallas_kernels as pk
    import qlora_jax as qj

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp")
    p.add_argument("--m", type=int, nargs="+", default=[2048, 4096, 8192])
    args = p.parse_args()
    loop_step_s = bk.loop_overhead()
    rows = []
    for k, n in [(4096, 4096), (4096, 11008), (11008, 4096)]:
        w_kn, q = bk.make_weight(k, n)
        w_nk = jnp.asarray(w_kn.T)
        spec = pk.make_spec(n, k, bk.BLOCK_SIZE, bk.DQ_BLOCK_SIZE, qj.get_format("nf4").values)
        cfg = pk.get_config("forward", 4096, n, k, bk.BLOCK_SIZE)
        weights = {"kn": w_kn, "nk": w_nk, "q": q}
        fs = forms(spec, cfg)
        for m in args.m:
            x = jax.random.normal(jax.random.key(1), (m, k), F32).astype(jnp.bfloat16)
            dy = jax.random.normal(jax.random.key(2), (m, n), F32).astype(jnp.bfloat16)
            row = dict(m=m, k=k, n=n)
            for name, (wk, fn) in fs.items():
                a = dy if name.startswith("dx") else x
                try:
                    t = bk.device_time(fn, a, [(weights[wk],)], loop_step_s=loop_step_s)
                    row[name] = t * 1e3
                except Exception as e:  # noqa: BLE001
                    row[name + " error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for name in list(row):
                if isinstance(row[name], float):
                    base = row["dx bf16 model dy@w_kn.T" if name.startswith("dx") else "fwd bf16 model x@w_kn"]
                    row[name + " vs_model"] = row[name] / base
            rows.append(row)
            print(f"M={m} K={k} N={n}: " + "  ".join(f"{nm} {row[nm]:.4f} ms ({row[nm + ' vs_model']:.2f}x)"
                                                     for nm in fs if nm in row), flush=True)
            if m == args.m[0] and k == 4096 and n == 4096:
                for name in ("fwd nt_f32 (w_nk)", "fwd nt_bf16 (w_nk)", "dx nn_f32 (w_nk)"):
                    print(f"--- kernels of {name}:")
                    wk, fn = fs[name]
                    for line in kernels(fn, dy if name.startswith("dx") else x, weights[wk]):
                        print("   ", line)
    bk.write_probe("dot_forms", rows, args.out)


if __name__ == "__main__":
    main()
