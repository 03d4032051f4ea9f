"""Usage ingestion: CDR files → usage_records, guided to billing accounts, with a reject queue.

Which files: `<cdr dir>/pNNN/*.jsonl` only. A `.jsonl.open` file is still being written: the CDR writer may
cut its tail on recovery and renames it to `.jsonl` when it is complete, so it is skipped (and counted)
until then; its records are imported by the run after the rename. A sealed file never changes, so a file
already imported with the same size is not read again (`rescan` reads it anyway).

Idempotent: a record is keyed by its recordId (INSERT ... ON CONFLICT DO NOTHING), so importing a file
twice, or the same records under another file name, changes nothing. Each file is imported in one
transaction: all its good lines or none of them. A malformed line (not JSON, a field of the wrong type, an
unknown record type, an undecodable stream entry) is reported with file, line and reason and kept in
import_errors; `on_error="skip"` imports the rest of the file, `on_error="reject-file"` imports nothing
from that file (it is tried again next time).

Record states: received (imported) → guided (account found) → billed (on an invoice); or rejected (no
account, no subscription on that date, wrong currency) with the reason, until `recycle` guides it again.
Guiding is set-based SQL: the subscription whose MSISDN (else IMSI) and [start_date, end_date) cover the
record's UTC date, on an account of the record's currency.

Buckets: a record's "bucket" map says what it took from each bucket ref ('<id>' the subscriber's, '@<id>'
its group's): money buckets in micro-units, allowance buckets in their own units. Import resolves each ref's
unit: the record's "bucketUnits" map ({ref: unit}, written by the charge script beside "bucket"), else, for
CDRs written before it, the catalog (billing.toml bucket_units, then the rate card's money and allowance
buckets). A ref no source knows, or money refs that do not add up to the record's amount, make the line
malformed (fix bucket_units, import with rescan). Per record
this gives: money_invoiced (money from invoiced money buckets: the plan's money bucket, own or shared —
what a postpaid account owes), money_bonus (money from any other money bucket: bonus, promotions — paid
already, never invoiced), the shared ('@') parts of both, and allowance_units (informational; re-rating keeps
them free). money_invoiced + money_bonus = amount, always.

Rating keys and time (billing.rerating reads them): what online charging chose the schedule that priced the
record with, at the grant the usage was used under: serving_plmn is its "ratingPlmn" (normalized MCC-MNC; it
follows a handover), else the session's "servingNodePLMN"; destination is "calledPartyAddress"; rated_at is
"ratedAt" (epoch ms), NULL for CDRs written before it.

Fee records (recordType "fee", written by the catalog function in the same call as the debit: a plan
period's fee or an add-on purchase) are imported like usage, idempotent by recordId, guided the same way:
feeType (plan | addon), item (the catalog name), a plan's period [periodStart, periodEnd), the amount and the
money bucket it came from (split like usage: invoiced or bonus money). No ratingGroup. The bill run makes one
"fee" line of each (billing.billrun).

Imports msgspec and billing only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from billing.config import MONEY, Catalog
from billing.db import Database

__all__ = ["BucketSplit", "GuideReport", "ImportReport", "LineError", "guide", "import_cdrs", "rejects", "recycle",
           "record_states", "split_buckets"]

RECORD_TYPES = ("usage", "event", "refund", "close", "fee")
FEE_TYPES = ("plan", "addon")
_FILE = re.compile(r"^p\d+$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class _Usage(msgspec.Struct):
    time: int | None = None
    octetsIn: int | None = None  # noqa: N815 - the CDR's field names
    octetsOut: int | None = None  # noqa: N815
    octetsTotal: int | None = None  # noqa: N815
    units: int | None = None


class _TariffPart(msgspec.Struct):
    """One part of a usage report split at a Tariff-Time-Change (the record's tariffParts)."""

    tariffChangeUsage: str  # noqa: N815 - used | before | after | indeterminate
    usage: _Usage
    amount: int
    tariff: str | None = None
    ratingVersion: str | None = None  # noqa: N815


class _Cdr(msgspec.Struct):
    """The CDR fields billing reads; other fields are allowed and ignored."""

    recordId: str  # noqa: N815
    recordType: str  # noqa: N815
    recordTime: int  # noqa: N815
    amount: int
    currency: str
    servedMSISDN: str | None = None  # noqa: N815
    servedIMSI: str | int | None = None  # noqa: N815
    sessionId: str | None = None  # noqa: N815
    chargingID: str | int | None = None  # noqa: N815
    ratingGroup: int | None = None  # noqa: N815
    serviceIdentifier: int | None = None  # noqa: N815
    recordOpeningTime: int | None = None  # noqa: N815
    usage: _Usage | None = None
    bucket: dict[str, int] | None = None
    bucketUnits: dict[str, str] | None = None  # noqa: N815 - the unit of each ref of `bucket`
    ratingVersion: str | None = None  # noqa: N815
    ccRequestNumber: int | None = None  # noqa: N815
    servingNodePLMN: str | int | None = None  # noqa: N815
    serviceContextId: str | None = None  # noqa: N815
    calledPartyAddress: str | None = None  # noqa: N815 - the destination the record's schedule was chosen with
    ratingPlmn: str | None = None  # noqa: N815 - the serving MCC-MNC it was chosen with (normalized)
    ratedAt: int | None = None  # noqa: N815 - epoch ms: when it was chosen (the grant's time)
    tariff: str | None = None
    tariffParts: list[_TariffPart] | None = None  # noqa: N815
    feeType: str | None = None  # noqa: N815 - fee records: plan | addon
    item: str | None = None  # fee records: the catalog plan or add-on
    periodStart: int | None = None  # noqa: N815 - a plan fee's period, epoch ms
    periodEnd: int | None = None  # noqa: N815


_decode = msgspec.json.Decoder(_Cdr).decode
_encode = msgspec.json.encode
TARIFF_PARTS = ("used", "before", "after", "indeterminate")
UnitOf = Callable[[str], str | None]


def _legacy_unit(ref: str) -> str:
    """Without a catalog (library use): 'money' / '@money' is money, any other ref allowance units."""
    return MONEY if ref in ("money", "@money") else "allowance"


@dataclass(frozen=True)
class BucketSplit:
    """What one record drew, by the real unit of each bucket (see the module docstring)."""

    money_invoiced: int = 0
    money_bonus: int = 0
    money_shared: int = 0
    allowance_units: int = 0
    allowance_shared: int = 0
    buckets: str | None = None  # JSON {ref: [amount, unit]}


def split_buckets(rec: _Cdr, unit_of: UnitOf, invoiced: Callable[[str], bool]) -> BucketSplit:
    """Classify the record's bucket refs by unit; ValueError with the reason when a unit is unknown or the
    money refs do not add up to the record's amount."""
    if not rec.bucket:
        if rec.amount:
            raise ValueError(f"amount {rec.amount} but no bucket map")
        return BucketSplit()
    carried = rec.bucketUnits or {}
    money_invoiced = money_bonus = money_shared = allowance = allowance_shared = 0
    resolved: dict[str, list] = {}
    for ref, value in rec.bucket.items():
        unit = carried.get(ref) or unit_of(ref)
        if unit is None:
            raise ValueError(f"bucket {ref!r} has no known unit: the CDR carries none and neither billing.toml "
                             "bucket_units nor the rate card names it (add it, then import with --rescan)")
        resolved[ref] = [value, unit]
        shared = ref.startswith("@")
        if unit == MONEY:
            if invoiced(ref):
                money_invoiced += value
            else:
                money_bonus += value
            if shared:
                money_shared += value
        else:
            allowance += value
            if shared:
                allowance_shared += value
    if money_invoiced + money_bonus != rec.amount:
        raise ValueError(f"money buckets add up to {money_invoiced + money_bonus}, the record's amount is "
                         f"{rec.amount}: a bucket's unit is wrong (billing.toml bucket_units)")
    return BucketSplit(money_invoiced, money_bonus, money_shared, allowance, allowance_shared,
                       _encode(resolved).decode())


@dataclass(frozen=True)
class LineError:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class GuideReport:
    guided: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class ImportReport:
    files_seen: int = 0
    files_imported: int = 0
    files_unchanged: int = 0  # imported before with the same size: not read again
    files_open: int = 0  # .jsonl.open, still being written: skipped
    files_rejected: list[str] = field(default_factory=list)
    lines: int = 0
    inserted: int = 0
    duplicates: int = 0
    amount_inserted: int = 0  # micro-units in the records inserted by this import
    errors: list[LineError] = field(default_factory=list)
    guide: GuideReport | None = None


def _utc_date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


def _row(rec: _Cdr, source: str, line_no: int, now_ms: int, unit_of: UnitOf,
         invoiced: Callable[[str], bool]) -> tuple:
    """A usage_records row in the INSERT's column order; raises ValueError with the reason."""
    if rec.recordType not in RECORD_TYPES:
        raise ValueError(f"unknown recordType {rec.recordType!r}")
    if not rec.recordId:
        raise ValueError("empty recordId")
    if not _CURRENCY.match(rec.currency):
        raise ValueError(f"currency {rec.currency!r} is not an ISO 4217 code")
    if rec.recordTime <= 0 or rec.recordTime > 10**14:
        raise ValueError(f"recordTime {rec.recordTime} is not epoch milliseconds")
    if rec.ratedAt is not None and (rec.ratedAt <= 0 or rec.ratedAt > 10**14):
        raise ValueError(f"ratedAt {rec.ratedAt} is not epoch milliseconds")
    if rec.servedMSISDN is None and rec.servedIMSI is None:
        raise ValueError("record has neither servedMSISDN nor servedIMSI")
    if rec.recordType not in ("close", "fee") and rec.ratingGroup is None:
        raise ValueError(f"{rec.recordType} record without ratingGroup")
    if rec.recordType == "fee":
        _check_fee(rec)
    elif rec.feeType is not None:
        raise ValueError(f"feeType in a {rec.recordType} record")
    if rec.recordType in ("usage", "event", "fee") and rec.amount < 0:
        raise ValueError(f"negative amount {rec.amount} in a {rec.recordType} record")
    if rec.recordType == "refund" and rec.amount > 0:
        raise ValueError(f"positive amount {rec.amount} in a refund record")
    u = rec.usage or _Usage()
    for name in ("time", "octetsIn", "octetsOut", "octetsTotal", "units"):
        value = getattr(u, name)
        if value is not None and value < 0:
            raise ValueError(f"negative usage.{name}")
    for part in rec.tariffParts or ():
        if part.tariffChangeUsage not in TARIFF_PARTS:
            raise ValueError(f"unknown tariffChangeUsage {part.tariffChangeUsage!r}")
    split = split_buckets(rec, unit_of, invoiced)
    plmn = rec.ratingPlmn or rec.servingNodePLMN
    return (
        rec.recordId, rec.recordType, rec.servedMSISDN,
        None if rec.servedIMSI is None else str(rec.servedIMSI), rec.sessionId,
        None if rec.chargingID is None else str(rec.chargingID), rec.ratingGroup, rec.serviceIdentifier,
        rec.recordOpeningTime, rec.recordTime, _utc_date(rec.recordTime), u.time, u.octetsIn, u.octetsOut,
        u.octetsTotal, u.units, split.allowance_units, rec.amount, rec.currency, rec.ratingVersion, source, line_no,
        now_ms, split.money_invoiced, split.money_bonus, split.money_shared, split.allowance_shared, split.buckets,
        rec.ccRequestNumber, None if plmn is None else str(plmn), rec.serviceContextId or None,
        rec.calledPartyAddress or None, rec.tariff or None,
        _encode(rec.tariffParts).decode() if rec.tariffParts else None, rec.ratedAt, rec.feeType, rec.item,
        rec.periodStart, rec.periodEnd,
    )


def _check_fee(rec: _Cdr) -> None:
    if rec.feeType not in FEE_TYPES:
        raise ValueError(f"fee record with feeType {rec.feeType!r} (plan or addon)")
    if not rec.item:
        raise ValueError("fee record without item")
    if rec.feeType == "plan":
        start, end = rec.periodStart, rec.periodEnd
        if start is None or end is None or not 0 < start < end <= 10**14:
            raise ValueError(f"plan fee record with period [{start}, {end}): not epoch milliseconds, start < end")


_AMOUNT = 17  # index of amount in a row
_INSERT = (
    "INSERT INTO usage_records (record_id, record_type, msisdn, imsi, session_id, charging_id, rating_group, "
    "service_id, opening_time, record_time, record_date, usage_time, octets_in, octets_out, octets_total, "
    "usage_units, allowance_units, amount, currency, rating_version, source_file, source_line, imported_at, "
    "money_invoiced, money_bonus, money_shared, allowance_shared, buckets, request_number, serving_plmn, "
    "service_context, destination, tariff, tariff_parts, rated_at, fee_type, fee_item, fee_period_start, "
    "fee_period_end, state) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "?, ?, ?, ?, 'received') ON CONFLICT (record_id) DO NOTHING"
)


