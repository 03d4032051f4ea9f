"""Is the cost of a CCR-U flat in the number of provisioned subscribers and of open sessions?

One embedded Valkey (AOF on, fsync always as shipped unless --fsync). For each population level (1k, 100k,
1M subscribers by default; each level adds to the previous one, pipelined `BalanceStore.provision_many`
in concurrent chunks) and each open-session level (1k, 100k; sessions spread evenly over the population,
opened with CCR-I through `BalanceStore.charge`), the same measured load: `--calls` CCR-U (commit used units,
reserve a new grant, CDR and ledger XADD; the session located through `locate_session` as the server does)
from `--concurrency` tasks, each on its own slice of the open sessions, picked at random. Reported per cell:
charge calls/s, Valkey's µs per FCALL (INFO commandstats, reset before the measured load), Valkey's CPU per
call (INFO cpu, so AOF writes and networking are in), this process's CPU per call, and used_memory. After
the largest session level every session is closed with CCR-T (so the next population starts with none).

    .venv/bin/python benchmarks/scale_flat.py                                  # 1k, 100k, 1M × 1k, 100k
    .venv/bin/python benchmarks/scale_flat.py --subscribers 1000,100000 --sessions 1000 --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import uvloop  # noqa: E402

from balances import keys  # noqa: E402
from balances.embedded import EmbeddedValkey  # noqa: E402
from balances.model import INITIAL, TERMINATION, UPDATE, ChargeRequest, MsccCharge, Subscriber, Units  # noqa: E402
from balances.store import BalanceStore  # noqa: E402
from ratecards.schedule import RatingSchedule  # noqa: E402

SCHEDULE = msgspec.to_builtins(RatingSchedule(
    rating_group=100, unit="bytes", increment=1024, price_num=2_000, price_den=1, default_quota=1_048_576,
    max_quota=10_485_760, minor=10_000, rounding="up", allowances=("data",), version="bench",
))
NOW = 1_700_000_000_000
SPREAD = 1_000_003  # a prime, coprime with every population level: session i goes to subscriber i × SPREAD mod N
CONTEXT = {"originHost": "pgw1.gw.test", "servedIMSI": "262010000000001", "apn": "internet",
           "chargingID": "12345", "servingNodePLMN": "26201", "ratType": 6}


def msisdn_of(n: int) -> str:
    return f"49{n:010d}"


class Session:
    __slots__ = ("session_id", "msisdn", "partition", "number")

    def __init__(self, session_id: str, msisdn: str, partition: int) -> None:
        self.session_id = session_id
        self.msisdn = msisdn
        self.partition = partition
        self.number = 0


def request(session: Session, request_type: int) -> ChargeRequest:
    used = None if request_type == INITIAL else Units(total=1_000_000, input=400_000, output=600_000)
    return ChargeRequest(
        session_id=session.session_id, request_type=request_type, request_number=session.number,
        msisdn=session.msisdn, plan="demo", partition=session.partition, now_ms=NOW + session.number,
        origin_host="pgw1.gw.test", origin_realm="gw.test", end_to_end=session.number,
        msccs=[MsccCharge(rating_group=100, schedule=SCHEDULE, requested=request_type != TERMINATION, used=used,
                          reporting_reason=None if used is None else 3)],
        termination_cause=1 if request_type == TERMINATION else None,
        context=CONTEXT if request_type == INITIAL else {},
    )


async def provision(store: BalanceStore, start: int, stop: int, chunks_in_flight: int = 4) -> float:
    """Subscribers start..stop-1; returns seconds. Chunks of 1,000 go `chunks_in_flight` at a time."""
    began = time.perf_counter()
    chunk = 1000

    def rows(first: int) -> list[tuple]:
        return [(Subscriber(msisdn=msisdn_of(n), imsi=f"26201{n:010d}", plan="demo"), 10**15, {"data": 10**15})
                for n in range(first, min(first + chunk, stop))]

    firsts = list(range(start, stop, chunk))
    for at in range(0, len(firsts), chunks_in_flight):
        created = await asyncio.gather(*(store.provision_many(rows(f)) for f in firsts[at:at + chunks_in_flight]))
        assert sum(created) == sum(min(f + chunk, stop) - f for f in firsts[at:at + chunks_in_flight])
    return time.perf_counter() - began


async def charge_all(store: BalanceStore, sessions: list[Session], request_type: int, width: int = 2000) -> None:
    for at in range(0, len(sessions), width):
        part = sessions[at:at + width]
        outcomes = await asyncio.gather(*(store.charge(request(s, request_type)) for s in part))
        bad = [o.result_code for o in outcomes if o.result_code != 2001]
        if bad:
            raise SystemExit(f"{len(bad)} of {len(part)} answered {sorted(set(bad))}")
        for session in part:
            session.number += 1


async def measured(store: BalanceStore, sessions: list[Session], calls: int, concurrency: int,
                   seed: int) -> tuple[float, float]:
    """CCR-U from `concurrency` tasks on disjoint slices; returns (calls/s, client CPU µs per call)."""
    per_task = calls // concurrency
    slices = [sessions[i::concurrency] for i in range(concurrency)]

    async def task(mine: list[Session], rng: random.Random) -> None:
        for _ in range(per_task):
            session = rng.choice(mine)
            location = await store.locate_session(session.session_id)
            assert location is not None
            outcome = await store.charge(request(session, UPDATE))
            assert outcome.result_code == 2001 and not outcome.duplicate, outcome
            session.number += 1

    cpu, began = time.process_time(), time.perf_counter()
    await asyncio.gather(*(task(s, random.Random(seed + i)) for i, s in enumerate(slices)))
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    return per_task * concurrency / seconds, cpu / (per_task * concurrency) * 1e6


async def trim_cdrs(store: BalanceStore) -> None:
    """Empty the CDR streams as the CDR writer would (it is not running here), so memory stays in check."""
    for partition in range(store.partitions):
        await store.redis.xtrim(keys.cdr_key(partition), maxlen=0, approximate=False)


async def valkey_cpu(store: BalanceStore) -> float:
    info = await store.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(url: str, args: argparse.Namespace) -> list[dict]:
    store = await BalanceStore.connect(url)
    await store.ready()
    rows: list[dict] = []
    provisioned = 0
    for population in args.subscribers:
        seconds = await provision(store, provisioned, population)
        if population > provisioned:
            rate = (population - provisioned) / seconds
            print(f"provisioned subscribers {provisioned:,}..{population - 1:,} in {seconds:.1f} s "
                  f"({rate:,.0f}/s)", flush=True)
        provisioned = population
        sessions: list[Session] = []
        for level in args.sessions:
            new = []
            for i in range(len(sessions), level):
                msisdn = msisdn_of(i * SPREAD % population)  # a bijection: spread over the whole population
                new.append(Session(f"pgw1.gw.test;{population};{i}", msisdn, store.partition_for(msisdn)))
            began = time.perf_counter()
            await charge_all(store, new, INITIAL)
            for s in new:  # the server learns the session's location at CCR-I; so does this client
                await store.locate_session(s.session_id)
            opened = time.perf_counter() - began
            sessions += new
            await trim_cdrs(store)
            await store.redis.config_resetstat()
            cpu_before = await valkey_cpu(store)
            rate, client_us = await measured(store, sessions, args.calls, args.concurrency, args.seed)
            valkey_us = (await valkey_cpu(store) - cpu_before) / args.calls * 1e6
            stats = await store.redis.info("commandstats")
            fcall = stats.get("cmdstat_fcall", {})
            memory = int((await store.redis.info("memory"))["used_memory"])
            row = {"subscribers": population, "open_sessions": len(sessions), "calls_per_second": round(rate),
                   "fcall_usec_per_call": round(float(fcall.get("usec_per_call", 0)), 1),
                   "valkey_cpu_us_per_call": round(valkey_us, 1), "client_cpu_us_per_call": round(client_us, 1),
                   "used_memory_mb": round(memory / 2**20, 1), "open_seconds": round(opened, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        began = time.perf_counter()
        await charge_all(store, sessions, TERMINATION)
        print(f"closed {len(sessions):,} sessions in {time.perf_counter() - began:.1f} s", flush=True)
    await store.close()
    return rows


def table(rows: list[dict]) -> None:
    print("\n| subscribers | open sessions | charge calls/s | µs per FCALL in Valkey | Valkey CPU µs per call "
          "| client CPU µs per call | used_memory |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['subscribers']:,} | {r['open_sessions']:,} | {r['calls_per_second']:,} | "
              f"{r['fcall_usec_per_call']} | {r['valkey_cpu_us_per_call']} | {r['client_cpu_us_per_call']} | "
              f"{r['used_memory_mb']:,} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Redis/Valkey URL (default: a temporary embedded Valkey; it is flushed)")
    parser.add_argument("--subscribers", default="1000,100000,1000000", help="population levels, ascending")
    parser.add_argument("--sessions", default="1000,100000", help="open-session levels, ascending")
    parser.add_argument("--calls", type=int, default=40_000, help="measured CCR-U per cell")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--fsync", default="always", choices=("always", "everysec", "no"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    args.subscribers = [int(x) for x in args.subscribers.split(",")]
    args.sessions = [int(x) for x in args.sessions.split(",")]
    if args.subscribers != sorted(args.subscribers) or args.sessions != sorted(args.sessions):
        parser.error("levels must be ascending")
    if min(args.sessions) < args.concurrency:
        parser.error("every session level needs at least --concurrency sessions")
    uvloop.install()

    async def with_url(url: str) -> list[dict]:
        if args.url:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(url)
            await client.flushall()
            await client.aclose()
        return await run(url, args)

    if args.url:
        rows = asyncio.run(with_url(args.url))
    else:
        with tempfile.TemporaryDirectory(prefix="ocs-scale-") as tmp, \
                EmbeddedValkey(tmp, config={"appendfsync": args.fsync}) as server:
            print(f"embedded Valkey, appendonly yes, appendfsync {args.fsync}", flush=True)
            rows = asyncio.run(with_url(server.url))
    table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
