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
        # A classifier's class is explained, or a causal LM's next token where its family offers it.
        family = family_for(recipe.model)
        return bool(recipe.explain.methods) and (family.task.classifies or family.generates and family.explained)

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return file_hashes(RunDir.MODEL, RunDir.MANIFEST)(run)

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> Any:
        from forgeml.explaining.explain import explain

        return explain(recipe, run, context.console)
