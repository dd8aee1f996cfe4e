"""``check_family``: the conformance suite a model family passes before the stages can rely on it,
as scikit-learn's ``check_estimator`` is for estimators. Run it in a family's own tests::

    from forgeml.testing import check_family
    passed = check_family(MyFamily, MyConfig(name="my-net"), splits)

It fits the encoder on ``splits.train`` (and reads it back), builds the network, takes one training
step, saves, loads and compares outputs, predicts or generates, and exercises each capability the
family declares (blocks, input embeddings, distillation student, structured pruning, tensor-parallel
plan, FLOPs, export axes, augmentations). A failed check raises AssertionError naming it; the result
lists the checks that ran, so a test can see that a capability was exercised.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter
from torch import nn

from forgeml.errors import ForgeError
from forgeml.models.registry import Batch, ModelFamily, Splits, load_family, logits_of
from forgeml.training.config import AugmentConfig, TrainConfig

ROWS = 8  # rows of each split a check reads


def check(condition: bool, name: str, detail: str) -> None:
    if not condition:
        raise AssertionError(f"check_family, {name}: {detail}")


def first_batch(family: ModelFamily, encoder: Any, splits: Splits, augment: Any = None) -> Batch:
    table = encoder.table(splits.train.head(ROWS * 4), splits.label_column, splits.labels)
    items = family.items(table)
    check(len(items) > 0, "items", "the encoded training rows give no items")
    generator = torch.Generator().manual_seed(0)
    return family.collate([items[i] for i in range(min(ROWS, len(items)))], augment, generator)


def outputs(family: ModelFamily, batch: Batch) -> torch.Tensor:
    family.network.eval()
    with torch.no_grad():
        return logits_of(family.network(**batch.inputs)).float()


def offered(call: Any) -> Any:
    """What a capability method returns, or None where the family says it is not offered."""
    try:
        return call()
    except ForgeError:
        return None


def check_family(family_cls: type[ModelFamily], config: Any, splits: Splits, seed: int = 0) -> list[str]:
    """Run the conformance checks on ``family_cls`` with ``config`` (its recipe model section) and
    ``splits`` (raw rows, as prepare hands them to the encoder); the names of the checks that ran."""
    passed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        # The encoder: fitted on train, saved beside the shards, read back the same.
        encoder = family_cls.fit_encoder(config, splits)
        encoder.save(folder / "encoder")
        reloaded = family_cls.load_encoder(config, folder / "encoder")
        rows = splits.train.head(ROWS)
        fresh, back = (e.table(rows, splits.label_column, splits.labels) for e in (encoder, reloaded))
        check(fresh.equals(back), "encoder round trip", "the reloaded encoder stores other rows than the fitted one")
        passed.append("encoder round trip")

        family = family_cls.create(config, encoder, splits.labels, seed)
        twin = family_cls.create(config, encoder, splits.labels, seed)
        batch = first_batch(family, encoder, splits)
        check(
            torch.equal(outputs(family, batch), outputs(twin, batch)),
            "create",
            "two networks created with one seed give different outputs",
        )
        passed.append("create")

        # One training step moves the trainable weights, with a finite loss.
        cfg = TrainConfig(max_steps=1)
        loss_fn = family.task.loss(cfg, splits.labels, {}, "none")
        family.network.train()
        before = {n: p.detach().clone() for n, p in family.network.named_parameters() if p.requires_grad}
        check(bool(before), "training step", "the network has no trainable parameters")
        optimizer = torch.optim.AdamW([p for p in family.network.parameters() if p.requires_grad], lr=1e-3)
        loss = loss_fn(logits_of(family.network(**batch.inputs)), batch.targets)
        check(math.isfinite(loss.item()), "training step", f"the loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        moved = [n for n, p in family.network.named_parameters() if n in before and not torch.equal(p, before[n])]
        check(bool(moved), "training step", "no trainable weight changed after one AdamW step")
        passed.append("training step")

        # Save and load: the same outputs from the files alone.
        family.save(folder / "model")
        loaded = load_family(folder / "model")
        check(type(loaded) is family_cls, "save and load", f"load_family gave {type(loaded).__name__}")
        check(
            torch.allclose(outputs(family, batch), outputs(loaded, batch), atol=1e-5),
            "save and load",
            "the loaded model's outputs differ from the saved one's",
        )
        passed.append("save and load")

        if family.task.classifies:
            inputs = family.split_inputs(splits.test.head(ROWS), splits)
            check(inputs == family.check_rows(inputs, splits.text_column, "check"), "inputs", "check_rows changed rows")
            TypeAdapter(list[family.request_item(1000)]).validate_python([family.example_input()])
            probs = loaded.predict_proba(inputs)
            check(tuple(probs.shape) == (len(inputs), len(splits.labels)), "predict", f"shape {tuple(probs.shape)}")
            check(torch.allclose(probs.sum(-1), torch.ones(len(inputs)), atol=1e-4), "predict", "rows do not sum to 1")
            passed.append("predict")
        if family.generates:
            pieces = list(loaded.stream("", 3, 1.0, None, torch.Generator().manual_seed(seed)))
            check(1 <= len(pieces) <= 3 and all(isinstance(p, str) for p in pieces), "generate", f"gave {pieces!r}")
            passed.append("generate")

        passed += check_capabilities(family_cls, config, encoder, splits, loaded, batch)
    return passed


def check_capabilities(
    family_cls: type[ModelFamily], config: Any, encoder: Any, splits: Splits, family: ModelFamily, batch: Batch
) -> list[str]:
    passed = []
    names = set(type(config).model_fields)
    unknown = [f for f in family_cls.encoding_fields if f not in names]
    check(not unknown, "encoding fields", f"{unknown} are not fields of {type(config).__name__}")
    unknown = sorted(family_cls.augmentations - set(AugmentConfig.model_fields))
    check(not unknown, "augmentations", f"{unknown} are not train.augment options")
    for option in sorted(family_cls.augmentations):
        value = 0.5 if option != "mixup_alpha" else 0.4
        augmented = first_batch(family, encoder, splits, AugmentConfig(**{option: value}))
        check(augmented.size == batch.size, f"augmentation {option}", "changed the number of rows")
        passed.append(f"augmentation {option}")

    axes = family.dynamic_axes(list(batch.inputs))
    check(all(axes[n].get(0) == "batch" for n in batch.inputs), "export axes", f"axis 0 is not the batch: {axes}")
    passed.append("export axes")

    flops = family.flops_per_token()
    if flops is not None:
        check(flops > 0, "flops per token", f"{flops}")
        passed.append("flops per token")

    embeddings = family.input_embeddings()
    if embeddings is not None:
        seen = []
        handle = embeddings.register_forward_hook(lambda module, args, out: seen.append(out))
        outputs(family, batch)
        handle.remove()
        check(bool(seen), "input embeddings", "the layer named does not run in the forward pass")
        passed.append("input embeddings")

    blocks = family.blocks()
    if blocks is not None:
        check(isinstance(blocks, nn.ModuleList) and len(blocks) > 0, "blocks", "not a non-empty ModuleList")
        passed.append("blocks")
        plan = offered(family.tensor_parallel_plan)
        if plan is not None:
            modules = dict(family.network.named_modules())
            missing = [path for path in plan if path not in modules]
            check(not missing, "tensor-parallel plan", f"no modules {missing[:3]}")
            passed.append("tensor-parallel plan")
        if offered(lambda: family.block_layout(blocks[0])) is not None:
            from forgeml.compression.prune import structured_blocks

            pruned = copy.deepcopy(family)
            shapes = structured_blocks(pruned, 0.5)
            check(len(shapes["heads"]) == len(blocks), "structured pruning", f"cut {shapes}")
            same = outputs(pruned, batch).shape == outputs(family, batch).shape
            check(same, "structured pruning", "the outputs changed shape")
            passed.append("structured pruning")
    elif offered(lambda: family.narrower([1])) is not None:
        from forgeml.compression.prune import structured_layers

        narrowed = structured_layers(copy.deepcopy(family), 0.5)
        check(outputs(narrowed, batch).shape == outputs(family, batch).shape, "structured pruning", "outputs changed")
        passed.append("structured pruning")

    student = offered(lambda: family.student(None, 0.5))
    if student is not None:
        size = sum(p.numel() for p in family.network.parameters())
        smaller = sum(p.numel() for p in student.network.parameters())
        check(type(student) is family_cls and smaller < size, "distillation student", f"{smaller} >= {size} weights")
        check(outputs(student, batch).shape == outputs(family, batch).shape, "distillation student", "outputs differ")
        passed.append("distillation student")
    return passed
