"""Interop with the PyTorch ecosystem, proven against the real libraries on SmolLM2-135M.

The torch side (transformers 5 + bitsandbytes + PEFT, CPU, float32) runs as a subprocess in the
Python 3.11 interop venv (``tests/interop/torch_side.py``); the two sides exchange HF folders,
safetensors and JSON. `test_pytorch_interop_proof` runs it twice: torch quantizes the model and
makes an adapter (stage 1), we load, compare, add our own adapter and export (JAX), torch loads our
files (stage 2); the measured errors are checked together and kept in ``results.json``.

The bad-input tests build tiny models of their own and need no torch.

Tolerance: logits match when ``max |ours - theirs| <= 1e-4 * max |theirs|`` (float32 on both sides).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qlora_jax import dequantize
from qlora_jax.io.bnb import SafetensorsFolder, bnb_tensors, load_bnb_llama, quantized_from_bnb
from qlora_jax.io.export import export_merged_hf, parse_size
from qlora_jax.io.peft import load_peft_adapter, read_peft_adapter, save_peft_adapter
from qlora_jax.lora import LoraConfig
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from qlora_jax.nnx import QuantLinear, adapter_weights, inject, lora_layers, set_adapter
from qlora_jax.quantize import QuantizedArray, QuantPolicy, quantize

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[1]
TORCH_SIDE = ROOT / "tests" / "interop" / "torch_side.py"
REL_TOL = 1e-4
SEQ_LEN = 48
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Helpers


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def module(model, path: str):
    obj = model
    for p in path.split("."):
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return obj


def compare_dequantized(model, dump: Path) -> dict:
    """Bitwise comparison of our dequantized 4-bit weights with a torch dump of ``dequantize_4bit``."""
    n = same = 0
    bad = []
    with safe_open(str(dump), framework="numpy") as f:
        for key in f.keys():
            layer = module(model, key[: -len(".weight")])
            assert isinstance(layer, QuantLinear) and layer.quantized, key
            ours = np.asarray(dequantize(layer.base.get_value(), jnp.float32))
            ref = f.get_tensor(key)
            n += 1
            if ours.shape == ref.shape and np.array_equal(ours.view(np.uint32), ref.view(np.uint32)):
                same += 1
            else:
                bad.append(key)
    return {"compared": n, "bit_identical": same, "mismatched": bad[:10]}


def compare_variants(folder: Path) -> dict:
    """Imports each bnb ``Linear4bit`` variant torch wrote (see torch_side.VARIANTS) with
    `quantized_from_bnb` and compares our dequantization bit for bit with bitsandbytes' portable
    backend (every variant) and with the public ``dequantize_4bit`` (its CPU kernel) where the rows
    hold whole blocks. Also lists the variants where those two bitsandbytes paths disagree."""
    specs = json.loads((folder / "variants.json").read_text())
    state = load_file(str(folder / "variants.safetensors"))
    deq = load_file(str(folder / "variants_deq.safetensors"))

    def same(a, b):
        return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))

    def same_but_zero_sign(a, b):
        # bitsandbytes' C++ FP4 kernel differs from its portable backend (and us) in the sign of
        # zero, in a way that depends on the CPU it dispatches for (see tests/test_bnb_exact.py)
        if a.shape != b.shape:
            return False
        differ = a.view(np.uint32) != b.view(np.uint32)
        return bool(np.all((a[differ] == 0) & (b[differ] == 0)))

    out = {"portable": {}, "dequantize_4bit": {}, "bnb_cpu_kernel_differs": []}
    for v in specs:
        key = v["name"] + ".weight"
        q = quantized_from_bnb(key, {k: a for k, a in state.items() if k == key or k.startswith(key + ".")})
        settings_ok = (q.format == v["quant_type"] and q.block_size == v["blocksize"]
                       and q.double_quant == v["double_quant"] and q.shape == (v["out"], v["in"]))
        ours = np.asarray(dequantize(q, jnp.float32))
        out["portable"][v["name"]] = bool(settings_ok and same(ours, deq[key + ".portable"]))
        if v["in"] % v["blocksize"] == 0:
            out["dequantize_4bit"][v["name"]] = bool(settings_ok and same_but_zero_sign(ours, deq[key]))
        if not same(deq[key], deq[key + ".portable"]):
            out["bnb_cpu_kernel_differs"].append(v["name"])
    return out


def interop_python() -> str:
    """The interop venv's python (built on first use by scripts/interop_venv.sh)."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "interop_venv.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"scripts/interop_venv.sh failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def run_torch(python: str, *args: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run([python, str(TORCH_SIDE), *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"torch_side.py {args[0]} failed (rc {r.returncode}):\n{r.stderr[-6000:]}")


