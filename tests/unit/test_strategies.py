"""How processes split into data- and tensor-parallel groups, before any mesh is built."""

import pytest

from forgeml.errors import ForgeError
from forgeml.models.gpt import GPT, GPTConfig
from forgeml.models.mlp import MLP, MLPConfig
from forgeml.recipe import TrainConfig
from forgeml.training.strategies import degrees

GPT4 = GPTConfig(name="gpt", n_head=4, n_embd=128)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "single", "auto"])
def test_one_process_runs_any_data_parallel_recipe_as_single(strategy):
    assert degrees(TrainConfig(max_steps=1, strategy=strategy), 1, MLP, MLPConfig(name="mlp")) == ("single", 1, 1)


def test_tensor_parallel_is_refused_for_a_model_without_a_plan_even_on_one_process():
    with pytest.raises(ForgeError, match="tp is offered for gpt models, not mlp"):
        degrees(TrainConfig(max_steps=1, strategy="tp"), 1, MLP, MLPConfig(name="mlp"))


def test_tensor_parallel_degree_must_divide_the_heads():
    with pytest.raises(ForgeError, match=r"model.n_head \(4\) across 3 tensor-parallel ranks.*divides 4"):
        degrees(TrainConfig(max_steps=1, strategy="tp"), 3, GPT, GPT4)
    assert degrees(TrainConfig(max_steps=1, strategy="tp"), 4, GPT, GPT4) == ("tp", 1, 4)
    assert degrees(TrainConfig(max_steps=1, strategy="fsdp+tp", tp_degree=2), 4, GPT, GPT4) == ("fsdp+tp", 2, 2)


def test_fsdp_tp_names_the_tensor_parallel_degrees_that_fit():
    with pytest.raises(ForgeError, match=r"set train.tp_degree to 2 or 4"):
        degrees(
            TrainConfig(max_steps=1, strategy="fsdp+tp", tp_degree=8),
            16,
            GPT,
            GPTConfig(name="gpt", n_head=4, n_embd=4),
        )
