"""4-bit data types on a real model: held-out perplexity and weight error (QLoRA paper, Table 2).

Every linear weight of SmolLM2-135M-Instruct (the 210 q/k/v/o/gate/up/down projections; the
tied embedding/output head and the norms stay float) is replaced by its Int4, FP4 (E2M1),
FP4 (E3M0), NF4 or NF4 + double-quantization version (block 64, `qlora_jax.quantize` through the
4-bit layers `qlora_jax.nnx.inject` makes), and by bf16 and the float32 checkpoint itself as
baselines. For each it reports the perplexity on held-out ``lee_background`` news articles
(the last 50 of the corpus are the held-out split; ``--docs`` takes the first N of them) and the
relative weight error ``sqrt(sum ||W_hat - W||^2 / sum ||W||^2)`` pooled over those weights.
The order of the 4-bit types is whatever the measurement gives; the script prints it next to
the paper's (Int4 > FP4 E2M1 > FP4 E3M0 > NF4+DQ, mean perplexity over OPT/BLOOM/LLaMA/Pythia).

Caveat: the embedded checkpoint was shipped as GGUF Q4_1, so the "float" weights are themselves
decoded 4-bit values (16-level affine grid per 32 weights); every format re-quantizes those.

    python experiments/datatypes.py --out docs/results/datatypes              # CPU: a few minutes
    python experiments/datatypes.py --docs 0 --seq-len 1024 --compute-dtype bfloat16   # GPU, all 50 docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# name -> (4-bit format or None for a float base, double quantization, float storage dtype)
VARIANTS: dict[str, tuple[str | None, bool, str | None]] = {
    "float32": (None, False, None),
    "bf16": (None, False, "bfloat16"),
    "int4": ("int4", False, None),
    "fp4_e2m1": ("fp4", False, None),
    "fp4_e3m0": ("fp4_e3m0", False, None),
    "nf4": ("nf4", False, None),
    "nf4+dq": ("nf4", True, None),
}
FLOAT_BITS = {None: 32.0, "bfloat16": 16.0}
# QLoRA paper, Table 2: mean perplexity on Pile Common Crawl over OPT, BLOOM, LLaMA and Pythia
# models of 125M-13B (reference/torch_anchors.md).
PAPER_PPL = {"int4": 34.34, "fp4_e2m1": 31.07, "fp4_e3m0": 29.48, "nf4+dq": 27.41}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--docs", type=int, default=12, help="held-out lee_background articles to score (0 = all 50)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward pass")
    p.add_argument("--block-size", type=int, default=64, help="4-bit block size of every format")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--compute-dtype", choices=("auto", *COMPUTE_DTYPES), default="auto",
                   help="matmul dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--out", default="runs/datatypes", help="folder for datatypes.json and datatypes.png")
    args = p.parse_args(argv)
    if args.docs < 0 or args.seq_len < 2 or args.batch_size < 1:
        p.error("--docs must be >= 0, --seq-len >= 2 and --batch-size >= 1")
    return args


# --------------------------------------------------------------------------------------------
# Measurement (works on any qlora_jax Llama; the tests use tiny random ones)


def linear_kernels(model: Any) -> dict[str, np.ndarray]:
    """``{module path: float32 kernel [in, out]}`` of every plain ``nnx.Linear`` of ``model``."""
    from flax import nnx

    return {".".join(str(k) for k in path): np.asarray(node.kernel.get_value(), np.float32)
            for path, node in nnx.iter_graph(model) if type(node) is nnx.Linear}


def variant_model(graphdef: Any, state: Any, variant: str, *, block_size: int = 64,
                  compute_dtype: Any = jnp.float32) -> Any:
    """A copy of the float model (``nnx.split`` parts) whose linear layers hold ``variant``'s weights.

    Every linear layer becomes a `qlora_jax.nnx.LoraLinear` (the layer QLoRA trains on): a
    4-bit base for the 4-bit variants (``QuantPolicy(format, block_size, double_quant)``, every
    linear weight whatever its size), a dense base otherwise (cast to bf16 for ``"bf16"``). Its
    placeholder rank-1 adapter is switched off, so the layers compute ``x·deq(W)ᵀ`` only. The
    arrays of ``state`` are shared, not copied, and left unchanged.
    """
    from flax import nnx

    from qlora_jax import QuantPolicy
    from qlora_jax import nnx as qnnx
    from qlora_jax.lora import LoraConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    fmt, dq, store = VARIANTS[variant]
    model = nnx.merge(graphdef, state)
    policy = None if fmt is None else QuantPolicy(format=fmt, block_size=block_size, double_quant=dq, min_size=1)
    qnnx.inject(model, LoraConfig(r=1, target_modules="all-linear"), quantize=policy,
                compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    qnnx.set_adapter(model, None)
    if store is not None:
        for layer in qnnx.lora_layers(model).values():
            layer.base.set_value(layer.base.get_value().astype(store))
    return model


def weight_stats(model: Any, reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Pooled relative error of ``model``'s adapted linear weights against ``reference`` kernels.

    Returns ``{"rel_error": sqrt(Σ‖Ŵ − W‖² / Σ‖W‖²) (float64 sums), "bits_per_weight": storage
    bits (codes + scales for 4-bit bases), "weights": count}`` over the layers of
    `qlora_jax.nnx.lora_layers` (the output head is not one: ``"all-linear"`` leaves it out).
    """
    from qlora_jax import nnx as qnnx
    from qlora_jax.quantize import QuantizedArray

    se = ss = bits = 0.0
    count = 0
    layers = qnnx.lora_layers(model)
    missing = sorted(set(layers) - set(reference))
    if missing:
        raise ValueError(f"weight_stats: no reference kernel for the layers {missing[:5]}")
    for path, layer in layers.items():
        w = np.asarray(reference[path], np.float64).T                      # [N, K], as the layer stores it
        w_hat = np.asarray(layer.dense_weight(jnp.float32), np.float64)
        se += float(np.sum((w_hat - w) ** 2))
        ss += float(np.sum(w * w))
        base = layer.base.get_value()
        bits += 8.0 * base.nbytes if isinstance(base, QuantizedArray) else 8.0 * base.size * base.dtype.itemsize
        count += w.size
    return {"rel_error": math.sqrt(se / ss), "bits_per_weight": bits / count, "weights": count}


