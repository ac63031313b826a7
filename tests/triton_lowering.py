"""Lowering the Pallas Triton kernels for an H100 without a GPU, with the Triton IR verified.

`lowers_for_h100(fn, *avals)` exports ``jax.jit(fn)`` for CUDA while the Pallas Triton lowering
answers its device query with an H100 (compute capability 9.0) and runs the Triton dialect's
verifier on every module it builds: that catches what the interpreter cannot (a primitive with no
Triton lowering rule, an op given types Triton rejects), short of compiling PTX, which needs the
GPU. Private jax API: the helper skips the calling test where it is absent.
"""

from __future__ import annotations

import contextlib

import jax
import pytest


@contextlib.contextmanager
def _pretend_h100_and_verify(modules: list[str] | None = None):
    try:
        from jax._src.pallas.triton import gpu_info
        from jax._src.pallas.triton import pallas_call_registration as reg
        info = gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
        old_info, old_lower = reg.gpu_info_lib.get_gpu_info, reg.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"this jax has no patchable Triton lowering ({e})")

    def lower_and_verify(*args, **kwargs):
        result = old_lower(*args, **kwargs)
        result.module.operation.verify()   # raises with the verifier's message
        if modules is not None:
            modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.gpu_info_lib.get_gpu_info = lambda: info
    reg.lowering.lower_jaxpr_to_triton_module = lower_and_verify
    try:
        yield
    finally:
        reg.gpu_info_lib.get_gpu_info = old_info
        reg.lowering.lower_jaxpr_to_triton_module = old_lower


def lowers_for_h100(fn, *avals, modules: list[str] | None = None) -> str:
    """The StableHLO text of ``jax.jit(fn)`` exported for CUDA (H100), every Triton module
    verified (and its text appended to ``modules`` when given); asserts that a Triton custom
    call is in it."""
    check = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with _pretend_h100_and_verify(modules):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=check)(*avals)
        text = exported.mlir_module()
    assert "xla.gpu.triton" in text
    return text
