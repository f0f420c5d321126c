"""Contracts every registered component keeps: the public checks of :mod:`peftshield.testing`
(scikit-learn's ``check_estimator`` style) run over every component of every registry.

Each contract is one named check; the tests run every check over every component, so a
failure reads ``test_defense_contract[strip-check_...]``: which contract broke, for which
component. A new component is checked automatically; if it needs options to run offline on
the tiny model, add them to the ``*_OPTIONS`` tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backdoor_fixtures import sentiment_data, single_thread_torch, train_sentiment_victim
from peftshield.attacks import POISONERS
from peftshield.data import TextDataset
from peftshield.defenses import DEFENSES, DefenseContext
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
from peftshield.models import load_backbone
from peftshield.testing import (check_constructor_only_stores, check_created_with_defaults_fast_and_unloaded, check_defense,
                                check_defense_constructor_only_stores, check_defense_fit_returns_self_and_sets_a_threshold,
                                check_defense_params_match_constructor, check_defense_save_load_same_scores, check_defense_same_seed_same_scores,
                                check_defense_score_independent_of_batch, check_method_constructor_only_stores, check_method_params_match_constructor,
                                check_method_same_seed_same_trained_weights, check_params_round_trip, check_poisoner,
                                check_poisoner_same_seed_same_poisoned_texts, check_spec_rebuilds_the_component)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


# ---------------------------------------------------------------- poisoners

TEXTS = ["good film , great story", "bad boring plot", "fun movie and good acting", "awful film , not good", "very good story"]


@pytest.fixture
def paraphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "paraphrases.tsv"
    path.write_text("original\tparaphrase\n" + "".join(f"{t}\twhen it was made , {t} .\n" for t in TEXTS), encoding="utf-8")
    return path


def poisoner_options(name: str, paraphrase_file: Path) -> dict:
    """Options needed to run offline (the syntactic trigger reads paraphrases from a file)."""
    return {"paraphrases": str(paraphrase_file)} if name == "syntactic" else {}


def poisoner_non_defaults(name: str, paraphrase_file: Path) -> list[dict]:
    """A value other than the default for every parameter (check_non_defaults_cover_every_parameter);
    the syntactic trigger's three sources exclude one another, so it takes three option sets."""
    task_agnostic = {"words": ("cf", "mn"), "vectors": "opposite", "vector_seed": 3, "trigger": 1, "backdoor_weight": 0.5}
    return {
        "badnet": [{"words": ("mn", "bb"), "num_triggers": 2}],
        "insent": [{"sentence": "no one saw it coming"}],
        "lowconf": [{"words": ("cf", "bb"), "num_triggers": 2, "min_confidence": 0.5, "max_confidence": 0.6}],
        "neuba": [task_agnostic],
        "por": [task_agnostic],
        "psimaware": [{"words": ("cf", "bb"), "num_triggers": 2, "penalty": 0.5}],
        "syntactic": [{"paraphrases": str(paraphrase_file), "template": "S(NP)(VP)(.)"}, {"paraphraser": "org/paraphraser"},
                      {"pool": str(paraphrase_file)}],
    }[name]


def poisoner_params_match_constructor(name: str, paraphrase_file: Path) -> None:
    check_params_round_trip(POISONERS, name, poisoner_non_defaults(name, paraphrase_file))


def poisoner_constructor_only_stores(name: str, paraphrase_file: Path) -> None:
    check_constructor_only_stores(POISONERS.get(name))
    check_created_with_defaults_fast_and_unloaded(POISONERS, name, poisoner_options(name, paraphrase_file))


def poisoner_same_seed_same_poisoned_texts(name: str, paraphrase_file: Path) -> None:
    check_poisoner_same_seed_same_poisoned_texts(name, poisoner_options(name, paraphrase_file), TEXTS)


POISONER_CHECKS = [poisoner_params_match_constructor, poisoner_constructor_only_stores, poisoner_same_seed_same_poisoned_texts]


