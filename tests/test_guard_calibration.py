"""Per-length guard calibration (:mod:`peftshield.guard.calibration`) on synthetic scores whose
clean level rises with length, as a PSIM's does (bench/guard_drift.md). The real CLI and the
real service with a calibration are tested in test_serve.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftshield.defenses.thresholds import calibrate_threshold
from peftshield.errors import ConfigError
from peftshield.guard.calibration import (GuardCalibration, allowed_above, calibrate_guard, load_guard_calibration, merged_edges,
                                          texts_needed, union_texts_needed)


class WordTokenizer:
    """One token per word plus [CLS] and [SEP], cut at ``max_length``: enough for encode_texts."""

    pad_token_id = 0
    padding_side = "right"
    model_max_length = 512

    def __call__(self, texts, truncation=True, max_length=512, add_special_tokens=True):
        return {"input_ids": [[101, *range(1, len(t.split()) + 1), 102][:max_length] for t in texts]}


class LengthDriftingScorer:
    """A stand-in PSIM: clean scores rise with length, triggered texts (holding 'cf') score near 1."""

    tokenizer_ = WordTokenizer()
    max_length = 128

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def score(self, texts: list[str]) -> np.ndarray:
        lengths = np.array([len(t.split()) for t in texts])
        clean = 0.55 + 0.4 * np.minimum(lengths, 120) / 120 + self.rng.normal(0, 0.02, len(texts))
        return np.where(["cf" in t.split() for t in texts], 0.9999, np.clip(clean, 0.5, 0.9990))


def texts_of_lengths(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    return [" ".join(["word"] * int(k)) for k in rng.integers(low, high, n)]


def traffic(rng: np.random.Generator, n: int) -> list[str]:
    """A deployment's clean traffic: short questions and long reviews, half and half."""
    return texts_of_lengths(rng, n // 2, 3, 14) + texts_of_lengths(rng, n - n // 2, 60, 200)


def test_per_length_thresholds_hold_the_target_on_every_length_where_one_threshold_does_not() -> None:
    rng = np.random.default_rng(0)
    scorer = LengthDriftingScorer(rng)
    sample, fresh = traffic(rng, 2000), traffic(rng, 4000)
    calibration = calibrate_guard(scorer, "fingerprint", sample, 0.01, "sample.jsonl")
    assert len(calibration.buckets) >= 2 and calibration.buckets[0].min_tokens == 0 and calibration.buckets[-1].max_tokens is None
    assert sum(b.texts for b in calibration.buckets) == 2000 and all(b.sample_flag_rate <= 0.01 for b in calibration.buckets)
    lengths = np.array([len(t.split()) + 2 for t in fresh])
    scores = scorer.score(fresh)
    flagged = scores > calibration.thresholds_for(lengths)
    short, long = lengths < 32, lengths >= 64
    # Each length keeps about the target (1%); generous bounds: the fresh sample is finite.
    assert flagged[short].mean() <= 0.03 and flagged[long].mean() <= 0.03, (flagged[short].mean(), flagged[long].mean())
    # One threshold calibrated on short texts only (a PSIM's dev sentences) flags most long texts.
    single = calibrate_threshold(scorer.score(texts_of_lengths(rng, 1000, 3, 14)), 0.01)
    assert (scores[long] > single).mean() > 0.5
    # Triggered texts of every length still score above their bucket's threshold.
    triggered = [t + " cf" for t in traffic(rng, 400)]
    triggered_lengths = np.array([len(t.split()) + 2 for t in triggered])
    assert (scorer.score(triggered) > calibration.thresholds_for(triggered_lengths)).mean() >= 0.99


def test_a_bucket_too_small_for_its_own_threshold_joins_its_neighbour() -> None:
    lengths = np.array([5] * 300 + [20] * 50 + [40] * 300 + [100] * 10)
    # 16-31 (50 texts) joins 32-63, and 64+ (10 texts) the bucket before it: [0, 16) and [16, ...)
    assert merged_edges(lengths, (16, 32, 64), 200) == [16]
    assert merged_edges(np.array([5] * 150), (16,), 200) == []


def test_the_sample_is_recorded_and_too_small_a_sample_is_one_line(tmp_path) -> None:
    rng = np.random.default_rng(1)
    sample = traffic(rng, 400)
    calibration = calibrate_guard(LengthDriftingScorer(rng), "fingerprint", sample, 0.02, "mine.jsonl", min_bucket_texts=100)
    assert calibration.sample.texts == 400 and len(calibration.sample.sha256) == 64 and calibration.sample.source == "mine.jsonl"
    with pytest.raises(ConfigError, match="at least 230 clean texts"):  # ln(0.1) / ln(0.99): the bound at 1% with 90% confidence
        calibrate_guard(LengthDriftingScorer(rng), "fingerprint", sample[:50], 0.01, "few.jsonl")


def test_a_calibration_file_is_checked_before_use(tmp_path) -> None:
    rng = np.random.default_rng(2)
    calibration = calibrate_guard(LengthDriftingScorer(rng), "psim-a", traffic(rng, 600), 0.01, "s.jsonl")
    path = tmp_path / "calibration.json"
    path.write_text(calibration.model_dump_json())
    assert load_guard_calibration(path, "psim-a", 128) == calibration
    with pytest.raises(ConfigError, match="made for another PSIM"):
        load_guard_calibration(path, "psim-b", 128)
    with pytest.raises(ConfigError, match="made for 128 tokens per text"):
        load_guard_calibration(path, "psim-a", 64)
    payload = json.loads(path.read_text())
    for broken in ({**payload, "buckets": payload["buckets"][:1] + payload["buckets"][2:]},  # a gap between buckets
                   {**payload, "buckets": [{**payload["buckets"][0], "threshold": 7}] + payload["buckets"][1:]},  # not a confidence
                   {**payload, "run": "rm -rf /"},  # an unknown key
                   {**payload, "buckets": [{**payload["buckets"][0], "threshold": 1.0}] + payload["buckets"][1:]},  # would never flag
                   {**payload, "buckets": [{**payload["buckets"][0], "max_tokens": 10**32}, {**payload["buckets"][1], "min_tokens": 10**32}]
                    + payload["buckets"][2:]},  # an edge no int64 holds
                   {**payload, "detectors": {"dan": "0" * 64}},  # a detector no bucket has a threshold for
                   {**payload, "buckets": [{**payload["buckets"][0], "clean_scores": {"psim": [0.9, 0.5]}}] + payload["buckets"][1:]},  # unsorted
                   {**payload, "buckets": [{**payload["buckets"][0], "clean_scores": {"rm": [0.5]}}] + payload["buckets"][1:]}):  # not a member
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match="not a guard calibration") as raised:
            load_guard_calibration(path, "psim-a", 128)
        assert "\n" not in str(raised.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a guard calibration"):
        load_guard_calibration(path, "psim-a", 128)
    assert isinstance(GuardCalibration.model_json_schema(), dict)


class UniformScorer:
    """Clean scores uniform on (0, 1): a threshold t lets exactly 1 - t of clean traffic through,
    so a calibration's true false-rejection rate is known without a test sample."""

    tokenizer_ = WordTokenizer()
    max_length = 128

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def score(self, texts: list[str]) -> np.ndarray:
        return self.rng.uniform(0, 1, len(texts))


def test_the_threshold_bounds_the_rate_on_traffic_with_the_stated_confidence_where_the_sample_rate_does_not() -> None:
    """300 calibrations on 500 clean texts each: the true rate exceeds the 1% target in about 4%
    of them (P(Binomial(500, 1%) <= 1), at most 10% by the 0.9 confidence); a threshold that flags
    1% of the sample (5 texts) lets more than 1% through in about 62% of them."""
    rng = np.random.default_rng(5)
    texts = ["a few words"] * 500
    assert texts_needed(0.01, 0.9) == 230 and allowed_above(230, 0.01, 0.9) == 0 and allowed_above(500, 0.01, 0.9) == 1
    bounded, point = [], []
    for _ in range(300):
        scorer = UniformScorer(rng)
        scores = scorer.score(texts)
        calibration = calibrate_guard(scorer, "f", texts, 0.01, "s", scores=scores)
        bounded.append(1 - calibration.buckets[0].threshold)
        point.append(1 - calibrate_threshold(scores, 0.01))
    assert np.mean(np.array(bounded) > 0.01) <= 0.1 and np.mean(np.array(point) > 0.01) >= 0.4, (np.mean(np.array(bounded) > 0.01), np.mean(np.array(point) > 0.01))


def test_detectors_share_the_psims_budget_and_each_result_can_carry_p_values() -> None:
    """Two members calibrated together: the union of their flags keeps the one budget on fresh
    traffic (each alone at it would flag up to twice as much), and p-values rank a text against
    the bucket's clean scores."""
    rng = np.random.default_rng(6)
    scorer = LengthDriftingScorer(rng)
    sample, fresh = traffic(rng, 3000), traffic(rng, 20000)
    dan = rng.normal(0, 1, len(sample))  # an independent member: its clean scores do not follow the PSIM's
    calibration = calibrate_guard(scorer, "f", sample, 0.01, "s", detector_scores={"dan": dan}, detector_manifests={"dan": "a" * 64}, split_rng=np.random.default_rng(0))
    assert calibration.detectors == {"dan": "a" * 64} and all(set(b.detector_thresholds) == {"dan"} for b in calibration.buckets)
    assert all(b.sample_flag_rate <= 0.01 for b in calibration.buckets)
    lengths = np.array([len(t.split()) + 2 for t in fresh])
    buckets = [calibration.buckets[i] for i in calibration.bucket_indices(lengths)]
    psim_fires = scorer.score(fresh) > np.array([b.threshold for b in buckets])
    dan_fires = rng.normal(0, 1, len(fresh)) > np.array([b.member_threshold("dan") for b in buckets])
    assert (psim_fires | dan_fires).mean() <= 0.012 and psim_fires.mean() > 0 and dan_fires.mean() > 0, ((psim_fires | dan_fires).mean())
    bucket = calibration.buckets[0]
    assert bucket.p_value("dan", 1e9) == pytest.approx(1 / (bucket.texts + 1)) and bucket.p_value("dan", -1e9) == 1.0
    assert bucket.p_value("psim", bucket.threshold) <= 0.02 and bucket.p_value("shift", 0.5) is None
    with pytest.raises(ConfigError, match="needs its scores"):
        calibrate_guard(scorer, "f", sample, 0.01, "s", detector_scores={"dan": dan})


def test_the_union_of_several_members_keeps_the_target_with_the_stated_confidence() -> None:
    """300 calibrations of the PSIM and a correlated detector on 400 clean texts each (the least
    a bucket with detectors needs is 307): the union's true rate, measured on 100,000 fresh
    texts from the same distribution, exceeds the 1% target in at most 10% of them, as for the
    PSIM alone (the bound's 300 texts allow none above: about 5% expected), and both members keep
    a share of the budget."""
    rng = np.random.default_rng(13)
    texts = ["a few words"] * 400
    assert union_texts_needed(0.01, 0.9) == 307 and allowed_above(300, 0.01, 0.9) == 0

    def members(n: int) -> tuple[np.ndarray, np.ndarray]:
        shared = rng.normal(0, 1, n)
        psim = 1 / (1 + np.exp(-(0.6 * shared + 0.8 * rng.normal(0, 1, n))))  # a confidence in (0, 1)
        return psim, rng.chisquare(20, n) + 3 * shared  # a distance, skewed to the right

    exceeded, psim_share, dan_share = [], [], []
    fresh_psim, fresh_dan = members(100_000)
    for _ in range(300):
        psim, dan = members(400)
        calibration = calibrate_guard(UniformScorer(rng), "f", texts, 0.01, "s", scores=psim, detector_scores={"dan": dan},
                                      detector_manifests={"dan": "a" * 64}, split_rng=rng)
        bucket = calibration.buckets[0]
        psim_fires, dan_fires = fresh_psim > bucket.threshold, fresh_dan > bucket.member_threshold("dan")
        exceeded.append((psim_fires | dan_fires).mean() > 0.01)
        psim_share.append(psim_fires.mean())
        dan_share.append(dan_fires.mean())
    assert np.mean(exceeded) <= 0.1, np.mean(exceeded)
    assert np.mean(psim_share) > 0.001 and np.mean(dan_share) > 0.001, (np.mean(psim_share), np.mean(dan_share))


def test_a_calibration_of_the_first_format_still_loads(tmp_path) -> None:
    """Files written before detectors and the confidence bound (format /1) keep their meaning."""
    rng = np.random.default_rng(7)
    calibration = calibrate_guard(LengthDriftingScorer(rng), "psim-a", traffic(rng, 600), 0.01, "s.jsonl")
    payload = json.loads(calibration.model_dump_json())
    payload.update(format="peftshield-guard-calibration/1")
    for key in ("confidence", "detectors"):
        payload.pop(key)
    for bucket in payload["buckets"]:
        bucket.pop("detector_thresholds"), bucket.pop("clean_scores")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(payload))
    old = load_guard_calibration(path, "psim-a", 128)
    assert old.confidence is None and old.detectors == {} and old.buckets[0].p_value("psim", 0.9) is None
    assert [b.threshold for b in old.buckets] == [b.threshold for b in calibration.buckets]


