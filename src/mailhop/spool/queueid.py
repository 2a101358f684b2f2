"""Queue IDs: short, unique within a spool, and sortable by arrival.

An ID is the arrival time in microseconds as upper-case hex (13 digits
until the year 2112).  The generator never repeats and never goes back,
even if the clock does, and it starts above the newest ID already in the
spool so a restart cannot collide with mail still queued.
"""

from __future__ import annotations

import threading
import time


class QueueIdGenerator:
    def __init__(self, floor: str | None = None) -> None:
        self._last = int(floor, 16) if floor else 0
        self._lock = threading.Lock()

    def next(self) -> str:
        now = time.time_ns() // 1000
        with self._lock:
            self._last = now if now > self._last else self._last + 1
            value = self._last
        return f"{value:013X}"


def arrival_of(queue_id: str) -> float:
    """The arrival time (unix seconds) encoded in ``queue_id``."""
    return int(queue_id, 16) / 1e6
