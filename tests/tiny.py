"""Recipes small enough to train in seconds, shared by the test modules that need a trained model of
each kind: the breast-cancer table for an MLP, three packages' docstrings for the MiniLM
classifier, a few standard-library files for a GPT. ``recipe`` gives a copy with a module's own
name and settings laid over them, section by section."""

import copy
from typing import Any

TABLE = {
    "data": {"source": "breast-cancer"},
    "audit": {"enabled": False},
    "model": {"name": "mlp", "hidden_sizes": [32, 16]},
    "train": {"max_steps": 30, "global_batch_size": 32, "lr": 1e-2, "seed": 0},
}
TEXT = {
    "data": {"source": {"name": "stdlib-docstrings", "top_k_labels": 3}, "max_rows": 160},
    "audit": {"enabled": False},
    "model": {"name": "text-classifier", "max_length": 32, "freeze_layers": 4},
    "train": {"max_steps": 6, "global_batch_size": 16, "lr": 5e-4, "seed": 0},
}
LM = {
    "data": {"source": "stdlib-code", "max_rows": 12},
    "audit": {"enabled": False},
    "model": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0},
    "train": {"max_steps": 10, "global_batch_size": 8, "lr": 3e-3, "seed": 0},
}


def recipe(base: dict[str, Any], name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` named ``name``, each of ``sections`` merged into the section of that name."""
    out = copy.deepcopy(base)
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **copy.deepcopy(values)}
    return {"name": name, **out}
