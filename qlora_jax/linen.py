"""QLoRA for Flax Linen: run an unmodified Linen model with 4-bit kernels and LoRA adapters.

Nothing in the model's code changes. `inject` traces the model once (abstractly, no memory) to
find its ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` layers and decides, from a
`LoraConfig` and a `QuantPolicy`, which get an adapter and which get a 4-bit kernel. The
returned `QLoRAModel` then works on two pytrees the user keeps, checkpoints and differentiates
as they like::

    qm = inject(model, LoraConfig(r=8, target_modules="all-linear"), x)   # x: example input
    qparams = qm.quantize_params(params)      # the model's params, chosen kernels -> QuantizedArray
    lora = qm.init_lora(jax.random.key(0))    # {"<module path>": {"lora_a": [K, r], "lora_b": [r, N]}}
    y = qm.apply(qparams, lora, x)            # model.apply with the linear layers intercepted
    grads = jax.grad(lambda l: loss(qm.apply(qparams, l, x)))(lora)   # LoRA gradients only
    params_out, report = qm.merge(qparams, lora)                     # plain float params (export)

How it works: `QLoRAModel.apply` overlays the LoRA tree on ``qparams`` (adding ``lora_a``,
``lora_b`` and a constant ``lora_scale`` next to each adapted module's ``kernel``) and runs
``model.apply`` under ``nn.intercept_methods``. The interceptor replaces the ``__call__`` of each
Dense/DenseGeneral/Einsum whose kernel is a `QuantizedArray` or that has ``lora_a`` with
`qlora_jax.ops.qlora_matmul` (or `qlora_jax.ops.quant_matmul` for a quantized layer without an
adapter); every other module runs as written. Because the adapter weights live in the
``params`` collection, Linen's own lifted transforms carry them: ``nn.scan`` over layers slices
them along the layer axis exactly as it slices the kernels, and ``nn.remat``, ``nn.vmap`` and
``nn.jit`` pass them through. ``jax.jit``, ``jax.grad`` and ``jax.vmap`` of `apply` work as usual.

Trees and shapes:

- ``qparams``: the model's ``params`` with each chosen kernel replaced by a `QuantizedArray` of
  shape ``[N, K]`` (torch ``[out, in]`` order, as `qlora_jax.quantize_linear_kernel` writes it:
  byte-compatible with bitsandbytes for ``nn.Dense``). DenseGeneral/Einsum kernels are first
  viewed as 2-D ``[K, N]``: the contracted kernel axes (flattened, in kernel order) form ``K``
  and the remaining axes (kernel order) form ``N``, the same convention as `qlora_jax.nnx`.
- Layers stacked by ``nn.scan`` (kernel ``[L, ...]``): the whole stack is one ordinary
  `QuantizedArray` of shape ``[L, N, K]`` (blocks never straddle two layers; its double
  quantization shares one offset across the stack). `apply` turns it, without copying the
  codes, into the per-layer view ``nn.scan`` slices: a `QuantizedArray` of static shape
  ``[N, K]`` whose arrays have a leading ``L`` axis. That view exists only inside `apply`, so
  every tree the user holds is valid for `qlora_jax.dequantize`, `qlora_jax.footprint` and
  `qlora_jax.io.checkpoint`. Needs ``N·K`` to be a multiple of ``block_size``; when the
  per-layer scale count is not a multiple of ``dq_block_size`` the view carries the decoded
  float32 scales (1/16 of a bf16 copy of the weights) instead of the 8-bit ones.
- ``lora``: nested dicts mirroring the module paths of the adapted layers, each with
  ``lora_a [K, r]`` and ``lora_b [r, N]`` (float32 by default), with a leading ``[L]`` axis for
  stacked layers. Layers of a stack that the config leaves out (``layers_to_transform``,
  ``rank_pattern``) get rank-0 slots: their A and B are zero and their scale is 0, so they
  stay exactly zero under any optimizer whose update of a zero-gradient, zero parameter is zero
  (SGD, Adam, AdamW). A stack's rank is the largest rank among its layers; smaller ranks are
  zero-padded the same way. ``modules_to_save`` and ``bias="all" | "lora_only"`` put float
  copies of those params into the same tree; `apply` uses them in place of ``qparams``'.

Naming: a layer's name is its module path joined by dots (``"Block_0.attn.query"``), the names
`LoraConfig` matches. A stacked layer has one name per layer, the layer index inserted after the
segment of the stacked module (``"layers.3.attn.query"``; after the segment matching
``config.layers_pattern`` when that is set). Linen names list members ``layers_0``,
``layers_1``: for ``layers_to_transform``, a trailing ``_<digits>`` of a path segment counts as
the layer index when the name has no all-digit segment.

Compute dtype: ``compute_dtype`` (bfloat16 by default, as in `qlora_jax.nnx`); None follows
the module (its ``dtype``, else the promoted dtype of input and params), as the original layer
would. LoRA dropout runs when ``config.lora_dropout > 0`` and `apply` gets a ``"dropout"``
PRNG stream (the Linen convention for training). Not supported: DenseGeneral with
``batch_dims``, Einsum with per-index (batch) kernel axes, nested stacking (two stack axes); these
layers are left alone, and naming one in ``target_modules`` is an error. A custom
``dot_general`` on an intercepted layer is bypassed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import ops
from qlora_jax.lora import ALL_LINEAR, LoraConfig, init_lora_weights
from qlora_jax.nnx import MergeReport
from qlora_jax.quantize import QuantizedArray, QuantPolicy, dequantize
# Not public yet: the decoded first-level scales of a double-quantized array (see `_scan_view`).
from qlora_jax.quantize import decode_absmax

__all__ = ["inject", "QLoRAModel", "LinenLayer", "LORA_A", "LORA_B", "LORA_SCALE"]

# Keys the adapter weights get next to a module's "kernel" in the params tree seen by the model.
LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_SCALE = "lora_scale"   # added by `apply` from the config; never in the user's trees

_LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
_DROPOUT_RNG = "dropout"

Path = tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Layouts: a layer's kernel / input / output / bias <-> the 2-D x[M, K] · W[K, N] form


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one layer's kernel and call map to ``x2[..., K] · W2[K, N]``.

    ``contracted`` / ``kept``: kernel axes forming K / N (kernel order). For Einsum, ``lhs``,
    ``rhs``, ``out`` are the equation's operands (ellipsis kept as ``...``).
    """

    kind: str
    kernel_shape: tuple[int, ...]
    contracted: tuple[int, ...]
    kept: tuple[int, ...]
    axis: tuple[int, ...] = ()
    einsum: tuple[str, str, str] | None = None

    @property
    def k(self) -> int:
        return math.prod(self.kernel_shape[a] for a in self.contracted)

    @property
    def n(self) -> int:
        return math.prod(self.kernel_shape[a] for a in self.kept)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.contracted + self.kept

    def kernel_2d(self, kernel: jax.Array, nlead: int = 0) -> jax.Array:
        """``kernel [*lead, *kernel_shape] -> [*lead, K, N]``."""
        lead = kernel.shape[:nlead]
        perm = tuple(range(nlead)) + tuple(nlead + a for a in self._perm)
        return jnp.transpose(kernel, perm).reshape(*lead, self.k, self.n)

    def kernel_back(self, w2: jax.Array, nlead: int = 0) -> jax.Array:
        """Inverse of `kernel_2d`."""
        lead = w2.shape[:nlead]
        w = w2.reshape(*lead, *(self.kernel_shape[a] for a in self._perm))
        inv = np.argsort(self._perm)
        return jnp.transpose(w, tuple(range(nlead)) + tuple(nlead + int(i) for i in inv))

    def bias_1d(self, bias: jax.Array) -> jax.Array:
        """One layer's bias as ``[N]`` in the order of ``kept``."""
        if self.einsum is None:
            return bias.reshape(self.n)
        # Linen's Einsum bias holds the kept axes in output order.
        _, rhs, out = self.einsum
        src = [c for c in out if c in rhs]
        kept = [rhs[a] for a in self.kept]
        b = bias.reshape(*(self.kernel_shape[rhs.index(c)] for c in src))
        return jnp.transpose(b, [src.index(c) for c in kept]).reshape(self.n)

    def to_2d(self, x: jax.Array) -> tuple[jax.Array, Any]:
        """``x -> (x2 [*rows, K], info for from_2d)``."""
        if self.kind == "Dense":
            if x.shape[-1] != self.k:
                raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.k}")
            return x, None
        if self.kind == "DenseGeneral":
            axes = tuple(a % x.ndim for a in self.axis)
            want = tuple(self.kernel_shape[a] for a in self.contracted)
            if tuple(x.shape[a] for a in axes) != want:
                raise ValueError(f"input dims {tuple(x.shape[a] for a in axes)} on axes {self.axis} "
                                 f"do not match the kernel's {want}")
            free = [d for d in range(x.ndim) if d not in axes]
            xt = jnp.transpose(x, (*free, *axes))
            lead = xt.shape[: len(free)]
            return xt.reshape(*lead, self.k), lead
        lhs, rhs, out = self.einsum
        if "..." in lhs:
            n_ell = x.ndim - (len(lhs) - 3)
            spare = "".join([c for c in string.ascii_letters if c not in lhs + rhs + out][:n_ell])
            lhs, out = lhs.replace("...", spare), out.replace("...", spare)
        if len(lhs) != x.ndim:
            raise ValueError(f"einsum {self._eq()!r} expects a {len(lhs)}-D input, got shape {x.shape}")
        contracted = "".join(rhs[a] for a in self.contracted)
        for c in contracted:
            if x.shape[lhs.index(c)] != self.kernel_shape[rhs.index(c)]:
                raise ValueError(f"einsum {self._eq()!r}: input dim {c!r} is {x.shape[lhs.index(c)]}, "
                                 f"the kernel has {self.kernel_shape[rhs.index(c)]}")
        free = "".join(c for c in lhs if c not in contracted)
        xt = jnp.transpose(x, [lhs.index(c) for c in free + contracted])
        lead = xt.shape[: len(free)]
        return xt.reshape(*lead, self.k), (lead, free, out)

    def from_2d(self, y2: jax.Array, info: Any) -> jax.Array:
        """``y2 [*rows, N]`` -> the layer's output layout."""
        if self.kind == "Dense":
            return y2
        kept_dims = tuple(self.kernel_shape[a] for a in self.kept)
        if self.kind == "DenseGeneral":
            return y2.reshape(*info, *kept_dims)
        lead, free, out = info
        rhs = self.einsum[1]
        y = y2.reshape(*lead, *kept_dims)
        have = free + "".join(rhs[a] for a in self.kept)
        return jnp.transpose(y, [have.index(c) for c in out])

    def _eq(self) -> str:
        lhs, rhs, out = self.einsum
        return f"{lhs},{rhs}->{out}"


