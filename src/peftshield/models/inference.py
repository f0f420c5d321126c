"""Batched, length-sorted inference with ``torch.inference_mode``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from peftshield.models.backbone import is_decoder_classifier
from peftshield.models.batching import EncodedTexts, collate, encode_texts, own_tokens, pad_rows, sorted_batches
from peftshield.progress import track


ENCODE_CHUNK = 8192  # texts tokenised at a time


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def evaluating(*models) -> Iterator[None]:
    """The models in eval mode for the block (dropout off), each put back in the mode it was in."""
    training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, was_training in zip(models, training):
            model.train(was_training)


def predict_proba(
    model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128, progress: bool = False, description: str = "predict"
) -> np.ndarray:
    """Softmax class probabilities, shape (len(texts), num_labels), in the order of ``texts``,
    with ``model`` in PyTorch eager (see :func:`runtime_proba` for the ONNX runtimes)."""
    from peftshield.models.runtime import TorchRuntime

    with evaluating(model):
        return runtime_proba(TorchRuntime(model), tokenizer, texts, batch_size, max_length, progress, description)


def runtime_proba(
    runtime, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128, progress: bool = False, description: str = "predict"
) -> np.ndarray:
    """:func:`predict_proba` through any :class:`~peftshield.models.runtime.ClassifierRuntime`.

    Texts are tokenised and scored :data:`ENCODE_CHUNK` at a time (length-sorted within a
    chunk), so the token ids of a large input are never all in memory at once."""
    if not texts:
        return np.zeros((0, runtime.num_labels), dtype=np.float32)
    if len(texts) > ENCODE_CHUNK:
        return np.concatenate([
            runtime_proba(runtime, tokenizer, texts[start : start + ENCODE_CHUNK], batch_size, max_length, False, description)
            for start in track(range(0, len(texts), ENCODE_CHUNK), description, enabled=progress)
        ])
    return encoded_proba([runtime], encode_texts(tokenizer, texts, max_length), batch_size, progress, description)[0]


def encoded_proba(runtimes: list, encoded: EncodedTexts, batch_size: int, progress: bool = False, description: str = "predict") -> list[np.ndarray]:
    """Class probabilities of already tokenised texts under each of ``runtimes`` (models that share
    a tokenizer: padded once per batch, run by each)."""
    return encoded_proba_and_states(runtimes, encoded, batch_size, None, progress, description)[0]


def encoded_proba_and_states(runtimes: list, encoded: EncodedTexts, batch_size: int, states_from: int | None = 0, progress: bool = False,
                             description: str = "predict") -> tuple[list[np.ndarray], np.ndarray | None]:
    """:func:`encoded_proba`, and every layer's summary state, (layers, texts, hidden), from the
    same pass of ``runtimes[states_from]`` (a :class:`~peftshield.models.runtime.StatesRuntime`);
    None when ``states_from`` is None."""
    out = [np.zeros((len(encoded), r.num_labels), dtype=np.float32) for r in runtimes]
    states: np.ndarray | None = None if states_from is None else np.zeros((0, len(encoded), 0), dtype=np.float32)
    for indices in track(sorted_batches(encoded.lengths(), batch_size), description, enabled=progress):
        input_ids, attention = pad_rows(encoded, indices)
        for position, (runtime, probs) in enumerate(zip(runtimes, out)):
            if position == states_from:
                logits, batch_states = runtime.logits_and_states(input_ids, attention)
                if not states.shape[0]:
                    states = np.zeros((batch_states.shape[0], len(encoded), batch_states.shape[-1]), dtype=np.float32)
                states[:, indices] = batch_states
            else:
                logits = runtime.logits(input_ids, attention)
            probs[indices] = softmax(logits)
    return out, states


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def classifier_inputs(
    model, tokenizer, texts: list[str], num_labels: int, batch_size: int = 64, max_length: int = 128, progress: bool = False,
    description: str = "represent",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and the representation the classification head sees, per text.

    The representation is captured with a forward hook on the last linear layer that
    outputs ``num_labels`` values, so it works the same for a plain model and for any
    PEFT wrapper (LoRA, prompt methods, adapters)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise ValueError("no classification head found (a linear layer with num_labels outputs)")
    captured: list[torch.Tensor] = []
    hooks = [head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach())) for head in heads]
    encoded = encode_texts(tokenizer, texts, max_length)
    device = model_device(model)
    probs = np.zeros((len(texts), num_labels), dtype=np.float32)
    representations: np.ndarray | None = None
    try:
        with evaluating(model), torch.inference_mode():
            for indices in track(sorted_batches(encoded.lengths(), batch_size), description, enabled=progress):
                captured.clear()
                batch = {k: v.to(device) for k, v in collate(encoded, indices).items()}
                probs[indices] = torch.softmax(model(**batch).logits.float(), dim=-1).cpu().numpy()
                features = captured[-1].float().reshape(len(indices), -1).cpu().numpy()
                if representations is None:
                    representations = np.zeros((len(texts), features.shape[1]), dtype=np.float32)
                representations[indices] = features
    finally:
        for hook in hooks:
            hook.remove()
    if representations is None:
        representations = np.zeros((0, 0), dtype=np.float32)
    return probs, representations


def token_state(model, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The one-token summary a classifier reads: [CLS] (position 0) for encoders, the last
    non-padding token for decoders (padding on either side)."""
    if not is_decoder_classifier(model):
        return hidden[:, 0]
    if bool((attention_mask[:, -1] == 1).all()):  # left padding, or none
        return hidden[:, -1]
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0]), last]


