"""The training loop shared by the attacker, the victim and PSIM.

Dynamic padding, length-bucketed batches, dev-set model selection, a seeded order
(numpy Generator passed in), progress bars, and ``accelerate`` so the same code runs on
CPU, one GPU, or under ``accelerate launch`` on several.
"""

from __future__ import annotations

import time
from typing import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from peftshield.data.records import TextDataset
from peftshield.finetune.base import FineTuneMethod, count_parameters
from peftshield.finetune.config import TrainingConfig
from peftshield.models.batching import LengthBucketBatchSampler, collate, encode_texts
from peftshield.models.inference import predict_proba
from peftshield.progress import track


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    dev_accuracy: float | None
    seconds: float
    probe: dict[str, float] = field(default_factory=dict)  # what the caller's epoch probe measured


@dataclass
class TrainResult:
    method: str
    learning_rate: float
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_dev_accuracy: float | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    n_train: int = 0
    num_training_steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def draw_training_rows(data: TextDataset, training: TrainingConfig, rng: np.random.Generator) -> TextDataset:
    """The rows a run trains on: a random ``max_train_samples`` subset, or all of them."""
    return data.sample(training.max_train_samples, rng)


def count_training_steps(n_rows: int, training: TrainingConfig) -> int:
    """Optimiser steps of a run over ``n_rows`` rows (the last batch of an epoch may be short)."""
    return ((n_rows + training.batch_size - 1) // training.batch_size) * training.epochs


def seed_torch(seed: int) -> None:
    """torch keeps dropout and initialisation RNG globally; every stage seeds it from its explicit seed."""
    torch.manual_seed(seed)


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def pad_for(feeds_embeddings: bool, model, tokenizer) -> None:
    """Decoders pad on the right (their classifier finds each text's last real token from the
    ids, and positions start at 0), except under methods that feed embeddings (soft prompts):
    then on the left, so the last position is the last real token. ``load_finetuned`` and the
    audit's adapter loader call it again on reload."""
    from peftshield.models.backbone import is_decoder_classifier

    if is_decoder_classifier(model):
        tokenizer.padding_side = "left" if feeds_embeddings else "right"


def train_classifier(
    model,
    tokenizer,
    train: TextDataset,
    dev: TextDataset | None,
    method: FineTuneMethod,
    training: TrainingConfig,
    rng: np.random.Generator,
    progress: bool = True,
    label: str = "train",
    epoch_probe: Callable[[object, object], dict[str, float]] | None = None,
    loss_fn: Callable[[object, dict, torch.Tensor], torch.Tensor] | None = None,
):
    """Wrap ``model`` with ``method``, train it on ``train``; return (trained model, TrainResult).

    ``loss_fn(model, batch, row_index)``, if given, replaces the model's cross-entropy
    (``row_index``: the batch rows' positions in ``train``, e.g. to tell triggered rows apart).

    With a dev set and ``select_on_dev``, the epoch with the best dev accuracy is kept.
    ``epoch_probe(model, tokenizer)``, if given, runs after every epoch (e.g. ASR for a curve over
    epochs) and its numbers are kept in that epoch's record.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    started = time.perf_counter()
    train = draw_training_rows(train, training, rng)
    learning_rate = training.learning_rate or method.default_learning_rate
    total_steps = count_training_steps(len(train), training)
    model = method.wrap(model, total_steps)
    pad_for(method.feeds_embeddings, model, tokenizer)
    trainable, total = count_parameters(model)
    result = TrainResult(method=method.name, learning_rate=learning_rate, trainable_parameters=trainable, total_parameters=total,
                         n_train=len(train), num_training_steps=total_steps)

    encoded = encode_texts(tokenizer, train.texts, training.max_length)
    labels = train.label_array()
    sampler = LengthBucketBatchSampler(encoded.lengths(), training.batch_size, rng)
    def collate_rows(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = collate(encoded, idx, labels)
        if loss_fn is not None:
            batch["row_index"] = torch.as_tensor(idx, dtype=torch.long)
        return batch

    loader = torch.utils.data.DataLoader(_IndexDataset(len(train)), batch_sampler=sampler, collate_fn=collate_rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=training.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * total_steps), total_steps)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    best: dict[str, torch.Tensor] | None = None
    step = 0
    for epoch in range(1, training.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        losses = []
        for batch in track(loader, f"{label} {method.name} epoch {epoch}/{training.epochs}", enabled=progress and accelerator.is_main_process):
            if loss_fn is None:
                loss = model(**batch).loss
            else:
                rows = batch.pop("row_index")
                loss = loss_fn(model, batch, rows.cpu())
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            method.on_step(accelerator.unwrap_model(model), step)  # before zero_grad: AdaLoRA reads gradients
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        dev_accuracy = None
        if dev is not None and len(dev):
            probs = predict_proba(accelerator.unwrap_model(model), tokenizer, dev.texts, training.eval_batch_size, training.max_length)
            dev_accuracy = float((probs.argmax(1) == dev.label_array()).mean())
        probed = epoch_probe(accelerator.unwrap_model(model), tokenizer) if epoch_probe else {}
        result.epochs.append(EpochRecord(epoch, float(np.mean(losses)) if losses else float("nan"), dev_accuracy, time.perf_counter() - epoch_start, probed))
        if dev_accuracy is None:
            result.best_epoch = epoch  # no dev set: the last epoch is kept
            continue
        improved = (result.best_dev_accuracy is None or dev_accuracy > result.best_dev_accuracy)
        if improved:
            result.best_epoch, result.best_dev_accuracy = epoch, dev_accuracy
            if training.select_on_dev and dev is not None and epoch < training.epochs:
                best = _trainable_snapshot(accelerator.unwrap_model(model))
            else:
                best = None  # the current weights are the best; nothing to restore
    model = accelerator.unwrap_model(model)
    if training.select_on_dev and best is not None and result.best_epoch != training.epochs:
        _restore(model, best)
    model.eval()
    result.seconds = time.perf_counter() - started
    result.samples_per_second = len(train) * training.epochs / result.seconds if result.seconds else 0.0
    return model, result
