"""Build a QLoRA Llama without the float model ever existing whole, and stack its decoder layers.

A 70B-parameter model is 140 GB in bf16 but about 35 GB in NF4 with double quantization, so
the float weights must never all exist at once, on the device or the host. Two sources:

- `init_quantized_llama`: random init (HF's: Normal(0, ``initializer_range``) for projections and
  embeddings, ones for norms, zeros for biases). The model is built abstractly
  (``nnx.eval_shape``); each linear's float kernel is drawn on the device from its own key
  (`layer_key`, from the root key and the module path), quantized at once into the exact
  `qlora_jax.nnx.QuantLinear` that `qlora_jax.nnx.inject` would make of it, and dropped before
  the next one is drawn. Then `inject` adds the adapters (they are small). Peak memory is the
  quantized model plus one float kernel and its quantization temporaries.
- `load_quantized_llama`: a checkpoint (HF folder or GGUF) streamed one tensor at a time
  through `qlora_jax.io.load_llama`'s ``tensor_hook``, which quantizes each selected kernel as it
  arrives; the same layers result as ``load_llama`` followed by ``inject``.

Both give bit-for-bit the model that building the float model first and calling
``inject(model, lora_config, quantize=policy)`` gives (same quantized bytes, same adapters, same
outputs); `init_llama` (no ``quantize``) builds that float reference from the same keys.

`stack_layers` then turns the list of identical decoder layers into one `ScannedLayers` module
whose arrays carry a leading ``[L]`` axis and which runs the layers as one ``lax.scan`` (remat
inside the scan body). Unlike `qlora_jax.train.scan_forward`, which stacks the layers' states
inside every step (a transient second copy of the 4-bit base, ~35 GB for 70B), the stack is made
once, so the step holds one copy; stacking passes each leaf group through host memory, so the
device never holds the list and the stack at once. Its remat policies are the model's plus
"offload_inputs" (`SCAN_REMAT_POLICIES`). `unstack_layers` undoes it (for adapter export, merge,
or generation with a KV cache, which need the list).

Building straight into shardings (FSDP over a mesh): both builders and `stack_layers` take
``shardings=`` (one ``jax.sharding.Sharding``, a callable ``(path, leaf) -> Sharding | None``, or
a pytree of Shardings matching the final model state, e.g. the ``(params, rngs, frozen)`` trees
of `qlora_jax.sharding.train_shardings` computed on ``nnx.eval_shape`` of the same build; see
`sharding_lookup`). Each float kernel is still drawn and quantized on the default device, one at a
time; the finished leaf then goes at once where it belongs: with ``stack=True`` a decoder layer's
leaves go to host memory (numpy), and each stacked leaf is ``device_put`` once with its sharding,
so a device receives only its shard; the embedding, final norm and ``lm_head`` (and, unstacked,
every leaf) are ``device_put`` with their sharding right away. `inject` draws the adapters on the
default device (all layers at once; ~0.8 GB in float32 for Llama-2-70B at r=16 all-linear), and
they are moved right after. So no device holds more than its shards plus one float kernel and
its quantization temporaries (plus the adapters for a moment), instead of the whole 4-bit model
(33.9 GB for 70B) on the first device. Without ``shardings`` nothing changes; with them the model
is bit for bit the one built on one device and then placed.
"""

from __future__ import annotations

import functools
import os
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax import nnx as qnnx
from qlora_jax.lora import LoraConfig
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM, RMSNorm, _module_list
from qlora_jax.models.llama import _policy as _remat_policy_fn
from qlora_jax.quantize import QuantizedArray, QuantPolicy, tree_path_str

__all__ = [
    "layer_key", "init_llama", "init_quantized_llama", "load_quantized_llama",
    "ScannedLayers", "SCAN_REMAT_POLICIES", "stack_layers", "unstack_layers", "is_stacked",
    "sharding_lookup",
]

