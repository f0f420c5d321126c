"""``peftshield serve`` (the guard as an HTTP service) and ``peftshield guard`` (the same guard as a
JSONL filter)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from peftshield.cli.app import app, info
from peftshield.cli.commands.common import settings_options
from peftshield.data.records import check_encodable, unencodable_at
from peftshield.errors import ConfigError, DataError
from peftshield.guard.settings import GuardSettings, ServeSettings
from peftshield.io import atomic_text_stream, check_output_place


@app.command(help="Serve a model behind its PSIM over HTTP: POST /v1/classify, GET /healthz, /readyz, /metrics. "
                  "Concurrent requests are micro-batched; overload is shed (503 + Retry-After); SIGTERM finishes requests in flight, then exits. "
                  "/healthz, /readyz and /metrics need no API key, so they show no file paths and no texts "
                  "(/readyz: whether the models are loaded, the mode, threshold and limits); the model and PSIM paths are in the startup log. "
                  "Every option can also be set as an environment variable PEFTSHIELD_<OPTION> (e.g. PEFTSHIELD_PORT=8080); flags win.")
@settings_options(ServeSettings, envvar_prefix="PEFTSHIELD_", flags={"detectors": "--detector"})
def serve(settings: ServeSettings) -> None:
    from peftshield.guard.server import serve as run_service

    run_service(settings, announce=info)


@app.command(help="Screen texts with a model and its PSIM, as a filter: JSONL in ({\"text\": ...} or a JSON string per line), "
                  "JSONL out (id, label, probabilities, psim_score, flagged, threshold, reasons, detector_scores).")
@settings_options(GuardSettings, flags={"score_batch": "--batch-size", "detectors": "--detector"})
def guard(
    settings: GuardSettings,
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL to read (default: standard input)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSONL to write atomically (default: standard output)."),
) -> None:
    from peftshield.guard import Guard

    if out is not None:
        check_output_place(out, "file")
    name = str(input_file) if input_file else "<stdin>"
    if input_file is not None and not input_file.is_file():
        raise ConfigError(f"--input {input_file}: no such file")
    ids, texts = read_guard_input(input_file, name)
    screened = Guard.from_settings(settings)
    results = screened.classify(texts)
    lines = (json.dumps({"id": row_id, **result.to_dict()}, ensure_ascii=False) + "\n" for row_id, result in zip(ids, results))
    if out is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    else:
        with atomic_text_stream(out) as handle:
            handle.writelines(lines)
    flagged = sum(r.flagged for r in results)
    info(f"guard: {len(results)} texts, {flagged} flagged ({screened.threshold_summary})" + (f" -> {out}" if out else ""))


def read_guard_input(path: Path | None, name: str) -> tuple[list, list[str]]:
    """Ids and texts of a JSONL input, read whole and checked before anything is scored or written:
    a line that is not UTF-8, or a text that cannot be encoded (a lone surrogate, which JSON can
    escape), is a :class:`DataError` naming the line."""
    # Bytes that are not UTF-8 are read as lone surrogates (surrogateescape) and found line by line.
    if path is not None:
        handle = open(path, encoding="utf-8", errors="surrogateescape")
    elif hasattr(sys.stdin, "buffer"):
        handle = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    else:  # a text stream without bytes beneath (tests): its text is checked all the same
        handle = sys.stdin
    ids, texts = [], []
    try:
        for number, line in enumerate(handle, start=1):
            bad = unencodable_at(line)
            if bad is not None:
                raise DataError(f"{name}: line {number}: not UTF-8 text (an invalid byte at character {bad + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}: line {number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{name}: line {number}: not valid JSON (nested too deeply)") from None
            if isinstance(row, str):
                row = {"text": row}
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{name}: line {number}: expected {{\"text\": \"...\"}} or a JSON string")
            row_id = row.get("id", number)
            if unencodable_at(json.dumps(row_id, ensure_ascii=False)) is not None:  # it is written back out with the results
                raise DataError(f"{name}: line {number}: the id holds a character that is not valid Unicode (a lone surrogate)")
            ids.append(row_id)
            texts.append(check_encodable(row["text"], f"{name}: line {number}"))
    finally:
        if path is not None:
            handle.close()
        elif handle is not sys.stdin:
            handle.detach()  # sys.stdin's bytes stay open
    if not texts:
        raise DataError(f"{name}: no texts (one JSON object with a \"text\" per line)")
    return ids, texts
