"""Throughput of BalanceStore.charge: sequential calls vs concurrent calls batched per event-loop tick.

Each measured call is a CCR-U that commits used units and reserves a new grant (the common Gy case: one
FCALL of the charge function with an XADD to the CDR stream). Sessions are opened with CCR-I first, outside the
measurement.

    .venv/bin/python benchmarks/lua_bench.py                      # embedded Valkey, durable (fsync always)
    .venv/bin/python benchmarks/lua_bench.py --fsync everysec     # embedded Valkey, fsync once a second
    .venv/bin/python benchmarks/lua_bench.py --url redis://host:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import msgspec
import uvloop

from balances.embedded import EmbeddedValkey
from balances.model import INITIAL, UPDATE, ChargeRequest, MsccCharge, Subscriber, Units
from balances.store import BalanceStore
from ratecards.schedule import RatingSchedule

SCHEDULE = msgspec.to_builtins(RatingSchedule(
    rating_group=10, unit="bytes", increment=1024, price_num=2_000, price_den=1, default_quota=1_048_576,
    max_quota=10_485_760, minor=10_000, rounding="up", allowances=("data",), version="bench",
))


def update(session: int, number: int, msisdn: str, partition: int) -> ChargeRequest:
    return ChargeRequest(
        session_id=f"bench;{session}", request_type=UPDATE, request_number=number, msisdn=msisdn, plan="demo",
        partition=partition, now_ms=1_700_000_000_000 + number,
        msccs=[MsccCharge(rating_group=10, schedule=SCHEDULE, requested=True,
                          used=Units(total=1_000_000, input=400_000, output=600_000), reporting_reason=3)],
    )


async def prepare(store: BalanceStore, sessions: int) -> list[tuple[str, int]]:
    subs = [(Subscriber(msisdn=f"4915{n:08d}", imsi=f"26201{n:010d}"), 10**15, {"data": 10**12})
            for n in range(sessions)]
    started = time.perf_counter()
    await store.provision_many(subs)
    elapsed = time.perf_counter() - started
    print(f"provision_many: {sessions} subscribers in {elapsed:.2f} s ({sessions / elapsed:,.0f}/s)")
    located = []
    for sub, _, _ in subs:
        location = await store.locate_msisdn(sub.msisdn)
        assert location is not None
        located.append((sub.msisdn, location.partition))
    opened = await asyncio.gather(*(
        store.charge(ChargeRequest(session_id=f"bench;{i}", request_type=INITIAL, request_number=0,
                                   msisdn=msisdn, plan="demo", partition=p, now_ms=1_700_000_000_000,
                                   msccs=[MsccCharge(rating_group=10, schedule=SCHEDULE, requested=True)],
                                   context={"apn": "internet"}))
        for i, (msisdn, p) in enumerate(located)))
    assert all(o.result_code == 2001 for o in opened)
    return located


async def sequential(store: BalanceStore, located: list[tuple[str, int]], calls: int) -> float:
    started = time.perf_counter()
    for n in range(calls):
        i = n % len(located)
        outcome = await store.charge(update(i, 1_000 + n // len(located), *located[i]))
        assert outcome.result_code == 2001
    return calls / (time.perf_counter() - started)


async def concurrent(store: BalanceStore, located: list[tuple[str, int]], calls: int, base: int) -> float:
    """One task per session, each sending its CCR-Us one after the other (as a gateway would)."""
    per_session = calls // len(located)

    async def session(i: int) -> None:
        for n in range(per_session):
            outcome = await store.charge(update(i, base + n, *located[i]))
            assert outcome.result_code == 2001 and not outcome.duplicate

    started = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(len(located))))
    return per_session * len(located) / (time.perf_counter() - started)


async def run(url: str, sessions: int, calls: int, sequential_calls: int) -> None:
    store = await BalanceStore.connect(url)
    await store.redis.flushall()
    await store.close()
    store = await BalanceStore.connect(url)
    located = await prepare(store, sessions)
    rate = await sequential(store, located[:100], sequential_calls)
    print(f"sequential: {sequential_calls} charge calls, one at a time: {rate:,.0f} ops/s")
    before_pipes, before_calls = store.pipelines_sent, store.calls_sent
    await store.redis.config_resetstat()
    cpu = time.process_time()
    rate = await concurrent(store, located, calls, base=1_000_000)
    cpu = time.process_time() - cpu
    fcall = (await store.redis.info("commandstats")).get("cmdstat_fcall", {})
    pipes = store.pipelines_sent - before_pipes
    batch = (store.calls_sent - before_calls) / max(pipes, 1)
    print(f"batched: {calls} charge calls from {sessions} concurrent sessions: {rate:,.0f} ops/s "
          f"({pipes} pipelines, {batch:.0f} calls per pipeline)")
    print(f"  per call: {fcall.get('usec_per_call', 0):.1f} µs in the server's FCALL, "
          f"{cpu / calls * 1e6:.1f} µs of this process's CPU")
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Redis/Valkey URL (default: a temporary embedded Valkey)")
    parser.add_argument("--fsync", default="always", choices=("always", "everysec", "no"),
                        help="appendfsync of the embedded Valkey (default: always, the durable setting)")
    parser.add_argument("--sessions", type=int, default=2_000, help="concurrent sessions (tasks)")
    parser.add_argument("--calls", type=int, default=100_000, help="charge calls in the batched run")
    parser.add_argument("--sequential-calls", type=int, default=5_000)
    args = parser.parse_args()
    uvloop.install()
    if args.url:
        asyncio.run(run(args.url, args.sessions, args.calls, args.sequential_calls))
        return
    with tempfile.TemporaryDirectory() as data, EmbeddedValkey(data, config={"appendfsync": args.fsync}) as server:
        print(f"embedded Valkey, appendonly yes, appendfsync {args.fsync}")
        asyncio.run(run(server.url, args.sessions, args.calls, args.sequential_calls))


if __name__ == "__main__":
    main()
