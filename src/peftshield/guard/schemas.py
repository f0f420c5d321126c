"""The service's request, response and error bodies (what ``GET /openapi.json`` documents)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(description="texts to label and screen (at most --max-texts, each at most --max-text-chars)")


class TextResult(BaseModel):
    label: int | None = Field(description="the model's class; null for a flagged text in block mode")
    probabilities: list[float] | None = Field(description="class probabilities; null for a flagged text in block mode")
    psim_score: float = Field(description="the PSIM's confidence: triggered texts score high")
    flagged: bool
    threshold: float = Field(description="the PSIM threshold this text was compared with (its length bucket's under --calibration)")
    reasons: list[str] = Field(description="what fired: 'psim' and the names of the detectors (--detector) whose score is above their threshold")
    detector_scores: dict[str, float] = Field(description="each detector's score (empty without --detector)")
    p_values: dict[str, float] = Field({}, description="under a --calibration: each member's (psim, detectors) p-value, the share of the "
                                       "calibration's clean texts of this length that score at least as high (small: unlike clean traffic)")
    tokens: int = Field(0, ge=0, description="the text's length in tokens as the PSIM reads it (after its cut): which length threshold applies")


class ClassifyResponse(BaseModel):
    request_id: str
    mode: str = Field(description="block or monitor")
    results: list[TextResult]


class ErrorDetail(BaseModel):
    status: int
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str


class Health(BaseModel):
    status: str


class LengthThreshold(BaseModel):
    min_tokens: int
    max_tokens: int | None = Field(description="exclusive; null: no upper bound")
    threshold: float
    detector_thresholds: dict[str, float] = Field({}, description="each detector's threshold here, when the calibration covers the detectors")


class DetectorInfo(BaseModel):
    name: str
    threshold: float | None = Field(description="its own threshold; null when the --calibration sets one per length (length_thresholds)")
    target_frr: float | None = Field(description="the clean false-rejection rate its own threshold was calibrated to")


class Readiness(BaseModel):
    ready: bool
    mode: str
    runtime: str
    threshold: float | None = Field(description="the single threshold (null under a per-length calibration)")
    length_thresholds: list[LengthThreshold] | None = Field(None, description="the thresholds per text length of a calibration ('peftshield calibrate')")
    detectors: list[DetectorInfo] = Field([], description="the detectors beside the PSIM (--detector)")
    expected_flag_rate: float | None = Field(description="share of clean traffic the guard should flag: the calibration's budget when it covers "
                                                         "every member, else the PSIM's calibrated rate plus each detector's (an upper bound, "
                                                         "the union of their flags)")
    max_batch: int
    max_wait_ms: float
    score_batch: int
    max_queue: int
    request_timeout_s: float
    error: str | None = Field(None, description="set when the models failed to load (the server log says why)")


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` for these status codes: each an :class:`ErrorBody` with what it means."""
    what = {400: "invalid JSON", 401: "missing or wrong API key", 408: "the request body was not received within the deadline",
            413: "too many texts, or a text or the body too large", 422: "wrong types (send {\"texts\": [\"...\"]})",
            500: "internal error (the log has the request id)", 503: "not ready, shutting down, or overloaded (then with Retry-After)",
            504: "no answer within the request deadline"}
    return {code: {"model": ErrorBody, "description": what[code]} for code in codes}
