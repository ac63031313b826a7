"""PyTorch anchor for experiments/bench_train.py: transformers + PEFT + bitsandbytes QLoRA.

The recipe users run (the QLoRA paper's, through Hugging Face): a ``LlamaForCausalLM`` of the
shape, randomly initialized (HF init) and saved in bf16, loaded back with
``BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute)``,
``prepare_model_for_kbit_training`` (gradient checkpointing on), PEFT LoRA r=16 alpha=16 on
``"all-linear"``, ``bitsandbytes.optim.PagedAdamW32bit`` (lr 2e-4) with gradient clipping at 0.3;
one fixed random batch, the loss on every token. Per shape it reports tokens/s from CUDA events
around ``--steps`` back-to-back steps after ``--warmup`` steps, and
``torch.cuda.max_memory_allocated`` over training (peak stats reset once the model is loaded; the
loading peak is reported apart). Writes
``benchmarks/results/torch_anchor_train_<device>_<date>.json``, which bench_train.py puts beside
its own rows.

Runs with a Python that has torch, transformers, peft and bitsandbytes (never imports JAX or
qlora_jax). On a CUDA machine without bitsandbytes installed, point ``--bnb-path`` at a folder
holding the ``bitsandbytes`` package. On CPU it runs as a smoke test (the ``tiny`` shape; torch's
AdamW, since paged optimizers need CUDA; perf_counter timing), to check the recipe, not to time it.

    python3 benchmarks/torch_anchor_train.py --shapes smollm2-135m-random,tinyllama-1.1b,llama2-7b \\
        --bnb-path .whl/bnb
    .venv-interop/bin/python benchmarks/torch_anchor_train.py --shapes tiny --steps 2 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# HF config fields and batch x sequence of each shape, shared with the other training benchmark script.
SHAPES: dict[str, dict[str, Any]] = {k: v for k, v in json.loads(
    (ROOT / "benchmarks" / "train_shapes.json").read_text()).items() if not k.startswith("_")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m-random,tinyllama-1.1b,llama2-7b",
                   help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bnb-path", default=None, help="folder holding the bitsandbytes package (put first on sys.path)")
    p.add_argument("--model-path", default=None,
                   help="HF folder of the real SmolLM2-135M (default: the qlora_jax cache's conversion)")
    p.add_argument("--workdir", default=None, help="where the bf16 random-init checkpoints are written "
                                                   "(default: /dev/shm if present, else a temp folder)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/torch_anchor_train_<device>_<date>.json)")
    a = p.parse_args(argv)
    a.shape_list = [s.strip() for s in a.shapes.split(",") if s.strip()]
    bad = [s for s in a.shape_list if s not in SHAPES]
    if bad or not a.shape_list:
        p.error(f"unknown shape(s) {bad}; choose from {sorted(SHAPES)}")
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


def _err(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:300] if s else ''}"


def _slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def _default_model_path() -> str:
    cache = Path(os.environ.get("QLORA_JAX_CACHE") or Path.home() / ".cache" / "qlora_jax")
    return str(cache / "SmolLM2-135M-Instruct-f32-v1")


def _scratch_dir(hf: dict[str, Any]) -> str | None:
    """/dev/shm (memory-backed: the 7B checkpoint is written and read back in seconds) when it has room
    for the bf16 checkpoint twice over, else None (the system temp folder)."""
    d, L, v = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    nh, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or d // nh
    n = L * (2 * d * nh * hd + 2 * d * kv * hd + 3 * d * hf["intermediate_size"]) + 2 * v * d
    try:
        if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 4 * n:
            return "/dev/shm"
    except OSError:
        pass
    return None


def random_checkpoint(hf: dict[str, Any], folder: str, seed: int, device: str) -> None:
    """Writes a randomly initialized (HF init) bf16 ``LlamaForCausalLM`` of config ``hf`` to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**hf)
    with torch.device(device):  # init on the GPU: seconds instead of minutes for 7B
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model


