"""Built-in datasets, named by data.source: built locally (no download), deterministic for a seed.

Adding one is its options' config in ``data/config.py`` (in ``DATASET_CONFIGS``) and one function,
registered with that config, that builds a Table from those options and the data seed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forgeml.data.config import (
    BreastCancer,
    BuiltinDataset,
    Digits,
    StdlibCode,
    StdlibDocstrings,
    StdlibDocstringSFT,
    SyntheticImbalanced,
    Wine,
)
from forgeml.data.table import Table
from forgeml.registry import Registry

Builder = Callable[[Any, int], Table]  # (the dataset's options, the data seed) -> its rows
DATASETS: Registry[Builder] = Registry("dataset")

# Folders of the standard library that hold tests or no importable modules.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def _table(
    name: str,
    frame: pd.DataFrame,
    params: dict[str, Any],
    *,
    text: str | None = None,
    features: list[str] | None = None,
    label: str | None = None,
) -> Table:
    # The content is fixed by the name, the options and the Python (its standard library).
    key = json.dumps({"dataset": name, "params": params, "python": sys.version}, sort_keys=True)
    return Table(
        frame=frame,
        origin=name,
        text_column=text,
        feature_columns=features,
        label_column=label,
        lines=None,
        fingerprint=hashlib.sha256(key.encode()).hexdigest(),
    )


# ---------------------------------------------------------------- the standard library


def _stdlib_sources() -> list[tuple[str, str]]:
    """(path relative to the stdlib, source) of each standard-library .py file outside tests, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        # site-packages, config-3.x-..., lib-dynload are no package names: not the standard library.
        dirs[:] = [d for d in dirs if d.isidentifier() and d not in SKIP_DIRS]
        paths += [Path(folder, f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    sources = []
    for path in sorted(paths):
        try:
            with tokenize.open(root / path) as f:  # honours a coding cookie
                sources.append((path, f.read()))
        except (SyntaxError, UnicodeDecodeError):
            continue
    return sources


def _docstrings(path: str, source: str) -> list[tuple[str, str, str]]:
    """(docstring, top-level package, module) of the module and each class and function in it."""
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules warn
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    label = module.split(".")[0]
    return [(doc.strip(), label, module) for doc in docs if doc and doc.strip()]


def _top_labels(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    counts = frame["label"].value_counts()
    ranked = sorted(counts.index, key=lambda name: (-counts[name], name))
    return frame[frame["label"].isin(ranked[:k])].reset_index(drop=True)


@DATASETS.register("stdlib-docstrings", StdlibDocstrings)
def stdlib_docstrings(options: StdlibDocstrings, seed: int) -> Table:
    """Text classification: which standard-library package a docstring comes from."""
    rows = [row for path, source in _stdlib_sources() for row in _docstrings(path, source)]
    frame = pd.DataFrame(rows, columns=["text", "label", "module"])
    if options.top_k_labels is not None:
        frame = _top_labels(frame, options.top_k_labels)
    return _table("stdlib-docstrings", frame, {"top_k_labels": options.top_k_labels}, text="text", label="label")


@DATASETS.register("stdlib-code", StdlibCode)
def stdlib_code(options: StdlibCode, seed: int) -> Table:
    """Language modelling: the standard library's Python sources, one row per file."""
    paths, sources = zip(*_stdlib_sources(), strict=True)
    frame = pd.DataFrame({"text": sources, "path": paths})
    return _table("stdlib-code", frame, {}, text="text")


def _function_examples(path: str, source: str, options: StdlibDocstringSFT) -> list[dict[str, Any]]:
    """A chat example per documented function: its signature and the first lines of its body (the
    docstring taken out) asked about, the docstring replied."""
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    rows = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = (ast.get_docstring(node) or "").strip()
        if not doc:
            continue
        reply = doc.split("\n\n")[0].strip() if options.reply == "first_paragraph" else doc
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        header = f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"
        body = [line for stmt in node.body[1:] for line in ast.unparse(stmt).splitlines()]
        shown = [f"    {line}" for line in body[: options.body_lines]]
        if len(body) > options.body_lines:
            shown.append("    ...")
        code = "\n".join([header, *(shown or ["    ..."])])
        question = f"Write the docstring of this function from the module {module}:\n\n{code}"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        rows.append({"messages": messages, "module": module, "function": node.name, "reply": reply})
    return rows


@DATASETS.register("stdlib-docstring-sft", StdlibDocstringSFT)
def stdlib_docstring_sft(options: StdlibDocstringSFT, seed: int) -> Table:
    """Supervised fine-tuning (chat): a function of the standard library shown by its signature and
    the start of its body, and its docstring as the reply. A reply that another function already
    has is left out, so no reply is in two splits."""
    rows = [row for path, source in _stdlib_sources() for row in _function_examples(path, source, options)]
    frame = pd.DataFrame(rows).drop_duplicates("reply").drop(columns="reply").reset_index(drop=True)
    table = _table("stdlib-docstring-sft", frame, options.model_dump(exclude={"name"}))
    table.format = "chat"
    return table


# ---------------------------------------------------------------- tables


def _sklearn_table(name: str, load: Callable[..., Any]) -> Table:
    bunch = load(as_frame=True)
    frame = bunch.data.astype(float)
    frame["label"] = np.asarray(bunch.target_names).astype(str)[bunch.target.to_numpy()]
    return _table(name, frame, {}, features=list(bunch.data.columns), label="label")


# sklearn is slow to import: only these built-ins need it.


@DATASETS.register("breast-cancer", BreastCancer)
def breast_cancer(options: BreastCancer, seed: int) -> Table:
    from sklearn.datasets import load_breast_cancer

    return _sklearn_table("breast-cancer", load_breast_cancer)


@DATASETS.register("digits", Digits)
def digits(options: Digits, seed: int) -> Table:
    from sklearn.datasets import load_digits

    return _sklearn_table("digits", load_digits)


@DATASETS.register("wine", Wine)
def wine(options: Wine, seed: int) -> Table:
    from sklearn.datasets import load_wine

    return _sklearn_table("wine", load_wine)


@DATASETS.register("synthetic-imbalanced", SyntheticImbalanced)
def synthetic_imbalanced(options: SyntheticImbalanced, seed: int) -> Table:
    """Features from make_classification; the largest class is class_ratio times the smallest."""
    from sklearn.datasets import make_classification

    params = {**options.model_dump(exclude={"name"}), "seed": seed}
    n_features, n_classes = options.n_features, options.n_classes
    informative = max(options.features_needed, n_features // 2)
    # Geometric weights: class i has class_ratio ** (-i / (k - 1)) of the largest class's rows.
    weights = options.class_ratio ** -(np.arange(n_classes) / (n_classes - 1))
    x, y = make_classification(
        n_samples=options.n_samples,
        n_features=n_features,
        n_informative=informative,
        n_redundant=min(2, n_features - informative),
        n_classes=n_classes,
        weights=(weights / weights.sum()).tolist(),
        flip_y=0.0,  # no label noise, so the class ratio is what was asked
        random_state=seed,
    )
    features = [f"f{i}" for i in range(n_features)]
    frame = pd.DataFrame(x, columns=features)
    frame["label"] = [f"class_{c}" for c in y]
    return _table("synthetic-imbalanced", frame, params, features=features, label="label")


def build_dataset(options: BuiltinDataset, seed: int) -> Table:
    return DATASETS.get(options.name).build(options, seed)