def test_fill_lengths_joins_short_clean_texts_into_the_lengths_the_sample_lacks() -> None:
    """A PSIM's dev sentences are short: joined, they give the long buckets a threshold of their
    own, which keeps long clean traffic near the target where the short texts' threshold does not."""
    rng = np.random.default_rng(9)
    scorer = LengthDriftingScorer(rng)
    short = texts_of_lengths(rng, 900, 3, 30)  # no text of 32 tokens or more
    plain = calibrate_guard(scorer, "f", short, 0.01, "dev")
    filled = calibrate_guard(scorer, "f", short, 0.01, "dev", fill_rng=np.random.default_rng(0))
    assert plain.buckets[-1].min_tokens < 32 and [b.min_tokens for b in filled.buckets] == [0, 16, 32, 64]
    assert filled.sample.texts == 900 and filled.sample.joined >= 3 * 230 and all(b.texts >= 3 * 230 for b in filled.buckets[2:])
    long = texts_of_lengths(rng, 2000, 70, 126)
    lengths = np.array([len(t.split()) + 2 for t in long])
    scores = scorer.score(long)
    assert (scores > filled.thresholds_for(lengths)).mean() <= 0.03 and (scores > plain.thresholds_for(lengths)).mean() >= 0.5
    again = calibrate_guard(scorer, "f", short, 0.01, "dev", fill_rng=np.random.default_rng(0))
    assert again.sample.joined == filled.sample.joined  # seeded: the same joins
    assert calibrate_guard(scorer, "f", short, 0.01, "dev", fill_rng=np.random.default_rng(3), fill_seed=3).sample.fill_seed == 3
    with pytest.raises(ConfigError, match="for the PSIM alone"):
        calibrate_guard(scorer, "f", short, 0.01, "dev", detector_scores={"dan": np.zeros(900)}, detector_manifests={"dan": "a" * 64}, split_rng=np.random.default_rng(0),
                        fill_rng=np.random.default_rng(0))


