"""The CDR writer against a real Valkey: exactly-once files, rotation, recovery, leases and WAITAOF."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ocs.cdr_writer import CdrWriter, format_line, lease_key, stream_key

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z
FILE = re.compile(r"^cdr-p(\d{3})-(\d{8}T\d{6})-(\d+)_(\d+)\.jsonl(\.open)?$")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(n: int, amount: int = 10_000) -> dict:
    return {
        "recordId": f"rec-{n}", "recordType": "PS", "schemaVersion": 1, "servedMSISDN": "491700000001",
        "servedIMSI": "262011234567890", "sessionId": f"gw;1;{n}", "ccRequestNumber": n,
        "originHost": "pgw.test", "chargingID": 42, "apn": "internet", "servingNodePLMN": "26201",
        "ratType": 6, "ratingGroup": 10, "serviceIdentifier": 1, "recordOpeningTime": "2026-11-19T09:46:40Z",
        "recordTime": "2026-11-19T09:46:41Z", "usage": {"totalOctets": 1024 * n}, "amount": amount,
        "currency": "EUR", "bucket": {"money": -amount}, "ratingVersion": "2026-11-demo",
        "reportingReason": 2, "causeForRecClosing": 0,
    }


async def add(redis: aioredis.Redis, partition: int, *records: dict) -> list[str]:
    ids = []
    for rec in records:
        ids.append((await redis.xadd(stream_key(partition), {"r": json.dumps(rec)})).decode())
    return ids


def files(directory: Path, partition: int) -> list[Path]:
    folder = directory / f"p{partition:03d}"
    found = [f for f in folder.iterdir() if FILE.match(f.name)] if folder.is_dir() else []
    return sorted(found, key=lambda f: (int(FILE.match(f.name)[3]), int(FILE.match(f.name)[4])))


def written(directory: Path, partition: int) -> list[dict]:
    """Every line of every file of the partition, in file order; each must be complete JSON."""
    out = []
    for path in files(directory, partition):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), path
        out += [json.loads(line) for line in data.splitlines()]
    return out


def writer(redis: aioredis.Redis, directory: Path, partitions=(0,), owner: str = "w1", **kw) -> CdrWriter:
    kw.setdefault("clock", Clock())
    return CdrWriter(redis, directory, partitions, owner=owner, **kw)


async def test_drains_streams_into_files_exactly_once(redis_client, tmp_path: Path) -> None:
    ids0 = await add(redis_client, 0, *(record(n) for n in range(5)))
    ids1 = await add(redis_client, 1, *(record(n) for n in range(10, 13)))
    w = writer(redis_client, tmp_path, (0, 1))
    assert await w.drain_once() == 8
    assert w.owned == {0, 1}
    for partition, ids, first in ((0, ids0, 0), (1, ids1, 10)):
        lines = written(tmp_path, partition)
        assert [line.pop("streamId") for line in lines] == ids
        assert lines == [record(n) for n in range(first, first + len(ids))]
        assert await redis_client.xlen(stream_key(partition)) == 0
        (only,) = files(tmp_path, partition)
        assert only.name == f"cdr-p{partition:03d}-20261118T110640-{ids[0].replace('-', '_')}.jsonl.open"
    assert await w.drain_once() == 0  # nothing new, nothing twice
    more = await add(redis_client, 0, record(5))
    assert await w.drain_once() == 1
    assert [line["streamId"] for line in written(tmp_path, 0)] == ids0 + more
    await w.close()
    assert [f.name.endswith(".jsonl") for f in files(tmp_path, 0)] == [True]
    assert await redis_client.exists(lease_key(0), lease_key(1)) == 0
    assert w.owned == frozenset()


async def test_batches_and_rotation_by_record_count(redis_client, tmp_path: Path) -> None:
    ids = await add(redis_client, 0, *(record(n) for n in range(7)))
    w = writer(redis_client, tmp_path, batch=2, rotate_records=3)
    assert await w.drain_once() == 7
    names = [f.name for f in files(tmp_path, 0)]
    assert [n.endswith(".jsonl") for n in names] == [True, True, False]
    assert [FILE.match(n)[3] + "-" + FILE.match(n)[4] for n in names] == [ids[0], ids[3], ids[6]]
    assert [len(f.read_bytes().splitlines()) for f in files(tmp_path, 0)] == [3, 3, 1]
    assert [line["streamId"] for line in written(tmp_path, 0)] == ids
    await w.close()


async def test_rotation_by_age(redis_client, tmp_path: Path) -> None:
    clock = Clock()
    w = writer(redis_client, tmp_path, clock=clock, rotate_seconds=300)
    await add(redis_client, 0, record(1))
    await w.drain_once()
    clock.now += 299
    await w.drain_once()
    assert files(tmp_path, 0)[0].name.endswith(".open")
    clock.now += 1
    await w.drain_once()  # idle, but the file is old enough: sealed
    assert [f.name.endswith(".jsonl") for f in files(tmp_path, 0)] == [True]
    await add(redis_client, 0, record(2))
    await w.drain_once()
    assert [f.suffix for f in files(tmp_path, 0)] == [".jsonl", ".open"]
    await w.close()


@pytest.mark.parametrize("tail", [b'{"recordId": "rec-3", "amou', b"\x00\x00\x00\x00", b"garbage\n"])
async def test_torn_last_line_is_truncated_and_rewritten_once(redis_client, tmp_path: Path, tail) -> None:
    ids = await add(redis_client, 0, *(record(n) for n in range(3)))
    crashed = writer(redis_client, tmp_path, owner="crashed")
    assert await crashed.drain_once() == 3
    ids += await add(redis_client, 0, record(3))
    # the crashed writer got as far as a torn write of record 3, then died without trimming
    with files(tmp_path, 0)[-1].open("ab") as f:
        f.write(tail)
    await redis_client.delete(lease_key(0))  # its lease expired
    w = writer(redis_client, tmp_path, owner="w2")
    assert await w.drain_once() == 1
    lines = written(tmp_path, 0)  # asserts every file ends with a complete line
    assert [line["streamId"] for line in lines] == ids
    assert lines[-1]["recordId"] == "rec-3"
    first, second = files(tmp_path, 0)
    assert first.name.endswith(".jsonl") and second.name.endswith(".open")  # the leftover was sealed
    assert await redis_client.xlen(stream_key(0)) == 0
    await w.close()


async def test_crash_after_write_before_trim_writes_no_duplicates(redis_client, tmp_path: Path) -> None:
    ids = await add(redis_client, 0, *(record(n) for n in range(5)))
    # state by hand: all five lines written by a writer that crashed before XTRIM
    entries = await redis_client.xrange(stream_key(0))
    folder = tmp_path / "p000"
    folder.mkdir()
    name = f"cdr-p000-20261118T110640-{ids[0].replace('-', '_')}.jsonl.open"
    (folder / name).write_bytes(b"".join(format_line(i.decode(), fields) for i, fields in entries))
    w = writer(redis_client, tmp_path)
    assert await w.drain_once() == 0
    assert await redis_client.xlen(stream_key(0)) == 0  # recovery trimmed what the file holds
    ids += await add(redis_client, 0, record(5), record(6))
    assert await w.drain_once() == 2
    assert [line["streamId"] for line in written(tmp_path, 0)] == ids
    await w.close()


async def test_lost_page_inside_the_unacknowledged_tail(redis_client, tmp_path: Path) -> None:
    """A crash can lose a middle page of the last write while a later page survives: the file is cut at
    the hole, and everything after it comes again from the stream."""
    ids = await add(redis_client, 0, *(record(n) for n in range(2)))
    crashed = writer(redis_client, tmp_path, owner="crashed")
    assert await crashed.drain_once() == 2  # rec 0, 1 written and trimmed
    ids += await add(redis_client, 0, *(record(n) for n in range(2, 5)))
    entries = await redis_client.xrange(stream_key(0))
    lines = [format_line(i.decode(), fields) for i, fields in entries]
    with files(tmp_path, 0)[-1].open("ab") as f:  # rec 2 intact, rec 3 zeroed up to its newline, rec 4 intact
        f.write(lines[0] + b"\x00" * (len(lines[1]) - 1) + b"\n" + lines[2])
    await redis_client.delete(lease_key(0))
    w = writer(redis_client, tmp_path, owner="w2")
    assert await w.drain_once() == 2  # rec 3 and 4 again
    assert [line["streamId"] for line in written(tmp_path, 0)] == ids
    await w.close()


async def test_two_writers_never_own_the_same_partition(redis_client, tmp_path: Path) -> None:
    one = writer(redis_client, tmp_path, (0, 1, 2), owner="one")
    two = writer(redis_client, tmp_path, (0, 1, 2), owner="two")
    await one.drain_once()
    await two.drain_once()
    assert one.owned == {0, 1, 2} and two.owned == frozenset()
    ids = await add(redis_client, 0, record(1), record(2))
    assert await two.drain_once() == 0  # it holds nothing, it writes nothing
    assert await redis_client.xlen(stream_key(0)) == 2
    assert await one.drain_once() == 2
    await redis_client.delete(lease_key(0))  # one's lease on partition 0 expires (e.g. a long pause)
    await two.drain_once()
    assert two.owned == {0}
    ids += await add(redis_client, 0, record(3))
    assert await one.drain_once() == 0  # its renewal fails: it lets partition 0 go unwritten
    assert one.owned == {1, 2} and not one.owned & two.owned
    assert await redis_client.get(lease_key(0)) == b"two"
    assert await two.drain_once() == 1
    assert [line["streamId"] for line in written(tmp_path, 0)] == ids
    await one.close()
    await two.drain_once()
    assert two.owned == {0, 1, 2}
    await two.close()


async def test_large_integers_and_decimals_stay_exact(redis_client, tmp_path: Path) -> None:
    big = {"recordId": "big", "amount": 2**53 + 1, "huge": 10**30, "negative": -(2**63) - 5}
    raw = json.dumps(big)[:-1] + ', "rate": 0.1000000000000000055511151231257827}'
    (entry_id,) = [(await redis_client.xadd(stream_key(0), {"r": raw})).decode()]
    w = writer(redis_client, tmp_path)
    assert await w.drain_once() == 1
    text = files(tmp_path, 0)[0].read_text()
    assert '"amount":9007199254740993' in text and f'"huge":{10**30}' in text
    assert '"rate":0.1000000000000000055511151231257827' in text
    line = json.loads(text)
    assert line["amount"] == 2**53 + 1 and line["negative"] == -(2**63) - 5 and line["streamId"] == entry_id
    await w.close()


async def test_undecodable_entries_are_kept_not_dropped(redis_client, tmp_path: Path) -> None:
    await redis_client.xadd(stream_key(0), {"r": "not json"})
    await redis_client.xadd(stream_key(0), {"other": "x"})
    w = writer(redis_client, tmp_path)
    assert await w.drain_once() == 2
    lines = written(tmp_path, 0)
    assert [line["recordType"] for line in lines] == ["UNDECODABLE", "UNDECODABLE"]
    assert lines[0]["raw"] == {"r": "not json"} and lines[1]["raw"] == {"other": "x"}
    assert await redis_client.xlen(stream_key(0)) == 0
    await w.close()


async def test_waitaof_when_appendfsync_is_not_always(redis_client, tmp_path: Path) -> None:
    before = (await redis_client.info("commandstats")).get("cmdstat_waitaof", {}).get("calls", 0)
    await redis_client.config_set("appendfsync", "everysec")
    try:
        ids = await add(redis_client, 0, record(1), record(2))
        w = writer(redis_client, tmp_path)
        assert await w.drain_once() == 2
        assert w.durability == "waitaof"
        after = (await redis_client.info("commandstats"))["cmdstat_waitaof"]["calls"]
        assert after > before
        assert [line["streamId"] for line in written(tmp_path, 0)] == ids
        await w.close()
    finally:
        await redis_client.config_set("appendfsync", "always")
    w = writer(redis_client, tmp_path, owner="w3")
    await w.drain_once()
    assert w.durability == "always"
    await w.close()


async def test_run_drains_until_stopped_then_seals_and_releases(redis_client, tmp_path: Path) -> None:
    stop = asyncio.Event()
    w = writer(redis_client, tmp_path, (0, 1), poll_seconds=0.01)
    task = asyncio.create_task(w.run(stop))
    ids = await add(redis_client, 1, *(record(n) for n in range(3)))
    for _ in range(500):
        if w.records_written >= 3:
            break
        await asyncio.sleep(0.01)
    ids += await add(redis_client, 1, record(3))  # still there when stop is set: drained on the way out
    stop.set()
    await task
    assert [line["streamId"] for line in written(tmp_path, 1)] == ids
    assert all(f.name.endswith(".jsonl") for f in files(tmp_path, 1))
    assert await redis_client.exists(lease_key(0), lease_key(1)) == 0
