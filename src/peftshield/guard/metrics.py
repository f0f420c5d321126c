"""The service's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations

from peftshield.guard.batcher import BatchRecord
from peftshield.guard.drift import FlagRateMonitor


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, mode: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("peftshield_requests_total", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("peftshield_request_seconds", "Latency of /v1/classify requests", registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_texts = Histogram("peftshield_batch_texts", "Texts per forward pass (micro-batch size)", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_requests = Histogram("peftshield_batch_requests", "Requests merged into one forward pass", registry=self.registry,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.texts = Counter("peftshield_texts_total", "Texts screened", registry=self.registry)
        self.flagged = Counter("peftshield_flagged_total", "Texts flagged (by the PSIM or a detector)", registry=self.registry)
        self.flagged_rate = Gauge("peftshield_flagged_ratio", "Share of screened texts flagged since start", registry=self.registry)
        self.ready = Gauge("peftshield_ready", "1 when the models are loaded", registry=self.registry)
        self.mode = Gauge("peftshield_mode_info", "The guard's mode (label)", ["mode"], registry=self.registry)
        self.mode.labels(mode=mode).set(1)
        self.shed = Counter("peftshield_shed_total", "Requests answered without a result: queue full (503), deadline passed (504), or client gone",
                            ["reason"], registry=self.registry)
        self.dropped = Counter("peftshield_dropped_requests_total", "Queued requests removed before their batch ran (caller gone or deadline passed)",
                               ["reason"], registry=self.registry)
        self.queued = Gauge("peftshield_queue_texts", "Texts waiting for a batch", registry=self.registry)
        self.rolling = Gauge("peftshield_flagged_ratio_rolling", "Share of the last --drift-window texts flagged", registry=self.registry)
        self.expected = Gauge("peftshield_flagged_ratio_expected", "Share of clean texts the guard should flag (its members' calibrated rates, summed)", registry=self.registry)
        self.alarm = Gauge("peftshield_flagged_ratio_alarm_level", "Rolling flag rate above which the drift alarm is raised", registry=self.registry)
        self.drift = Gauge("peftshield_flag_rate_drift", "1 while the rolling flag rate is above the alarm level", registry=self.registry)
        self._counts = [0, 0]

    def record_batch(self, record: BatchRecord) -> None:
        self.batch_texts.observe(record.texts)
        self.batch_requests.observe(record.requests)

    def watch(self, monitor: FlagRateMonitor) -> None:
        if monitor.expected is not None:
            self.expected.set(monitor.expected)
            self.alarm.set(monitor.alarm_level)

    def record_results(self, results: list, monitor: FlagRateMonitor | None = None) -> None:
        if monitor is not None:
            monitor.observe([r.flagged for r in results])
            self.rolling.set(monitor.rolling_rate)
            self.drift.set(1 if monitor.drifting else 0)
        flagged = sum(r.flagged for r in results)
        self.texts.inc(len(results))
        self.flagged.inc(flagged)
        self._counts[0] += len(results)
        self._counts[1] += flagged
        self.flagged_rate.set(self._counts[1] / self._counts[0] if self._counts[0] else 0.0)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
