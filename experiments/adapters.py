"""Two LoRA adapters on one 4-bit base: file sizes, hot swapping, generations, batched serving.

1. Trains two adapters on different data with `experiments/finetune.py` (NF4+DQ base, block 64):
   ``qa`` on chatterbot question/answer pairs (completion-only loss, chat template) and ``news``
   on lee_background news articles (plain text). ``--qa-adapter`` / ``--news-adapter`` reuse
   adapter folders instead.
2. Starts a "server": loads the float checkpoint once, and attaches both adapter files
   (`qlora_jax.train.attach_adapter` with ``adapter_name``): the first quantizes the base, the
   second only adds its A/B matrices (the hot-load time of a new adapter in a running process).
3. Reports the adapter files' sizes (ours and the PEFT export) against the base model's.
4. Times switching adapters (`qlora_jax.nnx.set_adapter`) and a forward pass right after a
   switch against one without a switch, once both are compiled (and the first call, which compiles).
5. Generates greedily from held-out prompts of both data sets with no adapter, ``qa`` and ``news``.
6. Serves both adapters in one batch (``set_adapter(model, ["qa", "news"], row_ids=...)``) and
   checks it gives the same tokens (and logits) as running each row with its own adapter.

    python experiments/adapters.py --out docs/results/adapters        # CPU defaults (minutes)
    python experiments/adapters.py --steps 200 --seq-len 512 --batch-size 8 --max-new-tokens 64   # GPU
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the sibling script finetune.py is imported as a module
    sys.path.insert(0, str(_HERE))

import finetune  # noqa: E402

# adapter name -> finetune.py --data it is trained on
DATA = {"qa": "chatterbot", "news": "lee"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--qa-adapter", default=None, help="use this adapter folder (save_adapter layout) instead of training 'qa'")
    p.add_argument("--news-adapter", default=None, help="use this adapter folder instead of training 'news'")
    g = p.add_argument_group("training (finetune.py settings of both adapters)")
    g.add_argument("--steps", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--r", type=int, default=16)
    g.add_argument("--alpha", type=float, default=32)
    g = p.add_argument_group("serving")
    g.add_argument("--prompts", type=int, default=2, help="held-out prompts of each data set")
    g.add_argument("--max-new-tokens", type=int, default=24)
    g.add_argument("--repeats", type=int, default=10, help="timed repetitions (medians are reported)")
    g.add_argument("--compute-dtype", choices=("auto", *finetune.COMPUTE_DTYPES), default="auto")
    p.add_argument("--work", default="runs/adapters", help="folder for the training runs and PEFT exports")
    p.add_argument("--out", default="runs/adapters", help="folder for adapters.json and adapters.png")
    args = p.parse_args(argv)
    if min(args.steps, args.prompts, args.max_new_tokens, args.repeats) < 1:
        p.error("--steps, --prompts, --max-new-tokens and --repeats must be >= 1")
    return args


# --------------------------------------------------------------------------------------------
# Pieces that work on any qlora_jax Llama with adapters (the tests use tiny random ones)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: Any, states: tuple, ids: jax.Array, mask: jax.Array) -> jax.Array:
    from flax import nnx

    return nnx.merge(graphdef, *states)(ids, attention_mask=mask)


def forward(model: Any, ids: Any, mask: Any) -> jax.Array:
    """Logits ``[B, T, V]`` float32 of ``model`` on left-padded ``ids`` / ``mask`` ``[B, T]``, with
    whatever adapters are active (one compiled program per adapter setting, reused after). Each
    call splits the model (``nnx.split``), as a caller holding an NNX model object would."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return _logits(graphdef, (state,), jnp.asarray(ids), jnp.asarray(mask)).block_until_ready()


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def swap_timing(model: Any, names: Sequence[str], ids: Any, mask: Any, repeats: int = 10) -> dict[str, float]:
    """Seconds to switch between adapters ``names`` and to run a forward pass after a switch.

    Two ways to switch: `qlora_jax.nnx.set_adapter` (the active adapter is part of the model's
    structure: one compiled program per adapter, reused once compiled), and per-row adapter ids
    (``set_adapter(model, names, row_ids=...)`` once; then the choice is the value of the
    `qlora_jax.nnx.AdapterRows` array in the split state, so switching is replacing that array:
    no model walk, one compiled program for every choice).

    Returns ``{"first_forward_s": {name: first call after activating it (compiles)},
    "set_adapter_s": median of one `set_adapter` call, "forward_same_s": median forward with the
    adapter left as it is, "switch_forward_s": median `set_adapter` switch + forward, alternating
    adapters, "row_ids_switch_forward_s": median forward with new per-row ids each call,
    alternating all rows between the adapters}``. Leaves ``names[0]`` active.
    """
    from flax import nnx

    from qlora_jax import nnx as qnnx

    first = {}
    for n in names:
        qnnx.set_adapter(model, n)
        t = time.perf_counter()
        forward(model, ids, mask)
        first[n] = time.perf_counter() - t
    cycle = iter(range(10**9))

    def switch() -> None:
        qnnx.set_adapter(model, names[next(cycle) % len(names)])

    set_s = _median_s(switch, repeats)
    qnnx.set_adapter(model, names[0])
    same_s = _median_s(lambda: forward(model, ids, mask), repeats)

    def switch_forward() -> None:
        switch()
        forward(model, ids, mask)

    sw_s = _median_s(switch_forward, repeats)

    batch = np.asarray(ids).shape[0]
    qnnx.set_adapter(model, list(names), row_ids=np.zeros(batch, np.int32))
    graphdef, rows, rest = nnx.split(model, qnnx.AdapterRows, ...)
    choices = [jax.tree.map(lambda x, i=i: jnp.full_like(x, i), rows) for i in range(len(names))]
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    _logits(graphdef, (choices[0], rest), ids, mask).block_until_ready()  # compiles once for all choices

    def rows_forward() -> None:
        _logits(graphdef, (choices[next(cycle) % len(names)], rest), ids, mask).block_until_ready()

    rows_s = _median_s(rows_forward, repeats)
    qnnx.set_adapter(model, names[0])
    return {"first_forward_s": first, "set_adapter_s": set_s, "forward_same_s": same_s, "switch_forward_s": sw_s,
            "row_ids_switch_forward_s": rows_s}


