"""QLoRA for Flax NNX: inject 4-bit bases and LoRA adapters into an unmodified ``nnx.Module``.

`inject` walks a model's graph and swaps, in place on their parents, the targeted ``nnx.Linear``,
``nnx.LinearGeneral`` and ``nnx.Einsum`` layers for `LoraLinear` layers (a frozen base, 4-bit or
float, plus named LoRA adapters), and the layers the quantization policy selects but the config
does not target for frozen `QuantLinear` layers. The model's own code is not touched: a swapped
layer is called exactly as the original was.

State layout of a swapped layer (paths as ``nnx.state`` shows them)::

    <path>.base            QuantWeight  QuantizedArray [N, K]  (or FrozenWeight: dense [N, K])
    <path>.bias            Param        the original bias, original shape (if any)
    <path>.lora_a.<name>   LoRAParam    [K, r]
    <path>.lora_b.<name>   LoRAParam    [r, N]

For ``LinearGeneral`` and ``Einsum`` the kernel is reshaped to 2-D first: the contracted input
dims (flattened, in kernel order) form ``K`` and the remaining kernel dims form ``N``.

Training: everything trainable is an ``nnx.LoRAParam`` (adapters, and the params that
``modules_to_save`` / ``bias`` make trainable, typed `TrainableParam`, a subclass), so either::

    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)   # grads w.r.t. ``lora`` only
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)              # flax >= 0.12.10

The base weights are `BaseWeight` variables (not ``Param``), so no filter on ``Param`` picks them.

Several adapters live side by side (`add_adapter`, `set_adapter`, `delete_adapter`,
`weighted_adapter`); `set_adapter(model, names, row_ids=...)` turns on per-row adapters for
batched multi-adapter inference. `merge` folds the active adapter into the dequantized base and
gives back plain float layers of the original types (or re-quantized `QuantLinear`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as fnnx

from qlora_jax import ops
from qlora_jax.lora import LoraConfig, init_lora_weights
from qlora_jax.quantize import QuantizedArray, QuantPolicy, dequantize

__all__ = [
    "BaseWeight", "QuantWeight", "FrozenWeight", "TrainableParam", "AdapterRows", "AdapterSpec",
    "QuantLinear", "LoraLinear", "MergeReport",
    "inject", "add_adapter", "set_adapter", "delete_adapter", "weighted_adapter", "active_adapters",
    "adapter_names", "adapter_weights", "load_adapter_weights", "merge", "merge_adapter", "unmerge",
    "upcast_norms", "lora_layers",
]


# --------------------------------------------------------------------------------------------
# Variable types


class BaseWeight(fnnx.Variable):
    """A frozen base weight ``[N, K]`` (never a ``Param``: no filter on ``Param`` selects it)."""


class QuantWeight(BaseWeight):
    """A frozen base weight held as a `QuantizedArray` ``[N, K]`` (blocks along ``K``)."""


class FrozenWeight(BaseWeight):
    """A frozen base weight held as a dense float ``[N, K]`` array (plain LoRA on a float base)."""


class TrainableParam(fnnx.LoRAParam):
    """A non-adapter param trained with the adapters (``modules_to_save``, ``bias="all"``)."""


class AdapterRows(fnnx.Variable):
    """int32 ``[B]`` adapter index per batch row (batched multi-adapter inference)."""


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Static description of one adapter on one layer."""

    r: int
    alpha: float
    scale: float
    dropout: float = 0.0


# --------------------------------------------------------------------------------------------
# Layouts: how a layer's input/kernel/bias map to the 2-D ``x[.., K] · W[N, K]ᵀ`` form


def _ctor_kwargs(layer: Any, skip: Iterable[str]) -> tuple[tuple[str, Any], ...]:
    """The constructor arguments of ``layer`` that it keeps as attributes (to rebuild it)."""
    params = inspect.signature(type(layer).__init__).parameters
    out = []
    for name in params:
        if name in ("self", "rngs", "kernel_init", "bias_init", "kernel_metadata", "bias_metadata"):
            continue
        if name in skip or not hasattr(layer, name):
            continue
        out.append((name, getattr(layer, name)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _LinearLayout:
    """``nnx.Linear``: kernel ``[K, N]``, input ``[..., K]``."""

    k: int
    n: int
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, layer: fnnx.Linear) -> "_LinearLayout":
        return cls(int(layer.in_features), int(layer.out_features),
                   _ctor_kwargs(layer, ("in_features", "out_features")))

    def kernel_2d(self, kernel: jax.Array) -> jax.Array:
        return kernel

    def kernel_back(self, w2: jax.Array) -> jax.Array:
        return w2

    def bias_1d(self, bias: jax.Array) -> jax.Array:
        return bias.reshape(self.n)

    def to_2d(self, x: jax.Array, einsum_str: str | None = None) -> tuple[jax.Array, Any]:
        if x.shape[-1] != self.k:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.k}")
        return x, None

    def from_2d(self, y: jax.Array, info: Any) -> jax.Array:
        return y

    def rebuild(self, kernel: jax.Array, bias: jax.Array | None) -> fnnx.Module:
        kw = dict(self.kwargs)
        kw["use_bias"] = bias is not None
        return fnnx.Linear(self.k, self.n, kernel_init=_const(kernel), bias_init=_const(bias),
                           rngs=fnnx.Rngs(0), **kw)


