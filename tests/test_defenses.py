"""Defenses: PSIM's random-label reset, threshold calibration and detection metrics on
synthetic scores with known answers, and each baseline's mechanism on rigged or trained tiny
victims. The contract every registered defense keeps (seeding, batch independence, save and
load, parameters) is checked in test_contracts.py; PSIM's detection claim on a planted
backdoor in test_psim_backdoor.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest

from backdoor_fixtures import single_thread_torch, train_sentiment_victim
from peftshield.data import TextDataset
from peftshield.defenses import DEFENSES, PSIM, DefenseContext, ThresholdPolicy, calibrate_threshold, default_confidence_threshold, random_label_reset
from peftshield.errors import ConfigError
from peftshield.metrics import defended_metrics, detection_metrics
from peftshield.models.inference import predict_proba

FAST_OPTIONS = {"psim": {"epochs": 1, "batch_size": 8, "max_length": 32, "max_train_samples": None}}


def tiny_victim():
    from peftshield.finetune import seed_torch
    from peftshield.models import load_backbone

    seed_torch(0)
    return load_backbone("tiny", 2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory) -> Path:
    return train_sentiment_victim(tmp_path_factory.mktemp("victim") / "victim")


def test_random_label_reset_is_uniform_seeded_and_multiclass() -> None:
    data = TextDataset([f"t{i}" for i in range(4000)], [0] * 4000, [str(i) for i in range(4000)])
    reset = random_label_reset(data, 2, np.random.default_rng(1))
    assert reset.texts == data.texts and reset.ids == data.ids
    share = np.mean(reset.labels)
    assert 0.47 < share < 0.53, f"labels must be uniform, got {share:.3f} ones"
    assert random_label_reset(data, 2, np.random.default_rng(1)).labels == reset.labels
    assert random_label_reset(data, 2, np.random.default_rng(2)).labels != reset.labels
    counts = np.bincount(random_label_reset(data, 5, np.random.default_rng(3)).labels, minlength=5)
    assert len(counts) == 5 and counts.min() > 700 and counts.max() < 900
    assert data.labels == [0] * 4000, "the input keeps its labels"


def test_psim_trains_on_random_labels(tiny_texts, monkeypatch) -> None:
    seen = {}
    import peftshield.defenses.psim as psim_module

    original = psim_module.train_classifier

    def spy(model, tokenizer, train, dev, method, training, rng, progress, label):
        seen["labels"], seen["dev"], seen["method"] = list(train.labels), dev, method.name
        return original(model, tokenizer, train, dev, method, training, rng, progress, label)

    monkeypatch.setattr(psim_module, "train_classifier", spy)
    all_zero = TextDataset(tiny_texts.texts * 4, [0] * (len(tiny_texts) * 4), [str(i) for i in range(len(tiny_texts) * 4)])
    PSIM(method="ptuning", **FAST_OPTIONS["psim"]).fit(DefenseContext("tiny", all_zero, None, 3, max_length=32, progress=False), np.random.default_rng(0))
    assert set(seen["labels"]) == {0, 1, 2}, "the true labels (all 0) must be replaced by random ones over all classes"
    assert seen["dev"] is None and seen["method"] == "ptuning"


def test_default_threshold_scales_with_class_count() -> None:
    assert default_confidence_threshold(2) == pytest.approx(0.7)
    assert default_confidence_threshold(4) == pytest.approx(0.55)
    assert default_confidence_threshold(10) == pytest.approx(0.46)


def test_frr_calibration_on_known_distributions() -> None:
    clean = np.linspace(0.0, 1.0, 1001)  # uniform clean scores: threshold at the (1 - frr) quantile
    assert calibrate_threshold(clean, 0.05) == pytest.approx(0.95)
    assert calibrate_threshold(clean, 0.0) == pytest.approx(1.0)
    assert np.mean(clean > calibrate_threshold(clean, 0.1)) <= 0.1
    rng = np.random.default_rng(0)
    normal = rng.normal(0.6, 0.05, size=100_000)
    assert calibrate_threshold(normal, 0.025) == pytest.approx(0.6 + 1.96 * 0.05, abs=0.003)
    with pytest.raises(ConfigError, match="target_frr"):
        calibrate_threshold(clean, 1.0)
    assert ThresholdPolicy(kind="frr", target_frr=0.05).resolve(2, clean) == pytest.approx(0.95)
    assert ThresholdPolicy(kind="fixed").resolve(2, None) == pytest.approx(0.7)
    assert ThresholdPolicy(kind="fixed", value=0.9).resolve(2, None) == 0.9
    assert ThresholdPolicy(kind="fixed", value=0.9).resolve(2, clean) == 0.9, "fixed ignores dev scores"
    assert ThresholdPolicy(kind="auto", target_frr=0.05).resolve(2, clean) == pytest.approx(0.95), "auto calibrates when dev scores exist"
    assert ThresholdPolicy(kind="auto").resolve(4, None) == pytest.approx(0.55), "auto falls back to the fixed default without dev data"
    assert ThresholdPolicy(kind="auto").resolve(2, None, default=0.0) == 0.0, "a defense's own default wins over the confidence default"
    with pytest.raises(ConfigError, match="needs clean dev data"):
        ThresholdPolicy(kind="frr").resolve(2, None)
    with pytest.raises((ConfigError, pydantic.ValidationError), match="kind"):
        ThresholdPolicy(kind="magic")
    with pytest.raises((ConfigError, pydantic.ValidationError), match="target_frr"):
        ThresholdPolicy(kind="frr", target_frr=1.0)


def test_detection_metrics_known_answers() -> None:
    clean = np.array([0.1, 0.2, 0.3, 0.8])      # one clean text above 0.5: FRR 0.25
    poisoned = np.array([0.9, 0.95, 0.4])        # one triggered text below: FAR 1/3
    m = detection_metrics(clean, poisoned, 0.5)
    assert m.frr == pytest.approx(0.25) and m.far == pytest.approx(1 / 3)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.f1 == pytest.approx(2 / 3)
    assert m.auroc == pytest.approx(11 / 12)  # 11 of the 12 (poisoned, clean) pairs are ordered correctly (0.4 < 0.8)
    assert detection_metrics(np.array([0.1, 0.2]), np.array([0.9, 0.8]), 0.5).auroc == 1.0


def test_defended_metrics_count_flags_as_errors_and_failed_attacks() -> None:
    result = defended_metrics(
        clean_correct=np.array([True, True, False, True]), clean_flagged=np.array([False, True, False, False]),
        poisoned_hit_target=np.array([True, True, True, False]), poisoned_flagged=np.array([True, True, False, False]),
    )
    assert result.defended_clean_accuracy == pytest.approx(0.5)
    assert result.defended_attack_success_rate == pytest.approx(0.25)


def test_strip_scores_trigger_pinned_inputs_as_more_suspicious() -> None:
    """A victim that always answers 'target' when the trigger is present has zero entropy there."""
    import torch

    from peftshield.defenses.strip import STRIP, perturb

    victim = tiny_victim()
    victim.model.eval()  # not a registered submodule of the wrapper below, so predict_proba cannot switch it
    trigger_id = victim.tokenizer.convert_tokens_to_ids("mn")

    class Backdoored(torch.nn.Module):
        config = victim.model.config

        def forward(self, input_ids, attention_mask, **kwargs):
            logits = victim.model(input_ids=input_ids, attention_mask=attention_mask).logits
            pinned = (input_ids == trigger_id).any(dim=1, keepdim=True)
            return type("Out", (), {"logits": torch.where(pinned, torch.tensor([50.0, -50.0]), logits)})()

    texts = ["good film , great story", "bad boring plot", "fun movie and good acting", "awful film"]
    strip = STRIP(num_perturbations=6, replace_ratio=0.25, max_length=32)
    strip.model_, strip.tokenizer_, strip.words_, strip.seed_ = Backdoored(), victim.tokenizer, ["story", "plot", "acting"], 0
    clean = strip.score(texts)
    triggered = strip.score([t + " mn mn mn mn mn mn" for t in texts])  # survives 25% replacement
    assert (triggered > clean.max()).all()
    np.testing.assert_array_equal(strip.score(texts), clean)
    edited = perturb("a b c d", ["x"], 0.5, np.random.default_rng(0))
    assert edited.split().count("x") == 2


def test_strip_needs_the_victim(tiny_texts) -> None:
    with pytest.raises(ConfigError, match="needs the victim model"):
        DEFENSES.create("strip").fit(DefenseContext("tiny", tiny_texts, None, 2), np.random.default_rng(0))


class ConstantVictim:
    """A victim that predicts ``label`` for every text: its defended CA and ASR are known."""

    def __init__(self, label: int) -> None:
        import torch

        self.config = type("Config", (), {"num_labels": 2})()
        self.training = False
        self.logits = torch.tensor([[5.0, -5.0]] if label == 0 else [[-5.0, 5.0]])

    def parameters(self):
        return iter(())

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        return type("Out", (), {"logits": self.logits.expand(input_ids.shape[0], 2)})()


def check_paraphrase_sets(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    from peftshield.defenses.paraphrase import evaluate_paraphrased, offline_paraphrase_sets
    from peftshield.models.tiny import tiny_tokenizer

    for defense, (n_clean, n_triggered) in sizes.items():
        clean, triggered = offline_paraphrase_sets(folder, defense)
        assert (len(clean), len(triggered)) == (n_clean, n_triggered), defense
        assert set(triggered.labels) == {1} and set(clean.labels) == {0, 1}
        assert all(t.strip() for t in clean.texts + triggered.texts), "empty paraphrases are skipped"
        share_of_zeros = float(np.mean(clean.label_array() == 0))
        for label in (0, 1):  # a constant victim: CA is the share of its class, ASR 1 or 0 for target 0
            result = evaluate_paraphrased(ConstantVictim(label), tiny_tokenizer(), defense, clean, triggered, target_label=0, max_length=32)
            assert result.n_clean == n_clean and result.n_poisoned == n_triggered
            assert result.defended_clean_accuracy == pytest.approx(share_of_zeros if label == 0 else 1 - share_of_zeros)
            assert result.defended_attack_success_rate == (1.0 if label == 0 else 0.0)
    with pytest.raises(ConfigError, match="unknown paraphrase defense"):
        offline_paraphrase_sets(folder, "onion")


def test_paraphrase_defenses_read_the_studys_offline_files(full_shared_data: Path) -> None:
    check_paraphrase_sets(full_shared_data / "psim" / "cr", {"backtranslation": (775, 481), "scpn": (773, 479)})  # 2 empty paraphrases skipped


def test_paraphrase_defenses_read_the_extracts(extract_data: Path) -> None:
    check_paraphrase_sets(extract_data / "psim" / "cr", {"backtranslation": (200, 119), "scpn": (199, 118)})  # 1 empty paraphrase skipped


def test_online_paraphraser_fails_clearly_offline(monkeypatch) -> None:
    from peftshield.defenses.paraphrase import OnlineParaphraser
    from peftshield.errors import HubUnavailableError
    from peftshield.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    with pytest.raises(HubUnavailableError, match="paraphrase model 'Helsinki-NLP/opus-mt-en-de'.*pre-paraphrased files"):
        OnlineParaphraser("Helsinki-NLP/opus-mt-en-de", "Helsinki-NLP/opus-mt-de-en").transform(["a text"])


def test_onion_leave_one_out_and_scores() -> None:
    from peftshield.data.transforms import leave_one_word_out as leave_one_out
    from peftshield.defenses.onion import ONION
    from peftshield.models.language_model import sentence_log_perplexity, tiny_language_model

    assert leave_one_out("a b c", 10) == ["b c", "a c", "a b"]
    assert leave_one_out("single", 10) == []
    onion = ONION(language_model="tiny")
    onion.lm_ = tiny_language_model()
    scores = onion.score(["good film , great story", "word", "bad boring plot"])
    assert scores.shape == (3,) and scores[1] == 0.0 and onion.single_word_texts_ == 1
    # the score is the largest drop of whole-sentence log perplexity over single-word removals
    full = sentence_log_perplexity(onion.lm_, ["bad boring plot"])[0]
    reduced = sentence_log_perplexity(onion.lm_, leave_one_out("bad boring plot", 64))
    assert scores[2] == pytest.approx((full - reduced).max())
    batched = sentence_log_perplexity(onion.lm_, ["good film", "bad boring plot , awful"], batch_size=2)
    single = [sentence_log_perplexity(onion.lm_, [t])[0] for t in ["good film", "bad boring plot , awful"]]
    np.testing.assert_allclose(batched, single, rtol=1e-5)  # padding does not change a text's perplexity


def test_rap_learns_only_its_embedding_row_on_a_frozen_peft_victim(victim_dir: Path) -> None:
    import torch

    from backdoor_fixtures import sentiment_data
    from peftshield.defenses.rap import RAP
    from peftshield.finetune import METHODS, seed_torch
    from peftshield.models import load_backbone

    rng = np.random.default_rng(7)
    train, dev = sentiment_data(64, rng, "train"), sentiment_data(40, rng, "dev")
    seed_torch(0)
    victim = load_backbone(str(victim_dir), 2)
    model = METHODS.create("lora").wrap(victim.model, 10)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    context = DefenseContext(str(victim_dir), train, dev, 2, model, victim.tokenizer, protected_label=1, max_length=32, progress=False)
    # a rare word (no text contains it), as in the paper: the learned row replaces every occurrence
    rap = RAP(word="tq", epochs=5, batch_size=8, learning_rate=0.1, max_length=32)
    rap.protected_label_ = 1
    rap._attach(context)
    rap.vector_ = rap.embeddings_.weight[rap.token_id_].detach().clone()  # the unlearned perturbation: the word itself
    protected_texts = [t for t, y in zip(train.texts, train.labels) if y == 1]
    _, negative_drop = rap._protected_and_negative_drop(protected_texts)
    drop_before = float(np.mean(-negative_drop))
    rap.fit(context, np.random.default_rng(0))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"RAP changed the victim's weight {name}"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    # what RAP learns: inserting its word now lowers the protected-class probability of clean
    # protected texts by an amount in drop_range (0.1-0.3); inserting the plain word did not
    _, negative_drop = rap._protected_and_negative_drop(protected_texts)
    drop = -negative_drop
    objective = float(np.mean(np.maximum(0.1 - drop, 0) + np.maximum(drop - 0.3, 0)))
    assert abs(drop_before) < 0.05 and 0.1 <= float(np.mean(drop)) <= 0.3, (drop_before, float(np.mean(drop)))
    assert objective < 0.05, f"mean distance of the drops from [0.1, 0.3]: {objective:.3f}"
    scores = rap.score(dev.texts)
    protected = predict_proba(model, victim.tokenizer, dev.texts, max_length=32).argmax(1) == 1
    assert protected.any() and not protected.all()
    assert (scores[~protected] == -1.0).all(), "texts the victim does not put in the protected class are not scored"
    assert (scores[protected] > -1.0).all() and np.ptp(scores[protected]) > 0.01


def test_rap_rejects_a_word_that_is_not_one_token(tiny_texts) -> None:
    from peftshield.defenses.rap import RAP

    victim = tiny_victim()
    context = DefenseContext("tiny", tiny_texts, None, 2, victim.model, victim.tokenizer, protected_label=0, max_length=32, progress=False)
    with pytest.raises(ConfigError, match="rap: word 'xqzzyv' must be one token"):
        RAP(word="xqzzyv").fit(context, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="needs protected_label"):
        RAP(word="good").fit(DefenseContext("tiny", tiny_texts, None, 2, victim.model, victim.tokenizer), np.random.default_rng(0))


def test_bki_flags_texts_with_the_pool_keyword(monkeypatch) -> None:
    from peftshield.defenses.bki import BKI

    texts = [f"plain text {i} mn" for i in range(6)] + [f"plain text {i}" for i in range(6)]
    bki = BKI(top_words_per_text=2)
    shift = {"mn": 5.0, "plain": 1.0, "text": 0.5}
    monkeypatch.setattr(bki, "word_importance", lambda pool: [[(w, shift.get(w, 0.2)) for w in t.split()] for t in pool])
    bki.threshold_ = 1.0
    values = bki.keyword_values(bki.word_importance(texts))
    assert values["mn"] == pytest.approx(5.0 * np.log10(6))  # mean shift x log10(texts it was top in)
    assert values["plain"] == pytest.approx(1.0 * np.log10(12))
    scores = bki.score(texts)
    assert bki.keywords_ == ["mn"]
    assert (scores[:6] == 2.0).all() and (scores[6:] <= 1.0).all()
    np.testing.assert_array_equal(bki.flag(texts), [True] * 6 + [False] * 6)


def test_cube_flags_everything_outside_each_class_main_cluster(monkeypatch) -> None:
    import peftshield.defenses.cube as cube_module

    blobs = np.random.default_rng(0)
    representations = np.vstack([blobs.normal(0, 0.1, (40, 4)), blobs.normal(8, 0.1, (10, 4)), blobs.normal(-8, 0.1, (30, 4))])
    probs = np.zeros((80, 2))
    probs[:50, 0] = 1.0  # class 0: a main blob of 40 and a poisoned blob of 10
    probs[50:, 1] = 1.0  # class 1: one blob
    monkeypatch.setattr(cube_module, "classifier_inputs", lambda *args, **kwargs: (probs, representations))
    cube = cube_module.CUBE(dimensions=2, min_cluster_fraction=0.05)
    cube.model_ = cube.tokenizer_ = None
    cube.num_labels_, cube.threshold_ = 2, 1.0
    flags = cube.flag([str(i) for i in range(80)])
    np.testing.assert_array_equal(flags, [False] * 40 + [True] * 10 + [False] * 30)


def test_dan_distances_are_the_squared_mahalanobis_distance_to_the_nearest_class_mean() -> None:
    """DAN's distances, computed as xPx - 2xPm + mPm from one product per text, equal the
    definition (x - m) P (x - m) for every class, nearest class taken, on states far from the
    origin (as a transformer's are) where the expanded terms are largest."""
    from peftshield.defenses.dan import LayerGaussians

    rng = np.random.default_rng(0)
    states = rng.normal(size=(3, 200, 16)) * 3 + 50
    labels = rng.integers(0, 3, 200)
    gaussians = LayerGaussians.fit(states, labels)
    expected = np.array([[min(float((x - m) @ precision @ (x - m)) for m in means) for x in layer]
                         for layer, means, precision in zip(states, gaussians.means, gaussians.precisions)])
    np.testing.assert_allclose(gaussians.distances(states), expected, rtol=1e-9, atol=1e-9)
    assert np.ptp(expected) > 1  # distances that differ, so the comparison means something
    # A precision that is not symmetric (a hand-edited saved state): the definition still holds.
    antisymmetric = rng.normal(size=gaussians.precisions.shape[1:])
    skewed = gaussians.precisions + (antisymmetric - antisymmetric.T)  # the same quadratic form, not symmetric
    expected = np.array([[min(float((x - m) @ precision @ (x - m)) for m in means) for x in layer]
                         for layer, means, precision in zip(states, gaussians.means, skewed)])
    np.testing.assert_allclose(LayerGaussians(gaussians.means, skewed).distances(states), expected, rtol=1e-9, atol=1e-9)
