"""The tune stage: a study over the recipe's tune.space (``tune/``); optuna loads only when it runs."""

from __future__ import annotations

from typing import Any

from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.stage import Context, Stage, file_hashes


class Tune(Stage):
    name = "tune"
    sections = ("data", "prepare", "model", "train", "tune")

    def enabled(self, recipe: Recipe) -> bool:
        return bool(recipe.tune.space)

    def check(self, recipe: Recipe) -> None:
        from forgeml.tuning.study import check_tune

        check_tune(recipe)

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return file_hashes(RunDir.MANIFEST)(run)

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> Any:
        from forgeml.tuning.study import run_study

        return run_study(recipe, run, context.console)
