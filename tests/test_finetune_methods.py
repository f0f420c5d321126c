"""One contract every registered fine-tuning method passes, on a tiny random BERT (no weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peftshield.attacks import POISONERS, PoisonSpec, poison_dataset
from peftshield.errors import ConfigError
from peftshield.finetune import METHODS, TrainingConfig, count_parameters, load_finetuned, save_finetuned, seed_torch, train_classifier
from peftshield.models import load_backbone
from peftshield.models.batching import collate, encode_texts
from peftshield.models.inference import predict_proba

TRAINING = TrainingConfig(epochs=1, batch_size=8, max_length=32)


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
    # the method's parameters are live in the forward pass: perturbing them changes the output
    model.eval()
    before = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:4])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    after = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:4])
    assert not np.allclose(before, after), "trainable parameters have no effect on predictions"
    # save/load round trip reproduces predictions exactly
    save_finetuned(model, backbone.tokenizer, tmp_path / "ck", {"method": method, "options": {}, "backbone": "tiny", "num_labels": 2, "num_training_steps": 10})
    loaded, manifest = load_finetuned(tmp_path / "ck")
    assert manifest["method"] == method
    np.testing.assert_allclose(predict_proba(loaded.model, loaded.tokenizer, tiny_texts.texts[:4]), after, atol=1e-6)
    assert (tmp_path / "ck" / "trainable.safetensors").is_file()
    assert not list((tmp_path / "ck").glob("*.bin")), "only safetensors are written"


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("trigger", ["badnet", "insent", "syntactic"])
def test_every_poisoner_with_every_method_trains(method: str, trigger: str, tiny_texts, tmp_path: Path) -> None:
    options = {}
    if trigger == "syntactic":
        table = tmp_path / "para.tsv"
        table.write_text("original\tparaphrase\n" + "".join(f"{t}\twhen it was , {t} .\n" for t in set(tiny_texts.texts)), encoding="utf-8")
        options = {"paraphrases": str(table)}
    poisoned = poison_dataset(tiny_texts, POISONERS.create(trigger, **options), PoisonSpec(target_label=1, rate=0.25), np.random.default_rng(0))
    seed_torch(0)
    backbone = load_backbone("tiny", 2)
    model, result = train_classifier(backbone.model, backbone.tokenizer, poisoned.data, tiny_texts, METHODS.create(method), TRAINING, np.random.default_rng(0), progress=False)
    assert result.epochs and np.isfinite(result.epochs[0].train_loss)
    assert result.best_dev_accuracy is not None and 0.0 <= result.best_dev_accuracy <= 1.0
    probs = predict_proba(model, backbone.tokenizer, poisoned.data.texts[:5])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS.names())
def test_methods_handle_more_than_two_classes(method: str, tiny_texts) -> None:
    backbone, model = tiny_wrapped(method, num_labels=4)
    probs = predict_proba(model, backbone.tokenizer, tiny_texts.texts[:3])
    assert probs.shape == (3, 4)


def test_method_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="method 'lora': r: Input should be greater than 0"):
        METHODS.create("lora", r=0).config()
    with pytest.raises(ConfigError, match="method 'ptuning'"):
        METHODS.create("ptuning", colour="red").config()
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
