"""Where the model runs and how it is split: one place that builds the device mesh and wraps the
network, always in the same order (tensor parallel, activation checkpointing, then FSDP2 or DDP),
as torchtitan composes its parallelisms. The training loop never forks on the strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from forgeml.errors import ForgeError
from forgeml.models.registry import ModelFamily, family_for
from forgeml.recipe import Recipe
from forgeml.training.config import ParallelConfig, TrainConfig
from forgeml.training.processes import ONE_PROCESS, Dist


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ForgeError("parallel.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Strategy:
    """How this process takes part: its device, its data-parallel rank and group, and its mesh."""

    name: str
    device: torch.device
    env: Dist
    dp_degree: int = 1
    tp_degree: int = 1
    mesh: Any = None  # a DeviceMesh ("dp", "tp") when more than one process
    activation_checkpointing: bool = False
    precision: str = "fp32"

    @classmethod
    def single(cls, device: torch.device) -> Strategy:
        return cls("single", device, ONE_PROCESS)

    @property
    def dp_rank(self) -> int:
        return self.env.rank // self.tp_degree

    def dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the data-parallel ranks (each holds a different part of the batch)."""
        if self.dp_degree == 1:
            return value
        value = value.to(self.device).clone()
        dist.all_reduce(value, group=self.mesh["dp"].get_group())
        return value

    @contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """A backward pass whose gradients are averaged across data-parallel ranks only if ``sync``:
        the micro-batches before a step's last keep theirs local (DDP's ``no_sync``, FSDP2's
        ``set_requires_gradient_sync``), so the all-reduce or reduce-scatter runs once a step."""
        if sync or self.dp_degree == 1:
            yield
        elif hasattr(model, "no_sync"):  # DistributedDataParallel
            with model.no_sync():
                yield
        else:  # an FSDP2 module: it holds the unsharded gradients until the synchronised pass
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    def clip_gradients(self, model: nn.Module, max_norm: float) -> None:
        """Clip the global gradient norm. Under tensor parallelism sharded (DTensor) and replicated
        (plain) gradients mix, which torch's clip_grad_norm_ refuses; there each norm is reduced
        to a plain number first (replicated gradients count once: they are equal on every rank)."""
        if self.tp_degree == 1:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = [torch.linalg.vector_norm(g) for g in grads]
        norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
        total = float(torch.linalg.vector_norm(torch.stack(norms)))
        scale = min(1.0, max_norm / (total + 1e-6))  # as clip_grad_norm_ computes it
        for g in grads:
            g.mul_(scale)

    def wrap(self, family: ModelFamily) -> nn.Module:
        """The network, split and wrapped for this strategy (in place: parameters are shared)."""
        network = family.network.to(self.device)
        if self.tp_degree > 1:
            from torch.distributed.tensor.parallel import parallelize_module

            parallelize_module(network, self.mesh["tp"], family.tensor_parallel_plan())
        blocks = family.blocks()
        if self.activation_checkpointing and blocks is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)
        if self.name in ("fsdp", "fsdp+tp"):
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            options: dict[str, Any] = {"mesh": self.mesh["dp"]}
            if self.precision == "bf16":  # bf16 compute, fp32 gradient reduction; fp32 runs stay fp32
                options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in blocks or ():
                fully_shard(block, **options)
            fully_shard(network, **options)
            return network
        if self.name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(network, device_ids=ids, process_group=self.mesh["dp"].get_group())
        return network

    def unsharded(self, model: nn.Module, family: ModelFamily, fresh: Callable[[], ModelFamily]) -> ModelFamily:
        """A family whose network holds the whole trained weights as plain tensors, for export.
        Sharded parameters (FSDP, TP) are gathered into a fresh network (a collective: every
        rank calls it); otherwise the family's own network already holds them."""
        if self.name not in ("fsdp", "tp", "fsdp+tp"):
            return family
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if not self.env.main:  # only rank 0 receives the gathered tensors
            return family
        whole = fresh()
        whole.network.load_state_dict(state)
        return whole


