"""Checkpoints of a training run (Orbax) and small shareable adapter files (safetensors).

`CheckpointManager` saves, for a step, one Orbax checkpoint ``<directory>/<step>/`` with two items:

- ``state``: every array leaf of the `TrainState` (adapters, optimizer state, step counter, the
  dropout RNG streams, as raw key data) under the names ``leaf_00000, ...``;
- ``meta`` (JSON): the step, the leaves' tree paths (checked on restore), the data-iterator
  position, the run configuration and anything else the caller passes.

Orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp*`` and renames it when complete, so a
save killed midway leaves only a temporary folder that is never listed or restored: the previous
checkpoint stays the latest. Stale temporary folders are removed when a manager opens the folder.
Saves are asynchronous by default (device arrays are copied to host before `save` returns, so
the next train step may donate them); `wait` blocks until the writes are done.

`save_adapter` / `load_adapter` write / read just the LoRA weights (``adapter_model.safetensors``,
float32, flat names such as ``model.layers.0.self_attn.q_proj.lora_a.default``) and the
`LoraConfig` (``adapter_config.json``, PEFT field names), a few MB to share.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CheckpointManager", "Restored", "save_adapter", "load_adapter", "apply_adapter", "attach_adapter",
    "adapter_arrays", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_TMP_MARK = ".orbax-checkpoint-tmp"
_RESERVED_HEADER_KEYS = ("qlora_jax_adapter", "lora_config")


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only when checkpointing

    return ocp


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)``; typed PRNG keys become their raw uint32 key data."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [jax.random.key_data(x) if _is_key(x) else x for _, x in flat]
    return paths, leaves, treedef


def _restore_target(x: Any) -> Any:
    """Abstract restore target of a template leaf, in device memory (re-placed afterwards)."""
    data = jax.random.key_data(x) if _is_key(x) else x
    sharding = getattr(x, "sharding", None)
    if sharding is not None and getattr(sharding, "memory_kind", None) not in (None, "device"):
        sharding = sharding.with_memory_kind("device")
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


class Restored(NamedTuple):
    """What `CheckpointManager.restore` returns."""

    state: Any                       # the restored pytree, structured like ``state_like``
    step: int
    data: dict[str, Any] | None      # the data-iterator position saved with it
    config: dict[str, Any] | None    # the run configuration saved with it
    extra: dict[str, Any]            # anything else the caller saved


class CheckpointManager:
    """Keep-last-N Orbax checkpoints of a `TrainState` plus JSON metadata (see the module docstring).

    Args:
      directory: root folder (created).
      max_to_keep: newest checkpoints kept (older ones are deleted); None keeps all.
      async_save: write in a background thread.
      save_interval_steps: `save` skips steps that are not multiples of this (unless forced).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, save_interval_steps: int = 1):
        ocp = _ocp()
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = Path(os.fspath(directory)).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            for p in self.directory.iterdir():  # leftovers of a save that was killed midway
                if _TMP_MARK in p.name and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._mngr.all_steps())

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state: Any, *, data: Mapping[str, Any] | None = None,
             config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Start saving ``state`` (any pytree, e.g. a `TrainState`) as checkpoint ``step``.

        ``data`` (the iterator position), ``config`` and ``extra`` must be JSON-serializable.
        Returns True if a save was started (False when ``save_interval_steps`` skips the step).
        """
        ocp = _ocp()
        paths, leaves, _ = _flatten(state)
        meta = {"step": int(step), "paths": paths, "shapes": [list(np.shape(x)) for x in leaves],
                "dtypes": [str(np.dtype(x.dtype)) for x in leaves], "data": None if data is None else dict(data),
                "config": None if config is None else dict(config), "extra": dict(extra or {})}
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"checkpoint metadata (data/config/extra) must be JSON-serializable: {e}") from None
        items = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
        return bool(self._mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)), force=force))

    def restore(self, state_like: Any, step: int | None = None) -> Restored:
        """Restore checkpoint ``step`` (default: the latest) into the structure of ``state_like``.

        ``state_like`` is a pytree with the same structure, shapes and dtypes as the saved state
        (e.g. a freshly initialized `TrainState`); restored leaves get its shardings and memory
        kinds (an offloaded optimizer state comes back in host memory).

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          ValueError: the saved tree's paths or shapes differ from ``state_like``'s.
        """
        ocp = _ocp()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(available: {self.all_steps()})")
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        paths, _, treedef = _flatten(state_like)
        raw_templ = jax.tree_util.tree_leaves(state_like)
        if meta["paths"] != paths:
            saved, want = set(meta["paths"]), set(paths)
            raise ValueError(f"checkpoint {step} in {self.directory} does not match the training state: "
                             f"missing {sorted(want - saved)[:5]}, unexpected {sorted(saved - want)[:5]} "
                             f"({len(meta['paths'])} saved leaves, {len(paths)} expected)")
        target = {f"leaf_{i:05d}": _restore_target(x) for i, x in enumerate(raw_templ)}
        for i, p in enumerate(paths):  # checked before reading, so a mismatch reads nothing
            want = target[f"leaf_{i:05d}"]
            saved = (tuple(meta["shapes"][i]), meta["dtypes"][i]) if "shapes" in meta else None
            if saved is not None and saved != (tuple(want.shape), str(np.dtype(want.dtype))):
                raise ValueError(f"checkpoint {step} in {self.directory} does not match the training state: "
                                 f"leaf {p} was saved as {saved[1]}{list(saved[0])}, the state has "
                                 f"{np.dtype(want.dtype)}{list(want.shape)}")
        got = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        leaves = []
        for i, t in enumerate(raw_templ):
            x = got[f"leaf_{i:05d}"]
            if _is_key(t):
                x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
            sharding = getattr(t, "sharding", None)
            leaves.append(jax.device_put(x, sharding) if sharding is not None else x)
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        return Restored(state=state, step=int(meta["step"]), data=meta.get("data"),
                        config=meta.get("config"), extra=meta.get("extra") or {})

    def restore_latest(self, state_like: Any) -> Restored | None:
        """`restore` of the latest checkpoint, or None when there is none (a fresh run)."""
        if self.latest_step() is None:
            return None
        return self.restore(state_like)

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Adapter files


def _pure_dict(state: Any) -> Any:
    """Nested dicts of arrays of an ``nnx.State`` (other trees pass through)."""
    if isinstance(state, nnx.State):
        return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
    return state


def adapter_arrays(lora_state: Any) -> dict[str, np.ndarray]:
    """Flat ``{dot.path: float32 numpy array}`` of an ``nnx.State`` of LoRA params (or a model)."""
    if isinstance(lora_state, nnx.Module):
        lora_state = nnx.state(lora_state, nnx.LoRAParam)
    pure = _pure_dict(lora_state)
    flat, _ = jax.tree_util.tree_flatten_with_path(pure)
    out = {}
    for path, x in flat:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[name] = np.asarray(jnp.asarray(x, jnp.float32))
    if not out:
        raise ValueError("no LoRA params to save (inject adapters first)")
    return out


def save_adapter(path: str | os.PathLike, lora_state: Any, config: Any = None, *,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``path/adapter_model.safetensors`` (float32 LoRA weights) and
    ``path/adapter_config.json`` (``config.to_dict()`` if it has one, else the mapping given).

    ``lora_state`` is an ``nnx.State`` of LoRA params, a pure dict, or a model (its
    ``nnx.LoRAParam`` state is taken). ``metadata`` values (JSON-serializable) go into the file
    header; `attach_adapter` reads ``quant_format``, ``double_quant`` and ``block_size`` from it.
    Returns the folder.
    """
    from safetensors.numpy import save_file

    folder = Path(os.fspath(path))
    folder.mkdir(parents=True, exist_ok=True)
    arrays = adapter_arrays(lora_state)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    header = {"qlora_jax_adapter": "1", "lora_config": json.dumps(cfg)}
    for k, v in (metadata or {}).items():
        if k in _RESERVED_HEADER_KEYS:
            raise ValueError(f"metadata key {k!r} is reserved")
        header[str(k)] = json.dumps(v)
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file(arrays, str(tmp), metadata=header)
    os.replace(tmp, folder / ADAPTER_WEIGHTS)  # never a half-written adapter file
    with open(folder / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return folder


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """``(arrays, config_dict, metadata)`` from a folder written by `save_adapter` (or the file).

    ``metadata`` is the extra header metadata given to `save_adapter` (JSON values decoded).

    Raises:
      FileNotFoundError: no adapter file there.
      ValueError: the file cannot be read as safetensors.
    """
    from safetensors import safe_open

    p = Path(os.fspath(path))
    file = p / ADAPTER_WEIGHTS if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no adapter file at {file}")
    try:
        with safe_open(str(file), framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            header = dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{file}: not a readable safetensors adapter ({type(e).__name__}: {e})") from None
    cfg_file = file.parent / ADAPTER_CONFIG
    if cfg_file.is_file():
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        cfg = json.loads(header.get("lora_config", "{}"))
    meta = {}
    for k, v in header.items():
        if k in _RESERVED_HEADER_KEYS:
            continue
        try:
            meta[k] = json.loads(v)
        except (TypeError, ValueError):
            meta[k] = v
    return arrays, cfg, meta


def attach_adapter(model: nnx.Module, path: str | os.PathLike, *, quantize: Any = "saved",
                   compute_dtype: Any = jnp.bfloat16, adapter_name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Inject the adapter saved at ``path`` into ``model`` (in place) and load its weights.

    Args:
      model: a float model with its original ``nnx.Linear`` layers, or a model that already holds
        adapters (its layers keep their base; ``quantize`` then only applies to float layers).
      path: a folder written by `save_adapter`.
      quantize: a ``QuantPolicy`` or None for the base; ``"saved"`` uses the ``format`` /
        ``double_quant`` recorded with the adapter (NF4+DQ if none was recorded).
      compute_dtype: matmul dtype of the adapted layers.
      adapter_name: None (default) loads the file as it was saved (adapter ``"default"``, every
        saved param). A name loads the file's LoRA A/B weights as a new adapter of that name, next
        to the adapters the model already has (several trained adapters in one model); the file
        must then hold the A/B weights of exactly one adapter and nothing else.
    Returns:
      ``(LoraConfig, metadata)``; the new adapter is active.
    Raises:
      ValueError: with ``adapter_name``, a file holding other params (``modules_to_save``) or
        several adapters, or a name already in use (see `qlora_jax.nnx.inject`).
    """
    from qlora_jax import nnx as qnnx  # noqa: PLC0415 - avoid an import cycle at module load
    from qlora_jax.lora import LoraConfig
    from qlora_jax.quantize import QuantPolicy

    arrays, cfg, meta = load_adapter(path)
    if quantize == "saved":
        fmt = meta.get("quant_format", "nf4")
        quantize = None if fmt == "none" else QuantPolicy(format=fmt, double_quant=bool(meta.get("double_quant", True)),
                                                        block_size=int(meta.get("block_size", 64)))
    lcfg = LoraConfig.from_dict(cfg)
    if adapter_name is None:
        qnnx.inject(model, lcfg, quantize=quantize, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
        apply_adapter(model, arrays)
        return lcfg, meta
    weights = _layer_weights(arrays, path)  # checked before the model is touched
    qnnx.inject(model, lcfg, quantize=quantize, compute_dtype=compute_dtype, rngs=nnx.Rngs(0),
                adapter_name=adapter_name)
    qnnx.load_adapter_weights(model, weights, adapter_name)
    return lcfg, meta


def _layer_weights(arrays: Mapping[str, np.ndarray], where: Any) -> dict[str, dict[str, np.ndarray]]:
    """``{layer path: {"lora_a", "lora_b"}}`` from flat ``<layer>.lora_{a,b}.<adapter>`` names of one
    adapter (the layout `qlora_jax.nnx.load_adapter_weights` takes)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    names, other = set(), []
    for key, arr in arrays.items():
        layer, _, rest = key.rpartition(".lora_")
        which, _, name = rest.partition(".")
        if not layer or which not in ("a", "b") or not name or "." in name:
            other.append(key)
            continue
        names.add(name)
        out.setdefault(layer, {})["lora_" + which] = arr
    if other:
        raise ValueError(f"{where}: holds params other than LoRA A/B weights ({other[:3]}); load it with "
                         f"adapter_name=None into a model without adapters")
    if len(names) != 1:
        raise ValueError(f"{where}: holds {len(names)} adapters {sorted(names)}; adapter_name needs exactly one")
    half = [p for p, w in out.items() if len(w) != 2]
    if half:
        raise ValueError(f"{where}: layers with only one of lora_a / lora_b: {half[:3]}")
    return out


def apply_adapter(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Set ``model``'s LoRA params (in place) from `adapter_arrays` / `load_adapter` output.

    Raises:
      ValueError: names missing from or unknown to the model, or shapes that differ (both named).
    """
    state = nnx.state(model, nnx.LoRAParam)
    have = adapter_arrays(state)
    missing = sorted(set(have) - set(arrays))
    unknown = sorted(set(arrays) - set(have))
    if missing or unknown:
        raise ValueError(f"adapter does not fit the model: missing {missing[:5]} ({len(missing)}), "
                         f"unknown {unknown[:5]} ({len(unknown)})")
    bad = [f"{k}: {np.shape(arrays[k])} vs model {have[k].shape}" for k in have
           if tuple(np.shape(arrays[k])) != tuple(have[k].shape)]
    if bad:
        raise ValueError(f"adapter shapes do not match the model: {bad[:5]}")
    pure = _pure_dict(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p) for p, _ in flat]
    new = [jnp.asarray(arrays[n], dtype=x.dtype) for n, (_, x) in zip(names, flat)]
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
    nnx.update(model, state)
