"""The CDR writer: drains the usage-record streams `cdr:{pNNN}` into rotated JSON Lines files, exactly once.

Rules this file keeps:
- One writer per partition: it writes a partition only while it holds `cdrlease:{pNNN}` (SET NX PX, renewed
  and released only by its owner through compare-and-set scripts, renewed in the same round trip as every
  read). A writer that finds its lease gone forgets the partition: the next holder recovers from the files.
- Only entries durable in Redis are written: unless the server fsyncs its AOF on every write
  (`appendfsync always`), a lease renewal (a write, on the same connection) is followed by `WAITAOF 1 0`
  before the file is written; the AOF is sequential, so that covers the XADDs read before it.
- The stream is acknowledged only after the file (and, for new or renamed files, the directory) is fsynced,
  with `XTRIM MINID <next id after the last written>`: one command per batch whatever its size, it frees
  stream memory at once (XDEL leaves tombstones), and it is safe because auto ids only grow, so nothing
  below the last written id can be unwritten. The trim is conditional on still holding the lease.
- Files: `<dir>/pNNN/cdr-pNNN-<UTC yyyymmddTHHMMSS>-<first id>.jsonl.open` while written; rotation (records
  or age) fsyncs, renames to `.jsonl` and fsyncs the directory. A line is the record plus "streamId".
  Numbers are copied exactly: ints stay ints of any size; a non-integer number keeps its digits (Decimal),
  it never passes through a binary float.

Recovery (on acquiring a partition, and after a failed write): the newest file's tail is checked back to
the last line already trimmed from the stream (everything older was fsynced before it was trimmed); from
there every line must be complete, valid JSON with increasing stream ids, and the file is truncated at the
first one that is not (a torn write, or a page the crash lost). The file is fsynced, the stream is trimmed
up to the last line kept, and reading resumes strictly after it. A leftover `.open` file is sealed (renamed
to `.jsonl`), never appended to: each file then has exactly one writer over its life, and a writer that
lost its lease but still has the file open cannot interleave with the new owner's lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisError, ResponseError

from balances.connection import NodeClients, is_cluster

__all__ = ["CdrWriter", "format_line", "lease_key", "stream_key"]

log = logging.getLogger(__name__)

_decode_json = msgspec.json.Decoder(float_hook=Decimal).decode  # floats keep their digits
_encode_json = msgspec.json.Encoder(decimal_format="number").encode

# KEYS[1] lease; ARGV owner, lease_ms. Renew only our own lease: a missing key is NOT re-taken silently,
# because someone else may have held (and written) the partition in between.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] lease, KEYS[2] stream; ARGV owner, lease_ms, minid. Same hash tag, one slot.
_ACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3])
"""

_FILE_NAME = re.compile(r"^cdr-p(\d+)-(\d{8}T\d{6})-(\d+)_(\d+)\.jsonl(\.open)?$")
_OPEN = ".open"
_MAX_SEQ = 2**64 - 1

StreamId = tuple[int, int]


def stream_key(partition: int) -> str:
    return f"cdr:{{p{partition:03d}}}"


def lease_key(partition: int) -> str:
    return f"cdrlease:{{p{partition:03d}}}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_id(value: str) -> StreamId:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _next_id(value: str) -> str:
    """The smallest stream id greater than `value`: the MINID that trims `value` and everything before."""
    ms, seq = _parse_id(value)
    return f"{ms + 1}-0" if seq == _MAX_SEQ else f"{ms}-{seq + 1}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def format_line(entry_id: str, fields: dict[Any, Any]) -> bytes:
    """One JSON line: the record in field `r` plus "streamId". An entry that is not a JSON object is kept
    (never dropped) as an UNDECODABLE record carrying its raw fields, and logged."""
    raw = fields.get(b"r", fields.get("r"))
    record: Any = None
    if raw is not None:
        try:
            record = _decode_json(raw)
        except msgspec.DecodeError:
            record = None
    if not isinstance(record, dict):
        log.error("CDR stream entry %s is not a JSON object; written as UNDECODABLE", entry_id)
        record = {"recordType": "UNDECODABLE",
                  "raw": {_text(k): v if isinstance(v, str) else v.decode("utf-8", "replace")
                          for k, v in fields.items()}}
    record["streamId"] = entry_id
    return _encode_json(record) + b"\n"


def _file_order(path: Path) -> tuple[int, int, int]:
    """Files sort by their first stream id (ids only grow; clocks may not)."""
    found = _FILE_NAME.match(path.name)
    assert found is not None
    return int(found.group(3)), int(found.group(4)), 1 if found.group(5) else 0