def load_qlora(folder: str, args: argparse.Namespace, cuda: bool):
    """The 4-bit model with LoRA adapters, prepared for training, and its optimizer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import bitsandbytes as bnb

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qcfg, dtype=torch.bfloat16,
                                                 device_map={"": 0 if cuda else "cpu"})
    model.config.use_cache = False
    # Non-reentrant checkpointing: what torch recommends (the reentrant default now warns).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if cuda:
        opt = bnb.optim.PagedAdamW32bit(params, lr=args.lr)
    else:  # paged optimizers page through CUDA unified memory: not on CPU
        opt = torch.optim.AdamW(params, lr=args.lr)
    return model, opt


def bench_shape(name: str, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    import torch

    spec = SHAPES[name]
    batch, seq = args.batch or spec["batch"], args.seq or spec["seq"]
    row: dict[str, Any] = {"shape": name, "batch": batch, "seq": seq, "r": args.r, "targets": "all-linear",
                           "real_weights": bool(spec.get("real"))}
    t0 = time.perf_counter()
    tmp = None
    if spec.get("real"):
        folder = args.model_path or _default_model_path()
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no SmolLM2-135M folder (give --model-path, or use "
                                    f"smollm2-135m-random)")
    else:
        tmp = tempfile.mkdtemp(prefix="anchor_", dir=args.workdir or _scratch_dir(spec["hf"]))
        folder = tmp
        random_checkpoint(spec["hf"], folder, args.seed, "cuda" if cuda else "cpu")
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, opt = load_qlora(folder, args, cuda)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    row["build_s"] = time.perf_counter() - t0
    row["attention"] = getattr(model.config, "_attn_implementation", None)
    row["optimizer"] = type(opt).__name__
    row["lora_params"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    # Proof that the base really is 4-bit: the projections are bitsandbytes Linear4bit layers
    # holding packed NF4 (uint8) weights with a double-quantized state.
    import bitsandbytes as bnb

    l4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    row["linear4bit_layers"] = len(l4)
    row["nf4_double_quant"] = bool(l4) and all(
        m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested
        for m in l4)
    if cuda:
        torch.cuda.synchronize()
        row["load_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    dev = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, spec["hf"]["vocab_size"], (batch, seq), generator=g).to(dev)
    model.train()
    losses: list[Any] = []

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["timing"] = "cuda events"
    else:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        dt = time.perf_counter() - t
        row["peak_gib"] = None
        row["timing"] = "perf_counter (CPU smoke test)"
    row["losses"] = [float(x) for x in losses]
    row["loss_first"], row["loss_last"] = row["losses"][0], row["losses"][-1]
    row["step_ms"] = dt / args.steps * 1e3
    row["tok_s"] = batch * seq * args.steps / dt
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.bnb_path:
        sys.path.insert(0, os.path.abspath(args.bnb_path))
    import torch
    import transformers

    import bitsandbytes
    import peft

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}", flush=True)
    today = datetime.date.today().isoformat()
    result = {"benchmark": "torch_anchor_train", "device": device, "date": today,
              "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + argv),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(),
              "recipe": "NF4+DQ block 64, bf16 compute, prepare_model_for_kbit_training, gradient checkpointing "
                        "(non-reentrant), LoRA r/alpha all-linear, PagedAdamW32bit (AdamW on CPU), clip 0.3",
              "rows": []}
    out = args.out or str(ROOT / "benchmarks" / "results" / f"torch_anchor_train_{_slug(device)}_{today}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for s in args.shape_list:
        print(f"-- {s}", flush=True)
        try:
            r = bench_shape(s, args, cuda)
            print(f"  {r['tok_s']:,.0f} tok/s, {r['step_ms']:.1f} ms/step, peak "
                  f"{'n/a' if r['peak_gib'] is None else format(r['peak_gib'], '.2f')} GiB, "
                  f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
            r = {"shape": s, "error": _err(e), "trace": traceback.format_exc()[-2000:]}
            print(f"  {s}: {_err(e)}", flush=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        result["rows"].append(r)
        with open(out, "w") as fh:  # after every shape: finished shapes survive a timeout
            json.dump(result, fh, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any("error" in r for r in res["rows"]) else 0)
