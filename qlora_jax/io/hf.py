"""Hugging Face safetensors checkpoints, and :func:`load_llama` for HF folders or GGUF files.

Tensors are streamed one at a time (``safetensors.safe_open``) into a model that was
built abstractly with ``nnx.eval_shape``, so loading never holds a second full copy
of the weights.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.io.gguf import read_gguf_llama
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM, RMSNorm

__all__ = ["read_hf_folder", "read_checkpoint", "load_llama", "TensorHook"]

TensorHook = Callable[[str, np.ndarray], Any]

# Buffers some checkpoints carry that are recomputed by the model, not loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _read_config(folder: str) -> dict[str, Any]:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot parse config ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: config must be a JSON object")
    return cfg


def read_hf_folder(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """Open an HF model folder (``config.json`` + ``model.safetensors`` or a sharded index).

    Returns:
      ``(config, tensors)``: the parsed ``config.json`` and a lazy iterator of
      ``(name, array)`` in checkpoint layout and dtype (e.g. ``[out, in]`` bfloat16),
      read one tensor at a time.

    Raises:
      ValueError: missing folder/config/shard, a tensor listed in the index but absent
        from its shard, or a corrupt safetensors file.
    """
    from safetensors import safe_open

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"model folder not found: {folder}")
    cfg = _read_config(folder)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: invalid safetensors index ({e})") from e
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise ValueError(f"{folder}: missing shard file(s) {sorted(missing)} "
                             "listed in model.safetensors.index.json")
        plan = [(os.path.join(folder, s), sorted(shards[s])) for s in sorted(shards)]
    elif os.path.isfile(single):
        plan = [(single, None)]
    else:
        extra = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" if any(
            n.endswith(".bin") for n in os.listdir(folder)) else ""
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json{extra}")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for file, names in plan:
            try:
                handle = safe_open(file, framework="numpy")
            except Exception as e:
                raise ValueError(f"{file}: corrupt or unreadable safetensors file ({type(e).__name__}: {e})") from e
            with handle as f:
                keys = set(f.keys())
                wanted = sorted(keys) if names is None else names
                absent = [n for n in wanted if n not in keys]
                if absent:
                    raise ValueError(f"{file}: tensor(s) {absent[:5]} listed in the index are missing from the shard")
                for n in wanted:
                    try:
                        arr = f.get_tensor(n)
                    except Exception as e:
                        raise ValueError(f"{file}: cannot read tensor {n!r} ({type(e).__name__}: {e})") from e
                    yield n, arr

    return cfg, tensors()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """:func:`read_gguf_llama` for a ``.gguf`` file (or any file), :func:`read_hf_folder` for a folder."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return read_hf_folder(p)
    if os.path.isfile(p):
        return read_gguf_llama(p)
    raise ValueError(f"checkpoint not found: {p} (expected an HF model folder or a .gguf file)")


def _locate(model: LlamaForCausalLM, name: str) -> tuple[str, nnx.Variable, bool] | None:
    """HF tensor name -> (flax path string, Variable, needs transpose), or None if unknown."""
    parts = name.split(".")
    obj: Any = model
    flax_path: list[str] = []
    for p in parts[:-1]:
        try:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        except (AttributeError, IndexError, TypeError):
            return None
        flax_path.append(p)
    leaf = parts[-1]
    if isinstance(obj, nnx.Linear):
        attr, transpose = {"weight": ("kernel", True), "bias": ("bias", False)}.get(leaf, (None, False))
    elif isinstance(obj, nnx.Embed):
        attr, transpose = ("embedding", False) if leaf == "weight" else (None, False)
    elif isinstance(obj, RMSNorm):
        attr, transpose = ("weight", False) if leaf == "weight" else (None, False)
    else:
        return None
    var = getattr(obj, attr, None) if attr else None
    if not isinstance(var, nnx.Variable):
        return None
    return ".".join(flax_path + [attr]), var, transpose


