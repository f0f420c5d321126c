"""The HTTP routes of ``peftshield serve`` (:mod:`peftshield.guard.server` builds the app, runs
its lifecycle and uvicorn): ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` and
``POST /v1/classify`` on :data:`router`, and the exception handlers that turn every error into
the JSON error body (:data:`EXCEPTION_HANDLERS`).

What the routes share with the lifecycle (the guard once loaded, the batcher, metrics, keys,
the flag log, the reservoir) is one :class:`ServiceState`, stored as ``app.state.service``
and reached through ``request.app.state.service``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from peftshield.data.records import check_encodable
from peftshield.errors import DataError, validation_line
from peftshield.guard.batcher import DeadlineExceeded, MicroBatcher, Overloaded, ShuttingDown
from peftshield.guard.calibration import PSIM_MEMBER
from peftshield.guard.drift import FlagRateMonitor
from peftshield.guard.flag_log import FlagLog
from peftshield.guard.guard import Guard
from peftshield.guard.keys import ApiError, check_api_key
from peftshield.guard.metrics import ServiceMetrics
from peftshield.guard.schemas import ClassifyRequest, ClassifyResponse, Health, Readiness, error_responses
from peftshield.guard.settings import ServeSettings

logger = logging.getLogger("peftshield.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class ServiceState:
    """What the routes share with the service's lifecycle (``app.state.service``).

    Fixed at start: ``settings``, ``metrics``, ``keys`` (None: no API key needed), the
    ``batcher``, the ``flag_log`` (None without ``--log-flagged``), and
    ``propose_recalibration(wait=False)`` (writes the reservoir's proposal). Set once the models
    load (``guard`` last, so a request that sees it sees the rest): ``monitor`` (the drift
    alarm), and with ``--reservoir`` the ``reservoir``, the texts screened at which the next
    proposal is due (``next_proposal``) and the PSIM's ``psim_fingerprint``; or ``load_error``,
    the first line of why the models did not load."""

    settings: ServeSettings
    metrics: ServiceMetrics
    keys: list[str] | None
    batcher: MicroBatcher
    flag_log: FlagLog | None
    propose_recalibration: Callable[..., None]
    guard: Guard | None = None
    load_error: str | None = None
    monitor: FlagRateMonitor | None = None
    reservoir: Any = None
    next_proposal: int = 0
    psim_fingerprint: str | None = None


def service_of(request: Request) -> ServiceState:
    return request.app.state.service


def endpoint_of(request: Request) -> str:
    """The metrics label of a request: its route, or ``other`` (a caller's path is never a label).
    The app's own routes and :data:`router`'s (FastAPI lists an included router in
    ``app.routes`` as one entry without a path)."""
    path = request.url.path
    return path if path in {getattr(route, "path", None) for route in (*request.app.routes, *router.routes)} else "other"


def request_id_of(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def error(request: Request, status: int, message: str, request_id: str, endpoint: str, headers: dict | None = None) -> JSONResponse:
    service_of(request).metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
    return JSONResponse({"error": {"status": status, "message": message}, "request_id": request_id}, status_code=status,
                        headers={"X-Request-ID": request_id, **(headers or {})})


# ---------------------------------------------------------------- exception handlers

async def http_error(request: Request, exc: StarletteHTTPException):
    return error(request, exc.status_code, str(exc.detail), request_id_of(request), endpoint_of(request))


async def validation_error(request: Request, exc: RequestValidationError):
    return error(request, 422, "invalid request", request_id_of(request), endpoint_of(request))


async def unexpected_error(request: Request, exc: Exception):
    request_id = request_id_of(request)
    logger.error("request %s: internal error: %s: %s", request_id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                 extra={"fields": {"request_id": request_id, "status": 500, "path": request.url.path}})
    return error(request, 500, "internal error (see the server log for this request id)", request_id, endpoint_of(request))


# Registered on the app by peftshield.guard.server.create_app (an APIRouter cannot hold them).
EXCEPTION_HANDLERS = {StarletteHTTPException: http_error, RequestValidationError: validation_error, Exception: unexpected_error}


# ---------------------------------------------------------------- routes

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="The process answers")
async def healthz(request: Request):
    service_of(request).metrics.requests.labels(endpoint="/healthz", status="200").inc()
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="The models are loaded (503 until then)",
            responses={503: {"model": Readiness, "description": "not ready yet (or the models failed to load: see error)"}})
async def readyz(request: Request):
    service = service_of(request)
    settings, metrics = service.settings, service.metrics
    loaded = service.guard
    monitor = service.monitor
    calibration = loaded.calibration if loaded else None
    body = {"ready": loaded is not None, "mode": settings.mode, "runtime": settings.runtime, "threshold": loaded.threshold if loaded else None,
            "length_thresholds": [{"min_tokens": b.min_tokens, "max_tokens": b.max_tokens, "threshold": b.threshold,
                                   "detector_thresholds": b.detector_thresholds} for b in calibration.buckets] if calibration else None,
            "detectors": [{"name": d.name, "threshold": None if calibration and calibration.detectors else d.threshold,
                           "target_frr": d.target_frr} for d in loaded.detectors] if loaded else [],
            "expected_flag_rate": monitor.expected if monitor else None, "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms, "score_batch": settings.score_batch, "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s}
    if service.load_error:  # its text may name the model's files: that is for the log
        body["error"] = "the models failed to load (the server log says why)"
    status = 200 if loaded is not None else 503
    metrics.requests.labels(endpoint="/readyz", status=str(status)).inc()
    return JSONResponse(body, status_code=status)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
async def prometheus_metrics(request: Request):
    service = service_of(request)
    service.metrics.queued.set(service.batcher.queued_texts)
    payload, content_type = service.metrics.render()
    return Response(payload, media_type=content_type)


@router.post("/v1/classify", response_model=ClassifyResponse, summary="Label and screen texts",
             responses=error_responses(400, 401, 408, 413, 422, 500, 503, 504),
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
async def classify_endpoint(request: Request):
    started = time.perf_counter()
    service = service_of(request)
    settings, metrics, batcher = service.settings, service.metrics, service.batcher
    request_id = request_id_of(request)
    endpoint = "/v1/classify"
    timeout = settings.request_timeout_s
    try:
        check_api_key(request, service.keys)
        if batcher.full():  # shed before reading the body: under overload every cycle goes to the requests accepted
            raise _shed_overload(batcher.overloaded(), metrics.shed)
        try:
            texts = await asyncio.wait_for(_checked_texts(request, settings), timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body was not received within {timeout:g} s") from None
        except ClientDisconnect:
            texts = None
        if service.guard is None:
            raise ApiError(503, "not ready: the models are still loading" if not service.load_error else f"not ready: {service.load_error}")
        results = None if texts is None else await _answer_or_leave(request, batcher, texts, max(0.001, timeout - (time.perf_counter() - started)),
                                                                    metrics.shed)
        if results is None:  # the client went away: its request was dropped, nobody reads an answer
            metrics.shed.labels(reason="client_gone").inc()
            metrics.requests.labels(endpoint=endpoint, status="499").inc()
            logger.info("request %s: client gone", request_id, extra={"fields": {"request_id": request_id, "status": 499,
                                                                                 "texts": len(texts) if texts else 0}})
            return Response(status_code=499)
    except ApiError as exc:
        logger.info("request %s: %d %s", request_id, exc.status, exc.message,
                    extra={"fields": {"request_id": request_id, "status": exc.status, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}})
        return error(request, exc.status, exc.message, request_id, endpoint, exc.headers)
    metrics.record_results(results, service.monitor)
    reservoir = service.reservoir
    if reservoir is not None:
        reservoir.observe([r.tokens for r in results], {name: [r.psim_score if name == PSIM_MEMBER else r.detector_scores[name] for r in results]
                                                        for name in reservoir.members}, [r.flagged for r in results])
        if reservoir.seen >= service.next_proposal:
            service.next_proposal = reservoir.seen + settings.reservoir_size
            asyncio.get_running_loop().run_in_executor(None, service.propose_recalibration)
    if service.flag_log is not None:
        await asyncio.get_running_loop().run_in_executor(None, service.flag_log.write, request_id, texts, results)
    seconds = time.perf_counter() - started
    metrics.latency.observe(seconds)
    metrics.requests.labels(endpoint=endpoint, status="200").inc()
    flagged = sum(r.flagged for r in results)
    logger.info("request %s: %d texts, %d flagged, %.1f ms", request_id, len(texts), flagged, seconds * 1000,
                extra={"fields": {"request_id": request_id, "status": 200, "texts": len(texts), "flagged": flagged,
                                  "latency_ms": round(seconds * 1000, 1)}})
    return JSONResponse({"request_id": request_id, "mode": settings.mode, "results": [r.to_dict() for r in results]},
                        headers={"X-Request-ID": request_id})


# ---------------------------------------------------------------- what /v1/classify does with a request

async def _answer_or_leave(request: Request, batcher: MicroBatcher, texts: list[str], timeout: float, shed) -> list | None:
    """The batch results for ``texts``, or None when the client disconnects first (the request
    is then dropped from the queue). Overload, deadline and shutdown become :class:`ApiError`."""
    answer = asyncio.ensure_future(batcher.submit(texts, timeout))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            return None
        return answer.result()
    except Overloaded as exc:
        raise _shed_overload(exc, shed) from None
    except DeadlineExceeded as exc:
        shed.labels(reason="deadline").inc()
        raise ApiError(504, str(exc)) from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), {"Retry-After": "1"}) from None
    except DataError as exc:  # the request's own texts could not be scored (its batch mates were answered)
        raise ApiError(422, str(exc)) from None
    finally:
        gone.cancel()


def _shed_overload(exc: Overloaded, shed) -> ApiError:
    """A full queue: counted as shed, answered 503 with Retry-After."""
    shed.labels(reason="queue_full").inc()
    return ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)})


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body was read already, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def _checked_texts(request, settings: ServeSettings) -> list[str]:
    """The request's texts, or the :class:`ApiError` its first problem deserves."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {settings.max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > settings.max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {settings.max_body_bytes} bytes")
    try:
        payload = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(400, f"invalid JSON{where}: send {{\"texts\": [\"...\"]}}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply (send {\"texts\": [\"...\"]})") from None
    try:
        texts = ClassifyRequest.model_validate(payload).texts
    except ValidationError as exc:
        raise ApiError(422, f"{validation_line(exc, whole='body', show_input=False)} (send {{\"texts\": [\"...\"]}}, a list of strings)") from None
    if len(texts) > settings.max_texts:
        raise ApiError(413, f"{len(texts)} texts in one request; the limit is {settings.max_texts}")
    for index, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise ApiError(413, f"texts.{index}: {len(text)} characters; the limit is {settings.max_text_chars}")
        try:
            check_encodable(text, f"texts.{index}")
        except DataError as exc:
            raise ApiError(422, str(exc)) from None
    return texts
