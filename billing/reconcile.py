"""Reconciliation of the host network's wholesale usage file against our own rated usage (the CDRs).

An MVNO pays its host for what the host's file says. Usage the host charges that we never billed is
revenue leakage; usage we billed that the host does not have, duplicates and overcharges are disputes.

1. Read the host's CSV with the configured column mapping (billing config `reconciliation.format`): a
   header row, one row per record, and a control trailer line (`# trailer records=N charge_total=X
   bytes_total=Y [from=YYYY-MM-DD to=YYYY-MM-DD]`). A bad row is reported with file, line and reason
   and skipped (`on_error="skip"`) or rejects the whole file (`"reject-file"`).
2. Completeness: sequence gaps and repeated sequence numbers, record count and control totals against
   the trailer.
3. Items. Data: IMSI + charging id (our sessionId when the CDR has no chargingID) + rating group, partial
   records summed on both sides, the session start (earliest) compared with `start_tolerance_seconds`.
   Voice: one item per call (our session, partials summed), SMS: one per message; matched on IMSI (else
   MSISDN), service, the other party when both sides have it, nearest start within
   `event_window_seconds`, one to one. Host rows equal in everything but the sequence number are
   duplicates.
4. Findings: matched; missing_in_ours (leakage); unknown_sim (leakage, an IMSI we do not know at all);
   missing_at_host; duplicate_at_host; shifted (same item, start outside the tolerance); variance
   (volume beyond `volume_tolerance` or charge beyond `value_tolerance` against the wholesale charge of
   our volume). Plus aggregates per day × service with the variance against `daily_tolerance`.
5. Report: JSON document, CSV of findings, PNG chart of the daily variance (matplotlib), terminal table
   (billing.cli).

Imports billing and the standard library (matplotlib only when drawing the chart).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from billing.config import SERVICE_OF_UNIT, WHOLESALE_FIELDS, BillingConfig, Catalog
from billing.db import Database
from billing.money import MICRO, round_ratio

__all__ = ["KINDS", "ReconcileError", "read_host_file", "reconcile", "wholesale_charge", "write_chart",
           "write_findings_csv"]

KINDS = ("matched", "missing_in_ours", "unknown_sim", "missing_at_host", "duplicate_at_host", "shifted", "variance")


class ReconcileError(ValueError):
    """The host file cannot be reconciled (missing columns, rejected rows), worded for the operator."""


def wholesale_charge(config: BillingConfig, service: str, quantity: int, minor: int) -> int:
    """What the host charges for `quantity` units of `service` at the configured wholesale rate (micro-units,
    rounded once to the minor unit). The simulator charges the host file's rows with this too."""
    rate = config.reconciliation.wholesale_rates.get(service)
    if rate is None:
        raise ReconcileError(f"no wholesale rate for {service} in reconciliation.wholesale_rates")
    price = Fraction(Decimal(rate.price))
    return round_ratio(quantity * price.numerator * MICRO, price.denominator * rate.per, minor,
                       config.reconciliation.rounding)


# ---- reading the host file ---------------------------------------------------------------------------


@dataclass
class HostRecord:
    line: int
    seq: int
    service: str
    imsi: str
    msisdn: str
    other_party: str
    charging_id: str
    rating_group: int | None
    start_ms: int
    quantity: int
    charge: int

    def content(self) -> tuple:
        return (self.service, self.imsi, self.msisdn, self.other_party, self.charging_id, self.rating_group,
                self.start_ms, self.quantity, self.charge)


@dataclass
class HostFile:
    name: str
    sha256: str
    records: list[HostRecord]
    errors: list[str]
    trailer: dict[str, str] | None


def _parse_time(text: str, fmt: str) -> int:
    text = text.strip()
    if fmt == "epoch_ms":
        return int(text)
    if fmt == "epoch_s":
        return int(Decimal(text) * 1000)
    if fmt == "iso":
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    else:
        dt = datetime.strptime(text, fmt)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _money(text: str) -> int:
    value = Decimal(text.strip())
    if not value.is_finite() or value != value.quantize(Decimal("0.000001")):
        raise ValueError(f"charge {text!r} is not a decimal with at most 6 places")
    return int(value * MICRO)


