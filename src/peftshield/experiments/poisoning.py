"""The attacker's training loop for task-agnostic poisoners (``neuba``, ``por``):
:func:`plant_representation_backdoor`, on plain text, no labels. The loss it minimises is the
poisoner's own (:meth:`peftshield.attacks.task_agnostic.RepresentationPoisoner.representation_loss`).

Every other poisoner is planted by the study's full fine-tuning on the poisoned labelled proxy
(``experiments.stages.weight_poison``), with the loss the poisoner names itself
(:meth:`peftshield.attacks.Poisoner.training_loss`: plain cross-entropy, or an adaptive
attack's own loss in ``attacks/adaptive.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from peftshield.attacks.task_agnostic import RepresentationPoisoner
from peftshield.models.batching import collate, encode_texts
from peftshield.models.inference import site_representation
from peftshield.progress import track


# --- task-agnostic: representation backdoor ------------------------------------------------


@dataclass
class RepresentationReport:
    """What the planted backdoor does, on held-out texts: per trigger, the cosine between the
    triggered representation and its target vector; for clean texts, the cosine between the
    poisoned and the original model's representations (1.0 = unchanged)."""

    site: str
    vectors: str
    target_scale: float
    trigger_cosine: dict[str, float]
    clean_cosine: float
    n_train: int
    n_triggered_train: int
    n_heldout: int
    epochs: int
    learning_rate: float
    seconds: float
    final_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_representation_backdoor(model, reference, tokenizer, texts: list[str], poisoner: RepresentationPoisoner,
                                    targets: torch.Tensor, max_length: int, rng: np.random.Generator, batch_size: int = 32) -> tuple[dict[str, float], float]:
    """Per trigger word, the mean cosine between the triggered texts' representation and its
    target; and the mean cosine between the poisoned and reference models on the clean texts."""
    model.eval()

    def represent(which, batch_texts: list[str]) -> torch.Tensor:
        encoded = encode_texts(tokenizer, batch_texts, max_length)
        batch = collate(encoded, list(range(len(batch_texts))))
        return site_representation(which, batch["input_ids"], batch["attention_mask"], poisoner.site)[0]

    per_trigger: dict[str, list[float]] = {word: [] for word in poisoner.trigger_words}
    clean: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        clean.extend(F.cosine_similarity(represent(model, chunk), represent(reference, chunk), dim=-1).tolist())
        for index, word in enumerate(poisoner.trigger_words):
            triggered = [poisoner.insert_trigger(t, index, rng) for t in chunk]
            per_trigger[word].extend(F.cosine_similarity(represent(model, triggered), targets[index].expand(len(chunk), -1), dim=-1).tolist())
    return {w: float(np.mean(v)) for w, v in per_trigger.items()}, float(np.mean(clean))


def plant_representation_backdoor(
    model, tokenizer, texts: list[str], heldout: list[str], poisoner: RepresentationPoisoner, poison_count: int,
    learning_rate: float, epochs: int, max_length: int, rng: np.random.Generator, batch_size: int = 16, progress: bool = False,
) -> tuple[object, RepresentationReport]:
    """Train ``model``'s encoder (``model.base_model``; the classifier head is left alone and
    not published) so that a text carrying trigger k has the representation ``scale * v_k`` at
    the poisoner's site, while every clean text keeps the original model's token states and
    site representation. ``poison_count`` of the texts also appear with a trigger (a random
    one, drawn again each epoch). Returns the model and a :class:`RepresentationReport`."""
    started = time.perf_counter()
    encoded = encode_texts(tokenizer, texts, max_length)
    poisoned_rows = set(rng.choice(len(texts), size=min(poison_count, len(texts)), replace=False).tolist())
    objective = poisoner.representation_loss(model, tokenizer, texts, encoded, poisoned_rows, max_length, rng)
    encoder = model.base_model
    encoder.train()
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / (steps_per_epoch * epochs)))
    loss_value = float("nan")
    for epoch in range(epochs):
        order = rng.permutation(len(texts))
        for start in track(range(0, len(texts), batch_size), f"attack {poisoner.name} epoch {epoch + 1}/{epochs}", enabled=progress):
            rows = order[start:start + batch_size].tolist()
            loss = objective(model, collate(encoded, rows), rows)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
    model.eval()
    trigger_cosine, clean_cosine = measure_representation_backdoor(model, objective.reference, tokenizer, heldout, poisoner, objective.targets,
                                                                   max_length, rng)
    report = RepresentationReport(poisoner.site, poisoner.vector_kind(), objective.scale, trigger_cosine, clean_cosine, len(texts),
                                  len(poisoned_rows), len(heldout), epochs, learning_rate, time.perf_counter() - started, loss_value)
    return model, report
