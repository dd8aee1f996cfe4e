"""Model families. Each module registers one family in MODELS; a recipe names it in model.name."""

from forgeml.models.registry import MODELS

# Importing the families registers them (they import torch/transformers lazily).
from forgeml.models import gpt, hf_causal_lm, hf_classifier, mlp, module  # noqa: E402,F401  isort: skip

__all__ = ["MODELS"]
