"""The conservation audit (`ocs audit`): the ledger must explain every balance, and the CDRs every usage entry.

Per partition it takes one consistent snapshot while the server runs: the ledger is read up to some entry,
then one MULTI/EXEC reads the rest of the ledger, every balance hash (subscribers' `bal:` and groups' `grp:`),
the CDR stream's pending records and its last id. The charge functions write balances, ledger entries and CDR
records in one atomic call, so inside the snapshot they agree or something is wrong. The CDR files then give
the records the CDR writer has already taken off the stream (it trims only after fsync); records added after
the snapshot (a stream id above its last id) are left out, and the stream and the files overlap by stream id.

Checks, to the micro-unit:
- balance: per bucket (owner, id, unit) the ledger's changes sum to the balance, reservations included
  (a reservation moves nothing out of a bucket);
- reservation: no bucket holds a negative reservation; a shared bucket's reservation is what its members hold;
- CDR against ledger: every usage/event/refund record that took from a bucket has its ledger change (by
  recordId, per bucket, and the money amount of each request), and every ledger usage/refund record has its
  CDR record; a stream id twice in the files is a record written twice;
- fee records against the ledger: every catalog purchase / renewal entry that names a fee record (ledger field
  `cdr`, written by lua/catalog.lua in the same call) has exactly that record, with the same changes per bucket
  (the record's "bucket" taken, its "granted" given) and the same money amount, and every fee record has its
  entry. Catalog entries written before fee records existed name none and are not matched.
Without the CDR files (no directory given) a record the CDR writer has already taken off the stream cannot
be seen: then a missing usage, refund or fee record is reported only while the stream was never trimmed.

Reads only (Redis and the CDR files); imports balances but nothing of Diameter.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

from balances import keys as k
from balances.ledger import RECORDED_TYPES, owner_of, parse_entry
from balances.model import LedgerEntry

SCAN_COUNT = 1000
SNAPSHOT_ATTEMPTS = 5
RATED_TYPES = ("usage", "event", "refund")  # CDR record types that may take from (or give to) buckets
FEE_TYPE = "fee"  # the CDR record of a catalog purchase or plan period (lua/catalog.lua)


class Difference(msgspec.Struct, omit_defaults=True):
    kind: str  # balance | reservation | cdr-missing | ledger-missing | cdr-mismatch | cdr-duplicate
    partition: int
    owner: str = ""  # 'm:<msisdn>' / 'g:<group>'
    bucket: str = ""
    unit: str = ""
    expected: int | None = None  # what the ledger (or the other side) says
    actual: int | None = None
    reference: str = ""  # recordId, stream id
    detail: str = ""


class UnitTotals(msgspec.Struct):
    credits: int = 0  # positive changes in the ledger
    debits: dict[str, int] = {}  # by ledger type: the negative changes, as positive numbers
    balance: int = 0  # the buckets' balances, reservations included
    reserved: int = 0


class AuditReport(msgspec.Struct):
    ok: bool
    partitions: int
    buckets: int
    ledger_entries: int
    cdr_records: int  # rated records (usage, event, refund) checked against the ledger
    units: dict[str, UnitTotals]
    differences: list[Difference]
    fee_records: int = 0  # fee records (catalog purchases and plan periods) checked against the ledger


class _Snapshot(msgspec.Struct):
    entries: list[LedgerEntry]
    wallets: dict[str, dict[str, bytes]]  # owner -> HGETALL
    stream: list[tuple[str, dict]]  # pending CDR stream entries
    last_cdr_id: str | None  # the stream's last id at the snapshot
    fee_refs: dict[str, str] = {}  # ledger entry id -> the recordId of the fee record it names (field `cdr`)
    trimmed: bool = False  # the stream has lost entries (the CDR writer trims what it has written to files)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sid(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _fee_ref(fields: dict) -> str | None:
    value = fields.get(b"cdr", fields.get("cdr"))
    return None if value is None else _text(value)


def _wallet_key(partition: int, owner: str) -> str:
    kind, _, name = owner.partition(":")
    return k.bal_key(partition, name) if kind == "m" else k.group_key(partition, name)


async def _wallet_owners(primaries: list[Any], partitions: int) -> dict[int, set[str]]:
    """Every balance hash, by partition ('m:<msisdn>' / 'g:<group>'): a SCAN of every primary (one server, or
    each primary of a cluster)."""
    owners: dict[int, set[str]] = defaultdict(set)
    for redis, (pattern, kind) in itertools.product(primaries, (("bal:*", "m"), ("grp:*", "g"))):
        async for key in redis.scan_iter(match=pattern, count=SCAN_COUNT, _type="HASH"):
            name = _text(key)
            tag, _, rest = name.partition("}:")
            partition = int(tag.rpartition("{p")[2])
            if partition < partitions:
                owners[partition].add(f"{kind}:{rest}")
    return owners


async def _snapshot(redis: Any, partition: int, owners: set[str]) -> _Snapshot:
    """The partition's ledger, balances and pending CDR records at one instant (see the module docstring)."""
    ledger_key = k.ledger_key(partition)
    entries: list[LedgerEntry] = []
    fee_refs: dict[str, str] = {}
    start = "-"
    while True:  # most of the ledger, outside the transaction
        page = await redis.xrange(ledger_key, start, "+", count=SCAN_COUNT)
        entries.extend(parse_entry(i, f) for i, f in page)
        fee_refs.update((_text(i), ref) for i, f in page if (ref := _fee_ref(f)) is not None)
        if len(page) < SCAN_COUNT:
            break
        start = "(" + _text(page[-1][0])
    owners = set(owners) | {owner_of(e, ref)[0] for e in entries for ref in e.changes}
    for _ in range(SNAPSHOT_ATTEMPTS):
        tail_start = "(" + entries[-1].id if entries else "-"
        ordered = sorted(owners)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xrange(ledger_key, tail_start, "+")
            for owner in ordered:
                pipe.hgetall(_wallet_key(partition, owner))
            pipe.xrange(k.cdr_key(partition), "-", "+")
            pipe.exists(k.cdr_key(partition))
            pipe.xinfo_stream(k.cdr_key(partition))  # an error reply when there is no stream yet
            results = await pipe.execute(raise_on_error=False)
        tail = [parse_entry(i, f) for i, f in results[0]]
        tail_refs = {_text(i): ref for i, f in results[0] if (ref := _fee_ref(f)) is not None}
        new_owners = {owner_of(e, ref)[0] for e in tail for ref in e.changes} - owners
        if new_owners:  # created after the scan: read them inside the snapshot too
            owners |= new_owners
            entries.extend(tail)
            fee_refs.update(tail_refs)
            continue
        wallets = {owner: results[1 + n] for n, owner in enumerate(ordered)}
        stream = [(_text(i), f) for i, f in results[1 + len(ordered)]]
        last = None
        trimmed = False
        if results[2 + len(ordered)]:
            info = {_text(key): value for key, value in results[3 + len(ordered)].items()}
            last = _text(info["last-generated-id"])
            trimmed = int(info.get("entries-added", info.get("length", 0))) > int(info.get("length", 0))
        return _Snapshot(entries + tail, wallets, stream, last, {**fee_refs, **tail_refs}, trimmed)
    raise RuntimeError(f"partition {partition}: new subscribers kept arriving; no consistent snapshot")


