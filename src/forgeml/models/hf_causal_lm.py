"""``hf-causal-lm``: fine-tune any Hugging Face causal language model, or pretrain a fresh one of any
transformers architecture built from a config.

The data is documents (``data.format: text``, continued pretraining), prompts with completions, or
conversations rendered with a chat template (``forgeml.models.sft`` says which tokens train). The
export is a plain transformers checkpoint (LoRA merged in) with its tokenizer, the chat template it
was trained with, and a ``generation_config.json`` whose end-of-sequence ids include the template's
end-of-turn token, so ``AutoModelForCausalLM`` + ``apply_chat_template`` + ``generate`` stop where
forgeml does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field, model_validator
from torch import nn

from forgeml.data import examples
from forgeml.errors import DataError, ForgeError, RowError
from forgeml.models.checkpoints import causal_lm_config, checkpoint_source, load_tokenizer
from forgeml.models.hf_network import (
    Fraction,
    HFNetwork,
    LoraConfig,
    dropout_overrides,
    fewer_layers,
    freeze,
    read_network,
    with_lora,
)
from forgeml.models.inputs import TextInputs
from forgeml.models.registry import META_FILE, MODELS, ROW_ID, Batch, Encoder, Splits
from forgeml.models.sampling import evaluating, next_token, text_pieces
from forgeml.models.sft import IGNORE, ChatRenderer, Example, chunks, completion_rendered, pack, segments, tokenize
from forgeml.section import Section
from forgeml.tasks import LANGUAGE_MODELLING

FORMATS = ("text", "prompt_completion", "chat")
ENCODER_FILE = "encoder.json"
CONFIG_FILE = "forgeml_config.json"
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
SHOWN_CANDIDATES = 50  # training rows looked through for one that fits in max_length, to show


class HFCausalLMConfig(Section):
    name: Literal["hf-causal-lm"]
    pretrained: str | None = Field(
        None, description="a checkpoint folder, or a hub id already in the local Hugging Face cache"
    )
    architecture: str | None = Field(
        None, description="instead of pretrained: a transformers model type (llama, qwen2, gpt2, ...) built fresh"
    )
    config: dict[str, Any] = Field({}, description="architecture only: its config fields (hidden_size, ...)")
    tokenizer: str | None = Field(None, description="a tokenizer folder or hub id; default: the checkpoint's")
    max_length: Annotated[int, Field(ge=8)] = Field(512, description="tokens per sequence; longer examples are cut")
    chat_template: str | None = Field(
        None, description="a Jinja chat template, or a file holding one; default: the tokenizer's"
    )
    train_on_prompt: bool = Field(False, description="chat and prompt_completion: train on every token")
    train_on_turns: Literal["all", "last"] = Field("all", description="chat: train every assistant reply, or the last")
    freeze_layers: Annotated[int, Field(ge=0)] = Field(0, description="freeze the embeddings and this many blocks")
    dropout: Fraction | None = Field(None, description="every dropout of the checkpoint; default: its config's")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="the attention kernel (transformers' attn_implementation)"
    )
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> HFCausalLMConfig:
        if (self.pretrained is None) == (self.architecture is None):
            raise ValueError("give either pretrained (a checkpoint to fine-tune) or architecture (a network to build)")
        if self.config and self.architecture is None:
            raise ValueError("config applies to a network built from an architecture; remove it or set architecture")
        if self.architecture is not None and self.tokenizer is None:
            raise ValueError("a network built from an architecture needs a tokenizer: set tokenizer to its folder")
        return self

    def tokenizer_source(self) -> tuple[str, str]:
        """Where the tokenizer is, and the recipe field that says so."""
        if self.tokenizer is not None:
            source = checkpoint_source(self.tokenizer, "model.tokenizer", "tokenizer_config.json")
            return source, f"model.tokenizer: {self.tokenizer}"
        return checkpoint_source(self.pretrained), f"model.pretrained: {self.pretrained}"


def read_template(config: HFCausalLMConfig, tokenizer: Any) -> str:
    """The chat template: model.chat_template (the template itself, or its file), else the tokenizer's own."""
    if config.chat_template is not None:
        if "{{" in config.chat_template or "{%" in config.chat_template:
            return config.chat_template
        path = Path(config.chat_template).expanduser()
        if not path.is_file():
            raise ForgeError(f"model.chat_template: there is no file {path}; point it at a Jinja chat template")
        return path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        _, named = config.tokenizer_source()
        raise ForgeError(
            f"{named}: its tokenizer has no chat template, which data.format: chat needs; set model.chat_template "
            "to a Jinja template file, or use a checkpoint whose tokenizer has one"
        )
    return tokenizer.chat_template


