"""Tests of qlora_jax.train: loss, optimizer chain, offload, remat, accumulation, determinism,
checkpoint/resume (bitwise), interrupted saves, adapter files, and the fine-tune script's input
checks. Models are tiny random Llamas (NF4 bases + LoRA) unless the test is about real text."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax import QuantPolicy
from qlora_jax import data as qd
from qlora_jax import nnx as qnnx
from qlora_jax import train as qt
from qlora_jax.lora import LoraConfig
from qlora_jax.models import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CFG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
B, T = 4, 16


def make_model(*, remat=None, dropout=0.0, lora_seed=1, cfg=CFG, init_b=True):
    """Tiny Llama (base weights from seed 0) with NF4 bases and r=4 LoRA on every linear layer.

    ``init_b=False`` makes B random too, so the adapters change the output from step 0."""
    model = LlamaForCausalLM(cfg, remat_policy=remat, rngs=nnx.Rngs(0))
    qnnx.inject(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                  init_lora_weights=True if init_b else False),
                quantize=QuantPolicy(min_size=1), compute_dtype=jnp.float32,
                rngs=nnx.Rngs(params=lora_seed, dropout=lora_seed + 100))
    return model


def make_rows(n=24, seed=0, packed=True):
    """Rows of random 'instruction' sequences (prompt masked out), packed like qlora_jax.data does."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n):
        p, c = int(rng.integers(2, 6)), int(rng.integers(1, 6))
        ids = rng.integers(3, CFG.vocab_size, p + c).astype(np.int32)
        seqs.append(qd.TokenizedSequence(ids, np.r_[np.zeros(p), np.ones(c)].astype(np.int32), f"s{i}"))
    if packed:
        return qd.pack_sequences(seqs, T, pad_id=0, split=False)
    return qd.pad_sequences(seqs, T, pad_id=0)


# Shared optimizers and a cache of jitted steps: models of one configuration have equal graphdefs,
# so tests reuse one compiled step per (configuration, optimizer) instead of compiling their own.
# eps=1 makes Adam's update nearly linear in the gradient (a first Adam step is otherwise
# sign(g)·lr), so parameters after an update can be compared between two ways of computing it.
TX = qt.make_optimizer(0.1, eps=1.0)
TX_ACC = qt.make_optimizer(0.1, eps=1.0, accumulation_steps=2)
TX_COS = qt.make_optimizer(1e-2, "cosine", warmup_steps=2, total_steps=6)
OFF = qt.host_memory_kind() is not None   # offload the optimizer state where the platform can
_STEPS: dict[tuple, object] = {}


def run_steps(model, tx, batches, *, offload=False, accumulation_steps=1, key=None, forward=qt.default_forward):
    """Train ``model`` on ``batches``: ``(metrics list, final state, (graphdef, frozen, step))``.

    ``key`` names the model configuration for the compiled-step cache (None: compile afresh)."""
    graphdef, state, frozen, off = qt.init_train_state(model, tx, offload=offload)
    ck = None if key is None else (key, id(tx), off is not None, accumulation_steps, forward)
    step = _STEPS.get(ck) if ck else None
    if step is None:
        step = qt.make_train_step(graphdef, tx, offload=off, accumulation_steps=accumulation_steps,
                                  forward=forward)
        if ck:
            _STEPS[ck] = step
    out = []
    for b in batches:
        state, m = step(state, frozen, b)
        out.append({k: float(v) for k, v in m.items()})
    return out, state, (graphdef, frozen, step)


def _batches(rows, k, seed=0, bs=B):
    it = qd.BatchIterator(rows, bs, seed=seed)
    return [next(it) for _ in range(k)]


# --------------------------------------------------------------------------------------------
# Loss


