"""Built-in datasets, named by data.source: built locally (no download), deterministic for a seed.

Adding one is one decorated function returning a Table; ``@accepts(...)`` declares the data.*
options it reads, so that read_table can reject the others instead of ignoring them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from forgeml.data.table import Table
from forgeml.errors import DataError
from forgeml.registry import Registry

if TYPE_CHECKING:
    from forgeml.data.config import DataConfig

Builder = Callable[["DataConfig"], "Table"]
DATASETS: Registry[Builder] = Registry("dataset")

F = TypeVar("F", bound=Callable[..., Any])

# Folders of the standard library that hold tests or no importable modules.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def accepts(*options: str) -> Callable[[F], F]:
    """Declare the data.* options a built-in reads (e.g. "top_k_labels")."""

    def mark(build: F) -> F:
        build.options = frozenset(options)  # type: ignore[attr-defined]
        return build

    return mark


def options_of(name: str) -> frozenset[str]:
    return getattr(DATASETS.get(name).build, "options", frozenset())


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


@DATASETS.register("stdlib-docstrings")
@accepts("top_k_labels")
def stdlib_docstrings(cfg: DataConfig) -> Table:
    """Text classification: which standard-library package a docstring comes from."""
    rows = [row for path, source in _stdlib_sources() for row in _docstrings(path, source)]
    frame = pd.DataFrame(rows, columns=["text", "label", "module"])
    if cfg.top_k_labels is not None:
        frame = _top_labels(frame, cfg.top_k_labels)
    return _table("stdlib-docstrings", frame, {"top_k_labels": cfg.top_k_labels}, text="text", label="label")


@DATASETS.register("stdlib-code")
def stdlib_code(cfg: DataConfig) -> Table:
    """Language modelling: the standard library's Python sources, one row per file."""
    paths, sources = zip(*_stdlib_sources(), strict=True)
    frame = pd.DataFrame({"text": sources, "path": paths})
    return _table("stdlib-code", frame, {}, text="text")


# ---------------------------------------------------------------- tables


def _sklearn_table(name: str, load: Callable[..., Any]) -> Table:
    bunch = load(as_frame=True)
    frame = bunch.data.astype(float)
    frame["label"] = np.asarray(bunch.target_names).astype(str)[bunch.target.to_numpy()]
    return _table(name, frame, {}, features=list(bunch.data.columns), label="label")


# sklearn is slow to import: only these built-ins need it.


@DATASETS.register("breast-cancer")
def breast_cancer(cfg: DataConfig) -> Table:
    from sklearn.datasets import load_breast_cancer

    return _sklearn_table("breast-cancer", load_breast_cancer)


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> Table:
    from sklearn.datasets import load_digits

    return _sklearn_table("digits", load_digits)


@DATASETS.register("wine")
def wine(cfg: DataConfig) -> Table:
    from sklearn.datasets import load_wine

    return _sklearn_table("wine", load_wine)


@DATASETS.register("synthetic-imbalanced")
@accepts("n_samples", "n_features", "n_classes", "class_ratio")
def synthetic_imbalanced(cfg: DataConfig) -> Table:
    """Features from make_classification; the largest class is class_ratio times the smallest."""
    from sklearn.datasets import make_classification

    params = {
        "n_samples": 2000 if cfg.n_samples is None else cfg.n_samples,
        "n_features": 20 if cfg.n_features is None else cfg.n_features,
        "n_classes": 2 if cfg.n_classes is None else cfg.n_classes,
        "class_ratio": 10.0 if cfg.class_ratio is None else cfg.class_ratio,
        "seed": cfg.seed,
    }
    n_features, n_classes = params["n_features"], params["n_classes"]
    # Two clusters per class sit on corners of a hypercube of the informative features.
    needed = math.ceil(math.log2(2 * n_classes))
    if n_features < needed:
        raise DataError(
            f"data.n_features={n_features} is too small for data.n_classes={n_classes}: use at least {needed}"
        )
    informative = max(needed, n_features // 2)
    # Geometric weights: class i has class_ratio ** (-i / (k - 1)) of the largest class's rows.
    weights = params["class_ratio"] ** -(np.arange(n_classes) / (n_classes - 1))
    x, y = make_classification(
        n_samples=params["n_samples"],
        n_features=n_features,
        n_informative=informative,
        n_redundant=min(2, n_features - informative),
        n_classes=n_classes,
        weights=(weights / weights.sum()).tolist(),
        flip_y=0.0,  # no label noise, so the class ratio is what was asked
        random_state=cfg.seed,
    )
    features = [f"f{i}" for i in range(n_features)]
    frame = pd.DataFrame(x, columns=features)
    frame["label"] = [f"class_{c}" for c in y]
    return _table("synthetic-imbalanced", frame, params, features=features, label="label")