def token_ids(smollm2_path) -> np.ndarray:
    """[2, SEQ_LEN] token ids of the first two Lee-corpus news articles."""
    from qlora_jax import assets
    from qlora_jax.io import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    rows = []
    for doc in assets.lee_documents():
        ids = list(tok.encode(doc))
        if len(ids) >= SEQ_LEN:
            rows.append(ids[:SEQ_LEN])
        if len(rows) == 2:
            break
    return np.asarray(rows, np.int32)


# --------------------------------------------------------------------------------------------
# The proof


def build_proof(d: Path, smollm2_path: Path) -> dict:
    """Runs both sides and returns the measured quantities (see the module docstring)."""
    res: dict = {"timings_s": {}}

    def tick(what, t0):
        res["timings_s"][what] = round(time.time() - t0, 2)

    python = interop_python()
    ids = token_ids(smollm2_path)
    (d / "ids.json").write_text(json.dumps({"input_ids": ids.tolist()}))

    t0 = time.time()
    run_torch(python, "stage1", "--src", str(smollm2_path), "--ids", str(d / "ids.json"), "--out", str(d / "s1"))
    tick("torch stage1", t0)
    s1_logits = load_file(str(d / "s1" / "logits.safetensors"))

    res["variants"] = compare_variants(d / "s1")

    # 1. the transformers-made bnb-4bit folder, loaded without re-quantizing
    t0 = time.time()
    model, config = load_bnb_llama(d / "s1" / "bnb")
    tick("load bnb", t0)
    res["n_linear_expected"] = len(LINEAR_NAMES) * config.num_hidden_layers
    res["import_dequant"] = compare_dequantized(model, d / "s1" / "bnb_deq.safetensors")
    reused = 0
    with SafetensorsFolder(d / "s1" / "bnb") as store:
        for key in store.keys():
            if key.endswith(".weight.absmax"):
                wkey = key[: -len(".absmax")]
                q = module(model, wkey[: -len(".weight")]).base.get_value()
                reused += int(np.array_equal(np.asarray(q.codes), store.get(wkey).reshape(-1))
                              and np.array_equal(np.asarray(q.absmax), store.get(key)))
    res["import_bytes_identical"] = reused
    t0 = time.time()
    base_logits = np.asarray(model(jnp.asarray(ids)))
    tick("jax logits base", t0)
    res["import_logits_rel_err"] = rel_err(base_logits, s1_logits["deq"])

    # 3. the adapter PEFT made, loaded onto our 4-bit model
    t0 = time.time()
    tcfg = load_peft_adapter(model, d / "s1" / "torch_adapter", adapter_name="torch")
    res["torch_adapter_config"] = {"r": tcfg.r, "rank_pattern": tcfg.rank_pattern, "alpha_pattern": tcfg.alpha_pattern}
    res["torch_adapter_down_proj_a_shape"] = list(
        adapter_weights(model, "torch")["model.layers.0.mlp.down_proj"]["lora_a"].shape)
    torch_adapter_logits = np.asarray(model(jnp.asarray(ids)))
    tick("torch adapter in jax", t0)
    res["torch_adapter_rel_err"] = rel_err(torch_adapter_logits, s1_logits["torch_adapter"])
    res["torch_adapter_effect"] = rel_err(s1_logits["torch_adapter"], s1_logits["deq"])

    # 2. our adapter (random non-zero A and B, rsLoRA, per-module rank and alpha) -> PEFT files
    t0 = time.time()
    ours_cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                          use_rslora=True, rank_pattern={"gate_proj": 4}, alpha_pattern={"v_proj": 32})
    inject(model, ours_cfg, adapter_name="ours", rngs=nnx.Rngs(7), compute_dtype=None)
    set_adapter(model, "ours")
    ours_logits = np.asarray(model(jnp.asarray(ids)))
    res["ours_adapter_effect"] = rel_err(ours_logits, base_logits)
    save_peft_adapter(model, d / "ours_adapter", adapter_name="ours", base_model_name_or_path=str(smollm2_path))
    res["ours_adapter_config"] = json.loads((d / "ours_adapter" / "adapter_config.json").read_text())
    tick("our adapter", t0)

    # 4. exports: merged float32 (sharded, with tokenizer) and bnb-4bit (re-quantized after merging)
    t0 = time.time()
    export_merged_hf(model, d / "ours_merged", dtype="float32", shard_size="200MB", tokenizer_src=smollm2_path)
    res["merged_files"] = sorted(os.listdir(d / "ours_merged"))
    tick("export merged", t0)
    t0 = time.time()
    export_merged_hf(model, d / "ours_bnb", dtype="float32", quantize="nf4", tokenizer_src=smollm2_path)
    tick("export bnb", t0)
    del model
    t0 = time.time()
    ours_bnb, _ = load_bnb_llama(d / "ours_bnb")
    ours_bnb_logits = np.asarray(ours_bnb(jnp.asarray(ids)))
    tick("jax logits of our bnb export", t0)

    t0 = time.time()
    run_torch(python, "stage2", "--src", str(smollm2_path), "--deq", str(d / "s1" / "bnb_deq.safetensors"),
              "--ids", str(d / "ids.json"), "--peft", str(d / "ours_adapter"), "--merged", str(d / "ours_merged"),
              "--bnb", str(d / "ours_bnb"), "--out", str(d / "s2"))
    tick("torch stage2", t0)
    s2_logits = load_file(str(d / "s2" / "logits.safetensors"))
    res["ours_adapter_in_peft_rel_err"] = rel_err(ours_logits, s2_logits["our_adapter"])
    res["merged_rel_err"] = rel_err(ours_logits, s2_logits["merged"])
    res["bnb_export_rel_err"] = rel_err(ours_bnb_logits, s2_logits["bnb"])
    res["bnb_export_dequant"] = compare_dequantized(ours_bnb, d / "s2" / "our_bnb_deq.safetensors")
    res["torch_meta"] = {"stage1": json.loads((d / "s1" / "meta.json").read_text()),
                         "stage2": json.loads((d / "s2" / "meta.json").read_text())}
    return res


