"""Offline stand-ins for what the seed scripts download: a tiny model config and a
character-level tokenizer (no network, no weights). Only these two names replace the seeds'
``from_pretrained`` calls; everything else in the scripts is the seeds' own text."""
from __future__ import annotations

import string

VOCAB = ["<unk>", "<pad>"] + sorted(set(string.printable))


def tiny_config(kind: str = "qwen3"):
    """A 2-layer, hidden-64 config of the seed's model family (Qwen3: GQA 4/2 + QK-norm)."""
    import transformers as tf

    common = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=128, num_attention_heads=4, num_key_value_heads=2)
    if kind == "qwen3":
        return tf.Qwen3Config(head_dim=16, **common)
    if kind == "llama":
        return tf.LlamaConfig(**common)
    raise ValueError(kind)


def offline_tokenizer():
    """One token per character (what ``AutoTokenizer.from_pretrained`` gave the seed scripts)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
