"""The tune section: the search space, the objectives, and the sampler and pruner, each a
config that builds its Optuna object (optuna is imported only when a study runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, PositiveInt, field_validator, model_validator

from forgeml.section import Section

if TYPE_CHECKING:
    import optuna


class FloatParam(Section):
    """A float in [low, high]; with ``step``, only low, low + step, ... (finite: a grid can take it)."""

    type: Literal["float"]
    low: float
    high: float
    step: Annotated[float, Field(gt=0)] | None = None
    log: bool = Field(False, description="sample on a log scale (low > 0)")

    @model_validator(mode="after")
    def _check_range(self) -> FloatParam:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("a log scale takes no step")
        return self


class IntParam(Section):
    """An integer in [low, high], every ``step``."""

    type: Literal["int"]
    low: int
    high: int
    step: PositiveInt = 1
    log: bool = Field(False, description="sample on a log scale (low >= 1, step 1)")

    @model_validator(mode="after")
    def _check_range(self) -> IntParam:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("a log scale takes no step")
        return self


class CategoricalParam(Section):
    """One of ``choices``: any YAML values (numbers, strings, lists such as hidden sizes)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


def _check_bounds(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log scale needs low > 0 (got {low})")


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]  # noqa: UP007


# ---------------------------------------------------------------- samplers and pruners


class RandomSampler(Section):
    name: Literal["random"]

    def build(self, space: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)