def read_host_file(path: str | Path, config: BillingConfig, *, on_error: str = "skip") -> HostFile:
    """Parse the host's CSV with the configured mapping. Raises ReconcileError when the file is unusable
    (or, with on_error="reject-file", when any row is bad)."""
    fmt = config.reconciliation.format
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReconcileError(f"cannot read {path}: {exc.strerror}") from None
    text = data.decode("utf-8-sig", "replace")
    columns = {name: fmt.columns.get(name, default) for name, default in WHOLESALE_FIELDS.items()}
    services = {}
    for ours in SERVICE_OF_UNIT.values():
        for value in fmt.services.get(ours) or [ours]:
            services[value.strip().upper()] = ours
    records: list[HostRecord] = []
    errors: list[str] = []
    trailer: dict[str, str] | None = None
    index: dict[str, int] = {}
    lines = text.splitlines()
    reader = csv.reader(lines, delimiter=fmt.delimiter)
    header_seen = False
    for line_no, cells in enumerate(reader, 1):
        raw = lines[line_no - 1] if line_no - 1 < len(lines) else ""
        if not raw.strip():
            continue
        if raw.startswith(fmt.trailer_prefix):
            words = raw[len(fmt.trailer_prefix):].split()
            if words and words[0].lower() == "trailer":
                trailer = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            continue
        if not header_seen:
            header = [c.strip() for c in cells]
            index = {name: header.index(col) for name, col in columns.items() if col in header}
            missing = [f"{n} ({columns[n]})" for n in ("seq", "service", "start_time", "charge") if n not in index]
            if "imsi" not in index and "msisdn" not in index:
                missing.append(f"imsi ({columns['imsi']}) or msisdn ({columns['msisdn']})")
            if missing:
                raise ReconcileError(f"{path.name}:{line_no}: header lacks column(s) {', '.join(missing)}; "
                                     "set reconciliation.format.columns")
            header_seen = True
            continue

        def cell(name: str, cells: list[str] = cells, index: dict[str, int] = index) -> str:
            i = index.get(name)
            return cells[i].strip() if i is not None and i < len(cells) else ""

        try:
            if len(cells) != len(header):
                raise ValueError(f"{len(cells)} fields, the header has {len(header)}")
            service = services.get(cell("service").upper())
            if service is None:
                raise ValueError(f"unknown service {cell('service')!r}")
            if service == "data":
                if cell("bytes_total"):
                    quantity = int(cell("bytes_total"))
                else:
                    quantity = int(cell("bytes_up") or 0) + int(cell("bytes_down") or 0)
            elif service == "voice":
                quantity = int(cell("duration"))
            else:
                quantity = int(cell("events") or 1)
            if quantity < 0:
                raise ValueError("negative quantity")
            rg = cell("rating_group")
            imsi, msisdn = cell("imsi"), cell("msisdn")
            if not imsi and not msisdn:
                raise ValueError("neither IMSI nor MSISDN")
            records.append(HostRecord(
                line=line_no, seq=int(cell("seq")), service=service, imsi=imsi, msisdn=msisdn,
                other_party=cell("other_party"), charging_id=cell("charging_id"),
                rating_group=int(rg) if rg else None, start_ms=_parse_time(cell("start_time"), fmt.time_format),
                quantity=quantity, charge=_money(cell("charge"))))
        except (ValueError, InvalidOperation, OverflowError) as exc:
            errors.append(f"{path.name}:{line_no}: {exc or 'bad value'}")
    if not header_seen:
        raise ReconcileError(f"{path.name}: no header row")
    if errors and on_error == "reject-file":
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ReconcileError(f"{len(errors)} bad row(s), file rejected: {'; '.join(errors[:3])}{more}")
    return HostFile(path.name, hashlib.sha256(data).hexdigest(), records, errors, trailer)


# ---- completeness ------------------------------------------------------------------------------------


