"""The Diameter peer state machine (RFC 6733 §5, RFC 3539 watchdog) for one accepted connection, sans-IO.

Rules of this file:

- Everything that changes the peer state lives here, in two tables: `TRANSITIONS` (the connection:
  capabilities exchange, disconnect, broken frames, time-outs) and `WATCHDOG_TRANSITIONS` (RFC 3539
  Tw supervision while the connection is open). A (state, input) pair the table lacks falls back to
  `DEFAULT_TRANSITIONS[state]`, i.e. to one documented place, never to an `if` buried in a handler.
- No I/O and no clock: bytes come in through `receive_data(data, now)`, bytes go out through
  `data_to_send()`, happenings come out as `protocol.events` objects from `next_event()`, and the
  time is whatever `now` the caller passes. The driver asks `get_timer()` when to wake us and calls
  `handle_timer(now)` then. Tests drive `now` by hand.
- This file does not know what the application does with a request: an application request that
  passes the header checks and `codec.validate()` becomes `RequestReceived`; its answer comes back
  through `send_answer()`. Protocol errors the base protocol defines (3001, 3007, 3008, 5001, 5011,
  5014, 5015, …) are answered here, with every Proxy-Info of the request echoed.

Theory of operation. A frame is classified into an `Input` from its header alone (a CER is also
evaluated, so that it becomes CER_ACCEPTED or CER_REFUSED), then `_fire()` looks the pair
(state, input) up, runs the named action while still in the old state and enters the new state.
Entering OPEN arms the watchdog, entering CLOSING arms the DPA time-out, entering CLOSED sets
`should_close` and queues `ConnectionClosed`. Every received frame also feeds the watchdog table
(DWA or any other message) before it is classified, as RFC 3539 asks. The one frame of the hot path, an
application request on an open peer whose watchdog is OKAY, skips the two look-ups and does directly what
they say (re-arm the watchdog, `_deliver_request`); asserts below the tables keep the two in step.

The driver calls `send_answer` once per `RequestReceived`. A DPR that arrives while some of those
answers are still owed is answered after the last of them, so that a peer closing on our DPA (as
RFC 6733 §5.4 lets it) loses nothing; the driver closes once `should_close` is set and its own
in-flight answers are written.

We are always the responder (an OCS listens; the gateways connect), so the RFC 6733 §5.6 I-states
and the election do not exist here.
"""

from __future__ import annotations

import enum
import random
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from protocol.codec import (
    FLAG_ERROR,
    FLAG_REQUEST,
    DecodeError,
    Message,
    decode_message,
    encode_answer,
    encode_message,
    validate,
)
from protocol.dictionary import (
    APP_COMMON,
    APP_RELAY,
    AVP_BY_NAME,
    CER,
    DIAMETER_APPLICATION_UNSUPPORTED,
    DIAMETER_COMMAND_UNSUPPORTED,
    DIAMETER_INVALID_HDR_BITS,
    DIAMETER_MISSING_AVP,
    DIAMETER_NO_COMMON_APPLICATION,
    DIAMETER_NO_COMMON_SECURITY,
    DIAMETER_SUCCESS,
    DIAMETER_UNABLE_TO_COMPLY,
    DIAMETER_UNKNOWN_PEER,
    DPR,
    DWR,
    AvpType,
    DisconnectCause,
    is_protocol_error,
)
from protocol.errors import error_answer
from protocol.events import (
    AnswerReceived,
    AnswerUndecodable,
    ConnectionClosed,
    Event,
    PeerOpened,
    PeerRestarted,
    RequestReceived,
)
from protocol.framing import FramingError, ReceiveBuffer

__all__ = [
    "PeerSettings",
    "PeerConnection",
    "PeerState",
    "WatchdogState",
    "Input",
    "PeerStateError",
    "TRANSITIONS",
    "WATCHDOG_TRANSITIONS",
    "DEFAULT_TRANSITIONS",
    "DISCONNECT_REBOOTING",
    "DISCONNECT_BUSY",
    "DISCONNECT_DO_NOT_WANT_TO_TALK_TO_YOU",
]

# Disconnect-Cause values (RFC 6733 §5.4.3), for `disconnect()`.
DISCONNECT_REBOOTING = DisconnectCause.REBOOTING
DISCONNECT_BUSY = DisconnectCause.BUSY
DISCONNECT_DO_NOT_WANT_TO_TALK_TO_YOU = DisconnectCause.DO_NOT_WANT_TO_TALK_TO_YOU

_CER_REQUIRED = ("Origin-Host", "Origin-Realm", "Host-IP-Address", "Vendor-Id", "Product-Name")
_NO_INBAND_SECURITY = 0
_MIN_WATCHDOG_SECONDS = 6.0  # RFC 3539 §3.4.1: Tw must not be set below 6 s


