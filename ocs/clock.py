"""The one clock of the server. Everything that needs "now" gets it from here, so tests can move time.

The charge scripts receive `now_ms` as an argument: Redis TIME is never used for charging.
"""

from __future__ import annotations

import time


class Clock:
    """Wall-clock time in milliseconds since the Unix epoch."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now(self) -> float:
        return time.time()


class FixedClock(Clock):
    """A clock that only moves when told to: for tests and for replaying traffic at a given instant."""

    def __init__(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms

    def now(self) -> float:
        return self._now_ms / 1000

    def advance(self, seconds: float) -> None:
        self._now_ms += int(seconds * 1000)

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms
