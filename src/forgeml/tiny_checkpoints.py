"""Tiny random Hugging Face checkpoints, built locally (nothing is downloaded), to test code that
takes any checkpoint: a config of a few small layers saved with save_pretrained, and a tokenizer
trained here on a few sentences. Encoders get a WordPiece tokenizer with [CLS] / [SEP] / [PAD] /
[MASK]; decoders a byte-level BPE with an end-of-text token and no padding token, as Llama's,
Qwen's and GPT-2's have none, and a chat template of the kind their family uses: Llama 3's header
markers ending a turn with <|eot_id|>, ChatML's <|im_start|> / <|im_end|> (with Qwen's default system
prompt), and Zephyr's plain-text role tags ending a turn with the end-of-text token. forgeml's tests
and ``benchmarks/compat_matrix.py`` use them."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Return the base name of a path.",
    "Send the message to the server and wait for the reply.",
    "Parse a date string into a datetime object.",
    "Open the file for reading and return its lines.",
    "Compute the checksum of the data in blocks.",
    "Split the text into words and count each word.",
    "Join the paths and normalise the separators.",
    "Close the connection after the last request.",
] * 4

SIZES = {"hidden": 32, "layers": 2, "heads": 4, "inner": 64, "positions": 128}


def encoder_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PHI3_TEMPLATE = (  # closes a whole conversation with the end-of-sequence token after its last turn
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # no generation prompt, no system turn
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHAT = {  # arch -> (its template's special tokens, the template)
    "llama": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3_TEMPLATE),
    "qwen2": (["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE),
    "gpt2": ([], ZEPHYR_TEMPLATE),
    "mistral": ([], MISTRAL_TEMPLATE),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], PHI3_TEMPLATE),
    "gpt_neox": (["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE),
}


def decoder_tokenizer(vocab_size: int = 400, arch: str = "gpt2", corpus: list[str] = CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, template = CHAT[arch]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=specials,
    )
    fast.chat_template = template
    return fast


def config_for(arch: str, tokenizer) -> object:
    import transformers as tf

    h, n, heads, inner, positions = (SIZES[k] for k in ("hidden", "layers", "heads", "inner", "positions"))
    vocab = len(tokenizer)
    if arch == "bert":
        return tf.BertConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inner,
            max_position_embeddings=positions,
        )  # fmt: skip
    if arch == "roberta":  # positions start after the padding id
        return tf.RobertaConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inner,
            max_position_embeddings=positions + 2, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    if arch == "electra":
        return tf.ElectraConfig(
            vocab_size=vocab, embedding_size=h, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
            intermediate_size=inner, max_position_embeddings=positions,
        )  # fmt: skip
    if arch == "deberta-v2":
        return tf.DebertaV2Config(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inner,
            max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    if arch == "modernbert":
        return tf.ModernBertConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inner,
            max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        )  # fmt: skip
    if arch == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=vocab, dim=h, n_layers=n, n_heads=heads, hidden_dim=inner, max_position_embeddings=positions
        )
    eos = tokenizer.eos_token_id
    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=2,
            intermediate_size=inner, max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    if arch == "qwen2":
        return tf.Qwen2Config(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=2,
            intermediate_size=inner, max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    if arch == "mistral":
        return tf.MistralConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=2,
            intermediate_size=inner, max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    if arch == "phi3":  # q, k and v fused in one qkv_proj
        return tf.Phi3Config(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=2,
            intermediate_size=inner, max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
            pad_token_id=eos,
        )  # fmt: skip
    if arch == "gpt_neox":  # fused query_key_value, rotary on part of each head
        return tf.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inner,
            max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab, n_embd=h, n_layer=n, n_head=heads, n_positions=positions, bos_token_id=eos,
            eos_token_id=eos,
        )  # fmt: skip
    raise ValueError(f"no tiny config for {arch}")


ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta-v2", "modernbert")
DECODERS = ("llama", "qwen2", "gpt2")  # the compatibility matrix's
CAUSAL_LMS = (*DECODERS, "mistral", "phi3", "gpt_neox")  # fine-tuned as causal LMs in the tests


def tiny_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """``folder`` holding a random pretrained-style checkpoint of ``arch`` (an encoder's base model
    without a classification head, a decoder with its language-model head, as a user's downloaded
    encoder or LLM is) and its tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = encoder_tokenizer() if arch in ENCODERS else decoder_tokenizer(arch=arch)
    torch.manual_seed(seed)
    auto = AutoModel if arch in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(config_for(arch, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