def build_strategy(
    parallel: ParallelConfig, precision: str, env: Dist, family: type[ModelFamily] | ModelFamily, model_config: Any
) -> Strategy:
    """The recipe's strategy for this job, with its device mesh."""
    device = resolve_device(parallel.device, env.local_rank)
    name, dp, tp = degrees(parallel, env.world_size, family, model_config)
    mesh = None
    if env.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return Strategy(name, device, env, dp, tp, mesh, parallel.activation_checkpointing, precision)


def degrees(
    parallel: ParallelConfig, world_size: int, family: type[ModelFamily] | ModelFamily, model_config: Any
) -> tuple[str, int, int]:
    """(strategy, data-parallel degree, tensor-parallel degree) for ``world_size`` processes;
    degrees that do not fit the processes or the model are an error (a strategy the model does
    not offer is refused when the recipe is read)."""
    name = parallel.strategy
    if name == "auto":
        name = "ddp" if world_size > 1 else "single"
    if world_size == 1:  # nothing to split or average: a recipe written for a cluster runs as it is on one process
        return "single", 1, 1
    if name == "single" and world_size > 1:
        raise ForgeError(
            f"parallel.strategy: single runs one process, but {world_size} were started; use ddp, fsdp, tp or fsdp+tp"
        )
    tp = {"tp": world_size, "fsdp+tp": parallel.tp_degree}.get(name, 1)  # tp: all processes split the model
    if world_size % tp:
        raise ForgeError(
            f"parallel.tp_degree: {world_size} processes = data-parallel degree x tensor-parallel degree, "
            f"but {world_size} is not a multiple of {tp}; choose a tp_degree that divides {world_size}"
        )
    for what, size in family.tensor_parallel_sizes(model_config).items() if tp > 1 else ():
        if size % tp:
            if name == "tp":  # every process takes a share
                hint = f"start a number of processes that divides {size}"
            else:
                fits = [str(d) for d in range(2, size + 1) if size % d == 0 and world_size % d == 0]
                hint = f"set parallel.tp_degree to {' or '.join(fits)}" if fits else "use fsdp"
            raise ForgeError(
                f"parallel.strategy: {name} splits {what} ({size}) across {tp} tensor-parallel ranks, but {size} "
                f"is not a multiple of {tp}; {hint}, or change {what}"
            )
    return name, world_size // tp, tp


def check_launch(recipe: Recipe, world_size: int) -> None:
    """What the workers would refuse, refused before any of them starts (or any stage runs)."""
    _, dp, tp = degrees(recipe.parallel, world_size, family_for(recipe.model), recipe.model)
    resolve_batch(recipe.train, recipe.parallel, dp, tp)


def resolve_batch(cfg: TrainConfig, parallel: ParallelConfig, dp: int, tp: int) -> int | None:
    """The micro-batch (rows a forward pass on each rank): global batch = micro-batch x
    accumulation x data-parallel degree, all whole numbers; without micro_batch_size, the global
    batch split evenly over the data-parallel ranks; None for ``auto``, which training settles."""
    if parallel.micro_batch_size == "auto":  # settled when training starts (autobatch), from this share
        if cfg.global_batch_size % dp:
            raise ForgeError(
                f"train.global_batch_size ({cfg.global_batch_size}) must be a multiple of the data-parallel "
                f"degree ({dp} = {dp * tp} processes / tp_degree {tp}); change one of them"
            )
        return None
    micro = parallel.micro_batch_size or max(1, cfg.global_batch_size // dp)
    if cfg.global_batch_size % (micro * dp):
        raise ForgeError(
            f"train.global_batch_size ({cfg.global_batch_size}) must be a multiple of parallel.micro_batch_size "
            f"({micro}) x data-parallel degree ({dp} = {dp * tp} processes / tp_degree {tp}) = {micro * dp}; "
            "change one of them"
        )
    return micro


def accumulation(global_batch_size: int, micro_batch: int, strategy: Strategy) -> int:
    """Micro-batches per optimizer step on each rank, so the global batch means the same at any scale."""
    return global_batch_size // (micro_batch * strategy.dp_degree)
