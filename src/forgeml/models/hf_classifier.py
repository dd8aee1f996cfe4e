"""``hf-classifier``: any Hugging Face sequence-classification checkpoint, an encoder (BERT,
RoBERTa, DeBERTa, ModernBERT, ...) or a decoder used as a classifier (Llama, Qwen2, GPT-2, ...);
and ``text-classifier``, the same family with the packaged all-MiniLM-L6-v2 as its checkpoint.

Nothing here knows an architecture by name. What the stages need is read from the model itself:
its repeated blocks from ``_no_split_modules`` (or the one homogeneous ModuleList), its input
embeddings from ``get_input_embeddings()``, LoRA's default targets from the names of the
attention's projections, its tensor-parallel plan from the config's ``base_model_tp_plan``. The
export is a plain transformers checkpoint (LoRA merged in), so
``AutoModelForSequenceClassification.from_pretrained`` loads it without forgeml.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from forgeml.errors import ForgeError, NotOffered
from forgeml.models.checkpoints import PACKAGED_MINILM, checkpoint_source, classification_config, load_tokenizer
from forgeml.models.inputs import TextInputs
from forgeml.models.registry import META_FILE, MODELS, BlockLayout, Splits, is_linear, spread
from forgeml.models.tokens import TokenBatches, TokenIdEncoder
from forgeml.section import Section
from forgeml.tasks import CLASSIFICATION

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

# The attention's query and value projections, by the names architectures give them (BERT's
# query/value, Llama's q_proj/v_proj, DistilBERT's q_lin/v_lin, DeBERTa's query_proj/value_proj),
# or the fused projection where q, k and v are one layer (GPT-2's c_attn, ModernBERT's Wqkv).
QUERY_VALUE = re.compile(r"^(query|value|q_proj|v_proj|q_lin|v_lin|query_proj|value_proj|c_attn|Wqkv|qkv_proj|qkv)$")
DROPOUT = re.compile(r"(dropout|pdrop)")  # the config fields that set a dropout probability


class LoraConfig(Section):
    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Fraction = 0.05
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; default: the attention's query and value projections"
    )


class HFClassifierConfig(Section):
    name: Literal["hf-classifier"]
    pretrained: str = Field(description="a checkpoint folder, or a hub id already in the local Hugging Face cache")
    max_length: Annotated[int, Field(ge=8)] = 128
    freeze_layers: Annotated[int, Field(ge=0)] = Field(0, description="freeze the embeddings and this many blocks")
    dropout: Fraction | None = Field(None, description="every dropout of the checkpoint; default: its config's")
    lora: LoraConfig | None = None


class TextClassifierConfig(HFClassifierConfig):
    name: Literal["text-classifier"]  # type: ignore[assignment]
    pretrained: str = Field(PACKAGED_MINILM, description="default: the packaged all-MiniLM-L6-v2")
    max_length: Annotated[int, Field(ge=8, le=512)] = 128


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The transformer layers: the ModuleList of the classes the model names in ``_no_split_modules``
    (the units accelerate keeps whole on one device), else the largest ModuleList of one class."""
    named = set(getattr(model, "_no_split_modules", None) or ())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    chosen = [m for m in lists if type(m[0]).__name__ in named] or lists
    return max(chosen, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def module_path(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def embedding_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """What turns ids into the first block's input: the input embeddings' own container (BERT's
    embeddings with positions and norm) where it holds no blocks, else the embedding tables outside
    the blocks (Llama's embed_tokens, GPT-2's wte and wpe)."""
    inputs = model.get_input_embeddings()
    parent_path = module_path(model, inputs).rpartition(".")[0]
    parent = model.get_submodule(parent_path)
    if not any(module is blocks for module in parent.modules()):
        return [parent]
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]


def freeze(network: nn.Module, n_layers: int) -> None:
    """Freeze the embeddings and the first ``n_layers`` blocks."""
    if n_layers == 0:
        return
    blocks = repeated_blocks(network)
    if blocks is None:
        raise ForgeError("model.freeze_layers: this checkpoint has no repeated blocks to freeze; use 0")
    if n_layers > len(blocks):
        raise ForgeError(
            f"model.freeze_layers: {n_layers} is more than the checkpoint's {len(blocks)} blocks; use 0..{len(blocks)}"
        )
    for module in [*embedding_modules(network, blocks), *blocks[:n_layers]]:
        module.requires_grad_(False)


def lora_targets(network: nn.Module) -> list[str]:
    blocks = repeated_blocks(network)
    found = sorted(
        {
            name.rpartition(".")[2]
            for name, module in (blocks.named_modules() if blocks is not None else ())
            if is_linear(module) and QUERY_VALUE.match(name.rpartition(".")[2])
        }
    )
    if not found:
        raise ForgeError(
            "model.lora.target_modules: no attention projection of this checkpoint has a name LoRA's default "
            "looks for (query/value, q_proj/v_proj, ...); name the linear layers to adapt"
        )
    return found


def dropout_overrides(config: Any, value: float | None) -> dict[str, float]:
    if value is None:
        return {}
    return {key: value for key, old in config.to_dict().items() if DROPOUT.search(key) and isinstance(old, float)}


@MODELS.register("hf-classifier", HFClassifierConfig)
class HFClassifier(TokenBatches, TextInputs):
    name = "hf-classifier"
    config_type: ClassVar[type[HFClassifierConfig]] = HFClassifierConfig
    task = CLASSIFICATION
    encoding_fields = ("pretrained", "max_length")

    def __init__(self, config: HFClassifierConfig, network: nn.Module, tokenizer: Any, labels: list[str]) -> None:
        self.config = config
        self.network = network
        self.tokenizer = tokenizer
        self.labels = labels

    @classmethod
    def fit_encoder(cls, config: HFClassifierConfig, splits: Splits) -> TokenIdEncoder:
        tokenizer = load_tokenizer(checkpoint_source(config.pretrained), f"model.pretrained: {config.pretrained}")
        return TokenIdEncoder(tokenizer, splits.text_column, config.max_length)

    @classmethod
    def create(cls, config: HFClassifierConfig, encoder: TokenIdEncoder, labels: list[str], seed: int) -> HFClassifier:
        from transformers import AutoModelForSequenceClassification

        source = checkpoint_source(config.pretrained)
        checkpoint_config = classification_config(source, config.pretrained)
        torch.manual_seed(seed)  # the new classification head
        network = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            pad_token_id=encoder.tokenizer.pad_token_id,  # decoders read the last token that is not padding
            ignore_mismatched_sizes=True,  # a checkpoint that classified into other labels gets a new head
            dtype=torch.float32,  # the master weights; mixed precision is autocast's job
            **dropout_overrides(checkpoint_config, config.dropout),
            # A classifier reads no KV cache; a decoder would grow one every forward pass (and twice
            # where activation checkpointing recomputes a block).
            **({"use_cache": False} if hasattr(checkpoint_config, "use_cache") else {}),
        )
        freeze(network, config.freeze_layers)
        if config.lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import TaskType, get_peft_model

            peft_config = PeftLoraConfig(
                task_type=TaskType.SEQ_CLS,  # the new head is trained in full and saved (modules_to_save)
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=config.lora.target_modules or lora_targets(network),
            )
            network = get_peft_model(network, peft_config)
        return cls(config, network, encoder.tokenizer, labels)

    def base(self) -> nn.Module:
        """The transformers model under any LoRA wrapper."""
        return self.network.get_base_model() if self.config.lora is not None else self.network

    def merged(self) -> nn.Module:
        """The transformers model with LoRA merged in, as a copy: the live network keeps its adapters."""
        return copy.deepcopy(self.network).merge_and_unload() if self.config.lora is not None else self.network

    def blocks(self) -> nn.ModuleList | None:
        return repeated_blocks(self.base())

    def input_embeddings(self) -> nn.Module:
        return self.base().get_input_embeddings()

    def tensor_parallel_plan(self) -> dict[str, Any]:
        """The architecture's own plan (``base_model_tp_plan``: module patterns -> colwise / rowwise),
        as torch's ParallelStyles on this network's modules."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        refusal = self.tensor_parallel_refusal(self.config)
        if refusal:
            raise NotOffered(f"tensor parallelism: {refusal}")
        base = self.base()
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        plan: dict[str, Any] = {}
        for pattern, style in base.config.base_model_tp_plan.items():
            regex = re.compile(re.escape(f"{base.base_model_prefix}.{pattern}").replace(r"\*", r"\d+") + "$")
            for name, _ in base.named_modules():
                if regex.match(name):
                    plan[name] = styles[style]()
        return plan

    @classmethod
    def tensor_parallel_refusal(cls, config: HFClassifierConfig) -> str | None:
        try:
            checkpoint = classification_config(checkpoint_source(config.pretrained), config.pretrained)
        except ForgeError:
            return None  # the checkpoint cannot be read at all: the stage that reads it says why
        plan = dict(getattr(checkpoint, "base_model_tp_plan", None) or {})
        if not plan:
            return f"the {checkpoint.model_type} architecture defines none (base_model_tp_plan in its config)"
        other = sorted({style for style in plan.values() if style not in ("colwise", "rowwise")})
        if other:
            return f"the {checkpoint.model_type} plan splits layers as {', '.join(other)}, beyond a column or row split"
        if config.lora is not None:
            return "it splits whole linear layers, not LoRA's adapters (model.lora)"
        return None

    @classmethod
    def tensor_parallel_sizes(cls, config: HFClassifierConfig) -> dict[str, int]:
        """Whole heads (and key/value heads) per rank, and the MLP's hidden width split evenly."""
        checkpoint = classification_config(checkpoint_source(config.pretrained), config.pretrained)
        names = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        return {f"the checkpoint's {n}": getattr(checkpoint, n) for n in names if getattr(checkpoint, n, None)}

    def student(self, layers: int | None, width: float) -> HFClassifier:
        """A network of the checkpoint's own architecture with ``layers`` of its blocks (None: half),
        evenly spaced with the top one kept, the teacher's weights in them and everywhere else; the
        embeddings stay frozen. On the default model, layers 0, 2, 5 gave the student 0.861 macro-F1
        where the lower three gave 0.831."""
        from transformers import AutoModelForSequenceClassification

        teacher = self.merged()
        blocks = repeated_blocks(teacher)
        if blocks is None:
            raise NotOffered("this checkpoint has no repeated blocks to keep fewer of")
        n = len(blocks)
        keep = layers or max(1, n // 2)
        if keep >= n:
            raise ForgeError(f"compress.distill.student_layers: {keep} is not fewer than the teacher's {n} layers")
        kept = spread(n, keep)
        config = copy.deepcopy(teacher.config)
        for key, value in vars(config).items():  # per-layer settings, such as layer_types
            if "layer" in key and isinstance(value, list) and len(value) == n:
                setattr(config, key, [value[i] for i in kept])
        config.num_hidden_layers = keep
        network = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        prefix = module_path(teacher, blocks) + "."
        renumber = {old: new for new, old in enumerate(kept)}
        state = {}
        for key, value in teacher.state_dict().items():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix) :].partition(".")
                if int(index) not in renumber:
                    continue
                key = f"{prefix}{renumber[int(index)]}.{rest}"
            state[key] = value.clone()
        network.load_state_dict(state, strict=True)
        for module in embedding_modules(network, repeated_blocks(network)):
            module.requires_grad_(False)
        return type(self)(self.config.model_copy(update={"lora": None}), network, self.tokenizer, self.labels)

    def block_layout(self, block: nn.Module) -> BlockLayout:
        """Blocks laid out as BERT's (attention.self.query/key/value, attention.output.dense,
        intermediate.dense, output.dense: BERT, RoBERTa, ELECTRA, MiniLM and their kin), whose
        self-attention stores its head count and total width, so the cut records them."""
        names = ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense")
        modules = dict(block.named_modules())
        attention = modules.get("attention.self")
        projections = [getattr(attention, n, None) for n in ("query", "key", "value")]
        laid_out = all(n in modules for n in names) and all(isinstance(m, nn.Linear) for m in projections)
        if not laid_out or not hasattr(attention, "attention_head_size"):
            raise NotOffered(f"structured pruning cuts blocks laid out as BERT's; {type(block).__name__} is not")

        def set_heads(kept: int) -> None:
            attention.num_attention_heads, attention.all_head_size = kept, kept * attention.attention_head_size

        return BlockLayout(
            attention.attention_head_size,
            [(attention, name) for name in ("query", "key", "value")],
            (block.attention.output, "dense"),
            (block.intermediate, "dense"),
            (block.output, "dense"),
            set_heads,
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.merged().save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        (directory / "forgeml_config.json").write_text(
            json.dumps(self.config.model_dump(mode="json", exclude={"lora"}), indent=2)
        )
        self.write_meta(directory)

    @classmethod
    def load(cls, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> HFClassifier:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = cls.config_type(**json.loads((directory / "forgeml_config.json").read_text()))
        meta = json.loads((directory / META_FILE).read_text())
        if weights is None:
            network = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
        else:
            network = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(directory))
            network.load_state_dict(weights, strict=bool(weights))
        network.eval()
        return cls(config, network, load_tokenizer(str(directory), str(directory)), meta["labels"])


@MODELS.register("text-classifier", TextClassifierConfig)
class TextClassifier(HFClassifier):
    name = "text-classifier"
    config_type = TextClassifierConfig
