"""Quantization error of NF4, NF4+DQ, FP4 and Int4 at block sizes 32..256.

Relative error ||deq(q(w)) - w|| / ||w|| on N(0, 1) matrices and on every linear weight of the
embedded SmolLM2-135M-Instruct model (converted from its GGUF at run time into the cache).
Prints a table, writes JSON and a PNG plot.

    python experiments/quant_error.py                      # defaults
    python experiments/quant_error.py --out runs/quant_error --gaussian-shape 4096 4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import qlora_jax as qj

# Figures bitsandbytes gives for N(0, 1) at block 64 (reference/torch_anchors.md); our numbers
# must agree to the third significant digit.
BNB_GAUSSIAN_BLOCK64 = {"nf4": 0.0920, "nf4+dq": 0.0920, "fp4": 0.1220}

VARIANTS = {  # name -> (format, double_quant)
    "nf4": ("nf4", False),
    "nf4+dq": ("nf4", True),
    "fp4": ("fp4", False),
    "int4": ("int4", False),
}


def relative_error(w: jax.Array, fmt: str, block_size: int, dq: bool) -> tuple[float, float]:
    """Returns (sum of squared error, sum of squares) of one weight, in float64 on the host."""
    q = qj.quantize(w, fmt, block_size, dq)
    d = qj.dequantize(q, jnp.float32)
    err = np.asarray(d, np.float64) - np.asarray(w, np.float64)
    return float(np.sum(err * err)), float(np.sum(np.asarray(w, np.float64) ** 2))


def linear_weights(path: str):
    """Yields (name, float32 [out, in]) for every linear projection of an HF folder or GGUF file."""
    from qlora_jax.io.hf import read_checkpoint

    _, tensors = read_checkpoint(path)
    for name, w in tensors:
        if re.search(r"\.(q|k|v|o|gate|up|down)_proj\.weight$", name):
            yield name, np.asarray(w, np.float32)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quant_error", help="results folder (JSON + PNG)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--gaussian-shape", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M)")
    p.add_argument("--no-model", action="store_true", help="only the N(0,1) matrices")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    rows = []
    w = jax.random.normal(jax.random.key(args.seed), tuple(args.gaussian_shape), jnp.float32)
    for bs in tqdm(args.block_sizes, desc="N(0,1)"):
        for name, (fmt, dq) in VARIANTS.items():
            se, ss = relative_error(w, fmt, bs, dq)
            rows.append(dict(source="gaussian", variant=name, block_size=bs, rel_error=float(np.sqrt(se / ss))))

    if not args.no_model:
        model_dir = args.model
        if model_dir is None:
            from qlora_jax import assets
            model_dir = str(assets.default_model_path())
        acc: dict[tuple[str, int], list[float]] = {}
        weights = list(linear_weights(model_dir))
        if not weights:
            raise SystemExit(f"no linear projection weights (*_proj.weight) found in {model_dir}")
        for name, wt in tqdm(weights, desc="SmolLM2 linear weights"):
            wj = jnp.asarray(wt)
            for bs in args.block_sizes:
                for v, (fmt, dq) in VARIANTS.items():
                    se, ss = relative_error(wj, fmt, bs, dq)
                    a = acc.setdefault((v, bs), [0.0, 0.0])
                    a[0] += se
                    a[1] += ss
        for (v, bs), (se, ss) in acc.items():
            rows.append(dict(source="smollm2-135m", variant=v, block_size=bs, rel_error=float(np.sqrt(se / ss)),
                             n_weights=len(weights)))

    # Table: one line per (source, variant), one column per block size.
    print(f"\nrelative error ||deq(q(w)) - w|| / ||w||   (SmolLM2: pooled over all linear weights)")
    header = f"{'source':<14}{'variant':<9}" + "".join(f"{'bs=' + str(b):>10}" for b in args.block_sizes)
    print(header)
    print("-" * len(header))
    for src in dict.fromkeys(r["source"] for r in rows):
        for v in VARIANTS:
            vals = {r["block_size"]: r["rel_error"] for r in rows if r["source"] == src and r["variant"] == v}
            print(f"{src:<14}{v:<9}" + "".join(f"{vals[b]:>10.4f}" for b in args.block_sizes))

    checks = []
    if 64 in args.block_sizes:
        print("\nN(0,1), block 64, vs bitsandbytes:")
        for v, ref in BNB_GAUSSIAN_BLOCK64.items():
            ours = next(r["rel_error"] for r in rows if r["source"] == "gaussian" and r["variant"] == v
                        and r["block_size"] == 64)
            ok = f"{ours:.3g}" == f"{ref:.3g}"
            checks.append(dict(variant=v, ours=ours, bitsandbytes=ref, match_3_significant=ok))
            print(f"  {v:<8} ours {ours:.4f}  bitsandbytes {ref:.4f}  {'match' if ok else 'MISMATCH'}")

    result = dict(benchmark="quant_error", device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                  date=datetime.date.today().isoformat(), host=platform.node(),
                  command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  wall_s=round(time.time() - t0, 2), rows=rows, bnb_checks=checks)
    path = os.path.join(args.out, "quant_error.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    _plot(rows, args.block_sizes, os.path.join(args.out, "quant_error.png"))
    print(f"\nwrote {path} and quant_error.png ({result['wall_s']} s)")
    return result


def _plot(rows: list[dict], block_sizes: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in rows))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4), squeeze=False)
    for ax, src in zip(axes[0], sources):
        for v in VARIANTS:
            ys = [next(r["rel_error"] for r in rows if r["source"] == src and r["variant"] == v
                       and r["block_size"] == b) for b in block_sizes]
            ax.plot(block_sizes, ys, marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_xticks(block_sizes, [str(b) for b in block_sizes])
        ax.set_xlabel("block size")
        ax.set_ylabel("relative error")
        ax.set_title(src)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("4-bit quantization error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