def test_masked_nll_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 7, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 7))
    mask = (rng.random((3, 7)) < 0.5).astype(np.int32)
    s, c = qt.masked_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    want = sum(-logp[b, t - 1, ids[b, t]] for b in range(3) for t in range(1, 7) if mask[b, t])
    assert float(c) == mask[:, 1:].sum()
    np.testing.assert_allclose(float(s), want, rtol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_train_loss_counts_only_completion_tokens(packed):
    """The step's loss equals a float64 numpy cross-entropy over exactly the completion tokens."""
    model = make_model(init_b=False)
    batch = _batches(make_rows(packed=packed), 1)[0]
    kwargs = {k: jnp.asarray(batch[k]) for k in ("positions", "segment_ids")}
    logits = np.asarray(model(jnp.asarray(batch["input_ids"]), **kwargs), np.float64)
    metrics, _, _ = run_steps(model, TX, [batch], key="plain")
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll, n = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if batch["loss_mask"][b, t]:
                assert batch["segment_ids"][b, t] == batch["segment_ids"][b, t - 1] > 0
                nll += lse[b, t - 1] - logits[b, t - 1, batch["input_ids"][b, t]]
                n += 1
    assert 0 < n < (batch["attention_mask"].sum())  # prompts really were excluded
    assert metrics[0]["target_tokens"] == n
    np.testing.assert_allclose(metrics[0]["loss"], nll / n, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Optimizer


def test_schedules_closed_form():
    lr, w, total = 0.1, 3, 13
    cos = qt.make_schedule(lr, "cosine", warmup_steps=w, total_steps=total)
    lin = qt.make_schedule(lr, "linear", warmup_steps=w, total_steps=total)
    const = qt.make_schedule(lr, "constant", warmup_steps=w)
    for s in range(total + 1):
        warm = lr * s / w
        frac = (s - w) / (total - w)
        cosine = lr * 0.5 * (1 + math.cos(math.pi * frac))
        np.testing.assert_allclose(float(cos(s)), warm if s < w else cosine, atol=1e-7)
        np.testing.assert_allclose(float(lin(s)), warm if s < w else lr * (1 - frac), atol=1e-7)
        np.testing.assert_allclose(float(const(s)), warm if s < w else lr, atol=1e-7)
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        qt.make_schedule(lr, "cosine", warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match="unknown schedule"):
        qt.make_schedule(lr, "step")


def test_optimizer_matches_numpy_clip_adamw():
    lr, b1, b2, eps, wd, clip = 0.05, 0.9, 0.99, 1e-8, 0.1, 0.3
    tx = qt.make_optimizer(lr, "linear", warmup_steps=1, total_steps=5, weight_decay=wd, max_grad_norm=clip,
                           b1=b1, b2=b2, eps=eps)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    p_jax = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p_jax)
    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    p = {k: x.astype(np.float64) for k, x in params.items()}
    for t in range(4):
        g = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
        upd, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p_jax)
        p_jax = jax.tree.map(lambda a, u: a + u, p_jax, upd)
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
        scale = min(1.0, clip / norm)
        step_lr = lr * t / 1 if t < 1 else lr * (1 - (t - 1) / 4)
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            mh, vh = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            p[k] = p[k] - step_lr * (mh / (np.sqrt(vh) + eps) + wd * p[k])
        for k in p:
            np.testing.assert_allclose(np.asarray(p_jax[k]), p[k], rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Training behaviour


def test_only_lora_params_train_and_model_stays_intact():
    model = make_model()
    before = jax.tree.map(np.asarray, nnx.state(model))
    _, state, (graphdef, frozen, _) = run_steps(model, TX, _batches(make_rows(), 2), key="plain")
    after = jax.tree.map(np.asarray, nnx.state(model))   # the model object was not donated away
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    # Frozen state is bitwise what it was; every LoRA B moved away from 0.
    frozen_now = jax.tree.map(np.asarray, frozen)
    frozen_was = jax.tree.map(np.asarray, nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)[3])
    assert jax.tree.all(jax.tree.map(np.array_equal, frozen_now, frozen_was))
    flat = qt.checkpoint.adapter_arrays(state.params)
    assert all(np.abs(v).max() > 0 for k, v in flat.items() if ".lora_b." in k)
    assert all(v.dtype == np.float32 for v in flat.values())
    with pytest.raises(ValueError, match="no trainable"):
        qt.split_model(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)))


def test_same_seed_same_losses_with_dropout():
    rows = make_rows()
    a, _, _ = run_steps(make_model(dropout=0.2), TX_COS, _batches(rows, 4, seed=3), offload=OFF, key="dropout")
    b, _, _ = run_steps(make_model(dropout=0.2), TX_COS, _batches(rows, 4, seed=3), offload=OFF, key="dropout")
    c, _, _ = run_steps(make_model(dropout=0.2, lora_seed=7), TX_COS, _batches(rows, 4, seed=3), offload=OFF,
                        key="dropout")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["loss"] for m in a] != [m["loss"] for m in c]


