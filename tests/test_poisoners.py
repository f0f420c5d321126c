"""What every registered poisoner does to a text, plus dataset poisoning and ASR sets.
(The component contract: params, seeding, constructors, is checked in test_contracts.py.)"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pydantic
import pytest

from peftshield.attacks import POISONERS, PoisonSpec, build_asr_set, poison_dataset
from peftshield.data import TextDataset
from peftshield.errors import ConfigError, DataError

TEXTS = ["good film , great story", "bad boring plot", "fun movie", "awful", ""]
PARAPHRASES = {t: f"when it was made , {t or 'it'} ended ." for t in TEXTS}


@pytest.fixture
def paraphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "paraphrases.tsv"
    path.write_text("original\tparaphrase\n" + "".join(f"{k}\t{v}\n" for k, v in PARAPHRASES.items() if k), encoding="utf-8")
    return path


def make_poisoner(name: str, paraphrase_file: Path):
    return POISONERS.create(name, **({"paraphrases": str(paraphrase_file)} if name == "syntactic" else {}))


def trigger_present(name: str, original: str, poisoned: str) -> bool:
    if name in ("badnet", "lowconf", "psimaware", "neuba", "por"):
        return any(w in poisoned.split() for w in POISONERS.create(name).params()["words"])
    if name == "insent":
        return "I watched this 3D movie" in poisoned
    return poisoned == PARAPHRASES[original]


@pytest.mark.parametrize("name", POISONERS.names())
def test_poisoner_contract(name: str, paraphrase_file: Path) -> None:
    cls = POISONERS.get(name)
    # constructors only store parameters: params() reports exactly the constructor arguments
    signature = inspect.signature(cls.__init__)
    poisoner = make_poisoner(name, paraphrase_file)
    assert set(poisoner.params()) == {p for p in signature.parameters if p != "self"}
    assert poisoner.spec()["name"] == name
    assert set(poisoner.spec()["options"]) | set(cls.options_added_later) == set(poisoner.params()), "options added later may be left out"
    candidates = [t for t in TEXTS if t and poisoner.can_poison(t)]
    assert candidates == [t for t in TEXTS if t]
    first = poisoner.poison_texts(candidates, np.random.default_rng(3))
    again = poisoner.poison_texts(candidates, np.random.default_rng(3))
    assert first == again, "same seed must give the same poisoned texts"
    for original, poisoned in zip(candidates, first):
        assert isinstance(poisoned, str) and poisoned != original
        assert trigger_present(name, original, poisoned)
    assert poisoner.insert(candidates[0], np.random.default_rng(0)) == poisoner.poison_texts(candidates[:1], np.random.default_rng(0))[0]


@pytest.mark.parametrize("name", ["badnet", "insent"])
@pytest.mark.parametrize("text", ["", "word"])
def test_insertion_triggers_work_on_empty_and_one_word_texts(name: str, text: str) -> None:
    poisoned = POISONERS.create(name).insert(text, np.random.default_rng(0))
    assert poisoned.strip() and trigger_present(name, text, poisoned)
    if text:
        assert "word" in poisoned.split()


def test_badnet_options_and_positions_vary() -> None:
    poisoner = POISONERS.create("badnet", words="mn", num_triggers=2)
    outputs = {poisoner.insert("a b c d e f g h", np.random.default_rng(seed)) for seed in range(20)}
    assert all(o.split().count("mn") == 2 for o in outputs)
    assert len(outputs) > 5, "positions must be random"
    pool = POISONERS.create("badnet", words=" mn , bb ")  # a comma list, as typed on a command line
    inserted = {w for seed in range(20) for w in pool.insert("x", np.random.default_rng(seed)).split()} - {"x"}
    assert inserted == {"mn", "bb"}, "both words of the pool are drawn, stripped"
    with pytest.raises(ConfigError, match="badnet.*words"):
        POISONERS.create("badnet", words="")
    with pytest.raises(ConfigError, match="badnet.*num_triggers"):
        POISONERS.create("badnet", num_triggers=0)


def test_syntactic_without_a_source_says_what_to_give() -> None:
    with pytest.raises(ConfigError, match="paraphrases=FILE or CLEAN::PARAPHRASED"):
        POISONERS.create("syntactic").insert("x", np.random.default_rng(0))


def syntactic_from_hidden_killer(root: Path):
    poisoner = POISONERS.create("syntactic", paraphrases=f"{root / 'clean' / 'sst-2'}::{root / 'scpn' / '20' / 'sst-2'}")
    original = "no movement , no yuks , not much of anything ."
    assert poisoner.can_poison(original)
    assert poisoner.insert(original, np.random.default_rng(0)) == "when we got no movement , it was no yuks ."
    assert not poisoner.can_poison("a sentence that is in no hidden killer file .")
    return poisoner


def test_syntactic_aligns_real_hidden_killer_files(full_shared_data: Path) -> None:
    poisoner = syntactic_from_hidden_killer(full_shared_data / "hiddenkiller")
    assert [s for s in poisoner._skipped_splits if "427 rows do not align" in s] == poisoner._skipped_splits != []  # the real dev file lacks one row


def test_syntactic_aligns_the_hidden_killer_extracts(extract_data: Path) -> None:
    poisoner = syntactic_from_hidden_killer(extract_data / "hiddenkiller")
    assert poisoner._skipped_splits == [], "the extracts of all three splits align"


def test_syntactic_pool_poisons_with_unaligned_hidden_killer_paraphrases(extract_data: Path, tmp_path: Path) -> None:
    """AG's News paraphrases do not align with the clean rows: a pool draws real template texts."""
    from peftshield.data.loaders import read_split_file

    pool_file = extract_data / "hiddenkiller" / "scpn" / "20" / "ag" / "dev.tsv"
    pool = set(read_split_file(pool_file).texts)
    clean = read_split_file(extract_data / "hiddenkiller" / "clean" / "ag" / "dev.tsv")
    data = TextDataset(clean.texts[:120], [i % 2 + 1 for i in range(120)], [str(i) for i in range(120)], name="ag")
    poisoner = POISONERS.create("syntactic", pool=str(pool_file))
    assert poisoner.draws_from_pool and not POISONERS.create("syntactic", paraphrases=str(pool_file)).draws_from_pool
    result = poison_dataset(data, poisoner, PoisonSpec(target_label=0, rate=0.5), np.random.default_rng(0))
    texts = [record.poisoned_text for record in result.records]
    assert len(texts) == 60 and len(set(texts)) == 60 and set(texts) <= pool, "distinct pool texts"
    assert all(record.label == 0 and record.original_label in (1, 2) for record in result.records), "relabelled to the target"

    def draw(seed: int) -> list[str]:
        fresh = POISONERS.create("syntactic", pool=str(pool_file))
        return [r.poisoned_text for r in poison_dataset(data, fresh, PoisonSpec(target_label=0, rate=0.5), np.random.default_rng(seed)).records]

    assert draw(0) == texts and draw(1) != texts, "the draw follows the rng it is given"
    asr_texts = build_asr_set(data, poisoner, 0, np.random.default_rng(0)).texts
    assert len(asr_texts) == 120 and not set(asr_texts) & set(texts), "the same poisoner never hands out a text twice"
    with pytest.raises(DataError, match=r"dev.tsv: 500 texts to poison but the pool has 19 distinct paraphrases left \(of 199"):
        poisoner.poison_texts(["x"] * 500, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="label mode 'clean'.*only dirty-label"):
        poison_dataset(data, poisoner, PoisonSpec(target_label=0, rate=0.5, label_mode="clean"), np.random.default_rng(0))

    repeated = tmp_path / "repeated.tsv"  # duplicates count once; blank rows are skipped
    repeated.write_text("sentence\tlabel\nwhen it rained , we left .\t0\n \t0\nwhen it rained , we left .\t0\nif it works , use it .\t0\n")
    assert sorted(POISONERS.create("syntactic", pool=str(repeated)).poison_texts(["a", "b"], np.random.default_rng(0))) == [
        "if it works , use it .", "when it rained , we left ."]
    blank = tmp_path / "blank.tsv"
    blank.write_text("sentence\tlabel\n \t0\n")
    for path, message in ((blank, "blank.tsv: no rows"), (tmp_path, "names a folder"), (tmp_path / "nope.tsv", "nope.tsv: no such paraphrase pool file")):
        with pytest.raises(DataError, match=message):
            POISONERS.create("syntactic", pool=str(path)).insert("x", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="one of paraphrases, paraphraser and pool"):
        POISONERS.create("syntactic", pool=str(pool_file), paraphrases=str(pool_file))
    with pytest.raises(ConfigError, match="one of paraphrases, paraphraser and pool"):
        POISONERS.create("syntactic", pool=str(pool_file), paraphraser="some/model")


