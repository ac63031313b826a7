"""Tile configurations of the NF4 kernels and the table that picks one per shape and device.

A `TileConfig` holds every knob; each kernel reads the fields it uses:

- ``nf4_matmul`` (forward, ``y = x·deq(W)ᵀ``): output tile ``block_m × block_n``, K step
  ``block_k``, ``group_m`` row tiles per L2 group.
- ``nf4_matmul_dx`` (input gradient, ``dx = dy·deq(W)``): output tile ``block_m × block_k``,
  reduction (N) step ``block_n``, ``group_m``.
- both: ``swap_ab`` (compute the transposed product, ``yᵀ = deq(W)·xᵀ``, so that the decoded
  weight tile, which lives in registers, is the left operand of the tensor-core dot: Hopper's
  wgmma takes a register operand only on that side, and otherwise the tile goes through
  shared memory first), ``dequant_first`` (no fused kernel: decode the whole weight with
  `pallas_kernels.quantize.dequantize_blocks_pallas`, then XLA's dot, i.e. cuBLAS; the decoded
  weight exists in device memory for the call, as in bitsandbytes' ``matmul_4bit``), and with
  it ``decode_kn`` (decode into ``[K, N]`` with tiles ``block_n × block_k`` and ``num_warps``
  instead; `pallas_kernels.dequant_first`).
- ``nf4_decode`` (small M): ``block_n`` weight rows a program, K step ``block_k``, ``split_k``
  programs along K (partial sums added by XLA), ``use_dot`` (tensor-core dot on M padded to 16,
  or multiply-and-reduce on the CUDA cores), ``pair_fma`` (on the CUDA-core path with bf16 x:
  sum each 4 bytes' products in packed bf16x2 FMAs before float32; `byte_lut.pair_dot_program`),
  ``prefetch`` (with ``pair_fma``: how many K steps' weight tiles the loop carries ahead of the
  one it multiplies, 0 for none; ``True`` reads as 1), ``x_planes`` (with ``pair_fma``: x comes in
  byte planes, plane j the x words of byte j of each weight word, and a K step is one word tile,
  so that x is loaded in vectors, once for all the rows a thread holds; ``block_k`` a multiple
  of the block size), ``x_direct`` (with ``pair_fma``, instead of ``x_planes``: x in its own
  order, a thread's vector of 4 packed words taking its 16 x words and its block scale in one
  program call, so the call has no transpose of x; ``block_k`` a multiple of the block size,
  not necessarily dividing K: the last step is masked).
- ``mosaic`` (forward): the warp-specialised Mosaic GPU kernel, `pallas_kernels.nf4_matmul_mgpu`
  (the decoded weight as wgmma's register operand): ``block_m`` rows of x a CTA (<= 256),
  ``block_n`` weight rows for each of its two computing warpgroups, ``block_k``,
  ``num_stages`` K steps in flight, ``group_m`` the band width of its persistent grid's walk,
  ``lut`` "prmt" or "prmt32", ``cluster_n`` CTAs of a cluster along N (1 or 2; with 2 a pair
  of CTAs with the same rows of x load them once, by TMA multicast). Where it cannot serve a
  shape, ``dequant_first`` (if set) does.
- all: ``num_warps``, ``num_stages`` (Triton), ``lut`` (see `pallas_kernels._common.LUT_MODES`).

`get_config` looks up ``TABLE`` by device family (from ``jax.devices()[0].device_kind``) and op,
then by the first row whose ``max_m`` is >= M. Each row also records whether the kernel was
measured faster than plain XLA there (`pallas_kernels.supported` declines it otherwise). Re-tune
with ``experiments/bench_kernels.py --sweep``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax

__all__ = ["TileConfig", "Entry", "TABLE", "get_config", "get_entry", "device_family", "DECODE_MAX_M",
           "MOSAIC_COMPUTE_WGS", "MOSAIC_MIN_TILES"]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tuning knobs of one kernel launch (see the module docstring for who reads which)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    lut: str = "tree"
    use_dot: bool = True
    pair_fma: bool = False
    prefetch: int = 0
    swap_ab: bool = False
    dequant_first: bool = False
    decode_kn: bool = False
    x_planes: bool = False
    x_direct: bool = False
    mosaic: bool = False
    cluster_n: int = 1

    def replace(self, **kwargs) -> "TileConfig":
        return dataclasses.replace(self, **kwargs)

    def with_overrides(self, items: Iterable[str]) -> "TileConfig":
        """This config with ``"key=value"`` overrides (tools' command lines): ``lut`` takes the
        text, every other field an int (``use_dot=0``, ``prefetch=2``). ValueError names an
        unknown key."""
        cfg = self
        for item in items:
            key, _, val = item.partition("=")
            if key not in {f.name for f in dataclasses.fields(self)}:
                raise ValueError(f"unknown TileConfig field {key!r} in {item!r}")
            cur = getattr(self, key)
            cfg = cfg.replace(**{key: val if isinstance(cur, str) else type(cur)(int(val))})
        return cfg


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the tuning table: the config for M <= ``max_m`` (and, where set, K <=
    ``max_k_over_n`` * N), and whether the kernel with it was measured faster than the plain
    XLA path (dequantize, then cuBLAS) on this device."""

    max_m: int
    config: TileConfig
    beats_xla: bool
    max_k_over_n: float = float("inf")

    def serves(self, m: int, n: int, k: int) -> bool:
        """Whether this row is the one for a product of this shape (the first that serves is)."""
        return m <= self.max_m and k <= self.max_k_over_n * n


_INF = 1 << 62

# Measured on one H200 (jax 0.11.2; NF4 + double quant, block 64; `experiments/bench_kernels.py
# --sweep`, device-side timing; 2026-12-01), with the "prmt" byte-permute lookup:
# - decode, M=1, K=4096 N=11008: 0.0353 ms = 1.22x XLA bf16 (0.0288 ms); the "tree" kernel of
#   2026-11-23 took 0.0745 ms there. K=11008 N=4096: 1.58x; K=N=4096: 1.76x; M=4 and M=16 at
#   K=4096 N=11008: 1.57x and 1.53x. Plain XLA dequantize->dot takes ~0.21 ms at these M.
#   Best of 11 configs at every shape: 64 weight rows, 128-wide K steps, 8 K splits, 4 warps
#   (a second sweep of 13 configs around it found nothing faster). In the table run
#   (`bench_kernels.py --quick`, same day): M=1 0.0359 ms = 1.36x bf16, bitsandbytes 0.0269 ms;
#   M=16 0.0367 ms, bitsandbytes 0.0703 ms; plain XLA NF4 0.19-0.21 ms.
# - forward, M=4096, K=4096 N=11008: 1.32 ms = 2.51x bf16 (0.529 ms; "tree": 1.87 ms); input
#   gradient 1.32 ms = 2.64x. Plain XLA NF4 is ~1.2x bf16 there, so these stay declined.
# - decode, second sweep of 2026-12-01 (word-pair CUDA-core path, `nf4_decode`): at M=1 the best
#   of 13 configs is 64 rows, 64-wide K steps, 16 K splits, 2 warps, 4 stages, no dot: 0.0284 ms
#   = 1.08x bf16 at K=4096 N=11008 (the dot config 0.0352 ms in the same run) and 0.0129 ms =
#   1.47x at K=N=4096 (dot 0.0156). At M=4 the word path loses (best 2.46x, dot 1.60x). A third
#   round of 8 neighbours found nothing faster. Table run (`--quick`, same session): M=1 0.0284
#   ms = 1.06x bf16, bitsandbytes 0.0279 ms; M=16 0.0361 ms, bitsandbytes 0.0725 ms.
# - 2026-12-02 (second session): every tile load had been single bytes (a floor division in the
#   offsets hid their alignment from Triton; `_common.k_offsets`). With 16-byte loads, round 4
#   (`benchmarks/gpu/run14.sh`, run15.sh): decode M=1, best mean over the three shapes: the word
#   path, 64 rows, 256-wide K steps, 16 splits, 4 warps: 0.0212 ms = 0.81x bf16 at K=4096 N=11008,
#   1.21x at K=N=4096, 0.97x at K=11008 N=4096. M=4: the dot with 128 rows, 128-wide steps, 8
#   splits: 1.11x. M=16: 128 rows, 64-wide steps, 16 splits: 0.0241 ms = 1.02x. Forward M=4096:
#   128x128x64, 4 warps, 1.78x bf16 (was 2.51x); input gradient 256x128 (64-wide), 8 warps,
#   2.36x (the old 256x128x128 tile now needs 233 KB of shared memory and does not launch).
#   Plain XLA NF4 is ~1.2-1.4x at M=4096, so the training rows stay declined.
# - 2026-12-02 (third session), round 6 (`benchmarks/gpu/run17.sh`, run18.sh): the word path with
#   the bf16x2 dot of 4 bytes (`pair_fma`, ~10.8 SASS instructions a packed byte instead of ~18)
#   and the register double buffer (`prefetch`). At M=1 halving the instructions bought little
#   alone (K=4096 N=11008: 0.0214 -> 0.0206 ms in one run); with the double buffer and 4 K splits
#   the best mean over the three shapes is 32 rows, 256-wide steps, 2 warps: 0.76x / 0.80x /
#   1.05x bf16 (K=4096 N=11008 / K=11008 N=4096 / K=N=4096; the old word path's config 0.81x /
#   1.03x / 1.19x). Two runs of the same config differ by up to ~15% at these ~20 us times. M=4:
#   the dot with 64-wide steps and 16 splits, 1.00-1.02x (the word path with pair_fma 1.18x at
#   best; with the double buffer it spills and takes ~1 ms).
# - Same session, round 7 (`benchmarks/gpu/run20.sh`): the pair dot reads the packed weight as
#   int32 words (the double-buffered uint8 tiles had been unpacked a byte a register: 255
#   registers, now 96). Best mean at M=1: 32 rows, 256-wide steps, 8 splits, 2 warps, prefetch:
#   0.70x / 0.91x / 1.06x bf16 (K=4096 N=11008 / K=11008 N=4096 / K=N=4096); the round-6 row
#   (4 splits) measured 0.77x / 1.17x / 1.21x in the same run.
# - 2026-12-03, round 8 (`benchmarks/gpu/run21.sh`): decode M=1 with the register pipeline 2-4
#   steps deep and 1-4 K splits: every deeper config was slower (0.73-1.19x bf16 at K=4096
#   N=11008) than the table's row (one step ahead, 8 splits: 0.65x in the same run), which stays.
#   Training, round 3 (run21, M=4096): ``swap_ab`` (the decoded tile as wgmma's register
#   operand, spill-free tiles) was slower than the round-2 fused row at every tile (forward
#   2.37-3.58x bf16 against 1.77-1.92x; input gradient 2.34-4.49x against 2.02-2.22x);
#   ``dequant_first`` took 1.08-1.23x (forward) and 1.09-1.11x (input gradient). In the table
#   run (run22, with plain XLA and bitsandbytes) dequant_first beats plain XLA at every M from
#   64 up (e.g. K=4096 N=11008: M=64 2.04x against 6.53x; M=4096 1.14x / dx 1.09x against 1.37x /
#   1.26x), so the training rows are dequant_first and marked faster than XLA; their tiles are
#   the fused kernel's, used only where the dequantize kernel cannot serve (float32 operands).
#   Round 4 (run24): ``decode_kn`` (decode into [K, N], so that the dots are the bf16 model's)
#   against the [N, K] dequantize kernel in the same sweep, M=4096: forward 1.22x / 1.05x bf16
#   against 1.25x / 1.10x (K=4096 N=11008 / K=N=4096), input gradient 1.07x / 1.03x against
#   1.07x / 1.09x; its decode alone is slower (0.042 against 0.034 ms at 4096x11008). A 0-5%
#   edge in one sweep is inside the run-to-run spread, and the training step was measured on
#   the [N, K] decoder, so the rows keep it; decode_kn stays a knob for the next sweep.
# - 2026-12-03 (second session): Nsight Compute on the M=1 row (run25, K=4096 N=11008): 19.9 us,
#   24% of DRAM bandwidth, L1 67% busy, 0.47 instructions issued a cycle per scheduler, 31%
#   theoretical occupancy (96 registers); each weight word cost four scalar x loads. Round 9
#   (run26): ``x_planes`` (x in byte planes, one word tile a K step, x loaded in 16-byte vectors
#   once for all the rows a thread holds): the same tile with x_planes takes 0.59x / 0.69x /
#   0.86x bf16 (K=4096 N=11008 / K=11008 N=4096 / K=N=4096) against 0.72x / 0.93x / 1.03x for
#   the round-8 row in the same sweep; Nsight Compute: L1 27% busy, DRAM 28%, 168 registers.
#   Without a split (16 rows, 1024-wide steps, 4 warps) 0.60x / 1.66x / 0.83x. Round 9b (run27,
#   12 x_planes configs around it): best mean 16 rows, 256-wide steps, 8 splits, 1 warp, one step
#   ahead: 0.58x / 0.69x / 0.84x (32 rows and 2 warps 0.59x / 0.69x / 0.85x; the round-8 row
#   0.71x / 0.93x / 1.08x). Table run (same call, bitsandbytes 0.50 beside it): M=1 0.57x /
#   0.68x / 0.83x bf16, bitsandbytes 0.91x / 0.99x / 1.25x. Round 9c (run28): the table words as
#   one register a thread (168 -> 86-128 registers), best mean 8 rows, 1 warp.
#   Those timings (and every decode timing before them) were too kind to split-K: the timing
#   loop read one element of each output, and XLA shrank the split-K sum to that element and
#   computed x's planes (a 2.3 us transpose kernel, Nsight Compute) once for all calls
#   (`benchmarks/gpu/loop_hlo.py`). Round 10 (run29) times each call whole (its outputs pass a
#   barrier, each call has its own x): best mean 8 rows, 256-wide steps, 8 splits, 1 warp, one
#   step ahead, x_planes: 0.64x / 0.65x / 0.87x bf16 (the round-8 row without x_planes 0.74x /
#   0.96x / 0.93x; no split, 1024-wide steps: 0.73x / 2.0x / 1.0x). Table run (same call,
#   bitsandbytes beside it): M=1 0.66x / 0.66x / 0.90x bf16 (17.3 / 17.1 / 9.4 us),
#   bitsandbytes 0.91x / 0.95x / 1.03x; M=4 and 16 (the dot rows) 0.99-1.11x, bitsandbytes
#   2.3-3.5x. Where x comes from a fusion (a norm), the planes' transpose can join it.
# - 2026-12-03 (third session): the forward as a warp-specialised Mosaic GPU kernel
#   (`pallas_kernels.nf4_matmul_mgpu`, ``mosaic``; benchmarks/gpu/mgpu_probe.py, runs 30-34, 37):
#   the decoded weight as wgmma's register operand, 256 rows of x a CTA, 64 weight rows a
#   computing warpgroup, 64-wide K steps, 4 stages: 1.02-1.25x bf16 at M=2048-4096 (a decoded
#   tile through shared memory: 1.29-1.63x; the wgmma left in flight over the next step's
#   decode: wrong results, runs 34 and 37). Round 5 (run35, against dequant_first in one
#   sweep): best mean at M=2048 the Mosaic GPU kernel (1.13x / 1.17x at K=4096 N=11008 /
#   K=N=4096, dequant_first 1.23x / 1.21x); at M=4096 dequant_first with the [K, N] decoder
#   (1.16x mean, the Mosaic GPU configs 1.19-1.20x, dequant_first [N, K] 1.17x). So the kernel
#   takes 1024 < M <= 2048 (M=1024 unmeasured for it) and dequant_first keeps the rest. Table
#   run (run36): M=2048 1.13-1.20x bf16, bitsandbytes 1.19-1.30x; M=1024 and 4096 (dequant_first)
#   1.18-1.35x.
# - 2026-12-04 (`benchmarks/gpu/mgpu_probe.py`, runs 38-39): the Mosaic GPU kernel with clusters of
#   two CTAs along N, which load their shared tile of x once by TMA multicast (``cluster_n=2``),
#   and 128-wide K steps (2 stages: 3 do not fit in shared memory with 256 rows of x). Run 39,
#   ratios to bf16 at K=4096 N=11008 / K=N=4096 / K=11008 N=4096: the kept row (group_m=16)
#   1.16x / 1.16x / 1.17x at M=2048 (the previous row 1.24x / 1.23x / 1.15x in the same run),
#   1.05x / 1.13x / 1.02x at M=4096 (dequant_first 1.18x / 1.16x / 1.10x), 1.07x at M=2048,
#   K=N=8192 (the previous row 1.14x), 1.15x at M=8192, K=4096 N=11008 (dequant_first 1.23x); at
#   M=1024 the row without group_m=16 1.07x / 1.16x / 1.14x (dequant_first 1.29-1.40x). Without
#   clusters the same tiles average 1.14x over M >= 2048, with them 1.11-1.13x; 128-row CTAs
#   1.38-1.68x; the exact "prmt32" decode 1.26-1.47x. Two runs of one config differ by up to
#   10% (K=4096 N=11008, M=2048: 1.09x in run 38, 1.21x in run 39). At M=512 it lost to
#   dequant_first (1.51x / 1.97x / 2.04x against 1.57x / 1.72x / 1.56x, run40). So the kernel
#   takes every M above 512 (with at least MOSAIC_MIN_TILES tiles). Table run (run41, bitsandbytes
#   beside it): 1.09-1.11x at M=2048, 1.11-1.19x at 4096, 1.05-1.08x at 8192, 1.06x at M=1024
#   K=4096 N=11008; bitsandbytes 1.01-1.22x. A training step asks for float32 products, which
#   the kernel writes as two bf16 parts: the step was 0.5-6% slower on it than on dequant_first
#   (run42), so float32 requests keep dequant_first (`pallas_kernels._training_product`).
# - 2026-12-04 (second session; `benchmarks/gpu/run44.sh`-run50.sh, decode rounds 11-12c): the
#   decode kernel's ``x_direct`` path (x in its own order, a thread's 4 packed words and their 16
#   x words in one program call, K steps masked past k, no K split: the call is one kernel,
#   without x_planes' transpose of x and split-K sum), and both paths now load a step's scale
#   codes ahead and look them up in the step that uses them. Round 12b, ratios to bf16 at K=4096
#   N=11008 / K=N=4096 / K=11008 N=4096: 2 rows, 2048-wide steps, 2 warps, one step ahead
#   (two vectors a thread, 66 registers) 0.57x / 0.71x / 0.78x; the x_planes row 0.64x / 0.85x /
#   0.69x in the same sweep; one vector a thread 0.80-0.97x; x carried ahead in registers (96
#   registers) 0.61-0.62x / 0.72x / 0.80x at best (round 12). So x_direct takes K <= N and
#   x_planes keeps the long-K shapes. At M=4 x_direct took 2.1-2.9x (the dot row 1.04-1.10x).
#   Table run (run46, the round's best mean at all three shapes): 0.69x / 0.62x / 0.78x (K=N=4096
#   / K=4096 N=11008 / K=11008 N=4096). With these rows (run48, bitsandbytes beside it): 0.68x /
#   0.54x / 0.69x and 0.68x at K=N=8192 (run47: 0.68x / 0.58x / 0.70x), bitsandbytes 0.85-1.04x;
#   run50 (x_direct's table operands in the weight tile's layout) 0.70x / 0.57x / 0.71x / 0.65x.
# - 2026-12-04 (third session): dequant_first's dot had asked XLA for a float32 result and rounded
#   it after; XLA fused the rounding, but its GEMM autotuner picked slower kernels for that form
#   than for a bf16 result (benchmarks/gpu/dot_forms.py, run54: 0.97-1.20x the bf16 model's
#   product, mean 1.08x, against 0.88-1.06x, mean 0.99x; the same float32 accumulation). With the bf16 form, round 7
#   (run55, ratios at K=N=4096 / K=4096 N=11008 / K=11008 N=4096): at M=2048 the Mosaic GPU row
#   1.08x / 1.13x / 1.16x, dequant_first 1.10x / 1.09x / 1.14x (its [K, N] decoder 1.08-1.22x);
#   at M=4096 the Mosaic GPU row 1.08x / 1.04x / 1.09x, dequant_first 1.07x / 1.00x / 1.04x; the
#   input gradient (dequant_first) 1.15x / 1.14x / 1.14x at M=2048, 1.06x / 1.02x / 1.05x at
#   M=4096 ([K, N] decoder: no better on the mean). So the kernel keeps 512 < M <= 2048 and
#   dequant_first takes M > 2048 again. Table run (run56, four shapes, bitsandbytes beside it):
#   forward 1.06-1.13x at M=2048 (the kernel), 1.00-1.15x at 4096-8192; input gradient
#   1.06-1.18x at M=2048, 0.98-1.09x at 4096-8192; bitsandbytes 1.04-1.40x / 1.01-1.28x. Round 13 of the decode (run53): a program taking 2-8 row
#   blocks in turn, its loads ahead running on into the next (a grid of one wave), was slower
#   everywhere (0.65-1.00x at K=4096 N=11008 against the table row's 0.57x) and is not kept.
# The training rows' decode-then-cuBLAS config (its tiles serve the fused Triton kernel, used
# where dequant_first cannot serve a dtype).
_DEQUANT_FIRST_FWD = TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3,
                                lut="prmt", dequant_first=True)
