"""Batched, length-sorted inference with ``torch.inference_mode``."""

from __future__ import annotations

import numpy as np
import torch

from peftshield.models.batching import collate, encode_texts, sorted_batches
from peftshield.progress import track


ENCODE_CHUNK = 8192  # texts tokenised at a time


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def predict_proba(
    model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128, progress: bool = False, description: str = "predict"
) -> np.ndarray:
    """Softmax class probabilities, shape (len(texts), num_labels), in the order of ``texts``.

    Texts are tokenised and scored :data:`ENCODE_CHUNK` at a time (length-sorted within a
    chunk), so the token ids of a large input are never all in memory at once."""
    if not texts:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    if len(texts) > ENCODE_CHUNK:
        return np.concatenate([
            predict_proba(model, tokenizer, texts[start : start + ENCODE_CHUNK], batch_size, max_length, False, description)
            for start in track(range(0, len(texts), ENCODE_CHUNK), description, enabled=progress)
        ])
    encoded = encode_texts(tokenizer, texts, max_length)
    device = model_device(model)
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for indices in track(sorted_batches(encoded.lengths(), batch_size), description, enabled=progress):
            batch = {k: v.to(device) for k, v in collate(encoded, indices).items()}
            logits = model(**batch).logits.float()
            out[indices] = torch.softmax(logits, dim=-1).cpu().numpy()
    model.train(was_training)
    return out


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
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
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
        model.train(was_training)
    if representations is None:
        representations = np.zeros((0, 0), dtype=np.float32)
    return probs, representations
