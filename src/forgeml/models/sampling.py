"""Choosing the next token from a position's logits, for every family that generates."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """A token id drawn from one position's logits: the most likely at temperature 0, otherwise from the
    softmax of logits / temperature, restricted to the ``top_k`` most likely tokens if given."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))
