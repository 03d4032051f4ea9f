"""The Gy load generator: a `Scenario` in, a report out, correctness checked on every answer.

It speaks only standard Diameter (CER/CEA, DWR/DWA, DPR/DPA, CCR/CCA, RAR/RAA, ASR/ASA on application 4),
so it can be pointed at any OCS. Imports protocol/ for the codec and framing; never ocs/, balances/ or
ratecards/.

Theory of operation. `LoadRun.run()` opens `[gateways].connections` TCP connections, each a gateway with its
own Origin-Host (CER first; DWR and DPR from the server are answered; DPR is sent at the end). A ticker
starts sessions: in the open loop at `sessions_per_second` × the phase's level whatever the answers do, in
the closed loop whenever fewer than `in_flight` × level sessions run. A data session sends CCR-I, its
updates and CCR-T, each request when the previous answer is in and its time has come (`session_seconds`
spread evenly, or sooner when a Validity-Time says so); an event is one CCR-Event (DIRECT_DEBITING). No
coroutine or Task per request: sessions are small state machines driven by the answers, requests of one
loop tick leave in one write, and one sweeper expires the requests older than the timeout.

Phases: warm-up (level `warmup_level`) → ramp (linear up to 1) → steady (measured: requests/s and latency
come from it) → drain (no new session; every open session ends with CCR-T, except the abandoned ones). A
stepped run (`[phases].steps`) has one measured phase per step instead of ramp and steady, each at its own
rate, and a `steps` table in the report (offered, sent/s, answered/s, 2001/s, 3004 share, latency): the knee.
Latency runs from the write of the request to the read of its answer, so it excludes our own queueing
before the write and includes the OCS, the network stack and our read.

Correctness checked on every answer (a failure counts as a mismatch of that kind, never stops the run):
the answer matches its request (hop-by-hop, Session-Id, CC-Request-Type and -Number), a 2001 answer has one
MSCC per MSCC asked with the same rating groups, a 2001 MSCC that asked for units carries a grant (or
Final-Unit-Indication), an event is never granted more than it asked, a session never reports more than it
was granted, and a retransmission (T flag) gets the same answer as its original. Counts add up: every
request sent is answered, timed out, or lost with its connection (`errors`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from protocol.codec import DecodeError, Message, decode_message, encode_answer, encode_avp, encode_message
from protocol.framing import FramingError, ReceiveBuffer
from simulators.histogram import LatencyHistogram
from simulators.scenario import Scenario

__all__ = ["LoadRun", "run_scenario"]

CER, RAR, ASR, CCR, DWR, DPR = 257, 258, 274, 272, 280, 282
APP_CC = 4
FLAG_REQUEST, FLAG_PROXIABLE, FLAG_ERROR, FLAG_RETRANSMIT = 0x80, 0x40, 0x20, 0x10
INITIAL, UPDATE, TERMINATION, EVENT = 1, 2, 3, 4
SUCCESS = 2001
CREDIT_CONTROL_NOT_APPLICABLE = 4011
REQUEST_TYPE_NAMES = {INITIAL: "initial", UPDATE: "update", TERMINATION: "termination", EVENT: "event"}
PHASES = ("warmup", "ramp", "steady", "drain")
_EXPIRED_MEMORY = 100_000  # timed-out hop-by-hops remembered per gateway, to tell late answers apart


class Pending:
    """One request on the wire: who sent it, what it asked, when it left."""

    __slots__ = ("session", "request_type", "number", "phase", "sent_ns", "rgs", "asked", "units", "gateway",
                 "hop", "copy_of", "copy", "summary")

    def __init__(self, session: Any, request_type: int, number: int, phase: str, rgs: tuple[int, ...],
                 asked: tuple[bool, ...], units: int) -> None:
        self.session = session
        self.request_type = request_type
        self.number = number
        self.phase = phase
        self.sent_ns = 0  # set when the frame is written
        self.rgs = rgs  # rating group of each MSCC sent, in order
        self.asked = asked  # whether that MSCC asked for units (RSU)
        self.units = units  # event: CC-Service-Specific-Units asked
        self.gateway: Gateway | None = None
        self.hop = 0
        self.copy_of: Pending | None = None  # set on a T-flag retransmission: the request it repeats
        self.copy: Pending | None = None  # set on an original that was retransmitted
        self.summary: tuple | None = None  # what its answer said, to compare original and copy


class Gateway(asyncio.Protocol):
    """One client connection with its own Origin-Host: CER, requests out, answers matched by hop-by-hop."""

    def __init__(self, run: LoadRun, index: int, origin_host: str) -> None:
        self.run = run
        self.index = index
        self.origin_host = origin_host
        self.origin_realm = run.scenario.gateways.origin_realm
        self.transport: asyncio.Transport | None = None
        self.buffer = ReceiveBuffer(max_message_length=1 << 20)
        self.pending: dict[int, Pending] = {}
        self.control: dict[int, asyncio.Future[Message]] = {}  # CER / DPR of ours
        self.expired: set[int] = set()
        self.lost = False
        self._out: list[bytes] = []
        self._out_pending: list[Pending] = []
        self._flush_scheduled = False
        self._hop = itertools.count(int.from_bytes(os.urandom(3), "big") << 8)
        self._e2e = itertools.count(((int(time.time()) & 0xFFF) << 20) | (index << 12))
        target = run.scenario.target
        common = [("Origin-Host", origin_host), ("Origin-Realm", self.origin_realm),
                  ("Destination-Realm", target.destination_realm), ("Auth-Application-Id", APP_CC)]
        tail = encode_avp("Destination-Host", target.destination_host) if target.destination_host else b""
        # everything after Session-Id that never changes on this connection, pre-encoded once
        self.data_header = b"".join(encode_avp(n, v) for n, v in common) + encode_avp(
            "Service-Context-Id", target.service_context_id)
        self.event_header = b"".join(encode_avp(n, v) for n, v in common) + encode_avp(
            "Service-Context-Id", target.event_service_context_id)
        self.tail = tail

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for future in self.control.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self.control.clear()
        pending, self.pending = self.pending, {}
        self._out_pending.clear()
        for request in pending.values():
            self.run.on_lost(request)
        self.run.on_connection_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        now_ns = time.perf_counter_ns()
        try:
            self.buffer.feed(data)
            while (frame := self.buffer.next_frame()) is not None:
                self._frame(frame, now_ns)
        except FramingError as exc:
            self.run.note_error(f"broken framing from the server: {exc.message}")
            if self.transport is not None:
                self.transport.abort()

    def _frame(self, frame: bytes, now_ns: int) -> None:
        flags, hop = frame[4], int.from_bytes(frame[12:16], "big")
        if flags & FLAG_REQUEST:
            self._server_request(frame)
            return
        control = self.control.pop(hop, None)
        request = self.pending.pop(hop, None) if control is None else None
        try:
            message = decode_message(frame)
        except DecodeError as exc:
            if control is not None and not control.done():
                control.set_exception(ConnectionError(f"undecodable answer: {exc.message}"))
            elif request is not None:
                self.run.on_undecodable(request, exc.message)
            return
        if control is not None:
            if not control.done():
                control.set_result(message)
        elif request is not None:
            self.run.on_answer(request, message, now_ns - request.sent_ns)
        elif hop in self.expired:
            self.expired.discard(hop)
            self.run.late_answers += 1
        else:
            self.run.mismatch("answer with an unknown hop-by-hop")

    def _server_request(self, frame: bytes) -> None:
        try:
            message = decode_message(frame)
        except DecodeError as exc:
            self.run.note_error(f"undecodable request from the server: {exc.message}")
            return
        command = message.command_code
        self.run.server_requests[_COMMAND_NAMES.get(command, str(command))] += 1
        identity = [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm)]
        if command in (DWR, DPR):
            self.write(encode_answer(message, [("Result-Code", SUCCESS), *identity]))
        elif command in (RAR, ASR):
            session_id = message.session_id
            self.write(encode_answer(message, [("Session-Id", session_id or ""), ("Result-Code", SUCCESS),
                                               *identity]))
            self.run.on_server_session_request(command, session_id)
        else:
            self.write(encode_answer(message, [("Result-Code", 3001), *identity], error=True))

    # ---------------------------------------------------------------- sending

    def write(self, frame: bytes, request: Pending | None = None) -> None:
        """Queue a frame; everything queued in one loop tick leaves in one write."""
        self._out.append(frame)
        if request is not None:
            self._out_pending.append(request)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.lost or self.transport is None or not self._out:
            self._out.clear()
            return
        data = b"".join(self._out)
        self._out.clear()
        now_ns = time.perf_counter_ns()
        for request in self._out_pending:
            request.sent_ns = now_ns
        self._out_pending.clear()
        self.transport.write(data)

    def next_ids(self) -> tuple[int, int]:
        return next(self._hop) & 0xFFFFFFFF, next(self._e2e) & 0xFFFFFFFF

    def send(self, request: Pending, avps: list, end_to_end: int | None = None) -> bytes:
        hop, e2e = self.next_ids()
        frame = encode_message(CCR, APP_CC, FLAG_REQUEST | FLAG_PROXIABLE, hop, e2e if end_to_end is None
                               else end_to_end, avps)
        self.send_frame(request, frame, hop)
        return frame

    def send_frame(self, request: Pending, frame: bytes, hop: int) -> None:
        request.gateway = self
        request.hop = hop
        request.sent_ns = time.perf_counter_ns()  # replaced by the write time at flush
        self.pending[hop] = request
        self.write(frame, request)

    def send_copy(self, original: Pending, frame: bytes) -> Pending:
        """The same request again with the T flag (RFC 6733 §3): new hop-by-hop, same end-to-end id."""
        copy = Pending(original.session, original.request_type, original.number, original.phase, original.rgs,
                       original.asked, original.units)
        copy.copy_of = original
        original.copy = copy
        hop = next(self._hop) & 0xFFFFFFFF
        retransmitted = bytearray(frame)
        retransmitted[4] |= FLAG_RETRANSMIT
        retransmitted[12:16] = hop.to_bytes(4, "big")
        self.send_frame(copy, bytes(retransmitted), hop)
        return copy

    async def control_request(self, command: int, avps: list, timeout: float) -> Message:
        hop, e2e = self.next_ids()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.control[hop] = future
        self.write(encode_message(command, 0, FLAG_REQUEST, hop, e2e, avps))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.control.pop(hop, None)

    def expire(self, cutoff_ns: int) -> list[Pending]:
        """Remove and return the requests written before cutoff (dict order is send order)."""
        expired: list[Pending] = []
        for request in self.pending.values():
            if request.sent_ns > cutoff_ns:
                break
            expired.append(request)
        for request in expired:
            del self.pending[request.hop]
            if len(self.expired) < _EXPIRED_MEMORY:
                self.expired.add(request.hop)
        return expired


#: what the simulator reads from one answer MSCC: rating group, result code, granted units, the unit AVP they
#: came in, Final-Unit-Indication present, Validity-Time
MsccRead = tuple[int | None, int | None, int | None, str, bool, float | None]
# the unit AVPs a grant is read from, by "is it an event": data/voice sessions, SMS events
_GRANT_UNITS = {False: ("CC-Total-Octets", "CC-Time", "CC-Service-Specific-Units"),
                True: ("CC-Service-Specific-Units", "CC-Total-Octets", "CC-Time")}
_COMMAND_NAMES = {DWR: "DWR", DPR: "DPR", RAR: "RAR", ASR: "ASR", CER: "CER"}


def ps_information(msisdn: str, number: int) -> bytes:
    """Service-Information/PS-Information as a PGW sends it (TS 32.299 §7.2.158), fixed for one session."""
    return encode_avp("Service-Information", [("PS-Information", [
        ("3GPP-Charging-Id", (number & 0xFFFFFFFF).to_bytes(4, "big")),
        ("3GPP-PDP-Type", 0),
        ("PDP-Address", f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"),
        ("3GPP-GPRS-Negotiated-QoS-Profile", "08-4406000186A0000186A0"),
        ("SGSN-Address", "192.0.2.11"),
        ("GGSN-Address", "192.0.2.64"),
        ("3GPP-IMSI-MCC-MNC", "26201"),
        ("3GPP-GGSN-MCC-MNC", "26201"),
        ("3GPP-NSAPI", b"5"),
        ("Called-Station-Id", "internet"),
        ("3GPP-Selection-Mode", "0"),
        ("3GPP-Charging-Characteristics", "0400"),
        ("3GPP-SGSN-MCC-MNC", "26201"),
        ("3GPP-User-Location-Info", bytes.fromhex("8262f210a0b162f21000ab1c02")),
        ("3GPP-RAT-Type", b"\x06"),
        ("3GPP-MS-TimeZone", b"\x40\x00"),
    ])])


class DataSession:
    """One data session (CCR-I, updates, CCR-T) over one gateway; driven by its answers."""

    __slots__ = ("run", "gateway", "session_id", "msisdn", "rgs", "number", "updates_left", "interval",
                 "abandon", "grants", "final", "closed", "granted_total", "reported_total", "timer",
                 "waiting", "ending", "done", "header", "subscription", "validity", "unit", "service_information")

    def __init__(self, run: LoadRun, gateway: Gateway, session_id: str, msisdn: str, rgs: tuple[int, ...],
                 updates: int, interval: float, abandon: bool) -> None:
        self.run = run
        self.gateway = gateway
        self.session_id = session_id
        self.msisdn = msisdn
        self.rgs = rgs
        self.number = 0
        self.updates_left = updates
        self.interval = interval
        self.abandon = abandon
        self.grants = dict.fromkeys(rgs, 0)  # units granted and not yet reported, per rating group
        self.unit = dict.fromkeys(rgs, "CC-Total-Octets")  # the unit AVP of the last grant, reported back
        self.final: set[int] = set()  # rating groups on their final units (FUI): report once more, ask no more
        self.closed: set[int] = set()  # rating groups the OCS refused (4012, 5031, 4011…): left alone
        self.granted_total = dict.fromkeys(rgs, 0)
        self.reported_total = dict.fromkeys(rgs, 0)
        self.timer: asyncio.TimerHandle | None = None
        self.waiting = False
        self.ending = False
        self.done = False
        self.header = encode_avp("Session-Id", session_id)
        self.subscription = encode_avp("Subscription-Id", [("Subscription-Id-Type", 0),
                                                           ("Subscription-Id-Data", msisdn)])
        self.service_information = (ps_information(msisdn, run.started_sessions)
                                    if run.scenario.traffic.ps_information else b"")
        self.validity: float | None = None

    def start(self) -> None:
        self._send(INITIAL)

    def _send(self, request_type: int) -> None:
        self.timer = None
        traffic = self.run.scenario.traffic
        gateway = self.gateway
        if gateway.lost:
            self.run.session_over(self, "failed")
            return
        avps: list = [self.header, gateway.data_header, ("CC-Request-Type", request_type),
                      ("CC-Request-Number", self.number)]
        if gateway.tail:
            avps.append(gateway.tail)
        if request_type == INITIAL:
            avps.append(self.subscription)
            avps.append(("Multiple-Services-Indicator", 1))
        rgs: list[int] = []
        asked: list[bool] = []
        rsu = [("CC-Total-Octets", traffic.requested_octets)] if traffic.requested_octets else []
        for rg in self.rgs:
            if rg in self.closed:
                continue
            mscc: list = []
            ask = request_type != TERMINATION and rg not in self.final
            if ask:
                mscc.append(("Requested-Service-Unit", rsu))
            if request_type != INITIAL:
                unit = self.unit[rg]
                planned = traffic.used_seconds if unit == "CC-Time" else traffic.used_octets
                used = min(planned, self.grants[rg])
                self.grants[rg] = 0
                self.reported_total[rg] += used
                if self.reported_total[rg] > self.granted_total[rg]:
                    self.run.mismatch("session reported more than it was granted")
                mscc.append(("Used-Service-Unit", [(unit, used)]))
            if rg in self.final:
                self.closed.add(rg)  # its last report: nothing more is asked for it
            mscc.append(("Rating-Group", rg))
            avps.append(("Multiple-Services-Credit-Control", mscc))
            rgs.append(rg)
            asked.append(ask)
        if self.service_information:
            avps.append(self.service_information)
        request = Pending(self, request_type, self.number, self.run.phase, tuple(rgs), tuple(asked), 0)
        self.waiting = True
        self.run.send(request, gateway, avps)

    def on_answer(self, request: Pending, result_code: int | None, msccs: list[MsccRead]) -> None:
        self.waiting = False
        if self.done:
            return
        run = self.run
        if request.request_type == TERMINATION:
            run.session_over(self, "completed")
            return
        if result_code != SUCCESS:
            run.session_over(self, "rejected")  # e.g. 5030 unknown user, 4012 no credit at all, 3004 busy
            return
        validity: float | None = None
        for rg, mscc_code, granted, unit, fui, valid in msccs:
            if rg not in self.grants:
                continue  # a rating group we did not ask for: already counted as a mismatch
            if granted is not None:
                self.grants[rg] = granted
                self.granted_total[rg] += granted
                self.unit[rg] = unit
            if mscc_code is not None and mscc_code != SUCCESS:
                self.closed.add(rg)
            elif fui:
                self.final.add(rg)
            if valid is not None and (validity is None or valid < validity):
                validity = valid
        self.number += 1
        self.validity = validity
        self._next()

    def _next(self) -> None:
        if self.ending:
            self._finish()
            return
        live = [rg for rg in self.rgs if rg not in self.closed]
        if self.updates_left > 0 and live:
            self.updates_left -= 1
            self._schedule(UPDATE)
        else:
            self._schedule(TERMINATION)

    def _schedule(self, request_type: int) -> None:
        if request_type == TERMINATION and self.abandon:
            self.run.session_over(self, "abandoned")
            return
        delay = self.interval
        if self.validity is not None and self.run.scenario.traffic.honour_validity_time:
            delay = min(delay, self.validity)
        if delay <= 0:
            self._send(request_type)
        else:
            self.timer = asyncio.get_running_loop().call_later(delay, self._send, request_type)

    def end_now(self) -> None:
        """Drain: end at once (CCR-T now if idle, after the answer if one is awaited)."""
        self.ending = True
        if self.waiting or self.done:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._finish()

    def _finish(self) -> None:
        if self.abandon:
            self.run.session_over(self, "abandoned")
        else:
            self._send(TERMINATION)

    def reauthorize(self) -> None:
        """RAR from the OCS: report and ask again now (RFC 4006 §5.5)."""
        if self.done or self.waiting or self.ending:
            return
        if self.timer is not None:
            self.timer.cancel()
        self._send(UPDATE)

    def abort(self) -> None:
        """ASR from the OCS: end the session (CCR-T) at once."""
        self.abandon = False
        self.end_now()

    def on_failure(self) -> None:
        self.waiting = False
        self.run.session_over(self, "failed")


class EventSession:
    """One SMS: a single CCR-Event with Requested-Action DIRECT_DEBITING."""

    __slots__ = ("run", "gateway", "session_id", "msisdn", "done", "ending")

    def __init__(self, run: LoadRun, gateway: Gateway, session_id: str, msisdn: str) -> None:
        self.run = run
        self.gateway = gateway
        self.session_id = session_id
        self.msisdn = msisdn
        self.done = False
        self.ending = False

    def start(self) -> None:
        traffic = self.run.scenario.traffic
        gateway = self.gateway
        rg = traffic.event_rating_group
        avps: list = [
            encode_avp("Session-Id", self.session_id), gateway.event_header, ("CC-Request-Type", EVENT),
            ("CC-Request-Number", 0),
        ]
        if gateway.tail:
            avps.append(gateway.tail)
        avps += [
            ("Requested-Action", 0),
            ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", self.msisdn)]),
            ("Multiple-Services-Credit-Control", [
                ("Requested-Service-Unit", [("CC-Service-Specific-Units", traffic.event_units)]),
                ("Rating-Group", rg)]),
        ]
        request = Pending(self, EVENT, 0, self.run.phase, (rg,), (True,), traffic.event_units)
        self.run.send(request, gateway, avps)

    def on_answer(self, request: Pending, result_code: int | None, msccs: list[MsccRead]) -> None:
        if result_code == SUCCESS:
            for _rg, _code, granted, _unit, _fui, _valid in msccs:
                if granted is not None and granted > request.units:
                    self.run.mismatch("event granted more units than it asked")
                elif granted:
                    self.run.events_granted += granted
        self.run.session_over(self, "completed" if result_code == SUCCESS else "rejected")

    def end_now(self) -> None:
        self.ending = True

    def on_failure(self) -> None:
        self.run.session_over(self, "failed")


class PhaseStats:
    """What happened to the requests sent during one phase (answers are counted in the phase of their request)."""

    __slots__ = ("name", "started", "ended", "histogram", "answers", "sent", "results", "timeouts")

    def __init__(self, name: str) -> None:
        self.name = name
        self.started: float | None = None
        self.ended: float | None = None
        self.histogram = LatencyHistogram()
        self.answers = 0
        self.sent = 0
        self.results: Counter[str] = Counter()
        self.timeouts = 0

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started


class LoadRun:
    """One run of a scenario. `await run()` returns the report (a dict, JSON-ready)."""

    def __init__(self, scenario: Scenario, *, on_tick: Callable[[dict], None] | None = None,
                 tick_seconds: float = 1.0) -> None:
        self.scenario = scenario
        self.on_tick = on_tick
        self.tick_seconds = tick_seconds
        # two streams, so that the sessions drawn do not depend on how the answers interleave with
        # the retransmission draws: the same seed starts the same sessions in the same order
        self.rng = random.Random(scenario.traffic.seed)
        self.wire_rng = random.Random(scenario.traffic.seed + 1)
        self.population = scenario.subscribers.population()
        self.gateways: list[Gateway] = []
        self.phase = "warmup"
        steps = scenario.phases.steps
        #: the phases between warm-up and drain, in order: ramp and steady, or one per step of a stepped run
        self.measured = [f"step{n}" for n in range(1, len(steps) + 1)] if steps else ["ramp", "steady"]
        self.phases = {name: PhaseStats(name) for name in ("warmup", *self.measured, "drain")}
        self.results: Counter[str] = Counter()
        self.mscc_results: Counter[str] = Counter()
        self.mismatches: Counter[str] = Counter()
        self.error_kinds: Counter[str] = Counter()
        self.server_requests: Counter[str] = Counter()
        self.sessions: Counter[str] = Counter()
        self.sent_by_type: Counter[str] = Counter()
        self.sent = 0
        self.answered = 0
        self.timeouts = 0
        self.errors = 0
        self.late_answers = 0
        self.retransmissions = 0
        self.duplicates = 0
        self.events_granted = 0
        self.reported_octets: Counter[int] = Counter()
        self.active: dict[str, DataSession | EventSession] = {}
        self.started_sessions = 0
        self.series: list[dict[str, float]] = []
        self._interval = LatencyHistogram()
        self._interval_answers = 0
        # Validity-Time only matters when requests are spaced out; otherwise it is not even read
        self._want_validity = scenario.traffic.honour_validity_time and scenario.traffic.session_seconds > 0
        self._accepting = False
        self._arrival_credit = 0.0
        self._run_token = f"{int(time.time())}{os.getpid() % 1000:03d}"
        self._session_numbers = itertools.count(1)
        self._quiet: asyncio.Event | None = None
        self._stopping = False
        self._t0 = 0.0
        self._last_tick = 0.0
        self.connection_errors: list[str] = []

    # ---------------------------------------------------------------- the run

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._quiet = asyncio.Event()
        try:
            await self._connect()
        except BaseException:
            for gateway in self.gateways:
                if gateway.transport is not None:
                    gateway.transport.close()
            raise
        s = self.scenario
        p = s.phases
        started = time.perf_counter()
        self._t0 = loop.time()
        ends = {"warmup": p.warmup_seconds}
        if p.steps:
            for n, name in enumerate(self.measured, start=1):
                ends[name] = p.warmup_seconds + n * p.step_seconds
        else:
            ends["ramp"] = p.warmup_seconds + p.ramp_seconds
            ends["steady"] = ends["ramp"] + p.steady_seconds
        self._accepting = True
        tickers = [loop.create_task(self._arrivals(ends)), loop.create_task(self._sweeper()),
                   loop.create_task(self._ticker())]
        try:
            for name in ("warmup", *self.measured):
                stats = self.phases[name]
                stats.started = time.perf_counter()
                self.phase = name
                deadline = self._t0 + ends[name]
                while loop.time() < deadline and not self._finished_early():
                    await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
                stats.ended = time.perf_counter()
            await self._drain()
        finally:
            self._accepting = False
            for task in tickers:
                task.cancel()
            await asyncio.gather(*tickers, return_exceptions=True)
            await self._disconnect()
        self._tick()  # the last partial interval
        return self.report(time.perf_counter() - started)

    def _finished_early(self) -> bool:
        """With max_sessions, the run ends as soon as every session is over."""
        limit = self.scenario.phases.max_sessions
        return bool(limit) and self.started_sessions >= limit and not self.active and not self._in_flight()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.scenario
        for index in range(s.gateways.connections):
            origin_host = s.gateways.origin_host.format(n=index + 1)
            _, gateway = await loop.create_connection(lambda i=index, h=origin_host: Gateway(self, i, h),
                                                      s.target.host, s.target.port)
            cea = await gateway.control_request(CER, [
                ("Origin-Host", origin_host), ("Origin-Realm", s.gateways.origin_realm),
                ("Host-IP-Address", "127.0.0.1"), ("Vendor-Id", 0), ("Product-Name", "ocs-simulator"),
                ("Origin-State-Id", int(time.time()) & 0xFFFFFFFF), ("Supported-Vendor-Id", 10415),
                ("Auth-Application-Id", APP_CC)], timeout=10.0)
            if cea.get("Result-Code") != SUCCESS:
                raise ConnectionError(f"{origin_host}: CER answered {cea.get('Result-Code')}")
            self.gateways.append(gateway)

    async def _disconnect(self) -> None:
        async def one(gateway: Gateway) -> None:
            if gateway.lost:
                return
            try:
                await gateway.control_request(DPR, [
                    ("Origin-Host", gateway.origin_host), ("Origin-Realm", gateway.origin_realm),
                    ("Disconnect-Cause", 0)], timeout=2.0)
            except (TimeoutError, ConnectionError):
                pass
            if gateway.transport is not None:
                gateway.transport.close()

        self._stopping = True
        await asyncio.gather(*(one(g) for g in self.gateways))

    async def _drain(self) -> None:
        self.phase = "drain"
        drain = self.phases["drain"]
        drain.started = time.perf_counter()
        self._accepting = False
        for session in list(self.active.values()):
            session.end_now()
        assert self._quiet is not None
        deadline = asyncio.get_running_loop().time() + self.scenario.phases.drain_seconds
        while self.active or self._in_flight():
            self._quiet.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._quiet.wait(), min(remaining, 0.2))
            except TimeoutError:
                pass
        for gateway in self.gateways:  # still unanswered after the drain: timeouts
            for request in gateway.expire(time.perf_counter_ns()):
                self._timed_out(request)
        for session in list(self.active.values()):
            self.session_over(session, "failed")
        drain.ended = time.perf_counter()

    def _in_flight(self) -> int:
        return sum(len(g.pending) for g in self.gateways)

    def level(self, elapsed: float) -> float:
        """The share of the steady load at `elapsed` seconds into the run."""
        p = self.scenario.phases
        if elapsed < p.warmup_seconds:
            return p.warmup_level
        if p.steps:
            traffic = self.scenario.traffic
            full = traffic.sessions_per_second if traffic.mode == "open" else traffic.in_flight
            step = min(int((elapsed - p.warmup_seconds) // p.step_seconds), len(p.steps) - 1)
            return p.steps[step] / full
        if p.ramp_seconds and elapsed < p.warmup_seconds + p.ramp_seconds:
            return p.warmup_level + (1 - p.warmup_level) * (elapsed - p.warmup_seconds) / p.ramp_seconds
        return 1.0

    async def _arrivals(self, ends: dict[str, float]) -> None:
        """Start sessions: open loop by rate × level, closed loop up to in_flight × level."""
        loop = asyncio.get_running_loop()
        traffic = self.scenario.traffic
        last = loop.time()
        while self._accepting:
            now = loop.time()
            level = self.level(now - self._t0)
            if traffic.mode == "open":
                self._arrival_credit += traffic.sessions_per_second * level * (now - last)
                while self._arrival_credit >= 1 and self._accepting:
                    self._arrival_credit -= 1
                    if not self._start_session():
                        break
            else:
                self._fill(level)
            last = now
            await asyncio.sleep(0.005)

    def _fill(self, level: float | None = None) -> None:
        if level is None:
            level = self.level(asyncio.get_running_loop().time() - self._t0)
        target = max(1, math.ceil(self.scenario.traffic.in_flight * level))
        while self._accepting and len(self.active) < target:
            if not self._start_session():
                break

    def _start_session(self) -> bool:
        limit = self.scenario.phases.max_sessions
        if limit and self.started_sessions >= limit:
            return False
        traffic = self.scenario.traffic
        rng = self.rng
        gateway = self.gateways[self.started_sessions % len(self.gateways)]
        if gateway.lost:
            live = [g for g in self.gateways if not g.lost]
            if not live:
                return False
            gateway = live[self.started_sessions % len(live)]
        self.started_sessions += 1
        msisdn = self.population[rng.randrange(len(self.population))]
        session_id = f"{gateway.origin_host};{self._run_token};{next(self._session_numbers)}"
        session: DataSession | EventSession
        if traffic.event_share and rng.random() < traffic.event_share:
            session = EventSession(self, gateway, session_id, msisdn)
            self.sessions["events"] += 1
        else:
            updates = traffic.updates
            if traffic.updates_distribution == "uniform":
                updates = rng.randint(0, 2 * traffic.updates)
            rgs = tuple(rng.sample(traffic.rating_groups, traffic.rating_groups_per_session))
            interval = traffic.session_seconds / (updates + 1) if traffic.session_seconds else 0.0
            abandon = bool(traffic.abandon_share) and rng.random() < traffic.abandon_share
            session = DataSession(self, gateway, session_id, msisdn, rgs, updates, interval, abandon)
            self.sessions["data"] += 1
        self.sessions["started"] += 1
        self.active[session_id] = session
        session.start()
        return True

    # ---------------------------------------------------------------- requests and answers

    def send(self, request: Pending, gateway: Gateway, avps: list) -> None:
        """Send a request, and maybe its T-flag copies (retransmission on another connection, duplicate)."""
        frame = gateway.send(request, avps)
        self._count_sent(request)
        traffic = self.scenario.traffic
        if traffic.retransmission_share and self.wire_rng.random() < traffic.retransmission_share:
            others = [g for g in self.gateways if g is not gateway and not g.lost]
            if others:
                copy = others[self.wire_rng.randrange(len(others))].send_copy(request, frame)
                self.retransmissions += 1
                self._count_sent(copy)
        if traffic.duplicate_share and request.copy is None and self.wire_rng.random() < traffic.duplicate_share:
            copy = gateway.send_copy(request, frame)
            self.duplicates += 1
            self._count_sent(copy)

    def _count_sent(self, request: Pending) -> None:
        self.sent += 1
        self.phases[request.phase].sent += 1
        self.sent_by_type[REQUEST_TYPE_NAMES[request.request_type]] += 1

    def on_answer(self, request: Pending, message: Message, latency_ns: int) -> None:
        self.answered += 1
        micros = latency_ns // 1000
        stats = self.phases[request.phase]
        stats.answers += 1
        stats.histogram.record(micros)
        stats.results[str(message.get("Result-Code"))] += 1
        self._interval.record(micros)
        self._interval_answers += 1
        result_code = message.get("Result-Code")
        self.results[str(result_code)] += 1
        session = request.session
        if message.session_id != session.session_id:
            self.mismatch("Session-Id differs from the request's")
        # a protocol error (E bit, e.g. 3004 TOO_BUSY) is the generic answer of RFC 6733 §7.2: Session-Id and
        # Result-Code, no CC-Request-Type/-Number (the hop-by-hop id matched it to its request)
        if not message.flags & FLAG_ERROR:
            if message.get("CC-Request-Number") != request.number:
                self.mismatch("CC-Request-Number differs from the request's")
            if message.get("CC-Request-Type") != request.request_type:
                self.mismatch("CC-Request-Type differs from the request's")
        msccs = self._read_msccs(request, message, result_code)
        partner = request.copy_of or request.copy
        if partner is not None:
            summary = (result_code, tuple(sorted((m[0], m[1], m[3], m[2]) for m in msccs)))
            if partner.summary is not None and partner.summary != summary:
                self.mismatch("retransmission answered differently from its original")
            request.summary = summary
        if request.copy_of is None:
            session.on_answer(request, result_code, msccs)
        self._check_quiet()

    def _read_msccs(self, request: Pending, message: Message, result_code: int | None) -> list[MsccRead]:
        """One pass over the answer's MSCCs: (rating group, result, granted units, their unit AVP, final
        units?, Validity-Time) each; counts MSCC results and checks them against what was asked."""
        found: list[MsccRead] = []
        event = request.request_type == EVENT
        units = _GRANT_UNITS[event]
        want_validity = self._want_validity
        for mscc in message.find_all("Multiple-Services-Credit-Control"):
            code = mscc.get("Result-Code")
            self.mscc_results[str(code if code is not None else result_code)] += 1
            gsu = mscc.find("Granted-Service-Unit")
            granted, unit = None, units[0]
            if gsu is not None:
                for unit in units:
                    granted = gsu.get(unit)
                    if granted is not None:
                        break
            fui = mscc.find("Final-Unit-Indication") is not None
            validity = mscc.get("Validity-Time") if want_validity else None
            found.append((mscc.get("Rating-Group"), code, granted, unit, fui,
                          float(validity) if validity is not None else None))
        if result_code == SUCCESS:
            if len(found) != len(request.rgs):
                self.mismatch("not one MSCC per MSCC asked")
            elif sorted(m[0] for m in found) != sorted(request.rgs):
                self.mismatch("answer MSCCs name other rating groups than asked")
            else:
                asked = dict(zip(request.rgs, request.asked, strict=True))
                for rg, code, granted, _unit, fui, _validity in found:
                    if asked[rg] and granted is None and not fui and code in (None, SUCCESS):
                        self.mismatch("2001 MSCC without a grant for units asked")
        return found

    def on_undecodable(self, request: Pending, why: str) -> None:
        self.errors += 1
        self.error_kinds[f"undecodable answer: {why}"] += 1
        if request.copy_of is None:
            request.session.on_failure()
        self._check_quiet()

    def on_lost(self, request: Pending) -> None:
        self.errors += 1
        self.error_kinds["connection lost with the request in flight"] += 1
        if request.copy_of is None:
            request.session.on_failure()

    def on_connection_lost(self, gateway: Gateway, exc: Exception | None) -> None:
        if not self._stopping:
            self.note_error(f"{gateway.origin_host}: connection lost ({exc or 'closed by the server'})")
            for session in list(self.active.values()):
                if session.gateway is gateway and not getattr(session, "waiting", False):
                    session.on_failure()
        self._check_quiet()

    def note_error(self, text: str) -> None:
        self.connection_errors.append(text)
        self.error_kinds[text] += 1

    def on_server_session_request(self, command: int, session_id: str | None) -> None:
        session = self.active.get(session_id or "")
        if isinstance(session, DataSession):
            if command == RAR:
                session.reauthorize()
            else:
                session.abort()

    def _timed_out(self, request: Pending) -> None:
        self.timeouts += 1
        self.phases[request.phase].timeouts += 1
        if request.copy_of is None:
            request.session.on_failure()

    async def _sweeper(self) -> None:
        timeout_ns = int(self.scenario.gateways.timeout_seconds * 1e9)
        period = min(0.1, self.scenario.gateways.timeout_seconds / 10)
        while True:
            await asyncio.sleep(period)
            cutoff = time.perf_counter_ns() - timeout_ns
            for gateway in self.gateways:
                for request in gateway.expire(cutoff):
                    self._timed_out(request)
            self._check_quiet()

    def session_over(self, session: DataSession | EventSession, how: str) -> None:
        if session.done:
            return
        session.done = True
        if isinstance(session, DataSession) and session.timer is not None:
            session.timer.cancel()
            session.timer = None
        self.sessions[how] += 1
        if isinstance(session, DataSession):
            self.reported_octets.update(session.reported_total)
        self.active.pop(session.session_id, None)
        if self._accepting and self.scenario.traffic.mode == "closed":
            self._fill()
        self._check_quiet()

    def mismatch(self, kind: str) -> None:
        self.mismatches[kind] += 1

    def _check_quiet(self) -> None:
        if self._quiet is not None and not self.active and not self._in_flight():
            self._quiet.set()

    # ---------------------------------------------------------------- progress and report

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_tick = loop.time()
        while True:
            await asyncio.sleep(self.tick_seconds)
            self._tick()

    def _tick(self) -> None:
        now = asyncio.get_running_loop().time()
        seconds = max(now - self._last_tick, 1e-9)
        self._last_tick = now
        interval, self._interval = self._interval, LatencyHistogram()
        answers, self._interval_answers = self._interval_answers, 0
        point = {
            "t": round(now - self._t0, 3),
            "phase": self.phase,
            "requests_per_second": answers / seconds,
            "p50_ms": interval.percentile(0.5) / 1000,
            "p99_ms": interval.percentile(0.99) / 1000,
            "max_ms": interval.max / 1000,
        }
        self.series.append(point)
        if self.on_tick is not None:
            self.on_tick(self.snapshot(point))

    def snapshot(self, point: dict[str, float] | None = None) -> dict[str, Any]:
        """What the live progress shows: the last interval and the running totals."""
        return {
            "phase": self.phase,
            "elapsed": round(asyncio.get_running_loop().time() - self._t0, 1),
            "interval": point or (self.series[-1] if self.series else {}),
            "sessions_open": len(self.active),
            "requests_in_flight": self._in_flight(),
            "sent": self.sent,
            "answered": self.answered,
            "results": dict(self.results),
            "timeouts": self.timeouts,
            "errors": self.errors,
            "mismatches": sum(self.mismatches.values()),
        }

    def report(self, seconds: float) -> dict[str, Any]:
        s = self.scenario
        steady = self.phases.get("steady") or PhaseStats("steady")  # a stepped run has none: see "steps"
        unanswered = self.sent - self.answered - self.timeouts - self.errors
        phases = {}
        for name, stats in self.phases.items():
            if stats.started is None or (not stats.sent and not stats.answers and stats.seconds < 0.001):
                continue  # a phase of zero length (e.g. no warm-up)
            phases[name] = {
                "seconds": round(stats.seconds, 3),
                "sent": stats.sent,
                "answers": stats.answers,
                "requests_per_second": round(stats.answers / stats.seconds, 1) if stats.seconds else 0.0,
                "latency_ms": stats.histogram.summary_ms(),
                "results": dict(sorted(stats.results.items())),
                "timeouts": stats.timeouts,
            }
        return {
            "scenario": s.name,
            "mode": s.traffic.mode,
            "target": f"{s.target.host}:{s.target.port}",
            "connections": len(self.gateways),
            "offered": ({"sessions_per_second": s.traffic.sessions_per_second} if s.traffic.mode == "open"
                        else {"in_flight": s.traffic.in_flight}),
            "duration_seconds": round(seconds, 3),
            "requests_per_second": phases.get("steady", {}).get("requests_per_second", 0.0),
            "latency_ms": steady.histogram.summary_ms(),
            "results": dict(sorted(self.results.items())),
            "mscc_results": dict(sorted(self.mscc_results.items())),
            "errors": self.errors,
            "timeouts": self.timeouts,
            "mismatches": sum(self.mismatches.values()),
            "mismatch_kinds": dict(self.mismatches),
            "connection_errors": list(self.connection_errors),
            "error_kinds": dict(self.error_kinds),
            "requests": {
                "sent": self.sent,
                "answered": self.answered,
                "timeouts": self.timeouts,
                "errors": self.errors,
                "unanswered": unanswered,
                "by_type": dict(self.sent_by_type),
                "retransmissions": self.retransmissions,
                "duplicates": self.duplicates,
                "late_answers": self.late_answers,
            },
            "sessions": {key: self.sessions.get(key, 0) for key in
                         ("started", "data", "events", "completed", "abandoned", "rejected", "failed")},
            "server_requests": dict(self.server_requests),
            "usage": {"events_granted_units": self.events_granted, "reported_octets_by_rating_group": {
                str(rg): n for rg, n in sorted(self.reported_octets.items())}},
            "phases": phases,
            **({"steps": self._steps_report()} if s.phases.steps else {}),
        }

    def _steps_report(self) -> list[dict[str, Any]]:
        """One row per step of a stepped run: what was offered, what was answered how, and how fast."""
        traffic = self.scenario.traffic
        per_session = (1 - traffic.event_share) * (traffic.updates + 2) + traffic.event_share
        rows = []
        for level, name in zip(self.scenario.phases.steps, self.measured, strict=True):
            stats = self.phases[name]
            seconds = stats.seconds or 1e-9
            busy = stats.results.get("3004", 0)
            row: dict[str, Any] = {"step": name}
            if traffic.mode == "open":
                row["sessions_per_second"] = level
                row["nominal_requests_per_second"] = round(level * per_session, 1)
            else:
                row["in_flight"] = level
            row.update({
                "seconds": round(stats.seconds, 3),
                "sent_per_second": round(stats.sent / seconds, 1),
                "answered_per_second": round(stats.answers / seconds, 1),
                "success_per_second": round(stats.results.get(str(SUCCESS), 0) / seconds, 1),
                "too_busy_share": round(busy / stats.answers, 4) if stats.answers else 0.0,
                "timeouts": stats.timeouts,
                "results": dict(sorted(stats.results.items())),
                "latency_ms": stats.histogram.summary_ms(),
            })
            rows.append(row)
        return rows


async def run_scenario(scenario: Scenario, *, on_tick: Callable[[dict], None] | None = None
                       ) -> tuple[dict[str, Any], LoadRun]:
    """Run a scenario to its end: the report, and the run (its per-second `series` and phase histograms)."""
    run = LoadRun(scenario, on_tick=on_tick)
    report = await run.run()
    return report, run