def check_proof(res: dict) -> list[str]:
    """The properties the proof must show; returns the failed ones (empty = all hold)."""
    n = res["n_linear_expected"]
    s1, s2 = res["torch_meta"]["stage1"], res["torch_meta"]["stage2"]
    cfg = res["ours_adapter_config"]
    files = res["merged_files"]
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    checks = {
        # 1. the bnb-4bit folder transformers + bitsandbytes wrote, loaded without re-quantizing
        "1: transformers made Linear4bit layers":
            s1["bnb_module_types"]["model.layers.0.self_attn.q_proj"].endswith("Linear4bit"),
        "1: every 4-bit weight compared": res["import_dequant"]["compared"] == n,
        "1: dequantized weights bit-identical to dequantize_4bit": res["import_dequant"]["bit_identical"] == n,
        "1: packed codes and absmax reused byte for byte": res["import_bytes_identical"] == n,
        "1: logits match the dequantized transformers model": res["import_logits_rel_err"] <= REL_TOL,
        "1: every Linear4bit variant (fp4/nf4, DQ on/off, blocks 32-256, storage dtypes, partial and "
        "straddling blocks) imports bit-identically to the portable backend": (
            len(res["variants"]["portable"]) == 6 and all(res["variants"]["portable"].values())),
        "1: ... and to dequantize_4bit (up to the sign of zero) where rows hold whole blocks": (
            len(res["variants"]["dequantize_4bit"]) == 4 and all(res["variants"]["dequantize_4bit"].values())),
        # 2. our adapter (rsLoRA, rank/alpha patterns) -> PeftModel.from_pretrained
        "2: adapter_config fields": (cfg["use_rslora"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
                                     and cfg["rank_pattern"] == {"gate_proj": 4}
                                     and cfg["alpha_pattern"] == {"v_proj": 32}
                                     and sorted(cfg["target_modules"]) == sorted(LINEAR_NAMES)),
        "2: PEFT built LoRA layers": all(t.startswith("peft.tuners.lora") for t in s2["peft_module_types"].values()),
        # the adapters change the output a lot, so a wrong transpose/scale cannot hide in the tolerance
        "2: our adapter changes the logits": res["ours_adapter_effect"] > 1e-2,
        "2: PEFT logits match ours": res["ours_adapter_in_peft_rel_err"] <= REL_TOL,
        # 3. PEFT's adapter -> our 4-bit model
        "3: adapter config read": res["torch_adapter_config"] == {"r": 8, "rank_pattern": {"down_proj": 4},
                                                                   "alpha_pattern": {"o_proj": 4}},
        "3: rank_pattern rank used ([in, r])": res["torch_adapter_down_proj_a_shape"] == [1536, 4],
        "3: torch adapter changes the logits": res["torch_adapter_effect"] > 1e-2,
        "3: our logits match PEFT's": res["torch_adapter_rel_err"] <= REL_TOL,
        # 4. exports -> transformers
        "4: merged export is sharded with an index and a tokenizer": (
            len(shards) >= 2 and "model.safetensors.index.json" in files and "tokenizer.json" in files),
        "4: merged export logits match ours": res["merged_rel_err"] <= REL_TOL,
        "4: bnb export loads as Linear4bit layers": s2["our_bnb_linear4bit_count"] == n,
        "4: bnb export computes in float32": s2["our_bnb_compute_dtypes"] == ["torch.float32"],
        "4: bnb export dequantizes bit-identically": (res["bnb_export_dequant"]["compared"] == n
                                                      and res["bnb_export_dequant"]["bit_identical"] == n),
        "4: bnb export logits match ours": res["bnb_export_rel_err"] <= REL_TOL,
    }
    return [name for name, ok in checks.items() if not ok]


def test_pytorch_interop_proof(tmp_path, smollm2_path):
    """Items 1-4 of the interop proof on SmolLM2-135M, against transformers, bitsandbytes and PEFT.

    One test on purpose: the torch side runs twice in all, and under pytest-xdist a single test
    keeps the other worker free for the rest of the suite. Every property is checked and all
    failures are reported together; the measured figures are printed and kept in results.json.
    """
    t0 = time.time()
    res = build_proof(tmp_path, Path(smollm2_path))
    res["total_s"] = round(time.time() - t0, 1)
    (tmp_path / "results.json").write_text(json.dumps(res, indent=2))
    figures = {k: v for k, v in res.items() if k.endswith(("rel_err", "effect", "_s"))}
    figures["bnb_cpu_dequantize_4bit_differs_from_portable"] = res["variants"]["bnb_cpu_kernel_differs"]
    print(f"\ninterop proof: {json.dumps(figures)}\ntimings: {json.dumps(res['timings_s'])}\n"
          f"details: {tmp_path / 'results.json'}")
    failed = check_proof(res)
    assert not failed, f"interop proof failed: {failed}\n{json.dumps(res, indent=2)[:6000]}"


# --------------------------------------------------------------------------------------------
# Tiny models for round trips and bad input (no torch)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
    # non-trivial norm weights so that a swapped tensor would show
    key = jax.random.key(seed + 100)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            key, k = jax.random.split(key)
            norm.weight.set_value(1 + 0.1 * jax.random.normal(k, norm.weight.get_value().shape))
    return model


def tiny_qlora(seed: int = 0, quantize: QuantPolicy | None = QuantPolicy(), **overrides) -> LlamaForCausalLM:
    """A tiny model with a random (non-zero) adapter on q/v/down (down at rank 2), 4-bit bases."""
    model = tiny_model(seed, **overrides)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, rank_pattern={"down_proj": 2}),
           rngs=nnx.Rngs(seed + 1), compute_dtype=None, quantize=quantize)
    return model


