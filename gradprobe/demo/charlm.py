"""A character-level tokenizer and tiny causal-LM configs, for the demo model and for tests.

Nothing here downloads anything: the tokenizer is built from a character list with the
`tokenizers` library and wrapped as a `PreTrainedTokenizerFast`, so it saves and loads like any
Hugging Face tokenizer (tokenizer.json), with no custom code.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

CHARS = "0123456789+-*/=()<>?:;,.!'\"#_ abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
SPECIAL = ("<pad>", "<s>", "</s>")

# A minimal chat template so chat-message prompts work with the char tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer(chars: str = CHARS, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """One token per character; ids 0, 1, 2 are pad, bos and eos; unknown characters map to pad."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    """A small Llama config (tied embeddings by default); overrides change any field."""
    fields: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_qwen2_config(vocab_size: int, **overrides: object) -> Qwen2Config:
    """A small Qwen2 config (attention biases, untied head by default)."""
    fields: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return Qwen2Config(**fields)