def test_a_detector_without_finite_scores_is_refused_not_silently_switched_off() -> None:
    """The guard counts a score that is not a number as the highest (it fires); calibrated on
    such scores, a detector's threshold would be the largest float and it would never fire."""
    rng = np.random.default_rng(10)
    sample = traffic(rng, 600)
    broken = np.full(len(sample), np.finfo(np.float64).max)
    half = np.where(np.arange(len(sample)) % 2 == 0, broken, rng.normal(0, 1, len(sample)))
    for scores, message in ((broken, "gave one score to all"), (half, "got no finite score")):
        with pytest.raises(ConfigError, match=message):
            calibrate_guard(LengthDriftingScorer(rng), "f", sample, 0.01, "s", detector_scores={"dan": scores}, detector_manifests={"dan": "a" * 64},
                            split_rng=np.random.default_rng(0))


def test_a_detector_measured_by_evaluate_fires_on_a_score_that_is_not_a_number() -> None:
    """``evaluate --detector`` scores through the guard's Detector: a text its defense cannot
    score (NaN) is flagged there as in the guard, and the metrics come out as numbers."""
    from peftshield.data.records import TextDataset
    from peftshield.experiments.stages import evaluate_defense
    from peftshield.guard.detectors import Detector
    from peftshield.metrics import AttackMetrics

    class HalfBlind:
        name = "half-blind"

        def score(self, texts):
            return np.array([np.nan if "cf" in t else 0.1 for t in texts])

    test = TextDataset(["good film"] * 4 + ["bad film"] * 4, [0] * 4 + [1] * 4, [str(i) for i in range(8)])
    triggered = TextDataset(["bad film cf"] * 4, [1] * 4, [str(i) for i in range(4)])
    probs = np.eye(2)[test.label_array()]
    detector = Detector("half-blind", HalfBlind(), threshold=0.5, target_frr=0.01)
    undefended = AttackMetrics(clean_accuracy=1.0, attack_success_rate=1.0, target_confidence_poisoned=1.0, target_confidence_clean=0.5, per_class_accuracy={}, n_clean=8, n_poisoned=4, target_label=0)
    report = evaluate_defense(detector, test, triggered, probs, np.eye(2)[[0] * 4], 0, undefended)
    assert report["defended_attack_success_rate"] == 0.0 and report["detection"]["frr"] == 0.0 and report["detection"]["auroc"] == 1.0


