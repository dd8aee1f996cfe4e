"""Each explanation method on models whose reason is known: a table model that reads one feature,
and a text model trained to look for one word."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forgeml.explaining import faithfulness
from forgeml.explaining.tabular import TableExplainer
from forgeml.explaining.text import TextExplainer, eager_attention
from forgeml.models.checkpoints import packaged_minilm_dir
from forgeml.models.hf_classifier import TextClassifier, TextClassifierConfig
from forgeml.models.mlp import MLP, MLPConfig

FEATURES = ["a", "b", "c", "d", "e"]
READ = 2  # the one feature the table model reads
WORD = "zebra"
FILLER = [
    *("the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past"),
    *("old", "red", "houses", "near", "green", "hills", "by", "the", "river"),
]


def one_feature_model() -> MLP:
    """p(high) rises with feature c and ignores the others."""
    family = MLP(MLPConfig(name="mlp", hidden_sizes=[4], dropout=0.0), FEATURES, ["low", "high"])
    first, last = family.network.layers[0], family.network.layers[-1]
    with torch.no_grad():
        for layer in (first, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[:, READ] = 1.0
        last.weight[1] = 2.0
        last.weight[0] = -2.0
    return family


def test_table_methods_put_the_one_feature_read_first():
    rng = np.random.default_rng(0)
    explainer = TableExplainer(one_feature_model(), rng.normal(size=(200, len(FEATURES))), seed=0, background_rows=50)
    rows = rng.normal(size=(4, len(FEATURES)))
    rows[:, READ] = [1.5, 2.0, 1.0, 2.5]
    items = [explainer.read(row) for row in rows]
    assert all(item.target == 1 for item in items)
    values, _ = explainer.shap(rows, max_evals=100)
    for index, item in enumerate(items):
        scores = {
            "shap": values[index, :, item.target],
            "lime": explainer.lime(item, samples=300, labels=["low", "high"])[0],
            "ig": explainer.integrated_gradients(item, steps=32)[0],
        }
        for method, attribution in scores.items():
            assert faithfulness.ranking(attribution)[0] == READ, method
        result = faithfulness.deletion(scores, explainer.scorer(item), max_steps=3, random_orders=5, seed=index)
        for method in scores:
            assert faithfulness.aopc(result.curves[method]) > faithfulness.aopc(result.random), method


@pytest.fixture(scope="module")
def word_model() -> TextClassifier:
    """A one-layer encoder over MiniLM's tokenizer, trained until it says whether a text holds the word."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    network = BertForSequenceClassification(config)
    family = TextClassifier(
        TextClassifierConfig(name="text-classifier", max_length=32), network, tokenizer, ["without", "with"]
    )
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3)
    for _ in range(150):
        texts, labels = [], []
        for _ in range(32):
            words = list(rng.choice(FILLER, size=rng.integers(4, 12)))
            label = int(rng.random() < 0.5)
            if label:
                words.insert(int(rng.integers(0, len(words) + 1)), WORD)
            texts.append(" ".join(words))
            labels.append(label)
        network.train()
        loss = network(**family.encode_inputs(texts), labels=torch.tensor(labels)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    return family


def test_text_methods_put_the_one_word_first(word_model):
    explainer = TextExplainer(word_model, seed=0)
    eager_attention(word_model.network)
    texts = ["the cat sat on zebra a mat", "zebra dogs ran past old red houses", "near green hills by the zebra river"]
    for index, text in enumerate(texts):
        item = explainer.read(text)
        assert word_model.labels[item.target] == "with" and item.probs[item.target] > 0.9
        scores = {
            "ig": explainer.integrated_gradients(item, steps=32)[0],
            "lime": explainer.lime(item, samples=300),
            "attention": explainer.per_unit(item, explainer.attention(item)[1][0]),
        }
        for method, attribution in scores.items():
            assert item.pieces[faithfulness.ranking(attribution)[0]] == WORD, (method, text)
        result = faithfulness.deletion(scores, explainer.scorer(item), max_steps=4, random_orders=5, seed=index)
        for method in scores:
            assert faithfulness.aopc(result.curves[method]) > faithfulness.aopc(result.random), method
