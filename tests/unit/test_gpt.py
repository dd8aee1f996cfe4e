from itertools import islice
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from forgeml.models.gpt import GPT, BPETokenizer, ByteTokenizer, GPTConfig, GPTNetwork
from forgeml.models.registry import MODELS, Splits
from forgeml.models.sampling import next_token


def tiny(**overrides: object) -> GPTConfig:
    fields = {"name": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "dropout": 0.0}
    return GPTConfig(**{**fields, **overrides})


@pytest.fixture
def splits() -> Splits:
    def frame(texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"text": texts})

    train = [f"doc {i}: hello world, the quick brown fox — ünïcödé 😀" for i in range(40)]
    return Splits(
        train=frame(train),
        val=frame(["zyzzyva jam " * 5] * 4),  # letters never seen in training
        test=frame(["hello world " * 5] * 4),
        text_column="text",
    )


def test_registered() -> None:
    entry = MODELS.get("gpt")
    assert entry.build is GPT and entry.config is GPTConfig
    assert (GPT.name, GPT.inputs, GPT.task.name, GPT.generates) == ("gpt", "text", "lm", True)


def test_n_embd_must_divide_by_n_head() -> None:
    with pytest.raises(ValidationError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        tiny(n_embd=30)


def test_shapes_and_block_size_overflow() -> None:
    net = GPTNetwork(tiny(), vocab_size=257)
    assert net(torch.randint(0, 257, (3, 16))).shape == (3, 16, 257)
    assert net(torch.randint(0, 257, (2, 5))).shape == (2, 5, 257)
    with pytest.raises(ValueError, match=r"17 tokens .* block_size \(16\)"):
        net(torch.zeros(1, 17, dtype=torch.long))


def test_causal() -> None:
    torch.manual_seed(0)
    net = GPTNetwork(tiny(), vocab_size=257).eval()
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10] = (x[:, 10] + 1) % 256
    a, b = net(x), net(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_weight_tying_and_param_count() -> None:
    net = GPTNetwork(tiny(), vocab_size=257)
    assert net.lm_head.weight is net.wte.weight
    # per block: 2 LayerNorms, q/k/v, attn.c_proj, c_fc, mlp.c_proj (weights + biases)
    block = 2 * 64 + 3 * (32 * 32 + 32) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    non_embedding = 2 * block + 257 * 32 + 64  # blocks, tied wte/lm_head, ln_f
    assert net.num_params() == non_embedding
    assert net.num_params(non_embedding=False) == non_embedding + 16 * 32


def test_flops_per_token(splits: Splits) -> None:
    model = GPT.fit(tiny(), splits, seed=0)[0]
    n = model.network.num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 8 * 16


def test_deterministic_init(splits: Splits) -> None:
    a = GPT.fit(tiny(), splits, seed=3)[0].network.state_dict()
    b = GPT.fit(tiny(), splits, seed=3)[0].network.state_dict()
    c = GPT.fit(tiny(), splits, seed=4)[0].network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "naïve café — 日本語 😀\n\ttabs"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert (tok.eot_id, tok.vocab_size) == (256, 257)


def test_bpe_tokenizer_trains_on_train_only(splits: Splits) -> None:
    model = GPT.fit(tiny(tokenizer="bpe", vocab_size=300), splits, seed=0)[0]
    tok = model.tokenizer
    assert isinstance(tok, BPETokenizer)
    assert 257 < tok.vocab_size <= 300
    vocab = tok.tokenizer.get_vocab()
    assert "Ġhello" in vocab  # Ġ: byte-level BPE's space
    assert not any(len(t) > 1 and ("z" in t or "j" in t) for t in vocab)  # val's words were not merged
    for text in ["hello world — ünïcödé 😀", "zyzzyva jam", "<|endoftext|> is text here"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id not in tok.encode("a <|endoftext|> b")


def test_chunks_and_collate(splits: Splits) -> None:
    model, encoder = GPT.fit(tiny(), splits, seed=0)
    texts = splits.train["text"].tolist()
    stream = []
    for i, text in enumerate(texts):
        stream += ([256] if i else []) + list(text.encode("utf-8"))
    data = model.items(encoder.table(splits.train, None, []))
    assert len(data) == len(stream) // 17
    assert torch.cat([data[i] for i in range(len(data))]).tolist() == stream[: len(data) * 17]
    assert data[0].dtype == torch.long

    batch = model.collate([data[0], data[1], data[2]], augment=None, generator=None)
    x = batch.inputs["input_ids"]
    assert x.shape == batch.targets.shape == (3, 16)
    assert (batch.size, batch.tokens) == (3, 48)
    assert torch.equal(x[:, 1:], batch.targets[:, :-1])
    assert torch.equal(batch.targets[:, -1], torch.stack([data[i][-1] for i in range(3)]))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_save_load_round_trip(splits: Splits, tmp_path: Path, tokenizer: str) -> None:
    model = GPT.fit(tiny(tokenizer=tokenizer, vocab_size=300), splits, seed=0)[0]
    model.save(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert all(name.endswith((".json", ".safetensors")) for name in files)

    loaded = GPT.load(tmp_path)
    assert loaded.network.lm_head.weight is loaded.network.wte.weight
    assert loaded.config == model.config
    x = torch.tensor([loaded.tokenizer.encode("hello world, the quick")[:16]])
    assert torch.equal(model.network.eval()(x), loaded.network(x))
    assert loaded.tokenizer.encode("ünïcödé fox") == model.tokenizer.encode("ünïcödé fox")


@pytest.mark.parametrize(("tokenizer", "bias"), [("byte", True), ("bpe", False)])
def test_the_export_is_a_gpt2_checkpoint_with_the_same_logits_and_tokens(splits, tmp_path, tokenizer, bias):
    """transformers alone loads the saved model and its tokenizer: the same ids, the same text back,
    the same logits within 1e-4 (fp32), and generation stops at end-of-text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = GPT.fit(tiny(tokenizer=tokenizer, vocab_size=300, bias=bias), splits, seed=0)[0]
    model.save(tmp_path)
    network = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "hi wörld<|endoftext|>ab"
    ids = model.tokenizer.encode("hi wörld") + [model.tokenizer.eot_id] + model.tokenizer.encode("ab")
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == model.tokenizer.decode(ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(network(x).logits, model.network.eval()(x), rtol=0, atol=1e-4)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == model.tokenizer.eot_id


def test_training_reduces_loss() -> None:
    text = pd.DataFrame({"text": ["abcdefgh" * 40]})
    model, encoder = GPT.fit(tiny(), Splits(train=text, val=text, test=text, text_column="text"), seed=0)
    data = model.items(encoder.table(text, None, []))
    batch = model.collate([data[i] for i in range(len(data))], augment=None, generator=None)
    optimizer = torch.optim.AdamW(model.network.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model.network(**batch.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate(splits: Splits) -> None:
    model = GPT.fit(tiny(), splits, seed=0)[0]
    model.network.train()
    gen = torch.Generator().manual_seed(0)
    out = model.generate("hello", max_new_tokens=20, temperature=0.8, top_k=10, generator=gen)
    assert isinstance(out, str)
    assert len(out) <= 20  # a byte decodes to at most one character
    assert model.generate("", max_new_tokens=0) == ""
    assert model.generate("x" * 40, max_new_tokens=5, temperature=0) == model.generate(
        "x" * 40, max_new_tokens=5, temperature=0
    )  # prompts past block_size are cropped; greedy is deterministic
    assert model.network.training  # the mode is restored
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate("a", max_new_tokens=1, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate("a", max_new_tokens=1, top_k=0)
    assert model.network.training


def uncached_tokens(
    net: GPTNetwork,
    ids: list[int],
    n: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Sampling without a cache: each step runs the whole growing sequence, cropped to its last
    block_size tokens, through the network."""
    context = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = net(torch.tensor([context[-net.block_size :]]))[0, -1]
            context.append(next_token(logits, temperature, top_k, generator))
    return context[len(ids) :]


def random_net(seed: int = 0) -> GPTNetwork:
    """Random weights, larger than GPT-2's init: greedy decoding then wanders among tokens instead of
    repeating one, so that comparing sequences tests something."""
    torch.manual_seed(seed)
    net = GPTNetwork(tiny(), vocab_size=257).eval()
    with torch.no_grad():
        for param in net.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5)
    return net


def test_kv_cache_logits_match_the_full_forward() -> None:
    net = random_net()
    x = torch.randint(0, 257, (2, 16))
    cache = net.new_cache(batch=2)
    with torch.no_grad():
        steps = [net(x[:, :5], cache)] + [net(x[:, i : i + 1], cache) for i in range(5, 16)]
        # Logits reach about 10; float32 rounding of the cached (one query) and the full attention
        # kernels differs by up to about 2e-5 on some CPUs, a wrong cache by far more.
        torch.testing.assert_close(torch.cat(steps, dim=1), net(x), rtol=1e-4, atol=1e-4)
        assert cache[0].length == 16
        with pytest.raises(ValueError, match=r"17 tokens .* block_size \(16\)"):
            net(x[:, :1], cache)


@pytest.mark.parametrize("prompt_length", [1, 7, 16, 23])  # short, to the brim of block_size (16), past it
def test_greedy_with_kv_cache_equals_the_full_forward_past_block_size(prompt_length: int) -> None:
    net = random_net(prompt_length)
    prompt = torch.randint(0, 257, (prompt_length,), generator=torch.Generator().manual_seed(1)).tolist()
    cached = list(islice(net.sample(prompt, temperature=0), 40))
    assert cached == uncached_tokens(net, prompt, 40)
    assert len(set(cached)) > 1  # not a single token repeated: the check has something to compare


def test_seeded_sampling_with_kv_cache_equals_the_full_forward() -> None:
    net = random_net()
    prompt = [1, 2, 3]

    def sampled(seed: int, temperature: float = 1.0, top_k: int | None = None) -> list[int]:
        return list(islice(net.sample(prompt, temperature, top_k, torch.Generator().manual_seed(seed)), 30))

    for temperature, top_k in [(1.0, None), (0.7, 5), (2.0, 1)]:
        reference = uncached_tokens(net, prompt, 30, temperature, top_k, torch.Generator().manual_seed(0))
        assert sampled(0, temperature, top_k) == reference
    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)
    assert sampled(0, top_k=1) == uncached_tokens(net, prompt, 30)  # top-1 is greedy at any temperature

    context = list(prompt)
    with torch.no_grad():
        for token in sampled(2, temperature=1.5, top_k=3):
            logits = net(torch.tensor([context[-16:]]))[0, -1]
            assert token in torch.topk(logits, 3).indices.tolist()
            context.append(token)


def test_stream_holds_back_partial_characters_and_stops_at_end_of_text(splits: Splits) -> None:
    model = GPT.fit(tiny(), splits, seed=0)[0]
    euro, eot = list("€".encode()), model.tokenizer.eot_id
    model.network.sample = lambda *args: iter([ord("a"), 0xC3, 0xA9, *euro, eot, ord("z")])  # type: ignore[method-assign]
    assert list(model.stream("", max_new_tokens=10)) == ["a", "", "é", "", "", "€", ""]
    # The last token flushes an incomplete character, as the whole continuation decodes it.
    assert list(model.stream("", max_new_tokens=2)) == ["a", "\ufffd"]
    assert model.generate("", max_new_tokens=4) == "aé\ufffd"


def test_encoder_saves_and_loads_the_same_tokenizer(splits: Splits, tmp_path: Path) -> None:
    config = tiny(tokenizer="bpe", vocab_size=300)
    encoder = GPT.fit_encoder(config, splits)
    encoder.save(tmp_path)
    loaded = GPT.load_encoder(config, tmp_path)
    first, again = encoder.encode(splits.test)["tokens"], loaded.encode(splits.test)["tokens"]
    assert [row.tolist() for row in first] == [row.tolist() for row in again]