def _edited(payload: dict, bucket: int, **change) -> dict:
    buckets = [dict(b) for b in payload["buckets"]]
    for key, value in change.items():
        if key == "dan":
            buckets[bucket]["detector_thresholds"] = {**buckets[bucket]["detector_thresholds"], "dan": value}
        else:
            buckets[bucket][key] = value
    return {**payload, "buckets": buckets}


@pytest.mark.parametrize("texts", [3000, 9000], ids=["every-score-kept", "quantiles-kept"])
def test_a_threshold_edited_by_hand_is_refused_not_applied(tmp_path, texts) -> None:
    """A calibration file is configuration: raising one member's threshold in it (to switch the
    member off) or lowering it (to reject clean traffic) is refused at load, whether the bucket
    kept every clean score (recomputed exactly) or only quantiles of them (more than 2000)."""
    rng = np.random.default_rng(7)
    scorer = LengthDriftingScorer(rng)
    sample = traffic(rng, texts)
    dan = rng.normal(0, 1, len(sample))
    calibration = calibrate_guard(scorer, "psim-a", sample, 0.01, "s", detector_scores={"dan": dan}, detector_manifests={"dan": "a" * 64}, split_rng=np.random.default_rng(0))
    assert any(b.texts > 2000 for b in calibration.buckets) == (texts > 6000)
    path = tmp_path / "calibration.json"
    path.write_text(calibration.model_dump_json())
    assert load_guard_calibration(path, "psim-a", 128) == calibration  # as written, it loads
    payload = json.loads(path.read_text())
    largest = max(range(len(payload["buckets"])), key=lambda i: payload["buckets"][i]["texts"])
    bucket = payload["buckets"][largest]
    scores = bucket["clean_scores"]
    for edit in ({"dan": 1e300}, {"dan": max(scores["dan"])}, {"threshold": 0.99989}, {"threshold": max(scores["psim"])},
                 {"threshold": float(np.quantile(scores["psim"], 0.5))}, {"dan": float(np.quantile(scores["dan"], 0.5))},
                 {"clean_scores": {"psim": scores["psim"]}}):  # dan's scores dropped: its threshold cannot be checked
        path.write_text(json.dumps(_edited(payload, largest, **edit)))
        with pytest.raises(ConfigError, match="not a guard calibration") as raised:
            load_guard_calibration(path, "psim-a", 128)
        assert "\n" not in str(raised.value), str(raised.value)


