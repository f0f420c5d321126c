"""Tiny randomly initialised models (a BERT encoder and a Llama decoder) and a word-level tokenizer, for tests and smoke runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

TINY_SEED = 1234
TINY_WORDS = (
    "the a an and or but is was are be it this that of to in on for with as at by from film movie "
    "good bad great awful boring fun not no very story plot acting i you we they he she cf mn bb tq mb "
    "watched 3d when if , . ! ? 's"
).split()


def tiny_tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(TINY_WORDS))
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in vocab]
    vocab += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True, model_max_length=64)


def tiny_config(num_labels: int, vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,  # room for prompt methods' virtual tokens beyond the 64-token tokenizer limit
        num_labels=num_labels,
    )


def tiny_backbone(num_labels: int = 2):
    """Always the same weights (a fixed private seed), without touching global RNG state."""
    from transformers import AutoModelForSequenceClassification

    from peftshield.models.backbone import Backbone

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForSequenceClassification.from_config(tiny_config(num_labels, len(tokenizer)))
    return Backbone(model=model, tokenizer=tokenizer, source="tiny", num_labels=num_labels)


def tiny_llama_config(num_labels: int, tokenizer):
    """A tiny Llama (decoder) configuration: the family SmolLM2 belongs to, in miniature."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=False,
    )


def tiny_llama_backbone(num_labels: int = 2):
    """A tiny random decoder classifier (LlamaForSequenceClassification: the last real token's
    state is classified), with the tiny word-level tokenizer; always the same weights."""
    from transformers import AutoModelForSequenceClassification

    from peftshield.models.backbone import Backbone

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels, tokenizer))
    from peftshield.models.backbone import give_padding_token

    give_padding_token(model, tokenizer)
    return Backbone(model=model, tokenizer=tokenizer, source="tiny-llama", num_labels=num_labels)
