"""The recipe: one field per section (each section defined beside its stage), YAML loading, --set
overrides, migration of older keys, and error messages that name the field and the fix."""

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
    Tag,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from forgeml.audit.config import AuditConfig
from forgeml.compression.config import CompressConfig
from forgeml.data.config import DataConfig, PrepareConfig, as_dataset, datasets_taking
from forgeml.errors import RecipeError
from forgeml.explaining.config import ExplainConfig
from forgeml.models import MODELS
from forgeml.models.registry import family_for
from forgeml.section import Section
from forgeml.serving.config import ServeConfig
from forgeml.training.config import ParallelConfig, TrainConfig
from forgeml.tuning.config import MOVED_KEYS as MOVED_TUNE_KEYS
from forgeml.tuning.config import TuneConfig, search_defaults


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
            refusal = family_for(self.model).tensor_parallel_refusal(self.model)
            if refusal:
                raise ValueError(
                    f"parallel.strategy: {self.parallel.strategy} splits layers by a tensor-parallel plan, and "
                    f"{refusal}; use ddp or fsdp"
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
        return mask_secrets({n: getattr(self, n).hashed_dump() for n in names})

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
            elif isinstance(child, str) and child in _tags(tuple(parts[: i + 1])):
                child = node[part] = {"name": child}  # a name standing for its options (sampler: tpe)
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
    if isinstance(data.get("data"), dict):
        data["data"] = _migrate_dataset_options(data["data"])
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


FILE_FORMATS = ("auto", "csv", "parquet", "jsonl")


def _migrate_dataset_options(data: dict[str, Any]) -> dict[str, Any]:
    """A built-in dataset's options, once keys of the data section, into data.source; a file type,
    once data.format, into data.file_format (data.format now says what a row is)."""
    if data.get("format") in FILE_FORMATS:
        data = dict(data)
        _move(data, data, "format", "data.format", "data.file_format", "file_format")
    moved = [key for key in data if key != "name" and datasets_taking(key)]
    if not moved:
        return data
    data, source = dict(data), as_dataset(data.get("source"))
    name = source.get("name") if isinstance(source, dict) else source
    for key in moved:
        if name not in datasets_taking(key):
            raise RecipeError(
                f"data.{key} applies only to {', '.join(datasets_taking(key))}, not to {name!r}; remove it"
            )
    source = dict(source)
    for key in moved:
        _move(data, source, key, f"data.{key}", f"data.source.{key}")
    data["source"] = source
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
        elif items and items[0] in _plain_tags(cls.model_fields[key].annotation):
            items.pop(0)
            cls = None
        else:
            cls = candidates[0] if len(candidates) == 1 else None
    return path, cls


def _plain_tags(annotation: Any) -> set[str]:
    """The tags of a union's members that are no models (a path beside built-in datasets)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else ()
    return {
        meta.tag
        for member in members
        if typing.get_origin(member) is Annotated and not _unwrap(member)
        for meta in member.__metadata__
        if isinstance(meta, Tag)
    }


def _tags(loc: tuple[Any, ...]) -> list[str]:
    """The names a discriminated union at ``loc`` accepts."""
    _, parent = _walk(loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent else None
    return [tag for c in _unwrap(field.annotation) if (tag := _tag(c))] if field else []


def _tag(cls: type[BaseModel]) -> str | None:
    field = cls.model_fields.get("name")
    args = typing.get_args(field.annotation) if field else ()
    return args[0] if field and typing.get_origin(field.annotation) is Literal else None


UNION_KINDS = {"source": "built-in dataset"}  # a union field whose name does not say what it chooses


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
    # model, sampler, pruner: the union's section names its kind
    what = UNION_KINDS.get(path[-1], path[-1]) if path else "model"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        known = ", ".join(repr(n) for n in _tags(err["loc"]))
        if kind == "union_tag_invalid":
            return f"{where}.name: unknown {what} {ctx.get('tag')!r}; known {what}s: {known}"
        return f"{where}.name: required; known {what}s: {known}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; allowed values: {ctx.get('expected')}"
    message = err["msg"].removeprefix("Value error, ")
    if not path:  # a check across sections names the fields itself
        return message
    return f"{where}: {message} (got {value!r})" if not isinstance(value, dict) else f"{where}: {message}"
