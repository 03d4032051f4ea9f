"""Test support: a gateway over real TCP (the simulator's Gy client) that also answers the server's RAR/ASR,
in-process OCS servers sharing the test Valkey, and a TCP proxy to Redis that can stall or drop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from protocol.codec import Message, encode_answer, encode_message
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, GyClientProtocol, open_client

FLAG_RETRANSMIT = 0x10
DATA_RG, VOICE_RG, SMS_RG = 100, 200, 300
RAR, ASR = 258, 274


class Gateway:
    """One gateway connection. CCRs are built from arguments; every request the server sends (RAR, ASR) is
    queued in `requests` for the test to answer with `answer()`."""

    def __init__(self, client: GyClientProtocol) -> None:
        self.client = client
        self.requests: asyncio.Queue[Message] = asyncio.Queue()
        client.on_request = self.requests.put_nowait
        self.sent: dict[tuple[str, int], bytes] = {}  # (session, request number) → the bytes sent

    @classmethod
    async def connect(cls, port: int, origin_host: str = "pgw1.gw.test", origin_realm: str = "gw.test",
                      state_id: int = 1) -> Gateway:
        return cls(await open_client("127.0.0.1", port, origin_host, origin_realm, origin_state_id=state_id))

    @property
    def origin_host(self) -> str:
        return self.client.origin_host

    def _send(self, raw: bytes) -> asyncio.Future[Message]:
        hop = int.from_bytes(raw[12:16], "big")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.client.pending[hop] = future
        self.client.transport.write(raw)
        return future

    def _ids(self) -> tuple[int, int]:
        return next(self.client._hop) & 0xFFFFFFFF, next(self.client._e2e) & 0xFFFFFFFF

    async def request(self, avps: list, key: tuple[str, int] | None = None) -> Message:
        hop, e2e = self._ids()
        raw = encode_message(CCR, 4, FLAG_REQUEST | FLAG_PROXIABLE, hop, e2e, avps)
        if key is not None:
            self.sent[key] = raw
        return await asyncio.wait_for(self._send(raw), 10)

    async def resend(self, raw: bytes, retransmit: bool = True) -> Message:
        """The same request again (same End-to-End id), with a new Hop-by-Hop id and the T flag if asked."""
        hop, _ = self._ids()
        data = bytearray(raw)
        if retransmit:
            data[4] |= FLAG_RETRANSMIT
        data[12:16] = hop.to_bytes(4, "big")
        return await asyncio.wait_for(self._send(bytes(data)), 10)

    def ccr_avps(self, session_id: str, request_type: int, number: int, msisdn: str | None = None,
                 used: int | None = None, request_units: bool = True, rating_group: int = DATA_RG,
                 origin_host: str | None = None, used_seconds: int | None = None) -> list:
        avps: list = [
            ("Session-Id", session_id), ("Origin-Host", origin_host or self.client.origin_host),
            ("Origin-Realm", self.client.origin_realm), ("Destination-Realm", "test"), ("Auth-Application-Id", 4),
            ("Service-Context-Id", "32251@3gpp.org"), ("CC-Request-Type", request_type),
            ("CC-Request-Number", number),
        ]
        if msisdn is not None:
            avps.append(("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", msisdn)]))
        if request_type == 4:
            avps.append(("Requested-Action", 0))
        avps.append(("Multiple-Services-Indicator", 1))
        mscc: list = []
        if request_units:
            mscc.append(("Requested-Service-Unit", [("CC-Service-Specific-Units", 1)] if rating_group == SMS_RG
                         else []))
        if used is not None:
            mscc.append(("Used-Service-Unit", [("CC-Total-Octets", used)]))
        if used_seconds is not None:
            mscc.append(("Used-Service-Unit", [("CC-Time", used_seconds)]))
        mscc.append(("Rating-Group", rating_group))
        avps.append(("Multiple-Services-Credit-Control", mscc))
        if request_type == 3:
            avps.append(("Termination-Cause", 1))
        return avps

    async def ccr(self, session_id: str, request_type: int, number: int, msisdn: str | None = None, **options
                  ) -> Message:
        avps = self.ccr_avps(session_id, request_type, number, msisdn, **options)
        return await self.request(avps, (session_id, number))

    async def next_request(self, timeout: float = 10) -> Message:
        return await asyncio.wait_for(self.requests.get(), timeout)

    def answer(self, request: Message, result_code: int) -> None:
        """RAA/ASA (or any answer) to a request of the server."""
        self.client.transport.write(encode_answer(request, [
            ("Session-Id", request.session_id), ("Result-Code", result_code),
            ("Origin-Host", self.client.origin_host), ("Origin-Realm", self.client.origin_realm)]))

    def close(self) -> None:
        self.client.transport.close()


def mscc_of(answer: Message):
    return answer.find("Multiple-Services-Credit-Control")


def granted_octets(answer: Message) -> int | None:
    gsu = mscc_of(answer).find("Granted-Service-Unit")
    return None if gsu is None else gsu.get("CC-Total-Octets")


def cdr_records(directory: Path) -> list[dict]:
    records = []
    for path in sorted(directory.rglob("*.jsonl*")):
        records.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return records


async def wait_for(condition, timeout: float = 10.0, step: float = 0.02):
    """Polls an async condition until it is truthy (bounded, so a bug fails instead of hanging)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await condition()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(step)


class RedisProxy:
    """A TCP proxy in front of Redis that can stall (hold every byte) and drop (refuse connections)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def drop(self) -> None:
        """Stop listening and cut every connection: Redis is unreachable."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self.flowing.set()


async def start_app(valkey_url: str, data_dir: Path, clock=None, config_file: Path | None = None,
                    **settings: str):
    """An in-process `ocs serve` on a free port against the test Valkey (supervision only when swept by hand);
    `settings` are OCS_* environment variables on top of `config_file`."""
    from ocs.config import load_config
    from ocs.server import ServerApp

    environ = {"OCS_REDIS_URL": valkey_url, "OCS_PORT": "0", "OCS_METRICS_PORT": "0", "OCS_DATA_DIR": str(data_dir),
               "OCS_CHARGING__SUPERVISION_INTERVAL_SECONDS": "3600", **settings}
    app = ServerApp(load_config(config_file, environ=environ), clock)
    await app.start()
    return app