@pytest.fixture(scope="module")
def tiny_bnb(tmp_path_factory) -> Path:
    """A tiny bnb-4bit folder written by our exporter from a model with 4-bit bases."""
    model = tiny_model()
    inject(model, LoraConfig(r=2, target_modules=["q_proj"]), rngs=nnx.Rngs(1), compute_dtype=None)
    folder = tmp_path_factory.mktemp("tiny") / "bnb"
    export_merged_hf(model, folder, dtype="float32", quantize="nf4")
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(folder: Path, edit) -> None:
    """Rewrites folder/model.safetensors with ``edit(dict)`` applied."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("2 parsecs")


def test_bnb_roundtrip_keeps_our_bytes(tmp_path):
    """Export a 4-bit model with nothing to merge: the files hold its own bytes, and loading them back
    gives identical QuantizedArrays (NF4 + DQ, and FP4 without DQ)."""
    for fmt, dq in (("nf4", True), ("fp4", False)):
        model = tiny_model()
        inject(model, LoraConfig(r=2, target_modules=["q_proj"]), rngs=nnx.Rngs(1), compute_dtype=None,
               quantize=qpolicy(fmt, dq))
        set_adapter(model, None)  # nothing to merge: every 4-bit base is written as it is
        folder = tmp_path / fmt
        export_merged_hf(model, folder, dtype="float32", quantize=fmt, double_quant=dq)
        loaded, _ = load_bnb_llama(folder)
        n = 0
        for path, layer in quant_layers(model).items():
            mine, theirs = layer.base.get_value(), module(loaded, path).base.get_value()
            assert (mine.format, mine.block_size, mine.dq_block_size) == (theirs.format, theirs.block_size,
                                                                           theirs.dq_block_size)
            for a, b in zip(mine.arrays(), theirs.arrays()):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            n += 1
        assert n == 7 * TINY["num_hidden_layers"]


def qpolicy(fmt: str, dq: bool) -> QuantPolicy:
    return QuantPolicy(format=fmt, double_quant=dq, min_size=1)


def quant_layers(model) -> dict:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, QuantLinear) and node.quantized}


def test_bnb_quant_storage_bf16_variant(tiny_bnb, tmp_path):
    """FSDP-QLoRA checkpoints store the packed bytes as bf16 elements: same bytes, same weights."""
    folder = copy_folder(tiny_bnb, tmp_path / "bf16")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))

    def to_bf16(t):
        import ml_dtypes
        for k in [k for k in t if k.endswith("proj.weight")]:
            t[k] = t[k].reshape(-1).view(ml_dtypes.bfloat16).reshape(-1, 1)
    rewrite(folder, to_bf16)
    a, _ = load_bnb_llama(tiny_bnb)
    b, _ = load_bnb_llama(folder)
    for path in quant_layers(a):
        np.testing.assert_array_equal(np.asarray(dequantize(module(a, path).base.get_value())),
                                      np.asarray(dequantize(module(b, path).base.get_value())))


def test_sharded_float_export_roundtrip(tmp_path):
    """A float export in several shards reads back (qlora_jax's own HF loader) as the merged model."""
    from qlora_jax.io import load_llama

    model = tiny_qlora()
    ids = jnp.arange(12)[None]
    want = np.asarray(model(ids))
    folder = export_merged_hf(model, tmp_path / "merged", dtype="float32", shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    for f in set(index["weight_map"].values()):
        assert (folder / f).stat().st_size <= 40_000 + 4096  # tensors + header
    loaded, _ = load_llama(folder)
    np.testing.assert_allclose(np.asarray(loaded(ids)), want, rtol=0, atol=2e-5 * np.abs(want).max())
    # the model itself is not changed by exporting
    assert lora_layers(model) and np.array_equal(np.asarray(model(ids)), want)


def test_bf16_export_matches_rounded_merge(tmp_path):
    """bf16 export = the float32 merged weight rounded once to bf16 (independent numpy merge)."""
    model = tiny_qlora()
    folder = export_merged_hf(model, tmp_path / "bf16", dtype="bfloat16")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    tensors = load_file(str(folder / "model.safetensors"))
    layer = module(model, "model.layers.1.mlp.down_proj")
    spec = layer.specs["default"]
    w = np.asarray(dequantize(layer.base.get_value(), jnp.float32), np.float64)
    a = np.asarray(layer.lora_a["default"].get_value(), np.float64)
    b = np.asarray(layer.lora_b["default"].get_value(), np.float64)
    ref = (w + spec.scale * (a @ b).T).astype(np.float32)
    got = tensors["model.layers.1.mlp.down_proj.weight"]
    assert got.dtype.name == "bfloat16"
    # one rounding to bf16 of a float32 value within a float32 ulp of the float64 merge
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2 ** -8 + 1e-6, atol=1e-6 * np.abs(ref).max())


def test_peft_roundtrip_our_model(tmp_path):
    model = tiny_qlora()
    save_peft_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    cfg, weights, raw = read_peft_adapter(tmp_path / "a")
    assert raw["rank_pattern"] == {"down_proj": 2} and raw["base_model_name_or_path"] == "tiny"
    fresh = tiny_model()
    load_peft_adapter(fresh, tmp_path / "a", quantize=QuantPolicy())  # the same 4-bit bases as tiny_qlora
    ids = jnp.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(fresh(ids)), np.asarray(model(ids)))
    # an adapter on some layers only: the saved target_modules (a regex of the paths, which PEFT
    # fullmatches) selects exactly those layers again
    partial = tiny_model()
    inject(partial, LoraConfig(r=2, target_modules=["k_proj", "up_proj"], layers_to_transform=[1],
                               alpha_pattern={"up_proj": 4}), rngs=nnx.Rngs(3), quantize=None, compute_dtype=None)
    save_peft_adapter(partial, tmp_path / "p")
    cfg, _, raw = read_peft_adapter(tmp_path / "p")
    assert isinstance(raw["target_modules"], str)
    again = tiny_model()
    load_peft_adapter(again, tmp_path / "p")
    assert sorted(lora_layers(again)) == sorted(lora_layers(partial)) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj"]
    assert {p: l.specs["default"].scale for p, l in lora_layers(again).items()} == {
        "model.layers.1.mlp.up_proj": 2.0, "model.layers.1.self_attn.k_proj": 4.0}