class _Unsupported(ValueError):
    pass


def _normalize_einsum(eq: str) -> tuple[str, str, str]:
    eq = eq.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise _Unsupported(f"einsum {eq!r}: needs two operands and an explicit '->'")
    ops_, out = eq.split("->")
    lhs, rhs = ops_.split(",")
    return lhs, rhs, out


def _einsum_layout(eq: str, kernel_shape: tuple[int, ...]) -> _Layout:
    lhs, rhs, out = _normalize_einsum(eq)
    if "." in rhs or out.count("...") != lhs.count("..."):
        raise _Unsupported(f"einsum {eq!r}: an ellipsis may appear in the input and output only")
    letters = lambda s: s.replace("...", "")  # noqa: E731
    for s in (letters(lhs), rhs, letters(out)):
        if len(set(s)) != len(s):
            raise _Unsupported(f"einsum {eq!r}: repeated indices are not a linear layer")
    if len(rhs) != len(kernel_shape):
        raise _Unsupported(f"einsum {eq!r}: kernel of shape {kernel_shape} does not fit {rhs!r}")
    contracted = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
    kept = tuple(i for i, c in enumerate(rhs) if c not in lhs and c in out)
    if len(contracted) + len(kept) != len(rhs):
        raise _Unsupported(f"einsum {eq!r}: kernel indices shared with the input and output (a kernel "
                           f"per index) or summed over the kernel alone are not supported")
    if any(c not in out for c in letters(lhs) if c not in rhs):
        raise _Unsupported(f"einsum {eq!r}: input indices summed without the kernel are not supported")
    if not contracted:
        raise _Unsupported(f"einsum {eq!r}: no contracted index")
    return _Layout("Einsum", kernel_shape, contracted, kept, einsum=(lhs, rhs, out))


