"""How processes split into data- and tensor-parallel groups, before any mesh is built."""

import pytest

from forgeml.errors import ForgeError
from forgeml.models.gpt import GPT, GPTConfig
from forgeml.models.mlp import MLP, MLPConfig
from forgeml.recipe import RecipeError, validate_recipe
from forgeml.training.config import ParallelConfig
from forgeml.training.strategies import degrees

GPT4 = GPTConfig(name="gpt", n_head=4, n_embd=128)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "single", "auto"])
def test_one_process_runs_any_data_parallel_recipe_as_single(strategy):
    assert degrees(ParallelConfig(strategy=strategy), 1, MLP, MLPConfig(name="mlp")) == ("single", 1, 1)


def test_tensor_parallel_is_refused_for_a_model_without_a_plan_when_the_recipe_is_read():
    recipe = {"data": {"source": "wine"}, "model": {"name": "mlp"}, "train": {"max_steps": 1}}
    with pytest.raises(
        RecipeError,
        match="parallel.strategy: tp splits layers by a tensor-parallel plan, and mlp models have none; use ddp",
    ):
        validate_recipe({**recipe, "parallel": {"strategy": "tp"}})


def test_tensor_parallel_degree_must_divide_the_heads():
    with pytest.raises(ForgeError, match=r"model.n_head \(4\) across 3 tensor-parallel ranks.*divides 4"):
        degrees(ParallelConfig(strategy="tp"), 3, GPT, GPT4)
    assert degrees(ParallelConfig(strategy="tp"), 4, GPT, GPT4) == ("tp", 1, 4)
    assert degrees(ParallelConfig(strategy="fsdp+tp", tp_degree=2), 4, GPT, GPT4) == ("fsdp+tp", 2, 2)


def test_fsdp_tp_names_the_tensor_parallel_degrees_that_fit():
    with pytest.raises(ForgeError, match=r"set parallel.tp_degree to 2 or 4"):
        degrees(
            ParallelConfig(strategy="fsdp+tp", tp_degree=8),
            16,
            GPT,
            GPTConfig(name="gpt", n_head=4, n_embd=4),
        )


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo group of one process, so DDP and FSDP2 wrap a module as they would in a job."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def accumulating(dp_degree: int = 2):
    """A strategy that, like a rank of a data-parallel job, must average gradients across ranks."""
    import torch

    from forgeml.training.strategies import Strategy

    return Strategy("ddp", torch.device("cpu"), Strategy.single(torch.device("cpu")).env, dp_degree=dp_degree)


def test_ddp_averages_gradients_once_per_step_not_once_per_micro_batch(one_rank_group):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(torch.nn.Linear(4, 2))
    reductions = []

    def count(state, bucket):
        reductions.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, count)
    strategy, x = accumulating(), torch.ones(3, 4)
    for index in range(4):  # four micro-batches, one optimizer step
        with strategy.gradient_sync(model, sync=index == 3):
            model(x).sum().backward()
    assert reductions == [0]  # one bucket, reduced once
    torch.testing.assert_close(model.module.bias.grad, torch.full((2,), 12.0))  # all four accumulated


def test_fsdp_holds_gradients_unreduced_until_the_last_micro_batch(one_rank_group):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(torch.nn.Linear(4, 2), mesh=init_device_mesh("cpu", (1,)))
    strategy, x = accumulating(), torch.ones(3, 4)
    with strategy.gradient_sync(model, sync=False):
        model(x).sum().backward()
    assert model.bias.grad is None  # kept unsharded inside FSDP, nothing reduce-scattered yet
    with strategy.gradient_sync(model, sync=True):
        model(x).sum().backward()
    torch.testing.assert_close(model.bias.grad.full_tensor(), torch.full((2,), 6.0))
