"""Runs bitsandbytes on test tensors and writes everything it produces, for byte comparisons.

Runs in the Python 3.11 interop venv (``scripts/interop_venv.sh``), never in the library's
environment: the library does not import torch. Data goes in and out through files.

Usage::

    python bnb_oracle.py INPUT.safetensors CASES.json OUTPUT.safetensors

INPUT holds the test tensors: float32, or bfloat16 stored as its uint16 bit patterns (the
case says ``"input_dtype": "bfloat16"``), because numpy has no bfloat16 of its own.

CASES is a JSON list; each case is a dict with a unique ``"name"`` (the output key prefix) and
a ``"kind"``:

``"quantize"`` (the default): ``key`` (input tensor), ``quant_type`` ("nf4" | "fp4"),
  ``blocksize`` (32..4096), ``compress_statistics`` (bool), optional ``quant_storage``
  ("uint8" | "bfloat16"), optional ``input_dtype`` ("float32" | "bfloat16"). Writes
  ``NAME/packed``: uint8 [ceil(n/2)], the packed codes (a bfloat16 storage tensor viewed as bytes);
  ``NAME/absmax``: float32 [n_blocks] (no DQ) or uint8 [n_blocks] 8-bit codes (DQ);
  ``NAME/first_absmax``: float32 [n_blocks], the first-level scales before DQ;
  ``NAME/dequant``: float32 [n], ``dequantize_4bit`` of the result (input dtype, upcast exactly);
  with DQ also ``NAME/offset`` float32 [1], ``NAME/nested_absmax`` float32 [n_blocks/256 rounded
  up], ``NAME/nested_code`` float32 [256], and the portable backend's 8-bit double quantization of
  ``first_absmax - offset``: ``NAME/portable_codes`` uint8 [n_blocks], ``NAME/portable_scales``
  float32.

``"blockwise"``: bitsandbytes' 8-bit blockwise quantizer (the second level of double
  quantization) on the float32 tensor ``key`` with ``blocksize`` and the signed dynamic map, both
  the CPU build's C++ kernel (``quantize_blockwise``) and the portable backend. Writes
  ``NAME/cpp_codes``, ``NAME/cpp_scales``, ``NAME/portable_codes``, ``NAME/portable_scales``.

``"dequantize"``: dequantizes given bytes with ``dequantize_4bit``: ``packed`` (uint8 key),
  ``absmax`` (float32 key, or uint8 key with DQ), optional ``nested_absmax`` (float32 key) and
  ``offset`` (float), ``shape``, ``quant_type``, ``blocksize``. Writes ``NAME/dequant`` float32.

Also written: ``tables/nf4``, ``tables/fp4`` (``get_4bit_type(..., device="cpu")``),
``tables/dynamic`` (``create_dynamic_map(signed=True)``); the file's metadata holds the versions.
"""

from __future__ import annotations

import json
import os
import sys

# bitsandbytes wraps some portable-backend helpers in torch.compile with dynamic=False, which
# would recompile (minutes in all) for every new shape; eager execution computes the same values.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

DQ_BLOCKSIZE = 256  # what quantize_4bit passes to quantize_blockwise
_STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """Flattened numpy copy; bfloat16 is upcast to float32 (exact)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()


def _input_tensor(tensors: dict[str, np.ndarray], case: dict) -> torch.Tensor:
    arr = tensors[case["key"]]
    dtype = case.get("input_dtype", "float32")
    if dtype == "float32":
        if arr.dtype != np.float32:
            raise TypeError(f"case {case['name']}: tensor {case['key']} is {arr.dtype}, expected float32")
        return torch.from_numpy(arr.copy())
    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise TypeError(f"case {case['name']}: bfloat16 input must be stored as uint16 bits, got {arr.dtype}")
        return torch.from_numpy(arr.astype(np.int16)).view(torch.bfloat16)
    raise ValueError(f"case {case['name']}: unsupported input_dtype {dtype!r}")


def portable_quantize_blockwise(a: torch.Tensor, code: torch.Tensor,
                                blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' portable ("default" backend) 8-bit blockwise quantizer.

    The op is registered under the "default" key, i.e. the CompositeExplicitAutograd dispatch key;
    on CPU the "cpu" registration (the C++ kernel) wins, so we redispatch past it explicitly.
    Returns (codes uint8, absmax float32 [n_blocks]).
    """
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, a, code, blocksize)


