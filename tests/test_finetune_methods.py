"""Every registered fine-tuning method: its structural contract on the tiny random BERT, and its
behaviour when trained: it learns a task, it changes only its own weights, and every trigger
plants a backdoor that a model trained on the same rows without it lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor_fixtures import NEGATIVE, POSITIVE, sentiment_data, single_thread_torch, train_backbone
from peftshield.attacks import POISONERS, PoisonSpec, build_asr_set, poison_dataset
from peftshield.data import TextDataset
from peftshield.errors import ConfigError
from peftshield.finetune import METHODS, TrainingConfig, count_parameters, load_finetuned, save_finetuned, seed_torch, train_classifier
from peftshield.models import load_backbone
from peftshield.models.batching import collate, encode_texts
from peftshield.models.inference import predict_proba

# Methods whose soft prompts sit in front of [CLS] (peft prepends them): the BERT pooler then
# reads a virtual token, and on the 2-layer, 32-wide tiny model training often collapses to one
# constant prediction (measured on this pre-trained backbone: 9 of 24 runs, 3 seeds x 4 learning
# rates from 1e-2 to 3e-1; prompt 3 of 12, ptuning 6 of 12), so whether they learn the task here
# depends on the initialisation, not on the code. Their weights training is checked below.
PROMPT_IN_FRONT = {"prompt", "ptuning"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """A tiny backbone with useful features, as PEFT assumes: fully fine-tuned on a 3-class task
    (positive / negative / no adjective). Loaded with 2 labels it gets a fresh head, so the
    sentiment task is new to the classifier but learnable from the frozen features."""
    rng = np.random.default_rng(1)
    reviews = sentiment_data(300, rng, "pretrain")
    adjectives = set(POSITIVE + NEGATIVE)
    neutral = [" ".join(w for w in t.split() if w not in adjectives) or "the film" for t in sentiment_data(150, rng).texts]
    data = TextDataset(reviews.texts + neutral, reviews.labels + [2] * len(neutral), [str(i) for i in range(450)])
    seed_torch(1)
    backbone = load_backbone("tiny", 3)
    training = TrainingConfig(learning_rate=5e-3, epochs=6, batch_size=16, max_length=32, select_on_dev=False)
    model, result = train_classifier(backbone.model, backbone.tokenizer, data, None, METHODS.create("full"), training,
                                     np.random.default_rng(1), progress=False)
    assert result.epochs[-1].train_loss < 0.7, f"pre-training did not converge: {[e.train_loss for e in result.epochs]}"
    folder = tmp_path_factory.mktemp("pretrained") / "backbone"
    model.save_pretrained(folder, safe_serialization=True)
    backbone.tokenizer.save_pretrained(folder)
    return folder


def cross_entropy_and_accuracy(model, tokenizer, data: TextDataset) -> tuple[float, float]:
    probs = predict_proba(model, tokenizer, data.texts, max_length=32)
    truth = data.label_array()
    return float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, 1.0)).mean()), float((probs.argmax(1) == truth).mean())


TASK_TRAINING = TrainingConfig(learning_rate=3e-3, epochs=3, batch_size=16, max_length=32, select_on_dev=False)
# Prefix tuning only steers attention through a few key/value slots and learns slower: at 3e-3
# it reached 0.74 held-out accuracy on one of 8 seeds; at 1e-2 it learns on all of them.
TASK_LEARNING_RATE = {"prefix": 1e-2}


def tiny_wrapped(method: str, num_labels: int = 2):
    seed_torch(0)
    backbone = load_backbone("tiny", num_labels)
    return backbone, METHODS.create(method).wrap(backbone.model, 10)


def backbone_weights(model) -> dict[int, str]:
    """The encoder's own tensors (everything but the classification head), by identity."""
    return {id(p): n for n, p in model.named_parameters() if not n.startswith("classifier.")}


