"""The asyncio transport over real TCP on 127.0.0.1, with python-diameter (an independent stack) as client.

python-diameter builds and decodes the client's messages; a plain asyncio stream carries the bytes, so
the tests control exactly what is written when (pipelining, broken frames, silence).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct

import pytest
from diameter.message import Message as PdMessage
from diameter.message.commands.capabilities_exchange import CapabilitiesExchangeRequest
from diameter.message.commands.credit_control import CreditControlRequest
from diameter.message.commands.device_watchdog import DeviceWatchdogRequest
from diameter.message.commands.disconnect_peer import DisconnectPeerAnswer, DisconnectPeerRequest
from diameter.message.constants import APP_DIAMETER_CREDIT_CONTROL_APPLICATION, VENDOR_TGPP

from protocol.codec import FLAG_PROXIABLE, FLAG_REQUEST, Message, encode_answer, encode_message
from protocol.events import PeerOpened
from protocol.peer import PeerSettings
from protocol.transport import AnswerError, DiameterServer, PeerHandle

TIMEOUT = 10.0  # generous: a hang fails the test instead of blocking the run
SETTINGS = PeerSettings(origin_host="ocs.test.net", origin_realm="test.net", origin_state_id=3)


def cca(message: Message) -> bytes:
    return encode_answer(
        message,
        [
            ("Session-Id", message.session_id),
            ("Result-Code", 2001),
            ("Origin-Host", "ocs.test.net"),
            ("Origin-Realm", "test.net"),
            ("Auth-Application-Id", 4),
            ("CC-Request-Type", message.get("CC-Request-Type")),
            ("CC-Request-Number", message.get("CC-Request-Number")),
        ],
    )


class Handler:
    """Answers CCRs with 2001: synchronously, asynchronously (optionally held by a gate), or by failing."""

    def __init__(self, mode: str = "sync") -> None:
        self.mode = mode
        self.gate: asyncio.Event | None = None
        self.opened: list[PeerOpened] = []
        self.closed: list[PeerHandle] = []
        self.answers: list[Message] = []
        self.received = 0
        self.finished = 0

    def peer_opened(self, peer: PeerHandle, event: PeerOpened) -> None:
        self.opened.append(event)

    def peer_closed(self, peer: PeerHandle) -> None:
        self.closed.append(peer)

    def handle_answer(self, peer: PeerHandle, message: Message) -> None:
        self.answers.append(message)

    def handle_request(self, peer: PeerHandle, message: Message):
        self.received += 1
        if self.mode == "sync":
            return cca(message)
        if self.mode == "raise":
            raise RuntimeError("handler failed")
        return self._later(message)

    async def _later(self, message: Message) -> bytes:
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)
        self.finished += 1
        if self.mode == "async-raise":
            raise RuntimeError("handler failed later")
        return cca(message)


class Client:
    """A Diameter client made of python-diameter messages and an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.hop = 100

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def stamp(self, message: PdMessage) -> PdMessage:
        self.hop += 1
        message.header.hop_by_hop_identifier = self.hop
        message.header.end_to_end_identifier = 0x7000 + self.hop
        return message

    async def send(self, *messages: PdMessage | bytes) -> None:
        self.writer.write(b"".join(m if isinstance(m, bytes) else self.stamp(m).as_bytes() for m in messages))
        await self.writer.drain()

    async def read_raw(self) -> bytes:
        header = await asyncio.wait_for(self.reader.readexactly(20), TIMEOUT)
        length = struct.unpack("!I", b"\x00" + header[1:4])[0]
        return header + await asyncio.wait_for(self.reader.readexactly(length - 20), TIMEOUT)

    async def read(self) -> PdMessage:
        return PdMessage.from_bytes(await self.read_raw())

    async def read_until_eof(self) -> list[PdMessage]:
        """Everything the server still sends, then its close (a hang fails the test)."""
        data = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        out = []
        while data:
            length = struct.unpack("!I", b"\x00" + data[1:4])[0]
            out.append(PdMessage.from_bytes(data[:length]))
            data = data[length:]
        return out

    async def cer(self) -> PdMessage:
        cer = CapabilitiesExchangeRequest()
        cer.origin_host = b"pgw.client.net"
        cer.origin_realm = b"client.net"
        cer.host_ip_address = ["127.0.0.1"]
        cer.vendor_id = 10415
        cer.product_name = "python-diameter"
        cer.origin_state_id = 11
        cer.supported_vendor_id = [VENDOR_TGPP]
        cer.auth_application_id = [APP_DIAMETER_CREDIT_CONTROL_APPLICATION]
        await self.send(cer)
        return await self.read()

    def ccr(self, number: int = 0) -> CreditControlRequest:
        ccr = CreditControlRequest()
        ccr.header.is_proxyable = True
        ccr.header.application_id = APP_DIAMETER_CREDIT_CONTROL_APPLICATION  # python-diameter leaves it 0
        ccr.session_id = f"pgw.client.net;1;{number}"
        ccr.origin_host = b"pgw.client.net"
        ccr.origin_realm = b"client.net"
        ccr.destination_realm = b"test.net"
        ccr.auth_application_id = APP_DIAMETER_CREDIT_CONTROL_APPLICATION
        ccr.service_context_id = "32251@3gpp.org"
        ccr.cc_request_type = 1
        ccr.cc_request_number = number
        return ccr

    def dwr(self) -> DeviceWatchdogRequest:
        dwr = DeviceWatchdogRequest()
        dwr.origin_host = b"pgw.client.net"
        dwr.origin_realm = b"client.net"
        dwr.origin_state_id = 11
        return dwr

    def dpr(self) -> DisconnectPeerRequest:
        dpr = DisconnectPeerRequest()
        dpr.origin_host = b"pgw.client.net"
        dpr.origin_realm = b"client.net"
        dpr.disconnect_cause = 2
        return dpr

    def reset(self) -> None:
        """Drop the connection with a TCP RST (not a FIN, which the server treats as a half-close)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


async def start(handler: Handler, settings: PeerSettings = SETTINGS, **kwargs) -> DiameterServer:
    server = DiameterServer(settings, handler, **kwargs)
    await server.start("127.0.0.1", 0)
    assert server.port
    return server


async def until(condition, timeout: float = TIMEOUT) -> None:
    """Yield to the loop until `condition()` holds; a hang fails the test."""

    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(wait(), timeout)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_cer_request_dwr_dpr(mode):
    handler = Handler(mode)
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        cea = await client.cer()
        assert cea.result_code == 2001 and cea.origin_host == b"ocs.test.net"
        assert cea.auth_application_id == [4] and cea.supported_vendor_id == [VENDOR_TGPP]
        assert cea.origin_state_id == 3
        await until(lambda: len(server.peers) == 1)
        assert handler.opened == [PeerOpened("pgw.client.net", "client.net", 11, (4,))]
        assert server.peers[0].origin_host == "pgw.client.net"

        await client.send(client.ccr())
        answer = await client.read()
        assert answer.result_code == 2001 and answer.header.command_code == 272
        assert answer.header.hop_by_hop_identifier == client.hop and not answer.header.is_request
        assert answer.session_id == "pgw.client.net;1;0"

        await client.send(client.dwr())
        dwa = await client.read()
        assert (dwa.header.command_code, dwa.result_code) == (280, 2001)

        await client.send(client.dpr())
        dpa = await client.read()
        assert (dpa.header.command_code, dpa.result_code) == (282, 2001)
        assert await client.read_until_eof() == []  # the server closes after its DPA
        await until(lambda: handler.closed and not server.peers)
    finally:
        client.close()
        await server.shutdown(timeout=1)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_pipelined_requests_are_answered_with_batched_writes(mode):
    handler = Handler(mode)
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        writes_before = server.writes
        await client.send(*[client.ccr(n) for n in range(1000)])  # one write of 1000 requests
        answers = [await client.read() for _ in range(1000)]
        assert sorted(a.header.hop_by_hop_identifier for a in answers) == list(range(102, 1102))
        assert all(a.result_code == 2001 for a in answers)
        writes = server.writes - writes_before
        assert 1 <= writes <= 20, writes  # one write per loop tick, not one per answer
        assert server.in_flight == 0
    finally:
        client.close()
        await server.shutdown(timeout=1)


@pytest.mark.parametrize(
    ("first_bytes", "result_code"),
    [
        (b"\x01\x00\x00\x00", 5015),  # length 0
        (b"\x01\x00\x00\x07", 5015),  # length 7
        (b"\x02\x00\x00\x14", 5011),  # version 2
    ],
)
async def test_malformed_frame_is_answered_and_the_socket_closed(first_bytes, result_code):
    server = await start(Handler())
    client = await Client.connect(server.port)
    try:
        await client.cer()
        rest = (
            bytes([FLAG_REQUEST | FLAG_PROXIABLE]) + (272).to_bytes(3, "big") + struct.pack("!III", 4, 77, 78)
        )
        await client.send(first_bytes + rest + b"garbage that must never be parsed")
        (answer,) = await client.read_until_eof()
        assert answer.result_code == result_code and not answer.header.is_error
        assert (answer.header.hop_by_hop_identifier, answer.header.end_to_end_identifier) == (77, 78)
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_truncated_header_with_a_broken_length_just_closes():
    server = await start(Handler())
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await client.send(b"\x01\x00\x00\x00")
        assert await client.read_until_eof() == []
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_request_before_cer_closes_the_connection():
    server = await start(Handler())
    client = await Client.connect(server.port)
    try:
        await client.send(client.ccr())
        assert await client.read_until_eof() == []
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_silent_connection_is_closed_by_the_cer_timer():
    settings = PeerSettings(origin_host="ocs.test.net", origin_realm="test.net", cer_timeout_seconds=0.05)
    server = await start(Handler(), settings)
    client = await Client.connect(server.port)
    try:
        assert await client.read_until_eof() == []
    finally:
        client.close()
        await server.shutdown(timeout=1)


@pytest.mark.parametrize("mode", ["raise", "async-raise"])
async def test_failing_handler_gets_5012_and_the_connection_lives_on(mode, caplog):
    handler = Handler(mode)
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        with caplog.at_level(logging.ERROR, logger="protocol.transport"):
            await client.send(client.ccr(1))
            answer = await client.read()
        assert answer.result_code == 5012 and answer.session_id == "pgw.client.net;1;1"
        assert any("handler failed" in record.getMessage() for record in caplog.records)
        handler.mode = "sync"
        await client.send(client.ccr(2))
        assert (await client.read()).result_code == 2001
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_answers_of_a_lost_connection_are_dropped_quietly(caplog):
    handler = Handler("async-raise")
    handler.gate = asyncio.Event()
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await client.send(*[client.ccr(n) for n in range(3)])
        await until(lambda: server.in_flight == 3)
        client.reset()
        await until(lambda: handler.closed)
        with caplog.at_level(logging.ERROR):
            handler.gate.set()
            await until(lambda: server.in_flight == 0)
            assert handler.finished == 3
            gc.collect()
            await asyncio.sleep(0)
        assert not any("never retrieved" in record.getMessage() for record in caplog.records)
        assert not server._tasks and not server.peers
    finally:
        client.close()
        await server.shutdown(timeout=1)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_dpr_pipelined_behind_requests_is_answered_after_them(mode):
    server = await start(Handler(mode))
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await client.send(client.ccr(1), client.ccr(2), client.dpr())
        answers = await client.read_until_eof()
        assert [(a.header.command_code, a.result_code) for a in answers] == [
            (272, 2001),
            (272, 2001),
            (282, 2001),
        ]
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_half_closed_client_still_gets_its_answers():
    handler = Handler("async")
    handler.gate = asyncio.Event()
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await client.send(client.ccr(1), client.ccr(2))
        await until(lambda: server.in_flight == 2)
        client.writer.write_eof()
        handler.gate.set()
        answers = await client.read_until_eof()
        assert [a.result_code for a in answers] == [2001, 2001]
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_too_many_requests_in_flight_pause_reading():
    handler = Handler("async")
    handler.gate = asyncio.Event()
    server = await start(handler, max_in_flight_per_peer=4)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await until(lambda: len(server.peers) == 1)
        peer = server.peers[0]
        await client.send(*[client.ccr(n) for n in range(4)])
        await until(lambda: peer.reading_paused)
        assert server.in_flight == 4
        await client.send(*[client.ccr(n) for n in range(4, 10)])  # waits in the socket
        handler.gate.set()
        answers = [await client.read() for _ in range(10)]
        assert all(a.result_code == 2001 for a in answers)
        assert handler.received == 10 and not peer.reading_paused
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_server_request_resolves_with_the_matching_answer():
    handler = Handler()
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await until(lambda: len(server.peers) == 1)
        peer = server.peers[0]
        rar = encode_message(
            258,
            4,
            FLAG_REQUEST | FLAG_PROXIABLE,
            peer.next_hop_by_hop(),
            peer.next_end_to_end(),
            [
                ("Session-Id", "pgw.client.net;1;0"),
                ("Origin-Host", "ocs.test.net"),
                ("Origin-Realm", "test.net"),
                ("Destination-Realm", "client.net"),
                ("Destination-Host", "pgw.client.net"),
                ("Auth-Application-Id", 4),
                ("Re-Auth-Request-Type", 0),
            ],
        )
        future = peer.send_request(rar)
        received = await client.read()
        assert received.header.command_code == 258 and received.header.is_request
        raa = received.to_answer()
        raa.session_id = received.session_id
        raa.origin_host = b"pgw.client.net"
        raa.origin_realm = b"client.net"
        raa.result_code = 2002
        await client.send(raa.as_bytes())
        answer = await asyncio.wait_for(future, TIMEOUT)
        assert (
            answer.get("Result-Code") == 2002 and answer.hop_by_hop == received.header.hop_by_hop_identifier
        )

        lost = peer.send_request(encode_message(258, 4, FLAG_REQUEST, peer.next_hop_by_hop(), 1, []))
        await client.read()
        client.writer.transport.abort()
        with pytest.raises(AnswerError):
            await asyncio.wait_for(lost, TIMEOUT)
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_shutdown_sends_dpr_and_waits_for_the_answers_in_flight():
    handler = Handler("async")
    handler.gate = asyncio.Event()
    server = await start(handler)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await client.send(client.ccr(7))
        await until(lambda: server.in_flight == 1)
        stopping = asyncio.ensure_future(server.shutdown(timeout=TIMEOUT))

        dpr = await client.read()
        assert dpr.header.command_code == 282 and dpr.header.is_request and dpr.disconnect_cause == 0
        dpa = DisconnectPeerAnswer()
        dpa.header.hop_by_hop_identifier = dpr.header.hop_by_hop_identifier
        dpa.header.end_to_end_identifier = dpr.header.end_to_end_identifier
        dpa.result_code = 2001
        dpa.origin_host = b"pgw.client.net"
        dpa.origin_realm = b"client.net"
        await client.send(dpa.as_bytes())  # the DPA arrives while the CCR is still being handled

        await asyncio.sleep(0.01)
        assert not stopping.done()
        handler.gate.set()
        (answer,) = await client.read_until_eof()  # the CCA goes out, then the close
        assert answer.header.command_code == 272 and answer.result_code == 2001
        await asyncio.wait_for(stopping, TIMEOUT)
        assert server.in_flight == 0 and not server.peers and handler.closed
    finally:
        client.close()
        await server.shutdown(timeout=1)


async def test_shutdown_closes_peers_that_never_answer_the_dpr():
    settings = PeerSettings(
        origin_host="ocs.test.net", origin_realm="test.net", disconnect_timeout_seconds=0.05
    )
    server = await start(Handler(), settings)
    client = await Client.connect(server.port)
    try:
        await client.cer()
        await asyncio.wait_for(server.shutdown(timeout=TIMEOUT), TIMEOUT)
        (dpr,) = await client.read_until_eof()
        assert dpr.header.command_code == 282
        assert not server.peers
    finally:
        client.close()
