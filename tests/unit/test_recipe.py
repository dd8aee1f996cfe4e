from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from forgeml.errors import RecipeError
from forgeml.recipe import Recipe, RecipeWarning, apply_overrides, builtin_recipes, load_recipe, validate_recipe
from forgeml.training.strategies import Strategy, accumulation, resolve_batch

BASE = {
    "data": {"source": "breast-cancer"},
    "model": {"name": "mlp"},
    "train": {"max_steps": 5},
}


def error_of(data: dict) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    return str(info.value)


def with_(section: str, **values) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert validate_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


def test_unknown_key_suggests_the_close_match():
    message = error_of(with_("train", lrr=0.1))
    assert "train.lrr: unknown key; did you mean train.lr?" in message


def test_unknown_key_in_a_model_section_suggests_its_fields():
    message = error_of(with_("model", hiden_sizes=[3]))
    assert "model.hiden_sizes: unknown key; did you mean model.hidden_sizes?" in message


def test_unknown_top_level_section_lists_nearest():
    data = dict(BASE, trian={})
    assert "trian: unknown key; did you mean train?" in error_of(data)


def test_wrong_literal_names_value_and_allowed_values():
    message = error_of(with_("train", precision="fp8"))
    assert "train.precision" in message and "'fp8'" in message and "'bf16'" in message


def test_out_of_range_names_key_and_value():
    message = error_of(with_("train", lr=-1))
    assert "train.lr" in message and "greater than 0" in message and "-1" in message


def test_wrong_type_names_key():
    assert "train.max_steps" in error_of(with_("train", max_steps="many"))


def test_unknown_model_lists_known_models():
    message = error_of(with_("model", name="resnet"))
    assert "unknown model 'resnet'" in message and "'mlp'" in message and "'text-classifier'" in message


def test_missing_sections_are_named():
    message = error_of({"model": {"name": "mlp"}})
    assert "data: required but missing" in message and "train: required but missing" in message


def test_batch_sizes_must_divide():
    message = error_of({**with_("train", global_batch_size=30), "parallel": {"micro_batch_size": 8}})
    assert "train.global_batch_size (30)" in message and "parallel.micro_batch_size (8)" in message


def test_a_key_that_moved_to_parallel_is_read_from_its_old_place_with_a_warning():
    with pytest.warns(RecipeWarning) as warned:
        recipe = validate_recipe(with_("train", strategy="fsdp", micro_batch_size=8))
    assert sorted(str(w.message).split(" has")[0] for w in warned) == ["train.micro_batch_size", "train.strategy"]
    assert "train.strategy has moved to parallel.strategy" in str(warned[-1].message) + str(warned[0].message)
    assert (recipe.parallel.strategy, recipe.parallel.micro_batch_size) == ("fsdp", 8)
    assert "strategy" not in recipe.train.model_dump()


def test_a_moved_key_given_at_both_places_is_an_error():
    data = {**with_("train", device="cpu"), "parallel": {"device": "cpu"}}
    with pytest.raises(RecipeError, match="train.device has moved to parallel.device, and both are given"):
        validate_recipe(data)


def test_the_parallel_section_is_not_part_of_what_decides_the_weights():
    one = validate_recipe(with_("train", log_every=5))
    other = validate_recipe({**with_("train", log_every=50, resume="never"), "parallel": {"strategy": "fsdp"}})
    assert one.train.hashed_dump() == other.train.hashed_dump()
    assert one.train.hashed_dump() != validate_recipe(with_("train", lr=0.5)).train.hashed_dump()


def test_steps_or_epochs_required():
    data = with_("train", max_steps=None)
    assert "max_steps or train.max_epochs" in error_of(data)


def test_accumulation_is_derived():
    recipe = validate_recipe({**with_("train", global_batch_size=32), "parallel": {"micro_batch_size": 8}})
    micro = resolve_batch(recipe.train, recipe.parallel, dp=1, tp=1)
    assert micro == 8 and accumulation(32, micro, Strategy.single(torch.device("cpu"))) == 4


def test_overrides_are_typed_like_yaml():
    data = apply_overrides(
        yaml.safe_load(yaml.safe_dump(BASE)),
        ["train.lr=1e-4", "train.early_stopping.patience=2", "model.hidden_sizes=[8, 4]", "train.grad_clip=null"],
    )
    recipe = validate_recipe(data)
    assert recipe.train.lr == 1e-4
    assert recipe.train.early_stopping.patience == 2
    assert recipe.model.hidden_sizes == [8, 4]
    assert recipe.train.grad_clip is None


