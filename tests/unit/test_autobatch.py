"""micro_batch_size: auto: out-of-memory back-off, the CPU memory estimate, and the train stage using it."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import forgeml
from forgeml.errors import ForgeError
from forgeml.models.registry import Batch
from forgeml.training.autobatch import (
    divisors_descending,
    find_micro_batch,
    largest_that_runs,
    saved_bytes,
    training_step,
)
from forgeml.training.losses import ClassificationLoss


def test_divisors_keep_accumulation_whole():
    assert divisors_descending(12) == [12, 6, 4, 3, 2, 1]
    assert divisors_descending(1) == [1]


def test_out_of_memory_backs_off_to_the_largest_size_that_runs():
    tried = []

    def trial(size: int) -> None:
        tried.append(size)
        if size > 3:
            raise torch.OutOfMemoryError(f"{size} rows do not fit")

    assert largest_that_runs([8, 4, 2, 1], trial) == 2
    assert tried == [8, 4, 2]
    assert largest_that_runs([8, 4], trial) is None


def test_other_errors_are_not_taken_for_out_of_memory():
    def trial(size: int) -> None:
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        largest_that_runs([4, 2], trial)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
    ],
)
def test_any_failed_device_allocation_backs_off(message):
    def trial(size: int) -> None:
        if size > 2:
            raise RuntimeError(message)

    assert largest_that_runs([8, 4, 2, 1], trial) == 2


def test_the_probe_runs_a_whole_training_step_and_leaves_the_weights_as_they_were():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    moments = []

    def record(optimizer, args, kwargs):
        moments.append(sum(len(state) for state in optimizer.state.values()))

    hook = register_optimizer_step_post_hook(record)
    try:
        training_step(network, lambda size: network(torch.randn(size, 8)).pow(2).mean())(4)
    finally:
        hook.remove()
    assert moments and moments[0] > 0  # AdamW's step ran and allocated its state
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())


def test_saved_bytes_grow_by_the_same_amount_for_each_row():
    network = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 4))
    one, two, eight = (saved_bytes(lambda n=n: network(torch.randn(n, 64)).sum()) for n in (1, 2, 8))
    assert two > one > 0
    assert eight - one == 7 * (two - one)


def probe(budget_bytes: int, per_rank: int = 32) -> int:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 3))

    class Wrapped(nn.Module):  # networks take keyword inputs
        def __init__(self) -> None:
            super().__init__()
            self.net = network

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.net(features)

    items = [(torch.randn(64), torch.tensor(i % 3)) for i in range(10)]

    def collate(rows) -> Batch:
        return Batch({"features": torch.stack([r[0] for r in rows])}, torch.stack([r[1] for r in rows]), len(rows))

    import contextlib

    return find_micro_batch(
        Wrapped(), items, collate, ClassificationLoss(), per_rank, torch.device("cpu"), contextlib.nullcontext,
        budget_bytes,
    )  # fmt: skip


def test_cpu_budget_picks_the_largest_divisor_that_fits():
    assert probe(2**30) == 32
    sizes = [probe(budget) for budget in range(600_000, 1_200_000, 50_000)]
    assert sizes == sorted(sizes) and len(set(sizes)) > 1
    assert all(32 % size == 0 for size in sizes)


def test_a_budget_too_small_for_one_row_names_the_setting():
    with pytest.raises(ForgeError, match="memory_budget_gb"):
        probe(1000)


TABLE = ("train.max_steps=5", "train.global_batch_size=16", "model.dropout=0", "train.augment.gaussian_noise=0")


def test_the_train_stage_uses_the_chosen_micro_batch_and_keeps_the_global_batch(tmp_path):
    # A budget that fits some but not all of the 16 rows: the run accumulates, with the same result.
    auto = ("parallel.micro_batch_size=auto", "parallel.memory_budget_gb=0.00008")
    forgeml.train(forgeml.as_recipe("tabular", (*TABLE, *auto)), tmp_path / "auto")
    chosen = json.loads((tmp_path / "auto" / "train" / "eval.json").read_text())["micro_batch_size"]
    assert chosen in (1, 2, 4, 8)
    forgeml.train(forgeml.as_recipe("tabular", (*TABLE, f"parallel.micro_batch_size={chosen}")), tmp_path / "fixed")
    a, b = (load_file(tmp_path / run / "train" / "model" / "model.safetensors") for run in ("auto", "fixed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
