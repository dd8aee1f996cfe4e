"""A variant: a way to compute the trained model's logits, and the folder that holds it.

Every variant folder has a ``variant.json`` saying how to load it, so ``load.load_variant`` (the
server's entry point) needs nothing but the folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from forgeml.measure import size_bytes
from forgeml.models.registry import ModelFamily, load_family, logits_of
from forgeml.rundir import RunDir

VARIANT_FILE = "variant.json"
CHECK_FILE = "check.safetensors"  # a few test inputs and the probabilities measured on them
METRICS_FILE = "metrics.json"  # its row of the run's variants table
Logits = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Variant:
    name: str  # its folder under compress/
    method: str  # baseline, quantize, onnx, compile
    backend: str  # torch or onnxruntime
    family: ModelFamily  # preprocessing (tokenizer, features, labels) and, for torch, the network
    logits: Logits  # network inputs (as the family collates them) -> logits
    folder: Path
    weights: list[str]  # the files, relative to folder, whose bytes are the variant's size

    def size_bytes(self) -> int:
        return size_bytes(self.folder / name for name in self.weights)

    def record_check(self, inputs: dict[str, torch.Tensor]) -> None:
        """Keep ``inputs`` and this variant's probabilities on them, so whoever loads the folder
        (the server) can tell that it computes what was measured."""
        tensors = {f"input.{name}": value.contiguous() for name, value in inputs.items()}
        tensors["probabilities"] = self.logits(inputs).softmax(-1).contiguous()
        save_file(tensors, str(self.folder / CHECK_FILE))

    def write_record(self, **extra: Any) -> None:
        record = {"name": self.name, "method": self.method, "backend": self.backend, "weights": self.weights, **extra}
        (self.folder / VARIANT_FILE).write_text(json.dumps(record, indent=2))


def torch_logits(network: torch.nn.Module) -> Logits:
    network.eval()

    @torch.inference_mode()
    def run(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits_of(network(**inputs)).float()

    return run


def torch_variant(name: str, method: str, family: ModelFamily, folder: Path) -> Variant:
    """The variant of a family loaded from ``folder``, its weights the folder's safetensors."""
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    return Variant(name, method, "torch", family, torch_logits(family.network), folder, weights)


def saved_torch_variant(name: str, method: str, family: ModelFamily, folder: Path, **record: Any) -> Variant:
    """``torch_variant``, its record written, so ``load_variant`` finds it."""
    variant = torch_variant(name, method, family, folder)
    variant.write_record(**record)
    return variant


def tied_parameters(network: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a language model's head tied to its
    embedding); safetensors and ``named_parameters`` hold it under its first name only."""
    every = {name for name, _ in network.named_parameters(remove_duplicate=False)}
    return every - dict(network.named_parameters()).keys()


def recommended(run_dir: Path) -> dict[str, Any] | None:
    """The row of the run's variants table that compress recommended; None where it has not run."""
    table = run_dir / RunDir.VARIANTS
    if not table.exists():
        return None
    return next(row for row in json.loads(table.read_text()) if row["recommended"])


def preprocessing_copy(source: Variant, folder: Path) -> Path:
    """``folder`` (emptied) with the source's preprocessing files (tokenizer, config, labels), no weights."""
    shutil.rmtree(folder, ignore_errors=True)
    ignore = shutil.ignore_patterns("*.safetensors", "*.onnx", VARIANT_FILE, METRICS_FILE)
    shutil.copytree(source.folder, folder, ignore=ignore)
    return folder


def baseline(model_dir: Path, folder: Path) -> Variant:
    """The trained fp32 model as it is, copied so the compress folder stands alone."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(model_dir, folder)
    return saved_torch_variant("baseline", "baseline", load_family(folder), folder)
