import numpy as np
import pandas as pd
import torch

import forgeml
from forgeml.models.mlp import MLP, MLPConfig
from forgeml.models.registry import Splits


def splits() -> Splits:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(5, 3, 40), "b": rng.normal(-2, 0.1, 40), "c": np.ones(40)})
    frame["label"] = np.where(frame["a"] > 5, "hi", "lo")
    return Splits(frame, frame, frame, feature_columns=["a", "b", "c"], label_column="label", labels=["lo", "hi"])


def test_scaling_is_fitted_on_train_and_constant_columns_are_left_alone():
    family, _ = MLP.fit(MLPConfig(name="mlp"), splits(), seed=0)
    assert torch.allclose(
        family.network.mean, torch.tensor(splits().train[["a", "b", "c"]].mean().to_numpy(), dtype=torch.float32)
    )
    assert family.network.std[2] == 1.0


def test_save_and_load_round_trip_predicts_the_same(tmp_path):
    family, _ = MLP.fit(MLPConfig(name="mlp", hidden_sizes=[8, 4]), splits(), seed=0)
    rows = splits().test[["a", "b", "c"]].head(5).to_dict("records")
    expected = family.predict_proba(rows)
    family.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "forgeml.json", "model.safetensors"]
    loaded = forgeml.load(tmp_path)
    assert torch.equal(loaded.predict_proba(rows), expected)
    assert loaded.labels == ["lo", "hi"]
