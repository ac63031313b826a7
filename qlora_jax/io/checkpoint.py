"""Saving and restoring (partly) quantized parameter trees: one safetensors file, or an Orbax
checkpoint.

A tree is nested dicts / lists / tuples (a Flax NNX ``State`` is saved as its pure dict) whose
leaves are `QuantizedArray` nodes, dense arrays (jax or numpy), Python scalars, strings or None.
Both formats store the same two things:

- the arrays, named by their dot-joined path (``"layers.0.kernel"``); a `QuantizedArray` at path
  ``p`` becomes the arrays ``p.codes``, ``p.absmax`` and, with double quantization,
  ``p.absmax_scale`` and ``p.absmax_offset``;
- a JSON description of the tree (the "spec"): containers in order with their key types, each
  quantized leaf's static metadata (shape, dtype, format, block sizes), each dense leaf's shape
  and dtype, and the Python scalars. Zero-size arrays live in the spec only (Orbax cannot save
  them), so restoring needs no target tree and brings lists back as lists and ints as int keys.

Round trips are bit-exact. Loading checks every quantized leaf against its metadata
(`QuantizedArray.validate`) and every dense leaf against the spec, and names the leaf path in any
error.

The safetensors file is written by this module (the format is a little-endian u64 header length,
a JSON header, then the raw tensor bytes) because the ``safetensors`` package's numpy API cannot
handle bfloat16; the files are ordinary safetensors files, readable by any safetensors reader,
with the spec under the header metadata key ``"qlora_jax"``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quantize import QuantizedArray, is_quantized, tree_path_str

__all__ = [
    "save_safetensors",
    "load_safetensors",
    "load_safetensors_metadata",
    "save_orbax",
    "restore_orbax",
    "SPEC_KEY",
]

SPEC_KEY = "qlora_jax"  # header-metadata key (safetensors) / item name prefix of the tree spec
_SPEC_VERSION = 1
_QFIELDS = ("codes", "absmax", "absmax_scale", "absmax_offset")
_QMETA_KEYS = ("shape", "dtype", "format", "block_size", "dq_block_size")

# safetensors dtype names <-> numpy dtypes (bfloat16 and float8 come from ml_dtypes via jnp).
_ST_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "F16": np.dtype(np.float16),
    "BF16": jnp.dtype(jnp.bfloat16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64), "F8_E4M3": jnp.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": jnp.dtype(jnp.float8_e5m2),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 1 << 28


# --------------------------------------------------------------------------------------------
# Tree <-> (spec, named arrays)


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_nnx_variable(x: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")  # no import: if flax was never imported, x is no Variable
    return nnx is not None and isinstance(x, nnx.Variable)


def _array_spec(a: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in a.shape], "dtype": jnp.dtype(a.dtype).name}


def _flatten(tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (spec, arrays): the JSON-able description of ``tree`` and its non-empty arrays by name."""
    arrays: dict[str, Any] = {}

    def put(name: str, a: Any, where: str) -> None:
        if name in arrays:
            raise ValueError(f"two leaves map to the array name {name!r} (at {where!r}); "
                             f"rename a key so that dot-joined paths are unique")
        arrays[name] = a

    def walk(node: Any, path: str) -> dict[str, Any]:
        if _is_nnx_variable(node):  # (a Flax NNX State is a Mapping of these)
            get_value = getattr(node, "get_value", None)
            return walk(get_value() if callable(get_value) else node.value, path)
        if isinstance(node, QuantizedArray):
            fields = {}
            for f in _QFIELDS:
                a = getattr(node, f)
                if a is not None and not _is_array(a):
                    raise TypeError(f"quantized leaf {path!r}: field {f} is {type(a).__name__}, "
                                    f"expected an array (abstract trees cannot be saved)")
            node.validate(path)
            for f in _QFIELDS:
                a = getattr(node, f)
                if a is not None:
                    fields[f] = _array_spec(a)
                    put(_join(path, f), a, path)
            return {"t": "quantized", "name": path, "meta": node.metadata(), "fields": fields}
        if isinstance(node, Mapping):
            items = []
            for k, v in node.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"key {k!r} at {path!r} is {type(k).__name__}; only str and int "
                                    f"dict keys can be saved")
                items.append([k, walk(v, _join(path, str(k)))])
            return {"t": "dict", "items": items}
        if isinstance(node, (list, tuple)):
            kind = "list" if isinstance(node, list) else "tuple"
            return {"t": kind, "items": [walk(v, _join(path, str(i))) for i, v in enumerate(node)]}
        if node is None:
            return {"t": "none"}
        if _is_array(node):
            if not path:
                raise TypeError("cannot save a bare dense array: wrap it in a dict, e.g. {'w': x}")
            spec = {"t": "array", "name": path, **_array_spec(node)}
            if jnp.dtype(node.dtype) not in _ST_NAMES:
                raise TypeError(f"leaf {path!r} has dtype {node.dtype}, which cannot be saved; "
                                f"supported: {sorted(d.name for d in _ST_NAMES)}")
            if math.prod(node.shape) > 0:
                put(path, np.asarray(node) if isinstance(node, np.generic) else node, path)
            return spec
        if isinstance(node, (bool, int, float, str)):  # after arrays: np.float64 is a float
            return {"t": "scalar", "value": node}
        raise TypeError(f"leaf {path or '<root>'!r} is {type(node).__name__}; expected a dict, list, "
                        f"tuple, array, QuantizedArray, Python scalar or None")

    spec = {"version": _SPEC_VERSION, "tree": walk(tree, "")}
    return spec, arrays


