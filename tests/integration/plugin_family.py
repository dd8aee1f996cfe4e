"""A model family that lives outside forgeml, found through the ``forgeml.models`` entry point
(test_plugins.py declares it): multinomial logistic regression on standardised features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from forgeml.models import MODELS
from forgeml.models.inputs import FeatureInputs
from forgeml.models.registry import TARGET, Batch, Encoder, Splits
from forgeml.section import Section
from forgeml.tasks import CLASSIFICATION


class SoftmaxConfig(Section):
    name: Literal["softmax-regression"]
    bias: bool = Field(True, description="a bias per class")


class Network(nn.Module):
    def __init__(self, n_features: int, n_classes: int, bias: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.linear = nn.Linear(n_features, n_classes, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


@dataclass
class Scaling(Encoder):
    features: list[str]
    mean: list[float]
    std: list[float]

    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame[self.features].astype("float32")

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scaling.json").write_text(json.dumps(vars(self)))


@MODELS.register("softmax-regression", SoftmaxConfig)
class SoftmaxRegression(FeatureInputs):
    name = "softmax-regression"
    task = CLASSIFICATION

    def __init__(self, config: SoftmaxConfig, scaling: Scaling, labels: list[str]) -> None:
        self.config, self.scaling, self.features, self.labels = config, scaling, scaling.features, labels
        self.network = Network(len(scaling.features), len(labels), config.bias)
        self.network.mean.copy_(torch.tensor(scaling.mean))
        self.network.std.copy_(torch.tensor(scaling.std))

    @classmethod
    def fit_encoder(cls, config: SoftmaxConfig, splits: Splits) -> Scaling:
        x = splits.train[splits.feature_columns].to_numpy(np.float64)
        std = x.std(0)
        return Scaling(list(splits.feature_columns), x.mean(0).tolist(), np.where(std > 0, std, 1.0).tolist())

    @classmethod
    def load_encoder(cls, config: SoftmaxConfig, folder: Path) -> Scaling:
        return Scaling(**json.loads((folder / "scaling.json").read_text()))

    @classmethod
    def create(cls, config: SoftmaxConfig, encoder: Scaling, labels: list[str], seed: int) -> SoftmaxRegression:
        torch.manual_seed(seed)
        return cls(config, encoder, labels)

    def items(self, table: pa.Table) -> list[Any]:
        x = np.column_stack([table.column(f).to_numpy() for f in self.features]).astype(np.float32)
        return list(zip(torch.from_numpy(x), table.column(TARGET).to_pylist(), strict=True))

    def collate(self, items: list[Any], augment: Any | None, generator: torch.Generator | None) -> Batch:
        x = torch.stack([x for x, _ in items])
        return Batch({"features": x}, torch.tensor([y for _, y in items], dtype=torch.long), len(items))

    def encode_inputs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"features": torch.tensor([[float(r[f]) for f in self.features] for r in rows], dtype=torch.float32)}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.network.state_dict(), directory / "model.safetensors")
        saved = {"config": self.config.model_dump(), "scaling": vars(self.scaling), "labels": self.labels}
        (directory / "softmax.json").write_text(json.dumps(saved))
        self.write_meta(directory)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> SoftmaxRegression:
        saved = json.loads((directory / "softmax.json").read_text())
        family = cls(SoftmaxConfig(**saved["config"]), Scaling(**saved["scaling"]), saved["labels"])
        weights = load_file(directory / "model.safetensors") if weights is None else weights
        family.network.load_state_dict(weights, strict=bool(weights))
        family.network.eval()
        return family
