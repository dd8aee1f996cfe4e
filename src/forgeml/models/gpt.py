"""A decoder-only transformer trained from scratch, nanoGPT style.

Read top to bottom: the config, the network (attention, MLP, block, model), the two tokenizers
(raw UTF-8 bytes, or a byte-level BPE trained on the training split), then the family that
turns text rows into next-token batches and saves everything as JSON + safetensors.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, model_validator
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from torch.nn import functional as F

from forgeml.errors import DataError, ForgeError
from forgeml.models.inputs import TextInputs
from forgeml.models.registry import MODELS, Batch, BlockLayout, Encoder, Splits, spread
from forgeml.models.sampling import evaluating, next_token, text_pieces
from forgeml.section import Section
from forgeml.tasks import LANGUAGE_MODELLING

EOT = "<|endoftext|>"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "forgeml_config.json"  # the GPTConfig; config.json is transformers' (GPT-2 layout)
TOKENIZER_FILE = "tokenizer.json"


class GPTConfig(Section):
    """A small GPT: depth, width, context length and tokenizer."""

    name: Literal["gpt"]
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_embd: PositiveInt = Field(128, description="model width; a multiple of n_head")
    block_size: PositiveInt = Field(128, description="context length in tokens")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    bias: bool = Field(True, description="biases in Linear and LayerNorm layers")
    tokenizer: Literal["byte", "bpe"] = Field("byte", description="byte: UTF-8 bytes; bpe: trained on train")
    vocab_size: Annotated[int, Field(ge=260)] = Field(2048, description="bpe only: vocabulary to train")

    @model_validator(mode="after")
    def _check_heads(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


# ---------------------------------------------------------------- network


@dataclass
class KVCache:
    """One attention layer's keys and values of the tokens seen so far, in tensors preallocated to
    block_size positions, so that sampling feeds each new token alone instead of the whole context."""

    keys: torch.Tensor  # (batch, heads, block_size, head_dim)
    values: torch.Tensor
    length: int = 0  # tokens stored, and so the position of the next one

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values after the cached ones; all of them so far."""
        end = self.length + k.size(2)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # Separate q, k, v (not one fused matrix) so tensor parallelism can shard each by heads.
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Heads are counted from the width, not stored: column-sharded projections hold fewer heads.
        q, k, v = (
            proj(x).view(B, T, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = cache.append(k, v)
            # The new tokens are the last T keys: each sees every cached token and the new ones up to itself.
            # A prefill (T == S) runs as plain is_causal attention; a single new token sees all, unmasked.
            mask = None
            if T > 1:
                # Imported here: its module loads torch's compiler (a second of every start-up).
                from torch.nn.attention.bias import causal_lower_right

                mask = causal_lower_right(T, k.size(2))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))

    def new_cache(self, batch: int, length: int, like: torch.Tensor) -> KVCache:
        """Empty keys and values of ``like``'s dtype and device (the projections' own weights may be
        packed int8 ones, which are not tensors)."""
        shape = (batch, self.k_proj.out_features // self.head_dim, length, self.head_dim)
        return KVCache(like.new_empty(shape), like.new_empty(shape))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPTNetwork(nn.Module):
    def __init__(self, config: GPTConfig, vocab_size: int) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and un-embeds

        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream so its variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Next-token logits for every position. With ``cache`` (one per block, from ``new_cache``), the
        ids continue the cached tokens: their positions start after them, and their keys and values are
        added to the cache."""
        start = cache[0].length if cache else 0
        end = start + input_ids.size(1)
        if self.block_size < end:
            raise ValueError(f"sequence of {end} tokens is longer than block_size ({self.block_size})")
        pos = torch.arange(start, end, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache else None)
        return self.lm_head(self.ln_f(x))

    def new_cache(self, batch: int = 1) -> list[KVCache]:
        """An empty KV cache, one per block, for ``batch`` sequences of up to block_size tokens."""
        return [block.attn.new_cache(batch, self.block_size, self.wte.weight) for block in self.blocks]

    @torch.no_grad()
    def sample(
        self,
        ids: Sequence[int],
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Tokens following ``ids``, sampled one at a time, endlessly: the caller stops (end-of-text is
        yielded like any token). Run it in eval mode, or dropout makes it random.

        The prompt is prefilled in one forward, then each step feeds only the newest token. The
        positions are learned up to block_size, so a longer context slides: the window drops its first
        token and every position shifts, which leaves no cached key valid. From then on each step
        re-prefills the last block_size tokens, exactly what a forward of the cropped context computes."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        device = self.wte.weight.device
        context = list(ids)
        cache: list[KVCache] = []
        while True:
            if cache and cache[0].length < self.block_size:
                feed = context[-1:]
            else:
                cache, feed = self.new_cache(), context[-self.block_size :]
            logits = self(torch.tensor([feed], device=device), cache)[0, -1]
            token = next_token(logits, temperature, top_k, generator)
            context.append(token)
            yield token

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT, non-embedding leaves out only the position embeddings,
        since the token embedding doubles as the output layer."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        return n - self.wpe.weight.numel() if non_embedding else n


# ---------------------------------------------------------------- tokenizers


def join_documents(docs: Sequence[np.ndarray], eot_id: int) -> np.ndarray:
    """One int64 token stream with ``eot_id`` between documents."""
    stream = np.full(sum(len(d) for d in docs) + max(len(docs) - 1, 0), eot_id, dtype=np.int64)
    start = 0
    for doc in docs:
        stream[start : start + len(doc)] = doc
        start += len(doc) + 1
    return stream


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) and an end-of-text id, 256."""

    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Sampled bytes need not be valid UTF-8: undecodable ones become U+FFFD.
        # End-of-text reads as "<|endoftext|>", as the BPE tokenizer decodes it.
        docs: list[str] = []
        doc = bytearray()
        for i in ids:
            if i == self.eot_id:
                docs.append(doc.decode("utf-8", errors="replace"))
                doc = bytearray()
            else:
                doc.append(i)
        docs.append(doc.decode("utf-8", errors="replace"))
        return EOT.join(docs)

    def encode_stream(self, texts: Sequence[str]) -> np.ndarray:
        """All texts as one int64 stream, end-of-text between documents."""
        return join_documents([np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts], self.eot_id)


class BPETokenizer:
    """A byte-level BPE (GPT-2 style) from the ``tokenizers`` library."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # A literal "<|endoftext|>" in the data is text, not a document boundary (not saved in the JSON).
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eot_id: int = tokenizer.token_to_id(EOT)
        self.vocab_size: int = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, seen or not
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer, length=len(texts))
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_stream(self, texts: Sequence[str]) -> np.ndarray:
        """All texts as one int64 stream, end-of-text between documents."""
        encodings = self.tokenizer.encode_batch_fast(list(texts))  # in Rust, on all cores
        return join_documents([np.asarray(e.ids, dtype=np.int64) for e in encodings], self.eot_id)


TextTokenizer = ByteTokenizer | BPETokenizer


# ---------------------------------------------------------------- the GPT-2 layout

# The network is GPT-2's but for separate q, k, v projections (GPT-2 fuses them in one Conv1D, whose
# weight is stored transposed), exact GELU (GPT-2's config names it "gelu") and optional biases
# (GPT-2's are zeros then). So the export is a transformers GPT-2 checkpoint, which
# AutoModelForCausalLM, vLLM and TGI load as they are.
PROJECTIONS = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_config(config: GPTConfig, vocab_size: int, eot_id: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        activation_function="gelu",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def to_gpt2(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """The network's weights (without the tied head) under GPT-2's names and shapes."""
    like = state["wte.weight"]

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, like.new_zeros(size))

    out = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"]}
    for norm in ("ln_f",):
        out[f"transformer.{norm}.weight"] = state[f"{norm}.weight"]
        out[f"transformer.{norm}.bias"] = bias(f"{norm}.bias", like.size(1))
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            out[f"{theirs}.{norm}.weight"] = state[f"{ours}.{norm}.weight"]
            out[f"{theirs}.{norm}.bias"] = bias(f"{ours}.{norm}.bias", like.size(1))
        qkv = [f"{ours}.attn.{p}_proj" for p in "qkv"]
        out[f"{theirs}.attn.c_attn.weight"] = torch.cat([state[f"{n}.weight"] for n in qkv]).T
        out[f"{theirs}.attn.c_attn.bias"] = torch.cat([bias(f"{n}.bias", state[f"{n}.weight"].size(0)) for n in qkv])
        for name in PROJECTIONS:
            weight = state[f"{ours}.{name}.weight"]
            out[f"{theirs}.{name}.weight"] = weight.T
            out[f"{theirs}.{name}.bias"] = bias(f"{ours}.{name}.bias", weight.size(0))
    return {k: v.contiguous() for k, v in out.items()}


def from_gpt2(state: dict[str, torch.Tensor], n_layer: int, with_bias: bool) -> dict[str, torch.Tensor]:
    """``to_gpt2``'s inverse: GPT-2's weights as the network's (biases only where it has them)."""
    out = {"wte.weight": state["transformer.wte.weight"], "wpe.weight": state["transformer.wpe.weight"]}

    def copy_norm(theirs: str, ours: str) -> None:
        out[f"{ours}.weight"] = state[f"{theirs}.weight"]
        if with_bias:
            out[f"{ours}.bias"] = state[f"{theirs}.bias"]

    copy_norm("transformer.ln_f", "ln_f")
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        copy_norm(f"{theirs}.ln_1", f"{ours}.ln_1")
        copy_norm(f"{theirs}.ln_2", f"{ours}.ln_2")
        weights = state[f"{theirs}.attn.c_attn.weight"].T.chunk(3)
        biases = state[f"{theirs}.attn.c_attn.bias"].chunk(3)
        for p, weight, b in zip("qkv", weights, biases, strict=True):
            out[f"{ours}.attn.{p}_proj.weight"] = weight
            if with_bias:
                out[f"{ours}.attn.{p}_proj.bias"] = b
        for name in PROJECTIONS:
            out[f"{ours}.{name}.weight"] = state[f"{theirs}.{name}.weight"].T
            if with_bias:
                out[f"{ours}.{name}.bias"] = state[f"{theirs}.{name}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def transformers_tokenizer(tokenizer: TextTokenizer) -> Any:
    """The tokenizer as transformers' PreTrainedTokenizerFast: the trained BPE as it is; the byte
    tokenizer as a byte-level BPE without merges, whose 256 byte tokens have the byte values as ids
    and end-of-text 256, as ByteTokenizer's."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if isinstance(tokenizer, BPETokenizer):
        inner = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    else:  # GPT-2's byte-level alphabet: byte b is written as the character bytes_to_unicode()[b]
        inner = Tokenizer(models.BPE(vocab={char: byte for byte, char in bytes_to_unicode().items()}, merges=[]))
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        inner.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=EOT, bos_token=EOT)


# ---------------------------------------------------------------- family


@dataclass
class ChunkEncoder(Encoder):
    """Documents joined by end-of-text into one token stream, cut into rows of block_size + 1 tokens
    (inputs and their next tokens); the tail shorter than a row is dropped."""

    COLUMN: ClassVar[str] = "tokens"
    tokenizer: TextTokenizer
    text_column: str
    block_size: int

    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        stream = self.tokenizer.encode_stream(frame[self.text_column].astype(str).tolist())
        size = self.block_size + 1
        n = len(stream) // size
        if n == 0:
            raise DataError(
                f"{len(frame)} rows encode to {len(stream)} tokens, fewer than one chunk of "
                f"block_size + 1 = {size}; lower model.block_size or use more rows"
            )
        chunks = stream[: n * size].astype(np.int32).reshape(n, size)
        return pd.DataFrame({self.COLUMN: list(chunks)})

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.tokenizer, BPETokenizer):
            self.tokenizer.save(folder / TOKENIZER_FILE)
        (folder / "encoder.json").write_text(json.dumps({"text_column": self.text_column}))


@MODELS.register("gpt", GPTConfig)
class GPT(TextInputs):
    name = "gpt"
    task = LANGUAGE_MODELLING
    encoding_fields = ("tokenizer", "vocab_size", "block_size")
    generates = True
    formats = ("text",)
    explained = False  # its tokenizers are not transformers', whose offsets explanations read

    def __init__(self, config: GPTConfig, tokenizer: TextTokenizer, network: GPTNetwork) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.network = network
        self.labels = []

    @classmethod
    def fit_encoder(cls, config: GPTConfig, splits: Splits) -> ChunkEncoder:
        if splits.text_column is None:
            raise DataError("the gpt model needs a text column: set data.text_column")
        tokenizer: TextTokenizer = ByteTokenizer()
        if config.tokenizer == "bpe":
            tokenizer = BPETokenizer.train(splits.train[splits.text_column].astype(str).tolist(), config.vocab_size)
        return ChunkEncoder(tokenizer, splits.text_column, config.block_size)

    @classmethod
    def load_encoder(cls, config: GPTConfig, folder: Path) -> ChunkEncoder:
        saved = json.loads((folder / "encoder.json").read_text())
        tokenizer: TextTokenizer = ByteTokenizer()
        if config.tokenizer == "bpe":
            tokenizer = BPETokenizer.load(folder / TOKENIZER_FILE)
        return ChunkEncoder(tokenizer, saved["text_column"], config.block_size)

    @classmethod
    def create(cls, config: GPTConfig, encoder: ChunkEncoder, labels: list[str], seed: int) -> GPT:
        torch.manual_seed(seed)
        return cls(config, encoder.tokenizer, GPTNetwork(config, encoder.tokenizer.vocab_size))

    def items(self, table: pa.Table) -> torch.Tensor:
        # One (rows, block_size + 1) tensor: indexable like a list, without an object per row.
        chunks = np.stack(table.column(ChunkEncoder.COLUMN).to_numpy(zero_copy_only=False)).astype(np.int64)
        return torch.from_numpy(chunks)

    def collate(self, items: list[torch.Tensor], augment: Any | None, generator: torch.Generator | None) -> Batch:
        x = torch.stack(items)
        targets = x[:, 1:].contiguous()
        return Batch(
            inputs={"input_ids": x[:, :-1].contiguous()},
            targets=targets,
            size=x.size(0),
            tokens=targets.numel(),
        )

    def prompt_of(self, item: torch.Tensor) -> list[int]:
        """The first half of a chunk: the second half is what it would continue with."""
        return item[: len(item) // 2].tolist()

    def generation_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids[:, -self.config.block_size :]}

    def gpt2_layout(self) -> bool:
        """Whether every block has the config's full width (structured pruning cuts heads and
        channels, which GPT-2's config cannot say)."""
        width = self.config.n_embd
        return all(
            block.attn.q_proj.out_features == width and block.mlp.c_fc.out_features == 4 * width
            for block in self.network.blocks
        )

    def save(self, directory: Path) -> None:
        """A transformers GPT-2 checkpoint (config.json, model.safetensors, tokenizer, generation
        config) with the GPTConfig beside it; a network cut narrower than GPT-2's layout allows is
        saved under its own names."""
        from transformers import GenerationConfig

        directory.mkdir(parents=True, exist_ok=True)
        # lm_head.weight is wte.weight; safetensors refuses shared tensors, so store it once.
        state = {k: v.contiguous() for k, v in self.network.state_dict().items() if k != "lm_head.weight"}
        layout = "gpt2" if self.gpt2_layout() else "forgeml"
        eot = self.tokenizer.eot_id
        if layout == "gpt2":
            config = gpt2_config(self.config, self.tokenizer.vocab_size, eot)
            config.save_pretrained(directory)
            GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot).save_pretrained(directory)
            state = to_gpt2(state, self.config.n_layer)
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        transformers_tokenizer(self.tokenizer).save_pretrained(directory)
        saved = {
            "config": self.config.model_dump(mode="json"),
            "vocab_size": self.tokenizer.vocab_size,
            "layout": layout,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
        self.write_meta(directory)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> GPT:
        """What ``save`` wrote; ``weights`` are under the network's own names."""
        saved = json.loads((directory / CONFIG_FILE).read_text())
        config = GPTConfig.model_validate(saved["config"])
        tokenizer: TextTokenizer = ByteTokenizer()
        if config.tokenizer == "bpe":
            tokenizer = BPETokenizer.load(directory / TOKENIZER_FILE)
        if tokenizer.vocab_size != saved["vocab_size"]:
            raise ForgeError(
                f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                f"was saved with {saved['vocab_size']}"
            )
        network = GPTNetwork(config, tokenizer.vocab_size)
        if weights is None:
            weights = load_file(str(directory / WEIGHTS_FILE))
            if saved["layout"] == "gpt2":
                weights = from_gpt2(weights, config.n_layer, config.bias)
        missing, unexpected = network.load_state_dict(weights, strict=False)
        if weights and (missing != ["lm_head.weight"] or unexpected):
            raise ForgeError(f"{directory / WEIGHTS_FILE}: missing {missing}, unexpected {unexpected}")
        network.eval()
        return cls(config, tokenizer, network)

    def blocks(self) -> nn.ModuleList:
        return self.network.blocks

    def input_embeddings(self) -> nn.Module:
        return self.network.wte

    def student(self, layers: int | None, width: float) -> GPT:
        """The teacher's embeddings, half its blocks (or ``layers``), evenly spaced with the top one
        kept, its final LayerNorm and (tied) head; everything trains."""
        network = copy.deepcopy(self.network)
        keep = layers or max(1, len(network.blocks) // 2)
        if keep >= len(network.blocks):
            raise ForgeError(
                f"compress.distill.student_layers: {keep} is not fewer than the teacher's {len(network.blocks)} blocks"
            )
        network.blocks = nn.ModuleList(network.blocks[i] for i in spread(len(network.blocks), keep))
        return GPT(self.config.model_copy(update={"n_layer": keep}), self.tokenizer, network)

    def block_layout(self, block: nn.Module) -> BlockLayout:
        """gpt's attention counts its heads from the projections' width, so nothing is recorded."""
        attention = block.attn
        return BlockLayout(
            attention.head_dim,
            [(attention, name) for name in ("q_proj", "k_proj", "v_proj")],
            (attention, "c_proj"),
            (block.mlp, "c_fc"),
            (block.mlp, "c_proj"),
        )

    def tensor_parallel_plan(self) -> dict[str, Any]:
        """Megatron's split: q, k, v and the first MLP layer by output columns (whole heads per
        rank), the two projections back into the residual stream by input rows; the embeddings,
        norms and the tied output layer stay replicated."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan: dict[str, Any] = {}
        for i in range(len(self.network.blocks)):
            block = f"blocks.{i}"
            for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc"):
                plan[f"{block}.{name}"] = ColwiseParallel()
            for name in ("attn.c_proj", "mlp.c_proj"):
                plan[f"{block}.{name}"] = RowwiseParallel()
        return plan

    @classmethod
    def tensor_parallel_sizes(cls, config: GPTConfig) -> dict[str, int]:
        """Whole heads per rank, and the MLP's hidden columns (4 x n_embd) split evenly."""
        return {"model.n_head": config.n_head, "the MLP width (4 x model.n_embd)": 4 * config.n_embd}

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention's 12*L*H*Q*T (nanoGPT, PaLM)."""
        c = self.config
        n = self.network.num_params(non_embedding=True)
        return float(6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """The continuation of ``prompt`` as it is sampled: one piece of text per sampled token, up to
        ``max_new_tokens`` of them, stopping at end-of-text. A piece holds the characters its token
        completes, so it is empty while a character's bytes are still coming; the pieces join to the
        whole continuation. ``temperature`` 0 picks the most likely token."""
        eot = self.tokenizer.eot_id
        # An empty prompt starts a new document, which in training follows end-of-text.
        ids = self.tokenizer.encode(prompt) or [eot]
        with evaluating(self.network):
            tokens = self.network.sample(ids, temperature, top_k, generator)
            yield from text_pieces(tokens, self.tokenizer.decode, {eot}, max_new_tokens)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """The continuation of ``prompt`` (without the prompt), up to ``max_new_tokens`` tokens;
        it stops early at end-of-text. ``temperature`` 0 picks the most likely token."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, generator))
