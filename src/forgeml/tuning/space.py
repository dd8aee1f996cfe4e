"""The search space: recipe field paths mapped to distributions, sampled by an optuna trial and
applied to the recipe (through the Recipe model, so every sampled recipe is a valid one)."""

from __future__ import annotations

import copy
import json
from typing import Any

import optuna

from forgeml.errors import RecipeError
from forgeml.models.registry import family_for
from forgeml.recipe import Recipe, validate_recipe
from forgeml.tuning.config import CategoricalParam, FloatParam, IntParam, Param

# Fields the prepared data depends on: every trial trains on the run's one prepared data stage, so
# a space over them would train on data that does not match the trial's recipe.
PREPARED_SECTIONS = ("name", "data", "audit", "prepare", "tune", "model.name")

Scalar = None | bool | int | float | str


def encode(choice: Any) -> Scalar:
    """optuna stores scalar choices only; lists and mappings (e.g. hidden sizes) go in as JSON text."""
    return choice if choice is None or isinstance(choice, bool | int | float | str) else json.dumps(choice)


def with_values(recipe: Recipe, values: dict[str, Any], source: str = "recipe") -> Recipe:
    """``recipe`` with each dotted path set to its value, validated as a whole recipe."""
    data = copy.deepcopy(recipe.model_dump(mode="json"))
    for path, value in values.items():
        parts = path.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                kind = "not a recipe field" if child is None else f"a value ({child!r}), not a section"
                raise RecipeError(f"tune.space.{path}: {where} is {kind}")
            node = child
        node[parts[-1]] = value
    return validate_recipe(data, source=source)


def check_space(recipe: Recipe) -> None:
    """Refuse, before any trial runs, an empty space, a path the trials cannot vary, and bounds or
    choices that make an invalid recipe (an unknown field is reported by the recipe's validation)."""
    space = recipe.tune.space
    if not space:
        raise RecipeError(
            "tune.space is empty: name the recipe fields to search, e.g. "
            "tune.space: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}}"
        )
    refused = [f"model.{field}" for field in family_for(recipe.model).encoding_fields]
    for path, param in space.items():
        blocked = [p for p in (*PREPARED_SECTIONS, *refused) if path == p or path.startswith(p + ".")]
        if blocked:
            raise RecipeError(
                f"tune.space.{path}: cannot be tuned: every trial trains on the run's one prepared data, which "
                f"{blocked[0]} shapes; tune model and train fields (prepare variants as separate runs)"
            )
        for point in corner_values(param):
            with_values(recipe, {path: point}, source=f"tune.space.{path} = {point!r}")


def corner_values(param: Param) -> list[Any]:
    """The values that bound what a parameter can take: its ends, or every choice."""
    return param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]


def grid(space: dict[str, Param]) -> dict[str, list[Scalar]]:
    """Every value of each parameter, for the grid sampler; a continuous range has no grid."""
    values: dict[str, list[Scalar]] = {}
    for path, param in space.items():
        if isinstance(param, CategoricalParam):
            values[path] = [encode(choice) for choice in param.choices]
        elif isinstance(param, IntParam):
            values[path] = list(range(param.low, param.high + 1, param.step))
        elif param.step is not None:
            count = int((param.high - param.low) / param.step + 1e-9) + 1
            values[path] = [round(param.low + i * param.step, 12) for i in range(count)]
        else:
            raise RecipeError(
                f"tune.space.{path}: the grid sampler needs a finite set of values, and a float range without a "
                "step is continuous; give it a step, make it type: categorical, or choose another sampler"
            )
    return values


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """The trial's value of every parameter, as recipe values."""
    values: dict[str, Any] = {}
    for path, param in space.items():
        if isinstance(param, FloatParam):
            values[path] = trial.suggest_float(path, param.low, param.high, step=param.step, log=param.log)
        elif isinstance(param, IntParam):
            values[path] = trial.suggest_int(path, param.low, param.high, step=param.step, log=param.log)
        else:
            picked = trial.suggest_categorical(path, [encode(choice) for choice in param.choices])
            values[path] = decode(param, picked)
    return values


def decode(param: CategoricalParam, stored: Scalar) -> Any:
    # A trial of an earlier call may hold a choice the space no longer lists: keep it as stored.
    return next((choice for choice in param.choices if encode(choice) == stored), stored)


def recipe_values(space: dict[str, Param], params: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's stored parameters as recipe values."""
    return {
        path: decode(space[path], value) if isinstance(space.get(path), CategoricalParam) else value
        for path, value in params.items()
    }