def _completeness(host: HostFile, minor_digits: int) -> dict:
    seqs = sorted(r.seq for r in host.records)
    gaps, repeated = [], []
    for a, b in zip(seqs, seqs[1:], strict=False):
        if b == a:
            repeated.append(a)
        elif b > a + 1:
            gaps.append([a + 1, b - 1])
    issues = [f"sequence gap {a}–{b}" if a != b else f"sequence gap {a}" for a, b in gaps]
    issues += [f"sequence number {s} repeated" for s in sorted(set(repeated))]
    issues += [f"malformed row: {e}" for e in host.errors]
    charge_total = sum(r.charge for r in host.records)
    bytes_total = sum(r.quantity for r in host.records if r.service == "data")
    rows = len(host.records) + len(host.errors)
    if host.trailer is None:
        issues.append("no trailer: record count and control totals cannot be checked")
    else:
        try:
            if "records" in host.trailer and int(host.trailer["records"]) != rows:
                issues.append(f"trailer says {host.trailer['records']} records, the file has {rows}")
            if "charge_total" in host.trailer and _money(host.trailer["charge_total"]) != charge_total:
                issues.append(f"trailer charge_total {host.trailer['charge_total']} ≠ sum of rows "
                              f"{Decimal(charge_total).scaleb(-6):.{minor_digits}f}")
            if "bytes_total" in host.trailer and int(host.trailer["bytes_total"]) != bytes_total:
                issues.append(f"trailer bytes_total {host.trailer['bytes_total']} ≠ sum of rows {bytes_total}")
        except (ValueError, InvalidOperation):
            issues.append(f"trailer is not readable: {host.trailer}")
    return {"rows": rows, "records": len(host.records), "malformed": host.errors, "sequence_gaps": gaps,
            "repeated_sequence_numbers": sorted(set(repeated)), "trailer": host.trailer,
            "charge_total": charge_total, "bytes_total": bytes_total, "issues": issues, "complete": not issues}


# ---- items -------------------------------------------------------------------------------------------


@dataclass
class _Item:
    service: str
    key: str  # data: imsi|charging|rg; voice: session id; sms: record id (ours) / host:<seq>
    imsi: str
    msisdn: str
    start_ms: int
    quantity: int
    other_party: str = ""
    charge: int = 0  # host: what they charge; ours: retail amount
    seqs: list[int] = field(default_factory=list)
    records: int = 0


def _our_items(db: Database, catalog: Catalog, day_from: str, day_to: str) -> tuple[list[_Item], set[str]]:
    """Our usage in [day_from, day_to] (by session start for data/voice, record time for SMS), and every
    IMSI/MSISDN we know (CDRs and subscriptions)."""
    lo = int(datetime.fromisoformat(day_from).replace(tzinfo=UTC).timestamp() * 1000) - 86_400_000
    hi = int(datetime.fromisoformat(day_to).replace(tzinfo=UTC).timestamp() * 1000) + 2 * 86_400_000
    rows = db.query(
        "SELECT record_id, msisdn, imsi, session_id, charging_id, rating_group, opening_time, record_time, "
        "usage_time, octets_in, octets_out, octets_total, usage_units, amount FROM usage_records "
        "WHERE record_type IN ('usage', 'event') AND record_time >= ? AND record_time < ?", (lo, hi))
    data: dict[str, _Item] = {}
    voice: dict[str, _Item] = {}
    items: list[_Item] = []
    for (record_id, msisdn, imsi, session, charging, rg, opened, at, seconds, o_in, o_out, o_total, units,
         amount) in rows:
        unit = catalog.unit_of(rg)
        service = SERVICE_OF_UNIT.get(unit or "")
        if service is None:
            continue
        imsi, msisdn = imsi or "", msisdn or ""
        start = opened if opened is not None and service != "sms" else at
        if service == "data":
            quantity = o_total if o_total is not None else (o_in or 0) + (o_out or 0)
            key = f"{imsi or msisdn}|{charging or session}|{rg}"
            item = data.get(key)
            if item is None:
                item = data[key] = _Item("data", key, imsi, msisdn, start, 0)
        elif service == "voice":
            quantity = seconds or 0
            key = session or record_id
            item = voice.get(key)
            if item is None:
                item = voice[key] = _Item("voice", key, imsi, msisdn, start, 0)
        else:
            quantity = units if units is not None else 1
            item = _Item("sms", record_id, imsi, msisdn, start, 0)
            items.append(item)
        item.start_ms = min(item.start_ms, start)
        item.quantity += quantity
        item.charge += amount
        item.records += 1
    items.extend(data.values())
    items.extend(voice.values())
    first = datetime.fromisoformat(day_from).date()
    last = datetime.fromisoformat(day_to).date()
    items = [i for i in items if first <= _day(i.start_ms) <= last]
    known = {v for row in db.query("SELECT DISTINCT imsi, msisdn FROM usage_records") for v in row if v}
    known |= {v for row in db.query("SELECT imsi, msisdn FROM subscriptions") for v in row if v}
    return items, known


