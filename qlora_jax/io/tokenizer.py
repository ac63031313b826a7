"""Tokenizers from an HF folder (``tokenizer.json``) or from GGUF metadata, plus chat templates.

Only the ``tokenizers`` library is used (no transformers). Chat templates are rendered
with a sandboxed Jinja2 environment configured like HF's (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``tojson``).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping, Sequence

__all__ = ["Tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_from_gguf", "render_chat_template"]

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4
# tokenizer.ggml.pre values whose pre-tokenizer is GPT-2's byte-level regex.
_GPT2_STYLE_PRE = (None, "default", "gpt2", "smollm", "starcoder", "refact")


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with ids of special tokens and a chat template.

    Attributes:
      backend: the underlying ``tokenizers.Tokenizer``.
      bos_id, eos_id, pad_id: special token ids or None.
      chat_template: Jinja2 source of the chat template, or None.
      add_bos: whether :meth:`encode` prepends ``bos_id`` by default.
    """

    def __init__(self, backend: Any, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, add_bos: bool = False):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.backend.id_to_token(self.eos_id)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token strings in ``text`` map to their ids.

        ``add_bos`` (default ``self.add_bos``) prepends ``bos_id``.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any int sequence or 1-D array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


_TEMPLATE_CACHE: dict[str, Any] = {}


def _jinja_env() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(msg)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render a Jinja2 chat ``template`` (sandboxed) with ``messages`` and extra variables."""
    tpl = _TEMPLATE_CACHE.get(template)
    if tpl is None:
        tpl = _TEMPLATE_CACHE[template] = _jinja_env().from_string(template)
    return tpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs)


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """Byte-level BPE tokenizer rebuilt from GGUF metadata (``tokenizer.ggml.*``).

    Supports ``tokenizer.ggml.model == "gpt2"`` with a GPT-2-style pre-tokenizer
    (SmolLM2, StarCoder, GPT-2). Control tokens (type 3) become special tokens.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from qlora_jax.io.gguf import gguf_field, open_gguf

    p = os.fspath(path)
    r = open_gguf(p)
    kind = gguf_field(r, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ValueError(f"{p}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2'); "
                         "use an HF folder with tokenizer.json")
    pre = gguf_field(r, "tokenizer.ggml.pre", None)
    if pre not in _GPT2_STYLE_PRE:
        raise ValueError(f"{p}: tokenizer.ggml.pre {pre!r} is not supported (supported: {_GPT2_STYLE_PRE[1:]}); "
                         "use an HF folder with tokenizer.json")
    toks = gguf_field(r, "tokenizer.ggml.tokens")
    merges = gguf_field(r, "tokenizer.ggml.merges")
    types = gguf_field(r, "tokenizer.ggml.token_type", [1] * len(toks))
    bpe = models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tk = HFTokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(toks, types) if ty == _CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(toks, types) if ty == _USER_DEFINED]
    if user:
        tk.add_tokens(user)
    return Tokenizer(
        tk,
        bos_id=gguf_field(r, "tokenizer.ggml.bos_token_id", None),
        eos_id=gguf_field(r, "tokenizer.ggml.eos_token_id", None),
        pad_id=gguf_field(r, "tokenizer.ggml.padding_token_id", None),
        chat_template=gguf_field(r, "tokenizer.chat_template", None),
        add_bos=bool(gguf_field(r, "tokenizer.ggml.add_bos_token", False)),
    )


def _token_str(x: Any) -> str | None:
    # tokenizer_config.json writes special tokens as "str" or {"content": "str", ...}
    if isinstance(x, Mapping):
        return x.get("content")
    return x


def _tokenizer_from_folder(folder: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tj = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tj):
        raise ValueError(f"{folder}: no tokenizer.json (only fast-tokenizer files are supported)")
    try:
        tk = HFTokenizer.from_file(tj)
    except Exception as e:
        raise ValueError(f"{tj}: cannot load tokenizer ({e})") from e
    tc: dict[str, Any] = {}
    tc_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc_path):
        with open(tc_path, encoding="utf-8") as f:
            tc = json.load(f)
    cfg: dict[str, Any] = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)

    def tid(key: str) -> int | None:
        s = _token_str(tc.get(key))
        if s is not None and tk.token_to_id(s) is not None:
            return tk.token_to_id(s)
        v = cfg.get(f"{key}_id")
        return v[0] if isinstance(v, list) and v else v

    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    bos = tid("bos_token")
    if "add_bos_token" in tc:
        add_bos = bool(tc["add_bos_token"])
    else:  # e.g. Llama 3 adds BOS through the tokenizer.json post-processor
        add_bos = bos is not None and tk.encode("", add_special_tokens=True).ids[:1] == [bos]
    return Tokenizer(tk, bos_id=bos, eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                     chat_template=template, add_bos=add_bos)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Tokenizer of an HF model folder (``tokenizer.json`` [+ ``tokenizer_config.json``]) or a GGUF file."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return _tokenizer_from_folder(p)
    if os.path.isfile(p):
        return tokenizer_from_gguf(p)
    raise ValueError(f"tokenizer source not found: {p} (expected an HF model folder or a .gguf file)")


def save_tokenizer(tok: Tokenizer, folder: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (HF layout) into ``folder``."""
    folder = os.fspath(folder)
    tok.backend.save(os.path.join(folder, "tokenizer.json"))
    tc = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
          "tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.pad_id is not None:
        tc["pad_token"] = tok.backend.id_to_token(tok.pad_id)
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)