@dataclasses.dataclass(frozen=True)
class _GeneralLayout:
    """``nnx.LinearGeneral`` without batch axes: contracted ``axis`` dims → K, ``out_features`` → N."""

    k: int
    n: int
    axis: tuple[int, ...]
    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, layer: fnnx.LinearGeneral) -> "_GeneralLayout":
        if layer.batch_axis:
            raise _Unsupported("nnx.LinearGeneral with batch_axis (a separate kernel per batch "
                               "index) is not a single linear map")
        inf = tuple(int(d) for d in layer.in_features)
        outf = tuple(int(d) for d in layer.out_features)
        return cls(math.prod(inf), math.prod(outf), tuple(int(a) for a in layer.axis), inf, outf,
                   _ctor_kwargs(layer, ("in_features", "out_features", "batch_axis")))

    def kernel_2d(self, kernel: jax.Array) -> jax.Array:
        return kernel.reshape(self.k, self.n)

    def kernel_back(self, w2: jax.Array) -> jax.Array:
        return w2.reshape(*self.in_features, *self.out_features)

    def bias_1d(self, bias: jax.Array) -> jax.Array:
        return bias.reshape(self.n)

    def to_2d(self, x: jax.Array, einsum_str: str | None = None) -> tuple[jax.Array, Any]:
        axes = tuple(a % x.ndim for a in self.axis)
        if tuple(x.shape[a] for a in axes) != self.in_features:
            raise ValueError(f"input dims {tuple(x.shape[a] for a in axes)} on axes {self.axis} do "
                             f"not match in_features {self.in_features}")
        free = [d for d in range(x.ndim) if d not in axes]
        xt = jnp.transpose(x, (*free, *axes))
        lead = xt.shape[: len(free)]
        return xt.reshape(*lead, self.k), (lead, free[:1] == [0])

    def from_2d(self, y: jax.Array, info: Any) -> jax.Array:
        lead, _ = info
        return y.reshape(*lead, *self.out_features)

    def rebuild(self, kernel: jax.Array, bias: jax.Array | None) -> fnnx.Module:
        kw = dict(self.kwargs)
        kw["use_bias"] = bias is not None
        return fnnx.LinearGeneral(self.in_features, self.out_features,
                                  kernel_init=_const(self.kernel_2d(kernel)), bias_init=_const(bias),
                                  rngs=fnnx.Rngs(0), **kw)


@dataclasses.dataclass(frozen=True)
class _EinsumLayout:
    """``nnx.Einsum`` whose kernel indices are each either contracted with the input (→ K) or
    passed to the output (→ N), and whose input-only indices all reach the output."""

    k: int
    n: int
    einsum_str: str
    lhs: str
    rhs: str
    out: str
    contracted: str      # kernel indices summed with the input, in kernel order
    kept: str            # kernel indices copied to the output, in kernel order
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, layer: fnnx.Einsum) -> "_EinsumLayout":
        eq = layer.einsum_str.replace(" ", "")
        ops_, out = eq.split("->")
        lhs, rhs = ops_.split(",")
        if "." in rhs or out.count("...") != lhs.count("..."):
            raise _Unsupported(f"einsum {eq!r}: an ellipsis must appear in the input and the output only")
        letters = lambda s: s.replace("...", "")  # noqa: E731
        for s in (letters(lhs), rhs, letters(out)):
            if len(set(s)) != len(s):
                raise _Unsupported(f"einsum {eq!r}: repeated indices (traces/diagonals) are not linear layers")
        contracted = "".join(c for c in rhs if c in lhs and c not in out)
        kept = "".join(c for c in rhs if c not in lhs and c in out)
        if len(contracted) + len(kept) != len(rhs):
            raise _Unsupported(f"einsum {eq!r}: kernel indices shared with input and output (per-index "
                               f"weights) or summed over the kernel alone are not supported")
        if any(c not in out for c in letters(lhs) if c not in rhs):
            raise _Unsupported(f"einsum {eq!r}: input indices summed without the kernel are not supported")
        if any(c not in letters(lhs) and c not in rhs for c in letters(out)):
            raise _Unsupported(f"einsum {eq!r}: output indices not found in the operands")
        if not contracted:
            raise _Unsupported(f"einsum {eq!r}: no contracted index (an outer product, not a linear layer)")
        shape = tuple(int(d) for d in layer.kernel_shape)
        dim = dict(zip(rhs, shape))
        bias_shape = None if layer.bias_shape is None else tuple(int(d) for d in layer.bias_shape)
        n = math.prod(dim[c] for c in kept)
        if bias_shape is not None and math.prod(bias_shape) != n:
            raise _Unsupported(f"einsum {eq!r}: bias of shape {bias_shape} does not cover the output "
                               f"features ({n} values)")
        return cls(math.prod(dim[c] for c in contracted), n, eq, lhs, rhs, out,
                   contracted, kept, shape, bias_shape,
                   _ctor_kwargs(layer, ("einsum_str", "kernel_shape", "bias_shape")))

    @property
    def _dim(self) -> dict[str, int]:
        return dict(zip(self.rhs, self.kernel_shape))

    def kernel_2d(self, kernel: jax.Array) -> jax.Array:
        perm = [self.rhs.index(c) for c in self.contracted + self.kept]
        return jnp.transpose(kernel, perm).reshape(self.k, self.n)

    def kernel_back(self, w2: jax.Array) -> jax.Array:
        order = self.contracted + self.kept
        w = w2.reshape(*(self._dim[c] for c in order))
        return jnp.transpose(w, [order.index(c) for c in self.rhs])

    def _kept_in_out_order(self) -> str:
        return "".join(c for c in self.out if c in self.kept)

    def bias_1d(self, bias: jax.Array) -> jax.Array:
        # The original layer broadcasts the bias over the output in output order.
        src = self._kept_in_out_order()
        b = bias.reshape(*(self._dim[c] for c in src))
        return jnp.transpose(b, [src.index(c) for c in self.kept]).reshape(self.n)

    def to_2d(self, x: jax.Array, einsum_str: str | None = None) -> tuple[jax.Array, Any]:
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(f"this layer was quantized for einsum {self.einsum_str!r} and cannot be "
                             f"called with {einsum_str!r}")
        lhs, out = self.lhs, self.out
        if "..." in lhs:
            n_ell = x.ndim - (len(lhs) - 3)
            spare = [c for c in string.ascii_letters if c not in self.einsum_str][:n_ell]
            lhs, out = lhs.replace("...", "".join(spare)), out.replace("...", "".join(spare))
        if len(lhs) != x.ndim:
            raise ValueError(f"einsum {self.einsum_str!r} expects a {len(lhs)}-D input, got shape {x.shape}")
        for c in self.contracted:
            if x.shape[lhs.index(c)] != self._dim[c]:
                raise ValueError(f"einsum {self.einsum_str!r}: input dim {c!r} is {x.shape[lhs.index(c)]}, "
                                 f"the kernel has {self._dim[c]}")
        free = "".join(c for c in lhs if c not in self.contracted)
        xt = jnp.transpose(x, [lhs.index(c) for c in free + self.contracted])
        lead = xt.shape[: len(free)]
        rows_first = bool(free) and free[0] == lhs[0] and out[0] == lhs[0]
        return xt.reshape(*lead, self.k), (lead, free, out, rows_first)

    def from_2d(self, y: jax.Array, info: Any) -> jax.Array:
        lead, free, out, _ = info
        y = y.reshape(*lead, *(self._dim[c] for c in self.kept))
        have = free + self.kept
        return jnp.transpose(y, [have.index(c) for c in out])

    def rebuild(self, kernel: jax.Array, bias: jax.Array | None) -> fnnx.Module:
        return fnnx.Einsum(self.einsum_str, self.kernel_shape,
                           self.bias_shape if bias is not None else None,
                           kernel_init=_const(kernel), bias_init=_const(bias), rngs=fnnx.Rngs(0),
                           **dict(self.kwargs))


