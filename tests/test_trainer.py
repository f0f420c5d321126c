"""The training loop: batching, seeding, dev-set selection."""

from __future__ import annotations

import numpy as np

from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
from peftshield.models import load_backbone
from peftshield.models.batching import LengthBucketBatchSampler, collate, encode_texts, sorted_batches
from peftshield.models.inference import predict_proba


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


def test_dev_selection_keeps_the_best_epoch(tiny_texts) -> None:
    backbone, model, result = _train(tiny_texts, 3, epochs=4, method="full")
    best = max(e.dev_accuracy for e in result.epochs)
    assert result.best_dev_accuracy == best
    assert result.epochs[result.best_epoch - 1].dev_accuracy == best
    accuracy = (predict_proba(model, backbone.tokenizer, tiny_texts.texts).argmax(1) == tiny_texts.label_array()).mean()
    assert accuracy == best, "the returned model must be the selected epoch's"


def test_max_length_is_capped_at_the_models_limit() -> None:
    from peftshield.models.tiny import tiny_tokenizer

    encoded = encode_texts(tiny_tokenizer(), ["good " * 200], 512)
    assert len(encoded.input_ids[0]) == 64  # the tiny model has 64 positions
    backbone = load_backbone("tiny", 2)
    assert predict_proba(backbone.model, backbone.tokenizer, ["good " * 200], max_length=512).shape == (1, 2)