# Remat policies of `ScannedLayers`: the model's own, plus "offload_inputs", which recomputes each
# layer in the backward pass (like "full") and keeps the layer inputs the scan saves for it in
# pinned host memory instead of device memory ([L, B, T, D]: 1.3 MB a token for Llama-2-70B in
# bf16, the largest activation that "full" leaves on the device).
SCAN_REMAT_POLICIES = (None, "full", "save_dots", "offload_dots", "offload_inputs")
_LAYER_INPUT = "scanned_layer_input"

ParamHook = Callable[[str], None]


def layer_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of the parameter at dotted ``path`` (e.g. ``"model.layers.3.mlp.up_proj.kernel"``):
    ``fold_in(key, crc32(path))``. Independent of build order, so a model built layer by layer and
    one built whole get the same values."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key: jax.Array, std: jax.Array, shape: tuple[int, ...], dtype: str) -> jax.Array:
    # Drawn in float32 (as torch's normal_ on a float32 weight), then cast to the storage dtype.
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _abstract(value: Any) -> bool:
    return isinstance(value, jax.ShapeDtypeStruct)


def _set_child(parent: Any, key: Any, new: Any) -> None:
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _build_abstract(config: LlamaConfig, dtype: Any, param_dtype: Any, norm_dtype: Any,
                    model_kwargs: dict[str, Any]) -> LlamaForCausalLM:
    """The model with every Variable holding a ``ShapeDtypeStruct`` (no memory)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype,
                                                   norm_dtype=norm_dtype, rngs=nnx.Rngs(0), **model_kwargs))


# --------------------------------------------------------------------------------------------
# Placement while building

# Where each array goes as soon as it is finished: None (where it was made: the default device),
# one ``jax.sharding.Sharding`` for every leaf, a callable ``(path, leaf) -> Sharding | None``, or
# a pytree of Shardings whose leaf paths are the model state's (``nnx.state(model)``; see
# `sharding_lookup`).
Shardings = Any
Lookup = Callable[[str, Any], "jax.sharding.Sharding | None"]

_LAYER_PATH = re.compile(r"^model\.layers\.\d+\.")
_STACKED_PREFIX = "model.layers.0.layer."


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def sharding_lookup(shardings: Shardings) -> Lookup | None:
    """``lookup(path, leaf) -> Sharding | None`` for a ``shardings=`` argument of the builders.

    Args:
      shardings: None (no placement: returns None); one ``jax.sharding.Sharding`` (every leaf);
        a callable ``(path, leaf) -> Sharding | None`` (returned as is); or a pytree of Shardings
        (e.g. ``nnx.State``; a `QuantizedArray` of Shardings for a quantized leaf), or a list/tuple
        of such trees with disjoint paths, such as ``(sh.state.params, sh.state.rngs, sh.frozen)``
        of `qlora_jax.sharding.train_shardings` on the abstract model. ``path`` is the dotted
        path of an array leaf in ``nnx.state(model)`` as `qlora_jax.quantize.tree_path_str` spells
        it (``"model.layers.0.layer.mlp.up_proj.base.codes"`` once stacked,
        ``"model.layers.3.mlp.up_proj.base.codes"`` before); a path the tree lacks gives None.
    """
    if shardings is None:
        return None
    if _is_sharding(shardings):
        return lambda path, leaf: shardings
    if callable(shardings):
        return shardings
    table: dict[str, jax.sharding.Sharding] = {}
    for tree in (shardings if isinstance(shardings, (list, tuple)) else (shardings,)):
        for path, s in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_sharding)[0]:
            if not _is_sharding(s):
                raise TypeError(f"shardings: leaf {tree_path_str(path)!r} is a {type(s).__name__}, not a "
                                f"jax.sharding.Sharding")
            table[tree_path_str(path)] = s
    return lambda path, leaf: table.get(path)


def _has(x: Any, sharding: jax.sharding.Sharding) -> bool:
    """True if ``x`` is a device array laid out as ``sharding`` says (``P()`` and ``P(None)`` alike)."""
    return isinstance(x, jax.Array) and (x.sharding == sharding or x.sharding.is_equivalent_to(sharding, x.ndim))


def _put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (device array or numpy) with ``sharding`` (`qlora_jax.sharding.place`: ``x`` itself
    if it already has it; with several processes each places its own shards)."""
    from qlora_jax.sharding import place  # noqa: PLC0415 - qlora_jax.sharding imports qlora_jax.train

    return place(x, sharding)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


