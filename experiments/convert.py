"""Convert checkpoints and adapters between qlora-jax and the PyTorch ecosystem.

Subcommands (each prints a summary table and, with ``--json``, writes it as JSON):

    python experiments/convert.py gguf-to-hf MODEL.gguf OUT [--dtype bfloat16] [--shard-size 2GB]
        GGUF (llama.cpp) -> HF folder (config, sharded safetensors, tokenizer).
    python experiments/convert.py hf-to-bnb4 HF_DIR OUT [--quant-type nf4] [--block-size 64] [--no-double-quant]
        float HF folder (or GGUF) -> bitsandbytes 4-bit HF folder that transformers loads.
    python experiments/convert.py merge BASE ADAPTER OUT [--dtype bfloat16] [--quantize nf4] [--quantize-base nf4]
        base (HF folder, bnb-4bit folder or GGUF) + PEFT adapter -> merged HF folder.
        --quantize-base merges into the dequantized 4-bit base the adapter was trained on (QLoRA).
    python experiments/convert.py peft-export OURS OUT --base BASE
        an adapter written by qlora_jax.train.save_adapter -> PEFT adapter folder.
    python experiments/convert.py peft-import PEFT_DIR OUT --base BASE
        PEFT adapter folder -> qlora_jax.train.save_adapter format.

BASE is what the adapter was made for (its module paths and shapes are checked against it).
Everything is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from qlora_jax.io.bnb import is_bnb_folder, load_any_llama
from qlora_jax.io.export import EXPORT_DTYPES, export_merged_hf
from qlora_jax.io.peft import load_peft_adapter, save_peft_adapter
from qlora_jax.lora import LoraConfig
from qlora_jax.quantize import QuantPolicy


def _tokenizer_src(base: str) -> str | None:
    """The base's tokenizer: its folder if it has tokenizer files, the GGUF file itself, else None."""
    p = Path(base)
    if p.is_file() and p.suffix == ".gguf":
        return str(p)
    if p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()):
        return str(p)
    return None


def _param_dtype(dtype: str):
    # Loading in the export dtype rounds once, as casting at export would, with half the memory.
    return jnp.float32 if dtype == "float32" else jnp.dtype(dtype)


def _load(base: str, dtype: str):
    kind = "bnb-4bit" if Path(base).is_dir() and is_bnb_folder(base) else (
        "gguf" if base.endswith(".gguf") else "hf")
    model, config = load_any_llama(base, param_dtype=_param_dtype(dtype))
    return model, config, kind


def _folder_bytes(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def gguf_to_hf(args) -> dict:
    model, config, _ = _load(args.gguf, args.dtype)
    export_merged_hf(model, args.out, dtype=args.dtype, shard_size=args.shard_size, tokenizer_src=args.gguf,
                     overwrite=args.overwrite, progress=True)
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size}


def hf_to_bnb4(args) -> dict:
    model, config, kind = _load(args.src, args.dtype)
    export_merged_hf(model, args.out, dtype=args.dtype, shard_size=args.shard_size, quantize=args.quant_type,
                     block_size=args.block_size, double_quant=not args.no_double_quant,
                     tokenizer_src=_tokenizer_src(args.src), overwrite=args.overwrite, progress=True)
    return {"source": kind, "quant_type": args.quant_type, "block_size": args.block_size,
            "double_quant": not args.no_double_quant}


def merge(args) -> dict:
    model, config, kind = _load(args.base, args.dtype)
    policy = QuantPolicy(format=args.quantize_base) if args.quantize_base else None
    cfg = load_peft_adapter(model, args.adapter, quantize=policy)
    export_merged_hf(model, args.out, dtype=args.dtype, shard_size=args.shard_size, quantize=args.quantize,
                     tokenizer_src=_tokenizer_src(args.base), overwrite=args.overwrite, progress=True)
    return {"base": kind, "r": cfg.r, "lora_alpha": cfg.lora_alpha, "quantize_base": args.quantize_base,
            "quantize": args.quantize}


def peft_export(args) -> dict:
    from qlora_jax.nnx import inject
    from qlora_jax.train.checkpoint import apply_adapter, load_adapter

    arrays, cfg_dict = load_adapter(args.ours)[:2]
    names = sorted({k.rsplit(".", 1)[-1] for k in arrays if ".lora_a." in k})
    if len(names) != 1:
        raise SystemExit(f"{args.ours}: expected the weights of one adapter, found adapter names {names}")
    config = LoraConfig.from_dict(cfg_dict)
    model, _, _ = _load(args.base, "float32")
    inject(model, config, quantize=None, adapter_name=names[0], rngs=nnx.Rngs(0), compute_dtype=None)
    apply_adapter(model, arrays)
    save_peft_adapter(model, args.out, adapter_name=names[0], config=config,
                      base_model_name_or_path=args.base_name or args.base, overwrite=args.overwrite)
    return {"adapter": names[0], "r": config.r, "tensors": len(arrays)}


def peft_import(args) -> dict:
    from qlora_jax.train.checkpoint import save_adapter

    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"{args.out} already exists (pass --overwrite)")
    model, _, _ = _load(args.base, "float32")
    config = load_peft_adapter(model, args.peft)
    save_adapter(args.out, model, config)
    return {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p, dtype_default="bfloat16"):
        p.add_argument("out", help="output folder (written to a temporary name, renamed at the end)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        p.add_argument("--json", help="also write the summary to this JSON file")
        if dtype_default:
            p.add_argument("--dtype", default=dtype_default, choices=EXPORT_DTYPES)
            p.add_argument("--shard-size", default="2GB", help="most bytes a safetensors file holds")

    p = sub.add_parser("gguf-to-hf", help="GGUF -> HF folder")
    p.add_argument("gguf")
    common(p)
    p.set_defaults(fn=gguf_to_hf)

    p = sub.add_parser("hf-to-bnb4", help="float HF folder or GGUF -> bitsandbytes 4-bit HF folder")
    p.add_argument("src")
    common(p)
    p.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")
    p.set_defaults(fn=hf_to_bnb4)

    p = sub.add_parser("merge", help="base + PEFT adapter -> merged HF folder")
    p.add_argument("base")
    p.add_argument("adapter")
    common(p)
    p.add_argument("--quantize", choices=("nf4", "fp4"), help="write the merged model in bitsandbytes 4-bit")
    p.add_argument("--quantize-base", choices=("nf4", "fp4"),
                   help="quantize a float base first and merge into its dequantized weights (QLoRA adapters)")
    p.set_defaults(fn=merge)

    p = sub.add_parser("peft-export", help="qlora_jax adapter -> PEFT adapter")
    p.add_argument("ours")
    common(p, dtype_default=None)
    p.add_argument("--base", required=True)
    p.add_argument("--base-name", help="base_model_name_or_path to record (default: --base)")
    p.set_defaults(fn=peft_export)

    p = sub.add_parser("peft-import", help="PEFT adapter -> qlora_jax adapter")
    p.add_argument("peft")
    common(p, dtype_default=None)
    p.add_argument("--base", required=True)
    p.set_defaults(fn=peft_import)

    args = parser.parse_args(argv)
    t0 = time.time()
    summary = {"command": args.cmd, **args.fn(args)}
    summary.update(out=os.path.abspath(args.out), out_bytes=_folder_bytes(args.out),
                   files=sorted(os.listdir(args.out)), seconds=round(time.time() - t0, 1))
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
