"""HF PEFT LoRA adapters: load them onto our NNX models, and save ours so that PEFT loads them.

On disk (PEFT's ``save_pretrained``): ``adapter_config.json`` (the ``LoraConfig`` fields) and
``adapter_model.safetensors`` with, for a module at path ``P`` of the transformers model
(``model.layers.0.self_attn.q_proj`` for Llama: the same dot path as in our model)::

    base_model.model.P.lora_A.weight   [r, in]   = our A [in, r] transposed
    base_model.model.P.lora_B.weight   [out, r]  = our B [r, out] transposed

The scale is ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), per module through
``rank_pattern`` / ``alpha_pattern``; `qlora_jax.lora.LoraConfig` reads the same fields with PEFT's
matching rules, so the set of adapted modules and their scales agree on both sides.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.lora import OUTPUT_HEAD_NAMES, LoraConfig

__all__ = ["PEFT_WEIGHTS", "PEFT_CONFIG", "PEFT_PREFIX", "read_peft_adapter", "load_peft_adapter",
           "peft_adapter_tensors", "peft_adapter_config", "save_peft_adapter"]

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# "<prefix><module path>.lora_A[.<adapter name>].weight"
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def _linear_layers(model: Any) -> dict[str, tuple[int, int]]:
    """``{path: (in_features, out_features)}`` of every linear layer (float, 4-bit or LoRA)."""
    from qlora_jax.nnx import QuantLinear  # noqa: PLC0415 - avoid an import cycle at module load

    out = {}
    for path, node in nnx.iter_graph(model):
        if not path:
            continue
        p = ".".join(str(x) for x in path)
        if isinstance(node, QuantLinear):
            out[p] = (int(node.in_features), int(node.out_features))
        elif isinstance(node, nnx.Linear):
            out[p] = (int(node.in_features), int(node.out_features))
    return out


def read_peft_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Reads a PEFT LoRA adapter folder without touching any model.

    Returns:
      ``(config, weights, raw_config)``: the `LoraConfig`; ``{module path: {"lora_A": [r, in],
      "lora_B": [out, r]}}`` as stored (numpy); and the ``adapter_config.json`` dict.
    Raises:
      ValueError naming the file or key: a missing or unreadable file, a non-LoRA or unsupported
      config, keys that are not LoRA A/B weights of a module, or a module with only A or only B.
    """
    from safetensors import safe_open

    folder = Path(os.fspath(folder))
    cfg_path = folder / PEFT_CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"{folder}: no {PEFT_CONFIG} (not a PEFT adapter folder)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot parse ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: must be a JSON object")
    try:
        config = LoraConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    if config.modules_to_save:
        raise ValueError(f"{cfg_path}: modules_to_save={list(config.modules_to_save)} is not supported "
                         f"(only LoRA A/B weights are loaded)")
    file = folder / PEFT_WEIGHTS
    if not file.is_file():
        extra = " (pickled adapter_model.bin is not supported; re-save with safe_serialization=True)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise ValueError(f"{folder}: no {PEFT_WEIGHTS}{extra}")
    try:
        with safe_open(str(file), framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncation/corruption surfaces as several exception types
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    weights: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        m = _KEY.match(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
        if m is None:
            raise ValueError(f"{file}: unexpected key {key!r} (expected "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        if arr.ndim != 2:
            raise ValueError(f"{file}: {key!r} must be 2-D, got shape {tuple(arr.shape)}")
        slot = weights.setdefault(m.group("path"), {})
        which = "lora_" + m.group("which")
        if which in slot:
            raise ValueError(f"{file}: {key!r} duplicates another {which} of {m.group('path')!r}")
        slot[which] = arr
    for path, slot in weights.items():
        for which in ("lora_A", "lora_B"):
            if which not in slot:
                raise ValueError(f"{file}: missing key {PEFT_PREFIX}{path}.{which}.weight")
    if not weights:
        raise ValueError(f"{file}: holds no LoRA weights")
    return config, weights, raw


def load_peft_adapter(model: nnx.Module, folder: str | os.PathLike, *, adapter_name: str = "default",
                      quantize: Any = None, compute_dtype: Any = None, lora_param_dtype: Any = jnp.float32,
                      rngs: nnx.Rngs | None = None) -> LoraConfig:
    """Loads a PEFT LoRA adapter onto ``model`` (in place) and activates it.

    Every module the adapter's config targets must have its A and B in the file, with the
    shapes our layer needs (``[r, in]`` / ``[out, r]``, ``r`` from ``rank_pattern``), and every
    tensor in the file must belong to such a module; all of this is checked before the model is
    changed. The adapter is then added with `qlora_jax.nnx.inject` (layers that are already 4-bit,
    e.g. from `qlora_jax.io.bnb.load_bnb_llama`, keep their base) and its weights set, transposed.

    Args:
      model: an NNX model whose module paths match the transformers model's (our Llama does).
      folder: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
      adapter_name: the name the adapter gets in ``model``.
      quantize: `qlora_jax.QuantPolicy` for float layers that should become 4-bit, or None
        (default) to leave the base as it is.
      compute_dtype: matmul dtype of newly wrapped float layers (None: their own dtype).
      lora_param_dtype: dtype of A and B in the model.
      rngs: ``nnx.Rngs`` for dropout (``lora_dropout > 0``); default ``nnx.Rngs(0)``.
    Returns:
      The adapter's `LoraConfig`.
    Raises:
      ValueError naming the key or file: see `read_peft_adapter`; keys for modules the model
      does not have (an adapter for a model with more layers or other module names), targeted
      modules without weights (missing keys), shapes that do not fit (an adapter for a different
      hidden size), or an adapter name already in use.
    """
    from qlora_jax.nnx import adapter_names, inject, load_adapter_weights  # noqa: PLC0415

    config, weights, _ = read_peft_adapter(folder)
    file = Path(os.fspath(folder)) / PEFT_WEIGHTS
    if adapter_name in adapter_names(model):
        raise ValueError(f"load_peft_adapter: the model already has an adapter named {adapter_name!r}")
    layers = _linear_layers(model)
    unknown = sorted(p for p in weights if p not in layers)
    if unknown:
        raise ValueError(f"{file}: unexpected keys for modules the model does not have: "
                         f"{[PEFT_PREFIX + p + '.lora_A.weight' for p in unknown[:5]]}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} modules; is the adapter for a "
                         f"different base model?)")
    targets = [p for p in layers if config.matches(p) and not config.saves(p)]
    untargeted = sorted(p for p in weights if p not in targets)
    if untargeted:
        raise ValueError(f"{file}: unexpected keys for modules that adapter_config.json does not target: "
                         f"{[PEFT_PREFIX + p + '.lora_A.weight' for p in untargeted[:5]]}")
    missing = [p for p in targets if p not in weights]
    if missing:
        raise ValueError(f"{file}: missing keys for targeted modules: "
                         f"{[PEFT_PREFIX + p + '.lora_A.weight' for p in missing[:5]]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} modules)")
    for p in targets:
        k, n = layers[p]
        r = config.rank_for(p)
        a, b = weights[p]["lora_A"], weights[p]["lora_B"]
        for which, arr, want in (("lora_A", a, (r, k)), ("lora_B", b, (n, r))):
            if tuple(arr.shape) != want:
                raise ValueError(f"{file}: {PEFT_PREFIX}{p}.{which}.weight has shape {list(arr.shape)}, the model "
                                 f"needs {list(want)} (in_features={k}, out_features={n}, r={r}); is the adapter "
                                 f"for a different base model?")
    inject(model, config, quantize=quantize, adapter_name=adapter_name, compute_dtype=compute_dtype,
           rngs=rngs if rngs is not None else nnx.Rngs(0), lora_param_dtype=lora_param_dtype)
    load_adapter_weights(model, {p: {"lora_a": np.ascontiguousarray(weights[p]["lora_A"].T),
                                     "lora_b": np.ascontiguousarray(weights[p]["lora_B"].T)} for p in targets},
                         adapter_name)
    return config


# --------------------------------------------------------------------------------------------
# Saving


def _adapted(model: nnx.Module, adapter_name: str) -> dict[str, Any]:
    from qlora_jax.nnx import adapter_names, lora_layers  # noqa: PLC0415

    layers = {p: l for p, l in lora_layers(model).items() if adapter_name in l.specs}
    if not layers:
        raise ValueError(f"the model has no adapter {adapter_name!r} (it has {adapter_names(model)})")
    merged = [p for p, l in layers.items() if adapter_name in l.merged]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base of {merged[:3]}; unmerge it first")
    return layers


def peft_adapter_tensors(model: nnx.Module, adapter_name: str = "default",
                         dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """PEFT's ``{key: array}`` of adapter ``adapter_name``: ``lora_A.weight [r, in]`` = Aᵀ and
    ``lora_B.weight [out, r]`` = Bᵀ under ``base_model.model.<module path>``, in ``dtype``."""
    out = {}
    for p, layer in _adapted(model, adapter_name).items():
        a = np.asarray(layer.lora_a[adapter_name].get_value(), np.float32)
        b = np.asarray(layer.lora_b[adapter_name].get_value(), np.float32)
        out[f"{PEFT_PREFIX}{p}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
        out[f"{PEFT_PREFIX}{p}.lora_B.weight"] = np.ascontiguousarray(b.T).astype(dtype)
    return out


def _scale_readings(r: int, alpha: float, scale: float) -> set[bool]:
    """The ``use_rslora`` values under which PEFT gives this layer ``scale`` (alpha/r or alpha/√r)."""
    out = set()
    if math.isclose(scale, alpha / r, rel_tol=1e-6):
        out.add(False)
    if math.isclose(scale, alpha / math.sqrt(r), rel_tol=1e-6):
        out.add(True)
    return out


def peft_adapter_config(model: nnx.Module, adapter_name: str = "default", *,
                        config: LoraConfig | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict that makes PEFT rebuild adapter ``adapter_name`` exactly.

    With ``config`` (the `LoraConfig` the adapter was injected with) its fields are used, after
    checking that it targets exactly the adapted layers with their ranks and scales. Without it
    the config is reconstructed from the layers: ``target_modules`` as the list of module names
    when that selects exactly the adapted layers (else a regex of their paths), the most common
    rank and alpha as ``r`` / ``lora_alpha`` and the others as ``rank_pattern`` / ``alpha_pattern``.

    Raises:
      ValueError: the scales fit neither alpha/r nor alpha/√r consistently, or ``config`` does
        not describe the adapter.
    """
    layers = _adapted(model, adapter_name)
    specs = {p: l.specs[adapter_name] for p, l in layers.items()}
    dropouts = {s.dropout for s in specs.values()}
    if len(dropouts) > 1:
        raise ValueError(f"adapter {adapter_name!r} has several lora_dropout values {sorted(dropouts)}; PEFT "
                         f"has one per adapter")
    all_linear = _linear_layers(model)
    if config is not None:
        chosen = {p for p in all_linear if config.matches(p) and not config.saves(p)}
        if chosen != set(specs):
            raise ValueError(f"config targets {sorted(chosen ^ set(specs))[:5]} differently from the adapter's "
                             f"layers")
        for p, s in specs.items():
            if config.rank_for(p) != s.r or not math.isclose(config.scale_for(p), s.scale, rel_tol=1e-6):
                raise ValueError(f"config gives {p!r} r={config.rank_for(p)}, scale={config.scale_for(p)}; the "
                                 f"layer has r={s.r}, scale={s.scale}")
        d = config.to_dict()
    else:
        readings = {True, False}
        for p, s in specs.items():
            readings &= _scale_readings(s.r, s.alpha, s.scale)
        if not readings:
            bad = [p for p, s in specs.items() if not _scale_readings(s.r, s.alpha, s.scale)]
            raise ValueError(f"adapter {adapter_name!r}: the scales of {bad[:3] or list(specs)[:3]} are not "
                             f"lora_alpha/r or lora_alpha/sqrt(r) consistently; PEFT cannot express them")
        use_rslora = False if False in readings else True
        r = collections.Counter(s.r for s in specs.values()).most_common(1)[0][0]
        alpha = collections.Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
        names = sorted({p.rsplit(".", 1)[-1] for p in specs})
        by_name = {p for p in all_linear if p.rsplit(".", 1)[-1] in names
                   and p.rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES}
        if by_name == set(specs):
            targets: Any = names
        else:
            targets = "(" + "|".join(re.escape(p) for p in sorted(specs)) + ")"
        rank_pattern = _patterns({p: s.r for p, s in specs.items()}, r)
        alpha_pattern = {k: _num(v) for k, v in _patterns({p: s.alpha for p, s in specs.items()}, alpha).items()}
        d = LoraConfig(r=r, lora_alpha=_num(alpha), lora_dropout=dropouts.pop(), target_modules=targets,
                       use_rslora=use_rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern).to_dict()
    d.update(task_type="CAUSAL_LM", inference_mode=True, init_lora_weights=True, revision=None)
    return d


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """PEFT ``rank_pattern``/``alpha_pattern`` entries for the layers whose value is not ``default``:
    keyed by module name (e.g. ``"down_proj"``) where every adapted layer of that name shares the
    value, else by the escaped full path (PEFT matches ``(.*\\.)?(key)$``)."""
    by_name: dict[str, set] = collections.defaultdict(set)
    for p, v in values.items():
        by_name[p.rsplit(".", 1)[-1]].add(v)
    out: dict[str, Any] = {}
    for p, v in values.items():
        if v == default:
            continue
        name = p.rsplit(".", 1)[-1]
        if by_name[name] == {v}:
            out[name] = v
        else:
            out[re.escape(p)] = v
    return out


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(model: nnx.Module, folder: str | os.PathLike, *, adapter_name: str = "default",
                      base_model_name_or_path: str | None = None, config: LoraConfig | None = None,
                      dtype: Any = np.float32, overwrite: bool = False) -> Path:
    """Writes adapter ``adapter_name`` of ``model`` as a PEFT adapter folder.

    Files: ``adapter_model.safetensors`` (see `peft_adapter_tensors`) and ``adapter_config.json``
    (see `peft_adapter_config`; ``base_model_name_or_path`` is recorded there, which
    ``PeftModel.from_pretrained`` does not need but ``AutoPeftModel`` does). The folder is written
    under a temporary name and renamed at the end: on any error nothing is left behind.

    Args:
      model: a model with LoRA adapters (`qlora_jax.nnx.inject`).
      folder: the folder to create; it must not exist unless ``overwrite``.
      adapter_name: which adapter to save.
      base_model_name_or_path: the base model's hub id or path.
      config: the `LoraConfig` the adapter was made with (optional, see `peft_adapter_config`).
      dtype: numpy dtype of the saved weights (float32 default).
      overwrite: replace an existing folder.
    Returns:
      The folder.
    """
    from safetensors.numpy import save_file

    from qlora_jax.io.export import staged_folder  # noqa: PLC0415

    tensors = peft_adapter_tensors(model, adapter_name, dtype)
    cfg = peft_adapter_config(model, adapter_name, config=config)
    cfg["base_model_name_or_path"] = base_model_name_or_path
    with staged_folder(folder, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return Path(os.fspath(folder))
