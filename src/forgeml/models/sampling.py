"""Choosing the next token from a position's logits, and turning sampled tokens into text, for
every family that generates."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator
from itertools import islice

import torch
from torch import nn
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


def text_pieces(
    tokens: Iterable[int], decode: Callable[[list[int]], str], stops: Collection[int], max_new_tokens: int
) -> Iterator[str]:
    """The text of ``tokens`` as they come, one piece per token, up to ``max_new_tokens`` of them or
    a stop token (which shows no text). A piece holds the characters its token completes, so it is
    empty while a character's bytes are still coming; the pieces join to the whole continuation."""
    new: list[int] = []
    shown = 0
    for step, token in enumerate(islice(tokens, max_new_tokens)):
        ended = token in stops
        if not ended:
            new.append(token)
        # Decoding all new ids each time, not token by token, keeps a character whose bytes span
        # tokens whole; a trailing U+FFFD may be one whose remaining bytes are still to come, so it
        # waits until the last token.
        text = decode(new)
        end = len(text) if ended or step == max_new_tokens - 1 else len(text.rstrip("\ufffd"))
        yield text[shown:end]
        shown = end
        if ended:
            break


@contextlib.contextmanager
def evaluating(network: nn.Module) -> Iterator[None]:
    """``network`` in eval mode (no dropout while sampling), put back as it was after."""
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)
