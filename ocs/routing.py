"""Server-initiated messages (RAR, ASR) routed to the peer that owns a session, on whichever OCS process holds
that peer's connection.

Theory of operation. Every CCR records in its session who owns it: the gateway's Origin-Host/-Realm
(Destination-Host/-Realm of a RAR/ASR) and the Origin-Host of the connected peer it came through (the
gateway itself, or a relay). A peer registry in Redis maps each connected peer to the process holding the
connection (`peer:<host>`, a lease this process refreshes while connected; taken over by the process a peer
reconnects to). Each process takes requests from its own queue (`ocsq:<process id>`, BLPOP on a connection of
its own) and answers each on a reply key (`ocsr:<request id>`). So a RAR/ASR for a session goes:

    ocs session reauth / ocs topup / plan change / any process
      → session owner (ses:{pNNN}:<id>) → peer registry → ocsq:<process> → that process sends the RAR
      → RAA → result on ocsr:<id> → the caller prints it

The process holding the connection sends the request itself (no queue hop). RAA/ASA 5002 means the gateway
does not know the session: it is closed (reservations released, closing CDR "abnormalRelease"). RAA 2001/2002
and ASA 2001 leave it open: the gateway follows with a CCR-U (RAR) or the CCR-T (ASR), charged as usual; a CCR
arriving while our RAR is outstanding is answered normally (the RAR/CCR collision of RFC 4006 §5.5).

The same registry records each peer's Origin-State-Id (`peerstate:<host>`), so a peer that reconnects to any
process with a new one is known to have restarted.

Speaks Diameter only through protocol.codec and PeerHandle.send_request; must not import ratecards/.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from balances.store import BalanceStore, SessionOwner
from ocs.clock import Clock
from protocol.codec import Message, encode_message

log = logging.getLogger(__name__)

REAUTH, ABORT = "reauth", "abort"
COMMANDS = {REAUTH: (258, "RAR"), ABORT: (274, "ASR")}
FLAG_REQUEST, FLAG_PROXIABLE = 0x80, 0x40
AUTHORIZE_ONLY = 0
UNKNOWN_SESSION_ID = 5002
CLOSE_CAUSE = "abnormalRelease"  # the gateway answered 5002: it has no such session
REPLY_TTL_MS = 60_000


class ServerRequestResult(msgspec.Struct, omit_defaults=True):
    """What became of one RAR/ASR: the answer's Result-Code, or why there was none."""

    session_id: str
    command: str  # "RAR" or "ASR"
    result_code: int | None = None
    closed: bool = False  # the session was closed because the gateway answered 5002
    peer: str = ""  # the connected peer it went to
    process: str = ""  # the OCS process that sent it
    error: str | None = None  # not sent, or no answer in time


class _QueuedRequest(msgspec.Struct):
    id: str
    kind: str
    session_id: str


_result_decoder = msgspec.json.Decoder(ServerRequestResult)
_request_decoder = msgspec.json.Decoder(_QueuedRequest)
_encoder = msgspec.json.Encoder()


def result_code_of(answer: Message) -> int | None:
    code = answer.get("Result-Code")
    if code is None:
        experimental = answer.find("Experimental-Result")
        if experimental is not None:
            code = experimental.get("Experimental-Result-Code")
    return code


async def forward(store: BalanceStore, kind: str, owner: SessionOwner, timeout: float) -> ServerRequestResult:
    """Puts the request on the queue of the process holding the owner's peer and waits for its result."""
    command = COMMANDS[kind][1]
    process = await store.peer_owner(owner.peer)
    if process is None:
        return ServerRequestResult(owner.session_id, command, peer=owner.peer,
                                   error=f"peer {owner.peer} is not connected to any OCS process")
    request_id = uuid.uuid4().hex
    await store.push_request(process, _encoder.encode(_QueuedRequest(request_id, kind, owner.session_id)),
                             int(timeout * 1000) + REPLY_TTL_MS)
    reply = await store.wait_reply(request_id, timeout)
    if reply is None:
        return ServerRequestResult(owner.session_id, command, peer=owner.peer, process=process,
                                   error=f"no result from OCS process {process} within {timeout:g} s")
    return _result_decoder.decode(reply)