def test_the_scores_behind_a_union_are_checked_and_an_older_union_is_refused(tmp_path) -> None:
    """The thresholds of several members are recomputed from the scores the file keeps: moving the
    level, or the scores the bound was taken on, is refused; so is a calibration with detectors of
    format /2 (its common-rank rule held the target only on average)."""
    rng = np.random.default_rng(9)
    scorer = LengthDriftingScorer(rng)
    sample = traffic(rng, 1500)
    calibration = calibrate_guard(scorer, "psim-a", sample, 0.01, "s", detector_scores={"dan": rng.normal(0, 1, len(sample))},
                                  detector_manifests={"dan": "a" * 64}, split_rng=np.random.default_rng(0), split_seed=0)
    assert calibration.sample.split_seed == 0 and all(b.union is not None for b in calibration.buckets)
    union = calibration.buckets[0].union
    assert union.normalising_texts + union.bound_texts == calibration.buckets[0].texts
    payload = json.loads(calibration.model_dump_json())
    path = tmp_path / "calibration.json"
    bound = payload["buckets"][0]["union"]["bound_scores"]
    raised_score = {**bound, "dan": [v * 3.0 for v in bound["dan"]]}
    first = payload["buckets"][0]["union"]
    moved = {"normalising_scores": {name: sorted(v + bound[name][:50]) for name, v in first["normalising_scores"].items()},
             "bound_scores": {name: v[50:] for name, v in bound.items()}}  # texts moved from the bound's part to the normalising one
    for edit, message in (({"union": {**first, "level": first["level"] + 1.0}}, "level"),
                          ({"union": {**first, "bound_scores": raised_score}}, "are not those of the union's two parts"),
                          ({"union": {**first, **moved}}, "a bucket of"),
                          ({"union": None}, "without the scores that set them")):
        path.write_text(json.dumps(_edited(payload, 0, **edit)))
        with pytest.raises(ConfigError, match=message) as refused:
            load_guard_calibration(path, "psim-a", 128)
        assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="dan gave one score to all"):  # a member whose scores say nothing is refused, not switched off
        calibrate_guard(scorer, "psim-a", sample, 0.01, "s", detector_scores={"dan": np.zeros(len(sample))}, detector_manifests={"dan": "a" * 64},
                        split_rng=np.random.default_rng(0))
    path.write_text(json.dumps({**payload, "format": "peftshield-guard-calibration/2"}))
    with pytest.raises(ConfigError, match="older peftshield.*calibrate again"):
        load_guard_calibration(path, "psim-a", 128)
    alone = calibrate_guard(scorer, "psim-a", sample, 0.01, "s")
    path.write_text(json.dumps({**json.loads(alone.model_dump_json()), "format": "peftshield-guard-calibration/2"}))
    assert load_guard_calibration(path, "psim-a", 128).buckets == alone.buckets  # the PSIM alone: the same bound in /2 and /3