@pytest.mark.parametrize("check", POISONER_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", POISONERS.names())
def test_poisoner_contract(name: str, check, paraphrase_file: Path) -> None:
    check(name, paraphrase_file)


def test_the_public_poisoner_check_passes_ours_and_catches_a_constructor_that_does_more_than_store(paraphrase_file: Path) -> None:
    """``peftshield.testing.check_poisoner`` as a third party runs it: it passes a registered
    trigger, and fails one whose constructor does more than store what it is given."""
    check_poisoner("badnet", {}, TEXTS, poisoner_non_defaults("badnet", paraphrase_file))
    from peftshield.attacks.badnet import BadNetPoisoner

    class Caching(BadNetPoisoner):
        def __init__(self, words=("cf",), num_triggers: int = 1) -> None:
            super().__init__(words, num_triggers)
            self.vocabulary_ = set()  # state a constructor must not set

    with pytest.raises(AssertionError, match="the constructor set"):
        check_constructor_only_stores(Caching)


# ---------------------------------------------------------------- defenses

DEFENSE_OPTIONS = {  # small enough for the tiny model; ONION gets the tiny GPT-2 instead of SmolLM2
    "psim": {"method": "lora", "learning_rate": 3e-3, "epochs": 1, "batch_size": 8, "max_length": 32, "max_train_samples": None},
    "strip": {"num_perturbations": 4, "max_length": 32},
    "onion": {"language_model": "tiny", "max_length": 32, "calibration_texts": 8},
    "rap": {"word": "good", "protected_label": 1, "epochs": 2, "batch_size": 4, "max_length": 32},
    "bki": {"max_length": 32},
    "cube": {"max_length": 32, "dimensions": 3, "min_cluster_fraction": 0.3},
    "occlusion": {"max_length": 32},
    "reference": {"backbone": "tiny", "learning_rate": 5e-3, "epochs": 1, "max_length": 32},
    "dan": {"max_length": 32},
    "shift": {"original": "tiny", "max_length": 32},
}
DEFENSE_OPTIONS["psimplus"] = {"members": ["occlusion", "reference"], "psim": DEFENSE_OPTIONS["psim"],
                               "occlusion": DEFENSE_OPTIONS["occlusion"], "reference": DEFENSE_OPTIONS["reference"]}
DEFENSE_NON_DEFAULTS = {  # for the params() check: a value other than the default for every parameter
    "psim": {"method": "lora", "method_options": {"r": 4}, "learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "max_train_samples": 50,
             "max_length": 32, "score_batch_size": 16},
    "strip": {"num_perturbations": 3, "replace_ratio": 0.5, "top_words": 10, "batch_size": 8, "max_length": 32, "max_reference_texts": 20},
    "onion": {"language_model": "tiny", "batch_size": 8, "max_words": 10, "max_length": 32, "calibration_texts": 8},
    "rap": {"word": "good", "protected_label": 1, "drop_range": (0.2, 0.4), "learning_rate": 0.1, "epochs": 2, "batch_size": 4,
            "max_train_samples": 10, "max_length": 32},
    "bki": {"top_words_per_text": 3, "num_keywords": 2, "max_words": 10, "batch_size": 8, "max_length": 32},
    "cube": {"dimensions": 3, "min_cluster_fraction": 0.3, "flag_noise": True, "batch_size": 8, "max_length": 32},
    "occlusion": {"unit": "word", "max_units": 10, "batch_size": 8, "max_length": 32},
    "reference": {"backbone": "tiny", "method": "ia3", "learning_rate": 1e-3, "epochs": 1, "max_train_samples": 10, "max_length": 32,
                  "batch_size": 8},
    "psimplus": {"members": ("reference",), "psim": {"method": "lora"}, "occlusion": {"unit": "clause"}, "reference": {"epochs": 1}},
    "dan": {"max_reference_texts": 12, "batch_size": 8, "max_length": 32},
    "shift": {"original": "tiny", "max_reference_texts": 12, "max_fit_tokens": 100, "ridge": 1.0, "combine": "max", "extra_calibration_texts": 5, "batch_size": 8, "max_length": 32},
}
for _options in DEFENSE_NON_DEFAULTS.values():  # every defense's threshold policy, away from its default
    _options["threshold"] = ThresholdPolicy(kind="frr", target_frr=0.05)
# (defense, check) -> the bug, for a known bug marked as an expected failure until it is fixed. The
# one this suite found (STRIP drew every text's perturbations from one stream in batch order, so a
# score depended on the texts scored before it) is fixed: each text now has its own stream.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def defense_data() -> tuple[TextDataset, TextDataset, list[str]]:
    rng = np.random.default_rng(11)
    return sentiment_data(32, rng, "train"), sentiment_data(16, rng, "dev"), sentiment_data(12, rng, "score").texts


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory) -> Path:
    """A trained tiny victim (see train_sentiment_victim). The untrained tiny model answers 0.5
    to everything, so scores built on its outputs (PSIM's confidence, STRIP's entropy) would
    hardly vary between texts and a comparison of scores would prove nothing."""
    return train_sentiment_victim(tmp_path_factory.mktemp("victim") / "victim")