async def send_server_request(store: BalanceStore, kind: str, session_id: str, timeout: float,
                              router: Router | None = None) -> ServerRequestResult:
    """A RAR (`reauth`) or ASR (`abort`) for one session, from anywhere: sent by `router` when this process
    holds the peer's connection, else through the queue of the process that does (waiting up to `timeout`
    for the answer, plus a margin for the hop)."""
    command = COMMANDS[kind][1]
    owner = await store.session_owner(session_id)
    if owner is None:
        return ServerRequestResult(session_id, command, error="unknown session")
    if owner.state != "open":
        return ServerRequestResult(session_id, command, peer=owner.peer, error="session is not open")
    if router is not None:
        handle = router.local_peer(owner.peer)
        if handle is not None:
            return await router.perform(kind, owner, handle)
    return await forward(store, kind, owner, timeout)


async def reauth_subscriber(store: BalanceStore, msisdn: str, timeout: float,
                            router: Router | None = None) -> list[ServerRequestResult]:
    """RAR to every open session of the subscriber: the hook after a top-up or a plan change, so gateways
    holding final units or a restricted state ask again at once. Raises UnknownSubscriber."""
    session_ids = await store.subscriber_sessions(msisdn)
    return list(await asyncio.gather(*(send_server_request(store, REAUTH, sid, timeout, router)
                                       for sid in session_ids)))


