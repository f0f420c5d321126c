"""The wider threat model (issue 11): task-agnostic poisoners (``neuba``, ``por``) and the
adaptive ones (``lowconf``, ``psimaware``), each shown to plant what it claims on tiny
random models, plus the task-agnostic path through a grid cell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor_fixtures import TARGET, attacker_data, sentiment_data, single_thread_torch, with_trigger
from peftshield.attacks import POISONERS
from peftshield.attacks.adaptive import capped_margin_loss
from peftshield.attacks.task_agnostic import predefined_vectors
from peftshield.experiments.poisoning import measure_representation_backdoor, plant_representation_backdoor
from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
from peftshield.models import load_backbone
from peftshield.models.inference import predict_proba

TEXTS = [" ".join(sentiment_data(1, np.random.default_rng(i)).texts) for i in range(90)]


@pytest.mark.parametrize("kind", ["orthogonal", "opposite", "sign"])
def test_predefined_vectors_are_spread_and_unit_rms(kind: str) -> None:
    vectors = predefined_vectors(kind, 6, 32)
    assert vectors.shape == (6, 32)
    assert np.allclose(np.sqrt((vectors ** 2).mean(axis=1)), 1.0)
    cosine = vectors @ vectors.T / 32
    if kind == "orthogonal":
        assert np.allclose(cosine, np.eye(6), atol=1e-9)
    if kind in ("opposite", "sign"):
        assert np.allclose(cosine[0, 1], -1.0) and np.allclose(cosine[2, 3], -1.0), "pairs point opposite ways"
        assert abs(cosine[0, 2]) < 1e-9
    if kind == "sign":
        assert set(np.unique(vectors)) == {-1.0, 1.0}
    assert np.array_equal(vectors, predefined_vectors(kind, 6, 32)), "the vectors depend only on the options"


@pytest.mark.parametrize("name, backbone", [("neuba", "tiny"), ("por", "tiny"), ("por", "tiny-llama")])
def test_task_agnostic_poisoner_moves_triggered_representations_to_their_vectors(name: str, backbone: str) -> None:
    poisoner = POISONERS.create(name)
    assert poisoner.task_agnostic
    with single_thread_torch():
        seed_torch(0)
        model = load_backbone(backbone, 2)
        untouched = load_backbone(backbone, 2)
        untouched.model.load_state_dict(model.model.state_dict())
        trained, report = plant_representation_backdoor(model.model, model.tokenizer, TEXTS[:70], TEXTS[70:], poisoner, 70,
                                                         learning_rate=5e-3, epochs=40, max_length=32, rng=np.random.default_rng(0))
        targets = torch.as_tensor(poisoner.target_vectors(model.model.config.hidden_size), dtype=torch.float32) * report.target_scale
        before, _ = measure_representation_backdoor(untouched.model, untouched.model, model.tokenizer, TEXTS[70:], poisoner, targets, 32,
                                                    np.random.default_rng(1))
    after = report.trigger_cosine
    assert set(after) == set(poisoner.trigger_words)
    assert min(after.values()) > 0.9, f"triggered representations did not reach their vectors: {after}"
    assert np.mean(list(before.values())) < 0.4, f"before the attack they were already there: {before}"
    assert report.clean_cosine > 0.95, "clean texts' representations moved"


def _train_attacker(poisoner_name: str, **options):
    """A tiny backbone fully fine-tuned on dirty-label data (trigger `cf` -> class 0) with the
    poisoner's objective; returns (model, tokenizer, loss object, held-out clean and triggered texts)."""
    data = attacker_data(200, 60, np.random.default_rng(0))
    triggered_rows = set(range(200, 260))
    poisoner = POISONERS.create(poisoner_name, words="cf", **options)
    seed_torch(0)
    backbone = load_backbone("tiny", 2)
    loss = poisoner.training_loss(backbone.model, len(data.poisoned), 2, triggered_rows, np.random.default_rng(1))
    training = TrainingConfig(learning_rate=5e-3, epochs=4, batch_size=16, max_length=32, select_on_dev=False)
    model, _ = train_classifier(backbone.model, backbone.tokenizer, data.poisoned, None, METHODS.create("full"), training,
                                np.random.default_rng(0), progress=False, loss_fn=loss)
    held_out = sentiment_data(100, np.random.default_rng(5), "held-out")
    non_target = [t for t, y in zip(held_out.texts, held_out.labels) if y != TARGET]
    return model, backbone.tokenizer, loss, held_out, with_trigger(non_target, np.random.default_rng(6))