def batched_vs_separate(model: Any, ids: Any, mask: Any, names: Sequence[str], row_ids: Sequence[int],
                        max_new_tokens: int, eos_id: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Serves every row of one batch with its own adapter, and each adapter separately, and compares.

    Row ``i`` uses adapter ``names[row_ids[i]]`` (-1: none). The reference runs the same padded
    batch once per adapter with that adapter active for all rows (`qlora_jax.nnx.set_adapter`)
    and keeps the rows assigned to it, so both see identical inputs.

    Returns ``{"batched_tokens" [B, max_new], "separate_tokens" [B, max_new] (int32 numpy),
    "tokens_equal", "max_abs_logit_diff" (one forward pass over the prompts, real tokens), "batched_s",
    "separate_s" (wall time of the generate + forward calls, compiled beforehand)}``. Leaves the
    adapters off.
    """
    from qlora_jax import nnx as qnnx
    from qlora_jax.models import generate

    row_ids = np.asarray(row_ids, np.int32)
    ids, mask = np.asarray(ids), np.asarray(mask)
    if row_ids.shape != (ids.shape[0],):
        raise ValueError(f"row_ids has {row_ids.shape[0]} entries, the batch {ids.shape[0]} rows")
    gen = functools.partial(generate, attention_mask=mask, eos_id=eos_id)
    settings = [(-1, None)] if (row_ids == -1).any() else []
    settings += [(i, n) for i, n in enumerate(names) if (row_ids == i).any()]

    def separate() -> tuple[np.ndarray, np.ndarray]:
        toks = np.zeros((ids.shape[0], max_new_tokens), np.int32)
        logits = None
        for i, n in settings:
            qnnx.set_adapter(model, n)
            sel = row_ids == i
            toks[sel] = gen(model, ids, max_new_tokens)[sel]
            lg = np.asarray(forward(model, ids, mask))
            logits = lg if logits is None else np.where(sel[:, None, None], lg, logits)
        return toks, logits

    def batched() -> tuple[np.ndarray, np.ndarray]:
        qnnx.set_adapter(model, list(names), row_ids=row_ids)
        return np.asarray(gen(model, ids, max_new_tokens)), np.asarray(forward(model, ids, mask))

    sep_toks, sep_logits = separate()     # first calls compile
    bat_toks, bat_logits = batched()
    t = time.perf_counter()
    separate()
    sep_s = time.perf_counter() - t
    t = time.perf_counter()
    batched()
    bat_s = time.perf_counter() - t
    qnnx.set_adapter(model, None)
    real = mask.astype(bool)
    return {"batched_tokens": bat_toks, "separate_tokens": sep_toks,
            "tokens_equal": bool(np.array_equal(bat_toks, sep_toks)),
            "max_abs_logit_diff": float(np.max(np.abs(bat_logits - sep_logits)[real])),
            "batched_s": bat_s, "separate_s": sep_s}


def file_bytes(folder: str | os.PathLike) -> int:
    """Total bytes of the files in ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------
# The script


def train_adapter(args: argparse.Namespace, name: str) -> tuple[Path, dict[str, Any] | None]:
    """Adapter ``name``'s folder: the one given on the command line, else a fresh finetune.py run."""
    given = args.qa_adapter if name == "qa" else args.news_adapter
    if given is not None:
        if not (Path(given) / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"--{name}-adapter {given}: no adapter_model.safetensors there")
        return Path(given), None
    out = Path(args.work) / name
    if out.exists():
        shutil.rmtree(out)  # a previous run of this script: train afresh
    argv = ["--data", DATA[name], "--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--r", str(args.r), "--alpha", str(args.alpha), "--gen-prompts", "0", "--max-eval-rows", "32",
            "--out", str(out), "--no-progress", "--compute-dtype", args.compute_dtype]
    if args.model is not None:
        argv += ["--model", args.model]
    summary = finetune.run(finetune.parse_args(argv))
    return out / "adapter", summary


def prompts_for(args: argparse.Namespace, model_path: str) -> list[tuple[str, str, str]]:
    """``(data set, shown text, model input)`` for ``--prompts`` held-out records of each data set,
    rendered as finetune.py renders them (chat template for QA, the first words of an article)."""
    out = []
    for name, data in DATA.items():
        prep = finetune.prepare(finetune.parse_args(["--data", data, "--gen-prompts", str(args.prompts),
                                                     "--seq-len", str(args.seq_len), "--model", model_path]))
        out += [(name, shown, text) for shown, text in prep.prompts]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from flax import nnx

    from qlora_jax import assets
    from qlora_jax import data as qdata
    from qlora_jax import nnx as qnnx
    from qlora_jax.io import load_llama, load_tokenizer
    from qlora_jax.io.peft import save_peft_adapter
    from qlora_jax.quantize import footprint
    from qlora_jax.train import attach_adapter

    t0 = time.perf_counter()
    model_path = str(assets.default_model_path()) if args.model is None else args.model
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"--model {model_path}: no such file or folder")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders, train_summaries = {}, {}
    for name in DATA:
        print(f"\n=== adapter {name!r} ({DATA[name]}) ===", flush=True)
        folders[name], train_summaries[name] = train_adapter(args, name)

    # ---- the serving process: one base, two adapters
    print("\n=== serving ===", flush=True)
    cd = finetune.compute_dtype(args.compute_dtype)
    tok = load_tokenizer(model_path)
    t = time.perf_counter()
    model, config = load_llama(model_path, dtype=cd)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    attach_adapter(model, folders["qa"], adapter_name="qa", compute_dtype=cd)   # quantizes the base too
    first_attach_s = time.perf_counter() - t
    t = time.perf_counter()
    attach_adapter(model, folders["news"], adapter_name="news", compute_dtype=cd)
    hot_load_s = time.perf_counter() - t
    model.eval()
    print(f"base loaded in {load_s:.1f}s; quantized + 'qa' attached in {first_attach_s:.1f}s; "
          f"'news' hot-loaded in {hot_load_s:.2f}s", flush=True)

    # ---- sizes
    sizes: dict[str, Any] = {}
    # The frozen linear weights are BaseWeight variables; the rest of the base (embeddings, norms)
    # is Param, of which LoRAParam (the adapters) is a subclass to leave out.
    fp = footprint(nnx.state(model, qnnx.BaseWeight))
    rest = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    base_params = fp.quantized_params + fp.dense_params + sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rest))
    sizes["base_params"] = base_params
    sizes["base_fp32_bytes"] = 4 * base_params
    sizes["base_bf16_bytes"] = 2 * base_params
    # 4-bit linear weights plus the rest (embeddings, norms) in bf16, as a GPU run holds them
    nf4_linear = fp.code_bytes + fp.scale_bytes
    sizes["base_nf4dq_bytes"] = nf4_linear + 2 * (base_params - fp.quantized_params)
    sizes["base_nf4dq_linear_bytes"] = nf4_linear
    for name, folder in folders.items():
        peft_dir = work / f"peft_{name}"
        if peft_dir.exists():
            shutil.rmtree(peft_dir)
        save_peft_adapter(model, peft_dir, adapter_name=name)
        n = sum(int(np.prod(w["lora_a"].shape)) + int(np.prod(w["lora_b"].shape))
                for w in qnnx.adapter_weights(model, name).values())
        sizes[name] = {"params": n, "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                       "peft_folder_bytes": file_bytes(peft_dir)}

    # ---- prompts, swap timing, generations, batched serving
    prompts = prompts_for(args, model_path)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    enc = [tok.encode(text, add_bos=False) if tok.chat_template else tok.encode(text) for _, _, text in prompts]
    ids, mask = qdata.left_pad(enc, pad)
    swap = swap_timing(model, list(DATA), ids, mask, args.repeats)
    print(f"swap: set_adapter {_t(swap['set_adapter_s'])}; forward {_t(swap['forward_same_s'])} without a switch, "
          f"{_t(swap['switch_forward_s'])} right after one, {_t(swap['row_ids_switch_forward_s'])} with new "
          f"per-row ids", flush=True)

    gens: dict[str, list[str]] = {}
    for setting in (None, *DATA):
        qnnx.set_adapter(model, setting)
        gens[setting or "base"] = finetune.generate_texts(model, tok, [(s, x) for _, s, x in prompts],
                                                          args.max_new_tokens)
    row_ids = [list(DATA).index(d) for d, _, _ in prompts]
    bat = batched_vs_separate(model, ids, mask, list(DATA), row_ids, args.max_new_tokens, eos_id=tok.eos_id)

    # ---- report
    ad = ", ".join(f"{n}: {sizes[n]['params']:,} params, {sizes[n]['file_bytes'] / 2**20:.2f} MiB "
                   f"({100 * sizes[n]['file_bytes'] / sizes['base_bf16_bytes']:.1f}% of the bf16 base)" for n in DATA)
    print(f"\nadapters: {ad}")
    md = tables(sizes, swap, load_s, first_attach_s, hot_load_s, gens, prompts, bat)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "adapters", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "platform": platform.platform(),
        "command": "python experiments/adapters.py " + " ".join(sys.argv[1:]),
        "model": model_path, "config": {k: v for k, v in vars(args).items()},
        "training": {n: (None if s is None else {k: s[k] for k in ("heldout_loss_before", "heldout_loss_after",
                                                                   "train_wall_s", "trainable_params", "config")})
                     for n, s in train_summaries.items()},
        "sizes": sizes, "load_s": load_s, "first_attach_s": first_attach_s, "hot_load_s": hot_load_s,
        "swap": swap,
        "generations": [{"data": d, "prompt": s, **{k: v[i] for k, v in gens.items()}}
                        for i, (d, s, _) in enumerate(prompts)],
        "batched": {"row_adapters": [list(DATA)[i] for i in row_ids], "tokens_equal": bat["tokens_equal"],
                    "max_abs_logit_diff": bat["max_abs_logit_diff"], "batched_s": bat["batched_s"],
                    "separate_s": bat["separate_s"],
                    "batched_texts": [tok.decode(_until_eos(r, tok.eos_id), skip_special_tokens=True).strip()
                                      for r in bat["batched_tokens"]]},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "adapters.json").write_text(json.dumps(result, indent=2))
    plot(sizes, swap, load_s, first_attach_s, hot_load_s, out / "adapters.png")
    print(f"wrote {out / 'adapters.json'} and {out / 'adapters.png'} ({result['wall_s']} s)")
    return result


