"""Many devices: partition rules for QLoRA training state over a ``jax.sharding.Mesh``.

The mesh has up to three named axes (`AXES`)::

    data    pure data parallelism: parameters are replicated along it, the batch is split
    fsdp    fully sharded data parallelism: the batch is split, and so is every large leaf
            (4-bit bases, adapters, their optimizer state, embeddings)
    tensor  optional tensor parallelism: each adapted linear layer's output features are split

The batch is split over ``("data", "fsdp")`` along its first (row) axis. XLA inserts every
collective (all-gathers of the sharded bases before use, reduce-scatters of the gradients);
there is no hand-written communication. A 4-bit base is gathered as its packed codes and
scales, not decoded: `make_sharded_train_step` traces the step inside `qlora_jax.ops.on_mesh`,
under which each matmul constrains its weight's fields to `gathered_spec` (the ``fsdp`` split
undone) right before decoding them, so the all-gather moves uint8 codes (1/4 of the bytes of
the bfloat16 weight, 1/8 of float32) next to the layer that uses them; its adapters are
gathered there too. The same program runs on one host with several devices or on several
hosts after ``jax.distributed.initialize()``: with several processes, placement goes through
``jax.make_array_from_callback`` / ``jax.make_array_from_process_local_data``, which each
process calls for its own devices (one process uses ``jax.device_put``).

The rules read shapes and paths only, so they also run on an abstract state (``nnx.eval_shape``)
before anything is materialised. Dropout masks drawn with JAX's default (partitionable
threefry) PRNG are the same sharded or not, so a sharded step matches the single-device step.

Rules (see `partition_specs`):

- A `QuantizedArray` (flat packed ``codes`` uint8 ``[ceil(n/2)]``, ``absmax`` ``[n_blocks]``,
  ``absmax_scale`` ``[ceil(n_blocks/dq_block_size)]``, ``absmax_offset`` ``[]``) is split into
  ``k`` equal contiguous ranges of *whole quantization blocks*: device ``i`` holds the codes of
  blocks ``[i*n_blocks/k, (i+1)*n_blocks/k)`` and exactly the absmax values of those blocks, so
  it decodes its range with no communication. The second-level scales are split the same way
  when every range holds whole double-quantization blocks, and replicated otherwise (they are
  ``1/dq_block_size`` of the absmax values); the offset is replicated. A leaf whose element
  count is not a whole number of blocks, or whose block count ``k`` does not divide, is
  replicated entirely. ``k`` is the product of the ``tensor`` and ``fsdp`` sizes, falling back to
  ``fsdp`` alone, then ``tensor`` alone. For a base ``W [N, K]`` (blocks along ``K``) a
  contiguous range of the flat array is a range of output rows when ``N % k == 0``, which is
  what tensor parallelism splits. Stacked leaves (`qlora_jax.models.build.stack_layers`:
  fields with a leading ``[num_layers]`` axis) are split the same way along their last axis.
- Dense leaves (adapters, embeddings, norms, unquantized kernels) with at least
  ``min_shard_size`` elements are split over ``fsdp`` along their largest dimension that
  ``fsdp`` divides; smaller or indivisible leaves are replicated. With a ``tensor`` axis, LoRA
  ``lora_b [r, N]`` is split along ``N`` over ``tensor`` (and ``fsdp``), like its base's rows.
- Optimizer state: each leaf that mirrors a parameter (Adam's ``mu``, ``nu``, accumulated
  gradients) gets that parameter's sharding; counters are replicated.
- Step counter and dropout RNG streams: replicated.

Typical use::

    graphdef, state, frozen, _ = train.init_train_state(model, tx)
    mesh = make_mesh("data=2,fsdp=4")
    run = shard_training(state, frozen, tx, mesh)      # train_shardings + place
    step = make_sharded_train_step(graphdef, tx, run.shardings, offload=run.offload)
    state, frozen = run.state, run.frozen
    state, metrics = step(state, frozen, shard_batch(batch, mesh))

A checkpoint written by `qlora_jax.train.CheckpointManager` from a sharded state restores onto
any other mesh (or one device): pass a template placed with the new mesh's shardings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax import ops
from qlora_jax.quantize import QuantizedArray, is_quantized, tree_path_str
from qlora_jax.train.optim import OffloadConfig, offload_shardings, to_memory
from qlora_jax.train.step import TrainState, make_train_step

__all__ = [
    "AXES", "BATCH_AXES", "DEFAULT_MIN_SHARD_SIZE", "TrainShardings", "ShardedTraining",
    "parse_mesh", "make_mesh", "mesh_sizes", "quantized_spec", "gathered_spec", "dense_spec", "partition_specs",
    "tree_shardings", "opt_state_shardings", "train_shardings", "batch_sharding", "place",
    "replicate", "shard_batch", "check_batch", "shard_training", "make_sharded_train_step", "to_host",
    "bytes_per_device",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Dense leaves smaller than this (elements) stay replicated: splitting a norm vector costs a
# collective per use and saves almost nothing.
DEFAULT_MIN_SHARD_SIZE = 1 << 14
_LORA_B = re.compile(r"(^|\.)lora_b(\.|$)")


# --------------------------------------------------------------------------------------------
# Meshes


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=4[,tensor=1]"`` -> ``{"data": 2, "fsdp": 4, ...}``.

    One size may be ``-1``: it takes the devices the other axes leave (see `make_mesh`).

    Raises:
      ValueError: an entry is not ``name=int``, a name is repeated or not one of `AXES`.
    """
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, eq, size = part.partition("=")
        name = name.strip()
        try:
            value = int(size) if eq else None
        except ValueError:
            value = None
        if value is None:
            raise ValueError(f"mesh spec {spec!r}: entry {part!r} is not name=size (e.g. 'data=2,fsdp=4')")
        if name in out:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        out[name] = value
    _check_axis_names(out)
    return out


