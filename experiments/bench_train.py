"""QLoRA training-step benchmark: tokens/s, peak device memory, MFU and compile time per model shape.

For each shape one process builds the QLoRA model directly in 4-bit (random init one linear at a
time, `qlora_jax.models.build.init_quantized_llama`; the real SmolLM2-135M checkpoint streamed and
quantized tensor by tensor, `load_quantized_llama`), NF4 + double quantization at block 64, LoRA
r=16 alpha=16 on every linear layer but ``lm_head`` (PEFT's "all-linear"), per-layer remat ("full")
and bf16 compute on an accelerator (float32 on CPU), and trains on one fixed batch (random ids; Lee
news text for the real SmolLM2 weights) with the library's own step (`qlora_jax.train`: make_optimizer → init_train_state → make_train_step).

Timing is device-side: the step is compiled ahead of time (``lower().compile()``, timed as
``compile_s``), run once to warm up, then ``--steps`` steps are enqueued back to back and the
clock stops at ``block_until_ready`` on the last state. ``peak_gib`` is the device's
``memory_stats()["peak_bytes_in_use"]`` (the whole process, build included; "n/a" where the
backend has none, e.g. CPU); ``plan_gib`` is XLA's buffer plan of the compiled step (arguments +
outputs - aliased + temporaries), available everywhere.

MFU is against the bf16 matmul ceiling measured in the same process (``8192³`` on an
accelerator, a chain of dependent products inside one jitted loop, the slope between two loop
lengths), counting the FLOPs the step needs per token: ``4·N_lin`` (forward, and input gradient
of the frozen base: no weight gradient) ``+ 6·N_lora + 12·L·T·d_attn`` (attention scores and
values, forward and backward, no causal discount), ``N_lin`` = linear weights including
``lm_head``. ``hfu`` adds what remat recomputes (``2·N_lin + 2·N_lora + 4·L·T·d_attn`` with
"full"). The PyTorch anchor's ``tok_s`` gets the same FLOP count.

    python experiments/bench_train.py --shapes tiny --steps 2                  # CPU smoke test
    python experiments/bench_train.py --shapes smollm2-135m --batch 1 --seq 128  # real weights
    python experiments/bench_train.py --compile-only --shapes llama2-70b       # memory plan, no memory
    python experiments/bench_train.py --shapes smollm2-135m-random,tinyllama-1.1b,llama2-7b  # GPU
    python experiments/bench_train.py --shapes llama2-70b --offload-optimizer --remat offload_inputs \\
        --max-seq-search --mem-fraction 0.54                                   # 70B on "80 GB"

Decoder layers are stacked once (`qlora_jax.models.build.stack_layers`) and run as one scan, so the
step holds one copy of the 4-bit base and compiles one layer (``--layout scan`` re-stacks inside
every step, as `qlora_jax.train.scan_forward` does: +1 copy of the base, e.g. +3.3 GiB for 7B;
``--layout loop`` unrolls the layers: minutes of compile). ``--remat offload_inputs`` is "full"
with the per-layer inputs that the scan saves for the backward pass in pinned host memory (for long
sequences: 1.3 MB a token on the device for 70B under "full"). ``offload_dots`` saves every
projection output to host memory instead of recomputing it (XLA's CPU plan counts ~50 GiB of them
for one 1×1024 step of 70B).

Several devices: ``--mesh data=2`` (or ``fsdp=2``, ``data=1,fsdp=2``; the syntax of
``experiments/finetune.py --mesh``, `qlora_jax.sharding.parse_mesh`) runs the step with
`qlora_jax.sharding` (``shard_training`` + ``make_sharded_train_step``: batch rows split over
``data`` × ``fsdp``; with ``fsdp`` the 4-bit bases, adapters and optimizer state are split too and
the bases are all-gathered as 4-bit codes). ``--batch`` is then the GLOBAL batch (rows per step over
all devices; each data/fsdp shard gets ``batch / (data·fsdp)`` rows) and ``tok_s`` the global tokens/s;
the row adds ``devices``, ``mesh``, ``batch_per_device``, ``tok_s_per_device`` and
``peak_gib_per_device`` (``peak_gib`` is then the largest); ``plan_gib`` is one device's plan of the
partitioned program. The model is built straight into its shardings: the target shardings are
computed first from the abstract model (``train_shardings``, as ``--compile-only`` does), then
`init_quantized_llama` (``shardings=``) places each leaf as it is made and stacks the decoder
layers through host memory straight into their FSDP shardings, so no device holds more than its
shards plus one float kernel during the build (before, device 0 held the whole 4-bit model: 61.9
GiB peak for 70B on 2×H200 against 20.2 GiB for the step). ``shard_training`` then only places
the train state (``shard_training_moved_frozen_gib``: base bytes it still moved; 0);
``build_peak_gib`` / ``build_peak_gib_per_device`` are the devices' peaks right after the build
(None where the backend has no memory stats, e.g. CPU); ``build_sharded`` says this path ran
(real-weight shapes are still loaded on the first device and then split). MFU is against
``devices`` × the one-device ceiling. A mesh smaller than the machine takes the first devices
(``--mesh data=1``: one device through the same sharded step). Under a mesh of several devices
the 4-bit matmuls take the XLA path (no Pallas kernels).

``--scaling`` measures parallel scaling in one call: for each shape it runs ``--mesh data=1`` with
``batch / (data·fsdp)`` rows and then ``--mesh`` with ``batch`` rows, each in its own process (the
same per-device batch), and writes both rows plus ``scaling`` entries (``ratio`` = tokens/s on the
mesh / on one device, ``efficiency`` = ratio / devices) to the JSON::

    python experiments/bench_train.py --shapes tinyllama-1.1b --mesh data=2 --batch 8 --scaling
    python experiments/bench_train.py --shapes llama2-7b --mesh fsdp=2 --batch 2 --scaling --backend xla

(``--backend xla`` keeps the one-device run on the same matmul path as the mesh run.) The same by
hand: ``--mesh data=1 --batch 4`` and then ``--mesh data=2 --batch 8``.

Several shapes run one process each (``--isolate``, the default for more than one), so that each
shape's peak memory is its own. The PyTorch anchor (`benchmarks/torch_anchor_train.py`) writes
``benchmarks/results/torch_anchor_train_<device>_<date>.json``; the newest such file for the same
device (or ``--anchor PATH``) is put beside our rows. Results go to
``benchmarks/results/bench_train_<device>_<date>.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import statistics
import subprocess
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
DEFAULT_SHAPES = "smollm2-135m-random,tinyllama-1.1b,llama2-7b"
LAYOUTS = ("stacked", "scan", "loop")
REMATS = ("none", "full", "save_dots", "offload_dots", "offload_inputs")
ROW_KEYS = ("shape", "batch", "seq", "tok_s", "step_ms", "peak_gib", "plan_gib", "mfu", "hfu", "compile_s",
            "build_s", "loss_first", "loss_last")


# --------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=None,
                   help="rows per step (default: the shape's); with --mesh the GLOBAL batch over all devices")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: the shape's)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear', a comma-separated list of module names, or a regex")
    p.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (AdamW, clip 0.3)")
    p.add_argument("--remat", choices=REMATS, default="full",
                   help="per-decoder-layer remat policy; offload_inputs (stacked layout only) is 'full' with the "
                        "layer inputs saved for the backward pass kept in pinned host memory")
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer state in pinned host memory")
    p.add_argument("--layout", choices=LAYOUTS, default="stacked",
                   help="decoder layers: stacked once and scanned (one copy of the base), re-stacked "
                        "inside each step (qlora_jax.train.scan_forward), or an unrolled loop")
    p.add_argument("--attn", choices=("auto", "xla", "cudnn"), default="auto",
                   help="attention implementation (auto: cuDNN flash attention on GPU if it runs, else XLA)")
    p.add_argument("--backend", choices=("auto", "xla", "pallas"), default="auto", help="4-bit matmul backend")
    p.add_argument("--no-mosaic", action="store_true",
                   help="keep the 4-bit forward on dequant_first where the tuning table picks the Mosaic GPU "
                        "kernel (to compare the two in one run)")
    p.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on an accelerator, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ceiling-size", type=int, default=None,
                   help="n of the n³ matmul ceiling (default 8192 on an accelerator, 1024 on CPU)")
    p.add_argument("--max-seq-search", action="store_true",
                   help="after the timed run, find the longest sequence that trains (doubling, then bisection)")
    p.add_argument("--search-start", type=int, default=None,
                   help="first length the search tries (default: twice the timed run's)")
    p.add_argument("--search-max", type=int, default=131072, help="longest sequence the search tries")
    p.add_argument("--search-step", type=int, default=512, help="bisection stops at this resolution")
    p.add_argument("--search-budget", type=float, default=420.0,
                   help="seconds: no new search trial starts after this (keeps a device call in its limit)")
    p.add_argument("--mesh", default=None,
                   help="run data-parallel / FSDP on a device mesh, e.g. 'data=2', 'fsdp=2', 'data=1,fsdp=2' "
                        "(qlora_jax.sharding.parse_mesh; a mesh smaller than the machine takes the first devices); "
                        "--batch is then the global batch")
    p.add_argument("--scaling", action="store_true",
                   help="with --mesh: run each shape on one device (--mesh data=1, batch / (data*fsdp) rows) and on "
                        "the mesh (batch rows), in separate processes, and report the tokens/s ratio")
    p.add_argument("--compile-only", action="store_true",
                   help="no arrays: build the model abstractly, compile the step, report XLA's memory plan")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION for the run (0.54 of an H200's 140.4 GiB = 75.7 GiB, "
                        "what JAX gets at fraction 0.95 of an 80 GB H100)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per shape (default: on for several shapes)")
    p.add_argument("--anchor", default=None, help="torch anchor JSON (default: newest for this device)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_train_<device>_<date>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.shape_list = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = [s for s in a.shape_list if s not in SHAPES]
    if unknown or not a.shape_list:
        p.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if a.remat == "offload_inputs" and a.layout != "stacked":
        p.error("--remat offload_inputs needs --layout stacked (it is a policy of the stacked layer scan)")
    a.mesh_sizes = None
    if a.mesh is not None:
        from qlora_jax.sharding import parse_mesh

        try:
            a.mesh_sizes = parse_mesh(a.mesh)
        except ValueError as e:
            p.error(f"--mesh: {e}")
    if a.scaling:
        if a.mesh_sizes is None:
            p.error("--scaling needs --mesh (the multi-device run to compare with one device)")
        if any(v < 1 for v in a.mesh_sizes.values()):
            p.error("--scaling needs explicit mesh sizes (no -1)")
        if a.compile_only:
            p.error("--scaling times steps; it does not combine with --compile-only")
    for flag, ok in (("--steps", a.steps >= 1), ("--r", a.r >= 1), ("--lr", a.lr > 0),
                     ("--batch", a.batch is None or a.batch >= 1), ("--seq", a.seq is None or a.seq >= 2),
                     ("--search-step", a.search_step >= 1),
                     ("--search-start", a.search_start is None or a.search_start >= 2),
                     ("--mem-fraction", a.mem_fraction is None or 0 < a.mem_fraction <= 1)):
        if not ok:
            p.error(f"invalid value for {flag}")
    return a


# --------------------------------------------------------------------------------------------
# FLOPs and the ceiling


def linear_params(hf: dict[str, Any]) -> tuple[int, list[tuple[int, int]]]:
    """(linear weights per decoder layer, [(K, N)] of its 7 projections) for an HF config dict."""
    d, f = hf["hidden_size"], hf["intermediate_size"]
    nh, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or d // nh
    shapes = [(d, nh * hd), (d, kv * hd), (d, kv * hd), (nh * hd, d), (d, f), (d, f), (f, d)]
    return sum(k * n for k, n in shapes), shapes


def flops_per_token(hf: dict[str, Any], seq: int, r: int, lora_params: int | None = None,
                    remat: str = "full") -> dict[str, float]:
    """``{"model": needed FLOPs/token, "hardware": with remat's recompute, "linear_params",
    "lora_params"}`` of a QLoRA step at sequence length ``seq`` (see the module docstring).

    ``lora_params``: the adapters' parameter count (default: rank ``r`` on all 7 projections of
    every layer, i.e. all-linear)."""
    L, d = hf["num_hidden_layers"], hf["hidden_size"]
    d_attn = hf["num_attention_heads"] * (hf.get("head_dim") or d // hf["num_attention_heads"])
    per_layer, shapes = linear_params(hf)
    n_lin = L * per_layer + d * hf["vocab_size"]      # + lm_head (or the tied embedding's logits)
    n_lora = L * sum(r * (k + n) for k, n in shapes) if lora_params is None else lora_params
    attn = 4 * L * seq * d_attn                        # QKᵀ and PV, forward, per token
    model = 4 * n_lin + 6 * n_lora + 3 * attn
    recompute = (2 * n_lin + 2 * n_lora + attn) if remat != "none" else 0
    return {"model": float(model), "hardware": float(model + recompute), "linear_params": float(n_lin),
            "lora_params": float(n_lora)}


def matmul_ceiling(n: int, dtype: Any, loops: tuple[int, int] = (2, 10)) -> float:
    """TFLOP/s of an ``n³`` matmul timed on the device: ``x ← x·b`` chained inside one jitted
    ``fori_loop`` (each product needs the last, so nothing is hoisted or skipped), the slope between
    two loop lengths (median of 3 runs each), which takes dispatch and launch overhead out."""
    import functools

    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)  # keeps |x| ~ 1

    @functools.partial(jax.jit, static_argnums=2)
    def chain(x, w, iters):
        return jax.lax.fori_loop(0, iters, lambda _, y: jnp.dot(y, w), x)

    times = []
    for iters in loops:
        chain(a, b, iters).block_until_ready()
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            chain(a, b, iters).block_until_ready()
            runs.append(time.perf_counter() - t)
        times.append(statistics.median(runs))
    per = max((times[1] - times[0]) / (loops[1] - loops[0]), 1e-12)
    return 2 * n**3 / per / 1e12


# --------------------------------------------------------------------------------------------
# One shape


def _is_oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "OOM" in s


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def _peak_gib(device: Any = None) -> float | None:
    import jax

    try:
        stats = (jax.devices()[0] if device is None else device).memory_stats()
    except Exception:  # noqa: BLE001 - backends without the API
        return None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def _plan_gib(compiled: Any) -> dict[str, float] | None:
    """XLA's memory plan of a compiled step, in GiB (``plan`` = arguments + outputs - aliased +
    temporaries, the device memory the step needs with its inputs resident)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if ma is None:
        return None
    g = {k: getattr(ma, f"{k}_size_in_bytes", 0) / 2**30 for k in ("argument", "output", "alias", "temp")}
    g["plan"] = g["argument"] + g["output"] - g["alias"] + g["temp"]
    host = getattr(ma, "host_temp_size_in_bytes", 0) + getattr(ma, "host_argument_size_in_bytes", 0)
    g["host"] = host / 2**30
    return g