_HOPPER = {
    "decode": (
        # M=1, K <= N: x_direct, one kernel a call (runs 44-46); a long K over few rows keeps
        # x_planes' 8 K splits
        Entry(1, TileConfig(block_n=2, block_k=2048, split_k=1, num_warps=2, num_stages=1, lut="prmt",
                            use_dot=False, pair_fma=True, prefetch=1, x_direct=True), True, max_k_over_n=1.0),
        Entry(1, TileConfig(block_n=8, block_k=256, split_k=8, num_warps=1, num_stages=1, lut="prmt",
                            use_dot=False, pair_fma=True, prefetch=1, x_planes=True), True),
        Entry(4, TileConfig(block_n=128, block_k=64, split_k=16, num_warps=4, num_stages=3, lut="prmt",
                            use_dot=True), True),
        Entry(16, TileConfig(block_n=128, block_k=64, split_k=16, num_warps=4, num_stages=3, lut="prmt",
                             use_dot=True), True),
    ),
    "forward": (
        Entry(64, TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3, lut="prmt",
                             dequant_first=True), True),
        Entry(512, _DEQUANT_FIRST_FWD, True),
        # the Mosaic GPU kernel, measured faster than dequant_first at M=1024 (run39) and level
        # with it at 2048 (run55); shapes it cannot serve (M not a multiple of 256, N of 256) fall
        # back to dequant_first
        Entry(2048, TileConfig(block_m=256, block_n=64, block_k=128, group_m=16, num_stages=2, lut="prmt",
                               mosaic=True, dequant_first=True, cluster_n=2), True),
        # decode, then cuBLAS with a bf16 result: 1.00-1.07x at M=4096 (run55)
        Entry(_INF, _DEQUANT_FIRST_FWD, True),
    ),
    "input_grad": (
        Entry(64, TileConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3, lut="prmt",
                             dequant_first=True), True),
        Entry(_INF, TileConfig(block_m=256, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3,
                               lut="prmt", dequant_first=True), True),
    ),
}