def _default_application_commands() -> Mapping[int, frozenset[int]]:
    # Credit-Control (RFC 4006): CCR from the clients; RAR/ASR answers flow the other way but a
    # client may also send them to an agent, so they are accepted as requests too.
    return {4: frozenset({272, 258, 274})}


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """What we announce in CEA/DWA/DPR and what we accept from peers; one object for all connections."""

    origin_host: str
    origin_realm: str
    host_ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    vendor_id: int = 0  # 0 = IETF/"reserved"; set the operator's IANA PEN in production
    product_name: str = "ocs"
    firmware_revision: int = 1
    origin_state_id: int = 0
    auth_application_ids: tuple[int, ...] = (4,)
    supported_vendor_ids: tuple[int, ...] = (10415,)
    #: also send Vendor-Specific-Application-Id {10415, 4} in CEA (some 3GPP peers expect it)
    advertise_vendor_specific_application: bool = False
    #: Origin-Host names (case-insensitive) or remote IP addresses allowed to connect; None = anyone
    allowed_peers: tuple[str, ...] | None = None
    #: RFC 3539 Tw; every arming adds a uniform jitter of ±watchdog_jitter_seconds
    watchdog_seconds: float = 30.0
    watchdog_jitter_seconds: float = 2.0
    #: a connection that sends no CER within this time is closed
    cer_timeout_seconds: float = 30.0
    #: after our DPR, close when the DPA has not arrived within this time
    disconnect_timeout_seconds: float = 5.0
    max_message_length: int = 65536
    #: application id → command codes accepted as requests (others: 3001; unknown application: 3007)
    application_commands: Mapping[int, frozenset[int]] = field(default_factory=_default_application_commands)
    #: vendors whose unknown M-bit AVPs are tolerated instead of answered with 5001
    unknown_mandatory_vendor_allowlist: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.watchdog_seconds - self.watchdog_jitter_seconds < _MIN_WATCHDOG_SECONDS:
            raise ValueError(
                f"watchdog_seconds {self.watchdog_seconds} minus jitter must be at least "
                f"{_MIN_WATCHDOG_SECONDS} s (RFC 3539)"
            )
        if not self.host_ip_addresses:
            raise ValueError("CEA needs at least one Host-IP-Address")
        commands = MappingProxyType({int(k): frozenset(v) for k, v in self.application_commands.items()})
        object.__setattr__(self, "application_commands", commands)
        object.__setattr__(self, "host_ip_addresses", tuple(self.host_ip_addresses))
        object.__setattr__(self, "auth_application_ids", tuple(self.auth_application_ids))
        object.__setattr__(self, "supported_vendor_ids", tuple(self.supported_vendor_ids))
        object.__setattr__(
            self, "unknown_mandatory_vendor_allowlist", frozenset(self.unknown_mandatory_vendor_allowlist)
        )
        if self.allowed_peers is not None:
            object.__setattr__(self, "allowed_peers", tuple(self.allowed_peers))


class PeerState(enum.Enum):
    """RFC 6733 §5.6 responder states, minus the election: Closed → R-Open → Closing → Closed."""

    WAIT_CER = "wait-cer"  # transport accepted, no CER yet
    OPEN = "open"
    CLOSING = "closing"  # we sent DPR and wait for the DPA
    CLOSED = "closed"

    __hash__ = object.__hash__  # members are singletons: the C identity hash, not Enum's hash(name)


class WatchdogState(enum.Enum):
    """RFC 3539 §3.4: OKAY; OKAY with a DWR outstanding (PENDING); SUSPECT; DOWN."""

    OKAY = "okay"
    PENDING = "pending"
    SUSPECT = "suspect"
    DOWN = "down"

    __hash__ = object.__hash__  # members are singletons: the C identity hash, not Enum's hash(name)


class Input(enum.Enum):
    """What can happen to a connection, after classification of a frame by its header."""

    CER_ACCEPTED = "cer-accepted"  # a CER we would answer with 2001
    CER_REFUSED = "cer-refused"  # a CER we would answer with 3010/5005/5010/5014/5017…
    DWR = "dwr"
    DWA = "dwa"
    DPR = "dpr"
    DPA = "dpa"
    REQUEST = "request"  # any other request
    ANSWER = "answer"  # any other answer
    BAD_FRAME = "bad-frame"  # ReceiveBuffer raised FramingError
    STOP = "stop"  # local disconnect()
    TIMEOUT = "timeout"  # the state's timer: CER wait, watchdog DOWN, DPA wait
    TRANSPORT_LOST = "transport-lost"

    __hash__ = object.__hash__  # members are singletons: the C identity hash, not Enum's hash(name)


class _WatchdogInput(enum.Enum):
    EXPIRED = "expired"
    DWA = "dwa"
    OTHER = "other"  # any received message except a DWA

    __hash__ = object.__hash__  # members are singletons: the C identity hash, not Enum's hash(name)


S, I = PeerState, Input  # noqa: E741 - table shorthand only

