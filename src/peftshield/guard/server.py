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
Prometheus metrics (:mod:`peftshield.guard.metrics`), the routes and error handlers
(:mod:`peftshield.guard.routes`); this module builds the app and holds the service's
lifecycle: the pre-flight checks, loading the models, shutdown, and running uvicorn.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from peftshield.errors import ConfigError
from peftshield.io import check_output_place
from peftshield.guard.batcher import MicroBatcher
from peftshield.guard.drift import FlagRateMonitor
from peftshield.finetune.checkpoint import model_fingerprint
from peftshield.guard.calibration import DEFAULT_CONFIDENCE, check_calibrated_detectors, load_guard_calibration
from peftshield.guard.detectors import manifest_sha256, read_detector_manifest
from peftshield.guard.flag_log import FlagLog
from peftshield.guard.guard import Guard
from peftshield.guard.keys import api_key_file_warning, read_api_keys
from peftshield.guard.metrics import ServiceMetrics
from peftshield.guard.reservoir import reservoir_for, write_proposal
from peftshield.guard.routes import EXCEPTION_HANDLERS, ServiceState, router
from peftshield.guard.settings import ServeSettings, check_guard_folders

logger = logging.getLogger("peftshield.serve")
SETTINGS_ENV = "PEFTSHIELD_SERVE_SETTINGS"


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
    """The FastAPI application: the routes of :mod:`peftshield.guard.routes`, sharing one
    :class:`~peftshield.guard.routes.ServiceState` (``app.state.service``) with the lifecycle
    here. Without ``guard``, the models load on a background thread after start-up
    (``/readyz`` answers 503 until then)."""
    keys = read_api_keys(settings.api_key_file) if settings.api_key_file else None
    metrics = ServiceMetrics(settings.mode)
    proposing = threading.Lock()  # one proposal written at a time

    def mark_ready(loaded: Guard) -> None:
        expected = settings.expected_flag_rate if settings.expected_flag_rate is not None else loaded.expected_flag_rate
        monitor = FlagRateMonitor(expected, window=settings.drift_window)
        metrics.watch(monitor)
        service.monitor = monitor
        if settings.reservoir is not None:
            service.reservoir = reservoir_for(loaded, settings.reservoir_size)
            service.next_proposal = settings.reservoir_size
            service.psim_fingerprint = model_fingerprint(settings.psim)
        service.guard = loaded
        metrics.ready.set(1)
        logger.info("ready: model %s, PSIM %s, runtime %s, %s, mode %s", settings.model, settings.psim, settings.runtime,
                    loaded.threshold_summary, settings.mode,
                    extra={"fields": {"event": "ready", "threshold": loaded.threshold, "mode": settings.mode, "expected_flag_rate": expected,
                                      "calibration": str(settings.calibration) if settings.calibration else None}})

    def load_models() -> None:
        try:
            mark_ready(load_guard(settings))
        except Exception as exc:  # reported by /readyz and the log, one line
            service.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.error("cannot load the models: %s", service.load_error)

    def classify(texts: list[str]) -> list:
        return service.guard.classify(texts)

    def propose_recalibration(wait: bool = False) -> None:
        """Write the reservoir's proposal (never applied: an operator restarts with it). A periodic
        proposal is skipped while another is being written; the one at shutdown waits for it."""
        reservoir, loaded = service.reservoir, service.guard
        if reservoir is None or not proposing.acquire(blocking=wait):
            return
        try:
            current = loaded.calibration
            proposal = reservoir.propose(service.psim_fingerprint, loaded.max_length, {d.name: d.manifest_sha256 for d in loaded.detectors},
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
    service = ServiceState(settings, metrics, keys, batcher, flag_log, propose_recalibration)

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
        if service.reservoir is not None:
            propose_recalibration(wait=True)
        logger.info("stopped: every request in flight answered")

    from peftshield import __version__

    app = FastAPI(title="peftshield guard", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="A deployed classifier behind its PSIM: texts whose PSIM confidence exceeds the threshold are flagged "
                              "(block mode: not labelled).")
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.service = service
    for exception, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exception, handler)
    app.include_router(router)
    return app


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