def _line_id(line: bytes) -> StreamId | None:
    """The streamId of a complete, valid CDR line, or None when the line is not one."""
    try:
        record = msgspec.json.decode(line)
        entry_id = record["streamId"]
        return _parse_id(entry_id) if isinstance(entry_id, str) else None
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        return None


def _repair_tail(path: Path, confirmed_below: StreamId | None) -> str | None:
    """Truncate `path` after its last trustworthy line; return that line's streamId (None: no line left).

    Lines whose id is below `confirmed_below` (the oldest id still in the stream) were trimmed, hence
    fsynced before: the newest of them anchors the check. Every line after the anchor must be complete
    and valid with increasing ids. With no stream entries left (None) the last valid line anchors.
    """
    size = path.stat().st_size
    window = 1 << 20
    while True:
        start = max(0, size - window)
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(size - start)
        lines: list[tuple[int, int]] = []  # (start, end excluding newline) offsets into data
        offset = 0
        if start > 0:  # the window's first fragment may be the middle of a line
            cut = data.find(b"\n")
            offset = len(data) if cut < 0 else cut + 1
        while offset < len(data):
            end = data.find(b"\n", offset)
            lines.append((offset, len(data) if end < 0 else end))
            offset = len(data) if end < 0 else end + 1
        anchor = -1
        anchor_id: StreamId | None = None
        for index in range(len(lines) - 1, -1, -1):
            line_start, line_end = lines[index]
            found = _line_id(data[line_start:line_end]) if line_end < len(data) else None
            if found is not None and (confirmed_below is None or found < confirmed_below):
                anchor, anchor_id = index, found
                break
        if anchor >= 0 or start == 0:
            break
        window *= 8
    keep = start + (lines[anchor][1] + 1 if anchor >= 0 else (lines[0][0] if lines else len(data)))
    last = anchor_id
    for line_start, line_end in lines[anchor + 1:]:
        found = _line_id(data[line_start:line_end]) if line_end < len(data) else None
        if found is None or (last is not None and found <= last):
            break
        keep, last = start + line_end + 1, found
    with path.open("r+b") as f:
        if keep < size:
            log.warning("%s: truncating %d bytes of torn or invalid tail", path, size - keep)
            f.truncate(keep)
        os.fsync(f.fileno())
    return None if last is None else f"{last[0]}-{last[1]}"


@dataclass
class _OpenFile:
    path: Path  # ends in .jsonl.open
    fd: int
    records: int
    opened_at: float  # by the injected clock


@dataclass
class _Partition:
    number: int
    stream: str
    lease: str
    directory: Path
    held: bool = False
    recovered: bool = False  # files checked and last_id known since the lease was acquired
    last_id: str | None = None  # last stream id written to a file
    file: _OpenFile | None = None


