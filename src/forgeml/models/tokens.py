"""Texts as token ids for classifiers: a tokenizer's ids stored per row, padded per batch, with
token dropout and random masking as augmentations. Shared by the families that read text through a
transformers tokenizer (``hf-classifier``, ``module`` on text)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from forgeml.models.checkpoints import load_tokenizer
from forgeml.models.registry import TARGET, Batch, Encoder


@dataclass
class TokenIdEncoder(Encoder):
    """A transformers tokenizer, truncating to max_length; rows are padded per batch in collate."""

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

    @classmethod
    def read(cls, folder: Path, max_length: int) -> TokenIdEncoder:
        """What ``save`` wrote."""
        column = json.loads((folder / "encoder.json").read_text())["text_column"]
        return cls(load_tokenizer(str(folder), str(folder)), column, max_length)


class TokenBatches:
    """Batches of token ids for a family holding ``tokenizer`` and ``config.max_length``."""

    augmentations: ClassVar[frozenset[str]] = frozenset({"token_dropout", "random_mask"})
    tokenizer: Any
    config: Any

    @classmethod
    def load_encoder(cls, config: Any, folder: Path) -> TokenIdEncoder:
        return TokenIdEncoder.read(folder, config.max_length)

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
        """Token dropout and random masking on the tokens that are not special ([CLS], [SEP], BOS).
        A tokenizer without a mask token (most decoders') masks with a random ordinary token instead,
        as BERT's pretraining does for a tenth of its masked tokens."""
        special = set(self.tokenizer.all_special_ids)
        tokens = torch.tensor(ids, dtype=torch.long)
        plain = torch.tensor([i not in special for i in ids], dtype=torch.bool)
        if augment.random_mask > 0:
            masked = plain & (torch.rand(len(ids), generator=generator) < augment.random_mask)
            if self.tokenizer.mask_token_id is not None:
                tokens[masked] = self.tokenizer.mask_token_id
            else:
                ordinary = torch.tensor(sorted(set(range(len(self.tokenizer))) - special))
                picks = torch.randint(len(ordinary), (int(masked.sum()),), generator=generator)
                tokens[masked] = ordinary[picks]
        if augment.token_dropout > 0:
            tokens = tokens[~plain | (torch.rand(len(ids), generator=generator) >= augment.token_dropout)]
        return tokens.tolist()

    def encode_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Raw texts -> network inputs (for prediction)."""
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.config.max_length, padding=True, return_tensors="pt"
        )
        return {key: encoded[key] for key in ("input_ids", "attention_mask")}
