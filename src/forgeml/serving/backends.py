"""The model a server answers with: a variant of a run (the trained model, or one that
`forgeml compress` built), opened from its files, checked against the outputs recorded when it
was measured, and wrapped in the two calls the server makes: classify raw inputs, or stream a
language model's continuation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from forgeml.compression.load import load_variant
from forgeml.compression.variants import CHECK_FILE, VARIANT_FILE, Variant, recommended, torch_variant
from forgeml.errors import ForgeError
from forgeml.models.registry import load_family, trained_model_dir
from forgeml.rundir import RunDir

CHECK_TOLERANCE = 1e-3  # probabilities; the same files on the same kind of CPU agree far closer


@dataclass
class Served:
    variant: Variant
    version: str  # run/variant@content hash: changes whenever the files do

    def predict(self, inputs: list[Any]) -> torch.Tensor:
        """Class probabilities for raw inputs (texts or feature objects), one row each."""
        return self.variant.logits(self.variant.family.encode_inputs(inputs)).softmax(-1)

    def stream(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None) -> Iterator[str]:
        return self.variant.family.stream(prompt, max_new_tokens, temperature, top_k)


def variant_names(run_dir: Path) -> list[str]:
    folder = run_dir / RunDir.COMPRESS
    return sorted(p.name for p in folder.iterdir() if (p / VARIANT_FILE).exists()) if folder.is_dir() else []


def resolve(run_dir: Path, name: str) -> str:
    """``recommended`` -> the variant compress recommended, or ``trained`` where none was built."""
    if name != "recommended":
        return name
    row = recommended(run_dir)
    return row["name"] if row else "trained"


def open_model(run_dir: Path, name: str, threads: int | None) -> Served:
    """The run's variant ``name`` (or ``recommended``, or ``trained``), checked and ready."""
    name = resolve(run_dir, name)
    if name == "trained":
        folder = trained_model_dir(run_dir)
        variant = torch_variant("trained", "baseline", load_family(folder), folder)
    else:
        folder = run_dir / RunDir.COMPRESS / name
        if not (folder / VARIANT_FILE).exists():
            known = ", ".join(["recommended", "trained", *variant_names(run_dir)])
            raise ForgeError(f"--variant {name}: {run_dir} has no such variant; choose one of: {known}")
        variant = load_variant(folder, threads)
    if variant.family.generates and variant.backend != "torch":
        raise ForgeError(
            f"--variant {name}: generation samples token by token with a KV cache, which the {variant.backend} "
            "export does not hold; serve a PyTorch variant (trained, distilled, prune-*, torch-int8)"
        )
    check(variant)
    return Served(variant, f"{run_dir.resolve().name}/{name}@{content_hash(variant)}")


def content_hash(variant: Variant) -> str:
    digest = hashlib.sha256()
    for name in variant.weights:
        with (variant.folder / name).open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def check(variant: Variant) -> None:
    """Refuse a variant whose outputs on the recorded inputs differ from those recorded when it was
    measured (a changed file, another runtime version computing otherwise)."""
    path = variant.folder / CHECK_FILE
    if not path.exists():  # the trained model: compress records its outputs as the baseline's
        return
    stored = load_file(str(path))
    expected = stored.pop("probabilities")
    inputs = {key.removeprefix("input."): value for key, value in stored.items()}
    got = variant.logits(inputs).softmax(-1)
    difference = float((got - expected).abs().max())
    if difference > CHECK_TOLERANCE:
        raise ForgeError(
            f"{variant.folder}: the model's probabilities differ from those recorded when it was built by "
            f"{difference:.3g} (over {CHECK_TOLERANCE}); rebuild it with `forgeml compress`"
        )