def measure(model: Any, rows: Mapping[str, np.ndarray], variants: Sequence[str], *, block_size: int = 64,
            batch_size: int = 4, pad_id: int = 0, compute_dtype: Any = jnp.float32,
            progress: bool = False) -> list[dict[str, Any]]:
    """Perplexity and weight error of ``model`` (float, no adapters) in each of ``variants``.

    Args:
      model: a float ``LlamaForCausalLM``; not modified.
      rows: held-out rows (`qlora_jax.data.build_sequences` features, ``[N, T]`` int32).
      variants: names from `VARIANTS`.
      block_size: 4-bit block size.
      batch_size, pad_id: evaluation batches (`qlora_jax.data.eval_batches`).
      compute_dtype: matmul dtype of the linear layers.
    Returns:
      One dict a variant: ``variant, format, double_quant, block_size, loss, perplexity, tokens,
      rel_error, bits_per_weight, weights, seconds``.
    """
    from flax import nnx

    from qlora_jax import data as qdata
    from qlora_jax import train as qtrain

    reference = linear_kernels(model)
    if not reference:
        raise ValueError("measure: the model has no nnx.Linear layers (already quantized or adapted?)")
    graphdef, state = nnx.split(model)
    out = []
    for v in variants:
        t = time.perf_counter()
        m = variant_model(graphdef, state, v, block_size=block_size, compute_dtype=compute_dtype)
        ws = weight_stats(m, reference)
        ev = qtrain.evaluate_model(m, qdata.eval_batches(rows, batch_size, pad_id), forward=qtrain.scan_forward)
        fmt, dq, store = VARIANTS[v]
        out.append(dict(variant=v, format=fmt or (store or "float32"), double_quant=dq,
                        block_size=block_size if fmt else None, loss=ev["loss"], perplexity=ev["perplexity"],
                        tokens=ev["tokens"], **ws, seconds=time.perf_counter() - t))
        if progress:
            r = out[-1]
            print(f"  {v:<9} ppl {r['perplexity']:8.3f}  weight error {r['rel_error']:.4f}  "
                  f"({r['seconds']:.1f}s)", flush=True)
        del m
    return out


def ordering(rows: Sequence[Mapping[str, Any]], names: Sequence[str] = ("int4", "fp4_e2m1", "fp4_e3m0", "nf4", "nf4+dq")
             ) -> list[str]:
    """The 4-bit variants present in ``rows``, worst (highest perplexity) first."""
    got = [r for r in rows if r["variant"] in names]
    return [r["variant"] for r in sorted(got, key=lambda r: -r["perplexity"])]


