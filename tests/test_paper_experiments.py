"""Smoke tests of the paper-reproduction scripts (experiments/datatypes.py, parity.py, adapters.py)
on tiny random Llamas, checking real properties against independent computations: weight errors
against numpy, the float path against the plain model, both parity variants in the JSON, adapter
switching, per-row batched adapters against one row at a time, and named adapter files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from qlora_jax import QuantPolicy, dequantize, quantize
from qlora_jax import data as qd
from qlora_jax import nnx as qnnx
from qlora_jax import train as qt
from qlora_jax.formats import get_format
from qlora_jax.lora import LoraConfig
from qlora_jax.models import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CFG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True)
# One decoder layer where the code under test unrolls the layers (generation, the adapter tests'
# forward): the same code paths, half the compile time.
CFG1 = dataclasses.replace(CFG, num_hidden_layers=1)


def _script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(n: int = 6, seq_len: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seqs = [qd.TokenizedSequence(rng.integers(3, CFG.vocab_size, 24).astype(np.int32), np.ones(24, np.int32), f"d{i}")
            for i in range(n)]
    return qd.pack_sequences(seqs, seq_len, 0, split=True)


def _numpy_blockwise(w: np.ndarray, fmt: str, block: int) -> np.ndarray:
    """Independent reference: absmax blocks of the row-major flattening, nearest code value."""
    values = get_format(fmt).values.astype(np.float64)
    flat = w.astype(np.float64).reshape(-1)
    pad = -flat.size % block
    blocks = np.pad(flat, (0, pad)).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = blocks / np.where(absmax == 0, 1, absmax)
    codes = np.abs(scaled[..., None] - values).argmin(-1)
    return (values[codes] * absmax).reshape(-1)[: flat.size].reshape(w.shape)


def _pooled(pairs) -> float:
    """sqrt(Σ‖a − b‖² / Σ‖b‖²) over (approximation, reference) pairs, float64."""
    pairs = list(pairs)
    se = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
    ss = sum(float(np.sum(b ** 2)) for _, b in pairs)
    return math.sqrt(se / ss)


# --------------------------------------------------------------------------------------------
# datatypes.py


def test_datatypes_perplexity_and_weight_errors():
    dt = _script("datatypes")
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    rows = _rows()
    kernels = {p: np.asarray(k, np.float32) for p, k in dt.linear_kernels(model).items()}
    assert len(kernels) == 7 * CFG.num_hidden_layers  # q k v o gate up down; the head is tied
    variants = ["float32", "nf4+dq"]
    res = {r["variant"]: r for r in dt.measure(model, rows, variants, block_size=64, batch_size=4)}
    assert list(res) == variants

    # The float32 variant goes through the adapter layers with the adapter off: the plain model's numbers.
    plain = qt.evaluate_model(model, qd.eval_batches(rows, 4, 0))
    assert res["float32"]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert res["float32"]["rel_error"] == 0.0
    for r in res.values():
        assert np.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
        assert r["tokens"] == plain["tokens"]
    # The weight errors of the other variants (no perplexity: each would compile another eval step).
    graphdef, state = nnx.split(model)
    for v in ("bf16", "int4"):
        res[v] = dt.weight_stats(dt.variant_model(graphdef, state, v, block_size=64), kernels)

    # bf16: the kernels rounded to bf16, and far below every 4-bit format.
    want_bf16 = _pooled((k.T.astype(ml_dtypes.bfloat16).astype(np.float64), k.T.astype(np.float64))
                        for k in kernels.values())
    assert res["bf16"]["rel_error"] == pytest.approx(want_bf16, rel=1e-6)
    four_bit = ("int4", "nf4+dq")
    assert res["bf16"]["rel_error"] < 0.01 < min(res[v]["rel_error"] for v in four_bit)

    # 4-bit: the library's quantize/dequantize applied directly to [out, in] weights ...
    for v in four_bit:
        fmt, dq, _ = dt.VARIANTS[v]
        want = _pooled((np.asarray(dequantize(quantize(k.T, fmt, 64, dq), jnp.float32), np.float64),
                        k.T.astype(np.float64)) for k in kernels.values())
        assert res[v]["rel_error"] == pytest.approx(want, rel=1e-9), v
    # ... and a numpy-only nearest-code reference (formats without double quantization).
    for v in ("int4",):
        want = _pooled((_numpy_blockwise(k.T, dt.VARIANTS[v][0], 64), k.T.astype(np.float64))
                       for k in kernels.values())
        assert res[v]["rel_error"] == pytest.approx(want, rel=1e-4), v

    # Storage: 4 bits a code + an 8-bit absmax code a block + fp32 second-level scales and offset.
    def dq_bytes(n: int) -> int:
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4

    sizes = [k.size for k in kernels.values()]
    assert res["nf4+dq"]["bits_per_weight"] == pytest.approx(8 * sum(dq_bytes(n) for n in sizes) / sum(sizes))
    assert res["int4"]["bits_per_weight"] == pytest.approx(4 + 32 / 64)
    rows_ppl = [dict(variant=v, perplexity=p) for v, p in (("int4", 30.0), ("nf4", 20.0), ("fp4_e2m1", 25.0))]
    assert dt.ordering(rows_ppl) == ["int4", "fp4_e2m1", "nf4"]


# --------------------------------------------------------------------------------------------
# parity.py (and adapters.py end to end): a tiny random Llama saved as an HF folder with the real tokenizer


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, smollm2_path):
    from qlora_jax.io.export import export_merged_hf

    cfg = json.loads((Path(smollm2_path) / "config.json").read_text())
    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=cfg["vocab_size"], max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])
    folder = tmp_path_factory.mktemp("tiny") / "model"
    export_merged_hf(LlamaForCausalLM(tiny, rngs=nnx.Rngs(0)), folder, dtype="float32", tokenizer_src=smollm2_path)
    return folder


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}."} for a in range(6) for b in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_parity_variants_differ_only_in_the_base(tmp_path):
    """The two variants' finetune.py settings are equal except the base; the summary statistics
    and the plot from given curves (numpy's mean / sample std of the per-seed gaps)."""
    par = _script("parity")
    ft = sys.modules["finetune"]
    args = par.parse_args(["--seeds", "0", "1", "2", "--data", "lee", "--", "--schedule", "constant"])
    lora, qlora = (vars(ft.parse_args(par.finetune_argv(args, v, 1, tmp_path))) for v in ("lora_bf16", "qlora_nf4dq"))
    assert {k for k in lora if lora[k] != qlora[k]} == {"format"}
    assert lora["format"] == "none" and qlora["format"] == "nf4"
    assert qlora["double_quant"] and qlora["block_size"] == 64 and qlora["load_dtype"] == "bfloat16"
    assert lora["seed"] == 1 and lora["data"] == "lee" and lora["schedule"] == "constant"

    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1, 2):
        for v, shift in (("lora_bf16", 0.0), ("qlora_nf4dq", 0.1)):
            loss = list(3.0 + shift + rng.random(3))
            runs.append(dict(variant=v, seed=seed, eval_step=[0, 5, 10], eval_loss=loss, initial_loss=loss[0],
                             final_loss=loss[-1], tok_s=1.0))
    summary = par.summarize(runs)
    gaps = [runs[i + 1]["final_loss"] - runs[i]["final_loss"] for i in (0, 2, 4)]
    assert summary["gap"]["per_seed"] == pytest.approx(gaps)
    assert summary["gap"]["mean"] == pytest.approx(np.mean(gaps))
    assert summary["gap"]["std"] == pytest.approx(np.std(gaps, ddof=1))
    lora_final = [r["final_loss"] for r in runs if r["variant"] == "lora_bf16"]
    assert summary["variants"]["lora_bf16"]["final_std"] == pytest.approx(np.std(lora_final, ddof=1))
    assert f"{summary['gap']['mean']:+.4f}" in par.table(runs, summary)
    par.plot(runs, summary, "synthetic", tmp_path / "parity.png")
    assert (tmp_path / "parity.png").stat().st_size > 0


