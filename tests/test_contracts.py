"""Contracts every registered component keeps, checked scikit-learn ``check_estimator`` style.

Each contract is one named ``check_*`` function; the tests run every check over every
component of its registry, so a failure reads ``test_defense_contract[strip-check_...]``:
which contract broke, for which component. A new component is checked automatically; if
it needs options to run offline on the tiny model, add them to the ``*_OPTIONS`` tables.

Contracts:
- ``params()`` reports exactly the constructor's parameters with the values given, and a
  component rebuilt from its ``spec()`` has the same parameters;
- the constructor only stores its parameters: anything it is given is kept as is (no
  validation, no loading), nothing else is set, and creating one with defaults is fast;
- the same seed gives the same result (poisoned texts, defense scores, trained weights);
- a non-transductive defense scores a text the same alone and inside a batch;
- a saved and reloaded defense gives the same scores and threshold.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor_fixtures import sentiment_data, single_thread_torch, train_sentiment_victim
from peftshield.attacks import POISONERS, PoisonSpec, poison_dataset
from peftshield.data import TextDataset
from peftshield.defenses import DEFENSES, DefenseContext
from peftshield.errors import ConfigError
from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
from peftshield.models import load_backbone

FAST_SECONDS = 0.5  # creating a component with defaults; loading any model takes longer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


def constructor_parameters(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD}


def check_constructor_only_stores(cls) -> None:
    """Whatever the constructor is given is stored as is (no validation, no conversion), and
    nothing else is set: no fitted (``_``-suffixed) state, no cache, no loaded model."""
    sentinels = {name: object() for name in constructor_parameters(cls)}
    component = cls(**sentinels)
    assert set(vars(component)) == set(sentinels), f"the constructor set {sorted(set(vars(component)) - set(sentinels))}"
    for name, sentinel in sentinels.items():
        assert component.params()[name] is sentinel, f"parameter '{name}' is not stored as given"


def check_params_are_the_constructor_parameters(cls, given: dict) -> None:
    """``params()`` keys are the constructor's parameter names, values what was passed (or the default)."""
    parameters = constructor_parameters(cls)
    component = cls(**given)
    expected = {name: given.get(name, parameter.default) for name, parameter in parameters.items()}
    assert set(component.params()) == set(parameters)
    for name, value in component.params().items():
        assert value is expected[name], f"params()['{name}'] is {value!r}, the constructor got {expected[name]!r}"


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


def poisoner_non_defaults(name: str, paraphrase_file: Path) -> dict:
    return {
        "badnet": {"words": ("mn", "bb"), "num_triggers": 2},
        "insent": {"sentence": "no one saw it coming"},
        "syntactic": {"paraphrases": str(paraphrase_file), "template": "S(NP)(VP)(.)"},
    }.get(name, {})


def check_poisoner_params_match_constructor(name: str, paraphrase_file: Path) -> None:
    cls = POISONERS.get(name)
    check_params_are_the_constructor_parameters(cls, poisoner_non_defaults(name, paraphrase_file))
    created = POISONERS.create(name, **poisoner_non_defaults(name, paraphrase_file))
    assert POISONERS.from_spec(created.spec()).params() == created.params(), "spec() does not rebuild the same trigger"


def check_poisoner_constructor_only_stores(name: str, paraphrase_file: Path) -> None:
    check_constructor_only_stores(POISONERS.get(name))
    started = time.perf_counter()
    poisoner = POISONERS.create(name, **poisoner_options(name, paraphrase_file))
    assert time.perf_counter() - started < FAST_SECONDS
    assert not [k for k in vars(poisoner) if k.endswith("_") or k.startswith("_")], "creating must not load or cache anything"


def check_poisoner_same_seed_same_poisoned_texts(name: str, paraphrase_file: Path) -> None:
    poisoner = POISONERS.create(name, **poisoner_options(name, paraphrase_file))
    first = poisoner.poison_texts(TEXTS, np.random.default_rng(3))
    assert first == POISONERS.create(name, **poisoner_options(name, paraphrase_file)).poison_texts(TEXTS, np.random.default_rng(3))
    assert all(p != t for p, t in zip(first, TEXTS)), "every text must carry the trigger"
    data = TextDataset(TEXTS * 4, [0, 1] * 10, [str(i) for i in range(20)])
    spec = PoisonSpec(target_label=0, count=6)
    a = poison_dataset(data, poisoner, spec, np.random.default_rng(5))
    b = poison_dataset(data, POISONERS.create(name, **poisoner_options(name, paraphrase_file)), spec, np.random.default_rng(5))
    assert a.manifest_rows() == b.manifest_rows() and a.data.texts == b.data.texts


POISONER_CHECKS = [check_poisoner_params_match_constructor, check_poisoner_constructor_only_stores, check_poisoner_same_seed_same_poisoned_texts]


