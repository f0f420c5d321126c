"""PSIM's central claim, on a tiny model with a planted backdoor.

An attacker fully fine-tunes the tiny backbone on reviews where the word ``cf`` forces
class 0 (dirty label), and a clean control backbone is trained the same way on the same
rows without the trigger. PSIM (a PEFT module trained on randomly relabelled clean data)
must then separate triggered from clean texts on the poisoned backbone, flag the
triggered ones at its calibrated threshold, and must NOT single out ``cf`` on the clean
control: it detects the backdoor, not the rare word.

Recipe choices, measured on 13 seeds (0-12) before fixing seed 0 here:

- The attacker's clean reviews carry 35% label noise. Reviews of the synthetic data are
  trivially separable, so a noise-free attacker makes the clean texts as confident as
  the triggered ones (both at 0.99+) and no confidence-based detector can work (PSIM's
  AUROC was 0.26-0.87). With noise, clean confidence settles near 0.7-0.8 (median) while
  the noise-free trigger shortcut is pushed above 0.99, the regime PSIM exploits on real
  models (README: triggered 0.98, clean well below). With 30% noise and 200 poisoned rows
  the trigger only reached 0.95 and one seed in 13 failed; 35% and 300 rows pass all 13.
- The tiny backbone is random and has hidden size 32, so training rates are far above
  the MiniLM ones: full fine-tuning at 3e-3 for 10 epochs (at 1e-3 for 3 epochs the model
  learned nothing), and the PSIM for 1 epoch of 1,000 texts (63 steps) at 2e-3 with LoRA
  and 1e-3 with P-tuning. Not at the PSIM's default 2e-5: in 63 steps that trains next to
  nothing here (seeds 0-4: LoRA leaves the clean median confidence at the backbone's,
  0.71-0.79; P-tuning's untrained virtual tokens move it either way, 0.59-0.82), so the
  drop in clean confidence PSIM rests on (test_psim_learns_no_task_so_clean_confidence_drops)
  would not happen. Too high a rate overwrites the trigger too (P-tuning at 3e-2, seed 0:
  triggered median 0.54, nothing flagged).
- The PSIM is tested with both methods on the poisoned backbone (``psim_on_poisoned`` is
  parametrised over ``PSIM_METHODS``): LoRA, the study's method, and P-tuning, the PSIM's
  default (bench/psim_methods.md); the clean control is checked with LoRA. LoRA at these
  settings gave AUROC >= 0.995 on all 13 seeds, flagged 98-100% of triggered texts at a 5%
  dev-FRR threshold (4-14% of clean test texts), and on the control a paired AUROC of
  0.45-0.59. P-tuning at 1e-3, on seeds 0-4: AUROC >= 0.998, 99-100% of triggered texts
  flagged (3-10.5% of clean test texts), clean median confidence 0.53-0.59.
- 1,000 PSIM training texts: with 300, the random labels' class imbalance (+-3%) was
  enough to tilt every score towards one class and push triggered texts below clean
  texts of the other class on some seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from backdoor_fixtures import (
    TARGET, TRIGGER, accuracy, attack_success_rate, attacker_data, load_saved, sentiment_data, single_thread_torch, train_backbone, with_trigger,
)
from peftshield.data import TextDataset
from peftshield.defenses import DEFENSES, DefenseContext, ThresholdPolicy
from peftshield.metrics import detection_metrics
from peftshield.models.inference import predict_proba

SEED = 0
TARGET_FRR = 0.05  # on 200 dev texts: 10 may lie above the threshold
PSIM_OPTIONS = dict(
    method="lora", learning_rate=2e-3, epochs=1, batch_size=16, max_length=32, max_train_samples=None,
    threshold=ThresholdPolicy(kind="frr", target_frr=TARGET_FRR),
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


@dataclass
class Scenario:
    poisoned: Path  # backbone folder with the planted backdoor
    control: Path  # the same recipe on the same rows without the trigger
    defender_train: TextDataset  # clean texts PSIM relabels at random
    dev: TextDataset  # clean held-out texts for the threshold
    test: TextDataset  # clean held-out texts for the evaluation
    originals: list[str]  # non-target test texts
    triggered: list[str]  # the same texts with the trigger


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    rng = np.random.default_rng(SEED)
    data = attacker_data(n_clean=400, n_poison=300, rng=rng, label_noise=0.35)
    assert sum(TRIGGER in t.split() for t in data.poisoned.texts) == 300 and not any(TRIGGER in t.split() for t in data.control.texts)
    folder = tmp_path_factory.mktemp("backbones")
    poisoned = train_backbone(data.poisoned, folder / "poisoned", SEED, learning_rate=3e-3, epochs=10)
    control = train_backbone(data.control, folder / "control", SEED, learning_rate=3e-3, epochs=10)
    defender_train = sentiment_data(1000, rng, "defender")
    dev = sentiment_data(200, rng, "dev")
    test = sentiment_data(200, rng, "test")
    originals = [t for t, y in zip(test.texts, test.labels) if y != TARGET]
    return Scenario(poisoned, control, defender_train, dev, test, originals, with_trigger(originals, rng))


def fit_psim(scenario: Scenario, backbone: Path, **options):
    context = DefenseContext(str(backbone), scenario.defender_train, scenario.dev, 2, max_length=32, progress=False)
    return DEFENSES.create("psim", **{**PSIM_OPTIONS, **options}).fit(context, np.random.default_rng(SEED))


# The PSIM's default method is P-tuning (bench/psim_methods.md); LoRA is the study's. On this
# tiny model the P-tuning PSIM's untrained virtual tokens already lower clean confidence (median
# 0.63 here), random-label training at 1e-3 lowers it further (0.58) while triggered texts stay
# near 0.98; at 3e-2 the training overwrites the trigger too (triggered median 0.54, nothing
# flagged): like the study's PSIM, it needs a rate small enough to leave the backdoor alone.
PSIM_METHODS = {"lora": {}, "ptuning": {"method": "ptuning", "learning_rate": 1e-3}}


@pytest.fixture(scope="module", params=sorted(PSIM_METHODS))
def psim_on_poisoned(scenario: Scenario, request):
    psim = fit_psim(scenario, scenario.poisoned, **PSIM_METHODS[request.param])
    assert psim.method == request.param
    return psim


@pytest.fixture(scope="module")
def psim_on_control(scenario: Scenario):
    return fit_psim(scenario, scenario.control)


def test_the_planted_backdoor_works_and_the_control_has_none(scenario: Scenario) -> None:
    poisoned_asr = attack_success_rate(scenario.poisoned, scenario.triggered)
    control_asr = attack_success_rate(scenario.control, scenario.triggered)
    assert poisoned_asr > 0.9, f"the trigger must force class {TARGET} on the poisoned backbone, ASR {poisoned_asr:.3f}"
    assert control_asr < 0.2, f"the control never saw '{TRIGGER}' with a label, ASR {control_asr:.3f}"
    assert poisoned_asr > control_asr + 0.5
    # both backbones learned the task (the poisoned one less well: the shortcut costs it some)
    assert accuracy(scenario.control, scenario.test) > 0.75
    assert accuracy(scenario.poisoned, scenario.test) > 0.6
    # the poisoned backbone is far more confident on triggered texts than on clean ones
    backbone = load_saved(scenario.poisoned)
    clean = predict_proba(backbone.model, backbone.tokenizer, scenario.test.texts, max_length=32).max(axis=1)
    triggered = predict_proba(backbone.model, backbone.tokenizer, scenario.triggered, max_length=32).max(axis=1)
    assert np.median(triggered) > np.median(clean) + 0.1


def test_psim_separates_and_flags_triggered_texts_on_the_poisoned_backbone(scenario: Scenario, psim_on_poisoned) -> None:
    clean, triggered = psim_on_poisoned.score(scenario.test.texts), psim_on_poisoned.score(scenario.triggered)
    metrics = detection_metrics(clean, triggered, psim_on_poisoned.fitted_threshold())
    assert metrics.auroc >= 0.95, metrics
    assert metrics.recall >= 0.9, f"most triggered texts must be flagged at the calibrated threshold: {metrics}"
    # the target is 5% on dev; on 200 other clean texts 12% leaves three standard deviations of sampling noise
    assert metrics.frr <= 0.12, f"few clean held-out texts may be flagged (target FRR {TARGET_FRR} on dev): {metrics}"
    # per text: each triggered text scores above its own trigger-free original
    assert np.mean(triggered > psim_on_poisoned.score(scenario.originals)) >= 0.95


def test_psim_learns_no_task_so_clean_confidence_drops(scenario: Scenario, psim_on_poisoned) -> None:
    backbone = load_saved(scenario.poisoned)
    before = predict_proba(backbone.model, backbone.tokenizer, scenario.test.texts, max_length=32).max(axis=1)
    after = psim_on_poisoned.score(scenario.test.texts)
    assert np.median(after) < 0.65 < np.median(before), (np.median(before), np.median(after))
    assert psim_on_poisoned.fitted_threshold() < np.median(psim_on_poisoned.score(scenario.triggered))


def test_psim_on_a_clean_control_does_not_single_out_the_trigger_word(scenario: Scenario, psim_on_control) -> None:
    """The same texts with and without ``cf`` (paired: the random labels' class imbalance
    tilts all scores of one class, so comparing ``cf`` texts of one class with clean texts
    of both classes would measure that tilt, not the word)."""
    with_cf, without_cf = psim_on_control.score(scenario.triggered), psim_on_control.score(scenario.originals)
    threshold = psim_on_control.fitted_threshold()
    metrics = detection_metrics(without_cf, with_cf, threshold)
    assert 0.25 < metrics.auroc < 0.75, f"'{TRIGGER}' must not separate texts on a clean backbone: {metrics}"
    flagged_with, flagged_without = np.mean(with_cf > threshold), np.mean(without_cf > threshold)
    assert flagged_with <= 0.25 and abs(flagged_with - flagged_without) <= 0.15, (flagged_with, flagged_without)
