"""Pruning, each followed by a short fine-tune on the labels:

- magnitude: the globally smallest weights of the blocks' linear layers set to zero (torch's
  global_unstructured), at each of ``compress.prune.sparsities``; the masks hold during the
  fine-tune. The matrices keep their shape, so files and dense kernels do not shrink: this
  variant shows what the sparsity costs in accuracy.
- structured: whole attention heads and feed-forward channels (text) or hidden units (mlp) with
  the smallest L1 weight removed from every layer, the matrices cut down, so the model is
  smaller and faster.

transformers can no longer prune heads itself (``prune_heads`` left in v5) but keeps
``prune_linear_layer``; a config cannot say how many heads each layer kept, so a structured text
variant records that in ``pruned.json`` and its loader cuts a fresh model to those shapes.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune

from forgeml.compression.distill import train_student
from forgeml.compression.variants import Variant, saved_torch_variant
from forgeml.errors import RunDirError
from forgeml.models.registry import ModelFamily, load_family
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
        layers = [m for m in blocks.modules() if isinstance(m, nn.Linear)]
    else:
        layers = [m for m in family.network.modules() if isinstance(m, nn.Linear)][:-1]
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


def structured_text(family: ModelFamily, fraction: float) -> dict[str, list[int]]:
    """Cut heads and FFN channels out of every encoder layer in place; the kept counts per layer."""
    from transformers.pytorch_utils import prune_linear_layer

    heads, channels = [], []
    for layer in family.network.base_model.encoder.layer:
        attention = layer.attention.self
        size = attention.attention_head_size
        n_heads = attention.query.out_features // size
        # A head's weight: the L1 norm of its slice of the output projection.
        out = layer.attention.output.dense
        scores = out.weight.detach().abs().view(out.out_features, n_heads, size).sum(dim=(0, 2))
        kept = keep_by_l1(scores, fraction)
        index = (kept[:, None] * size + torch.arange(size)).flatten()
        for name in ("query", "key", "value"):
            setattr(attention, name, prune_linear_layer(getattr(attention, name), index, dim=0))
        layer.attention.output.dense = prune_linear_layer(out, index, dim=1)
        attention.num_attention_heads, attention.all_head_size = len(kept), len(index)
        # A channel's weight: the L1 norms of its row in the up and its column in the down projection.
        up, down = layer.intermediate.dense, layer.output.dense
        scores = up.weight.detach().abs().sum(1) + down.weight.detach().abs().sum(0)
        index = keep_by_l1(scores, fraction)
        layer.intermediate.dense = prune_linear_layer(up, index, dim=0)
        layer.output.dense = prune_linear_layer(down, index, dim=1)
        heads.append(len(kept))
        channels.append(len(index))
    return {"heads": heads, "channels": channels}


def structured_gpt(family: ModelFamily, fraction: float) -> dict[str, list[int]]:
    """Cut heads and MLP channels out of every block in place (the attention counts its heads from
    the projections' width); the kept counts per block."""
    from transformers.pytorch_utils import prune_linear_layer

    heads, channels = [], []
    for block in family.network.blocks:
        attention, size = block.attn, block.attn.head_dim
        out = attention.c_proj
        scores = out.weight.detach().abs().view(out.out_features, -1, size).sum(dim=(0, 2))
        kept = keep_by_l1(scores, fraction)
        index = (kept[:, None] * size + torch.arange(size)).flatten()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attention, name, prune_linear_layer(getattr(attention, name), index, dim=0))
        attention.c_proj = prune_linear_layer(out, index, dim=1)
        up, down = block.mlp.c_fc, block.mlp.c_proj
        index = keep_by_l1(up.weight.detach().abs().sum(1) + down.weight.detach().abs().sum(0), fraction)
        block.mlp.c_fc, block.mlp.c_proj = prune_linear_layer(up, index, dim=0), prune_linear_layer(down, index, dim=1)
        heads.append(len(kept))
        channels.append(len(index))
    return {"heads": heads, "channels": channels}


def structured_mlp(family: ModelFamily, fraction: float) -> ModelFamily:
    """A new MLP with each hidden layer's units of smallest L1 weight (in and out) removed."""
    linears = [m for m in family.network.layers if isinstance(m, nn.Linear)]
    kept = []
    for inner, outer in zip(linears, linears[1:], strict=False):
        kept.append(keep_by_l1(inner.weight.detach().abs().sum(1) + outer.weight.detach().abs().sum(0), fraction))
    config = family.config.model_copy(update={"hidden_sizes": [len(k) for k in kept]})
    student = type(family)(config, family.features, family.labels)
    cut = [m for m in student.network.layers if isinstance(m, nn.Linear)]
    rows = [*kept, torch.arange(linears[-1].out_features)]
    columns = [torch.arange(linears[0].in_features), *kept]
    with torch.no_grad():
        for new, old, r, c in zip(cut, linears, rows, columns, strict=True):
            new.weight.copy_(old.weight[r][:, c])
            new.bias.copy_(old.bias[r])
        student.network.mean.copy_(family.network.mean)
        student.network.std.copy_(family.network.std)
    return student


def structured(source: Variant, recipe: Recipe, run: RunDir, root: Path) -> Variant:
    fraction = recipe.compress.prune.structured_fraction
    family = copy.deepcopy(source.family)
    shapes = None
    if family.name == "text-classifier":
        shapes = structured_text(family, fraction)
    elif family.name == "gpt":
        shapes = structured_gpt(family, fraction)
    else:
        family = structured_mlp(family, fraction)
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
    from transformers.pytorch_utils import prune_linear_layer

    shapes = json.loads((folder / SHAPES).read_text())
    family = load_family(folder, {})  # the architecture at full size, to be cut
    if family.name == "gpt":
        for block, heads, channels in zip(family.network.blocks, shapes["heads"], shapes["channels"], strict=True):
            index = torch.arange(heads * block.attn.head_dim)
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(block.attn, name, prune_linear_layer(getattr(block.attn, name), index, dim=0))
            block.attn.c_proj = prune_linear_layer(block.attn.c_proj, index, dim=1)
            index = torch.arange(channels)
            block.mlp.c_fc = prune_linear_layer(block.mlp.c_fc, index, dim=0)
            block.mlp.c_proj = prune_linear_layer(block.mlp.c_proj, index, dim=1)
    else:
        layers = family.network.base_model.encoder.layer
        for layer, heads, channels in zip(layers, shapes["heads"], shapes["channels"], strict=True):
            attention = layer.attention.self
            index = torch.arange(heads * attention.attention_head_size)
            for name in ("query", "key", "value"):
                setattr(attention, name, prune_linear_layer(getattr(attention, name), index, dim=0))
            layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
            attention.num_attention_heads, attention.all_head_size = heads, len(index)
            index = torch.arange(channels)
            layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
            layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    network = family.network
    missing, unexpected = network.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    # A tied weight (gpt's head is its embedding) is stored once, under its first name.
    tied = {name for name, _ in network.named_parameters(remove_duplicate=False)} - dict(
        network.named_parameters()
    ).keys()
    if set(missing) - tied or unexpected:
        raise RunDirError(f"{folder / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    network.eval()
    return family
