"""The data and prepare sections: where the rows come from, and how they are cleaned, split and stored."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from forgeml.section import Section


class DataConfig(Section):
    """Where the rows come from and which columns matter."""

    source: str = Field(description="a built-in dataset name, or a CSV/Parquet/JSONL path or fsspec URL")
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    text_column: str | None = None
    feature_columns: list[str] | None = None
    label_column: str | None = None
    group_column: str | None = Field(None, description="rows sharing a value stay in one split")
    test_source: str | None = Field(None, description="a separate test set (same columns); else split off")
    on_bad_rows: Literal["fail", "skip"] = Field("fail", description="malformed CSV/JSONL rows: stop, or skip")
    max_rows: PositiveInt | None = Field(None, description="keep a seeded random sample of this many rows")
    seed: int = 0
    # Options of the built-in datasets.
    top_k_labels: PositiveInt | None = Field(None, description="stdlib-docstrings: keep the k largest packages")
    n_samples: PositiveInt | None = Field(None, description="synthetic-imbalanced: number of rows")
    n_features: PositiveInt | None = Field(None, description="synthetic-imbalanced: number of features")
    n_classes: Annotated[int, Field(ge=2)] | None = Field(None, description="synthetic-imbalanced: classes")
    class_ratio: Annotated[float, Field(ge=1.0)] | None = Field(
        None, description="synthetic-imbalanced: size of the largest class / the smallest"
    )


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
    shard_rows: PositiveInt = Field(50_000, description="rows per Parquet shard")
    shards_url: str | None = Field(
        None, description="write the shards here (path or fsspec URL: file://, s3://, ...) instead of data/"
    )
    seed: int = 0