def test_override_errors_name_the_override():
    with pytest.raises(RecipeError, match="expected section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(RecipeError, match="train.lr is a value"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_override_of_unknown_key_gets_the_suggestion(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(RecipeError, match="did you mean train.max_steps"):
        load_recipe(path, ["train.max_stepz=3"])


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  source: x\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: line \d+"):
        load_recipe(path)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="built-in: default"):
        load_recipe("no-such-recipe")


KEY = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
SCALAR = st.one_of(st.integers(), st.booleans(), st.none(), st.text(alphabet="abcxyz", min_size=1, max_size=5))


@given(path=st.lists(KEY, min_size=1, max_size=4), value=SCALAR)
def test_override_sets_exactly_the_leaf(path, value):
    original = {"keep": {"me": 1}}
    literal = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    data = apply_overrides(yaml.safe_load(yaml.safe_dump(original)), [f"{'.'.join(path)}={literal}"])
    node = data
    for part in path[:-1]:
        node = node[part]
    assert node[path[-1]] == value
    if path[0] != "keep":
        assert data["keep"] == {"me": 1}


def test_recipe_round_trips_through_yaml():
    recipe = Recipe.model_validate(BASE)
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


# ---------------------------------------------------------------- secrets and study names

PASSWORD = st.text(alphabet=st.characters(exclude_characters="@", exclude_categories=("Z", "C")), min_size=1)
USER = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", max_size=8)
HOST = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5})?(:[0-9]{2,5})?", fullmatch=True)
PATH = st.from_regex(r"(/[a-zA-Z0-9_.-]{1,8}){0,3}", fullmatch=True)
SCHEME = st.sampled_from(["s3", "gs", "https", "ftp", "postgresql", "postgresql+psycopg", "mysql+pymysql", "redis"])


@given(scheme=SCHEME, user=USER, password=PASSWORD, host=HOST, path=PATH)
def test_a_urls_password_is_masked_and_the_rest_kept(scheme, user, password, host, path):
    from forgeml.recipe import MASK, hide_secrets, is_masked

    url = f"{scheme}://{user}:{password}@{host}{path}"
    shown = hide_secrets(f"cannot open {url} (refused)")
    assert shown == f"cannot open {scheme}://{user}:{MASK}@{host}{path} (refused)"
    assert is_masked(hide_secrets(url))


@given(name=st.sampled_from(["password", "db_password", "api_key", "X-Amz-Signature", "sas_token", "key"]))
def test_credentials_in_a_query_are_masked(name):
    from forgeml.recipe import MASK, hide_secrets

    url = f"sqlite:///file:/tmp/study.db?uri=true&{name}=Zq9%2Fx&mode=rwc"
    assert hide_secrets(url) == f"sqlite:///file:/tmp/study.db?uri=true&{name}={MASK}&mode=rwc"


@given(text=st.text(alphabet=st.characters(exclude_characters="@=")))
def test_text_without_credentials_is_left_alone(text):
    from forgeml.recipe import hide_secrets

    assert hide_secrets(text) == text


SECRET_RECIPE = {
    **BASE,
    "data": {"source": "s3://AKIA:wJalr/XUtn@bucket/train.csv", "test_source": "https://me:pa55@host/test.csv"},
    "prepare": {"shards_url": "gs://svc:t0ken@bucket/shards"},
    "tune": {"storage": "postgresql://optuna:hunter2@db.example/studies"},
    "serve": {"api_key": "sk-live-123"},
}
SECRETS = ("wJalr/XUtn", "pa55", "t0ken", "hunter2", "sk-live-123")


def test_every_written_recipe_masks_the_key_and_the_passwords():
    recipe = Recipe.model_validate(SECRET_RECIPE)
    text = recipe.to_yaml()
    assert not [secret for secret in SECRETS if secret in text]
    written = Recipe.model_validate(yaml.safe_load(text))
    assert written.serve.api_key == "***" and written.tune.storage == "postgresql://optuna:***@db.example/studies"
    assert written.data.source == "s3://AKIA:***@bucket/train.csv"
    # The sections hashed into run.json and the manifest are masked too, so a copy read back hashes the same.
    assert not [secret for secret in SECRETS if secret in str(recipe.section_dump("data", "prepare", "tune"))]
    assert written.section_dump("data", "prepare", "tune") == recipe.section_dump("data", "prepare", "tune")