@dataclass
class CausalEncoder(Encoder):
    """Examples of one format as token ids and labels (``forgeml.models.sft``), packed or not."""

    tokenizer: Any
    format: str
    text_column: str
    max_length: int
    train_on_prompt: bool = False
    train_on_turns: str = "all"
    packed: bool = False
    end_of_turn: list[str] = field(default_factory=list)  # chat: the template's end-of-turn tokens
    too_long: int = field(default=0, compare=False)  # examples left out so far: longer than max_length

    def renderer(self) -> ChatRenderer:
        return ChatRenderer(self.tokenizer, self.tokenizer.chat_template, self.train_on_prompt, self.train_on_turns)

    def examples(self, frame: pd.DataFrame) -> list[Example]:
        texts = frame[self.text_column].astype(str).tolist()
        if self.format == "text":
            docs = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            rows = chunks((np.asarray(d, dtype=np.int32) for d in docs), self.tokenizer.eos_token_id, self.max_length)
            if not rows:
                raise DataError(
                    f"{len(frame)} documents encode to fewer tokens than one sequence of model.max_length = "
                    f"{self.max_length}; lower model.max_length or use more rows"
                )
            return rows
        if self.format == "chat":
            render = self.renderer()
            rendered = [render(examples.messages(t)) for t in texts]
            return self._fitting(frame, tokenize(self.tokenizer, rendered, add_special_tokens=False))
        eos = self.tokenizer.eos_token
        rendered = [completion_rendered(*examples.prompt_completion(t), eos) for t in texts]
        return self._fitting(frame, tokenize(self.tokenizer, rendered, add_special_tokens=True))

    def _fitting(self, frame: pd.DataFrame, encoded: list[Example]) -> list[Example]:
        """The examples that fit in model.max_length tokens (the others are counted in ``too_long``,
        as Axolotl drops them: a cut one would train on half a reply and never on its end). An example
        with no trained token at all is a mistake in the data, named."""
        for position, example in enumerate(encoded):
            if example.trained_targets() == 0:
                row = int(frame[ROW_ID].iloc[position]) if ROW_ID in frame else position
                raise RowError(row, "no token of it is trained (it has no reply); give it one, or drop the row")
        fitting = [e for e in encoded if len(e.input_ids) <= self.max_length]
        self.too_long += len(encoded) - len(fitting)
        return fitting

    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        encoded = self.examples(frame)
        if self.packed:
            rows = pack(encoded, self.max_length)
            return pd.DataFrame(
                {
                    "input_ids": [r.input_ids for r in rows],
                    "labels": [r.labels for r in rows],
                    "position_ids": [r.position_ids for r in rows],
                }
            )
        return pd.DataFrame({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]})

    def packing(self) -> CausalEncoder:
        return replace(self, packed=True)

    def shown(self, frame: pd.DataFrame) -> list[tuple[str, bool]] | None:
        """The first example that fits, as it trains: its text in runs, each with whether it is trained."""
        counted = self.too_long
        fitting = self.examples(frame.head(SHOWN_CANDIDATES))
        self.too_long = counted  # shown, not stored: these count as nothing left out
        return segments(self.tokenizer, fitting[0].input_ids, fitting[0].labels) if fitting else None

    def counts(self) -> dict[str, int]:
        return {"too_long": self.too_long}

    def add_counts(self, counts: dict[str, int]) -> None:
        self.too_long += counts.get("too_long", 0)

    def notes(self) -> list[str]:
        if not self.too_long:
            return []
        return [f"left out {self.too_long} examples longer than model.max_length ({self.max_length} tokens)"]

    def settings(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "text_column": self.text_column,
            "train_on_prompt": self.train_on_prompt,
            "train_on_turns": self.train_on_turns,
            "packed": self.packed,
            "end_of_turn": self.end_of_turn,
        }

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        (folder / ENCODER_FILE).write_text(json.dumps(self.settings(), indent=2))

    @classmethod
    def read(cls, folder: Path, max_length: int) -> CausalEncoder:
        settings = json.loads((folder / ENCODER_FILE).read_text())
        return cls(load_tokenizer(str(folder), str(folder)), max_length=max_length, **settings)

    def stop_ids(self) -> list[int]:
        """End-of-sequence and end-of-turn ids: generation stops at any of them."""
        ids = [self.tokenizer.eos_token_id, *self.tokenizer.convert_tokens_to_ids(self.end_of_turn)]
        return sorted({i for i in ids if i is not None})


