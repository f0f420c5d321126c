"""The guard's settings and their checks, without the web stack: the CLI reads its defaults
from here, and the Python API, the filter and the service share the checks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from peftshield.errors import ConfigError

MODES = ("block", "monitor")
# A micro-batch runs as length-sorted forward passes of this many texts: one pass over 57
# random-length texts padded to the longest ran at 102 texts/s here, passes of 16 at 206.
SCORE_BATCH = 16


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: choose block or monitor")
    return mode


def check_guard_inputs(model: Path, psim: Path, runtime: str, mode: str) -> None:
    """One-line errors for a guard that could not load, before anything loads."""
    from peftshield.models.runtime import check_runtime

    check_runtime(runtime)
    check_mode(mode)
    if not Path(model).is_dir():
        raise ConfigError(f"--model {model}: no such model directory")
    if not Path(psim).is_dir():
        raise ConfigError(f"--psim {psim}: no such PSIM directory")


class ServeSettings(BaseModel):
    """Everything ``peftshield serve`` is started with (also the JSON handed to each worker)."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    psim: Path
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: PositiveInt = 1
    max_batch: PositiveInt = 32
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    api_key_file: Optional[Path] = None
    log_flagged: Optional[Path] = None
    log_text: bool = True
    max_texts: PositiveInt = 64
    max_text_chars: PositiveInt = 4000
    max_body_bytes: PositiveInt = 1_000_000
    runtime: str = "torch"
    threshold: Optional[float] = Field(None, gt=0, le=1)
    mode: str = "block"
    backbone: Optional[str] = None
    max_length: Optional[PositiveInt] = None
    score_batch: PositiveInt = SCORE_BATCH
    max_queue: PositiveInt = Field(256, description="texts waiting for a batch at most; beyond, 503 with Retry-After")
    request_timeout_s: float = Field(10.0, gt=0, le=3600, description="per-request deadline: 504 when no answer within it")
    log_format: str = Field("json", pattern="^(json|text)$")
    expected_flag_rate: Optional[float] = Field(None, ge=0, le=1, description="the flag rate on clean traffic (default: the PSIM's calibration)")
    drift_window: PositiveInt = Field(1000, description="texts in the rolling flag rate")
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=3600, description="an idle kept-alive connection is closed after this long")
    header_timeout_s: float = Field(10.0, gt=0, le=3600,
                                    description="a request's header must arrive in full within this long of its first byte "
                                                "(of the connection's opening, for the first request), else the connection is closed")
    max_connections: PositiveInt = Field(1000, description="open connections (and requests in progress) at most; a request beyond gets 503")
