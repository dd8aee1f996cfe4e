"""The module family: a user's network from a factory or an instance, saved with its factory and
rebuilt by forgeml.load, and every way it can go wrong named."""

import pandas as pd
import pytest
import torch
import yaml

import forgeml
import tiny
import user_networks
from forgeml.errors import ForgeError, RecipeError

TABLE = tiny.recipe(
    tiny.TABLE,
    "module-table",
    model={"name": "module", "inputs": "features", "options": {"n_features": 30}},
    train={"max_steps": 20},
)
TABLE["model"].pop("hidden_sizes")
FACTORY = {**TABLE["model"], "factory": "user_networks:FeatureNet"}


def recorded_instance(run_dir) -> str:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["instance"]


def test_an_instance_trains_from_python_and_the_run_records_it(tmp_path):
    network = user_networks.FeatureNet(num_classes=2, vocab_size=None, n_features=30)
    untouched = {k: v.clone() for k, v in network.state_dict().items()}
    result = forgeml.train(TABLE, tmp_path / "run", model=network)
    assert result.steps == 20
    assert all(torch.equal(untouched[k], v) for k, v in network.state_dict().items())  # trained as a copy
    recorded = recorded_instance(tmp_path / "run")
    assert recorded.startswith("user_networks.FeatureNet@")
    with pytest.raises(ForgeError, match=r"trained from a Python instance .*set model.factory"):
        forgeml.load(tmp_path / "run")
    # Another instance is another model: the stage is not up to date.
    other = user_networks.FeatureNet(num_classes=2, vocab_size=None, hidden=4, n_features=30)
    assert forgeml.train(TABLE, tmp_path / "run", model=other, force=True).steps == 20
    assert recorded_instance(tmp_path / "run") != recorded


def test_a_factory_model_reloads_and_predicts_as_trained(tmp_path):
    forgeml.train({**TABLE, "model": FACTORY}, tmp_path / "run")
    family = forgeml.load(tmp_path / "run")
    rows = [dict.fromkeys(family.features, 0.5), dict.fromkeys(family.features, -1.0)]
    probs = family.predict_proba(rows)
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))


def test_a_factory_that_cannot_be_imported_is_named(tmp_path):
    recipe = {**TABLE, "model": {**FACTORY, "factory": "no_such_package.nets:build"}}
    with pytest.raises(ForgeError, match=r"cannot import no_such_package.nets:build .*PYTHONPATH"):
        forgeml.train(recipe, tmp_path / "run")


def test_a_factory_that_does_not_return_a_module_is_named(tmp_path):
    recipe = {**TABLE, "model": {**FACTORY, "factory": "user_networks:torch"}}
    with pytest.raises(ForgeError, match="user_networks:torch is a module, not a function or class"):
        forgeml.train(recipe, tmp_path / "run")


def test_a_factory_must_name_a_module_and_a_function():
    with pytest.raises(RecipeError, match="model.factory: 'user_networks.FeatureNet' is not of the form"):
        forgeml.as_recipe({**TABLE, "model": {**FACTORY, "factory": "user_networks.FeatureNet"}})


def test_an_instance_needs_the_module_family_and_one_process(tmp_path):
    network = user_networks.FeatureNet(num_classes=2, vocab_size=None, n_features=30)
    with pytest.raises(ForgeError, match="the recipe's model is mlp; train your own network with"):
        forgeml.train(tiny.recipe(tiny.TABLE, "mlp"), tmp_path / "a", model=network)
    with pytest.raises(ForgeError, match="worker processes cannot be handed a Python object"):
        forgeml.train(TABLE, tmp_path / "b", model=network, nproc=2)
    with pytest.raises(ForgeError, match="model.factory: none given"):
        forgeml.train(TABLE, tmp_path / "c")


def test_a_text_networks_tokenizer_folder_is_checked_and_named(tmp_path):
    from forgeml.models.module import ModuleConfig, TextModule
    from forgeml.models.registry import Splits

    frame = pd.DataFrame({"text": ["a b c"] * 4, "label": ["x", "y"] * 2})
    splits = Splits(frame, frame, frame, text_column="text", label_column="label", labels=["x", "y"])
    config = {"name": "module", "inputs": "text", "factory": "user_networks:conv_text"}
    with pytest.raises(ForgeError, match="model.tokenizer: there is no folder .*missing"):
        TextModule.fit_encoder(ModuleConfig(**config, tokenizer=str(tmp_path / "missing")), splits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForgeError, match=r"model.tokenizer: .*empty holds no tokenizer forgeml can use"):
        TextModule.fit_encoder(ModuleConfig(**config, tokenizer=str(tmp_path / "empty")), splits)