def _call_einsum_str(module: nn.Einsum, args: tuple, kwargs: Mapping[str, Any]) -> str:
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return module.einsum_str if eq is None else eq


def _layout_of(module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               kernel_shape: tuple[int, ...]) -> _Layout:
    """The layout of a Dense/DenseGeneral/Einsum call (raises `_Unsupported`)."""
    ks = tuple(int(d) for d in kernel_shape)
    if isinstance(module, nn.Einsum):
        return _einsum_layout(_call_einsum_str(module, args, kwargs), ks)
    if isinstance(module, nn.DenseGeneral):
        if np.atleast_1d(module.batch_dims).size:
            raise _Unsupported("nn.DenseGeneral with batch_dims (a kernel per batch index) is not a "
                               "single linear map")
        axis = tuple(int(a) for a in np.atleast_1d(module.axis))
        nin = len(axis)
        return _Layout("DenseGeneral", ks, tuple(range(nin)), tuple(range(nin, len(ks))), axis=axis)
    return _Layout("Dense", ks, (0,), (1,))


# --------------------------------------------------------------------------------------------
# Found layers


@dataclasses.dataclass(frozen=True)
class LinenLayer:
    """One Dense/DenseGeneral/Einsum layer of the model, as `inject` found it.

    Attributes:
      path: module path, the same as the path of its ``{kernel, bias}`` in ``params``.
      kind: "Dense", "DenseGeneral" or "Einsum".
      kernel_shape: one layer's kernel shape (without stack axes).
      k, n: the 2-D view ``[K, N]`` of the kernel.
      stack: the stack axes in front of the kernel in ``params`` (``(L,)`` under ``nn.scan``,
        ``()`` otherwise).
      names: the config-facing names, one a layer of the stack.
      ranks: adapter rank a layer (0: no adapter).
      scales: LoRA scaling a layer (0.0 where there is no adapter).
      quantize: True when `QLoRAModel.quantize_params` quantizes this kernel.
      saved: True when ``modules_to_save`` selects the layer (trained in full, never quantized).
    """

    path: Path
    kind: str
    kernel_shape: tuple[int, ...]
    k: int
    n: int
    stack: tuple[int, ...]
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    quantize: bool
    saved: bool
    layout: _Layout = dataclasses.field(repr=False)

    @property
    def name(self) -> str:
        """The dot-joined module path."""
        return ".".join(self.path)

    @property
    def adapted(self) -> bool:
        return any(self.ranks)

    @property
    def rank(self) -> int:
        """Rank of the adapter arrays (the largest rank of the stack)."""
        return max(self.ranks)


# --------------------------------------------------------------------------------------------
# Tree helpers (params are nested dicts; FrozenDicts are read as mappings)


def _get(tree: Any, path: Sequence[str]) -> Any:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _thaw(tree: Any) -> Any:
    """Nested dict copy of the mapping structure (leaves shared)."""
    if isinstance(tree, Mapping):
        return {k: _thaw(v) for k, v in tree.items()}
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for p in path[:-1]:
        nxt = tree.get(p)
        if not isinstance(nxt, dict):
            nxt = {} if nxt is None else _thaw(nxt)
            tree[p] = nxt
        tree = nxt
    tree[path[-1]] = value


def _leaves_with_paths(tree: Any, prefix: Path = ()) -> list[tuple[Path, Any]]:
    if isinstance(tree, Mapping):
        out = []
        for k, v in tree.items():
            out.extend(_leaves_with_paths(v, prefix + (str(k),)))
        return out
    return [(prefix, tree)]


def _module_paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """Paths of the mapping nodes (modules) of a params tree, parents first."""
    out = []
    if isinstance(tree, Mapping):
        if prefix:
            out.append(prefix)
        for k, v in tree.items():
            out.extend(_module_paths(v, prefix + (str(k),)))
    return out


# --------------------------------------------------------------------------------------------
# Names and selection


_LIST_SUFFIX = re.compile(r"_(\d+)(?=\.)")


