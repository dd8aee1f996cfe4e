"""The prepare stage: clean, split, rebalance and store the data as shards (``data/``)."""

from __future__ import annotations

from forgeml.data.prepare import PrepareResult, prepare
from forgeml.data.sources import source_fingerprints
from forgeml.models.registry import family_for
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.stage import Context, Stage


class Prepare(Stage):
    name = "prepare"
    # The audit's normalisation and near-duplicate settings decide which rows are duplicates; the
    # model section decides the encoder (tokenizer, feature scales) fitted here.
    # The audit's sample stands for a training split too large to hold: the encoder is fitted on it.
    sections = ("data", "prepare", "audit.normalize", "audit.near_duplicates", "audit.sample_rows", "model")

    def check(self, recipe: Recipe) -> None:
        family_for(recipe.model).check_config(recipe.model)

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return source_fingerprints(recipe.data)

    def run(self, recipe: Recipe, run: RunDir, context: Context | None = None) -> PrepareResult:
        return prepare(recipe, run)
