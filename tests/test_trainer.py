"""The training loop: batching, seeding, learning, dev-set selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backdoor_fixtures import sentiment_data, single_thread_torch, train_backbone
from peftshield.data import TextDataset
from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
from peftshield.models import load_backbone
from peftshield.models.batching import LengthBucketBatchSampler, collate, encode_texts, sorted_batches
from peftshield.models.inference import predict_proba


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


def test_length_bucket_sampler_covers_every_index_once_and_groups_lengths() -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    sampler = LengthBucketBatchSampler(lengths, 32, np.random.default_rng(1), pool_batches=50)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 32
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 15, f"batches should hold similar lengths, mean spread {spread}"
    assert [b for b in LengthBucketBatchSampler(lengths, 32, np.random.default_rng(1))] == batches
    assert list(sampler) != batches, "each epoch gets a new order"


def test_dynamic_padding_pads_to_the_longest_in_batch(tiny_texts) -> None:
    from peftshield.models.tiny import tiny_tokenizer

    encoded = encode_texts(tiny_tokenizer(), ["good", "good film , great story"], 32)
    batch = collate(encoded, [0], None)
    assert batch["input_ids"].shape == (1, 3)  # [CLS] good [SEP]
    batch = collate(encoded, [0, 1], np.array([1, 0]))
    assert batch["input_ids"].shape[1] == len(encoded.input_ids[1])
    assert batch["attention_mask"][0].sum() == 3 and batch["labels"].tolist() == [1, 0]
    assert sorted_batches(np.array([3, 9, 1]), 2) == [[1, 0], [2]]


def _train(tiny_texts, seed: int, epochs: int = 2, method: str = "lora"):
    seed_torch(seed)
    backbone = load_backbone("tiny", 2)
    return backbone, *train_classifier(
        backbone.model, backbone.tokenizer, tiny_texts, tiny_texts, METHODS.create(method), TrainingConfig(epochs=epochs, batch_size=4, max_length=32),
        np.random.default_rng(seed), progress=False,
    )


def test_same_seed_same_metrics(tiny_texts) -> None:
    b1, m1, r1 = _train(tiny_texts, 7)
    b2, m2, r2 = _train(tiny_texts, 7)
    assert [e.train_loss for e in r1.epochs] == [e.train_loss for e in r2.epochs]
    np.testing.assert_array_equal(predict_proba(m1, b1.tokenizer, tiny_texts.texts), predict_proba(m2, b2.tokenizer, tiny_texts.texts))
    _, _, r3 = _train(tiny_texts, 8)
    assert [e.train_loss for e in r3.epochs] != [e.train_loss for e in r1.epochs]


def test_training_lowers_the_loss_and_beats_chance() -> None:
    rng = np.random.default_rng(0)
    train, dev = sentiment_data(200, rng, "train"), sentiment_data(100, rng, "dev")
    seed_torch(0)
    backbone = load_backbone("tiny", 2)
    training = TrainingConfig(learning_rate=5e-3, epochs=6, batch_size=16, max_length=32)
    _, result = train_classifier(backbone.model, backbone.tokenizer, train, dev, METHODS.create("full"), training, rng, progress=False)
    losses = [e.train_loss for e in result.epochs]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.best_dev_accuracy >= 0.9, [e.dev_accuracy for e in result.epochs]


def test_dev_selection_restores_the_best_epoch_when_a_later_one_is_worse(tmp_path: Path) -> None:
    """A backbone that already does the task is trained on flipped labels: dev accuracy (true
    labels) is best after epoch 1 and then collapses, so the returned model must be epoch 1's."""
    rng = np.random.default_rng(0)
    folder = train_backbone(sentiment_data(200, rng, "pretrain"), tmp_path / "sentiment", seed=0, learning_rate=5e-3, epochs=4)
    data, dev = sentiment_data(64, rng, "train"), sentiment_data(40, rng, "dev")
    flipped = TextDataset(data.texts, [1 - y for y in data.labels], data.ids)
    seed_torch(0)
    backbone = load_backbone(str(folder), 2)
    training = TrainingConfig(learning_rate=1e-2, epochs=4, batch_size=16, max_length=32)
    model, result = train_classifier(backbone.model, backbone.tokenizer, flipped, dev, METHODS.create("lora"), training, rng, progress=False)
    accuracies = [e.dev_accuracy for e in result.epochs]
    assert result.best_dev_accuracy == max(accuracies) and accuracies[result.best_epoch - 1] == max(accuracies)
    assert result.best_epoch < training.epochs and accuracies[-1] < max(accuracies) - 0.3, f"no later epoch was worse: {accuracies}"
    accuracy = (predict_proba(model, backbone.tokenizer, dev.texts).argmax(1) == dev.label_array()).mean()
    assert accuracy == result.best_dev_accuracy, f"the returned model must be epoch {result.best_epoch}'s, dev accuracies {accuracies}"


def test_without_dev_selection_the_last_epoch_is_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = train_backbone(sentiment_data(200, rng, "pretrain"), tmp_path / "sentiment", seed=0, learning_rate=5e-3, epochs=4)
    data, dev = sentiment_data(64, rng, "train"), sentiment_data(40, rng, "dev")
    flipped = TextDataset(data.texts, [1 - y for y in data.labels], data.ids)
    seed_torch(0)
    backbone = load_backbone(str(folder), 2)
    training = TrainingConfig(learning_rate=1e-2, epochs=4, batch_size=16, max_length=32, select_on_dev=False)
    model, result = train_classifier(backbone.model, backbone.tokenizer, flipped, dev, METHODS.create("lora"), training, rng, progress=False)
    accuracy = (predict_proba(model, backbone.tokenizer, dev.texts).argmax(1) == dev.label_array()).mean()
    assert accuracy == result.epochs[-1].dev_accuracy < result.best_dev_accuracy


def test_max_length_is_capped_at_the_models_limit() -> None:
    from peftshield.models.tiny import tiny_tokenizer

    encoded = encode_texts(tiny_tokenizer(), ["good " * 200], 512)
    assert len(encoded.input_ids[0]) == 64  # the tiny model has 64 positions
    backbone = load_backbone("tiny", 2)
    assert predict_proba(backbone.model, backbone.tokenizer, ["good " * 200], max_length=512).shape == (1, 2)
