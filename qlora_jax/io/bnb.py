"""bitsandbytes 4-bit ("bnb-4bit") Hugging Face checkpoints, read straight into `QuantizedArray`.

A bnb-4bit folder is an HF model folder whose ``config.json`` has a ``quantization_config`` with
``quant_method == "bitsandbytes"`` and ``load_in_4bit``, and whose quantized ``nn.Linear`` weights
``P.weight`` are stored as the bitsandbytes ``QuantState`` serialisation::

    P.weight                                  uint8 [(n+1)//2, 1] packed codes (or the same bytes in
                                              a bf16/fp16/fp32 "quant_storage" tensor)
    P.weight.absmax                           float32 [n_blocks], or uint8 [n_blocks] with DQ
    P.weight.quant_map                        float32 [16], the 4-bit code table
    P.weight.nested_absmax                    float32 [ceil(n_blocks / nested_blocksize)]  (DQ only)
    P.weight.nested_quant_map                 float32 [256], the 8-bit dynamic map          (DQ only)
    P.weight.quant_state.bitsandbytes__nf4    uint8 UTF-8 JSON: quant_type, blocksize, dtype, shape
                                              (+ nested_blocksize, nested_dtype, nested_offset)

The bytes are exactly our `QuantizedArray` fields (same packing, same block order over the
row-major ``[out, in]`` weight, same double quantization), so a layer is imported without
dequantizing: the arrays are reused as they are, after checking that the stored code tables equal
ours (`qlora_jax.formats`). `quantized_from_bnb` / `bnb_tensors` convert one weight each way;
`read_bnb_folder` streams a whole folder; `load_bnb_llama` builds our Llama model with frozen 4-bit
`qlora_jax.nnx.QuantLinear` layers on those weights (ready for `qlora_jax.nnx.inject`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax import formats as _formats
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM, RMSNorm
from qlora_jax.quantize import QuantizedArray

__all__ = [
    "BNB_QUANT_TYPES", "QUANT_STATE_PREFIX", "bnb_quantization_config", "is_bnb_folder",
    "quantized_from_bnb", "bnb_tensors", "read_bnb_folder", "load_bnb_llama", "load_any_llama",
    "SafetensorsFolder",
]

# The 4-bit types bitsandbytes serialises (`QuantState.valid_qs_type_keys`).
BNB_QUANT_TYPES = ("nf4", "fp4")
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
# Suffixes (after "P.weight.") that belong to a serialised QuantState.
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATE_KEY = re.compile(r"^(?P<weight>.+\.weight)\.(?P<suffix>absmax|quant_map|nested_absmax|nested_quant_map|"
                        r"quant_state\.bitsandbytes__[A-Za-z0-9_]+)$")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------------
# Safetensors folders


class SafetensorsFolder:
    """Random access to the tensors of an HF folder (``model.safetensors`` or a sharded index).

    Only headers are read on construction; ``get`` reads one tensor. Every error names the file
    (and the key). Use as a context manager, or call `close`.
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = os.fspath(folder)
        index = os.path.join(self.folder, "model.safetensors.index.json")
        single = os.path.join(self.folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: invalid safetensors index ({type(e).__name__}: {e})") from None
            missing = [s for s in files if not os.path.isfile(os.path.join(self.folder, s))]
            if missing:
                raise ValueError(f"{self.folder}: shard file(s) {missing} listed in model.safetensors.index.json "
                                 f"are missing")
        elif os.path.isfile(single):
            weight_map, files = None, ["model.safetensors"]
        else:
            raise ValueError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        try:
            for name in files:
                path = os.path.join(self.folder, name)
                try:
                    h = safe_open(path, framework="numpy")
                except Exception as e:  # the reader reports truncation/corruption in many ways
                    raise ValueError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})"
                                     ) from None
                self._handles[path] = h
                for k in h.keys():
                    self._where[k] = path
            if weight_map is not None:
                absent = sorted(k for k, s in weight_map.items()
                                if self._where.get(k) != os.path.join(self.folder, s))
                if absent:
                    raise ValueError(f"{self.folder}: tensor(s) {absent[:5]} listed in model.safetensors.index.json "
                                     f"are not in the shard the index names")
        except Exception:
            self.close()
            raise

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> str:
        """The file holding ``key``."""
        return self._where[key]

    def get(self, key: str) -> np.ndarray:
        """The tensor ``key`` as stored (dtype and shape of the file)."""
        path = self._where.get(key)
        if path is None:
            raise ValueError(f"{self.folder}: missing key {key!r}")
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {key!r}; corrupt or truncated file "
                             f"({type(e).__name__}: {e})") from None

    def close(self) -> None:
        for h in self._handles.values():
            exit_ = getattr(h, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot parse config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: config must be a JSON object")
    return cfg


def bnb_quantization_config(config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any] | None:
    """The checked ``quantization_config`` of an HF config dict, or None when it has none.

    Raises ValueError for a quantization method other than bitsandbytes 4-bit (8-bit bnb, GPTQ,
    AWQ, ...), or a ``bnb_4bit_quant_type`` bitsandbytes does not serialise.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{where}: quantization_config.quant_method is {method!r}; only bitsandbytes 4-bit "
                         f"checkpoints are supported")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{where}: quantization_config is bitsandbytes but not 4-bit (load_in_8bit="
                         f"{qc.get('load_in_8bit')!r}); only 4-bit (NF4/FP4) checkpoints are supported")
    qtype = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default is fp4
    if qtype not in BNB_QUANT_TYPES:
        raise ValueError(f"{where}: unsupported bnb_4bit_quant_type {qtype!r}; supported: {BNB_QUANT_TYPES}")
    return dict(qc)


def is_bnb_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is an HF folder whose config.json declares bitsandbytes quantization."""
    p = os.fspath(path)
    if not os.path.isfile(os.path.join(p, "config.json")):
        return False
    return _read_config(p).get("quantization_config") is not None


# --------------------------------------------------------------------------------------------
# One weight


def _parse_blob(key: str, blob: np.ndarray) -> dict[str, Any]:
    try:
        text = np.ascontiguousarray(blob).view(np.uint8).tobytes().decode("utf-8")
        state = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{key}: not a bitsandbytes quant-state JSON blob ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key}: quant-state JSON must be an object")
    return state


