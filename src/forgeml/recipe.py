"""The recipe: pydantic models of each section, YAML loading, --set overrides, clear errors."""

from __future__ import annotations

import json
import re
import types
import typing
import warnings
from difflib import get_close_matches
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from forgeml.errors import RecipeError
from forgeml.models import MODELS
from forgeml.section import Section
from forgeml.tuning.config import MOVED_KEYS as MOVED_TUNE_KEYS
from forgeml.tuning.config import TuneConfig, search_defaults

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


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
    fail_on: FailOnConfig = FailOnConfig()
    examples: PositiveInt = Field(5, description="examples of each finding shown in the report")


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


class EarlyStoppingConfig(Section):
    metric: Literal["loss", "accuracy", "macro_f1", "perplexity"] = "loss"
    patience: PositiveInt = 3
    min_delta: NonNegativeFloat = 0.0


class AugmentConfig(Section):
    """Training-time augmentation; 0 turns an option off."""

    token_dropout: Probability = Field(0.0, description="text: drop each token with this probability")
    random_mask: Probability = Field(0.0, description="text: replace each token by [MASK] with this probability")
    gaussian_noise: NonNegativeFloat = Field(0.0, description="tables: std of noise added to standardised features")
    mixup_alpha: NonNegativeFloat = Field(0.0, description="tables: Beta(alpha, alpha) mixup of rows and labels")


# Train fields that decide nothing about the weights (when to write a log line, collect garbage,
# or whether to continue): a change of them keeps the run's checkpoints and its trained model.
UNHASHED = {"hashed": False}


class TrainConfig(Section):
    """What is learned and how: optimisation, schedule, regularisation, evaluation, checkpoints."""

    max_steps: PositiveInt | None = None
    max_epochs: Annotated[float, Field(gt=0)] | None = None
    global_batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-4
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    eval_every: PositiveInt | None = Field(None, description="steps between evaluations; default: once per epoch")
    eval_batch_size: PositiveInt = 64
    checkpoint_every: PositiveInt | None = None
    keep_last: PositiveInt = 2
    resume: Literal["auto", "never", "require"] = Field(
        "auto",
        description="auto: a train stage that stopped midway continues from its newest intact checkpoint; "
        "never: it starts over; require (--resume): it must continue, and it is an error when there is no "
        "interrupted training with a checkpoint to continue from",
        json_schema_extra=UNHASHED,
    )
    log_every: PositiveInt = Field(10, json_schema_extra=UNHASHED)
    gc_every: PositiveInt | None = Field(
        50,
        description="collect garbage every N steps instead of whenever Python decides; null: Python's own",
        json_schema_extra=UNHASHED,
    )
    early_stopping: EarlyStoppingConfig | None = None
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: NonNegativeFloat = 2.0
    label_smoothing: Probability = 0.0
    class_weights: Literal["balanced"] | list[Annotated[float, Field(gt=0)]] | None = None
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _check_length(self) -> TrainConfig:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set train.max_steps or train.max_epochs (or both: training stops at the first)")
        return self

    def hashed_dump(self) -> dict[str, Any]:
        """The fields that decide the trained weights: what a checkpoint and the stages after
        training are keyed on (the parallel section is not, so a run resumes at another scale)."""
        unhashed = {name for name, f in type(self).model_fields.items() if f.json_schema_extra == UNHASHED}
        return self.model_dump(mode="json", exclude=unhashed)


