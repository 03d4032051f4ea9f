"""Redis bytes per provisioned subscriber and per open session, measured through the real charge path.

An in-process `ocs serve` (tests/gateway.start_app: config, rate card, CreditControl, BalanceStore, Lua) on a
fresh embedded Valkey; subscribers come from `BalanceStore.provision_many` with the demo plan's allowances,
sessions from real CCR-I over TCP (PS-Information as a PGW sends it, so the session's CDR context is the
realistic one), then CCR-U with used units. After each step: the change of INFO `used_memory` divided by the
number of subscribers / sessions, and a breakdown by key class (MEMORY USAGE … SAMPLES 0 of every key of the
class, so streams and hashes are counted exactly), plus the fields of one session hash with their sizes.

The CDR writer is off, so `cdr:{pNNN}` keeps every record: it is listed apart (the writer trims it within a
second in production); the ledger stream is never trimmed by the OCS and is listed apart too (it grows by
charge, not by open session).

    .venv/bin/python benchmarks/memory.py [--subscribers 10000] [--sessions 5000] [--updates 5,40]
    .venv/bin/python benchmarks/memory.py --listpack-value 1024   # hash-max-listpack-value raised (proposal)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
import uvloop  # noqa: E402

from balances.embedded import EmbeddedValkey  # noqa: E402
from balances.model import Subscriber  # noqa: E402
from ocs.clock import Clock, FixedClock  # noqa: E402
from ratecards import initial_allowances, load_ratecard  # noqa: E402
from simulators.load import ps_information  # noqa: E402
from tests.gateway import Gateway, start_app  # noqa: E402

DATA_RG, VOICE_RG = 100, 200
BATCH = 250  # CCRs in flight at once


def key_class(key: bytes) -> str:
    """`ses:{p003}:pgw;1` → `ses:`; `idx:msisdn:4915…` → `idx:msisdn:`."""
    text = key.decode()
    head = text.split(":", 1)[0]
    if head == "idx":
        return ":".join(text.split(":", 2)[:2]) + ":"
    return head + ":"


async def used_memory(client: aioredis.Redis) -> int:
    await client.execute_command("MEMORY", "PURGE")
    return int((await client.info("memory"))["used_memory"])


async def usage_by_class(client: aioredis.Redis) -> dict[str, tuple[int, int]]:
    """key class → (keys, bytes by MEMORY USAGE SAMPLES 0)."""
    keys = [key async for key in client.scan_iter(count=5000)]
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for start in range(0, len(keys), 2000):
        chunk = keys[start:start + 2000]
        async with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
            sizes = await pipe.execute()
        for key, size in zip(chunk, sizes, strict=True):
            totals[key_class(key)] += int(size or 0)
            counts[key_class(key)] += 1
    return {name: (counts[name], totals[name]) for name in sorted(totals)}


def delta(after: dict, before: dict) -> dict[str, tuple[int, int]]:
    out = {}
    for name in sorted(set(after) | set(before)):
        keys = after.get(name, (0, 0))[0] - before.get(name, (0, 0))[0]
        size = after.get(name, (0, 0))[1] - before.get(name, (0, 0))[1]
        if keys or size:
            out[name] = (keys, size)
    return out


def ccr(gateway: Gateway, session_id: str, request_type: int, number: int, msisdn: str, rgs: tuple[int, ...],
        info: bytes, used: bool) -> list:
    avps: list = [
        ("Session-Id", session_id), ("Origin-Host", gateway.origin_host), ("Origin-Realm", "gw.test"),
        ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", "32251@3gpp.org"),
        ("CC-Request-Type", request_type), ("CC-Request-Number", number),
    ]
    if request_type == 1:
        avps.append(("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", msisdn)]))
        avps.append(("Subscription-Id", [("Subscription-Id-Type", 1),
                                         ("Subscription-Id-Data", "26201" + msisdn[-10:])]))
        avps.append(("Multiple-Services-Indicator", 1))
    for rg in rgs:
        mscc: list = [("Requested-Service-Unit", [])]
        if used:
            mscc.append(("Used-Service-Unit", [("CC-Time", 30)] if rg == VOICE_RG else
                         [("CC-Total-Octets", 1_000_000), ("CC-Input-Octets", 400_000),
                          ("CC-Output-Octets", 600_000)]))
        mscc.append(("Rating-Group", rg))
        avps.append(("Multiple-Services-Credit-Control", mscc))
    avps.append(info)
    return avps


async def send_all(gateway: Gateway, requests: list[list]) -> Counter[int]:
    """Sends the requests BATCH at a time; one answered 3004 (shed by the overload control) is sent again, as
    a gateway would, so every session is measured."""
    results: Counter[int] = Counter()
    for start in range(0, len(requests), BATCH):
        todo = requests[start:start + BATCH]
        for _ in range(50):
            answers = await asyncio.gather(*(gateway.request(avps) for avps in todo))
            todo = [avps for avps, answer in zip(todo, answers, strict=True) if answer.get("Result-Code") == 3004]
            results.update(answer.get("Result-Code") for answer in answers if answer.get("Result-Code") != 3004)
            if not todo:
                break
            await asyncio.sleep(0.05)
        if todo:
            results[3004] += len(todo)
    return results


def show(title: str, count: int, used: int, classes: dict[str, tuple[int, int]], per: str) -> dict:
    print(f"\n{title}: used_memory +{used:,} B = {used / count:,.0f} B per {per}")
    print(f"  {'key class':<14}{'keys':>10}{'bytes':>14}{'B per ' + per:>18}")
    for name, (keys, size) in classes.items():
        print(f"  {name:<14}{keys:>10,}{size:>14,}{size / count:>18,.1f}")
    return {"used_memory_per": round(used / count, 1),
            "classes": {name: {"keys": keys, "bytes": size, "per": round(size / count, 1)}
                        for name, (keys, size) in classes.items()}}


async def session_fields(client: aioredis.Redis, key: bytes) -> dict:
    fields = await client.hgetall(key)
    encoding = (await client.object("ENCODING", key)).decode() if fields else ""
    size = await client.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
    rows = sorted(((f.decode(), len(f), len(v)) for f, v in fields.items()), key=lambda r: -(r[1] + r[2]))
    return {"key": key.decode(), "encoding": encoding, "memory_usage": size, "fields": rows}


def show_fields(title: str, info: dict) -> None:
    rows = info["fields"]
    raw = sum(f + v for _, f, v in rows)
    print(f"\n{title}: {info['key']} — {info['encoding']}, MEMORY USAGE {info['memory_usage']:,} B, "
          f"{len(rows)} fields, {raw:,} B of field names + values")
    for name, f, v in rows:
        print(f"  {name:<12}{f + v:>8,} B (value {v:,})")


async def run(url: str, args: argparse.Namespace, tmp: Path) -> dict:
    client = aioredis.Redis.from_url(url)
    if args.listpack_value:
        await client.config_set("hash-max-listpack-value", args.listpack_value)
    # --update-interval: a clock moved by hand, so the CCR-Us of a session are that far apart (stored answers
    # are kept by age); 0: the wall clock, every CCR-U within seconds
    clock = FixedClock(Clock().now_ms()) if args.update_interval else None
    app = await start_app(url, tmp, clock, OCS_CDR__ENABLED="false")
    report: dict = {"subscribers": args.subscribers, "sessions": args.sessions,
                    "hash_max_listpack_value": (await client.config_get("hash-max-listpack-value"))[
                        "hash-max-listpack-value"],
                    "hash_max_listpack_entries": (await client.config_get("hash-max-listpack-entries"))[
                        "hash-max-listpack-entries"]}
    try:
        card = load_ratecard(app.config.charging.ratecard)
        allowances = initial_allowances(card, "demo")
        msisdns = [f"4917{n:08d}" for n in range(args.subscribers)]
        before_mem, before = await used_memory(client), await usage_by_class(client)
        for start in range(0, len(msisdns), 1000):
            await app.store.provision_many([
                (Subscriber(msisdn=m, imsi="26201" + m[-10:], plan="demo", currency=card.currency),
                 100_000_000, allowances) for m in msisdns[start:start + 1000]])
        after_mem, after = await used_memory(client), await usage_by_class(client)
        report["subscriber"] = show(f"{args.subscribers:,} subscribers provisioned", args.subscribers,
                                    after_mem - before_mem, delta(after, before), "subscriber")
        gateway = await Gateway.connect(app.port)
        for label, rgs in (("one rating group", (DATA_RG,)), ("two rating groups", (DATA_RG, VOICE_RG))):
            tag = "rg" + "-".join(map(str, rgs))
            sessions = [(f"pgw1.gw.test;{tag};{n}", msisdns[n % len(msisdns)]) for n in range(args.sessions)]
            infos = [ps_information(m, n) for n, (_, m) in enumerate(sessions)]
            before_mem, before = await used_memory(client), await usage_by_class(client)
            results = await send_all(gateway, [ccr(gateway, sid, 1, 0, m, rgs, infos[n], False)
                                               for n, (sid, m) in enumerate(sessions)])
            after_mem, after = await used_memory(client), await usage_by_class(client)
            if results != Counter({2001: args.sessions}):
                raise SystemExit(f"CCR-I answers {dict(results)}")
            step = {"after CCR-I": show(f"{args.sessions:,} sessions opened (CCR-I, {label})", args.sessions,
                                        after_mem - before_mem, delta(after, before), "session")}
            one = next(iter(sorted([k async for k in client.scan_iter(match=f"ses:*;{tag};0", count=5000)])))
            fields = await session_fields(client, one)
            show_fields(f"one session after CCR-I ({label})", fields)
            step["fields after CCR-I"] = fields
            number = 0
            for updates in args.updates:
                start_mem, start = await used_memory(client), await usage_by_class(client)
                for _ in range(updates - number):
                    number += 1
                    if clock is not None:
                        clock.advance(args.update_interval)
                    results = await send_all(gateway, [ccr(gateway, sid, 2, number, m, rgs, infos[n], True)
                                                       for n, (sid, m) in enumerate(sessions)])
                    if set(results) != {2001}:
                        raise SystemExit(f"CCR-U answers {dict(results)}")
                end_mem, end = await used_memory(client), await usage_by_class(client)
                step[f"after {updates} CCR-U"] = show(
                    f"the same sessions after {updates} CCR-U each ({label}; change since the previous step)",
                    args.sessions, end_mem - start_mem, delta(end, start), "session")
                open_total = {name: size for name, (_, size) in delta(end, before).items()
                              if name not in ("cdr:", "ledger:")}
                step[f"open state after {updates} CCR-U"] = round(sum(open_total.values()) / args.sessions, 1)
                print(f"  => open-session state after {updates} CCR-U (all classes but cdr: and ledger:, "
                      f"since before CCR-I): {sum(open_total.values()) / args.sessions:,.0f} B per session")
                fields = await session_fields(client, one)
                show_fields(f"one session after {updates} CCR-U ({label})", fields)
                step[f"fields after {updates} CCR-U"] = fields
            report[tag] = step
        gateway.close()
    finally:
        await app.stop()
        await client.aclose()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=5_000, help="sessions opened per rating-group shape")
    parser.add_argument("--updates", default="5,40",
                        help="CCR-U counts (cumulative) after which to measure again, e.g. 5,40 (a burst "
                             "keeps at most 8 stored answers)")
    parser.add_argument("--listpack-value", type=int, default=0,
                        help="CONFIG SET hash-max-listpack-value before the run (0: leave Valkey's default)")
    parser.add_argument("--fsync", default="everysec", choices=("always", "everysec", "no"),
                        help="appendfsync of the embedded Valkey (memory does not depend on it; default everysec "
                             "for speed)")
    parser.add_argument("--update-interval", type=float, default=0.0, metavar="SECONDS",
                        help="seconds between a session's CCR-Us on a clock moved by hand (0: the wall clock)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args()
    args.updates = sorted(int(u) for u in args.updates.split(",") if u.strip())
    if args.sessions > args.subscribers * 10:
        parser.error("at most 10 sessions per subscriber")
    uvloop.install()
    with tempfile.TemporaryDirectory(prefix="ocs-memory-") as tmp:
        with EmbeddedValkey(Path(tmp) / "valkey", config={"appendfsync": args.fsync}) as server:
            report = asyncio.run(run(server.url, args, Path(tmp)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