#: (state, input) → (next state, action). The action runs before the state changes.
TRANSITIONS: dict[tuple[PeerState, Input], tuple[PeerState, str]] = {
    # Waiting for the capabilities exchange: anything but a CER closes the connection.
    (S.WAIT_CER, I.CER_ACCEPTED): (S.OPEN, "_accept_cer"),
    (S.WAIT_CER, I.CER_REFUSED): (S.CLOSED, "_refuse_cer"),
    (S.WAIT_CER, I.DWR): (S.CLOSED, "_not_a_cer"),
    (S.WAIT_CER, I.DWA): (S.CLOSED, "_not_a_cer"),
    (S.WAIT_CER, I.DPR): (S.CLOSED, "_not_a_cer"),
    (S.WAIT_CER, I.DPA): (S.CLOSED, "_not_a_cer"),
    (S.WAIT_CER, I.REQUEST): (S.CLOSED, "_not_a_cer"),
    (S.WAIT_CER, I.ANSWER): (S.CLOSED, "_not_a_cer"),
    (S.WAIT_CER, I.BAD_FRAME): (S.CLOSED, "_answer_bad_frame"),
    (S.WAIT_CER, I.STOP): (S.CLOSED, "_stopped"),
    (S.WAIT_CER, I.TIMEOUT): (S.CLOSED, "_timed_out"),
    # Open: the normal life of a peer.
    (S.OPEN, I.CER_ACCEPTED): (S.OPEN, "_answer_cer_again"),
    (S.OPEN, I.CER_REFUSED): (S.OPEN, "_answer_cer_again"),
    (S.OPEN, I.DWR): (S.OPEN, "_answer_dwr"),
    (S.OPEN, I.DWA): (S.OPEN, "_take_dwa"),
    (S.OPEN, I.DPR): (S.CLOSED, "_answer_dpr"),
    (S.OPEN, I.DPA): (S.OPEN, "_discard"),
    (S.OPEN, I.REQUEST): (S.OPEN, "_deliver_request"),
    (S.OPEN, I.ANSWER): (S.OPEN, "_deliver_answer"),
    (S.OPEN, I.BAD_FRAME): (S.CLOSED, "_answer_bad_frame"),
    (S.OPEN, I.STOP): (S.CLOSING, "_send_dpr"),
    (S.OPEN, I.TIMEOUT): (S.CLOSED, "_timed_out"),
    # Closing: we sent DPR; answer what still arrives, close on DPA, a DPR of theirs, or time-out.
    (S.CLOSING, I.CER_ACCEPTED): (S.CLOSING, "_answer_cer_again"),
    (S.CLOSING, I.CER_REFUSED): (S.CLOSING, "_answer_cer_again"),
    (S.CLOSING, I.DWR): (S.CLOSING, "_answer_dwr"),
    (S.CLOSING, I.DWA): (S.CLOSING, "_take_dwa"),
    (S.CLOSING, I.DPR): (S.CLOSED, "_answer_dpr"),
    (S.CLOSING, I.DPA): (S.CLOSED, "_take_dpa"),
    (S.CLOSING, I.REQUEST): (S.CLOSING, "_deliver_request"),
    (S.CLOSING, I.ANSWER): (S.CLOSING, "_deliver_answer"),
    (S.CLOSING, I.BAD_FRAME): (S.CLOSED, "_answer_bad_frame"),
    (S.CLOSING, I.STOP): (S.CLOSING, "_discard"),
    (S.CLOSING, I.TIMEOUT): (S.CLOSED, "_timed_out"),
}
#: Losing the transport ends every state.
TRANSITIONS.update({(state, I.TRANSPORT_LOST): (S.CLOSED, "_lost") for state in PeerState})

#: What a pair missing from TRANSITIONS does: only CLOSED relies on this (everything is ignored).
DEFAULT_TRANSITIONS: dict[PeerState, tuple[PeerState, str]] = {
    state: (state, "_discard") for state in PeerState
}

W, WI = WatchdogState, _WatchdogInput
#: RFC 3539 §3.4 while OPEN: (watchdog state, input) → (next, action or None). Every step re-arms Tw.
WATCHDOG_TRANSITIONS: dict[tuple[WatchdogState, _WatchdogInput], tuple[WatchdogState, str | None]] = {
    (W.OKAY, WI.EXPIRED): (W.PENDING, "_send_dwr"),
    (W.OKAY, WI.DWA): (W.OKAY, None),
    (W.OKAY, WI.OTHER): (W.OKAY, None),
    (W.PENDING, WI.EXPIRED): (W.SUSPECT, None),
    (W.PENDING, WI.DWA): (W.OKAY, None),
    (W.PENDING, WI.OTHER): (W.PENDING, None),
    (W.SUSPECT, WI.EXPIRED): (W.DOWN, "_watchdog_down"),
    (W.SUSPECT, WI.DWA): (W.OKAY, None),
    (W.SUSPECT, WI.OTHER): (W.PENDING, None),  # traffic is back, but our DWR is still unanswered
}
del S, I, W, WI