class ParallelConfig(Section):
    """How the work is spread over processes, devices and memory; nothing here changes what is
    learned beyond floating-point order, so a run resumes under other settings."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["auto", "single", "ddp", "fsdp", "tp", "fsdp+tp"] = Field(
        "auto", description="how processes share the work; auto: single for one process, ddp for more"
    )
    tp_degree: PositiveInt = Field(2, description="fsdp+tp: processes that split each layer (tp uses all)")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward")
    micro_batch_size: PositiveInt | Literal["auto"] | None = Field(
        None,
        description="rows per forward pass on each rank; default: the global batch split over the data-parallel "
        "ranks; auto: the largest that fits in memory (accumulation keeps the global batch)",
    )
    memory_budget_gb: Annotated[float, Field(gt=0)] | None = Field(
        None, description="CPU, micro_batch_size auto: memory per process; default: half the available, shared"
    )
    collective_timeout_s: Annotated[float, Field(gt=0)] = Field(
        600.0, description="a rank that does not join a collective within this ends the run with an error"
    )
    num_threads: PositiveInt | None = Field(None, description="CPU threads for torch; default: torch's choice")
    keep_freed_memory: bool = Field(
        True, description="glibc: reuse freed memory instead of returning it to the OS each step (fewer page faults)"
    )


CompressMethod = Literal["quantize", "onnx", "compile", "prune", "distill"]


class PruneConfig(Section):
    sparsities: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.5, 0.8], description="magnitude pruning: the share of linear weights set to zero, one variant each"
    )
    structured_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="structured pruning: the share of heads and channels (or hidden units) removed"
    )
    finetune_steps: PositiveInt = Field(50, description="training steps after pruning, with the recipe's settings")


class DistillConfig(Section):
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.5, description="weight of the teacher's soft targets; the labels get 1 - alpha"
    )
    temperature: Annotated[float, Field(gt=0)] = Field(2.0, description="softens both models' probabilities")
    student_layers: PositiveInt | None = Field(
        None,
        description="text-classifier and gpt: how many of the teacher's layers (blocks) the student keeps, "
        "evenly spaced, the top one included (default: half)",
    )
    student_width: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="mlp: the student's hidden sizes as a fraction of the teacher's"
    )


class CompressConfig(Section):
    """Compression variants of the trained model (``forgeml compress``), each measured against it."""

    methods: list[CompressMethod] = Field(
        [],
        description="quantize (torch dynamic int8), onnx (ONNX Runtime fp32, dynamic and static int8), "
        "compile (torch.compile), distill (a smaller student, with and without the teacher), prune (magnitude "
        "and structured, each fine-tuned); "
        "empty: the stage does not run in `forgeml run`",
    )
    target_latency_ms: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="recommend the most accurate variant at or under this p50 batch-1 latency; "
        "default: the knee of the accuracy-latency front",
    )
    threads: PositiveInt = Field(2, description="threads every variant runs with while measured")
    latency_runs: Annotated[int, Field(ge=10)] = Field(100, description="batch-1 predictions timed per variant")
    throughput_batches: PositiveInt = Field(5, description="batches of 32 timed per variant")
    test_rows: PositiveInt | None = Field(
        None,
        description="the first N test rows every variant is measured on; default: all of them for a classifier, "
        "64 sequences for a language model, whose every position's probabilities are kept per variant",
    )
    calibration_rows: PositiveInt = Field(
        128, description="training rows that calibrate static int8 and find the matrices int8 harms most"
    )
    blockwise_error: Annotated[float, Field(gt=0)] = Field(
        0.1,
        description="ONNX dynamic int8: a matrix whose output on the calibration rows moves by more than this "
        "(relative) under one int8 scale per tensor gets a scale per block of 32 weights and activations instead",
    )
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()


class ServeConfig(Section):
    """Model server options (`forgeml serve`; its flags override them)."""

    variant: str = Field("recommended", description="a compress variant, recommended, or trained")
    host: str = Field("127.0.0.1", description="the address to bind; 0.0.0.0 to accept other machines")
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    max_batch: PositiveInt = Field(32, description="inputs run together at most")
    max_wait_ms: Annotated[float, Field(ge=0)] = Field(5.0, description="how long the first input waits for more")
    max_queue: PositiveInt = Field(256, description="inputs waiting at most (those running excluded); then 503")
    timeout_s: Annotated[float, Field(gt=0)] = Field(10.0, description="a request not answered by then gets 504")
    api_key: str | None = Field(None, description="required as 'Authorization: Bearer KEY' on /v1/*")
    threads: PositiveInt | None = Field(None, description="threads the model runs with (default: torch's)")
    max_items: PositiveInt = Field(64, description="inputs in one request at most")
    max_text_chars: PositiveInt = Field(10_000, description="characters in one text at most")
    max_body_bytes: PositiveInt = Field(1_000_000, description="request body size at most")
    max_new_tokens: PositiveInt = Field(512, description="tokens one generate request may ask for at most")


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
    seed: int = 0


def model_union(configs: tuple[type, ...]) -> Any:
    """The model section: one of these configs, chosen by its ``name``."""
    return Annotated[Union[configs], Field(discriminator="name")]  # noqa: UP007


# The built-in families' configs; validate_recipe widens it to every registered family, plugins included.
ModelConfig = model_union(tuple(MODELS.configs(discover=False)))


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name: runs/<name>")
    data: DataConfig
    audit: AuditConfig = AuditConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    tune: TuneConfig = TuneConfig()
    compress: CompressConfig = CompressConfig()
    serve: ServeConfig = ServeConfig()
    explain: ExplainConfig = ExplainConfig()

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        return migrate(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_across_sections(self) -> Recipe:
        """Checks that read two sections, so that a bad pair is refused when the recipe is read,
        before any stage runs (those that depend on the number of processes: ``check_launch``)."""
        micro = self.parallel.micro_batch_size
        if isinstance(micro, int) and self.train.global_batch_size % micro:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"parallel.micro_batch_size ({micro})"
            )
        if self.parallel.strategy in ("tp", "fsdp+tp"):
            family = MODELS.get(self.model.name).build
            if not family.offers_tensor_parallel():
                offered = ", ".join(name for name in MODELS.names() if MODELS.get(name).build.offers_tensor_parallel())
                raise ValueError(
                    f"parallel.strategy: {self.parallel.strategy} is offered for {offered or 'no'} models, not "
                    f"{self.model.name}; use ddp or fsdp"
                )
        return self

    def to_yaml(self) -> str:
        """The recipe as YAML to write or show, its secrets masked (see ``mask_secrets``)."""
        masked = [".".join(path) for path, _ in self.secrets()]
        note = f"# masked ({MASK}): {', '.join(masked)}; give them with --set KEY=VALUE\n" if masked else ""
        return note + yaml.safe_dump(mask_secrets(self.model_dump(mode="json")), sort_keys=False)

    def section_dump(self, *names: str) -> dict[str, Any]:
        """Sections as hashed into run.json and the manifest: masked, so that a hash gives no handle
        on a password, and a recipe read back from its run directory hashes the same."""
        return mask_secrets({n: getattr(self, n).model_dump(mode="json") for n in names})

    def secrets(self) -> list[tuple[list[str], Any]]:
        """The values ``mask_secrets`` hides, each with its path of keys: what a process started on a
        masked copy of this recipe needs beside it (``secrets_env``)."""
        return _changed(self.model_dump(mode="json"), mask_secrets(self.model_dump(mode="json")), [])


# ---------------------------------------------------------------- secrets

MASK = "***"  # SQLAlchemy's own mark for a hidden password
SECRETS_ENV = "FORGEML_SECRETS"  # a masked recipe's secrets, for the processes forgeml starts on it
# scheme://user:PASSWORD@host, and query parameters that carry credentials (?password=, &api_key=,
# X-Amz-Signature=, sas_token=, ...): the password may hold anything but whitespace and "@".
_URL_PASSWORD = re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*:)[^\s@]+(?=@)")
_QUERY_SECRET = re.compile(
    r"(?P<keep>[?&;](?:[\w.-]*[_.-])?(?:password|passwd|pwd|secret|token|key|apikey|signature|sig|credentials?)=)"
    r"[^\s&#]+",
    re.IGNORECASE,
)


def hide_secrets(text: str) -> str:
    """``text`` with the password and credential parameters of every URL in it masked."""
    text = _URL_PASSWORD.sub(lambda m: m["keep"] + MASK, text)
    return _QUERY_SECRET.sub(lambda m: m["keep"] + MASK, text)


def mask_secrets(data: Any) -> Any:
    """A recipe's dump (or a mapping read from a recipe file) fit to write or show: serve.api_key
    replaced by the mask, and every URL in it (data.source, tune.storage, prepare.shards_url, ...)
    with its password masked. Every recipe forgeml writes or shows goes through here."""

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return hide_secrets(value)
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    masked = walk(data)
    serve = masked.get("serve") if isinstance(masked, dict) else None
    if isinstance(serve, dict) and serve.get("api_key"):
        masked["serve"] = {**serve, "api_key": MASK}
    return masked


def _changed(real: Any, masked: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    if isinstance(real, dict) and isinstance(masked, dict):
        return [found for key in real for found in _changed(real[key], masked.get(key), [*path, key])]
    return [] if real == masked else [(path, real)]


def is_masked(value: str) -> bool:
    return value == MASK or f":{MASK}@" in value or f"={MASK}" in value


def refuse_masked(field: str, value: str | None, hint: str) -> None:
    """Stop before a masked secret (read back from a run directory's files) is sent anywhere."""
    if value is not None and is_masked(value):
        raise RecipeError(
            f"{field}: {value!r} holds a secret masked as {MASK}, as the recipes forgeml writes do; {hint}"
        )


def secrets_env(recipe: Recipe) -> dict[str, str]:
    """The environment that carries ``recipe``'s secrets to a process started on its masked copy
    (never a file, nor the command line, which every user of the machine can read)."""
    found = recipe.secrets()
    return {SECRETS_ENV: json.dumps(found)} if found else {}


def restore_secrets(data: dict[str, Any], environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """``data`` (a recipe read from a masked copy) with the secrets ``secrets_env`` passed put back
    where the copy masks them; a value given otherwise (--set, an option) stays."""
    for path, value in json.loads(environ.get(SECRETS_ENV) or "[]"):
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) == _masked_at(path, value):
            node[path[-1]] = value
    return data


def _masked_at(path: list[str], value: Any) -> Any:
    """``value`` as ``mask_secrets`` writes it at ``path``."""
    nested = value
    for key in reversed(path):
        nested = {key: nested}
    masked = mask_secrets(nested)
    for key in path:
        masked = masked[key]
    return masked


# ---------------------------------------------------------------- loading


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("forgeml") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path to a YAML file, or the name of a built-in recipe (default, tabular, lm, ...)."""
    path = Path(recipe)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if str(recipe) in builtins:
        return builtins[str(recipe)]
    raise RecipeError(
        f"recipe {str(recipe)!r} not found: no such file, and no built-in recipe of that name "
        f"(built-in: {', '.join(sorted(builtins))})"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}: {where}invalid YAML ({problem})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (data, model, train, ...)")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``3``, ``1e-4``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"--set {item!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


class RecipeWarning(FutureWarning):
    """A recipe that still loads but should be written differently (a key that has moved)."""


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """An older recipe's keys moved to where they live now, each with a warning naming both places;
    a key given at both places is an error."""
    data = dict(data)
    train = data.get("train")
    if isinstance(train, dict):
        moved = [key for key in train if key in ParallelConfig.model_fields]
        if moved:
            train, parallel = dict(train), dict(data.get("parallel") or {})
            for key in moved:
                _move(train, parallel, key, f"train.{key}", f"parallel.{key}")
            data["train"], data["parallel"] = train, parallel
    tune = data.get("tune")
    if isinstance(tune, dict) and any(old in tune for old, _, _ in MOVED_TUNE_KEYS):
        tune = dict(tune)
        for old, section, new in MOVED_TUNE_KEYS:
            if old in tune:
                chosen = tune.get(section, search_defaults(tune)[section])
                chosen = dict(chosen) if isinstance(chosen, dict) else {"name": chosen}
                _move(tune, chosen, old, f"tune.{old}", f"tune.{section}.{new}", new)
                tune[section] = chosen
        data["tune"] = tune
    return data


def _move(source: dict[str, Any], target: dict[str, Any], key: str, old: str, new: str, new_key: str = "") -> None:
    new_key = new_key or key
    if new_key in target:
        raise RecipeError(f"{old} has moved to {new}, and both are given; keep {new} alone")
    target[new_key] = source.pop(key)
    warnings.warn(f"{old} has moved to {new}; taken as {new} this time, write it there", RecipeWarning, stacklevel=2)


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = resolve_recipe_path(recipe)
    return validate_recipe(apply_overrides(read_yaml(path), overrides), source=str(path))


def validate_sections(data: dict[str, Any], *models: type[BaseModel]) -> list[Any]:
    """Validate some sections on their own (for commands that take no whole recipe), with the same
    messages as a recipe; ``models`` are the section classes in the order of ``data``'s keys."""
    sections = []
    for (key, value), model in zip(data.items(), models, strict=True):
        try:
            sections.append(model.model_validate(value))
        except ValidationError as exc:
            lines = [describe_error({**err, "loc": (key, *err["loc"])}) for err in exc.errors()]
            raise RecipeError("invalid options\n" + "\n".join(f"  {line}" for line in lines)) from exc
    return sections


def use_registered_models() -> None:
    """Make Recipe's model section accept the config of every family registered now: the built-ins
    and those of the installed ``forgeml.models`` entry points, imported at the first call."""
    configs = tuple(MODELS.configs())
    if Recipe.model_fields["model"].annotation == model_union(configs).__origin__:
        return
    Recipe.model_fields["model"] = FieldInfo.from_annotation(model_union(configs))
    Recipe.model_rebuild(force=True)


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    use_registered_models()
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [describe_error(err) for err in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe\n" + "\n".join(f"  {line}" for line in lines)) from exc


# ---------------------------------------------------------------- error messages


def _unwrap(annotation: Any) -> list[Any]:
    """The model classes an annotation may hold (Optional, Annotated and unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _unwrap(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Follow an error location through the models: the readable path, and the model at its end."""
    cls: type[BaseModel] | None = Recipe
    path: list[str] = []
    items = list(loc)
    while items:
        key = items.pop(0)
        path.append(str(key))
        if cls is None or key not in cls.model_fields:
            cls = None
            continue
        candidates = _unwrap(cls.model_fields[key].annotation)
        tagged = {_tag(c): c for c in candidates if _tag(c)}
        if items and items[0] in tagged:  # a discriminated union puts the tag in the location
            cls = tagged[items.pop(0)]
        else:
            cls = candidates[0] if len(candidates) == 1 else None
    return path, cls


def _tags(loc: tuple[Any, ...]) -> list[str]:
    """The names a discriminated union at ``loc`` accepts."""
    _, parent = _walk(loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent else None
    return [tag for c in _unwrap(field.annotation) if (tag := _tag(c))] if field else []


def _tag(cls: type[BaseModel]) -> str | None:
    field = cls.model_fields.get("name")
    args = typing.get_args(field.annotation) if field else ()
    return args[0] if field and typing.get_origin(field.annotation) is Literal else None


def describe_error(err: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        path, _ = _walk(err["loc"])
        _, parent = _walk(err["loc"][:-1])
        fields = sorted(parent.model_fields) if parent else []
        near = get_close_matches(path[-1], fields, n=1)
        hint = f"did you mean {'.'.join(path[:-1] + near)}?" if near else f"known keys: {', '.join(fields)}"
        return f"{'.'.join(path)}: unknown key; {hint}"
    path, _ = _walk(err["loc"])
    where = ".".join(path) or "recipe"
    if kind == "missing":
        return f"{where}: required but missing"
    what = path[-1] if path else "model"  # model, sampler, pruner: the union's section names its kind
    if kind == "union_tag_invalid":
        return f"{where}.name: unknown {what} {ctx.get('tag')!r}; known {what}s: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        known = MODELS.names() if what == "model" else _tags(err["loc"])
        return f"{where}.name: required; known {what}s: {', '.join(repr(n) for n in known)}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; allowed values: {ctx.get('expected')}"
    message = err["msg"].removeprefix("Value error, ")
    if not path:  # a check across sections names the fields itself
        return message
    return f"{where}: {message} (got {value!r})" if not isinstance(value, dict) else f"{where}: {message}"