def _get_value(var: nnx.Variable) -> Any:
    # flax 0.12.12 deprecates ``.value`` in favour of get_value/set_value; keep older 0.12 working
    return var.get_value() if hasattr(var, "get_value") else var.value


def _set_value(var: nnx.Variable, value: Any) -> None:
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:  # pragma: no cover - older flax
        _set_value(var, value)


def _param_paths(model: nnx.Module) -> dict[str, nnx.Variable]:
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            out[".".join(str(p) for p in path)] = node
    return out


def load_llama(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               norm_dtype: Any = jnp.float32, tensor_hook: TensorHook | None = None,
               rngs: nnx.Rngs | None = None, **model_kwargs: Any) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Load a Llama-family model from an HF folder or a GGUF file.

    The model is built with ``nnx.eval_shape`` (no memory) and its params are filled
    one checkpoint tensor at a time: HF ``[out, in]`` weights become Flax kernels
    ``[in, out]``; norms are stored in ``norm_dtype``, everything else in ``param_dtype``.

    Args:
      path: HF model folder or ``.gguf`` file.
      dtype: compute dtype of the model.
      param_dtype: storage dtype of projections and embeddings.
      norm_dtype: storage dtype of RMSNorm weights.
      tensor_hook: optional ``hook(flax_path, array) -> value | None`` called for every
        tensor, where ``flax_path`` is e.g. ``"model.layers.3.self_attn.q_proj.kernel"``
        and ``array`` is the float32 numpy array already in Flax layout (kernel
        ``[in, out]``). Return None to store the array as usual (cast to the param
        dtype), or any value (e.g. a quantized tensor) to store as the param's value
        instead, unchanged; the float array is dropped right after, so a quantizing hook
        keeps peak memory at one float tensor.
      rngs: RNGs passed to the model constructor (only needed by stochastic submodules).
      **model_kwargs: extra :class:`LlamaForCausalLM` arguments (``remat_policy``,
        ``attn_implementation``).

    Returns:
      ``(model, config)``.

    Raises:
      ValueError: unreadable checkpoint, bad config, shape mismatch, or tensors that are
        missing from / unexpected by the model (both lists are given).
    """
    p = os.fspath(path)
    cfg_dict, tensors = read_checkpoint(p)
    try:
        config = LlamaConfig.from_hf(cfg_dict)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None

    def build() -> LlamaForCausalLM:
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, norm_dtype=norm_dtype,
                                rngs=rngs if rngs is not None else nnx.Rngs(0), **model_kwargs)

    model = nnx.eval_shape(build)
    expected = _param_paths(model)
    filled: set[int] = set()  # ids of filled Variables (robust to how flax spells list paths)
    unexpected: list[str] = []
    for name, arr in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue  # recomputed buffer / duplicate of the tied embedding
        loc = _locate(model, name)
        if loc is None:
            unexpected.append(name)
            continue
        fpath, var, transpose = loc
        want = tuple(_get_value(var).shape)
        got = tuple(arr.shape[::-1]) if (transpose and arr.ndim == 2) else tuple(arr.shape)
        if got != want:
            raise ValueError(f"{p}: tensor {name!r} has shape {tuple(arr.shape)}, model expects "
                             f"{want[::-1] if transpose else want} (config mismatch?)")
        a = np.asarray(arr, dtype=np.float32)
        if transpose:
            a = np.ascontiguousarray(a.T)
        value = tensor_hook(fpath, a) if tensor_hook is not None else None
        if value is None:
            value = jnp.asarray(a, dtype=_get_value(var).dtype)
        del a
        _set_value(var, value)
        filled.add(id(var))
    missing = sorted(k for k, v in expected.items() if id(v) not in filled)
    if missing or unexpected:
        raise ValueError(f"{p}: checkpoint does not match the model; missing keys: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} ({len(missing)} total); unexpected keys: "
                         f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)} total)")
    return model, config
