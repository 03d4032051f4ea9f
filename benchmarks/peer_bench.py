"""Micro-benchmark of the per-request cost of the peer layer, without charging and without Redis.

Measures (1) the sans-IO `PeerConnection` alone: a batch of CCR frames in, `RequestReceived` events out,
the answers back in through `send_answer`, one `data_to_send()`; and (2) the asyncio transport over real
loopback TCP with a handler that answers at once (bytes) or from a coroutine that awaits a future
resolved in a later tick (the shape of the real charge path), measured as server-process CPU per request
(client and server share the process; the figure includes the client, so compare it across runs); and (3)
what scheduling a handler's coroutine costs: a Task made by `ensure_future` or `create_task`, or the
coroutine stepped by hand (what the transport does not do: handlers may need a current task).

    .venv/bin/python benchmarks/peer_bench.py
"""

from __future__ import annotations

import asyncio
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402
from codec_bench import build_ccr_u  # noqa: E402

from protocol.codec import decode_message, encode_answer, encode_message  # noqa: E402
from protocol.events import RequestReceived  # noqa: E402
from protocol.peer import PeerConnection, PeerSettings  # noqa: E402
from protocol.transport import DiameterServer  # noqa: E402
from simulators.gy import GyClientProtocol  # noqa: E402

SETTINGS = PeerSettings(origin_host="ocs.bench", origin_realm="bench", application_commands={4: frozenset({272})})
CER_AVPS = [("Origin-Host", "gw.bench"), ("Origin-Realm", "bench"), ("Host-IP-Address", "127.0.0.1"),
            ("Vendor-Id", 0), ("Product-Name", "bench"), ("Auth-Application-Id", 4)]
BATCH = 100


def ccr_frames(count: int) -> bytes:
    template = bytearray(build_ccr_u())
    frames = []
    for hop in range(count):
        template[12:16] = hop.to_bytes(4, "big")
        frames.append(bytes(template))
    return b"".join(frames)


def sans_io_per_request() -> float:
    """µs per request through PeerConnection: frame, header checks, decode, validate, event, answer queue."""
    connection = PeerConnection(SETTINGS, "127.0.0.1", now=0.0)
    connection.receive_data(encode_message(257, 0, 0x80, 1, 1, CER_AVPS), 0.0)
    connection.data_to_send()
    while connection.next_event() is not None:
        pass
    data = ccr_frames(BATCH)
    answer = encode_answer(decode_message(build_ccr_u()), [("Result-Code", 2001)])

    def one_batch() -> None:
        connection.receive_data(data, 1.0)
        while (event := connection.next_event()) is not None:
            if type(event) is RequestReceived:
                connection.send_answer(answer)
        connection.data_to_send()

    return min(timeit.repeat(one_batch, number=200, repeat=5)) / (200 * BATCH) * 1e6


class Handler:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.answer = b""
        self.waiting: list[asyncio.Future] = []
        self.release_scheduled = False

    def peer_opened(self, peer, event) -> None:
        pass

    def peer_closed(self, peer) -> None:
        pass

    def handle_request(self, peer, message):
        if not self.answer:
            self.answer = encode_answer(message, [("Result-Code", 2001)])
        answer = self.answer[:12] + message.raw[12:20] + self.answer[20:]  # this request's ids
        if self.mode == "bytes":
            return answer
        return self._later(answer)

    async def _later(self, answer: bytes) -> bytes:
        # like BalanceStore: one future per call, all resolved together in a later tick
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append(future)
        if not self.release_scheduled:
            self.release_scheduled = True
            loop.call_soon(self._release)
        await future
        return answer

    def _release(self) -> None:
        self.release_scheduled = False
        waiting, self.waiting = self.waiting, []
        for future in waiting:
            future.set_result(None)


async def transport_per_request(mode: str, requests: int = 40_000, in_flight: int = 200) -> tuple[float, float]:
    """(µs of CPU per request, requests/s), the client in the same process and included in the CPU."""
    loop = asyncio.get_running_loop()
    server = DiameterServer(SETTINGS, Handler(mode))
    await server.start("127.0.0.1", 0)
    _, client = await loop.create_connection(lambda: GyClientProtocol("gw.bench", "bench"), "127.0.0.1",
                                             server.port)
    await client.request(257, 0, CER_AVPS)
    avps = [(name, value) for name, value in [("Session-Id", "s;1"), ("Origin-Host", "gw.bench"),
                                              ("Origin-Realm", "bench"), ("Destination-Realm", "bench"),
                                              ("Auth-Application-Id", 4), ("CC-Request-Type", 2),
                                              ("CC-Request-Number", 1)]]
    semaphore = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with semaphore:
            await client.request(272, 4, avps, 0xC0)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    client.transport.close()
    await server.shutdown(timeout=1)
    return cpu / requests * 1e6, requests / wall


async def _scheduling(mode: str, requests: int = 100_000, per_tick: int = 200) -> float:
    """µs per request to run a handler coroutine that awaits one future resolved a tick later, when the
    coroutine is given to `asyncio.ensure_future`, to `loop.create_task`, or stepped by hand (no Task)."""
    loop = asyncio.get_running_loop()
    done = 0

    async def handler(future: asyncio.Future) -> bytes:
        return await future

    def finished(task: asyncio.Future) -> None:
        nonlocal done
        task.result()
        done += 1

    def step(coroutine, _future: asyncio.Future | None = None) -> None:
        nonlocal done
        try:
            awaited = coroutine.send(None)
        except StopIteration:
            done += 1
            return
        awaited._asyncio_future_blocking = False
        awaited.add_done_callback(lambda f: step(coroutine, f))

    started = time.perf_counter()
    for _ in range(requests // per_tick):
        futures = [loop.create_future() for _ in range(per_tick)]
        for future in futures:
            coroutine = handler(future)
            if mode == "ensure_future":
                asyncio.ensure_future(coroutine).add_done_callback(finished)
            elif mode == "create_task":
                loop.create_task(coroutine).add_done_callback(finished)
            else:
                step(coroutine)
        await asyncio.sleep(0)
        for future in futures:
            future.set_result(b"")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    while done < requests:
        await asyncio.sleep(0)
    return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    print(f"sans-IO PeerConnection, CCR-U of {len(build_ccr_u())} B, {BATCH} per read: "
          f"{sans_io_per_request():6.2f} µs/request")
    for mode in ("ensure_future", "create_task", "by hand"):
        print(f"scheduling a coroutine answer with {mode:<13} (future + set_result included): "
              f"{uvloop.run(_scheduling(mode)):5.2f} µs/request")
    for mode in ("bytes", "coroutine"):
        cpu, rate = uvloop.run(transport_per_request(mode))
        print(f"transport + client over loopback, handler returns {mode:<9}: {cpu:6.2f} µs CPU/request "
              f"(client included), {rate:,.0f} requests/s")


if __name__ == "__main__":
    main()