def fit_encoder(config: HFCausalLMConfig, splits: Splits) -> CausalEncoder:
    source, named = config.tokenizer_source()
    tokenizer = load_tokenizer(source, named)
    if not getattr(tokenizer, "is_fast", True):
        raise ForgeError(f"{named}: forgeml needs a fast (Rust) tokenizer, for the offsets of each token")
    fmt = splits.format or "text"
    if fmt not in FORMATS:
        raise ForgeError(f"data.format: hf-causal-lm reads {', '.join(FORMATS)}, not {fmt}")
    if tokenizer.eos_token is None:
        raise ForgeError(f"{named}: its tokenizer has no end-of-sequence token, which ends every trained example")
    end_of_turn: list[str] = []
    if fmt == "chat":
        tokenizer.chat_template = read_template(config, tokenizer)
        probe = ChatRenderer(tokenizer, tokenizer.chat_template, False, "all")
        probe(PROBE)  # finds the end-of-turn token, or refuses a template that has none
        end_of_turn = sorted(probe.end_of_turn)
    return CausalEncoder(
        tokenizer,
        fmt,
        splits.text_column,
        config.max_length,
        config.train_on_prompt,
        config.train_on_turns,
        end_of_turn=end_of_turn,
    )


@MODELS.register("hf-causal-lm", HFCausalLMConfig)
class HFCausalLM(HFNetwork, TextInputs):
    name = "hf-causal-lm"
    task = LANGUAGE_MODELLING
    encoding_fields = ("pretrained", "tokenizer", "max_length", "chat_template", "train_on_prompt", "train_on_turns")
    generates = True
    packs = True
    formats = FORMATS

    def __init__(self, config: HFCausalLMConfig, network: nn.Module, tokenizer: Any, stop_ids: list[int]) -> None:
        self.config = config
        self.network = network
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.labels = []

    @classmethod
    def check_config(cls, config: HFCausalLMConfig) -> None:
        if config.pretrained is not None:
            checkpoint_source(config.pretrained)
        config.tokenizer_source()

    @classmethod
    def fit_encoder(cls, config: HFCausalLMConfig, splits: Splits) -> CausalEncoder:
        return fit_encoder(config, splits)

    @classmethod
    def load_encoder(cls, config: HFCausalLMConfig, folder: Path) -> CausalEncoder:
        return CausalEncoder.read(folder, config.max_length)

    @classmethod
    def checkpoint_config(cls, config: HFCausalLMConfig) -> Any:
        if config.pretrained is not None:
            return causal_lm_config(checkpoint_source(config.pretrained), config.pretrained)
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(config.architecture, **config.config)
        except (ValueError, TypeError) as exc:
            raise ForgeError(f"model.architecture: {config.architecture}: {exc}") from None

    @classmethod
    def create(cls, config: HFCausalLMConfig, encoder: CausalEncoder, labels: list[str], seed: int) -> HFCausalLM:
        from transformers import AutoModelForCausalLM

        tokenizer = encoder.tokenizer
        kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": config.attention}
        torch.manual_seed(seed)
        if config.pretrained is not None:
            checkpoint = cls.checkpoint_config(config)
            overrides = dropout_overrides(checkpoint, config.dropout)
            # No KV cache in training: it would grow every forward (twice where checkpointing recomputes).
            overrides.update({"use_cache": False} if hasattr(checkpoint, "use_cache") else {})
            network = AutoModelForCausalLM.from_pretrained(checkpoint_source(config.pretrained), **kwargs, **overrides)
        else:
            ids = {
                "vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            checkpoint = cls.checkpoint_config(config.model_copy(update={"config": {**ids, **config.config}}))
            checkpoint.update(dropout_overrides(checkpoint, config.dropout))
            if hasattr(checkpoint, "use_cache"):
                checkpoint.use_cache = False
            network = AutoModelForCausalLM.from_config(checkpoint, **kwargs)
        context = context_length(network.config)
        if context is not None and config.max_length > context:
            raise ForgeError(
                f"model.max_length: {config.max_length} is more than the {context} positions the network reads; "
                f"use at most {context}"
            )
        if len(tokenizer) > network.get_input_embeddings().num_embeddings:
            network.resize_token_embeddings(len(tokenizer))  # tokens the tokenizer added (a template's markers)
        freeze(network, config.freeze_layers)
        if encoder.packed:
            check_document_isolation(network, len(tokenizer))
        network = with_lora(network, config.lora, "CAUSAL_LM")
        return cls(config, network, tokenizer, encoder.stop_ids())

    # ------------------------------------------------------------ batches

    def items(self, table: pa.Table) -> Sequence[Any]:
        columns = [c for c in ("input_ids", "labels", "position_ids") if c in table.column_names]
        values = [table.column(c).to_pylist() for c in columns]
        return list(zip(*values, strict=True))

    def collate(self, items: list[Any], augment: Any | None, generator: torch.Generator | None) -> Batch:
        """Right-padded rows; the targets are the labels shifted by one (-100 past the end, and, in
        packed rows, at the last token of each document, which predicts nothing)."""
        width = max(len(item[0]) for item in items)
        n = len(items)
        input_ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        lengths = torch.tensor([len(item[0]) for item in items])
        for i, item in enumerate(items):
            input_ids[i, : len(item[0])] = torch.tensor(item[0])
            labels[i, : len(item[1])] = torch.tensor(item[1])
        targets = torch.cat([labels[:, 1:], torch.full((n, 1), IGNORE, dtype=torch.long)], dim=1)
        if len(items[0]) == 3:  # packed: positions restart at each document, the padding is one more
            positions = torch.stack(
                [torch.cat([torch.tensor(item[2]), torch.arange(width - len(item[2]))]) for item in items]
            )
            starts = torch.cat([positions[:, 1:] == 0, torch.ones((n, 1), dtype=torch.bool)], dim=1)
            targets = targets.masked_fill(starts, IGNORE)
            inputs = {"input_ids": input_ids, "position_ids": positions}
        else:
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
            inputs = {"input_ids": input_ids, "attention_mask": mask}
        return Batch(inputs, targets, n, tokens=int(lengths.sum()))

    def prompt_of(self, item: Any) -> list[int]:
        """The tokens before the first trained one (of the first example, in a packed row); for
        documents, which train everywhere, the first half."""
        ids, labels = item[0], item[1]
        end = len(ids) if len(item) < 3 else next((i for i, p in enumerate(item[2]) if i and p == 0), len(ids))
        first = next((i for i in range(end) if labels[i] != IGNORE), end)
        return list(ids[: first if 0 < first < end else end // 2])

    def generation_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def split_inputs(self, frame: pd.DataFrame, splits: Splits) -> list[str]:
        """The prompts of a prepared split's rows, as text (a tokenizer's BOS left for it to add)."""
        columns = [c for c in ("input_ids", "labels", "position_ids") if c in frame.columns]
        prompts = [self.prompt_of(item) for item in zip(*(frame[c] for c in columns), strict=True)]
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]
        return [self.tokenizer.decode(p[1:] if adds_bos and p[:1] == [bos] else p) for p in prompts]

    # ------------------------------------------------------------ files

    def save(self, directory: Path) -> None:
        from transformers import GenerationConfig

        directory.mkdir(parents=True, exist_ok=True)
        network = self.merged()
        network.config.use_cache = True  # what a user's generate() wants, in the saved config only
        try:
            network.save_pretrained(directory, safe_serialization=True)
        finally:
            network.config.use_cache = False
        self.tokenizer.save_pretrained(directory)
        generation = GenerationConfig.from_model_config(network.config)
        generation.eos_token_id = self.stop_ids
        generation.pad_token_id = self.tokenizer.pad_token_id
        generation.save_pretrained(directory)
        config = self.config.model_dump(mode="json", exclude={"lora"})
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        self.write_meta(directory, stop_ids=self.stop_ids)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> HFCausalLM:
        from transformers import AutoModelForCausalLM

        config = HFCausalLMConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        meta = json.loads((directory / META_FILE).read_text())
        network = read_network(directory, weights, AutoModelForCausalLM)
        # Batches are scored without a KV cache, as in training: where one is made, transformers
        # no longer reads packed rows' positions as separate examples. Sampling asks for its own.
        network.config.use_cache = False
        return cls(config, network, load_tokenizer(str(directory), str(directory)), meta["stop_ids"])

    # ------------------------------------------------------------ what the stages ask

    def flops_per_token(self) -> float:
        """6N for the weights outside the embeddings plus attention's 12 * layers * width * context."""
        base = self.base()
        embeddings = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Embedding))
        n = sum(p.numel() for p in base.parameters()) - embeddings
        c = base.config
        layers = getattr(c, "num_hidden_layers", None) or len(self.blocks() or ())
        width = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
        return float(6 * n + 12 * layers * width * self.config.max_length)

    def student(self, layers: int | None, width: float) -> HFCausalLM:
        """The checkpoint's own architecture with ``layers`` of its blocks (None: half), evenly
        spaced with the top one kept, the teacher's weights in them and everywhere else."""
        from transformers import AutoModelForCausalLM

        network = fewer_layers(self.merged(), layers, AutoModelForCausalLM)
        return type(self)(self.config.model_copy(update={"lora": None}), network, self.tokenizer, self.stop_ids)

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def sample(
        self, ids: list[int], temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> Iterator[int]:
        """Tokens following ``ids``, one at a time with a KV cache, until the context is full (a stop
        token is yielded like any other: the caller stops). transformers' ``generate`` would do the
        same steps, but takes no torch.Generator and streams only through a second thread."""
        from transformers import DynamicCache

        limit = context_length(self.base().config)
        if limit is not None and len(ids) >= limit:
            raise ForgeError(f"the prompt is {len(ids)} tokens, and the model reads at most {limit}; shorten it")
        device = self.input_embeddings().weight.device
        cache = DynamicCache(config=self.base().config)
        feed = torch.tensor([ids], device=device)
        length = len(ids)
        while limit is None or length < limit:
            logits = self.network(input_ids=feed, cache=cache, use_cache=True).logits[0, -1]
            token = next_token(logits.float(), temperature, top_k, generator)
            yield token
            feed, length = torch.tensor([[token]], device=device), length + 1

    def stream_ids(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """The continuation of ``ids`` as text, one piece per sampled token, stopping at a stop token."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        with evaluating(self.network):
            tokens = self.sample(ids, temperature, top_k, generator)
            yield from text_pieces(tokens, self.tokenizer.decode, set(self.stop_ids), max_new_tokens)

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt's ids as training saw a prompt: with the tokenizer's special tokens (BOS)."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return ids or [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation rendered with the trained chat template, ready for the assistant's reply."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ForgeError(
                "this model was trained without a chat template (data.format text or prompt_completion); "
                "continue a prompt instead (generate, stream)"
            )
        checked = examples.messages(examples.conversation_json(messages, "messages"))
        text = ChatRenderer(self.tokenizer, template, False, "all").render(checked, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        return self.stream_ids(self.prompt_ids(prompt), max_new_tokens, temperature, top_k, generator)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """The continuation of ``prompt``, up to ``max_new_tokens`` tokens or a stop token."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, generator))

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        return self.stream_ids(self.chat_ids(messages), max_new_tokens, temperature, top_k, generator)

    def chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """The assistant's reply to ``messages`` ({role, content} dicts), up to its end of turn."""
        return "".join(self.stream_chat(messages, max_new_tokens, temperature, top_k, generator))


def context_length(config: Any) -> int | None:
    """The positions a network reads at most, under the name its config gives them (GPT-2: n_positions)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def check_document_isolation(network: nn.Module, vocab: int) -> None:
    """Packing is only right where a document sees nothing of the one packed before it: the network
    must read per-document positions as separate documents (transformers' masks do for most
    architectures; a model with its own attention code may not). Checked on two random documents."""
    ids = torch.randint(vocab, (1, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    was_training = network.training
    network.eval()
    packed = network(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 4:]
    alone = network(input_ids=ids[:, 4:], position_ids=positions[:, 4:], use_cache=False).logits[0]
    network.train(was_training)
    if not torch.allclose(packed, alone, atol=1e-4):
        raise ForgeError(
            f"prepare.packing: the {network.config.model_type} network lets packed examples attend to each "
            "other (its attention does not read per-example positions); set prepare.packing: false"
        )
