"""The data and prepare sections: where the rows come from, and how they are cleaned, split and stored."""

from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, PositiveInt, Tag, field_validator, model_validator

from forgeml.section import UNHASHED, Section

# ---------------------------------------------------------------- the built-in datasets' options


class StdlibDocstrings(Section):
    name: Literal["stdlib-docstrings"]
    top_k_labels: PositiveInt | None = Field(None, description="keep the k largest packages")


class StdlibCode(Section):
    name: Literal["stdlib-code"]


class StdlibDocstringSFT(Section):
    name: Literal["stdlib-docstring-sft"]
    body_lines: Annotated[int, Field(ge=0)] = Field(3, description="lines of the function's body shown, at most")
    reply: Literal["first_paragraph", "whole"] = Field(
        "first_paragraph", description="the reply: the docstring's first paragraph, or all of it"
    )


class BreastCancer(Section):
    name: Literal["breast-cancer"]


class Digits(Section):
    name: Literal["digits"]


class Wine(Section):
    name: Literal["wine"]


class SyntheticImbalanced(Section):
    name: Literal["synthetic-imbalanced"]
    n_samples: PositiveInt = Field(2000, description="number of rows")
    n_features: PositiveInt = Field(20, description="number of features")
    n_classes: Annotated[int, Field(ge=2)] = 2
    class_ratio: Annotated[float, Field(ge=1.0)] = Field(10.0, description="size of the largest class / the smallest")

    @property
    def features_needed(self) -> int:
        """Two clusters per class sit on corners of a hypercube of the informative features."""
        return math.ceil(math.log2(2 * self.n_classes))

    @model_validator(mode="after")
    def _enough_features(self) -> SyntheticImbalanced:
        if self.n_features < self.features_needed:
            raise ValueError(
                f"n_features={self.n_features} is too small for n_classes={self.n_classes}: "
                f"use at least {self.features_needed}"
            )
        return self


DATASET_CONFIGS = (StdlibDocstrings, StdlibCode, StdlibDocstringSFT, BreastCancer, Digits, Wine, SyntheticImbalanced)
BuiltinDataset = Union[DATASET_CONFIGS]  # noqa: UP007 - a union of a tuple of classes
DATASET_NAMES = tuple(typing.get_args(c.model_fields["name"].annotation)[0] for c in DATASET_CONFIGS)
FILE = "file"  # the tag of a source that is a path or URL


def datasets_taking(option: str) -> list[str]:
    """The built-in datasets with this option."""
    return [n for c, n in zip(DATASET_CONFIGS, DATASET_NAMES, strict=True) if option in c.model_fields]


def _source_kind(value: Any) -> str | None:
    """A mapping (or a dataset config) is a built-in with options, chosen by its name; anything
    else is a file (DataConfig has turned a built-in's name into a mapping before)."""
    if isinstance(value, dict):
        return value.get("name")
    return value.name if isinstance(value, DATASET_CONFIGS) else FILE


def as_dataset(value: Any) -> Any:
    """A built-in's name as the mapping of its options; anything else as it is."""
    return {"name": value} if isinstance(value, str) and value in DATASET_NAMES else value


_TAGGED = tuple(Annotated[c, Tag(n)] for c, n in zip(DATASET_CONFIGS, DATASET_NAMES, strict=True))
Source = Annotated[Union[(*_TAGGED, Annotated[str, Tag(FILE)])], Discriminator(_source_kind)]  # noqa: UP007


# ---------------------------------------------------------------- the sections


class DataConfig(Section):
    """Where the rows come from and which columns matter."""

    source: Source = Field(
        description="a CSV/Parquet/JSONL path or fsspec URL, or a built-in dataset: its name, or "
        "{name: NAME, OPTION: VALUE, ...} with its options"
    )
    file_format: Literal["auto", "csv", "parquet", "jsonl"] = Field("auto", description="auto: from the suffix")
    format: Literal["text", "prompt_completion", "chat"] | None = Field(
        None,
        description="what one row is for a causal LM: a document (text), a prompt and its completion "
        "(prompt_completion), or a conversation (chat); classifiers leave it unset",
    )
    text_column: str | None = None
    messages_column: str = Field("messages", description="chat: the column of [{role, content}, ...] lists")
    prompt_column: str = Field("prompt", description="prompt_completion: the prompt column")
    completion_column: str = Field("completion", description="prompt_completion: the completion column")
    feature_columns: list[str] | None = None
    label_column: str | None = None
    group_column: str | None = Field(None, description="rows sharing a value stay in one split")
    test_source: str | None = Field(None, description="a separate test set (same columns); else split off")
    on_bad_rows: Literal["fail", "skip"] = Field("fail", description="malformed CSV/JSONL rows: stop, or skip")
    max_rows: PositiveInt | None = Field(None, description="keep a seeded random sample of this many rows")
    batch_rows: PositiveInt = Field(
        16_384, description="rows read at a time: what bounds memory with the text length", json_schema_extra=UNHASHED
    )
    seed: int = 0

    @field_validator("source", mode="before")
    @classmethod
    def _name_is_a_dataset(cls, value: Any) -> Any:
        return as_dataset(value)

    @property
    def dataset(self) -> BuiltinDataset | None:
        """The built-in dataset the rows come from, or None for a file."""
        return None if isinstance(self.source, str) else self.source


class PrepareConfig(Section):
    """Cleaning, splitting, rebalancing and storing the data."""

    deduplicate: Literal["none", "exact", "near"] = Field(
        "near", description="drop all but the first row of each exact (and near) duplicate group"
    )
    drop_leaked: bool = Field(True, description="drop test rows that duplicate a training row")
    impute: Literal["none", "median", "most_frequent", "drop"] = "none"
    impute_columns: dict[str, Literal["none", "median", "most_frequent", "drop"]] = {}
    rebalance: Literal["none", "auto", "class_weights", "focal", "oversample", "undersample", "smote"] = "none"
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    stratify: bool = True
    packing: bool = Field(
        False, description="causal LMs: pack several examples into each sequence, attention kept within each"
    )
    shard_rows: PositiveInt = Field(50_000, description="rows per Parquet shard")
    workers: PositiveInt = Field(
        1, description="processes that encode (tokenize) and write the shards", json_schema_extra=UNHASHED
    )
    memory_budget_mb: PositiveInt = Field(
        4096,
        description="rebalancing by resampling holds the training split in memory: at most this much",
        json_schema_extra=UNHASHED,
    )
    shards_url: str | None = Field(
        None, description="write the shards here (path or fsspec URL: file://, s3://, ...) instead of data/"
    )
    seed: int = 0
