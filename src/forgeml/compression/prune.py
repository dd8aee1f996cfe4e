"""Pruning, each followed by a short fine-tune on the labels:

- magnitude: the globally smallest weights of the blocks' linear layers set to zero (torch's
  global_unstructured), at each of ``compress.prune.sparsities``; the masks hold during the
  fine-tune. The matrices keep their shape, so files and dense kernels do not shrink: this
  variant shows what the sparsity costs in accuracy.
- structured: whole attention heads and feed-forward channels (text classifier, gpt) or hidden
  units (mlp) with the smallest L1 weight removed from every layer, the matrices cut down, so
  the model is smaller and faster.

transformers can no longer prune heads itself (``prune_heads`` left in v5) but keeps
``prune_linear_layer``; a config cannot say how many heads each layer kept, so a structured
transformer variant records that in ``pruned.json`` and its loader cuts a fresh model to those
shapes.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune

from forgeml.compression.distill import train_student
from forgeml.compression.variants import Variant, saved_torch_variant, tied_parameters
from forgeml.errors import NotOffered, RunDirError
from forgeml.models.registry import ModelFamily, is_linear, load_family
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir

SHAPES = "pruned.json"


def prunable(family: ModelFamily) -> list[tuple[nn.Module, str]]:
    """The linear layers of the repeated blocks (transformer layers), which hold most weights;
    in a network without blocks, every linear layer but the output head. What sits outside the
    blocks is small and its weights are small: one global threshold zeroed it first (at 80 %
    sparsity the default model's pooler was 100 % zeros, its head 99 %, and it fell to 6 %
    accuracy)."""
    blocks = family.blocks()
    if blocks is not None:
        layers = [m for m in blocks.modules() if is_linear(m)]
    else:
        layers = [m for m in family.network.modules() if isinstance(m, nn.Linear)][:-1]
    if not layers:
        raise NotOffered(f"the {family.name} model has no linear layers to prune")
    return [(module, "weight") for module in layers]


def magnitude(source: Variant, sparsity: float, recipe: Recipe, run: RunDir, root: Path) -> Variant:
    family = copy.deepcopy(source.family)
    layers = prunable(family)
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=sparsity)
    train_student(family, None, recipe, run, steps=recipe.compress.prune.finetune_steps)
    for module, name in layers:
        prune.remove(module, name)  # the zeros become the weights
    return save(f"prune-{round(sparsity * 100)}", family, root, sparsity=sparsity)


def keep_by_l1(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (sorted) of the ``1 - fraction`` largest scores, at least one."""
    keep = max(1, round(len(scores) * (1 - fraction)))
    return scores.topk(keep).indices.sort().values


def cut(
    family: ModelFamily,
    heads_of: Callable[[nn.Linear, int], torch.Tensor],
    channels_of: Callable[[nn.Linear, nn.Linear], torch.Tensor],
) -> dict[str, list[int]]:
    """Cut every block of a transformer family in place down to the heads ``heads_of(output
    projection, head size)`` and the feed-forward channels ``channels_of(up, down)`` choose; the
    kept counts per block."""
    from transformers.pytorch_utils import prune_linear_layer

    heads, channels = [], []
    for block in family.blocks():
        layout = family.block_layout(block)
        size, out, up, down = layout.head_size, layout.out, layout.up, layout.down
        kept = heads_of(getattr(*out), size)
        index = (kept[:, None] * size + torch.arange(size)).flatten()
        for owner, name in layout.qkv:
            setattr(owner, name, prune_linear_layer(getattr(owner, name), index, dim=0))
        setattr(*out, prune_linear_layer(getattr(*out), index, dim=1))
        layout.set_heads(len(kept))
        kept_channels = channels_of(getattr(*up), getattr(*down))
        setattr(*up, prune_linear_layer(getattr(*up), kept_channels, dim=0))
        setattr(*down, prune_linear_layer(getattr(*down), kept_channels, dim=1))
        heads.append(len(kept))
        channels.append(len(kept_channels))
    return {"heads": heads, "channels": channels}


def structured_blocks(family: ModelFamily, fraction: float) -> dict[str, list[int]]:
    """Remove ``fraction`` of each block's heads and feed-forward channels, those of least L1
    weight: a head's slice of the output projection, a channel's row in the up and column in the
    down projection."""

    def heads(out: nn.Linear, size: int) -> torch.Tensor:
        return keep_by_l1(out.weight.detach().abs().view(out.out_features, -1, size).sum(dim=(0, 2)), fraction)

    def channels(up: nn.Linear, down: nn.Linear) -> torch.Tensor:
        return keep_by_l1(up.weight.detach().abs().sum(1) + down.weight.detach().abs().sum(0), fraction)

    return cut(family, heads, channels)


def structured_layers(family: ModelFamily, fraction: float) -> ModelFamily:
    """A network without blocks (a stack of linear layers) narrowed by the family, each hidden
    layer's units of smallest L1 weight (in and out) removed and the others' weights kept."""
    linears = [m for m in family.network.modules() if isinstance(m, nn.Linear)]
    kept = []
    for inner, outer in zip(linears, linears[1:], strict=False):
        kept.append(keep_by_l1(inner.weight.detach().abs().sum(1) + outer.weight.detach().abs().sum(0), fraction))
    student = family.narrower([len(k) for k in kept])
    cut = [m for m in student.network.modules() if isinstance(m, nn.Linear)]
    rows = [*kept, torch.arange(linears[-1].out_features)]
    columns = [torch.arange(linears[0].in_features), *kept]
    with torch.no_grad():
        for new, old, r, c in zip(cut, linears, rows, columns, strict=True):
            new.weight.copy_(old.weight[r][:, c])
            new.bias.copy_(old.bias[r])
    return student


def structured(source: Variant, recipe: Recipe, run: RunDir, root: Path) -> Variant:
    fraction = recipe.compress.prune.structured_fraction
    family = copy.deepcopy(source.family)
    shapes = None
    if family.blocks() is not None:
        shapes = structured_blocks(family, fraction)
    else:
        family = structured_layers(family, fraction)
    train_student(family, None, recipe, run, steps=recipe.compress.prune.finetune_steps)
    return save("prune-structured", family, root, shapes=shapes, fraction=fraction)


def save(name: str, family: ModelFamily, root: Path, shapes: dict | None = None, **record: float) -> Variant:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    family.save(folder)
    if shapes is not None:
        (folder / SHAPES).write_text(json.dumps(shapes))
    # As it will be served: from its files.
    return saved_torch_variant(name, "prune", load_pruned(folder), folder, **record)


def load_pruned(folder: Path) -> ModelFamily:
    """A pruned variant: a plain family, or a text model cut to the shapes in ``pruned.json``."""
    if not (folder / SHAPES).exists():
        return load_family(folder)
    shapes = json.loads((folder / SHAPES).read_text())
    family = load_family(folder, {})  # the architecture at full size, to be cut
    heads, channels = iter(shapes["heads"]), iter(shapes["channels"])
    cut(family, lambda out, size: torch.arange(next(heads)), lambda up, down: torch.arange(next(channels)))
    network = family.network
    missing, unexpected = network.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if set(missing) - tied_parameters(network) or unexpected:
        raise RunDirError(f"{folder / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    network.eval()
    return family
