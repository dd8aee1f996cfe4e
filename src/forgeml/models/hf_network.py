"""What forgeml reads from any transformers network, for the families built on one (``hf-classifier``,
``hf-causal-lm``): nothing here knows an architecture by name.

Its repeated blocks come from ``_no_split_modules`` (or the one homogeneous ModuleList), its input
embeddings from ``get_input_embeddings()``, LoRA's default targets from the names of the
attention's projections, its tensor-parallel plan from the config's ``base_model_tp_plan``, a
distillation student from its own config with fewer layers.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, PositiveInt
from torch import nn

from forgeml.errors import ForgeError, NotOffered
from forgeml.models.registry import is_linear, spread
from forgeml.section import Section

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

# The attention's query and value projections, by the names architectures give them (BERT's
# query/value, Llama's q_proj/v_proj, DistilBERT's q_lin/v_lin, DeBERTa's query_proj/value_proj),
# or the fused projection where q, k and v are one layer (GPT-2's c_attn, ModernBERT's Wqkv, GPT-NeoX's,
# Falcon's and BLOOM's query_key_value).
QUERY_VALUE = re.compile(
    r"^(query|value|q_proj|v_proj|q_lin|v_lin|query_proj|value_proj|c_attn|Wqkv|qkv_proj|qkv|query_key_value)$"
)
DROPOUT = re.compile(r"(dropout|pdrop)")  # the config fields that set a dropout probability


class LoraConfig(Section):
    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Fraction = 0.05
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; default: the attention's query and value projections"
    )


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


def with_lora(network: nn.Module, lora: LoraConfig | None, task_type: str) -> nn.Module:
    """``network`` with LoRA adapters (peft), or as it is without ``lora``."""
    if lora is None:
        return network
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules or lora_targets(network)
    adapted = [m for name, m in network.named_modules() if name.rpartition(".")[2] in targets]
    peft_config = PeftLoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores its weight transposed; peft needs telling (it warns and guesses otherwise).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in adapted),
    )
    return get_peft_model(network, peft_config)


def dropout_overrides(config: Any, value: float | None) -> dict[str, float]:
    if value is None:
        return {}
    return {key: value for key, old in config.to_dict().items() if DROPOUT.search(key) and isinstance(old, float)}


def fewer_layers(teacher: nn.Module, layers: int | None, auto_class: Any) -> nn.Module:
    """A network of ``teacher``'s own architecture with ``layers`` of its blocks (None: half),
    evenly spaced with the top one kept, the teacher's weights in them and everywhere else."""
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
    network = auto_class.from_config(config, dtype=torch.float32)
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
    return network


def read_network(directory: Path, weights: dict[str, torch.Tensor] | None, auto_class: Any) -> nn.Module:
    """The transformers network saved in ``directory`` (in eval mode), or of its config with ``weights``
    instead of the weights file (none at all: ``{}``, for a family that only preprocesses)."""
    from transformers import AutoConfig

    if weights is None:
        network = auto_class.from_pretrained(directory, dtype=torch.float32)
    else:
        network = auto_class.from_config(AutoConfig.from_pretrained(directory))
        network.load_state_dict(weights, strict=bool(weights))
    return network.eval()


class HFNetwork:
    """What a family around a transformers network (``self.network``, maybe wrapped by LoRA) offers
    the stages. A family says how to read its recipe's checkpoint config (``checkpoint_config``)."""

    name: ClassVar[str]
    config: Any
    network: nn.Module

    @classmethod
    def checkpoint_config(cls, config: Any) -> Any:
        """The transformers config of the network a recipe's model section builds."""
        raise NotImplementedError

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
    def tensor_parallel_refusal(cls, config: Any) -> str | None:
        try:
            checkpoint = cls.checkpoint_config(config)
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
    def tensor_parallel_sizes(cls, config: Any) -> dict[str, int]:
        """Whole heads (and key/value heads) per rank, and the MLP's hidden width split evenly."""
        checkpoint = cls.checkpoint_config(config)
        names = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        return {f"the checkpoint's {n}": getattr(checkpoint, n) for n in names if getattr(checkpoint, n, None)}
