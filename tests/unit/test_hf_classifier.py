"""hf-classifier on tiny random checkpoints of several architectures: what it reads from the model
(blocks, embeddings, LoRA targets, padding), LoRA's head surviving a save and reload, the student,
and every checkpoint it cannot use named with the way out."""

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import forgeml
from forgeml.errors import ForgeError, NotOffered
from forgeml.models.hf_classifier import HFClassifier, HFClassifierConfig
from forgeml.models.hf_network import LoraConfig, lora_targets
from forgeml.models.registry import Splits
from forgeml.recipe import validate_recipe

TEXTS = ["Return the base name of a path.", "Send the message to the server.", "Parse a date string."] * 4
LABELS = ["os", "smtp", "time"]


def splits() -> Splits:
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS * 4})
    return Splits(frame, frame, frame, text_column="text", label_column="label", labels=LABELS)


def build(folder, **options) -> HFClassifier:
    config = HFClassifierConfig(name="hf-classifier", pretrained=str(folder), max_length=32, **options)
    return HFClassifier.fit(config, splits(), seed=0)[0]


@pytest.mark.parametrize(
    ("arch", "targets"), [("bert", ["query", "value"]), ("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])]
)
def test_lora_targets_default_to_the_query_and_value_projections(tiny_checkpoint, arch, targets):
    assert lora_targets(build(tiny_checkpoint(arch)).network) == targets


def test_a_decoder_pads_with_its_end_of_sequence_token_and_says_so_in_its_config(tiny_checkpoint):
    family = build(tiny_checkpoint("llama"))
    assert family.tokenizer.pad_token == family.tokenizer.eos_token
    assert family.network.config.pad_token_id == family.tokenizer.eos_token_id
    # Rows of different lengths in one batch: each is classified by its own last token.
    alone = family.predict_proba(TEXTS[:1])
    together = family.predict_proba([TEXTS[0], TEXTS[1] + " and then some more words"])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_freeze_layers_freezes_the_embeddings_and_the_lower_blocks(tiny_checkpoint, arch):
    family = build(tiny_checkpoint(arch), freeze_layers=1)
    blocks = family.blocks()
    assert not any(p.requires_grad for p in family.input_embeddings().parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    with pytest.raises(ForgeError, match=r"freeze_layers: 3 is more than the checkpoint's 2 blocks; use 0\.\.2"):
        build(tiny_checkpoint(arch), freeze_layers=3)


def test_dropout_sets_every_dropout_of_the_checkpoint(tiny_checkpoint):
    config = build(tiny_checkpoint("gpt2"), dropout=0.3).network.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.3, 0.3, 0.3)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lora_trains_adapters_and_the_new_head_and_the_export_reloads_with_its_logits(tiny_checkpoint, arch, tmp_path):
    family = build(tiny_checkpoint(arch), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in family.network.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("lora_" not in n for n in trainable)  # the head too
    with torch.no_grad():  # as training would: adapters off zero, the head moved
        for param in family.network.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    expected = family.predict_proba(TEXTS[:3])
    family.save(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert plain.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        logits = plain(**family.encode_inputs(TEXTS[:3])).logits
    torch.testing.assert_close(logits.softmax(-1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(forgeml.load(tmp_path).predict_proba(TEXTS[:3]), expected, atol=1e-5, rtol=0)


def test_a_student_keeps_evenly_spaced_blocks_with_the_teachers_weights(tiny_checkpoint, tmp_path):
    from transformers import AutoModel

    from forgeml.tiny_checkpoints import config_for, decoder_tokenizer

    tokenizer = decoder_tokenizer()
    config = config_for("llama", tokenizer)
    config.num_hidden_layers = 4
    AutoModel.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    teacher = build(tmp_path)
    student = teacher.student(2, 0.5)
    assert len(student.blocks()) == 2 and student.network.config.num_hidden_layers == 2
    for new, old in zip(student.blocks(), [teacher.blocks()[0], teacher.blocks()[3]], strict=True):
        for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in student.input_embeddings().parameters())
    with pytest.raises(ForgeError, match="student_layers: 4 is not fewer than the teacher's 4 layers"):
        teacher.student(4, 0.5)


def test_structured_pruning_is_not_offered_for_blocks_not_laid_out_as_berts(tiny_checkpoint):
    family = build(tiny_checkpoint("llama"))
    with pytest.raises(NotOffered, match="LlamaDecoderLayer is not"):
        family.block_layout(family.blocks()[0])


def test_tensor_parallelism_comes_from_the_architectures_plan_or_is_refused(tiny_checkpoint):
    llama = HFClassifierConfig(name="hf-classifier", pretrained=str(tiny_checkpoint("llama")))
    sizes = HFClassifier.tensor_parallel_sizes(llama)
    assert sizes["the checkpoint's num_key_value_heads"] == 2
    bert = HFClassifierConfig(name="hf-classifier", pretrained=str(tiny_checkpoint("bert")))
    assert HFClassifier.tensor_parallel_refusal(bert).startswith("the bert architecture defines none")
    assert HFClassifier.tensor_parallel_refusal(llama) is None
    recipe = {
        "data": {"source": "stdlib-docstrings"},
        "model": bert.model_dump(),
        "parallel": {"strategy": "tp"},
        "train": {"max_steps": 1},
    }
    with pytest.raises(ForgeError, match="tp splits layers by a tensor-parallel plan, and the bert architecture"):
        validate_recipe(recipe)


def test_a_hub_id_that_is_not_cached_offline_is_named_with_the_way_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ForgeError) as caught:
        build("some-org/some-model")
    message = str(caught.value)
    assert "'some-org/some-model' is not a folder and not in the local Hugging Face cache" in message
    assert "hf download some-org/some-model" in message and "point model.pretrained at a checkpoint folder" in message


def test_a_folder_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ForgeError, match="there is no folder .*missing"):
        build(tmp_path / "missing")


def test_a_checkpoint_without_a_tokenizer_is_named(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("bert")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    with pytest.raises(ForgeError, match=r"holds no tokenizer forgeml can use .*tokenizer\.save_pretrained"):
        build(tmp_path)


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ForgeError, match="has no config.json, so it is not a transformers checkpoint"):
        build(tmp_path)


def test_a_checkpoint_that_cannot_classify_is_named(tiny_checkpoint, tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_checkpoint("bert") / name).read_text())
    with pytest.raises(ForgeError, match="is a vit checkpoint, and transformers has no sequence-classification head"):
        build(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit"


def test_a_checkpoint_with_lora_resumes_from_a_crash_to_the_uninterrupted_weights(tiny_checkpoint, tmp_path):
    """Dropout draws random numbers and LoRA's adapters and head are the trained state: both come back."""
    import uuid

    from forgeml.data.shards import write_shards
    from forgeml.training.builder import loaders
    from forgeml.training.callbacks import Callback
    from forgeml.training.checkpoint import Checkpoints
    from forgeml.training.config import TrainConfig
    from forgeml.training.loop import fit
    from forgeml.training.losses import ClassificationLoss
    from forgeml.training.strategies import Strategy

    class Crash(Callback):
        def on_step_end(self, state):
            if state.step == 5:
                raise KeyboardInterrupt

    class Steps(Callback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, state):
            self.seen.append(state.step)

    cfg = TrainConfig(max_steps=6, lr=1e-3, warmup_steps=0, seed=0, global_batch_size=4, checkpoint_every=2)

    def run(checkpoints=None, resume=False, callbacks=()):
        family = build(tiny_checkpoint("llama"), dropout=0.2, lora=LoraConfig(r=4, alpha=8, dropout=0.1))
        fitted = HFClassifier.fit_encoder(family.config, splits())
        folder = f"memory://hf-resume-{uuid.uuid4().hex}"
        table = fitted.rows(splits().train, "label", LABELS)
        manifest = {
            "splits": {name: {"shards": write_shards(table, folder, name, 5)} for name in ("train", "val", "test")}
        }
        strategy = Strategy.single(torch.device("cpu"))
        batches, _ = loaders(family, manifest, folder, cfg, cfg.global_batch_size, strategy)
        torch.manual_seed(0)
        fit(family.network, batches, cfg, ClassificationLoss(), strategy, callbacks=list(callbacks),
            checkpoints=checkpoints, resume=resume)  # fmt: skip
        return {k: v.detach().clone() for k, v in family.network.state_dict().items()}

    straight = run()
    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoints, callbacks=[Crash()])
    steps = Steps()
    resumed = run(checkpoints, resume=True, callbacks=[steps])
    assert steps.seen == [5, 6]  # on from step 4's checkpoint
    assert straight.keys() == resumed.keys() and any("lora_" in k for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