def _until_eos(row: Sequence[int], eos: int | None) -> list[int]:
    row = [int(x) for x in row]
    return row[: row.index(eos)] if eos is not None and eos in row else row


def _t(seconds: float) -> str:
    """A duration with a readable unit."""
    if seconds < 1e-3:
        return f"{1e6 * seconds:.0f} µs"
    return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def tables(sizes: dict, swap: dict, load_s: float, first_attach_s: float, hot_load_s: float,
           gens: dict[str, list[str]], prompts: Sequence[tuple[str, str, str]], bat: dict) -> str:
    """Markdown: sizes, timings, generations and the batched-serving check."""
    base = sizes["base_bf16_bytes"]
    lines = ["| what | size | vs bf16 base |", "|---|---:|---:|",
             f"| base, float32 ({sizes['base_params']:,} params) | {_mib(sizes['base_fp32_bytes'])} | 200% |",
             f"| base, bf16 | {_mib(base)} | 100% |",
             f"| base, NF4+DQ linear weights + bf16 embeddings/norms | {_mib(sizes['base_nf4dq_bytes'])} | "
             f"{100 * sizes['base_nf4dq_bytes'] / base:.1f}% |"]
    for n in DATA:
        s = sizes[n]
        lines.append(f"| adapter `{n}` ({s['params']:,} params), adapter_model.safetensors (fp32) | "
                     f"{_mib(s['file_bytes'])} | {100 * s['file_bytes'] / base:.2f}% |")
        lines.append(f"| adapter `{n}`, PEFT export folder | {_mib(s['peft_folder_bytes'])} | "
                     f"{100 * s['peft_folder_bytes'] / base:.2f}% |")
    lines += ["", "| operation (running process) | time |", "|---|---:|",
              f"| load the float base from disk | {_t(load_s)} |",
              f"| quantize the base to NF4+DQ and attach adapter `qa` | {_t(first_attach_s)} |",
              f"| hot-load adapter `news` from its file (base untouched) | {_t(hot_load_s)} |",
              f"| `set_adapter` (switch) | {_t(swap['set_adapter_s'])} |",
              f"| forward pass, same adapter (compiled) | {_t(swap['forward_same_s'])} |",
              f"| `set_adapter` switch + forward pass (compiled) | {_t(swap['switch_forward_s'])} |",
              f"| switch by per-row adapter ids in the state + forward pass | "
              f"{_t(swap['row_ids_switch_forward_s'])} |"]
    for n, s in swap["first_forward_s"].items():
        lines.append(f"| first forward with `{n}` (traces + compiles once) | {_t(s)} |")
    lines += ["", "| data | prompt | " + " | ".join(gens) + " |", "|---|---|" + "---|" * len(gens)]
    for i, (d, shown, _) in enumerate(prompts):
        cells = [g[i].replace("|", "\\|").replace("\n", " ") for g in gens.values()]
        lines.append(f"| {d} | {shown.replace('|', '/')} | " + " | ".join(cells) + " |")
    lines += ["", f"Batched multi-adapter serving (rows {[d for d, _, _ in prompts]} in one batch): tokens equal to "
                  f"per-adapter runs: **{bat['tokens_equal']}**, max |Δ logit| {bat['max_abs_logit_diff']:.2e}; "
                  f"one batched call {bat['batched_s']:.2f} s vs one call per adapter {bat['separate_s']:.2f} s "
                  f"(generate + forward, compiled)."]
    return "\n".join(lines)


