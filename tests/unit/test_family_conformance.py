"""Every registered model family passes forgeml.testing.check_family, with each capability it
declares exercised."""

import numpy as np
import pandas as pd
import pytest

from forgeml.models import MODELS
from forgeml.models.registry import Splits, family_for
from forgeml.testing import check_family
from forgeml.tiny_checkpoints import CAUSAL_LMS, DECODERS, ENCODERS

# Small settings where a family's defaults would be slow; any other family runs with its defaults.
SMALL = {
    "gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
    "text-classifier": {"max_length": 32},
    "mlp": {"hidden_sizes": [16, 8]},
}
# The module family runs on a user's network of each kind of input (tests/user_networks.py).
MODULES = {
    "text": {"inputs": "text", "factory": "user_networks:conv_text", "max_length": 32},
    "features": {"inputs": "features", "factory": "user_networks:FeatureNet", "options": {"n_features": 3}},
}
MODULE_CAPABILITIES = {"text": {"input embeddings", "augmentation token_dropout"}, "features": set()}
# What each built-in must show beyond the checks every family runs.
CAPABILITIES = {
    "gpt": {"generate", "blocks", "tensor-parallel plan", "structured pruning", "distillation student",
            "input embeddings", "flops per token"},
    "text-classifier": {"predict", "blocks", "structured pruning", "distillation student", "input embeddings",
                        "augmentation token_dropout", "augmentation random_mask"},
    "mlp": {"predict", "structured pruning", "distillation student", "augmentation gaussian_noise",
            "augmentation mixup_alpha"},
    "hf-classifier": {"predict", "blocks", "distillation student", "input embeddings", "augmentation token_dropout",
                      "augmentation random_mask"},
    "module": {"predict"},
    "hf-causal-lm": {"generate", "blocks", "distillation student", "input embeddings", "flops per token"},
}  # fmt: skip
# hf-classifier runs on a tiny random checkpoint of each of these architectures.
ARCHITECTURES = {
    "bert": {"structured pruning"},
    "distilbert": set(),
    "llama": {"tensor-parallel plan"},
    "gpt2": set(),
}
# hf-causal-lm fine-tunes a tiny random checkpoint of each decoder.
CAUSAL_ARCHITECTURES = {
    "llama": {"tensor-parallel plan"}, "qwen2": {"tensor-parallel plan"}, "gpt2": set(),
    "mistral": {"tensor-parallel plan"}, "phi3": set(), "gpt_neox": set(),
}  # fmt: skip
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small"]


def text_splits(classify: bool) -> Splits:
    rng = np.random.default_rng(0)
    frames = []
    for n in (24, 8, 8):
        labels = rng.integers(0, 2, n)
        texts = [" ".join(rng.choice(WORDS, 12)) + (" good" if y else " bad") for y in labels]
        frame = pd.DataFrame({"text": texts, "label": np.array(["neg", "pos"])[labels]})
        frames.append(frame)
    label = "label" if classify else None
    return Splits(*frames, text_column="text", label_column=label, labels=["neg", "pos"] if classify else [])


def feature_splits() -> Splits:
    rng = np.random.default_rng(0)
    frames = []
    for n in (24, 8, 8):
        x = rng.normal(size=(n, 3))
        frames.append(pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": np.where(x[:, 0] > 0, "hi", "lo")}))
    return Splits(*frames, feature_columns=["a", "b", "c"], label_column="y", labels=["hi", "lo"])


PER_ARCHITECTURE = {"hf-classifier": ARCHITECTURES, "hf-causal-lm": CAUSAL_ARCHITECTURES, "module": MODULES}
CASES = [(name, None) for name in MODELS.names() if name not in PER_ARCHITECTURE]
CASES += [(name, arch) for name, archs in PER_ARCHITECTURE.items() for arch in archs]


def test_every_registered_family_has_a_case():
    assert {name for name, _ in CASES} == set(MODELS.names())
    assert set(ARCHITECTURES) <= set(ENCODERS + DECODERS) and set(CAUSAL_ARCHITECTURES) == set(CAUSAL_LMS)
    assert set(MODULES) == set(MODELS.get("module").build.kinds)


@pytest.mark.parametrize(("name", "arch"), CASES)
def test_every_registered_family_conforms(name, arch, tiny_checkpoint):
    entry = MODELS.get(name)
    if name == "module":
        options = MODULES[arch]
    elif arch:
        options = {"pretrained": str(tiny_checkpoint(arch)), "max_length": 32}
    else:
        options = SMALL.get(name, {})
    config = entry.config(name=name, **options)
    family = family_for(config)
    splits = feature_splits() if family.inputs == "features" else text_splits(family.task.classifies)
    passed = check_family(family, config, splits)
    assert {"encoder round trip", "create", "training step", "save and load", "export axes"} <= set(passed)
    extra = {"module": MODULE_CAPABILITIES, "hf-causal-lm": CAUSAL_ARCHITECTURES}.get(name, ARCHITECTURES)
    wanted = CAPABILITIES.get(name, set()) | extra.get(arch, set())
    assert wanted <= set(passed), sorted(wanted - set(passed))
