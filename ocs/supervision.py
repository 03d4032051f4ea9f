"""Session supervision (RFC 4006 Tcc) and the clean-up of a restarted peer's sessions.

Theory of operation. Every `ocs serve` process runs a `Supervisor`; each pass (`sweep`) reads from every
open:{pNNN} the sessions whose last activity fell, since the previous pass, at or below now − tcc_min: a
session is read once per quiet period, not on every pass. Each is handed to the close script with its Tcc
rule (2 × the largest Validity-Time of its rating groups, within [tcc_min, tcc_max]; tcc_default when none
has one). The script decides atomically: it closes a session silent past its Tcc (reservations released,
closing CDR "sessionTimeout"), or answers when it will be due, which is kept in a heap and tried again then.
A session that was active meanwhile is simply due later; one closed by whichever process came first is not
closed again. Time comes from the injected clock.

A peer whose Origin-State-Id changed has restarted: its sessions (latest CCR from that Origin-Host) that
were last active before it reconnected are closed with cause "abnormalRelease".

Must not import protocol/ or ratecards/: it sees sessions, not messages.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from balances.store import BalanceStore
from ocs.clock import Clock
from ocs.config import ChargingConfig

log = logging.getLogger(__name__)

TIMEOUT_CAUSE = "sessionTimeout"
PEER_RESTART_CAUSE = "abnormalRelease"
CHUNK = 500  # close calls in flight at once (they ride in the store's pipelines)


def validity_times(plans: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[str, int]]:
    """Plan → {rating group: the longest Validity-Time the rate card gives it, seconds}, for the Tcc rule."""
    table: dict[str, dict[str, int]] = {}
    for plan, groups in plans.items():
        times = {}
        for rating_group, schedule in groups.items():
            seconds = max(getattr(schedule, "validity_time", 0) or 0, getattr(schedule, "final_validity_time", 0) or 0)
            if seconds > 0:
                times[str(rating_group)] = seconds
        table[plan] = times
    return table


class Supervisor:
    """Closes silent sessions (Tcc) and a restarted peer's sessions; one per server process."""

    def __init__(self, store: BalanceStore, clock: Clock, config: ChargingConfig,
                 validity: Mapping[str, Mapping[str, int]], metrics: Any = None) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.validity = validity
        self.metrics = metrics
        self._after: float = float("-inf")  # open:{p} scores up to here have been read
        self._due: dict[str, int] = {}  # session → when the close script said it will be due
        self._heap: list[tuple[int, str]] = []

    def set_validity(self, validity: Mapping[str, Mapping[str, int]]) -> None:
        self.validity = validity

    def _rule(self, plan: str) -> dict:
        c = self.config
        default = min(max(c.tcc_default_seconds, c.tcc_min_seconds), c.tcc_max_seconds)  # bounded like the rest
        return {"min": c.tcc_min_seconds * 1000, "max": c.tcc_max_seconds * 1000, "default": default * 1000,
                "vt": dict(self.validity.get(plan, {}))}

    async def sweep(self) -> int:
        """One pass: reads the sessions newly quiet for tcc_min, tries those due; returns how many it closed."""
        now = self.clock.now_ms()
        cutoff = now - self.config.tcc_min_seconds * 1000
        if cutoff < self._after:  # the clock went back: read everything again
            self._after = float("-inf")
        fresh = await self.store.idle_sessions(self._after, cutoff)
        self._after = cutoff
        candidates = {session_id for session_id, _ in fresh}
        while self._heap and self._heap[0][0] <= now:
            due, session_id = heapq.heappop(self._heap)
            if self._due.get(session_id) == due:
                candidates.add(session_id)
        closed = 0
        pending = sorted(candidates)
        for start in range(0, len(pending), CHUNK):
            chunk = pending[start:start + CHUNK]
            results = await asyncio.gather(*(self._try(session_id, now) for session_id in chunk),
                                           return_exceptions=True)
            for session_id, result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("supervision of %s failed: %s", session_id, result)
                    self._remember(session_id, now + 1000 * int(self.config.supervision_interval_seconds))
                elif result is True:
                    closed += 1
        if closed:
            log.info("supervision closed %d silent session(s)", closed)
        return closed

    async def _try(self, session_id: str, now: int) -> bool:
        self._due.pop(session_id, None)
        location = await self.store.locate_session(session_id)
        if location is None:
            return False
        result = await self.store.close_session_if(session_id, TIMEOUT_CAUSE, now, tcc=self._rule(location.plan))
        if result.closed:
            self._count(TIMEOUT_CAUSE)
            return True
        if result.due_ms is not None:
            self._remember(session_id, result.due_ms)
        return False

    def _remember(self, session_id: str, due: int) -> None:
        self._due[session_id] = due
        heapq.heappush(self._heap, (due, session_id))

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps every supervision_interval_seconds until `stop` is set; a failed pass is logged and retried."""
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("supervision pass failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), self.config.supervision_interval_seconds)
            except TimeoutError:
                pass

    async def close_peer_sessions(self, origin_host: str, before_ms: int) -> int:
        """Closes the open sessions whose latest CCR came from `origin_host` and that were last active before
        `before_ms` (the peer's reconnection); returns how many."""
        session_ids = await self.store.sessions_of_host(origin_host)
        closed = await self._close_all(session_ids, PEER_RESTART_CAUSE, before_ms=before_ms,
                                       origin_host=origin_host)
        log.info("peer %s restarted: closed %d of its session(s)", origin_host, closed)
        return closed

    async def _close_all(self, session_ids: Iterable[str], cause: str, **conditions: Any) -> int:
        session_ids = list(session_ids)
        closed = 0
        for start in range(0, len(session_ids), CHUNK):
            chunk = session_ids[start:start + CHUNK]
            results = await asyncio.gather(*(
                self.store.close_session_if(sid, cause, self.clock.now_ms(), **conditions) for sid in chunk))
            closed += sum(result.closed for result in results)
        for _ in range(closed):
            self._count(cause)
        return closed

    def _count(self, cause: str) -> None:
        if self.metrics is not None:
            self.metrics.sessions_closed.labels(cause).inc()
