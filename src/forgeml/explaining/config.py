"""The explain section: which methods explain the trained model, and how each is scored."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from forgeml.section import Section

ExplainMethod = Literal["all", "ig", "lime", "shap", "attention"]


class ExplainConfig(Section):
    """Explanations of the trained model's predictions (``forgeml explain``), each method scored by
    the deletion test."""

    methods: list[ExplainMethod] = Field(
        ["all"],
        description="ig (integrated gradients), lime, shap (tables), attention (text: maps and rollout); "
        "all: every method the model's inputs allow; empty: the stage does not run in `forgeml run`",
    )
    n: PositiveInt = Field(20, description="test rows explained: a sample of N drawn with explain.seed")
    ig_steps: PositiveInt = Field(50, description="integrated gradients: steps from the baseline to the input")
    lime_samples: Annotated[int, Field(ge=10)] = Field(500, description="LIME: perturbed inputs per explanation")
    shap_evals: PositiveInt = Field(500, description="SHAP: model evaluations per row (permutation explainer)")
    shap_background: PositiveInt = Field(100, description="SHAP: training rows that stand for an absent feature")
    deletion_steps: PositiveInt = Field(10, description="deletion test: remove up to this many tokens or features")
    random_orders: PositiveInt = Field(5, description="deletion test: random removal orders per input")
    surrogate_leaves: Annotated[int, Field(ge=2, le=64)] = Field(
        16, description="the surrogate tree's rules at most (leaves, grown best split first)"
    )
    continuation: str | None = Field(
        None, description="causal LMs: the continuation whose probability is attributed; default: the next token"
    )
    seed: int = 0
