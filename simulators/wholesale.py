"""Wholesale test material: a month of CDRs in the CDR writer's format, and the host network's wholesale
file derived from CDRs with known discrepancies injected, so reconciliation can be tested exactly.

`synthesize_month` writes `<dir>/pNNN/cdr-....jsonl` files whose lines have the fields, order and types
the charge and event functions produce (data sessions with partial records, voice calls, SMS events, close
records), priced with the rate card exactly as online charging prices them (allowances first, then
`ratecards.amount_for_units`). It is for benchmarks and demos; the end-to-end test uses real OCS output.

`derive_host_file` reads CDR files and writes the host's CSV (columns, service names and time format
from the billing config's reconciliation.format): data as 1–2 partial records per session × rating
group, one record per call and per SMS, charged at the wholesale rates, and a control trailer. It then
injects discrepancies (dropped, duplicated, shifted, inflated, extra and unknown-SIM records, sequence
gaps) and returns what it injected, named the way `billing.reconcile` names its findings.

    python -m simulators.wholesale month --out data/cdr --month 2026-11 --subscribers 10
    python -m simulators.wholesale host --cdr data/cdr --out host.csv --drop 2 --duplicate 1 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import zlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import msgspec

from billing.config import (
    DEMO_BILLING_CONFIG,
    UNIT_OF_SERVICE,
    WHOLESALE_FIELDS,
    BillingConfig,
    load_billing_config,
)
from billing.reconcile import wholesale_charge
from ratecards import compile_plan, initial_allowances, load_ratecard
from ratecards.pricing import amount_for_units

__all__ = ["Injected", "derive_host_file", "read_cdrs", "synthesize_month", "write_host_csv"]

DEMO_RATECARD = Path(__file__).resolve().parents[1] / "ocs" / "demo" / "ratecard.toml"
_encode = msgspec.json.Encoder().encode


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


# ---- a month of CDRs ---------------------------------------------------------------------------------


@dataclass
class _PartitionFile:
    partition: int
    lines: list[bytes] = field(default_factory=list)
    last_ms: int = 0
    seq: int = 0

    def stream_id(self, ms: int) -> str:
        if ms <= self.last_ms:
            self.seq += 1
        else:
            self.last_ms, self.seq = ms, 0
        return f"{self.last_ms}-{self.seq}"


def synthesize_month(directory: str | Path, month: str, subscribers: list[tuple[str, str, str]], *,
                     ratecard: str | Path = DEMO_RATECARD, seed: int = 1, partitions: int = 16,
                     data_sessions_per_day: int = 1, calls_per_day: float = 0.5, sms_per_day: float = 1.0,
                     origin_host: str = "pgw1.sim.test", days: int | None = None) -> dict:
    """Write one month of traffic for (msisdn, imsi, plan) subscribers; returns record count and amount."""
    rng = random.Random(seed)
    card = load_ratecard(ratecard)
    year, mon = (int(x) for x in month.split("-"))
    first = date(year, mon, 1)
    n_days = days or ((date(year + mon // 12, mon % 12 + 1, 1) - first).days)
    files = {p: _PartitionFile(p) for p in range(partitions)}
    by_service: dict[str, int] = {}
    schedules = {plan: compile_plan(card, plan) for plan in {s[2] for s in subscribers}}
    for plan, table in schedules.items():
        for rg, sched in table.items():
            by_service.setdefault(f"{plan}:{sched.unit}", rg)
    total = records = 0
    session_no = 0
    for msisdn, imsi, plan in subscribers:
        part = files[zlib.crc32(msisdn.encode()) % partitions]
        allowance = dict(initial_allowances(card, plan))
        table = schedules[plan]

        def rate(rg: int, units: int, table=table, allowance=allowance) -> tuple[int, dict[str, int]]:
            sched = table[rg]
            taken: dict[str, int] = {}
            rest = units
            for bucket in sched.allowances:
                take = min(allowance.get(bucket, 0), rest)
                if take > 0:
                    allowance[bucket] -= take
                    taken[bucket] = take
                    rest -= take
            amount = amount_for_units(sched, rest)
            if amount:
                taken[sched.money_bucket] = amount
            return amount, taken

        def emit(record: dict, part: _PartitionFile = part) -> None:
            nonlocal total, records
            record["streamId"] = part.stream_id(record["recordTime"])
            part.lines.append(_encode(record) + b"\n")
            total += record["amount"]
            records += 1

        for day in range(n_days):
            base = datetime(first.year, first.month, first.day, tzinfo=UTC) + timedelta(days=day)
            plans = []
            plans += [("bytes", 0)] * data_sessions_per_day
            plans += [("seconds", 0)] * (1 if rng.random() < calls_per_day else 0)
            plans += [("events", 0)] * int(sms_per_day + (1 if rng.random() < sms_per_day % 1 else 0))
            for unit, _ in plans:
                rg = by_service.get(f"{plan}:{unit}")
                if rg is None:
                    continue
                session_no += 1
                opened = _ms(base + timedelta(seconds=rng.randrange(0, 86_000 - 4000)))
                sid = f"{origin_host};{seed};{session_no}"
                static = {"schemaVersion": 1, "servedMSISDN": msisdn, "servedIMSI": imsi, "sessionId": sid,
                          "originHost": origin_host}
                version = card.version
                if unit == "events":
                    units = 1
                    amount, taken = rate(rg, units)
                    emit({"recordId": f"{sid};0;{rg}", "recordType": "event", **static,
                          "recordOpeningTime": opened, "ccRequestNumber": 0, "recordTime": opened,
                          "ratingGroup": rg, "usage": {"units": units}, "amount": amount,
                          "currency": card.currency, "bucket": taken, "ratingVersion": version})
                    continue
                static["chargingID"] = str(rng.randrange(10**8, 10**9))
                static["recordOpeningTime"] = opened
                parts = rng.randint(1, 3)
                t = opened
                for n in range(1, parts + 1):
                    if unit == "bytes":
                        used = {"octetsTotal": rng.randrange(1_000_000, 80_000_000)}
                        units = used["octetsTotal"]
                    else:
                        used = {"time": rng.randrange(10, 600)}
                        units = used["time"]
                    t += rng.randrange(30_000, 900_000) if unit == "bytes" else units * 1000
                    amount, taken = rate(rg, units)
                    emit({"recordId": f"{sid};{n};{rg}", "recordType": "usage", **static, "ccRequestNumber": n,
                          "recordTime": t, "ratingGroup": rg, "usage": used, "amount": amount,
                          "currency": card.currency, "bucket": taken, "ratingVersion": version})
                emit({"recordId": f"{sid};{parts};close", "recordType": "close", **static, "ccRequestNumber": parts,
                      "recordTime": t, "causeForRecClosing": "normalRelease", "amount": 0,
                      "currency": card.currency})
    directory = Path(directory)
    written = 0
    for part in files.values():
        if not part.lines:
            continue
        folder = directory / f"p{part.partition:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        first_id = json.loads(part.lines[0])["streamId"].replace("-", "_")
        name = f"cdr-p{part.partition:03d}-{first.strftime('%Y%m%d')}T000000-{first_id}.jsonl"
        (folder / name).write_bytes(b"".join(part.lines))
        written += 1
    return {"records": records, "amount": total, "files": written}


# ---- the host's wholesale file -----------------------------------------------------------------------


def read_cdrs(directory: str | Path) -> list[dict]:
    """Every record of the sealed CDR files under directory/pNNN."""
    out = []
    for path in sorted(Path(directory).glob("p*/*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                out.append(msgspec.json.decode(line))
    return out


@dataclass
class _HostRow:
    service: str
    imsi: str
    msisdn: str
    charging_id: str
    rating_group: int | None
    start_ms: int
    quantity: int
    other_party: str = ""
    key: str = ""  # the reconciliation item this row belongs to (data: imsi|charging|rg; else session/record id)
    seq: int = 0


@dataclass
class Injected:
    """One injected discrepancy: `kind` as reconciliation reports it; `our_key` for items we have,
    `host_seq` for host-only rows (their final sequence number)."""

    kind: str
    our_key: str | None = None
    host_seq: int | None = None


def _unit_of(card, rg: int) -> str | None:
    for plan in card.plans.values():
        for r in plan.rates:
            if r.rating_group == rg:
                return r.unit
    return None


def derive_host_file(cdrs: list[dict], out: str | Path, *, config: BillingConfig | None = None,
                     ratecard: str | Path = DEMO_RATECARD, seed: int = 7, drop: int = 0, duplicate: int = 0,
                     shift: int = 0, inflate: int = 0, extra: int = 0, unknown_sims: int = 0,
                     sequence_gaps: int = 0, wrong_trailer: bool = False) -> list[Injected]:
    """Write the host's CSV for `cdrs` with the asked discrepancies; return what was injected."""
    config = config or load_billing_config(DEMO_BILLING_CONFIG)
    card = load_ratecard(ratecard)
    minor = 10 ** (6 - card.currency_minor_digits)
    rng = random.Random(seed)
    rec = config.reconciliation
    service_of_unit = {u: s for s, u in UNIT_OF_SERVICE.items()}
    # 1. items as the host sees them
    items: dict[str, list[_HostRow]] = {}
    order: list[str] = []
    for r in sorted(cdrs, key=lambda r: (r.get("recordOpeningTime") or r["recordTime"], r["recordId"])):
        if r.get("recordType") not in ("usage", "event"):
            continue
        unit = _unit_of(card, r["ratingGroup"])
        service = service_of_unit.get(unit or "")
        if service is None:
            continue
        usage = r.get("usage") or {}
        imsi, msisdn = str(r.get("servedIMSI", "")), r.get("servedMSISDN", "")
        if service == "data":
            qty = usage.get("octetsTotal", usage.get("octetsIn", 0) + usage.get("octetsOut", 0))
            charging = str(r.get("chargingID") or r.get("sessionId"))
            key = f"{imsi}|{charging}|{r['ratingGroup']}"
            start = r.get("recordOpeningTime") or r["recordTime"]
        elif service == "voice":
            qty, charging = usage.get("time", 0), str(r.get("chargingID") or "")
            key, start = r["sessionId"], r.get("recordOpeningTime") or r["recordTime"]
        else:
            qty, charging = usage.get("units", 1), ""
            key, start = r["recordId"], r["recordTime"]
        if key not in items:
            items[key] = []
            order.append(key)
        items[key].append(_HostRow(service, imsi, msisdn, charging, r["ratingGroup"], start, qty, key=key))
    rows_by_item: dict[str, list[_HostRow]] = {}
    for key in order:
        parts = items[key]
        first = parts[0]
        total = sum(p.quantity for p in parts)
        if first.service == "data" and total > 1 and rng.random() < 0.5:
            cut = rng.randrange(1, total)
            rows = [_HostRow(**{**first.__dict__, "quantity": cut}),
                    _HostRow(**{**first.__dict__, "quantity": total - cut,
                                "start_ms": first.start_ms + rng.randrange(1000, 60_000)})]
        else:
            rows = [_HostRow(**{**first.__dict__, "quantity": total})]
        rows_by_item[key] = rows
    # 2. injections on distinct items
    injected: list[Injected] = []
    candidates = list(order)
    rng.shuffle(candidates)

    def take(service_ok=lambda s: True) -> str:
        for i, key in enumerate(candidates):
            if service_ok(rows_by_item[key][0].service):
                return candidates.pop(i)
        raise ValueError("not enough usage items to inject that many discrepancies")

    for _ in range(drop):
        key = take()
        del rows_by_item[key]
        injected.append(Injected("missing_at_host", our_key=key))
    for _ in range(inflate):
        key = take()
        row = rows_by_item[key][0]
        row.quantity += max(row.quantity // 4, 10 if row.service != "sms" else 1)
        injected.append(Injected("variance", our_key=key))
    starts: dict[tuple[str, str], list[int]] = {}
    for key in (k for k in order if k in rows_by_item):
        first_row = rows_by_item[key][0]
        starts.setdefault((first_row.service, first_row.imsi), []).append(first_row.start_ms)

    def lands_alone(key: str, offset: int) -> bool:
        """A shifted call must not land inside the window of another call of the same SIM (it would match)."""
        row = rows_by_item[key][0]
        if row.service == "data":
            return True
        reach = 2 * rec.event_window_seconds * 1000
        return all(abs(t - (row.start_ms + offset)) > reach for t in starts[(row.service, row.imsi)])

    for _ in range(shift):
        for attempt in range(len(candidates)):
            key = take(lambda s: s != "sms")
            service = rows_by_item[key][0].service
            window = rec.start_tolerance_seconds if service == "data" else rec.event_window_seconds
            offset = (window + 3600) * 1000
            if lands_alone(key, offset) or attempt == len(candidates) - 1:
                break
            candidates.append(key)  # try another item; this one stays available for the other injections
        for row in rows_by_item[key]:
            row.start_ms += offset
        injected.append(Injected("shifted", our_key=key))
    final_rows: list[tuple[_HostRow, str | None]] = [(row, None) for key in order if key in rows_by_item
                                                      for row in rows_by_item[key]]
    dupes = rng.sample(range(len(final_rows)), duplicate) if duplicate else []
    for index in sorted(dupes, reverse=True):
        row = final_rows[index][0]
        final_rows.insert(index + 1, (_HostRow(**row.__dict__), "duplicate_at_host"))
    subscribers = sorted({(r.imsi, r.msisdn) for r, _ in final_rows})
    for n in range(extra):
        imsi, msisdn = subscribers[n % len(subscribers)]
        final_rows.append((_HostRow("data", imsi, msisdn, f"9{n:08d}", 100, final_rows[-1][0].start_ms,
                                    5_000_000 + n), "missing_in_ours"))
    for n in range(unknown_sims):
        final_rows.append((_HostRow("sms", f"99999{n:010d}", f"4999{n:08d}", "", 300,
                                    final_rows[-1][0].start_ms, 1), "unknown_sim"))
    # 3. sequence numbers (gaps if asked), charges, the file
    gaps = set(rng.sample(range(2, len(final_rows)), sequence_gaps)) if sequence_gaps else set()
    seq = 0
    for index, (row, kind) in enumerate(final_rows):
        seq += 2 if index in gaps else 1
        row.seq = seq
        if kind is not None:
            injected.append(Injected(kind, host_seq=seq))
    write_host_csv(out, [r for r, _ in final_rows], config, minor, wrong_trailer=wrong_trailer)
    return injected


def _format_time(ms: int, fmt: str) -> str:
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    if fmt == "iso":
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    if fmt == "epoch_ms":
        return str(ms)
    if fmt == "epoch_s":
        return str(ms // 1000)
    return dt.strftime(fmt)


def write_host_csv(out: str | Path, rows: list[_HostRow], config: BillingConfig, minor: int, *,
                   wrong_trailer: bool = False) -> None:
    fmt = config.reconciliation.format
    header = {name: fmt.columns.get(name, default) for name, default in WHOLESALE_FIELDS.items()}
    service_name = {s: (fmt.services.get(s) or [s])[0] for s in UNIT_OF_SERVICE}
    digits = 6 - (len(str(minor)) - 1)
    charge_total = bytes_total = 0
    with Path(out).open("w", newline="") as f:
        writer = csv.writer(f, delimiter=fmt.delimiter)
        writer.writerow(header.values())
        for row in rows:
            charge = wholesale_charge(config, row.service, row.quantity, minor)
            charge_total += charge
            values = {
                "seq": row.seq, "service": service_name[row.service], "imsi": row.imsi, "msisdn": row.msisdn,
                "other_party": row.other_party, "charging_id": row.charging_id,
                "rating_group": "" if row.rating_group is None else row.rating_group,
                "start_time": _format_time(row.start_ms, fmt.time_format),
                "bytes_up": "", "bytes_down": "", "bytes_total": row.quantity if row.service == "data" else "",
                "duration": row.quantity if row.service == "voice" else "",
                "events": row.quantity if row.service == "sms" else "",
                "charge": _decimal(charge, digits),
                "currency": "EUR",
            }
            if row.service == "data":
                bytes_total += row.quantity
            writer.writerow([values[name] for name in header])
        records = len(rows) + (1 if wrong_trailer else 0)
        f.write(f"{fmt.trailer_prefix} trailer records={records} charge_total={_decimal(charge_total, digits)} "
                f"bytes_total={bytes_total}\n")


def _decimal(micro: int, digits: int) -> str:
    from decimal import Decimal

    return f"{Decimal(micro).scaleb(-6):.{digits}f}"


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a thin command line
    parser = argparse.ArgumentParser(prog="python -m simulators.wholesale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    month = sub.add_parser("month", help="write a month of CDR files")
    month.add_argument("--out", required=True)
    month.add_argument("--month", required=True)
    month.add_argument("--subscribers", type=int, default=10)
    month.add_argument("--plan", default="demo")
    month.add_argument("--seed", type=int, default=1)
    host = sub.add_parser("host", help="derive the host's wholesale CSV from CDR files")
    host.add_argument("--cdr", required=True)
    host.add_argument("--out", required=True)
    host.add_argument("--config", default=str(DEMO_BILLING_CONFIG))
    for name in ("drop", "duplicate", "shift", "inflate", "extra", "unknown-sims", "sequence-gaps"):
        host.add_argument(f"--{name}", type=int, default=0)
    host.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.command == "month":
        subs = [(f"4917{n:08d}", f"26201{n:010d}", args.plan) for n in range(1, args.subscribers + 1)]
        print(json.dumps(synthesize_month(args.out, args.month, subs, seed=args.seed)))
    else:
        injected = derive_host_file(read_cdrs(args.cdr), args.out, config=load_billing_config(args.config),
                                    seed=args.seed, drop=args.drop, duplicate=args.duplicate, shift=args.shift,
                                    inflate=args.inflate, extra=args.extra, unknown_sims=args.unknown_sims,
                                    sequence_gaps=args.sequence_gaps)
        print(json.dumps([i.__dict__ for i in injected]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
