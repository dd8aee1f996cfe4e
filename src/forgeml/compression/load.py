"""A compressed variant read back from its folder alone, whichever method made it. It sits above
the methods' modules (which build on ``variants``), so no module imports one that imports it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from forgeml.compression.onnx import load_onnx
from forgeml.compression.prune import load_pruned
from forgeml.compression.quantize import load_torch_int8
from forgeml.compression.variants import VARIANT_FILE, Variant, torch_logits
from forgeml.errors import RunDirError
from forgeml.models.registry import load_family


def load_variant(folder: Path, threads: int | None = None) -> Variant:
    """A variant from its folder alone (``compress/<name>``)."""
    path = folder / VARIANT_FILE
    if not path.exists():
        raise RunDirError(f"{folder} is not a compressed variant (no {VARIANT_FILE}); run `forgeml compress` first")
    record = json.loads(path.read_text())
    name, method, weights = record["name"], record["method"], record["weights"]
    if record["backend"] == "onnxruntime":
        family, logits = load_onnx(folder, weights[0], threads)
        return Variant(name, method, "onnxruntime", family, logits, folder, weights)
    if method == "quantize":
        family = load_torch_int8(folder)
    elif method == "prune":
        family = load_pruned(folder)
    elif method == "compile":  # the baseline's files, compiled when loaded
        family = load_family(folder / record["source"])
    else:
        family = load_family(folder)
    network = torch.compile(family.network, dynamic=True) if method == "compile" else family.network
    return Variant(name, method, "torch", family, torch_logits(network), folder, weights)