class _Placer:
    """Moves finished leaves: to host memory (numpy) if they belong to a decoder layer that will
    be stacked (the stack is placed whole, `_stack_leaves`), else to ``lookup``'s sharding."""

    def __init__(self, lookup: Lookup, stacking: bool):
        self.lookup = lookup
        self.stacking = stacking

    def leaf(self, path: str, x: Any) -> Any:
        if not _is_array(x):
            return x
        if self.stacking and _LAYER_PATH.match(path):
            # A copy: on CPU np.asarray would be a view that keeps the device buffer alive. PRNG
            # keys (a few bytes a layer) stay where they are until stacked.
            return x if _is_key(x) else np.array(x, copy=True)
        s = self.lookup(path, x)
        return x if s is None else _put(x, s)

    def value(self, path: str, v: Any) -> Any:
        """A Variable's value (an array, or a `QuantizedArray` whose fields are placed)."""
        return jax.tree_util.tree_map_with_path(
            lambda p, x: self.leaf(".".join(filter(None, (path, tree_path_str(p)))), x), v)

    def variable(self, path: str, var: Any) -> None:
        if isinstance(var, nnx.Variable):
            old = var.get_value()
            new = self.value(path, old)
            if new is not old:
                var.set_value(new)

    def model(self, model: nnx.Module) -> None:
        """Every Variable of ``model`` (e.g. after `inject` added adapters on the default device)."""
        for p, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Variable):
                self.variable(_path_str(p), node)


def _check_placed(model: nnx.Module, lookup: Lookup, require_all: bool) -> None:
    """Raises ValueError naming the leaves of ``model`` that do not have ``lookup``'s sharding,
    or (``require_all``: a shardings tree was given) that it has none for (a tree that does not
    match the built model)."""
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        p = tree_path_str(path)
        s = lookup(p, x)
        if (s is None and require_all) or (s is not None and not _has(x, s)):
            bad.append(p)
    if bad:
        raise ValueError(f"shardings: {len(bad)} leaves of the built model have no sharding in the tree "
                         f"given (or were not placed), e.g. {bad[:5]}; pass the shardings of the final "
                         f"model state (stacked if stack=True)")