def _check_axis_names(names: Sequence[str] | Mapping[str, Any]) -> None:
    unknown = [n for n in names if n not in AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; the axes are {AXES} "
                         f"(data: replicas, fsdp: sharded parameters, tensor: split layers)")


def make_mesh(axes: Mapping[str, int] | str, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` (absent axes have size 1).

    Args:
      axes: sizes by axis name, or a `parse_mesh` string. One size may be ``-1`` (the rest).
      devices: the devices to use (default: all of them, ``jax.devices()``, every process's).
    Returns:
      A ``Mesh`` whose devices are in ``(process_index, id)`` order reshaped to
      ``(data, fsdp, tensor)``: trailing axes vary fastest, so ``tensor`` and then ``fsdp``
      stay within one host when their product divides the devices a host has. Put the
      parallelism that crosses hosts on ``data``.
    Raises:
      ValueError: unknown axis names, sizes < 1 (other than one -1), or a product of sizes
        that differs from the number of devices.
    """
    sizes = dict(parse_mesh(axes) if isinstance(axes, str) else axes)
    _check_axis_names(sizes)
    devs = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    fill = [n for n, s in sizes.items() if s == -1]
    bad = {n: s for n, s in sizes.items() if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1)}
    if bad or len(fill) > 1:
        raise ValueError(f"mesh sizes must be integers >= 1 (one may be -1 for 'the rest'), got {sizes}")
    if fill:
        rest = math.prod(s for s in sizes.values() if s != -1)
        if len(devs) % rest:
            raise ValueError(f"mesh {sizes}: {len(devs)} devices are not a multiple of {rest}")
        sizes[fill[0]] = len(devs) // rest
    shape = tuple(int(sizes.get(n, 1)) for n in AXES)
    if math.prod(shape) != len(devs):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                         f"there are {len(devs)}")
    # Auto axes (the Mesh default): shardings are propagated by XLA, as jit always did.
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES)


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """``{axis: size}`` of a mesh (or a mapping), checking that every axis name is one of `AXES`."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    _check_axis_names(sizes)
    return {n: int(s) for n, s in sizes.items()}


def _axes_over(sizes: Mapping[str, int], names: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """The axes of ``names`` that split anything (size > 1), and the product of their sizes."""
    used = tuple(n for n in names if sizes.get(n, 1) > 1)
    return used, math.prod(sizes[n] for n in used)


def _entry(axes: tuple[str, ...]) -> Any:
    """A PartitionSpec entry: one name, or a tuple of names (major axis first)."""
    return axes[0] if len(axes) == 1 else axes


# --------------------------------------------------------------------------------------------
# Partition rules


def quantized_spec(q: QuantizedArray, sizes: Mapping[str, int]) -> QuantizedArray:
    """The `QuantizedArray` of PartitionSpecs for ``q`` (same static fields, specs as children).

    ``codes`` and ``absmax`` are split over the first of ``(tensor, fsdp)``, ``(fsdp,)``,
    ``(tensor,)`` whose total size ``k`` divides ``q.n_blocks`` (when ``q.size`` is a whole
    number of blocks); ``absmax_scale`` is split the same way when ``n_blocks / k`` is a multiple
    of ``dq_block_size``, replicated otherwise; ``absmax_offset`` is replicated. With no fitting
    axes every field is replicated (``P()``).

    A stacked leaf (fields ``[num_layers, ...]``, `qlora_jax.models.build.stack_layers`; the
    metadata describes one layer) gets the same split on its last axis, ``None`` before it.

    Args:
      q: the quantized leaf (only its shapes are read).
      sizes: ``{axis: size}``, e.g. `mesh_sizes` of the mesh.
    """
    _check_axis_names(sizes)
    whole_blocks = q.size % q.block_size == 0
    lead = (None,) * max(len(np.shape(q.codes)) - 1, 0)
    for names in (("tensor", "fsdp"), ("fsdp",), ("tensor",)):
        axes, k = _axes_over(sizes, names)
        if not axes or not whole_blocks or q.n_blocks % k:
            continue
        split = P(*lead, _entry(axes))
        scale = None
        if q.absmax_scale is not None:
            scale = split if (q.n_blocks // k) % q.dq_block_size == 0 else P()
        return dataclasses.replace(q, codes=split, absmax=split, absmax_scale=scale,
                                   absmax_offset=None if q.absmax_offset is None else P())
    return _replicated_like(q)


def gathered_spec(q: QuantizedArray, sizes: Mapping[str, int]) -> QuantizedArray:
    """The PartitionSpecs that ``q`` is decoded with for a matmul: `quantized_spec` with the
    ``fsdp`` axis taken out of every field (a ``tensor`` split is kept, ``data`` never splits a
    weight). `qlora_jax.ops` constrains the fields to it before decoding, so that the all-gather
    FSDP needs moves the packed codes and scales, not the decoded weight.

    Args:
      q: the quantized leaf (only its shapes are read).
      sizes: ``{axis: size}``, e.g. `mesh_sizes` of the mesh.
    """
    spec = quantized_spec(q, sizes)

    def drop(p: P | None) -> P | None:
        if p is None:
            return None
        out = []
        for e in p:
            kept = tuple(n for n in (e if isinstance(e, tuple) else (e,)) if n is not None and n != "fsdp")
            out.append(_entry(kept) if kept else None)
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    return dataclasses.replace(spec, codes=drop(spec.codes), absmax=drop(spec.absmax),
                               absmax_scale=drop(spec.absmax_scale), absmax_offset=drop(spec.absmax_offset))


def _replicated_like(q: QuantizedArray) -> QuantizedArray:
    return dataclasses.replace(q, codes=P(), absmax=P(),
                               absmax_scale=None if q.absmax_scale is None else P(),
                               absmax_offset=None if q.absmax_offset is None else P())


def dense_spec(shape: Sequence[int], sizes: Mapping[str, int], *, path: str = "",
               min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
    """The PartitionSpec of a dense leaf of ``shape`` at ``path`` (see the module docstring).

    With a ``tensor`` axis, a LoRA ``lora_b`` ``[r, N]`` (path containing ``.lora_b``) is split
    along ``N`` over ``(tensor, fsdp)``, or ``tensor`` alone, whichever divides ``N`` first.
    Otherwise the largest dimension that the ``fsdp`` size divides is split over ``fsdp``
    (the first such dimension on ties); leaves below ``min_shard_size`` elements, scalars and
    leaves with no divisible dimension are replicated.
    """
    _check_axis_names(sizes)
    shape = tuple(int(d) for d in shape)
    if not shape or math.prod(shape) < min_shard_size:
        return P()
    if _LORA_B.search(path):
        for names in (("tensor", "fsdp"), ("tensor",)):
            axes, k = _axes_over(sizes, names)
            if "tensor" in axes and shape[-1] % k == 0:
                return P(*([None] * (len(shape) - 1)), _entry(axes))
    axes, k = _axes_over(sizes, ("fsdp",))
    if not axes:
        return P()
    fits = [d for d in range(len(shape)) if shape[d] % k == 0]
    if not fits:
        return P()
    d = max(fits, key=lambda i: (shape[i], -i))
    return P(*[axes[0] if i == d else None for i in range(len(shape))])


def partition_specs(tree: Any, mesh: Mesh | Mapping[str, int], *,
                    min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
    """PartitionSpecs for every leaf of ``tree`` (params, frozen state, any pytree of arrays).

    Returns a tree of the same structure: a `QuantizedArray` becomes a `QuantizedArray` of specs
    (`quantized_spec`), every other array leaf a ``PartitionSpec`` (`dense_spec`, by its path).
    """
    sizes = mesh_sizes(mesh)

    def leaf(path, x):
        if is_quantized(x):
            return quantized_spec(x, sizes)
        return dense_spec(np.shape(x), sizes, path=tree_path_str(path), min_shard_size=min_shard_size)

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=is_quantized)


def _to_shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def tree_shardings(tree: Any, mesh: Mesh, *, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
    """``NamedSharding``s on ``mesh`` for every array leaf of ``tree`` (`partition_specs`)."""
    return _to_shardings(partition_specs(tree, mesh, min_shard_size=min_shard_size), mesh)


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings of ``opt_state``: a leaf mirroring a parameter gets that parameter's sharding
    (found with ``optax.tree_utils.tree_map_params``); every other leaf is replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, opt_state, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (axis 0) split over ``("data", "fsdp")``, the other axes replicated; any rank >= 1."""
    axes, _ = _axes_over(mesh_sizes(mesh), BATCH_AXES)
    return NamedSharding(mesh, P(_entry(axes)) if axes else P())


class TrainShardings(NamedTuple):
    """What `train_shardings` returns."""

    state: TrainState      # a TrainState of NamedShardings
    frozen: Any            # the frozen state's structure, NamedShardings (QuantizedArray of them)
    batch: NamedSharding   # for every batch array: rows over (data, fsdp)


def train_shardings(state: TrainState, frozen: Any, optimizer: optax.GradientTransformation,
                    mesh: Mesh, *, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> TrainShardings:
    """Shardings on ``mesh`` of a `TrainState`, the frozen state and batches (module docstring).

    Args:
      state, frozen: from `qlora_jax.train.init_train_state` (only shapes and paths are read).
      optimizer: the optimizer that made ``state.opt_state``.
      mesh: from `make_mesh` (axis names from `AXES`).
      min_shard_size: dense leaves with fewer elements are replicated.
    """
    params = tree_shardings(state.params, mesh, min_shard_size=min_shard_size)
    replicated = NamedSharding(mesh, P())
    st = TrainState(step=replicated, params=params,
                    opt_state=opt_state_shardings(optimizer, state.opt_state, params, mesh),
                    rngs=jax.tree.map(lambda _: replicated, state.rngs))
    return TrainShardings(st, tree_shardings(frozen, mesh, min_shard_size=min_shard_size),
                          batch_sharding(mesh))


# --------------------------------------------------------------------------------------------
# Placement


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _on_cpu(x: Any) -> bool:
    return isinstance(x, jax.Array) and all(d.platform == "cpu" for d in x.devices())


def _place_leaf(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and \
            x.sharding.is_equivalent_to(sharding, x.ndim):
        return x  # already there (e.g. built straight into its shards): no copy
    if jax.process_count() == 1:
        if _on_cpu(x) and not _is_key(x):
            # Host memory either way: slicing a numpy view avoids compiling a reshard program
            # for every leaf shape (accelerators keep the on-device path).
            x = np.asarray(x)
        return jax.device_put(x, sharding)
    # Several processes: each builds the shards of its own devices from its copy of ``x``
    # (every process holds the same value), with no cross-process traffic and no equality check.
    if _is_key(x):
        data = _place_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, shardings: Any) -> Any:
    """``tree`` with every array leaf placed with its sharding (``shardings`` is a tree of the
    same structure, or one sharding for all leaves).

    In a multi-process run every process passes the same (host-local) values; each places the
    shards of its own devices. A leaf already laid out as its sharding says is returned as is.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _place_leaf(x, shardings), tree)
    return jax.tree.map(_place_leaf, tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` replicated on every device of ``mesh`` (e.g. evaluation batches of any size)."""
    return place(tree, NamedSharding(mesh, P()))


def check_batch(batch: Mapping[str, Any], mesh: Mesh, *, process_local: bool = False) -> int:
    """The global row count of ``batch``, after checking that ``(data, fsdp)`` divides it.

    Raises:
      ValueError: arrays of different row counts, scalars, or a row count the batch axes do
        not divide (the message names the sizes).
    """
    rows = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in batch.items()}
    if None in rows.values() or len(set(rows.values())) != 1:
        raise ValueError(f"batch arrays must share their first (row) dimension, got {rows}")
    n = next(iter(rows.values())) * (jax.process_count() if process_local else 1)
    axes, k = _axes_over(mesh_sizes(mesh), BATCH_AXES)
    if n % k:
        where = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(f"batch of {n} rows cannot be split over the batch axes ({where} = {k} "
                         f"devices); use a batch size that is a multiple of {k}")
    return n


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, process_local: bool = False) -> dict[str, jax.Array]:
    """Global arrays of a batch, rows split over ``("data", "fsdp")``.

    Args:
      batch: ``{name: [B, ...] array}``, e.g. from `qlora_jax.data.BatchIterator`.
      mesh: the training mesh.
      process_local: False: ``batch`` holds all ``B`` rows (the same on every process).
        True: it holds this process's ``B / process_count`` rows
        (``jax.make_array_from_process_local_data``), for loaders that read only their share.
    Raises:
      ValueError: see `check_batch`.
    """
    check_batch(batch, mesh, process_local=process_local)
    sharding = batch_sharding(mesh)
    if process_local:
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
    return place(dict(batch), sharding)


# --------------------------------------------------------------------------------------------
# Training


class ShardedTraining(NamedTuple):
    """What `shard_training` returns."""

    state: TrainState                 # placed with shardings.state (optimizer state maybe in host memory)
    frozen: Any                       # placed with shardings.frozen
    shardings: TrainShardings
    offload: tuple[Any, Any] | None   # (host, device) shardings of the optimizer state, or None


def shard_training(state: TrainState, frozen: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                   offload: OffloadConfig | None = None,
                   min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> ShardedTraining:
    """Place a freshly initialized training run on ``mesh`` (`train_shardings` + `place`).

    Args:
      state, frozen: from ``qlora_jax.train.init_train_state(model, optimizer)`` (without offload).
      optimizer: the optimizer of ``state``.
      mesh: from `make_mesh`.
      offload: keep the (sharded) optimizer state in host memory between steps; ``offload`` of
        the result is then the pair that `make_sharded_train_step` takes (None if the platform
        lacks the memory kind, with a warning).
      min_shard_size: dense leaves with fewer elements are replicated.
    """
    sh = train_shardings(state, frozen, optimizer, mesh, min_shard_size=min_shard_size)
    state, frozen = place(state, sh.state), place(frozen, sh.frozen)
    pair = offload_shardings(state.opt_state, offload)
    if pair is not None:
        state = dataclasses.replace(state, opt_state=to_memory(state.opt_state, pair[0]))
    return ShardedTraining(state, frozen, sh, pair)


def make_sharded_train_step(graphdef: Any, optimizer: optax.GradientTransformation,
                            shardings: TrainShardings, *, offload: tuple[Any, Any] | None = None,
                            donate: bool = True, **kwargs: Any
                            ) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`qlora_jax.train.make_train_step` compiled for a mesh: ``step(state, frozen, batch)``.

    The state enters and leaves with ``shardings.state`` (so the loop never reshards), the
    frozen state with ``shardings.frozen``, the batch with ``shardings.batch``; metrics come
    back replicated. The batch is checked (`check_batch`) before each call; pass arrays from
    `shard_batch` (required with several processes; numpy is placed automatically otherwise).

    The step is traced inside `qlora_jax.ops.on_mesh`: each 4-bit base is all-gathered over
    ``fsdp`` as packed codes and scales right before its matmul decodes it (`gathered_spec`), and
    the matmuls take the XLA path.

    Args:
      graphdef, optimizer: as for ``make_train_step``.
      shardings: from `train_shardings`.
      offload: ``(host, device)`` shardings of the optimizer state, from
        ``qlora_jax.train.offload_shardings`` of the *placed* state (they keep its partitioning).
      donate: donate the incoming state's buffers.
      kwargs: other ``make_train_step`` arguments (``schedule``, ``forward``, ...).
    Returns:
      ``step(state, frozen, batch)``; ``step.lower(state, frozen, batch)`` lowers the underlying
      jitted function (for ``.compile()``, its memory analysis or HLO text; no batch check) and
      ``step.jitted`` is that function.
    """
    inner = make_train_step(graphdef, optimizer, offload=offload, donate=False, **kwargs)
    state_sh = shardings.state
    if offload is not None:
        state_sh = dataclasses.replace(state_sh, opt_state=offload[0])
    mesh = shardings.batch.mesh

    def on_mesh(state, frozen, batch):
        with ops.on_mesh(mesh):  # active while the step is traced (see qlora_jax.ops)
            return inner(state, frozen, batch)

    jitted = jax.jit(on_mesh, in_shardings=(state_sh, shardings.frozen, shardings.batch),
                     out_shardings=(state_sh, NamedSharding(mesh, P())),
                     donate_argnums=(0,) if donate else ())

    def step(state: TrainState, frozen: Any, batch: Mapping[str, Any]):
        check_batch(batch, mesh)
        return jitted(state, frozen, batch)

    step.lower = jitted.lower
    step.jitted = jitted
    return step


# --------------------------------------------------------------------------------------------
# Inspection


def to_host(tree: Any) -> Any:
    """Numpy copies of every array leaf; arrays spread over several processes are gathered
    (a collective: every process must call this), e.g. to write adapter files."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only for multi-process runs

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        # A process-local value: process_allgather would stack every process's copy.
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def bytes_per_device(tree: Any) -> dict[str, int]:
    """``{str(device): bytes}`` that the (addressable) shards of ``tree``'s arrays occupy."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            key = str(shard.device)
            out[key] = out.get(key, 0) + int(shard.data.size) * shard.data.dtype.itemsize
    return out