def _file_records(directory: Path, partition: int, last_id: str | None, pending: set[str],
                  differences: list[Difference]) -> list[dict]:
    """The partition's CDR file records with a stream id up to last_id and not in the pending stream."""
    folder = directory / f"p{partition:03d}"
    if last_id is None or not folder.is_dir():
        return []
    limit = _sid(last_id)
    seen: set[str] = set()
    records = []
    for _ in range(3):  # a file renamed from .open to .jsonl while listing: list again
        try:
            names = sorted(os.listdir(folder))
            for name in names:
                if not (name.endswith(".jsonl") or name.endswith(".jsonl.open")):
                    continue
                lines = (folder / name).read_bytes().split(b"\n")
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        record = msgspec.json.decode(line)
                    except msgspec.DecodeError:
                        if number == len(lines) and name.endswith(".open"):
                            continue  # being written: the record is still in the stream
                        raise
                    stream_id = record.get("streamId", "")
                    if stream_id in seen:
                        differences.append(Difference("cdr-duplicate", partition, reference=stream_id,
                                                      detail=f"stream id twice in the CDR files ({name})"))
                        continue
                    seen.add(stream_id)
                    if stream_id in pending or _sid(stream_id) > limit:
                        continue
                    records.append(record)
            return records
        except FileNotFoundError:
            seen.clear()
            records.clear()
    raise RuntimeError(f"CDR files of partition {partition} kept moving")


def _unit_of(meta: dict | None, bucket: str) -> str:
    if meta is not None and meta.get("unit"):
        return meta["unit"]
    return "money" if bucket == "money" else "units"


