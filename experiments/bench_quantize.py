"""Throughput of quantize and dequantize (XLA path and single-pass Pallas kernels), side by side
with a plain device copy.

TB/s of float input (bf16 by default: the bytes of the dense array, read by quantize, written by
dequantize) for NF4, NF4+DQ and FP4 at block 64, on the default JAX device, and the ratio to the
copy baseline (``x + z`` with an opaque zero ``z``: reads and writes every element once) timed
the same way in the same run. Backends (``--backend``): "xla" (plain XLA), "pallas" (the kernels
of `pallas_kernels.quantize`; compiled on a GPU, interpreted elsewhere, which is slow and only a
smoke test), or "both" (xla and pallas; the default on a GPU; "xla" is the default elsewhere).

Timing (``--timing``): "loop" (default on a GPU) runs ``--reps`` steps of one jitted
``lax.fori_loop``; each step calls the op on ``COPIES`` distinct copies of the input (so that XLA
cannot merge the calls, and the working set is several times the L2), after an
``optimization_barrier`` on the loop carry (so that no call can be hoisted out of the loop), and
carries every output whole (so that XLA must compute all of it). The loop is timed at ``reps``
and ``2 * reps`` steps and the difference taken (no compile, launch or first-step cost in it);
the cost of an empty step, measured the same way, is taken off; what is left, divided by the
calls, is device time a call. (An earlier version updated one input element in place each step
to make the calls depend on each other; on an H200 its in-run ``x + 0`` moved 2.8 TB/s and this
method's 3.1-3.4, against 4.1 for a torch copy: most likely XLA copied the updated input each
step. Nsight Compute agrees with this method: dequantize 44 us there, 45 us here.)
"dispatch" (default elsewhere) dispatches ``--reps`` jitted calls back to back and stops the
clock once the last result is ready.
``--sweep`` also times the bare kernels (no double quant) over rows-per-program x num_warps, and
the second-level kernel over blocks-per-program x num_warps.

Double quantization alone (rows ``dq ...``, format ``dq<size>``): on the float32 first-level
scales of the input (NF4, block ``--block-size``: 1M scales for 8192x8192 at block 64), with
TB/s and ``x copy`` relative to those scales' bytes and a copy of them (``copy (scales)``):
``dq mean`` is the offset alone (`_exact_mean`, XLA on every backend), ``dq encode`` the second
level given the offset (XLA ``double_quantize(..., offset=)`` vs the one-pass
``double_quantize_pallas``), ``dq total`` both, as ``quantize`` runs them per backend.

    python experiments/bench_quantize.py                                   # CPU here: XLA, small
    python experiments/bench_quantize.py --shape 8192 8192 --reps 50 --save  # GPU: xla vs pallas
    python experiments/bench_quantize.py --backend pallas --sweep           # GPU: tile sweep
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import qlora_jax as qj

qmod = importlib.import_module("qlora_jax.quantize")   # the module (qj.quantize is the function)

FORMATS = (("nf4", False), ("nf4", True), ("fp4", False))


def _time_dispatch(fn: Callable, args: tuple, reps: int) -> float:
    """Steady-state seconds a call: warm up, then reps calls dispatched back to back."""
    jfn = jax.jit(fn)
    jax.block_until_ready(jfn(*args))
    jax.block_until_ready(jfn(*args))
    t = time.perf_counter()
    out = None
    for _ in range(reps):
        out = jfn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


COPIES = 4   # distinct input copies a loop step walks through ("loop" timing)


def _loop_seconds(run: Callable, args: Any, reps: int) -> float:
    """Seconds a step of ``run(args, n)``: the difference between 2*reps and reps steps."""
    jax.block_until_ready(run(args, 1))
    ts = []
    for n in (reps, 2 * reps, reps, 2 * reps):
        t = time.perf_counter()
        jax.block_until_ready(run(args, n))
        ts.append(time.perf_counter() - t)
    return max((ts[1] + ts[3] - ts[0] - ts[2]) / 2 / reps, 0.0)


@jax.jit
def _empty_loop(x: jax.Array, n: jax.Array) -> jax.Array:
    def body(_, carry):
        xc, s = jax.lax.optimization_barrier(carry)
        return xc, s + xc[0].astype(jnp.float32)
    return jax.lax.fori_loop(0, n, body, (x, jnp.float32(0)))[1]


def _time_loop(fn: Callable, args: tuple, reps: int) -> float:
    """Device seconds a call of ``fn(*args)`` (see the module docstring: "loop" timing)."""
    sets = [args] + [jax.tree.map(lambda a: jnp.array(a, copy=True), args) for _ in range(COPIES - 1)]
    outs0 = [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))] * COPIES

    @jax.jit
    def run(sets, n):
        def body(_, carry):
            sets_c, s, _ = jax.lax.optimization_barrier(carry)
            outs = [fn(*a) for a in sets_c]
            s = s + sum(jnp.ravel(jax.tree.leaves(o)[0])[0].astype(jnp.float32) for o in outs)
            return sets_c, s, outs
        # the last step's outputs are returned whole: every step must compute all of them
        return jax.lax.fori_loop(0, n, body, (sets, jnp.float32(0), outs0))[1:]

    step = _loop_seconds(run, sets, reps)
    empty = _loop_seconds(_empty_loop, jnp.ones((8,), jnp.float32), reps)
    return max(step - empty, 1e-9) / COPIES


def _copy(x: jax.Array) -> jax.Array:
    # ``x * 1`` or ``x + 0`` would be simplified away; an opaque zero keeps one read + one write
    return x + jax.lax.optimization_barrier(jnp.zeros((), x.dtype))


def _row(op: str, backend: str, fmt: str, seconds: float, in_bytes: int, t_copy: float,
         **extra: Any) -> dict:
    return dict(op=op, backend=backend, format=fmt, ms=seconds * 1e3, gb_s=in_bytes / seconds / 1e9,
                tb_s=in_bytes / seconds / 1e12, frac_of_copy=t_copy / seconds, **extra)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=None, help="default 1024x1024 on CPU, 8192x8192 on GPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--backend", default=None, choices=["xla", "pallas", "both"],
                   help="default: both on a GPU, xla elsewhere")
    p.add_argument("--timing", default=None, choices=["loop", "dispatch"],
                   help="default: loop on a GPU, dispatch elsewhere")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--dq-block-size", type=int, default=256,
                   help="second-level block of the double-quantization rows (default 256)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the bare Pallas kernels over tiles x num_warps")
    p.add_argument("--sweep-quantize", action="store_true",
                   help="time only the bare quantize kernel (NF4) over encoder x tile x num_warps x "
                        "tiles-per-program")
    p.add_argument("--sweep-dq", action="store_true",
                   help="also time the second-level kernel over blocks-per-program x num_warps x search")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the Pallas NF4+DQ quantize stage by stage (first level, finite "
                        "check, mean, second level per search)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/bench_quantize_<device>_<date>.json")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    shape = tuple(args.shape or ((8192, 8192) if on_gpu else (1024, 1024)))
    reps = args.reps or (50 if on_gpu else 5)
    timing = args.timing or ("loop" if on_gpu else "dispatch")
    timer = _time_loop if timing == "loop" else _time_dispatch
    backend_arg = args.backend or ("both" if on_gpu else "xla")
    backends = ("xla", "pallas") if backend_arg == "both" else (backend_arg,)
    dtype = jnp.dtype(args.dtype)
    bs = args.block_size
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    in_bytes = x.size * dtype.itemsize

    t_copy = timer(_copy, (x,), reps)
    rows = [_row("copy (x+0)", "-", "-", t_copy, in_bytes, t_copy)]
    for backend in backends:
        if backend == "pallas" and dtype == jnp.float32:
            print("pallas: float32 input is served by XLA only; skipped")
            continue
        label_b = backend + (" (interpret)" if backend == "pallas" and not on_gpu else "")
        for fmt, dq in FORMATS:
            label = fmt + ("+dq" if dq else "")
            qfn = lambda a, fmt=fmt, dq=dq: qj.quantize(a, fmt, bs, dq, backend=backend)
            t_q = timer(qfn, (x,), reps)
            q = jax.jit(qfn)(x)
            dfn = lambda q: qj.dequantize(q, backend=backend)
            t_d = timer(dfn, (q,), reps)
            rows.append(_row("quantize", label_b, label, t_q, in_bytes, t_copy))
            rows.append(_row("dequantize", label_b, label, t_d, in_bytes, t_copy))

    absmax = qj.quantize(x, "nf4", bs, double_quant=False, backend="xla").absmax
    rows += _double_quant_rows(absmax, args.dq_block_size, backends, timer, reps, on_gpu)

    if args.breakdown:
        rows += _breakdown(x, bs, args.dq_block_size, timer, reps, in_bytes, t_copy, interpret=not on_gpu)
    if args.sweep:
        rows += _sweep(x, bs, timer, reps, in_bytes, t_copy, interpret=not on_gpu)
    if args.sweep_quantize:
        rows += _sweep_quantize(x, bs, timer, reps, in_bytes, t_copy, interpret=not on_gpu)
    if args.sweep or args.sweep_dq:
        rows += _sweep_dq(absmax, args.dq_block_size, timer, reps, interpret=not on_gpu)

    print(f"device {dev.device_kind}, jax {jax.__version__}, input {shape} {dtype.name} "
          f"({in_bytes / 2**20:.0f} MiB), block {bs}, {reps} reps, timing {timing}; "
          f"copy {in_bytes / t_copy / 1e12:.3f} TB/s of input "
          f"({2 * in_bytes / t_copy / 1e12:.3f} TB/s moved)")
    print(f"{'op':<18}{'backend':<20}{'format':<9}{'ms':>10}{'TB/s in':>10}{'x copy':>9}  config")
    for r in rows:
        print(f"{r['op']:<18}{r['backend']:<20}{r['format']:<9}{r['ms']:>10.3f}{r['tb_s']:>10.4f}"
              f"{r['frac_of_copy']:>9.2f}  {r.get('config', '')}")

    command = "python experiments/bench_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(benchmark="bench_quantize", device=dev.device_kind, platform=dev.platform,
                  jax=jax.__version__, date=datetime.date.today().isoformat(), shape=list(shape),
                  dtype=dtype.name, block_size=bs, reps=reps, timing=timing,
                  copy_tb_s=in_bytes / t_copy / 1e12, command=command, rows=rows)
    if args.save:
        os.makedirs(args.out, exist_ok=True)
        name = f"bench_quantize_{dev.platform}_{result['date']}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.join(args.out, name)}")
    return result


def _double_quant_rows(absmax: jax.Array, dq: int, backends: tuple[str, ...], timer: Callable,
                       reps: int, on_gpu: bool) -> list[dict]:
    """Double quantization alone on the first-level scales: the mean, the second level given the
    offset, and both (see the module docstring)."""
    a_bytes = absmax.size * absmax.dtype.itemsize
    t_copy = timer(_copy, (absmax,), reps)
    fmt = f"dq{dq}"
    out = [_row("copy (scales)", "-", fmt, t_copy, a_bytes, t_copy, config=f"{absmax.size} scales")]
    offset = jax.jit(qmod._exact_mean)(absmax)
    out.append(_row("dq mean", "xla", fmt, timer(qmod._exact_mean, (absmax,), reps), a_bytes, t_copy))
    for backend in backends:
        interpret = backend == "pallas" and not on_gpu
        label = backend + (" (interpret)" if interpret else "")
        if backend == "pallas":
            from pallas_kernels import quantize as pq
            encode = lambda a, o: pq.double_quantize_pallas(a, o, dq, interpret=interpret)
            if on_gpu:   # the search the default does not use, for comparison
                other = next(s for s in pq.DQ_SEARCHES if s != "gather")
                t = timer(lambda a, o: pq.double_quantize_pallas(a, o, dq, search=other), (absmax, offset), reps)
                out.append(_row("dq encode", label, fmt, t, a_bytes, t_copy, config=f"search={other}"))
        else:
            encode = lambda a, o: qmod.double_quantize(a, dq, offset=o)[:2]
        total = lambda a, backend=backend, interpret=interpret: qmod._double_quantize_backend(
            a, dq, backend, interpret)
        out.append(_row("dq encode", label, fmt, timer(encode, (absmax, offset), reps), a_bytes, t_copy))
        out.append(_row("dq total", label, fmt, timer(total, (absmax,), reps), a_bytes, t_copy))
    return out


def _breakdown(x: jax.Array, bs: int, dq: int, timer: Callable, reps: int, in_bytes: int, t_copy: float,
               interpret: bool) -> list[dict]:
    """The Pallas NF4+DQ quantize built up stage by stage, each row timed whole on the same input
    (so a row minus the one above is what that stage adds, launch gaps included): the first level
    alone (by each encoder that serves the input), with the finite check, with the mean, and with
    the second level by each search."""
    from pallas_kernels import quantize as pq

    values = tuple(float(v) for v in qj.formats.get_format("nf4").values)
    default, *others = pq.encoders_for(values, x.dtype)
    rows = [_row("nf4+dq stages", "pallas", f"dq{dq}",
                 timer(lambda a, e=e: pq.quantize_blocks_pallas(a.reshape(-1), values, bs, encoder=e,
                                                                interpret=interpret), (x,), reps),
                 in_bytes, t_copy, config=f"first level (encoder={e})") for e in others]

    def first(a):
        return pq.quantize_blocks_pallas(a.reshape(-1), values, bs, interpret=interpret)

    def finite(a):
        packed, absmax = first(a)
        return packed, absmax, jnp.logical_not(jnp.any(jnp.isnan(absmax)))

    def mean(a):
        packed, absmax, ok = finite(a)
        return packed, absmax, ok, jax.lax.optimization_barrier(qmod._exact_mean(absmax))

    stages = [(f"first level (encoder={default})", first), ("+ finite check", finite), ("+ mean", mean)]
    for search in pq.DQ_SEARCHES:
        def full(a, search=search):
            packed, absmax, ok, offset = mean(a)
            codes, scale = pq.double_quantize_pallas(absmax, offset, dq, search=search, interpret=interpret)
            return packed, codes, scale, offset, ok
        stages.append((f"+ second ({search})", full))
    return rows + [_row("nf4+dq stages", "pallas", f"dq{dq}", timer(fn, (x,), reps), in_bytes, t_copy,
                        config=name) for name, fn in stages]


def _sweep_dq(absmax: jax.Array, dq: int, timer: Callable, reps: int, interpret: bool) -> list[dict]:
    """The second-level kernel (given the offset) over blocks-per-program x num_warps x search."""
    from pallas_kernels import quantize as pq

    a_bytes = absmax.size * absmax.dtype.itemsize
    t_copy = timer(_copy, (absmax,), reps)
    offset = jax.jit(qmod._exact_mean)(absmax)
    out = []
    for elems, warps, search in itertools.product((512, 1024, 2048, 4096, 8192), (2, 4, 8), pq.DQ_SEARCHES):
        if search != "gather" and warps != 8:
            continue   # the select tree only as a reference at the old default's warps
        blocks = max(1, elems // dq)
        cfg = dict(blocks_per_program=blocks, num_warps=warps, search=search, interpret=interpret)
        config = f"blocks={blocks} ({blocks * dq} scales) warps={warps} search={search}"
        try:
            t = timer(lambda a, o: pq.double_quantize_pallas(a, o, dq, **cfg), (absmax, offset), reps)
        except Exception as e:  # a configuration Triton cannot compile: report, go on
            print(f"sweep {config}: {type(e).__name__}: {str(e)[:200]}")
            continue
        out.append(_row("dq_kernel", "pallas", f"dq{dq}", t, a_bytes, t_copy, config=config))
    return out


def _sweep_quantize(x: jax.Array, bs: int, timer: Callable, reps: int, in_bytes: int, t_copy: float,
                    interpret: bool) -> list[dict]:
    """The bare NF4 quantize kernel over encoder x elements a program x num_warps x (tiles a
    program, stages), each configuration's bytes checked against the first one's."""
    from pallas_kernels import quantize as pq

    values = tuple(float(v) for v in qj.formats.get_format("nf4").values)
    encoders = pq.encoders_for(values, x.dtype)[::-1]   # "count" first: the baseline
    first = None
    out = []
    for enc, elems, warps, (tiles, stages) in itertools.product(
            encoders, (2048, 4096, 8192), (4, 8), ((1, 1), (4, 2))):
        rows = max(1, elems // bs)
        cfg = dict(rows_per_program=rows, num_warps=warps, tiles_per_program=tiles, num_stages=stages,
                   encoder=enc, interpret=interpret)
        config = f"encoder={enc} rows={rows} ({rows * bs} elems) warps={warps} tiles={tiles} stages={stages}"
        try:
            fn = lambda a, cfg=cfg: pq.quantize_blocks_pallas(a, values, bs, **cfg)
            got = jax.jit(fn)(x)
            first = got if first is None else first
            same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, first))
            t = timer(fn, (x,), reps)
        except Exception as e:  # a configuration Triton cannot compile: report, go on
            print(f"sweep {config}: {type(e).__name__}: {str(e)[:200]}")
            continue
        out.append(_row("quantize_kernel", "pallas", "nf4", t, in_bytes, t_copy, config=config,
                        bytes_equal=same))
        print(f"{config}: {t * 1e3:.4f} ms{'' if same else '  BYTES DIFFER'}", flush=True)
    return out


def _sweep(x: jax.Array, bs: int, timer: Callable, reps: int, in_bytes: int, t_copy: float,
           interpret: bool) -> list[dict]:
    """The bare kernels (NF4, no double quant) over tile x num_warps x tiles-per-program (with
    num_stages to prefetch the next tile); the dequantize kernel with both lookups ("prmt" is
    checked bit for bit against "tree" first)."""
    from pallas_kernels import quantize as pq

    values = tuple(float(v) for v in qj.formats.get_format("nf4").values)
    packed, absmax = pq.quantize_blocks_pallas(x, values, bs, interpret=interpret)
    a = pq.dequantize_blocks_pallas(packed, absmax, values, x.dtype, lut="tree", interpret=interpret)
    b = pq.dequantize_blocks_pallas(packed, absmax, values, x.dtype, lut="prmt", interpret=interpret)
    same = bool(jnp.array_equal(jax.lax.bitcast_convert_type(a, jnp.uint16),
                                jax.lax.bitcast_convert_type(b, jnp.uint16)))
    print(f"dequantize prmt == tree, bit for bit: {same}", flush=True)
    out = []
    for elems in (2048, 4096, 8192):
        rows = max(1, elems // bs)
        for warps in (4, 8):
            for tiles, stages in ((1, 1), (4, 2), (8, 3)):
                cfg = dict(rows_per_program=rows, num_warps=warps, tiles_per_program=tiles,
                           num_stages=stages, interpret=interpret)
                config = f"rows={rows} ({rows * bs} elems) warps={warps} tiles={tiles} stages={stages}"
                try:
                    t_q = timer(lambda a: pq.quantize_blocks_pallas(a, values, bs, **cfg), (x,), reps)
                    out.append(_row("quantize_kernel", "pallas", "nf4", t_q, in_bytes, t_copy, config=config))
                    for lut in pq.DEQUANT_LUTS:
                        t_d = timer(lambda p_, a_, lut=lut: pq.dequantize_blocks_pallas(
                            p_, a_, values, x.dtype, lut=lut, **cfg), (packed, absmax), reps)
                        out.append(_row("dequantize_kernel", f"pallas {lut}", "nf4", t_d, in_bytes, t_copy,
                                        config=config, bit_exact_vs_tree=same))
                except Exception as e:  # a configuration Triton cannot compile: report, go on
                    print(f"sweep {config}: {type(e).__name__}: {str(e)[:200]}")
    return out


if __name__ == "__main__":
    main()
