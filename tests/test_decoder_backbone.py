"""A decoder backbone (the Llama family SmolLM2-135M belongs to), in the tiny matrix.

``tiny-llama`` is a 2-layer Llama built from a config. Every fine-tuning method must train
on it, change the predictions, save, and reload to the same predictions; a decoder's
classifier reads the last position, so texts are padded on the left, and a text's
prediction must not depend on the length of the texts batched with it (also for the prompt
methods, which feed embeddings, where transformers cannot locate padding itself).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from backdoor_fixtures import sentiment_data, single_thread_torch
from peftshield.finetune import METHODS, TrainingConfig, load_finetuned, save_finetuned, train_classifier
from peftshield.models import load_backbone
from peftshield.models.batching import encode_texts, pad_rows
from peftshield.models.inference import predict_proba


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


def test_tiny_llama_has_a_padding_token_and_prompt_methods_pad_on_the_left() -> None:
    from peftshield.finetune.trainer import pad_for

    backbone = load_backbone("tiny-llama", 2)
    assert type(backbone.model).__name__ == "LlamaForSequenceClassification"
    assert backbone.tokenizer.padding_side == "right" and backbone.model.config.pad_token_id == backbone.tokenizer.pad_token_id
    pad_for(METHODS.get("ptuning").feeds_embeddings, backbone.model, backbone.tokenizer)  # soft prompts are fed as embeddings
    encoded = encode_texts(backbone.tokenizer, ["good", "a very good film with a plot"], 32)
    ids, mask = pad_rows(encoded, [0, 1])
    assert mask[0, -1] == 1 and mask[0, 0] == 0 and ids[0, 0] == encoded.pad_token_id  # the short text ends at the last position
    encoder = load_backbone("tiny", 2)
    pad_for(METHODS.get("ptuning").feeds_embeddings, encoder.model, encoder.tokenizer)
    assert encoder.tokenizer.padding_side == "right"  # encoders read [CLS]: unchanged


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_saves_and_reloads_on_a_decoder(name: str, tmp_path) -> None:
    rng = np.random.default_rng(0)
    data = sentiment_data(64, rng)
    short, long = ["good film"], ["the plot of this film was very boring and the acting was awful , but the story was fun"]
    backbone = load_backbone("tiny-llama", 2)
    before = predict_proba(backbone.model, backbone.tokenizer, data.texts[:16], max_length=32)
    method = METHODS.create(name)
    training = TrainingConfig(learning_rate=1e-2, epochs=1, batch_size=16, max_length=32, select_on_dev=False)
    model, result = train_classifier(backbone.model, backbone.tokenizer, data, None, method, training, rng, progress=False)
    assert np.isfinite(result.epochs[-1].train_loss)
    after = predict_proba(model, backbone.tokenizer, data.texts[:16], max_length=32)
    assert np.abs(after - before).max() > 1e-4, "training changed no prediction"
    # padding invariance: a short text alone and batched with a long one
    alone = predict_proba(model, backbone.tokenizer, short, max_length=32)
    batched = predict_proba(model, backbone.tokenizer, short + long, max_length=32, batch_size=2)[:1]
    # Exact for methods that pass ids. With soft prompts fed as embeddings (left padding), the
    # pads sit between the prompt and the text and shift the text's rotary positions relative
    # to the prompt (peft drops position_ids for prompt methods), so the invariance is only close.
    tolerance = 1e-2 if method.feeds_embeddings else 1e-4
    np.testing.assert_allclose(alone, batched, atol=tolerance, err_msg=f"{name}: the prediction depends on the padding")
    save_finetuned(model, backbone.tokenizer, tmp_path / name, {"method": name, "options": method.config_dict(), "backbone": "tiny-llama",
                                                                "num_labels": 2, "num_training_steps": result.num_training_steps})
    loaded, manifest = load_finetuned(tmp_path / name)
    assert manifest["backbone"] == "tiny-llama"
    assert loaded.tokenizer.padding_side == ("left" if method.feeds_embeddings else "right")
    np.testing.assert_allclose(predict_proba(loaded.model, loaded.tokenizer, data.texts[:16], max_length=32), after, atol=1e-5)


def test_list_names_the_backbones() -> None:
    done = subprocess.run([sys.executable, "-m", "peftshield", "list", "backbones"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip()]
    assert names == ["minilm", "smollm2", "tiny", "tiny-llama"], done.stdout
