"""The compress stage: variants of the trained model measured side by side (``compress/``);
onnxruntime loads only when it runs."""

from __future__ import annotations

from typing import Any

from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.stage import Context, Stage, file_hashes


class Compress(Stage):
    name = "compress"
    sections = ("data", "prepare", "model", "train", "compress")

    def enabled(self, recipe: Recipe) -> bool:
        return bool(recipe.compress.methods)

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return file_hashes(RunDir.MODEL, RunDir.MANIFEST)(run)

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> Any:
        from forgeml.compression.compress import compress

        return compress(recipe, run, context.console)
