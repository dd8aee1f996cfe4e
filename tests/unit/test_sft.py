"""What trains in supervised fine-tuning: replies and their end-of-turn token, never prompts, under
the chat-template styles of six decoder families (Llama 3's, ChatML with Qwen's default system
prompt, Zephyr's, Mistral's without a generation prompt, Phi-3's closing the conversation with EOS,
ChatML on GPT-NeoX), and the loss packing and gradient accumulation must leave unchanged."""

import json

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import forgeml
from forgeml.data.config import DataConfig
from forgeml.data.examples import conversation_json, messages
from forgeml.data.sources import read_table
from forgeml.errors import DataError, ForgeError
from forgeml.models.checkpoints import load_tokenizer
from forgeml.models.hf_causal_lm import HFCausalLM, HFCausalLMConfig
from forgeml.models.registry import Splits, load_family, logits_of
from forgeml.models.sft import IGNORE, ChatRenderer, completion_rendered, marked, segments, tokenize
from forgeml.tiny_checkpoints import CAUSAL_LMS
from forgeml.training.config import TrainConfig
from forgeml.training.loop import Optimization, train_step
from forgeml.training.losses import NextTokenLoss
from forgeml.training.strategies import Strategy

ARCHS = CAUSAL_LMS  # each with a chat template of its family's kind (forgeml.tiny_checkpoints)
END_OF_TURN = {
    "llama": "<|eot_id|>", "qwen2": "<|im_end|>", "gpt2": "<|endoftext|>",
    "mistral": "<|endoftext|>", "phi3": "<|end|>", "gpt_neox": "<|im_end|>",
}  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "You write docstrings."},
    {"role": "user", "content": "Parse a date string."},
    {"role": "assistant", "content": "Return the base name of a path."},
    {"role": "user", "content": "And the next one?"},
    {"role": "assistant", "content": "Close the connection."},
]
REPLIES = ["Return the base name of a path.", "Close the connection."]


def tokenizer_of(tiny_checkpoint, arch):
    return load_tokenizer(str(tiny_checkpoint(arch)), arch)


def trained_runs(tokenizer, example) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, run = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run)), run.clear()
    return runs + ([tokenizer.decode(run)] if run else [])


def encode(tokenizer, conversation, **options):
    settings = {"train_on_prompt": False, "train_on_turns": "all", **options}
    rendered = ChatRenderer(tokenizer, tokenizer.chat_template, **settings)(conversation)
    return tokenize(tokenizer, [rendered], add_special_tokens=False)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_reply_trains_with_its_end_of_turn_token_and_no_prompt_token_does(arch, tiny_checkpoint):
    tokenizer = tokenizer_of(tiny_checkpoint, arch)
    example = encode(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, example) == [reply + END_OF_TURN[arch] for reply in REPLIES]
    # The same token ids as transformers' own apply_chat_template gives at inference.
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert example.input_ids.tolist() == list(ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_last_turn_only_and_train_on_prompt(arch, tiny_checkpoint):
    tokenizer = tokenizer_of(tiny_checkpoint, arch)
    last = encode(tokenizer, CONVERSATION, train_on_turns="last")
    assert trained_runs(tokenizer, last) == [REPLIES[-1] + END_OF_TURN[arch]]
    everything = encode(tokenizer, CONVERSATION, train_on_prompt=True)
    assert (everything.labels == everything.input_ids).all()


def test_the_trained_spans_are_shown_marked(tiny_checkpoint):
    tokenizer = tokenizer_of(tiny_checkpoint, "qwen2")
    example = encode(tokenizer, CONVERSATION)
    shown = marked(segments(tokenizer, example.input_ids, example.labels))
    assert f"[[{REPLIES[0]}<|im_end|>]]\n<|im_start|>user" in shown
    assert shown.replace("[[", "").replace("]]", "") == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_a_completion_trains_with_the_end_of_sequence_token(tiny_checkpoint):
    tokenizer = tokenizer_of(tiny_checkpoint, "llama")
    rendered = completion_rendered("def basename(p):\n", "Return the base name.", tokenizer.eos_token)
    example = tokenize(tokenizer, [rendered], add_special_tokens=True)[0]
    assert trained_runs(tokenizer, example) == ["Return the base name.<|endoftext|>"]


def test_a_template_that_never_ends_a_turn_with_a_special_token_is_refused(tiny_checkpoint):
    tokenizer = tokenizer_of(tiny_checkpoint, "llama")
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ForgeError, match="no special token, so the model could not learn to stop"):
        ChatRenderer(tokenizer, plain, False, "all")(CONVERSATION)


def test_a_template_that_renders_earlier_turns_differently_is_refused(tiny_checkpoint):
    tokenizer = tokenizer_of(tiny_checkpoint, "qwen2")
    counted = "{{ messages | length }}" + tokenizer.chat_template
    with pytest.raises(ForgeError, match="renders the first turns of a conversation differently"):
        ChatRenderer(tokenizer, counted, False, "all")(CONVERSATION)