def init_llama(config: LlamaConfig, key: jax.Array, *, init_std: float = 0.02,
               quantize: QuantPolicy | None = None, keep_float: Callable[[str], bool] | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, norm_dtype: Any = jnp.float32,
               backend: str = "auto", on_param: ParamHook | None = None, shardings: Shardings = None,
               _placer: _Placer | None = None, **model_kwargs: Any) -> LlamaForCausalLM:
    """A randomly initialized ``LlamaForCausalLM``, built one parameter at a time.

    Projection kernels ``[in, out]`` and the embedding ``[V, D]`` are Normal(0, ``init_std``)
    (HF's ``initializer_range``; drawn in float32 from `layer_key` ``(key, path)``, stored in
    ``param_dtype``); norm weights are ones (``norm_dtype``), biases zeros. With ``quantize``, every
    linear whose kernel the policy selects (at ``"<module path>.kernel"``) becomes, right after its
    kernel is drawn, the frozen `qlora_jax.nnx.QuantLinear` that ``inject(..., quantize=policy)``
    makes of it (compute dtype ``dtype``, matmul ``backend``), and the float kernel is dropped.

    Args:
      config: model shape.
      key: root PRNG key.
      init_std: standard deviation of projections and embeddings.
      quantize: a `QuantPolicy`, or None for a float model.
      keep_float: ``keep_float(module_path) -> True`` keeps that linear in float even if the policy
        selects it (`init_quantized_llama` passes ``lora_config.saves``, as inject never
        quantizes ``modules_to_save``).
      dtype, param_dtype, norm_dtype: as `LlamaForCausalLM`.
      backend: matmul backend of the quantized layers ("auto", "xla", "pallas").
      on_param: called with each parameter's path right after it is materialized (and placed;
        progress, or memory probes in tests).
      shardings: where each finished parameter goes right after it is made (see
        `sharding_lookup`: one Sharding, a callable ``(path, leaf) -> Sharding | None``, or a
        pytree of Shardings matching the returned model's state); None keeps everything on the
        default device. The float kernel is still drawn (and quantized) on the default device, one
        at a time; its result is then ``device_put`` with its sharding and the original dropped.
      **model_kwargs: other `LlamaForCausalLM` arguments (``remat_policy``, ``attn_implementation``).
    Returns:
      The model (no adapters).
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"init_llama: config must be a LlamaConfig, got {type(config).__name__}")
    if quantize is not None and not isinstance(quantize, QuantPolicy):
        raise TypeError(f"init_llama: quantize must be a QuantPolicy or None, got {type(quantize).__name__}")
    if not init_std > 0:
        raise ValueError(f"init_llama: init_std must be > 0, got {init_std}")
    placer = _placer
    if placer is None and shardings is not None:
        placer = _Placer(sharding_lookup(shardings), stacking=False)
    model = _build_abstract(config, dtype, param_dtype, norm_dtype, model_kwargs)
    nodes = {tuple(p): n for p, n in nnx.iter_graph(model)}
    std = jnp.float32(init_std)
    # Graph order is sorted by name: lm_head, model.embed_tokens, model.layers.0 ... model.norm.
    for path, node in nodes.items():
        if type(node) is nnx.Linear:
            p = _path_str(path)
            kv = node.kernel.get_value()
            node.kernel.set_value(_normal(layer_key(key, p + ".kernel"), std, tuple(kv.shape),
                                          jnp.dtype(kv.dtype).name))
            if node.bias is not None:
                bv = node.bias.get_value()
                node.bias.set_value(jnp.zeros(bv.shape, bv.dtype))
            selected = (quantize is not None and quantize.selects(p + ".kernel", node.kernel.get_value())
                        and not (keep_float is not None and keep_float(p)))
            if selected:
                q = qnnx.QuantLinear.from_layer(node, quantize=quantize, compute_dtype=dtype, name=p,
                                                backend=backend)
                _set_child(nodes[path[:-1]], path[-1], q)
                node.kernel.set_value(kv)  # drop the float kernel now (the old layer is unreachable)
                if placer is not None:
                    placer.variable(p + ".base", q.base)
                    placer.variable(p + ".bias", q.bias)
            elif placer is not None:
                placer.variable(p + ".kernel", node.kernel)
                placer.variable(p + ".bias", node.bias)
            if on_param is not None:
                on_param(p + ".kernel")
        elif isinstance(node, nnx.Embed):
            ev = node.embedding.get_value()
            p = _path_str(path) + ".embedding"
            node.embedding.set_value(_normal(layer_key(key, p), std, tuple(ev.shape), jnp.dtype(ev.dtype).name))
            if placer is not None:
                placer.variable(p, node.embedding)
            if on_param is not None:
                on_param(p)
        elif isinstance(node, RMSNorm):
            wv = node.weight.get_value()
            node.weight.set_value(jnp.ones(wv.shape, wv.dtype))
            if placer is not None:
                placer.variable(_path_str(path) + ".weight", node.weight)
            if on_param is not None:
                on_param(_path_str(path) + ".weight")
    left = [_path_str(p) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Variable) and _abstract(n.get_value())]
    if left:  # a model change added a parameter this builder does not know how to initialize
        raise ValueError(f"init_llama: no initializer for {left[:10]}")
    if _placer is None and placer is not None:
        _check_placed(model, placer.lookup, _is_tree(shardings))
    return model


def _is_tree(shardings: Shardings) -> bool:
    """True if ``shardings`` is a pytree of Shardings (it must then name every leaf)."""
    return shardings is not None and not _is_sharding(shardings) and not callable(shardings)


def _default_lora_rngs(key: jax.Array) -> nnx.Rngs:
    return nnx.Rngs(params=layer_key(key, "lora.params"), dropout=layer_key(key, "lora.dropout"))


def init_quantized_llama(config: LlamaConfig, lora_config: LoraConfig | None, *, key: jax.Array,
                         policy: QuantPolicy = QuantPolicy(), init_std: float = 0.02,
                         rngs: nnx.Rngs | None = None, adapter_name: str = "default",
                         dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.bfloat16,
                         norm_dtype: Any = jnp.float32, lora_param_dtype: Any = jnp.float32,
                         backend: str = "auto", stack: bool = False, on_param: ParamHook | None = None,
                         shardings: Shardings = None, **model_kwargs: Any) -> LlamaForCausalLM:
    """A randomly initialized QLoRA Llama: 4-bit bases quantized one linear at a time, then adapters.

    Equal, byte for byte, to ``m = init_llama(config, key, dtype=dtype, param_dtype=param_dtype, ...)``
    followed by ``inject(m, lora_config, quantize=policy, compute_dtype=dtype, rngs=rngs, ...)``, but
    the float model never exists: peak memory is the quantized model plus one float kernel (for the
    Llama-2-70B shape, ~35 GB plus ~1 GB instead of 140 GB).

    Args:
      config: model shape (e.g. ``LlamaConfig(hidden_size=8192, ...)``).
      lora_config: the adapters (None: quantized base only, no adapters).
      key: root PRNG key of the base weights (`layer_key` per parameter).
      policy: which kernels are quantized, and how (default NF4, double quant, block 64; norms,
        embeddings and ``lm_head`` stay in ``param_dtype``).
      init_std: HF ``initializer_range``.
      rngs: ``nnx.Rngs`` for the adapters (``params``, ``dropout``); default derived from ``key``.
      adapter_name: name of the adapter.
      dtype: compute dtype (model activations and quantized matmuls).
      param_dtype: storage dtype of the float params and the kernels before quantization.
      norm_dtype: RMSNorm weight dtype.
      lora_param_dtype: dtype of A and B.
      backend: "auto", "xla" or "pallas" (`qlora_jax.ops`).
      stack: run `stack_layers` on the result (for training with a copy-free layer scan).
      on_param: progress hook, see `init_llama`.
      shardings: build straight into these shardings (e.g. FSDP over a mesh), so that no device
        ever holds more than its own shards plus one float kernel and its quantization
        temporaries. A Sharding, a callable ``(path, leaf) -> Sharding | None`` or a pytree of
        Shardings matching the final model state (stacked if ``stack``, adapters included), see
        `sharding_lookup`; e.g. ``train_shardings`` of ``nnx.eval_shape`` of this very call.
        Each leaf is placed as soon as it exists; with ``stack``, decoder-layer leaves go to host
        memory (numpy) right after they are made, and each stacked leaf is ``device_put`` with
        its sharding. The adapters are drawn by `inject` on the default device (all layers at
        once, ~0.8 GB in float32 for Llama-2-70B at r=16 all-linear) and moved right after.
        None: everything stays on the default device (the result is identical either way).
      **model_kwargs: ``remat_policy``, ``attn_implementation``.
    Raises:
      ValueError: ``shardings`` is a tree that lacks a leaf of the built model.
    """
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"init_quantized_llama: lora_config must be a LoraConfig or None, got "
                        f"{type(lora_config).__name__}")
    if not isinstance(policy, QuantPolicy):
        raise TypeError(f"init_quantized_llama: policy must be a QuantPolicy, got {type(policy).__name__}")
    keep = lora_config.saves if lora_config is not None else None
    lookup = sharding_lookup(shardings)
    placer = None if lookup is None else _Placer(lookup, stacking=stack)
    model = init_llama(config, key, init_std=init_std, quantize=policy, keep_float=keep, dtype=dtype,
                       param_dtype=param_dtype, norm_dtype=norm_dtype, backend=backend, on_param=on_param,
                       _placer=placer, **model_kwargs)
    if lora_config is not None:
        qnnx.inject(model, lora_config, quantize=policy, adapter_name=adapter_name, compute_dtype=dtype,
                    rngs=rngs if rngs is not None else _default_lora_rngs(key),
                    lora_param_dtype=lora_param_dtype, backend=backend)
    _finish(model, placer, stack, shardings)
    return model


def _finish(model: LlamaForCausalLM, placer: _Placer | None, stack: bool, shardings: Shardings) -> None:
    """After `inject`: places what it added (adapters; layer leaves to host when stacking), stacks
    the layers straight into their shardings, and checks that every leaf has its sharding."""
    if placer is not None:
        placer.model(model)
    if stack:
        stack_layers(model, shardings=None if placer is None else placer.lookup)
    if placer is not None:
        _check_placed(model, placer.lookup, _is_tree(shardings))


def load_quantized_llama(path: str | os.PathLike, lora_config: LoraConfig | None = None, *,
                         policy: QuantPolicy = QuantPolicy(), rngs: nnx.Rngs | None = None,
                         adapter_name: str = "default", dtype: Any = jnp.bfloat16,
                         param_dtype: Any = jnp.bfloat16, norm_dtype: Any = jnp.float32,
                         lora_param_dtype: Any = jnp.float32, backend: str = "auto", stack: bool = False,
                         shardings: Shardings = None, **model_kwargs: Any) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Loads an HF folder or GGUF file, quantizing each selected kernel as it is read.

    `qlora_jax.io.load_llama` streams the checkpoint one tensor at a time into an abstract model;
    its ``tensor_hook`` here quantizes each kernel ``policy`` selects (in ``param_dtype``, in
    ``[out, in]`` order as `qlora_jax.quantize.quantize_linear_kernel`) before the next tensor is
    read, so host and device hold one float tensor at a time. The layers holding a quantized
    kernel then become `qlora_jax.nnx.QuantLinear`, and ``lora_config`` (if given) is injected.
    Equal to ``load_llama(path, dtype=dtype, param_dtype=param_dtype)`` followed by
    ``inject(model, lora_config, quantize=policy, compute_dtype=dtype, ...)``.

    ``shardings`` (as `init_quantized_llama`'s): each tensor, quantized or not, is placed (or,
    with ``stack``, moved to host memory if it belongs to a decoder layer) as it is read; the
    adapters after `inject`; the stacked leaves straight into their shardings.

    Returns:
      ``(model, config)``.
    Raises:
      ValueError as `qlora_jax.io.load_llama` (unreadable or mismatched checkpoint), or a
      ``shardings`` tree that lacks a leaf of the built model.
    """
    from qlora_jax.io.hf import load_llama  # noqa: PLC0415 - qlora_jax.io imports this package

    if not isinstance(policy, QuantPolicy):
        raise TypeError(f"load_quantized_llama: policy must be a QuantPolicy, got {type(policy).__name__}")
    pdt = jnp.dtype(param_dtype)
    lookup = sharding_lookup(shardings)
    placer = None if lookup is None else _Placer(lookup, stacking=stack)

    def quantize(fpath: str, a: np.ndarray) -> QuantizedArray | None:
        if not fpath.endswith(".kernel") or a.ndim != 2:
            return None
        module = fpath[: -len(".kernel")]
        if not policy.selects(fpath, a) or (lora_config is not None and lora_config.saves(module)):
            return None
        # The same ops as QuantLinear.from_layer on a kernel stored in param_dtype.
        return policy.quantize(jnp.asarray(a, pdt).T, name=module)

    def hook(fpath: str, a: np.ndarray) -> Any:
        q = quantize(fpath, a)
        if placer is None:
            return q
        if q is not None:  # becomes QuantLinear.base below
            return placer.value(fpath[: -len(".kernel")] + ".base", q)
        # What load_llama stores (RMSNorm weights are the only ".weight" params), then placed.
        return placer.value(fpath, jnp.asarray(a, jnp.dtype(norm_dtype) if fpath.endswith(".weight") else pdt))

    model, config = load_llama(path, dtype=dtype, param_dtype=param_dtype, norm_dtype=norm_dtype,
                               tensor_hook=hook, **model_kwargs)
    nodes = {tuple(p): n for p, n in nnx.iter_graph(model)}
    for p, node in nodes.items():
        if type(node) is nnx.Linear and isinstance(node.kernel.get_value(), QuantizedArray):
            q = qnnx.QuantLinear(qnnx.QuantWeight(node.kernel.get_value()), node.bias,
                                 qnnx._layout_for(node), compute_dtype=dtype,
                                 orig_dtype=getattr(node, "dtype", None), param_dtype=pdt, backend=backend)
            _set_child(nodes[p[:-1]], p[-1], q)
    if lora_config is not None:
        qnnx.inject(model, lora_config, quantize=policy, adapter_name=adapter_name, compute_dtype=dtype,
                    rngs=rngs if rngs is not None else nnx.Rngs(params=0, dropout=1),
                    lora_param_dtype=lora_param_dtype, backend=backend)
    _finish(model, placer, stack, shardings)
    return model, config