class CdrWriter:
    """Drain `cdr:{pNNN}` streams of the given partitions into files under `directory`, exactly once."""

    def __init__(
        self,
        redis: aioredis.Redis,
        directory: Path,
        partitions: Iterable[int],
        *,
        owner: str,
        lease_ms: int = 10_000,
        rotate_records: int = 100_000,
        rotate_seconds: float = 300,
        batch: int = 1000,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = 0.1,
        waitaof_timeout_ms: int | None = None,
        max_batches_per_pass: int = 64,
    ) -> None:
        if not owner:
            raise ValueError("a CDR writer needs a unique owner id (e.g. host:pid)")
        if lease_ms < 100 or rotate_records < 1 or batch < 1:
            raise ValueError("lease_ms ≥ 100, rotate_records ≥ 1 and batch ≥ 1 are required")
        self.redis = redis
        self.directory = Path(directory)
        self.owner = owner
        self.lease_ms = lease_ms
        self.rotate_records = rotate_records
        self.rotate_seconds = rotate_seconds
        self.batch = batch
        self.clock = clock
        self.poll_seconds = poll_seconds
        # WAITAOF must return well inside the lease, or the lease could lapse before the write
        self.waitaof_timeout_ms = min(waitaof_timeout_ms or 1000, lease_ms // 4)
        self.max_batches_per_pass = max_batches_per_pass
        self._partitions = {
            p: _Partition(p, stream_key(p), lease_key(p), self.directory / f"p{p:03d}") for p in partitions
        }
        # on a Redis Cluster the partitions are spread over the primaries: every pipeline below is sent per
        # primary on a plain client of that node (redis-py's cluster pipeline refuses scripts), which is also
        # what puts WAITAOF on the connection that made the write, on the node that holds the partition
        self._nodes: NodeClients | None = NodeClients(redis) if is_cluster(redis) else None
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._ack = redis.register_script(_ACK)
        self.durability: str | None = None  # "always" | "waitaof" | "none", read once from CONFIG
        self.records_written = 0

    @property
    def owned(self) -> frozenset[int]:
        """Partitions whose lease this writer holds."""
        return frozenset(p.number for p in self._partitions.values() if p.held)

    # --- the loop ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until `stop` is set, then drain what is left, fsync, seal the files and release leases."""
        delay = self.poll_seconds
        try:
            while not stop.is_set():
                try:
                    written = await self.drain_once()
                    delay = self.poll_seconds
                except (RedisError, OSError) as exc:
                    log.warning("CDR writer %s: %s; retrying", self.owner, exc)
                    written, delay = 0, min(delay * 2, 2.0)
                    if self._nodes is not None and isinstance(exc, MovedError | RedisConnectionError):
                        await self._refresh_slots()  # failover or resharding: read the slot map again
                if not written:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except TimeoutError:
                        pass
            for _ in range(self.max_batches_per_pass):
                if not await self.drain_once():
                    break
        finally:
            await self.close()

    async def drain_once(self) -> int:
        """One pass over the partitions: take free leases, recover, write what the streams hold, trim."""
        if self._nodes is not None and not self._nodes.ready:
            await self._nodes.initialize()
        if self.durability is None:
            self.durability = await self._read_durability()
        await self._acquire()
        for part in self._partitions.values():
            if part.held and not part.recovered:
                try:
                    await self._recover(part)
                except OSError as exc:  # this partition waits; the others go on
                    log.error("CDR writer: recovering partition %d failed: %s", part.number, exc)
        written = 0
        for _ in range(self.max_batches_per_pass):
            entries, full = await self._read()
            if not entries:
                break
            written += await self._write(entries)
            if not full:
                break
        if any(p.file is not None for p in self._partitions.values()):
            await asyncio.to_thread(self._seal_old_files)
        self.records_written += written
        return written

    async def close(self) -> None:
        """Seal every open file and release every lease this writer holds."""
        for part in self._partitions.values():
            if part.file is not None:
                try:
                    await asyncio.to_thread(self._seal, part)
                except OSError as exc:
                    log.error("CDR writer: cannot seal %s: %s", part.file.path, exc)
                    self._forget_file(part)
            if part.held:
                try:
                    await self._release(keys=[part.lease], args=[self.owner], client=self._client_of(part))
                except RedisError as exc:  # the lease simply expires
                    log.warning("CDR writer: cannot release %s: %s", part.lease, exc)
                part.held = part.recovered = False
                part.last_id = None
        if self._nodes is not None:
            await self._nodes.aclose()

    # --- Redis side -------------------------------------------------------------------------------------

    def _client_of(self, part: _Partition) -> aioredis.Redis:
        """The client to send a partition's commands with: the server's, or its primary's on a cluster."""
        if self._nodes is None:
            return self.redis
        return self._nodes.client(self._nodes.node_for_key(part.lease))

    def _by_node(self, parts: list[_Partition]) -> list[tuple[aioredis.Redis, list[_Partition]]]:
        """The partitions grouped by the client that reaches them (one group without a cluster)."""
        if self._nodes is None:
            return [(self.redis, parts)]
        groups: dict[int, tuple[aioredis.Redis, list[_Partition]]] = {}
        for part in parts:
            client = self._client_of(part)
            groups.setdefault(id(client), (client, []))[1].append(part)
        return list(groups.values())

    async def _refresh_slots(self) -> None:
        assert self._nodes is not None
        try:
            await self._nodes.refresh()
        except RedisError as exc:  # the next pass tries again
            log.warning("CDR writer %s: cannot read the cluster's slot map: %s", self.owner, exc)

    async def _read_durability(self) -> str:
        """"always" when Redis fsyncs every write before answering; else WAITAOF is needed. On a cluster the
        weakest primary decides."""
        clients = [self.redis] if self._nodes is None else [self._nodes.client(n) for n in self._nodes.primaries()]
        found = []
        for client in clients:
            try:
                config = {_text(k): _text(v) for k, v in (await client.config_get("append*")).items()}
            except ResponseError:  # CONFIG renamed or disabled: assume the worst and wait for the AOF
                return "waitaof"
            if config.get("appendonly") == "no":
                log.warning("Redis runs without AOF: CDRs are written without waiting for durability")
                return "none"
            found.append("always" if config.get("appendfsync") == "always" else "waitaof")
        return "waitaof" if "waitaof" in found else "always"

    async def _acquire(self) -> None:
        free = [p for p in self._partitions.values() if not p.held]
        if not free:
            return
        await asyncio.gather(*(self._acquire_on(client, parts) for client, parts in self._by_node(free)))

    async def _acquire_on(self, client: aioredis.Redis, free: list[_Partition]) -> None:
        pipe = client.pipeline(transaction=False)
        for part in free:
            pipe.set(part.lease, self.owner, nx=True, px=self.lease_ms)
            await self._renew(keys=[part.lease], args=[self.owner, self.lease_ms], client=pipe)
        results = await pipe.execute()
        for index, part in enumerate(free):
            if results[2 * index] or results[2 * index + 1] == 1:
                part.held, part.recovered = True, False
                log.info("CDR writer %s now owns partition %d", self.owner, part.number)

    async def _recover(self, part: _Partition) -> None:
        first = await self._client_of(part).xrange(part.stream, "-", "+", count=1)
        confirmed_below = _parse_id(_text(first[0][0])) if first else None
        part.last_id = await asyncio.to_thread(self._recover_files, part, confirmed_below)
        part.recovered = True
        if part.last_id is not None:  # written and fsynced, maybe not yet trimmed
            await self._acknowledge([part])

    async def _read(self) -> tuple[dict[int, list[tuple[str, dict[Any, Any]]]], bool]:
        """Read up to a batch per partition, renewing the leases in the same round trip; if needed, wait
        until the AOF holds what was read. Returns entries by partition and whether any batch was full."""
        held = [p for p in self._partitions.values() if p.held and p.recovered]
        if not held:
            return {}, False
        renewed_at = time.monotonic()
        groups = self._by_node(held)
        answers = await asyncio.gather(*(self._read_on(client, parts) for client, parts in groups))
        entries: dict[int, list[tuple[str, dict[Any, Any]]]] = {}
        full = False
        for (_, parts), results in zip(groups, answers, strict=True):
            for index, part in enumerate(parts):
                if results[len(parts) + index] != 1:
                    self._lose(part)
                elif results[index]:
                    entries[part.number] = [(_text(i), fields) for i, fields in results[index]]
                    full = full or len(results[index]) >= self.batch
        if entries and self.durability == "waitaof":
            renewed_at = time.monotonic()
            if not await self._wait_for_aof([self._partitions[p] for p in entries]):
                return {}, False
            entries = {p: e for p, e in entries.items() if self._partitions[p].held}
        if time.monotonic() - renewed_at > self.lease_ms / 2000:  # too slow: the lease may be lapsing
            log.warning("CDR writer %s: lease renewal took too long; not writing this pass", self.owner)
            return {}, False
        return entries, full

    async def _read_on(self, client: aioredis.Redis, parts: list[_Partition]) -> list[Any]:
        """XRANGE of each partition, then each lease's renewal, in one round trip."""
        pipe = client.pipeline(transaction=False)
        for part in parts:
            pipe.xrange(part.stream, f"({part.last_id}" if part.last_id else "-", "+", count=self.batch)
        for part in parts:
            await self._renew(keys=[part.lease], args=[self.owner, self.lease_ms], client=pipe)
        return await pipe.execute()

    async def _wait_for_aof(self, parts: list[_Partition]) -> bool:
        """Renew (a write on this connection, after the reads) and WAITAOF for it to reach the local AOF; on a
        cluster, on each primary holding some of the partitions."""
        answers = await asyncio.gather(*(self._wait_for_aof_on(client, group) for client, group in
                                         self._by_node(parts)))
        return all(answers)

    async def _wait_for_aof_on(self, client: aioredis.Redis, parts: list[_Partition]) -> bool:
        pipe = client.pipeline(transaction=False)
        for part in parts:
            await self._renew(keys=[part.lease], args=[self.owner, self.lease_ms], client=pipe)
        pipe.execute_command("WAITAOF", 1, 0, self.waitaof_timeout_ms)
        results = await pipe.execute(raise_on_error=False)
        for part, renewed in zip(parts, results, strict=False):
            if renewed != 1:
                self._lose(part)
        waited = results[-1]
        if isinstance(waited, ResponseError):
            if "appendonly" not in str(waited).lower():
                raise waited
            log.warning("Redis has no AOF (WAITAOF refused): writing CDRs without waiting for durability")
            self.durability = "none"
            return True
        if waited[0] < 1:
            log.info("WAITAOF timed out after %d ms; retrying next pass", self.waitaof_timeout_ms)
            return False
        return True

    async def _acknowledge(self, parts: list[_Partition]) -> None:
        """Trim each stream up to its last written id, if we still hold its lease."""
        await asyncio.gather(*(self._acknowledge_on(client, group) for client, group in self._by_node(parts)))

    async def _acknowledge_on(self, client: aioredis.Redis, parts: list[_Partition]) -> None:
        pipe = client.pipeline(transaction=False)
        for part in parts:
            assert part.last_id is not None
            await self._ack(keys=[part.lease, part.stream],
                            args=[self.owner, self.lease_ms, _next_id(part.last_id)], client=pipe)
        for part, trimmed in zip(parts, await pipe.execute(), strict=True):
            if trimmed == -1:
                self._lose(part)

    def _lose(self, part: _Partition) -> None:
        """The lease is gone: stop writing this partition; its next owner recovers from the files."""
        log.warning("CDR writer %s lost the lease of partition %d", self.owner, part.number)
        if part.file is not None:
            try:
                os.fsync(part.file.fd)
            except OSError:
                pass
            self._forget_file(part)
        part.held = part.recovered = False
        part.last_id = None

    # --- file side ------------------------------------------------------------------------------------

    async def _write(self, entries: dict[int, list[tuple[str, dict[Any, Any]]]]) -> int:
        written: list[_Partition] = []
        count = 0
        for number, batch in entries.items():
            part = self._partitions[number]
            try:
                await asyncio.to_thread(self._write_batch, part, batch)
            except OSError as exc:  # partial write: recover from the file before the next batch
                log.error("CDR writer: writing partition %d failed: %s", number, exc)
                self._forget_file(part)
                part.recovered = False
                continue
            part.last_id = batch[-1][0]
            written.append(part)
            count += len(batch)
        if written:
            await self._acknowledge(written)
        return count

    def _write_batch(self, part: _Partition, batch: list[tuple[str, dict[Any, Any]]]) -> None:
        """Append the batch, rotating on the record limit; return only when every line is fsynced."""
        lines = [format_line(entry_id, fields) for entry_id, fields in batch]
        if part.file is not None and self.clock() - part.file.opened_at >= self.rotate_seconds:
            self._seal(part)
        index = 0
        while index < len(lines):
            if part.file is None:
                part.file = self._create(part, batch[index][0])
            chunk = lines[index:index + self.rotate_records - part.file.records]
            _write_all(part.file.fd, b"".join(chunk))
            part.file.records += len(chunk)
            index += len(chunk)
            if part.file.records >= self.rotate_records:
                self._seal(part)
        if part.file is not None:
            os.fsync(part.file.fd)

    def _create(self, part: _Partition, first_id: str) -> _OpenFile:
        now = self.clock()
        stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%S")
        name = f"cdr-p{part.number:03d}-{stamp}-{first_id.replace('-', '_')}.jsonl{_OPEN}"
        path = part.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        _fsync_dir(part.directory)  # the new name must survive a crash before we trim what it holds
        return _OpenFile(path, fd, 0, now)

    def _seal(self, part: _Partition) -> None:
        """fsync, close, rename .jsonl.open → .jsonl, fsync the directory."""
        opened = part.file
        assert opened is not None
        os.fsync(opened.fd)
        os.close(opened.fd)
        part.file = None
        os.rename(opened.path, opened.path.with_name(opened.path.name.removesuffix(_OPEN)))
        _fsync_dir(part.directory)

    def _seal_old_files(self) -> None:
        now = self.clock()
        for part in self._partitions.values():
            if part.file is not None and now - part.file.opened_at >= self.rotate_seconds:
                self._seal(part)

    def _forget_file(self, part: _Partition) -> None:
        if part.file is not None:
            try:
                os.close(part.file.fd)
            except OSError:
                pass
            part.file = None

    def _recover_files(self, part: _Partition, confirmed_below: StreamId | None) -> str | None:
        """Repair the partition's files, seal leftover .open ones; return the last stream id written."""
        if not part.directory.is_dir():
            part.directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(part.directory.parent)
        files = sorted((f for f in part.directory.iterdir() if _FILE_NAME.match(f.name)), key=_file_order)
        last_id: str | None = None
        for path in reversed(files):  # newest first
            leftover = path.name.endswith(_OPEN)
            if last_id is not None and not leftover:
                continue  # a sealed file older than the one that gave last_id: fsynced and complete
            found = _repair_tail(path, confirmed_below)
            if leftover and found is None:
                log.warning("%s: no complete record; removed", path)
                path.unlink()
            elif leftover:
                path.rename(path.with_name(path.name.removesuffix(_OPEN)))
            last_id = last_id or found
        _fsync_dir(part.directory)
        return last_id