class GridSampler(Section):
    """Every combination of the space's values, in a seeded order (each parameter needs a finite set)."""

    name: Literal["grid"]

    def build(self, space: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        from forgeml.tuning.space import grid

        return optuna.samplers.GridSampler(grid(space), seed=seed)


class TPESampler(Section):
    name: Literal["tpe"]
    startup_trials: Annotated[int, Field(ge=0)] = Field(
        4, description="trials sampled at random before the model of the space takes over"
    )

    def build(self, space: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.TPESampler(n_startup_trials=self.startup_trials, seed=seed)


class GPSampler(Section):
    name: Literal["gp"]
    startup_trials: Annotated[int, Field(ge=0)] = Field(
        4, description="trials sampled at random before the Gaussian process takes over"
    )

    def build(self, space: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
        import warnings

        import optuna

        with warnings.catch_warnings():  # marked experimental; chosen knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(n_startup_trials=self.startup_trials, seed=seed)


class NSGA2Sampler(Section):
    """Genetic search for multi-objective studies."""

    name: Literal["nsga2"]
    population_size: Annotated[int, Field(ge=2)] = Field(
        50, description="trials per generation; each later generation is bred from the best of those before"
    )

    def build(self, space: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.NSGAIISampler(population_size=self.population_size, seed=seed)


Sampler = Annotated[
    Union[RandomSampler, GridSampler, TPESampler, GPSampler, NSGA2Sampler],  # noqa: UP007
    Field(discriminator="name"),
]


class NoPruner(Section):
    name: Literal["none"]

    def build(self) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.NopPruner()


class MedianPruner(Section):
    """Stops a trial whose metric is worse than the median of earlier trials at the same evaluation."""

    name: Literal["median"]
    startup_trials: Annotated[int, Field(ge=0)] = Field(3, description="trials that finish before any is pruned")
    from_eval: PositiveInt = Field(2, description="the first evaluation at which a trial may be pruned")

    def build(self) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.from_eval)


class HyperbandPruner(Section):
    name: Literal["hyperband"]
    min_evals: PositiveInt = Field(
        3, description="evaluations a trial of the most aggressive bracket gets before its first rung"
    )
    reduction: Annotated[int, Field(ge=2)] = Field(
        3,
        description="one trial in this many goes on at each rung; brackets = 1 + log_reduction(evaluations / "
        "min_evals), and TPE learns from one bracket's trials only",
    )

    def build(self) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.HyperbandPruner(
            min_resource=self.min_evals, max_resource="auto", reduction_factor=self.reduction
        )


Pruner = Annotated[Union[NoPruner, MedianPruner, HyperbandPruner], Field(discriminator="name")]  # noqa: UP007

# Where the tune section's flat keys of earlier versions live now: (old key, section, new key).
MOVED_KEYS = (
    ("startup_trials", "sampler", "startup_trials"),
    ("population_size", "sampler", "population_size"),
    ("prune_startup_trials", "pruner", "startup_trials"),
    ("prune_from_eval", "pruner", "from_eval"),
    ("hyperband_min_evals", "pruner", "min_evals"),
    ("hyperband_reduction", "pruner", "reduction"),
)


# ---------------------------------------------------------------- the section


# What a trial's trained model costs, measured after training, for multi-objective studies.
MODEL_COST_METRICS = ("size_mb", "latency_ms")
TuneMetric = Literal["loss", "accuracy", "macro_f1", "perplexity", "size_mb", "latency_ms"]


def search_defaults(tune: dict[str, Any]) -> dict[str, str]:
    """The sampler and pruner a tune section gets when it names none: NSGA-II and no pruning for a
    list of metrics, TPE and the median rule for one."""
    if isinstance(tune.get("metric"), list):
        return {"sampler": "nsga2", "pruner": "none"}
    return {"sampler": "tpe", "pruner": "median"}


class TuneConfig(Section):
    """Hyperparameter search (``forgeml tune``): which recipe fields to search and how."""

    space: dict[str, Param] = Field(
        {}, description="recipe field path -> distribution, e.g. train.lr: {type: float, low: 1e-5, high: 1e-2}"
    )
    metric: TuneMetric | list[TuneMetric] = Field(
        "loss",
        description="the validation metric to optimise; a list of two or more (e.g. [macro_f1, latency_ms]): a "
        "multi-objective study (NSGA-II, no pruning) whose result is the Pareto front",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="one metric: default maximize accuracy and macro_f1, minimize the others"
    )
    trials: PositiveInt | None = Field(20, description="trials to run in this call; null: until timeout_s")
    timeout_s: Annotated[float, Field(gt=0)] | None = Field(None, description="start no trial after this long")
    sampler: Sampler = Field(
        TPESampler(name="tpe"),
        description="{name: tpe|gp|random|grid|nsga2, ...its options} or just the name; nsga2 (genetic, "
        "multi-objective) is the default for a list of metrics",
    )
    pruner: Pruner = Field(MedianPruner(name="median"), description="{name: median|hyperband|none, ...} or the name")
    seed: int = 0
    study_name: str | None = Field(None, description="default: the recipe's name")
    storage: str | None = Field(None, description="SQLAlchemy URL; default: sqlite file tune/study.db in the run")
    workers: PositiveInt = Field(
        1, description="processes on this machine running trials of the study at once, the cores split among them"
    )
    heartbeat_s: PositiveInt = Field(
        10, description="a running trial writes a heartbeat this often; silent for twice as long, it counts as dead"
    )

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        """``sampler: tpe`` is short for ``sampler: {name: tpe}``."""
        return {"name": value} if isinstance(value, str) else value

    @field_validator("study_name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        """The name is the folder tune/trials/<name>, which a rerun deletes: it must stay one folder."""
        if name is not None and (name in ("", ".", "..") or any(c in name for c in "/\\\0")):
            raise ValueError("a study name is a folder's name: give a plain one, without / \\ or NUL, not . or ..")
        return name

    @model_validator(mode="after")
    def _check_stop(self) -> TuneConfig:
        if self.trials is None and self.timeout_s is None:
            raise ValueError("set tune.trials or tune.timeout_s (or both): the search would never end")
        if not isinstance(self.metric, list):
            if self.metric in MODEL_COST_METRICS:
                raise ValueError(
                    f"metric {self.metric} only pairs with a validation metric, e.g. [macro_f1, {self.metric}]"
                )
            return self
        if len(set(self.metric)) < 2:
            raise ValueError("a list of metrics needs two or more different ones; give one metric as a plain value")
        if set(self.metric) <= set(MODEL_COST_METRICS):
            raise ValueError("a list of metrics needs a validation metric too, e.g. [macro_f1, size_mb]")
        if self.direction is not None:
            raise ValueError("direction: each metric of a list has its own (size and latency are minimised)")
        if self.pruner.name != "none":
            raise ValueError(
                f"pruner {self.pruner.name}: pruning is not available in a multi-objective study; set pruner none"
            )
        if self.sampler.name not in ("nsga2", "random"):
            raise ValueError(f"sampler {self.sampler.name}: a multi-objective study takes nsga2 or random")
        return self

    @model_validator(mode="before")
    @classmethod
    def _multi_objective_defaults(cls, data: Any) -> Any:
        """A list of metrics searches with NSGA-II and prunes nothing, unless the recipe says otherwise."""
        return {**search_defaults(data), **data} if isinstance(data, dict) else data

    @property
    def objectives(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]