# Every device family uses these entries: measured on the H200; the H100 is the same chip with
# slower memory, and was last measured on 2026-11-23, before the "prmt" lookup.
TABLE: dict[str, dict[str, tuple[Entry, ...]]] = {
    "default": _HOPPER,
    "H100": _HOPPER,
    "H200": _HOPPER,
}

# Largest M that the decode kernel serves; above it matmul_nt uses the forward kernel.
DECODE_MAX_M = 16

# Computing warpgroups a CTA of the Mosaic GPU kernel; each takes ``block_n`` weight rows.
MOSAIC_COMPUTE_WGS = 2

# The fewest output tiles (CTAs' ``block_m x MOSAIC_COMPUTE_WGS*block_n``) for which `get_config` keeps a ``mosaic``
# row. The persistent kernel runs a CTA a tile: in a training step (run40) the K/V projections of
# the TinyLlama shape (M=4096, N=256: 32 tiles) ran on a quarter of the H200's 132 SMs, where
# dequant_first's cuBLAS call spreads the product over all of them; at 128 tiles (M=1024, K=N=4096)
# the kernel took 1.16x bf16 against dequant_first's 1.33x (run39).
MOSAIC_MIN_TILES = 128


def device_family(device_kind: str | None = None) -> str:
    """"H100", "H200", or "default", from a device kind string (default: the first device's)."""
    if device_kind is None:
        device_kind = _first_device_kind()
    for fam in ("H100", "H200"):
        if fam in device_kind:
            return fam
    return "default"