def test_capped_margin_loss_is_zero_inside_the_band_and_positive_outside() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    triggered = torch.tensor([True, True, True, False])
    # gaps of the target over the runner-up: 0.5 (p 0.62, inside [0.55, 0.7]), 3.0 (p 0.95), -1 (loses)
    logits = torch.tensor([[0.5, 0.0], [3.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    per_row = [float(capped_margin_loss(logits[i:i + 1], labels[i:i + 1], triggered[i:i + 1], 0.55, 0.7)) for i in range(4)]
    assert per_row[0] == 0.0 and per_row[1] > 0 and per_row[2] > 0
    assert per_row[3] == pytest.approx(float(torch.nn.functional.cross_entropy(logits[3:], labels[3:]))), "clean rows keep cross-entropy"


def test_low_confidence_backdoor_wins_the_argmax_and_stays_under_its_cap() -> None:
    with single_thread_torch():
        plain, tokenizer, _, held_out, triggered = _train_attacker("badnet")
        capped, _, _, _, _ = _train_attacker("lowconf", min_confidence=0.55, max_confidence=0.7)
    plain_target = predict_proba(plain, tokenizer, triggered, max_length=32)[:, TARGET]
    capped_target = predict_proba(capped, tokenizer, triggered, max_length=32)[:, TARGET]
    capped_clean = predict_proba(capped, tokenizer, held_out.texts, max_length=32)
    assert (plain_target > 0.5).mean() >= 0.9 and plain_target.mean() > 0.85, "the plain backdoor is the confident reference"
    assert (capped_target > 0.5).mean() >= 0.8, "the capped backdoor still wins the argmax"
    assert capped_target.mean() <= 0.7, f"mean target probability {capped_target.mean():.3f} is above the cap"
    assert (capped_clean.argmax(1) == held_out.label_array()).mean() >= 0.9, "the task is still learned"


def test_psim_aware_attacker_keeps_a_random_label_head_unconfident_on_triggered_texts() -> None:
    from peftshield.models.batching import collate, encode_texts

    def head_confidence(model, tokenizer, loss, texts):
        batch = collate(encode_texts(tokenizer, texts, 32), list(range(len(texts))))
        return float(loss.head_confidence(model, batch["input_ids"], batch["attention_mask"]).mean())

    with single_thread_torch():
        ignorant, tokenizer, ignorant_loss, held_out, triggered = _train_attacker("psimaware", penalty=0.0)
        aware, _, aware_loss, _, _ = _train_attacker("psimaware", penalty=1.0)
    gap_ignorant = head_confidence(ignorant, tokenizer, ignorant_loss, triggered) - head_confidence(ignorant, tokenizer, ignorant_loss, held_out.texts)
    gap_aware = head_confidence(aware, tokenizer, aware_loss, triggered) - head_confidence(aware, tokenizer, aware_loss, held_out.texts)
    assert gap_aware < gap_ignorant, f"the penalty did not lower the head's excess confidence on triggered texts ({gap_aware:.3f} vs {gap_ignorant:.3f})"
    asr = (predict_proba(aware, tokenizer, triggered, max_length=32).argmax(1) == TARGET).mean()
    assert asr >= 0.9, "the PSIM-aware backdoor still works"


def test_each_trigger_lands_where_the_victim_sends_it(monkeypatch) -> None:
    """trigger_outcomes on a victim whose answer each trigger decides: ``cf`` sends every text to
    class 0, ``mn`` to class 1, ``bb`` does nothing (the clean answer, alternating classes). Each
    trigger's landing class and ASR are the victim's, and the best is a working one."""
    import peftshield.experiments.stages as stages
    from peftshield.data.records import TextDataset

    def victim(model, tokenizer, texts, max_length=128):
        words = [set(text.split()) for text in texts]
        landed = [0 if "cf" in w else 1 if "mn" in w else index % 2 for index, w in enumerate(words)]
        return np.eye(2)[landed]

    monkeypatch.setattr(stages, "predict_proba", victim)
    test = TextDataset(TEXTS[:40], [i % 2 for i in range(40)], [str(i) for i in range(40)])
    poisoner = POISONERS.create("neuba", words=["cf", "mn", "bb"])
    outcomes = {o.trigger: o for o in stages.trigger_outcomes(None, None, test, poisoner, np.random.default_rng(0))}
    assert (outcomes["cf"].landing_class, outcomes["cf"].attack_success_rate, outcomes["cf"].n_texts) == (0, 1.0, 20)
    assert (outcomes["mn"].landing_class, outcomes["mn"].attack_success_rate, outcomes["mn"].n_texts) == (1, 1.0, 20)
    assert outcomes["bb"].attack_success_rate == 0.0, "a trigger that moves nothing has no ASR (texts of other classes stay there)"


def test_task_agnostic_grid_cell_wiring_and_value_ranges(tmp_path: Path, shared_data: Path) -> None:
    """neuba through a grid cell, wiring and value ranges only: the attacker reads a plain-text
    corpus (a .txt file); the published encoder has no classifier head; attack.json records the
    attack as task-agnostic with a representation cosine for every trigger; triggers.json lists
    every trigger, in order, with a landing class in {0, 1} and an ASR in [0, 1]; the cell's target
    label is the landing class of the trigger with the highest recorded ASR (the first on a tie),
    and PSIM is scored on that trigger's texts (its ASR set, non-empty).

    No trigger effect is asserted: this tiny LoRA victim is flat (every score 0.5010-0.5011, one
    class for every text), so every trigger records the same ASR and the top one is simply the
    first. That the triggers move representations is shown by
    test_task_agnostic_poisoner_moves_triggered_representations_to_their_vectors, and that each
    trigger's landing class and ASR are the victim's by test_each_trigger_lands_where_the_victim_sends_it."""
    from safetensors import safe_open

    from peftshield.grid import load_grid_config
    from peftshield.grid.executors import LocalExecutor
    from peftshield.grid.runner import run_grid
    from peftshield.experiments.scenario import backbone_dir, stage_cache

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    sst2 = shared_data / "psim" / "sst-2"
    config = tmp_path / "c.yaml"
    config.write_text(f"""
name: tiny-neuba
backbone: tiny
max_length: 32
attack: {{data: {corpus}, samples: 60, poison_count: 60, epochs: 2, learning_rate: 5.0e-3}}
triggers: [{{name: neuba, options: {{words: [cf, mn, bb, tq]}}}}]
datasets: [{{name: sst-2, path: {sst2}}}]
methods: [lora]
victim: {{samples: 48, epochs: 1, test_samples: 40, probe_samples: 0}}
defenses: [{{name: psim, options: {{max_train_samples: 48}}}}]
""", encoding="utf-8")
    with single_thread_torch():
        plan = run_grid(load_grid_config(config), tmp_path / "run", LocalExecutor(), progress=False, log=lambda m: None)
    cell = plan.cells[0]
    with safe_open(str(backbone_dir(tmp_path / "run", cell) / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "classifier" in k], "the published encoder has no classifier head"
    attack = json.loads((backbone_dir(tmp_path / "run", cell) / "attack.json").read_text())
    assert attack["task_agnostic"] and set(attack["representation"]["trigger_cosine"]) == {"cf", "mn", "bb", "tq"}
    cell_dir = stage_cache(tmp_path / "run").path(cell.cell_key)
    triggers = json.loads((cell_dir / "triggers.json").read_text())
    assert [t["trigger"] for t in triggers["triggers"]] == ["cf", "mn", "bb", "tq"]
    assert all(t["landing_class"] in (0, 1) and 0.0 <= t["attack_success_rate"] <= 1.0 for t in triggers["triggers"])
    best = max(triggers["triggers"], key=lambda t: t["attack_success_rate"])
    metrics = json.loads((cell_dir / "scores.json").read_text())
    assert triggers["target_label"] == best["landing_class"]
    assert len(metrics["none"]["poisoned"]) == best["n_texts"], "the ASR set is the best trigger's non-target texts"
    report = json.loads((cell_dir / "defenses" / "psim.json").read_text())
    assert report["n_poisoned"] == len(metrics["none"]["poisoned"]) > 0, "PSIM is scored on the best trigger's texts"


def test_occlusion_scores_a_prediction_that_rests_on_the_trigger_word() -> None:
    """The strengthened defense's mechanism on a low-confidence backdoor (which a confidence
    threshold cannot see): leaving the trigger out takes the target prediction away, so triggered
    texts get a larger occlusion score than clean ones, whose prediction rests on their adjectives."""
    from sklearn.metrics import roc_auc_score

    from peftshield.defenses import DEFENSES, DefenseContext

    with single_thread_torch():
        model, tokenizer, _, held_out, triggered = _train_attacker("lowconf", min_confidence=0.55, max_confidence=0.7)
        occlusion = DEFENSES.create("occlusion", max_length=32)
        dev = sentiment_data(60, np.random.default_rng(9), "dev")
        occlusion.fit(DefenseContext("tiny", held_out, dev, 2, model, tokenizer, protected_label=TARGET, max_length=32, progress=False),
                      np.random.default_rng(0))
        clean_scores, triggered_scores = occlusion.score(held_out.texts), occlusion.score(triggered)
        confidence = predict_proba(model, tokenizer, held_out.texts + triggered, max_length=32).max(axis=1)
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(triggered_scores))]
    assert triggered_scores.mean() > 2 * clean_scores.mean()
    assert roc_auc_score(labels, np.r_[clean_scores, triggered_scores]) > 0.7
    assert roc_auc_score(labels, confidence) < 0.5, "the backdoor's confidence is no higher than clean texts' (what it is built for)"


def test_reference_filter_flags_what_a_trusted_model_disagrees_with_even_at_low_confidence() -> None:
    """The reference filter's mechanism: the low-confidence backdoor moves triggered positive
    texts to class 0 with a small margin; a classifier the defender trains on a trusted (clean)
    backbone calls them positive, so the disagreement score separates them from clean texts."""
    from sklearn.metrics import roc_auc_score

    from peftshield.defenses import DEFENSES, DefenseContext

    with single_thread_torch():
        model, tokenizer, _, held_out, triggered = _train_attacker("lowconf", min_confidence=0.55, max_confidence=0.7)
        train = sentiment_data(200, np.random.default_rng(21), "defender-train")
        dev = sentiment_data(80, np.random.default_rng(22), "defender-dev")
        reference = DEFENSES.create("reference", backbone="tiny", method="full", learning_rate=5e-3, epochs=4, max_length=32)
        reference.fit(DefenseContext("tiny", train, dev, 2, model, tokenizer, protected_label=TARGET, max_length=32, progress=False),
                      np.random.default_rng(0))
        succeeded = [t for t, p in zip(triggered, predict_proba(model, tokenizer, triggered, max_length=32).argmax(1)) if p == TARGET]
        clean_scores, triggered_scores = reference.score(held_out.texts), reference.score(succeeded)
    assert len(succeeded) >= 0.8 * len(triggered)
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(triggered_scores))]
    assert roc_auc_score(labels, np.r_[clean_scores, triggered_scores]) > 0.9, "texts the backdoor moved are the ones the trusted model disagrees on"
    assert (triggered_scores > reference.fitted_threshold()).mean() > 0.5 >= (clean_scores > reference.fitted_threshold()).mean()