# --------------------------------------------------------------------------------------------
# Stacked decoder layers


class ScannedLayers(nnx.Module):
    """``num_layers`` identical decoder layers held as one module whose every array has a leading
    ``[num_layers]`` axis, called as one ``lax.scan`` (the model's per-layer remat policy applied
    to the scan body).

    Stands in for ``LlamaModel.layers`` (as its only element): called like one layer,
    ``h [B, T, D] -> [B, T, D]``. Quantized bases keep their per-layer ``QuantizedArray``
    metadata (``shape`` is one layer's), so use it only through the scan; `unstack_layers`
    gives back the list.
    """

    def __init__(self, layer: nnx.Module, num_layers: int, remat_policy: str | None):
        if remat_policy not in SCAN_REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r} is not supported (use one of {SCAN_REMAT_POLICIES})")
        self.layer = layer
        self.num_layers = int(num_layers)
        self.remat_policy = remat_policy

    def __call__(self, h: jax.Array, *args: Any) -> jax.Array:
        graphdef, state = nnx.split(self.layer)
        offload_inputs = self.remat_policy == "offload_inputs"

        def body(carry, layer_state):
            if offload_inputs:  # the named copy is what the backward pass reads: it lives on the host
                carry = checkpoint_name(carry, _LAYER_INPUT)
            layer = nnx.merge(graphdef, layer_state)
            return layer(carry, *args), nnx.state(layer, nnx.RngState)

        if offload_inputs:
            policy = jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=(), names_which_can_be_offloaded=(_LAYER_INPUT,),
                offload_src="device", offload_dst="pinned_host")
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        elif self.remat_policy is not None:
            body = jax.checkpoint(body, policy=_remat_policy_fn(self.remat_policy), prevent_cse=False)
        h, rngs = jax.lax.scan(body, h, state)
        if jax.tree.leaves(rngs):  # dropout streams advanced: write their counters back
            nnx.update(self.layer, rngs)
        return h


