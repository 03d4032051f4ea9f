"""`ocs serve`: wires the Diameter transport to credit control, the balance store and the CDR writer.

Start order: Redis (embedded Valkey unless a URL is configured) → balance store → rate cards → Diameter
listener → peer registry and request queue (ocs.routing) → session supervision (ocs.supervision) → CDR
writer → /metrics. Stop order on SIGTERM/SIGINT (RFC 6733 §5.4): stop supervising, DPR (REBOOTING) to every
peer, finish the requests in flight, stop accepting, leave the peer registry, drain and fsync the CDR
streams, stop the embedded Valkey.

Overload: every balance-store call is bounded (redis.call_timeout_ms) and a Redis that is down or slow makes
the CCR a 3004 DIAMETER_TOO_BUSY at once; with too many CCRs in flight in this process, new sessions and
events (CCR-I, CCR-E) are answered 3004 first (overload.new_sessions_max_in_flight), updates and
terminations of open sessions only past overload.max_in_flight. A count is not a time: past the knee the
in-flight CCRs wait for the loop, for a pipeline slot and for Valkey, so the shedding also looks at time,
measured from the read of each request's bytes (the transport stamps every read). A CCR arriving while the
CCRs answered lately took longer than the budget in the process (moving average), with others in flight, is
answered 3004 at once; one that waited past the budget before the loop got to it is answered 3004 then, still
without a Redis call. The budget is overload.new_sessions_max_queue_ms for CCR-I/CCR-E (shed first) and
overload.max_queue_ms for updates and terminations of open sessions (RFC 4006 wants CCR-T served whenever
possible: they go on longest).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import redis.asyncio as aioredis

from balances.embedded import EmbeddedValkey
from balances.model import EVENT, INITIAL
from balances.store import BalanceStore
from ocs.charging import CreditControl
from ocs.clock import Clock
from ocs.config import Config, ConfigError
from ocs.metrics import REQUEST_TYPES, Metrics
from ocs.ratecard_store import active_card_files, load_active_rater
from ocs.routing import ABORT, REAUTH, Router, ServerRequestResult, reauth_subscriber
from ocs.supervision import Supervisor, validity_times
from protocol.codec import Message
from protocol.peer import PeerSettings
from protocol.transport import DiameterServer
from ratecards import RateCardError, Rater, compile_ratecard, load_ratecard
from ratecards.schedule import RatingSchedule

log = logging.getLogger("ocs.server")

CCR = 272
TOO_BUSY = 3004
# Weights of the newest answer in the moving average of answer times: it rises faster than it falls, so it follows
# the slower answers (a queue grows fast) and one slow answer is still no queue.
ANSWER_TIME_RISE = 1 / 4
ANSWER_TIME_FALL = 1 / 16
SAFE_REDIS = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}


def embedded_url_file(config: Config) -> Path:
    return Path(config.data_dir) / "valkey" / "url"


def compiled_plans(config: Config) -> tuple[dict[str, dict[int, RatingSchedule]], dict[str, int]]:
    """The configured rate card's own schedules per plan × rating group (no tariffs), with the configured
    default-quota overrides: what a test expects a plain request to be rated with."""
    import msgspec

    card = load_ratecard(config.charging.ratecard)
    plans = compile_ratecard(card)
    overrides = {
        "bytes": config.charging.default_quota_bytes,
        "seconds": config.charging.default_quota_seconds,
        "events": config.charging.default_quota_events,
    }
    for groups in plans.values():
        for rg, schedule in list(groups.items()):
            quota = overrides.get(schedule.unit, 0)
            if quota:
                groups[rg] = msgspec.structs.replace(
                    schedule, default_quota=quota, max_quota=max(quota, schedule.max_quota)
                )
    defaults = {
        name: plan.default_rating_group
        for name, plan in card.plans.items()
        if getattr(plan, "default_rating_group", None) is not None
    }
    return plans, defaults


def default_quotas(config: Config) -> dict[str, int]:
    """The configured default-grant overrides per unit (0 = the rate card's)."""
    c = config.charging
    return {"bytes": c.default_quota_bytes, "seconds": c.default_quota_seconds, "events": c.default_quota_events}


def load_rater(config: Config) -> Rater:
    """The active rate-card versions (ocs.ratecard_store) compiled; ConfigError when they are not a card."""
    try:
        return load_active_rater(config)
    except (RateCardError, OSError) as exc:
        raise ConfigError(f"rate card: {exc}") from None


def rating_validity(rater: Rater) -> dict[str, dict[str, int]]:
    """Plan → {rating group: the longest Validity-Time any version or tariff gives it}, for the Tcc rule."""
    longest: dict[str, dict[int, RatingSchedule]] = {}
    for plan, group, schedule in rater.schedules():
        known = longest.setdefault(plan, {}).get(group)
        if known is None or max(schedule.validity_time, schedule.final_validity_time) > max(
                known.validity_time, known.final_validity_time):
            longest[plan][group] = schedule
    return validity_times(longest)


def _card_files_signature(config: Config) -> tuple:
    """What changes when a version is installed (or the configured card edited): names, sizes, mtimes."""
    signature = []
    for path in active_card_files(config):
        try:
            stat = path.stat()
        except OSError:
            signature.append((str(path), None, None))
        else:
            signature.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


class RedisHandle:
    """The Redis the server uses: the configured URL, or an embedded Valkey it starts and stops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.embedded: EmbeddedValkey | None = None
        self.url = config.redis.url

    def start(self) -> str:
        if self.url is None:
            self.embedded = EmbeddedValkey(Path(self.config.data_dir) / "valkey",
                                           port=self.config.redis.embedded_port)
            self.url = self.embedded.start()
            url_file = embedded_url_file(self.config)
            url_file.write_text(self.url)
            log.info("embedded Valkey started at %s (data in %s)", self.url, self.embedded.data_dir)
        return self.url

    def stop(self) -> None:
        if self.embedded is not None:
            embedded_url_file(self.config).unlink(missing_ok=True)
            self.embedded.stop()
            self.embedded = None


async def warn_if_unsafe(client: aioredis.Redis) -> list[str]:
    """Warn (never fail) when the Redis in use could lose or evict committed charges."""
    warnings = []
    try:
        for key, wanted in SAFE_REDIS.items():
            value = (await client.config_get(key)).get(key)
            if value is not None and value != wanted:
                warnings.append(f"Redis {key} is {value!r}, not {wanted!r}: committed charges may be lost")
    except Exception as exc:  # CONFIG may be disabled on managed services
        warnings.append(f"cannot read Redis durability settings ({exc}); make sure AOF fsync is on")
    try:
        value = (await client.config_get("hash-max-listpack-value")).get("hash-max-listpack-value")
        if value is not None and int(value) < 512:
            log.info("Redis hash-max-listpack-value is %s: open sessions take ~520 B more each than with 1024 "
                     "(the embedded Valkey's setting; see BENCHMARKS.md, memory)", value)
    except Exception:  # CONFIG may be disabled on managed services
        pass
    for warning in warnings:
        log.warning(warning)
    return warnings


class ServerApp:
    """The whole `ocs serve` process, startable from tests with a config and a clock."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.metrics = Metrics()
        self.redis = RedisHandle(config)
        self.store: BalanceStore | None = None
        self.diameter: DiameterServer | None = None
        self.credit_control: CreditControl | None = None
        self.cdr_writer = None
        self._cdr_stop = asyncio.Event()
        self._cdr_task: asyncio.Task | None = None
        self._gauge_task: asyncio.Task | None = None
        self._ratecard_task: asyncio.Task | None = None
        self._ratecard_signature: tuple = ()
        self._stopped = asyncio.Event()
        self.router: Router | None = None
        self.supervisor: Supervisor | None = None
        self.renewals = None  # ocs.catalog.RenewalSweep when charging.renewal_interval_seconds > 0
        self.billshock = None  # ocs.billshock.BillShockMonitor when notifications.enabled
        self._supervision_stop = asyncio.Event()
        self._supervision_task: asyncio.Task | None = None
        self._restarts: set[tuple[str, int]] = set()  # (peer, new Origin-State-Id) already handled
        self._tasks: set[asyncio.Task] = set()
        # time budgets of a CCR in the process, from the read of its bytes (seconds, as loop.time())
        self._queue_budget = config.overload.max_queue_ms / 1000
        self._new_sessions_queue_budget = config.overload.new_sessions_max_queue_ms / 1000
        # a charged CCR's time from the read of its bytes to its answer (moving average) and when the last was
        # answered (loop time)
        self._answer_seconds = 0.0
        self._answered_at = float("-inf")
        # set by an `ocs serve --workers N` worker (ocs.workers): share the port, one Origin-State-Id for all
        self.reuse_port = False
        self.origin_state_id: int | None = None

    @property
    def port(self) -> int:
        assert self.diameter is not None
        return self.diameter.port

    async def start(self) -> None:
        url = self.redis.start()
        self.store = await BalanceStore.connect(url, partitions=self.config.redis.partitions,
                                                call_timeout=self.config.redis.call_timeout_ms / 1000,
                                                cluster=self.config.redis.cluster)
        for client in await self.store.primary_clients():  # every primary of a cluster
            await warn_if_unsafe(client)
        self._ratecard_signature = _card_files_signature(self.config)
        rater = load_rater(self.config)
        d = self.config.diameter
        self.credit_control = CreditControl(
            origin_host=d.origin_host,
            origin_realm=d.origin_realm,
            store=self.store,
            rater=rater,
            default_quotas=default_quotas(self.config),
            charging_horizon=self.config.charging.charging_horizon_seconds,
            clock=self.clock,
            metrics=self.metrics,
            unknown_session_termination_result=d.unknown_session_termination_result,
            cc_session_failover=1 if d.cc_session_failover else None,
            accept_unknown_service_context=self.config.charging.accept_unknown_service_context,
            failure_handling=self.config.failure_handling,
        )
        self.supervisor = Supervisor(self.store, self.clock, self.config.charging, rating_validity(rater),
                                     self.metrics)
        self._ratecard_task = asyncio.get_running_loop().create_task(self._reload_ratecards())
        settings = PeerSettings(
            origin_host=d.origin_host,
            origin_realm=d.origin_realm,
            host_ip_addresses=tuple(d.host_ip_addresses),
            vendor_id=d.vendor_id,
            product_name=d.product_name,
            origin_state_id=self.origin_state_id if self.origin_state_id is not None
            else self.clock.now_ms() // 1000 & 0xFFFFFFFF,
            advertise_vendor_specific_application=d.advertise_vendor_specific_application,
            allowed_peers=tuple(d.allowed_peers) if d.allowed_peers is not None else None,
            watchdog_seconds=d.watchdog_seconds,
            max_message_length=d.max_message_length,
            application_commands={4: frozenset({CCR})},
            unknown_mandatory_vendor_allowlist=frozenset(d.unknown_mandatory_vendor_allowlist),
        )
        self.diameter = DiameterServer(settings, self)
        await self.diameter.start(d.listen_host, d.port, reuse_port=self.reuse_port)
        self.router = Router(self.store, origin_host=d.origin_host, origin_realm=d.origin_realm,
                             peers=lambda: self.diameter.peers if self.diameter is not None else [],
                             clock=self.clock, lease_seconds=d.peer_lease_seconds,
                             answer_timeout=d.answer_timeout_seconds, on_peer_restart=self._peer_restarted,
                             metrics=self.metrics)
        self.router.start()
        self._supervision_task = asyncio.get_running_loop().create_task(
            self.supervisor.run(self._supervision_stop))
        if self.config.cdr.enabled:
            self._start_cdr_writer()
        if self.config.metrics.port:
            self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
        self._gauge_task = asyncio.get_running_loop().create_task(self._update_gauges())
        if self.config.charging.renewal_interval_seconds > 0:
            from ocs.catalog import RenewalSweep

            # catalog plans' periods: fee + allowances; any number of processes may sweep (renewed once)
            self.renewals = RenewalSweep(self.store, self.clock, self.config.charging.renewal_interval_seconds,
                                         on_renewed=self.subscriber_changed)
            self.renewals.start()
        if self.config.notifications.enabled:
            from ocs.billshock import BillShockMonitor

            # bill-shock notifications from the ledger (each once) and their webhook; any number of processes
            self.billshock = BillShockMonitor(self.store, self.config.notifications, clock=self.clock)
            self.billshock.start()
        log.info("listening for Diameter on %s:%d as %s", d.listen_host, self.port, d.origin_host)

    def _start_cdr_writer(self) -> None:
        from ocs.cdr_writer import CdrWriter

        assert self.store is not None
        self.cdr_writer = CdrWriter(
            self.store.redis,
            self.config.cdr_directory,
            range(self.store.partitions),
            owner=f"{os.uname().nodename}:{os.getpid()}",
            rotate_records=self.config.cdr.rotate_records,
            rotate_seconds=self.config.cdr.rotate_seconds,
            lease_ms=self.config.cdr.lease_ms,
        )
        self._cdr_task = asyncio.get_running_loop().create_task(self.cdr_writer.run(self._cdr_stop))

    async def _reload_ratecards(self) -> None:
        """Hot reload: every charging.ratecard_reload_seconds, when the active version files changed, compile
        them again and rate with them from the next request on (a version installed with `ocs ratecard load`
        takes effect at least one interval later, so every process has it in time). A card that does not
        compile is logged and the one in use kept."""
        while True:
            await asyncio.sleep(self.config.charging.ratecard_reload_seconds)
            try:
                signature = await asyncio.to_thread(_card_files_signature, self.config)
                if signature == self._ratecard_signature:
                    continue
                self._ratecard_signature = signature  # a card that fails is reported once, not every interval
                rater = await asyncio.to_thread(load_rater, self.config)
            except Exception as exc:
                log.error("rate card reload failed, still rating with the previous one: %s", exc)
                continue
            if self.credit_control is not None:
                self.credit_control.set_rater(rater)
            if self.supervisor is not None:
                self.supervisor.set_validity(rating_validity(rater))
            log.info("rate card reloaded: versions %s", ", ".join(card.version for card in rater.cards))

    async def _update_gauges(self) -> None:
        assert self.store is not None
        while True:
            try:
                self.metrics.open_sessions.set(await self.store.count_open_sessions())
                if self.diameter is not None:
                    self.metrics.peers.set(len(self.diameter.peers))
            except Exception as exc:
                log.debug("gauge update failed: %s", exc)
            await asyncio.sleep(5)

    async def stop(self) -> None:
        """Graceful stop: DPR to every peer, finish in-flight requests, flush CDRs, stop Redis if ours."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._supervision_stop.set()
        if self._supervision_task is not None:
            await asyncio.gather(self._supervision_task, return_exceptions=True)
        if self.diameter is not None:
            await self.diameter.shutdown()
        if self.router is not None:
            await self.router.stop()
        if self._tasks:  # a restarted peer's sessions being closed: let it finish, within bounds
            await asyncio.wait(list(self._tasks), timeout=10)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._gauge_task is not None:
            self._gauge_task.cancel()
        if self.renewals is not None:
            await self.renewals.stop()
        if self.billshock is not None:
            await self.billshock.stop()
        if self._ratecard_task is not None:
            self._ratecard_task.cancel()
        if self._cdr_task is not None:
            self._cdr_stop.set()
            try:
                await asyncio.wait_for(self._cdr_task, timeout=30)
            except Exception as exc:
                log.error("CDR writer did not stop cleanly: %s", exc)
        if self.store is not None:
            await self.store.close()
        self.redis.stop()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await self.start()
        except BaseException:
            await self.stop()  # whatever did start (the embedded Valkey, the listener) stops again
            raise
        try:
            await stop_requested.wait()
            log.info("stopping: DPR to peers, finishing requests in flight, flushing CDRs")
        finally:
            await self.stop()

    # ---- server-initiated messages ------------------------------------------------------------------------

    async def reauth(self, session_id: str) -> ServerRequestResult:
        """RAR for one session, sent on whichever process holds its gateway's connection."""
        assert self.router is not None
        return await self.router.request(REAUTH, session_id)

    async def abort(self, session_id: str) -> ServerRequestResult:
        """ASR for one session; the session stays open until the gateway's CCR-T (or is closed on ASA 5002)."""
        assert self.router is not None
        return await self.router.request(ABORT, session_id)

    async def subscriber_changed(self, msisdn: str) -> list[ServerRequestResult]:
        """The hook after a top-up or a plan change: RAR to every open session of the subscriber."""
        assert self.store is not None and self.router is not None
        return await reauth_subscriber(self.store, msisdn, self.config.diameter.answer_timeout_seconds,
                                       self.router)

    def _spawn(self, awaitable) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _peer_restarted(self, origin_host: str, state_id: int, opened_ms: int) -> None:
        """Closes the sessions a restarted peer had before it reconnected (once per new Origin-State-Id)."""
        key = (origin_host.lower(), state_id)
        if key in self._restarts or self.supervisor is None:
            return
        self._restarts.add(key)
        self._spawn(self.supervisor.close_peer_sessions(origin_host, opened_ms))

    # ---- protocol.transport.RequestHandler ------------------------------------------------------------

    def peer_opened(self, peer, event) -> None:
        log.info("peer %s (%s) open", event.origin_host, peer.remote_address)
        if self.router is not None:
            self.router.peer_opened(peer, event.origin_state_id)

    def peer_closed(self, peer) -> None:
        log.info("peer %s closed", getattr(peer, "origin_host", None))
        if self.router is not None:
            self.router.peer_closed(peer)

    def peer_restarted(self, peer, event) -> None:
        log.info("peer %s restarted (Origin-State-Id %s → %s)", event.origin_host, event.old_state_id,
                 event.new_state_id)
        self._peer_restarted(event.origin_host, event.new_state_id, self.clock.now_ms())

    def handle_answer(self, peer, message: Message) -> None:
        log.info("late answer (command %d, %s) from %s ignored", message.command_code, message.session_id,
                 peer.origin_host)

    def handle_request(self, peer, message: Message):
        """A CCR: answered 3004 at once when too many are in flight or the CCRs answered just before took too
        long in the process (new sessions first), else charged once the loop gets to it, unless it waited too
        long by then."""
        assert self.credit_control is not None and self.diameter is not None
        in_flight = self.diameter.in_flight - 1  # the transport counts this request already
        overload = self.config.overload
        if in_flight >= overload.new_sessions_max_in_flight:
            request_type = message.get("CC-Request-Type")
            if in_flight >= overload.max_in_flight or request_type in (INITIAL, EVENT):
                return self._too_busy(peer, message, request_type, "too many requests in flight")
        received_at = peer.received_at
        # The CCRs answered lately took this long in the process on average (waiting for the loop, a pipeline
        # slot, Valkey): one joining the requests in flight now would too. Not with nothing in flight (no queue
        # to join), nor when the measure is older than the budget (all was shed since: let some through).
        answer_time = self._answer_seconds
        if (answer_time > self._new_sessions_queue_budget and in_flight
                and received_at - self._answered_at < self._queue_budget):
            request_type = message.get("CC-Request-Type")
            if answer_time > self._queue_budget or request_type in (INITIAL, EVENT):
                return self._too_busy(peer, message, request_type, "answers take too long")
        return self._answer_in_time(peer, message, received_at)

    async def _answer_in_time(self, peer, message: Message, received_at: float) -> bytes:
        """Runs when the event loop gets to the request, after every callback queued before it: one that
        waited past its budget since its bytes were read is answered 3004 without a Redis call (new sessions
        and events at the lower budget). The time of each answer in the process is kept for the next ones."""
        assert self.credit_control is not None and self.diameter is not None
        loop = self.diameter.loop
        waited = loop.time() - received_at
        if waited > self._new_sessions_queue_budget:
            request_type = message.get("CC-Request-Type")
            if waited > self._queue_budget or request_type in (INITIAL, EVENT):
                return self._too_busy(peer, message, request_type, "request waited too long in the queue")
        answer = await self.credit_control.answer(message, peer.origin_host)
        self._answered_at = now = loop.time()
        change = now - received_at - self._answer_seconds
        self._answer_seconds += change * (ANSWER_TIME_RISE if change > 0 else ANSWER_TIME_FALL)
        return answer

    def _too_busy(self, peer, message: Message, request_type: int | None, reason: str) -> bytes:
        """The shed answer: the generic E-bit answer (RFC 6733 §7.2) with 3004, built from the header and the
        AVPs the peer layer echoes; nothing of the CCR is decoded beyond CC-Request-Type."""
        self.metrics.shed.labels(REQUEST_TYPES.get(request_type, "unknown")).inc()
        self.metrics.observe_answer(request_type, TOO_BUSY)
        return peer.connection.build_error_answer(message, TOO_BUSY, error_message=reason)