def parse_file(path: Path, name: str, now_ms: int, catalog: Catalog | None = None,
               ) -> tuple[list[tuple], list[LineError], int]:
    """Rows and errors of one CDR file, and its line count. Bucket units come from the catalog (see the module
    docstring); without one, 'money' is money and any other ref allowance units."""
    unit_of: UnitOf = catalog.bucket_unit if catalog is not None else _legacy_unit
    invoiced = catalog.invoiced_money if catalog is not None else (lambda ref: True)
    rows: list[tuple] = []
    errors: list[LineError] = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        try:
            rec = _decode(raw)
            rows.append(_row(rec, name, number, now_ms, unit_of, invoiced))
        except msgspec.ValidationError as exc:
            reason = str(exc)
            if b'"UNDECODABLE"' in raw:
                reason = "the CDR writer could not decode this stream entry (UNDECODABLE)"
            errors.append(LineError(name, number, reason))
        except msgspec.DecodeError as exc:
            errors.append(LineError(name, number, f"invalid JSON: {exc}"))
        except ValueError as exc:
            errors.append(LineError(name, number, str(exc)))
    return rows, errors, len(lines)


def cdr_files(directory: Path) -> tuple[list[Path], int]:
    """Sealed CDR files under directory/pNNN, in name order, and how many .open files were skipped."""
    sealed: list[Path] = []
    open_files = 0
    if not directory.is_dir():
        return sealed, 0
    for part in sorted(p for p in directory.iterdir() if p.is_dir() and _FILE.match(p.name)):
        for path in sorted(part.iterdir()):
            if path.name.endswith(".jsonl"):
                sealed.append(path)
            elif path.name.endswith(".jsonl.open"):
                open_files += 1
    return sealed, open_files


