"""The asyncio side of the Diameter peer layer: sockets, timers and handler calls around `PeerConnection`.

This is the only module of `protocol/` that imports asyncio. It stays thin on purpose (the aioquic
shape): bytes from the socket go into `PeerConnection.receive_data(now=loop.time())`, the events that
come out are turned into handler calls, everything the connection queued is written with a single
`transport.write` per loop tick, and one `loop.call_at` is kept armed at `get_timer()`.

Rules:
- The application's answer may come back synchronously (bytes: the fast path) or as an awaitable. A
  handler that raises, returns garbage or is cancelled gets a 5012 answer; it never ends the connection.
- Answers of one tick are collected in the connection and flushed by one `call_soon`, so pipelined
  requests cost one `write` per tick, not one per answer.
- When a peer has too many requests in the handler (or the socket buffer is full) we stop reading from
  it; TCP pushes back on the client.
- Every read is stamped with the loop time once (`PeerHandle.received_at`, not once per message), so a
  handler can tell how long a request waited in the process before it got to it and shed it (overload).
- When the socket goes, pending handler tasks may still finish (a charge in progress is not torn in
  half) but their answers are dropped; their results and exceptions are always retrieved.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from types import CoroutineType
from typing import Any, Protocol, cast

from protocol.codec import Message
from protocol.events import (
    AnswerReceived,
    AnswerUndecodable,
    ConnectionClosed,
    PeerOpened,
    PeerRestarted,
    RequestReceived,
)
from protocol.peer import DISCONNECT_REBOOTING, PeerConnection, PeerSettings, PeerState

__all__ = ["RequestHandler", "PeerHandle", "DiameterServer", "AnswerError"]

log = logging.getLogger(__name__)

_UNABLE_TO_COMPLY = 5012


class RequestHandler(Protocol):
    """What the application implements. `peer_restarted(peer, event)` and `handle_answer(peer, message)`
    are optional: define them to hear about Origin-State-Id changes and answers nobody awaited."""

    def peer_opened(self, peer: PeerHandle, event: PeerOpened) -> None: ...

    def peer_closed(self, peer: PeerHandle) -> None: ...

    def handle_request(self, peer: PeerHandle, message: Message) -> bytes | Awaitable[bytes]: ...


class AnswerError(ConnectionError):
    """A request of ours got no usable answer (connection lost, or the answer could not be decoded)."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Mark the outcome as seen so that an abandoned future never logs "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class PeerHandle:
    """The application's view of one peer connection."""

    __slots__ = ("_protocol", "remote_address", "connection")

    def __init__(self, protocol: _PeerProtocol, remote_address: str, connection: PeerConnection) -> None:
        self._protocol = protocol
        self.remote_address = remote_address
        self.connection = connection

    @property
    def origin_host(self) -> str | None:
        return self.connection.peer_origin_host

    @property
    def origin_realm(self) -> str | None:
        return self.connection.peer_origin_realm

    @property
    def is_open(self) -> bool:
        return self.connection.state is PeerState.OPEN and not self._protocol.lost

    @property
    def reading_paused(self) -> bool:
        """True while we stop reading from this peer (too many requests in flight, or a full socket)."""
        return self._protocol.reading_paused

    @property
    def in_flight(self) -> int:
        """This peer's requests handed to the handler and not yet answered."""
        return self._protocol.in_flight

    @property
    def received_at(self) -> float:
        """Loop time (`loop.time()`) of the last read from this peer. During `handle_request` it is when the
        bytes of the request being handed over were read: a handler keeps it to measure the request's wait."""
        return self._protocol.received_at

    def next_hop_by_hop(self) -> int:
        return self.connection.next_hop_by_hop()

    def next_end_to_end(self) -> int:
        return self.connection.next_end_to_end()

    def send_request(self, request: bytes) -> asyncio.Future[Message]:
        """Send a request of ours (RAR, ASR…); the future resolves with the answer matched by Hop-by-Hop.

        The future fails with `AnswerError` if the connection goes first; wrap it in `asyncio.wait_for`
        to bound the wait (a late answer then goes to `handler.handle_answer`, if defined).
        """
        return self._protocol.send_request(request)

    def __repr__(self) -> str:
        return f"PeerHandle({self.origin_host!r}, {self.remote_address!r}, {self.connection.state.name})"


