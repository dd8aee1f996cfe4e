"""Token attributions for causal language models: which prompt tokens made the model continue as it
does. The target is the greedy next token, or a continuation the recipe names
(``explain.continuation``); its probability is the geometric mean of its tokens' probabilities
given the prompt, so a long continuation scores on the scale of one token.

Integrated gradients (Captum) run on the input embeddings, from the prompt with every token
replaced by the padding token to the prompt itself; the deletion test removes the most attributed
prompt tokens the same way and watches the target's probability fall, as for text classifiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forgeml.explaining.faithfulness import Scorer
from forgeml.models.registry import ModelFamily, logits_of

PREDICT_BATCH = 32


@dataclass
class Prompted:
    text: str  # the prompt
    ids: torch.Tensor  # (1, L): the prompt's ids, then the target's but its last
    prompt_length: int
    target: list[int]  # the continuation's ids
    units: list[list[int]]  # token positions of each unit of the prompt
    spans: list[tuple[int, int]]  # each unit's characters in ``text``
    probability: float  # of the target given the prompt

    @property
    def pieces(self) -> list[str]:
        return [self.text[start:end] for start, end in self.spans]


class NextTokenExplainer:
    def __init__(self, family: ModelFamily, continuation: str | None) -> None:
        self.family = family
        self.network = family.network.eval()
        self.tokenizer = family.tokenizer
        self.continuation = continuation

    def probability(self, ids: torch.Tensor, prompt_length: int, target: list[int]) -> torch.Tensor:
        """p(target | each row's prompt), as the geometric mean over the target's tokens."""
        logits = logits_of(self.network(**self.family.generation_inputs(ids))).float()
        positions = torch.arange(prompt_length - 1, prompt_length - 1 + len(target))
        log_probs = logits[:, positions].log_softmax(-1)[:, torch.arange(len(target)), target]
        return log_probs.mean(-1).exp()

    def read(self, prompt: str) -> Prompted:
        encoded = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(encoded["input_ids"]) or [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]
        if self.continuation is not None:
            target = self.tokenizer(self.continuation, add_special_tokens=False)["input_ids"]
        else:
            with torch.no_grad():
                inputs = self.family.generation_inputs(torch.tensor([ids]))
                target = [int(logits_of(self.network(**inputs))[0, -1].argmax())]
        units: list[list[int]] = []
        spans: list[tuple[int, int]] = []
        for position, (start, end) in enumerate(encoded["offset_mapping"]):
            if end <= start:  # special tokens (BOS)
                continue
            if spans and start < spans[-1][1]:  # a token sharing characters with the last one (a byte split)
                units[-1].append(position)
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                units.append([position])
                spans.append((start, end))
        full = torch.tensor([ids + target[:-1]])
        with torch.no_grad():
            probability = float(self.probability(full, len(ids), target)[0])
        return Prompted(prompt, full, len(ids), target, units, spans, probability)

    def removed(self, item: Prompted, masks: np.ndarray) -> torch.Tensor:
        """``item``'s ids once per mask row, the units it marks replaced by the padding token."""
        ids = item.ids.repeat(len(masks), 1)
        for unit, positions in enumerate(item.units):
            rows = torch.from_numpy(masks[:, unit])
            for position in positions:
                ids[rows, position] = self.tokenizer.pad_token_id
        return ids

    def scorer(self, item: Prompted) -> Scorer:
        @torch.no_grad()
        def score(masks: np.ndarray) -> np.ndarray:
            ids = self.removed(item, masks)
            out = [
                self.probability(ids[i : i + PREDICT_BATCH], item.prompt_length, item.target)
                for i in range(0, len(ids), PREDICT_BATCH)
            ]
            return torch.cat(out).numpy()

        return score

    def integrated_gradients(self, item: Prompted, steps: int) -> tuple[np.ndarray, float]:
        """Attributions to the target's probability per prompt unit, and Captum's convergence delta."""
        from captum.attr import LayerIntegratedGradients

        everything = np.ones((1, len(item.units)), dtype=bool)
        baseline = self.removed(item, everything)
        layer = LayerIntegratedGradients(
            lambda ids: self.probability(ids, item.prompt_length, item.target), self.family.input_embeddings()
        )
        attributions, delta = layer.attribute(
            item.ids,
            baselines=baseline,
            n_steps=steps,
            internal_batch_size=PREDICT_BATCH,
            return_convergence_delta=True,
        )
        per_token = attributions.sum(-1)[0].detach().numpy()
        return np.array([per_token[positions].sum() for positions in item.units]), float(delta)


def generation_explanations(
    family: ModelFamily, splits: Any, inputs: list[str], labels: list[Any], methods: list[str], cfg: Any,
    advance: Any,
) -> Any:  # fmt: skip
    from forgeml.explaining.explain import Clock, Outcome, deletion

    explainer = NextTokenExplainer(family, cfg.continuation)
    clock = Clock()
    records, deletions, deltas = [], [], []
    for index, prompt in enumerate(inputs):
        item = explainer.read(prompt)
        scores: dict[str, np.ndarray] = {}
        record: dict[str, Any] = {
            "input": item.text,
            "label": None,
            "predicted": explainer.tokenizer.decode(item.target, skip_special_tokens=False),
            "probability": item.probability,
            "units": item.pieces,
            "spans": item.spans,
        }
        if item.units and "ig" in methods:
            with clock.time("ig"):
                scores["ig"], delta = explainer.integrated_gradients(item, cfg.ig_steps)
            record["ig_delta"] = delta
            deltas.append(abs(delta))
            deletions.append(deletion(scores, explainer.scorer(item), cfg, index))
        record["attributions"] = {method: values.tolist() for method, values in scores.items()}
        records.append(record)
        advance()
    return Outcome(records, deletions, clock.seconds, deltas, None, {})