def import_cdrs(db: Database, directory: str | Path, *, now_ms: int, on_error: str = "skip",
                rescan: bool = False, guide_records: bool = True, files: list[Path] | None = None,
                catalog: Catalog | None = None) -> ImportReport:
    """Import the sealed CDR files of `directory` (or the given `files`), then guide what is received.
    `catalog` resolves the unit of each bucket (the CLI always passes it)."""
    if on_error not in ("skip", "reject-file"):
        raise ValueError("on_error must be 'skip' or 'reject-file'")
    directory = Path(directory)
    report = ImportReport()
    if files is None:
        files, report.files_open = cdr_files(directory)
    known = {name: size for name, size in db.query("SELECT name, size FROM cdr_files")}
    for path in files:
        report.files_seen += 1
        try:
            name = str(path.relative_to(directory))
        except ValueError:
            name = str(path)
        size = path.stat().st_size
        if not rescan and known.get(name) == size:
            report.files_unchanged += 1
            continue
        rows, errors, line_count = parse_file(path, name, now_ms, catalog)
        report.lines += line_count
        report.errors.extend(errors)
        rejected = bool(errors) and on_error == "reject-file"
        with db.transaction():
            if errors:
                db.executemany("INSERT INTO import_errors (file, line, reason, raw, seen_at) VALUES (?, ?, ?, ?, ?) "
                               "ON CONFLICT (file, line) DO NOTHING",
                               [(e.file, e.line, e.reason, _raw_line(path, e.line), now_ms) for e in errors])
            if rejected:
                report.files_rejected.append(name)
                continue
            inserted = db.executemany(_INSERT, rows)
            if inserted == len(rows):  # the usual case: all new (else ask which ones were)
                report.amount_inserted += sum(row[_AMOUNT] for row in rows)
            elif inserted:
                report.amount_inserted += _amount_of_new(db, name, now_ms)
            report.inserted += inserted
            report.duplicates += len(rows) - inserted
            db.execute("DELETE FROM cdr_files WHERE name = ?", (name,))
            db.execute("INSERT INTO cdr_files (name, size, lines, inserted, duplicates, malformed, imported_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, size, line_count, inserted, len(rows) - inserted, len(errors), now_ms))
        report.files_imported += 1
    if guide_records:
        report.guide = guide(db)
    return report


def _amount_of_new(db: Database, name: str, now_ms: int) -> int:
    return int(db.scalar("SELECT COALESCE(SUM(amount), 0) FROM usage_records WHERE source_file = ? "
                         "AND imported_at = ? AND state = 'received'", (name, now_ms)) or 0)


def _raw_line(path: Path, number: int) -> str:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if n == number:
                return raw.rstrip(b"\n")[:2000].decode("utf-8", "replace")
    return ""


_GUIDE_BY = {
    "msisdn": "s.msisdn = usage_records.msisdn",
    "imsi": "usage_records.msisdn IS NULL AND s.imsi = usage_records.imsi",
}


def guide(db: Database) -> GuideReport:
    """Guide every received record to the account whose subscription covers it; reject the rest."""
    report = GuideReport()
    with db.transaction(lock="guiding"):
        for condition in _GUIDE_BY.values():
            report.guided += db.execute(
                "UPDATE usage_records SET state = 'guided', account_id = s.account_id, "
                "subscription_id = s.subscription_id, reject_reason = NULL "
                "FROM subscriptions s, accounts a "
                f"WHERE usage_records.state = 'received' AND {condition} "
                "AND s.start_date <= usage_records.record_date "
                "AND (s.end_date IS NULL OR usage_records.record_date < s.end_date) "
                "AND a.account_id = s.account_id AND a.currency = usage_records.currency")
        left = db.query("SELECT record_id, msisdn, imsi, record_date, currency FROM usage_records "
                        "WHERE state = 'received'")
        if left:
            subs: dict[str, list[tuple]] = {}
            for msisdn, imsi, start, end, currency in db.query(
                    "SELECT s.msisdn, s.imsi, s.start_date, s.end_date, a.currency FROM subscriptions s "
                    "JOIN accounts a ON a.account_id = s.account_id"):
                subs.setdefault(f"m:{msisdn}", []).append((start, end, currency))
                if imsi:
                    subs.setdefault(f"i:{imsi}", []).append((start, end, currency))
            updates = []
            reasons: Counter[str] = Counter()
            for record_id, msisdn, imsi, day, currency in left:
                key = f"m:{msisdn}" if msisdn else f"i:{imsi}"
                who = f"MSISDN {msisdn}" if msisdn else f"IMSI {imsi}"
                found = subs.get(key)
                if not found:
                    reason = f"no billing account for {who}"
                    category = "unknown subscriber"
                elif not any(s <= day and (e is None or day < e) for s, e, _ in found):
                    reason = f"{who} has no subscription on {day}"
                    category = "no subscription on that date"
                else:
                    reason = f"currency {currency} differs from the account's"
                    category = "currency mismatch"
                reasons[category] += 1
                updates.append((reason, record_id))
            db.executemany("UPDATE usage_records SET state = 'rejected', reject_reason = ? "
                           "WHERE record_id = ? AND state = 'received'", updates)
            report.rejected = len(updates)
            report.reasons = dict(reasons)
    return report


def recycle(db: Database, *, reason_contains: str | None = None) -> GuideReport:
    """Send rejected records (all, or those whose reason contains the text) through guiding again."""
    with db.transaction(lock="guiding"):
        if reason_contains:
            db.execute("UPDATE usage_records SET state = 'received' WHERE state = 'rejected' "
                       "AND reject_reason LIKE ?", (f"%{reason_contains}%",))
        else:
            db.execute("UPDATE usage_records SET state = 'received' WHERE state = 'rejected'")
    return guide(db)


def rejects(db: Database, limit: int = 100) -> dict:
    """The reject queue: counts and amounts by reason, and the first `limit` records."""
    by_reason = [
        {"reason": reason, "records": int(count), "amount": int(amount or 0)}
        for reason, count, amount in db.query(
            "SELECT reject_reason, COUNT(*), SUM(amount) FROM usage_records WHERE state = 'rejected' "
            "GROUP BY reject_reason ORDER BY COUNT(*) DESC, reject_reason")
    ]
    records = db.query_dicts(
        "SELECT record_id, record_type, msisdn, imsi, record_time, amount, currency, reject_reason, "
        "source_file, source_line FROM usage_records WHERE state = 'rejected' ORDER BY record_time, record_id "
        "LIMIT ?", (limit,))
    return {"by_reason": by_reason, "records": records,
            "total": sum(r["records"] for r in by_reason), "amount": sum(r["amount"] for r in by_reason)}


def record_states(db: Database) -> dict[str, dict[str, int]]:
    """Records and amounts per state."""
    return {state: {"records": int(n), "amount": int(a or 0)}
            for state, n, a in db.query("SELECT state, COUNT(*), SUM(amount) FROM usage_records GROUP BY state "
                                        "ORDER BY state")}