def _attention_impl(choice: str, hf: dict[str, Any], batch: int, seq: int, dtype: Any) -> str | None:
    """The model's ``attn_implementation``: None (XLA) or "cudnn"; "auto" tries cuDNN's flash attention
    (forward and backward, the shape's heads) on GPU and falls back to XLA if it fails."""
    import jax
    import jax.numpy as jnp

    if choice == "xla" or (choice == "auto" and jax.default_backend() != "gpu"):
        return None
    nh, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or hf["hidden_size"] // nh
    try:
        q = jnp.zeros((1, min(seq, 256), nh, hd), dtype)
        k = jnp.zeros((1, min(seq, 256), kv, hd), dtype)

        def f(q, k):
            return jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation="cudnn").sum()

        jax.block_until_ready(jax.jit(jax.grad(f, argnums=(0, 1)))(q, k))
        return "cudnn"
    except Exception as e:  # noqa: BLE001
        if choice == "cudnn":
            raise
        print(f"  cuDNN attention unavailable ({_err(e)}); using XLA attention", flush=True)
        return None


def _lora_config(args: argparse.Namespace):
    from qlora_jax.lora import LoraConfig

    t = args.targets
    targets: Any = t if t == "all-linear" else ([s.strip() for s in t.split(",")] if ("," in t or t.isidentifier()) else t)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets)