def site_representation(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the representation at ``site``, the last layer's token states). ``head``: what the
    classifier head reads (BERT's pooler output when the encoder has one); ``cls``: the
    [CLS] / last-token state."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state
    pooled = getattr(out, "pooler_output", None)
    if site == "head" and pooled is not None:
        return pooled, hidden
    return token_state(model, hidden, attention_mask), hidden


def layer_token_states(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """:func:`token_state` at the output of every transformer layer, shape (layers, len(texts), hidden).

    Read from the model's own forward (``output_hidden_states``), so a PEFT wrapper's changes
    count. Prompt methods prepend virtual tokens to the hidden states: the text's own
    positions are the last ``input length`` ones, which is where the summary is taken."""
    encoded = encode_texts(tokenizer, texts, max_length)
    device = model_device(model)
    states: np.ndarray | None = None
    with evaluating(model), torch.inference_mode():
        for indices in sorted_batches(encoded.lengths(), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded, indices).items()}
            hidden = model(**batch, output_hidden_states=True).hidden_states[1:]  # [0] is the embeddings
            length = batch["input_ids"].shape[1]
            summary = torch.stack([token_state(model, h[:, -length:], batch["attention_mask"]) for h in hidden])
            if states is None:
                states = np.zeros((summary.shape[0], len(texts), summary.shape[-1]), dtype=np.float32)
            states[:, indices] = summary.float().cpu().numpy()
    return states if states is not None else np.zeros((0, 0, 0), dtype=np.float32)


def paired_layer_states(model, reference, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128):
    """Each token's hidden states in two models of one architecture, per batch: yields
    ``(indices, states, reference_states, keep)``, the states of shape (layers, batch, tokens,
    hidden) at the output of every layer, and ``keep`` (batch, tokens) marking the texts' own
    tokens (not padding, not special tokens). Both models must share ``tokenizer``."""
    encoded = encode_texts(tokenizer, texts, max_length)
    device = model_device(model)
    with evaluating(model, reference), torch.inference_mode():
        for indices in sorted_batches(encoded.lengths(), batch_size):
            padded = collate(encoded, indices)
            keep = own_tokens(tokenizer, padded["input_ids"].numpy(), padded["attention_mask"].numpy())
            batch = {k: v.to(device) for k, v in padded.items()}
            states = torch.stack(model(**batch, output_hidden_states=True).hidden_states[1:])
            reference_states = torch.stack(reference(**batch, output_hidden_states=True).hidden_states[1:])
            yield indices, states.float().cpu().numpy(), reference_states.float().cpu().numpy(), keep
