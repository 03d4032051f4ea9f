"""A Gy load client: many CCR-I/U/T sessions over real TCP, measuring throughput and latency.

It speaks only standard Diameter (CER/CEA, DWR/DWA, DPR/DPA, CCR/CCA on application 4), so it can be
pointed at any OCS. It also checks every answer against its request (hop-by-hop, result code, one MSCC per
MSCC asked) and counts mismatches.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.codec import Message, decode_message, encode_answer, encode_message
from protocol.framing import ReceiveBuffer

CER, DWR, DPR, CCR = 257, 280, 282, 272
FLAG_REQUEST, FLAG_PROXIABLE = 0x80, 0x40


@dataclass
class SimulationSettings:
    host: str = "127.0.0.1"
    port: int = 3868
    sessions: int = 100
    updates: int = 3
    concurrency: int = 50
    connections: int = 1
    msisdns: list[str] = field(default_factory=lambda: ["491700000001"])
    rating_group: int = 10
    used_octets: int = 500_000
    destination_realm: str = "test"
    origin_realm: str = "sim.test"
    timeout: float = 10.0


class GyClientProtocol(asyncio.Protocol):
    """One gateway connection: sends requests, matches answers by hop-by-hop, answers DWR."""

    def __init__(self, origin_host: str, origin_realm: str) -> None:
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.buffer = ReceiveBuffer(max_message_length=1 << 20)
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.disconnect_causes: list[int] = []  # Disconnect-Cause of every DPR the server sent
        # other requests from the server (RAR, ASR): given to this callable, which writes the answer
        self.on_request: Callable[[Message], None] | None = None
        self._hop = itertools.count(int.from_bytes(os.urandom(3), "big") << 8)
        self._e2e = itertools.count((int(time.time()) & 0xFFF) << 20)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self.pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer.feed(data)
        while (frame := self.buffer.next_frame()) is not None:
            message = decode_message(frame)
            if message.is_request:
                if message.command_code == DWR:
                    self.transport.write(encode_answer(message, [
                        ("Result-Code", 2001), ("Origin-Host", self.origin_host),
                        ("Origin-Realm", self.origin_realm)]))
                elif message.command_code == DPR:
                    self.disconnect_causes.append(message.get("Disconnect-Cause"))
                    self.transport.write(encode_answer(message, [
                        ("Result-Code", 2001), ("Origin-Host", self.origin_host),
                        ("Origin-Realm", self.origin_realm)]))
                elif self.on_request is not None:
                    self.on_request(message)
                continue
            future = self.pending.pop(message.hop_by_hop, None)
            if future is not None and not future.done():
                future.set_result(message)

    def request(self, command_code: int, application_id: int, avps: list, flags: int = FLAG_REQUEST
                ) -> asyncio.Future[Message]:
        hop = next(self._hop) & 0xFFFFFFFF
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.pending[hop] = future
        self.transport.write(encode_message(command_code, application_id, flags, hop,
                                            next(self._e2e) & 0xFFFFFFFF, avps))
        return future


async def open_client(host: str, port: int, origin_host: str, origin_realm: str,
                      origin_state_id: int | None = None) -> GyClientProtocol:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: GyClientProtocol(origin_host, origin_realm), host, port)
    cea = await asyncio.wait_for(client.request(CER, 0, [
        ("Origin-Host", origin_host), ("Origin-Realm", origin_realm), ("Host-IP-Address", "127.0.0.1"),
        ("Vendor-Id", 0), ("Product-Name", "ocs-simulator"),
        ("Origin-State-Id", int(time.time()) if origin_state_id is None else origin_state_id),
        ("Supported-Vendor-Id", 10415), ("Auth-Application-Id", 4)]), 10)
    if cea.get("Result-Code") != 2001:
        raise ConnectionError(f"CER rejected with {cea.get('Result-Code')}")
    return client


async def close_client(client: GyClientProtocol) -> None:
    try:
        await asyncio.wait_for(client.request(DPR, 0, [
            ("Origin-Host", client.origin_host), ("Origin-Realm", client.origin_realm),
            ("Disconnect-Cause", 0)]), 5)
    except (TimeoutError, ConnectionError):
        pass
    client.transport.close()


def ccr_avps(session_id: str, client: GyClientProtocol, request_type: int, number: int, msisdn: str,
             settings: SimulationSettings, used: int | None, request_units: bool) -> list:
    avps: list = [
        ("Session-Id", session_id), ("Origin-Host", client.origin_host), ("Origin-Realm", client.origin_realm),
        ("Destination-Realm", settings.destination_realm), ("Auth-Application-Id", 4),
        ("Service-Context-Id", "32251@3gpp.org"), ("CC-Request-Type", request_type),
        ("CC-Request-Number", number),
    ]
    if request_type == 1:
        avps.append(("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", msisdn)]))
        avps.append(("Multiple-Services-Indicator", 1))
    mscc: list = []
    if request_units:
        mscc.append(("Requested-Service-Unit", []))
    if used is not None:
        mscc.append(("Used-Service-Unit", [("CC-Total-Octets", used)]))
    mscc.append(("Rating-Group", settings.rating_group))
    avps.append(("Multiple-Services-Credit-Control", mscc))
    return avps


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.results: dict[str, int] = {}
        self.errors = 0
        self.timeouts = 0
        self.mismatches = 0

    def record(self, started: float, answer: Message, expect_msccs: int) -> None:
        self.latencies.append(time.perf_counter() - started)
        code = answer.get("Result-Code")
        self.results[str(code)] = self.results.get(str(code), 0) + 1
        if code == 2001 and len(answer.find_all("Multiple-Services-Credit-Control")) != expect_msccs:
            self.mismatches += 1


async def run_session(client: GyClientProtocol, index: int, settings: SimulationSettings,
                      recorder: Recorder) -> None:
    msisdn = settings.msisdns[index % len(settings.msisdns)]
    session_id = f"{client.origin_host};{int(time.time())};{index}"
    steps = [(1, None, True)] + [(2, settings.used_octets, True)] * settings.updates + [
        (3, settings.used_octets, False)]
    for number, (request_type, used, request_units) in enumerate(steps):
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(client.request(CCR, 4, ccr_avps(
                session_id, client, request_type, number, msisdn, settings, used, request_units),
                FLAG_REQUEST | FLAG_PROXIABLE), settings.timeout)
        except TimeoutError:
            recorder.timeouts += 1
            return
        except ConnectionError:
            recorder.errors += 1
            return
        recorder.record(started, answer, 1)
        if answer.get("Result-Code") != 2001:
            return


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_simulation(settings: SimulationSettings) -> dict:
    """Run the sessions and return the report (requests/s, latency percentiles in ms, results)."""
    clients = [
        await open_client(settings.host, settings.port, f"gw{n}.sim.test", settings.origin_realm)
        for n in range(settings.connections)
    ]
    recorder = Recorder()
    semaphore = asyncio.Semaphore(settings.concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            await run_session(clients[index % len(clients)], index, settings, recorder)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(settings.sessions)))
    seconds = time.perf_counter() - started
    for client in clients:
        await close_client(client)
    latencies = sorted(recorder.latencies)
    requests = len(latencies)
    return {
        "requests": requests,
        "seconds": seconds,
        "requests_per_second": requests / seconds if seconds else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 0.50) * 1000,
            "p90": percentile(latencies, 0.90) * 1000,
            "p99": percentile(latencies, 0.99) * 1000,
            "p999": percentile(latencies, 0.999) * 1000,
            "max": (latencies[-1] * 1000) if latencies else 0.0,
        },
        "results": recorder.results,
        "errors": recorder.errors,
        "timeouts": recorder.timeouts,
        "mismatches": recorder.mismatches,
    }
