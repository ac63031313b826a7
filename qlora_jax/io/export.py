"""Export a (Q)LoRA model as a Hugging Face folder that transformers loads.

`export_merged_hf` folds the active adapters into the dequantized base and writes ``config.json``,
sharded safetensors (plus ``model.safetensors.index.json`` when there is more than one shard) and
the tokenizer files, in bfloat16, float16 or float32; or, with ``quantize="nf4" | "fp4"``, the
bitsandbytes 4-bit serialisation (`qlora_jax.io.bnb.bnb_tensors`) with the matching
``quantization_config``, which transformers + bitsandbytes load as ``Linear4bit`` layers.

Streaming: the list of tensors (names, shapes, dtypes) is planned from the model without computing
anything; each shard's header is written first and then its tensors, one at a time, each computed
(dequantize + merge + cast) right before it is written and dropped right after. Peak host memory is
one float tensor (for 4-bit export: plus the current shard's 4-bit bytes). Every folder is written
under a temporary name beside the target and renamed at the end (`staged_folder`): on failure
nothing is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from qlora_jax import formats as _formats
from qlora_jax.io.bnb import BNB_QUANT_TYPES, bnb_tensors
from qlora_jax.lora import OUTPUT_HEAD_NAMES
from qlora_jax.models.llama import LlamaForCausalLM, RMSNorm
from qlora_jax.quantize import QuantizedArray, quantize as _quantize

__all__ = ["EXPORT_DTYPES", "TOKENIZER_FILES", "parse_size", "staged_folder", "export_merged_hf",
           "LazyTensor", "write_safetensors"]

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
# Files of an HF tokenizer that are copied when ``tokenizer_src`` is a folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.uint8): "U8"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"`` (10^9, as transformers) or ``"500MiB"``."""
    if isinstance(size, bool):
        raise TypeError(f"size must be an int or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB', '500MB', '1GiB' or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"size must be an int or a string like '2GB', got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``folder`` that becomes ``folder`` on success.

    On an exception the temporary folder is deleted and ``folder`` is untouched. An existing
    ``folder`` raises FileExistsError unless ``overwrite``, in which case it is replaced only after
    the new one is complete.
    """
    final = Path(os.fspath(folder)).absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for child in tmp.iterdir():  # mkdtemp makes a private folder; an export is meant to be shared
            child.chmod(0o644)
        tmp.chmod(0o755)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Streaming safetensors writer


@dataclasses.dataclass
class LazyTensor:
    """A tensor to write whose name, shape and dtype are known before ``produce()`` computes its data
    (``group`` ties the tensors of one 4-bit weight together)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]
    group: "_BnbGroup | None" = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_safetensors(path: str | os.PathLike, entries: list[LazyTensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str], None] | None = None) -> int:
    """Writes a safetensors file tensor by tensor: header first, then each ``entry.produce()``.

    Each produced array must have the planned shape and dtype (a mismatch is a bug: RuntimeError).
    Returns the number of data bytes written.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise TypeError(f"{e.name}: dtype {e.dtype} cannot be written to safetensors here")
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            arr = np.ascontiguousarray(e.produce())
            if tuple(arr.shape) != e.shape or arr.dtype != e.dtype:
                raise RuntimeError(f"{e.name}: produced {arr.dtype} {arr.shape}, planned {e.dtype} {e.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
            if on_tensor is not None:
                on_tensor(e.name)
    return offset


# --------------------------------------------------------------------------------------------
# Planning the tensors of a model


class _BnbGroup:
    """The bitsandbytes tensors of one 4-bit weight, quantized once when its shard is written."""

    def __init__(self, weight_key: str, shape: tuple[int, int], make: Callable[[], QuantizedArray]):
        self.weight_key = weight_key
        self.shape = shape
        self._make = make
        self._tensors: dict[str, np.ndarray] | None = None

    def prepare(self) -> None:
        if self._tensors is None:
            self._tensors = bnb_tensors(self.weight_key, self._make())

    def release(self) -> None:
        self._tensors = None

    def tensor(self, key: str) -> np.ndarray:
        self.prepare()
        return self._tensors[key]

    def planned(self, fmt: str, block_size: int, dq_block_size: int | None) -> list[tuple[str, tuple, np.dtype]]:
        """(key, shape, dtype) of each tensor; the JSON blob's length is known only after
        `prepare`, so it is planned with an upper bound and fixed up per shard."""
        n = int(np.prod(self.shape))
        nb = -(-n // block_size)
        k = self.weight_key
        out = [(k, ((n + 1) // 2, 1), np.dtype(np.uint8)),
               (k + ".absmax", (nb,), np.dtype(np.uint8 if dq_block_size else np.float32)),
               (k + ".quant_map", (16,), np.dtype(np.float32))]
        if dq_block_size:
            out += [(k + ".nested_absmax", (-(-nb // dq_block_size),), np.dtype(np.float32)),
                    (k + ".nested_quant_map", (256,), np.dtype(np.float32))]
        out.append((k + ".quant_state.bitsandbytes__" + fmt, (512,), np.dtype(np.uint8)))
        return out


def _np(x: Any, dtype: np.dtype) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.dtype(dtype)))


def _merged_weight(layer: Any, path: str) -> Callable[[], Any]:
    """``[out, in]`` float32 weight of a frozen/LoRA layer with its active, unmerged adapters folded in."""
    from qlora_jax.nnx import LoraLinear  # noqa: PLC0415

    if isinstance(layer, LoraLinear) and layer.row_ids is not None:
        raise ValueError(f"{path}: per-row adapters are active; choose one adapter with set_adapter first")

    def make():
        w = layer.dense_weight(jnp.float32)
        if isinstance(layer, LoraLinear):
            todo = [n for n in layer.active_names() if n not in layer.merged]
            if todo:
                w = w + layer.delta_weight(todo)
        return w
    return make


def _reusable(layer: Any, fmt: str, block_size: int, double_quant: bool) -> QuantizedArray | None:
    """The layer's own 4-bit base if it can be written as is (same settings, nothing to merge)."""
    from qlora_jax.nnx import LoraLinear  # noqa: PLC0415

    q = layer.base.get_value()
    if not isinstance(q, QuantizedArray):
        return None
    if isinstance(layer, LoraLinear) and [n for n in layer.active_names() if n not in layer.merged]:
        return None
    if (q.format, q.block_size, q.double_quant) != (fmt, block_size, double_quant):
        return None
    return q