def _day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _host_items(records: list[HostRecord]) -> tuple[list[_Item], list[HostRecord]]:
    """Host items (data partials summed) and the duplicate rows left out of them."""
    seen: set[tuple] = set()
    duplicates: list[HostRecord] = []
    data: dict[str, _Item] = {}
    items: list[_Item] = []
    for r in sorted(records, key=lambda r: r.seq):
        if r.content() in seen:
            duplicates.append(r)
            continue
        seen.add(r.content())
        if r.service == "data":
            key = f"{r.imsi or r.msisdn}|{r.charging_id}|{'' if r.rating_group is None else r.rating_group}"
            item = data.get(key)
            if item is None:
                item = data[key] = _Item("data", key, r.imsi, r.msisdn, r.start_ms, 0)
            item.start_ms = min(item.start_ms, r.start_ms)
        else:
            item = _Item(r.service, f"host:{r.seq}", r.imsi, r.msisdn, r.start_ms, 0, other_party=r.other_party)
            items.append(item)
        item.quantity += r.quantity
        item.charge += r.charge
        item.seqs.append(r.seq)
        item.records += 1
    return items + list(data.values()), duplicates


# ---- matching ----------------------------------------------------------------------------------------


def reconcile(db: Database, catalog: Catalog, path: str | Path, *, now_ms: int, on_error: str = "skip",
              store: bool = True) -> dict:
    """Reconcile a host wholesale file against the imported CDRs; returns the report (and stores its summary)."""
    config = catalog.config
    rec = config.reconciliation
    host = read_host_file(path, config, on_error=on_error)
    completeness = _completeness(host, catalog.minor_digits)
    if not host.records:
        raise ReconcileError(f"{host.name}: no usable records")
    trailer = host.trailer or {}
    day_from = trailer.get("from") or _day(min(r.start_ms for r in host.records)).isoformat()
    day_to = trailer.get("to") or _day(max(r.start_ms for r in host.records)).isoformat()
    ours, known = _our_items(db, catalog, day_from, day_to)
    host_items, duplicates = _host_items(host.records)
    minor = catalog.minor
    value_tol = int(Decimal(rec.value_tolerance) * MICRO)

    def expected(service: str, quantity: int) -> int:
        return wholesale_charge(config, service, quantity, minor)

    findings: list[dict] = []

    def finding(kind: str, service: str, our: _Item | None, theirs: _Item | None, detail: str = "") -> None:
        item = our or theirs
        assert item is not None
        exp = expected(service, our.quantity) if our else 0
        findings.append({
            "kind": kind, "service": service, "our_key": our.key if our else None,
            "host_seqs": theirs.seqs if theirs else [], "imsi": item.imsi, "msisdn": item.msisdn,
            "our_start": _iso(our.start_ms) if our else None, "host_start": _iso(theirs.start_ms) if theirs else None,
            "our_quantity": our.quantity if our else 0, "host_quantity": theirs.quantity if theirs else 0,
            "retail_amount": our.charge if our else 0, "expected_charge": exp,
            "host_charge": theirs.charge if theirs else 0, "charge_delta": (theirs.charge if theirs else 0) - exp,
            "detail": detail})

    def compare(service: str, our: _Item, theirs: _Item) -> None:
        dq = theirs.quantity - our.quantity
        dc = theirs.charge - expected(service, our.quantity)
        if abs(dq) > rec.volume_tolerance or abs(dc) > value_tol:
            finding("variance", service, our, theirs,
                    f"quantity {'+' if dq >= 0 else ''}{dq}, charge {'+' if dc >= 0 else ''}"
                    f"{Decimal(dc).scaleb(-6)}")
        else:
            finding("matched", service, our, theirs)

    def host_only(service: str, theirs: _Item) -> None:
        who = theirs.imsi or theirs.msisdn
        if who not in known and theirs.msisdn not in known:
            finding("unknown_sim", service, None, theirs, f"SIM {who} is not ours")
        else:
            finding("missing_in_ours", service, None, theirs, "the host charges usage we never billed")

    # data: by key, start within tolerance
    our_data = {i.key: i for i in ours if i.service == "data"}
    host_data = {i.key: i for i in host_items if i.service == "data"}
    for key, theirs in host_data.items():
        our = our_data.pop(key, None)
        if our is None:
            host_only("data", theirs)
        elif abs(theirs.start_ms - our.start_ms) > rec.start_tolerance_seconds * 1000:
            finding("shifted", "data", our, theirs,
                    f"start differs by {(theirs.start_ms - our.start_ms) // 1000} s")
        else:
            compare("data", our, theirs)
    for our in our_data.values():
        finding("missing_at_host", "data", our, None, "billed by us, not in the host's file")

    # voice and SMS: same subscriber and service, nearest start inside the window, one to one
    window = rec.event_window_seconds * 1000
    groups: dict[tuple, tuple[list[_Item], list[_Item]]] = defaultdict(lambda: ([], []))
    for i in ours:
        if i.service != "data":
            groups[(i.service, i.imsi or i.msisdn)][0].append(i)
    for i in host_items:
        if i.service != "data":
            groups[(i.service, i.imsi or i.msisdn)][1].append(i)
    for (service, _), (our_list, host_list) in sorted(groups.items()):
        pairs = sorted(((abs(h.start_ms - o.start_ms), oi, hi) for oi, o in enumerate(our_list)
                        for hi, h in enumerate(host_list) if abs(h.start_ms - o.start_ms) <= window
                        and (not o.other_party or not h.other_party or o.other_party == h.other_party)),
                       key=lambda t: t[0])
        used_o: set[int] = set()
        used_h: set[int] = set()
        for _, oi, hi in pairs:
            if oi in used_o or hi in used_h:
                continue
            used_o.add(oi)
            used_h.add(hi)
            compare(service, our_list[oi], host_list[hi])
        left_o = [o for n, o in enumerate(our_list) if n not in used_o]
        left_h = [h for n, h in enumerate(host_list) if n not in used_h]
        for o in list(left_o):  # the same call or message outside the window: shifted
            twin = next((h for h in left_h if h.quantity == o.quantity), None)
            if twin is not None:
                left_o.remove(o)
                left_h.remove(twin)
                finding("shifted", service, o, twin, f"start differs by {(twin.start_ms - o.start_ms) // 1000} s")
        for h in left_h:
            host_only(service, h)
        for o in left_o:
            finding("missing_at_host", service, o, None, "billed by us, not in the host's file")
    for d in duplicates:
        item = _Item(d.service, f"host:{d.seq}", d.imsi, d.msisdn, d.start_ms, d.quantity, charge=d.charge,
                     seqs=[d.seq], records=1)
        finding("duplicate_at_host", d.service, None, item, "same record as an earlier sequence number")

    daily = _daily(ours, host_items + [_Item(d.service, "", d.imsi, d.msisdn, d.start_ms, d.quantity, charge=d.charge)
                                       for d in duplicates], expected, int(Decimal(rec.daily_tolerance) * MICRO))
    summary = {kind: {"items": 0, "host_charge": 0, "expected_charge": 0, "retail_amount": 0} for kind in KINDS}
    for f in findings:
        s = summary[f["kind"]]
        s["items"] += 1
        s["host_charge"] += f["host_charge"]
        s["expected_charge"] += f["expected_charge"]
        s["retail_amount"] += f["retail_amount"]
    overcharge = sum(max(0, f["charge_delta"]) for f in findings if f["kind"] == "variance")
    totals = {
        "host_charge": sum(i.charge for i in host_items) + sum(d.charge for d in duplicates),
        "expected_charge": sum(expected(i.service, i.quantity) for i in ours),
        "retail_amount": sum(i.charge for i in ours),
        "leakage": summary["missing_in_ours"]["host_charge"] + summary["unknown_sim"]["host_charge"],
        "disputable": summary["duplicate_at_host"]["host_charge"] + overcharge,
        "missing_at_host_value": summary["missing_at_host"]["expected_charge"],
        "variance": sum(f["charge_delta"] for f in findings if f["kind"] == "variance"),
    }
    report = {
        "file": host.name, "sha256": host.sha256, "from": day_from, "to": day_to,
        "currency": catalog.currency, "minor_digits": catalog.minor_digits,
        "completeness": completeness, "summary": summary, "totals": totals,
        "findings": [f for f in findings if f["kind"] != "matched"], "matched": summary["matched"]["items"],
        "daily": daily,
    }
    if store:
        with db.transaction():
            db.execute("INSERT INTO reconciliations (reconciliation_id, file_name, file_sha256, created_at, summary) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (db.next_ids("reconciliation"), host.name, host.sha256, now_ms,
                        json.dumps({"summary": summary, "totals": totals, "issues": completeness["issues"]})))
    return report