#: How a frame that is not a CER is classified by its command code (anything else: REQUEST / ANSWER).
_REQUEST_INPUTS = {DWR: Input.DWR, DPR: Input.DPR}
_ANSWER_INPUTS = {DWR: Input.DWA, DPR: Input.DPA}
#: Requests the base protocol handles itself; any other request on an open peer takes the fast path of
#: `_receive_frame`, which relies on these two table entries
_BASE_REQUESTS = frozenset({CER, DWR, DPR})
_FLAGS_COMMAND_APPLICATION = struct.Struct(">II").unpack_from  # header words 2 and 3, at offset 4
assert TRANSITIONS[(PeerState.OPEN, Input.REQUEST)] == (PeerState.OPEN, "_deliver_request")
assert WATCHDOG_TRANSITIONS[(WatchdogState.OKAY, _WatchdogInput.OTHER)] == (WatchdogState.OKAY, None)

_TIMEOUT_REASONS = {
    PeerState.WAIT_CER: "no CER received in time",
    PeerState.OPEN: "watchdog",
    PeerState.CLOSING: "no DPA received in time",
}


class PeerStateError(RuntimeError):
    """A local call that the current peer state does not allow (e.g. send_request before CER)."""


class _CerOutcome:
    """The evaluation of a CER: what to answer, and what we learnt about the peer."""

    __slots__ = ("frame", "result_code", "answer", "message", "applications")

    def __init__(
        self,
        frame: bytes,
        result_code: int,
        answer: bytes,
        message: Message | None = None,
        applications: tuple[int, ...] = (),
    ) -> None:
        self.frame = frame
        self.result_code = result_code
        self.answer = answer
        self.message = message
        self.applications = applications