def build_model(name: str, args: argparse.Namespace, cd: Any, attn: str | None, abstract: bool = False,
                shardings: Any = None):
    """The QLoRA model of shape ``name`` (4-bit bases + adapters), laid out per ``--layout``.

    ``shardings`` (random-init shapes only): the final model state's shardings (a tree, or the
    ``(params, rngs, frozen)`` trees of ``train_shardings``); the builder then places every leaf
    as it is made and stacks the layers straight into theirs (`init_quantized_llama`)."""
    import jax
    from flax import nnx

    from qlora_jax import QuantPolicy
    from qlora_jax.models import LlamaConfig
    from qlora_jax.models.build import init_quantized_llama, load_quantized_llama, stack_layers
    from qlora_jax.train import remat_policy

    spec = SHAPES[name]
    # min_size=1: every projection is quantized, as bitsandbytes does (the default policy's
    # 4096-element floor would keep the tiny test shape's small kernels in float).
    policy = QuantPolicy(format="nf4", block_size=64, double_quant=True, min_size=1)
    # "offload_inputs" exists only inside the stacked scan: the model itself is built without remat.
    model_remat = None if args.remat == "offload_inputs" else remat_policy(args.remat)
    kw = dict(policy=policy, dtype=cd, param_dtype=cd, backend=args.backend, remat_policy=model_remat,
              attn_implementation=attn)
    # Made inside the builders: under nnx.eval_shape the adapter RNG must belong to that trace.
    rngs = lambda: nnx.Rngs(params=args.seed + 1, dropout=args.seed + 2)  # noqa: E731
    lcfg = _lora_config(args)
    if spec.get("real"):
        if abstract:
            raise ValueError(f"--compile-only needs a random-init shape; use {name}-random")
        from qlora_jax import assets

        make = lambda: load_quantized_llama(assets.default_model_path(), lcfg, rngs=rngs(), **kw)[0]  # noqa: E731
    else:
        config = LlamaConfig.from_hf(spec["hf"])
        make = lambda: init_quantized_llama(config, lcfg, key=jax.random.key(args.seed), rngs=rngs(), **kw)  # noqa: E731

    if shardings is not None:
        if spec.get("real") or abstract:
            raise ValueError("build_model: shardings= needs a random-init shape built for real")
        stacked = args.layout == "stacked"
        model = init_quantized_llama(config, lcfg, key=jax.random.key(args.seed), rngs=rngs(), stack=stacked,
                                     shardings=shardings, **kw)
        if stacked and args.remat == "offload_inputs":  # = stack_layers(model, remat_policy="offload_inputs")
            model.model.layers[0].remat_policy = "offload_inputs"
        return model

    def make_laid_out():
        model = make()
        if args.layout == "stacked":
            stack_layers(model, remat_policy="offload_inputs" if args.remat == "offload_inputs" else "model")
        return model

    return nnx.eval_shape(make_laid_out) if abstract else make_laid_out()