# ----------------------------------------------------------------------------- bad input: bnb


def test_bnb_missing_key(tiny_bnb, tmp_path):
    folder = copy_folder(tiny_bnb, tmp_path / "m")
    rewrite(folder, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight.absmax"))
    with pytest.raises(ValueError, match=r"missing key.*model\.layers\.0\.self_attn\.q_proj\.weight\.absmax"):
        load_bnb_llama(folder)
    folder2 = copy_folder(tiny_bnb, tmp_path / "m2")
    rewrite(folder2, lambda t: t.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(ValueError, match=r"missing keys: \['model\.layers\.1\.input_layernorm\.weight'\]"):
        load_bnb_llama(folder2)


def test_bnb_unexpected_keys(tiny_bnb, tmp_path):
    folder = copy_folder(tiny_bnb, tmp_path / "u")

    def add(t):
        t["model.layers.2.mlp.up_proj.bias"] = np.zeros(128, np.float32)
        t["model.layers.0.self_attn.q_proj.weight.nested_absmax_extra"] = np.zeros(1, np.float32)
    rewrite(folder, add)
    with pytest.raises(ValueError, match=r"unexpected keys: \[.*model\.layers\.2\.mlp\.up_proj\.bias"):
        load_bnb_llama(folder)


def test_bnb_shape_mismatch_and_wrong_base(tiny_bnb, tmp_path):
    folder = copy_folder(tiny_bnb, tmp_path / "s")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight.*shape"):
        load_bnb_llama(folder)
    cfg["intermediate_size"] = 128
    cfg["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected keys: \['model\.layers\.1\."):
        load_bnb_llama(folder)


def test_bnb_unsupported_quant_type_and_tables(tiny_bnb, tmp_path):
    folder = copy_folder(tiny_bnb, tmp_path / "q")
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    rewrite(folder, lambda t: t.__setitem__(key.replace("__nf4", "__int8"), t.pop(key)))
    with pytest.raises(ValueError, match=r"bitsandbytes__int8.*unsupported quant_type 'int8'"):
        load_bnb_llama(folder)
    cfg_folder = copy_folder(tiny_bnb, tmp_path / "q2")
    cfg = json.loads((cfg_folder / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "int4"
    (cfg_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported bnb_4bit_quant_type 'int4'"):
        load_bnb_llama(cfg_folder)
    tbl = copy_folder(tiny_bnb, tmp_path / "q3")
    k = "model.layers.1.self_attn.k_proj.weight.quant_map"
    rewrite(tbl, lambda t: t.__setitem__(k, np.round(t[k], 4)))  # torchao's 4-decimal NF4 table
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight\.quant_map.*code table"):
        load_bnb_llama(tbl)
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (cfg_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not 4-bit"):
        load_bnb_llama(cfg_folder)


def test_bnb_truncated_file(tiny_bnb, tmp_path):
    folder = copy_folder(tiny_bnb, tmp_path / "t")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_bnb_llama(folder)


def test_quantized_from_bnb_checks_sizes():
    q = quantize(jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32), "nf4")
    parts = bnb_tensors("w.weight", q)
    assert isinstance(quantized_from_bnb("w.weight", parts), QuantizedArray)
    short = dict(parts, **{"w.weight.absmax": parts["w.weight.absmax"][:-1]})
    with pytest.raises(ValueError, match=r"w\.weight\.absmax: expected uint8 \[8\]"):
        quantized_from_bnb("w.weight", short)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['w\.weight\.bogus'\]"):
        quantized_from_bnb("w.weight", dict(parts, **{"w.weight.bogus": np.zeros(1)}))


# ----------------------------------------------------------------------------- bad input: PEFT


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "a"
    save_peft_adapter(tiny_qlora(), folder)
    return folder


def edit_adapter(src: Path, dst: Path, edit) -> Path:
    copy_folder(src, dst)
    path = dst / "adapter_model.safetensors"
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path), metadata={"format": "pt"})
    return dst


def assert_untouched(model) -> None:
    assert not lora_layers(model), "the model was changed by a failed load"


P = "base_model.model.model.layers."


def test_peft_missing_key(tiny_adapter, tmp_path):
    a = edit_adapter(tiny_adapter, tmp_path / "a", lambda t: t.pop(P + "1.self_attn.v_proj.lora_B.weight"))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"missing key .*1\.self_attn\.v_proj\.lora_B\.weight"):
        load_peft_adapter(model, a)
    assert_untouched(model)
    both = edit_adapter(tiny_adapter, tmp_path / "b",
                        lambda t: [t.pop(P + "0.mlp.down_proj.lora_" + w + ".weight") for w in "AB"])
    with pytest.raises(ValueError, match=r"missing keys for targeted modules: \[.*0\.mlp\.down_proj"):
        load_peft_adapter(model, both)
    assert_untouched(model)


def test_peft_unexpected_key(tiny_adapter, tmp_path):
    def add(t):
        t[P + "0.self_attn.rotary.lora_A.weight"] = np.zeros((4, 64), np.float32)
        t[P + "0.self_attn.rotary.lora_B.weight"] = np.zeros((64, 4), np.float32)
    a = edit_adapter(tiny_adapter, tmp_path / "a", add)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"unexpected keys.*0\.self_attn\.rotary\.lora_A\.weight"):
        load_peft_adapter(model, a)
    b = edit_adapter(tiny_adapter, tmp_path / "b",
                     lambda t: t.__setitem__(P + "0.self_attn.q_proj.lora_magnitude_vector", np.ones(64, np.float32)))
    with pytest.raises(ValueError, match=r"unexpected key .*q_proj\.lora_magnitude_vector"):
        load_peft_adapter(model, b)
    assert_untouched(model)


def test_peft_shape_mismatch(tiny_adapter, tmp_path):
    k = P + "0.self_attn.q_proj.lora_B.weight"
    a = edit_adapter(tiny_adapter, tmp_path / "a", lambda t: t.__setitem__(k, t[k][:, :3]))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"0\.self_attn\.q_proj\.lora_B\.weight has shape \[64, 3\].*\[64, 4\]"):
        load_peft_adapter(model, a)
    assert_untouched(model)


