"""The jitted QLoRA train and eval steps over a split NNX model.

The model (after `qlora_jax.nnx.inject`) is split three ways::

    graphdef, params, rngs, frozen = split_model(model)
      params  nnx.LoRAParam state: the adapters (and modules_to_save), float32 master copies
      rngs    nnx.RngState: the dropout streams (their counters advance every step)
      frozen  everything else: 4-bit bases, norms, embeddings (never differentiated)

`TrainState` bundles what changes during training (step, params, optimizer state, rngs); the
frozen state is passed to every step separately and never donated. The loss is the mean token
cross-entropy over the targets that ``batch["loss_mask"]`` marks (see `qlora_jax.data`),
computed in float32 from float32 logits; the model computes in its own compute dtype (bf16 on
accelerators). Gradients exist only for ``params``.

With host offload (`qlora_jax.train.optim.offload_shardings`) the optimizer state enters and
leaves the step in ``pinned_host`` memory and is moved to the device only for the update.
Remat is the model's option (`remat_policy`): a ``LlamaForCausalLM`` built with
``remat_policy="full" | "save_dots" | "offload_dots"`` rematerialises each decoder layer.
`scan_forward` runs the decoder layers as one ``lax.scan`` (the same numbers, far less to compile).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qlora_jax.train.optim import OffloadConfig, offload_shardings

__all__ = [
    "TrainState", "TrainSetup", "REMAT_CHOICES", "remat_policy", "split_model", "init_train_state",
    "merge_model", "masked_nll", "default_forward", "scan_forward", "make_train_step", "make_eval_step",
    "evaluate", "evaluate_model", "tree_bytes",
]

# CLI names of the per-layer remat policies (``"none"`` = no remat).
REMAT_CHOICES = ("none", "full", "save_dots", "offload_dots")

Batch = Mapping[str, Any]
Forward = Callable[[nnx.Module, Batch], jax.Array]


def remat_policy(name: str | None) -> str | None:
    """The model's ``remat_policy`` argument for a CLI name in `REMAT_CHOICES` (None for "none")."""
    if name is None or name == "none":
        return None
    if name not in REMAT_CHOICES:
        raise ValueError(f"unknown remat policy {name!r}; use one of {REMAT_CHOICES}")
    return name


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a train step updates.

    Attributes:
      step: int32 scalar, train-step calls so far (micro-steps when accumulating).
      params: trainable state (``nnx.LoRAParam`` variables), float32.
      opt_state: the optimizer state (device or pinned-host memory).
      rngs: the model's ``nnx.RngState`` (dropout streams); empty without dropout.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rngs: Any


def split_model(model: nnx.Module, trainable: Any = nnx.LoRAParam) -> tuple[Any, Any, Any, Any]:
    """``(graphdef, params, rngs, frozen)`` of ``model`` (see the module docstring).

    Raises:
      ValueError: the model has no ``trainable`` variables (no adapters injected).
    """
    graphdef, params, rngs, frozen = nnx.split(model, trainable, nnx.RngState, ...)
    if not jax.tree.leaves(params):
        raise ValueError("the model has no trainable (nnx.LoRAParam) variables; inject adapters first "
                         "(qlora_jax.nnx.inject)")
    return graphdef, params, rngs, frozen


def merge_model(graphdef: Any, state: TrainState, frozen: Any) -> nnx.Module:
    """The NNX model with ``state``'s params and rngs (e.g. for generation after training)."""
    return nnx.merge(graphdef, state.params, state.rngs, frozen)


def _own_copy(tree: Any, float_dtype: Any = None) -> Any:
    """Fresh buffers for ``tree`` (floating leaves cast to ``float_dtype`` if given): the train step
    donates its state, which must not delete the arrays the model object still holds."""
    def leaf(x):
        if float_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.array(x, dtype=float_dtype, copy=True)
        return x.copy()
    return jax.tree.map(leaf, tree)


class TrainSetup(NamedTuple):
    """What `init_train_state` returns (unpacks as a 4-tuple)."""

    graphdef: Any
    state: TrainState
    frozen: Any
    offload: tuple[Any, Any] | None   # (host, device) shardings of the optimizer state, or None


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                     offload: OffloadConfig | bool | None = None,
                     trainable: Any = nnx.LoRAParam) -> TrainSetup:
    """Split ``model`` and initialize the optimizer: ``(graphdef, state, frozen, offload)``.

    Trainable params are copied to float32 master copies and the rngs are copied, so the
    donating train step leaves ``model`` itself intact. With ``offload`` (an `OffloadConfig`
    or True) the optimizer state is placed in pinned-host memory and the returned ``offload``
    holds its ``(host, device)`` shardings for `make_train_step`; if the platform lacks the
    memory kind a warning is issued and ``offload`` is None.
    """
    if offload is True:
        offload = OffloadConfig(optimizer_state=True)
    graphdef, params, rngs, frozen = split_model(model, trainable)
    params = _own_copy(params, jnp.float32)
    rngs = _own_copy(rngs)
    opt_state = optimizer.init(params)
    shardings = offload_shardings(opt_state, offload or None)
    if shardings is not None:
        opt_state = jax.device_put(opt_state, shardings[0])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rngs=rngs)
    return TrainSetup(graphdef, state, frozen, shardings)


