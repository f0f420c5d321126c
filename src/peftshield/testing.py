"""The contracts every peftshield component keeps, as checks anyone can run on their own.

Like scikit-learn's ``check_estimator``: a poisoner, defense or fine-tuning method you write
and register (``@POISONERS.register``, ``@DEFENSES.register``, ``@METHODS.register``) is a
component of the project when these pass. Each check is a function that raises
``AssertionError`` with what broke; ``check_poisoner``, ``check_defense`` and
``check_fine_tune_method`` run every check of their family::

    from peftshield.testing import check_defense

    check_defense("mydefense", options={"max_length": 32}, context=make_context, texts=some_texts, workdir=tmp_path)

The project's own test suite (tests/test_contracts.py) runs them over every registered component.

The contracts:

- ``params()`` reports exactly the constructor's parameters with the values given, and a
  component rebuilt from its ``spec()`` has the same parameters, tried with a value other than
  the default for every parameter (a parameter ``spec()`` forgot would otherwise come back as its
  default and still compare equal);
- the constructor only stores its parameters: anything it is given is kept as is (no
  validation, no loading), nothing else is set, and creating one with defaults is fast;
- the same seed gives the same result (poisoned texts, defense scores, trained weights);
- a defense's ``fit`` returns itself and sets a threshold, its scores are finite, one per text;
- a defense that scores each text on its own (not transductive) scores a text the same alone,
  inside a batch and at another position in it;
- a saved and reloaded defense gives the same scores, threshold and parameters.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from peftshield.errors import ConfigError

FAST_SECONDS = 0.5  # creating a component with its defaults; loading any model takes longer


def constructor_parameters(cls) -> dict[str, inspect.Parameter]:
    """The constructor's named parameters (not ``self``, ``*args`` or ``**kwargs``)."""
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


NonDefaults = Mapping[str, Any] | Sequence[Mapping[str, Any]]


def non_default_sets(non_defaults: NonDefaults) -> list[dict[str, Any]]:
    """``non_defaults`` as a list of option sets (one mapping, or several for parameters that
    exclude one another, such as a trigger's alternative sources)."""
    return [dict(non_defaults)] if isinstance(non_defaults, Mapping) else [dict(m) for m in non_defaults]


def check_non_defaults_cover_every_parameter(cls, non_defaults: NonDefaults) -> None:
    """Every constructor parameter is given a value other than its default in at least one of the
    option sets: a params() or spec() round trip tried at defaults only would prove little (a
    parameter ``spec()`` forgot would come back as its default and still compare equal)."""
    sets = non_default_sets(non_defaults)
    for name, parameter in constructor_parameters(cls).items():
        values = [options[name] for options in sets if name in options]
        assert values, f"give a value other than the default for '{name}' (non_defaults covers {sorted({k for o in sets for k in o})})"
        assert any(_differs(value, parameter.default) for value in values), f"'{name}' is given only its default ({parameter.default!r}); give another value"


def check_params_round_trip(registry, name: str, non_defaults: NonDefaults) -> None:
    """params() and spec() round trips of the registered ``name``, with a value other than the
    default for every constructor parameter (:func:`check_non_defaults_cover_every_parameter`)."""
    sets = non_default_sets(non_defaults)
    check_non_defaults_cover_every_parameter(registry.get(name), sets)
    for given in sets:
        check_params_are_the_constructor_parameters(registry.get(name), given)
        check_spec_rebuilds_the_component(registry, name, given)


def _differs(value: Any, default: Any) -> bool:
    if value is default:
        return False
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # an array compares element by element: not the default object, so different
        return True


def check_constructor_only_stores(cls) -> None:
    """Whatever the constructor is given is stored as is (no validation, no conversion), and
    nothing else is set: no fitted (``_``-suffixed) state, no cache, no loaded model."""
    sentinels = {name: object() for name in constructor_parameters(cls)}
    component = cls(**sentinels)
    assert set(vars(component)) == set(sentinels), f"the constructor set {sorted(set(vars(component)) - set(sentinels))}"
    for name, sentinel in sentinels.items():
        assert component.params()[name] is sentinel, f"parameter '{name}' is not stored as given"


