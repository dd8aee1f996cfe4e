"""Examples for a causal LM as token ids and labels: what is trained, and nothing else.

A conversation is rendered with a chat template and the replies are found by rendering: the text
of assistant turn i is what ``messages[:i + 1]`` adds to ``messages[:i]`` with the generation
prompt, up to and including the end-of-turn token that closes it. This needs no markup in the
template (TRL's ``return_assistant_tokens_mask`` needs ``{% generation %}`` blocks, which few
templates have), and it checks that each rendering, up to the end of its last reply, begins the
next, so a template that renders earlier turns differently once more follow is refused instead of
mislabelled.

Token ids and labels (-100 where no loss falls) are stored aligned, as transformers' ``labels``
are; the collate shifts them to next-token targets. Packing puts several examples in one sequence
with positions restarting at each, which transformers reads as separate documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgeml.errors import DataError, ForgeError
from forgeml.training.losses import IGNORE


@dataclass
class Rendered:
    """An example as text, and the character spans of it that are trained."""

    text: str
    trained: list[tuple[int, int]]


@dataclass
class Example:
    """An example as token ids, its labels aligned with them."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where untrained

    def trained_targets(self) -> int:
        """Trained tokens that some position predicts (the first token follows nothing)."""
        return int((self.labels[1:] != IGNORE).sum())


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens as text, longest first (so <|im_end|> wins over <|im)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


class ChatRenderer:
    """Renders conversations with one chat template and marks their replies."""

    def __init__(self, tokenizer: Any, template: str, train_on_prompt: bool, train_on_turns: str) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.train_on_prompt, self.train_on_turns = train_on_prompt, train_on_turns
        self.specials = special_tokens(tokenizer)
        self.end_of_turn: set[str] = set()  # the special tokens seen closing a reply

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja's TemplateError, or raise_exception() inside the template
            raise DataError(f"the chat template cannot render this conversation ({exc})") from None

    def __call__(self, messages: list[dict[str, str]]) -> Rendered:
        text = self.render(messages)
        if self.train_on_prompt:
            return Rendered(text, [(0, len(text))])
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on_turns == "last":
            replies = replies[-1:]
        spans = []
        for i in replies:
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            after = self.render(messages[: i + 1])
            end = self._end_of_reply(after, len(before), messages[i]["content"]) if after.startswith(before) else 0
            # Up to the end of the reply, not beyond: a template may close the whole conversation
            # after its last message (Phi-3 adds the end-of-sequence token), which later turns follow instead.
            if not end or not text.startswith(after[:end]):
                raise ForgeError(
                    "the chat template renders the first turns of a conversation differently once more turns "
                    f"follow (at message {i}), so which tokens are the replies cannot be told; use a template whose "
                    "rendering of a conversation's beginning is the beginning of its rendering (model.chat_template)"
                )
            spans.append((len(before), end))
        return Rendered(text, spans)

    def _end_of_reply(self, text: str, start: int, content: str) -> int:
        """Where the reply starting at ``start`` ends: after the first special token the template puts
        after its content (<|im_end|>, <|eot_id|>, <|end|>, </s>); what follows (a newline, a token
        closing the conversation) is not trained. Where the template changes the content so that it
        is not found, after the last special token of the turn."""
        reply = text[start:]
        body = content.strip()
        at = reply.rfind(body) if body else -1  # the last: a short content may also be in a role header
        after = at + len(body) if at >= 0 else 0
        found = [(reply.find(token, after), token) for token in self.specials if token in reply[after:]]
        if not found:
            raise ForgeError(
                "the chat template closes an assistant turn with no special token, so the model could not learn "
                "to stop; use a template that ends each turn with one (as ChatML's <|im_end|>, or {{ eos_token }}) "
                "in model.chat_template"
            )
        if at >= 0:  # the first one after the content, the longest where two start there (<|im_end|>, <|im)
            position, token = min(found, key=lambda pair: (pair[0], -len(pair[1])))
        else:
            position, token = max(found, key=lambda pair: (pair[0] + len(pair[1]), len(pair[1])))
        self.end_of_turn.add(token)
        return start + position + len(token)


def completion_rendered(prompt: str, completion: str, eos: str) -> Rendered:
    """A prompt and its completion joined, the completion and the end-of-sequence token trained."""
    return Rendered(prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))])


def tokenize(tokenizer: Any, rendered: Sequence[Rendered], add_special_tokens: bool) -> list[Example]:
    """Token ids of each rendered example and their labels: a token is trained where its characters
    overlap a trained span."""
    encoded = tokenizer([r.text for r in rendered], add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    examples = []
    for example, ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        ids = np.asarray(ids, dtype=np.int32)
        starts, ends = (np.asarray([o[k] for o in offsets], dtype=np.int64).reshape(-1) for k in (0, 1))
        trained = np.zeros(len(ids), dtype=bool)
        for lo, hi in example.trained:
            trained |= (ends > lo) & (starts < hi)
        # A BOS the tokenizer adds has the offsets (0, 0): it overlaps nothing, so it never trains.
        examples.append(Example(ids, np.where(trained, ids, IGNORE).astype(np.int32)))
    return examples


def chunks(documents: Iterable[np.ndarray], eos_id: int, size: int) -> list[Example]:
    """Continued pretraining: documents joined with end-of-sequence, cut into rows of ``size``
    tokens, every token trained; the tail shorter than a row is dropped."""
    docs = list(documents)
    stream = np.full(sum(len(d) for d in docs) + len(docs), eos_id, dtype=np.int32)
    start = 0
    for doc in docs:
        stream[start : start + len(doc)] = doc
        start += len(doc) + 1
    n = len(stream) // size
    return [Example(row, row.copy()) for row in stream[: n * size].reshape(n, size)]


@dataclass
class Packed:
    """Examples packed into one sequence, positions restarting at each."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray


def pack(examples: Sequence[Example], max_length: int) -> list[Packed]:
    """Examples in order, as many as fit into each sequence of up to ``max_length`` tokens (greedy,
    first fit in order: what stays together is the neighbours of a shuffled split)."""
    rows: list[Packed] = []
    group: list[Example] = []
    length = 0

    def close() -> None:
        rows.append(
            Packed(
                np.concatenate([e.input_ids for e in group]),
                np.concatenate([e.labels for e in group]),
                np.concatenate([np.arange(len(e.input_ids), dtype=np.int32) for e in group]),
            )
        )

    for example in examples:
        if group and length + len(example.input_ids) > max_length:
            close()
            group, length = [], 0
        group.append(example)
        length += len(example.input_ids)
    if group:
        close()
    return rows


def segments(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[tuple[str, bool]]:
    """The example's text in runs of tokens, each with whether it trains, to show what trains."""
    out: list[tuple[str, bool]] = []
    run: list[int] = []
    trained = False
    for token, label in zip([*input_ids, None], [*labels, None], strict=True):
        now = label is not None and bool(label != IGNORE)
        if token is None or now != trained:
            if run:
                out.append((tokenizer.decode(run, skip_special_tokens=False), trained))
            run, trained = [], now
        if token is not None:
            run.append(int(token))
    return out


def marked(parts: Sequence[tuple[str, bool]], start: str = "[[", end: str = "]]") -> str:
    """``segments`` as one text, each trained run between ``start`` and ``end``."""
    return "".join(f"{start}{text}{end}" if trained else text for text, trained in parts)