class Bench:
    """Fits defenses on fresh copies of the trained tiny victim; caches one fit per defense
    for the checks that only score (fitting is the slow part)."""

    fitted_cache: dict[tuple[str, str], tuple] = {}

    def __init__(self, victim_dir: Path, tmp_path: Path) -> None:
        self.victim_dir, self.tmp_path = victim_dir, tmp_path

    def context(self) -> DefenseContext:
        """A new victim every time (RAP and friends must not lean on state left by another fit)."""
        train, dev, _ = defense_data()
        victim = load_backbone(str(self.victim_dir), 2)
        return DefenseContext(str(self.victim_dir), train, dev, 2, victim.model, victim.tokenizer, protected_label=1, max_length=32, progress=False)

    def fit(self, name: str, seed: int = 0):
        context = self.context()
        return DEFENSES.create(name, **DEFENSE_OPTIONS.get(name, {})).fit(context, np.random.default_rng(seed)), context

    def fitted(self, name: str):
        key = (name, str(self.victim_dir))
        if key not in self.fitted_cache:
            self.fitted_cache[key] = self.fit(name)
        return self.fitted_cache[key]


def defense_params_match_constructor(name: str, bench: Bench) -> None:
    check_defense_params_match_constructor(name, DEFENSE_NON_DEFAULTS[name])


def defense_constructor_only_stores(name: str, bench: Bench) -> None:
    check_defense_constructor_only_stores(name)  # the defaults: ONION names SmolLM2 and PSIM MiniLM's method; neither may load here


def defense_fit_returns_self_and_sets_a_threshold(name: str, bench: Bench) -> None:
    check_defense_fit_returns_self_and_sets_a_threshold(name, DEFENSE_OPTIONS.get(name, {}), bench.context, defense_data()[2])


def defense_same_seed_same_scores(name: str, bench: Bench) -> None:
    check_defense_same_seed_same_scores(name, DEFENSE_OPTIONS.get(name, {}), bench.context, defense_data()[2], bench.fitted(name))


def defense_score_independent_of_batch(name: str, bench: Bench) -> None:
    if DEFENSES.get(name).transductive:
        pytest.skip(f"'{name}' is transductive: it judges the texts of one score() call as one pool, by design")
    check_defense_score_independent_of_batch(name, DEFENSE_OPTIONS.get(name, {}), bench.context, defense_data()[2], bench.fitted(name))


def defense_save_load_same_scores(name: str, bench: Bench) -> None:
    check_defense_save_load_same_scores(name, DEFENSE_OPTIONS.get(name, {}), bench.context, defense_data()[2], bench.tmp_path, bench.fitted(name))


DEFENSE_CHECKS = [
    defense_params_match_constructor, defense_constructor_only_stores, defense_fit_returns_self_and_sets_a_threshold,
    defense_same_seed_same_scores, defense_score_independent_of_batch, defense_save_load_same_scores,
]


def defense_cases():
    for name in DEFENSES.names():
        for check in DEFENSE_CHECKS:
            bug = KNOWN_BUGS.get((name, check.__name__))
            marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
            yield pytest.param(name, check, id=f"{name}-{check.__name__}", marks=marks)


@pytest.mark.parametrize(("name", "check"), list(defense_cases()))
def test_defense_contract(name: str, check, victim_dir: Path, tmp_path: Path) -> None:
    check(name, Bench(victim_dir, tmp_path))


# ---------------------------------------------------------------- fine-tuning methods

def method_data() -> TextDataset:
    return sentiment_data(24, np.random.default_rng(5), "methods")