def _selected(config: LoraConfig, name: str) -> bool:
    """``config.matches``, with Linen list names (``layers_3``) giving a layer index."""
    if config.matches(name):
        return True
    if config.layers_to_transform is None or config.layer_index(name) is not None:
        return False
    alt = _LIST_SUFFIX.sub(r".\1", name)
    if alt == name or not config.target_matches(name) or config.excluded(name):
        return False
    idx = config.layer_index(alt)
    return idx is not None and idx in config.layers_to_transform


def _index_position(path: Path, n_layers: int, lift_roots: set[Path], params: Any,
                    config: LoraConfig) -> int:
    """Where a stacked layer's index goes in its name (a position in ``path``)."""
    if config.layers_pattern is not None:
        pats = (config.layers_pattern,) if isinstance(config.layers_pattern, str) else config.layers_pattern
        for i, seg in enumerate(path[:-1]):
            if any(re.fullmatch(p, seg) for p in pats):
                return i + 1
    # The stacked module is the root of a lifted scope (nn.scan's); among the lifted roots on the
    # path, the outermost whose params all carry the stack axis (nn.remat roots may sit inside).
    roots = sorted(len(r) for r in lift_roots if 0 < len(r) < len(path) and path[: len(r)] == r)
    for depth in roots:
        leaves = _leaves_with_paths(_get(params, path[:depth]))
        if leaves and all(getattr(v, "ndim", 0) >= 1 and v.shape[0] == n_layers for _, v in leaves):
            return depth
    if roots:
        return roots[-1]
    return len(path) - 1


def _check_rank_fits(name: str, r: int, k: int, n: int) -> None:
    if r <= 0 or r > min(k, n):
        raise ValueError(f"LoRA rank r={r} for {name!r} must satisfy 0 < r <= min(in_features={k}, "
                         f"out_features={n}) = {min(k, n)}")


# --------------------------------------------------------------------------------------------
# Tracing


