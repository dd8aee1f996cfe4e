"""``module``: the user's own network, built by their function or given as an instance.

``factory: "package.module:function"`` is called as ``factory(num_classes=K, vocab_size=V, **options)``
(``vocab_size`` None for features) and returns an ``nn.Module``. A text model is called as
``forward(input_ids=..., attention_mask=...)`` on the ids of ``tokenizer``; a feature model as
``forward(features=...)`` on the features standardised with the training split's statistics. It
returns logits, or an object holding ``.logits``. The model is saved as safetensors with the factory
and options, and ``forgeml.load`` imports the factory to rebuild it.

From Python, ``forgeml.train(recipe, model=network)`` trains an instance: the recipe then records
its class and a hash of its initial weights (``instance``) instead of a factory, and reloading the
trained model needs a factory, which the error says.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from forgeml.errors import ForgeError
from forgeml.models.checkpoints import PACKAGED_MINILM, load_tokenizer, packaged_minilm_dir
from forgeml.models.inputs import FeatureInputs, TextInputs
from forgeml.models.mlp import MLPEncoder
from forgeml.models.registry import MODELS, Batch, Encoder, ModelFamily, Splits
from forgeml.models.tokens import TokenBatches, TokenIdEncoder
from forgeml.section import Section
from forgeml.tasks import CLASSIFICATION

WEIGHTS = "model.safetensors"
SPEC = "module.json"  # the config, the number of classes and the vocabulary size it was built with


class ModuleConfig(Section):
    name: Literal["module"]
    factory: str | None = Field(
        None, description='"package.module:function" that builds the network; see forgeml.models.module'
    )
    inputs: Literal["text", "features"] = Field(description="what the network reads: token ids, or features")
    tokenizer: str = Field(PACKAGED_MINILM, description="text: a tokenizer folder; default: the packaged MiniLM's")
    max_length: PositiveInt = Field(128, description="text: tokens kept per row")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    instance: str | None = Field(
        None, description="set by forgeml.train(model=...): the class and initial weights of the instance trained"
    )

    @model_validator(mode="after")
    def _factory_form(self) -> ModuleConfig:
        if self.factory is not None and (self.factory.count(":") != 1 or not all(self.factory.split(":"))):
            raise ValueError(f"model.factory: {self.factory!r} is not of the form package.module:function")
        return self


def instance_tag(network: nn.Module) -> str:
    """The instance's class and a hash of its weights: a different network makes the train stage stale."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    kind = type(network)
    return f"{kind.__module__}.{kind.__qualname__}@{digest.hexdigest()[:16]}"


def import_factory(factory: str) -> Any:
    module_name, _, attribute = factory.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ForgeError(
            f"model.factory: cannot import {factory} ({error}); make its package importable (install it, or add "
            f"its folder to PYTHONPATH; the path searched is {sys.path[:4]} ...)"
        ) from None
    if not callable(target):
        raise ForgeError(f"model.factory: {factory} is a {type(target).__name__}, not a function or class")
    return target


def built(config: ModuleConfig, num_classes: int, vocab_size: int | None) -> nn.Module:
    if config.factory is None and config.instance is not None:
        raise ForgeError(
            f"model.instance: this recipe's network was given from Python ({config.instance}); pass it again with "
            "forgeml.train(recipe, model=network), or set model.factory to the function that builds it"
        )
    if config.factory is None:
        raise ForgeError(
            "model.factory: none given; name the function that builds your network (package.module:function), "
            "or train an instance from Python with forgeml.train(recipe, model=network)"
        )
    network = import_factory(config.factory)(num_classes=num_classes, vocab_size=vocab_size, **config.options)
    if not isinstance(network, nn.Module):
        raise ForgeError(f"model.factory: {config.factory} returned a {type(network).__name__}, not an nn.Module")
    return network


class Standardised(nn.Module):
    """The user's feature network behind the training split's standardisation (kept as buffers)."""

    def __init__(self, network: nn.Module, n_features: int) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, features: torch.Tensor) -> Any:
        return self.network(features=(features - self.mean) / self.std)


