"""The model-family contract and its registry.

A family turns prepared data into batches for one kind of network, builds that network,
and saves/loads it with its preprocessing (tokenizer, feature scaling) so that
``forgeml.load`` gives back a model that predicts from raw inputs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from forgeml.errors import ForgeError, NotOffered, RunDirError
from forgeml.registry import Registry
from forgeml.rundir import RunDir
from forgeml.tasks import Task

MODELS: Registry[type[ModelFamily]] = Registry("model", group="forgeml.models")

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
    format: str | None = None  # a causal LM's data.format: text, prompt_completion or chat


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
ROW_ID = "_row"  # prepared column: the position of the row in the source, so findings can point back to it


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

    def packing(self) -> Encoder:
        """This encoder, packing several examples into each stored row (prepare.packing)."""
        raise NotOffered("prepare.packing: this model's rows are not packed; set it to false")

    def notes(self) -> list[str]:
        """What encoding did to the rows that a user should know (examples left out), for prepare's notes."""
        return []

    def counts(self) -> dict[str, int]:
        """What ``notes`` reports, as numbers: prepare's worker processes each encode with a copy of the
        encoder, and their counts are added up into the one that writes the notes (``add_counts``)."""
        return {}

    def add_counts(self, counts: dict[str, int]) -> None:  # noqa: B027 - nothing to add for most encoders
        """Add the counts of a copy that encoded other rows."""

    def shown(self, frame: pd.DataFrame) -> list[tuple[str, bool]] | None:
        """The first row as the model trains on it, where that says more than the row: its text in
        runs, each with whether a loss falls on it."""
        return None


class ModelFamily(ABC):
    """One kind of model: its encoder, its network, its file format, and what the stages may do with
    it. Everything a stage needs to know about a model is asked of its family: the declared
    capabilities below, and the methods after ``load`` (each with a default that says "not offered")."""

    name: ClassVar[str]
    inputs: ClassVar[Literal["text", "features"]]  # what one raw input is: a text, or a row of features
    task: ClassVar[Task]  # what it predicts: its loss, metrics and scoring
    augmentations: ClassVar[frozenset[str]] = frozenset()  # the train.augment options its collate applies
    encoding_fields: ClassVar[tuple[str, ...]] = ()  # model fields the prepared data depends on (not tunable)
    generates: ClassVar[bool] = False  # continues a prompt token by token (``stream``)
    rows_interpolate: ClassVar[bool] = False  # a row between two training rows is a row (SMOTE may rebalance)
    takes_instances: ClassVar[bool] = False  # trains a network the user built (``adopt``, forgeml.train(model=))
    formats: ClassVar[tuple[str, ...]] = ()  # the data.format values it reads (causal LMs); () for rows with labels
    packs: ClassVar[bool] = False  # its encoder packs several examples into a row (prepare.packing)
    explained: ClassVar[bool] = True  # the explain stage covers it (a classifier, or a causal LM with a tokenizer)

    config: Any  # the recipe's model section it was built from
    network: nn.Module
    labels: list[str]

    @classmethod
    def for_config(cls, config: Any) -> type[ModelFamily]:
        """The family class that builds models of ``config``: this one, unless the family picks one
        of its kinds by the config (``module`` reads texts or features, as the recipe says)."""
        return cls

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse, before any stage runs, a config whose files cannot be found (a checkpoint folder),
        so that the error comes before the audit's and prepare's work, not after."""
        return None  # most families read no files of their own

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
    def adopt(cls, config: Any, encoder: Encoder, labels: list[str], network: nn.Module) -> ModelFamily:
        """A model around a network the user built (``forgeml.train(model=...)``), where the family takes one."""
        raise ForgeError(
            f"model=: {cls.name} models are built from the recipe; for your own network use model.name: module"
        )

    @classmethod
    def fit(cls, config: Any, splits: Splits, seed: int) -> tuple[ModelFamily, Encoder]:
        """An encoder fitted on ``splits.train`` and a fresh network: prepare and create, in memory."""
        encoder = cls.fit_encoder(config, splits)
        return cls.create(config, encoder, splits.labels, seed), encoder

    @classmethod
    def input_columns(cls, text_column: str | None, feature_columns: list[str] | None) -> tuple[str | None, list[str]]:
        """(text column, feature columns) of a source's that the model reads (``TextInputs`` and
        ``FeatureInputs`` say)."""
        raise NotImplementedError(f"{cls.__name__}: mix in TextInputs or FeatureInputs, or define input_columns")

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
    def tensor_parallel_refusal(cls, config: Any) -> str | None:
        """Why a model of this config cannot be split by a tensor-parallel plan; None where it can."""
        return (
            None if cls.tensor_parallel_plan is not ModelFamily.tensor_parallel_plan else f"{cls.name} models have none"
        )

    @classmethod
    def tensor_parallel_sizes(cls, config: Any) -> dict[str, int]:
        """What tensor parallelism splits evenly across its ranks (the recipe field or quantity that
        sets it -> its size), so a degree that does not divide one is refused before any mesh is built."""
        return {}

    def input_embeddings(self) -> nn.Module | None:
        """The layer that turns token ids into vectors (integrated gradients attribute to its output);
        None where the inputs are not tokens."""
        return None

    def explanation_limits(self) -> dict[str, str]:
        """Explanation methods that do not apply to this model (``ig``, ``attention``, ...), each with why."""
        return {}

    def student(self, layers: int | None, width: float) -> ModelFamily:
        """A smaller model of this family for distillation, with what it can reuse of this one:
        ``layers`` blocks (None: half) of a network with blocks, hidden layers ``width`` times as
        wide otherwise."""
        raise NotOffered(f"{self.name} models offer no distillation student")

    def block_layout(self, block: nn.Module) -> BlockLayout:
        """Where structured pruning cuts one of ``blocks()``: its attention heads and feed-forward channels."""
        raise NotOffered(f"{self.name} models do not say how to cut their blocks")

    def narrower(self, widths: list[int]) -> ModelFamily:
        """A fresh copy of a network without blocks whose hidden layers have these widths (the
        structured pruning of an MLP), keeping this one's preprocessing."""
        raise NotOffered(f"{self.name} models cannot be narrowed")

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """The prompt's continuation, one piece of text per sampled token (families that generate)."""
        raise NotOffered(f"{self.name} models do not generate text")

    def prompt_of(self, item: Any) -> list[int] | None:
        """A stored row's prompt (families that generate): what compress continues greedily with
        every variant, to see that each continues it as the trained model does."""
        raise NotOffered(f"{self.name} models do not generate text")

    def generation_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network inputs (as ``collate`` names them) for rows of token ids (batch, length), to read their logits."""
        raise NotOffered(f"{self.name} models do not generate text")

    def dynamic_axes(self, names: list[str]) -> dict[str, dict[int, str]]:
        """The axes of each network input that vary between calls, for an ONNX export: the batch."""
        return {name: {0: "batch"} for name in names}

    def split_inputs(self, frame: pd.DataFrame, splits: Splits) -> list[Any]:
        """A prepared split's rows as raw inputs, as a user would send them."""
        raise NotImplementedError

    def check_rows(self, items: list[Any], text_column: str | None, where: str) -> list[Any]:
        """Inputs given by a user (strings, or records from a file) as this family reads them, each
        bad row named with ``where``."""
        raise NotImplementedError

    def request_item(self, max_chars: int) -> Any:
        """The type of one input of a /v1/predict request, for validation."""
        raise NotImplementedError

    def example_input(self) -> Any:
        """One raw input, to warm the model up."""
        raise NotImplementedError

    def write_meta(self, directory: Path, **extra: Any) -> None:
        meta = {"family": self.name, "task": self.task.name, "labels": self.labels, **extra}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))