def _check_partition(partition: int, snap: _Snapshot, file_records: list[dict], report: AuditReport,
                     files_read: bool = True) -> None:
    differences = report.differences
    # ---- balances
    balances: dict[tuple[str, str], int] = {}
    units: dict[tuple[str, str], str] = {}
    for owner, raw in snap.wallets.items():
        fields = {_text(f): v for f, v in raw.items()}
        metas = {f[:-2]: msgspec.json.decode(v) for f, v in fields.items() if f.endswith(":m")}
        values = {f: int(v) for f, v in fields.items() if not f.endswith(":m")}
        for bucket in {f for f in values if ":" not in f} | set(metas):
            unit = _unit_of(metas.get(bucket), bucket)
            balances[(owner, bucket)] = values.get(bucket, 0)
            units[(owner, bucket)] = unit
            totals = report.units.setdefault(unit, UnitTotals(debits={}))
            totals.balance += values.get(bucket, 0)
            reserved = values.get(bucket + ":r", 0)
            totals.reserved += reserved
            if reserved < 0:
                differences.append(Difference("reservation", partition, owner, bucket, unit, 0, reserved,
                                              detail="negative reservation"))
            if owner.startswith("g:"):
                held = sum(v for f, v in values.items() if f.startswith(bucket + ":h:"))
                if held != reserved:
                    differences.append(Difference("reservation", partition, owner, bucket, unit, held, reserved,
                                                  detail="a shared bucket's reservation is not what its members hold"))
        report.buckets += len({f for f in values if ":" not in f} | set(metas))
    ledger: dict[tuple[str, str], int] = defaultdict(int)
    for entry in snap.entries:  # the unit of a bucket that is gone: from the entries that created or changed it
        for ref, unit in entry.units.items():
            units.setdefault(owner_of(entry, ref), unit)
    for entry in snap.entries:
        for ref, change in entry.changes.items():
            key = owner_of(entry, ref)
            ledger[key] += change
            unit = units.get(key) or _unit_of(None, key[1])
            totals = report.units.setdefault(unit, UnitTotals(debits={}))
            if change > 0:
                totals.credits += change
            elif change < 0:
                totals.debits[entry.type] = totals.debits.get(entry.type, 0) - change
    report.ledger_entries += len(snap.entries)
    for key in sorted(set(ledger) | set(balances)):
        expected, actual = ledger.get(key, 0), balances.get(key, 0)
        if expected != actual:
            differences.append(Difference("balance", partition, key[0], key[1], units.get(key, _unit_of(None, key[1])),
                                          expected, actual, detail="ledger total != balance"))
    # ---- CDR records against the ledger's usage and refund entries
    unseen_allowed = not files_read and snap.trimmed  # records on their way to files can't be seen: not missing
    by_record: dict[str, dict[str, int]] = {}
    amounts: dict[str, int] = defaultdict(int)  # ledger usage entry (request) or refund record -> money amount

    def add(record_id: str, changes: dict[str, int]) -> None:
        mine = by_record.setdefault(record_id, {})
        for ref, change in changes.items():
            mine[ref] = mine.get(ref, 0) + change

    for entry in snap.entries:
        if entry.type == "usage":
            for record_id, changes in entry.records.items():
                add(record_id, changes)
            amounts[entry.reference] += entry.amount
        elif entry.type in RECORDED_TYPES:
            add(entry.reference, entry.changes)
            amounts[entry.reference] += entry.amount
    records = [msgspec.json.decode(f[b"r"] if b"r" in f else f["r"]) for _, f in snap.stream] + file_records
    seen: dict[str, dict[str, int]] = {}
    cdr_amounts: dict[str, int] = defaultdict(int)
    for record in records:
        if record.get("recordType") not in RATED_TYPES:
            continue
        taken = {ref: v for ref, v in (record.get("bucket") or {}).items() if v}
        if not taken:
            continue
        report.cdr_records += 1
        record_id = record["recordId"]
        changes = seen.setdefault(record_id, {})
        for ref, v in taken.items():
            changes[ref] = changes.get(ref, 0) - v
        if record["recordType"] == "refund":
            cdr_amounts[record_id] -= record.get("amount", 0)
        else:
            cdr_amounts[record_id.rpartition(";")[0]] += record.get("amount", 0)
    for record_id in sorted(set(seen) | set(by_record)):
        mine, theirs = by_record.get(record_id), seen.get(record_id)
        if theirs is None:
            if not unseen_allowed:
                differences.append(Difference("cdr-missing", partition, reference=record_id,
                                              detail=f"ledger record without a CDR record: {mine}"))
        elif mine is None:
            differences.append(Difference("ledger-missing", partition, reference=record_id,
                                          detail=f"CDR record without a ledger entry: {theirs}"))
        elif {r: c for r, c in mine.items() if c} != theirs:
            differences.append(Difference("cdr-mismatch", partition, reference=record_id,
                                          detail=f"ledger {mine} != CDR {theirs}"))
    for reference in sorted(set(amounts) & set(cdr_amounts)):
        if amounts[reference] != cdr_amounts[reference]:
            differences.append(Difference("cdr-mismatch", partition, reference=reference,
                                          expected=amounts[reference], actual=cdr_amounts[reference],
                                          detail="money amount: ledger != CDR records"))
    _check_fees(partition, snap, records, report, unseen_allowed)


