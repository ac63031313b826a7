"""Quantization on the GPU gives the same bytes and values as on the CPU.

Marked ``gpu``: deselected on machines without a CUDA device (see tests/conftest.py); run on the
device machine with ``pytest -m gpu``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj

pytestmark = pytest.mark.gpu

CASES = [((4096, 4096), 64), ((1000, 771), 64), ((3, 5), 32), ((11008, 4096), 128), ((12345,), 4096)]


@pytest.mark.parametrize("shape,block_size", CASES)
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dq", [False, True])
def test_gpu_bytes_equal_cpu(shape, block_size, fmt, dq):
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    x = np.random.default_rng(hash((shape, block_size)) % 2**32).standard_normal(shape).astype(np.float32)
    qg = qj.quantize(jax.device_put(x, gpu), fmt, block_size, dq)
    qc = qj.quantize(jax.device_put(x, cpu), fmt, block_size, dq)
    assert qg.codes.devices() == {gpu}
    for a, b in zip(qg.arrays(), qc.arrays()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for dtype in (jnp.float32, jnp.bfloat16):
        dg = np.asarray(qj.dequantize(qg, dtype).astype(jnp.float32))
        dc = np.asarray(qj.dequantize(qc, dtype).astype(jnp.float32))
        np.testing.assert_array_equal(dg, dc)