@pytest.mark.slow
def test_parity_runs_both_variants(tiny_hf, qa_jsonl, tmp_path):
    par = _script("parity")
    from qlora_jax.train import load_adapter

    out, work = tmp_path / "out", tmp_path / "work"
    rc = par.main(["--model", str(tiny_hf), "--data", str(qa_jsonl), "--seeds", "0", "--steps", "2", "--warmup", "1",
                   "--eval-every", "1", "--seq-len", "96", "--batch-size", "2", "--max-eval-rows", "4",
                   "--r", "4", "--work", str(work), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "parity.json").read_text())
    runs = {r["variant"]: r for r in res["runs"]}
    assert set(runs) == {"lora_bf16", "qlora_nf4dq"}
    for r in runs.values():
        assert r["eval_step"] == [0, 1, 2] and r["train_step"] == [1, 2]
        assert all(np.isfinite(r["eval_loss"])) and r["final_loss"] == r["eval_loss"][-1]
    # The bases really differ: a bf16 float base vs an NF4+DQ one (recorded with each adapter), so
    # the held-out loss differs already at step 0, where both adapters are still zero.
    meta = {v: load_adapter(work / f"{v}_seed0" / "adapter")[2] for v in runs}
    assert meta["lora_bf16"]["quant_format"] == "none"
    assert meta["qlora_nf4dq"]["quant_format"] == "nf4" and meta["qlora_nf4dq"]["double_quant"] is True
    assert runs["lora_bf16"]["initial_loss"] != runs["qlora_nf4dq"]["initial_loss"]
    gap = res["summary"]["gap"]
    assert gap["per_seed"] == [runs["qlora_nf4dq"]["final_loss"] - runs["lora_bf16"]["final_loss"]]
    assert gap["mean"] == pytest.approx(gap["per_seed"][0])
    assert (out / "parity.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# adapters.py


def _two_adapter_model():
    model = LlamaForCausalLM(CFG1, rngs=nnx.Rngs(0))
    qnnx.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                quantize=QuantPolicy(min_size=1), adapter_name="a", compute_dtype=jnp.float32, rngs=nnx.Rngs(1))
    qnnx.add_adapter(model, "b", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
                     rngs=nnx.Rngs(2), compute_dtype=jnp.float32)
    model.eval()
    return model