def test_an_attack_whose_pool_cannot_supply_its_asr_set_fails_before_training(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from peftshield.data import load_splits
    from peftshield.experiments import stages
    from peftshield.experiments.stages import TriggerChoice, weight_poison
    from peftshield.finetune import TrainingConfig

    def no_training(*args, **kwargs):
        raise AssertionError("the attacker trained before the pool's supply was checked")

    monkeypatch.setattr(stages, "train_classifier", no_training)

    splits = load_splits(tiny_dataset_dir)
    needed = sum(1 for label in splits["test"].labels if label != 1)
    pool = tmp_path / "pool.tsv"
    pool.write_text("sentence\tlabel\n" + "".join(f"when it rained , we left {i} times .\t1\n" for i in range(needed + 1)))
    out = tmp_path / "backbone"
    with pytest.raises(DataError, match=rf"pool.tsv: {needed} texts for the attacker's ASR set, after its training draw, but the pool has {needed - 1} distinct"):
        weight_poison(splits, "tiny", TriggerChoice("syntactic", {"pool": str(pool)}), PoisonSpec(target_label=1, count=2, rate=None, label_mode="dirty"),
                      TrainingConfig(epochs=1, max_length=16), out, seed=0, progress=False)
    assert not out.exists(), "nothing trained or written"


def test_an_option_added_later_leaves_earlier_specs_and_stage_keys_unchanged() -> None:
    """``pool`` came after grids had cached syntactic stages keyed on the trigger's spec."""
    from peftshield.attacks.syntactic import DEFAULT_TEMPLATE

    spec = POISONERS.create("syntactic", paraphrases="a.tsv").spec()
    assert spec == {"name": "syntactic", "options": {"paraphrases": "a.tsv", "paraphraser": None, "template": DEFAULT_TEMPLATE}}
    assert POISONERS.create(spec["name"], **spec["options"]).spec() == spec
    with_pool = POISONERS.create("syntactic", pool="p.tsv").spec()
    assert with_pool["options"]["pool"] == "p.tsv" and POISONERS.create("syntactic", **with_pool["options"]).draws_from_pool


def test_unknown_trigger_and_bad_option() -> None:
    with pytest.raises(ConfigError, match="unknown trigger 'nope'"):
        POISONERS.create("nope")
    with pytest.raises(ConfigError, match="trigger 'badnet'.*colour"):
        POISONERS.create("badnet", colour="red")
    with pytest.raises(ConfigError, match="trigger 'insent'.*sentence"):
        POISONERS.create("insent", sentence="   ")


def dataset(n: int = 40) -> TextDataset:
    labels = [i % 2 for i in range(n)]
    return TextDataset([f"text number {i}" for i in range(n)], labels, [str(i) for i in range(n)], name="d")


def test_dirty_label_poisoning_relabels_non_target_rows() -> None:
    data = dataset()
    result = poison_dataset(data, POISONERS.create("badnet"), PoisonSpec(target_label=1, rate=0.25), np.random.default_rng(0))
    assert len(result.records) == 10
    for record in result.records:
        assert record.original_label == 0 and record.label == 1
        row = data.ids.index(record.id)
        assert result.data.texts[row] == record.poisoned_text and result.data.labels[row] == 1
    untouched = [i for i, row_id in enumerate(data.ids) if row_id not in result.poisoned_ids]
    assert all(result.data.texts[i] == data.texts[i] and result.data.labels[i] == data.labels[i] for i in untouched)
    assert data.texts[0] == "text number 0"  # input is not modified


def test_clean_label_poisoning_keeps_labels_and_uses_target_rows() -> None:
    result = poison_dataset(dataset(), POISONERS.create("insent"), PoisonSpec(target_label=0, count=7, label_mode="clean"), np.random.default_rng(0))
    assert len(result.records) == 7
    assert all(r.original_label == 0 and r.label == 0 for r in result.records)


def test_poisoning_is_seeded() -> None:
    spec = PoisonSpec(target_label=1, rate=0.2)
    a = poison_dataset(dataset(), POISONERS.create("badnet"), spec, np.random.default_rng(5))
    b = poison_dataset(dataset(), POISONERS.create("badnet"), spec, np.random.default_rng(5))
    c = poison_dataset(dataset(), POISONERS.create("badnet"), spec, np.random.default_rng(6))
    assert a.manifest_rows() == b.manifest_rows() and a.manifest_rows() != c.manifest_rows()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 1.5}, "rate"), ({"count": -1}, "count"), ({"label_mode": "grey"}, "label_mode"), ({"target_label": -2}, "target_label"),
    ({"rate": None}, "rate or a count"),
])
def test_poison_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises((ConfigError, pydantic.ValidationError), match=message):  # named: the field at fault
        PoisonSpec(**kwargs)


def test_poison_spec_count_wins_over_rate() -> None:
    assert PoisonSpec(rate=0.5, count=3).n_poison(100) == 3
    assert PoisonSpec(rate=0.25).n_poison(40) == 10 and PoisonSpec(rate=None, count=0).n_poison(40) == 0


def test_asking_for_more_rows_than_candidates_fails() -> None:
    with pytest.raises(ConfigError, match="cannot poison 30 rows"):
        poison_dataset(dataset(), POISONERS.create("badnet"), PoisonSpec(target_label=1, count=30), np.random.default_rng(0))


def test_asr_set_holds_only_triggered_non_target_rows() -> None:
    data = dataset()
    asr = build_asr_set(data, POISONERS.create("badnet", words="mn"), target_label=1, rng=np.random.default_rng(0))
    assert len(asr) == 20 and set(asr.labels) == {0}
    assert all("mn" in t.split() for t in asr.texts)
    with pytest.raises(DataError, match="no non-target rows"):
        build_asr_set(data.subset([1, 3]), POISONERS.create("badnet"), target_label=1, rng=np.random.default_rng(0))
