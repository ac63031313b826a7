"""LoRA configuration with PEFT's names and matching rules, and the adapter initializers.

`LoraConfig` decides which linear modules get an adapter and with which rank and scale; the
model transforms (`qlora_jax.nnx`, `qlora_jax.linen`) ask it about dot-joined module paths such as
``"model.layers.3.self_attn.q_proj"``. The rules are PEFT's (``tuners_utils.py::
check_target_module_exists``, ``utils/other.py::get_pattern_key``):

- ``target_modules`` as a ``str`` is a regex that must ``re.fullmatch`` the full module path;
  as a list, an entry matches a path equal to it or ending in ``"." + entry``;
  ``"all-linear"`` matches every linear module except the output head (a module whose last
  path segment is one of `OUTPUT_HEAD_NAMES`, e.g. ``lm_head``);
  ``None`` means PEFT's default for Llama-family models, ``["q_proj", "v_proj"]``.
- ``exclude_modules`` follows the same rules and wins over ``target_modules``.
- ``layers_to_transform`` (an int or a list) keeps only modules whose layer index is in it: the
  index is the first all-digit path segment, or, with ``layers_pattern``, the segment right
  after a segment that matches the pattern (our paths have no ``base_model.model.`` prefix, so
  unlike PEFT a top-level ``layers.3...`` counts too). Modules with no layer index are skipped.
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes; the first key with
  ``re.match(rf"(.*\\.)?({key})$", path)`` gives the module's rank / alpha.
- scale = ``alpha / r``, or ``alpha / √r`` with ``use_rslora``.

Shapes: A is ``[K, r]`` and B ``[r, N]`` (Flax orientation; PEFT's ``lora_A.weight`` is ``A.T``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LoraConfig", "OUTPUT_HEAD_NAMES", "ALL_LINEAR", "init_lora_a", "init_lora_b",
           "init_lora_weights"]

ALL_LINEAR = "all-linear"
# Last path segments that "all-linear" treats as the model's output head (PEFT excludes the
# output embedding of a causal LM and the classifier of a sequence classifier).
OUTPUT_HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
_BIAS_MODES = ("none", "all", "lora_only")
# PEFT adapter_config.json fields we accept but whose feature we do not implement: loading a
# config that turns one on must fail loudly rather than silently train something else.
_UNSUPPORTED_TRUE_FIELDS = ("use_dora", "fan_in_fan_out", "use_qalora", "lora_bias")


def _match_list_entry(path: str, entry: str) -> bool:
    return path == entry or path.endswith("." + entry)


def _match_modules(path: str, spec: str | Sequence[str] | None) -> bool:
    """PEFT's rule for ``target_modules`` / ``exclude_modules`` (``"all-linear"`` handled apart)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(_match_list_entry(path, e) for e in spec)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters, with the field names and meaning of PEFT's ``LoraConfig``.

    Attributes:
      r: adapter rank (> 0).
      lora_alpha: scaling numerator; scale = ``lora_alpha / r`` (``/ √r`` with ``use_rslora``).
      lora_dropout: dropout probability on the adapter's input, in ``[0, 1)``.
      target_modules: a list of module names, a regex string, ``"all-linear"`` or None (see the
        module docstring).
      exclude_modules: list or regex of modules to leave alone.
      use_rslora: rank-stabilized scaling ``alpha / √r``.
      init_lora_weights: True (A Kaiming-uniform with bound ``1/√K``, B = 0), ``"gaussian"``
        (A ~ Normal(0, std=1/r), B = 0) or False (B random too: the adapter is not a no-op).
      rank_pattern: ``{regex: rank}`` per-module rank overrides.
      alpha_pattern: ``{regex: alpha}`` per-module alpha overrides.
      layers_to_transform: layer index or indices to adapt (None = all).
      layers_pattern: name(s) of the layer-list segment, e.g. ``"layers"`` or ``"h"``.
      bias: "none", "all" (every bias of the model trains) or "lora_only" (biases of adapted
        layers train).
      modules_to_save: names (list rule) of modules trained in full, e.g. ``["lm_head"]``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                if not all(isinstance(e, str) for e in v):
                    raise TypeError(f"LoraConfig.{name} must be a string or a list of strings, got {v!r}")
                object.__setattr__(self, name, tuple(v))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        lt = self.layers_to_transform
        if lt is not None:
            lt = (lt,) if isinstance(lt, int) else tuple(lt)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lt):
                raise ValueError(f"LoraConfig.layers_to_transform must be non-negative ints, got {self.layers_to_transform!r}")
            object.__setattr__(self, "layers_to_transform", lt)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        _check_rank(self.r, "r")
        for key, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        _check_alpha(self.lora_alpha, "lora_alpha")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', "
                             f"got {self.init_lora_weights!r}")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, str) and v != ALL_LINEAR:
                _compile(v, f"LoraConfig.{name}")
        for name, pats in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pats:
                _compile(rf"(.*\.)?({key})$", f"LoraConfig.{name} key {key!r}")
        if self.layers_pattern is not None:
            for p in (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern:
                _compile(p, "LoraConfig.layers_pattern")

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    # ---------------------------------------------------------------- matching

    @property
    def targets(self) -> str | tuple[str, ...]:
        """``target_modules`` with None resolved to the default list."""
        return DEFAULT_TARGET_MODULES if self.target_modules is None else self.target_modules

    def target_matches(self, name: str) -> bool:
        """True if ``target_modules`` alone selects the module at path ``name``."""
        t = self.targets
        if t == ALL_LINEAR:
            return name.split(".")[-1] not in OUTPUT_HEAD_NAMES
        return _match_modules(name, t)

    def excluded(self, name: str) -> bool:
        """True if ``exclude_modules`` removes the module at ``name``."""
        return _match_modules(name, self.exclude_modules)

    def layer_index(self, name: str) -> int | None:
        """The layer index of ``name`` used by ``layers_to_transform`` (None if it has none)."""
        parts = name.split(".")
        if self.layers_pattern is None:
            for p in parts[:-1]:
                if p.isdigit():
                    return int(p)
            return None
        pats = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        for pat in pats:
            for i in range(len(parts) - 2):
                if re.fullmatch(pat, parts[i]) and parts[i + 1].isdigit():
                    return int(parts[i + 1])
        return None

    def matches(self, name: str) -> bool:
        """True if the linear module at path ``name`` gets an adapter under this config."""
        if not self.target_matches(name) or self.excluded(name):
            return False
        if self.layers_to_transform is not None:
            idx = self.layer_index(name)
            return idx is not None and idx in self.layers_to_transform
        return True

    def unmatched_targets(self, names: Sequence[str]) -> list[str]:
        """Entries of a list ``target_modules`` that match none of ``names`` (typos), or the
        regex itself if it matches none; empty for ``"all-linear"`` when ``names`` is non-empty."""
        t = self.targets
        if t == ALL_LINEAR:
            return [] if any(self.target_matches(n) for n in names) else [ALL_LINEAR]
        if isinstance(t, str):
            return [] if any(_match_modules(n, t) for n in names) else [t]
        return [e for e in t if not any(_match_list_entry(n, e) for n in names)]

    def saves(self, name: str) -> bool:
        """True if ``modules_to_save`` selects the module at ``name`` (trained in full)."""
        return self.modules_to_save is not None and any(_match_list_entry(name, e) for e in self.modules_to_save)

    @staticmethod
    def _pattern_value(name: str, pattern: Mapping[str, Any]) -> Any:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return None

    def rank_for(self, name: str) -> int:
        """The adapter rank of the module at ``name`` (``rank_pattern`` or ``r``)."""
        v = self._pattern_value(name, self.rank_pattern)
        return self.r if v is None else int(v)

    def alpha_for(self, name: str) -> float:
        """The alpha of the module at ``name`` (``alpha_pattern`` or ``lora_alpha``)."""
        v = self._pattern_value(name, self.alpha_pattern)
        return float(self.lora_alpha if v is None else v)

    def scale_for(self, name: str) -> float:
        """LoRA scaling of the module at ``name``: alpha/r, or alpha/√r with rsLoRA."""
        r = self.rank_for(name)
        denom = math.sqrt(r) if self.use_rslora else r
        return self.alpha_for(name) / denom

    # ---------------------------------------------------------------- PEFT json

    def to_dict(self) -> dict[str, Any]:
        """The PEFT ``adapter_config.json`` fields (lists as lists)."""
        def lst(v):
            return list(v) if isinstance(v, tuple) else v
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": lst(self.target_modules),
            "exclude_modules": lst(self.exclude_modules),
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": lst(self.layers_to_transform),
            "layers_pattern": lst(self.layers_pattern),
            "bias": self.bias,
            "modules_to_save": lst(self.modules_to_save),
            "use_dora": False,
            "fan_in_fan_out": False,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Builds a config from a PEFT ``adapter_config.json`` dict; unknown fields are ignored.

        Raises ValueError for a non-LoRA ``peft_type`` or a feature we do not implement
        (``use_dora``, ``fan_in_fan_out``, ...) switched on.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"LoraConfig.from_dict expects a mapping, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"adapter config has peft_type {peft_type!r}; only 'LORA' is supported")
        on = [f for f in _UNSUPPORTED_TRUE_FIELDS if d.get(f)]
        if on:
            raise ValueError(f"adapter config enables unsupported LoRA features: {on}")
        init = d.get("init_lora_weights", True)
        if not (isinstance(init, bool) or init == "gaussian"):
            raise ValueError(f"adapter config has init_lora_weights={init!r}; supported: True, False, 'gaussian'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
        for k in ("rank_pattern", "alpha_pattern"):
            kwargs[k] = dict(d.get(k) or {})
        return cls(**kwargs)


def _check_rank(r: Any, what: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoraConfig.{what} must be a positive int, got {r!r}")


def _check_alpha(a: Any, what: str) -> None:
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a):
        raise ValueError(f"LoraConfig.{what} must be a finite number, got {a!r}")


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: invalid regex {pattern!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# Initialization


def init_lora_a(key: jax.Array, k: int, r: int, init: bool | str = True, dtype: Any = jnp.float32) -> jax.Array:
    """LoRA A ``[K, r]``.

    ``True``/``False``: torch's ``kaiming_uniform_(a=√5)`` on PEFT's ``[r, K]`` weight, i.e.
    uniform in ``±√(6 / ((1 + 5)·K)) = ±1/√K``; ``"gaussian"``: Normal(0, std = 1/r) (PEFT's code).
    """
    if init == "gaussian":
        return (jax.random.normal(key, (k, r), jnp.float32) / r).astype(dtype)
    bound = 1.0 / math.sqrt(k)
    return jax.random.uniform(key, (k, r), jnp.float32, -bound, bound).astype(dtype)


def init_lora_b(key: jax.Array, r: int, n: int, init: bool | str = True, dtype: Any = jnp.float32) -> jax.Array:
    """LoRA B ``[r, N]``: zeros (the adapter starts as a no-op) unless ``init`` is False, where it
    gets torch's default ``nn.Linear(r, N)`` init, uniform ``±1/√r``."""
    if init is False:
        bound = 1.0 / math.sqrt(r)
        return jax.random.uniform(key, (r, n), jnp.float32, -bound, bound).astype(dtype)
    return jnp.zeros((r, n), dtype)


def init_lora_weights(key: jax.Array, k: int, n: int, r: int, init: bool | str = True,
                      dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``(A [K, r], B [r, N])`` initialized as `LoraConfig.init_lora_weights` says."""
    ka, kb = jax.random.split(key)
    return init_lora_a(ka, k, r, init, dtype), init_lora_b(kb, r, n, init, dtype)