def _require(key: str, state: Mapping[str, Any], field: str) -> Any:
    if field not in state:
        raise ValueError(f"{key}: quant state lacks field {field!r}")
    return state[field]


def quantized_from_bnb(weight_key: str, parts: Mapping[str, np.ndarray]) -> QuantizedArray:
    """Builds a `QuantizedArray` from one serialised bitsandbytes 4-bit weight, reusing its bytes.

    Args:
      weight_key: the weight's name, e.g. ``"model.layers.0.self_attn.q_proj.weight"`` (used in
        error messages and to name the parts).
      parts: ``{full key: array}`` holding ``weight_key`` (the packed bytes: uint8, or a float
        ``quant_storage`` tensor whose raw bytes are the codes) and its QuantState keys
        ``weight_key + ".absmax" | ".quant_map" | ".nested_absmax" | ".nested_quant_map" |
        ".quant_state.bitsandbytes__<type>"``.
    Returns:
      A `QuantizedArray` of the stored shape (``[out, in]`` for a linear weight) and dtype.
    Raises:
      ValueError naming the key: a missing or unexpected part, an unsupported ``quant_type``,
      block size or dtype, arrays whose sizes do not fit the shape, or a stored code table
      that differs from ours.
    """
    prefix = weight_key + "."
    blobs = [k for k in parts if k.startswith(prefix + QUANT_STATE_PREFIX)]
    if not blobs:
        raise ValueError(f"missing key {prefix + QUANT_STATE_PREFIX}nf4|fp4 (the quant state of {weight_key!r})")
    if len(blobs) > 1:
        raise ValueError(f"{weight_key}: several quant states {sorted(blobs)}")
    blob_key = blobs[0]
    qtype = blob_key[len(prefix + QUANT_STATE_PREFIX):]
    if qtype not in BNB_QUANT_TYPES:
        raise ValueError(f"{blob_key}: unsupported quant_type {qtype!r}; supported: {BNB_QUANT_TYPES}")
    allowed = {weight_key, blob_key} | {prefix + s for s in _STATE_SUFFIXES}
    extra = sorted(set(parts) - allowed)
    if extra:
        raise ValueError(f"unexpected key(s) {extra} for the 4-bit weight {weight_key!r}")
    state = _parse_blob(blob_key, parts[blob_key])
    if state.get("quant_type", qtype) != qtype:
        raise ValueError(f"{blob_key}: the key says {qtype!r} but the quant state says {state['quant_type']!r}")
    block = _require(blob_key, state, "blocksize")
    if block not in _formats.BLOCK_SIZES:
        raise ValueError(f"{blob_key}: unsupported blocksize {block!r}; supported: {_formats.BLOCK_SIZES}")
    shape = _require(blob_key, state, "shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{blob_key}: bad shape {shape!r}")
    dtype = str(_require(blob_key, state, "dtype"))
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{blob_key}: unsupported dtype {dtype!r}; supported: {_FLOAT_DTYPES}")
    nested = "nested_blocksize" in state or "nested_offset" in state
    needed = [weight_key, prefix + "absmax", prefix + "quant_map"]
    if nested:
        needed += [prefix + "nested_absmax", prefix + "nested_quant_map"]
    absent = [k for k in needed if k not in parts]
    if absent:
        raise ValueError(f"missing key(s) {absent} for the 4-bit weight {weight_key!r}")
    if not nested:
        stray = [k for k in (prefix + "nested_absmax", prefix + "nested_quant_map") if k in parts]
        if stray:
            raise ValueError(f"unexpected key(s) {stray}: the quant state of {weight_key!r} has no double quantization")

    n = int(np.prod(shape))
    n_blocks = -(-n // block)
    n_bytes = -(-n // 2)
    raw = np.ascontiguousarray(parts[weight_key])
    codes = raw.view(np.uint8).reshape(-1)
    # A float quant_storage tensor holds ((n+1) // (2 * itemsize)) elements: the same bytes, maybe
    # followed by padding up to a whole element.
    if not (n_bytes <= codes.size < n_bytes + max(raw.dtype.itemsize, 1)):
        raise ValueError(f"{weight_key}: {codes.size} packed bytes ({raw.dtype} {tuple(raw.shape)}) do not fit "
                         f"shape {shape} ({n_bytes} bytes expected)")
    codes = codes[:n_bytes]

    table = np.asarray(parts[prefix + "quant_map"])
    ours = _formats.get_format(qtype).values
    if table.shape != (16,) or not np.array_equal(table.astype(np.float32), ours):
        diff = (float(np.max(np.abs(table.astype(np.float64) - ours))) if table.shape == (16,) else "n/a")
        raise ValueError(f"{prefix}quant_map: the stored {qtype} code table (shape {table.shape}) differs from "
                         f"qlora_jax's (max |diff| {diff}); this checkpoint cannot be imported without re-quantizing")

    absmax = np.asarray(parts[prefix + "absmax"])
    want_dtype = np.uint8 if nested else np.float32
    if absmax.dtype != want_dtype or absmax.shape != (n_blocks,):
        raise ValueError(f"{prefix}absmax: expected {np.dtype(want_dtype).name} [{n_blocks}] for shape {shape} and "
                         f"blocksize {block}, got {absmax.dtype} {tuple(absmax.shape)}")
    scale = offset = None
    dq_block = None
    if nested:
        dq_block = _require(blob_key, state, "nested_blocksize")
        if dq_block not in _formats.DQ_BLOCK_SIZES:
            raise ValueError(f"{blob_key}: unsupported nested_blocksize {dq_block!r}; supported: "
                             f"{_formats.DQ_BLOCK_SIZES}")
        if state.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"{blob_key}: unsupported nested_dtype {state['nested_dtype']!r} (expected float32)")
        off = _require(blob_key, state, "nested_offset")
        if not isinstance(off, (int, float)) or isinstance(off, bool) or not np.isfinite(off):
            raise ValueError(f"{blob_key}: nested_offset must be a finite number, got {off!r}")
        offset = np.float32(off)
        scale = np.asarray(parts[prefix + "nested_absmax"])
        n2 = -(-n_blocks // dq_block)
        if scale.dtype != np.float32 or scale.shape != (n2,):
            raise ValueError(f"{prefix}nested_absmax: expected float32 [{n2}], got {scale.dtype} {tuple(scale.shape)}")
        dmap = np.asarray(parts[prefix + "nested_quant_map"])
        if dmap.shape != (256,) or not np.array_equal(dmap.astype(np.float32), _formats.dynamic_map()):
            raise ValueError(f"{prefix}nested_quant_map: the stored 8-bit table differs from bitsandbytes' "
                             f"signed dynamic map that qlora_jax uses; cannot import without re-quantizing")
    q = QuantizedArray(
        codes=jnp.asarray(codes), absmax=jnp.asarray(absmax),
        absmax_scale=None if scale is None else jnp.asarray(scale),
        absmax_offset=None if offset is None else jnp.asarray(offset, jnp.float32),
        shape=tuple(int(d) for d in shape), dtype=dtype, format=qtype, block_size=int(block),
        dq_block_size=None if dq_block is None else int(dq_block))
    q.validate(weight_key)
    return q


def bnb_tensors(weight_key: str, q: QuantizedArray) -> dict[str, np.ndarray]:
    """The bitsandbytes serialisation of ``q`` (the inverse of `quantized_from_bnb`).

    Args:
      weight_key: e.g. ``"model.layers.0.self_attn.q_proj.weight"``.
      q: an NF4 or FP4 `QuantizedArray` (for a linear layer: shape ``[out, in]``).
    Returns:
      ``{key: numpy array}``: the uint8 ``[(n+1)//2, 1]`` packed weight, ``.absmax``,
      ``.quant_map``, with double quantization ``.nested_absmax`` and ``.nested_quant_map``, and
      the uint8 JSON blob ``.quant_state.bitsandbytes__<format>``. The arrays are our bytes.
    Raises:
      ValueError if ``q``'s format has no bitsandbytes counterpart (fp4_e3m0, int4).
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"bnb_tensors: {weight_key!r} is {type(q).__name__}, expected a QuantizedArray")
    if q.format not in BNB_QUANT_TYPES:
        raise ValueError(f"{weight_key}: format {q.format!r} has no bitsandbytes serialisation; supported: "
                         f"{BNB_QUANT_TYPES}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{weight_key}: dtype {q.dtype!r} cannot be written for bitsandbytes; supported: "
                         f"{_FLOAT_DTYPES}")
    prefix = weight_key + "."
    state: dict[str, Any] = {"quant_type": q.format, "blocksize": q.block_size, "dtype": q.dtype,
                             "shape": list(q.shape)}
    out = {
        weight_key: np.asarray(q.codes, np.uint8).reshape(-1, 1),
        prefix + "absmax": np.asarray(q.absmax),
        prefix + "quant_map": _formats.get_format(q.format).values.copy(),
    }
    if q.double_quant:
        out[prefix + "nested_absmax"] = np.asarray(q.absmax_scale, np.float32)
        out[prefix + "nested_quant_map"] = np.array(_formats.dynamic_map(), np.float32)
        state.update(nested_blocksize=q.dq_block_size, nested_dtype="float32",
                     nested_offset=float(np.float32(q.absmax_offset)))
    out[prefix + QUANT_STATE_PREFIX + q.format] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    return out


# --------------------------------------------------------------------------------------------
# Folders


def _group_keys(keys: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``({weight key: [its quant-state keys]}, plain keys)``; a quant-state key whose weight is
    absent is reported (as missing the weight) when its group is read."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = _STATE_KEY.match(k)
        if m:
            groups.setdefault(m.group("weight"), []).append(k)
    claimed = {k for ks in groups.values() for k in ks}
    plain = [k for k in keys if k not in claimed and k not in groups]
    return groups, plain


def read_bnb_folder(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, QuantizedArray | np.ndarray]]]:
    """Opens a bnb-4bit HF folder.

    Returns:
      ``(config, items)``: the parsed ``config.json`` and a lazy iterator of ``(name, value)`` in
      checkpoint order, where ``value`` is a `QuantizedArray` (shape ``[out, in]``) for each
      4-bit weight and the stored numpy array for everything else (embeddings, norms, skipped
      modules). Nothing is dequantized.
    Raises:
      ValueError (naming the file or key): not a bnb-4bit folder, an unreadable or truncated
      file, or an inconsistent quantized weight (see `quantized_from_bnb`).
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"model folder not found: {folder}")
    cfg = _read_config(folder)
    where = os.path.join(folder, "config.json")
    if bnb_quantization_config(cfg, where) is None:
        raise ValueError(f"{where}: no quantization_config; not a bnb-4bit checkpoint (use qlora_jax.io.load_llama)")
    store = SafetensorsFolder(folder)
    groups, plain = _group_keys(store.keys())
    order = sorted(set(plain) | set(groups))

    def items() -> Iterator[tuple[str, QuantizedArray | np.ndarray]]:
        try:
            for key in order:
                if key in groups:
                    parts = {k: store.get(k) for k in groups[key]}
                    if key in store:
                        parts[key] = store.get(key)
                    yield key, quantized_from_bnb(key, parts)
                else:
                    yield key, store.get(key)
        finally:
            store.close()

    return cfg, items()


# --------------------------------------------------------------------------------------------
# Llama


def _child(obj: Any, part: str) -> Any:
    return obj[int(part)] if part.isdigit() else getattr(obj, part)


def _resolve(model: Any, module_path: str) -> tuple[Any, Any, str] | None:
    """``(module, parent, last part)`` at a dot path of ``model``, or None."""
    parts = module_path.split(".")
    parent = model
    try:
        for p in parts[:-1]:
            parent = _child(parent, p)
        node = _child(parent, parts[-1])
    except (AttributeError, IndexError, TypeError, KeyError, ValueError):
        return None
    return node, parent, parts[-1]


def _set_child(parent: Any, part: str, value: Any) -> None:
    if part.isdigit():
        parent[int(part)] = value
    else:
        setattr(parent, part, value)


def _variable_for(model: Any, name: str) -> tuple[nnx.Variable, bool] | None:
    """The model variable an HF tensor name fills, and whether it is a transposed kernel."""
    from qlora_jax.nnx import QuantLinear  # noqa: PLC0415 - avoid an import cycle at module load

    mod_path, _, leaf = name.rpartition(".")
    found = _resolve(model, mod_path) if mod_path else None
    if found is None:
        return None
    node = found[0]
    if isinstance(node, nnx.Linear):
        attr, transpose = {"weight": ("kernel", True), "bias": ("bias", False)}.get(leaf, (None, False))
    elif isinstance(node, QuantLinear):
        attr, transpose = ("bias", False) if leaf == "bias" else (None, False)
    elif isinstance(node, nnx.Embed):
        attr, transpose = ("embedding", False) if leaf == "weight" else (None, False)
    elif isinstance(node, RMSNorm):
        attr, transpose = ("weight", False) if leaf == "weight" else (None, False)
    else:
        return None
    var = getattr(node, attr, None) if attr else None
    return (var, transpose) if isinstance(var, nnx.Variable) else None


def _is_abstract(var: nnx.Variable) -> bool:
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def _hf_name(flax_path: str) -> str:
    """``model.layers.0.mlp.up_proj.kernel`` -> ``model.layers.0.mlp.up_proj.weight``."""
    head, _, leaf = flax_path.rpartition(".")
    return f"{head}.{'weight' if leaf in ('kernel', 'embedding') else leaf}"


def load_bnb_llama(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   norm_dtype: Any = jnp.float32, compute_dtype: Any = None, backend: str = "auto",
                   **model_kwargs: Any) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Loads a bnb-4bit Llama-family HF folder into our model, keeping the 4-bit bytes.

    Every 4-bit ``nn.Linear`` weight becomes a frozen `qlora_jax.nnx.QuantLinear` whose base is
    the checkpoint's `QuantizedArray` (``[out, in]``, nothing dequantized or re-quantized); the
    other tensors (embeddings, norms, modules bitsandbytes skipped) fill the model as in
    `qlora_jax.io.load_llama`. Add adapters afterwards with `qlora_jax.nnx.inject` or
    `qlora_jax.io.peft.load_peft_adapter`.

    Args:
      path: the folder (``config.json`` with a bitsandbytes ``quantization_config`` and
        ``model.safetensors`` or a sharded index).
      dtype: compute dtype of the model (activations, matmuls of the 4-bit layers unless
        ``compute_dtype`` is given).
      param_dtype: storage dtype of float projections and embeddings.
      norm_dtype: storage dtype of RMSNorm weights.
      compute_dtype: matmul dtype of the 4-bit layers (None: ``dtype``).
      backend: "auto", "xla" or "pallas" for the 4-bit matmuls (see `qlora_jax.ops`).
      **model_kwargs: more `LlamaForCausalLM` arguments (``remat_policy``, ``attn_implementation``).
    Returns:
      ``(model, config)``.
    Raises:
      ValueError naming the file or key: not a bnb-4bit folder, a corrupt file, a quantized
      weight that does not fit the model's layer, missing or unexpected keys.
    """
    from qlora_jax.nnx import QuantLinear, QuantWeight, _layout_for  # noqa: PLC0415

    folder = os.fspath(path)
    cfg_dict, items = read_bnb_folder(folder)
    try:
        config = LlamaConfig.from_hf(cfg_dict)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None

    def build() -> LlamaForCausalLM:
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, norm_dtype=norm_dtype,
                                rngs=nnx.Rngs(0), **model_kwargs)

    model = nnx.eval_shape(build)
    unexpected: list[str] = []
    for name, value in items:
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if isinstance(value, QuantizedArray):
            mod_path = name[: -len(".weight")]
            found = _resolve(model, mod_path)
            if found is None or not isinstance(found[0], nnx.Linear):
                unexpected.append(name)
                continue
            layer, parent, part = found
            want = (int(layer.out_features), int(layer.in_features))
            if value.shape != want:
                raise ValueError(f"{folder}: 4-bit weight {name!r} has shape {list(value.shape)}, the model "
                                 f"expects {list(want)} (config mismatch?)")
            bias = layer.bias if layer.bias is not None else None
            new = QuantLinear(QuantWeight(value), bias, _layout_for(layer), compute_dtype=compute_dtype,
                              orig_dtype=layer.dtype, param_dtype=layer.param_dtype, backend=backend)
            _set_child(parent, part, new)
            continue
        loc = _variable_for(model, name)
        if loc is None:
            unexpected.append(name)
            continue
        var, transpose = loc
        want = tuple(var.get_value().shape)
        arr = np.asarray(value)
        got = tuple(arr.shape[::-1]) if transpose and arr.ndim == 2 else tuple(arr.shape)
        if got != want:
            raise ValueError(f"{folder}: tensor {name!r} has shape {tuple(arr.shape)}, the model expects "
                             f"{want[::-1] if transpose else want} (config mismatch?)")
        a = arr.astype(np.float32)
        if transpose:
            a = a.T
        var.set_value(jnp.asarray(a, dtype=var.get_value().dtype))
    missing = sorted(_hf_name(".".join(str(p) for p in path_))
                     for path_, node in nnx.iter_graph(model)
                     if isinstance(node, nnx.Variable) and _is_abstract(node))
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the model; missing keys: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} ({len(missing)} total); unexpected keys: "
                         f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)} total)")
    return model, config


def load_any_llama(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   **kwargs: Any) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """`load_bnb_llama` for a bnb-4bit folder, else `qlora_jax.io.load_llama` (float HF folder or
    GGUF file). ``kwargs`` go to the chosen loader."""
    from qlora_jax.io.hf import load_llama  # noqa: PLC0415

    p = os.fspath(path)
    if os.path.isdir(p) and is_bnb_folder(p):
        return load_bnb_llama(p, dtype=dtype, param_dtype=param_dtype, **kwargs)
    return load_llama(p, dtype=dtype, param_dtype=param_dtype, **kwargs)
