"""Is the guard flagging more clean traffic than it was calibrated for?

A PSIM's threshold is calibrated on one task's clean dev texts (1% flagged, say); a deployed
guard sees other texts, and its false-rejection rate can drift up (bench/guard_drift.md
measures how far per kind of text). :class:`FlagRateMonitor` keeps the flag rate over the
last ``window`` texts and raises an alarm when it exceeds ``max(factor x expected, expected
+ margin)`` over at least ``min_texts`` texts: clean traffic has drifted from the
calibration data, or an attack is under way. Either way an operator should look.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

logger = logging.getLogger("peftshield.serve")


class FlagRateMonitor:
    def __init__(self, expected: float | None, window: int = 1000, min_texts: int = 200, factor: float = 3.0, margin: float = 0.02) -> None:
        self.expected = expected
        self.window = window
        self.min_texts = min(min_texts, window)
        self.alarm_level = None if expected is None else max(factor * expected, expected + margin)
        self._flags: deque[bool] = deque(maxlen=window)
        self._flagged = 0
        self._lock = threading.Lock()
        self.drifting = False

    @property
    def rolling_rate(self) -> float:
        return self._flagged / len(self._flags) if self._flags else 0.0

    def observe(self, flags: list[bool]) -> None:
        with self._lock:
            for flag in flags:
                if len(self._flags) == self.window:
                    self._flagged -= self._flags[0]
                self._flags.append(bool(flag))
                self._flagged += bool(flag)
            if self.alarm_level is None or len(self._flags) < self.min_texts:
                return
            rate = self.rolling_rate
            fields = {"event": "flag_rate_drift", "rolling_flag_rate": round(rate, 4), "expected_flag_rate": self.expected,
                      "alarm_level": round(self.alarm_level, 4), "window_texts": len(self._flags)}
            if rate > self.alarm_level and not self.drifting:
                self.drifting = True
                logger.warning("flag rate %.1f%% over the last %d texts, against %.1f%% calibrated: the traffic has drifted from the "
                               "calibration texts (false rejections: calibrate on a clean sample of this traffic with 'peftshield calibrate' "
                               "and restart with --calibration) or triggered texts are arriving", 100 * rate, len(self._flags),
                               100 * self.expected, extra={"fields": fields})
            elif rate <= self.alarm_level and self.drifting:
                self.drifting = False
                logger.info("flag rate back to %.1f%% (alarm level %.1f%%)", 100 * rate, 100 * self.alarm_level,
                            extra={"fields": {**fields, "event": "flag_rate_recovered"}})