@MODELS.register("module", ModuleConfig)
class ModuleFamily(ModelFamily):
    """What both kinds share: building from the factory or an instance, saving and loading."""

    name = "module"
    task = CLASSIFICATION
    takes_instances = True
    kinds: ClassVar[dict[str, type[ModuleFamily]]] = {}  # by config.inputs

    config: ModuleConfig

    @classmethod
    def for_config(cls, config: ModuleConfig) -> type[ModelFamily]:
        return cls.kinds[config.inputs]

    @classmethod
    def create(cls, config: ModuleConfig, encoder: Encoder, labels: list[str], seed: int) -> ModuleFamily:
        torch.manual_seed(seed)
        return cls.assemble(config, encoder, labels, built(config, len(labels), cls.vocab_size(encoder)))

    @classmethod
    def adopt(cls, config: ModuleConfig, encoder: Encoder, labels: list[str], network: nn.Module) -> ModuleFamily:
        """A family around a copy of the user's instance (its own weights, so every call starts alike)."""
        return cls.assemble(config, encoder, labels, copy.deepcopy(network))

    @classmethod
    def vocab_size(cls, encoder: Encoder) -> int | None:
        return None

    @classmethod
    def assemble(cls, config: ModuleConfig, encoder: Encoder, labels: list[str], network: nn.Module) -> ModuleFamily:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.network.state_dict().items()}, str(directory / WEIGHTS))
        spec = {"config": self.config.model_dump(mode="json"), "labels": self.labels, **self.spec()}
        (directory / SPEC).write_text(json.dumps(spec, indent=2))
        self.save_preprocessing(directory)
        self.write_meta(directory)

    def spec(self) -> dict[str, Any]:
        return {}

    def save_preprocessing(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> ModelFamily:
        spec = json.loads((directory / SPEC).read_text())
        config = ModuleConfig(**spec["config"])
        if config.factory is None:
            raise ForgeError(
                f"{directory}: this model was trained from a Python instance ({config.instance}), and rebuilding it "
                "needs the function that makes it; set model.factory (package.module:function) in the recipe"
            )
        kind = cls.kinds[config.inputs]
        encoder = kind.load_encoder(config, directory)
        family = kind.assemble(config, encoder, spec["labels"], built(config, len(spec["labels"]), spec["vocab_size"]))
        weights = load_file(str(directory / WEIGHTS)) if weights is None else weights
        family.network.load_state_dict(weights, strict=bool(weights))
        family.network.eval()
        return family


class TextModule(TokenBatches, TextInputs, ModuleFamily):
    encoding_fields = ("tokenizer", "max_length")

    def __init__(self, config: ModuleConfig, network: nn.Module, tokenizer: Any, labels: list[str]) -> None:
        self.config, self.network, self.tokenizer, self.labels = config, network, tokenizer, labels

    @classmethod
    def fit_encoder(cls, config: ModuleConfig, splits: Splits) -> TokenIdEncoder:
        folder = packaged_minilm_dir() if config.tokenizer == PACKAGED_MINILM else Path(config.tokenizer).expanduser()
        if not folder.is_dir():
            raise ForgeError(f"model.tokenizer: there is no folder {folder}; point it at a saved tokenizer")
        return TokenIdEncoder(
            load_tokenizer(str(folder), f"model.tokenizer: {folder}"), splits.text_column, config.max_length
        )

    @classmethod
    def vocab_size(cls, encoder: Encoder) -> int | None:
        return len(encoder.tokenizer)

    @classmethod
    def assemble(cls, config: ModuleConfig, encoder: Encoder, labels: list[str], network: nn.Module) -> TextModule:
        return cls(config, network, encoder.tokenizer, labels)

    def spec(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer)}

    def save_preprocessing(self, directory: Path) -> None:
        TokenIdEncoder(self.tokenizer, "text", self.config.max_length).save(directory)

    def input_embeddings(self) -> nn.Module | None:
        """The first embedding table of the network: what turns its token ids into vectors."""
        return next((m for m in self.network.modules() if isinstance(m, nn.Embedding)), None)

    def explanation_limits(self) -> dict[str, str]:
        limits = {"attention": "a network of your own returns no attention maps"}
        if self.input_embeddings() is None:
            limits["ig"] = "integrated gradients attribute to an nn.Embedding's output, and the network has none"
        return limits


class FeatureModule(FeatureInputs, ModuleFamily):
    def __init__(self, config: ModuleConfig, network: Standardised, features: list[str], labels: list[str]) -> None:
        self.config, self.network, self.features, self.labels = config, network, features, labels

    @classmethod
    def fit_encoder(cls, config: ModuleConfig, splits: Splits) -> MLPEncoder:
        return MLPEncoder.fitted(splits)

    @classmethod
    def load_encoder(cls, config: ModuleConfig, folder: Path) -> MLPEncoder:
        return MLPEncoder.read(folder)

    @classmethod
    def assemble(cls, config: ModuleConfig, encoder: Encoder, labels: list[str], network: nn.Module) -> FeatureModule:
        wrapped = Standardised(network, len(encoder.features))
        wrapped.mean.copy_(torch.tensor(encoder.mean))
        wrapped.std.copy_(torch.tensor(encoder.std))
        return cls(config, wrapped, list(encoder.features), labels)

    def spec(self) -> dict[str, Any]:
        return {"vocab_size": None}

    def save_preprocessing(self, directory: Path) -> None:
        MLPEncoder(self.features, self.network.mean.tolist(), self.network.std.tolist()).save(directory)

    def collate(self, items: list[Any], augment: Any | None, generator: torch.Generator | None) -> Batch:
        x = torch.stack([item[0] for item in items])
        return Batch({"features": x}, torch.stack([item[1] for item in items]), len(items))


ModuleFamily.kinds.update(text=TextModule, features=FeatureModule)
