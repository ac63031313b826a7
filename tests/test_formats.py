"""The 4-bit code tables and the 8-bit dynamic map, against independent derivations.

Sources: /work/shared/reference/torch_anchors.md §1(a) (NF4 values and construction), §1(c)/(d)
(FP4 list, the CUDA NF4 thresholds), §1(e) (create_dynamic_map). Everything here is recomputed
from those descriptions with numpy/statistics, not read back from the library.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from qlora_jax import formats

# torch_anchors.md §1(a), code index = nibble value.
NF4_ANCHOR = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# torch_anchors.md §1(d): the thresholds of bitsandbytes' CUDA dQuantizeNF4, ascending.
NF4_CUDA_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]
# torch_anchors.md §1(a): bitsandbytes get_4bit_type("fp4"), bit-pattern order.
FP4_BNB_LIST = [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in float32 ulps (a, b of the same sign or zero)."""
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    # map the sign-magnitude bit patterns onto a monotone integer line
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return np.abs(ia - ib)


def test_nf4_table_is_the_anchor():
    v = formats.get_format("nf4").values
    assert v.dtype == np.float32 and v.shape == (16,)
    assert np.array_equal(_bits(v), _bits(np.array(NF4_ANCHOR, np.float32)))
    assert np.all(np.diff(v) > 0)  # sorted, so code order == value order
    assert (v < 0).sum() == 7 and (v == 0).sum() == 1 and (v > 0).sum() == 8
    assert v[0] == -1.0 and v[-1] == 1.0 and v[7] == 0.0


def test_nf4_regenerated_from_normal_quantiles():
    # create_normal_map(offset=0.9677083, use_extra_value=True): 8 positive quantiles of
    # linspace(offset, 0.5, 9)[:-1], 7 negative of linspace(offset, 0.5, 8)[:-1], plus 0,
    # sorted and divided by the maximum.
    nd, offset = NormalDist(), 0.9677083
    pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    regen = np.sort(np.array(pos + [0.0] + neg))
    regen /= regen.max()
    np.testing.assert_allclose(formats.get_format("nf4").values, regen, rtol=0, atol=1e-6)
    # the offset is the mean of the two quantile levels 1 - 1/30 and 1 - 1/32
    assert abs(offset - ((1 - 1 / 30) + (1 - 1 / 32)) / 2) < 1e-6


def test_fp4_e2m1_is_bitsandbytes_list_over_12():
    v = formats.get_format("fp4").values
    want = np.array([float(c) for c in FP4_BNB_LIST], np.float32) / np.float32(12)
    want[8] = 0.0  # bitsandbytes builds it from the int literal -0: +0
    assert np.array_equal(_bits(v), _bits(want))
    assert _bits(v)[8] == 0 and _bits(v)[0] == 0  # both zeros are +0, no -0 bit pattern
    # E2M1 with bias 2: sign bit is the nibble's high bit, magnitudes are those of codes 0..7
    assert np.array_equal(v[8:][1:], -v[:8][1:])
    assert formats.get_format("fp4").zero_code == 0


def test_fp4_e3m0_table():
    v = formats.get_format("fp4_e3m0").values
    want = []
    for code in range(16):
        sign, exp = code >> 3, code & 7
        mag = 0.0 if exp == 0 else 2.0 ** (exp - 7)  # 3 exponent bits, no mantissa: 2^-6 .. 2^0
        want.append(-mag if sign and mag else mag)
    assert np.array_equal(_bits(v), _bits(np.array(want, np.float32)))
    assert v.max() == 1.0 and v.min() == -1.0


def test_int4_table():
    v = formats.get_format("int4").values
    want = np.array([(c - 8) / 7 for c in range(16)], np.float64).astype(np.float32)
    assert np.array_equal(_bits(v), _bits(want))
    assert formats.get_format("int4").zero_code == 8
    # symmetric around code 8 except for the unused code 0 (-8/7)
    assert np.array_equal(v[9:], -v[7:0:-1])


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_order_and_midpoints(name):
    fmt = formats.get_format(name)
    s = fmt.values[fmt.order]
    assert np.all(np.diff(s) >= 0)
    assert sorted(fmt.order.tolist()) == list(range(16))
    zeros = [c for c in fmt.order.tolist() if fmt.values[c] == 0]
    assert zeros == sorted(zeros)  # equal values keep code order (a stable sort)
    # float32 midpoint = the float64 mean of the float32 neighbours, rounded once
    mid = ((s[:-1].astype(np.float64) + s[1:].astype(np.float64)) / 2).astype(np.float32)
    assert fmt.midpoints.dtype == np.float32
    assert np.array_equal(_bits(fmt.midpoints), _bits(mid))
    assert fmt.values[fmt.zero_code] == 0


def test_nf4_midpoints_are_the_cuda_thresholds():
    assert np.array_equal(_bits(formats.get_format("nf4").midpoints),
                          _bits(np.array(NF4_CUDA_THRESHOLDS, np.float64).astype(np.float32)))


def test_get_format_rejects_unknown():
    with pytest.raises(ValueError, match="unsupported format 'nf5'"):
        formats.get_format("nf5")
    with pytest.raises(ValueError, match="unsupported format"):
        formats.get_format(None)


def test_dynamic_map_shape_and_landmarks():
    m = formats.dynamic_map()
    assert m.dtype == np.float32 and m.shape == (256,)
    assert np.all(np.diff(m) > 0)
    assert m[127] == 0 and m[255] == 1.0
    assert m.min() == np.float32(-0.99296875)
    assert (m < 0).sum() == 127 and (m > 0).sum() == 128
    assert np.abs(m[m != 0]).min() == pytest.approx(5.5e-7, rel=0.01)
    with pytest.raises(ValueError):
        m[0] = 0  # read-only: nobody can corrupt the shared table


def test_dynamic_map_rederived():
    """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), torch_anchors §1(e).

    Derived here with exact (float64) arithmetic and one rounding to float32; bitsandbytes works
    in float32 torch ops, so its table may differ from this derivation by 1 ulp.
    """
    data = []
    for i in range(7):
        boundaries = np.linspace(0.1, 1, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += list(10.0 ** (-6 + i) * means)
        data += list(-(10.0 ** (-6 + i)) * means)
    data += [0.0, 1.0]
    assert len(data) == 256
    ref = np.sort(np.array(data, np.float64)).astype(np.float32)
    m = formats.dynamic_map()
    assert _ulp_distance(m, ref).max() <= 1
    assert np.array_equal(np.sign(m), np.sign(ref))


def test_dynamic_map_midpoints():
    m = formats.dynamic_map().astype(np.float64)
    want = ((m[:-1] + m[1:]) / 2).astype(np.float32)
    assert np.array_equal(_bits(formats.dynamic_map_midpoints()), _bits(want))


def test_block_size_lists():
    assert formats.BLOCK_SIZES == tuple(2**k for k in range(5, 13))  # 32..4096 (bitsandbytes 0.50)
    assert formats.DQ_BLOCK_SIZES == tuple(2**k for k in range(6, 13))  # 64..4096
