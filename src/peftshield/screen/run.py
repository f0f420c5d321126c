"""``peftshield screen``: both stages over a fleet, one report (JSON and Markdown) and the audit's exit codes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from peftshield.errors import ConfigError, DataError, PeftshieldError
from peftshield.gate.report import EXIT_CLEAN, EXIT_FINDINGS, EXIT_INCOMPLETE, audit_exit_code
from peftshield.io import atomic_directory
from peftshield.progress import track
from peftshield.screen.fleet import FleetScreen, ScreenRow, audit_record, cohort_id, select_for_audit
from peftshield.screen.weights import AdapterFeatures, adapter_features

REPORT_FORMAT = "peftshield-screen/1"
MAX_MANIFEST_LINE = 4096
MAX_COPY_BYTES = 4_000_000_000  # a folder larger than this is audited as itself, never hashed to find its copies


@dataclass
class RayPlace:
    """Where the Ray stages run: ``address`` None for a local Ray of ``workers`` CPUs."""

    address: str | None = None
    workers: int | None = None
    nodes: set[str] = field(default_factory=set)  # the Ray nodes that did the work, filled as it is done


@dataclass
class ScreenReport:
    rows: list[ScreenRow]
    stage1_seconds: float
    stage2_seconds: float
    budget: int
    sample: int
    estimate: dict = field(default_factory=dict)
    fail_on: str = "inconclusive"  # the audit's --fail-on
    executor: dict = field(default_factory=lambda: {"name": "local"})

    @property
    def exit_code(self) -> int:
        """As ``audit``: 2 when an adapter could not be read or audited, else 1 on a finding, else 0."""
        codes = [EXIT_INCOMPLETE if r.status == "error" or r.verdict == "error" else
                 audit_exit_code(r.verdict, self.fail_on) if r.verdict else EXIT_CLEAN for r in self.rows]
        return EXIT_INCOMPLETE if EXIT_INCOMPLETE in codes else EXIT_FINDINGS if EXIT_FINDINGS in codes else EXIT_CLEAN

    def to_dict(self) -> dict:
        return {"format": REPORT_FORMAT, "exit_code": self.exit_code, "fail_on": self.fail_on, "adapters": len(self.rows),
                "stage1_seconds": self.stage1_seconds, "stage2_seconds": self.stage2_seconds, "audit_budget": self.budget,
                "audit_sample": self.sample, "estimate": self.estimate, "executor": self.executor, "rows": [r.to_dict() for r in self.rows]}


def read_manifest(path: Path) -> Iterator[str]:
    """Targets, one per line (blank lines and ``#`` comments skipped), read line by line, each
    taken as written (no pattern in a manifest is expanded). A line longer than
    ``MAX_MANIFEST_LINE`` bytes or not UTF-8 is a one-line error naming it."""
    if not path.is_file():
        raise ConfigError(f"--manifest {path}: no such file")
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_MANIFEST_LINE + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_MANIFEST_LINE and not raw.endswith(b"\n"):
                raise ConfigError(f"--manifest {path}: line {number} is longer than {MAX_MANIFEST_LINE} bytes")
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConfigError(f"--manifest {path}: line {number} is not UTF-8 text") from None
            if text and not text.startswith("#"):
                yield text


def unique_targets(specs: list[str]) -> list[str]:
    """``specs`` without a second spelling of one folder (``./a``, ``a/``, a link to it): each
    adapter is one row, and cannot be its own peer."""
    seen: set[str] = set()
    out = []
    for spec in specs:
        key = spec if spec.startswith("hf://") else str(Path(spec).resolve())
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def features_or_error(spec: str) -> AdapterFeatures | str:
    """One adapter's stage-1 features, or why it has none: whatever goes wrong with one adapter
    is its own row (the same on every executor), never the fleet's."""
    try:
        return adapter_features(adapter_folder(spec))
    except PeftshieldError as exc:
        return str(exc)
    except Exception as exc:  # a hostile file may raise anything (RecursionError, LinAlgError, ...)
        return f"{spec}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"


def adapter_folder(spec: str) -> Path:
    """The local folder of an adapter target: a folder, or ``hf://ORG/NAME`` from the local cache."""
    from peftshield.gate.targets import HF_SCHEME, resolve_hf

    folder = resolve_hf(spec) if spec.startswith(HF_SCHEME) else Path(spec)
    if not folder.is_dir():
        raise DataError(f"{spec}: no such adapter folder")
    return folder


def local_features(specs: list[str], progress: bool = False) -> Iterator[tuple[str, AdapterFeatures | str]]:
    """``(spec, features or error message)`` for every spec, in this process."""
    for spec in track(specs, "stage 1: weights", enabled=progress):
        yield spec, features_or_error(spec)


def stage1(specs: list[str], screen: FleetScreen, progress: bool = False,
           source: Iterable[tuple[str, AdapterFeatures | str]] | None = None) -> list[ScreenRow]:
    """Every adapter's features (an ``error`` row for one that cannot be read), from ``source``
    (default :func:`local_features`; :func:`peftshield.screen.distributed.ray_features` on Ray),
    then the fleet's scores."""
    rows: list[ScreenRow] = []
    features: list[AdapterFeatures | None] = []
    for spec, item in (source if source is not None else local_features(specs, progress)):
        if isinstance(item, str):
            rows.append(ScreenRow(spec, "error", message=item))
            features.append(None)
            continue
        rows.append(ScreenRow(spec, "scored", cohort=cohort_id(item.cohort), base=str(item.details.get("base") or "")))
        features.append(item)
    good = [f for f in features if f is not None]
    scores = screen.fit(good).score(good) if good else np.zeros(0)
    by_index = iter(scores)
    for row, item in zip(rows, features):
        if item is not None:
            row.score = float(next(by_index))
            if not math.isfinite(row.score):
                row.status, row.message = "no-peers", f"fewer than {screen.min_cohort} distinct adapters share its base, rank, modules and features: audited first"
    ranked = sorted((i for i, r in enumerate(rows) if r.score is not None), key=lambda i: (-rows[i].score, i))
    for position, index in enumerate(ranked, 1):
        rows[index].rank = position
    return rows


def run_screen(specs: list[str], out: Path, screen: FleetScreen, budget: int, sample: int, rng: np.random.Generator,
               audit_settings=None, progress: bool = False, log: Callable[[str], None] = lambda m: None,
               source: Iterable[tuple[str, AdapterFeatures | str]] | None = None, ray: RayPlace | None = None) -> ScreenReport:
    """Stage 1 over ``specs`` (features from ``source``, see :func:`stage1`); with ``audit_settings`` (an
    :class:`~peftshield.gate.settings.AuditGateSettings`), stage 2 audits the ``budget`` highest
    scores and ``sample`` of the rest (as Ray tasks with ``ray``). Writes ``out`` whole at the end."""
    started = time.perf_counter()
    rows = stage1(specs, screen, progress, source)
    stage1_seconds = time.perf_counter() - started
    scored = [i for i, r in enumerate(rows) if r.score is not None]
    top, drawn = select_for_audit(np.array([rows[i].score for i in scored]), min(budget, len(scored)), sample, rng)
    for position in top:
        rows[scored[position]].audited = "top"
    for position in drawn:
        rows[scored[position]].audited = "sample"
    report = ScreenReport(rows, stage1_seconds, 0.0, budget, sample)
    with atomic_directory(out) as tmp:
        if audit_settings is not None and (top or drawn):
            started = time.perf_counter()
            _stage2(rows, tmp / "audits", audit_settings, progress, log, ray)
            report.stage2_seconds = time.perf_counter() - started
            report.fail_on = audit_settings.fail_on
            report.estimate = missed_estimate(rows)
        if ray is not None:
            report.executor = {"name": "ray", "nodes": len(ray.nodes)}
        write_reports(report, tmp)
    return report


def same_files_key(spec: str) -> str | None:
    """SHA-256 over the names and bytes of every file in the adapter's folder, or None when that
    cannot vouch for its content (a link, a subfolder, a file that cannot be read, over
    :data:`MAX_COPY_BYTES`): two folders with one key hold the same adapter, audited once."""
    from peftshield.fingerprint import files_sha256

    try:
        files = sorted(adapter_folder(spec).iterdir())
        if not files or any(path.is_symlink() or not path.is_file() for path in files):
            return None
        if sum(path.stat().st_size for path in files) > MAX_COPY_BYTES:
            return None
        return files_sha256(files)
    except (PeftshieldError, OSError):
        return None


def _stage2(rows: list[ScreenRow], out: Path, settings, progress: bool, log, ray: RayPlace | None = None) -> None:
    chosen = [r for r in rows if r.audited]
    # Copies of one adapter (republished under other names) are audited once: the first in rank
    # order; the others take its verdict. Without this, Ray would audit copies side by side, each
    # missing the content cache the other has not written yet.
    first_of: dict[str, ScreenRow] = {}
    copy_of: dict[int, ScreenRow] = {}
    for row in chosen:
        key = same_files_key(row.target)
        if key is not None and key in first_of:
            copy_of[id(row)] = first_of[key]
        elif key is not None:
            first_of[key] = row
    audited_rows = [r for r in chosen if id(r) not in copy_of]
    if ray is not None:
        from peftshield.screen.distributed import ray_audits

        verdicts = ray_audits([r.target for r in audited_rows], settings, out, ray.address, ray.workers, ray.nodes, progress)
    else:
        from peftshield.gate.audit_gate import run_audit_gate

        run = run_audit_gate([r.target for r in audited_rows], settings, out, progress=progress, log=log)
        verdicts = {row.target: audit_record(row) for row in run.report.rows}
    for row in audited_rows:
        audited = verdicts.get(row.target)
        row.verdict = audited["status"] if audited else "error"
        row.message = audited["message"] if audited else "not audited"
        row.cached = bool(audited and audited.get("cached"))
    for row in chosen:
        first = copy_of.get(id(row))
        if first is not None:
            row.verdict, row.cached = first.verdict, True
            row.message = f"the same files as {first.target} (audited once): {first.message}"


def missed_estimate(rows: list[ScreenRow]) -> dict:
    """What stage 1 left unaudited, estimated from the random sample: the share of sampled adapters
    the audit found backdoored, times the adapters not audited (with its 95% Wilson upper bound)."""
    sampled = [r for r in rows if r.audited == "sample"]
    unaudited = sum(1 for r in rows if r.score is not None and not r.audited)
    found = sum(r.verdict == "backdoored" for r in sampled)
    unresolved = sum(r.verdict not in ("backdoored", "clean") for r in sampled)  # inconclusive or error: counted as found for the bound
    if not sampled:
        return {"sampled": 0, "unaudited": unaudited}
    n, share, z = len(sampled), found / len(sampled), 1.96
    worst = (found + unresolved) / n
    upper = (worst + z * z / (2 * n) + z * math.sqrt(worst * (1 - worst) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return {"sampled": n, "backdoored_in_sample": found, "unresolved_in_sample": unresolved, "unaudited": unaudited,
            "estimated_missed": share * unaudited, "estimated_missed_upper_95": upper * unaudited}


def write_reports(report: ScreenReport, folder: Path) -> None:
    """The fleet report in every format (:data:`peftshield.screen.formats.REPORT_FILES`) into ``folder``."""
    from peftshield.screen.formats import REPORT_FILES

    for name, render in REPORT_FILES.items():
        # Fleet text that UTF-8 cannot encode (a lone surrogate in a config, a folder name in another
        # encoding) is written escaped: it never costs the fleet its report.
        (folder / name).write_text(render(report), encoding="utf-8", errors="backslashreplace")
