"""Code tables of the 4-bit formats and the 8-bit map used for double quantization.

Every 4-bit format is a table of 16 float32 values indexed by the nibble (code) value. Encoding
is the same for all of them and mirrors bitsandbytes' portable backend bit for bit: sort the
table, take the float32 midpoints of neighbours, and a scaled value ``v`` gets the sorted rank
``#{m : v > m}`` (a value exactly on a midpoint goes to the lower value), mapped back to the
code that holds that value. For NF4 the table is already sorted, so rank == code.

Facts (bitsandbytes 0.50, ``functional.get_4bit_type`` / ``create_dynamic_map``):
- NF4: 16 hard-coded values, asymmetric (7 negative, zero, 8 positive).
- FP4 (E2M1, bias 2): ``[0, .0625, 8, 12, 4, 6, 2, 3, -0, -.0625, -8, -12, -4, -6, -2, -3] / 12``
  in bit-pattern order (sign bit is the high bit of the nibble; code 8 is +0).
- The signed dynamic map: 256 sorted values in [-0.99296875, 1], 0 at index 127.
Our additions, for the paper's data-type comparison (not bitsandbytes formats):
- FP4 E3M0: sign + 3 exponent bits, magnitudes ``{0, 2^-6, ..., 2^0}``.
- Int4: symmetric absmax, ``q/7`` for ``q`` in -7..7 stored as ``q + 8`` (code 0 = -8/7 is never
  produced because scaled values lie in [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = [
    "Format",
    "FORMATS",
    "get_format",
    "dynamic_map",
    "dynamic_map_midpoints",
    "BLOCK_SIZES",
    "DQ_BLOCK_SIZES",
]

# Block sizes bitsandbytes 0.50 accepts for 4-bit quantization, and for the 8-bit blockwise
# quantizer that double quantization uses.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DQ_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)

_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def _fp4_e2m1() -> np.ndarray:
    raw = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                    0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], np.float32)
    # index 8 is +0 in bitsandbytes (its table is built from the int literal -0), bit for bit
    return raw / np.abs(raw).max()  # float32 division, as bitsandbytes' ``div_``


def _fp4_e3m0() -> np.ndarray:
    mags = np.array([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], np.float32)
    # code 8 is +0 too (no negative zero), as in bitsandbytes' FP4 table
    return np.concatenate([mags, np.concatenate([[0.0], -mags[1:]])]).astype(np.float32)


def _int4() -> np.ndarray:
    return (np.arange(16, dtype=np.float32) - 8) / np.float32(7)


@dataclasses.dataclass(frozen=True, eq=False)
class Format:
    """A 4-bit code table and the derived encoding tables.

    Attributes:
      name: "nf4", "fp4", "fp4_e3m0" or "int4".
      values: float32 [16], the value of each code (index = nibble).
      order: uint8 [16], codes sorted by value (stable, so of two equal zeros code 0 sorts first,
        as torch.argsort orders them in bitsandbytes).
      midpoints: float32 [15], midpoints between consecutive sorted values.
      zero_code: the code that decodes to +0 (used for padding and all-zero blocks).
      bnb_name: the ``quant_type`` bitsandbytes uses for it, or None if it has none.
    """

    name: str
    values: np.ndarray
    bnb_name: str | None

    @functools.cached_property
    def order(self) -> np.ndarray:
        return np.argsort(self.values, kind="stable").astype(np.uint8)

    @functools.cached_property
    def midpoints(self) -> np.ndarray:
        s = self.values[self.order]
        return ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32)

    @property
    def zero_code(self) -> int:
        return int(np.flatnonzero(self.values == 0)[0])

    @property
    def sorted_is_identity(self) -> bool:
        return bool(np.all(self.order == np.arange(16)))

    def __repr__(self) -> str:
        return f"Format({self.name!r})"


FORMATS: dict[str, Format] = {
    "nf4": Format("nf4", np.array(_NF4, np.float32), "nf4"),
    "fp4": Format("fp4", _fp4_e2m1(), "fp4"),
    "fp4_e3m0": Format("fp4_e3m0", _fp4_e3m0(), None),
    "int4": Format("int4", _int4(), None),
}


def get_format(name: str) -> Format:
    """Returns the `Format` called ``name`` ("nf4", "fp4", "fp4_e3m0", "int4")."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported format {name!r}; expected one of {sorted(FORMATS)}") from None


# The signed 8-bit dynamic map, as float32 bit patterns, exactly as bitsandbytes 0.50
# ``create_dynamic_map(signed=True)`` returns it. bitsandbytes builds it with torch.linspace,
# whose float32 rounding depends on the CPU's vector width and FMA use, so re-deriving it in numpy
# drifts by 1 ulp in ~40 entries; the table is data and is kept as data. The construction: for
# each exponent i in 0..6, the 2**i midpoints of linspace(0.1, 1, 2**i + 1) scaled by 10**(i-6),
# both signs, plus 0 and 1, sorted (tests/test_formats.py re-derives it to within 1 ulp).
_DYNAMIC_MAP_BITS = (
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a,
    0xbf650000, 0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666,
    0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334,
    0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000,
    0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc,
    0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333,
    0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc,
    0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8,
    0xbda75c2a, 0xbda1999a, 0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd,
    0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3,
    0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7,
    0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418,
    0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d,
    0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705,
    0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034,
    0x388aefb3, 0x38ba1f4b, 0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1,
    0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d, 0x3af1a9fc, 0x3b1db22d, 0x3b428f5c,
    0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b, 0x3be24dd3,
    0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3,
    0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f,
    0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b,
    0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333,
    0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000,
    0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000, 0x3eb13333, 0x3eb86666,
    0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a, 0x3eeacccc,
    0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd,
    0x3f2b6666, 0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000,
    0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333,
    0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000
)


@functools.cache
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map of bitsandbytes: float32 [256], sorted, [127] == 0, [255] == 1."""
    table = np.array(_DYNAMIC_MAP_BITS, np.uint32).view(np.float32)
    table.setflags(write=False)
    return table


@functools.cache
def dynamic_map_midpoints() -> np.ndarray:
    """float32 [255] midpoints between consecutive entries of `dynamic_map`."""
    m = dynamic_map()
    mid = ((m[:-1] + m[1:]) / np.float32(2)).astype(np.float32)
    mid.setflags(write=False)
    return mid
