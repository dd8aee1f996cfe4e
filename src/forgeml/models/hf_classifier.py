"""``hf-classifier``: any Hugging Face sequence-classification checkpoint, an encoder (BERT,
RoBERTa, DeBERTa, ModernBERT, ...) or a decoder used as a classifier (Llama, Qwen2, GPT-2, ...);
and ``text-classifier``, the same family with the packaged all-MiniLM-L6-v2 as its checkpoint.

What the stages need is read from the network itself (``forgeml.models.hf_network``). The export is
a plain transformers checkpoint (LoRA merged in), so ``AutoModelForSequenceClassification.from_pretrained``
loads it without forgeml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from forgeml.errors import NotOffered
from forgeml.models.checkpoints import PACKAGED_MINILM, checkpoint_source, classification_config, load_tokenizer
from forgeml.models.hf_network import (
    Fraction,
    HFNetwork,
    LoraConfig,
    dropout_overrides,
    embedding_modules,
    fewer_layers,
    freeze,
    read_network,
    repeated_blocks,
    with_lora,
)
from forgeml.models.inputs import TextInputs
from forgeml.models.registry import META_FILE, MODELS, BlockLayout, Splits
from forgeml.models.tokens import TokenBatches, TokenIdEncoder
from forgeml.section import Section
from forgeml.tasks import CLASSIFICATION


class HFClassifierConfig(Section):
    name: Literal["hf-classifier"]
    pretrained: str = Field(description="a checkpoint folder, or a hub id already in the local Hugging Face cache")
    max_length: Annotated[int, Field(ge=8)] = 128
    freeze_layers: Annotated[int, Field(ge=0)] = Field(0, description="freeze the embeddings and this many blocks")
    dropout: Fraction | None = Field(None, description="every dropout of the checkpoint; default: its config's")
    lora: LoraConfig | None = None


class TextClassifierConfig(HFClassifierConfig):
    name: Literal["text-classifier"]  # type: ignore[assignment]
    pretrained: str = Field(PACKAGED_MINILM, description="default: the packaged all-MiniLM-L6-v2")
    max_length: Annotated[int, Field(ge=8, le=512)] = 128


@MODELS.register("hf-classifier", HFClassifierConfig)
class HFClassifier(HFNetwork, TokenBatches, TextInputs):
    name = "hf-classifier"
    config_type: ClassVar[type[HFClassifierConfig]] = HFClassifierConfig
    task = CLASSIFICATION
    encoding_fields = ("pretrained", "max_length")

    def __init__(self, config: HFClassifierConfig, network: nn.Module, tokenizer: Any, labels: list[str]) -> None:
        self.config = config
        self.network = network
        self.tokenizer = tokenizer
        self.labels = labels

    @classmethod
    def check_config(cls, config: HFClassifierConfig) -> None:
        checkpoint_source(config.pretrained)

    @classmethod
    def fit_encoder(cls, config: HFClassifierConfig, splits: Splits) -> TokenIdEncoder:
        tokenizer = load_tokenizer(checkpoint_source(config.pretrained), f"model.pretrained: {config.pretrained}")
        return TokenIdEncoder(tokenizer, splits.text_column, config.max_length)

    @classmethod
    def create(cls, config: HFClassifierConfig, encoder: TokenIdEncoder, labels: list[str], seed: int) -> HFClassifier:
        from transformers import AutoModelForSequenceClassification

        source = checkpoint_source(config.pretrained)
        checkpoint_config = classification_config(source, config.pretrained)
        torch.manual_seed(seed)  # the new classification head
        network = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            pad_token_id=encoder.tokenizer.pad_token_id,  # decoders read the last token that is not padding
            ignore_mismatched_sizes=True,  # a checkpoint that classified into other labels gets a new head
            dtype=torch.float32,  # the master weights; mixed precision is autocast's job
            **dropout_overrides(checkpoint_config, config.dropout),
            # A classifier reads no KV cache; a decoder would grow one every forward pass (and twice
            # where activation checkpointing recomputes a block).
            **({"use_cache": False} if hasattr(checkpoint_config, "use_cache") else {}),
        )
        freeze(network, config.freeze_layers)
        # The new head is trained in full and saved (peft's modules_to_save for SEQ_CLS).
        network = with_lora(network, config.lora, "SEQ_CLS")
        return cls(config, network, encoder.tokenizer, labels)

    @classmethod
    def checkpoint_config(cls, config: HFClassifierConfig) -> Any:
        return classification_config(checkpoint_source(config.pretrained), config.pretrained)

    def student(self, layers: int | None, width: float) -> HFClassifier:
        """A network of the checkpoint's own architecture with ``layers`` of its blocks (None: half),
        evenly spaced with the top one kept, the teacher's weights in them and everywhere else; the
        embeddings stay frozen. On the default model, layers 0, 2, 5 gave the student 0.861 macro-F1
        where the lower three gave 0.831."""
        from transformers import AutoModelForSequenceClassification

        network = fewer_layers(self.merged(), layers, AutoModelForSequenceClassification)
        for module in embedding_modules(network, repeated_blocks(network)):
            module.requires_grad_(False)
        return type(self)(self.config.model_copy(update={"lora": None}), network, self.tokenizer, self.labels)

    def block_layout(self, block: nn.Module) -> BlockLayout:
        """Blocks laid out as BERT's (attention.self.query/key/value, attention.output.dense,
        intermediate.dense, output.dense: BERT, RoBERTa, ELECTRA, MiniLM and their kin), whose
        self-attention stores its head count and total width, so the cut records them."""
        names = ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense")
        modules = dict(block.named_modules())
        attention = modules.get("attention.self")
        projections = [getattr(attention, n, None) for n in ("query", "key", "value")]
        laid_out = all(n in modules for n in names) and all(isinstance(m, nn.Linear) for m in projections)
        if not laid_out or not hasattr(attention, "attention_head_size"):
            raise NotOffered(f"structured pruning cuts blocks laid out as BERT's; {type(block).__name__} is not")

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

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.merged().save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        (directory / "forgeml_config.json").write_text(
            json.dumps(self.config.model_dump(mode="json", exclude={"lora"}), indent=2)
        )
        self.write_meta(directory)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> HFClassifier:
        from transformers import AutoModelForSequenceClassification

        config = cls.config_type(**json.loads((directory / "forgeml_config.json").read_text()))
        meta = json.loads((directory / META_FILE).read_text())
        network = read_network(directory, weights, AutoModelForSequenceClassification)
        return cls(config, network, load_tokenizer(str(directory), str(directory)), meta["labels"])


@MODELS.register("text-classifier", TextClassifierConfig)
class TextClassifier(HFClassifier):
    name = "text-classifier"
    config_type = TextClassifierConfig
