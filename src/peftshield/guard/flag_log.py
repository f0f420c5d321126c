"""``--log-flagged``: every flagged text appended to a JSONL file for review."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path


class FlagLog:
    """Append-only JSONL of flagged texts, one line per text, flushed as written."""

    def __init__(self, path: Path, log_text: bool) -> None:
        self.path, self.log_text = path, log_text
        self._lock = threading.Lock()
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, request_id: str, texts: list[str], results: list) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        lines = []
        for index, (text, result) in enumerate(zip(texts, results)):
            if result.flagged:
                record = {"request_id": request_id, "time": now, "index": index, "score": result.psim_score, "threshold": result.threshold,
                          "reasons": result.reasons}
                if self.log_text:
                    record["text"] = text
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if lines:
            with self._lock:
                self._handle.writelines(lines)
                self._handle.flush()

    def close(self) -> None:
        with self._lock:
            self._handle.close()
