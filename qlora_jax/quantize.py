"""Blockwise 4-bit quantization of arrays and parameter pytrees (NF4, FP4, Int4), with double
quantization of the block scales, byte-compatible with bitsandbytes.

Storage layout (the same bytes bitsandbytes writes, for the same float32 input):

- The array is flattened in row-major order and cut into blocks of ``block_size`` elements; the
  last block may be partial. Each block gets ``absmax = max |x|`` (float32).
- Each element is scaled by ``x * (1 / absmax)`` (a multiply by the float32 reciprocal, as
  bitsandbytes does) and encoded to the nearest code of the format (see `qlora_jax.formats`).
- Codes are packed two a byte, the first element in the HIGH nibble. An odd count is padded with
  one zero element (its code is the format's zero code).
- Double quantization (``double_quant=True``): ``offset = mean(absmax)``; ``absmax - offset`` is
  quantized blockwise (``dq_block_size`` values a block, default 256) to 8-bit codes of the signed
  dynamic map, with one float32 scale (``absmax_scale``) per block. Decoding:
  ``absmax[i] = dynamic_map[code[i]] * absmax_scale[i // dq_block_size] + offset``.

Known divergences from bitsandbytes (documented, and tested to decode to the same values):

- All-zero blocks: bitsandbytes' CUDA kernel computes ``0 * (1/0) = NaN`` and writes code 0
  (byte 0x00 for NF4); its portable backend clamps absmax to 1e-38 and writes the zero code
  (0x77 for NF4). We write the zero code, like the portable backend, because it decodes to an
  exact 0 even after double quantization turns the block's absmax 0 into a tiny non-zero value.
- The double-quantization offset is the float32 mean of the absmax values. bitsandbytes takes it
  with a float32 torch reduction whose summation order depends on the device (CUDA vs CPU) and
  the CPU's vector width; we take a compensated float32 sum (`_exact_mean`), which can differ
  from either by a few ulp. Everything downstream of the offset is byte-identical given the same
  offset (`double_quantize` takes the offset as an argument so that can be checked).
- bitsandbytes' CPU C++ 8-bit kernel rounds to one of 65,536 bins first, so within ~1.5e-5 of a
  midpoint it can pick another code (0.2% of codes in our tests); we follow the exact midpoint
  rule of its CUDA kernel and portable backend.
- bitsandbytes' portable backend divides the partial last block by its absmax (instead of
  multiplying by the reciprocal) and stores 1e-38 as the absmax of an all-zero partial block;
  we use the reciprocal (as its CUDA kernel does) and store 0. Values exactly at a midpoint after
  one rounding but not the other can then get neighbouring codes.
- Subnormal inputs are flushed to zero by XLA, so an FP4 value below 2**-126 encodes as +0.
- bitsandbytes' C++/CUDA decoders return -0.0 for FP4 code 8; our table has +0.0 there (as its
  Python table does). Equal values, different sign bit.
tests/test_bnb_exact.py checks all of these against the real library.

Backends (``backend=`` of `quantize` and `dequantize`): "xla" is the plain XLA code below;
"pallas" runs the single-pass kernels of `pallas_kernels.quantize` (bf16/f16 data whose size is a
multiple of the block size; the same bytes and values bit for bit; compiled on a GPU, run in the
Pallas interpreter elsewhere, which is for tests only); "auto" (default) takes the kernels for a
concrete bf16/f16 array on one GPU device and XLA everywhere else, including under ``jax.jit``
(where the placement, and a possible sharding, are unknown: pass ``backend="pallas"`` there to
get the kernel). With "pallas", double quantization runs its second level (centre, block
scales, 8-bit encode) in one kernel too (`pallas_kernels.quantize.double_quantize_pallas`), the
same bytes; its offset, the mean, is `_exact_mean` in XLA on every backend. The kernels are
imported lazily, so this module works without Pallas GPU support.

Linear weights: a torch ``Linear.weight`` is ``[out, in]`` and a Flax kernel is ``[in, out]``.
`quantize` always works in the element order of the array it is given; quantize
``kernel.T`` (see `quantize_linear_kernel`) to get the bytes bitsandbytes writes for that layer,
with blocks running along the input dimension.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import formats as _formats

__all__ = [
    "QuantizedArray",
    "QuantPolicy",
    "quantize",
    "dequantize",
    "double_quantize",
    "decode_absmax",
    "quantize_linear_kernel",
    "quantize_tree",
    "dequantize_tree",
    "footprint",
    "Footprint",
    "is_quantized",
    "tree_path_str",
    "BACKENDS",
]

# Where `quantize`, `dequantize` and the matmuls of `qlora_jax.ops` run (see the module docstrings).
BACKENDS = ("auto", "xla", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A blockwise 4-bit quantized array (a pytree node; metadata is static).

    Array fields (pytree children):
      codes: uint8 [ceil(n / 2)], packed codes, first element in the high nibble.
      absmax: float32 [n_blocks] block scales, or uint8 [n_blocks] 8-bit codes of
        ``absmax - absmax_offset`` when double-quantized.
      absmax_scale: float32 [ceil(n_blocks / dq_block_size)] second-level scales, or None.
      absmax_offset: float32 [] mean offset of the first-level scales, or None.
    Static fields:
      shape: logical shape of the original array.
      dtype: name of the original dtype (``dequantize`` returns it by default).
      format: "nf4", "fp4", "fp4_e3m0" or "int4".
      block_size: elements a block (32..4096, a power of two).
      dq_block_size: scales a second-level block, or None without double quantization.
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None
    absmax_offset: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    format: str = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    dq_block_size: int | None = dataclasses.field(metadata=dict(static=True))

    @property
    def size(self) -> int:
        """Number of logical elements."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def double_quant(self) -> bool:
        return self.dq_block_size is not None

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes + all scale data)."""
        return sum(int(a.size) * a.dtype.itemsize for a in self.arrays())

    def arrays(self) -> list[jax.Array]:
        """The stored arrays, in field order, skipping absent ones."""
        return [a for a in (self.codes, self.absmax, self.absmax_scale, self.absmax_offset)
                if a is not None]

    def metadata(self) -> dict[str, Any]:
        """The static fields as a JSON-serialisable dict."""
        return dict(shape=list(self.shape), dtype=self.dtype, format=self.format,
                    block_size=self.block_size, dq_block_size=self.dq_block_size)

    def validate(self, where: str = "") -> None:
        """Raises ValueError if the stored arrays do not fit the metadata (a corrupt/mismatched tree)."""
        at = f" at {where!r}" if where else ""
        _check_format_args(self.format, self.block_size, self.dq_block_size, where)
        expect = {"codes": ((-(-self.size // 2),), np.uint8)}
        if self.double_quant:
            expect["absmax"] = ((self.n_blocks,), np.uint8)
            expect["absmax_scale"] = ((-(-self.n_blocks // self.dq_block_size),), np.float32)
            expect["absmax_offset"] = ((), np.float32)
        else:
            expect["absmax"] = ((self.n_blocks,), np.float32)
            for name in ("absmax_scale", "absmax_offset"):
                if getattr(self, name) is not None:
                    raise ValueError(f"quantized array{at}: {name} present without double quantization")
        for name, (shape, dtype) in expect.items():
            a = getattr(self, name)
            if a is None:
                raise ValueError(f"quantized array{at}: {name} is missing")
            if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
                raise ValueError(
                    f"quantized array{at}: {name} has shape {tuple(a.shape)} and dtype {a.dtype}, "
                    f"expected {shape} {np.dtype(dtype).name} for shape {self.shape} with "
                    f"block_size={self.block_size}, dq_block_size={self.dq_block_size}")

    def __repr__(self) -> str:
        dq = f", dq_block_size={self.dq_block_size}" if self.double_quant else ""
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, format={self.format!r}, "
                f"block_size={self.block_size}{dq})")


def is_quantized(x: Any) -> bool:
    """True for a `QuantizedArray`."""
    return isinstance(x, QuantizedArray)


def _check_format_args(format: str, block_size: int, dq_block_size: int | None, where: str = "") -> None:
    at = f" for {where!r}" if where else ""
    _formats.get_format(format)
    if not isinstance(block_size, (int, np.integer)) or block_size not in _formats.BLOCK_SIZES:
        raise ValueError(f"unsupported block_size {block_size!r}{at}; expected one of {_formats.BLOCK_SIZES}")
    if dq_block_size is not None and (
            not isinstance(dq_block_size, (int, np.integer)) or dq_block_size not in _formats.DQ_BLOCK_SIZES):
        raise ValueError(
            f"unsupported dq_block_size {dq_block_size!r}{at}; expected one of {_formats.DQ_BLOCK_SIZES}")


def _check_input(x: Any, where: str) -> None:
    at = f" {where!r}" if where else ""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"quantize: leaf{at} is {type(x).__name__}, expected a floating-point array")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"quantize: leaf{at} has dtype {dtype}; only floating-point arrays can be quantized")
    if math.prod(x.shape) == 0:
        raise ValueError(f"quantize: leaf{at} is empty (shape {tuple(x.shape)})")


def _encode(scaled: jax.Array, fmt: _formats.Format) -> jax.Array:
    """Nearest code for scaled values in [-1, 1]: rank among the sorted midpoints, ties go lower."""
    # 15 fused compares beat a searchsorted on the GPU (one elementwise pass, no [n, 15] temp).
    rank = sum((scaled > jnp.float32(m)).astype(jnp.uint8) for m in fmt.midpoints)
    if fmt.sorted_is_identity:
        return rank.astype(jnp.uint8)
    return _lookup(jnp.asarray(fmt.order), rank)


def _lookup(table: jax.Array, idx: jax.Array) -> jax.Array:
    """table[idx] for a small constant table, written as a select chain (no gather)."""
    out = jnp.full(idx.shape, table[0], table.dtype)
    for i in range(1, table.shape[0]):
        out = jnp.where(idx == i, table[i], out)
    return out


def _blockwise_absmax(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Pads ``flat`` (float32 [n]) with zeros to whole blocks; returns (blocks [nb, bs], absmax [nb])."""
    n = flat.shape[0]
    nb = -(-n // block_size)
    blocks = jnp.pad(flat, (0, nb * block_size - n)).reshape(nb, block_size)
    return blocks, jnp.max(jnp.abs(blocks), axis=1)


def _scale(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    # x * (1/absmax), clamped to [-1, 1]. A block whose absmax is 0 (or subnormal, which XLA
    # flushes to 0 anyway) scales to 0 and gets the zero code, as bitsandbytes' portable backend
    # does for all-zero blocks.
    normal = absmax >= jnp.float32(2.0 ** -126)
    inv = jnp.where(normal, _reciprocal(jnp.where(normal, absmax, 1.0)), 0.0)
    return jnp.clip(blocks * inv[:, None], -1.0, 1.0)


def _reciprocal(a: jax.Array) -> jax.Array:
    """Correctly rounded float32 ``1 / a`` for positive normal float32 ``a``.

    XLA on NVIDIA GPUs lowers float32 division to ``div.full.f32`` (up to 2 ulp off), which would
    flip a code now and then and break byte equality with bitsandbytes (and with our own CPU
    path). Scale values are few (one a block), so we correct the approximate reciprocal exactly:
    among r0 - 2 ulp .. r0 + 2 ulp pick the one with the smallest |a*r - 1|, the product taken
    exactly in 24-bit integer limbs.
    """
    a = a.astype(jnp.float32)
    r0 = jnp.float32(1) / a
    abits = jax.lax.bitcast_convert_type(a, jnp.int32)
    ea = (abits >> 23) & 0xFF
    am = (abits & 0x7FFFFF) | 0x800000
    best_r, best_hi, best_lo = r0, None, None
    r0bits = jax.lax.bitcast_convert_type(r0, jnp.int32)
    for k in (-2, -1, 0, 1, 2):
        rbits = r0bits + k
        r = jax.lax.bitcast_convert_type(rbits, jnp.float32)
        er = (rbits >> 23) & 0xFF
        rm = (rbits & 0x7FFFFF) | 0x800000
        hi, lo = _abs_residual(am, rm, 300 - ea - er)
        if best_hi is None:
            best_r, best_hi, best_lo = r, hi, lo
        else:
            better = (hi < best_hi) | ((hi == best_hi) & (lo < best_lo))
            best_r = jnp.where(better, r, best_r)
            best_hi = jnp.where(better, hi, best_hi)
            best_lo = jnp.where(better, lo, best_lo)
    return best_r


def _abs_residual(am: jax.Array, rm: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|am * rm - 2**t| as (hi, lo) in base 2**24, shifted to a common scale for comparison.

    am, rm are 24-bit mantissas (int32); a*r = am*rm * 2**(ea+er-300), so the distance of a*r from
    1 in units of 2**(ea-300-er_ref) is |am*rm - 2**t| * 2**(er - er_ref). Candidates differ in
    er by at most one; we weight by 2**(47 - t) (t is 46..48 for every sensible candidate), which
    is the same factor up to the shared exponent of a.
    """
    ah, al = am >> 12, am & 0xFFF
    rh, rl = rm >> 12, rm & 0xFFF
    mid = ah * rl + al * rh                      # < 2**25
    lo = al * rl + ((mid & 0xFFF) << 12)         # < 2**25
    hi = ah * rh + (mid >> 12) + (lo >> 24)      # P = hi * 2**24 + lo, hi < 2**24
    lo = lo & 0xFFFFFF
    t = jnp.clip(t, 24, 48)
    hi_t = jnp.left_shift(jnp.int32(1), t - 24)   # 2**t = hi_t * 2**24
    pos = hi >= hi_t
    d_hi = jnp.where(pos, hi - hi_t, jnp.where(lo > 0, hi_t - hi - 1, hi_t - hi))
    d_lo = jnp.where(pos, lo, jnp.where(lo > 0, 0x1000000 - lo, 0))
    # Bring to a common scale: weight 2**(47 - t) (t = 46 -> x2, 47 -> x1, 48 -> /2 exactly
    # enough: halving keeps the order since we compare values of the same magnitude).
    up = t <= 46
    down = t >= 48
    d_lo2 = jnp.where(up, d_lo * 2, d_lo)
    d_hi2 = jnp.where(up, d_hi * 2 + (d_lo2 >> 24), d_hi)
    d_lo2 = d_lo2 & 0xFFFFFF
    # For t = 48 scale the other way round: multiply everything else by 2 instead is equivalent;
    # represent /2 as keeping the low bit in lo's extra precision: lo' = (hi&1)*2**23 + lo/2.
    d_lo3 = jnp.where(down, ((d_hi2 & 1) << 23) | (d_lo2 >> 1), d_lo2)
    d_hi3 = jnp.where(down, d_hi2 >> 1, d_hi2)
    return d_hi3, d_lo3


def double_quantize(absmax: jax.Array, dq_block_size: int = 256,
                    offset: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantizes first-level block scales to 8 bits (the second level of double quantization).

    Args:
      absmax: float32 [n_blocks] first-level scales.
      dq_block_size: scales a second-level block.
      offset: float32 [] mean to subtract; by default the exact mean of ``absmax``.
    Returns:
      (codes uint8 [n_blocks], absmax_scale float32 [ceil(n_blocks / dq_block_size)], offset float32 []).
    """
    absmax = jnp.asarray(absmax, jnp.float32)
    if offset is None:
        offset = _exact_mean(absmax)
    # The barrier pins the offset to its stored float32 value: without it XLA (CPU) fuses the
    # subtraction with the mean's computation and centres on an unrounded offset.
    offset = jax.lax.optimization_barrier(jnp.asarray(offset, jnp.float32))
    centred = absmax - offset
    blocks, scale = _blockwise_absmax(centred, dq_block_size)
    scaled = _scale(blocks, scale).reshape(-1)[: absmax.shape[0]]
    codes = jnp.searchsorted(jnp.asarray(_formats.dynamic_map_midpoints()), scaled, side="left",
                             method="compare_all").astype(jnp.uint8)  # one code a block: cheap
    return codes, scale, offset


def _exact_mean(x: jax.Array) -> jax.Array:
    """Mean of float32 [n] by a compensated (double-float) reduction: each partial sum carries
    its rounding error (Knuth's TwoSum). Float64 would need x64 mode, which we do not force on users.

    On random data of weight-like scales it equals the correctly rounded mean (float64 sum, one
    rounding). It is NOT order-independent in general: XLA:CPU lets LLVM reassociate the
    reduction's adds, which can cancel the compensation. 1M copies of 0.1 then give 0.0999942,
    and a shuffled ``[2**24, 1, 1000 x 2**-25]`` changes in the last bits. So stored offsets can
    differ between backends on such inputs. Whatever the offset, the bytes after it follow from it
    exactly (see `double_quantize`), and decoding uses the stored offset.
    """
    x = x.astype(jnp.float32)

    def reducer(a, b):
        (s1, c1), (s2, c2) = a, b
        s = s1 + s2
        bb = s - s1
        err = (s1 - (s - bb)) + (s2 - bb)
        return s, c1 + c2 + err

    s, c = jax.lax.reduce((x, jnp.zeros_like(x)), (jnp.float32(0), jnp.float32(0)), reducer, (0,))
    # The barrier keeps XLA from rewriting ``/ n`` as ``* (1/n)`` (1 ulp off, and only under jit).
    n = jax.lax.optimization_barrier(jnp.float32(x.shape[0]))
    return ((s + c) / n).astype(jnp.float32)


def _pallas_quantize_module() -> Any:
    """`pallas_kernels.quantize`, or None where it cannot be imported (no Pallas Triton support)."""
    global _PALLAS_MODULE
    if _PALLAS_MODULE is None:
        try:
            from pallas_kernels import quantize as module
        except Exception:  # ImportError, or a jax whose Pallas lacks the Triton backend
            module = False
        _PALLAS_MODULE = module
    return _PALLAS_MODULE or None


_PALLAS_MODULE: Any = None


def _placement(arrays: Iterable[Any]) -> tuple[str, bool]:
    """(platform, placed): the platform of the first concrete jax.Array and whether it sits on
    exactly one device; for tracers (under jit) the default backend and False."""
    for a in arrays:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            devices = a.devices()
            return next(iter(devices)).platform, len(devices) == 1
    return jax.default_backend(), False


def _resolve_backend(backend: str, interpret: bool | None, arrays: Iterable[Any], dtype: Any,
                     n: int, block_size: int, what: str) -> tuple[str, bool]:
    """(backend "xla" | "pallas", interpret) for one `quantize` / `dequantize` call.

    "auto" takes the kernels only for a concrete array on a single GPU device; "pallas" insists
    (ValueError where the kernels cannot serve the call) and runs interpreted off GPU unless
    ``interpret`` says otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "xla":
        return "xla", False
    platform, placed = _placement(arrays)
    if backend == "auto" and not (placed and platform == "gpu"):
        return "xla", False   # (without importing the kernels)
    module = _pallas_quantize_module()
    servable = module is not None and module.supported(dtype, n, block_size)
    if backend == "auto":
        return ("pallas", False) if servable else ("xla", False)
    if not servable:
        why = ("pallas_kernels.quantize cannot be imported" if module is None else
               f"the kernels need bf16/f16 data whose size is a multiple of block_size; got "
               f"{jnp.dtype(dtype).name} of size {n} with block_size={block_size}")
        raise ValueError(f"{what}: backend='pallas' was requested but {why}; use backend='auto' "
                         "to fall back to XLA")
    return "pallas", (platform != "gpu") if interpret is None else bool(interpret)


def _quantize_flat(flat: jax.Array, fmt: _formats.Format, block_size: int,
                   dq_block_size: int | None, backend: str = "xla",
                   interpret: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Returns ((codes, absmax, absmax_scale, absmax_offset), all_finite).

    ``backend`` is resolved already: "xla" or "pallas" (`_resolve_backend`)."""
    if backend == "pallas":
        packed, absmax = _pallas_quantize_module().quantize_blocks_pallas(
            flat, tuple(float(v) for v in fmt.values), block_size, interpret=interpret)
        # a block holding Inf/NaN gets a NaN scale in the kernel, as below
        all_finite = jnp.logical_not(jnp.any(jnp.isnan(absmax)))
        return _with_double_quant(packed, absmax, dq_block_size, backend, interpret), all_finite
    flat = flat.astype(jnp.float32)
    n = flat.shape[0]
    blocks, absmax = _blockwise_absmax(flat, block_size)
    # XLA:CPU's max reduction can drop NaN, so test the values themselves (fused with the absmax
    # pass); a block holding NaN/Inf gets a NaN scale, so a non-finite input never yields
    # plausible-looking codes, even under jit where we cannot raise.
    block_finite = jnp.all(jnp.isfinite(blocks), axis=1)
    absmax = jnp.where(block_finite, absmax, jnp.float32(jnp.nan))
    all_finite = jnp.all(block_finite)
    codes = _encode(_scale(blocks, absmax).reshape(-1), fmt)
    # Elements past n are padding: only ceil(n/2) bytes are stored, and a padding element
    # encodes 0, i.e. the zero code, as in bitsandbytes.
    pairs = codes[: n + (n % 2)].reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return _with_double_quant(packed, absmax, dq_block_size), all_finite


def _with_double_quant(packed: jax.Array, absmax: jax.Array, dq_block_size: int | None,
                       backend: str = "xla", interpret: bool = False) -> tuple[jax.Array, ...]:
    """(codes, absmax or its 8-bit codes, absmax_scale, absmax_offset) as stored."""
    if dq_block_size is None:
        return packed, absmax, None, None
    qabs, scale, offset = _double_quantize_backend(absmax, dq_block_size, backend, interpret)
    return packed, qabs, scale, offset


def _double_quantize_backend(absmax: jax.Array, dq_block_size: int, backend: str = "xla",
                             interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`double_quantize` (default offset) on a resolved backend: "xla" is `double_quantize`
    itself; "pallas" takes the same offset (`_exact_mean`, in XLA) and runs centre, block scales
    and 8-bit encode in one kernel (`pallas_kernels.quantize.double_quantize_pallas`); the same
    bits either way.

    The mean stays in XLA on purpose: the result of `_exact_mean`'s compensated sum still
    depends on the reduction order (its float32 correction term rounds: on XLA:CPU permuting
    ``[2**24, 1, 2**-25 x 1000]`` changes the last bit), so a kernel summing in its own order
    could not promise the offset bits of the XLA path."""
    if backend != "pallas":
        return double_quantize(absmax, dq_block_size)
    absmax = jnp.asarray(absmax, jnp.float32)
    # pinned to its float32 value, as in `double_quantize`
    offset = jax.lax.optimization_barrier(_exact_mean(absmax))
    codes, scale = _pallas_quantize_module().double_quantize_pallas(
        absmax, offset, dq_block_size, interpret=interpret)
    return codes, scale, offset


def quantize(x: jax.Array | np.ndarray, format: str = "nf4", block_size: int = 64,
             double_quant: bool = True, dq_block_size: int = 256, *, name: str = "",
             backend: str = "auto", interpret: bool | None = None) -> QuantizedArray:
    """Quantizes an array blockwise to 4 bits.

    Args:
      x: floating array of any shape (float32/bfloat16/float16/float64); values must be finite.
        Quantization runs in float32 after an exact upcast (a float64 input is rounded first).
      format: "nf4" (default), "fp4" (E2M1, bitsandbytes), "fp4_e3m0" or "int4".
      block_size: elements a block, a power of two in 32..4096 (default 64).
      double_quant: quantize the block scales to 8 bits (default True).
      dq_block_size: scales a second-level block (default 256).
      name: the leaf's path, used in error messages.
      backend: "auto" (default), "xla" or "pallas" (see the module docstring); every backend
        gives the same bytes.
      interpret: with backend "pallas", run the kernel in the Pallas interpreter (default: exactly
        when not on a GPU; for tests).
    Returns:
      A `QuantizedArray` on the same device as ``x``. It is jit-able; under ``jax.jit`` the
      non-finite check cannot raise, and a non-finite block yields a NaN/Inf scale instead.
    Raises:
      TypeError for non-floating input; ValueError for empty or non-finite input, an
      unsupported format/block size, an unknown backend, or backend "pallas" where the kernels
      cannot serve the call.
    """
    _check_input(x, name)
    _check_format_args(format, block_size, dq_block_size if double_quant else None, name)
    fmt = _formats.get_format(format)
    dq = dq_block_size if double_quant else None
    xj = x if isinstance(x, jax.Array) else jnp.asarray(x)
    use, interp = _resolve_backend(backend, interpret, (xj,), xj.dtype, math.prod(xj.shape),
                                   block_size, "quantize")
    (codes, absmax, scale, offset), all_finite = _quantize_jit(xj.reshape(-1), fmt.name, block_size, dq,
                                                               use, interp)
    if not isinstance(all_finite, jax.core.Tracer) and not bool(all_finite):
        at = f" {name!r}" if name else ""
        raise ValueError(f"quantize: leaf{at} contains NaN or Inf; refusing to quantize non-finite values")
    return QuantizedArray(codes, absmax, scale, offset, shape=tuple(int(d) for d in x.shape),
                          dtype=jnp.dtype(x.dtype).name, format=fmt.name, block_size=int(block_size),
                          dq_block_size=dq)


def _quantize_flat_by_name(flat, format, block_size, dq_block_size, backend="xla", interpret=False):
    return _quantize_flat(flat, _formats.get_format(format), block_size, dq_block_size, backend, interpret)


_quantize_jit = jax.jit(_quantize_flat_by_name, static_argnums=(1, 2, 3, 4, 5))


def decode_absmax(q: QuantizedArray) -> jax.Array:
    """The float32 block scales of ``q`` ([n_blocks]), decoding double quantization if present."""
    if not q.double_quant:
        return q.absmax
    table = jnp.asarray(_formats.dynamic_map())
    codes = table[q.absmax.astype(jnp.int32)]
    scale = jnp.repeat(q.absmax_scale, q.dq_block_size)[: q.n_blocks]
    # Two separate float32 roundings (multiply, then add), as bitsandbytes does; an FMA here would
    # change the last bit of some scales.
    prod = _no_fma(codes * scale)
    return prod + q.absmax_offset


def _no_fma(x: jax.Array) -> jax.Array:
    # An optimization barrier keeps XLA from contracting the multiply into the following add.
    return jax.lax.optimization_barrier(x)


def dequantize(q: QuantizedArray, dtype: Any = None, *, backend: str = "auto",
               interpret: bool | None = None) -> jax.Array:
    """Decodes a `QuantizedArray` back to a dense array of its shape.

    Args:
      q: the quantized array.
      dtype: floating output dtype; defaults to the original dtype. Values are computed in
        float32 (``code_value * absmax``) and rounded once to ``dtype``.
      backend: "auto" (default), "xla" or "pallas" (see the module docstring; the kernel serves
        bf16/f16 outputs of whole blocks); every backend gives the same values bit for bit.
      interpret: as in `quantize`.
    Returns:
      Array of shape ``q.shape`` and dtype ``dtype``.
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dequantize: dtype {dtype} is not a floating-point dtype")
    use, interp = _resolve_backend(backend, interpret, q.arrays(), dtype, q.size, q.block_size,
                                   "dequantize")
    return _dequantize_jit(q, dtype.name, use, interp)


def _dequantize_impl(q: QuantizedArray, dtype: str, backend: str = "xla",
                     interpret: bool = False) -> jax.Array:
    fmt = _formats.get_format(q.format)
    if backend == "pallas":
        # with double quant the kernel decodes the scales itself, the bits `decode_absmax` gives
        dq = dict(absmax_scale=q.absmax_scale, absmax_offset=q.absmax_offset, dq_block_size=q.dq_block_size,
                  absmax_table=_formats.dynamic_map()) if q.double_quant else {}
        out = _pallas_quantize_module().dequantize_blocks_pallas(
            q.codes, q.absmax, tuple(float(v) for v in fmt.values), dtype, **dq, interpret=interpret)
        return out.reshape(q.shape)
    hi = q.codes >> 4
    lo = q.codes & 0xF
    codes = jnp.stack([hi, lo], axis=-1).reshape(-1)[: q.size]
    values = jnp.asarray(fmt.values)[codes.astype(jnp.int32)]
    absmax = decode_absmax(q)
    pad = q.n_blocks * q.block_size - q.size
    vals = jnp.pad(values, (0, pad)).reshape(q.n_blocks, q.block_size) * absmax[:, None]
    return vals.reshape(-1)[: q.size].reshape(q.shape).astype(dtype)


_dequantize_jit = jax.jit(_dequantize_impl, static_argnums=(1, 2, 3))


def quantize_linear_kernel(kernel: jax.Array, **kwargs: Any) -> QuantizedArray:
    """Quantizes a Flax ``[in, out]`` kernel in torch/bitsandbytes ``[out, in]`` order.

    The result has shape ``[out, in]`` and holds the bytes bitsandbytes writes for the same
    ``Linear.weight``; blocks run along the input dimension. ``kwargs`` go to `quantize`.
    """
    if getattr(kernel, "ndim", None) != 2:
        raise ValueError(f"quantize_linear_kernel expects a 2-D [in, out] kernel, got shape "
                         f"{getattr(kernel, 'shape', None)}")
    return quantize(jnp.asarray(kernel).T, **kwargs)


# --------------------------------------------------------------------------------------------
# Pytrees


_DEFAULT_EXCLUDE = r"(^|[./_])(norm|ln|layernorm|rmsnorm|bias|embed|embedding|embed_tokens|wte|wpe|lm_head|head|scale)([./_\d]|$)"


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """Which leaves of a pytree `quantize_tree` quantizes, and how.

    A floating leaf is quantized when it has ``ndim >= min_ndim`` and ``size >= min_size``, its
    path does not match ``exclude`` (default: norms, biases, embeddings, heads), and, if
    ``include`` is set, its path matches ``include``. Paths are dot-joined keys, e.g.
    ``"layers.0.self_attn.q_proj.kernel"``; patterns are searched (``re.search``).
    """

    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    dq_block_size: int = 256
    min_size: int = 4096
    min_ndim: int = 2
    include: str | None = None
    exclude: str | None = _DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        _check_format_args(self.format, self.block_size, self.dq_block_size if self.double_quant else None)
        for pat in (self.include, self.exclude):
            if pat is not None:
                re.compile(pat)

    def selects(self, path: str, leaf: Any) -> bool:
        """True if the leaf at ``path`` is to be quantized."""
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return False
        if leaf.ndim < self.min_ndim or math.prod(leaf.shape) < self.min_size:
            return False
        if self.exclude is not None and re.search(self.exclude, path):
            return False
        return self.include is None or re.search(self.include, path) is not None

    def quantize(self, x: jax.Array, name: str = "") -> QuantizedArray:
        """Quantizes one array with this policy's settings."""
        return quantize(x, self.format, self.block_size, self.double_quant, self.dq_block_size, name=name)


def tree_path_str(path: Iterable[Any]) -> str:
    """Dot-joined string of a jax key path (``DictKey``/``GetAttrKey``/``SequenceKey``); the
    ``value`` attribute of Flax NNX variables is left out."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(p for p in parts if p not in ("value", "raw_value"))


def quantize_tree(params: Any, policy: QuantPolicy | None = None, *, donate: bool = False) -> Any:
    """Quantizes the leaves of a parameter pytree that ``policy`` selects.

    Works on plain nested dicts, Linen params and Flax NNX ``State``. Leaves are quantized one at
    a time, so peak memory stays near one leaf's float32 copy on top of the input; with
    ``donate=True`` each selected input leaf is deleted once quantized (device arrays only).

    Returns a pytree of the same structure whose selected leaves are `QuantizedArray` nodes.
    """
    policy = policy or QuantPolicy()

    def leaf_fn(path, leaf):
        name = tree_path_str(path)
        if isinstance(leaf, QuantizedArray) or not policy.selects(name, leaf):
            return leaf
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(f"quantize_tree: leaf {name!r} is {type(leaf).__name__}, expected an array")
        q = policy.quantize(leaf, name=name)
        if donate and isinstance(leaf, jax.Array):
            jax.block_until_ready(q)
            leaf.delete()
        return q

    return jax.tree_util.tree_map_with_path(leaf_fn, params, is_leaf=is_quantized)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """Replaces every `QuantizedArray` in ``tree`` with its dense array (``dtype`` or its own)."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree,
                                  is_leaf=is_quantized)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Storage of a (partly) quantized pytree, in bytes.

    ``code_bytes`` and ``scale_bytes`` belong to quantized leaves (``scale_bytes`` covers absmax,
    second-level scales and offsets); ``dense_bytes`` to everything else.
    ``bits_per_param`` is (code + scale bits) / quantized elements.
    """

    code_bytes: int
    scale_bytes: int
    dense_bytes: int
    quantized_params: int
    dense_params: int

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.dense_bytes

    @property
    def bits_per_param(self) -> float:
        if not self.quantized_params:
            return float("nan")
        return 8 * (self.code_bytes + self.scale_bytes) / self.quantized_params

    def as_dict(self) -> dict[str, float]:
        return dict(code_bytes=self.code_bytes, scale_bytes=self.scale_bytes, dense_bytes=self.dense_bytes,
                    total_bytes=self.total_bytes, quantized_params=self.quantized_params,
                    dense_params=self.dense_params, bits_per_param=self.bits_per_param)


def footprint(tree: Any) -> Footprint:
    """Counts the bytes of a pytree, split into 4-bit codes, scales, and unquantized leaves."""
    code = scale = dense = qn = dn = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized):
        if isinstance(leaf, QuantizedArray):
            code += leaf.codes.size * leaf.codes.dtype.itemsize
            scale += sum(a.size * a.dtype.itemsize for a in leaf.arrays()[1:])
            qn += leaf.size
        elif hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            dense += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
            dn += math.prod(leaf.shape)
    return Footprint(int(code), int(scale), int(dense), int(qn), int(dn))
