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
"""

from __future__ import annotations

import functools
import os
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
from qlora_jax.quantize import QuantizedArray, QuantPolicy

__all__ = [
    "layer_key", "init_llama", "init_quantized_llama", "load_quantized_llama",
    "ScannedLayers", "SCAN_REMAT_POLICIES", "stack_layers", "unstack_layers", "is_stacked",
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


def init_llama(config: LlamaConfig, key: jax.Array, *, init_std: float = 0.02,
               quantize: QuantPolicy | None = None, keep_float: Callable[[str], bool] | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, norm_dtype: Any = jnp.float32,
               backend: str = "auto", on_param: ParamHook | None = None,
               **model_kwargs: Any) -> LlamaForCausalLM:
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
      on_param: called with each parameter's path right after it is materialized (progress, or
        memory probes in tests).
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
            if on_param is not None:
                on_param(p + ".kernel")
        elif isinstance(node, nnx.Embed):
            ev = node.embedding.get_value()
            p = _path_str(path) + ".embedding"
            node.embedding.set_value(_normal(layer_key(key, p), std, tuple(ev.shape), jnp.dtype(ev.dtype).name))
            if on_param is not None:
                on_param(p)
        elif isinstance(node, RMSNorm):
            wv = node.weight.get_value()
            node.weight.set_value(jnp.ones(wv.shape, wv.dtype))
            if on_param is not None:
                on_param(_path_str(path) + ".weight")
    left = [_path_str(p) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Variable) and _abstract(n.get_value())]
    if left:  # a model change added a parameter this builder does not know how to initialize
        raise ValueError(f"init_llama: no initializer for {left[:10]}")
    return model


def _default_lora_rngs(key: jax.Array) -> nnx.Rngs:
    return nnx.Rngs(params=layer_key(key, "lora.params"), dropout=layer_key(key, "lora.dropout"))


def init_quantized_llama(config: LlamaConfig, lora_config: LoraConfig | None, *, key: jax.Array,
                         policy: QuantPolicy = QuantPolicy(), init_std: float = 0.02,
                         rngs: nnx.Rngs | None = None, adapter_name: str = "default",
                         dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.bfloat16,
                         norm_dtype: Any = jnp.float32, lora_param_dtype: Any = jnp.float32,
                         backend: str = "auto", stack: bool = False, on_param: ParamHook | None = None,
                         **model_kwargs: Any) -> LlamaForCausalLM:
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
      **model_kwargs: ``remat_policy``, ``attn_implementation``.
    """
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"init_quantized_llama: lora_config must be a LoraConfig or None, got "
                        f"{type(lora_config).__name__}")
    if not isinstance(policy, QuantPolicy):
        raise TypeError(f"init_quantized_llama: policy must be a QuantPolicy, got {type(policy).__name__}")
    keep = lora_config.saves if lora_config is not None else None
    model = init_llama(config, key, init_std=init_std, quantize=policy, keep_float=keep, dtype=dtype,
                       param_dtype=param_dtype, norm_dtype=norm_dtype, backend=backend, on_param=on_param,
                       **model_kwargs)
    if lora_config is not None:
        qnnx.inject(model, lora_config, quantize=policy, adapter_name=adapter_name, compute_dtype=dtype,
                    rngs=rngs if rngs is not None else _default_lora_rngs(key),
                    lora_param_dtype=lora_param_dtype, backend=backend)
    if stack:
        stack_layers(model)
    return model


def load_quantized_llama(path: str | os.PathLike, lora_config: LoraConfig | None = None, *,
                         policy: QuantPolicy = QuantPolicy(), rngs: nnx.Rngs | None = None,
                         adapter_name: str = "default", dtype: Any = jnp.bfloat16,
                         param_dtype: Any = jnp.bfloat16, norm_dtype: Any = jnp.float32,
                         lora_param_dtype: Any = jnp.float32, backend: str = "auto", stack: bool = False,
                         **model_kwargs: Any) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Loads an HF folder or GGUF file, quantizing each selected kernel as it is read.

    `qlora_jax.io.load_llama` streams the checkpoint one tensor at a time into an abstract model;
    its ``tensor_hook`` here quantizes each kernel ``policy`` selects (in ``param_dtype``, in
    ``[out, in]`` order as `qlora_jax.quantize.quantize_linear_kernel`) before the next tensor is
    read, so host and device hold one float tensor at a time. The layers holding a quantized
    kernel then become `qlora_jax.nnx.QuantLinear`, and ``lora_config`` (if given) is injected.
    Equal to ``load_llama(path, dtype=dtype, param_dtype=param_dtype)`` followed by
    ``inject(model, lora_config, quantize=policy, compute_dtype=dtype, ...)``.

    Returns:
      ``(model, config)``.
    Raises:
      ValueError as `qlora_jax.io.load_llama` (unreadable or mismatched checkpoint).
    """
    from qlora_jax.io.hf import load_llama  # noqa: PLC0415 - qlora_jax.io imports this package

    if not isinstance(policy, QuantPolicy):
        raise TypeError(f"load_quantized_llama: policy must be a QuantPolicy, got {type(policy).__name__}")
    pdt = jnp.dtype(param_dtype)

    def hook(fpath: str, a: np.ndarray) -> QuantizedArray | None:
        if not fpath.endswith(".kernel") or a.ndim != 2:
            return None
        module = fpath[: -len(".kernel")]
        if not policy.selects(fpath, a) or (lora_config is not None and lora_config.saves(module)):
            return None
        # The same ops as QuantLinear.from_layer on a kernel stored in param_dtype.
        return policy.quantize(jnp.asarray(a, pdt).T, name=module)

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
    if stack:
        stack_layers(model)
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


def _stack_leaves(xs: list[Any]) -> Any:
    """``jnp.stack(xs)`` that frees each input as it goes: the arrays pass through host memory, so
    device memory never holds the inputs and the stack at once (for 70B a leaf group is ~9 GB)."""
    if _is_key(xs[0]) or not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in xs):
        return jnp.stack(xs)  # PRNG keys (small), or tracing (e.g. under nnx.eval_shape)
    sharding = xs[0].sharding
    host = np.empty((len(xs), *xs[0].shape), xs[0].dtype)
    for i, x in enumerate(xs):
        host[i] = np.asarray(x)
        if not x.is_deleted():
            x.delete()
    return jax.device_put(host, sharding)


def stack_layers(model: LlamaForCausalLM, remat_policy: str | None = "model") -> None:
    """Replaces ``model.model.layers`` (identical decoder layers, e.g. after `inject` with the same
    adapters everywhere) by one `ScannedLayers`, in place; moves the model's remat policy into it
    (or uses ``remat_policy``, one of `SCAN_REMAT_POLICIES`, instead of the model's).

    The per-layer arrays are consumed (deleted as they are stacked): do not keep references to the
    old layer objects. Raises ValueError if the layers differ in structure (e.g. adapters on some
    layers only) or are already stacked.
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
    treedef = jax.tree.structure(split[0][1])
    per_layer = [jax.tree.leaves(state) for _, state in split]
    del split
    stacked = [_stack_leaves([leaves[j] for leaves in per_layer]) for j in range(len(per_layer[0]))]
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