def _daily(ours: list[_Item], host_items: list[_Item], expected, tolerance: int) -> list[dict]:
    agg: dict[tuple[str, str], dict] = defaultdict(lambda: {"our_quantity": 0, "host_quantity": 0,
                                                            "expected_charge": 0, "host_charge": 0})
    for i in ours:
        a = agg[(_day(i.start_ms).isoformat(), i.service)]
        a["our_quantity"] += i.quantity
        a["expected_charge"] += expected(i.service, i.quantity)
    for i in host_items:
        a = agg[(_day(i.start_ms).isoformat(), i.service)]
        a["host_quantity"] += i.quantity
        a["host_charge"] += i.charge
    out = []
    for (day, service), a in sorted(agg.items()):
        variance = a["host_charge"] - a["expected_charge"]
        out.append({"date": day, "service": service, **a, "variance": variance, "flagged": abs(variance) > tolerance})
    return out


# ---- outputs -----------------------------------------------------------------------------------------


def write_findings_csv(report: dict, path: str | Path) -> None:
    digits = report["minor_digits"]
    fields = ["kind", "service", "our_key", "host_seqs", "imsi", "msisdn", "our_start", "host_start", "our_quantity",
              "host_quantity", "retail_amount", "expected_charge", "host_charge", "charge_delta", "detail"]
    money = {"retail_amount", "expected_charge", "host_charge", "charge_delta"}
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for finding in report["findings"]:
            writer.writerow([
                f"{Decimal(finding[k]).scaleb(-6):.{digits}f}" if k in money
                else " ".join(map(str, finding[k])) if k == "host_seqs" else finding[k] for k in fields])