def _split_example(args: tuple, kwargs: dict) -> tuple[list[Any], Callable[[list[Any]], tuple]]:
    """Array-like leaves of (args, kwargs) (traced by eval_shape) and a function rebuilding them."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_arr = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]
    arrays = [x for x, a in zip(leaves, is_arr) if a]

    def rebuild(traced: list[Any]) -> tuple:
        it = iter(traced)
        full = [next(it) if a else x for x, a in zip(leaves, is_arr)]
        return jax.tree_util.tree_unflatten(treedef, full)

    return arrays, rebuild


def _trace(model: nn.Module, args: tuple, kwargs: dict, method: Any
           ) -> tuple[dict[Path, tuple[str, Any]], set[Path], Any]:
    """Runs ``model.init`` abstractly, recording each linear layer's layout and the lifted roots.

    Returns ``({path: (kind, layout or _Unsupported)}, lift_roots, abstract params)``.
    """
    found: dict[Path, tuple[str, Any]] = {}
    roots: set[Path] = set()

    def record(next_fun, a, kw, ctx):
        mod = ctx.module
        scope = getattr(mod, "scope", None)
        if scope is not None and scope.parent is None and scope.path:
            roots.add(tuple(scope.path))
        out = next_fun(*a, **kw)
        if (ctx.method_name == "__call__" and isinstance(mod, _LINEAR_TYPES)
                and mod.has_variable("params", "kernel")):
            path = tuple(scope.path)
            kernel = mod.get_variable("params", "kernel")
            kind = next(t.__name__ for t in _LINEAR_TYPES if isinstance(mod, t))
            try:
                info: Any = _layout_of(mod, a, kw, kernel.shape)
            except _Unsupported as e:
                info = e
            prev = found.get(path)
            if prev is not None and prev[1] != info and not isinstance(info, _Unsupported):
                info = _Unsupported(f"called with two different layouts ({prev[1]} and {info})")
            found[path] = (kind, info)
        return out

    arrays, rebuild = _split_example(args, kwargs)

    def init(*traced):
        a, kw = rebuild(list(traced))
        keys = {"params": jax.random.key(0), _DROPOUT_RNG: jax.random.key(1)}
        return model.init(keys, *a, method=method, **kw)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(init, *arrays)
    return found, roots, variables.get("params", {})


# --------------------------------------------------------------------------------------------
# The stacked-kernel view for nn.scan


def _scan_view(q: QuantizedArray, nlead: int) -> QuantizedArray:
    """A stacked ``[*lead, N, K]`` QuantizedArray as a ``[N, K]`` one with leading-axis arrays."""
    lead = q.shape[:nlead]
    shape = q.shape[nlead:]
    per = math.prod(shape)
    if per % q.block_size:
        raise ValueError(f"a stacked QuantizedArray of shape {q.shape} needs one layer's size {per} to be "
                         f"a multiple of block_size {q.block_size} (blocks may not straddle layers)")
    nb = per // q.block_size
    codes = q.codes.reshape(*lead, per // 2)
    if q.double_quant and nb % q.dq_block_size == 0:
        return QuantizedArray(codes, q.absmax.reshape(*lead, nb),
                              q.absmax_scale.reshape(*lead, nb // q.dq_block_size),
                              jnp.broadcast_to(q.absmax_offset, lead), shape=shape, dtype=q.dtype,
                              format=q.format, block_size=q.block_size, dq_block_size=q.dq_block_size)
    # Second-level blocks straddle layers (or no double quantization): hand each layer its
    # decoded float32 scales.
    absmax = decode_absmax(q).reshape(*lead, nb)
    return QuantizedArray(codes, absmax, None, None, shape=shape, dtype=q.dtype, format=q.format,
                          block_size=q.block_size, dq_block_size=None)


# --------------------------------------------------------------------------------------------
# The transformed model


@dataclasses.dataclass(frozen=True, eq=False)
class QLoRAModel:
    """An unmodified Linen model with its linear layers planned for 4-bit bases and LoRA.

    Build it with `inject`. Attributes: ``model``, ``config``, ``layers`` (``{name:
    LinenLayer}`` for every supported linear layer, by dot-joined module path),
    ``unsupported`` (``{name: reason}``), ``policy`` (the `QuantPolicy` or None),
    ``compute_dtype``, ``backend``, ``lora_param_dtype``.
    """

    model: nn.Module
    config: LoraConfig
    layers: Mapping[str, LinenLayer]
    unsupported: Mapping[str, str]
    policy: QuantPolicy | None
    compute_dtype: Any
    backend: str
    lora_param_dtype: Any

    # ------------------------------------------------------------------ queries

    @property
    def adapted_names(self) -> tuple[str, ...]:
        """Config-facing names of every adapted layer (one a layer of a stack), in trace order."""
        return tuple(nm for l in self.layers.values() for nm, r in zip(l.names, l.ranks) if r)

    @property
    def adapted_layers(self) -> dict[str, LinenLayer]:
        return {p: l for p, l in self.layers.items() if l.adapted}

    # ------------------------------------------------------------------ params

    def quantize_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The model's float ``params`` with each planned kernel replaced by a `QuantizedArray`.

        Args:
          params: the ``params`` collection (nested dicts), float kernels.
        Returns:
          A new nested dict (other leaves shared): kernels of layers with ``quantize`` set become
          ``QuantizedArray [N, K]`` (``[*stack, N, K]`` for stacked layers), with the policy's
          format and block sizes.
        Raises:
          ValueError if a planned kernel is missing or has another shape, or a stacked layer's
          ``N·K`` is not a multiple of ``block_size``.
        """
        out = _thaw(params)
        if self.policy is None:
            return out
        for name, layer in self.layers.items():
            if not layer.quantize:
                continue
            kernel = _get(params, layer.path + ("kernel",))
            if isinstance(kernel, QuantizedArray):
                continue
            want = layer.stack + layer.kernel_shape
            if kernel is None or tuple(kernel.shape) != want:
                raise ValueError(f"quantize_params: {name}.kernel has shape "
                                 f"{None if kernel is None else tuple(kernel.shape)}, expected {want}")
            nlead = len(layer.stack)
            if nlead and (layer.n * layer.k) % self.policy.block_size:
                raise ValueError(f"quantize_params: {name} is stacked and its per-layer size "
                                 f"{layer.n}x{layer.k} is not a multiple of block_size "
                                 f"{self.policy.block_size}, so blocks would straddle layers")
            w = jnp.swapaxes(layer.layout.kernel_2d(jnp.asarray(kernel), nlead), -1, -2)   # [*L, N, K]
            _set(out, layer.path + ("kernel",), self.policy.quantize(w, name=f"{name}.kernel"))
        return out

    def init_lora(self, rng: jax.Array, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A fresh LoRA tree: ``{path: {"lora_a": [*stack, K, r], "lora_b": [*stack, r, N]}}``.

        A and B follow ``config.init_lora_weights`` (B = 0 by default: the model's output is
        unchanged), in ``lora_param_dtype``. Layers left out of a stack get zero A and B.
        ``params`` (float or quantized) is needed only for ``modules_to_save`` and
        ``bias != "none"``: those params are copied into the tree to be trained in full.
        """
        tree = jax.jit(self._init_adapters)(rng)   # one compile instead of many small dispatches
        trained = self._trained_paths(params)
        for path in trained:
            value = _get(params, path)
            value = jax.tree.map(lambda v: dequantize(v) if isinstance(v, QuantizedArray) else jnp.asarray(v),
                                 value, is_leaf=lambda v: isinstance(v, QuantizedArray))
            _set(tree, path, _thaw(value))
        return tree

    def _init_adapters(self, rng: jax.Array) -> dict[str, Any]:
        layers = list(self.adapted_layers.values())
        slots = [(li, si, r) for li, l in enumerate(layers) for si, r in enumerate(l.ranks)]
        keys = jax.random.split(rng, max(1, len(slots)))
        # One vmapped draw for all slots of the same (K, N, r): the PRNG code is compiled once a
        # shape, not once a layer.
        groups: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
        for idx, (li, si, r) in enumerate(slots):
            if r:
                groups.setdefault((layers[li].k, layers[li].n, r), []).append((idx, li, si))
        a_s = [jnp.zeros((len(l.ranks), l.k, l.rank), self.lora_param_dtype) for l in layers]
        b_s = [jnp.zeros((len(l.ranks), l.rank, l.n), self.lora_param_dtype) for l in layers]
        for (k, n, r), members in groups.items():
            draw = functools.partial(init_lora_weights, k=k, n=n, r=r, init=self.config.init_lora_weights,
                                     dtype=self.lora_param_dtype)
            a, b = jax.vmap(draw)(keys[np.asarray([m[0] for m in members])])
            for j, (_, li, si) in enumerate(members):
                a_s[li] = a_s[li].at[si, :, :r].set(a[j])
                b_s[li] = b_s[li].at[si, :r, :].set(b[j])
        tree: dict[str, Any] = {}
        for layer, a, b in zip(layers, a_s, b_s):
            _set(tree, layer.path + (LORA_A,), a.reshape(*layer.stack, layer.k, layer.rank))
            _set(tree, layer.path + (LORA_B,), b.reshape(*layer.stack, layer.rank, layer.n))
        return tree

    def _trained_paths(self, params: Mapping[str, Any] | None) -> list[Path]:
        """Params trained in full: ``modules_to_save`` subtrees and biases per ``config.bias``."""
        cfg = self.config
        if not cfg.modules_to_save and cfg.bias == "none":
            return []
        if params is None:
            raise ValueError("init_lora: modules_to_save / bias need the model's params; pass params=")
        paths: list[Path] = []
        if cfg.modules_to_save:
            for p in _module_paths(params):
                if cfg.saves(".".join(p)) and not any(p[: len(q)] == q for q in paths):
                    paths.append(p)
        if cfg.bias != "none":
            adapted = {l.path for l in self.adapted_layers.values()}
            for p, _ in _leaves_with_paths(params):
                if p[-1] == "bias" and (cfg.bias == "all" or p[:-1] in adapted):
                    if not any(p[: len(q)] == q for q in paths):
                        paths.append(p)
        return paths

    # ------------------------------------------------------------------ running

    def _compose(self, qparams: Mapping[str, Any], lora: Mapping[str, Any] | None) -> dict[str, Any]:
        """The params tree the model sees: qparams + scan views + the LoRA overlay + scales."""
        params = _thaw(qparams)
        for layer in self.layers.values():
            kernel = _get(params, layer.path + ("kernel",))
            if isinstance(kernel, QuantizedArray) and layer.stack:
                if kernel.shape != layer.stack + (layer.n, layer.k):
                    raise ValueError(f"{layer.name}.kernel is a QuantizedArray of shape {kernel.shape}, "
                                     f"expected {layer.stack + (layer.n, layer.k)}")
                _set(params, layer.path + ("kernel",), _scan_view(kernel, len(layer.stack)))
        if lora is None:
            return params
        self._check_lora(qparams, lora)
        for path, leaf in _leaves_with_paths(lora):
            _set(params, path, leaf)
        for layer in self.adapted_layers.values():
            scales = np.asarray(layer.scales, np.float32).reshape(layer.stack)
            _set(params, layer.path + (LORA_SCALE,), jnp.asarray(scales))
        return params

    def _check_lora(self, qparams: Mapping[str, Any], lora: Mapping[str, Any]) -> None:
        """Raises ValueError unless ``lora`` holds exactly the planned adapters, with their shapes."""
        seen: set[Path] = set()
        for path, _ in _leaves_with_paths(lora):
            if path[-1] in (LORA_A, LORA_B):
                seen.add(path[:-1])
            elif _get(qparams, path) is None:
                raise ValueError(f"the LoRA tree has {'.'.join(path)!r}, which is neither an adapter "
                                 f"of a planned layer nor a param of the model")
        adapted = {l.path: l for l in self.adapted_layers.values()}
        for path in seen - set(adapted):
            raise ValueError(f"the LoRA tree has an adapter at {'.'.join(path)!r}, which this config "
                             f"does not adapt; adapted layers: {sorted(self.adapted_layers)}")
        for path, layer in adapted.items():
            if path not in seen:
                raise ValueError(f"the LoRA tree has no adapter for {layer.name!r}")
            self._check_adapter(layer, _get(lora, path))

    @staticmethod
    def _check_adapter(layer: LinenLayer, node: Mapping[str, Any]) -> None:
        a, b = node.get(LORA_A), node.get(LORA_B)
        want_a = layer.stack + (layer.k, layer.rank)
        want_b = layer.stack + (layer.rank, layer.n)
        got_a = None if a is None else tuple(a.shape)
        got_b = None if b is None else tuple(b.shape)
        if got_a != want_a or got_b != want_b:
            raise ValueError(f"the adapter of {layer.name!r} has lora_a {got_a} and lora_b {got_b}; the "
                             f"layer and config expect {want_a} and {want_b}")

    def _interceptor(self) -> Callable:
        """The ``nn.intercept_methods`` function that runs planned layers through `qlora_jax.ops`."""
        rate = float(self.config.lora_dropout)
        compute_dtype, backend = self.compute_dtype, self.backend

        def intercept(next_fun, args, kwargs, ctx):
            mod = ctx.module
            if ctx.method_name != "__call__" or not isinstance(mod, _LINEAR_TYPES):
                return next_fun(*args, **kwargs)
            if not mod.has_variable("params", "kernel"):
                return next_fun(*args, **kwargs)
            kernel = mod.get_variable("params", "kernel")
            has_lora = mod.has_variable("params", LORA_A)
            if not isinstance(kernel, QuantizedArray) and not has_lora:
                return next_fun(*args, **kwargs)
            name = ".".join(mod.scope.path)
            layer = self.layers.get(name)
            if layer is None:
                raise ValueError(f"{name!r} has a quantized kernel or an adapter but was not found by "
                                 f"inject (was it traced with another method or input?)")
            layout = layer.layout
            if isinstance(mod, nn.Einsum):
                eq = _normalize_einsum(_call_einsum_str(mod, args, kwargs))
                if eq != layout.einsum:
                    raise ValueError(f"{name!r} was planned for einsum {layout._eq()!r}, called with "
                                     f"{'{},{}->{}'.format(*eq)!r}")
            x = args[0]
            x2, info = layout.to_2d(jnp.asarray(x))
            bias = mod.get_variable("params", "bias") if mod.has_variable("params", "bias") else None
            if compute_dtype is not None:
                cd = jnp.dtype(compute_dtype)
            elif mod.dtype is not None:
                cd = jnp.dtype(mod.dtype)
            else:
                cd = jnp.result_type(x.dtype, kernel.dtype, *(() if bias is None else (bias.dtype,)))
            w = kernel if isinstance(kernel, QuantizedArray) else layout.kernel_2d(kernel).T
            b1 = None if bias is None else layout.bias_1d(bias)
            if has_lora:
                a = mod.get_variable("params", LORA_A)
                bb = mod.get_variable("params", LORA_B)
                scale = mod.get_variable("params", LORA_SCALE)
                rng = mod.make_rng(_DROPOUT_RNG) if rate > 0 and mod.has_rng(_DROPOUT_RNG) else None
                y2 = ops.qlora_matmul(x2, w, a, bb, scale, bias=b1, dropout_rate=rate if rng is not None else 0.0,
                                      dropout_rng=rng, compute_dtype=cd, backend=backend)
            else:
                y2 = ops.quant_matmul(x2, w, compute_dtype=cd, backend=backend)
                if b1 is not None:
                    y2 = (y2.astype(jnp.float32) + b1.astype(jnp.float32)).astype(cd)
            return layout.from_2d(y2, info)

        return intercept

    def apply(self, qparams: Mapping[str, Any], lora: Mapping[str, Any] | None, *args: Any,
              rngs: Any = None, method: Any = None, mutable: Any = False,
              variables: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Runs ``model.apply`` with 4-bit kernels and LoRA adapters.

        Args:
          qparams: the params from `quantize_params` (float kernels are fine too).
          lora: the LoRA tree from `init_lora` (or a trained / restored one of the same
            shapes); None runs the quantized base model without adapters.
          *args, **kwargs: the model's inputs, as for ``model.apply``.
          rngs: PRNG keys by stream; a ``"dropout"`` key turns LoRA dropout on.
          method, mutable: as for ``model.apply``.
          variables: other collections (e.g. ``{"batch_stats": ...}``).
        Returns:
          What ``model.apply`` returns. Differentiable with respect to ``lora`` (and, if you
          wish, any float leaf of ``qparams``); the quantized kernels get no gradient.
        Raises:
          ValueError when the LoRA tree does not fit the plan (missing or extra adapters,
          shapes that do not match a layer and the config's rank).
        """
        params = self._compose(qparams, lora)
        allv = {**dict(variables or {}), "params": params}
        with nn.intercept_methods(self._interceptor()):
            return self.model.apply(allv, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)

    # ------------------------------------------------------------------ merge

    def merge(self, qparams: Mapping[str, Any], lora: Mapping[str, Any], *,
              requantize: bool | QuantPolicy = False, dtype: Any = None) -> tuple[dict[str, Any], MergeReport]:
        """Folds the adapters into the base: the float params of the original model (export).

        Each adapted kernel becomes ``deq(W_q) + s·A·B`` in float32 (in ``[K, N]`` form, per layer
        of a stack), from the same decoded base the adapter was trained against, reshaped back
        to the kernel's layout and cast to ``dtype`` (default: the kernel's original dtype).
        Quantized layers without an adapter are dequantized; ``modules_to_save`` and trained
        biases from the LoRA tree replace the base ones. With ``requantize`` (True: the kernel's
        own format settings, or `QuantPolicy()` for float bases; or a `QuantPolicy`) adapted
        kernels are quantized again (the other quantized kernels stay as they are) and the
        report gives the relative Frobenius error each re-quantization adds.

        Returns:
          ``(params, MergeReport)``: params for ``model.apply({"params": params}, ...)`` (with
          ``requantize``, for `apply`).
        Raises:
          ValueError if ``lora`` has no adapters, or does not fit the plan.
        """
        if not lora or not any(p[-1] == LORA_A for p, _ in _leaves_with_paths(lora)):
            raise ValueError("merge: the LoRA tree has no adapters to merge")
        self._check_lora(qparams, lora)
        out = _thaw(qparams)
        for path, leaf in _leaves_with_paths(lora):
            if path[-1] not in (LORA_A, LORA_B):
                _set(out, path, leaf)
        merged, errors = [], {}
        for name, layer in self.layers.items():
            kpath = layer.path + ("kernel",)
            kernel = _get(out, kpath)
            nlead = len(layer.stack)
            node = _get(lora, layer.path) if layer.adapted else None
            if node is None and not isinstance(kernel, QuantizedArray):
                continue
            if isinstance(kernel, QuantizedArray):
                w = jnp.swapaxes(dequantize(kernel, jnp.float32), -1, -2)           # [*L, K, N]
                orig = jnp.dtype(kernel.dtype)
            else:
                w = layer.layout.kernel_2d(jnp.asarray(kernel, jnp.float32), nlead)
                orig = jnp.dtype(kernel.dtype)
            if node is not None:
                a = jnp.asarray(node[LORA_A], jnp.float32)
                b = jnp.asarray(node[LORA_B], jnp.float32)
                s = jnp.asarray(np.asarray(layer.scales, np.float32).reshape(layer.stack))
                w = w + s[..., None, None] * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
                merged.extend(nm for nm, r in zip(layer.names, layer.ranks) if r)
            if node is not None and requantize is not False:
                policy = requantize if isinstance(requantize, QuantPolicy) else _policy_like(kernel)
                wt = jnp.swapaxes(w, -1, -2)                                        # [*L, N, K]
                q = policy.quantize(wt, name=f"{name}.kernel")
                dq = dequantize(q, jnp.float32)
                errors[name] = float(jnp.linalg.norm(dq - wt) / jnp.maximum(jnp.linalg.norm(wt), 1e-30))
                _set(out, kpath, q)
                continue
            if requantize is not False and isinstance(kernel, QuantizedArray):
                continue                                   # not adapted: keep its 4-bit base
            pdt = jnp.dtype(dtype) if dtype is not None else orig
            _set(out, kpath, layer.layout.kernel_back(w, nlead).astype(pdt))
        return out, MergeReport(tuple(merged), ("default",), requantize is not False, errors)


def _policy_like(kernel: Any) -> QuantPolicy:
    if isinstance(kernel, QuantizedArray):
        return QuantPolicy(format=kernel.format, block_size=kernel.block_size,
                           double_quant=kernel.double_quant, dq_block_size=kernel.dq_block_size or 256)
    return QuantPolicy()


# --------------------------------------------------------------------------------------------
# inject


def inject(model: nn.Module, config: LoraConfig, *example_args: Any,
           quantize: QuantPolicy | None = QuantPolicy(), compute_dtype: Any = jnp.bfloat16,
           backend: str = "auto", lora_param_dtype: Any = jnp.float32, method: Any = None,
           **example_kwargs: Any) -> QLoRAModel:
    """Plans QLoRA for an unmodified Linen model.

    Traces ``model.init(rngs, *example_args, method=method, **example_kwargs)`` abstractly
    (``jax.eval_shape``: no params are created; the example inputs may be
    ``jax.ShapeDtypeStruct``) to find every ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` call,
    its module path and, under ``nn.scan``, its stack axis.

    Args:
      model: the Linen module.
      config: which layers get adapters, with which rank and scale (`LoraConfig`).
      *example_args, **example_kwargs: example inputs for the trace.
      quantize: which kernels become 4-bit (`QuantPolicy`, asked with ``"<path>.kernel"`` and
        one layer's kernel shape), or None for a float base (plain LoRA). ``modules_to_save``
        modules are never quantized.
      compute_dtype: matmul dtype of the intercepted layers (None: as the original layer).
      backend: "auto", "xla" or "pallas" (see `qlora_jax.ops`).
      lora_param_dtype: dtype of the LoRA weights.
      method: the model method to trace (default ``__call__``).
    Returns:
      A `QLoRAModel`.
    Raises:
      TypeError for a config/policy of the wrong type. ValueError when the model has no linear
      layers, a ``target_modules`` entry matches none (the message lists the layers), nothing is
      left to adapt, a rank is outside ``(0, min(K, N)]``, a targeted layer is unsupported, or
      ranks differ between layers of one stack... (they are zero-padded instead; see module doc).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject: model must be a flax.linen Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"inject: config must be a LoraConfig, got {type(config).__name__}")
    if quantize is not None and not isinstance(quantize, QuantPolicy):
        raise TypeError(f"inject: quantize must be a QuantPolicy or None, got {type(quantize).__name__}")
    ops._check_backend(backend)
    found, roots, abstract = _trace(model, example_args, example_kwargs, method)
    if not found:
        raise ValueError("inject: the model calls no nn.Dense, nn.DenseGeneral or nn.Einsum")

    supported: dict[Path, tuple[str, _Layout, tuple[int, ...], tuple[str, ...]]] = {}
    unsupported: dict[str, str] = {}
    for path, (kind, info) in found.items():
        name = ".".join(path)
        if isinstance(info, _Unsupported):
            unsupported[name] = str(info)
            continue
        outer = _get(abstract, path + ("kernel",)).shape
        stack = tuple(outer[: len(outer) - len(info.kernel_shape)])
        if len(stack) > 1:
            unsupported[name] = f"kernel {tuple(outer)} has {len(stack)} stack axes (nested nn.scan)"
            continue
        if stack:
            pos = _index_position(path, stack[0], roots, abstract, config)
            names = tuple(".".join(path[:pos] + (str(i),) + path[pos:]) for i in range(stack[0]))
        else:
            names = (name,)
        supported[path] = (kind, info, stack, names)

    all_names = [nm for *_, names in supported.values() for nm in names]
    listing = "\n  ".join(all_names)
    missing = config.unmatched_targets(all_names + list(unsupported))
    if missing:
        raise ValueError(f"inject: target_modules {missing} match no linear layer; the linear layers "
                         f"are:\n  {listing}")
    if config.targets != ALL_LINEAR:
        for name, reason in unsupported.items():
            if _selected(config, name) and not config.saves(name):
                raise ValueError(f"inject: cannot adapt {name!r}: {reason}")

    layers: dict[str, LinenLayer] = {}
    for path, (kind, layout, stack, names) in supported.items():
        name = ".".join(path)
        saved = config.saves(name)
        ranks, scales = [], []
        for nm in names:
            if not saved and _selected(config, nm) and not config.saves(nm):
                r = config.rank_for(nm)
                _check_rank_fits(nm, r, layout.k, layout.n)
                ranks.append(r)
                scales.append(float(config.scale_for(nm)))
            else:
                ranks.append(0)
                scales.append(0.0)
        kshape = jax.ShapeDtypeStruct(layout.kernel_shape, _get(abstract, path + ("kernel",)).dtype)
        quant = quantize is not None and not saved and quantize.selects(f"{name}.kernel", kshape)
        layers[name] = LinenLayer(path, kind, layout.kernel_shape, layout.k, layout.n, stack, names,
                                  tuple(ranks), tuple(scales), bool(quant), saved, layout)
    if not any(l.adapted for l in layers.values()):
        raise ValueError(f"inject: no layer is left to adapt after exclude_modules / layers_to_transform "
                         f"/ modules_to_save; the linear layers are:\n  {listing}")
    return QLoRAModel(model, config, layers, unsupported, quantize,
                      None if compute_dtype is None else jnp.dtype(compute_dtype), backend,
                      jnp.dtype(lora_param_dtype))