def test_offload_gives_the_same_losses():
    if qt.host_memory_kind() is None:
        pytest.skip("this backend exposes no pinned_host memory")
    rows = make_rows()
    plain, _, _ = run_steps(make_model(), TX, _batches(rows, 4), key="plain")
    off, state, _ = run_steps(make_model(), TX, _batches(rows, 4), offload=True, key="plain")
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == {"pinned_host"}
    np.testing.assert_allclose([m["loss"] for m in off], [m["loss"] for m in plain], rtol=1e-6)


def test_offload_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(qt.optim, "host_memory_kind", lambda device=None, kind="pinned_host": None)
    with pytest.warns(RuntimeWarning, match="keeping the optimizer state in device memory"):
        assert qt.offload_shardings({"x": jnp.ones(3)}, qt.OffloadConfig(optimizer_state=True)) is None


@pytest.mark.parametrize("policy, forward", [("full", qt.default_forward), ("save_dots", qt.scan_forward),
                                             ("offload_dots", qt.scan_forward)])
def test_remat_policies_give_the_same_loss(policy, forward):
    """Each policy, through the model's own per-layer remat or inside the scan body, gives the
    plain path's losses and gradient norms."""
    rows = make_rows()
    plain, _, _ = run_steps(make_model(init_b=False), TX, _batches(rows, 2), key="plain")
    remat, _, _ = run_steps(make_model(remat=qt.remat_policy(policy), init_b=False), TX, _batches(rows, 2),
                            key=f"remat-{policy}", forward=forward)
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    assert qt.remat_policy("none") is None
    with pytest.raises(ValueError, match="unknown remat policy"):
        qt.remat_policy("everything")


def test_scan_forward_matches_the_layer_loop():
    """One lax.scan over the layers gives the losses, gradients, parameters and dropout-stream
    counters of the plain per-layer loop (dropout on, so the RNG write-back is exercised)."""
    rows = make_rows()
    args = (TX_COS, _batches(rows, 3, seed=3))
    loop, s_loop, _ = run_steps(make_model(dropout=0.2), *args, offload=OFF, key="dropout")
    scan, s_scan, _ = run_steps(make_model(dropout=0.2), *args, offload=OFF, key="dropout",
                                forward=qt.scan_forward)
    for a, b in zip(loop, scan):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s_loop.params), jax.tree.leaves(s_scan.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    counts = lambda s: [int(x) for x in jax.tree.leaves(s.rngs) if x.dtype == jnp.uint32]  # noqa: E731
    assert counts(s_scan) == counts(s_loop) and max(counts(s_loop)) == 3
    with pytest.raises(ValueError, match="LlamaForCausalLM-like"):
        qt.scan_forward(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {"input_ids": jnp.zeros((1, 2), jnp.int32)})


def test_scan_forward_with_remat_matches():
    rows = make_rows()
    loop, _, _ = run_steps(make_model(remat="full", init_b=False), TX, _batches(rows, 2), key="remat-full")
    scan, _, _ = run_steps(make_model(remat="full", init_b=False), TX, _batches(rows, 2), key="remat-full",
                           forward=qt.scan_forward)
    for a, b in zip(loop, scan):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)