def is_stacked(model: LlamaForCausalLM) -> bool:
    """True if ``model``'s decoder layers are a `ScannedLayers` (see `stack_layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers is not None and len(layers) == 1 and isinstance(layers[0], ScannedLayers)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _stack_leaves(xs: list[Any], sharding: jax.sharding.Sharding | None = None) -> Any:
    """``jnp.stack(xs)`` that frees each input as it goes: the arrays pass through host memory, so
    device memory never holds the inputs and the stack at once (for 70B a leaf group is ~9 GB).
    The inputs may already be in host memory (numpy). The stack goes to ``sharding`` (default: the
    first input's, or the default device for numpy inputs)."""
    if not all(_is_array(x) for x in xs):
        return jnp.stack(xs)  # tracing (e.g. under nnx.eval_shape)
    if _is_key(xs[0]):  # PRNG keys: a few bytes a layer
        out = jnp.stack(xs)
        return out if sharding is None else _put(out, sharding)
    own = getattr(xs[0], "sharding", None)
    host = np.empty((len(xs), *xs[0].shape), xs[0].dtype)
    for i, x in enumerate(xs):
        host[i] = np.asarray(x)
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()
    if sharding is None or sharding == own:
        return jax.device_put(host, own)  # the inputs' own placement (numpy: the default device)
    return _put(host, sharding)


def stack_layers(model: LlamaForCausalLM, remat_policy: str | None = "model", *,
                 shardings: Shardings = None) -> None:
    """Replaces ``model.model.layers`` (identical decoder layers, e.g. after `inject` with the same
    adapters everywhere) by one `ScannedLayers`, in place; moves the model's remat policy into it
    (or uses ``remat_policy``, one of `SCAN_REMAT_POLICIES`, instead of the model's).

    The per-layer arrays are consumed (deleted as they are stacked): do not keep references to the
    old layer objects. They may be device arrays or already host (numpy) arrays. Each stacked leaf
    is built in host memory and ``device_put`` once: with the first layer's sharding, or, with
    ``shardings`` (see `sharding_lookup`; paths of the stacked state, e.g.
    ``"model.layers.0.layer.mlp.up_proj.base.codes"``), straight with its own sharding, so that a
    device receives only its shard. Leaves outside the layers are left where they are. Raises
    ValueError if the layers differ in structure (e.g. adapters on some layers only) or are
    already stacked.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "remat_policy"):
        raise ValueError(f"stack_layers needs a LlamaForCausalLM-like model (model.model.layers), got "
                         f"{type(model).__name__}")
    if is_stacked(model):
        raise ValueError("stack_layers: the model's layers are already stacked")
    if remat_policy != "model" and remat_policy not in SCAN_REMAT_POLICIES:
        raise ValueError(f"stack_layers: remat_policy {remat_policy!r} is not supported (use one of "
                         f"{SCAN_REMAT_POLICIES})")
    split = [nnx.split(layer) for layer in layers]
    graphdef = split[0][0]
    for i, (g, _) in enumerate(split[1:], 1):
        if g != graphdef:
            raise ValueError(f"stack_layers: decoder layer {i} differs in structure from layer 0 (adapters, "
                             f"quantization or ranks differ); stacking needs identical layers")
    lookup = sharding_lookup(shardings)
    flat, treedef = jax.tree_util.tree_flatten_with_path(split[0][1])
    paths = [_STACKED_PREFIX + tree_path_str(p) for p, _ in flat]
    per_layer = [jax.tree.leaves(state) for _, state in split]
    del split, flat
    stacked = []
    for j, path in enumerate(paths):
        xs = [leaves[j] for leaves in per_layer]
        for leaves in per_layer:  # the stack function holds the only references (it frees them)
            leaves[j] = None
        target = None if lookup is None else lookup(path, jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype))
        stacked.append(_stack_leaves(xs, target))
        del xs
    layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, stacked))
    policy = inner.remat_policy if remat_policy == "model" else remat_policy
    inner.layers = _module_list([ScannedLayers(layer, len(per_layer), policy)])
    inner.remat_policy = None


def unstack_layers(model: LlamaForCausalLM) -> None:
    """Undoes `stack_layers` in place: ``model.model.layers`` becomes a list of layers again (and the
    remat policy returns to the model)."""
    if not is_stacked(model):
        raise ValueError("unstack_layers: the model's layers are not stacked (see stack_layers)")
    inner = model.model
    scanned = inner.layers[0]
    graphdef, state = nnx.split(scanned.layer)
    layers = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(scanned.num_layers)]
    inner.layers = _module_list(layers)
    # "offload_inputs" exists only for the scan; the unrolled layers get the nearest model policy.
    inner.remat_policy = "full" if scanned.remat_policy == "offload_inputs" else scanned.remat_policy