def test_peft_adapter_for_a_different_base(tmp_path):
    wide = tmp_path / "wide"
    save_peft_adapter(tiny_qlora(quantize=None, hidden_size=32, num_attention_heads=2, num_key_value_heads=1), wide)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"lora_[AB]\.weight has shape \[[^]]*32[^]]*\], the model needs \[[^]]*64[^]]*\].*different base"):
        load_peft_adapter(model, wide)
    deep = tmp_path / "deep"
    save_peft_adapter(tiny_qlora(quantize=None, num_hidden_layers=3), deep)
    with pytest.raises(ValueError, match=r"model does not have.*layers\.2\..*different base"):
        load_peft_adapter(model, deep)
    assert_untouched(model)


def test_peft_truncated_file_and_bad_config(tiny_adapter, tmp_path):
    a = copy_folder(tiny_adapter, tmp_path / "a")
    f = a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    model = tiny_model()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*(corrupt|truncated)"):
        load_peft_adapter(model, a)
    b = copy_folder(tiny_adapter, tmp_path / "b")
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_config\.json.*use_dora"):
        load_peft_adapter(model, b)
    assert_untouched(model)


# ----------------------------------------------------------------------------- nothing written on failure


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_failed_exports_write_nothing(tmp_path):
    good = tiny_qlora(quantize=None)
    bad = tiny_qlora(quantize=None)
    layer = module(bad, "model.layers.1.mlp.down_proj")
    b = layer.lora_b["default"].get_value()
    layer.lora_b["default"].set_value(b.at[0, 0].set(jnp.nan))  # a non-finite merged weight
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="NaN or Inf"):
        export_merged_hf(bad, out / "bnb", quantize="nf4")   # fails while writing the shard
    with pytest.raises(ValueError, match="quantize='int4' has no bitsandbytes format"):
        export_merged_hf(good, out / "int4", quantize="int4")
    with pytest.raises(ValueError, match="tokenizer_src"):
        export_merged_hf(good, out / "tok", tokenizer_src=tmp_path / "nowhere")  # fails at the very end
    with pytest.raises(ValueError, match="no adapter 'other'"):
        save_peft_adapter(good, out / "peft", adapter_name="other")
    assert leftovers(out) == []
    # an existing folder is kept as it is unless overwrite=True
    keep = out / "keep"
    keep.mkdir()
    (keep / "marker").write_text("x")
    with pytest.raises(FileExistsError):
        export_merged_hf(good, keep)
    assert leftovers(keep) == ["marker"] and leftovers(out) == ["keep"]
    export_merged_hf(good, keep, overwrite=True, dtype="float32")
    assert "marker" not in leftovers(keep) and "config.json" in leftovers(keep)
    assert leftovers(out) == ["keep"]