# --------------------------------------------------------------------------------------------
# Reporting


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: variant, bits a weight, weight error, loss, perplexity, change vs bf16."""
    base = next((r["perplexity"] for r in rows if r["variant"] == "bf16"), None)
    lines = ["| variant | bits / weight | weight rel. error | held-out loss | perplexity | vs bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else ""
        lines.append(f"| {r['variant']} | {r['bits_per_weight']:.3f} | {r['rel_error']:.4f} | {r['loss']:.4f} | "
                     f"{r['perplexity']:.3f} | {rel} |")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], title: str, path: Path) -> None:
    """Two bar charts (perplexity, weight error) of the variants, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    colors = ["#7f7f7f" if VARIANTS[n][0] is None else "#1f77b4" if n.startswith("nf4") else "#ff7f0e"
              for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ppl = [r["perplexity"] for r in rows]
    bars = a1.bar(names, ppl, color=colors)
    a1.bar_label(bars, fmt="%.2f", fontsize=8)
    lo, hi = min(ppl), max(ppl)
    a1.set_ylim(lo - 0.6 * (hi - lo) - 1e-3, hi + 0.25 * (hi - lo) + 1e-3)
    base = next((r["perplexity"] for r in rows if r["variant"] == "bf16"), None)
    if base is not None:
        a1.axhline(base, color="k", lw=0.8, ls="--", label="bf16")
        a1.legend(loc="upper right", fontsize=8)
    a1.set_ylabel("held-out perplexity (lower is better)")
    a1.set_title("perplexity, lee_background held out")
    bars = a2.bar(names, [r["rel_error"] for r in rows], color=colors)
    a2.bar_label(bars, fmt="%.3f", fontsize=8)
    a2.set_ylabel("relative weight error")
    a2.set_title("‖Ŵ − W‖ / ‖W‖ over all linear weights")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and data, measure every variant, print the table, write JSON and PNG."""
    from qlora_jax import assets
    from qlora_jax import data as qdata
    from qlora_jax.io import load_llama, load_tokenizer

    t0 = time.perf_counter()
    model_path = str(assets.default_model_path()) if args.model is None else args.model
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"--model {model_path}: no such file or folder")
    _, held = qdata.load_dataset("lee")
    docs = held if args.docs == 0 else held[: args.docs]
    tok = load_tokenizer(model_path)
    model, config = load_llama(model_path)
    rows, stats = qdata.build_sequences(docs, tok, args.seq_len, max_positions=config.max_position_embeddings)
    cd = args.compute_dtype
    cd = (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16) if cd == "auto" else COMPUTE_DTYPES[cd]
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    print(f"model {model_path}\nheld-out lee_background: {len(docs)} articles, {stats.rows} rows x {args.seq_len}, "
          f"{stats.target_tokens} scored tokens; compute {jnp.dtype(cd).name} on {jax.devices()[0].device_kind}",
          flush=True)
    rows_out = measure(model, rows, args.variants, block_size=args.block_size, batch_size=args.batch_size,
                       pad_id=pad, compute_dtype=cd, progress=True)
    order = ordering(rows_out)
    paper = [v for v in sorted(PAPER_PPL, key=lambda v: -PAPER_PPL[v]) if v in order]
    mine = [v for v in order if v in PAPER_PPL]
    md = table(rows_out)
    print("\n" + md)
    print(f"\nmeasured order (worst to best perplexity): {' > '.join(order)}")
    print(f"paper order (Table 2):                      {' > '.join(paper)}   "
          f"({'same' if mine == paper else 'different'} order for the types both have)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "datatypes", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "platform": platform.platform(),
        "command": "python experiments/datatypes.py " + " ".join(sys.argv[1:]),
        "model": model_path, "data": {"corpus": "lee_background", "split": "heldout", "docs": len(docs),
                                      **stats.as_dict()},
        "compute_dtype": jnp.dtype(cd).name, "block_size": args.block_size,
        "order_worst_to_best": order, "paper_order_worst_to_best": paper, "same_order_as_paper": mine == paper,
        "paper_mean_ppl": PAPER_PPL, "wall_s": round(time.perf_counter() - t0, 1), "rows": rows_out,
    }
    (out / "datatypes.json").write_text(json.dumps(result, indent=2))
    plot(rows_out, f"SmolLM2-135M, every linear weight in each format (block {args.block_size}); "
                   f"{stats.target_tokens} held-out tokens", out / "datatypes.png")
    print(f"wrote {out / 'datatypes.json'} and {out / 'datatypes.png'} ({result['wall_s']} s)")
    return result


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