def train_tiny(method: str, seed: int):
    seed_torch(seed)
    backbone = load_backbone("tiny", 2)
    training = TrainingConfig(learning_rate=1e-2, epochs=1, batch_size=8, max_length=32, select_on_dev=False)
    model, _ = train_classifier(backbone.model, backbone.tokenizer, method_data(), None, METHODS.create(method), training,
                                np.random.default_rng(seed), progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def initial_weights(method: str) -> dict:
    seed_torch(1)  # the state train_tiny wraps the model in: the same initial trainable weights
    wrapped = METHODS.create(method).wrap(load_backbone("tiny", 2).model, 3)
    return {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}


METHOD_NON_DEFAULTS = {  # for the params() check: a valid value other than the default for every parameter
    "adalora": {"init_r": 6, "target_r": 4, "alpha": 8, "dropout": 0.05},
    "adapter": {"reduction_factor": 8, "variant": "double_seq_bn"},
    "full": {},
    "ia3": {},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["query", "value"]},
    "prefix": {"num_virtual_tokens": 3},
    "prompt": {"num_virtual_tokens": 3},
    "ptuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 64},
}


def method_params_match_constructor(name: str) -> None:
    assert name in METHOD_NON_DEFAULTS, f"add non-default values for every parameter of method '{name}' to METHOD_NON_DEFAULTS"
    check_method_params_match_constructor(name, METHOD_NON_DEFAULTS[name])


def method_constructor_only_stores(name: str) -> None:
    check_method_constructor_only_stores(name)


def method_same_seed_same_trained_weights(name: str) -> None:
    check_method_same_seed_same_trained_weights(name, train_tiny, initial_weights)


METHOD_CHECKS = [method_params_match_constructor, method_constructor_only_stores, method_same_seed_same_trained_weights]


@pytest.mark.parametrize("check", METHOD_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name: str, check) -> None:
    check(name)


def test_the_public_defense_check_runs_whole_on_a_registered_defense(victim_dir: Path, tmp_path: Path) -> None:
    """``peftshield.testing.check_defense`` as a third party runs it, on DAN."""
    bench = Bench(victim_dir, tmp_path)
    check_defense("dan", DEFENSE_OPTIONS["dan"], bench.context, defense_data()[2], tmp_path, DEFENSE_NON_DEFAULTS["dan"])


def test_the_public_method_check_runs_whole_on_lora() -> None:
    """``peftshield.testing.check_fine_tune_method`` as a third party runs it, every part at once."""
    from peftshield.testing import check_fine_tune_method

    check_fine_tune_method("lora", train_tiny, initial_weights, METHOD_NON_DEFAULTS["lora"])


def test_the_method_check_catches_a_spec_that_forgets_a_parameter(monkeypatch) -> None:
    """Why the round trip takes a non-default value for every parameter: a method whose recorded
    options leave out ``dropout`` rebuilds with the default dropout, which a round trip at defaults
    cannot tell apart. And values that leave a parameter at its default are refused."""
    lora = METHODS.get("lora")

    class Forgetful(lora):
        name = "forgetful"

        def config_dict(self) -> dict:
            options = super().config_dict()
            del options["dropout"]
            return options

    monkeypatch.setitem(METHODS._entries, "forgetful", Forgetful)
    check_spec_rebuilds_the_component(METHODS, "forgetful", {})  # at defaults the forgotten option goes unnoticed
    with pytest.raises(AssertionError, match="spec\\(\\) does not rebuild the same fine-tuning method"):
        check_method_params_match_constructor("forgetful", METHOD_NON_DEFAULTS["lora"])
    with pytest.raises(AssertionError, match="give a value other than the default for 'alpha'"):
        check_method_params_match_constructor("lora", {"r": 4})
    with pytest.raises(AssertionError, match="'dropout' is given only its default"):
        check_method_params_match_constructor("lora", {**METHOD_NON_DEFAULTS["lora"], "dropout": 0.1})


def test_a_method_built_by_hand_trains_with_its_checked_options() -> None:
    """``LoRA(r="4")`` (a string, as a hand-written config might give it) wraps with rank 4, the
    value its type checks turn it into, and a value out of bounds is one line naming the method."""
    from peftshield.errors import ConfigError

    lora = METHODS.get("lora")
    wrapped = lora(r="4").wrap(load_backbone("tiny", 2).model, 3)
    assert wrapped.peft_config["default"].r == 4 and lora(r="4").config_dict()["r"] == 4
    with pytest.raises(ConfigError, match="method 'lora': option 'r'"):
        lora(r=0).wrap(load_backbone("tiny", 2).model, 3)