def write_chart(report: dict, path: str | Path) -> None:
    """A PNG bar chart of the daily variance (host charge − expected wholesale charge) per service."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = sorted({d["date"] for d in report["daily"]})
    services = sorted({d["service"] for d in report["daily"]})
    values = {(d["date"], d["service"]): d["variance"] / MICRO for d in report["daily"]}
    fig, ax = plt.subplots(figsize=(max(8, len(days) * 0.35), 4.5), dpi=110)
    width = 0.8 / max(1, len(services))
    colours = {"data": "#1f77b4", "voice": "#ff7f0e", "sms": "#2ca02c"}
    for n, service in enumerate(services):
        xs = [i + n * width - 0.4 + width / 2 for i in range(len(days))]
        ax.bar(xs, [values.get((day, service), 0.0) for day in days], width, label=service,
               color=colours.get(service))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(days)))
    ax.set_xticklabels([d[5:] for d in days], rotation=90, fontsize=7)
    ax.set_ylabel(f"host − expected ({report['currency']})")
    ax.set_title(f"Daily wholesale variance · {report['file']} · {report['from']} – {report['to']}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_rows(report: dict) -> list[tuple[str, int, str, str]]:
    """(kind, items, host charge, expected) rows for a terminal table."""
    digits = report["minor_digits"]
    return [(kind, s["items"], f"{Decimal(s['host_charge']).scaleb(-6):.{digits}f}",
             f"{Decimal(s['expected_charge']).scaleb(-6):.{digits}f}") for kind, s in report["summary"].items()]


