"""Batched, length-sorted inference with ``torch.inference_mode``."""

from __future__ import annotations

import numpy as np
import torch

from peftshield.models.batching import collate, encode_texts, sorted_batches
from peftshield.progress import track


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def predict_proba(
    model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128, progress: bool = False, description: str = "predict"
) -> np.ndarray:
    """Softmax class probabilities, shape (len(texts), num_labels), in the order of ``texts``."""
    if not texts:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
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
