"""GPU probe of the Mosaic GPU forward kernel (pallas_kernels.nf4_matmul_mgpu): correctness
against the plain-JAX reference and float64 at a few shapes, then its time beside XLA's bf16
dot and the tuning table's path (dequant_first) for a list of configs, each timed with
bench_kernels.device_time in one process. Prints one line per case; writes JSON to --out."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback

sys.path.insert(0, ".")

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from experiments import bench_kernels as bk
from pallas_kernels import _common, nf4_matmul_mgpu as mg
from pallas_kernels.tuning import TABLE, TileConfig


# the tuning table's Mosaic GPU row; a config on the command line overrides its fields
BASE = next(e.config for e in TABLE["H200"]["forward"] if e.config.mosaic)


def cfg_of(s: str) -> TileConfig:
    """A config from ``"key=value,key=value"`` overrides of BASE (``""`` is BASE itself)."""
    return BASE.with_overrides(item for item in s.split(",") if item)


def check(m, n, k, cfg):
    w, q = bk.make_weight(k, n)
    spec = pk.make_spec(n, k, 64, 256, _common.CODE_TABLES["nf4"])
    x = (jax.random.normal(jax.random.key(1), (m, k), jnp.float32)).astype(jnp.bfloat16)
    args = (x, q.codes, q.absmax, q.absmax_scale, q.absmax_offset)
    y = np.asarray(mg.nf4_matmul_mgpu(*args, spec=spec, config=cfg), np.float32)
    ref = np.asarray(pk.nf4_matmul_reference(*args, spec=spec), np.float32)
    wd = np.asarray(_common.dequantize_reference(q.codes, q.absmax, q.absmax_scale, q.absmax_offset, spec), np.float64)
    r64 = np.asarray(x, np.float64) @ wd.T
    return dict(rel_ref=float(np.linalg.norm(y - ref) / np.linalg.norm(ref)),
                rel_f64=float(np.linalg.norm(y - r64) / np.linalg.norm(r64)), finite=bool(np.isfinite(y).all()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", nargs="*", default=["256,512,256", "4096,4096,4096"])
    ap.add_argument("--cases", nargs="*", default=["4096,4096,11008", "4096,4096,4096"])
    ap.add_argument("--configs", nargs="*", default=["", "lut=prmt32"],
                    help="TileConfig overrides of BASE, e.g. block_m=128,block_n=128,num_stages=3")
    ap.add_argument("--check-configs", type=int, default=2, help="check the first N configs")
    ap.add_argument("--float32", action="store_true",
                    help="also time each config with float32 output (out_dtype=float32, as qlora_jax.ops asks) "
                         "beside XLA's bf16 dot with a float32 result")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = jax.devices()[0]
    res = dict(device=dev.device_kind, jax=jax.__version__, date=str(datetime.date.today()), checks=[], rows=[])
    print(dev.device_kind, jax.__version__, "SMs", getattr(dev, "core_count", None), flush=True)
    for c in a.check:
        m, n, k = map(int, c.split(","))
        for cs in a.configs[: a.check_configs]:
            try:
                r = check(m, n, k, cfg_of(cs))
            except Exception as e:
                traceback.print_exc(limit=3)
                r = dict(error=bk._err(e))
            r.update(m=m, n=n, k=k, config=cs)
            res["checks"].append(r)
            print("CHECK", r, flush=True)
    step = bk.loop_overhead()
    for c in a.cases:
        m, k, n = map(int, c.split(","))
        w, q = bk.make_weight(k, n)
        x = (jax.random.normal(jax.random.key(1), (m, k), jnp.float32)).astype(jnp.bfloat16)
        ops = bk.jax_ops(k, n)
        row = dict(m=m, k=k, n=n)
        row["bf16_ms"] = bk.device_time(ops["bf16"], x, [(w,)], loop_step_s=step) * 1e3
        row["table_ms"] = bk.device_time(ops["pallas"], x, [(q,)], loop_step_s=step) * 1e3
        print(f"M={m} K={k} N={n}: bf16 {row['bf16_ms']:.4f} ms, table path {row['table_ms']:.4f} ms "
              f"({row['table_ms'] / row['bf16_ms']:.3f}x)", flush=True)
        if a.float32:
            def dot32(x, w):
                return jax.lax.dot(x, w, preferred_element_type=jnp.float32)
            row["bf16_f32out_ms"] = bk.device_time(dot32, x, [(w,)], loop_step_s=step) * 1e3
            print(f"  bf16 dot, float32 out: {row['bf16_f32out_ms']:.4f} ms", flush=True)
        layout = dict(n=n, k=k, block_size=64, dq_block_size=256, code_table=_common.CODE_TABLES["nf4"])
        for cs in a.configs:
            cfg = cfg_of(cs)
            if not mg.servable(pk.make_spec(n, k, 64, 256, _common.CODE_TABLES["nf4"]), m, x.dtype, cfg):
                print(f"  {cs:28s} not servable", flush=True)
                continue
            f = bk.jax_ops(k, n, config_fwd=cfg)["pallas"]
            try:
                t = bk.device_time(f, x, [(q,)], loop_step_s=step) * 1e3
                row[cs] = t
                print(f"  {cs:28s} {t:.4f} ms  {t / row['bf16_ms']:.3f}x bf16  "
                      f"{2 * m * n * k / t / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:
                row[cs] = bk._err(e)
                print(f"  {cs:28s} ERROR {bk._err(e)}", flush=True)
            if a.float32:
                def f32(x, q, cfg=cfg):
                    return pk.matmul_nt(x, q.codes, q.absmax, q.absmax_scale, q.absmax_offset, **layout,
                                        config=cfg, out_dtype=jnp.float32)
                try:
                    t = bk.device_time(f32, x, [(q,)], loop_step_s=step) * 1e3
                    row[cs + " f32"] = t
                    print(f"  {cs + ' f32':28s} {t:.4f} ms  {t / row['bf16_f32out_ms']:.3f}x bf16 dot with "
                          f"float32 out", flush=True)
                except Exception as e:
                    row[cs + " f32"] = bk._err(e)
                    print(f"  {cs + ' f32':28s} ERROR {bk._err(e)}", flush=True)
        res["rows"].append(row)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
