"""Checkpoint and tokenizer I/O: HF safetensors folders, GGUF files."""

from qlora_jax.io.gguf import read_gguf_llama
from qlora_jax.io.hf import load_llama, read_checkpoint, read_hf_folder
from qlora_jax.io.tokenizer import Tokenizer, load_tokenizer, render_chat_template, save_tokenizer, tokenizer_from_gguf

__all__ = [
    "read_gguf_llama", "read_hf_folder", "read_checkpoint", "load_llama",
    "Tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_from_gguf", "render_chat_template",
]
