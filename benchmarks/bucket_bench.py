"""Server time of one charge call (a CCR-U: commit used units, reserve a new grant) by balance shape: the
spine's buckets (money + a plan allowance, no metadata), five buckets with metadata (priorities, expiries,
services, bonus money), a group member drawing from a shared bucket with a member limit, and a postpaid
account. The shapes run in alternating rounds against one Valkey, so a busy machine disturbs them alike;
the figure is Valkey's own time per FCALL (INFO commandstats), not round trips.

    .venv/bin/python benchmarks/bucket_bench.py                 # embedded Valkey
    .venv/bin/python benchmarks/bucket_bench.py --rounds 60 --sessions 500
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import msgspec
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balances import keys as k  # noqa: E402
from balances.embedded import EmbeddedValkey  # noqa: E402
from balances.model import INITIAL, UPDATE, Bucket, ChargeRequest, MsccCharge, Subscriber, Units  # noqa: E402
from balances.store import BalanceStore  # noqa: E402
from ratecards.schedule import RatingSchedule  # noqa: E402

NOW = 1_700_000_000_000
DAY = 86_400_000
SCHEDULE = msgspec.to_builtins(RatingSchedule(
    rating_group=10, unit="bytes", increment=1024, price_num=2_000, price_den=1, default_quota=1_048_576,
    max_quota=10_485_760, minor=10_000, rounding="up", allowances=("data",), version="bench"))
BIG = 10**12


async def provision(store: BalanceStore, shape: str, n: int) -> tuple[str, int, str]:
    msisdn = f"49{'sfgp'.index(shape[0]) + 1}{n:09d}"
    if shape == "spine":
        await store.provision(Subscriber(msisdn=msisdn), BIG * 1000, {"data": BIG}, now_ms=NOW)
    elif shape == "five-buckets":
        await store.provision(Subscriber(msisdn=msisdn), BIG * 1000, buckets=[
            Bucket("night", "bytes", BIG, priority=10, valid_until=NOW + 400 * DAY, services=(10,)),
            Bucket("month", "bytes", BIG, valid_from=NOW - DAY, valid_until=NOW + 300 * DAY),
            Bucket("voice", "seconds", BIG),
            Bucket("sms", "events", BIG),
            Bucket("bonus", "money", BIG, valid_until=NOW + 400 * DAY)], now_ms=NOW)
    elif shape == "group":
        group = f"g{n // 4}"
        await store.create_group(group)
        await store.add_group_bucket(group, Bucket("pool", "bytes", BIG, member_limits={msisdn: BIG}),
                                     now_ms=NOW)
        await store.provision(Subscriber(msisdn=msisdn, group=group), BIG * 1000, now_ms=NOW)
        return msisdn, (await store.locate_msisdn(msisdn)).partition, group
    else:
        await store.provision(Subscriber(msisdn=msisdn, kind="postpaid", credit_limit=BIG), 0, now_ms=NOW)
    return msisdn, (await store.locate_msisdn(msisdn)).partition, ""


def request(shape: str, n: int, number: int, where: tuple[str, int, str]) -> ChargeRequest:
    msisdn, partition, group = where
    return ChargeRequest(
        session_id=f"{shape};{n}", request_type=INITIAL if number == 0 else UPDATE, request_number=number,
        msisdn=msisdn, plan="demo", partition=partition, now_ms=NOW + number, group=group,
        msccs=[MsccCharge(rating_group=10, schedule=SCHEDULE, requested=True, reporting_reason=3,
                          used=None if number == 0 else Units(total=1_000_000, input=400_000, output=600_000))])


async def run(url: str, sessions: int, rounds: int) -> None:
    store = await BalanceStore.connect(url, partitions=16)
    await store.redis.flushall()
    await store.close()
    store = await BalanceStore.connect(url, partitions=16)
    shapes = ("spine", "five-buckets", "group", "postpaid")
    where = {shape: [await provision(store, shape, n) for n in range(sessions)] for shape in shapes}
    times: dict[str, list[float]] = {shape: [] for shape in shapes}
    for number in range(rounds + 1):
        order = shapes if number % 2 else tuple(reversed(shapes))
        for shape in order:
            await store.redis.config_resetstat()
            outcomes = await asyncio.gather(*(store.charge(request(shape, n, number, at))
                                              for n, at in enumerate(where[shape])))
            assert all(o.result_code == 2001 and o.msccs[0].granted for o in outcomes), (shape, outcomes[0])
            stats = (await store.redis.info("commandstats"))["cmdstat_fcall"]
            if number:  # round 0 opens the sessions
                times[shape].append(stats["usec"] / stats["calls"])
    for shape in shapes:
        values = sorted(times[shape])
        print(f"{shape:13s} p10 {values[len(values) // 10]:6.1f} µs   median {statistics.median(values):6.1f} µs"
              f"   per charge (Valkey's time per FCALL)")
    for shape in shapes:
        assert (await store.redis.xlen(k.ledger_key(where[shape][0][1]))) > 0
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Redis/Valkey URL (default: a temporary embedded Valkey; it is flushed!)")
    parser.add_argument("--sessions", type=int, default=300, help="sessions per shape")
    parser.add_argument("--rounds", type=int, default=40, help="CCR-U rounds per shape")
    args = parser.parse_args()
    uvloop.install()
    if args.url:
        asyncio.run(run(args.url, args.sessions, args.rounds))
        return
    with tempfile.TemporaryDirectory() as data, EmbeddedValkey(data, config={"appendfsync": "no"}) as server:
        asyncio.run(run(server.url, args.sessions, args.rounds))


if __name__ == "__main__":
    main()
