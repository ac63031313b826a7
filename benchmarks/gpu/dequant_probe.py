"""Times the first half of a dequant_first call, the decode of the whole weight, by parts (GPU).

At M = 2048 the decode is 10-15% of cuBLAS's time for the product (run56), so its speed decides
how close dequant_first gets to the bf16 model there. For each weight shape this prints and
saves, timed with `experiments/bench_kernels`' loop:

- ``decoded_weight`` as dequant_first runs it: the dequantize kernel
  (`pallas_kernels.quantize.dequantize_blocks_pallas`), which decodes the double-quantized
  scales itself since run59;
- the same with the scales decoded by XLA first, as dequant_first did before run59, and the
  scales' decode alone;
- with ``--knobs``, the dequantize kernel alone over its launch knobs (blocks a program, warps,
  tiles a program);
- the ``[K, N]`` decoder (`pallas_kernels.dequant_first.decoded_weight_kn`) at two tiles.

Run58 (before the in-kernel scale decode) also timed ``jnp.repeat`` of the packed bytes as a
"copy" ceiling; that is not one (1.05 TB/s), and the row is gone.

    python benchmarks/gpu/dequant_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import bench_kernels as bk  # noqa: E402


def main() -> None:
    import pallas_kernels as pk
    import qlora_jax as qj
    from pallas_kernels import _common, dequant_first
    from pallas_kernels import quantize as pq
    from pallas_kernels.tuning import TileConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp")
    p.add_argument("--knobs", action="store_true", help="also the dequantize kernel alone over launch knobs")
    args = p.parse_args()
    loop_step_s = bk.loop_overhead()
    values = qj.get_format("nf4").values
    rows_out = []
    x = jnp.zeros((4096, 8), jnp.bfloat16)   # the timing loop's x (>= 512 rows: 4 calls a step)
    for k, n in [(4096, 4096), (4096, 11008), (8192, 8192)]:
        _, q = bk.make_weight(k, n)
        spec = pk.make_spec(n, k, bk.BLOCK_SIZE, bk.DQ_BLOCK_SIZE, values)
        nf4_bytes = n * k // 2 + q.absmax.nbytes + q.absmax_scale.nbytes
        moved = nf4_bytes + 2 * n * k
        scales = _common.decode_scales(q.absmax, q.absmax_scale, q.absmax_offset, spec)
        packed = q.codes.reshape(-1)[: n * k // 2]
        cases = {
            "decoded_weight (as dequant_first runs it)":
                (lambda _, q: dequant_first.decoded_weight(q.codes, q.absmax, q.absmax_scale, q.absmax_offset,
                                                           spec=spec, dtype=jnp.bfloat16), (q,)),
            "scales decoded by XLA, then the kernel (dequant_first before run59)":
                (lambda _, q: pq.dequantize_blocks_pallas(
                    packed, _common.decode_scales(q.absmax, q.absmax_scale, q.absmax_offset, spec), values,
                    jnp.bfloat16).reshape(n, k), (q,)),
            "decode_scales alone": (lambda _, q: _common.decode_scales(q.absmax, q.absmax_scale, q.absmax_offset,
                                                                      spec)[None, :], (q,)),
        }
        knobs = [(64, 4, 1), (32, 4, 1), (128, 8, 1), (64, 4, 2), (32, 2, 1)] if args.knobs else []
        for rows, warps, tiles in knobs:
            cases[f"dequantize kernel rows={rows} warps={warps} tiles={tiles}"] = (
                lambda _, p_, s_, r=rows, w=warps, t=tiles: pq.dequantize_blocks_pallas(
                    p_, s_, values, jnp.bfloat16, rows_per_program=r, num_warps=w, tiles_per_program=t)[None, :],
                (packed, scales))
        for bn, bkk, nw in [(128, 64, 4), (64, 128, 4)]:
            cfg = TileConfig(block_n=bn, block_k=bkk, num_warps=nw, lut="prmt", dequant_first=True, decode_kn=True)
            cases[f"decoded_weight_kn {bn}x{bkk} warps={nw}"] = (
                lambda _, q, c=cfg: dequant_first.decoded_weight_kn(q.codes, q.absmax, q.absmax_scale,
                                                                    q.absmax_offset, spec=spec, dtype=jnp.bfloat16,
                                                                    config=c), (q,))
        row = dict(k=k, n=n, nf4_bytes=nf4_bytes, bytes_moved=moved)
        for name, (fn, w) in cases.items():
            try:
                t = bk.device_time(fn, x, [w], loop_step_s=loop_step_s)
                row[name] = dict(ms=t * 1e3, tb_s=moved / t / 1e12)
                print(f"K={k} N={n} {name}: {t * 1e3:.4f} ms ({moved / t / 1e12:.2f} TB/s of decode traffic)",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                row[name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                print(f"K={k} N={n} {name}: {row[name]['error']}", flush=True)
        rows_out.append(row)
    bk.write_probe("dequant_probe", rows_out, args.out)


if __name__ == "__main__":
    main()