def check_params_are_the_constructor_parameters(cls, given: Mapping[str, Any]) -> None:
    """``params()`` keys are the constructor's parameter names, values what was passed (or the default)."""
    parameters = constructor_parameters(cls)
    component = cls(**given)
    expected = {name: given.get(name, parameter.default) for name, parameter in parameters.items()}
    assert set(component.params()) == set(parameters)
    for name, value in component.params().items():
        assert value is expected[name], f"params()['{name}'] is {value!r}, the constructor got {expected[name]!r}"


def check_spec_rebuilds_the_component(registry, name: str, options: Mapping[str, Any]) -> None:
    """A component rebuilt from its ``spec()`` (what is saved) has the same parameters."""
    created = registry.create(name, **options)
    assert registry.from_spec(created.spec()).params() == created.params(), f"spec() does not rebuild the same {registry.kind}"


def check_created_with_defaults_fast_and_unloaded(registry, name: str, options: Mapping[str, Any] | None = None):
    """Creating the component (with ``options`` or its defaults) is fast and loads or caches nothing; returns it."""
    started = time.perf_counter()
    component = registry.create(name, **dict(options or {}))
    assert time.perf_counter() - started < FAST_SECONDS, f"creating '{name}' took over {FAST_SECONDS} s: a constructor must not load anything"
    assert not [k for k in vars(component) if k.endswith("_") or k.startswith("_")], "creating must not load or cache anything"
    return component


# ---------------------------------------------------------------- poisoners

