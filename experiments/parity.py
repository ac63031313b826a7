"""QLoRA vs 16-bit LoRA: the same fine-tune on a bf16 base and on an NF4+DQ base, over several seeds.

Both variants fine-tune SmolLM2-135M-Instruct with the same data, seeds and hyper-parameters
through `experiments/finetune.py` (one run a variant and seed); the only difference is the frozen
base: (a) ``lora_bf16``: the float weights stored in bf16, no quantization; (b) ``qlora_nf4dq``:
the same bf16 weights quantized to NF4 with double quantization, block 64 (the QLoRA recipe).
The held-out loss is measured every ``--eval-every`` steps. The script reports both curves on one
plot and the final gap ``loss(QLoRA) - loss(LoRA)`` per seed with its mean and standard deviation
over seeds (the paper's claim: QLoRA matches 16-bit LoRA). Run folders (adapters, checkpoints)
go under ``--work``; the JSON and the PNG under ``--out``.

    python experiments/parity.py --out docs/results/parity                 # CPU defaults (~20 min)
    python experiments/parity.py --seq-len 512 --batch-size 16 --steps 300 --eval-every 25 \\
        --max-eval-rows 0 --seeds 0 1 2 3 4                                 # a GPU run

Anything else `finetune.py` accepts can be passed after ``--``, e.g. ``-- --schedule constant``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the sibling script finetune.py is imported as a module
    sys.path.insert(0, str(_HERE))

import finetune  # noqa: E402

# variant -> finetune.py arguments that make it; both load the checkpoint in bf16 first.
VARIANTS: dict[str, list[str]] = {
    "lora_bf16": ["--format", "none", "--load-dtype", "bfloat16"],
    "qlora_nf4dq": ["--format", "nf4", "--block-size", "64", "--load-dtype", "bfloat16"],
}
LABELS = {"lora_bf16": "LoRA, bf16 base", "qlora_nf4dq": "QLoRA, NF4+DQ base"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="chatterbot", help="finetune.py --data (chatterbot, lee or a JSONL file)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run a variant and seed")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=6, help="held-out evaluation every N steps")
    p.add_argument("--max-eval-rows", type=int, default=32, help="held-out rows scored (0 = all)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--work", default="runs/parity", help="folder for the individual runs")
    p.add_argument("--out", default="runs/parity", help="folder for parity.json and parity.png")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    if args.eval_every < 1 or args.steps < 1:
        p.error("--steps and --eval-every must be >= 1")
    args.extra = extra
    return args


def finetune_argv(args: argparse.Namespace, variant: str, seed: int, out: Path) -> list[str]:
    """The `finetune.py` command line of one run (shared settings + the variant's base)."""
    argv = ["--data", args.data, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--r", str(args.r), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
            "--eval-every", str(args.eval_every), "--max-eval-rows", str(args.max_eval_rows),
            "--gen-prompts", "0", "--seed", str(seed), "--out", str(out), "--no-progress",
            *VARIANTS[variant], *args.extra]
    if args.model is not None:
        argv += ["--model", args.model]
    return argv


def read_metrics(path: Path) -> dict[str, list[float]]:
    """``{"eval_step", "eval_loss", "train_step", "train_loss"}`` lists from a finetune ``metrics.jsonl``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ev = [r for r in rows if r.get("event") == "eval"]
    tr = [r for r in rows if r.get("event") == "train"]
    return {"eval_step": [r["step"] for r in ev], "eval_loss": [r["loss"] for r in ev],
            "train_step": [r["step"] for r in tr], "train_loss": [r["loss"] for r in tr]}


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    """Fine-tune one variant with one seed (a fresh run folder) and return its curves and summary."""
    out = Path(args.work) / f"{variant}_seed{seed}"
    if out.exists():
        shutil.rmtree(out)  # a previous run of this script: start fresh, never resume
    summary = finetune.run(finetune.parse_args(finetune_argv(args, variant, seed, out)))
    curves = read_metrics(out / "metrics.jsonl")
    return {"variant": variant, "seed": seed, **curves,
            "final_loss": curves["eval_loss"][-1], "initial_loss": curves["eval_loss"][0],
            "wall_s": summary["wall_s"], "tok_s": summary["tok_s"], "trainable_params": summary["trainable_params"]}


def _mean_std(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-variant final loss (mean, std over seeds) and, for seeds with both variants, the gap
    ``final(qlora_nf4dq) - final(lora_bf16)`` per seed with its mean and standard deviation."""
    out: dict[str, Any] = {"variants": {}}
    for v in dict.fromkeys(r["variant"] for r in runs):
        finals = [r["final_loss"] for r in runs if r["variant"] == v]
        initials = [r["initial_loss"] for r in runs if r["variant"] == v]
        m, s = _mean_std(finals)
        out["variants"][v] = {"final_mean": m, "final_std": s, "initial_mean": _mean_std(initials)[0],
                              "seeds": [r["seed"] for r in runs if r["variant"] == v]}
    by = {(r["variant"], r["seed"]): r for r in runs}
    seeds = sorted({s for (v, s) in by if (("lora_bf16", s) in by and ("qlora_nf4dq", s) in by)})
    if seeds:
        gaps = [by["qlora_nf4dq", s]["final_loss"] - by["lora_bf16", s]["final_loss"] for s in seeds]
        gaps0 = [by["qlora_nf4dq", s]["initial_loss"] - by["lora_bf16", s]["initial_loss"] for s in seeds]
        m, s = _mean_std(gaps)
        lora_final = float(np.mean([by["lora_bf16", sd]["final_loss"] for sd in seeds]))
        out["gap"] = {"seeds": seeds, "per_seed": gaps, "mean": m, "std": s, "relative_mean": m / lora_final,
                      "initial_per_seed": gaps0, "initial_mean": _mean_std(gaps0)[0]}
    return out


def _std(x: float) -> str:
    return "n/a (one seed)" if math.isnan(x) else f"{x:.4f}"


def table(runs: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Markdown table: held-out loss before/after per variant and seed, then the gap."""
    lines = ["| variant | seed | held-out loss, step 0 | held-out loss, final | train tok/s |",
             "|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['initial_loss']:.4f} | {r['final_loss']:.4f} | "
                     f"{r['tok_s']:.0f} |")
    for v, s in summary["variants"].items():
        lines.append(f"| **{v}** | mean ± std | {s['initial_mean']:.4f} | **{s['final_mean']:.4f} ± "
                     f"{_std(s['final_std'])}** | |")
    g = summary.get("gap")
    if g:
        per = ", ".join(f"{x:+.4f}" for x in g["per_seed"])
        lines += ["", f"Final gap QLoRA − LoRA (held-out loss, nats/token): **{g['mean']:+.4f} ± {_std(g['std'])}** "
                  f"(mean ± std over seeds {g['seeds']}; per seed {per}; {100 * g['relative_mean']:+.2f}% of the "
                  f"LoRA loss). At step 0 (adapters are zero, the bases differ): {g['initial_mean']:+.4f}."]
    return "\n".join(lines)


def plot(runs: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], title: str, path: Path) -> None:
    """Held-out loss curves of both variants (mean over seeds, band = min..max, thin lines = seeds)
    and the per-step gap QLoRA − LoRA (mean ± std over seeds), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lora_bf16": "#d62728", "qlora_nf4dq": "#1f77b4"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        steps = rs[0]["eval_step"]
        y = np.array([r["eval_loss"] for r in rs])
        for row in y:
            a1.plot(steps, row, color=colors.get(v), lw=0.6, alpha=0.35)
        a1.plot(steps, y.mean(0), "o-", color=colors.get(v), ms=3, lw=1.8, label=f"{LABELS.get(v, v)} ({len(rs)} seeds)")
        a1.fill_between(steps, y.min(0), y.max(0), color=colors.get(v), alpha=0.15)
    a1.set_xlabel("optimizer step")
    a1.set_ylabel("held-out loss (nats / target token)")
    a1.set_title("held-out loss")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    g = summary.get("gap")
    if g:
        by = {(r["variant"], r["seed"]): r for r in runs}
        steps = by["lora_bf16", g["seeds"][0]]["eval_step"]
        d = np.array([np.subtract(by["qlora_nf4dq", s]["eval_loss"], by["lora_bf16", s]["eval_loss"])
                      for s in g["seeds"]])
        sd = d.std(0, ddof=1) if len(d) > 1 else np.zeros(d.shape[1])
        a2.plot(steps, d.mean(0), "o-", color="k", ms=3, label="mean over seeds")
        a2.fill_between(steps, d.mean(0) - sd, d.mean(0) + sd, color="k", alpha=0.15, label="± 1 std")
        a2.axhline(0, color="gray", lw=0.8, ls="--")
        a2.legend(fontsize=8)
    a2.set_xlabel("optimizer step")
    a2.set_ylabel("loss(QLoRA) − loss(LoRA bf16)")
    a2.set_title("gap")
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All runs, then the table, JSON and plot."""
    import jax

    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for v in args.variants:
            print(f"\n=== {v}, seed {seed} ===", flush=True)
            runs.append(run_one(args, v, seed))
    summary = summarize(runs)
    md = table(runs, summary)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("model", "data", "seeds", "steps", "seq_len", "batch_size", "lr",
                                           "warmup", "r", "alpha", "dropout", "eval_every", "max_eval_rows",
                                           "extra")}
    config["finetune_argv"] = {v: finetune_argv(args, v, args.seeds[0], Path(args.work) / f"{v}_seed{args.seeds[0]}")
                               for v in args.variants}
    result = {"benchmark": "parity", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "platform": platform.platform(),
              "command": "python experiments/parity.py " + " ".join(sys.argv[1:]),
              "config": config, "summary": summary, "wall_s": round(time.perf_counter() - t0, 1), "runs": runs}
    (out / "parity.json").write_text(json.dumps(result, indent=2))
    plot(runs, summary, f"SmolLM2-135M on {args.data}: same data, seeds, hyper-parameters "
                        f"(r={args.r}, {args.steps} steps, {args.seq_len} tokens x {args.batch_size})",
         out / "parity.png")
    print(f"wrote {out / 'parity.json'} and {out / 'parity.png'} ({result['wall_s']} s)")
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
