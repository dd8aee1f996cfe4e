"""The audit section: the checks of the data, and the thresholds that stop training."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt

from forgeml.section import UNHASHED, Section


class NormalizeConfig(Section):
    """How text is normalised before rows are compared for duplicates."""

    lowercase: bool = True
    whitespace: bool = Field(True, description="collapse runs of whitespace and strip the ends")


class NearDuplicateConfig(Section):
    """MinHash LSH over word n-gram shingles."""

    enabled: bool = True
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    ngram: Annotated[int, Field(ge=1, le=16)] = 5


class FailOnConfig(Section):
    """A check fails when its value exceeds the threshold; null turns the check into a warning only."""

    leakage: Annotated[int, Field(ge=0)] | None = Field(0, description="test rows duplicating a training row")
    duplicate_fraction: Annotated[float, Field(ge=0, le=1)] | None = 0.05
    imbalance_ratio: Annotated[float, Field(ge=1)] | None = Field(
        50.0, description="largest / smallest class, when no rebalancing is chosen"
    )
    label_issue_fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    missing_fraction: Annotated[float, Field(ge=0, le=1)] | None = None


class AuditConfig(Section):
    """The data audit, and the thresholds that stop training."""

    enabled: bool = True
    normalize: NormalizeConfig = NormalizeConfig()
    near_duplicates: NearDuplicateConfig = NearDuplicateConfig()
    label_issues: bool = Field(True, description="cleanlab on out-of-fold probabilities of a fast model")
    cv_folds: Annotated[int, Field(ge=2, le=20)] = 5
    id_like_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.99, description="a column with at least this fraction of unique values is ID-like"
    )
    target_leak_score: Annotated[float, Field(gt=0.5, le=1)] = Field(
        0.98, description="a single feature whose cross-validated accuracy reaches this is a target leak"
    )
    sample_rows: PositiveInt = Field(
        20_000, description="the label-noise, target-leak and ID-like checks run on a seeded sample of this many rows"
    )
    memory_budget_mb: PositiveInt = Field(
        256,
        description="near-duplicate band keys past this size spill to disk (a temporary folder)",
        json_schema_extra=UNHASHED,
    )
    fail_on: FailOnConfig = FailOnConfig()
    examples: PositiveInt = Field(5, description="examples of each finding shown in the report")