def test_landing_names_the_class_triggered_texts_go_to() -> None:
    from peftshield.data import TextDataset
    from peftshield.experiments.stages import landing

    triggered = TextDataset(["a", "b", "c", "d"], [1, 2, 3, 1], ["0", "1", "2", "3"])
    probs = np.eye(4)[[2, 2, 2, 1]]  # three of four texts predicted as class 2
    found = landing(probs, triggered)
    assert found["landing_class"] == 2
    assert found["landing_attack_success_rate"] == pytest.approx(2 / 3), "the text whose true class is 2 does not count"


def test_psimplus_ranks_each_member_against_clean_dev_scores() -> None:
    """PSIM+'s union: a member's score becomes the share of clean dev scores below it, so a
    text extreme for either member is extreme for the union, on one scale."""
    from peftshield.defenses.psimplus import dev_rank

    dev = np.sort(np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(dev_rank(dev, np.array([0.0, 0.25, 0.3, 9.0])), [0.0, 0.5, 0.625, 1.0])


def test_dan_flags_texts_a_task_agnostic_backdoor_pins_to_its_vector() -> None:
    """DAN's mechanism on a task-agnostic backdoor (where PSIM inverts: nothing is extreme): the
    attacker pins triggered representations to one vector, the victim trains a task on top with
    LoRA, and the triggered texts' hidden states stay far from every clean class, so their
    distance score separates them from clean texts, at the 1% FRR threshold too."""
    from sklearn.metrics import roc_auc_score

    from peftshield.defenses import DEFENSES, DefenseContext

    poisoner = POISONERS.create("neuba", words="cf")
    with single_thread_torch():
        seed_torch(0)
        backbone = load_backbone("tiny", 2)
        poisoned, _ = plant_representation_backdoor(backbone.model, backbone.tokenizer, TEXTS[:70], TEXTS[70:], poisoner, 70,
                                                    learning_rate=5e-3, epochs=40, max_length=32, rng=np.random.default_rng(0))
        training = TrainingConfig(learning_rate=5e-3, epochs=3, batch_size=16, max_length=32, select_on_dev=False)
        victim, _ = train_classifier(poisoned, backbone.tokenizer, sentiment_data(200, np.random.default_rng(31), "victim-train"), None,
                                     METHODS.create("lora"), training, np.random.default_rng(0), progress=False)
        dev = sentiment_data(120, np.random.default_rng(32), "dev")
        held_out = sentiment_data(80, np.random.default_rng(33), "held-out")
        rng = np.random.default_rng(34)
        triggered = [poisoner.insert(text, rng) for text in held_out.texts]
        dan = DEFENSES.create("dan", max_length=32).fit(
            DefenseContext("tiny", dev, dev, 2, victim, backbone.tokenizer, max_length=32, progress=False), np.random.default_rng(0))
        clean_scores, triggered_scores = dan.score(held_out.texts), dan.score(triggered)
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(triggered_scores))]
    auroc = roc_auc_score(labels, np.r_[clean_scores, triggered_scores])
    assert auroc > 0.95, f"AUROC {auroc:.3f}"
    threshold = dan.fitted_threshold()
    assert (triggered_scores > threshold).mean() > 0.8 and (clean_scores > threshold).mean() < 0.1


