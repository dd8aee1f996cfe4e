"""Token attributions for text classifiers: integrated gradients on the word embeddings (Captum),
LIME's text explainer over the same tokens, and attention maps with attention rollout.

Every method scores the same units: the model's own tokens as its tokenizer cuts the text
(special tokens left out). Removing a unit means putting the tokenizer's padding token in its
place, with the attention mask kept: that is also integrated gradients' baseline and what LIME
writes for a hidden token, so the three methods and the deletion test agree on what "absent" is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forgeml.explaining.faithfulness import Scorer
from forgeml.models.registry import ModelFamily, logits_of

PREDICT_BATCH = 64


@dataclass
class TextInput:
    text: str  # the part of the raw text the model reads (up to max_length tokens)
    ids: torch.Tensor  # (1, L) token ids with the special tokens
    mask: torch.Tensor  # (1, L) attention mask
    units: list[list[int]]  # token positions of each unit (usually one)
    spans: list[tuple[int, int]]  # each unit's characters in ``text``
    target: int  # the predicted class
    probs: np.ndarray  # the model's class probabilities

    @property
    def pieces(self) -> list[str]:
        return [self.text[start:end] for start, end in self.spans]


class TextExplainer:
    """Explains one text classifier: a network called with ``input_ids`` and ``attention_mask``."""

    def __init__(self, family: ModelFamily, seed: int) -> None:
        self.family = family
        self.network = family.network.eval()
        self.tokenizer = family.tokenizer
        self.max_length = family.config.max_length
        self.seed = seed

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits_of(self.network(input_ids=ids, attention_mask=mask))

    def read(self, raw: str) -> TextInput:
        encoded = self.tokenizer(
            [raw], truncation=True, max_length=self.max_length, return_offsets_mapping=True, return_tensors="pt"
        )
        offsets = encoded.pop("offset_mapping")[0].tolist()
        units: list[list[int]] = []
        spans: list[tuple[int, int]] = []
        for position, (start, end) in enumerate(offsets):
            if end <= start:  # special tokens
                continue
            if spans and start < spans[-1][1]:  # a token that shares characters with the last one
                units[-1].append(position)
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                units.append([position])
                spans.append((start, end))
        text = raw[: spans[-1][1]] if spans else raw
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        with torch.no_grad():
            probs = self.logits(ids, mask).float().softmax(-1)[0].numpy()
        return TextInput(text, ids, mask, units, spans, int(probs.argmax()), probs)

    def scorer(self, item: TextInput) -> Scorer:
        pad = self.tokenizer.pad_token_id

        @torch.no_grad()
        def score(removed: np.ndarray) -> np.ndarray:
            ids = item.ids.repeat(len(removed), 1)
            for unit, positions in enumerate(item.units):
                rows = torch.from_numpy(removed[:, unit])
                for position in positions:
                    ids[rows, position] = pad
            mask = item.mask.expand(len(ids), -1)
            out = [
                self.logits(ids[i : i + PREDICT_BATCH], mask[i : i + PREDICT_BATCH]).float().softmax(-1)
                for i in range(0, len(ids), PREDICT_BATCH)
            ]
            return torch.cat(out)[:, item.target].numpy()

        return score

    def per_unit(self, item: TextInput, per_token: np.ndarray) -> np.ndarray:
        return np.array([per_token[positions].sum() for positions in item.units])

    def integrated_gradients(self, item: TextInput, steps: int) -> tuple[np.ndarray, float]:
        """Attributions to the predicted class's probability, and Captum's convergence delta: how far
        their sum is from p(input) - p(baseline)."""
        from captum.attr import LayerIntegratedGradients

        def probability(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.logits(ids, mask).float().softmax(-1)

        baseline = item.ids.clone()
        for positions in item.units:
            baseline[0, positions] = self.tokenizer.pad_token_id
        layer = LayerIntegratedGradients(probability, self.family.input_embeddings())
        attributions, delta = layer.attribute(
            item.ids,
            baselines=baseline,
            additional_forward_args=(item.mask,),
            target=item.target,
            n_steps=steps,
            internal_batch_size=PREDICT_BATCH,
            return_convergence_delta=True,
        )
        return self.per_unit(item, attributions.sum(-1)[0].detach().numpy()), float(delta)

    def lime(self, item: TextInput, samples: int) -> np.ndarray:
        """LIME's weights for the predicted class, one per unit: its explainer hides units (writing the
        padding token in their place) and fits a weighted linear model to the probabilities."""
        from lime.lime_text import LimeTextExplainer

        pieces = item.pieces
        explainer = LimeTextExplainer(
            split_expression=lambda text: pieces,
            bow=False,  # a unit is a position: the same word twice is two units
            mask_string=self.tokenizer.pad_token,
            random_state=self.seed,
        )

        @torch.no_grad()
        def predict(texts: list[str]) -> np.ndarray:
            out = []
            for i in range(0, len(texts), PREDICT_BATCH):
                encoded = self.family.encode_inputs(texts[i : i + PREDICT_BATCH])
                out.append(self.logits(encoded["input_ids"], encoded["attention_mask"]).float().softmax(-1))
            return torch.cat(out).numpy()

        explanation = explainer.explain_instance(
            item.text, predict, labels=(item.target,), num_features=len(pieces), num_samples=samples
        )
        weights = np.zeros(len(pieces))
        for unit, weight in explanation.as_map()[item.target]:
            weights[unit] = weight
        return weights

    @torch.no_grad()
    def attention(self, item: TextInput) -> tuple[np.ndarray, np.ndarray]:
        """Every layer's and head's attention (layers, heads, L, L), and attention rollout
        (Abnar & Zuidema 2020): head-averaged maps with the residual added, multiplied through
        the layers. ``reader`` says whose rollout row scores the units."""
        output = self.network(input_ids=item.ids, attention_mask=item.mask, output_attentions=True)
        maps = torch.stack(output.attentions)[:, 0].float()  # (layers, heads, L, L)
        eye = torch.eye(maps.shape[-1])
        rollout = eye
        for layer in maps.mean(1):
            mixed = 0.5 * layer + 0.5 * eye
            rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
        return maps.numpy(), rollout.numpy()

    @staticmethod
    def reader(maps: np.ndarray) -> int:
        """The position the classification head reads: the first ([CLS]) token of an encoder; the last
        of a decoder, whose causal attention (nothing above the diagonal) lets only it see every token."""
        causal = np.allclose(np.triu(maps, k=1), 0.0)
        return maps.shape[-1] - 1 if causal else 0


def eager_attention(network: Any) -> None:
    """Fused attention kernels return no attention weights; the eager implementation does."""
    network.set_attn_implementation("eager")