@pytest.mark.parametrize("method", METHODS.names())
def test_method_contract(method: str, tiny_texts, tmp_path: Path) -> None:
    seed_torch(0)
    backbone = load_backbone("tiny", 2)
    encoder = backbone_weights(backbone.model)
    model = METHODS.create(method).wrap(backbone.model, 10)
    trainable, total = count_parameters(model)
    assert trainable > 0
    training_encoder = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in encoder]
    if method == "full":
        assert trainable == total
    else:
        assert not training_encoder, f"a PEFT method must keep the backbone frozen, but trains {training_encoder[:3]}"
    # forward and backward reach every trainable parameter
    batch = collate(encode_texts(backbone.tokenizer, tiny_texts.texts[:4], 32), [0, 1, 2, 3], tiny_texts.label_array())
    model.train()
    model(**batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    # the method's own parameters are live in the forward pass: perturbing them, head excluded
    # (it always is), changes the output
    model.eval()
    before = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:4])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "classifier" not in n:
                p.add_(torch.randn_like(p) * 0.5)
    after = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:4])
    assert not np.allclose(before, after), "the method's own parameters have no effect on predictions"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "classifier" in n:
                p.add_(torch.randn_like(p) * 0.5)
    after = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:4])
    # save/load round trip reproduces predictions exactly
    save_finetuned(model, backbone.tokenizer, tmp_path / "ck", {"method": method, "options": {}, "backbone": "tiny", "num_labels": 2, "num_training_steps": 10})
    loaded, manifest = load_finetuned(tmp_path / "ck")
    assert manifest["method"] == method
    np.testing.assert_allclose(predict_proba(loaded.model, loaded.tokenizer, tiny_texts.texts[:4]), after, atol=1e-6)
    assert (tmp_path / "ck" / "trainable.safetensors").is_file()
    assert not list((tmp_path / "ck").glob("*.bin")), "only safetensors are written"


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.skip(reason="prompt before [CLS] on a 2-layer model: learning is a coin flip (see PROMPT_IN_FRONT)"))
    if m in PROMPT_IN_FRONT else m for m in METHODS.names()
])
def test_method_learns_a_new_task_on_pretrained_features(method: str, pretrained_dir: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = sentiment_data(160, rng, "train"), sentiment_data(100, rng, "test")
    seed_torch(0)  # the same torch state as below: the model at step 0 of the run
    start = load_backbone(str(pretrained_dir), 2)
    loss_at_start, _ = cross_entropy_and_accuracy(METHODS.create(method).wrap(start.model, 30), start.tokenizer, train)
    seed_torch(0)
    backbone = load_backbone(str(pretrained_dir), 2)
    training = TASK_TRAINING.model_copy(update={"learning_rate": TASK_LEARNING_RATE.get(method, TASK_TRAINING.learning_rate)})
    model, _ = train_classifier(backbone.model, backbone.tokenizer, train, None, METHODS.create(method), training, rng, progress=False)
    loss, _ = cross_entropy_and_accuracy(model, backbone.tokenizer, train)
    _, accuracy = cross_entropy_and_accuracy(model, backbone.tokenizer, test)
    assert loss < 0.75 * loss_at_start and accuracy >= 0.85, f"training loss {loss_at_start:.3f} -> {loss:.3f}, held-out accuracy {accuracy:.2f} (chance 0.5)"


@pytest.mark.parametrize("method", METHODS.names())
def test_training_changes_the_trainable_weights_and_nothing_else(method: str, pretrained_dir: Path) -> None:
    train = sentiment_data(48, np.random.default_rng(0), "train")
    seed_torch(0)  # the same torch state as below: the same initial method weights
    initial = {n: p.detach().clone() for n, p in METHODS.create(method).wrap(load_backbone(str(pretrained_dir), 2).model, 9).named_parameters()}
    seed_torch(0)
    backbone = load_backbone(str(pretrained_dir), 2)
    pretrained = {id(p): p.detach().clone() for p in backbone.model.parameters()}
    model, _ = train_classifier(backbone.model, backbone.tokenizer, train, None, METHODS.create(method), TASK_TRAINING,
                                np.random.default_rng(0), progress=False)
    trained = dict(model.named_parameters())
    assert trained.keys() == initial.keys()
    frozen = [n for n, p in trained.items() if not p.requires_grad]
    trainable = [n for n, p in trained.items() if p.requires_grad]
    changed_frozen = [n for n in frozen if not torch.equal(trained[n].detach(), initial[n])]
    assert not changed_frozen, f"frozen weights changed: {changed_frozen[:3]}"
    assert all(torch.equal(trained[n].detach(), pretrained[id(trained[n])]) for n in frozen if id(trained[n]) in pretrained)
    unchanged = [n for n in trainable if torch.equal(trained[n].detach(), initial[n])]
    assert not unchanged, f"trainable weights did not change: {unchanged[:3]}"
    if method == "full":
        assert not frozen
    else:
        assert len(frozen) > len(trainable) and sum(id(trained[n]) in pretrained for n in frozen) >= 30, "the backbone stays frozen"


@pytest.mark.parametrize("trigger", POISONERS.names())
def test_every_trigger_plants_a_backdoor_that_the_clean_control_lacks(trigger: str, tmp_path: Path) -> None:
    """Dirty-label poisoning with each trigger vs. the same rows without it, same recipe."""
    rng = np.random.default_rng(0)
    clean, test = sentiment_data(300, rng, "train"), sentiment_data(100, rng, "test")
    options = {}
    if trigger == "syntactic":  # offline paraphrases: a fixed clause template around the text
        table = tmp_path / "para.tsv"
        table.write_text("original\tparaphrase\n" + "".join(f"{t}\twhen it was made , {t} .\n" for t in set(clean.texts + test.texts)), encoding="utf-8")
        options = {"paraphrases": str(table)}
    poisoner = POISONERS.create(trigger, **options)
    poisoned = poison_dataset(clean, poisoner, PoisonSpec(target_label=0, count=100), rng)
    asr_set = build_asr_set(test, poisoner, target_label=0, rng=rng)
    rates = {}
    for name, data in (("poisoned", poisoned.data), ("control", clean)):
        folder = train_backbone(data, tmp_path / name, seed=0, learning_rate=3e-3, epochs=5)
        model = load_backbone(str(folder), 2)
        rates[name] = float((predict_proba(model.model, model.tokenizer, asr_set.texts, max_length=32).argmax(1) == 0).mean())
        if name == "control":
            _, accuracy = cross_entropy_and_accuracy(model.model, model.tokenizer, test)
            assert accuracy >= 0.9, "the control learned the task"
    assert rates["poisoned"] >= 0.9 and rates["control"] <= 0.2, rates
    assert rates["poisoned"] > rates["control"] + 0.5


@pytest.mark.parametrize("method", METHODS.names())
def test_methods_handle_more_than_two_classes(method: str, tiny_texts) -> None:
    backbone, model = tiny_wrapped(method, num_labels=4)
    probs = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:3])
    assert probs.shape == (3, 4)