def _plan(model: LlamaForCausalLM, dtype: np.dtype, quant: dict[str, Any] | None) -> list[LazyTensor]:
    from qlora_jax.nnx import QuantLinear  # noqa: PLC0415

    entries: list[LazyTensor] = []
    covered: set[int] = set()

    def dense(name: str, var: nnx.Variable, transpose: bool = False) -> None:
        covered.add(id(var))
        shape = tuple(var.get_value().shape)[::-1] if transpose else tuple(var.get_value().shape)

        def produce(var=var, transpose=transpose):
            v = var.get_value()
            return _np(v.T if transpose else v, dtype)
        entries.append(LazyTensor(name, shape, dtype, produce))

    def quantized(name: str, shape: tuple[int, int], make_float: Callable[[], Any], reuse: QuantizedArray | None):
        fmt, bs, dq = quant["format"], quant["block_size"], quant["double_quant"]

        def make() -> QuantizedArray:
            if reuse is not None:
                return dataclasses.replace(reuse, dtype=dtype.name)
            w = jnp.asarray(make_float(), jnp.float32)
            return _quantize(w.astype(jnp.dtype(dtype)), fmt, bs, dq, name=name)
        group = _BnbGroup(name, shape, make)
        for key, shp, dt in group.planned(fmt, bs, 256 if dq else None):
            entries.append(LazyTensor(key, shp, dt, lambda key=key, g=group: g.tensor(key), group))

    for path, node in nnx.iter_graph(model):
        p = ".".join(str(x) for x in path)
        if isinstance(node, QuantLinear):
            covered.update(id(v) for v in (node.base,))
            shape = (int(node.out_features), int(node.in_features))
            make = _merged_weight(node, p)
            head = p.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES
            if quant is not None and not head:
                quantized(p + ".weight", shape, make,
                          _reusable(node, quant["format"], quant["block_size"], quant["double_quant"]))
            else:
                entries.append(LazyTensor(p + ".weight", shape, dtype, lambda make=make: _np(make(), dtype)))
            if node.bias is not None:
                dense(p + ".bias", node.bias)
            for d in (node.lora_a, node.lora_b) if hasattr(node, "lora_a") else ():
                covered.update(id(v) for v in d.values())
        elif isinstance(node, nnx.Linear):
            head = p.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES
            shape = (int(node.out_features), int(node.in_features))
            if quant is not None and not head:
                covered.add(id(node.kernel))
                quantized(p + ".weight", shape, lambda node=node: node.kernel.get_value().T, None)
            else:
                dense(p + ".weight", node.kernel, transpose=True)
            if node.bias is not None:
                dense(p + ".bias", node.bias)
        elif isinstance(node, nnx.Embed):
            dense(p + ".weight", node.embedding)
        elif isinstance(node, RMSNorm):
            dense(p + ".weight", node.weight)
    left = [".".join(str(x) for x in path) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param) and id(node) not in covered]
    if left:
        raise ValueError(f"export_merged_hf: parameters {left[:5]} belong to no module this exporter knows "
                         f"(Linear, QuantLinear/LoraLinear, Embed, RMSNorm)")
    return entries