def test_adapters_switch_and_batched_rows():
    ad = _script("adapters")
    model = _two_adapter_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, (3, 8)).astype(np.int32)
    mask = np.ones((3, 8), bool)
    mask[2, :3] = False                                   # a left-padded row
    ids[~mask] = 0

    logits = {}
    for name in ("a", "b"):
        qnnx.set_adapter(model, name)
        logits[name] = np.asarray(ad.forward(model, ids, mask))
    assert np.max(np.abs(logits["a"] - logits["b"])[mask]) > 1e-3  # switching changes the output

    t = ad.swap_timing(model, ["a", "b"], ids, mask, repeats=2)
    assert set(t["first_forward_s"]) == {"a", "b"} and min(t["first_forward_s"].values()) > 0
    assert min(t["set_adapter_s"], t["forward_same_s"], t["switch_forward_s"], t["row_ids_switch_forward_s"]) > 0
    assert qnnx.active_adapters(model) == "a"

    row_ids = [1, 0, 1]
    res = ad.batched_vs_separate(model, ids, mask, ["a", "b"], row_ids, max_new_tokens=3, eos_id=())
    assert res["tokens_equal"] and res["max_abs_logit_diff"] < 1e-4
    # Independent of the script's reference: rows 0 and 1 against the single-adapter logits computed
    # first, and the padded row 2 alone (a batch of one) with its adapter.
    qnnx.set_adapter(model, ["a", "b"], row_ids=row_ids)
    batched = np.asarray(ad.forward(model, ids, mask))
    np.testing.assert_allclose(batched[0], logits["b"][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batched[1], logits["a"][1], atol=1e-4, rtol=1e-4)
    qnnx.set_adapter(model, "b")
    alone = np.asarray(ad.forward(model, ids[2:], mask[2:]))[0]
    np.testing.assert_allclose(batched[2][mask[2]], alone[mask[2]], atol=1e-4, rtol=1e-4)


def test_attach_adapter_under_a_name(tmp_path):
    """A saved adapter file attached under two names into one running model, next to each other
    (what adapters.py serves): the first attach quantizes the base as recorded, the second only adds."""
    from qlora_jax.train import attach_adapter, save_adapter

    ad = _script("adapters")
    ids = np.arange(3, 19, dtype=np.int32).reshape(2, 8)
    mask = np.ones_like(ids, bool)
    trained = LlamaForCausalLM(CFG1, rngs=nnx.Rngs(0))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    qnnx.inject(trained, cfg, quantize=QuantPolicy(), compute_dtype=jnp.float32, rngs=nnx.Rngs(1))
    trained.eval()
    want = np.asarray(ad.forward(trained, ids, mask))
    folder = save_adapter(tmp_path / "x", trained, cfg,
                          metadata={"quant_format": "nf4", "double_quant": True, "block_size": 64})

    server = LlamaForCausalLM(CFG1, rngs=nnx.Rngs(0))
    attach_adapter(server, folder, adapter_name="x", compute_dtype=jnp.float32)

    def base_arrays(layer):
        return [np.asarray(x) for x in jax.tree.leaves(layer.base.get_value())]

    before = {p: base_arrays(l) for p, l in qnnx.lora_layers(server).items()}
    assert any(l.quantized for l in qnnx.lora_layers(server).values())  # NF4, as the file records
    attach_adapter(server, folder, adapter_name="y", compute_dtype=jnp.float32)
    server.eval()
    assert qnnx.adapter_names(server) == ["x", "y"] and qnnx.active_adapters(server) == "y"
    for p, layer in qnnx.lora_layers(server).items():  # the second attach only added its adapter
        assert all(np.array_equal(a, b) for a, b in zip(base_arrays(layer), before[p], strict=True)), p
    for name in ("x", "y"):
        qnnx.set_adapter(server, name)
        np.testing.assert_allclose(np.asarray(ad.forward(server, ids, mask)), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        attach_adapter(server, folder, adapter_name="x", compute_dtype=jnp.float32)
    both = save_adapter(tmp_path / "both", server, cfg)  # a file of two adapters cannot be one name
    with pytest.raises(ValueError, match=r"holds 2 adapters \['x', 'y'\]"):
        attach_adapter(server, both, adapter_name="z", compute_dtype=jnp.float32)
    assert qnnx.adapter_names(server) == ["x", "y"]


@pytest.mark.slow
def test_adapters_script_end_to_end(tiny_hf, tmp_path):
    ad = _script("adapters")
    out = tmp_path / "out"
    rc = ad.main(["--model", str(tiny_hf), "--steps", "1", "--warmup", "0", "--seq-len", "96", "--batch-size", "2",
                  "--r", "4", "--prompts", "1", "--max-new-tokens", "3", "--repeats", "1",
                  "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "adapters.json").read_text())
    assert res["batched"]["tokens_equal"] and res["batched"]["row_adapters"] == ["qa", "news"]
    for n in ("qa", "news"):
        assert 0 < res["sizes"][n]["file_bytes"] < res["sizes"]["base_fp32_bytes"]
    assert [set(g) >= {"base", "qa", "news"} for g in res["generations"]] == [True, True]