def _quantize_case(tensors: dict[str, np.ndarray], case: dict, out: dict[str, np.ndarray]) -> None:
    name = case["name"]
    a = _input_tensor(tensors, case)
    storage = _STORAGE[case.get("quant_storage", "uint8")]
    packed, state = bnbf.quantize_4bit(a, blocksize=case["blocksize"], quant_type=case["quant_type"],
                                       compress_statistics=case["compress_statistics"],
                                       quant_storage=storage)
    out[f"{name}/packed"] = _as_numpy(packed.view(torch.uint8) if storage != torch.uint8 else packed)
    out[f"{name}/absmax"] = _as_numpy(state.absmax)
    if state.nested:
        # quantize_4bit discards the first-level scales once they are double-quantized; the
        # kernel is deterministic, so call it again for them.
        _, first_absmax = torch.ops.bitsandbytes.quantize_4bit.default(a, case["blocksize"], case["quant_type"],
                                                                       storage)
    else:
        first_absmax = state.absmax
    out[f"{name}/first_absmax"] = _as_numpy(first_absmax)
    if state.nested:
        if state.state2.blocksize != DQ_BLOCKSIZE:
            raise RuntimeError(f"unexpected nested blocksize {state.state2.blocksize}")
        offset = state.offset.reshape(1).float()
        out[f"{name}/offset"] = _as_numpy(offset)
        out[f"{name}/nested_absmax"] = _as_numpy(state.state2.absmax)
        out[f"{name}/nested_code"] = _as_numpy(state.state2.code)
        codes, scales = portable_quantize_blockwise(first_absmax - offset, state.state2.code, DQ_BLOCKSIZE)
        out[f"{name}/portable_codes"] = _as_numpy(codes)
        out[f"{name}/portable_scales"] = _as_numpy(scales)
    out[f"{name}/dequant"] = _as_numpy(bnbf.dequantize_4bit(packed, state))


def _blockwise_case(tensors: dict[str, np.ndarray], case: dict, out: dict[str, np.ndarray]) -> None:
    name = case["name"]
    a = _input_tensor(tensors, case)
    code = bnbf.create_dynamic_map(signed=True)
    codes, state = bnbf.quantize_blockwise(a, code=code, blocksize=case["blocksize"])
    out[f"{name}/cpp_codes"] = _as_numpy(codes)
    out[f"{name}/cpp_scales"] = _as_numpy(state.absmax)
    # a fresh table: older C++ kernels overwrote code[0] in place
    codes, scales = portable_quantize_blockwise(a, bnbf.create_dynamic_map(signed=True), case["blocksize"])
    out[f"{name}/portable_codes"] = _as_numpy(codes)
    out[f"{name}/portable_scales"] = _as_numpy(scales)


def _dequantize_case(tensors: dict[str, np.ndarray], case: dict, out: dict[str, np.ndarray]) -> None:
    name = case["name"]
    packed = torch.from_numpy(tensors[case["packed"]].copy()).reshape(-1, 1)
    absmax = torch.from_numpy(tensors[case["absmax"]].copy())
    shape = torch.Size(case["shape"])
    kw = dict(absmax=absmax, shape=shape, dtype=torch.float32, blocksize=case["blocksize"],
              quant_type=case["quant_type"], code=bnbf.get_4bit_type(case["quant_type"], device="cpu"))
    if "nested_absmax" in case:
        state2 = bnbf.QuantState(absmax=torch.from_numpy(tensors[case["nested_absmax"]].copy()),
                                 code=bnbf.create_dynamic_map(signed=True), blocksize=DQ_BLOCKSIZE,
                                 dtype=torch.float32)
        kw.update(offset=torch.tensor(case["offset"], dtype=torch.float32), state2=state2)
    state = bnbf.QuantState(**kw)
    out[f"{name}/dequant"] = _as_numpy(bnbf.dequantize_4bit(packed, state))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    in_path, cases_path, out_path = argv
    tensors = load_file(in_path)
    with open(cases_path) as f:
        cases = json.load(f)
    out: dict[str, np.ndarray] = {
        "tables/nf4": _as_numpy(bnbf.get_4bit_type("nf4", device="cpu")),
        "tables/fp4": _as_numpy(bnbf.get_4bit_type("fp4", device="cpu")),
        "tables/dynamic": _as_numpy(bnbf.create_dynamic_map(signed=True)),
    }
    handlers = {"quantize": _quantize_case, "blockwise": _blockwise_case, "dequantize": _dequantize_case}
    for case in cases:
        kind = case.get("kind", "quantize")
        if kind not in handlers:
            raise ValueError(f"case {case.get('name')}: unknown kind {kind!r}")
        with torch.no_grad():
            handlers[kind](tensors, case, out)
    meta = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}
    save_file(out, out_path, metadata=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