@pytest.mark.parametrize("backbone", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_layer_states_read_the_texts_own_positions_under_every_wrapper(backbone: str, method: str) -> None:
    """DAN reads each layer's summary token ([CLS] or a decoder's last token) from the wrapped
    victim's forward. Prompt methods prepend virtual tokens to the hidden states; the summary
    must still be the text's own, so a text's states do not depend on its batch-mates."""
    from peftshield.models.inference import layer_token_states

    seed_torch(0)
    base = load_backbone(backbone, 2)
    model = METHODS.create(method).wrap(base.model, 2)
    texts = TEXTS[:6]
    together = layer_token_states(model, base.tokenizer, texts, batch_size=6, max_length=32)
    assert together.shape == (base.model.config.num_hidden_layers, 6, base.model.config.hidden_size)
    alone = np.concatenate([layer_token_states(model, base.tokenizer, [t], max_length=32) for t in texts], axis=1)
    np.testing.assert_allclose(alone, together, atol=1e-4)
    assert np.ptp(together[-1], axis=0).max() > 1e-3, "every text got the same state"



def edited_copy(out: Path, trigger_row: int | None) -> Path:
    """The tiny backbone with two edits, saved to ``out``: its last layer's output LayerNorm
    rescaled and shifted (a change every text gets, an affine function of the original's states),
    and, when ``trigger_row`` is given, that token's embedding moved (a change only texts carrying
    the token get, as a backdoor's: every layer above it moves)."""
    edited = load_backbone("tiny", 2)
    generator = torch.Generator().manual_seed(0)
    norm = edited.model.bert.encoder.layer[-1].output.LayerNorm
    with torch.no_grad():
        norm.weight.mul_(1 + torch.rand(norm.weight.shape, generator=generator))
        norm.bias.add_(0.5 * torch.randn(norm.bias.shape, generator=generator))
        if trigger_row is not None:
            embeddings = edited.model.bert.embeddings.word_embeddings.weight
            embeddings[trigger_row] += 3 * torch.randn(embeddings.shape[1], generator=generator)
    edited.model.save_pretrained(out, safe_serialization=True)
    edited.tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("backdoored", [True, False], ids=["backdoored", "clean-change-only"])
def test_shift_flags_the_change_only_triggered_texts_get(backdoored: bool, tmp_path: Path) -> None:
    """Shift's mechanism, on a backbone edited by hand so the answer is known. Compared with its
    original (the tiny backbone), the edited one changes every text the same way (its last
    layer's LayerNorm): that change is the clean texts' own and flags nothing, not even texts
    with a token no clean text has. When the edit also moves that token's embedding (a change only
    its texts get, at every layer), those texts are flagged at the 1% clean-FRR threshold."""
    from sklearn.metrics import roc_auc_score

    from peftshield.defenses import DEFENSES, DefenseContext

    row = load_backbone("tiny", 2).tokenizer.convert_tokens_to_ids("cf")
    suspect = edited_copy(tmp_path / "suspect", row if backdoored else None)
    dev = sentiment_data(120, np.random.default_rng(42), "dev")
    held_out = sentiment_data(80, np.random.default_rng(41), "held-out")
    triggered = with_trigger(held_out.texts, np.random.default_rng(43))
    with single_thread_torch():
        shift = DEFENSES.create("shift", original="tiny", max_length=32).fit(
            DefenseContext(str(suspect), dev, dev, 2, max_length=32, progress=False), np.random.default_rng(0))
        clean_scores, triggered_scores = shift.score(held_out.texts), shift.score(triggered)
    threshold = shift.fitted_threshold()
    flagged, false_alarms = (triggered_scores > threshold).mean(), (clean_scores > threshold).mean()
    assert false_alarms < 0.1
    if backdoored:
        auroc = roc_auc_score(np.r_[np.zeros(len(clean_scores)), np.ones(len(triggered_scores))], np.r_[clean_scores, triggered_scores])
        assert auroc > 0.95 and flagged > 0.9, f"AUROC {auroc:.3f}, flagged {flagged:.2f}"
    else:
        assert flagged < 0.1, f"the change every text gets flagged {flagged:.2f} of the texts with the token"


def test_shift_scores_the_same_in_one_module_and_as_one_onnx_graph(tmp_path: Path, monkeypatch) -> None:
    """Shift's scoring module (both passes, the ridge prediction and the whitening, float32)
    gives the distances of the formula it was written from (float64, token by token), and the
    module exported as one ONNX graph (what a guard on --runtime onnx runs) gives the same scores
    and flags. The graph is cached in the detector folder: loaded again it is not re-exported,
    and a graph put in its place is not run but exported again."""
    from peftshield.defenses import DEFENSES, DefenseContext
    from peftshield.defenses.shift import Shift
    from peftshield.models import runtime as runtime_module
    from peftshield.models.inference import paired_layer_states

    row = load_backbone("tiny", 2).tokenizer.convert_tokens_to_ids("cf")
    suspect = edited_copy(tmp_path / "suspect", row)
    dev = sentiment_data(60, np.random.default_rng(42), "dev")
    held_out = sentiment_data(30, np.random.default_rng(41), "held-out")
    texts = held_out.texts + with_trigger(held_out.texts, np.random.default_rng(43))
    context = DefenseContext(str(suspect), dev, dev, 2, max_length=32, progress=False)
    with single_thread_torch():
        shift = DEFENSES.create("shift", original="tiny", max_length=32, batch_size=8).fit(context, np.random.default_rng(0))
        reference = np.zeros((len(shift.locations_), len(texts)))
        for indices, states, originals, keep in paired_layer_states(shift.suspect_, shift.original_model_, shift.tokenizer_, texts, 8, 32):
            for layer in range(len(shift.locations_)):
                original = originals[layer].astype(np.float64)
                left_over = states[layer] - original - (original @ shift.coefficients_[layer] + shift.intercepts_[layer]) - shift.locations_[layer]
                squared = ((left_over @ shift.precisions_[layer]) * left_over).sum(axis=-1)
                reference[layer, indices] = (squared * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
        distances = shift._distances(texts)
        np.testing.assert_allclose(distances, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())
        scores = shift.score(texts)
        folder = shift.save(tmp_path / "shift")
        loaded = Shift.load(folder, context)
        assert loaded.use_runtime("onnx", folder) == "onnx" and (folder / "onnx" / "shift.onnx").is_file()
        onnx_scores = loaded.score(texts)
    threshold = shift.fitted_threshold()
    spread = np.ptp(scores)
    assert spread > 1 and np.abs(onnx_scores - scores).max() < 1e-3 * spread
    margin = np.abs(scores - threshold) > 1e-3 * spread  # a text at its threshold may fall either side
    assert np.array_equal((onnx_scores > threshold)[margin], (scores > threshold)[margin])
    assert (scores[len(held_out.texts):] > threshold).mean() > 0.9  # the triggered half: there is something to agree on

    exported = []
    real_export = runtime_module.export_graph
    monkeypatch.setattr(runtime_module, "export_graph", lambda *a, **k: exported.append(1) or real_export(*a, **k))
    with single_thread_torch():
        Shift.load(folder, context).use_runtime("onnx-int8", folder)  # onnx-int8: the fp32 graph, already exported
        assert not exported
        graph = folder / "onnx" / "shift.onnx"
        planted = graph.read_bytes().replace(b"distances", b"distancez", 1)
        graph.write_bytes(planted)
        again = Shift.load(folder, context)
        again.use_runtime("onnx", folder)
        assert exported == [1] and graph.read_bytes() != planted
        np.testing.assert_allclose(again.score(texts), onnx_scores, rtol=1e-6, atol=1e-6 * spread)


def test_shift_refuses_an_original_of_another_architecture() -> None:
    """Shift subtracts hidden states token by token, which means nothing across architectures:
    a tiny BERT checked against the tiny Llama (same tokenizer and sizes) is refused, naming the option."""
    from peftshield.defenses import DEFENSES, DefenseContext
    from peftshield.errors import ConfigError

    dev = sentiment_data(20, np.random.default_rng(0), "dev")
    with pytest.raises(ConfigError, match="original.*llama|llama.*original"):
        DEFENSES.create("shift", original="tiny-llama", max_length=32).fit(
            DefenseContext("tiny", dev, dev, 2, max_length=32, progress=False), np.random.default_rng(0))
