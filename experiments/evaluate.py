"""Held-out loss and perplexity of a model, with or without a LoRA adapter.

    python experiments/evaluate.py                                      # SmolLM2 (float) on lee, held out
    python experiments/evaluate.py --adapter runs/finetune/adapter --data chatterbot
    python experiments/evaluate.py --model path/to/model --data texts.txt --split all --format nf4

``--data`` is ``lee`` / ``chatterbot`` (their held-out split by default), a JSONL file
(``{"text"}`` or ``{"prompt", "completion"}`` rows: completion-only loss) or a ``.txt`` file (one
document per non-blank line). Text is tokenized, EOS-terminated and packed into ``--seq-len`` rows.
The base is float unless ``--format`` asks for 4-bit; with ``--adapter`` the base is quantized
as it was in training (``--format saved``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from qlora_jax import data as qdata

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder written by finetune.py")
    p.add_argument("--data", default="lee", help="lee | chatterbot | file.jsonl | file.txt")
    p.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                   help="which part of a built-in / JSONL data set (a .txt file is always used whole)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-rows", type=int, default=0, help="evaluate at most this many rows (0 = all)")
    p.add_argument("--format", choices=("saved", "none", "nf4", "fp4"), default="saved",
                   help="base weights: 'saved' = as recorded with the adapter (float without one)")
    p.add_argument("--compute-dtype", choices=("auto", *COMPUTE_DTYPES), default="auto")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p.parse_args(argv)


def base_policy(fmt: str):
    """``--format`` -> `attach_adapter`'s ``quantize``: "saved", None (float) or a ``QuantPolicy``."""
    from qlora_jax import QuantPolicy

    if fmt == "saved":
        return "saved"
    return None if fmt == "none" else QuantPolicy(format=fmt)


def records(args: argparse.Namespace) -> list:
    """The records to evaluate (raises ValueError / FileNotFoundError on bad input)."""
    if args.data.endswith(".txt"):
        path = Path(args.data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        docs = [qdata.TextDocument(line.strip(), f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1)
                if line.strip()]
        if not docs:
            raise ValueError(f"--data {path}: no non-blank lines")
        return docs
    train, held = qdata.load_dataset(args.data)
    return {"heldout": held, "train": train, "all": train + held}[args.split]


def run(args: argparse.Namespace) -> dict:
    from flax import nnx

    from qlora_jax import QuantPolicy, assets
    from qlora_jax import nnx as qnnx
    from qlora_jax import train as qtrain
    from qlora_jax.lora import LoraConfig
    from qlora_jax.io import load_llama, load_tokenizer, read_checkpoint
    from qlora_jax.models import LlamaConfig

    model_path = str(assets.default_model_path()) if args.model is None else args.model
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"--model {model_path}: no such file or folder")
    if args.adapter is not None and not os.path.isdir(args.adapter):
        raise FileNotFoundError(f"--adapter {args.adapter}: no such folder")
    config = LlamaConfig.from_hf(read_checkpoint(model_path)[0])
    tok = load_tokenizer(model_path)
    rows, stats = qdata.build_sequences(records(args), tok, args.seq_len,
                                        max_positions=config.max_position_embeddings)
    if args.max_rows:
        rows = {k: v[: args.max_rows] for k, v in rows.items()}
    cd = args.compute_dtype
    cd = (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16) if cd == "auto" else COMPUTE_DTYPES[cd]

    t = time.perf_counter()
    model, _ = load_llama(model_path, dtype=cd)
    if args.adapter is not None:
        quant = base_policy(args.format)
        lcfg, meta = qtrain.attach_adapter(model, args.adapter, quantize=quant, compute_dtype=cd)
        base = meta.get("quant_format", "nf4") if quant == "saved" else args.format
        what = f"adapter {args.adapter} (r={lcfg.r}, base {base})"
    elif args.format in ("nf4", "fp4"):
        # A frozen 4-bit base and no adapter: inject a placeholder adapter to quantize every linear
        # layer in place, then switch adapters off (the layers compute the base output only).
        qnnx.inject(model, LoraConfig(r=1, target_modules="all-linear"), quantize=QuantPolicy(format=args.format),
                    compute_dtype=cd, rngs=nnx.Rngs(0))
        qnnx.set_adapter(model, None)
        what = f"base in {args.format}"
    else:
        what = "float base"
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    res = qtrain.evaluate_model(model, qdata.eval_batches(rows, args.batch_size, pad), forward=qtrain.scan_forward)
    res.update(model=model_path, weights=what, data=args.data, split=args.split, rows=int(rows["input_ids"].shape[0]),
               seq_len=args.seq_len, seconds=time.perf_counter() - t, sequences=stats.as_dict())
    print(f"{what} on {args.data} ({args.split}): {res['rows']} rows, {res['tokens']:.0f} target tokens\n"
          f"  loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  ({res['seconds']:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
