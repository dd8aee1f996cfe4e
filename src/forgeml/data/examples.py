"""Rows of a causal-LM dataset as examples: a conversation (``data.format: chat``) or a prompt and
its completion (``prompt_completion``), checked row by row and held as one canonical JSON text per
row. The audit and prepare stages then treat a dataset of examples as they treat texts (exact and
near duplicates, leaks between splits, the split itself), and the causal-LM encoder reads the JSON
back to render and tokenize each example."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from forgeml.errors import DataError

if TYPE_CHECKING:
    from forgeml.data.config import DataConfig
    from forgeml.data.table import Table

ROLES = ("system", "user", "assistant")
PROMPT, COMPLETION = "prompt", "completion"


def as_examples(table: Table, cfg: DataConfig) -> None:
    """Replace the example columns of ``table`` with one canonical JSON column, its text column."""
    if table.format == "chat":
        column = cfg.messages_column
        _require(table, column, "data.messages_column")
        values = table.frame[column]
        rows = [conversation_json(v, f"{table.origin}: {table.where(i)}") for i, v in enumerate(values)]
        table.frame = table.frame.assign(**{column: rows})
        table.text_column = column
    elif table.format == "prompt_completion":
        for column, key in (
            (cfg.prompt_column, "data.prompt_column"),
            (cfg.completion_column, "data.completion_column"),
        ):
            _require(table, column, key)
        joined = example_column(table.format, cfg)
        pairs = zip(table.frame[cfg.prompt_column], table.frame[cfg.completion_column], strict=True)
        examples = [_prompt_completion(p, c, table, i, cfg) for i, (p, c) in enumerate(pairs)]
        table.frame = table.frame.assign(**{joined: examples})
        table.text_column = joined


def example_column(fmt: str | None, cfg: DataConfig) -> str | None:
    """The column that holds each example's canonical JSON, for the example formats."""
    if fmt == "chat":
        return cfg.messages_column
    if fmt == "prompt_completion":
        return f"{cfg.prompt_column}+{cfg.completion_column}"
    return None


def messages(text: str) -> list[dict[str, str]]:
    """A chat row's canonical JSON, back as its messages."""
    return json.loads(text)


def prompt_completion(text: str) -> tuple[str, str]:
    """A prompt_completion row's canonical JSON, back as (prompt, completion)."""
    pair = json.loads(text)
    return pair[PROMPT], pair[COMPLETION]


def _require(table: Table, column: str, key: str) -> None:
    if column not in table.frame.columns:
        columns = ", ".join(map(str, table.frame.columns))
        raise DataError(f"{table.origin}: no column {column!r}; set {key} to one of: {columns}")


def conversation_json(value: Any, where: str) -> str:
    """A conversation as canonical JSON; an error naming ``where`` and the message otherwise.
    Parquet gives a list column as a numpy array of dicts, JSONL as a list."""
    if isinstance(value, str):  # a CSV cell holding the JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            problem = f"the messages are not valid JSON ({exc.msg})"
            raise DataError(f"{where}: {problem}; give a list of {{role, content}} objects") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        shown = "empty" if isinstance(value, list) or _missing(value) else f"a {type(value).__name__}"
        raise DataError(f"{where}: the messages are {shown}; give a non-empty list of {{role, content}} objects")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}, message {index}: {message!r} is not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}, message {index}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            what = "missing" if content is None else f"a {type(content).__name__}, not text"
            raise DataError(f"{where}, message {index} ({role}): its content is {what}")
        out.append({"role": role, "content": content})
    return json.dumps(out, ensure_ascii=False)


def _prompt_completion(prompt: Any, completion: Any, table: Table, row: int, cfg: DataConfig) -> str:
    for value, column in ((prompt, cfg.prompt_column), (completion, cfg.completion_column)):
        if not isinstance(value, str):
            what = "empty" if _missing(value) else f"{value!r} ({type(value).__name__}), not text"
            raise DataError(f"{table.origin}: {table.where(row)}: column {column!r} is {what}")
    if not completion:
        raise DataError(
            f"{table.origin}: {table.where(row)}: column {cfg.completion_column!r} is empty, so nothing would train"
        )
    return json.dumps({PROMPT: prompt, COMPLETION: completion}, ensure_ascii=False)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))
