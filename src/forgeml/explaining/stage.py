"""The explain stage: attributions for test rows, each method scored by the deletion test
(``explain/``); captum, lime and shap load only when it runs."""

from __future__ import annotations

from typing import Any

from forgeml.models.registry import family_for
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.stage import Context, Stage, file_hashes


class Explain(Stage):
    name = "explain"
    sections = ("data", "prepare", "model", "train", "explain")

    def enabled(self, recipe: Recipe) -> bool:
        # A language model has no class to explain.
        return bool(recipe.explain.methods) and family_for(recipe.model).task.classifies

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return file_hashes(RunDir.MODEL, RunDir.MANIFEST)(run)

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> Any:
        from forgeml.explaining.explain import explain

        return explain(recipe, run, context.console)