def _check_meta(meta: Any, path: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or set(meta) != set(_QMETA_KEYS):
        raise ValueError(f"quantized leaf {path!r}: metadata {meta!r} does not have exactly the keys "
                         f"{list(_QMETA_KEYS)}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"quantized leaf {path!r}: metadata shape {shape!r} is not a list of ints")
    if not isinstance(meta["dtype"], str) or not isinstance(meta["format"], str):
        raise ValueError(f"quantized leaf {path!r}: metadata dtype/format must be strings, got "
                         f"{meta['dtype']!r}, {meta['format']!r}")
    return dict(meta, shape=tuple(shape))


def _unflatten(spec: Any, get: Callable[[str, dict[str, Any], str], Any]) -> Any:
    """Rebuilds the tree of ``spec``; ``get(name, array_spec, leaf_path)`` returns a stored array."""
    if not isinstance(spec, dict) or spec.get("version") != _SPEC_VERSION or "tree" not in spec:
        raise ValueError(f"unsupported or corrupt tree spec (expected version {_SPEC_VERSION})")

    def walk(node: Any, path: str) -> Any:
        kind = node.get("t") if isinstance(node, dict) else None
        if kind == "dict":
            return {k: walk(v, _join(path, str(k))) for k, v in node["items"]}
        if kind in ("list", "tuple"):
            items = [walk(v, _join(path, str(i))) for i, v in enumerate(node["items"])]
            return items if kind == "list" else tuple(items)
        if kind == "none":
            return None
        if kind == "scalar":
            return node["value"]
        if kind == "array":
            if math.prod(node["shape"]) == 0:
                return np.zeros(node["shape"], jnp.dtype(node["dtype"]))
            return get(node["name"], node, path)
        if kind == "quantized":
            meta = _check_meta(node.get("meta"), path)
            fields = node.get("fields", {})
            unknown = set(fields) - set(_QFIELDS)
            if unknown:
                raise ValueError(f"quantized leaf {path!r}: unknown fields {sorted(unknown)}")
            vals = {f: (get(_join(node["name"], f), fields[f], path) if f in fields else None)
                    for f in _QFIELDS}
            q = QuantizedArray(**vals, **meta)
            q.validate(path)
            return q
        raise ValueError(f"corrupt tree spec at {path or '<root>'!r}: {node!r:.200}")

    try:
        return walk(spec["tree"], "")
    except (KeyError, TypeError, AttributeError) as e:  # malformed spec JSON
        raise ValueError(f"corrupt tree spec: {type(e).__name__}: {e}") from e


def _check_loaded(a: Any, want: dict[str, Any], name: str, path: str) -> None:
    shape = tuple(want["shape"]) if "shape" in want else tuple(a.shape)
    dtype = jnp.dtype(want["dtype"]) if "dtype" in want else jnp.dtype(a.dtype)
    if tuple(a.shape) != shape or jnp.dtype(a.dtype) != dtype:
        raise ValueError(f"leaf {path!r}: array {name!r} has shape {tuple(a.shape)} dtype {a.dtype}, "
                         f"but the metadata says {shape} {dtype.name}")


def _to_jax(a: np.ndarray) -> Any:
    # With x64 disabled jax would silently narrow 64-bit arrays; keep those as numpy (bit-exact).
    if a.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        return a
    return jnp.asarray(a)


# --------------------------------------------------------------------------------------------
# safetensors


def save_safetensors(path: str | os.PathLike, tree: Any, metadata: Mapping[str, str] | None = None) -> None:
    """Saves a (partly) quantized pytree to one safetensors file, atomically.

    Args:
      path: the file to write. It is written to a temporary file in the same folder and renamed
        over ``path`` only when complete, so a failure never leaves a partial file nor touches an
        existing one.
      tree: nested dicts/lists/tuples (or a Flax NNX ``State``) of `QuantizedArray`, dense arrays
        of any safetensors dtype (bool, (u)int8..64, float16/bfloat16/float32/float64, float8),
        Python scalars, strings and None. Dict keys must be str or int.
      metadata: extra str -> str entries for the header metadata (read back with
        `load_safetensors_metadata`); the key ``"qlora_jax"`` is reserved.
    Raises:
      TypeError for unsupported leaves/keys/dtypes; ValueError for duplicate array names or a
      quantized leaf whose arrays do not fit its metadata.
    """
    path = Path(path)
    user_meta = dict(metadata or {})
    for k, v in user_meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
    if SPEC_KEY in user_meta:
        raise ValueError(f"metadata key {SPEC_KEY!r} is reserved for the tree description")
    spec, arrays = _flatten(tree)

    header: dict[str, Any] = {}
    offset = 0
    for name, a in arrays.items():
        nbytes = math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[jnp.dtype(a.dtype)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {**user_meta, SPEC_KEY: json.dumps(spec, separators=(",", ":"))}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes, as the reference writer does

    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_safetensors: folder {str(path.parent)!r} does not exist")
    # mkstemp makes the file 0600: give it the old file's mode, or the usual 0644 for a new one
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for a in arrays.values():  # one array on the host at a time
                a = np.asarray(a, order="C")
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                f.write(a.reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_header(f: Any, path: Path) -> tuple[dict[str, Any], int, int]:
    """Returns (header, data_start, data_len) after checking the file's framing."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{str(path)!r} is not a safetensors file: only {size} bytes")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"{str(path)!r} is not a safetensors file or is truncated: header length {n} "
                         f"but the file has {size} bytes")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a safetensors file: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file: header is not a JSON object")
    data_len = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[e["dtype"]]
            shape = [int(d) for d in e["shape"]]
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{str(path)!r}: malformed header entry for tensor {name!r}: "
                             f"{e!r:.200}") from None
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has data offsets {[begin, end]} that do "
                             f"not fit shape {shape} {dtype.name}")
        if end > data_len:
            raise ValueError(f"{str(path)!r} is truncated: tensor {name!r} ends at byte {end} of the data "
                             f"but only {data_len} bytes are present")
    return header, 8 + n, data_len


def _open_checked(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such safetensors file: {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    return path


def load_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Returns the header metadata of a safetensors file (str -> str), without the tree spec."""
    path = _open_checked(path)
    with open(path, "rb") as f:
        header, _, _ = _read_header(f, path)
    meta = header.get("__metadata__") or {}
    return {k: v for k, v in meta.items() if k != SPEC_KEY}


def load_safetensors(path: str | os.PathLike, *, as_numpy: bool = False) -> Any:
    """Loads a tree saved by `save_safetensors` (bit-exact), checking it on the way.

    Args:
      path: the file.
      as_numpy: return numpy arrays instead of jax arrays. Without it, arrays are placed on the
        default device, except 64-bit arrays while jax's x64 mode is off, which stay numpy so that
        no value is narrowed.
    Returns:
      The tree, with dicts/lists/tuples as saved and `QuantizedArray` leaves rebuilt. A
      safetensors file without a tree spec (e.g. a Hugging Face shard) loads as a flat
      ``{name: array}`` dict.
    Raises:
      FileNotFoundError if ``path`` does not exist; ValueError naming the file for a file that is
      not safetensors or is truncated, and naming the leaf for a missing tensor or one whose
      shape/dtype does not match the metadata.
    """
    path = _open_checked(path)
    with open(path, "rb") as f:
        header, start, _ = _read_header(f, path)

        def read(name: str) -> Any:
            e = header[name]
            dtype = _ST_DTYPES[e["dtype"]]
            begin, end = e["data_offsets"]
            out = np.empty([int(d) for d in e["shape"]], dtype)
            f.seek(start + begin)
            buf = out.reshape(-1).view(np.uint8)
            if f.readinto(memoryview(buf)) != end - begin:
                raise ValueError(f"{str(path)!r} is truncated while reading tensor {name!r}")
            return out if as_numpy else _to_jax(out)

        meta = header.get("__metadata__") or {}
        if SPEC_KEY not in meta:
            return {name: read(name) for name in header if name != "__metadata__"}
        try:
            spec = json.loads(meta[SPEC_KEY])
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(path)!r}: the {SPEC_KEY!r} metadata is not valid JSON ({e})") from None
        used: set[str] = set()

        def get(name: str, want: dict[str, Any], leaf: str) -> Any:
            if name not in header or name == "__metadata__":
                raise ValueError(f"{str(path)!r}: tensor {name!r} of leaf {leaf!r} is missing from the file")
            used.add(name)
            a = read(name)
            _check_loaded(a, want, name, leaf)
            return a

        try:
            tree = _unflatten(spec, get)
        except ValueError as e:
            if str(path) in str(e):
                raise
            raise ValueError(f"{str(path)!r}: {e}") from e
    extra = set(header) - used - {"__metadata__"}
    if extra:
        raise ValueError(f"{str(path)!r}: tensors {sorted(extra)[:10]} are not described by the "
                         f"{SPEC_KEY!r} metadata (file edited or corrupt)")
    return tree


# --------------------------------------------------------------------------------------------
# Orbax


def _ocp():
    import orbax.checkpoint as ocp  # deferred: orbax is slow to import and only needed here

    return ocp


def save_orbax(directory: str | os.PathLike, tree: Any, step: int = 0, *, manager: Any = None,
               wait: bool = True) -> None:
    """Saves a (partly) quantized pytree as step ``step`` of an Orbax checkpoint in ``directory``.

    The arrays go through ``ocp.args.StandardSave`` (item ``"state"``, a flat dict keyed by
    dot-joined paths) and the tree spec with the quantized leaves' static metadata through
    ``ocp.args.JsonSave`` (item ``"meta"``), so `restore_orbax` needs no target tree.

    Args:
      directory: the checkpoint root (one subfolder a step).
      tree: as for `save_safetensors`.
      step: the step number.
      manager: an ``orbax.checkpoint.CheckpointManager`` rooted at ``directory`` to save with (its
        options apply: retention, async); by default one is made and closed here.
      wait: block until the save is committed (default). With ``wait=False`` and your own
        manager, call ``manager.wait_until_finished()`` before reading the checkpoint.
    """
    ocp = _ocp()
    spec, arrays = _flatten(tree)
    items = {"meta": ocp.args.JsonSave(spec)}
    if arrays:  # Orbax refuses an empty item; a tree of scalars/empty arrays is all spec
        items["state"] = ocp.args.StandardSave(arrays)
    args = ocp.args.Composite(**items)
    if manager is not None:
        if Path(str(manager.directory)).resolve() != Path(directory).resolve():
            raise ValueError(f"save_orbax: the manager is rooted at {str(manager.directory)!r}, not "
                             f"{str(directory)!r}")
        manager.save(step, args=args)
        if wait:
            manager.wait_until_finished()
        return
    with ocp.CheckpointManager(Path(directory).resolve()) as mngr:
        mngr.save(step, args=args)
        mngr.wait_until_finished()


def _abstract(x: Any) -> Any:
    """The restore target of one array: a numpy array for numpy leaves and for 64-bit leaves while
    x64 is off (jax would narrow them), else a jax.ShapeDtypeStruct with the leaf's sharding
    (the default device's if it has none)."""
    dtype = jnp.dtype(x.dtype)
    if isinstance(x, np.ndarray) or (dtype.itemsize == 8 and not jax.config.jax_enable_x64):
        return np.empty(tuple(x.shape), dtype)
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(tuple(x.shape), dtype, sharding=sharding)


def _spec_leaves(node: dict[str, Any], path: str, out: dict[str, dict[str, Any]]) -> None:
    kind = node.get("t")
    if kind == "dict":
        for k, v in node["items"]:
            _spec_leaves(v, _join(path, str(k)), out)
    elif kind in ("list", "tuple"):
        for i, v in enumerate(node["items"]):
            _spec_leaves(v, _join(path, str(i)), out)
    elif kind != "none":
        out[path] = node


def restore_orbax(directory: str | os.PathLike, step: int | None = None, *, target: Any = None) -> Any:
    """Restores a tree saved by `save_orbax`, checking every quantized leaf against its metadata.

    Args:
      directory: the checkpoint root.
      step: the step to restore; by default the latest.
      target: optional tree of the same leaves (arrays, ``jax.ShapeDtypeStruct`` with or without
        a sharding, or `QuantizedArray` nodes of either, e.g. from ``jax.eval_shape``; a Flax NNX
        ``State`` works too). Arrays are restored with the target's shardings and the result has
        the target's pytree structure. Without it, arrays land on the default device and the tree
        is rebuilt from the saved spec (plain dicts/lists/tuples).
    Returns:
      The restored tree.
    Raises:
      FileNotFoundError when ``directory`` or the step does not exist; ValueError naming the
      path for a checkpoint whose arrays are missing/unreadable or do not match the saved
      metadata, and naming the leaf when ``target`` does not match what was saved.
    """
    ocp = _ocp()
    root = Path(directory).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no such Orbax checkpoint folder: {str(root)!r}")
    with ocp.CheckpointManager(root) as mngr:
        steps = list(mngr.all_steps())
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint steps in {str(root)!r}")
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"step {step} not found in {str(root)!r}; steps present: {sorted(steps)}")
        where = f"{str(root)!r} step {step}"
        try:
            spec = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a missing/garbled item
            raise ValueError(f"Orbax checkpoint {where}: cannot read the tree metadata item 'meta' "
                             f"({type(e).__name__}: {e})") from e
        if not isinstance(spec, dict) or "tree" not in spec:
            raise ValueError(f"Orbax checkpoint {where}: 'meta' is not a qlora_jax tree spec")
        saved: dict[str, dict[str, Any]] = {}
        try:
            _spec_leaves(spec["tree"], "", saved)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"Orbax checkpoint {where}: corrupt tree spec ({e})") from e

        # Arrays to restore, by name, with their abstract shapes: from the target if given,
        # else from the spec (with the default device's sharding).
        abstract: dict[str, Any] = {}
        target_leaves = treedef = None
        if target is not None:
            target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_quantized)
            tpaths = [tree_path_str(p) for p, _ in target_leaves]
            saved_leaves = {p for p, n in saved.items() if n.get("t") in ("array", "quantized")}
            missing, extra = saved_leaves - set(tpaths), set(tpaths) - set(saved)
            if missing or extra:
                raise ValueError(f"Orbax checkpoint {where}: target does not match the saved tree; "
                                 f"saved but not in target: {sorted(missing)[:10]}, in target but not "
                                 f"saved: {sorted(extra)[:10]}")
            for p, (_, leaf) in zip(tpaths, target_leaves):
                node = saved[p]
                if isinstance(leaf, QuantizedArray):
                    if node.get("t") != "quantized":
                        raise ValueError(f"leaf {p!r}: target is quantized but the checkpoint holds "
                                         f"a dense array")
                    meta = _check_meta(node.get("meta"), p)
                    if meta != dict(leaf.metadata(), shape=tuple(leaf.shape)):
                        raise ValueError(f"leaf {p!r}: target metadata {leaf.metadata()} differs from the "
                                         f"saved {node['meta']}")
                    for f in node.get("fields", {}):
                        abstract[_join(p, f)] = _abstract(getattr(leaf, f))
                elif node.get("t") == "array":
                    if list(leaf.shape) != node["shape"] or jnp.dtype(leaf.dtype).name != node["dtype"]:
                        raise ValueError(f"leaf {p!r}: target is {tuple(leaf.shape)} "
                                         f"{jnp.dtype(leaf.dtype).name} but the checkpoint holds "
                                         f"{tuple(node['shape'])} {node['dtype']}")
                    if math.prod(node["shape"]) > 0:
                        abstract[node["name"]] = _abstract(leaf)
                elif node.get("t") != "scalar":
                    raise ValueError(f"leaf {p!r}: target leaf {type(leaf).__name__} does not match the "
                                     f"saved {node.get('t')!r}")
        else:
            for p, node in saved.items():
                if node.get("t") == "array" and math.prod(node["shape"]) > 0:
                    abstract[node["name"]] = _abstract(jax.ShapeDtypeStruct(node["shape"], node["dtype"]))
                elif node.get("t") == "quantized":
                    for f, fs in node.get("fields", {}).items():
                        abstract[_join(node["name"], f)] = _abstract(
                            jax.ShapeDtypeStruct(fs["shape"], fs["dtype"]))
        arrays: dict[str, Any] = {}
        if abstract:
            try:
                arrays = mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract))).state
            except Exception as e:  # a deleted/garbled array file surfaces as many error types
                raise ValueError(f"Orbax checkpoint {where}: cannot restore the arrays "
                                 f"({type(e).__name__}: {str(e)[:500]})") from e

    def get(name: str, want: dict[str, Any], leaf: str) -> Any:
        if name not in arrays:
            raise ValueError(f"Orbax checkpoint {where}: array {name!r} of leaf {leaf!r} is missing")
        _check_loaded(arrays[name], want, name, leaf)
        return arrays[name]

    try:
        rebuilt = _unflatten(spec, get)
    except ValueError as e:
        raise ValueError(f"Orbax checkpoint {where}: {e}") from e
    if target is None:
        return rebuilt
    flat: dict[str, Any] = {}
    jax.tree_util.tree_map_with_path(
        lambda kp, x: flat.__setitem__(tree_path_str(kp), x), rebuilt, is_leaf=is_quantized)
    return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in tpaths])