def default_forward(model: nnx.Module, batch: Batch) -> jax.Array:
    """``model(input_ids, positions=..., segment_ids=...)`` -> logits ``[B, T, V]``.

    ``positions`` and ``segment_ids`` are passed only when the batch has them (packed rows). No
    attention mask is passed: rows are right-padded, and under causal attention real tokens never
    see the padding after them (padding is excluded from the loss by ``loss_mask``).
    """
    kwargs = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    return model(batch["input_ids"], **kwargs)


_REMAT_POLICY_FNS: dict[str, Callable[[], Any]] = {
    "full": lambda: None,  # jax.checkpoint without a policy saves nothing
    "save_dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class _LayerScan:
    """Stands in for a list of identical layers: one call runs them all in a ``lax.scan``.

    The layers' states are stacked along a new leading axis on every call (a transient copy of
    the 4-bit base and the adapters; gradients flow back through the stack), the scan body
    merges one layer's slice and calls it with the arguments the model passes, and the
    layers' advanced RNG counters are written back afterwards.
    """

    def __init__(self, layers: list[nnx.Module], policy: str | None):
        split = [nnx.split(layer) for layer in layers]
        self.graphdef = split[0][0]
        if any(g != self.graphdef for g, _ in split[1:]):
            raise ValueError("scan_layers needs decoder layers of identical structure (e.g. adapters on "
                             "every layer, same ranks); use the default forward instead")
        self.layers = layers
        self.stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in split])
        self.policy = policy

    def __call__(self, h: jax.Array, *args: Any) -> jax.Array:
        graphdef = self.graphdef

        def body(carry, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            return layer(carry, *args), nnx.state(layer, nnx.RngState)

        if self.policy is not None:
            body = jax.checkpoint(body, policy=_REMAT_POLICY_FNS[self.policy](), prevent_cse=False)
        h, rngs = jax.lax.scan(body, h, self.stacked)
        if jax.tree.leaves(rngs):
            for i, layer in enumerate(self.layers):
                nnx.update(layer, jax.tree.map(lambda x: x[i], rngs))
        return h


def scan_forward(model: nnx.Module, batch: Batch) -> jax.Array:
    """`default_forward` with the decoder layers run as one ``lax.scan`` (compiles one layer, not
    each of them: several times faster to compile for deep models, same numbers).

    Works on a ``LlamaForCausalLM`` (``model.model.layers``, ``model.model.remat_policy``): for
    the duration of the call the layer list is replaced by a `_LayerScan` and the model's
    per-layer remat is applied inside the scan body instead.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "remat_policy"):
        raise ValueError(f"scan_forward needs a LlamaForCausalLM-like model (model.model.layers), "
                         f"got {type(model).__name__}")
    policy = inner.remat_policy
    stack = _LayerScan(list(layers), policy)
    # The merged model is a throwaway object of this trace: swap its layer list for the scan.
    object.__setattr__(inner, "layers", [stack])
    object.__setattr__(inner, "remat_policy", None)
    try:
        return default_forward(model, batch)
    finally:
        object.__setattr__(inner, "layers", layers)
        object.__setattr__(inner, "remat_policy", policy)


def masked_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over the targets, and their count.

    Args:
      logits: ``[B, T, V]``; ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
      input_ids: ``[B, T]`` int.
      loss_mask: ``[B, T]``; ``loss_mask[:, t] = 1`` makes ``input_ids[:, t]`` a target.
    Returns:
      ``(sum_nll, count)``, float32 scalars (computed in float32 from upcast logits).
    """
    lg = logits[:, :-1].astype(jnp.float32)
    tgt = input_ids[:, 1:]
    w = loss_mask[:, 1:].astype(jnp.float32)
    picked = jnp.take_along_axis(lg, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(lg, axis=-1) - picked
    return jnp.sum(nll * w), jnp.sum(w)


def _global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of all leaves, float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(graphdef: Any, optimizer: optax.GradientTransformation, *,
                    offload: tuple[Any, Any] | None = None,
                    schedule: Callable[[Any], Any] | None = None, accumulation_steps: int = 1,
                    forward: Forward = default_forward, donate: bool = True,
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, frozen, batch) -> (state, metrics)``.

    Args:
      graphdef: from `init_train_state` / `split_model`.
      optimizer: e.g. `qlora_jax.train.optim.make_optimizer(...)`.
      offload: ``(host_shardings, device_shardings)`` of the optimizer state
        (`qlora_jax.train.optim.offload_shardings`), or None to keep it in device memory.
      schedule: the learning-rate schedule, only to report ``lr`` in the metrics.
      accumulation_steps: micro-steps per optimizer update (as given to the optimizer), for ``lr``.
      forward: ``forward(model, batch) -> logits``; `default_forward` fits ``LlamaForCausalLM``.
      donate: donate the incoming state's buffers (the caller must not reuse it).

    The batch holds ``input_ids`` and ``loss_mask`` ``[B, T]`` (plus ``positions`` /
    ``segment_ids`` / ``attention_mask`` as `qlora_jax.data` builds them).

    Metrics (float32 scalars): ``loss`` (mean NLL over targets), ``grad_norm`` (global norm
    before clipping), ``tokens`` (real tokens), ``target_tokens``, and ``lr`` with a schedule.
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")

    def loss_fn(params, rngs, frozen, batch):
        # Fresh Variable objects at this trace level (no array copies): the dropout streams
        # advance their counters inside `value_and_grad`, and NNX transforms inside the model
        # (nnx.remat) write state back; NNX refuses to mutate variables made at an outer trace.
        rngs, frozen = jax.tree.map(lambda v: v, (rngs, frozen))
        model = nnx.merge(graphdef, params, rngs, frozen)
        logits = forward(model, batch)
        nll, count = masked_nll(logits, batch["input_ids"], batch["loss_mask"])
        new_rngs = nnx.state(model, nnx.RngState)
        return nll / jnp.maximum(count, 1.0), (count, new_rngs)

    def step(state: TrainState, frozen: Any, batch: Batch):
        (loss, (count, rngs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rngs, frozen, batch)
        opt_state = state.opt_state
        if offload is not None:
            # The barrier makes the host-to-device copy wait for the gradients: left free, XLA
            # starts the copy at the top of the step, and the state then sits in device memory
            # through the backward pass, whose peak it was offloaded to stay out of.
            grads, opt_state = jax.lax.optimization_barrier((grads, opt_state))
            opt_state = jax.device_put(opt_state, offload[1])
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tokens = (batch["attention_mask"].sum() if "attention_mask" in batch
                  else jnp.asarray(batch["input_ids"].size))
        metrics = {"loss": loss, "grad_norm": _global_norm(grads),
                   "tokens": tokens.astype(jnp.float32), "target_tokens": count}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step // accumulation_steps), jnp.float32)
        return TrainState(state.step + 1, params, opt_state, rngs), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0,)} if donate else {}
    if offload is not None:
        # The host-resident optimizer state must be declared on the way in as well as out:
        # donating a pinned-host buffer without an input sharding fails on some backends.
        shard = TrainState(step=None, params=None, opt_state=offload[0], rngs=None)
        kwargs["in_shardings"] = (shard, None, None)
        kwargs["out_shardings"] = (shard, None)
    return jax.jit(step, **kwargs)


def make_eval_step(graphdef: Any, *, forward: Forward = default_forward
                   ) -> Callable[[Any, Any, Any, Batch], tuple[jax.Array, jax.Array]]:
    """A jitted ``eval_step(params, rngs, frozen, batch) -> (sum_nll, count)`` in eval mode
    (adapter dropout off)."""

    @jax.jit
    def eval_step(params, rngs, frozen, batch):
        model = nnx.merge(graphdef, params, rngs, frozen)
        model.eval()
        return masked_nll(forward(model, batch), batch["input_ids"], batch["loss_mask"])

    return eval_step


def evaluate(eval_step: Callable, state: TrainState, frozen: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Held-out ``{"loss", "perplexity", "tokens"}`` over all ``batches`` (token-weighted mean NLL)."""
    return _token_weighted(eval_step(state.params, state.rngs, frozen, batch) for batch in batches)


def evaluate_model(model: nnx.Module, batches: Iterable[Batch], *,
                   forward: Forward = default_forward) -> dict[str, float]:
    """Held-out ``{"loss", "perplexity", "tokens"}`` of any model (adapters or not), in eval mode."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, batch):
        m = nnx.merge(graphdef, state)
        return masked_nll(forward(m, batch), batch["input_ids"], batch["loss_mask"])

    return _token_weighted(nll(state, batch) for batch in batches)


def _token_weighted(sums: Iterable[tuple[jax.Array, jax.Array]]) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` from per-batch ``(nll sum, target count)`` pairs."""
    total, count = 0.0, 0.0
    for s, c in sums:
        total += float(s)
        count += float(c)
    if count == 0:
        raise ValueError("evaluation batches contain no target tokens")
    loss = total / count
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0))), "tokens": count}


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape")))
