"""Autoregressive generation with a preallocated KV cache.

Prefill and the whole decode loop (a ``lax.while_loop`` that stops once every
sequence has produced an end-of-sequence token) run in one jitted function, so a
call compiles once per (model graph, batch, prompt length, ``max_new_tokens``).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.models.llama import LlamaForCausalLM, init_cache

__all__ = ["generate", "sample_logits"]


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature: float | jax.Array = 0.0,
                  top_p: float | jax.Array = 1.0, *, greedy: bool) -> jax.Array:
    """Pick one token per row of ``logits [B,V]`` float32 -> ``[B]`` int32.

    ``greedy`` takes the argmax; otherwise samples from ``softmax(logits / temperature)``
    restricted to the smallest set of tokens whose probability mass reaches ``top_p``
    (nucleus sampling; ``top_p >= 1`` keeps every token).
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token is always kept
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    # top_p is traced (one compile for all values); >= 1 must not drop rounding-error tails
    logits = jnp.where((logits < cutoff) & (top_p < 1.0), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy"))
def _generate_jit(graphdef, state, prompt, prompt_mask, key, temperature, top_p, eos, pad_id,
                  *, max_new: int, greedy: bool):
    model = nnx.merge(graphdef, state)
    B, T0 = prompt.shape
    cache_dtype = model.dtype or jnp.float32
    cache = init_cache(model.config, B, T0 + max_new, cache_dtype)
    # Left padding: each row's first real token gets position 0.
    pos = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
    logits, cache = model(prompt, pos, prompt_mask, cache)
    key, sub = jax.random.split(key)
    tok = sample_logits(logits[:, -1], sub, temperature, top_p, greedy=greedy)
    done = jnp.isin(tok, eos)
    out = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
    next_pos = pos[:, -1] + 1

    def cond(c):
        step, _, done, *_ = c
        return (step < max_new) & ~jnp.all(done)

    def body(c):
        step, tok, done, cache, next_pos, out, key = c
        logits, cache = model(tok[:, None], next_pos[:, None], None, cache)
        key, sub = jax.random.split(key)
        new = sample_logits(logits[:, 0], sub, temperature, top_p, greedy=greedy)
        new = jnp.where(done, pad_id, new)
        out = out.at[:, step].set(new)
        return step + 1, new, done | jnp.isin(new, eos), cache, next_pos + 1, out, key

    carry = (jnp.asarray(1, jnp.int32), tok, done, cache, next_pos, out, key)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[5]


def generate(model: LlamaForCausalLM, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | int | None = None,
             eos_id: int | Sequence[int] | None = None, attention_mask=None) -> np.ndarray:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``.

    Args:
      model: a :class:`LlamaForCausalLM` (any in-place swapped projections are fine).
      prompt_ids: ``[T]`` or ``[B,T]`` ints (list or array). Batched prompts of unequal
        length must be *left*-padded and described by ``attention_mask``.
      max_new_tokens: number of tokens to produce (>= 1).
      temperature: 0 for greedy decoding, otherwise the softmax temperature.
      top_p: nucleus-sampling mass (1.0 disables it).
      rng: a PRNG key or int seed for sampling (default seed 0).
      eos_id: token id(s) that end a sequence; None uses ``model.config.eos_token_id``;
        ``()`` never stops early.
      attention_mask: ``[B,T]`` 1 for real prompt tokens, 0 for left padding.

    Returns:
      ``np.ndarray`` int32 of shape ``[B, max_new_tokens]`` (``[max_new_tokens]`` for a 1-D
      prompt): the new tokens only. After a sequence emits an eos token, the rest of its
      row is filled with that first eos id (0 if there is none).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [T] or [B,T] array, got shape {prompt.shape}")
    mask = np.ones(prompt.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    if mask.shape != prompt.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != prompt shape {prompt.shape}")
    if eos_id is None:
        eos = model.config.eos_ids
    elif isinstance(eos_id, (int, np.integer)):
        eos = (int(eos_id),)
    else:
        eos = tuple(int(e) for e in eos_id)
    pad_id = eos[0] if eos else 0
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    if rng is None:
        rng = 0
    key = jax.random.PRNGKey(rng) if isinstance(rng, (int, np.integer)) else rng
    graphdef, state = nnx.split(model)
    out = _generate_jit(graphdef, state, jnp.asarray(prompt), jnp.asarray(mask), key,
                        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), eos_arr,
                        jnp.int32(pad_id), max_new=int(max_new_tokens), greedy=temperature == 0.0)
    out = np.asarray(out)
    return out[0] if squeeze else out
