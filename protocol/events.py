"""Events that `protocol.peer.PeerConnection` hands to whoever drives it.

The peer state machine never calls out: it queues these small objects and the driver (the asyncio
transport, or a test) takes them with `next_event()`. They are plain slotted classes so that
producing one costs little on the per-request path, and they carry decoded `Message` objects, never
sockets or futures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.codec import Message

__all__ = [
    "Event",
    "PeerOpened",
    "RequestReceived",
    "AnswerReceived",
    "AnswerUndecodable",
    "PeerRestarted",
    "ConnectionClosed",
]


class Event:
    """Base class of every peer event; equality compares the fields, for tests."""

    __slots__ = ()

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class PeerOpened(Event):
    """Capabilities exchange succeeded: the peer may now send application requests."""

    __slots__ = ("origin_host", "origin_realm", "origin_state_id", "applications")

    def __init__(
        self,
        origin_host: str,
        origin_realm: str,
        origin_state_id: int | None,
        applications: tuple[int, ...],
    ) -> None:
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.origin_state_id = origin_state_id
        #: our application ids usable with this peer (all of ours when it advertised the relay id)
        self.applications = applications


class RequestReceived(Event):
    """An application request (e.g. a CCR) that passed the header checks and `validate()`."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message


class AnswerReceived(Event):
    """The answer to a request we sent with `send_request`, matched by its Hop-by-Hop id."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message


class AnswerUndecodable(Event):
    """An answer matched one of our requests but could not be decoded; the request is over."""

    __slots__ = ("hop_by_hop", "reason")

    def __init__(self, hop_by_hop: int, reason: str) -> None:
        self.hop_by_hop = hop_by_hop
        self.reason = reason


class PeerRestarted(Event):
    """The peer's Origin-State-Id changed: sessions it owned before may be considered gone."""

    __slots__ = ("origin_host", "old_state_id", "new_state_id")

    def __init__(self, origin_host: str, old_state_id: int, new_state_id: int) -> None:
        self.origin_host = origin_host
        self.old_state_id = old_state_id
        self.new_state_id = new_state_id


class ConnectionClosed(Event):
    """The peer connection is over; `reason` says why (for logs, not for logic)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason
