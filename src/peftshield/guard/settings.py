"""The guard's settings and their checks, without the web stack.

Each setting is written once, here: its name, type, bounds, default and help. The CLI makes its
options from these models (``peftshield.cli.commands.serve``: flag ``--max-wait-ms`` and
environment variable ``PEFTSHIELD_MAX_WAIT_MS`` for the field ``max_wait_ms``), and the Python
API (:meth:`~peftshield.guard.Guard.load`), the filter and the service validate through them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator

from peftshield.defenses.thresholds import ConfidenceThreshold
from peftshield.errors import ConfigError
from peftshield.models.runtime import DEFAULT_RUNTIME, RUNTIME_HELP, Runtime

ModeName = Literal["block", "monitor"]
MODES: tuple[str, ...] = get_args(ModeName)
# A micro-batch runs as length-sorted forward passes of this many texts: one pass over 57
# random-length texts padded to the longest ran at 102 texts/s here, passes of 16 at 206.
SCORE_BATCH = 16


def _known_mode(mode: object) -> object:
    if mode not in MODES:
        raise ValueError("choose block or monitor")
    return mode


# The mode as a settings field: block or monitor, and a one-line error otherwise.
Mode = Annotated[ModeName, BeforeValidator(_known_mode)]


def check_guard_folders(model: Path, psim: Path) -> None:
    """One-line errors for a guard whose folders are missing, before anything loads."""
    if not Path(model).is_dir():
        raise ConfigError(f"--model {model}: no such model directory")
    if not Path(psim).is_dir():
        raise ConfigError(f"--psim {psim}: no such PSIM directory")


class GuardSettings(BaseModel):
    """A deployed classifier behind its PSIM: what ``Guard.load``, ``peftshield guard`` and
    ``peftshield serve`` share."""

    model_config = ConfigDict(extra="forbid")
    # Fields that are settings of the Python API and the service's JSON, but no command-line option.
    not_flags: ClassVar[tuple[str, ...]] = ("max_length",)

    model: Path = Field(description="The deployed classifier (a 'peftshield finetune' folder or a transformers classifier folder).")
    psim: Path = Field(description="A PSIM folder ('peftshield psim train' or 'audit --write-psim').")
    runtime: Runtime = Field(DEFAULT_RUNTIME, description=RUNTIME_HELP)
    threshold: Optional[ConfidenceThreshold] = Field(None, description="Override the PSIM's calibrated threshold.")
    calibration: Optional[Path] = Field(None, description="Thresholds per text length calibrated on your own clean traffic "
                                                          "('peftshield calibrate'); replaces the PSIM's single threshold.")
    detectors: list[Path] = Field([], description="Detector folders ('peftshield detector fit', e.g. DAN) beside the PSIM: a text is flagged "
                                                   "when any of them fires, and each result names the ones that did.")
    mode: Mode = Field("block", description="block: a flagged text gets no label; monitor: every text is labelled and flagged texts are only reported.")
    backbone: Optional[str] = Field(None, description="The models' backbone, if no longer where finetune.json recorded it.")
    max_length: Optional[PositiveInt] = None
    score_batch: PositiveInt = Field(SCORE_BATCH, description="A micro-batch runs as length-sorted forward passes of this many texts "
                                                              "(less padding than one pass over texts of any length; bench/serve.md).")

    @field_validator("calibration")
    @classmethod
    def _one_threshold_source(cls, calibration: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if calibration is not None and info.data.get("threshold") is not None:
            raise ValueError("a calibration sets the thresholds, and so does --threshold: give one of them")
        return calibration


class ServeSettings(GuardSettings):
    """Everything ``peftshield serve`` is started with (also the JSON handed to each worker)."""

    not_flags: ClassVar[tuple[str, ...]] = ("max_length", "max_body_bytes")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: PositiveInt = Field(1, description="Processes, each with its own copy of the models (and its own /metrics).")
    max_batch: PositiveInt = Field(32, description="Texts per forward pass at most.")
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="How long the first request of a batch waits for company.")
    api_key_file: Optional[Path] = Field(None, description="File of accepted API keys, one per line; then /v1/classify needs 'Authorization: Bearer KEY'.")
    log_flagged: Optional[Path] = Field(None, description="Append every flagged text to this JSONL file (request id, time, score, text).")
    log_text: bool = Field(True, description="Whether the flagged log holds the texts themselves.")
    max_texts: PositiveInt = Field(64, description="Texts per request at most (413 beyond).")
    max_text_chars: PositiveInt = Field(4000, description="Characters per text at most (413 beyond).")
    max_body_bytes: PositiveInt = 1_000_000
    max_queue: PositiveInt = Field(256, description="Texts waiting for a batch at most; a request beyond gets 503 with Retry-After at once "
                                                    "(overload is shed, never queued without bound).")
    request_timeout_s: float = Field(10.0, gt=0, le=3600, description="Per-request deadline: 504 when no answer within it (408 when the body itself is late); "
                                                                      "a request past its deadline, or whose client left, is dropped before it runs.")
    log_format: str = Field("json", pattern="^(json|text)$", description="json (one JSON object per line, with the request id) or text.")
    expected_flag_rate: Optional[float] = Field(None, ge=0, le=1, description="Share of clean traffic the guard should flag (default: the PSIM's calibration); "
                                                                              "the drift alarm compares the rolling rate with it.")
    drift_window: PositiveInt = Field(1000, description="Texts in the rolling flag rate of the drift alarm.")
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=3600, description="A kept-alive connection idle this long after a response is closed.")
    header_timeout_s: float = Field(10.0, gt=0, le=3600,
                                    description="A request's header must arrive in full within this long of its first byte "
                                                "(of the connection's opening, for the first request), else the connection is closed: "
                                                "slow or silent clients cannot hold connections.")
    max_connections: PositiveInt = Field(1000, description="Open connections (and requests in progress) at most, per worker; a request beyond gets 503.")
    reservoir: Optional[Path] = Field(None, description="Monitor mode: keep a uniform random sample of the screened traffic (each text's "
                                                        "length in tokens and every member's score, never the text) and write a proposed "
                                                        "recalibration to this file after every --reservoir-size texts and at shutdown; it is "
                                                        "only a proposal: review it, then restart with --calibration FILE.")
    reservoir_size: PositiveInt = Field(5000, le=1_000_000, description="Texts the reservoir keeps (and the texts between two proposals).")

    @field_validator("reservoir")
    @classmethod
    def _reservoir_in_monitor_mode(cls, reservoir: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if reservoir is not None and info.data.get("mode") != "monitor":
            raise ValueError("a recalibration is proposed from traffic watched in monitor mode (every text answered): add --mode monitor")
        if reservoir is not None and info.data.get("workers", 1) > 1:
            raise ValueError("each worker would keep its own sample and overwrite the others' proposal: use --workers 1 to collect one")
        return reservoir
