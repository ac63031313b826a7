"""Test helper: write an NNX Llama's float params as an HF checkpoint folder (imported by test
modules and by subprocess workers, whose sys.path[0] is this folder)."""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx


def write_hf_folder(folder: str | os.PathLike, model: nnx.Module, hf: dict) -> None:
    """``config.json`` (``hf`` + llama type) and ``model.safetensors`` with torch names and
    ``[out, in]`` weights, from ``model``'s float params; ``folder`` must not exist."""
    from safetensors.numpy import save_file

    tensors = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            name = ".".join(str(p) for p in path)
            value = np.asarray(node.get_value(), np.float32)
            if name.endswith(".kernel"):
                name, value = name[: -len(".kernel")] + ".weight", value.T
            elif name.endswith(".embedding"):
                name = name[: -len(".embedding")] + ".weight"
            tensors[name] = np.ascontiguousarray(value)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({**hf, "model_type": "llama", "hidden_act": "silu"}, fh)
