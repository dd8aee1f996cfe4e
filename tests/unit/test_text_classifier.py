"""The MiniLM text classifier: layer freezing, LoRA, augmentation, and an export plain transformers loads."""

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import forgeml
from forgeml.errors import ForgeError
from forgeml.models.hf_classifier import TextClassifier, TextClassifierConfig
from forgeml.models.hf_network import LoraConfig
from forgeml.models.registry import Splits
from forgeml.training.config import AugmentConfig

TEXTS = ["Return the base name of a path.", "Send the message to the server.", "Parse a date string."] * 4


def splits() -> Splits:
    frame = pd.DataFrame({"text": TEXTS, "label": ["os", "smtp", "time"] * 4})
    return Splits(frame, frame, frame, text_column="text", label_column="label", labels=["os", "smtp", "time"])


def build(**options) -> TextClassifier:
    return TextClassifier.fit(TextClassifierConfig(name="text-classifier", **options), splits(), seed=0)[0]


def test_freeze_layers_freezes_embeddings_and_the_lower_layers():
    family = build(freeze_layers=4)
    bert = family.network.bert
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    for i, layer in enumerate(bert.encoder.layer):
        assert all(p.requires_grad == (i >= 4) for p in layer.parameters())
    assert all(p.requires_grad for p in family.network.classifier.parameters())


def test_freezing_more_layers_than_exist_is_a_clear_error():
    with pytest.raises(ForgeError, match="freeze_layers: 7 is more than the checkpoint.s 6 blocks"):
        build(freeze_layers=7)


def test_dropout_override_reaches_the_encoder():
    assert build(dropout=0.3).network.config.hidden_dropout_prob == 0.3


def test_collate_pads_to_the_longest_row_and_keeps_labels():
    config = TextClassifierConfig(name="text-classifier", max_length=16)
    family, encoder = TextClassifier.fit(config, splits(), seed=0)
    items = family.items(encoder.table(splits().train, "label", splits().labels))[:3]
    assert all(len(ids) <= 16 for ids, _ in items)
    batch = family.collate(items, augment=None, generator=None)
    longest = max(len(ids) for ids, _ in items)
    assert batch.inputs["input_ids"].shape == (3, longest)
    assert batch.targets.tolist() == [0, 1, 2]


def test_text_augmentation_keeps_cls_and_sep():
    family = build()
    ids = family.tokenizer("one two three four five six seven eight")["input_ids"]
    generator = torch.Generator().manual_seed(0)
    masked = family._augment(ids, AugmentConfig(random_mask=0.99), generator)
    assert masked[0] == ids[0] and masked[-1] == ids[-1]
    assert set(masked[1:-1]) == {family.tokenizer.mask_token_id}
    dropped = family._augment(ids, AugmentConfig(token_dropout=0.99), generator)
    assert dropped == [ids[0], ids[-1]]


def test_lora_trains_only_adapters_and_head_and_exports_merged(tmp_path):
    family = build(lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in family.network.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    # Move the adapters off zero so that merging them changes the weights.
    with torch.no_grad():
        for name, param in family.network.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    family.save(tmp_path)
    expected = family.predict_proba(TEXTS[:3])
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    logits = plain(**family.encode_inputs(TEXTS[:3])).logits
    assert torch.allclose(logits.softmax(-1), expected, atol=1e-5)
    reloaded = forgeml.load(tmp_path)
    assert torch.allclose(reloaded.predict_proba(TEXTS[:3]), expected, atol=1e-5)
    assert reloaded.labels == ["os", "smtp", "time"] and plain.config.id2label[1] == "smtp"
