"""Training: the optimizer chain with optional host-offloaded state, the jitted QLoRA train and
eval steps, and checkpointing (Orbax run checkpoints, safetensors adapter files)."""

from qlora_jax.train.checkpoint import (
    CheckpointManager,
    Restored,
    apply_adapter,
    attach_adapter,
    load_adapter,
    save_adapter,
)
from qlora_jax.train.optim import (
    SCHEDULES,
    OffloadConfig,
    host_memory_kind,
    make_optimizer,
    make_schedule,
    offload_shardings,
)
from qlora_jax.train.step import (
    REMAT_CHOICES,
    TrainSetup,
    TrainState,
    default_forward,
    evaluate,
    evaluate_model,
    init_train_state,
    make_eval_step,
    make_train_step,
    masked_nll,
    merge_model,
    remat_policy,
    scan_forward,
    split_model,
    tree_bytes,
)

__all__ = [
    # checkpoint
    "CheckpointManager", "Restored", "apply_adapter", "attach_adapter", "load_adapter", "save_adapter",
    # optim
    "SCHEDULES", "OffloadConfig", "host_memory_kind", "make_optimizer", "make_schedule", "offload_shardings",
    # step
    "REMAT_CHOICES", "TrainSetup", "TrainState", "default_forward", "evaluate", "evaluate_model",
    "init_train_state", "make_eval_step", "make_train_step", "masked_nll", "merge_model", "remat_policy",
    "scan_forward", "split_model", "tree_bytes",
]