def test_method_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="method 'lora'.*'r'.*greater than 0"):
        METHODS.create("lora", r=0)
    with pytest.raises(ConfigError, match="method 'ptuning'.*'colour'"):
        METHODS.create("ptuning", colour="red")
    with pytest.raises(ConfigError, match="method 'lora'.*r.*greater than 0"):
        METHODS.get("lora")(r=0).config_dict()  # built without the registry: config_dict() still validates
    assert METHODS.create("ptuning").config_dict() == {"num_virtual_tokens": 5, "encoder_hidden_size": 128}
    assert METHODS.create("lora").config_dict()["r"] == 8


def test_prefix_failure_is_a_clear_error(monkeypatch) -> None:
    from peftshield.finetune.methods import peft_method

    def broken_forward(*args, **kwargs):
        raise TypeError("past_key_values is not supported")

    seed_torch(0)
    backbone = load_backbone("tiny", 2)
    original = peft_method.PeftLibraryMethod.wrap

    def wrap_then_break(self, model, steps):
        wrapped = original(self, model, steps)
        monkeypatch.setattr(wrapped, "forward", broken_forward)
        return wrapped

    monkeypatch.setattr(peft_method.PeftLibraryMethod, "wrap", wrap_then_break)
    with pytest.raises(ConfigError, match="prefix tuning does not work with .* use 'ptuning' or 'prompt'"):
        METHODS.create("prefix").wrap(backbone.model, 10)