def test_a_masked_copy_with_the_secrets_environment_is_the_recipe_again():
    from forgeml.recipe import restore_secrets, secrets_env

    recipe = Recipe.model_validate(SECRET_RECIPE)
    environ = secrets_env(recipe)
    assert validate_recipe(restore_secrets(yaml.safe_load(recipe.to_yaml()), environ)) == recipe
    # A value given another way (--set, --storage) stays; a recipe with no secrets passes nothing.
    given_otherwise = yaml.safe_load(recipe.to_yaml())
    given_otherwise["tune"]["storage"] = "sqlite:///other.db"
    assert restore_secrets(given_otherwise, environ)["tune"]["storage"] == "sqlite:///other.db"
    assert secrets_env(Recipe.model_validate(BASE)) == {}


def test_a_masked_secret_is_refused_before_it_is_used():
    from forgeml.recipe import refuse_masked

    with pytest.raises(RecipeError, match=r"tune.storage: 'postgresql://u:\*\*\*@h/db' holds a secret masked"):
        refuse_masked("tune.storage", "postgresql://u:***@h/db", "give it with --storage")
    refuse_masked("tune.storage", "postgresql://u:pw@h/db", "")  # a real one passes


NOT_A_FILE_NAME = st.one_of(
    st.sampled_from(["", ".", "..", "/", "/etc", "../x", "a/b", "a\\b", "x\0y"]),
    st.builds(
        lambda a, sep, b: a + sep + b, st.text(max_size=5), st.sampled_from(["/", "\\", "\0"]), st.text(max_size=5)
    ),
)


@given(name=NOT_A_FILE_NAME)
def test_a_study_name_that_is_not_a_plain_file_name_is_refused_naming_it(name):
    message = error_of(with_("tune", study_name=name))
    assert "tune.study_name: a study name is a folder's name" in message and repr(name) in message


@given(
    name=st.text(alphabet=st.characters(exclude_characters="/\\\0"), min_size=1).filter(lambda n: n not in (".", ".."))
)
def test_a_plain_study_name_is_taken(name):
    assert validate_recipe(with_("tune", study_name=name)).tune.study_name == name


def test_changing_how_work_is_spread_leaves_the_train_stage_up_to_date():
    from forgeml.pipeline import STAGES, config_slice

    train = next(stage for stage in STAGES if stage.name == "train")
    spread = {**BASE, "parallel": {"strategy": "fsdp", "micro_batch_size": 1, "num_threads": 1, "device": "cpu"}}
    assert config_slice(validate_recipe(BASE), train.sections) == config_slice(validate_recipe(spread), train.sections)


def test_a_sampler_or_pruner_is_its_name_or_a_mapping_of_its_name_and_options():
    recipe = validate_recipe({**BASE, "tune": {"sampler": "gp", "pruner": {"name": "hyperband", "reduction": 4}}})
    assert (recipe.tune.sampler.name, recipe.tune.sampler.startup_trials) == ("gp", 4)
    assert (recipe.tune.pruner.min_evals, recipe.tune.pruner.reduction) == (3, 4)


def test_an_option_of_another_sampler_or_an_unknown_sampler_is_named():
    message = error_of({**BASE, "tune": {"sampler": {"name": "random", "population_size": 4}}})
    assert "tune.sampler.population_size: unknown key; known keys: name" in message
    message = error_of({**BASE, "tune": {"sampler": {"name": "cmaes"}}})
    assert "tune.sampler.name: unknown sampler 'cmaes'; known samplers:" in message and "'nsga2'" in message
    assert "tune.pruner.name: required; known pruners: 'none', 'median', 'hyperband'" in error_of(
        {**BASE, "tune": {"pruner": {"min_evals": 2}}}
    )


def test_flat_tune_options_of_older_recipes_move_into_their_sampler_and_pruner():
    old = {"startup_trials": 2, "prune_from_eval": 5, "pruner": "median"}
    with pytest.warns(RecipeWarning, match="tune.prune_from_eval has moved to tune.pruner.from_eval"):
        recipe = validate_recipe({**BASE, "tune": old})
    assert (recipe.tune.sampler.name, recipe.tune.sampler.startup_trials, recipe.tune.pruner.from_eval) == ("tpe", 2, 5)


def test_a_file_type_given_as_data_format_moves_to_file_format():
    with pytest.warns(RecipeWarning, match="data.format has moved to data.file_format"):
        recipe = validate_recipe({**BASE, "data": {"source": "rows.txt", "format": "csv"}})
    assert (recipe.data.file_format, recipe.data.format) == ("csv", None)
    chat = validate_recipe({**BASE, "data": {"source": "chat.jsonl", "format": "chat"}})
    assert (chat.data.file_format, chat.data.format, chat.data.messages_column) == ("auto", "chat", "messages")