class Router:
    """The server side: holds this process's registry entries and queue, and sends RAR/ASR on its peers."""

    def __init__(self, store: BalanceStore, *, origin_host: str, origin_realm: str,
                 peers: Callable[[], list[Any]], clock: Clock, lease_seconds: float, answer_timeout: float,
                 on_peer_restart: Callable[[str, int, int], None] | None = None, metrics: Any = None) -> None:
        self.store = store
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.peers = peers  # the open PeerHandles of this process
        self.clock = clock
        self.lease_ms = int(lease_seconds * 1000)
        self.answer_timeout = answer_timeout
        self.on_peer_restart = on_peer_restart
        self.metrics = metrics
        self.process_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._stopping = False

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._refresh_leases()), loop.create_task(self._take_requests())]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.answer_timeout + 1)
        for host in {handle.origin_host for handle in self.peers() if handle.origin_host}:
            try:
                await self.store.release_peer(host, self.process_id)
            except Exception as exc:
                log.debug("could not release peer %s: %s", host, exc)

    def _spawn(self, awaitable: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refresh_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            hosts = {handle.origin_host for handle in self.peers() if handle.origin_host}
            try:
                await self.store.refresh_peers(hosts, self.process_id, self.lease_ms)
            except Exception as exc:
                log.warning("could not refresh the peer registry: %s", exc)

    async def _take_requests(self) -> None:
        while True:
            try:
                raw = await self.store.take_request(self.process_id, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not read the request queue: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if raw is not None:
                self._spawn(self._serve_queued(raw))

    # ---- peers -------------------------------------------------------------------------------------------

    def peer_opened(self, handle: Any, origin_state_id: int | None) -> None:
        """Claims the peer in the registry; a recorded Origin-State-Id that differs means it restarted."""
        if handle.origin_host:
            self._spawn(self._claim(handle.origin_host, origin_state_id, self.clock.now_ms()))

    async def _claim(self, host: str, state_id: int | None, opened_ms: int) -> None:
        try:
            previous = await self.store.claim_peer(host, self.process_id, self.lease_ms, state_id)
        except Exception as exc:
            log.warning("could not register peer %s: %s", host, exc)
            return
        if previous is not None and state_id is not None and previous != state_id \
                and self.on_peer_restart is not None:
            log.info("peer %s restarted (Origin-State-Id %d → %d)", host, previous, state_id)
            self.on_peer_restart(host, state_id, opened_ms)

    def peer_closed(self, handle: Any) -> None:
        host = handle.origin_host
        if host and not self._stopping and self.local_peer(host) is None:
            self._spawn(self.store.release_peer(host, self.process_id))

    def local_peer(self, host: str) -> Any | None:
        """An open connection of this process to `host`, if any."""
        wanted = host.lower()
        for handle in self.peers():
            if handle.is_open and (handle.origin_host or "").lower() == wanted:
                return handle
        return None

    # ---- requests ----------------------------------------------------------------------------------------

    async def request(self, kind: str, session_id: str) -> ServerRequestResult:
        """RAR/ASR for a session, sent here or by the process holding its peer."""
        return await send_server_request(self.store, kind, session_id, self.answer_timeout, self)

    async def _serve_queued(self, raw: bytes) -> None:
        try:
            queued = _request_decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("ignored a malformed queued request: %r", raw[:200])
            return
        command = COMMANDS.get(queued.kind, (0, "?"))[1]
        try:
            owner = await self.store.session_owner(queued.session_id)
            handle = self.local_peer(owner.peer) if owner is not None else None
            if owner is None or owner.state != "open":
                result = ServerRequestResult(queued.session_id, command, process=self.process_id,
                                             error="unknown session" if owner is None else "session is not open")
            elif handle is None:
                result = ServerRequestResult(queued.session_id, command, peer=owner.peer, process=self.process_id,
                                             error=f"peer {owner.peer} is not connected to OCS process "
                                                   f"{self.process_id}")
            else:
                result = await self.perform(queued.kind, owner, handle)
        except Exception as exc:
            log.exception("queued %s for %s failed", command, queued.session_id)
            result = ServerRequestResult(queued.session_id, command, process=self.process_id, error=str(exc))
        try:
            await self.store.post_reply(queued.id, _encoder.encode(result), REPLY_TTL_MS)
        except Exception as exc:
            log.warning("could not post the result of %s for %s: %s", command, queued.session_id, exc)

    def _build(self, kind: str, owner: SessionOwner, handle: Any) -> bytes:
        command_code, _ = COMMANDS[kind]
        avps: list = [
            ("Session-Id", owner.session_id),
            ("Origin-Host", self.origin_host),
            ("Origin-Realm", self.origin_realm),
            ("Destination-Realm", owner.origin_realm or handle.origin_realm or ""),
            ("Destination-Host", owner.origin_host or handle.origin_host),
            ("Auth-Application-Id", 4),
        ]
        if kind == REAUTH:
            avps.append(("Re-Auth-Request-Type", AUTHORIZE_ONLY))
        return encode_message(command_code, 4, FLAG_REQUEST | FLAG_PROXIABLE, handle.next_hop_by_hop(),
                              handle.next_end_to_end(), avps)

    async def perform(self, kind: str, owner: SessionOwner, handle: Any) -> ServerRequestResult:
        """Sends the RAR/ASR on `handle`, waits for the answer, closes the session on 5002."""
        command = COMMANDS[kind][1]
        result = ServerRequestResult(owner.session_id, command, peer=handle.origin_host or owner.peer,
                                     process=self.process_id)
        try:
            answer = await asyncio.wait_for(handle.send_request(self._build(kind, owner, handle)),
                                            self.answer_timeout)
        except TimeoutError:
            result.error = f"no {command[:2]}A within {self.answer_timeout:g} s"
        except Exception as exc:  # connection gone, peer not open
            result.error = f"{command} not delivered: {exc}"
        else:
            result.result_code = result_code_of(answer)
            if result.result_code == UNKNOWN_SESSION_ID:
                result.closed = await self.store.close_session(owner.session_id, CLOSE_CAUSE, self.clock.now_ms())
                if result.closed and self.metrics is not None:
                    self.metrics.sessions_closed.labels(CLOSE_CAUSE).inc()
        if self.metrics is not None:
            outcome = str(result.result_code) if result.result_code is not None else "none"
            self.metrics.server_requests.labels(command, outcome).inc()
        log.info("%s %s → %s", command, owner.session_id, result.error or result.result_code)
        return result