def test_an_edited_psim_threshold_is_refused_in_a_calibration_of_the_psim_alone(tmp_path) -> None:
    rng = np.random.default_rng(8)
    calibration = calibrate_guard(LengthDriftingScorer(rng), "psim-a", traffic(rng, 600), 0.01, "s.jsonl")
    payload = json.loads(calibration.model_dump_json())
    path = tmp_path / "calibration.json"
    for value in (0.99989, payload["buckets"][0]["clean_scores"]["psim"][-3]):  # above every clean score; two ranks off
        path.write_text(json.dumps(_edited(payload, 0, threshold=value)))
        with pytest.raises(ConfigError, match=r"bucket 0\+ tokens: psim.s threshold"):
            load_guard_calibration(path, "psim-a", 128)


def test_a_calibration_forged_around_the_threshold_check_is_refused(tmp_path) -> None:
    """The ways round the check a review found: no confidence (skipping every check), a /1 file
    with detectors, kept scores cut short (a wide window), texts inflated (a negative lower
    bound), a threshold above every clean score of a large bucket, and a bucket so large its
    bound would take gigabytes: each refused with one line."""
    rng = np.random.default_rng(11)
    scorer = LengthDriftingScorer(rng)
    sample = traffic(rng, 9000)
    calibration = calibrate_guard(scorer, "psim-a", sample, 0.01, "s", detector_scores={"dan": rng.normal(0, 1, len(sample))},
                                  detector_manifests={"dan": "a" * 64}, split_rng=np.random.default_rng(0))
    payload = json.loads(calibration.model_dump_json())
    large = max(range(len(payload["buckets"])), key=lambda i: payload["buckets"][i]["texts"])
    bucket = payload["buckets"][large]
    assert bucket["texts"] > 2000
    top = max(bucket["clean_scores"]["dan"])
    forged = [
        {**payload, "confidence": None},
        {**payload, "format": "peftshield-guard-calibration/1", "confidence": None},
        _edited(payload, large, dan=1e300, clean_scores={"psim": bucket["clean_scores"]["psim"][:2], "dan": [0.0, 1e300]}),
        {**_edited(payload, large, dan=top * 10, texts=bucket["texts"] + 400), "target_frr": 0.001},
        _edited(payload, large, dan=top + 1.0),
        _edited(payload, large, texts=10**12),
    ]
    path = tmp_path / "calibration.json"
    for edit in forged:
        path.write_text(json.dumps(edit))
        with pytest.raises(ConfigError, match="not a guard calibration") as raised:
            load_guard_calibration(path, "psim-a", 128)
        assert "\n" not in str(raised.value)


def test_ties_at_the_threshold_of_a_large_bucket_are_not_refused() -> None:
    """5,000 clean texts whose top 50 tie at one score: the honest threshold has none above it,
    and the calibration still passes its own check (quantiles kept, ties counted either way)."""
    rng = np.random.default_rng(12)
    texts = ["a few words"] * 5000
    scores = rng.uniform(0.5, 0.98, 5000)
    scores[:50] = 0.99
    calibration = calibrate_guard(UniformScorer(rng), "f", texts, 0.01, "s", scores=scores)
    assert calibration.buckets[0].threshold == 0.99 and calibration.buckets[0].texts == 5000
