"""Fused NF4 dequant-matmul kernels vs cuBLAS bf16, plain XLA and bitsandbytes, timed on the device.

For each weight shape (K, N) and batch M, one run times side by side:

- ``bf16``: cuBLAS through XLA, ``x @ w`` with ``w[K, N]`` bf16 (and ``dy @ wᵀ`` for the input
  gradient);
- ``xla_nf4``: the plain XLA path, ``dequantize`` (qlora_jax) then ``dot``;
- ``pallas``: ``pallas_kernels.matmul_nt`` (forward / decode by M) and ``matmul_nn`` (input
  gradient, M >= 512 only);
- ``bnb``: bitsandbytes ``matmul_4bit`` (NF4, double quant, block 64) and torch's bf16 matmul,
  in a subprocess with CUDA events over CUDA-graph replays, when torch with CUDA and
  bitsandbytes import (``--bnb-path`` adds a folder holding the ``bitsandbytes`` package).

Device-side timing: many calls inside one jitted ``lax.fori_loop`` (`timing_loop`: the
operands pass an ``optimization_barrier`` with the loop carry so XLA cannot hoist the call, the
outputs pass another so that XLA cannot shrink a call's epilogue to the one element the loop
reads, and each call has its own copy of x), median of 3 runs, divided by the calls. Each loop
step makes 32 calls (4 from M = 512 up), rotating through R distinct weight copies (R * bytes
>= ~2x the 50 MB L2 of an H100) so that decode timings stream from HBM, not L2. An empty loop
step costs ~26 us on an H100 (the while loop's round trip); it is measured in the same run
(``loop_overhead_ms``) and taken off each step.

    python experiments/bench_kernels.py                 # full table, JSON to benchmarks/results/
    python experiments/bench_kernels.py --quick --check # subset, correctness vs XLA first
    python experiments/bench_kernels.py --sweep         # try the tuning candidates, print the best

A failing kernel at one shape records its error in that row and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to the torch worker

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

KN_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
M_VALUES = [1, 4, 16, 512, 2048, 4096, 8192]
QUICK_KN = [(4096, 4096), (4096, 11008)]
QUICK_M = [1, 4, 16, 4096]
DX_MIN_M = 512  # the input gradient is a training op: timed from this M up
L2_BYTES = 50 * 2**20
CEILINGS = {"copy_gb_s": 2483.0, "bf16_tflop_s": 607.0}  # H100_BASELINE.md, measured on one H100
BLOCK_SIZE, DQ_BLOCK_SIZE = 64, 256


def _rotations(weight_bytes: int, m: int) -> int:
    """Distinct weight copies a loop step walks through, so their sum exceeds 2x L2 (small M)."""
    if m >= DX_MIN_M:
        return 1
    return max(1, min(16, math.ceil(2 * L2_BYTES / weight_bytes)))


# ------------------------------------------------------------------------------------------
# JAX side


def timing_loop(fn):
    """``run(xs, weights, n)``: ``n`` steps of a fori_loop, each calling ``fn(xs[i], *weights[i])``
    for every i and adding each output's ``[0, 0]`` element to a float32 sum.

    Everything passes optimization barriers: the inputs (so that nothing computed from the
    weights or x alone, a decoded weight or x's byte planes, can be hoisted out of the loop),
    and the outputs (so that XLA cannot shrink a call's epilogue, such as a split-K sum, to
    the one element read). Each call gets its own copy of x, so that work on x is not shared
    between calls either."""
    import jax
    import jax.numpy as jnp

    def run(xs, weights, n):
        def body(_, carry):
            xs_c, ws, s = jax.lax.optimization_barrier(carry)
            outs = jax.lax.optimization_barrier([fn(xc, *w) for xc, w in zip(xs_c, ws)])
            return xs_c, ws, s + sum(o[0, 0].astype(jnp.float32) for o in outs)
        return jax.lax.fori_loop(0, n, body, (xs, weights, jnp.float32(0)))[2]

    return run


def device_time(fn, x, weights, min_total_s: float = 0.05, loop_step_s: float = 0.0) -> float:
    """Seconds a call of ``fn(x, *w)``, averaged over the weight copies in ``weights``, timed
    inside one jitted fori_loop (`timing_loop`; median of 3 timed launches). Each loop step
    makes at least 32 calls (4 when x has >= 512 rows), rotating through ``weights``, and
    ``loop_step_s`` (the cost of an empty step, from `loop_overhead`) is taken off each step."""
    min_calls = 4 if x.shape[0] >= DX_MIN_M else 32
    import jax
    import jax.numpy as jnp

    calls = list(weights) * max(1, math.ceil(min_calls / len(weights)))
    xs = [jnp.array(x, copy=True) for _ in calls]
    f = jax.jit(timing_loop(fn))
    f(xs, calls, 1).block_until_ready()
    t = time.perf_counter()
    f(xs, calls, 2).block_until_ready()
    est = max((time.perf_counter() - t) / 2, 1e-6)
    n = int(min(10000, max(3, math.ceil(min_total_s / est))))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        f(xs, calls, n).block_until_ready()
        times.append(time.perf_counter() - t)
    step = statistics.median(times) / n
    return max(step - loop_step_s, 0.0) / len(calls)


def write_probe(benchmark: str, rows: list, out_dir: str) -> str:
    """Writes a GPU probe's ``rows`` with the device, jax version and date to
    ``out_dir/<benchmark>.json`` (`benchmarks/gpu/*_probe.py`, `dot_forms.py`); returns the path."""
    import jax

    out = dict(benchmark=benchmark, device=jax.devices()[0].device_kind, jax=jax.__version__,
               date=datetime.date.today().isoformat(), rows=rows)
    path = os.path.join(out_dir, f"{benchmark}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print("wrote", path)
    return path


def loop_overhead() -> float:
    """Seconds an empty fori_loop step costs (a trivial op; the while loop's own round trip)."""
    import jax
    import jax.numpy as jnp

    def run(x, n):
        def body(_, carry):
            xc, s = jax.lax.optimization_barrier(carry)
            return xc, s + xc[0, 0].astype(jnp.float32)
        return jax.lax.fori_loop(0, n, body, (x, jnp.float32(0)))[1]

    f = jax.jit(run)
    x = jnp.ones((8, 8), jnp.bfloat16)
    f(x, 10).block_until_ready()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        f(x, 2000).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / 2000


def copy_bandwidth() -> float:
    """Device copy GB/s (bytes read + written) of a 1 GiB bf16 array."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2**29,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    f(a).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            b = f(a)
        b.block_until_ready()
        ts.append((time.perf_counter() - t) / 10)
    return 2 * a.nbytes / statistics.median(ts) / 1e9


def make_weight(k: int, n: int, seed: int = 0):
    """(w_kn bf16 [K, N], QuantizedArray [N, K] NF4 + double quant) of a random N(0, 0.02) weight."""
    import jax
    import jax.numpy as jnp

    import qlora_jax as qj

    w = (0.02 * jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)).astype(jnp.bfloat16)
    q = qj.quantize_linear_kernel(w, format="nf4", block_size=BLOCK_SIZE, double_quant=True,
                                  dq_block_size=DQ_BLOCK_SIZE)
    return w, q


INTERPRET = False  # --interpret: run the Pallas kernels in the interpreter (a CPU smoke test)


def jax_ops(k: int, n: int, config_fwd=None, config_dx=None):
    """The timed functions, each ``fn(x, *weight_arrays)``."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels as pk
    import qlora_jax as qj

    layout = dict(n=n, k=k, block_size=BLOCK_SIZE, dq_block_size=DQ_BLOCK_SIZE,
                  code_table=qj.get_format("nf4").values)

    def bf16(x, w_kn):
        return x @ w_kn

    def bf16_dx(dy, w_kn):
        return dy @ w_kn.T

    def xla_nf4(x, q):
        return jax.lax.dot_general(x, qj.dequantize(q, x.dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x.dtype)

    def xla_nf4_dx(dy, q):
        return jax.lax.dot_general(dy, qj.dequantize(q, dy.dtype), (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(dy.dtype)

    spec = pk.make_spec(n, k, BLOCK_SIZE, DQ_BLOCK_SIZE, qj.get_format("nf4").values)

    def decode_only(x, q):   # the first half of a dequant_first call, with its decoder
        cfg = config_fwd or pk.get_config("forward", x.shape[0], n, k, BLOCK_SIZE)
        return pk.dequant_first.decode(q.codes, q.absmax, q.absmax_scale, q.absmax_offset, spec=spec,
                                       dtype=x.dtype, config=cfg, interpret=INTERPRET)

    def bf16_nt(x, w_nk):    # its second half: the dot on the [N, K] weight, a result in x's dtype
        return jax.lax.dot_general(x, w_nk, (((1,), (1,)), ((), ())))

    def pallas(x, q):
        return pk.matmul_nt(x, q.codes, q.absmax, q.absmax_scale, q.absmax_offset, **layout,
                            config=config_fwd, interpret=INTERPRET)

    def pallas_dx(dy, q):
        return pk.matmul_nn(dy, q.codes, q.absmax, q.absmax_scale, q.absmax_offset, **layout,
                            config=config_dx, interpret=INTERPRET)

    return dict(bf16=bf16, bf16_dx=bf16_dx, xla_nf4=xla_nf4, xla_nf4_dx=xla_nf4_dx,
                pallas=pallas, pallas_dx=pallas_dx, decode_only=decode_only, bf16_nt=bf16_nt)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _copies(tree, r: int):
    import jax
    import jax.numpy as jnp

    return [tree] + [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(r - 1)]


def bench_shape(k: int, n: int, ms: list[int], check: bool, loop_step_s: float,
                overrides: dict | None = None) -> list[dict]:
    """Rows for one weight shape and every M (errors recorded per op). ``overrides`` maps
    (op, m) to a TileConfig (from `best_configs`); else the tuning table decides."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.tuning import DECODE_MAX_M, get_config

    w_kn, q = make_weight(k, n)
    nf4_bytes = q.nbytes
    rows = []
    for m in ms:
        cfg_nt = _override(overrides, "decode" if m <= DECODE_MAX_M else "forward", m)
        cfg_nn = _override(overrides, "input_grad", m)
        ops = jax_ops(k, n, config_fwd=cfg_nt, config_dx=cfg_nn)
        row = dict(k=k, n=n, m=m, flop=2 * m * n * k, nf4_weight_bytes=nf4_bytes,
                   bf16_weight_bytes=2 * n * k)
        if cfg_nt is not None:
            row["config_nt"] = dataclasses.asdict(cfg_nt)
        if cfg_nn is not None and m >= DX_MIN_M:
            row["config_nn"] = dataclasses.asdict(cfg_nn)
        x = (jax.random.normal(jax.random.key(m), (m, k), jnp.float32)).astype(jnp.bfloat16)
        dy = (jax.random.normal(jax.random.key(m + 1), (m, n), jnp.float32)).astype(jnp.bfloat16)
        if check:
            try:
                ref = np.asarray(ops["xla_nf4"](x, q), np.float32)
                got = np.asarray(jax.jit(ops["pallas"])(x, q), np.float32)
                row["check_rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                row["check_finite"] = bool(np.all(np.isfinite(got)))
                if m >= DX_MIN_M:
                    ref = np.asarray(ops["xla_nf4_dx"](dy, q), np.float32)
                    got = np.asarray(jax.jit(ops["pallas_dx"])(dy, q), np.float32)
                    row["check_dx_rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                    row["check_dx_finite"] = bool(np.all(np.isfinite(got)))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["check_error"] = _err(e)
        plan = [("bf16", x, w_kn, 2 * n * k), ("xla_nf4", x, q, nf4_bytes), ("pallas", x, q, nf4_bytes)]
        if m >= DX_MIN_M:
            plan += [("bf16_dx", dy, w_kn, 2 * n * k), ("xla_nf4_dx", dy, q, nf4_bytes),
                     ("pallas_dx", dy, q, nf4_bytes)]
            cfg = cfg_nt or get_config("forward", m, n, k, BLOCK_SIZE)
            if cfg.dequant_first:
                # the parts of a dequant_first call: the decode alone, and the dot on [N, K] alone
                # (with decode_kn the dot is the bf16 row's)
                plan += [("decode_only", x, q, nf4_bytes)]
                plan += [] if cfg.decode_kn else [("bf16_nt", x, jnp.asarray(w_kn.T), 2 * n * k)]
        for name, a, weight, wbytes in plan:
            try:
                r = _rotations(wbytes, m)
                ws = [(c,) for c in _copies(weight, r)]
                t = device_time(ops[name], a, ws, loop_step_s=loop_step_s)
                row[f"{name}_ms"] = t * 1e3
                del ws
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = _err(e)
        for name in ("xla_nf4", "pallas", "xla_nf4_dx", "pallas_dx"):
            base = row.get("bf16_dx_ms" if name.endswith("_dx") else "bf16_ms")
            if f"{name}_ms" in row and base:
                row[f"{name}_vs_bf16"] = row[f"{name}_ms"] / base
        if "pallas_ms" in row:
            row["pallas_gb_s"] = nf4_bytes / (row["pallas_ms"] * 1e-3) / 1e9
            row["pallas_tflop_s"] = row["flop"] / (row["pallas_ms"] * 1e-3) / 1e12
        if "bf16_ms" in row:
            row["bf16_gb_s"] = 2 * n * k / (row["bf16_ms"] * 1e-3) / 1e9
            row["bf16_tflop_s"] = row["flop"] / (row["bf16_ms"] * 1e-3) / 1e12
        if "pallas_dx_ms" in row:
            row["pallas_dx_tflop_s"] = row["flop"] / (row["pallas_dx_ms"] * 1e-3) / 1e12
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------
# Tuning sweep


def sweep_candidates(op: str, m: int) -> list:
    """Tile configurations to try: the "prmt" byte-permute LUT over tiles and pipelining, and
    the earlier best "tree" configuration of each op as the baseline beside them."""
    from pallas_kernels.tuning import TileConfig as C

    if op == "decode" and m == 1:
        # Round 11 (2026-12-04, run44): ``x_direct`` (x in its own order, a thread's 4 packed
        # words and their 16 x words in one program call; K steps masked past k), without a K
        # split, so that the call is one kernel (no transpose of x, no split-K sum), beside the
        # table's x_planes row; both load a step's scale codes ahead and look them up in the step
        # that uses them (the lookup had waited on the prefetched load in the same iteration).
        # One vector (32 weights) a thread a step took 0.81-0.97x bf16 at K=4096 N=11008 and
        # K=N=4096; two (8 rows, 1024-wide steps, 4 warps) 0.61x / 0.71x (x_planes 0.65x / 0.87x,
        # and 0.73x at K=11008 N=4096, where that x_direct config took 0.84x). At M=4 x_direct
        # took 2.1-2.9x (the dot 1.04-1.10x). Round 12: two vectors a thread over the CTA's
        # rows, K step, warps and split (four vectors need 166-255 registers, offline SASS).
        # Rounds 8-10 are in the tuning table's comments. (block_n, block_k, split_k, warps,
        # prefetch); block_n x block_k/32 / (32 x warps) is the vectors a thread holds a step.
        # Round 12 (run45): the best of 10 configs 0.61-0.62x / 0.72x / 0.78-0.80x bf16 (K=4096
        # N=11008 / K=N=4096 / K=11008 N=4096), x_planes 0.65x / 0.86x / 0.71x. Round 12b
        # (run46), x loaded where it is used, not carried ahead (16 registers a vector: two
        # vectors a thread 96 -> 66 registers), the weights 1-3 steps ahead: 2 rows, 2048-wide
        # steps, 2 warps, one step ahead 0.57x / 0.71x / 0.78x (x_planes 0.64x / 0.85x /
        # 0.69x), so the table gives x_direct K <= N. Round 12c
        # (run47, K=11008 N=4096 only): x_direct with K splits, against x_planes' row there.
        grid = [(2, 2048, 1, 2, 1), (4, 1024, 1, 2, 1), (2, 2048, 2, 2, 1), (2, 2048, 4, 2, 1),
                (4, 1024, 4, 2, 1), (8, 1024, 4, 4, 1)]
        return [C(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=1, lut="prmt", use_dot=False,
                  pair_fma=True, prefetch=pf, x_direct=True) for bn, bk, sk, nw, pf in grid] + [
            C(block_n=8, block_k=256, split_k=8, num_warps=1, num_stages=1, lut="prmt", use_dot=False,
              pair_fma=True, prefetch=1, x_planes=True)]
    if op == "decode":
        # M = 2..16: the tensor-core dot (block_n, block_k, split_k, warps, stages) around the
        # table's row (rounds 4-6 in the tuning table's comments), and (round 10, each call
        # timed whole) fewer splits
        grid = [(128, 128, 8, 4, 3), (128, 64, 16, 4, 3), (64, 128, 8, 4, 3), (128, 128, 16, 8, 3),
                (64, 128, 2, 4, 3), (32, 256, 2, 4, 3), (64, 256, 1, 4, 3), (32, 512, 1, 4, 3)]
        return [C(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=ns, lut="prmt")
                for bn, bk, sk, nw, ns in grid]
    if op in ("forward", "input_grad") and m >= 2048:
        # Round 4 (2026-12-03): ``dequant_first`` with the [K, N] tile decoder (``decode_kn``:
        # the products of a bf16 model, x·W and dy·Wᵀ) over decoder tiles, beside the [N, K]
        # dequantize kernel of round 3's winner. Round 5 (2026-12-03, third session): the
        # warp-specialised Mosaic GPU kernel (`pallas_kernels.nf4_matmul_mgpu`) over stages and
        # walk bands. Their results are in the tuning table's comments.
        base = C(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3, lut="prmt",
                 dequant_first=True)
        # Round 7 (2026-12-04, third session), after dequant_first's dot asks for its result in
        # x's dtype (XLA's autotuner had picked slower GEMMs for a float32 result rounded after;
        # benchmarks/gpu/dot_forms.py, run54): the table's Mosaic GPU row against dequant_first
        # with either decoder, (block_n, block_k, warps) the [K, N] decoder's tiles
        mosaic = C(block_m=256, block_n=64, block_k=128, group_m=16, num_stages=2, lut="prmt", mosaic=True,
                   dequant_first=True, cluster_n=2)
        kn = [base.replace(block_n=bn, block_k=bk, num_warps=nw, decode_kn=True)
              for bn, bk, nw in [(128, 64, 4), (64, 128, 4)]]
        return ([mosaic] if op == "forward" else []) + [base] + kn
    if op in ("forward", "input_grad"):
        # Round 3 (2026-12-03): ``swap_ab`` (the decoded tile as wgmma's register operand; the
        # tiles below compile without spills for sm_90, checked offline with Triton 3.6), the
        # round-2 table row as the baseline, and ``dequant_first`` (dequantize kernel, then
        # cuBLAS). Earlier rounds are in the tuning table's comments.
        if op == "forward":   # block_m x rows, block_n weight rows, block_k the K step
            grid = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
                    (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
            base = C(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3, lut="prmt")
        else:                 # block_m dy rows, block_n the N step, block_k output columns
            grid = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                    (128, 128, 128, 8, 3), (256, 64, 64, 8, 4)]
            base = C(block_m=256, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3, lut="prmt")
        return [base, base.replace(dequant_first=True)] + [
            C(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=nw, num_stages=ns, lut="prmt", swap_ab=True)
            for bm, bn, bk, nw, ns in grid]
    raise ValueError(op)


SWEEP_CASES = [("decode", 4096, 11008, 1), ("decode", 11008, 4096, 1), ("decode", 4096, 4096, 1),
               ("decode", 4096, 11008, 4), ("decode", 11008, 4096, 4), ("decode", 4096, 4096, 4),
               ("decode", 4096, 11008, 16),
               ("forward", 4096, 11008, 4096), ("input_grad", 4096, 11008, 4096),
               ("forward", 4096, 4096, 4096), ("input_grad", 4096, 4096, 4096),
               ("forward", 11008, 4096, 4096), ("forward", 4096, 11008, 2048), ("forward", 4096, 4096, 2048)]
SWEEP_OPS = ("decode", "forward", "input_grad")


def sweep(cases: list[tuple[str, int, int, int]], loop_step_s: float) -> list[dict]:
    """Times every candidate config of each (op, K, N, M) case after checking it against the
    XLA path (relative error <= 1e-2, all finite); prints the best."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rows = []
    for op, k, n, m in cases:
        w_kn, q = make_weight(k, n)
        x = jax.random.normal(jax.random.key(1), (m, n if op == "input_grad" else k), jnp.float32).astype(jnp.bfloat16)
        base_ops = jax_ops(k, n)
        dx = op == "input_grad"
        t_bf16 = device_time(base_ops["bf16_dx" if dx else "bf16"], x,
                             [(c,) for c in _copies(w_kn, _rotations(2 * n * k, m))], loop_step_s=loop_step_s)
        ref = np.asarray(base_ops["xla_nf4_dx" if dx else "xla_nf4"](x, q), np.float32)
        best = None
        for cfg in sweep_candidates(op, m):
            ops = jax_ops(k, n, config_fwd=None if dx else cfg, config_dx=cfg if dx else None)
            fn = ops["pallas_dx" if dx else "pallas"]
            row = dict(op=op, k=k, n=n, m=m, config=dataclasses.asdict(cfg), bf16_ms=t_bf16 * 1e3)
            try:
                got = np.asarray(jax.jit(fn)(x, q), np.float32)
                row["rel_err_vs_xla"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                row["ok"] = bool(np.all(np.isfinite(got))) and row["rel_err_vs_xla"] <= 1e-2
                t = device_time(fn, x, [(c,) for c in _copies(q, _rotations(q.nbytes, m))], loop_step_s=loop_step_s)
                row["ms"] = t * 1e3
                row["vs_bf16"] = t / t_bf16
                if row["ok"] and (best is None or t < best[0]):
                    best = (t, cfg)
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e)
            rows.append(row)
            print(f"  {op:10s} K={k:5d} N={n:5d} M={m:5d} {_cfg_str(cfg)}: "
                  + (f"{row['ms']:.4f} ms ({row['vs_bf16']:.2f}x bf16) err {row['rel_err_vs_xla']:.1e}"
                     if "ms" in row else row["error"][:100]), flush=True)
        if best:
            print(f"BEST {op} K={k} N={n} M={m}: {best[0] * 1e3:.4f} ms = {best[0] / t_bf16:.2f}x bf16 "
                  f"({t_bf16 * 1e3:.4f} ms) with {_cfg_str(best[1])}", flush=True)
    return rows


def best_configs(sweep_rows: list[dict]) -> dict:
    """{(op, m): TileConfig} with the lowest mean ratio to bf16 over the swept shapes (only
    configs that passed their check at every shape)."""
    from pallas_kernels.tuning import TileConfig

    stats: dict = {}
    for r in sweep_rows:
        key = (r["op"], r["m"], json.dumps(r["config"], sort_keys=True))
        ok = r.get("ok", False) and "vs_bf16" in r
        s = stats.setdefault(key, [0.0, 0, True])
        s[0] += r.get("vs_bf16", 0.0)
        s[1] += 1
        s[2] = s[2] and ok
    best: dict = {}
    for (op, m, cfg), (tot, cnt, ok) in stats.items():
        if ok and ((op, m) not in best or tot / cnt < best[(op, m)][0]):
            best[(op, m)] = (tot / cnt, cfg)
    return {key: TileConfig(**json.loads(cfg)) for key, (_, cfg) in best.items()}


def _override(overrides: dict | None, op: str, m: int):
    """The swept config for ``op`` whose M is the smallest >= m (else the largest; for decode,
    not across M=1 and M>1), or None."""
    if not overrides:
        return None
    ms = sorted(mm for (o, mm) in overrides if o == op)
    if not ms:
        return None
    pick = next((mm for mm in ms if mm >= m), ms[-1])
    if op == "decode" and (pick == 1) != (m == 1):
        return None   # M=1 and M>1 take different decode paths: one's sweep says nothing of the other
    return overrides[(op, pick)]


def _cfg_str(c) -> str:
    return (f"bm{c.block_m} bn{c.block_n} bk{c.block_k} sk{c.split_k} w{c.num_warps} s{c.num_stages} "
            f"{c.lut}{' dot' if c.use_dot else ''}{' pair_fma' if c.pair_fma else ''}"
            f"{f' prefetch{int(c.prefetch)}' if c.prefetch else ''}{' swap_ab' if c.swap_ab else ''}"
            f"{' dequant_first' if c.dequant_first else ''}{' decode_kn' if c.decode_kn else ''}"
            f"{' x_planes' if c.x_planes else ''}{' x_direct' if c.x_direct else ''}{' mosaic' if c.mosaic else ''}")


# ------------------------------------------------------------------------------------------
# bitsandbytes / torch worker (a subprocess: its own CUDA context and memory)


def bnb_worker(cases: list[tuple[int, int, int]], bnb_path: str | None) -> list[dict]:
    """Times bnb.matmul_4bit (NF4, DQ, block 64), its input gradient (dequantize + matmul, as
    bitsandbytes' backward does) and torch bf16 matmul with CUDA events over graph replays."""
    if bnb_path:
        sys.path.insert(0, bnb_path)
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    assert torch.cuda.is_available(), "torch sees no CUDA device"
    out = []
    for k, n, m in cases:
        row = dict(k=k, n=n, m=m)
        try:
            torch.manual_seed(0)
            w = (0.02 * torch.randn(n, k, device="cuda")).to(torch.bfloat16)
            packed, qs = F.quantize_4bit(w, blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4")
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            nf4_bytes = packed.numel() * packed.element_size()
            r4 = _rotations(nf4_bytes, m)
            r16 = _rotations(2 * n * k, m)
            packs = [packed] + [packed.clone() for _ in range(r4 - 1)]
            ws = [w] + [w.clone() for _ in range(r16 - 1)]
            timed = {
                "bnb": lambda: [bnb.matmul_4bit(x, p.t(), quant_state=qs) for p in packs],
                "torch_bf16": lambda: [x @ ww.t() for ww in ws],
            }
            if m >= DX_MIN_M:
                timed["bnb_dx"] = lambda: [dy @ F.dequantize_4bit(p, qs).to(torch.bfloat16) for p in packs]
                timed["torch_bf16_dx"] = lambda: [dy @ ww for ww in ws]
            for name, fn in timed.items():
                calls = len(packs) if name.startswith("bnb") else len(ws)
                try:
                    ms, how = _cuda_time(torch, fn)
                    row[f"{name}_ms"] = ms / calls
                    row[f"{name}_timing"] = how
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = _err(e)
            del packs, ws
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        out.append(row)
        torch.cuda.empty_cache()
    return out


def _cuda_time(torch, fn, reps: int = 20) -> tuple[float, str]:
    """Milliseconds a call of ``fn`` (median over replays): a CUDA graph if capture works,
    otherwise back-to-back eager calls between CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    how = "graph"
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
        run()
    except Exception:  # noqa: BLE001 - fall back to eager
        how, run = "eager", fn
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times), how


def run_bnb(cases, bnb_path: str | None, timeout: int = 300) -> tuple[list[dict], str | None]:
    """Runs `bnb_worker` in a subprocess; returns (rows, error or None)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--bnb-worker", json.dumps(cases)]
    if bnb_path:
        cmd += ["--bnb-path", bnb_path]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], "bnb worker timed out"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BNB_JSON ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return [], f"bnb worker failed (rc={p.returncode}): {' | '.join(tail)[:500]}"
    return json.loads(lines[-1][len("BNB_JSON "):]), None


# ------------------------------------------------------------------------------------------
# Output


def _f(v, spec=".4f"):
    return format(v, spec) if isinstance(v, (int, float)) else "   -  "


def _fmt_row(r: dict) -> str:
    s = (f"K={r['k']:5d} N={r['n']:5d} M={r['m']:5d} | bf16 {_f(r.get('bf16_ms'))} | "
         f"xla {_f(r.get('xla_nf4_ms'))} ({_f(r.get('xla_nf4_vs_bf16'), '.2f')}x) | "
         f"pallas {_f(r.get('pallas_ms'))} ({_f(r.get('pallas_vs_bf16'), '.2f')}x)")
    if r["m"] < DX_MIN_M:
        s += f" {_f(r.get('pallas_gb_s'), '.0f')} GB/s"
    else:
        s += (f" {_f(r.get('pallas_tflop_s'), '.0f')} TF/s | dx bf16 {_f(r.get('bf16_dx_ms'))} "
              f"xla {_f(r.get('xla_nf4_dx_ms'))} ({_f(r.get('xla_nf4_dx_vs_bf16'), '.2f')}x) "
              f"pallas {_f(r.get('pallas_dx_ms'))} ({_f(r.get('pallas_dx_vs_bf16'), '.2f')}x)")
    if "decode_only_ms" in r:
        s += f" | parts: decode {_f(r['decode_only_ms'])} + nt dot {_f(r.get('bf16_nt_ms'))}"
    if "bnb_ms" in r:
        s += f" | bnb {_f(r['bnb_ms'])} ({_f(r.get('bnb_vs_bf16'), '.2f')}x)"
    errs = [key for key in r if key.endswith("error")]
    if errs:
        s += " | ERR " + "; ".join(f"{key}={r[key][:80]}" for key in errs)
    if "check_rel_err" in r:
        s += f" | check {r['check_rel_err']:.1e}"
    return s


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only K,N in {QUICK_KN} and M in {QUICK_M}")
    p.add_argument("--check", action="store_true", help="compare each kernel with the XLA path first")
    p.add_argument("--sweep", action="store_true", help="time the tuning candidates instead of the table")
    p.add_argument("--sweep-ops", nargs="+", default=list(SWEEP_OPS), choices=SWEEP_OPS,
                   help="with --sweep: only these ops' cases")
    p.add_argument("--configs-from", default=None, metavar="SWEEP_JSON",
                   help="use the best configs of a --sweep result instead of the tuning table")
    p.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes/torch worker")
    p.add_argument("--bnb-path", default=None, help="folder holding the bitsandbytes package")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_kernels_<date>.json)")
    p.add_argument("--kn", type=int, nargs=2, action="append", default=None, metavar=("K", "N"),
                   help="weight shapes to time instead of the default list (repeatable)")
    p.add_argument("--m", type=int, nargs="+", default=None, help="batch sizes instead of the default list")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test only)")
    p.add_argument("--bnb-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.bnb_worker is not None:
        rows = bnb_worker([tuple(c) for c in json.loads(args.bnb_worker)], args.bnb_path)
        print("BNB_JSON " + json.dumps(rows))
        return None

    global INTERPRET
    INTERPRET = args.interpret
    kns = [tuple(kn) for kn in args.kn] if args.kn else (QUICK_KN if args.quick else KN_SHAPES)
    ms = args.m or (QUICK_M if args.quick else M_VALUES)
    cases = [(k, n, m) for k, n in kns for m in ms]

    # torch first, before this process holds GPU memory
    bnb_rows, bnb_error = ([], "skipped (--no-bnb)") if args.no_bnb or args.sweep else run_bnb(cases, args.bnb_path)
    if bnb_error:
        print(f"bitsandbytes: {bnb_error}", flush=True)

    import jax

    dev = jax.devices()[0]
    today = datetime.date.today().isoformat()
    result = {"benchmark": "bench_kernels" + ("_sweep" if args.sweep else ""), "device": dev.device_kind,
              "jax": jax.__version__, "date": today,
              "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:]),
              "quick": args.quick, "block_size": BLOCK_SIZE, "dq_block_size": DQ_BLOCK_SIZE,
              "reference_ceilings_h100": CEILINGS, "bnb_error": bnb_error}
    try:
        result["loop_overhead_ms"] = loop_overhead() * 1e3
        result["copy_gb_s"] = copy_bandwidth()
        print(f"device {dev.device_kind}, jax {jax.__version__}; empty loop step {result['loop_overhead_ms']:.4f} ms "
              f"(taken off); "
              f"copy {result['copy_gb_s']:.0f} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001
        result["ceiling_error"] = _err(e)

    loop_step_s = result.get("loop_overhead_ms", 0.0) * 1e-3
    if args.sweep:
        # --kn and --m together give every op's cases at those shapes; one of them narrows the
        # default cases
        if args.kn and args.m:
            chosen = [(op, k, n, m) for op in args.sweep_ops for k, n in kns for m in ms]
        else:
            chosen = [c for c in SWEEP_CASES if c[0] in args.sweep_ops
                      and (not args.kn or (c[1], c[2]) in kns) and (not args.m or c[3] in ms)]
        result["rows"] = sweep(chosen, loop_step_s)
        result["best"] = {f"{op} m<={m}": dataclasses.asdict(c) for (op, m), c in best_configs(result["rows"]).items()}
    else:
        overrides = None
        if args.configs_from:
            with open(args.configs_from) as fh:
                overrides = best_configs(json.load(fh)["rows"])
            result["configs_from"] = {f"{op} m<={m}": dataclasses.asdict(c) for (op, m), c in overrides.items()}
            print("configs from sweep:", {f"{op} m<={m}": _cfg_str(c) for (op, m), c in overrides.items()})
        rows = []
        for k, n in kns:
            try:
                rows += bench_shape(k, n, ms, args.check, loop_step_s, overrides)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory making the weight
                rows.append(dict(k=k, n=n, error=_err(e), trace=traceback.format_exc()[-1000:]))
                print(f"K={k} N={n}: {_err(e)}", flush=True)
        by_case = {(r["k"], r["n"], r["m"]): r for r in bnb_rows}
        for r in rows:
            b = by_case.get((r.get("k"), r.get("n"), r.get("m")))
            if b:
                r.update({key: v for key, v in b.items() if key not in ("k", "n", "m")})
                for name, base in (("bnb", "bf16_ms"), ("bnb_dx", "bf16_dx_ms")):
                    if f"{name}_ms" in r and r.get(base):
                        r[f"{name}_vs_bf16"] = r[f"{name}_ms"] / r[base]
        result["rows"] = rows
        print("\nsummary (ms; ratio to XLA cuBLAS bf16)")
        for r in rows:
            if "m" in r:
                print(_fmt_row(r))

    out = args.out or os.path.join("benchmarks", "results",
                                   f"bench_kernels{'_sweep' if args.sweep else ''}_{today}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