class PeerConnection:
    """One accepted transport connection to a Diameter peer, as a pure state machine.

    Feed it bytes with `receive_data`, take events with `next_event`, write `data_to_send()` to the
    socket, and close the socket once `should_close` is true and the data is flushed.
    """

    def __init__(
        self,
        settings: PeerSettings,
        remote_address: str,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.remote_address = remote_address
        self.state = PeerState.WAIT_CER
        self.watchdog_state = WatchdogState.OKAY
        self.should_close = False
        self.close_reason: str | None = None
        self.peer_origin_host: str | None = None
        self.peer_origin_realm: str | None = None
        self.peer_origin_state_id: int | None = None
        self.applications: tuple[int, ...] = ()
        self._rng = rng if rng is not None else random.Random()
        self._buffer = ReceiveBuffer(settings.max_message_length)
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._hop_by_hop = self._rng.getrandbits(32)
        # RFC 6733 §3: high 12 bits from the (start) time, low 20 bits random, then incremented.
        self._end_to_end = ((int(now) & 0xFFF) << 20) | self._rng.getrandbits(20)
        self._outstanding: dict[int, int] = {}  # hop-by-hop → command code, for our requests
        self._cer_deadline = now + settings.cer_timeout_seconds
        self._watchdog_at: float | None = None
        self._dpa_deadline: float | None = None
        self._disconnect_cause: int | None = None
        self._our_apps = frozenset(settings.auth_application_ids)
        self._transport_lost = False
        self._unanswered = 0  # RequestReceived events whose answer has not come through send_answer
        self._held_dpa: bytes | None = None
        self._allowlist = settings.unknown_mandatory_vendor_allowlist

    # ------------------------------------------------------------------ driver API

    def receive_data(self, data: bytes, now: float) -> None:
        """Take bytes from the socket; frames are processed until the data or the connection ends."""
        if self.state is PeerState.CLOSED:
            return
        self._buffer.feed(data)
        while self.state is not PeerState.CLOSED:
            try:
                frame = self._buffer.next_frame()
            except FramingError as exc:
                self._fire(Input.BAD_FRAME, exc, now)
                return
            if frame is None:
                return
            self._receive_frame(frame, now)

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call, as one buffer (one write)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def send_answer(self, answer: bytes) -> None:
        """Queue the application's answer to a `RequestReceived`; call it exactly once per such event.

        Dropped once the transport is lost. A DPA held back for answers still being computed goes out
        right after the last of them, so a peer that closes on our DPA has all its answers.
        """
        if self._transport_lost:
            return
        self._out.append(answer)
        if self._unanswered:
            self._unanswered -= 1
            if not self._unanswered and self._held_dpa is not None:
                self._out.append(self._held_dpa)
                self._held_dpa = None

    def send_request(self, request: bytes, now: float) -> None:
        """Queue a request of ours (RAR, ASR…); its answer comes back as `AnswerReceived`.

        The request must carry Hop-by-Hop/End-to-End ids from `next_hop_by_hop`/`next_end_to_end`.
        """
        if self.state is not PeerState.OPEN:
            raise PeerStateError(f"cannot send a request in state {self.state.name}")
        if len(request) < 20 or not request[4] & FLAG_REQUEST:
            raise ValueError("not a Diameter request")
        hop_by_hop = int.from_bytes(request[12:16], "big")
        self._outstanding[hop_by_hop] = int.from_bytes(request[5:8], "big")
        self._out.append(request)

    def next_hop_by_hop(self) -> int:
        self._hop_by_hop = (self._hop_by_hop + 1) & 0xFFFFFFFF
        return self._hop_by_hop

    def next_end_to_end(self) -> int:
        self._end_to_end = (self._end_to_end + 1) & 0xFFFFFFFF
        return self._end_to_end

    @property
    def outstanding_requests(self) -> int:
        """How many of our requests still wait for their answer."""
        return len(self._outstanding)

    def disconnect(self, cause: int, now: float) -> None:
        """Start an orderly disconnect: DPR now, close on DPA or after disconnect_timeout_seconds."""
        self._disconnect_cause = cause
        self._fire(Input.STOP, cause, now)

    def connection_lost(self, now: float) -> None:
        """The transport is gone (peer closed it, or we did): nothing more will be sent."""
        self._fire(Input.TRANSPORT_LOST, None, now)

    def get_timer(self) -> float | None:
        """When `handle_timer` must be called next, or None."""
        if self.state is PeerState.WAIT_CER:
            return self._cer_deadline
        if self.state is PeerState.OPEN:
            return self._watchdog_at
        if self.state is PeerState.CLOSING:
            return self._dpa_deadline
        return None

    def handle_timer(self, now: float) -> None:
        """Act on whatever timer is due at `now`; calling it early does nothing."""
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return
        if self.state is PeerState.OPEN:
            self._watchdog_step(_WatchdogInput.EXPIRED, now)
        else:
            self._fire(Input.TIMEOUT, None, now)

    def build_error_answer(
        self, request: Message, result_code: int, *, error_message: str | None = None
    ) -> bytes:
        """A generic protocol-error answer to `request` (Session-Id and Proxy-Info echoed)."""
        return self._error_answer(request.raw, result_code, request, error_message=error_message)

    # ------------------------------------------------------------------ the machine

    def _receive_frame(self, frame: bytes, now: float) -> None:
        flags = frame[4]
        command = int.from_bytes(frame[5:8], "big")
        is_request = bool(flags & FLAG_REQUEST)
        if self.state is PeerState.OPEN:
            if is_request and command not in _BASE_REQUESTS and self.watchdog_state is WatchdogState.OKAY:
                # the usual frame, an application request on an open peer with a quiet watchdog: what the two
                # tables say for it (checked below them), without the look-ups
                self._arm_watchdog(now)
                self._deliver_request(frame, now)
                return
            dwa = not is_request and command == DWR
            self._watchdog_step(_WatchdogInput.DWA if dwa else _WatchdogInput.OTHER, now)
        if is_request:
            if command == CER:
                outcome = self._evaluate_cer(frame)
                accepted = outcome.result_code == DIAMETER_SUCCESS
                self._fire(Input.CER_ACCEPTED if accepted else Input.CER_REFUSED, outcome, now)
                return
            kind = _REQUEST_INPUTS.get(command, Input.REQUEST)
        else:
            kind = _ANSWER_INPUTS.get(command, Input.ANSWER)
        self._fire(kind, frame, now)

    def _fire(self, event: Input, payload: Any, now: float) -> None:
        next_state, action = TRANSITIONS.get((self.state, event), DEFAULT_TRANSITIONS[self.state])
        getattr(self, action)(payload, now)
        if next_state is not self.state:
            self._enter(next_state, now)

    def _enter(self, state: PeerState, now: float) -> None:
        self.state = state
        if state is PeerState.OPEN:
            self.watchdog_state = WatchdogState.OKAY
            self._arm_watchdog(now)
        elif state is PeerState.CLOSING:
            self._dpa_deadline = now + self.settings.disconnect_timeout_seconds
        elif state is PeerState.CLOSED:
            self.should_close = True
            self._events.append(ConnectionClosed(self.close_reason or "closed"))

    def _watchdog_step(self, event: _WatchdogInput, now: float) -> None:
        next_state, action = WATCHDOG_TRANSITIONS[(self.watchdog_state, event)]
        self.watchdog_state = next_state
        if next_state is not WatchdogState.DOWN:
            self._arm_watchdog(now)
        if action is not None:
            getattr(self, action)(now)

    def _arm_watchdog(self, now: float) -> None:
        jitter = self.settings.watchdog_jitter_seconds
        self._watchdog_at = now + self.settings.watchdog_seconds + self._rng.uniform(-jitter, jitter)

    # ------------------------------------------------------------------ watchdog actions

    def _send_dwr(self, now: float) -> None:
        s = self.settings
        self._out.append(
            encode_message(
                DWR,
                APP_COMMON,
                FLAG_REQUEST,
                self.next_hop_by_hop(),
                self.next_end_to_end(),
                [
                    ("Origin-Host", s.origin_host),
                    ("Origin-Realm", s.origin_realm),
                    ("Origin-State-Id", s.origin_state_id),
                ],
            )
        )

    def _watchdog_down(self, now: float) -> None:
        self._fire(Input.TIMEOUT, None, now)

    # ------------------------------------------------------------------ connection actions

    def _accept_cer(self, outcome: _CerOutcome, now: float) -> None:
        message = outcome.message
        assert message is not None
        self._out.append(outcome.answer)
        self.peer_origin_host = _text(message.get("Origin-Host"))
        self.peer_origin_realm = _text(message.get("Origin-Realm"))
        self.peer_origin_state_id = message.get("Origin-State-Id")
        self.applications = outcome.applications
        self._events.append(
            PeerOpened(
                self.peer_origin_host,
                self.peer_origin_realm,
                self.peer_origin_state_id,
                outcome.applications,
            )
        )

    def _refuse_cer(self, outcome: _CerOutcome, now: float) -> None:
        self._out.append(outcome.answer)
        self.close_reason = f"capabilities exchange refused ({outcome.result_code})"

    def _answer_cer_again(self, outcome: _CerOutcome, now: float) -> None:
        # RFC 6733 §5.6: a CER on an open connection is rejected; DRAs answer it 5012, so do we.
        message = outcome.message
        if message is not None:
            self._note_state_id(message.get("Origin-State-Id"))
        self._out.append(
            self._error_answer(
                outcome.frame,
                DIAMETER_UNABLE_TO_COMPLY,
                message,
                error_message="Invalid state to receive a new connection attempt.",
            )
        )

    def _not_a_cer(self, frame: bytes, now: float) -> None:
        self.close_reason = "first message was not a CER"

    def _answer_dwr(self, frame: bytes, now: float) -> None:
        try:
            message = decode_message(frame)
        except DecodeError as exc:
            self._out.append(self._decode_error_answer(frame, exc))
            return
        self._note_state_id(message.get("Origin-State-Id"))
        s = self.settings
        self._out.append(
            encode_answer(
                message,
                [
                    ("Result-Code", DIAMETER_SUCCESS),
                    ("Origin-Host", s.origin_host),
                    ("Origin-Realm", s.origin_realm),
                    ("Origin-State-Id", s.origin_state_id),
                ],
            )
        )

    def _take_dwa(self, frame: bytes, now: float) -> None:
        # The watchdog table already took the DWA; here only the restart detection remains.
        self._outstanding.pop(int.from_bytes(frame[12:16], "big"), None)
        try:
            message = decode_message(frame)
        except DecodeError:
            return
        self._note_state_id(message.get("Origin-State-Id"))

    def _answer_dpr(self, frame: bytes, now: float) -> None:
        try:
            message = decode_message(frame)
        except DecodeError as exc:
            self._out.append(self._decode_error_answer(frame, exc))
            self.close_reason = "peer sent an undecodable DPR"
            return
        s = self.settings
        dpa = encode_answer(
            message,
            [
                ("Result-Code", DIAMETER_SUCCESS),
                ("Origin-Host", s.origin_host),
                ("Origin-Realm", s.origin_realm),
            ],
        )
        if self._unanswered:
            self._held_dpa = dpa  # after the answers the application still owes (see send_answer)
        else:
            self._out.append(dpa)
        self.close_reason = f"peer disconnected (DPR, cause {message.get('Disconnect-Cause')})"

    def _take_dpa(self, frame: bytes, now: float) -> None:
        self.close_reason = f"disconnected (DPA, cause {self._disconnect_cause})"

    def _send_dpr(self, cause: int, now: float) -> None:
        s = self.settings
        self._out.append(
            encode_message(
                DPR,
                APP_COMMON,
                FLAG_REQUEST,
                self.next_hop_by_hop(),
                self.next_end_to_end(),
                [
                    ("Origin-Host", s.origin_host),
                    ("Origin-Realm", s.origin_realm),
                    ("Disconnect-Cause", cause),
                ],
            )
        )

    def _stopped(self, cause: int, now: float) -> None:
        self.close_reason = "closed locally before the capabilities exchange"

    def _timed_out(self, payload: None, now: float) -> None:
        self.close_reason = _TIMEOUT_REASONS[self.state]

    def _lost(self, payload: None, now: float) -> None:
        self._transport_lost = True
        self._out.clear()
        if self.state is not PeerState.CLOSED:
            self.close_reason = "transport lost"

    def _discard(self, payload: Any, now: float) -> None:
        pass

    def _answer_bad_frame(self, exc: FramingError, now: float) -> None:
        # The stream is unusable after a broken frame: answer if we can tell it was a request, close.
        self.close_reason = f"broken frame ({exc.result_code}): {exc.message}"
        header = exc.header
        if header is not None and len(header) >= 20 and header[4] & FLAG_REQUEST:
            s = self.settings
            self._out.append(
                error_answer(
                    header[:20], exc.result_code, s.origin_host, s.origin_realm, error_message=exc.message
                )
            )

    def _deliver_request(self, frame: bytes, now: float) -> None:
        flags_command, application = _FLAGS_COMMAND_APPLICATION(frame, 4)
        flags, command = flags_command >> 24, flags_command & 0xFFFFFF
        commands = self.settings.application_commands.get(application)
        if flags & FLAG_ERROR:
            code, text = DIAMETER_INVALID_HDR_BITS, "E bit set in a request"
        elif application == APP_COMMON:
            code, text = DIAMETER_COMMAND_UNSUPPORTED, f"command {command} is not a base protocol request"
        elif commands is None:
            code, text = DIAMETER_APPLICATION_UNSUPPORTED, f"application {application} is not supported"
        elif command not in commands:
            code, text = (
                DIAMETER_COMMAND_UNSUPPORTED,
                f"command {command} is not supported in app {application}",
            )
        else:
            code, text = 0, ""
        try:
            message = decode_message(frame)
        except DecodeError as exc:
            if code:
                self._out.append(self._error_answer(frame, code, None, error_message=text))
            else:
                self._out.append(self._decode_error_answer(frame, exc))
            return
        if code:
            self._out.append(self._error_answer(frame, code, message, error_message=text))
            return
        try:
            validate(message, unknown_mandatory_vendor_allowlist=self._allowlist)
        except DecodeError as exc:
            self._out.append(
                self._error_answer(
                    frame, exc.result_code, message, failed_avp=exc.failed_avp, error_message=exc.message
                )
            )
            return
        self._unanswered += 1
        self._events.append(RequestReceived(message))

    def _deliver_answer(self, frame: bytes, now: float) -> None:
        hop_by_hop = int.from_bytes(frame[12:16], "big")
        if self._outstanding.pop(hop_by_hop, None) is None:
            return  # RFC 6733 §6.2: an answer we did not ask for is discarded
        try:
            message = decode_message(frame)
        except DecodeError as exc:
            self._events.append(AnswerUndecodable(hop_by_hop, f"{exc.result_code}: {exc.message}"))
            return
        self._events.append(AnswerReceived(message))

    # ------------------------------------------------------------------ capabilities exchange

    def _evaluate_cer(self, frame: bytes) -> _CerOutcome:
        """Decide the CEA for a CER (RFC 6733 §5.3)."""
        try:
            message = decode_message(frame)
            validate(message, unknown_mandatory_vendor_allowlist=self._allowlist)
        except DecodeError as exc:
            return _CerOutcome(frame, exc.result_code, self._decode_error_answer(frame, exc))
        code, failed_avp, text, common = self._check_cer(message)
        answer = self._cea(message, code, failed_avp=failed_avp, error_message=text)
        return _CerOutcome(frame, code, answer, message, common)

    def _check_cer(self, message: Message) -> tuple[int, bytes | None, str | None, tuple[int, ...]]:
        """(result code, Failed-AVP, Error-Message, common applications): the first failing check wins."""
        for name in _CER_REQUIRED:
            if message.find(name) is None:
                return DIAMETER_MISSING_AVP, _zero_filled_avp(name), f"{name} missing", ()
        if not self._peer_allowed(_text(message.get("Origin-Host"))):
            return DIAMETER_UNKNOWN_PEER, None, "unknown peer", ()
        inband = [avp.value for avp in message.find_all("Inband-Security-Id")]
        if inband and _NO_INBAND_SECURITY not in inband:
            return DIAMETER_NO_COMMON_SECURITY, None, "only NO_INBAND_SECURITY is supported", ()
        theirs = _advertised_applications(message)
        common = self._our_apps if APP_RELAY in theirs else self._our_apps & theirs
        if not common:
            return DIAMETER_NO_COMMON_APPLICATION, None, "no common application", ()
        return DIAMETER_SUCCESS, None, None, tuple(sorted(common))

    def _peer_allowed(self, origin_host: str) -> bool:
        allowed = self.settings.allowed_peers
        if allowed is None:
            return True
        host = origin_host.lower()
        return any(entry.lower() == host or entry == self.remote_address for entry in allowed)

    def _cea(
        self,
        cer: Message,
        result_code: int,
        *,
        failed_avp: bytes | None = None,
        error_message: str | None = None,
    ) -> bytes:
        s = self.settings
        avps: list[Any] = [
            ("Result-Code", result_code),
            ("Origin-Host", s.origin_host),
            ("Origin-Realm", s.origin_realm),
        ]
        avps += [("Host-IP-Address", address) for address in s.host_ip_addresses]
        avps += [
            ("Vendor-Id", s.vendor_id),
            ("Product-Name", s.product_name),
            ("Origin-State-Id", s.origin_state_id),
        ]
        if error_message is not None:
            avps.append(("Error-Message", error_message))
        if failed_avp is not None:
            avps.append(("Failed-AVP", [failed_avp]))
        avps += [("Supported-Vendor-Id", vendor) for vendor in s.supported_vendor_ids]
        avps += [("Auth-Application-Id", app) for app in s.auth_application_ids]
        if s.advertise_vendor_specific_application:
            for vendor in s.supported_vendor_ids:
                for app in s.auth_application_ids:
                    avps.append(
                        (
                            "Vendor-Specific-Application-Id",
                            [("Vendor-Id", vendor), ("Auth-Application-Id", app)],
                        )
                    )
        avps.append(("Firmware-Revision", s.firmware_revision))
        return encode_answer(cer, avps, error=is_protocol_error(result_code))

    # ------------------------------------------------------------------ helpers

    def _note_state_id(self, state_id: int | None) -> None:
        """Origin-State-Id seen in a CER/DWR/DWA: a change means the peer restarted (RFC 6733 §8.16)."""
        if state_id is None:
            return
        old = self.peer_origin_state_id
        self.peer_origin_state_id = state_id
        if old is not None and old != state_id:
            self._events.append(PeerRestarted(self.peer_origin_host or "", old, state_id))

    def _error_answer(
        self,
        request: bytes,
        result_code: int,
        message: Message | None,
        *,
        failed_avp: bytes | None = None,
        error_message: str | None = None,
    ) -> bytes:
        """Generic answer (RFC 6733 §7.2) echoing Session-Id and every Proxy-Info of the request."""
        if message is not None:
            session_id = message.session_id
            proxy_infos = tuple(avp.raw for avp in message.find_all("Proxy-Info"))
        else:
            session_id, proxy_infos = _salvage(request)
        s = self.settings
        return error_answer(
            request[:20],
            result_code,
            s.origin_host,
            s.origin_realm,
            session_id=session_id,
            failed_avp=failed_avp,
            error_message=error_message,
            proxy_infos=proxy_infos,
            origin_state_id=s.origin_state_id,
        )

    def _decode_error_answer(self, frame: bytes, exc: DecodeError) -> bytes:
        return self._error_answer(
            frame, exc.result_code, None, failed_avp=exc.failed_avp, error_message=exc.message
        )


def _advertised_applications(message: Message) -> frozenset[int]:
    """Every Auth-/Acct-Application-Id of a CER, including those inside VSAIs (whose Vendor-Id is ignored)."""
    apps: set[int] = set()
    for name in ("Auth-Application-Id", "Acct-Application-Id"):
        apps.update(avp.value for avp in message.find_all(name))
    for vsai in message.find_all("Vendor-Specific-Application-Id"):
        for name in ("Auth-Application-Id", "Acct-Application-Id"):
            apps.update(avp.value for avp in vsai.find_all(name))
    return frozenset(apps)


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


_ZERO_PAYLOAD: dict[AvpType, bytes] = {
    AvpType.INTEGER32: bytes(4),
    AvpType.UNSIGNED32: bytes(4),
    AvpType.ENUMERATED: bytes(4),
    AvpType.FLOAT32: bytes(4),
    AvpType.TIME: bytes(4),
    AvpType.INTEGER64: bytes(8),
    AvpType.UNSIGNED64: bytes(8),
    AvpType.FLOAT64: bytes(8),
    AvpType.ADDRESS: b"\x00\x01" + bytes(4),  # IPv4 0.0.0.0
}


def _zero_filled_avp(name: str) -> bytes:
    """The Failed-AVP content for a missing AVP: its header and a zero-filled minimal payload (§7.5)."""
    definition = AVP_BY_NAME[name]
    payload = _ZERO_PAYLOAD.get(definition.type, b"")
    flags = 0x40 if definition.mandatory else 0
    vendor = b""
    if definition.vendor:
        flags |= 0x80
        vendor = definition.vendor.to_bytes(4, "big")
    length = 8 + len(vendor) + len(payload)
    avp = definition.code.to_bytes(4, "big") + bytes([flags]) + length.to_bytes(3, "big") + vendor + payload
    return avp + bytes(-len(avp) % 4)


def _salvage(frame: bytes) -> tuple[str | None, tuple[bytes, ...]]:
    """Session-Id and the complete Proxy-Info AVPs before the first broken AVP of an undecodable message."""
    session_id: str | None = None
    proxy_infos: list[bytes] = []
    offset, end = 20, min(len(frame), int.from_bytes(frame[1:4], "big"))
    while offset + 8 <= end:
        code = int.from_bytes(frame[offset : offset + 4], "big")
        flags = frame[offset + 4]
        length = int.from_bytes(frame[offset + 5 : offset + 8], "big")
        header_len = 12 if flags & 0x80 else 8
        if length < header_len or offset + length > end:
            break
        if not flags & 0x80:
            if code == 263 and session_id is None:
                session_id = frame[offset + header_len : offset + length].decode("utf-8", "replace")
            elif code == 284:
                proxy_infos.append(frame[offset : offset + length] + bytes(-length % 4))
        offset += (length + 3) & ~3
    return session_id, tuple(proxy_infos)


# Every action the tables name must exist (a typo fails at import, not on a rare path).
for _state, _action in (*TRANSITIONS.values(), *DEFAULT_TRANSITIONS.values()):
    assert hasattr(PeerConnection, _action), _action
for _state, _action in WATCHDOG_TRANSITIONS.values():
    assert _action is None or hasattr(PeerConnection, _action), _action
del _state, _action
