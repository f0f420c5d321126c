"""``peftshield audit`` over one or more targets: resolve, reuse cached audits, audit the rest,
and turn each verdict into a row with findings and an exit code."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from peftshield.audit import DEFAULT_AUDIT_TEXTS, VerdictCalibration, load_audit_texts, packaged_calibration, run_audit
from peftshield.audit.report import write_audit
from peftshield.audit.verdict import RAW_SCORE_REVISION
from peftshield.errors import ConfigError, PeftshieldError
from peftshield.gate.cache import ContentCache, cache_key, copy_regular_files, default_cache_dir
from peftshield.gate.formats import RENDERERS, report_files
from peftshield.gate.report import Finding, GateReport, TargetRow, audit_exit_code, error_row
from peftshield.gate.settings import AuditGateSettings
from peftshield.gate.targets import AuditTarget, adapter_target, base_weight_files, expand_specs, kind_of_spec, model_files_sha256, resolve_target
from peftshield.io import atomic_directory, read_json
from peftshield.signals import raising_on

AUDIT_FILE = "audit.json"
SUMMARY_BASE = "summary"


@dataclass
class AuditRun:
    """What the command needs back: the report and, for ``--write-psim``, the last subject."""

    report: GateReport
    subject: object | None = None
    texts: list[str] | None = None


def read_calibration(path: str | None) -> VerdictCalibration | None:
    if path is None:
        return None
    saved = read_json(Path(path))
    try:
        chosen = VerdictCalibration(**saved) if isinstance(saved, dict) else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--calibration {path}: not a calibration ({str(exc).splitlines()[0]})") from None
    if chosen is None:
        raise ConfigError(f"--calibration {path}: not a calibration (a JSON object)")
    return chosen


def row_from_audit(payload: dict, target: AuditTarget, fail_on: str, sha256: str | None, cached: bool, report_dir: str | None) -> TargetRow:
    """A target's row from its ``audit.json``: a backdoored verdict gives one finding per
    trigger that alone reaches the backdoored level (at least the top one); an inconclusive
    verdict one finding with the top trigger."""
    verdict = payload["verdict"]
    triggers = payload.get("triggers") or []
    calibration = VerdictCalibration(**payload["calibration"]) if payload.get("calibration") else None
    findings: list[Finding] = []

    def finding(rule: str, t: dict) -> Finding:
        what = "trigger" if rule == "backdoor.trigger" else "strongest candidate trigger"
        return Finding(rule, f"{what} '{t['text']}' flips {t['flip_rate']:.0%} of held-out texts to class {t['target']} "
                             f"(mean confidence {t['confidence']:.3f}); verdict {verdict}", target.location,
                       {"trigger": t["text"], "target_class": int(t["target"]), "flip_rate": float(t["flip_rate"]), "confidence": float(t["confidence"])})

    if verdict == "backdoored" and triggers:
        strong = [t for t in triggers if calibration is not None and calibration.verdict(t["raw_score"]) == "backdoored"] or triggers[:1]
        findings = [finding("backdoor.trigger", t) for t in strong]
    elif verdict == "inconclusive" and triggers:
        findings = [finding("backdoor.inconclusive", triggers[0])]
    best = triggers[0] if triggers else None
    message = (f"'{best['text']}' -> class {best['target']} (flip rate {best['flip_rate']:.2f})" if best and verdict != "clean"
               else f"no trigger beyond clean checkpoints (best '{best['text']}', flip rate {best['flip_rate']:.2f})" if best else "no trigger found")
    return TargetRow(target.spec, target.kind, target.location, verdict, audit_exit_code(verdict, fail_on), message,
                     score=payload.get("score"), sha256=sha256, cached=cached, report_dir=report_dir, findings=findings,
                     details={"probe": payload.get("probe"), "raw_score": payload.get("raw_score"), "triggers": triggers, "caveats": payload.get("caveats") or [],
                              "checkpoint": payload.get("checkpoint"), "adapter": payload.get("adapter")})


def _cached_audit(entry: Path, calibration: VerdictCalibration | None) -> dict | None:
    """The cached ``audit.json`` when its verdict is the one the calibration in force gives its
    stored raw score (the cache stores figures; it never decides a verdict), else None (a miss)."""
    try:
        payload = json.loads((entry / AUDIT_FILE).read_text(encoding="utf-8"))
        in_force = calibration or packaged_calibration(str(payload["probe"]))
        if in_force is None or payload.get("calibration") != in_force.model_dump():
            return None
        if payload["verdict"] != in_force.verdict(float(payload["raw_score"])) or not isinstance(payload["triggers"], list):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return payload


class AuditTimeout(PeftshieldError):
    """An audit ran past ``max_seconds``: its target is an error (exit 2), never a pass."""


@contextlib.contextmanager
def wall_clock_limit(seconds: float, what: str):
    """Raise :class:`AuditTimeout` in the main thread once ``seconds`` of wall clock have passed
    inside the block (SIGALRM; off the main thread the block runs without a limit)."""
    message = f"{what} ran past --max-seconds {seconds:g}; stopped (raise --max-seconds or lower the search budget)"
    with raising_on(signal.SIGALRM, lambda: AuditTimeout(message)) as armed:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)


def audit_folder_name(index: int, spec: str) -> str:
    return f"{index:02d}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", spec.strip("/"))[-60:] or "target")


def _audit_settings_key(settings: AuditGateSettings, texts: list[str], calibration: VerdictCalibration | None, probe: str) -> dict:
    from peftshield import __version__

    chosen = calibration.model_dump() if calibration is not None else {p: (c.model_dump() if (c := packaged_calibration(p)) else None) for p in ("head", "psim")}
    return {
        "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(), "seed": settings.seed, "probe": probe,
        "search": settings.search.model_dump(), "calibration": chosen, "raw_score_revision": RAW_SCORE_REVISION, "peftshield": __version__,
    }


def run_audit_gate(
    specs: list[str], settings: AuditGateSettings, out: Path, settings_file: str | None = None, adapter: str | None = None,
    keep_subject: bool = False, progress: bool = False, log: Callable[[str], None] = lambda m: None, settings_sources: dict[str, str] | None = None,
) -> AuditRun:
    """Audit every target; write the audits and the report files into ``out`` atomically."""
    started = time.perf_counter()
    expanded = expand_specs(specs)
    if adapter is not None and len(expanded) != 1:
        raise ConfigError("--adapter: give exactly one checkpoint with it (or pass adapter folders as targets)")
    if keep_subject and len(expanded) != 1:
        raise ConfigError(f"--write-psim: give exactly one target ({len(expanded)} after expanding the patterns)")
    calibration = read_calibration(settings.calibration)
    single = len(expanded) == 1
    resolved: list[AuditTarget | PeftshieldError] = []
    seen: set[tuple[str, str | None]] = set()
    kept: list[str] = []
    for spec in expanded:
        try:
            target = adapter_target(spec, adapter) if adapter is not None else resolve_target(spec, settings.base)
        except PeftshieldError as exc:
            if single:
                raise
            target = exc
        if isinstance(target, AuditTarget):
            model = (str(Path(target.checkpoint).resolve()) if target.staged is None else target.location, target.adapter and str(Path(target.adapter).resolve()))
            if model in seen:  # adapter_config.json and adapter_model.safetensors of one adapter (pre-commit passes both)
                target.close()
                continue
            seen.add(model)
        resolved.append(target)
        kept.append(spec)
    expanded = kept
    corpus, texts_name = load_audit_texts(settings.texts or DEFAULT_AUDIT_TEXTS)
    key_settings = _audit_settings_key(settings, corpus, calibration, settings.probe)
    cache = ContentCache((Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()) if settings.cache else None)
    rows: list[TargetRow] = []
    subject = None
    try:
        with atomic_directory(out) as tmp:
            for index, (spec, target) in enumerate(zip(expanded, resolved), 1):
                if isinstance(target, PeftshieldError):
                    rows.append(error_row(spec, kind_of_spec(spec), spec, str(target)))
                    log(f"{spec}: error: {target}")
                    continue
                folder = tmp if single else tmp / audit_folder_name(index, spec)
                folder.mkdir(exist_ok=True)
                try:
                    row, subject = _audit_one(target, settings, calibration, corpus, texts_name, key_settings, cache, folder,
                                              None if single else folder.name, keep_subject, progress, log)
                except Exception as exc:  # one target's failure is its row's; the others are still audited
                    if single or isinstance(exc, KeyboardInterrupt):
                        raise
                    message = str(exc) if isinstance(exc, PeftshieldError) else f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                    row = error_row(spec, target.kind, target.location, message)
                    log(f"{spec}: error: {message}")
                rows.append(row)
            report = GateReport("audit", {"fail_on": settings.fail_on}, settings_file, rows, time.perf_counter() - started, settings_sources or {})
            for fmt, path in report_files(tmp / SUMMARY_BASE, settings.format).items():
                path.write_text(RENDERERS[fmt](report), encoding="utf-8")
    finally:
        for target in resolved:
            if isinstance(target, AuditTarget):
                target.close()
    return AuditRun(report, subject, corpus)


def _audit_one(target: AuditTarget, settings: AuditGateSettings, calibration, corpus: list[str], texts_name: str, key_settings: dict,
               cache: ContentCache, folder: Path, report_dir: str | None, keep_subject: bool, progress: bool, log) -> tuple[TargetRow, object]:
    sha = target.weights_sha256(base_weight_files(target)) if target.weight_files else None
    key = cache_key(sha, {**key_settings, "model_files": model_files_sha256(target), "adapter": target.adapter is not None}) if sha else None
    hit = cache.get(key) if key and not keep_subject else None
    payload = _cached_audit(hit[0], calibration) if hit is not None else None
    if (hit is None and key in cache.rejected) or (hit is not None and payload is None):
        log(f"{target.spec}: the cache entry for these weights does not check out (its MAC, files, links or verdict): audited again")
    if hit is not None and payload is not None:
        entry, about = hit
        copy_regular_files(entry, folder, sorted(about["files"]))  # copies: editing the output never edits the cache
        row = row_from_audit(payload, target, settings.fail_on, sha, True, report_dir)
        row.details["cached_from"] = about.get("stored")
        log(f"{target.spec}: verdict {row.status} (cached: same weights sha256 {sha[:12]} and settings as the audit of {about.get('stored', '?')})")
        return row, None
    with wall_clock_limit(settings.max_seconds, f"{target.spec}: the audit"):
        result, subject = run_audit(target.checkpoint, corpus, texts_name, np.random.default_rng(settings.seed), adapter=target.adapter,
                                    settings=settings.search, calibration=calibration, force_psim=settings.probe == "psim", progress=progress, log=log)
    if target.kind == "safetensors" and target.staged is not None:
        result.checkpoint = target.location  # not the temporary staging folder
    write_audit(result, folder)
    payload = json.loads((folder / AUDIT_FILE).read_text(encoding="utf-8"))
    row = row_from_audit(payload, target, settings.fail_on, sha, False, report_dir)
    if key:
        cache.put(key, folder, {"target": target.spec, "sha256": sha, "verdict": result.verdict})
    best = result.triggers[0] if result.triggers else None
    found = f"; top trigger '{best.text}' -> class {best.target} (flip rate {best.flip_rate:.2f}, confidence {best.confidence:.3f})" if best else ""
    log(f"{target.spec}: verdict {result.verdict} (suspicion {result.score:.3f}){found}")
    for caveat in result.caveats:
        log(f"{target.spec}: note: {caveat}")
    return row, subject if keep_subject else None


__all__ = ["AuditRun", "AuditTimeout", "wall_clock_limit", "read_calibration", "row_from_audit", "run_audit_gate"]