# ----------------------------------------------------------------------------- the CLI


def test_convert_cli_tiny(tmp_path, capsys):
    """experiments/convert.py end to end on a tiny model: hf-to-bnb4, peft-import/-export round trip,
    merge into the 4-bit base; a failing merge leaves no output behind."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_cli", ROOT / "experiments" / "convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    trained = tiny_qlora(quantize=None)
    hf = export_merged_hf(tiny_model(), tmp_path / "hf", dtype="float32")  # the float base
    save_peft_adapter(trained, tmp_path / "peft")
    assert cli.main(["hf-to-bnb4", str(hf), str(tmp_path / "bnb"), "--dtype", "float32"]) == 0
    assert cli.main(["peft-import", str(tmp_path / "peft"), str(tmp_path / "ours"), "--base", str(hf)]) == 0
    assert cli.main(["peft-export", str(tmp_path / "ours"), str(tmp_path / "peft2"), "--base", str(hf)]) == 0
    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "peft2" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert cli.main(["merge", str(tmp_path / "bnb"), str(tmp_path / "peft"), str(tmp_path / "merged"),
                     "--dtype", "float32", "--json", str(tmp_path / "merge.json")]) == 0
    assert json.loads((tmp_path / "merge.json").read_text())["base"] == "bnb-4bit"
    # merged = the 4-bit base (as loaded) + the adapter, recomputed here in float64
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base, _ = load_bnb_llama(tmp_path / "bnb")
    for path, layer in lora_layers(trained).items():
        w = np.asarray(dequantize(module(base, path).base.get_value(), jnp.float32), np.float64)
        a = np.asarray(layer.lora_a["default"].get_value(), np.float64)
        bb = np.asarray(layer.lora_b["default"].get_value(), np.float64)
        ref = w + layer.specs["default"].scale * (a @ bb).T
        np.testing.assert_allclose(merged[path + ".weight"], ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert np.array_equal(merged["model.layers.0.mlp.up_proj.weight"],  # not adapted: the 4-bit base
                          np.asarray(dequantize(base.model.layers[0].mlp.up_proj.base.get_value(), jnp.float32)))
    other = tmp_path / "other"
    save_peft_adapter(tiny_qlora(quantize=None, num_hidden_layers=3), other)
    with pytest.raises(ValueError, match="different base"):
        cli.main(["merge", str(hf), str(other), str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
