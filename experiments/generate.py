"""Chat with a base model, optionally with a LoRA adapter over its 4-bit base.

    python experiments/generate.py --prompt "What is the capital of France?"
    python experiments/generate.py --adapter runs/finetune/adapter --prompt "Do you like pizza?"
    python experiments/generate.py --adapter runs/finetune/adapter          # interactive; Ctrl-D ends

Prompts go through the tokenizer's chat template (``--raw`` continues plain text instead).
Greedy by default; ``--temperature`` and ``--top-p`` sample. In the interactive loop the
conversation is kept, ``/reset`` clears it, ``/exit`` (or EOF) ends. Prompts are left-padded to a
multiple of ``--bucket`` tokens so turns of similar length reuse one compiled function.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data as qdata

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder written by finetune.py")
    p.add_argument("--format", choices=("saved", "none", "nf4", "fp4"), default="saved",
                   help="base weights under the adapter: 'saved' = as in training")
    p.add_argument("--prompt", default=None, help="one prompt, answered once (else an interactive loop)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket", type=int, default=64, help="prompt length rounding (compiled shapes)")
    p.add_argument("--compute-dtype", choices=("auto", *COMPUTE_DTYPES), default="auto")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1 or a.bucket < 1 or a.temperature < 0 or not 0 < a.top_p <= 1:
        p.error("need --max-new-tokens >= 1, --bucket >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    return a


def base_policy(fmt: str):
    """``--format`` -> `attach_adapter`'s ``quantize``: "saved", None (float) or a ``QuantPolicy``."""
    from qlora_jax import QuantPolicy

    if fmt == "saved":
        return "saved"
    return None if fmt == "none" else QuantPolicy(format=fmt)


class Chat:
    """A model + tokenizer that answers a conversation (a list of chat messages)."""

    def __init__(self, args: argparse.Namespace):
        from qlora_jax import assets
        from qlora_jax import train as qtrain
        from qlora_jax.io import load_llama, load_tokenizer

        path = str(assets.default_model_path()) if args.model is None else args.model
        if not os.path.exists(path):
            raise FileNotFoundError(f"--model {path}: no such file or folder")
        if args.adapter is not None and not os.path.isdir(args.adapter):
            raise FileNotFoundError(f"--adapter {args.adapter}: no such folder")
        cd = args.compute_dtype
        cd = (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16) if cd == "auto" else COMPUTE_DTYPES[cd]
        self.tok = load_tokenizer(path)
        if not args.raw and not self.tok.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; use --raw")
        self.model, _ = load_llama(path, dtype=cd)
        self.desc = "base model"
        if args.adapter is not None:
            quant = base_policy(args.format)
            lcfg, _ = qtrain.attach_adapter(self.model, args.adapter, quantize=quant, compute_dtype=cd)
            self.desc = f"base + adapter {args.adapter} (r={lcfg.r})"
        self.model.eval()
        self.args = args
        self.rng = jax.random.PRNGKey(args.seed)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.args.raw:
            return self.tok.encode("".join(m["content"] for m in messages if m["role"] != "system"))
        return self.tok.encode(self.tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)

    def reply(self, messages: list[dict[str, str]]) -> str:
        """The model's next message after ``messages``."""
        from qlora_jax.models import generate

        pad = self.tok.pad_id if self.tok.pad_id is not None else (self.tok.eos_id or 0)
        ids, mask = qdata.left_pad([self.prompt_ids(messages)], pad, multiple=self.args.bucket)
        self.rng, key = jax.random.split(self.rng)
        out = list(np.asarray(generate(self.model, ids, self.args.max_new_tokens, attention_mask=mask,
                                       temperature=self.args.temperature, top_p=self.args.top_p, rng=key,
                                       eos_id=self.tok.eos_id))[0])
        if self.tok.eos_id is not None and self.tok.eos_id in out:
            out = out[: out.index(self.tok.eos_id)]
        return self.tok.decode(out, skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    chat = Chat(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        t = time.perf_counter()
        print(chat.reply(system + [{"role": "user", "content": args.prompt}]))
        print(f"[{chat.desc}; {time.perf_counter() - t:.1f}s]", file=sys.stderr)
        return 0
    print(f"{chat.desc}. /reset clears the conversation, /exit or Ctrl-D ends.", file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(system)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = chat.reply(history)
        history.append({"role": "assistant", "content": answer})
        print(f"bot> {answer}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