def _check_fees(partition: int, snap: _Snapshot, records: list[dict], report: AuditReport,
                unseen_allowed: bool) -> None:
    """Fee records against the catalog ledger entries that name them: one each, same changes, same money.
    `unseen_allowed`: the records written to files are not read, so a record missing here may be there."""
    differences = report.differences
    ledger: dict[str, tuple[dict[str, int], int]] = {}  # recordId -> (changes, money change)
    for entry in snap.entries:
        record_id = snap.fee_refs.get(entry.id)
        if record_id is None:
            continue
        if record_id in ledger:
            differences.append(Difference("cdr-mismatch", partition, reference=record_id,
                                          detail=f"two ledger entries name the fee record (one is {entry.id})"))
        ledger[record_id] = ({r: c for r, c in entry.changes.items() if c}, entry.amount)
    cdr: dict[str, tuple[dict[str, int], int]] = {}
    for record in records:
        if record.get("recordType") != FEE_TYPE:
            continue
        report.fee_records += 1
        record_id = record["recordId"]
        if record_id in cdr:
            differences.append(Difference("cdr-duplicate", partition, reference=record_id,
                                          detail="fee record written twice (two stream entries)"))
            continue
        changes: dict[str, int] = {}
        for ref, taken in (record.get("bucket") or {}).items():
            changes[ref] = changes.get(ref, 0) - taken
        for ref, given in (record.get("granted") or {}).items():
            changes[ref] = changes.get(ref, 0) + given
        cdr[record_id] = ({r: c for r, c in changes.items() if c}, -record.get("amount", 0))
    for record_id in sorted(set(ledger) | set(cdr)):
        mine, theirs = ledger.get(record_id), cdr.get(record_id)
        if theirs is None:
            if not unseen_allowed:
                differences.append(Difference("cdr-missing", partition, reference=record_id,
                                              detail=f"catalog ledger entry without its fee record: {mine}"))
        elif mine is None:
            differences.append(Difference("ledger-missing", partition, reference=record_id,
                                          detail=f"fee record without a ledger entry: {theirs}"))
        elif mine[0] != theirs[0]:
            differences.append(Difference("cdr-mismatch", partition, reference=record_id,
                                          detail=f"ledger {mine[0]} != fee record {theirs[0]}"))
        elif mine[1] != theirs[1]:
            differences.append(Difference("cdr-mismatch", partition, reference=record_id, expected=mine[1],
                                          actual=theirs[1], detail="money amount: ledger != fee record"))


async def audit(store: Any, cdr_directory: Path | str | None) -> AuditReport:
    """The whole audit over every partition (works while the server runs); report.ok when nothing differs."""
    await store.ready()
    report = AuditReport(ok=True, partitions=store.partitions, buckets=0, ledger_entries=0, cdr_records=0,
                         units={}, differences=[])
    directory = Path(cdr_directory) if cdr_directory is not None else None
    owners = await _wallet_owners(await store.primary_clients(), store.partitions)
    for partition in range(store.partitions):
        # the partition's own node: its keys share a slot, so MULTI/EXEC there is one consistent instant
        redis = await store.client_for(k.ledger_key(partition))
        snap = await _snapshot(redis, partition, owners.get(partition, set()))
        pending = {stream_id for stream_id, _ in snap.stream}
        file_records = (_file_records(directory, partition, snap.last_cdr_id, pending, report.differences)
                        if directory is not None else [])
        _check_partition(partition, snap, file_records, report, files_read=directory is not None)
    report.ok = not report.differences
    return report