Slot = tuple[nn.Module, str]  # a linear layer as (the module holding it, its attribute name)


@dataclass
class BlockLayout:
    """A transformer block as structured pruning sees it: its head size, its query / key / value and
    output projections, its feed-forward up and down projections, and a hook that records the number
    of heads kept where the attention module stores it."""

    head_size: int
    qkv: list[Slot]
    out: Slot
    up: Slot
    down: Slot
    set_heads: Callable[[int], None] = lambda kept: None


def spread(n: int, keep: int) -> list[int]:
    """``keep`` of ``n`` layer indices, evenly spaced from the first to the last (as DistilBERT
    takes every other layer): a student keeps the teacher's top layer, the one its head reads."""
    return sorted({round(i * (n - 1) / max(keep - 1, 1)) for i in range(keep)})


def is_linear(module: nn.Module) -> bool:
    """A linear layer: torch's, or transformers' Conv1D (GPT-2's, its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def logits_of(output: Any) -> torch.Tensor:
    """Networks return a tensor, or a transformers output holding ``logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def trained_model_dir(run_dir: Path) -> Path:
    """``run_dir``'s trained model folder; an error saying how to train one when there is none."""
    folder = run_dir / RunDir.MODEL
    if not (folder / META_FILE).exists():
        raise RunDirError(
            f"{run_dir} holds no trained model ({folder / META_FILE} is missing); "
            f"train it first: forgeml train {run_dir / RunDir.RECIPE} --run-dir {run_dir}"
        )
    return folder


def family_for(model: Any) -> type[ModelFamily]:
    """The family class of a recipe's model section."""
    return MODELS.get(model.name).build.for_config(model)


def load_family(directory: Path, weights: dict[str, torch.Tensor] | None = None) -> ModelFamily:
    meta = json.loads((directory / META_FILE).read_text())
    return MODELS.get(meta["family"]).build.load(directory, weights)
