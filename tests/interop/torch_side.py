"""The PyTorch side of the interop proof: transformers + bitsandbytes + PEFT on real checkpoints.

Runs in the Python 3.11 interop venv (``scripts/interop_venv.sh``), never in the library's
environment (the library does not import torch). Everything goes in and out through files:
HF folders, safetensors and JSON. Used by ``tests/test_interop_torch.py``; two subcommands, so
that the test runs this script twice in all.

``stage1 --src HF_FP32 --ids IDS.json --out DIR``
  - ``bnb.nn.Linear4bit`` state dicts of small random layers in every serialised variant
    (`VARIANTS`: NF4/FP4, DQ on/off, block sizes 32-256, uint8/bf16/fp16/fp32 quant_storage, a
    partial last block, blocks straddling rows) to ``DIR/variants.safetensors``; their
    ``dequantize_4bit`` and the portable backend's dequantization to ``DIR/variants_deq.safetensors``
    and the settings to ``DIR/variants.json``;
  - quantizes the float32 model with transformers + bitsandbytes (NF4, double quantization,
    float32 compute) and ``save_pretrained``s it to ``DIR/bnb``;
  - writes ``DIR/bnb_deq.safetensors``: ``dequantize_4bit`` of every 4-bit weight, float32
    ``[out, in]`` under its HF name (``model.layers.0.self_attn.q_proj.weight``);
  - the "dequantized model" = the float32 model with those weights: its logits on the token ids
    (``logits/deq``);
  - a PEFT LoRA adapter made here (``get_peft_model``, r=8, random non-zero A and B through
    ``init_lora_weights=False``, a ``rank_pattern`` and an ``alpha_pattern``) on the dequantized
    model, saved with ``save_pretrained`` to ``DIR/torch_adapter``; its logits (``logits/torch_adapter``).
``stage2 --src HF_FP32 --deq BNB_DEQ --ids IDS.json --peft ADAPTER --merged HF_DIR --bnb BNB_DIR --out DIR``
  - ``PeftModel.from_pretrained`` of our adapter on the dequantized model: ``logits/our_adapter``;
  - ``AutoModelForCausalLM.from_pretrained`` of our merged export: ``logits/merged``;
  - our bnb-4bit export loaded by transformers + bitsandbytes: ``dequantize_4bit`` of its
    weights to ``DIR/our_bnb_deq.safetensors`` and its logits (the Linear4bit forward): ``logits/bnb``.

Logits go to ``DIR/logits.safetensors`` (float32 ``[B, T, V]``); ``DIR/meta.json`` holds the
library versions, timings and the module types the loaded models had.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# bitsandbytes wraps portable-backend helpers in torch.compile(dynamic=False), which recompiles for
# every new weight shape (minutes in all); eager execution computes the same values.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file as load_torch  # noqa: E402

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_T0 = time.time()
_META: dict = {"timings_s": {}}


def _tick(what: str, t0: float) -> None:
    _META["timings_s"][what] = round(time.time() - t0, 2)
    print(f"torch_side: {what} {time.time() - t0:.1f}s", file=sys.stderr, flush=True)


def _ids(path: str) -> torch.Tensor:
    with open(path) as f:
        ids = json.load(f)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> np.ndarray:
    model.eval()
    return model(input_ids=ids).logits.float().numpy().copy()


def _float_model(src: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")


def _dequantized_model(src: str, deq_path: str):
    """The float32 model whose 4-bit-quantized linear weights are replaced by their dequantized values."""
    model = _float_model(src)
    deq = load_torch(deq_path)
    missing, unexpected = model.load_state_dict(deq, strict=False)
    if unexpected:
        raise RuntimeError(f"dequantized weights not in the model: {unexpected[:5]}")
    if len(deq) == 0:
        raise RuntimeError(f"{deq_path} holds no weights")
    return model


def _dequantize_all(model) -> dict[str, np.ndarray]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = mod.weight
            out[name + ".weight"] = bnbf.dequantize_4bit(w.data, w.quant_state).float().numpy().copy()
    return out


def _module_types(model) -> dict[str, str]:
    return {name: f"{type(mod).__module__}.{type(mod).__name__}" for name, mod in model.named_modules()
            if name.endswith(tuple(LINEAR_NAMES)) and ".layers.0." in name}


# Linear4bit layers saved with their state_dict (the serialisation transformers uses): both
# quant_types, DQ on and off, block sizes 32-256, each quant_storage dtype, a last block that is
# partial, and blocks that straddle rows. (name, out, in, quant_type, double quant, blocksize, storage)
VARIANTS = [
    ("fp4_b128_u8", 40, 256, "fp4", False, 128, "uint8"),
    ("nf4_b32_bf16", 40, 96, "nf4", False, 32, "bfloat16"),
    ("fp4_dq_b256_f32", 40, 256, "fp4", True, 256, "float32"),
    ("nf4_dq_b64_partial", 40, 100, "nf4", True, 64, "uint8"),
    ("nf4_dq_b128_f16", 64, 384, "nf4", True, 128, "float16"),
    ("nf4_b128_straddle", 8, 576, "nf4", False, 128, "uint8"),
]


def _portable_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' portable ("default" backend) ``dequantize_4bit``, bypassing the CPU C++ kernel.

    The op's "default" implementation is registered under CompositeExplicitAutograd; on CPU the
    "cpu" registration wins, so redispatch past it. (bitsandbytes 0.50.2's CPU kernel decodes
    wrongly when the row length is not a multiple of the block size, e.g. 576 columns at block 128.)
    """
    import bitsandbytes.functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        keys, packed.view(torch.uint8), absmax.float(), state.blocksize, state.quant_type, list(state.shape),
        torch.float32)


