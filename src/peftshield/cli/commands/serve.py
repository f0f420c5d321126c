"""``peftshield serve`` (the guard as an HTTP service) and ``peftshield guard`` (the same guard as a
JSONL filter)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from peftshield.cli.app import RuntimeOption, app, info
from peftshield.cli.commands.common import defaults_of, typed_from_flags
from peftshield.data.records import check_encodable, unencodable_at
from peftshield.errors import ConfigError, DataError
from peftshield.guard.settings import SCORE_BATCH, ServeSettings
from peftshield.io import atomic_text_stream, check_output_place

_SERVE = defaults_of(ServeSettings)


@app.command(help="Serve a model behind its PSIM over HTTP: POST /v1/classify, GET /healthz, /readyz, /metrics. "
                  "Concurrent requests are micro-batched; overload is shed (503 + Retry-After); SIGTERM finishes requests in flight, then exits. "
                  "/healthz, /readyz and /metrics need no API key, so they show no file paths and no texts "
                  "(/readyz: whether the models are loaded, the mode, threshold and limits); the model and PSIM paths are in the startup log. "
                  "Every option can also be set as an environment variable PEFTSHIELD_<OPTION> (e.g. PEFTSHIELD_PORT=8080); flags win.")
def serve(
    model: Path = typer.Option(..., "--model", envvar="PEFTSHIELD_MODEL", help="The deployed classifier (a 'peftshield finetune' folder or a transformers classifier folder)."),
    psim: Path = typer.Option(..., "--psim", envvar="PEFTSHIELD_PSIM", help="A PSIM folder ('peftshield psim train' or 'audit --write-psim')."),
    host: str = typer.Option(_SERVE["host"], "--host", envvar="PEFTSHIELD_HOST"),
    port: int = typer.Option(_SERVE["port"], "--port", envvar="PEFTSHIELD_PORT"),
    workers: int = typer.Option(_SERVE["workers"], "--workers", envvar="PEFTSHIELD_WORKERS", help="Processes, each with its own copy of the models (and its own /metrics)."),
    max_batch: int = typer.Option(_SERVE["max_batch"], "--max-batch", envvar="PEFTSHIELD_MAX_BATCH", help="Texts per forward pass at most."),
    max_wait_ms: float = typer.Option(_SERVE["max_wait_ms"], "--max-wait-ms", envvar="PEFTSHIELD_MAX_WAIT_MS", help="How long the first request of a batch waits for company."),
    score_batch: int = typer.Option(_SERVE["score_batch"], "--score-batch", envvar="PEFTSHIELD_SCORE_BATCH", help="A micro-batch runs as length-sorted forward passes of this many texts (less padding than one pass over texts of any length; bench/serve.md)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", envvar="PEFTSHIELD_API_KEY_FILE", help="File of accepted API keys, one per line; then /v1/classify needs 'Authorization: Bearer KEY'."),
    log_flagged: Optional[Path] = typer.Option(None, "--log-flagged", envvar="PEFTSHIELD_LOG_FLAGGED", help="Append every flagged text to this JSONL file (request id, time, score, text)."),
    log_text: bool = typer.Option(_SERVE["log_text"], "--log-text/--no-log-text", envvar="PEFTSHIELD_LOG_TEXT", help="Whether the flagged log holds the texts themselves."),
    max_texts: int = typer.Option(_SERVE["max_texts"], "--max-texts", envvar="PEFTSHIELD_MAX_TEXTS", help="Texts per request at most (413 beyond)."),
    max_text_chars: int = typer.Option(_SERVE["max_text_chars"], "--max-text-chars", envvar="PEFTSHIELD_MAX_TEXT_CHARS", help="Characters per text at most (413 beyond)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", envvar="PEFTSHIELD_THRESHOLD", help="Override the PSIM's calibrated threshold."),
    mode: str = typer.Option(_SERVE["mode"], "--mode", envvar="PEFTSHIELD_MODE", help="block: a flagged text gets no label; monitor: every text is labelled and flagged texts are only reported."),
    backbone: Optional[str] = typer.Option(None, "--backbone", envvar="PEFTSHIELD_BACKBONE", help="The models' backbone, if no longer where finetune.json recorded it."),
    max_queue: int = typer.Option(_SERVE["max_queue"], "--max-queue", envvar="PEFTSHIELD_MAX_QUEUE", help="Texts waiting for a batch at most; a request beyond gets 503 with Retry-After at once (overload is shed, never queued without bound)."),
    request_timeout_s: float = typer.Option(_SERVE["request_timeout_s"], "--request-timeout-s", envvar="PEFTSHIELD_REQUEST_TIMEOUT_S", help="Per-request deadline: 504 when no answer within it (408 when the body itself is late); a request past its deadline, or whose client left, is dropped before it runs."),
    log_format: str = typer.Option(_SERVE["log_format"], "--log-format", envvar="PEFTSHIELD_LOG_FORMAT", help="json (one JSON object per line, with the request id) or text."),
    expected_flag_rate: Optional[float] = typer.Option(None, "--expected-flag-rate", envvar="PEFTSHIELD_EXPECTED_FLAG_RATE", help="Share of clean traffic the guard should flag (default: the PSIM's calibration); the drift alarm compares the rolling rate with it."),
    drift_window: int = typer.Option(_SERVE["drift_window"], "--drift-window", envvar="PEFTSHIELD_DRIFT_WINDOW", help="Texts in the rolling flag rate of the drift alarm."),
    keep_alive_timeout_s: float = typer.Option(_SERVE["keep_alive_timeout_s"], "--keep-alive-timeout-s", envvar="PEFTSHIELD_KEEP_ALIVE_TIMEOUT_S", help="A kept-alive connection idle this long after a response is closed."),
    header_timeout_s: float = typer.Option(_SERVE["header_timeout_s"], "--header-timeout-s", envvar="PEFTSHIELD_HEADER_TIMEOUT_S", help="A request's header must arrive in full within this long of its first byte (of the connection's opening, for the first request), else the connection is closed: slow or silent clients cannot hold connections."),
    max_connections: int = typer.Option(_SERVE["max_connections"], "--max-connections", envvar="PEFTSHIELD_MAX_CONNECTIONS", help="Open connections (and requests in progress) at most, per worker; a request beyond gets 503."),
    runtime: str = typer.Option("torch", "--runtime", envvar="PEFTSHIELD_RUNTIME", help="torch, onnx or onnx-int8 (see 'peftshield scan --help')."),
) -> None:
    from peftshield.guard.server import serve as run_service

    settings = typed_from_flags(ServeSettings, {
        "model": ("--model", model), "psim": ("--psim", psim), "host": ("--host", host), "port": ("--port", port), "workers": ("--workers", workers),
        "max_batch": ("--max-batch", max_batch), "max_wait_ms": ("--max-wait-ms", max_wait_ms), "score_batch": ("--score-batch", score_batch),
        "api_key_file": ("--api-key-file", api_key_file), "log_flagged": ("--log-flagged", log_flagged), "log_text": ("--log-text", log_text),
        "max_texts": ("--max-texts", max_texts), "max_text_chars": ("--max-text-chars", max_text_chars), "runtime": ("--runtime", runtime),
        "threshold": ("--threshold", threshold), "mode": ("--mode", mode), "backbone": ("--backbone", backbone),
        "max_queue": ("--max-queue", max_queue), "request_timeout_s": ("--request-timeout-s", request_timeout_s),
        "log_format": ("--log-format", log_format), "expected_flag_rate": ("--expected-flag-rate", expected_flag_rate),
        "drift_window": ("--drift-window", drift_window), "keep_alive_timeout_s": ("--keep-alive-timeout-s", keep_alive_timeout_s),
        "header_timeout_s": ("--header-timeout-s", header_timeout_s), "max_connections": ("--max-connections", max_connections),
    })
    run_service(settings, announce=info)


@app.command(help="Screen texts with a model and its PSIM, as a filter: JSONL in ({\"text\": ...} or a JSON string per line), "
                  "JSONL out (id, label, probabilities, psim_score, flagged, threshold).")
def guard(
    model: Path = typer.Option(..., "--model", help="The classifier to guard."),
    psim: Path = typer.Option(..., "--psim", help="Its PSIM folder."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL to read (default: standard input)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSONL to write atomically (default: standard output)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override the PSIM's calibrated threshold."),
    mode: str = typer.Option(_SERVE["mode"], "--mode", help="block or monitor (see 'serve')."),
    batch_size: int = typer.Option(SCORE_BATCH, "--batch-size", min=1, help="Texts per forward pass (length-sorted)."),
    backbone: Optional[str] = typer.Option(None, "--backbone"),
    runtime: str = RuntimeOption,
) -> None:
    from peftshield.guard import Guard

    if out is not None:
        check_output_place(out, "file")
    name = str(input_file) if input_file else "<stdin>"
    if input_file is not None and not input_file.is_file():
        raise ConfigError(f"--input {input_file}: no such file")
    ids, texts = read_guard_input(input_file, name)
    screened = Guard.load(model, psim, runtime=runtime, threshold=threshold, mode=mode, backbone=backbone, batch_size=batch_size)
    results = screened.classify(texts)
    lines = (json.dumps({"id": row_id, **result.to_dict()}, ensure_ascii=False) + "\n" for row_id, result in zip(ids, results))
    if out is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    else:
        with atomic_text_stream(out) as handle:
            handle.writelines(lines)
    flagged = sum(r.flagged for r in results)
    info(f"guard: {len(results)} texts, {flagged} flagged at threshold {screened.threshold:.4f}" + (f" -> {out}" if out else ""))


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