class _Unsupported(ValueError):
    pass


def _const(value: jax.Array | None):
    """An initializer returning ``value`` (reshaped to the requested shape, in the requested dtype)."""
    def init(key, shape, dtype=None):
        del key
        v = jnp.asarray(value).reshape(shape)
        return v.astype(dtype) if dtype is not None else v
    return init


_LAYOUTS = {fnnx.Linear: _LinearLayout, fnnx.LinearGeneral: _GeneralLayout, fnnx.Einsum: _EinsumLayout}


def _layout_for(layer: fnnx.Module):
    return _LAYOUTS[type(layer)].of(layer)


def _rows_first(layout: Any, info: Any, x2: jax.Array) -> bool:
    if isinstance(layout, _LinearLayout):
        return x2.ndim >= 2
    return bool(info[-1]) and x2.ndim >= 2


# --------------------------------------------------------------------------------------------
# Layers


def _retype(var: fnnx.Variable, new_type: type) -> fnnx.Variable:
    """A new variable of ``new_type`` with ``var``'s value and (where accepted) its metadata."""
    value = var.get_value()
    try:
        return new_type(value, **var.get_metadata())
    except (TypeError, ValueError):
        return new_type(value)


class QuantLinear(fnnx.Module):
    """A frozen linear layer standing in for ``nnx.Linear``/``LinearGeneral``/``Einsum``.

    Holds the base weight ``[N, K]`` as a `QuantWeight` (4-bit) or `FrozenWeight` (dense), and
    the original bias variable. Called exactly like the layer it replaced; returns the output in
    ``compute_dtype`` (or, when that is None, in the original layer's ``dtype`` or the promoted
    dtype of input and params).
    """

    def __init__(self, base: BaseWeight, bias: fnnx.Variable | None, layout: Any, *,
                 compute_dtype: Any, orig_dtype: Any, param_dtype: Any, backend: str = "auto"):
        self.base = base
        self.bias = bias if bias is not None else fnnx.data(None)
        self.layout = layout
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.orig_dtype = None if orig_dtype is None else jnp.dtype(orig_dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.backend = backend

    @classmethod
    def from_layer(cls, layer: fnnx.Module, *, quantize: QuantPolicy | None, compute_dtype: Any,
                   name: str = "", backend: str = "auto"):
        """Builds the frozen layer from an ``nnx.Linear``/``LinearGeneral``/``Einsum``; the kernel
        is quantized with ``quantize``'s settings, or kept dense (transposed to ``[N, K]``) if None."""
        layout = _layout_for(layer)
        kernel = layer.kernel.get_value()
        w2 = layout.kernel_2d(kernel).T                                   # [N, K]
        base = QuantWeight(quantize.quantize(w2, name=name)) if quantize is not None else FrozenWeight(w2)
        bias = layer.bias if layer.bias is not None else None
        return cls(base, bias, layout, compute_dtype=compute_dtype,
                   orig_dtype=getattr(layer, "dtype", None), param_dtype=kernel.dtype, backend=backend)

    @property
    def quantized(self) -> bool:
        """True when the base is a 4-bit `QuantizedArray`."""
        return isinstance(self.base.get_value(), QuantizedArray)

    @property
    def in_features(self) -> int:
        return self.layout.k

    @property
    def out_features(self) -> int:
        return self.layout.n

    def dense_weight(self, dtype: Any = jnp.float32) -> jax.Array:
        """The base weight ``[N, K]`` as a dense array (decoded if quantized)."""
        return ops._dense(self.base.get_value(), dtype)

    def _cd(self, x: jax.Array) -> Any:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.orig_dtype is not None:
            return self.orig_dtype
        return jnp.result_type(x.dtype, self.param_dtype)

    def _bias_1d(self) -> jax.Array | None:
        return None if self.bias is None else self.layout.bias_1d(self.bias.get_value())

    def _split_args(self, args: tuple, kwargs: dict) -> tuple[str | None, Any]:
        einsum_str = kwargs.pop("einsum_str", None)
        out_sharding = kwargs.pop("out_sharding", None)
        if args and isinstance(self.layout, _EinsumLayout):
            einsum_str, args = args[0], args[1:]
        if args:
            out_sharding, args = args[0], args[1:]
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {args} {sorted(kwargs)}")
        return einsum_str, out_sharding

    def _finish(self, y2: jax.Array, info: Any, out_sharding: Any) -> jax.Array:
        y = self.layout.from_2d(y2, info)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y

    def _base_only(self, x2: jax.Array, cd: Any) -> jax.Array:
        y = ops.quant_matmul(x2, self.base.get_value(), compute_dtype=cd, backend=self.backend)
        b = self._bias_1d()
        if b is not None:
            y = (y.astype(jnp.float32) + b.astype(jnp.float32)).astype(cd)
        return y

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        einsum_str, out_sharding = self._split_args(args, dict(kwargs))
        x2, info = self.layout.to_2d(x, einsum_str)
        return self._finish(self._base_only(x2, self._cd(x)), info, out_sharding)


class LoraLinear(QuantLinear):
    """A `QuantLinear` with named LoRA adapters: ``y = x·deq(W)ᵀ + Σ_active s·(drop(x)·A)·B + b``.

    Attributes (static unless noted): ``lora_a`` / ``lora_b`` — ``nnx.Dict`` of ``LoRAParam``
    ``[K, r]`` / ``[r, N]`` by adapter name (state); ``specs`` — {name: `AdapterSpec`};
    ``active`` — None, a name or a tuple of names; ``row_ids`` — an `AdapterRows` variable in
    per-row mode (state) or None; ``merged`` — names folded into a float base by `merge_adapter`;
    ``deterministic`` — disables dropout (``model.eval()`` sets it).
    """

    def __init__(self, base: BaseWeight, bias: fnnx.Variable | None, layout: Any, *,
                 compute_dtype: Any, orig_dtype: Any, param_dtype: Any, backend: str = "auto"):
        super().__init__(base, bias, layout, compute_dtype=compute_dtype, orig_dtype=orig_dtype,
                         param_dtype=param_dtype, backend=backend)
        self.lora_a = fnnx.Dict()
        self.lora_b = fnnx.Dict()
        self.spec_items: tuple[tuple[str, AdapterSpec], ...] = ()
        self.active: str | tuple[str, ...] | None = None
        self.row_ids = fnnx.data(None)
        self.merged: tuple[str, ...] = ()
        self.deterministic = False
        self.dropout_rngs = fnnx.data(None)

    @classmethod
    def from_quant(cls, q: QuantLinear) -> "LoraLinear":
        """A `LoraLinear` (no adapters yet) sharing ``q``'s base and bias variables."""
        return cls(q.base, q.bias, q.layout, compute_dtype=q.compute_dtype, orig_dtype=q.orig_dtype,
                   param_dtype=q.param_dtype, backend=q.backend)

    @property
    def specs(self) -> dict[str, AdapterSpec]:
        return dict(self.spec_items)

    def add(self, name: str, spec: AdapterSpec, a: jax.Array, b: jax.Array,
            rngs: fnnx.Rngs | None = None) -> None:
        """Adds adapter ``name`` with weights ``a [K, r]``, ``b [r, N]``."""
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        _check_ab(a, b, self.layout.k, self.layout.n, spec.r, name)
        self.lora_a[name] = fnnx.LoRAParam(a)
        self.lora_b[name] = fnnx.LoRAParam(b)
        self.spec_items = self.spec_items + ((name, spec),)
        if spec.dropout > 0 and self.dropout_rngs is None:
            if rngs is None:
                raise ValueError(f"adapter {name!r} has lora_dropout={spec.dropout} but no rngs were given")
            self.dropout_rngs = rngs["dropout"].fork()

    def remove(self, name: str) -> None:
        """Deletes adapter ``name`` from this layer."""
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it first")
        del self.lora_a[name]
        del self.lora_b[name]
        self.spec_items = tuple((k, v) for k, v in self.spec_items if k != name)

    def active_names(self) -> tuple[str, ...]:
        """Active adapters present on this layer (in activation order)."""
        names = (self.active,) if isinstance(self.active, str) else tuple(self.active or ())
        return tuple(n for n in names if n in self.specs)

    def delta_weight(self, names: Sequence[str] | None = None) -> jax.Array:
        """``Σ s·(A·B)ᵀ`` ``[N, K]`` float32 over ``names`` (default: the active adapters)."""
        names = self.active_names() if names is None else tuple(names)
        d = jnp.zeros((self.layout.n, self.layout.k), jnp.float32)
        specs = self.specs
        for nm in names:
            a = self.lora_a[nm].get_value().astype(jnp.float32)
            b = self.lora_b[nm].get_value().astype(jnp.float32)
            d = d + specs[nm].scale * (a @ b).T
        return d

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        einsum_str, out_sharding = self._split_args(args, dict(kwargs))
        x2, info = self.layout.to_2d(x, einsum_str)
        cd = self._cd(x)
        w = self.base.get_value()
        specs = self.specs
        if self.row_ids is not None:
            return self._finish(self._per_row(x2, info, cd), info, out_sharding)
        names = tuple(n for n in self.active_names() if n not in self.merged)
        if not names:
            return self._finish(self._base_only(x2, cd), info, out_sharding)
        if len(names) == 1:
            a = self.lora_a[names[0]].get_value()
            b = self.lora_b[names[0]].get_value()
            scale = specs[names[0]].scale
        else:
            # Several active adapters: one matmul over the concatenated ranks, scales folded in B.
            a = jnp.concatenate([self.lora_a[n].get_value() for n in names], axis=1)
            b = jnp.concatenate([self.lora_b[n].get_value() * specs[n].scale for n in names], axis=0)
            scale = 1.0
        rates = {specs[n].dropout for n in names}
        if len(rates) > 1:
            raise ValueError(f"active adapters {names} have different lora_dropout {sorted(rates)}; "
                             f"activate adapters with equal dropout together")
        rate = rates.pop()
        rng = None
        if rate > 0 and not self.deterministic:
            rng = self.dropout_rngs()
        y2 = ops.qlora_matmul(x2, w, a, b, scale, bias=self._bias_1d(), dropout_rate=rate,
                              dropout_rng=rng, compute_dtype=cd, backend=self.backend)
        return self._finish(y2, info, out_sharding)

    def _per_row(self, x2: jax.Array, info: Any, cd: Any) -> jax.Array:
        names = (self.active,) if isinstance(self.active, str) else tuple(self.active or ())
        ids = self.row_ids.get_value()
        if not _rows_first(self.layout, info, x2):
            raise ValueError("per-row adapters need the batch (row) axis of the input to be axis 0 "
                             "of both the input and the output")
        if x2.shape[0] != ids.shape[0]:
            raise ValueError(f"per-row adapters: the input has {x2.shape[0]} rows but row_ids has "
                             f"{ids.shape[0]} entries")
        if self.merged:
            raise ValueError("per-row adapters cannot be used while an adapter is merged into the base")
        specs = self.specs
        present = [n for n in names if n in specs]
        r_max = max([specs[n].r for n in present], default=1)
        k, n = self.layout.k, self.layout.n
        a_list, b_list, s_list = [], [], []
        for nm in names:
            if nm in specs:
                r = specs[nm].r
                a_list.append(jnp.pad(self.lora_a[nm].get_value().astype(jnp.float32), ((0, 0), (0, r_max - r))))
                b_list.append(jnp.pad(self.lora_b[nm].get_value().astype(jnp.float32), ((0, r_max - r), (0, 0))))
                s_list.append(specs[nm].scale)
            else:  # this layer lacks that adapter: its rows get the base output here
                a_list.append(jnp.zeros((k, r_max), jnp.float32))
                b_list.append(jnp.zeros((r_max, n), jnp.float32))
                s_list.append(0.0)
        return ops.qlora_matmul_multi(x2, self.base.get_value(), jnp.stack(a_list), jnp.stack(b_list),
                                      jnp.asarray(s_list, jnp.float32), ids, bias=self._bias_1d(),
                                      compute_dtype=cd, backend=self.backend)


def _check_ab(a: Any, b: Any, k: int, n: int, r: int, name: str, where: str = "") -> None:
    at = f" at {where!r}" if where else ""
    if tuple(getattr(a, "shape", ())) != (k, r) or tuple(getattr(b, "shape", ())) != (r, n):
        raise ValueError(f"adapter {name!r}{at}: lora_a must be [{k}, {r}] and lora_b [{r}, {n}] "
                         f"(in_features={k}, rank={r}, out_features={n}); got "
                         f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")


# --------------------------------------------------------------------------------------------
# Graph walking


_LINEAR_TYPES = (fnnx.Linear, fnnx.LinearGeneral, fnnx.Einsum)


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _graph_nodes(model: Any) -> dict[tuple, Any]:
    return {tuple(p): node for p, node in fnnx.iter_graph(model)}


def _find_layers(model: Any, types: tuple[type, ...]) -> dict[str, tuple[Any, list[tuple[Any, Any]]]]:
    """{path: (layer, [(parent, key), ...])} for every layer of exactly one of ``types`` (or an
    instance for our own classes); every parent that references a shared layer is listed."""
    nodes = _graph_nodes(model)
    found: dict[int, tuple[str, Any, list]] = {}
    for path, node in nodes.items():
        hit = type(node) in types or isinstance(node, tuple(t for t in types if issubclass(t, QuantLinear)))
        if hit and path and id(node) not in found:
            found[id(node)] = (_path_str(path), node, [])
    if not found:
        return {}
    seen: set[tuple[int, Any]] = set()
    for path, node in nodes.items():
        children: list[tuple[Any, Any]] = []
        if isinstance(node, fnnx.Module):
            children = list(fnnx.iter_children(node))
        elif isinstance(node, (list, dict)):
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, child in children:
            if id(child) in found and (id(node), key) not in seen:
                seen.add((id(node), key))
                found[id(child)][2].append((node, key))
    return {p: (node, parents) for p, node, parents in found.values()}


def _set_child(parent: Any, key: Any, new: Any) -> None:
    if isinstance(parent, (fnnx.List, fnnx.Dict, list, dict)) or isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _replace(parents: list[tuple[Any, Any]], new: Any) -> None:
    for parent, key in parents:
        _set_child(parent, key, new)


def lora_layers(model: Any) -> dict[str, LoraLinear]:
    """``{path: layer}`` for every `LoraLinear` in ``model``."""
    return {p: n for p, (n, _) in _find_layers(model, (LoraLinear,)).items()}


def _quant_layers(model: Any) -> dict[str, QuantLinear]:
    return {p: n for p, (n, _) in _find_layers(model, (QuantLinear,)).items()}


# --------------------------------------------------------------------------------------------
# inject / adapters


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")


def _check_rank_fits(path: str, r: int, k: int, n: int) -> None:
    if r <= 0 or r > min(k, n):
        raise ValueError(f"LoRA rank r={r} for {path!r} must satisfy 0 < r <= min(in_features={k}, "
                         f"out_features={n}) = {min(k, n)}")


def inject(model: fnnx.Module, config: LoraConfig, *, quantize: QuantPolicy | None = QuantPolicy(),
           adapter_name: str = "default", compute_dtype: Any = jnp.bfloat16, rngs: fnnx.Rngs,
           lora_param_dtype: Any = jnp.float32, backend: str = "auto") -> list[str]:
    """Adds adapter ``adapter_name`` to the layers ``config`` targets, in place, and activates it.

    Targeted ``nnx.Linear``/``LinearGeneral``/``Einsum`` layers become `LoraLinear` (4-bit base
    if ``quantize`` selects the kernel at ``"<path>.kernel"``, dense otherwise); layers that are
    already `QuantLinear`/`LoraLinear` keep their base and gain the adapter. Untargeted layers
    that ``quantize`` selects become frozen `QuantLinear`. ``quantize=None`` keeps every base in
    float (plain LoRA). Modules matched by ``modules_to_save`` are never quantized and their
    params become `TrainableParam`; ``bias="all"``/``"lora_only"`` make biases trainable.

    With ``lora_dropout > 0`` each adapted layer keeps an RNG stream forked from
    ``rngs["dropout"]``; like ``nnx.Dropout``'s, its count is state, so under the split/merge
    pattern carry the updated ``rest`` state out of the step (``nnx.jit`` does this for you) or
    every step draws the same masks. ``model.eval()`` turns dropout off, ``model.train()`` on.

    Args:
      model: the ``nnx.Module`` to modify in place.
      config: the `LoraConfig`.
      quantize: the quantization policy, or None.
      adapter_name: name of the new adapter.
      compute_dtype: matmul dtype of the swapped layers (None: the original layer's dtype or the
        promoted input/param dtype).
      rngs: ``nnx.Rngs`` for the adapter init (``params`` stream) and dropout (``dropout``).
      lora_param_dtype: dtype of A and B (float32 default).
      backend: "auto", "xla" or "pallas" (see `qlora_jax.ops`).
    Returns:
      The paths of the layers that got the adapter, in graph order.
    Raises:
      ValueError: a target name or regex that matches no linear layer (the message lists the
        linear layers that exist), nothing left to adapt after exclusions, a rank outside
        ``(0, min(in, out)]``, an unsupported layer, or an adapter name already in use.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"inject: config must be a LoraConfig, got {type(config).__name__}")
    if quantize is not None and not isinstance(quantize, QuantPolicy):
        raise TypeError(f"inject: quantize must be a QuantPolicy or None, got {type(quantize).__name__}")
    if not isinstance(rngs, fnnx.Rngs):
        raise TypeError(f"inject: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    _check_name(adapter_name)
    ops._check_backend(backend)
    found = _find_layers(model, (*_LINEAR_TYPES, QuantLinear))
    names = list(found)
    if not names:
        raise ValueError("inject: the model has no nnx.Linear, nnx.LinearGeneral or nnx.Einsum layers")
    listing = "\n  ".join(names)
    missing = config.unmatched_targets(names)
    if missing:
        raise ValueError(f"inject: target_modules {missing} match no linear layer; the linear layers "
                         f"are:\n  {listing}")
    targets = [p for p in names if config.matches(p) and not config.saves(p)]
    if not targets:
        raise ValueError(f"inject: no layer is left to adapt after exclude_modules / layers_to_transform / "
                         f"modules_to_save; the linear layers are:\n  {listing}")
    layouts = {}
    for p in targets:
        node = found[p][0]
        if isinstance(node, QuantLinear):
            layouts[p] = node.layout
            if isinstance(node, LoraLinear) and adapter_name in node.specs:
                raise ValueError(f"inject: adapter {adapter_name!r} already exists on {p!r}; "
                                 f"delete it first or pick another name")
        else:
            try:
                layouts[p] = _layout_for(node)
            except _Unsupported as e:
                raise ValueError(f"inject: cannot adapt {p!r}: {e}") from None
        _check_rank_fits(p, config.rank_for(p), layouts[p].k, layouts[p].n)

    for p in names:
        node, parents = found[p]
        if p in layouts:
            if isinstance(node, LoraLinear):
                layer = node
            elif isinstance(node, QuantLinear):
                layer = LoraLinear.from_quant(node)
            else:
                policy = quantize if quantize is not None and quantize.selects(p + ".kernel", node.kernel.get_value()) else None
                layer = LoraLinear.from_layer(node, quantize=policy, compute_dtype=compute_dtype, name=p,
                                              backend=backend)
            r = config.rank_for(p)
            spec = AdapterSpec(r=r, alpha=config.alpha_for(p), scale=config.scale_for(p),
                               dropout=float(config.lora_dropout))
            a, b = init_lora_weights(rngs.params(), layer.layout.k, layer.layout.n, r,
                                     config.init_lora_weights, lora_param_dtype)
            layer.add(adapter_name, spec, a, b, rngs)
            if config.bias == "lora_only" and layer.bias is not None and not isinstance(layer.bias, TrainableParam):
                layer.bias = _retype(layer.bias, TrainableParam)
            if layer is not node:
                _replace(parents, layer)
        elif (type(node) in _LINEAR_TYPES and quantize is not None and not config.saves(p)
              and quantize.selects(p + ".kernel", node.kernel.get_value())):
            try:
                q = QuantLinear.from_layer(node, quantize=quantize, compute_dtype=compute_dtype, name=p,
                                           backend=backend)
            except _Unsupported:
                continue  # not a plain linear map: leave it in float
            _replace(parents, q)

    _make_trainable(model, config)
    set_adapter(model, adapter_name)
    return targets


def _make_trainable(model: Any, config: LoraConfig) -> None:
    """Retypes the params of ``modules_to_save`` (and all biases for ``bias="all"``) to `TrainableParam`."""
    nodes = _graph_nodes(model)
    for path, node in nodes.items():
        if not isinstance(node, fnnx.Module):
            continue
        p = _path_str(path)
        save = bool(path) and config.saves(p)
        for key, var in list(vars(node).items()):
            if not isinstance(var, fnnx.Param) or isinstance(var, fnnx.LoRAParam):
                continue
            if save or (config.bias == "all" and key == "bias"):
                setattr(node, key, _retype(var, TrainableParam))


def add_adapter(model: fnnx.Module, name: str, config: LoraConfig, *, rngs: fnnx.Rngs,
                compute_dtype: Any = jnp.bfloat16, lora_param_dtype: Any = jnp.float32) -> list[str]:
    """Adds another adapter without changing which adapter is active.

    Layers already swapped keep their base; plain linear layers that ``config`` targets get a
    float base (nothing new is quantized). Returns the adapted paths. Errors as `inject`.
    """
    before = _current_activation(model)
    paths = inject(model, config, quantize=None, adapter_name=name, compute_dtype=compute_dtype,
                   rngs=rngs, lora_param_dtype=lora_param_dtype)
    if before is not None:
        names, rows = before
        for layer in lora_layers(model).values():
            layer.active = names
            layer.row_ids = rows if rows is not None else fnnx.data(None)
    return paths


def _current_activation(model: Any) -> tuple[Any, Any] | None:
    layers = lora_layers(model)
    for layer in layers.values():
        if layer.specs:
            return layer.active, layer.row_ids
    return None


def adapter_names(model: fnnx.Module) -> list[str]:
    """Names of the adapters present in ``model`` (in order of first appearance)."""
    out: list[str] = []
    for layer in lora_layers(model).values():
        for n in layer.specs:
            if n not in out:
                out.append(n)
    return out


def active_adapters(model: fnnx.Module) -> str | tuple[str, ...] | None:
    """The model's active adapter setting: None (disabled), a name or a tuple of names."""
    state = _current_activation(model)
    return None if state is None else state[0]


def set_adapter(model: fnnx.Module, name: str | Sequence[str] | None, *,
                row_ids: jax.Array | Sequence[int] | None = None) -> None:
    """Chooses the active adapter(s) of every `LoraLinear` in ``model``; the base is untouched.

    Args:
      model: the model.
      name: None disables all adapters (base model output); a name activates one adapter; a list
        activates several at once (their deltas add up), or, with ``row_ids``, one per row.
      row_ids: int ``[B]``: row ``i`` of every adapted layer's input uses adapter
        ``name[row_ids[i]]``; -1 means no adapter for that row. Adapters of different ranks are
        zero-padded (exact). The ids live in one shared `AdapterRows` variable (state), so a jitted
        model can be fed new ids without retracing.
    """
    layers = lora_layers(model)
    existing = adapter_names(model)
    if name is None:
        names: Any = None
    elif isinstance(name, str):
        names = name
    else:
        names = tuple(name)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"set_adapter: expected a name, a non-empty list of names or None, got {name!r}")
    for n in (() if names is None else (names,) if isinstance(names, str) else names):
        if n not in existing:
            raise ValueError(f"set_adapter: unknown adapter {n!r}; the model has {existing}")
    rows = None
    if row_ids is not None:
        if names is None or isinstance(names, str):
            raise ValueError("set_adapter: row_ids needs a list of adapter names (row id i -> names[i])")
        ids = jnp.asarray(row_ids)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"set_adapter: row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(jnp.int32)
        if not isinstance(ids, jax.core.Tracer):
            bad = np.asarray(ids)
            if np.any((bad < -1) | (bad >= len(names))):
                raise ValueError(f"set_adapter: row_ids must be in [-1, {len(names)}), got {bad.tolist()}")
        rows = AdapterRows(ids)
    for layer in layers.values():
        layer.active = names
        layer.row_ids = rows if rows is not None else fnnx.data(None)


def delete_adapter(model: fnnx.Module, name: str) -> None:
    """Removes adapter ``name`` from every layer. If it was active, the first remaining adapter
    becomes active (PEFT's behaviour), or none if no adapter is left."""
    existing = adapter_names(model)
    if name not in existing:
        raise ValueError(f"delete_adapter: unknown adapter {name!r}; the model has {existing}")
    active = active_adapters(model)
    for layer in lora_layers(model).values():
        if name in layer.specs:
            layer.remove(name)
    rest = [n for n in existing if n != name]
    was_active = active == name or (isinstance(active, tuple) and name in active)
    if was_active:
        set_adapter(model, rest[0] if rest else None)


def weighted_adapter(model: fnnx.Module, weights: Mapping[str, float], new_name: str, *,
                     combination: str = "cat") -> None:
    """Creates adapter ``new_name`` as a weighted combination of existing adapters (not activated).

    ``"cat"``: ``A = [A_1 … A_n]``, ``B = [w_1 s_1 B_1; …; w_n s_n B_n]``, scale 1, rank Σ r_i — its
    delta is exactly ``Σ w_i s_i A_i B_i``. ``"linear"`` (equal ranks): PEFT's rule
    ``A = Σ sign(w_i)√(|w_i| s_i) A_i``, ``B = Σ √(|w_i| s_i) B_i``, scale 1 (not the sum of
    deltas: cross terms appear). Layers that lack some of the adapters combine those they have.
    """
    _check_name(new_name)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weighted_adapter: weights must be a non-empty {adapter name: weight} mapping")
    existing = adapter_names(model)
    unknown = [n for n in weights if n not in existing]
    if unknown:
        raise ValueError(f"weighted_adapter: unknown adapters {unknown}; the model has {existing}")
    if new_name in existing:
        raise ValueError(f"weighted_adapter: adapter {new_name!r} already exists")
    if combination not in ("cat", "linear"):
        raise ValueError(f"weighted_adapter: combination must be 'cat' or 'linear', got {combination!r}")
    layers = lora_layers(model)
    if combination == "linear":
        for p, layer in layers.items():
            ranks = {layer.specs[n].r for n in weights if n in layer.specs}
            if len(ranks) > 1:
                raise ValueError(f"weighted_adapter: 'linear' needs equal ranks, {p!r} has ranks "
                                 f"{sorted(ranks)}; use combination='cat'")
    for layer in layers.values():
        present = [(n, float(w)) for n, w in weights.items() if n in layer.specs]
        if not present:
            continue
        specs = layer.specs
        a_i = [layer.lora_a[n].get_value() for n, _ in present]
        b_i = [layer.lora_b[n].get_value() for n, _ in present]
        if combination == "cat":
            a = jnp.concatenate(a_i, axis=1)
            b = jnp.concatenate([bb * (w * specs[n].scale) for (n, w), bb in zip(present, b_i)], axis=0)
        else:
            a = sum(aa * (math.copysign(1.0, w) * math.sqrt(abs(w) * specs[n].scale))
                    for (n, w), aa in zip(present, a_i))
            b = sum(bb * math.sqrt(abs(w) * specs[n].scale) for (n, w), bb in zip(present, b_i))
        r = int(a.shape[1])
        layer.add(new_name, AdapterSpec(r=r, alpha=float(r), scale=1.0, dropout=0.0), a, b)


def adapter_weights(model: fnnx.Module, name: str = "default") -> dict[str, dict[str, jax.Array]]:
    """``{layer path: {"lora_a": [K, r], "lora_b": [r, N]}}`` for adapter ``name``."""
    out = {}
    for p, layer in lora_layers(model).items():
        if name in layer.specs:
            out[p] = {"lora_a": layer.lora_a[name].get_value(), "lora_b": layer.lora_b[name].get_value()}
    if not out:
        raise ValueError(f"adapter_weights: unknown adapter {name!r}; the model has {adapter_names(model)}")
    return out


def load_adapter_weights(model: fnnx.Module, weights: Mapping[str, Mapping[str, Any]],
                         name: str = "default", *, strict: bool = True) -> None:
    """Sets adapter ``name``'s weights from ``{layer path: {"lora_a": [K, r], "lora_b": [r, N]}}``.

    Values are cast to the existing parameters' dtype. Raises ValueError for a path that is not
    a layer holding adapter ``name``, for shapes that do not match the layer (the message gives
    both), and, with ``strict``, for layers of the adapter that ``weights`` leaves out. Nothing is
    changed unless every entry checks out.
    """
    layers = {p: l for p, l in lora_layers(model).items() if name in l.specs}
    if not layers:
        raise ValueError(f"load_adapter_weights: the model has no adapter {name!r} (it has "
                         f"{adapter_names(model)}); add it with inject/add_adapter first")
    unknown = [p for p in weights if p not in layers]
    if unknown:
        raise ValueError(f"load_adapter_weights: {unknown} are not layers with adapter {name!r}; those are "
                         f"{sorted(layers)}")
    if strict:
        missing = [p for p in layers if p not in weights]
        if missing:
            raise ValueError(f"load_adapter_weights: no weights given for {missing}")
    for p, w in weights.items():
        if not isinstance(w, Mapping) or set(w) != {"lora_a", "lora_b"}:
            raise ValueError(f"load_adapter_weights: entry {p!r} must be {{'lora_a': ..., 'lora_b': ...}}")
        layer = layers[p]
        _check_ab(w["lora_a"], w["lora_b"], layer.layout.k, layer.layout.n, layer.specs[name].r, name, p)
    for p, w in weights.items():
        layer = layers[p]
        layer.lora_a[name].set_value(jnp.asarray(w["lora_a"], layer.lora_a[name].get_value().dtype))
        layer.lora_b[name].set_value(jnp.asarray(w["lora_b"], layer.lora_b[name].get_value().dtype))


# --------------------------------------------------------------------------------------------
# merge


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What `merge` did.

    Attributes:
      merged: paths where an adapter was folded into the base.
      adapters: the adapter names folded in.
      requantized: True if the merged weights were re-quantized.
      rel_errors: {path: ‖deq(quant(W')) − W'‖_F / ‖W'‖_F} for each re-quantized merged weight
        ``W'`` (the error re-quantization adds on top of the merged float weight).
    """

    merged: tuple[str, ...]
    adapters: tuple[str, ...]
    requantized: bool
    rel_errors: Mapping[str, float]

    def as_dict(self) -> dict[str, Any]:
        return dict(merged=list(self.merged), adapters=list(self.adapters), requantized=self.requantized,
                    rel_errors=dict(self.rel_errors))


def merge(model: fnnx.Module, *, requantize: bool | QuantPolicy = False,
          dtype: Any = None) -> tuple[fnnx.Module, MergeReport]:
    """Folds the active adapter(s) into the base and removes all adapters (in place).

    The merged weight is ``W' = deq(W_q) + Σ s·(A·B)ᵀ`` in float32, from the same decoded base the
    adapter was trained against. Without ``requantize`` every `QuantLinear`/`LoraLinear` becomes
    the plain float layer it replaced (``nnx.Linear``/``LinearGeneral``/``Einsum``, kernel in its
    original param dtype or ``dtype``): the way to export. With ``requantize`` (True: each layer's
    own format settings, or ``QuantPolicy()``'s for float bases; or a `QuantPolicy`) adapted
    layers become frozen 4-bit `QuantLinear` layers and the report gives the added error.

    Returns:
      ``(model, MergeReport)``.
    Raises:
      ValueError if the model has no adapters, or per-row adapters are on.
    """
    quant = _quant_layers(model)
    loras = {p: l for p, l in quant.items() if isinstance(l, LoraLinear) and l.specs}
    if not loras:
        raise ValueError("merge: the model has no LoRA adapters to merge (run inject first)")
    if any(l.row_ids is not None for l in loras.values()):
        raise ValueError("merge: per-row adapters are active; choose one adapter with set_adapter first")
    found = _find_layers(model, (QuantLinear,))
    merged, used, errors = [], [], {}
    for p, (layer, parents) in found.items():
        names = layer.active_names() if isinstance(layer, LoraLinear) else ()
        todo = tuple(n for n in names if n not in getattr(layer, "merged", ()))
        w = layer.dense_weight(jnp.float32)
        if isinstance(layer, LoraLinear) and todo:
            w = w + layer.delta_weight(todo)
        if names:
            merged.append(p)
            used.extend(n for n in names if n not in used)
        if requantize is not False:
            if not names and isinstance(layer, LoraLinear):
                new = QuantLinear(layer.base, layer.bias, layer.layout, compute_dtype=layer.compute_dtype,
                                  orig_dtype=layer.orig_dtype, param_dtype=layer.param_dtype, backend=layer.backend)
                _replace(parents, new)
            elif names:
                q = _requantize(w, layer, requantize, p)
                dq = dequantize(q, jnp.float32)
                errors[p] = float(jnp.linalg.norm(dq - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
                new = QuantLinear(QuantWeight(q), layer.bias, layer.layout, compute_dtype=layer.compute_dtype,
                                  orig_dtype=layer.orig_dtype, param_dtype=layer.param_dtype, backend=layer.backend)
                _replace(parents, new)
            continue
        pdt = jnp.dtype(dtype) if dtype is not None else layer.param_dtype
        kernel = layer.layout.kernel_back(w.T).astype(pdt)
        bias = None
        if layer.bias is not None:
            bv = layer.bias.get_value()
            bias = bv.astype(pdt if dtype is not None else bv.dtype)
        _replace(parents, layer.layout.rebuild(kernel, bias))
    if requantize is False:
        _untrain(model)
    return model, MergeReport(tuple(merged), tuple(used), requantize is not False, errors)


def _requantize(w: jax.Array, layer: QuantLinear, requantize: bool | QuantPolicy, path: str) -> QuantizedArray:
    if isinstance(requantize, QuantPolicy):
        return requantize.quantize(w, name=path)
    old = layer.base.get_value()
    if isinstance(old, QuantizedArray):
        from qlora_jax.quantize import quantize  # noqa: PLC0415
        q = quantize(w, old.format, old.block_size, old.double_quant, old.dq_block_size or 256, name=path)
        return q
    return QuantPolicy().quantize(w, name=path)


def _untrain(model: Any) -> None:
    """Turns `TrainableParam` variables back into plain ``nnx.Param`` (an exported model)."""
    for _, node in _graph_nodes(model).items():
        if isinstance(node, fnnx.Module):
            for key, var in list(vars(node).items()):
                if isinstance(var, TrainableParam):
                    setattr(node, key, _retype(var, fnnx.Param))


def merge_adapter(model: fnnx.Module) -> list[str]:
    """Folds the active adapter(s) into float bases in place, keeping the adapters (PEFT's
    ``merge_adapter``); the layers then skip those adapters. Undo with `unmerge`.

    Raises ValueError if an adapted layer has a 4-bit base (folding into it in place would be
    lossy: use `merge`) or the model has no adapters. Returns the merged paths.
    """
    loras = {p: l for p, l in lora_layers(model).items() if l.specs}
    if not loras:
        raise ValueError("merge_adapter: the model has no LoRA adapters")
    todo = {p: l for p, l in loras.items() if l.active_names() and not l.merged}
    q = [p for p, l in todo.items() if l.quantized]
    if q:
        raise ValueError(f"merge_adapter: {q} have 4-bit bases; an in-place merge there cannot be undone "
                         f"exactly. Use merge(model) (float export) or merge(model, requantize=True)")
    for layer in todo.values():
        names = layer.active_names()
        w = layer.base.get_value()
        layer.base.set_value((w.astype(jnp.float32) + layer.delta_weight(names)).astype(w.dtype))
        layer.merged = names
    return list(todo)


def unmerge(model: fnnx.Module) -> list[str]:
    """Subtracts adapters folded in by `merge_adapter` from their float bases (exact up to the
    base dtype's rounding). Returns the unmerged paths."""
    done = []
    for p, layer in lora_layers(model).items():
        if layer.merged:
            if layer.quantized:
                raise ValueError(f"unmerge: {p!r} has a 4-bit base; only float bases can be unmerged")
            w = layer.base.get_value()
            layer.base.set_value((w.astype(jnp.float32) - layer.delta_weight(layer.merged)).astype(w.dtype))
            layer.merged = ()
            done.append(p)
    if not done:
        raise ValueError("unmerge: no layer has a merged adapter")
    return done


# --------------------------------------------------------------------------------------------
# Norms


_NORM_TYPES = (fnnx.LayerNorm, fnnx.RMSNorm, fnnx.GroupNorm, fnnx.BatchNorm)


def upcast_norms(model: fnnx.Module, dtype: Any = jnp.float32, *, pattern: str = r"(?i)norm") -> list[str]:
    """Casts the floating params of normalization layers to ``dtype`` (the QLoRA recipe keeps
    norms in float32), in place. A module counts as a norm if it is an NNX norm layer or its class
    name matches ``pattern`` (e.g. a model's own ``RMSNorm``). Returns the paths cast."""
    out = []
    for path, node in _graph_nodes(model).items():
        if not isinstance(node, fnnx.Module) or isinstance(node, QuantLinear):
            continue
        if not (isinstance(node, _NORM_TYPES) or re.search(pattern, type(node).__name__)):
            continue
        for key, var in vars(node).items():
            if isinstance(var, fnnx.Param):
                v = var.get_value()
                if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating):
                    var.set_value(v.astype(dtype))
                    out.append(_path_str((*path, key)))
    return out
