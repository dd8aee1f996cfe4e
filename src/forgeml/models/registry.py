"""The model-family contract and its registry.

A family turns prepared data into batches for one kind of network, builds that network,
and saves/loads it with its preprocessing (tokenizer, feature scaling) so that
``forgeml.load`` gives back a model that predicts from raw inputs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from forgeml.errors import RunDirError
from forgeml.registry import Registry

MODELS: Registry[type[ModelFamily]] = Registry("model")

META_FILE = "forgeml.json"


@dataclass
class Splits:
    """Prepared rows of each split, and what the columns mean."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    text_column: str | None = None
    feature_columns: list[str] = field(default_factory=list)
    label_column: str | None = None
    labels: list[str] = field(default_factory=list)  # class names, in class-index order


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # passed to the network as keyword arguments
    targets: torch.Tensor  # class indices, class probabilities (mixup) or next tokens
    size: int  # number of rows (samples or sequences)
    tokens: int = 0  # number of target tokens (language models), for throughput

    def to(self, device: torch.device) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            self.targets.to(device, non_blocking=True),
            self.size,
            self.tokens,
        )


TARGET = "_target"  # stored column: the class index of each row


class Encoder(ABC):
    """Turns raw rows into what the network reads (token ids, token chunks, features). It is fitted
    on the training split by the prepare stage and saved beside the shards, so tokenisation
    happens once and training streams ready rows."""

    @abstractmethod
    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Columns to store for these rows (the same rows, or for language models token chunks)."""

    @abstractmethod
    def save(self, folder: Path) -> None: ...

    def rows(self, frame: pd.DataFrame, label_column: str | None, labels: list[str]) -> pd.DataFrame:
        """What a shard stores: the raw columns (for audits and explanations), the encoded columns and
        the class index; for language models (no label) the token chunks alone."""
        encoded = self.encode(frame)
        if label_column is None:
            return encoded
        index = {label: i for i, label in enumerate(labels)}
        raw = frame.drop(columns=[c for c in encoded.columns if c in frame.columns])
        return pd.concat([raw, encoded], axis=1).assign(**{TARGET: frame[label_column].map(index).astype("int64")})

    def table(self, frame: pd.DataFrame, label_column: str | None, labels: list[str]) -> pa.Table:
        return pa.Table.from_pandas(self.rows(frame, label_column, labels), preserve_index=False)


class ModelFamily(ABC):
    """One kind of model: its encoder, its network, its file format."""

    name: ClassVar[str]
    inputs: ClassVar[Literal["text", "features"]]
    task: ClassVar[Literal["classification", "lm"]]

    network: nn.Module
    labels: list[str]

    @classmethod
    @abstractmethod
    def fit_encoder(cls, config: Any, splits: Splits) -> Encoder:
        """Fit the encoder on the training split (train a tokenizer, measure feature scales)."""

    @classmethod
    @abstractmethod
    def load_encoder(cls, config: Any, folder: Path) -> Encoder: ...

    @classmethod
    @abstractmethod
    def create(cls, config: Any, encoder: Encoder, labels: list[str], seed: int) -> ModelFamily:
        """Build a fresh network for this encoder's inputs."""

    @classmethod
    def fit(cls, config: Any, splits: Splits, seed: int) -> tuple[ModelFamily, Encoder]:
        """An encoder fitted on ``splits.train`` and a fresh network: prepare and create, in memory."""
        encoder = cls.fit_encoder(config, splits)
        return cls.create(config, encoder, splits.labels, seed), encoder

    @abstractmethod
    def items(self, table: pa.Table) -> Sequence[Any]:
        """Stored rows (the encoder's columns) -> one item per row for ``collate``."""

    @abstractmethod
    def collate(self, items: list[Any], augment: Any | None, generator: torch.Generator | None) -> Batch:
        """Stack items into a batch; ``augment`` (an AugmentConfig) is given for training batches only."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the network as safetensors with its config and preprocessing, no pickle."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> ModelFamily:
        """Rebuild from ``save``'s files; ``weights``: these instead of the weights file (which may
        then be absent), none at all (``{}``) for a family that only preprocesses for another runtime."""

    def encode_inputs(self, inputs: list[Any]) -> dict[str, torch.Tensor]:
        """Raw inputs (texts or feature objects) -> network inputs, for prediction."""
        raise NotImplementedError(f"{self.name} does not classify inputs")

    @torch.no_grad()
    def predict_proba(self, inputs: list[Any]) -> torch.Tensor:
        """Class probabilities for raw inputs, in eval mode."""
        self.network.eval()
        return logits_of(self.network(**self.encode_inputs(inputs))).float().softmax(-1)

    def flops_per_token(self) -> float | None:
        """Training FLOPs per token (forward + backward), where the family can say."""
        return None

    def blocks(self) -> nn.ModuleList | None:
        """The repeated blocks (transformer layers) that sharding and activation checkpointing wrap
        one by one; None for networks without them."""
        return None

    def tensor_parallel_plan(self) -> dict[str, Any] | None:
        """Module path -> torch ParallelStyle for tensor parallelism; None where it is not offered."""
        return None

    @classmethod
    def tensor_parallel_sizes(cls, config: Any) -> dict[str, int]:
        """What tensor parallelism splits evenly across its ranks (the recipe field or quantity that
        sets it -> its size), so a degree that does not divide one is refused before any mesh is built."""
        return {}

    def write_meta(self, directory: Path, **extra: Any) -> None:
        meta = {"family": self.name, "task": self.task, "labels": self.labels, **extra}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def logits_of(output: Any) -> torch.Tensor:
    """Networks return a tensor, or a transformers output holding ``logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def trained_model_dir(run_dir: Path) -> Path:
    """``run_dir``'s trained model folder; an error saying how to train one when there is none."""
    folder = run_dir / "train" / "model"
    if not (folder / META_FILE).exists():
        raise RunDirError(
            f"{run_dir} holds no trained model ({folder / META_FILE} is missing); "
            f"train it first: forgeml train {run_dir / 'recipe.yaml'} --run-dir {run_dir}"
        )
    return folder


def load_family(directory: Path, weights: dict[str, torch.Tensor] | None = None) -> ModelFamily:
    meta = json.loads((directory / META_FILE).read_text())
    return MODELS.get(meta["family"]).build.load(directory, weights)