def _shards(entries: list[LazyTensor], limit: int) -> list[list[LazyTensor]]:
    """Splits entries into shards of at most ``limit`` bytes (a larger single tensor gets its own
    shard); the tensors of one 4-bit weight stay together."""
    units: list[list[LazyTensor]] = []
    for e in entries:
        if e.group is not None and units and units[-1][0].group is e.group:
            units[-1].append(e)
        else:
            units.append([e])
    shards: list[list[LazyTensor]] = [[]]
    size = 0
    for u in units:
        n = sum(e.nbytes for e in u)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].extend(u)
        size += n
    return shards


def _fix_group_shapes(shard: list[LazyTensor]) -> None:
    """Quantizes the shard's 4-bit weights and sets the JSON blobs' exact lengths."""
    for e in shard:
        if e.group is not None:
            e.group.prepare()
            e.shape = tuple(e.group.tensor(e.name).shape)
            e.dtype = e.group.tensor(e.name).dtype


# --------------------------------------------------------------------------------------------
# The exporter


def _write_tokenizer(src: Any, dst: Path) -> None:
    from qlora_jax.io.tokenizer import Tokenizer, save_tokenizer, tokenizer_from_gguf  # noqa: PLC0415

    if isinstance(src, Tokenizer):
        save_tokenizer(src, dst)
        return
    p = Path(os.fspath(src))
    if p.is_file() and p.suffix == ".gguf":
        save_tokenizer(tokenizer_from_gguf(p), dst)
        return
    if not p.is_dir():
        raise ValueError(f"tokenizer_src {p} is neither a tokenizer folder, a .gguf file nor a Tokenizer")
    found = [name for name in TOKENIZER_FILES if (p / name).is_file()]
    if "tokenizer.json" not in found and "tokenizer.model" not in found:
        raise ValueError(f"tokenizer_src {p} has no tokenizer.json or tokenizer.model")
    for name in found:
        shutil.copyfile(p / name, dst / name)