@functools.cache
def _first_device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except Exception:  # no backend initialised (should not happen, but tuning must not fail)
        return ""


def get_config(op: str, m: int, n: int, k: int, block_size: int,
               device_kind: str | None = None) -> TileConfig:
    """The tuned `TileConfig` for ``op`` ("forward", "decode", "input_grad") at this shape.

    ``block_k`` is reduced to a power of two that divides ``k`` (always possible down to
    ``min(block_k, block_size)`` since ``k % block_size == 0``).
    """
    entry = get_entry(op, m, n, k, device_kind)
    cfg = entry.config
    if cfg.mosaic and (m // cfg.block_m) * (n // (MOSAIC_COMPUTE_WGS * cfg.block_n)) < MOSAIC_MIN_TILES:
        cfg = cfg.replace(mosaic=False)   # too few tiles to fill the device: dequant_first serves it
    return fit_block_k(cfg, k, block_size)


def get_entry(op: str, m: int, n: int, k: int, device_kind: str | None = None) -> Entry:
    """The tuning-table `Entry` (config and measured speed verdict) for ``op`` at this shape."""
    rows = TABLE[device_family(device_kind)].get(op)
    if rows is None:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_HOPPER)}")
    entry = next((e for e in rows if e.serves(m, n, k)), None)
    if entry is None:
        raise ValueError(f"no {op!r} configuration for M={m} (the largest is M={rows[-1].max_m})")
    return entry


def fit_block_k(cfg: TileConfig, k: int, block_size: int) -> TileConfig:
    """``cfg`` with ``block_k`` halved until it divides ``k`` (it never goes under the
    sub-block ``min(block_k, block_size)``, which divides ``k``); for ``x_direct``, which masks
    its last K step, ``block_k`` rounded up to whole blocks instead, and halved while half of it
    still covers ``k``."""
    bk = cfg.block_k
    if cfg.x_direct:
        bk = -(-bk // block_size) * block_size
        while bk // 2 >= k and (bk // 2) % block_size == 0:   # no step wider than K needs
            bk //= 2
        return cfg if bk == cfg.block_k else cfg.replace(block_k=bk)
    while k % bk and bk > min(cfg.block_k, block_size):
        bk //= 2
    return cfg if bk == cfg.block_k else cfg.replace(block_k=bk)
