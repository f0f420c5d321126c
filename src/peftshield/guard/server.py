"""``peftshield serve``: the guard as an HTTP service (FastAPI on uvicorn).

Endpoints:

- ``POST /v1/classify`` ``{"texts": [...]}`` -> ``{"request_id", "mode", "results": [...]}``, one
  :class:`~peftshield.guard.guard.GuardResult` per text;
- ``GET /healthz`` (the process answers), ``GET /readyz`` (models loaded; 503 before),
  ``GET /metrics`` (Prometheus text format).

Concurrent requests are micro-batched (:mod:`peftshield.guard.batcher`). Every error is a JSON
body ``{"error": {"status", "message"}, "request_id"}`` with its status code (400 invalid JSON,
401 missing or wrong API key, 408 body not received within the deadline, 413 too many texts /
a text or body too large, 422 wrong types, 503 not ready, shutting down, or the queue full
(with ``Retry-After``), 504 no answer within ``--request-timeout-s``); nothing reaches a
client as a traceback. ``GET /openapi.json`` documents every endpoint and error. SIGTERM lets
the requests in flight finish (uvicorn's graceful shutdown), then the batcher drains and
stops. Logs are JSON lines with the request id (:mod:`peftshield.guard.logs`); the rolling
flag rate is watched against the calibrated one (:mod:`peftshield.guard.drift`).

Hostile input and clients: a text UTF-8 cannot encode (a lone surrogate, which JSON can
escape) is a 422 for its own request, found before it is queued, and a forward pass that
fails anyway is bisected so only the request that fails alone gets the error, never the
others of its micro-batch; JSON nested too deeply is a 400. A connection whose request header
is not complete within ``--header-timeout-s`` is closed (:mod:`peftshield.guard.connections`),
so is one idle longer than ``--keep-alive-timeout-s`` after a response, and beyond
``--max-connections`` requests get 503. The port is bound before the models load, so a busy
port is a one-line error at once.

What a caller without a key learns: ``/healthz``, ``/readyz`` and ``/metrics`` need no key
(probes and Prometheus scrapers carry none), so they hold no file paths and no texts:
``/readyz`` says whether the models are loaded and with which mode, threshold and limits,
not where they are (nor a load error's text, which may name them); ``/metrics`` labels
requests to paths the service does not have as ``other``. The model and PSIM paths are in
the startup log only.

The parts, one job each: request and response bodies (:mod:`peftshield.guard.schemas`), API
keys (:mod:`peftshield.guard.keys`), the flagged-text log (:mod:`peftshield.guard.flag_log`),
Prometheus metrics (:mod:`peftshield.guard.metrics`); this module holds the routes and the
service's lifecycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from peftshield.data.records import check_encodable
from peftshield.errors import ConfigError, DataError, first_issue
from peftshield.io import check_output_place
from peftshield.guard.batcher import DeadlineExceeded, MicroBatcher, Overloaded, ShuttingDown
from peftshield.guard.drift import FlagRateMonitor
from peftshield.finetune.checkpoint import model_fingerprint
from peftshield.guard.calibration import DEFAULT_CONFIDENCE, PSIM_MEMBER, check_calibrated_detectors, load_guard_calibration
from peftshield.guard.detectors import manifest_sha256, read_detector_manifest
from peftshield.guard.flag_log import FlagLog
from peftshield.guard.guard import Guard
from peftshield.guard.keys import ApiError, api_key_file_warning, check_api_key, read_api_keys
from peftshield.guard.metrics import ServiceMetrics
from peftshield.guard.reservoir import reservoir_for, write_proposal
from peftshield.guard.schemas import ClassifyRequest, ClassifyResponse, Health, Readiness, error_responses
from peftshield.guard.settings import ServeSettings, check_guard_folders

logger = logging.getLogger("peftshield.serve")
SETTINGS_ENV = "PEFTSHIELD_SERVE_SETTINGS"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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


def check_settings(settings: ServeSettings) -> None:
    """One-line errors for settings that would only fail once the service is up."""
    check_guard_folders(settings.model, settings.psim)
    manifests = {read_detector_manifest(folder).name: manifest_sha256(folder) for folder in settings.detectors}
    if settings.calibration is not None:  # parsed, checked and matched to the detectors before the port opens, not as a 503 after
        calibration = load_guard_calibration(settings.calibration, model_fingerprint(settings.psim), settings.max_length)
        check_calibrated_detectors(calibration, manifests, settings.calibration)
    if settings.api_key_file is not None:
        read_api_keys(settings.api_key_file)
    if settings.reservoir is not None:
        check_output_place(settings.reservoir, "file", "--reservoir")
    if settings.log_flagged is not None:
        try:
            settings.log_flagged.parent.mkdir(parents=True, exist_ok=True)
            with open(settings.log_flagged, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError(f"--log-flagged {settings.log_flagged}: cannot append to it ({exc.strerror or exc})") from None


def load_guard(settings: ServeSettings) -> Guard:
    return Guard.from_settings(settings)


def create_app(settings: ServeSettings, guard: Guard | None = None):
    """The FastAPI application. Without ``guard``, the models load on a background thread after
    start-up (``/readyz`` answers 503 until then)."""
    keys = read_api_keys(settings.api_key_file) if settings.api_key_file else None
    metrics = ServiceMetrics(settings.mode)
    state: dict = {"guard": None, "load_error": None, "monitor": None, "reservoir": None}
    proposing = threading.Lock()  # one proposal written at a time

    def mark_ready(loaded: Guard) -> None:
        expected = settings.expected_flag_rate if settings.expected_flag_rate is not None else loaded.expected_flag_rate
        monitor = FlagRateMonitor(expected, window=settings.drift_window)
        metrics.watch(monitor)
        state["monitor"] = monitor
        if settings.reservoir is not None:
            state["reservoir"] = reservoir_for(loaded, settings.reservoir_size)
            state["next_proposal"] = settings.reservoir_size
            state["psim_fingerprint"] = model_fingerprint(settings.psim)
        state["guard"] = loaded
        metrics.ready.set(1)
        logger.info("ready: model %s, PSIM %s, runtime %s, %s, mode %s", settings.model, settings.psim, settings.runtime,
                    loaded.threshold_summary, settings.mode,
                    extra={"fields": {"event": "ready", "threshold": loaded.threshold, "mode": settings.mode, "expected_flag_rate": expected,
                                      "calibration": str(settings.calibration) if settings.calibration else None}})

    def load_models() -> None:
        try:
            mark_ready(load_guard(settings))
        except Exception as exc:  # reported by /readyz and the log, one line
            state["load_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.error("cannot load the models: %s", state["load_error"])

    def classify(texts: list[str]) -> list:
        return state["guard"].classify(texts)

    def propose_recalibration(wait: bool = False) -> None:
        """Write the reservoir's proposal (never applied: an operator restarts with it). A periodic
        proposal is skipped while another is being written; the one at shutdown waits for it."""
        reservoir, loaded = state["reservoir"], state["guard"]
        if reservoir is None or not proposing.acquire(blocking=wait):
            return
        try:
            current = loaded.calibration
            proposal = reservoir.propose(state["psim_fingerprint"], loaded.max_length, {d.name: d.manifest_sha256 for d in loaded.detectors},
                                         current.target_frr if current else 0.01,
                                         current.confidence if current and current.confidence else DEFAULT_CONFIDENCE)
            if proposal is None:
                logger.info("reservoir: %d texts kept, too few for a proposal yet", reservoir.kept)
                return
            write_proposal(settings.reservoir, proposal)
            logger.info("recalibration proposed (not applied; review it, then restart with --calibration): %s", proposal.describe(),
                        extra={"fields": {"event": "recalibration_proposed", "texts": reservoir.kept, "screened": reservoir.seen,
                                         "flagged_share_in_sample": proposal.sample.flagged_share}})
        except Exception as exc:  # a proposal that cannot be made or written never fails a request
            logger.error("reservoir: no proposal: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            proposing.release()

    def dropped(reason: str, requests: int) -> None:
        metrics.dropped.labels(reason=reason).inc(requests)

    batcher = MicroBatcher(classify, settings.max_batch, settings.max_wait_ms, on_batch=metrics.record_batch, max_queue=settings.max_queue,
                           on_drop=dropped)
    flag_log = FlagLog(settings.log_flagged, settings.log_text) if settings.log_flagged else None

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        if guard is None:
            threading.Thread(target=load_models, name="peftshield-load", daemon=True).start()
        else:
            mark_ready(guard)
        yield
        await batcher.stop()
        if flag_log is not None:
            flag_log.close()
        if state["reservoir"] is not None:
            propose_recalibration(wait=True)
        logger.info("stopped: every request in flight answered")

    from peftshield import __version__

    app = FastAPI(title="peftshield guard", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="A deployed classifier behind its PSIM: texts whose PSIM confidence exceeds the threshold are flagged "
                              "(block mode: not labelled).")
    app.state.metrics = metrics
    app.state.settings = settings

    def endpoint_of(request: Request) -> str:
        """The metrics label of a request: its route, or ``other`` (a caller's path is never a label)."""
        path = request.url.path
        return path if path in {getattr(route, "path", None) for route in app.routes} else "other"

    def request_id_of(request: Request) -> str:
        given = request.headers.get("x-request-id", "")
        return given if _REQUEST_ID.match(given) else uuid.uuid4().hex

    def error(status: int, message: str, request_id: str, endpoint: str, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        return JSONResponse({"error": {"status": status, "message": message}, "request_id": request_id}, status_code=status,
                            headers={"X-Request-ID": request_id, **(headers or {})})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), request_id_of(request), endpoint_of(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error(422, "invalid request", request_id_of(request), endpoint_of(request))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        request_id = request_id_of(request)
        logger.error("request %s: internal error: %s: %s", request_id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                     extra={"fields": {"request_id": request_id, "status": 500, "path": request.url.path}})
        return error(500, "internal error (see the server log for this request id)", request_id, endpoint_of(request))

    @app.get("/healthz", response_model=Health, summary="The process answers")
    async def healthz():
        metrics.requests.labels(endpoint="/healthz", status="200").inc()
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, summary="The models are loaded (503 until then)",
             responses={503: {"model": Readiness, "description": "not ready yet (or the models failed to load: see error)"}})
    async def readyz():
        loaded = state["guard"]
        monitor = state["monitor"]
        calibration = loaded.calibration if loaded else None
        body = {"ready": loaded is not None, "mode": settings.mode, "runtime": settings.runtime, "threshold": loaded.threshold if loaded else None,
                "length_thresholds": [{"min_tokens": b.min_tokens, "max_tokens": b.max_tokens, "threshold": b.threshold,
                                       "detector_thresholds": b.detector_thresholds} for b in calibration.buckets] if calibration else None,
                "detectors": [{"name": d.name, "threshold": None if calibration and calibration.detectors else d.threshold,
                               "target_frr": d.target_frr} for d in loaded.detectors] if loaded else [],
                "expected_flag_rate": monitor.expected if monitor else None, "max_batch": settings.max_batch,
                "max_wait_ms": settings.max_wait_ms, "score_batch": settings.score_batch, "max_queue": settings.max_queue,
                "request_timeout_s": settings.request_timeout_s}
        if state["load_error"]:  # its text may name the model's files: that is for the log
            body["error"] = "the models failed to load (the server log says why)"
        status = 200 if loaded is not None else 503
        metrics.requests.labels(endpoint="/readyz", status=str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
    async def prometheus_metrics():
        metrics.queued.set(batcher.queued_texts)
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @app.post("/v1/classify", response_model=ClassifyResponse, summary="Label and screen texts",
              responses=error_responses(400, 401, 408, 413, 422, 500, 503, 504),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
    async def classify_endpoint(request: Request):
        started = time.perf_counter()
        request_id = request_id_of(request)
        endpoint = "/v1/classify"
        timeout = settings.request_timeout_s
        try:
            check_api_key(request, keys)
            if batcher.full():  # shed before reading the body: under overload every cycle goes to the requests accepted
                raise _shed_overload(batcher.overloaded(), metrics.shed)
            try:
                texts = await asyncio.wait_for(_checked_texts(request, settings), timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body was not received within {timeout:g} s") from None
            except ClientDisconnect:
                texts = None
            if state["guard"] is None:
                raise ApiError(503, "not ready: the models are still loading" if not state["load_error"] else f"not ready: {state['load_error']}")
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
            return error(exc.status, exc.message, request_id, endpoint, exc.headers)
        metrics.record_results(results, state["monitor"])
        reservoir = state["reservoir"]
        if reservoir is not None:
            reservoir.observe([r.tokens for r in results], {name: [r.psim_score if name == PSIM_MEMBER else r.detector_scores[name] for r in results]
                                                            for name in reservoir.members}, [r.flagged for r in results])
            if reservoir.seen >= state["next_proposal"]:
                state["next_proposal"] = reservoir.seen + settings.reservoir_size
                asyncio.get_running_loop().run_in_executor(None, propose_recalibration)
        if flag_log is not None:
            await asyncio.get_running_loop().run_in_executor(None, flag_log.write, request_id, texts, results)
        seconds = time.perf_counter() - started
        metrics.latency.observe(seconds)
        metrics.requests.labels(endpoint=endpoint, status="200").inc()
        flagged = sum(r.flagged for r in results)
        logger.info("request %s: %d texts, %d flagged, %.1f ms", request_id, len(texts), flagged, seconds * 1000,
                    extra={"fields": {"request_id": request_id, "status": 200, "texts": len(texts), "flagged": flagged,
                                      "latency_ms": round(seconds * 1000, 1)}})
        return JSONResponse({"request_id": request_id, "mode": settings.mode, "results": [r.to_dict() for r in results]},
                            headers={"X-Request-ID": request_id})

    return app


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
        issue = first_issue(exc)
        raise ApiError(422, f"{issue.location or 'body'}: {issue.raw_message} (send {{\"texts\": [\"...\"]}}, a list of strings)") from None
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


def app_from_environment():
    """Application factory for uvicorn workers: the settings come from ``PEFTSHIELD_SERVE_SETTINGS``."""
    import os

    return create_app(ServeSettings.model_validate_json(os.environ[SETTINGS_ENV]))


def serve(settings: ServeSettings, announce=print) -> None:
    """Run the service until SIGINT/SIGTERM (requests in flight finish first). ``announce`` gets
    one line once the settings and (with one worker) the models have loaded."""
    import os

    import uvicorn

    import logging.config

    from peftshield.guard.connections import HEADER_TIMEOUT_ATTRIBUTE, PROTOCOL
    from peftshield.guard.logs import logging_config

    check_settings(settings)
    sock = bind_port(settings.host, settings.port)  # before the models load: a busy port is a one-line error at once
    try:
        log_config = logging_config(settings.log_format)
        logging.config.dictConfig(log_config)
        warning = api_key_file_warning(settings.api_key_file) if settings.api_key_file is not None else None
        if warning:
            logger.warning(warning, extra={"fields": {"event": "api_key_file_permissions"}})
        port = sock.getsockname()[1]
        common = dict(log_level="info", timeout_graceful_shutdown=60, access_log=False, log_config=log_config, http=PROTOCOL,
                      timeout_keep_alive=settings.keep_alive_timeout_s, limit_concurrency=settings.max_connections)
        where = (f"serving {settings.model} behind PSIM {settings.psim} on http://{settings.host}:{port} "
                 f"({settings.runtime}, mode {settings.mode}, {settings.workers} worker(s)); Ctrl-C or SIGTERM stops it")
        if settings.log_format == "json":  # every line of the service's output is JSON, the announcement too
            def announce(message: str) -> None:
                logger.info(message, extra={"fields": {"event": "serving", "host": settings.host, "port": port, "mode": settings.mode,
                                                       "runtime": settings.runtime, "workers": settings.workers}})
        if settings.workers > 1:
            from uvicorn.supervisors import Multiprocess

            announce(where)  # each worker loads its own copy, in the background (/readyz says when)
            os.environ[SETTINGS_ENV] = settings.model_dump_json()
            config = uvicorn.Config("peftshield.guard.server:app_from_environment", factory=True, workers=settings.workers, **common)
            setattr(config, HEADER_TIMEOUT_ATTRIBUTE, settings.header_timeout_s)  # pickled to each worker with the config
            try:
                Multiprocess(config, sockets=[sock]).run()
            except KeyboardInterrupt:
                pass
        else:  # loaded before the port listens, so a model that cannot load is a one-line error, not a server that never gets ready
            app = create_app(settings, load_guard(settings))
            announce(where)
            config = uvicorn.Config(app, **common)
            setattr(config, HEADER_TIMEOUT_ATTRIBUTE, settings.header_timeout_s)
            _GracefulServer(config).run(sockets=[sock])
    finally:
        sock.close()


def bind_port(host: str, port: int):
    """A socket bound to ``host:port`` (as uvicorn binds it), for the server to listen on; a port
    in use (or a host that is not this machine's) is a :class:`ConfigError`."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host}: cannot listen there ({reason})") from None
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({reason})") from None
    sock.set_inheritable(True)
    return sock


def _graceful_server_class():
    import signal
    from contextlib import contextmanager

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM stop that drained every request exits 0
        (uvicorn re-raises the signal, which makes a clean stop look like a crash)."""

        @contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    return GracefulServer


def _GracefulServer(config):  # noqa: N802 - a class built on first use (uvicorn is imported lazily)
    return _graceful_server_class()(config)
