"""The service's logs: JSON lines (the default, for log collectors) or plain text.

Every record is one line. A JSON line holds ``time``, ``level``, ``logger``, ``message`` and
the record's structured fields (``request_id``, ``status``, ``latency_ms``, ``texts``,
``flagged``, ...), passed as ``extra={"fields": {...}}``. uvicorn's own records go through
the same formatter.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

LOG_FORMATS = ("json", "text")


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(line, ensure_ascii=False, default=str)


class TextLineFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def logging_config(log_format: str) -> dict:
    """A ``logging.config.dictConfig`` for the service and uvicorn (also handed to uvicorn)."""
    formatter = "peftshield.guard.logs.JsonLineFormatter" if log_format == "json" else "peftshield.guard.logs.TextLineFormatter"
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"line": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}},
        "loggers": {
            "peftshield": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