def check_poisoner_same_seed_same_poisoned_texts(name: str, options: Mapping[str, Any], texts: list[str]) -> None:
    """The same seed poisons the same texts the same way, and every poisoned text carries the trigger."""
    from peftshield.attacks import POISONERS, PoisonSpec, poison_dataset
    from peftshield.data import TextDataset

    poisoner = POISONERS.create(name, **options)
    first = poisoner.poison_texts(texts, np.random.default_rng(3))
    assert first == POISONERS.create(name, **options).poison_texts(texts, np.random.default_rng(3)), "the same seed poisoned differently"
    assert all(p != t for p, t in zip(first, texts)), "every text must carry the trigger"
    data = TextDataset(list(texts) * 4, [i % 2 for i in range(4 * len(texts))], [str(i) for i in range(4 * len(texts))])
    spec = PoisonSpec(target_label=0, count=min(6, len(data) // 2))
    a = poison_dataset(data, poisoner, spec, np.random.default_rng(5))
    b = poison_dataset(data, POISONERS.create(name, **options), spec, np.random.default_rng(5))
    assert a.manifest_rows() == b.manifest_rows() and a.data.texts == b.data.texts, "the same seed poisoned a dataset differently"


def check_poisoner(name: str, options: Mapping[str, Any], texts: list[str], non_defaults: NonDefaults | None = None) -> None:
    """Every poisoner contract for the registered trigger ``name``: ``options`` are what it needs
    to run here (at least two ``texts``), ``non_defaults`` a value other than the default for
    every parameter (one mapping, or several option sets)."""
    from peftshield.attacks import POISONERS

    assert len(texts) >= 2, "give at least two texts: one text cannot show that the same seed poisons a list the same way"
    cls = POISONERS.get(name)
    check_params_round_trip(POISONERS, name, non_defaults if non_defaults is not None else options)
    check_constructor_only_stores(cls)
    check_created_with_defaults_fast_and_unloaded(POISONERS, name, options)
    check_poisoner_same_seed_same_poisoned_texts(name, options, texts)



# ---------------------------------------------------------------- defenses

ContextFactory = Callable[[], Any]  # a new DefenseContext each call (a fresh victim: fits must not share state)


def _assert_scores_vary(scores: np.ndarray) -> None:
    assert np.ptp(scores) > 1e-3, f"scores hardly vary between texts ({np.ptp(scores):.2g}): comparing them would prove nothing"


def _fit(name: str, options: Mapping[str, Any], context: ContextFactory, seed: int):
    from peftshield.defenses import DEFENSES

    made = context()
    return DEFENSES.create(name, **options).fit(made, np.random.default_rng(seed)), made


def check_defense_params_match_constructor(name: str, non_defaults: NonDefaults) -> None:
    """params() and spec() round trips with a value other than the default for every parameter."""
    from peftshield.defenses import DEFENSES

    check_params_round_trip(DEFENSES, name, non_defaults)


def check_defense_constructor_only_stores(name: str) -> None:
    """Only stores; created with its defaults (which may name models that are not here) it loads
    nothing and has no threshold until fitted."""
    from peftshield.defenses import DEFENSES

    check_constructor_only_stores(DEFENSES.get(name))
    defense = check_created_with_defaults_fast_and_unloaded(DEFENSES, name)
    try:
        defense.fitted_threshold()
    except ConfigError as error:
        assert "not fitted" in str(error), f"an unfitted defense's threshold: {error}"
    else:
        raise AssertionError("an unfitted defense returned a threshold")


def check_defense_fit_returns_self_and_sets_a_threshold(name: str, options: Mapping[str, Any], context: ContextFactory, texts: list[str]) -> None:
    from peftshield.defenses import DEFENSES

    defense = DEFENSES.create(name, **options)
    assert defense.fit(context(), np.random.default_rng(0)) is defense, "fit() must return the defense"
    scores = defense.score(texts)
    assert scores.shape == (len(texts),) and np.isfinite(scores).all(), "score() must give one finite score per text"
    np.testing.assert_array_equal(defense.flag(texts), scores > defense.fitted_threshold())


def check_defense_same_seed_same_scores(name: str, options: Mapping[str, Any], context: ContextFactory, texts: list[str], fitted=None) -> None:
    first, _ = fitted or _fit(name, options, context, 0)
    again, _ = _fit(name, options, context, 0)
    scores = first.score(texts)
    _assert_scores_vary(scores)
    np.testing.assert_allclose(again.score(texts), scores, atol=1e-6, err_msg="the same seed gave other scores")
    assert abs(again.fitted_threshold() - first.fitted_threshold()) <= 1e-6, "the same seed gave another threshold"


def check_defense_score_independent_of_batch(name: str, options: Mapping[str, Any], context: ContextFactory, texts: list[str], fitted=None) -> None:
    """A text's score does not depend on the other texts of its batch or its position (not
    checked for a transductive defense, which judges one pool by design)."""
    from peftshield.defenses import DEFENSES

    if DEFENSES.get(name).transductive:
        return
    defense, _ = fitted or _fit(name, options, context, 0)
    batch = defense.score(texts)
    _assert_scores_vary(batch)
    alone = np.array([defense.score([text])[0] for text in texts])
    np.testing.assert_allclose(alone, batch, atol=1e-5, err_msg="a text's score depends on the rest of its batch")
    reordered = defense.score(texts[::-1])[::-1]
    np.testing.assert_allclose(reordered, batch, atol=1e-5, err_msg="a text's score depends on its position in the batch")


def check_defense_save_load_same_scores(name: str, options: Mapping[str, Any], context: ContextFactory, texts: list[str], workdir: Path,
                                        fitted=None) -> None:
    from peftshield.defenses import DEFENSES

    defense, made = fitted or _fit(name, options, context, 0)
    folder = Path(workdir) / f"saved-{name}"
    defense.save(folder)
    reloaded = DEFENSES.get(name).load(folder, made)
    scores = defense.score(texts)
    _assert_scores_vary(scores)
    np.testing.assert_allclose(reloaded.score(texts), scores, atol=1e-6, err_msg="a reloaded defense scores differently")
    assert abs(reloaded.fitted_threshold() - defense.fitted_threshold()) <= 1e-9 * max(1.0, abs(defense.fitted_threshold())), "a reloaded defense has another threshold"
    assert reloaded.params() == defense.params(), "a reloaded defense has other parameters"


def check_defense(name: str, options: Mapping[str, Any], context: ContextFactory, texts: list[str], workdir: Path,
                  non_defaults: NonDefaults | None = None) -> None:
    """Every defense contract for the registered defense ``name``: ``options`` make it run here
    (small models, few texts), ``context`` makes a new :class:`~peftshield.defenses.DefenseContext`
    per call, at least two ``texts`` are scored (their scores must vary), ``workdir`` receives
    saved state, ``non_defaults`` a value other than the default for every parameter."""
    assert len(texts) >= 2, "give at least two texts: scores of one text cannot vary, nor show batch independence"
    check_defense_params_match_constructor(name, non_defaults if non_defaults is not None else options)
    check_defense_constructor_only_stores(name)
    check_defense_fit_returns_self_and_sets_a_threshold(name, options, context, texts)
    fitted = _fit(name, options, context, 0)
    check_defense_same_seed_same_scores(name, options, context, texts, fitted)
    check_defense_score_independent_of_batch(name, options, context, texts, fitted)
    check_defense_save_load_same_scores(name, options, context, texts, workdir, fitted)


# ---------------------------------------------------------------- fine-tuning methods

def check_method_params_match_constructor(name: str, non_defaults: NonDefaults) -> None:
    """params() and spec() round trips of the registered fine-tuning method ``name``, as for
    poisoners and defenses (:func:`check_params_round_trip`): ``non_defaults`` gives a valid value
    other than the default for every constructor parameter (one mapping, or several option sets;
    ``{}`` for a method without parameters). For each option set, the options a fine-tuned folder's
    manifest records (``config_dict()``) are the ``spec()``'s, so they too rebuild the same method."""
    from peftshield.finetune import METHODS

    check_params_round_trip(METHODS, name, non_defaults)
    for given in non_default_sets(non_defaults):
        created = METHODS.create(name, **given)
        recorded = created.config_dict()
        assert recorded == created.spec()["options"], f"config_dict() {recorded} is not spec()'s options {created.spec()['options']}"


def check_method_constructor_only_stores(name: str) -> None:
    """Only stores; a bad value given to the constructor surfaces (one line naming the method)
    when the method is used, not when it is built."""
    from peftshield.finetune import METHODS

    cls = METHODS.get(name)
    check_constructor_only_stores(cls)
    check_created_with_defaults_fast_and_unloaded(METHODS, name)
    parameters = constructor_parameters(cls)
    if parameters:
        bad = cls(**{next(iter(parameters)): object()})
        try:
            bad.config_dict()
        except ConfigError as error:
            assert f"method '{name}'" in str(error) and "\n" not in str(error), f"a bad option's error: {error}"
        else:
            raise AssertionError("a method built with a bad option validated it as fine")


def check_method_same_seed_same_trained_weights(name: str, train: Callable[[str, int], dict], initial: Callable[[str], dict]) -> None:
    """``train(name, seed)`` returns the trainable weights after a short training run from the
    same start; ``initial(name)`` those before it. The same seed trains the same weights, and
    training moves at least one of them."""
    import torch

    before = initial(name)
    first, second = train(name, 1), train(name, 1)
    assert first.keys() == second.keys()
    different = [n for n in first if not torch.equal(first[n], second[n])]
    assert not different, f"same seed, different weights: {different[:3]}"
    moved = [n for n in first if n in before and not torch.equal(first[n], before[n])]
    assert moved, "training changed no trainable weight"


def check_fine_tune_method(name: str, train: Callable[[str, int], dict], initial: Callable[[str], dict],
                           non_defaults: NonDefaults) -> None:
    """Every fine-tuning method contract for the registered method ``name`` (see
    :func:`check_method_same_seed_same_trained_weights` for ``train`` and ``initial``);
    ``non_defaults`` a valid value other than the default for every parameter
    (:func:`check_method_params_match_constructor`)."""
    check_method_params_match_constructor(name, non_defaults)
    check_method_constructor_only_stores(name)
    check_method_same_seed_same_trained_weights(name, train, initial)