@pytest.mark.parametrize("check", POISONER_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", POISONERS.names())
def test_poisoner_contract(name: str, check, paraphrase_file: Path) -> None:
    check(name, paraphrase_file)


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


def assert_scores_vary(scores: np.ndarray) -> None:
    assert np.ptp(scores) > 1e-3, f"scores hardly vary between texts ({np.ptp(scores):.2g}): comparing them would prove nothing"


def check_defense_params_match_constructor(name: str, bench: Bench) -> None:
    cls = DEFENSES.get(name)
    given = DEFENSE_NON_DEFAULTS.get(name, {})
    check_params_are_the_constructor_parameters(cls, given)
    created = DEFENSES.create(name, **given)
    assert set(created.params()) == set(constructor_parameters(cls))
    assert DEFENSES.from_spec(created.spec()).params() == created.params(), "spec() does not rebuild the same defense"


def check_defense_constructor_only_stores(name: str, bench: Bench) -> None:
    check_constructor_only_stores(DEFENSES.get(name))
    started = time.perf_counter()
    defense = DEFENSES.create(name)  # the defaults: ONION names SmolLM2 and PSIM MiniLM's method; neither may load here
    assert time.perf_counter() - started < FAST_SECONDS
    assert not [k for k in vars(defense) if k.endswith("_") or k.startswith("_")]
    with pytest.raises(ConfigError, match="not fitted"):
        defense.fitted_threshold()


def check_defense_fit_returns_self_and_sets_a_threshold(name: str, bench: Bench) -> None:
    _, _, texts = defense_data()
    defense = DEFENSES.create(name, **DEFENSE_OPTIONS.get(name, {}))
    assert defense.fit(bench.context(), np.random.default_rng(0)) is defense
    scores = defense.score(texts)
    assert scores.shape == (len(texts),) and np.isfinite(scores).all()
    np.testing.assert_array_equal(defense.flag(texts), scores > defense.fitted_threshold())


def check_defense_same_seed_same_scores(name: str, bench: Bench) -> None:
    _, _, texts = defense_data()
    first, _ = bench.fitted(name)
    again, _ = bench.fit(name, seed=0)
    scores = first.score(texts)
    assert_scores_vary(scores)
    np.testing.assert_allclose(again.score(texts), scores, atol=1e-6)
    assert again.fitted_threshold() == pytest.approx(first.fitted_threshold(), abs=1e-6)


def check_defense_score_independent_of_batch(name: str, bench: Bench) -> None:
    if DEFENSES.get(name).transductive:
        pytest.skip(f"'{name}' is transductive: it judges the texts of one score() call as one pool, by design")
    defense, _ = bench.fitted(name)
    _, _, texts = defense_data()
    batch = defense.score(texts)
    assert_scores_vary(batch)
    alone = np.array([defense.score([text])[0] for text in texts])
    np.testing.assert_allclose(alone, batch, atol=1e-5, err_msg="a text's score depends on the rest of its batch")
    reordered = defense.score(texts[::-1])[::-1]
    np.testing.assert_allclose(reordered, batch, atol=1e-5, err_msg="a text's score depends on its position in the batch")


def check_defense_save_load_same_scores(name: str, bench: Bench) -> None:
    defense, context = bench.fitted(name)
    _, _, texts = defense_data()
    defense.save(bench.tmp_path / name)
    reloaded = DEFENSES.get(name).load(bench.tmp_path / name, context)
    scores = defense.score(texts)
    assert_scores_vary(scores)
    np.testing.assert_allclose(reloaded.score(texts), scores, atol=1e-6)
    assert reloaded.fitted_threshold() == pytest.approx(defense.fitted_threshold())
    assert reloaded.params() == defense.params()


DEFENSE_CHECKS = [
    check_defense_params_match_constructor, check_defense_constructor_only_stores, check_defense_fit_returns_self_and_sets_a_threshold,
    check_defense_same_seed_same_scores, check_defense_score_independent_of_batch, check_defense_save_load_same_scores,
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


def check_method_params_match_constructor(name: str) -> None:
    cls = METHODS.get(name)
    given = {field: object() for field in METHODS.create(name).config_dict()}
    method = cls(**given)
    assert set(method.params()) == set(given) and all(method.params()[k] is v for k, v in given.items())
    created = METHODS.create(name)
    assert created.params() == created.config_dict(), "a created method stores every option (defaults filled in)"
    assert METHODS.from_spec(created.spec()).config_dict() == created.config_dict(), "spec() does not rebuild the same method"


def check_method_constructor_only_stores(name: str) -> None:
    cls = METHODS.get(name)
    method = cls(anything=object())  # **options: stored, validated only by config()/the registry
    assert set(vars(method)) == {"options"}
    with pytest.raises(ConfigError, match=f"method '{name}'"):
        method.config()
    started = time.perf_counter()
    created = METHODS.create(name)
    assert time.perf_counter() - started < FAST_SECONDS and set(vars(created)) == {"options"}


def check_method_same_seed_same_trained_weights(name: str) -> None:
    seed_torch(1)  # the state train_tiny wraps the model in: the same initial trainable weights
    initial = {n: p.detach().clone() for n, p in METHODS.create(name).wrap(load_backbone("tiny", 2).model, 3).named_parameters() if p.requires_grad}
    first, second = train_tiny(name, seed=1), train_tiny(name, seed=1)
    assert first.keys() == second.keys()
    different = [n for n in first if not torch.equal(first[n], second[n])]
    assert not different, f"same seed, different weights: {different[:3]}"
    moved = [n for n in first if n in initial and not torch.equal(first[n], initial[n])]
    assert moved, "training changed no trainable weight"


METHOD_CHECKS = [check_method_params_match_constructor, check_method_constructor_only_stores, check_method_same_seed_same_trained_weights]


@pytest.mark.parametrize("check", METHOD_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name: str, check) -> None:
    check(name)
