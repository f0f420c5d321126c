"""Per-length guard calibration (:mod:`peftshield.guard.calibration`) on synthetic scores whose
clean level rises with length, as a PSIM's does (bench/guard_drift.md). The real CLI and the
real service with a calibration are tested in test_serve.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftshield.defenses.thresholds import calibrate_threshold
from peftshield.errors import ConfigError
from peftshield.guard.calibration import GuardCalibration, calibrate_guard, load_guard_calibration, merged_edges


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
    with pytest.raises(ConfigError, match="at least 200 clean texts"):
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
                    + payload["buckets"][2:]}):  # an edge no int64 holds
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match="not a guard calibration") as raised:
            load_guard_calibration(path, "psim-a", 128)
        assert "\n" not in str(raised.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a guard calibration"):
        load_guard_calibration(path, "psim-a", 128)
    assert isinstance(GuardCalibration.model_json_schema(), dict)