class _PeerProtocol(asyncio.Protocol):
    """One accepted TCP connection: feeds its `PeerConnection` and acts on what comes out."""

    def __init__(self, server: DiameterServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.connection: PeerConnection | None = None
        self.handle: PeerHandle | None = None
        self.lost = False
        self.peer_eof = False
        self.opened = False
        self.in_flight = 0
        self.writes = 0
        self.received_at = 0.0  # loop time of the last read (one clock read per read, not per message)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._closing = False
        self._force_close_handle: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self._writing_paused = False

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peername = transport.get_extra_info("peername")
        remote = str(peername[0]) if peername else ""
        self.connection = PeerConnection(self.server.settings, remote, self.loop.time(), rng=self.server.rng)
        self.handle = PeerHandle(self, remote, self.connection)
        self.server._connections.add(self)
        if self.server.shutting_down:
            self.connection.disconnect(DISCONNECT_REBOOTING, self.loop.time())
        self._after_input()

    def data_received(self, data: bytes) -> None:
        assert self.connection is not None
        self.received_at = now = self.loop.time()
        self.connection.receive_data(data, now)
        self._after_input()

    def eof_received(self) -> bool | None:
        """The peer will send nothing more: write what is queued, and close once in-flight answers are out."""
        self.peer_eof = True
        self._flush()
        return True if self.in_flight else None  # None: asyncio closes the transport now

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.connection is not None and self.handle is not None
        self.lost = True
        self.connection.connection_lost(self.loop.time())
        self._drain_events()
        for handle in (self._timer, self._force_close_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._force_close_handle = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(AnswerError("peer connection lost before the answer"))
        self.server._connections.discard(self)
        if self.opened:
            self._call_handler("peer_closed", self.handle)
        self.server._changed()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # ------------------------------------------------------------------ core driving

    def _after_input(self) -> None:
        """After anything fed the connection: act on events, flush soon, re-arm the timer, maybe close."""
        self._drain_events()
        self._schedule_flush()
        self._arm_timer()

    def _drain_events(self) -> None:
        assert self.connection is not None and self.handle is not None
        while (event := self.connection.next_event()) is not None:
            if type(event) is RequestReceived:  # nearly every event: tested first, without isinstance
                if not self.lost:
                    self._dispatch(event.message)
            elif isinstance(event, AnswerReceived):
                self._take_answer(event.message)
            elif isinstance(event, PeerOpened):
                self.opened = True
                self.server._note_opened(self.handle, event)
                self._call_handler("peer_opened", self.handle, event)
            elif isinstance(event, PeerRestarted):
                self._call_handler("peer_restarted", self.handle, event)
            elif isinstance(event, AnswerUndecodable):
                future = self._pending.pop(event.hop_by_hop, None)
                if future is not None and not future.done():
                    future.set_exception(AnswerError(f"undecodable answer: {event.reason}"))
            elif isinstance(event, ConnectionClosed):
                log.info(
                    "peer %s (%s) closed: %s",
                    self.handle.origin_host,
                    self.handle.remote_address,
                    event.reason,
                )

    def _dispatch(self, message: Message) -> None:
        """Hand one request to the application; the common kinds of result are told apart by exact type.

        A coroutine gets a real Task (made with `loop.create_task`, not `ensure_future`): handlers may use
        `asyncio.timeout`, `current_task()` or cancellation, which a hand-stepped coroutine would break,
        and the Task costs only about 2 µs more per request than stepping it by hand (benchmarks/peer_bench.py).
        """
        self._track(+1)
        try:
            result = self.server.handler.handle_request(self.handle, message)
        except Exception:
            log.exception("request handler failed for %s", message.session_id)
            self._answer(message, None)
            return
        kind = type(result)
        if kind is CoroutineType:
            task: asyncio.Future[Any] = self.loop.create_task(result)
        elif kind is bytes:
            self._answer(message, result)
            return
        elif isinstance(result, bytes | bytearray | memoryview):
            self._answer(message, bytes(result))
            return
        elif inspect.isawaitable(result):
            task = asyncio.ensure_future(result, loop=self.loop)
        else:
            log.error("request handler returned %r instead of bytes", type(result).__name__)
            self._answer(message, None)
            return
        self.server._tasks.add(task)
        task.add_done_callback(partial(self._answer_done, message))

    def _answer_done(self, message: Message, task: asyncio.Future[Any]) -> None:
        self.server._tasks.discard(task)
        answer: bytes | None = None
        try:
            result = task.result()
        except asyncio.CancelledError:
            log.warning("request handler was cancelled for %s", message.session_id)
        except Exception as exc:
            log.error("request handler failed for %s", message.session_id, exc_info=exc)
        else:
            if type(result) is bytes:
                answer = result
            elif isinstance(result, bytes | bytearray | memoryview):
                answer = bytes(result)
            else:
                log.error("request handler returned %r instead of bytes", type(result).__name__)
        self._answer(message, answer)

    def _answer(self, message: Message, answer: bytes | None) -> None:
        """Queue one application answer (None: the handler failed → 5012) and schedule the flush."""
        self._track(-1)
        if self.lost:
            return
        assert self.connection is not None
        if answer is None:
            answer = self.connection.build_error_answer(
                message, _UNABLE_TO_COMPLY, error_message="request could not be processed"
            )
        self.connection.send_answer(answer)
        self._schedule_flush()

    def _track(self, delta: int) -> None:
        self.in_flight += delta
        self.server._in_flight += delta
        if delta > 0:
            if self.in_flight >= self.server.max_in_flight_per_peer:
                self._update_reading()
        else:
            if self.reading_paused:
                self._update_reading()
            self.server._changed()

    def _take_answer(self, message: Message) -> None:
        future = self._pending.pop(message.hop_by_hop, None)
        if future is not None and not future.done():
            future.set_result(message)
        else:
            self._call_handler("handle_answer", self.handle, message)

    def _call_handler(self, name: str, *args: Any) -> None:
        method: Callable[..., Any] | None = getattr(self.server.handler, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            log.exception("handler.%s failed", name)

    # ------------------------------------------------------------------ output, timers, closing

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self.lost:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.lost or self.transport is None or self.connection is None:
            return
        data = self.connection.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
            self.writes += 1
            self.server.writes += 1
        self._maybe_close()

    def _maybe_close(self) -> None:
        assert self.connection is not None and self.transport is not None
        if not (self.connection.should_close or self.peer_eof) or self._closing:
            return
        if self.in_flight and self._force_close_handle is None:
            # Let the answers already being computed go out first, but not forever.
            grace = self.server.settings.disconnect_timeout_seconds
            self._force_close_handle = self.loop.call_later(grace, self._close_now)
        if not self.in_flight:
            self._close_now()

    def _close_now(self) -> None:
        if self._closing or self.lost or self.transport is None or self.connection is None:
            return
        self._closing = True
        data = self.connection.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
            self.writes += 1
            self.server.writes += 1
        self.transport.close()

    def _arm_timer(self) -> None:
        assert self.connection is not None
        when = None if self.lost else self.connection.get_timer()
        if when is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        # A later deadline keeps the armed timer: it fires early, finds nothing due and re-arms.
        if self._timer_at is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        assert self.connection is not None
        scheduled = self._timer_at or 0.0
        self._timer = self._timer_at = None
        # call_at may run a little before `when`; the core must still see its deadline as reached.
        self.connection.handle_timer(max(self.loop.time(), scheduled))
        self._after_input()

    def _update_reading(self) -> None:
        if self.transport is None or self.lost or self.transport.is_closing():
            return
        limit = self.server.max_in_flight_per_peer
        if not self.reading_paused and (self._writing_paused or self.in_flight >= limit):
            self.reading_paused = True
            self.transport.pause_reading()
        elif self.reading_paused and not self._writing_paused and self.in_flight <= limit // 2:
            self.reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ used by PeerHandle / server

    def send_request(self, request: bytes) -> asyncio.Future[Message]:
        assert self.connection is not None
        if self.lost:
            raise AnswerError("peer connection is closed")
        self.connection.send_request(request, self.loop.time())
        future: asyncio.Future[Message] = self.loop.create_future()
        future.add_done_callback(_retrieve)
        self._pending[int.from_bytes(request[12:16], "big")] = future
        self._schedule_flush()
        return future

    def stop(self, cause: int) -> None:
        """Start an orderly disconnect (DPR), or close at once if the peer never sent its CER."""
        assert self.connection is not None
        if self.lost:
            return
        self.connection.disconnect(cause, self.loop.time())
        self._after_input()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class DiameterServer:
    """Listens for Diameter peers and runs one `PeerConnection` per accepted TCP connection."""

    def __init__(
        self,
        settings: PeerSettings,
        handler: RequestHandler,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_in_flight_per_peer: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self._loop = loop
        self.max_in_flight_per_peer = max_in_flight_per_peer
        self.rng = rng if rng is not None else random.Random()
        self.port = 0
        self.writes = 0  # transport.write calls so far (normally one per connection per loop tick)
        self.shutting_down = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_PeerProtocol] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._in_flight = 0
        self._state_ids: dict[str, int] = {}
        self._change: asyncio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def peers(self) -> list[PeerHandle]:
        """Peers whose capabilities exchange succeeded and whose connection is still up."""
        return [p.handle for p in self._connections if p.opened and p.handle is not None]

    @property
    def in_flight(self) -> int:
        """Requests handed to the handler whose answer is not yet queued."""
        return self._in_flight

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on host:port (port 0 picks a free one; `.port` tells which)."""
        self._change = asyncio.Event()
        self._server = await self.loop.create_server(
            lambda: _PeerProtocol(self), host, port, reuse_port=reuse_port or None
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, DPR every peer, let in-flight answers go out, wait for DPAs, close the rest."""
        loop = self.loop
        deadline = loop.time() + timeout
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for protocol in list(self._connections):
            protocol.stop(DISCONNECT_REBOOTING)
        await self._wait_until(lambda: self._in_flight == 0, deadline)
        for protocol in list(self._connections):
            protocol._flush()
        await self._wait_until(lambda: not self._connections, deadline)
        for protocol in list(self._connections):
            protocol.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        await self._wait_until(lambda: not self._connections, loop.time() + 1.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def _wait_until(self, condition: Callable[[], bool], deadline: float) -> bool:
        if self._change is None:
            self._change = asyncio.Event()
        while not condition():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), remaining)
            except TimeoutError:
                return condition()
        return True

    def _changed(self) -> None:
        change = self._change
        if change is not None and not change.is_set():  # set once per wait, not once per answer
            change.set()

    def _note_opened(self, handle: PeerHandle, event: PeerOpened) -> None:
        """A restart seen across connections: the same Origin-Host comes back with a new Origin-State-Id."""
        if event.origin_state_id is None:
            return
        key = event.origin_host.lower()
        old = self._state_ids.get(key)
        self._state_ids[key] = event.origin_state_id
        if old is not None and old != event.origin_state_id:
            restarted = PeerRestarted(event.origin_host, old, event.origin_state_id)
            method = getattr(self.handler, "peer_restarted", None)
            if method is not None:
                try:
                    method(handle, restarted)
                except Exception:
                    log.exception("handler.peer_restarted failed")