def test_a_tokenizer_without_a_chat_template_names_both_ways_out(tmp_path, tiny_checkpoint):
    folder = tmp_path / "plain"
    tokenizer = tokenizer_of(tiny_checkpoint, "llama")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = HFCausalLMConfig(name="hf-causal-lm", pretrained=str(tiny_checkpoint("llama")), tokenizer=str(folder))
    splits = Splits(*([None] * 3), text_column="messages", format="chat")
    with pytest.raises(ForgeError, match="has no chat template.*model.chat_template"):
        HFCausalLM.fit_encoder(config, splits)


@given(
    st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=30)), min_size=1, max_size=6)
)
def test_conversations_round_trip_through_their_canonical_json(pairs):
    conversation = [{"role": role, "content": content, "extra": 1} for role, content in pairs]
    assert messages(conversation_json(conversation, "row 0")) == [{"role": r, "content": c} for r, c in pairs]


@given(st.one_of(st.just([]), st.integers(), st.lists(st.integers(), min_size=1), st.text(min_size=1)))
def test_what_is_not_a_conversation_is_refused_naming_the_row(value):
    """Empty lists, numbers, lists of non-messages, and texts (a CSV cell is parsed as JSON first)."""
    with pytest.raises(DataError, match="^row 7"):
        conversation_json(value, "row 7")


def test_a_bad_role_is_named_with_its_message():
    with pytest.raises(DataError, match=r"row 2, message 1: role 'tool' is not one of system, user, assistant"):
        conversation_json([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "row 2")


# ---------------------------------------------------------------- losses


def chat_rows(n: int) -> list[list[dict]]:
    """Conversations of different lengths: a different count of trained tokens each."""
    words = ["path", "file", "open", "read", "parse", "date", "socket", "send", "message", "reply", "count", "word"]
    rows = []
    for i in range(n):
        reply = " ".join(words[(i + k) % len(words)] for k in range(1 + i % 5))
        rows.append(
            [{"role": "user", "content": " ".join(words[: 2 + i % 7])}, {"role": "assistant", "content": reply}]
        )
    return rows


def family_and_encoder(tiny_checkpoint, arch, packed):
    config = HFCausalLMConfig(name="hf-causal-lm", pretrained=str(tiny_checkpoint(arch)), max_length=128)
    frame = pd.DataFrame({"messages": [json.dumps(c) for c in chat_rows(32)]})
    splits = Splits(frame, frame, frame, text_column="messages", format="chat")
    encoder = HFCausalLM.fit_encoder(config, splits)
    encoder = encoder.packing() if packed else encoder
    family = HFCausalLM.create(config, encoder, [], seed=0)
    return family, encoder, frame


def batch_loss(family, batch) -> torch.Tensor:
    family.network.eval()
    with torch.no_grad():
        return NextTokenLoss()(logits_of(family.network(**batch.inputs)), batch.targets)


def token_losses(family, batch) -> torch.Tensor:
    """Each trained target's loss, in order (row by row, then position by position)."""
    family.network.eval()
    with torch.no_grad():
        logits = logits_of(family.network(**batch.inputs)).float()
    trained = batch.targets != IGNORE
    return torch.nn.functional.cross_entropy(logits[trained], batch.targets[trained], reduction="none")


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_examples_give_the_loss_they_give_unpacked(arch, tiny_checkpoint, tmp_path):
    family, encoder, frame = family_and_encoder(tiny_checkpoint, arch, packed=False)
    plain = family.collate(list(family.items(encoder.table(frame, None, []))), None, None)
    packed_encoder = encoder.packing()
    packed_items = family.items(packed_encoder.table(frame, None, []))
    assert len(packed_items) < len(frame)  # several examples share a row
    packed = family.collate(list(packed_items), None, None)
    assert int((packed.targets != IGNORE).sum()) == int((plain.targets != IGNORE).sum())
    assert abs(batch_loss(family, packed).item() - batch_loss(family, plain).item()) < 1e-3
    # Token by token, so no example can have seen the one before it: the same loss within 1e-4.
    torch.testing.assert_close(token_losses(family, packed), token_losses(family, plain), rtol=0, atol=1e-4)
    # As compress and explain read it: loaded from its export, scored without a KV cache.
    family.save(tmp_path / "model")
    loaded = load_family(tmp_path / "model")
    torch.testing.assert_close(token_losses(loaded, packed), token_losses(loaded, plain), rtol=0, atol=1e-4)


def test_four_micro_batches_of_8_step_as_one_batch_of_32(tiny_checkpoint):
    """The loss of a global batch is the mean over all its trained tokens, however it is split: the
    same loss and the same gradients (seen through an SGD step) within 1e-5."""
    results = []
    for split in (1, 4):
        family, encoder, frame = family_and_encoder(tiny_checkpoint, "llama", packed=False)
        family.network.eval()  # no dropout: the two runs see the same function
        items = list(family.items(encoder.table(frame, None, [])))
        size = len(items) // split
        micro = [family.collate(items[i * size : (i + 1) * size], None, None) for i in range(split)]
        opt = Optimization(family.network, TrainConfig(max_steps=1, lr=1.0), 1, torch.device("cpu"))
        opt.optimizer = torch.optim.SGD([p for p in family.network.parameters() if p.requires_grad], lr=1.0)
        opt.scheduler = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda step: 1.0)
        loss = train_step(family.network, micro, NextTokenLoss(), Strategy.single(torch.device("cpu")), opt)
        results.append((loss.item(), {n: p.detach().clone() for n, p in family.network.named_parameters()}))
    (whole, weights_whole), (split, weights_split) = results
    assert abs(whole - split) < 1e-5
    for name, value in weights_whole.items():
        assert torch.allclose(value, weights_split[name], atol=1e-5), name


def test_examples_longer_than_max_length_are_left_out_and_counted(tiny_checkpoint):
    config = HFCausalLMConfig(name="hf-causal-lm", pretrained=str(tiny_checkpoint("llama")), max_length=40)
    frame = pd.DataFrame({"messages": [json.dumps(c) for c in chat_rows(32)]})
    encoder = HFCausalLM.fit_encoder(config, Splits(frame, frame, frame, text_column="messages", format="chat"))
    kept = encoder.table(frame, None, [])
    assert 0 < kept.num_rows < len(frame)
    assert max(len(ids) for ids in kept.column("input_ids").to_pylist()) <= 40
    assert encoder.notes() == [
        f"left out {len(frame) - kept.num_rows} examples longer than model.max_length (40 tokens)"
    ]
    long = [{"role": "user", "content": "open " * 60}, {"role": "assistant", "content": "read"}]
    long_first = pd.concat([pd.DataFrame({"messages": [json.dumps(long)]}), frame], ignore_index=True)
    counted = encoder.too_long
    shown = encoder.shown(long_first)  # the first that fits; showing leaves nothing out
    assert shown and "open open" not in "".join(text for text, _ in shown) and encoder.too_long == counted
    with pytest.raises(ForgeError, match="more than the 128 positions the network reads"):
        HFCausalLM.create(config.model_copy(update={"max_length": 200}), encoder, [], seed=0)


def test_the_sft_recipe_without_the_lm_run_says_to_run_it_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/lm here
    with pytest.raises(ForgeError, match=r"trained model of the run runs/lm: run that recipe first \(forgeml run lm\)"):
        forgeml.prepare("sft", tmp_path / "run")


def test_chat_rows_read_from_parquet_as_from_jsonl(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pd.DataFrame({"messages": [conversation, conversation[:1]]}).to_parquet(tmp_path / "chat.parquet")
    (tmp_path / "chat.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in (conversation, conversation[:1]))
    )
    tables = [
        read_table(DataConfig(source=str(tmp_path / f"chat.{kind}"), format="chat")) for kind in ("parquet", "jsonl")
    ]
    assert tables[0].frame["messages"].tolist() == tables[1].frame["messages"].tolist()
    assert messages(tables[0].frame["messages"][0]) == conversation


PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "specials", "end"),
    [(PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"), (MISTRAL, [], "<|endoftext|>")],
    ids=["phi-3", "mistral"],
)
def test_templates_that_close_the_conversation_or_have_no_generation_prompt(tiny_checkpoint, template, specials, end):
    """Phi-3's template ends a whole conversation with the end-of-sequence token after its last
    <|end|>, which later turns do not have; Mistral's has no generation prompt and skips the
    system message. Each reply still trains with the token that ends its turn, and only that."""
    tokenizer = tokenizer_of(tiny_checkpoint, "llama")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    renderer = ChatRenderer(tokenizer, template, False, "all")
    example = tokenize(tokenizer, [renderer(CONVERSATION)], add_special_tokens=False)[0]
    assert trained_runs(tokenizer, example) == [reply + end for reply in REPLIES]
    assert renderer.end_of_turn == {end}


def test_packing_is_refused_for_a_network_that_does_not_read_per_example_positions():
    """OPT counts its positions from the attention mask, so packed examples would see each other."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from forgeml.models.hf_causal_lm import check_document_isolation

    small = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    opt = AutoModelForCausalLM.from_config(OPTConfig(**small, ffn_dim=32, word_embed_proj_dim=16))  # use_cache on
    with pytest.raises(ForgeError, match="the opt network lets packed examples attend to each other"):
        check_document_isolation(opt, 64)
    check_document_isolation(AutoModelForCausalLM.from_config(LlamaConfig(**small, intermediate_size=32)), 64)
