"""The ledger stream `ledger:{pNNN}` read back: entries, the buckets each one changes, running balances.

Every function that changes a balance appends its entry in the same call (lua/common.lua ledger_add), so
replaying a partition's ledger from its first entry gives every bucket's balance (reservations included: a
reservation moves nothing between buckets). Nothing here talks to Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from balances.model import MONEY, LedgerEntry

_changes = msgspec.json.Decoder(dict[str, int])
_records = msgspec.json.Decoder(dict[str, dict[str, int]])
_units = msgspec.json.Decoder(dict[str, str])

# which types credit and which debit, for reports (the sign of each change is what counts)
CREDIT_TYPES = ("provision", "topup", "refund", "credit", "purchase", "renewal")
DEBIT_TYPES = ("usage", "expiry")
# usage-like entries that a CDR record stands behind (reference = its recordId)
RECORDED_TYPES = ("usage", "refund")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_entry(entry_id: bytes | str, fields: dict) -> LedgerEntry:
    """One XRANGE item as a LedgerEntry. A usage entry's `r` holds each record's changes (by rating group: the
    recordId is '<reference>;<rating group>'); `b` holds several buckets' changes; otherwise the entry changes
    one bucket (`bucket`, default money) by `amount`."""
    f = {_text(key): _text(value) for key, value in fields.items()}
    amount = int(f.get("amount", "0"))
    reference = f.get("reference", "")
    records: dict[str, dict[str, int]] = {}
    if "r" in f:
        changes: dict[str, int] = {}
        for rating_group, taken in _records.decode(f["r"]).items():
            records[f"{reference};{rating_group}"] = taken
            for ref, change in taken.items():
                changes[ref] = changes.get(ref, 0) + change
    elif "b" in f:
        changes = _changes.decode(f["b"])
    else:
        changes = {f.get("bucket", MONEY): amount}
    units = _units.decode(f["u"]) if "u" in f else {}
    if "unit" in f:
        units[f.get("bucket", MONEY)] = f["unit"]
    return LedgerEntry(id=_text(entry_id), time=int(f.get("time", "0")), type=f.get("type", ""),
                       msisdn=f.get("msisdn", ""), changes=changes, amount=amount, reference=reference,
                       group=f.get("group", ""), reason=f.get("reason", ""), records=records, units=units)


def owner_of(entry: LedgerEntry, ref: str) -> tuple[str, str]:
    """(owner, bucket id) a change belongs to: ('m:<msisdn>', id) or ('g:<group>', id). A '@' ref is a bucket
    of the entry's group; a plain ref of an entry without msisdn is the group's own."""
    if ref.startswith("@"):
        return "g:" + entry.group, ref[1:]
    if entry.msisdn:
        return "m:" + entry.msisdn, ref
    return "g:" + entry.group, ref


def totals(entries: Iterable[LedgerEntry]) -> dict[tuple[str, str], int]:
    """(owner, bucket) -> sum of the changes: what the balances must be."""
    out: dict[tuple[str, str], int] = {}
    for entry in entries:
        for ref, change in entry.changes.items():
            key = owner_of(entry, ref)
            out[key] = out.get(key, 0) + change
    return out


def history(entries: Iterable[LedgerEntry], msisdn: str, group: str = "") -> list[dict[str, Any]]:
    """The lines that explain the subscriber's balances: one per bucket changed by an entry of the subscriber,
    or of its group's shared buckets (also when another member drew from them), each with the bucket's
    running balance. Bucket names are the subscriber's view: '@<id>' for the group's."""
    running: dict[tuple[str, str], int] = {}
    lines: list[dict[str, Any]] = []
    me, shared = "m:" + msisdn, "g:" + group if group else None
    for entry in entries:
        for ref, change in entry.changes.items():
            owner, bucket = owner_of(entry, ref)
            key = (owner, bucket)
            running[key] = running.get(key, 0) + change
            if owner != me and owner != shared:
                continue
            lines.append({
                "id": entry.id, "time": entry.time, "type": entry.type,
                "bucket": bucket if owner == me else "@" + bucket, "change": change, "balance": running[key],
                "reference": entry.reference, "reason": entry.reason,
                "by": entry.msisdn if owner != me else msisdn,
            })
    return lines