def test_accumulation_equals_one_larger_batch():
    # Every row is full and every token a target, so both micro-batches weigh the same and the
    # mean of their mean gradients is the gradient of the large batch.
    rng = np.random.default_rng(4)
    ids = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
    ones = np.ones_like(ids)
    big = {"input_ids": ids, "loss_mask": ones, "attention_mask": ones, "segment_ids": ones,
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy()}
    halves = [{k: v[:B // 2] for k, v in big.items()}, {k: v[B // 2:] for k, v in big.items()}]
    m_acc, s_acc, _ = run_steps(make_model(init_b=False), TX_ACC, halves, accumulation_steps=2, key="plain")
    m_big, s_big, _ = run_steps(make_model(init_b=False), TX, [big], key="plain")
    np.testing.assert_allclose(np.mean([m["loss"] for m in m_acc]), m_big[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_acc.params), jax.tree.leaves(s_big.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # ... and the first micro-step alone did not move anything.
    _, s_one, _ = run_steps(make_model(init_b=False), TX_ACC, halves[:1], accumulation_steps=2, key="plain")
    init = nnx.state(make_model(init_b=False), nnx.LoRAParam)
    for a, b in zip(jax.tree.leaves(s_one.params), jax.tree.leaves(init)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_training_lowers_loss_on_real_text(smollm2_path):
    """A few steps on real English (the Lee corpus through the SmolLM2 tokenizer) lower the loss of a
    small random model (LoRA over NF4), measured on the same fixed held-out rows before and after."""
    from qlora_jax.io import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=64,
                      tie_word_embeddings=True)
    train, held = qd.load_dataset("lee")
    rows, _ = qd.build_sequences(train[:40], tok, 32)
    eval_rows, _ = qd.build_sequences(held[:8], tok, 32)
    model = make_model(cfg=cfg)
    tx = qt.make_optimizer(3e-2, "constant", max_grad_norm=1.0)
    graphdef, state, frozen, _ = qt.init_train_state(model, tx)
    step = qt.make_train_step(graphdef, tx)
    ev = qt.make_eval_step(graphdef)
    before = qt.evaluate(ev, state, frozen, qd.eval_batches(eval_rows, 8))
    it = qd.BatchIterator(rows, 8)
    for _ in range(12):
        state, _ = step(state, frozen, next(it))
    after = qt.evaluate(ev, state, frozen, qd.eval_batches(eval_rows, 8))
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_resume_continues_the_same_run_bitwise(tmp_path):
    """6 steps straight == 3 steps, save (async, offloaded optimizer state), restore into a model
    whose adapters and dropout streams were initialized differently, 3 more steps."""
    rows = make_rows(n=40)

    def setup(lora_seed):
        model = make_model(dropout=0.2, lora_seed=lora_seed)
        _, state, (graphdef, frozen, step) = run_steps(model, TX_COS, [], offload=OFF, key="dropout")
        return graphdef, state, frozen, step

    g, state, frozen, step = setup(1)
    it = qd.BatchIterator(rows, B, seed=9)
    straight = []
    for _ in range(6):
        state, m = step(state, frozen, next(it))
        straight.append(float(m["loss"]))
    final_straight = jax.tree.map(np.asarray, state.params)

    g, state, frozen, step = setup(1)
    it = qd.BatchIterator(rows, B, seed=9)
    first = []
    with qt.CheckpointManager(tmp_path / "ckpt", max_to_keep=2) as mngr:
        for s in range(3):
            state, m = step(state, frozen, next(it))
            first.append(float(m["loss"]))
            mngr.save(s + 1, state, data=it.state(), config={"note": "test"})
    assert first == straight[:3]

    g2, fresh, frozen2, step2 = setup(5)  # different adapter init and dropout seed
    mngr = qt.CheckpointManager(tmp_path / "ckpt", max_to_keep=2)
    assert mngr.all_steps() == [2, 3]
    r = mngr.restore(fresh)
    assert (r.step, r.config, int(r.state.step)) == (3, {"note": "test"}, 3)
    if OFF:
        assert {x.sharding.memory_kind for x in jax.tree.leaves(r.state.opt_state)} == {"pinned_host"}
    it2 = qd.BatchIterator(rows, B, seed=9)
    it2.restore(r.data)
    state2, rest = r.state, []
    for _ in range(3):
        state2, m = step2(state2, frozen2, next(it2))
        rest.append(float(m["loss"]))
    assert rest == straight[3:]
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state2.params)), jax.tree.leaves(final_straight)):
        np.testing.assert_array_equal(a, b)
    mngr.close()


def test_restore_rejects_a_different_state(tmp_path):
    with qt.CheckpointManager(tmp_path) as m:
        m.save(1, {"a": jnp.ones(3), "b": jnp.zeros(2)})
    m = qt.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        m.restore({"a": jnp.ones(3), "c": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"leaf \['a'\] was saved as float32\[3\], the state has float32\[4\]"):
        m.restore({"a": jnp.ones(4), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"saved as float32\[2\], the state has int32\[2\]"):
        m.restore({"a": jnp.ones(3), "b": jnp.zeros(2, jnp.int32)})
    with pytest.raises(FileNotFoundError, match="step 7"):
        m.restore({"a": jnp.ones(3), "b": jnp.zeros(2)}, step=7)
    assert qt.CheckpointManager(tmp_path / "empty").restore_latest({"a": jnp.ones(3)}) is None
    with pytest.raises(TypeError, match="JSON"):
        m.save(2, {"a": jnp.ones(3), "b": jnp.zeros(2)}, data={"x": object()})
    m.close()


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from qlora_jax.train import CheckpointManager
    m = CheckpointManager(sys.argv[1], max_to_keep=3)
    m.save(1, {"w": jnp.full((512, 512), 1.0), "k": jnp.arange(3)}, data={"epoch": 0, "index": 1})
    m.wait()
    m.save(2, {"w": jnp.full((512, 512), 2.0), "k": jnp.arange(3) + 1}, data={"epoch": 0, "index": 2})
    os.kill(os.getpid(), signal.SIGKILL)   # the asynchronous write of step 2 is still running
""")


def test_killed_save_leaves_the_previous_checkpoint_restorable(tmp_path):
    d = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(d)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    like = {"w": jnp.zeros((512, 512)), "k": jnp.zeros(3, jnp.int32)}
    names = sorted(p.name for p in d.iterdir())
    mngr = qt.CheckpointManager(d, max_to_keep=3)
    r = mngr.restore(like)
    if any("tmp" in n for n in names):   # the usual case: killed mid-write
        assert mngr.all_steps() == [1]
        assert r.step == 1 and r.data == {"epoch": 0, "index": 1}
    assert float(r.state["w"][0, 0]) == r.step and np.array_equal(np.asarray(r.state["k"]), np.arange(3) + r.step - 1)
    assert not any("tmp" in p.name for p in d.iterdir())   # leftovers removed on open
    mngr.save(2, {"w": jnp.full((512, 512), 2.0), "k": jnp.arange(3) + 1}, force=True)
    mngr.wait()
    assert float(mngr.restore(like).state["w"][0, 0]) == 2.0
    mngr.close()


def test_partial_tmp_folder_is_ignored(tmp_path):
    with qt.CheckpointManager(tmp_path, async_save=False) as m:
        m.save(1, {"w": jnp.ones(4)})
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    m = qt.CheckpointManager(tmp_path)
    assert m.latest_step() == 1
    np.testing.assert_array_equal(np.asarray(m.restore({"w": jnp.zeros(4)}).state["w"]), np.ones(4))
    assert not partial.exists()
    m.close()


def test_adapter_file_round_trip(tmp_path):
    trained = make_model(init_b=False, lora_seed=3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    qt.save_adapter(tmp_path / "ad", trained, cfg, metadata={"steps": 3, "quant_format": "nf4"})
    arrays, cfg_dict, meta = qt.load_adapter(tmp_path / "ad")
    assert cfg_dict["r"] == 4 and cfg_dict["target_modules"] == "all-linear"
    assert meta == {"steps": 3, "quant_format": "nf4"}
    n = sum(a.size for a in arrays.values())
    assert n == sum(x.size for x in jax.tree.leaves(nnx.state(trained, nnx.LoRAParam)))
    assert os.path.getsize(tmp_path / "ad" / qt.checkpoint.ADAPTER_WEIGHTS) < 4 * n + 64 * 1024
    other = make_model(init_b=False, lora_seed=9)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)))
    assert not np.allclose(np.asarray(other(ids)), np.asarray(trained(ids)))
    qt.apply_adapter(other, arrays)
    np.testing.assert_array_equal(np.asarray(other(ids)), np.asarray(trained(ids)))
    wrong = make_model()
    bad = dict(arrays)
    key = next(k for k in bad if k.endswith("lora_a.default"))
    bad[key] = bad[key][:, :2]
    with pytest.raises(ValueError, match="shapes do not match"):
        qt.apply_adapter(wrong, bad)
    with pytest.raises(ValueError, match="missing"):
        qt.apply_adapter(wrong, {k: v for k, v in arrays.items() if k != key})
    with pytest.raises(FileNotFoundError):
        qt.load_adapter(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# The fine-tune script


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "experiments" / "finetune.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _fail_if_loaded(*a, **k):
    raise AssertionError("the model was loaded before the inputs were checked")


@pytest.mark.parametrize("case", ["missing_model", "bad_config", "bad_row", "seq_too_long", "no_truncate",
                                  "batch_too_big", "missing_data"])
def test_finetune_bad_inputs_fail_before_loading(finetune, case, tmp_path, capsys, monkeypatch, smollm2_path):
    monkeypatch.setattr(finetune, "load_model", _fail_if_loaded)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": "a " * (i + 1)}) for i in range(20)))
    args = ["--out", str(tmp_path / "out"), "--no-progress"]
    if case == "missing_model":
        args += ["--model", str(tmp_path / "nope.gguf")]
        want = "no such file"
    elif case == "bad_config":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
        (tmp_path / "m" / "model.safetensors").write_bytes(b"")
        args += ["--model", str(tmp_path / "m")]
        want = "'gpt2' is not supported"
    elif case == "bad_row":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text() + "\n" + json.dumps({"prompt": "x", "completion": ""}) + "\n")
        args += ["--data", str(bad)]
        want = f"{bad}:21: field 'completion' is empty"
    elif case == "seq_too_long":
        args += ["--data", str(good), "--seq-len", "9000"]
        want = "max_position_embeddings=8192"
    elif case == "no_truncate":
        args += ["--data", str(good), "--seq-len", "40", "--no-truncate"]
        want = "more than seq_len=40"
    elif case == "batch_too_big":
        args += ["--data", str(good), "--batch-size", "500"]
        want = "larger than the"
    else:
        args += ["--data", str(tmp_path / "absent.jsonl")]
        want = "absent.jsonl"
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and want in err, err


def test_finetune_target_modules_parsing(finetune):
    assert finetune.target_modules("all-linear") == "all-linear"
    assert finetune.target_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert finetune.target_modules("q_proj") == ["q_proj"]
    assert finetune.target_modules(r".*\.mlp\..*") == r".*\.mlp\..*"


def _tiny_hf_folder(src: Path, dst: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and vocabulary, as an HF folder."""
    from safetensors.numpy import save_file

    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (dst / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.02, (cfg["vocab_size"], 64)), "model.norm.weight": np.ones(64)}
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}
    for i in range(2):
        for n, shape in shapes.items():
            w[f"model.layers.{i}.{n}.weight"] = rng.normal(0, 0.05, shape)
        w[f"model.layers.{i}.input_layernorm.weight"] = np.ones(64)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(64)
    save_file({k: v.astype(np.float32) for k, v in w.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.slow
def test_finetune_script_end_to_end_and_resume(finetune, tmp_path, smollm2_path):
    model = _tiny_hf_folder(Path(smollm2_path), tmp_path / "tiny")
    out = tmp_path / "run"
    common = ["--model", str(model), "--seq-len", "64", "--batch-size", "2", "--out", str(out), "--warmup", "1",
              "--no-progress", "--gen-prompts", "2", "--max-new-tokens", "4", "--max-eval-rows", "8"]
    assert finetune.main(common + ["--steps", "4", "--save-every", "2"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2, 3, 4]
    for f in ("loss_curve.png", "summary.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["heldout_loss_after"]) and len(summary["generations"]) == 2
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 4]
    assert finetune.main(common + ["--steps", "6", "--resume"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert finetune.main(common + ["--steps", "6", "--resume", "--r", "8"]) == 2


@pytest.mark.slow
def test_smollm2_qlora_steps_lower_heldout_loss(smollm2_path):
    """The real model: a few QLoRA steps on chatterbot answers lower the held-out loss."""
    from qlora_jax.io import load_llama, load_tokenizer

    tok = load_tokenizer(smollm2_path)
    train, held = qd.load_dataset("chatterbot")
    rows, _ = qd.build_sequences(train, tok, 64)
    eval_rows, _ = qd.build_sequences(held[:24], tok, 64)
    model, _ = load_llama(smollm2_path)
    qnnx.inject(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    tx = qt.make_optimizer(2e-3, max_grad_norm=1.0)
    graphdef, state, frozen, _ = qt.init_train_state(model, tx)
    step = qt.make_train_step(graphdef, tx, forward=qt.scan_forward)
    ev = qt.make_eval_step(graphdef, forward=qt.scan_forward)
    before = qt.evaluate(ev, state, frozen, qd.eval_batches(eval_rows, 8))
    it = qd.BatchIterator(rows, 4)
    for _ in range(6):
        state, _ = step(state, frozen, next(it))
    after = qt.evaluate(ev, state, frozen, qd.eval_batches(eval_rows, 8))
    assert after["loss"] < before["loss"] - 0.05, (before, after)
