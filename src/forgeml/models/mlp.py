"""``mlp``: a multi-layer perceptron for tables, with feature scaling inside the network."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, PositiveInt
from safetensors.torch import load_file, save_file
from torch import nn

from forgeml.models.inputs import FeatureInputs
from forgeml.models.registry import MODELS, Batch, Encoder, Splits
from forgeml.section import Section
from forgeml.tasks import CLASSIFICATION


class MLPConfig(Section):
    name: Literal["mlp"]
    hidden_sizes: list[PositiveInt] = [128, 64]
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1


class MLPNetwork(nn.Module):
    """Standardise with the training split's statistics (kept as buffers), then Linear-GELU-Dropout blocks."""

    def __init__(self, n_features: int, hidden_sizes: list[int], n_classes: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.mean) / self.std)


@dataclass
class MLPEncoder(Encoder):
    """Features as float32, with the training split's mean and scale (the network standardises)."""

    features: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fitted(cls, splits: Splits) -> MLPEncoder:
        x = splits.train[splits.feature_columns].to_numpy(np.float64)
        std = x.std(0, ddof=1) if len(x) > 1 else np.ones(x.shape[1])
        # Constant columns would divide by zero; leave them unscaled.
        return cls(list(splits.feature_columns), x.mean(0).tolist(), np.where(std > 0, std, 1.0).tolist())

    @classmethod
    def read(cls, folder: Path) -> MLPEncoder:
        return cls(**json.loads((folder / "scaling.json").read_text()))

    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame[self.features].astype("float32")  # stored beside the raw columns, under their names

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scaling.json").write_text(json.dumps(vars(self), indent=2))


@MODELS.register("mlp", MLPConfig)
class MLP(FeatureInputs):
    name = "mlp"
    task = CLASSIFICATION
    augmentations = frozenset({"gaussian_noise", "mixup_alpha"})

    def __init__(self, config: MLPConfig, features: list[str], labels: list[str]) -> None:
        self.config = config
        self.features = features
        self.labels = labels
        self.network = MLPNetwork(len(features), config.hidden_sizes, len(labels), config.dropout)

    @classmethod
    def fit_encoder(cls, config: MLPConfig, splits: Splits) -> MLPEncoder:
        return MLPEncoder.fitted(splits)

    @classmethod
    def load_encoder(cls, config: MLPConfig, folder: Path) -> MLPEncoder:
        return MLPEncoder.read(folder)

    @classmethod
    def create(cls, config: MLPConfig, encoder: MLPEncoder, labels: list[str], seed: int) -> MLP:
        torch.manual_seed(seed)
        family = cls(config, encoder.features, labels)
        family.network.mean.copy_(torch.tensor(encoder.mean))
        family.network.std.copy_(torch.tensor(encoder.std))
        return family

    def collate(self, items: list[Any], augment: Any | None, generator: torch.Generator | None) -> Batch:
        x = torch.stack([item[0] for item in items])
        y = torch.stack([item[1] for item in items])
        targets: torch.Tensor = y
        if augment is not None and augment.gaussian_noise > 0:
            # Noise in standardised units, so every feature is perturbed alike. Batches are built on
            # the CPU while the scale buffer lives wherever training moved the network.
            noise = torch.randn(x.shape, generator=generator) * augment.gaussian_noise
            x = x + noise * self.network.std.detach().to(x.device)
        if augment is not None and augment.mixup_alpha > 0:
            # Beta(alpha, alpha) from the loader's generator (torch's Beta only uses the global RNG),
            # so a resumed run replays the same mixing.
            seed = int(torch.randint(2**62, (1,), generator=generator))
            lam = float(np.random.default_rng(seed).beta(augment.mixup_alpha, augment.mixup_alpha))
            perm = torch.randperm(len(items), generator=generator)
            onehot = nn.functional.one_hot(y, len(self.labels)).float()
            x = lam * x + (1 - lam) * x[perm]
            targets = lam * onehot + (1 - lam) * onehot[perm]
        return Batch({"features": x}, targets, len(items))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.network.state_dict(), directory / "model.safetensors")
        config = {**self.config.model_dump(mode="json"), "features": self.features, "labels": self.labels}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        self.write_meta(directory, feature_columns=self.features)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> MLP:
        config = json.loads((directory / "config.json").read_text())
        features, labels = config.pop("features"), config.pop("labels")
        family = cls(MLPConfig(**config), features, labels)
        weights = load_file(directory / "model.safetensors") if weights is None else weights
        family.network.load_state_dict(weights, strict=bool(weights))
        return family

    def narrower(self, widths: list[int]) -> MLP:
        """A freshly initialised MLP with these hidden widths and this one's feature scaling."""
        other = MLP(self.config.model_copy(update={"hidden_sizes": widths}), self.features, self.labels)
        other.network.mean.copy_(self.network.mean)
        other.network.std.copy_(self.network.std)
        return other

    def student(self, layers: int | None, width: float) -> MLP:
        """Hidden layers ``width`` times as wide, freshly initialised, with the teacher's scaling."""
        return self.narrower([max(1, round(hidden * width)) for hidden in self.config.hidden_sizes])