def plot(sizes: dict, swap: dict, load_s: float, first_attach_s: float, hot_load_s: float, path: Path) -> None:
    """Sizes (log scale) and times (log scale) as two bar charts, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 3]})
    labels = ["base\nfp32", "base\nbf16", "base\nNF4+DQ", *(f"adapter\n{n}" for n in DATA)]
    vals = [sizes["base_fp32_bytes"], sizes["base_bf16_bytes"], sizes["base_nf4dq_bytes"],
            *(sizes[n]["file_bytes"] for n in DATA)]
    bars = a1.bar(labels, [v / 2**20 for v in vals], color=["#7f7f7f"] * 3 + ["#2ca02c"] * len(DATA))
    a1.bar_label(bars, fmt="%.1f", fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("MiB (log scale)")
    a1.set_title("model and adapter sizes")
    labels = ["load\nbase", "quantize +\nattach qa", "hot-load\nnews", "set_\nadapter", "forward", "set_adapter\n+ forward",
              "row ids\n+ forward"]
    vals = [load_s, first_attach_s, hot_load_s, swap["set_adapter_s"], swap["forward_same_s"], swap["switch_forward_s"],
            swap["row_ids_switch_forward_s"]]
    bars = a2.bar(labels, vals, color=["#7f7f7f", "#7f7f7f", "#2ca02c", "#2ca02c", "#1f77b4", "#1f77b4", "#1f77b4"])
    a2.bar_label(bars, labels=[_t(v).replace(" ", "") for v in vals], fontsize=7)
    a2.set_yscale("log")
    a2.set_ylabel("seconds (log scale)")
    a2.set_title("time in a running process")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
