"""Read Llama-family GGUF files (llama.cpp format) as HF-named float32 tensors.

llama.cpp's converter permutes the rows of the Q and K projections of the
``llama`` architecture (it interleaves the two RoPE halves of each head); we undo
that so the weights use HF's ``rotate_half`` layout. Tensors are dequantized one at
a time, so only one float copy of one tensor exists at any moment.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import numpy as np

__all__ = ["open_gguf", "gguf_field", "read_gguf_llama", "unpermute_qk", "permute_qk", "SUPPORTED_GGUF_ARCHS"]

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def open_gguf(path: str | os.PathLike) -> Any:
    """Open ``path`` with ``gguf.GGUFReader``; ``ValueError`` (naming the path) if unreadable.

    Readers are memory-mapped and cached per (path, size, mtime): parsing the metadata of
    a file with a 50k-token vocabulary takes seconds in pure Python.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    st = os.stat(path)
    return _open_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # truncated / corrupt files fail in many ways inside the reader
        raise ValueError(f"{path}: corrupt or unsupported GGUF file ({type(e).__name__}: {e})") from e


def gguf_field(reader: Any, key: str, default: Any = KeyError) -> Any:
    """Value of metadata ``key`` as a Python scalar/str/list; ``default`` if absent.

    Raises ``ValueError`` when the key is absent and no default is given.
    """
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ValueError(f"missing GGUF metadata key {key!r}")
        return default
    return f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation; ``w`` is ``[n_head*H, ...]`` (weight or bias)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF layout -> GGUF layout); used to write test files."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _round_eps(x: float) -> float:
    # GGUF stores eps as float32 (1e-5 -> 9.9999997e-06); restore the decimal value.
    return float(f"{float(x):.7g}")


def _config_from_gguf(r: Any, path: str) -> dict[str, Any]:
    arch = gguf_field(r, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported general.architecture {arch!r} (supported: {SUPPORTED_GGUF_ARCHS})")

    def a(key: str, default: Any = KeyError) -> Any:
        return gguf_field(r, f"{arch}.{key}", default)

    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are not supported;"
                         " load the HF safetensors checkpoint instead")
    nh = int(a("attention.head_count"))
    nkv = int(a("attention.head_count_kv", nh))
    hidden = int(a("embedding_length"))
    head_dim = int(a("attention.key_length", hidden // nh))
    rope_dim = int(a("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count={rope_dim} != head_dim={head_dim})"
                         " are not supported")
    rope_scaling = None
    stype = a("rope.scaling.type", "none")
    if stype == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    elif stype not in ("none", None):
        raise ValueError(f"{path}: unsupported rope.scaling.type {stype!r}")
    vocab = a("vocab_size", None)
    if vocab is None:
        tok = r.fields.get("tokenizer.ggml.tokens")
        if tok is not None:
            vocab = len(tok.data)
        else:  # token_embd is [D, V] in GGUF's ne order
            vocab = next(int(t.shape[1]) for t in r.tensors if t.name == "token_embd.weight")
    cfg = dict(
        architectures=["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        model_type=arch,
        hidden_act="silu",
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")),
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=head_dim,
        max_position_embeddings=int(a("context_length", 2048)),
        rms_norm_eps=_round_eps(a("attention.layer_norm_rms_epsilon")),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        vocab_size=int(vocab),
        bos_token_id=gguf_field(r, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=gguf_field(r, "tokenizer.ggml.eos_token_id", None),
        tie_word_embeddings="output.weight" not in names,
    )
    if arch == "llama":
        cfg["attention_bias"] = any(n.endswith("attn_q.bias") for n in names)
        cfg["mlp_bias"] = any(n.endswith("ffn_up.bias") for n in names)
    return cfg


def _hf_name(gguf_name: str, path: str) -> tuple[str, str | None]:
    """GGUF tensor name -> (HF name, block kind or None)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name], None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.{parts[3]}", parts[2]
    raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a Llama-family model")


def read_gguf_llama(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """Open a Llama/Qwen2 GGUF file.

    Returns:
      ``(config, tensors)``: ``config`` is an HF-style ``config.json`` dict; ``tensors``
      lazily yields ``(hf_name, array)`` with ``array`` float32 in HF layout (``[out, in]``
      for matrices, ``[V, D]`` for the embedding, ``[D]`` for norms and biases),
      dequantized one tensor at a time with Q/K rows un-permuted.

    Raises:
      ValueError: missing file, not a GGUF file, corrupt header, unsupported architecture.
    """
    from gguf.quants import dequantize

    path = os.fspath(path)
    r = open_gguf(path)
    try:
        cfg = _config_from_gguf(r, path)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    names = [t.name for t in r.tensors]
    for n in names:
        _hf_name(n, path)  # fail before any dequantization on unknown tensors
    permute = cfg["model_type"] == "llama"  # llama.cpp only permutes Q/K for the llama arch
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for t in r.tensors:
            name, kind = _hf_name(t.name, path)
            shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))  # GGUF lists ne0 first
            try:
                w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            except Exception as e:
                raise ValueError(f"{path}: cannot read tensor {t.name!r} ({type(e).__name__}: {e})") from e
            if permute and kind == "attn_q":
                w = unpermute_qk(w, nh)
            elif permute and kind == "attn_k":
                w = unpermute_qk(w, nkv)
            yield name, np.ascontiguousarray(w)

    return cfg, tensors()
