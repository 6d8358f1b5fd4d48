"""Rate-limited logging: count events, log them at most once per interval."""

from __future__ import annotations

import threading
import time


class Throttle:
    """Counts events; says when to log them, at most once per interval."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._unlogged = 0
        self._next_log = 0.0

    def add(self, count: int = 1) -> int:
        """Counts `count` events; returns how many to log now (0: not yet)."""
        now = time.monotonic()
        with self._lock:
            self._unlogged += count
            if now < self._next_log:
                return 0
            self._next_log = now + self._interval_s
            count, self._unlogged = self._unlogged, 0
            return count