def _quant_settings(quantize: str | None, block_size: int, double_quant: bool) -> dict[str, Any] | None:
    if quantize is None:
        return None
    if quantize not in BNB_QUANT_TYPES:
        raise ValueError(f"export_merged_hf: quantize={quantize!r} has no bitsandbytes format; use one of "
                         f"{BNB_QUANT_TYPES} or None")
    if block_size not in _formats.BLOCK_SIZES:
        raise ValueError(f"export_merged_hf: block_size {block_size} is not one of {_formats.BLOCK_SIZES}")
    return {"format": quantize, "block_size": int(block_size), "double_quant": bool(double_quant)}


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, unit="tensor")


def export_merged_hf(model: LlamaForCausalLM, folder: str | os.PathLike, *, dtype: str = "bfloat16",
                     shard_size: int | str = "2GB", tokenizer_src: Any = None, quantize: str | None = None,
                     block_size: int = 64, double_quant: bool = True, overwrite: bool = False,
                     progress: bool = False) -> Path:
    """Writes ``model`` (adapters merged) as an HF folder that ``transformers`` loads.

    Each linear weight is ``deq(W) + Σ s·(A·B)ᵀ`` over the active, not yet merged adapters,
    computed in float32 from the same decoded base the adapters were trained on, then cast to
    ``dtype`` (or re-quantized with ``quantize``). The model itself is not changed.

    Args:
      model: our `LlamaForCausalLM`, with float, 4-bit (`QuantLinear`) and/or LoRA layers.
      folder: output folder (must not exist unless ``overwrite``).
      dtype: "bfloat16", "float16" or "float32": the dtype of every float tensor written (and
        ``config.json``'s ``dtype``; with ``quantize`` also ``bnb_4bit_compute_dtype``).
      shard_size: the most bytes a safetensors file holds, e.g. "2GB" (10^9) or "500MiB".
      tokenizer_src: a tokenizer folder (its files are copied), a ``.gguf`` file, a
        `qlora_jax.io.Tokenizer`, or None (no tokenizer files).
      quantize: None for a float export, or "nf4" / "fp4" for the bitsandbytes 4-bit format:
        every linear layer except the output head is written 4-bit (a 4-bit layer with nothing to
        merge and the same settings is written with its own bytes, untouched).
      block_size: 4-bit block size for layers that are (re-)quantized.
      double_quant: double-quantize the block scales of (re-)quantized layers.
      overwrite: replace an existing folder (only after the new one is complete).
      progress: show a tqdm progress bar.
    Returns:
      The folder.
    Raises:
      ValueError: an unsupported dtype / quantize / block size / size string, a model with
        per-row adapters or parameters of unknown modules, a non-finite merged weight when
        quantizing; FileExistsError for an existing folder. Nothing is written on failure.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"export_merged_hf expects a qlora_jax LlamaForCausalLM, got {type(model).__name__}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_merged_hf: dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    limit = parse_size(shard_size)
    quant = _quant_settings(quantize, block_size, double_quant)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    entries = _plan(model, np_dtype, quant)
    shards = _shards(entries, limit)
    config = model.config.to_hf()
    config["dtype"] = config["torch_dtype"] = dtype
    if quant is not None:
        config["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant["format"], "bnb_4bit_use_double_quant": quant["double_quant"],
            "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with staged_folder(folder, overwrite=overwrite) as tmp, \
            _progress(len(entries), progress, f"export {Path(os.fspath(folder)).name}") as bar:
        weight_map: dict[str, str] = {}
        total = 0
        for name, shard in zip(names, shards):
            _fix_group_shapes(shard)
            total += write_safetensors(tmp / name, shard, {"format": "pt"},
                                       on_tensor=(lambda _: bar.update(1)) if bar is not None else None)
            for e in shard:
                weight_map[e.name] = name
                if e.group is not None:
                    e.group.release()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if tokenizer_src is not None:
            _write_tokenizer(tokenizer_src, tmp)
    return Path(os.fspath(folder))
