"""The QLoRA optimizer chain and host offload of its state.

`make_optimizer` builds ``clip_by_global_norm → AdamW(schedule)`` (wrapped in ``optax.MultiSteps``
for gradient accumulation), to be applied to the LoRA params only (the caller differentiates the
split-out LoRA state, never the frozen base). Its state is float32 whatever the compute dtype.

Host offload (the JAX counterpart of the paper's paged optimizers): `OffloadConfig` /
`offload_shardings` place the optimizer state in ``pinned_host`` memory between steps; the train
step (`qlora_jax.train.step`) moves it to the device inside the jitted update and returns it to the
host through ``out_shardings``, so device memory holds it only while the update runs.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import optax

__all__ = [
    "SCHEDULES", "make_schedule", "make_optimizer", "OffloadConfig", "host_memory_kind",
    "offload_shardings", "to_memory",
]

SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(lr: float, schedule: str = "constant", *, warmup_steps: int = 0,
                  total_steps: int | None = None) -> optax.Schedule:
    """Learning rate by optimizer step: linear warmup from 0 over ``warmup_steps``, then constant,
    cosine decay to 0 at ``total_steps``, or linear decay to 0 at ``total_steps``.

    Raises:
      ValueError: unknown schedule, negative lr/warmup, or a decaying schedule without
        ``total_steps > warmup_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    if not lr >= 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant":
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(f"schedule {schedule!r} needs total_steps > warmup_steps "
                             f"(got total_steps={total_steps}, warmup_steps={warmup_steps})")
    decay_steps = (total_steps or 0) - warmup_steps
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.0)
    else:
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


def make_optimizer(lr: float, schedule: str = "constant", *, warmup_steps: int = 0,
                   total_steps: int | None = None, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 0.3, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, accumulation_steps: int = 1) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_grad_norm) → adamw(schedule, b1, b2, eps, weight_decay)``.

    Steps count optimizer updates: with ``accumulation_steps = k > 1`` the chain is wrapped in
    ``optax.MultiSteps(k)``, which averages ``k`` successive gradients and applies one update
    (the schedule advances once per ``k`` calls). ``max_grad_norm=None`` disables clipping
    (QLoRA's default is 0.3). Weight decay applies to every trained leaf (only LoRA params are
    ever passed in).
    """
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    sched = make_schedule(lr, schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
    return tx


# --------------------------------------------------------------------------------------------
# Host offload


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """Where the optimizer state lives between steps.

    Attributes:
      optimizer_state: keep the optimizer state in host memory (``memory_kind``) between steps.
      memory_kind: the host memory kind (``"pinned_host"``: DMA-able, so transfers overlap).
    """

    optimizer_state: bool = False
    memory_kind: str = "pinned_host"


def host_memory_kind(device: Any = None, kind: str = "pinned_host") -> str | None:
    """``kind`` if ``device`` (default: the first device) exposes that memory, else None."""
    dev = device if device is not None else jax.devices()[0]
    try:
        kinds = {m.kind for m in dev.addressable_memories()}
    except Exception:  # a backend without the memories API
        return None
    return kind if kind in kinds else None


def _sharding_of(x: Any) -> jax.sharding.Sharding:
    s = getattr(x, "sharding", None)
    if s is None:  # a numpy array or scalar: it will land on the default device
        s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return s


def offload_shardings(tree: Any, config: OffloadConfig | None = None) -> tuple[Any, Any] | None:
    """``(host_shardings, device_shardings)`` trees for ``tree``'s leaves, or None without offload.

    Each leaf keeps its sharding (devices and partitioning) and changes only its memory kind.
    If the platform lacks ``config.memory_kind``, warns and returns None (the state then simply
    stays in device memory).
    """
    if config is None or not config.optimizer_state:
        return None
    leaves = jax.tree.leaves(tree)
    devs = {d for x in leaves for d in _sharding_of(x).device_set} or {jax.devices()[0]}
    missing = sorted(str(d) for d in devs if host_memory_kind(d, config.memory_kind) is None)
    if missing:
        warnings.warn(f"optimizer-state offload needs memory kind {config.memory_kind!r}, which "
                      f"{missing} do not expose (platform {jax.default_backend()!r}); keeping the "
                      f"optimizer state in device memory", RuntimeWarning, stacklevel=2)
        return None
    host = jax.tree.map(lambda x: _sharding_of(x).with_memory_kind(config.memory_kind), tree)
    dev = jax.tree.map(lambda x: _sharding_of(x).with_memory_kind("device"), tree)
    return host, dev


def to_memory(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` of every leaf to its sharding (e.g. from `offload_shardings`)."""
    return jax.device_put(tree, shardings)