def _variants(out_dir: str) -> None:
    """Writes ``variants.safetensors`` (the layers' state dicts under ``<name>.``),
    ``variants_deq.safetensors`` (``<name>.weight``: ``dequantize_4bit``; ``<name>.weight.portable``:
    the portable backend's; float32 ``[out, in]``) and ``variants.json`` (the settings)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from safetensors.torch import save_file as save_torch

    torch.manual_seed(1)
    state, deq = {}, {}
    for name, n_out, n_in, qtype, dq, block, storage in VARIANTS:
        st = getattr(torch, storage)
        lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, quant_type=qtype, compress_statistics=dq, quant_storage=st,
                                compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in), requires_grad=False, quant_type=qtype,
                                       compress_statistics=dq, blocksize=block, quant_storage=st)
        lin = lin.to("cpu")  # quantizes
        for k, v in lin.state_dict().items():
            state[f"{name}.{k}"] = v.detach().contiguous()
        w, qs = lin.weight.data, lin.weight.quant_state
        deq[f"{name}.weight"] = bnbf.dequantize_4bit(w, qs).float().numpy().copy()
        deq[f"{name}.weight.portable"] = _portable_dequantize(w, qs).numpy().copy()
    save_torch(state, os.path.join(out_dir, "variants.safetensors"), metadata={"format": "pt"})
    save_file(deq, os.path.join(out_dir, "variants_deq.safetensors"))
    with open(os.path.join(out_dir, "variants.json"), "w") as f:
        json.dump([dict(zip(("name", "out", "in", "quant_type", "double_quant", "blocksize", "quant_storage"), v))
                   for v in VARIANTS], f, indent=2)


def stage1(args) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    os.makedirs(args.out, exist_ok=True)
    ids = _ids(args.ids)
    logits: dict[str, np.ndarray] = {}

    t0 = time.time()
    _variants(args.out)
    _tick("Linear4bit variants", t0)

    t0 = time.time()
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    qmodel = AutoModelForCausalLM.from_pretrained(args.src, quantization_config=cfg, device_map="cpu",
                                                  dtype=torch.float32)
    _META["bnb_module_types"] = _module_types(qmodel)
    qmodel.save_pretrained(os.path.join(args.out, "bnb"))
    _tick("quantize+save", t0)

    t0 = time.time()
    deq = _dequantize_all(qmodel)
    if not deq:
        raise RuntimeError("transformers produced no Linear4bit layers")
    deq_path = os.path.join(args.out, "bnb_deq.safetensors")
    save_file(deq, deq_path)
    del qmodel, deq
    _tick("dequantize", t0)

    t0 = time.time()
    model = _dequantized_model(args.src, deq_path)
    logits["deq"] = _logits(model, ids)
    _tick("dequantized-model logits", t0)

    t0 = time.time()
    torch.manual_seed(0)
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR_NAMES, lora_dropout=0.0,
                      init_lora_weights=False, rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 4},
                      task_type="CAUSAL_LM")
    pmodel = get_peft_model(model, lcfg)
    pmodel.save_pretrained(os.path.join(args.out, "torch_adapter"))
    logits["torch_adapter"] = _logits(pmodel, ids)
    _tick("torch adapter", t0)
    save_file(logits, os.path.join(args.out, "logits.safetensors"))


def stage2(args) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    os.makedirs(args.out, exist_ok=True)
    ids = _ids(args.ids)
    logits: dict[str, np.ndarray] = {}

    t0 = time.time()
    model = _dequantized_model(args.src, args.deq)
    pmodel = PeftModel.from_pretrained(model, args.peft)
    _META["peft_module_types"] = _module_types(pmodel)
    logits["our_adapter"] = _logits(pmodel, ids)
    del pmodel, model
    _tick("our adapter via PEFT", t0)

    t0 = time.time()
    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32, attn_implementation="eager")
    logits["merged"] = _logits(merged, ids)
    del merged
    _tick("our merged export", t0)

    t0 = time.time()
    qmodel = AutoModelForCausalLM.from_pretrained(args.bnb, device_map="cpu", attn_implementation="eager")
    _META["our_bnb_module_types"] = _module_types(qmodel)
    four_bit = [m for m in qmodel.modules() if isinstance(m, bnb.nn.Linear4bit)]
    _META["our_bnb_linear4bit_count"] = len(four_bit)
    _META["our_bnb_compute_dtypes"] = sorted({str(m.compute_dtype) for m in four_bit})
    # On an AVX512-BF16 CPU, Linear4bit's inference forward repacks the weight for a bf16 kernel
    # (bf16 activations and scales: ~1e-2 relative error). That fast path exists on no other
    # device; turn it off so that the layer computes dequantize_4bit + linear in its float32
    # compute dtype, as it does on CUDA and in training.
    for m in four_bit:
        m.support_avx512bf16_for_cpu = False
    save_file(_dequantize_all(qmodel), os.path.join(args.out, "our_bnb_deq.safetensors"))
    logits["bnb"] = _logits(qmodel, ids)
    _tick("our bnb-4bit export", t0)
    save_file(logits, os.path.join(args.out, "logits.safetensors"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p1 = sub.add_parser("stage1")
    p2 = sub.add_parser("stage2")
    for p in (p1, p2):
        p.add_argument("--src", required=True, help="float32 HF folder of the model")
        p.add_argument("--ids", required=True, help='JSON {"input_ids": [[...], ...]}')
        p.add_argument("--out", required=True)
    p2.add_argument("--deq", required=True, help="bnb_deq.safetensors from stage1")
    p2.add_argument("--peft", required=True)
    p2.add_argument("--merged", required=True)
    p2.add_argument("--bnb", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    {"stage1": stage1, "stage2": stage2}[args.cmd](args)
    import bitsandbytes
    import peft
    import transformers

    _META.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                 bitsandbytes=bitsandbytes.__version__, total_s=round(time.time() - _T0, 2))
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(_META, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