def _abstract_setup(model: Any, tx: Any):
    """`init_train_state`'s (graphdef, state, frozen) for an abstract model, as ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.train import TrainState, split_model

    graphdef, params, rngs, frozen = split_model(model)
    to_sds = lambda x, dt=None: jax.ShapeDtypeStruct(x.shape, dt or x.dtype)  # noqa: E731
    params = jax.tree.map(lambda x: to_sds(x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else None), params)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params),
                       jax.tree.map(to_sds, rngs))
    return graphdef, state, jax.tree.map(to_sds, frozen)


def _batch(vocab: int, batch: int, seq: int, seed: int, abstract: bool = False,
           text: bool = False) -> dict[str, Any]:
    """One fixed ``{"input_ids", "loss_mask"}`` batch ``[batch, seq]`` (every token a target):
    random ids, or with ``text`` the Lee news corpus in the SmolLM2 tokenizer (real weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if abstract:
        return {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
    if text:
        from qlora_jax import assets
        from qlora_jax.io import load_tokenizer

        tok = load_tokenizer(assets.default_model_path())
        stream: list[int] = []
        for doc in assets.lee_documents():
            stream += tok.encode(doc) + ([tok.eos_id] if tok.eos_id is not None else [])
        ids = np.resize(np.asarray(stream, np.int32), (batch, seq))  # cycles if the corpus is short
    else:
        ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "loss_mask": jnp.ones((batch, seq), jnp.int32)}


def make_bench_mesh(spec: str):
    """The mesh of ``--mesh``: `qlora_jax.sharding.make_mesh` over all devices, or over the first
    ``prod(sizes)`` devices when the sizes (none -1) ask for fewer (``data=1``: one device)."""
    import jax

    from qlora_jax import sharding as qs

    sizes = qs.parse_mesh(spec)
    devices = jax.devices()
    n = math.prod(sizes.values())
    if -1 not in sizes.values() and n < len(devices):
        devices = devices[:n]
    return qs.make_mesh(sizes, devices=devices)


def bench_shape(name: str, args: argparse.Namespace, progress: Any = None) -> dict[str, Any]:
    """Builds, compiles and times one shape; returns its row (and search rows under ``search``).
    ``progress(row)`` is called with the partial row after the timed run and each search trial."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax import sharding as qs
    from qlora_jax import train as qt

    spec = SHAPES[name]
    hf = spec["hf"]
    batch, seq = args.batch or spec["batch"], args.seq or spec["seq"]
    mesh = make_bench_mesh(args.mesh) if getattr(args, "mesh", None) else None
    cd = {"auto": jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16,
          "bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.compute_dtype]
    row: dict[str, Any] = {"shape": name, "batch": batch, "seq": seq, "layers": hf["num_hidden_layers"],
                           "hidden": hf["hidden_size"], "r": args.r, "targets": args.targets, "remat": args.remat,
                           "layout": args.layout, "offload_optimizer": args.offload_optimizer,
                           "compute_dtype": jnp.dtype(cd).name, "real_weights": bool(spec.get("real")),
                           "data": "lee news text" if spec.get("real") else "random ids", "backend": args.backend,
                           "compile_only": args.compile_only}
    if mesh is not None:
        sizes = qs.mesh_sizes(mesh)
        n_rows = sizes["data"] * sizes["fsdp"]
        if batch % n_rows:
            raise ValueError(f"--batch {batch} (the global batch) is not a multiple of data x fsdp = {n_rows} "
                             f"of mesh {sizes}")
        row.update(mesh=sizes, mesh_spec=args.mesh, devices=int(mesh.devices.size), batch_per_device=batch // n_rows)
        if row["devices"] > 1:
            row["backend_used"] = "xla (mesh: no Pallas kernels)"
        print(f"  mesh {sizes} over {row['devices']} device(s), global batch {batch}", flush=True)
    attn = None if args.compile_only else _attention_impl(args.attn, hf, batch, seq, cd)
    row["attention"] = attn or "xla"
    tx = qt.make_optimizer(args.lr, max_grad_norm=0.3)
    forward = qt.scan_forward if args.layout == "scan" else qt.default_forward

    t = time.perf_counter()
    target = None
    if mesh is not None and not args.compile_only and not spec.get("real"):
        # The shardings first, from the abstract model (as --compile-only); then every leaf is
        # built straight into its own (no device holds more than its shards + one float kernel).
        _, a_state, a_frozen = _abstract_setup(build_model(name, args, cd, attn, abstract=True), tx)
        target = qs.train_shardings(a_state, a_frozen, tx, mesh)
        del a_state, a_frozen
        model = build_model(name, args, cd, attn,
                            shardings=(target.state.params, target.state.rngs, target.frozen))
    else:
        model = build_model(name, args, cd, attn, abstract=args.compile_only)
    shardings = None
    if args.compile_only:
        graphdef, state, frozen = _abstract_setup(model, tx)
        if mesh is None:
            offload = qt.offload_shardings(state.opt_state, qt.OffloadConfig(args.offload_optimizer))
        else:  # the rules read shapes only; offload keeps each leaf's partitioning
            shardings = qs.train_shardings(state, frozen, tx, mesh)
            placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state.opt_state, shardings.state.opt_state)
            offload = qt.offload_shardings(placed, qt.OffloadConfig(args.offload_optimizer))
    else:
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        if mesh is None:
            graphdef, state, frozen, offload = qt.init_train_state(
                model, tx, offload=qt.OffloadConfig(optimizer_state=args.offload_optimizer))
        else:  # built into the mesh's shardings (real weights: on the first device, then split)
            row["build_sharded"] = target is not None
            if target is not None:  # measured before the optimizer state exists
                peaks = [_peak_gib(d) for d in mesh.devices.flat]
                row["build_peak_gib_per_device"] = peaks
                row["build_peak_gib"] = max(peaks) if all(p is not None for p in peaks) else None
            graphdef, state, frozen, _ = qt.init_train_state(model, tx)
            before = jax.tree.leaves(frozen)
            run = qs.shard_training(state, frozen, tx, mesh,
                                    offload=qt.OffloadConfig(optimizer_state=args.offload_optimizer))
            state, frozen, offload, shardings = run.state, run.frozen, run.offload, run.shardings
            del run
            # shard_training must leave the already placed base where it is (no copy).
            row["shard_training_moved_frozen_gib"] = sum(
                a.nbytes for a, b in zip(before, jax.tree.leaves(frozen)) if a is not b) / 2**30
            del before
        if "build_peak_gib" not in row:
            row["build_peak_gib"] = _peak_gib()
    del model
    row["build_s"] = time.perf_counter() - t
    row["frozen_gib"] = qt.tree_bytes(frozen) / 2**30
    if mesh is not None and not args.compile_only:
        row["frozen_gib_per_device"] = max(qs.bytes_per_device(frozen).values()) / 2**30
    row["lora_params"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
    row["opt_state_gib"] = qt.tree_bytes(state.opt_state) / 2**30
    row["offloaded"] = offload is not None
    fl = flops_per_token(hf, seq, args.r, lora_params=row["lora_params"], remat=args.remat)
    row["flops_per_token"] = fl["model"]
    row["hw_flops_per_token"] = fl["hardware"]
    if mesh is None:
        step_fn = qt.make_train_step(graphdef, tx, offload=offload, forward=forward)
        place_batch = None
    else:
        step_fn = qs.make_sharded_train_step(graphdef, tx, shardings, offload=offload, forward=forward)
        place_batch = lambda b: qs.shard_batch(b, mesh)  # noqa: E731

    b = _batch(hf["vocab_size"], batch, seq, args.seed, abstract=args.compile_only, text=bool(spec.get("real")))
    if place_batch is not None and not args.compile_only:
        b = place_batch(b)
    t = time.perf_counter()
    compiled = step_fn.lower(state, frozen, b).compile()
    row["compile_s"] = time.perf_counter() - t
    plan = _plan_gib(compiled)
    if plan:
        row["plan_gib"] = plan["plan"]
        row["plan_temp_gib"] = plan["temp"]
        row["plan_host_gib"] = plan["host"]
    if args.compile_only:
        return row

    losses = []
    state, m = compiled(state, frozen, b)       # warm-up (first execution: allocations, autotuning)
    losses.append(m["loss"])
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, frozen, b)
        losses.append(m["loss"])
    jax.block_until_ready(state)
    dt = time.perf_counter() - t
    row["losses"] = [float(x) for x in losses]
    row["loss_first"], row["loss_last"] = row["losses"][0], row["losses"][-1]
    row["step_ms"] = dt / args.steps * 1e3
    row["tok_s"] = batch * seq * args.steps / dt
    row["peak_gib"] = _peak_gib()
    if mesh is not None:
        row["tok_s_per_device"] = row["tok_s"] / row["devices"]
        peaks = [_peak_gib(d) for d in mesh.devices.flat]
        row["peak_gib_per_device"] = peaks
        row["peak_gib"] = max(peaks) if all(p is not None for p in peaks) else None

    if args.max_seq_search:
        if progress is not None:
            progress(row)
        # Each trial starts from a host copy of the state (a failed step may have consumed its
        # donated input); the device copy goes now so that it does not occupy memory the trials need.
        host_state, state_shardings = jax.device_get(state), jax.tree.map(lambda x: x.sharding, state)
        del state, m
        row["search"] = max_seq_search(step_fn, host_state, state_shardings, frozen, hf, batch, seq, args,
                                       progress=None if progress is None else (lambda t: progress({**row, "search": t})),
                                       place_batch=place_batch)
        fits = [s for s in row["search"] if s["fits"] and s.get("seq")]
        if fits:
            best = max(fits, key=lambda s: s["seq"])
            row["max_seq"], row["max_seq_tok_s"] = best["seq"], best.get("tok_s")
        row["peak_after_search_gib"] = _peak_gib()
        if mesh is not None:
            row["peak_after_search_gib"] = max((_peak_gib(d) or 0.0) for d in mesh.devices.flat) or None
    return row


def max_seq_search(step_fn: Any, host_state: Any, shardings: Any, frozen: Any, hf: dict[str, Any], batch: int,
                   seq: int, args: argparse.Namespace, progress: Any = None,
                   place_batch: Any = None) -> list[dict[str, Any]]:
    """Longest sequence whose step compiles and runs: from ``seq`` (known to fit), doubling from
    ``--search-start`` (default ``2·seq``) until one fails (out of memory, caught) or passes
    ``--search-max``, then bisection to ``--search-step``; no trial starts after
    ``--search-budget`` seconds. Each trial puts ``host_state`` (the train state in host memory)
    back on the device with ``shardings`` and runs one step, then a second, timed one if the first
    took under 20 s (else the first's time, autotuning included, gives ``tok_s``). ``place_batch``
    puts each trial's batch on the mesh (None: one device).
    Returns one record a trial: ``{"seq", "fits", "tok_s" | "oom"/"error", "trial_s"}``."""
    import jax

    trials: list[dict[str, Any]] = []

    def trial(T: int) -> bool:
        rec: dict[str, Any] = {"seq": T}
        t0 = time.perf_counter()
        try:
            st = jax.device_put(host_state, shardings)
            b = _batch(hf["vocab_size"], batch, T, args.seed)
            if place_batch is not None:
                b = place_batch(b)
            compiled = step_fn.lower(st, frozen, b).compile()
            t = time.perf_counter()
            st, m = compiled(st, frozen, b)
            jax.block_until_ready(st)
            first = time.perf_counter() - t
            if first > 20.0:  # a long step: one is enough (its time includes autotuning)
                rec.update(fits=True, tok_s=batch * T / first, timed="first step", loss=float(m["loss"]))
            else:
                t = time.perf_counter()
                st, m = compiled(st, frozen, b)
                jax.block_until_ready(st)
                rec.update(fits=True, tok_s=batch * T / (time.perf_counter() - t), loss=float(m["loss"]))
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                rec.update(fits=False, error=_err(e), oom=False)
                trials.append(rec)
                raise
            rec.update(fits=False, oom=True, error=_err(e)[:200])
        finally:
            st = b = compiled = None  # noqa: F841 - release before the next trial
        rec["trial_s"] = time.perf_counter() - t0
        trials.append(rec)
        if progress is not None:
            progress(list(trials))
        print(f"  seq {T}: {'fits' if rec['fits'] else 'out of memory'}"
              + (f", {rec['tok_s']:.0f} tok/s" if rec.get("tok_s") else ""), flush=True)
        return rec["fits"]

    good, bad = seq, None
    T = getattr(args, "search_start", None) or seq * 2
    start = time.perf_counter()

    def out_of_time() -> bool:
        if time.perf_counter() - start > getattr(args, "search_budget", float("inf")):
            trials.append({"seq": None, "fits": False, "error": "search time budget spent"})
            print("  search stopped: --search-budget spent", flush=True)
            return True
        return False

    try:
        while T <= args.search_max and not out_of_time():
            if trial(T):
                good, T = T, T * 2
            else:
                bad = T
                break
        while bad is not None and bad - good > args.search_step:
            mid = (good + bad) // 2 // args.search_step * args.search_step
            if mid <= good or out_of_time():
                break
            if trial(mid):
                good = mid
            else:
                bad = mid
    except Exception as e:  # noqa: BLE001 - a non-memory failure ends the search, recorded
        print(f"  search stopped: {_err(e)}", flush=True)
    return trials


# --------------------------------------------------------------------------------------------
# Anchor, output


def _slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def find_anchor(path: str | None, device: str) -> tuple[dict[str, Any] | None, str | None]:
    """The torch anchor JSON: ``path``, else the newest ``torch_anchor_train_*.json`` for ``device``."""
    if path:
        with open(path) as fh:
            return json.load(fh), path
    best = None
    for f in sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "torch_anchor_train_*.json"))):
        try:
            with open(f) as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        if d.get("device") == device and (best is None or d.get("date", "") >= best[0].get("date", "")):
            best = (d, f)
    return best if best else (None, None)


def attach_anchor(rows: list[dict[str, Any]], anchor: dict[str, Any] | None, ceiling: float | None) -> None:
    """Puts the anchor's figures for the same shape, batch and sequence beside ours."""
    if not anchor:
        return
    by = {(a.get("shape"), a.get("batch"), a.get("seq")): a for a in anchor.get("rows", [])}
    for r in rows:
        if r.get("devices", 1) > 1:  # the anchor runs on one device
            continue
        a = by.get((r["shape"], r["batch"], r["seq"])) or by.get((r["shape"].replace("-random", ""), r["batch"], r["seq"]))
        if not a or not a.get("tok_s"):
            continue
        r["anchor_tok_s"], r["anchor_peak_gib"] = a["tok_s"], a.get("peak_gib")
        r["anchor_step_ms"] = a.get("step_ms")
        if r.get("tok_s"):
            r["speedup_vs_anchor"] = r["tok_s"] / a["tok_s"]
        if r.get("peak_gib") and a.get("peak_gib"):
            r["peak_vs_anchor"] = r["peak_gib"] / a["peak_gib"]
        if ceiling and r.get("flops_per_token"):
            r["anchor_mfu"] = a["tok_s"] * r["flops_per_token"] / (ceiling * 1e12)


def add_mfu(rows: list[dict[str, Any]], ceiling: float | None) -> None:
    """MFU / HFU against the one-device ceiling times the row's ``devices`` (1 without a mesh)."""
    for r in rows:
        if ceiling and r.get("tok_s"):
            total = ceiling * r.get("devices", 1)
            r["tflop_s"] = r["tok_s"] * r["flops_per_token"] / 1e12
            r["mfu"] = r["tflop_s"] / total
            r["hfu"] = r["tok_s"] * r["hw_flops_per_token"] / 1e12 / total


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "n/a"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _mesh_str(m: Any) -> str | None:
    return None if not m else ",".join(f"{k}={v}" for k, v in m.items() if v != 1 or k == "data") or "data=1"


def print_table(rows: list[dict[str, Any]], scaling: list[dict[str, Any]] | None = None) -> None:
    """The rows as a table (with mesh columns when a row ran on a mesh), then the search and
    ``--scaling`` summaries."""
    rows = [{**r, "mesh_str": _mesh_str(r.get("mesh")),
             "peaks_str": "/".join(_fmt(p, ".2f") for p in r["peak_gib_per_device"])
             if any(p is not None for p in r.get("peak_gib_per_device") or ()) else None} for r in rows]
    cols = [("shape", "shape", "s"), ("batch", "B", "d"), ("seq", "T", "d"), ("tok_s", "tok/s", ",.0f"),
            ("step_ms", "step ms", ".1f"), ("peak_gib", "peak GiB", ".2f"), ("plan_gib", "plan GiB", ".2f"),
            ("mfu", "MFU", ".1%"), ("compile_s", "compile s", ".1f"), ("build_s", "build s", ".1f"),
            ("loss_first", "loss 0", ".3f"), ("loss_last", "loss N", ".3f"),
            ("anchor_tok_s", "anchor tok/s", ",.0f"), ("anchor_peak_gib", "anchor GiB", ".2f"),
            ("speedup_vs_anchor", "speedup", ".2f")]
    if not any("anchor_tok_s" in r for r in rows):
        cols = cols[:-3]
    if any(r.get("mesh") for r in rows):
        cols[1:1] = [("mesh_str", "mesh", "s"), ("devices", "devices", "d")]
        cols.insert(cols.index(("peak_gib", "peak GiB", ".2f")) + 1, ("peaks_str", "peak GiB per device", "s"))
    table = [[h for _, h, _ in cols]]
    keys = [k for k, _, _ in cols]
    for r in rows:
        if "error" in r:
            head = keys.index("seq") + 1
            table.append([_fmt(r.get(k), s) if r.get(k) is not None else "" for k, _, s in cols[:head]]
                         + ["ERROR: " + r["error"][:60]] + [""] * (len(cols) - head - 1))
            continue
        table.append([_fmt(r.get(k), s) for k, _, s in cols])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for i, row in enumerate(table):
        print(" | ".join(c.rjust(w) if i else c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for r in rows:
        if r.get("search"):
            print(f"{r['shape']}: longest sequence that trains = {r.get('max_seq', 'none')} "
                  f"(tried {[s['seq'] for s in r['search']]})")
    for sc in scaling or []:
        if sc.get("ratio") is None:
            print(f"{sc['shape']}: scaling not measured ({sc.get('error', 'a run failed')})")
            continue
        print(f"{sc['shape']}: {sc['batch_per_device']} rows a device: 1 device {sc['tok_s_1']:,.0f} tok/s, "
              f"{sc['devices']} devices ({sc['mesh_spec']}) {sc['tok_s_n']:,.0f} tok/s: ratio {sc['ratio']:.2f}, "
              f"efficiency {sc['efficiency']:.0%}")


def plot(rows: list[dict[str, Any]], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("tok_s") or r.get("plan_gib")]
    if not rows:
        return
    names = [f"{r['shape']}\n{r['batch']}×{r['seq']}" for r in rows]
    x = list(range(len(rows)))
    has_anchor = any(r.get("anchor_tok_s") for r in rows)
    w = 0.38 if has_anchor else 0.6
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2 * len(rows), 4.2))
    for ax, key, akey, label in ((axes[0], "tok_s", "anchor_tok_s", "tokens / s"),
                                 (axes[1], "peak_gib", "anchor_peak_gib", "peak device memory (GiB)")):
        ours = [r.get(key) or (r.get("plan_gib") if key == "peak_gib" else 0) or 0 for r in rows]
        bars = ax.bar([i - (w / 2 if has_anchor else 0) for i in x], ours, w, label="qlora-jax")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if has_anchor:
            bars = ax.bar([i + w / 2 for i in x], [r.get(akey) or 0 for r in rows], w, label="PEFT + bitsandbytes")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if not any(r.get("peak_gib") for r in rows):
        axes[1].set_ylabel("XLA memory plan of the step (GiB; no device stats)")
    if not any(r.get("tok_s") for r in rows):
        axes[0].text(0.5, 0.5, "compile only: nothing timed", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (``--x v`` and ``--x=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _run_child(base: list[str], shape: str, label: str) -> dict[str, Any] | None:
    """Runs this script on ``shape`` in a child process with the options ``base``; its result (or
    None if it wrote none)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--shapes", shape, "--child-json", out]
        print(f"== {label} (own process)", flush=True)
        p = subprocess.run(cmd)
        if not os.path.exists(out):
            return {"rows": [{"shape": shape, "error": f"child process failed (rc={p.returncode})"}]}
        with open(out) as fh:
            return json.load(fh)


def _merge_child(result: dict[str, Any], child: dict[str, Any], ceilings: list[Any]) -> list[dict[str, Any]]:
    rows = child.pop("rows")
    result["rows"].extend(rows)
    ceilings.append(child.get("ceiling_tflop_s"))
    result.update({k: v for k, v in child.items() if k not in result})
    got = [c for c in ceilings if c]
    result["ceiling_tflop_s"] = statistics.median(got) if got else None
    result["isolated"] = True
    return rows


def run_isolated(argv: list[str], shapes: list[str], save: Any) -> dict[str, Any]:
    """Runs each shape in its own process (its own peak memory); ``save(result)`` after each one."""
    result: dict[str, Any] = {"rows": []}
    ceilings: list[Any] = []
    base = _strip(argv, ("--shapes", "--out", "--plot", "--child-json")) + ["--no-isolate"]
    for s in shapes:
        _merge_child(result, _run_child(base, s, s), ceilings)
        save(result, final=s == shapes[-1])
    return result


def run_scaling(argv: list[str], args: argparse.Namespace, save: Any) -> dict[str, Any]:
    """``--scaling``: per shape, one process on one device (``--mesh data=1``, ``batch / (data·fsdp)``
    rows) and one on ``--mesh`` (``batch`` rows, the global batch): the same rows a device. Adds
    ``result["scaling"]``: ``{shape, devices, mesh_spec, batch_per_device, tok_s_1, tok_s_n, ratio,
    efficiency}`` (ratio = tok_s_n / tok_s_1, efficiency = ratio / devices)."""
    result: dict[str, Any] = {"rows": [], "scaling": []}
    ceilings: list[Any] = []
    base = [a for a in _strip(argv, ("--shapes", "--out", "--plot", "--child-json", "--mesh", "--batch"))
            if a != "--scaling"] + ["--no-isolate"]
    sizes = args.mesh_sizes
    n_rows, n_dev = sizes.get("data", 1) * sizes.get("fsdp", 1), math.prod(sizes.values())
    for s in args.shape_list:
        batch = args.batch or SHAPES[s]["batch"]
        entry: dict[str, Any] = {"shape": s, "devices": n_dev, "mesh_spec": args.mesh, "batch": batch,
                                 "batch_per_device": batch / n_rows, "tok_s_1": None, "tok_s_n": None, "ratio": None}
        if batch % n_rows:
            entry["error"] = f"batch {batch} is not a multiple of data x fsdp = {n_rows}"
            result["rows"].append({"shape": s, "batch": batch, "error": entry["error"]})
        else:
            entry["batch_per_device"] = batch // n_rows
            for key, mesh, rows_ in (("tok_s_1", "data=1", batch // n_rows), ("tok_s_n", args.mesh, batch)):
                child = _run_child([*base, "--mesh", mesh, "--batch", str(rows_)], s, f"{s} on --mesh {mesh}")
                for r in _merge_child(result, child, ceilings):
                    r["scaling_run"] = "1 device" if key == "tok_s_1" else f"{n_dev} devices"
                    entry[key] = r.get("tok_s")
                    if r.get("error"):
                        entry["error"] = r["error"]
            if entry["tok_s_1"] and entry["tok_s_n"]:
                entry["ratio"] = entry["tok_s_n"] / entry["tok_s_1"]
                entry["efficiency"] = entry["ratio"] / n_dev
        result["scaling"].append(entry)
        save(result, final=s == args.shape_list[-1])
    return result


def run_here(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    """Runs the shapes in this process; ``save(result)`` after each shape and search trial."""
    import flax
    import jax
    import optax

    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    result: dict[str, Any] = {
        "device": dev.device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
        "flax": flax.__version__, "optax": optax.__version__, "python": platform.python_version(),
        "mem_fraction": args.mem_fraction, "ceiling_tflop_s": None, "rows": []}
    if args.mesh:
        result.update(mesh_spec=args.mesh, device_count=jax.device_count())
    rows = result["rows"]

    def progress(row: dict[str, Any]) -> None:  # partial results survive a timeout
        save({**result, "rows": rows + [row]}, final=False)

    for s in args.shape_list:
        print(f"-- {s}", flush=True)
        try:
            rows.append(bench_shape(s, args, progress))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
            trace = traceback.format_exc()[-2000:]
            print(f"  {s}: {_err(e)}", flush=True)
            if args.backend == "auto" and not _is_oom(e) and jax.default_backend() != "cpu":
                # A kernel of the fused path failing to build must not cost the whole run.
                print(f"  {s}: retrying with --backend xla", flush=True)
                try:
                    row = bench_shape(s, argparse.Namespace(**{**vars(args), "backend": "xla"}), progress)
                    rows.append({**row, "backend_fallback": f"auto failed: {_err(e)}"})
                    save(result, final=False)
                    continue
                except Exception as e2:  # noqa: BLE001
                    e, trace = e2, traceback.format_exc()[-2000:]
            rows.append({"shape": s, "error": _err(e), "oom": _is_oom(e), "trace": trace})
        save(result, final=False)
    if not args.compile_only:  # measured last: its buffers must not count in the shapes' peaks
        n = args.ceiling_size or (1024 if jax.default_backend() == "cpu" else 8192)
        cdt = "float32" if jax.default_backend() == "cpu" and args.compute_dtype != "bfloat16" else "bfloat16"
        try:
            result["ceiling_tflop_s"] = matmul_ceiling(n, cdt)
            result.update(ceiling_n=n, ceiling_dtype=cdt)
            print(f"matmul ceiling {n}³ {cdt}: {result['ceiling_tflop_s']:.4g} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"matmul ceiling failed: {_err(e)}", flush=True)
    save(result, final=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the result dict (also written as JSON, with a PNG)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.no_mosaic:
        import pallas_kernels.tuning  # noqa: PLC0415

        pallas_kernels.tuning.MOSAIC_MIN_TILES = 1 << 62   # no shape has that many tiles
    if args.mem_fraction is not None:  # must precede the backend's start
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)
    isolate = args.isolate if args.isolate is not None else len(args.shape_list) > 1
    today = datetime.date.today().isoformat()
    header = {"benchmark": "bench_train", "date": today,
              "command": "python experiments/bench_train.py " + " ".join(argv)}
    out_holder: dict[str, Any] = {}

    def save(result: dict[str, Any], final: bool) -> None:
        result.update(header)
        if args.child_json:
            with open(args.child_json, "w") as fh:
                json.dump(result, fh)
            out_holder["result"] = result
            return
        rows = [dict(r) for r in result["rows"]]
        add_mfu(rows, result.get("ceiling_tflop_s"))
        anchor, anchor_path = find_anchor(args.anchor, result.get("device", ""))
        attach_anchor(rows, anchor, result.get("ceiling_tflop_s"))
        full = {**result, "anchor": os.path.relpath(anchor_path, ROOT) if anchor_path else None, "rows": rows}
        if anchor:
            full["anchor_versions"] = {k: anchor.get(k) for k in ("torch", "transformers", "peft", "bitsandbytes",
                                                                  "date")}
        out = args.out or str(ROOT / "benchmarks" / "results" /
                              f"bench_train_{_slug(full.get('device', ''))}_{today}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        full["complete"] = final
        with open(out, "w") as fh:
            json.dump(full, fh, indent=1)
        if final:
            print()
            print_table(rows, full.get("scaling"))
            png = args.plot or os.path.splitext(out)[0] + ".png"
            try:
                plot(rows, png, f"QLoRA train step on {full.get('device')} ({today})")
                full["plot"] = png
            except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the JSON
                print(f"plot failed: {_err(e)}", flush=True)
            print(f"wrote {out}" + (f" and {png}" if full.get("plot") else ""))
        out_holder["result"] = full

    if args.scaling and args.child_json is None:
        run_scaling(argv, args, save)
    elif isolate and args.child_json is None:
        run_isolated(argv, args.shape_list, save)
    else:
        run_here(args, save)
    return out_holder["result"]


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any("error" in r for r in res["rows"]) else 0)
