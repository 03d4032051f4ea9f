"""Bill runs: draft invoices for a period, finalization with gapless numbers, credit notes, re-rating.

Period and cycles: an account with cycle day d has cycles [YYYY-MM-d, next month's d). The bill run for
period P (`2026-11`) closes each account's cycle that starts in P and produces one draft invoice with
- usage in arrears: every guided record recorded before the cycle's end and not billed yet (late records
  of earlier cycles included), at the amount online charging wrote into the CDR, one line per MSISDN ×
  rating group. Postpaid accounts are charged; prepaid usage is shown as consumed (charged = 0: it was paid
  from the prepaid balance) and never charged twice;
- catalog fees from fee records (a plan period's fee, an add-on purchase: charged online in the same call as
  the debit), claimed with the usage: one line each, "Plan travel, 2026-12" / "Add-on data-5gb". Postpaid:
  the money from invoiced money buckets is charged (bonus money shown as paid); prepaid: shown as paid from
  the balance;
- recurring fees in advance: every day of cycles P and P+1 a subscription covers is billed exactly once.
  What has been billed before (invoice lines with their day ranges) is compared with what the
  subscriptions say now; missing days are charged, days billed but no longer covered (a plan change, an
  end) are credited at the fee they were charged at, with cumulative daily proration (billing.money). One
  rule keeps the two fee sources apart: a subscription with a catalog plan fee record (guided to it) gets its
  recurring fee from the catalog's records from the first day of that record's period on, and no recurring
  charge of billing's own for those days (days billed before it arrived are credited);
- pending one-off charges, adjustments and re-rating corrections dated before the cycle's end;
- tax per line from the table (jurisdiction × category), rounded once per line.

Usage records are claimed first (UPDATE ... FROM invoices: state billed, invoice id) and the lines are
aggregated from exactly the claimed records, so what was imported concurrently is either on the invoice
or left for the next run; the run then checks that the claimed CDR amounts equal the usage lines, and the
claimed fee records the fee lines (tie-out), and rolls back if not. Re-running a draft period rebuilds it
from scratch (same inputs, same invoices); a finalized period is never touched again. Finalization numbers
invoices gaplessly per legal entity inside one transaction; afterwards only credit notes change what is owed.
Re-rating is billing.rerating.

Imports billing and ratecards only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from billing.accounts import BillingError
from billing.config import Catalog
from billing.db import Database
from billing.money import format_money, prorate, tax_of

__all__ = ["credit_note", "cycle_bounds", "finalize", "parse_period", "run_bill", "run_status"]

Progress = Callable[[str, int, int], None]


def parse_period(text: str) -> tuple[int, int]:
    try:
        year, month = (int(x) for x in text.split("-"))
        date(year, month, 1)
    except (ValueError, TypeError):
        raise BillingError(f"period must be YYYY-MM, got {text!r}") from None
    if len(text) != 7:
        raise BillingError(f"period must be YYYY-MM, got {text!r}")
    return year, month


def _add_month(d: date) -> date:
    return date(d.year + d.month // 12, d.month % 12 + 1, d.day)


def cycle_bounds(period: str, cycle_day: int) -> tuple[date, date]:
    """[start, end) of the cycle that starts in `period` for accounts with this cycle day."""
    year, month = parse_period(period)
    start = date(year, month, cycle_day)
    return start, _add_month(start)


def _ms(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def _previous_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year - 1}-12" if month == 1 else f"{year}-{month - 1:02d}"


@dataclass
class _Line:
    kind: str
    description: str
    category: str
    amount: int
    charged: int = 1
    msisdn: str | None = None
    rating_group: int | None = None
    subscription_id: int | None = None
    quantity: int | None = None
    unit: str | None = None
    records: int | None = None
    period_from: str | None = None
    period_to: str | None = None
    unit_price: int | None = None
    credited_line_no: int | None = None


def _fee_lines(catalog: Catalog, subs: list[tuple], coverage: dict[int, list[tuple]],
               cycles: list[tuple[date, date]], catalog_from: dict[int, date] | None = None) -> list[_Line]:
    """Recurring charges and credits that make every covered day of `cycles` billed exactly once. A subscription
    in `catalog_from` pays its plan through catalog fee records from that day on: billing charges no recurring
    fee for those days (and credits what it billed for them before)."""
    lines: list[_Line] = []
    mode, minor = catalog.config.proration_rounding, catalog.minor
    for sub_id, msisdn, plan, start_text, end_text in subs:
        sub_start = date.fromisoformat(start_text)
        sub_end = date.fromisoformat(end_text) if end_text else date.max
        if catalog_from and int(sub_id) in catalog_from:
            sub_end = min(sub_end, catalog_from[int(sub_id)])
        fee = catalog.plan_fees.get(plan)
        billed = coverage.get(sub_id, [])
        if fee is None:
            if sub_start >= sub_end and not billed:
                continue  # the catalog charges its whole plan: no fee of billing's own needed
            raise BillingError(f"plan {plan!r} of MSISDN {msisdn} has no recurring fee in the billing catalog")
        plan_name = catalog.config.plans[plan].name or plan
        category = catalog.config.plans[plan].tax_category
        for cycle_start, cycle_end in cycles:
            days = (cycle_end - cycle_start).days
            want_from = max(sub_start, cycle_start)
            want_to = min(sub_end, cycle_end)
            want = [False] * days
            for i in range(max(0, (want_from - cycle_start).days), max(0, (want_to - cycle_start).days)):
                want[i] = True
            have: list[list[int]] = [[] for _ in range(days)]  # fees of the charges still standing per day
            for line_from, line_to, sign, unit_price in billed:
                lo = max(0, (line_from - cycle_start).days)
                hi = min(days, (line_to - cycle_start).days)
                for i in range(lo, hi):
                    if sign > 0:
                        have[i].append(unit_price)
                    elif have[i]:
                        have[i].pop()
            runs: list[tuple[int, int, int, int]] = []  # (sign, from, to, fee)
            for i in range(days):
                if want[i] and not have[i]:
                    step = (1, fee)
                elif not want[i] and have[i]:
                    step = (-1, have[i][-1])
                else:
                    continue
                if runs and runs[-1][0] == step[0] and runs[-1][2] == i and runs[-1][3] == step[1]:
                    runs[-1] = (step[0], runs[-1][1], i + 1, step[1])
                else:
                    runs.append((step[0], i, i + 1, step[1]))
            for sign, lo, hi, unit_price in runs:
                amount = sign * prorate(unit_price, lo, hi, days, minor, mode)
                first, last = cycle_start + timedelta(days=lo), cycle_start + timedelta(days=hi)
                full = lo == 0 and hi == days
                what = "" if full else f" ({hi - lo} of {days} days)"
                lines.append(_Line(
                    kind="recurring" if sign > 0 else "recurring_credit",
                    description=f"{'' if sign > 0 else 'Credit: '}{plan_name} {msisdn}{what}",
                    category=category, amount=amount, msisdn=msisdn, subscription_id=sub_id,
                    quantity=hi - lo, unit="days", period_from=first.isoformat(), period_to=last.isoformat(),
                    unit_price=unit_price))
    return lines


def _quantity(catalog: Catalog, rating_group: int | None, seconds: int, octets: int, events: int) -> tuple[int, str]:
    unit = catalog.unit_of(rating_group)
    if unit == "seconds":
        return seconds, "seconds"
    if unit == "events":
        return events, "events"
    if unit == "bytes" or octets:
        return octets, "bytes"
    return (seconds, "seconds") if seconds else (events, "events")


def _usage_lines(catalog: Catalog, charged: int, msisdn: str, rg: int | None, count: int, amount: int,
                 seconds: int, octets: int, events: int, day_from: str, day_to: str, bonus: int, shared_money: int,
                 allowance: int, shared_allowance: int) -> list[_Line]:
    """The lines of one MSISDN × rating group. Postpaid: the money from invoiced money buckets is charged (own
    and the group's shared ones, attributed to the member: billing has no group accounts); money from bonus
    buckets is shown as paid (charged = 0, not taxed). Prepaid: all money is shown as paid from the balance.
    Units from allowance buckets are an informational line (kind "allowance", amount 0). The usage lines'
    amounts add up to the records' CDR amounts (the tie-out)."""
    quantity, unit = _quantity(catalog, rg, seconds, octets, events)
    service = catalog.service_name(rg)
    label = service.upper() if len(service) <= 3 else service.capitalize()
    category = catalog.usage_category(rg)
    common = {"kind": "usage", "category": category, "msisdn": msisdn, "rating_group": rg, "period_from": day_from,
              "period_to": day_to}
    if not charged:
        lines = [_Line(description=f"{label} usage {msisdn} (prepaid, paid from balance)", amount=amount,
                       charged=0, quantity=quantity, unit=unit, records=count, **common)]
    else:
        note = ""
        if shared_money:
            note = f" (incl. {format_money(shared_money, catalog.minor_digits)} from the group's shared balance)"
        lines = [_Line(description=f"{label} usage {msisdn}{note}", amount=amount - bonus, charged=1,
                       quantity=quantity, unit=unit, records=count, **common)]
        if bonus:
            lines.append(_Line(description=f"{label} usage {msisdn} paid from bonus balance", amount=bonus,
                               charged=0, **common))
    if allowance:
        allowance_unit = catalog.unit_of(rg) or unit
        shared = " (incl. the group's shared allowance)" if shared_allowance else ""
        lines.append(_Line(description=f"{label} from allowances {msisdn}{shared}", amount=0, charged=0,
                           quantity=allowance, unit=allowance_unit, **{**common, "kind": "allowance"}))
    return lines


def _utc_day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def fee_period_text(start_ms: int, end_ms: int) -> str:
    """A plan period as the invoice names it: '2026-12' for a calendar month (UTC), else first – last day."""
    first, last = _utc_day(start_ms), _utc_day(end_ms - 1)
    if start_ms == _ms(first) and first.day == 1 and end_ms == _ms(_add_month(first)):
        return first.strftime("%Y-%m")
    return first.isoformat() if first == last else f"{first.isoformat()} – {last.isoformat()}"


def fee_description(fee_type: str, item: str, start_ms: int | None, end_ms: int | None) -> str:
    """'Plan travel, 2026-12' / 'Add-on data-5gb': what a catalog fee record paid for."""
    if fee_type == "plan":
        period = f", {fee_period_text(start_ms, end_ms)}" if start_ms is not None and end_ms is not None else ""
        return f"Plan {item}{period}"
    return f"Add-on {item}"


def _fee_record_lines(charged: int, msisdn: str, fee_type: str, item: str, start_ms: int | None,
                      end_ms: int | None, day: str, amount: int, bonus: int, category: str) -> list[_Line]:
    """The lines of one catalog fee record. Postpaid: the money from invoiced money buckets is charged, bonus
    money shown as paid (charged = 0); prepaid: all of it shown as paid from the balance. They add up to the
    record's amount (the tie-out)."""
    what = fee_description(fee_type, item, start_ms, end_ms)
    period_from, period_to = day, None
    if fee_type == "plan" and start_ms is not None and end_ms is not None:
        period_from = _utc_day(start_ms).isoformat()
        period_to = (_utc_day(end_ms - 1) + timedelta(days=1)).isoformat()  # exclusive, as recurring lines
    common = {"kind": "fee", "category": category, "msisdn": msisdn, "records": 1, "period_from": period_from,
              "period_to": period_to}
    if not charged:
        return [_Line(description=f"{what} ({msisdn}, prepaid, paid from balance)", amount=amount, charged=0,
                      **common)]
    lines = [_Line(description=f"{what} ({msisdn})", amount=amount - bonus, charged=1, **common)]
    if bonus:
        lines.append(_Line(description=f"{what} ({msisdn}) paid from bonus balance", amount=bonus, charged=0,
                           **common))
    return lines


_INVOICE_INSERT = (
    "INSERT INTO invoices (invoice_id, kind, status, run_id, account_id, legal_entity, jurisdiction, payment_type, "
    "period, cycle_start, cycle_end, fee_end, usage_to, currency, subtotal, tax_total, total, usage_amount, "
    "created_at) VALUES (?, 'invoice', 'draft', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, ?)"
)
_LINE_INSERT = (
    "INSERT INTO invoice_lines (invoice_id, line_no, kind, description, category, msisdn, rating_group, "
    "subscription_id, quantity, unit, records, period_from, period_to, unit_price, amount, charged, tax_rate, "
    "tax_amount, credited_line_no) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _discard_draft(db: Database, run_id: int) -> None:
    invoices = "SELECT invoice_id FROM invoices WHERE run_id = ?"
    db.execute(f"UPDATE usage_records SET state = 'guided', invoice_id = NULL WHERE invoice_id IN ({invoices})",
               (run_id,))
    db.execute(f"UPDATE charges SET invoice_id = NULL WHERE invoice_id IN ({invoices})", (run_id,))
    db.execute(f"DELETE FROM invoice_lines WHERE invoice_id IN ({invoices})", (run_id,))
    db.execute("DELETE FROM invoices WHERE run_id = ?", (run_id,))


def run_bill(db: Database, catalog: Catalog, period: str, *, now_ms: int, progress: Progress | None = None) -> dict:
    """Produce (or rebuild) the draft invoices of `period`. A finalized period is left unchanged."""
    parse_period(period)
    tick = progress or (lambda stage, done, total: None)
    with db.transaction(lock="billing"):
        run = db.one("SELECT run_id, status FROM bill_runs WHERE period = ?", (period,))
        if run is not None and run[1] == "finalized":
            return {**run_status(db, period), "changed": False,
                    "note": f"bill run {period} is finalized; nothing changed"}
        other = db.one("SELECT period FROM bill_runs WHERE status = 'draft' AND period <> ?", (period,))
        if other is not None:
            raise BillingError(f"bill run {other[0]} is still a draft: finalize it first")
        later = db.one("SELECT MAX(period) FROM bill_runs WHERE status = 'finalized' AND period > ?", (period,))
        if later is not None and later[0] is not None:
            raise BillingError(f"bill run {later[0]} is already finalized; {period} cannot be billed after it")
        if run is not None:
            run_id = int(run[0])
            _discard_draft(db, run_id)
        else:
            run_id = db.next_ids("bill_run")
            db.execute("INSERT INTO bill_runs (run_id, period, status, created_at, invoices, usage_amount, total) "
                       "VALUES (?, ?, 'draft', ?, 0, 0, 0)", (run_id, period, now_ms))
        summary = _build(db, catalog, period, run_id, now_ms, tick)
        db.execute("UPDATE bill_runs SET invoices = ?, usage_amount = ?, total = ?, created_at = ? WHERE run_id = ?",
                   (summary["invoices"], summary["usage_amount"], summary["total"], now_ms, run_id))
    return {**run_status(db, period), "changed": True}


def _build(db: Database, catalog: Catalog, period: str, run_id: int, now_ms: int, tick: Progress) -> dict:
    accounts = db.query("SELECT account_id, legal_entity, jurisdiction, cycle_day, payment_type, currency "
                        "FROM accounts ORDER BY account_id")
    tick("accounts", 0, len(accounts))
    subs_by_account: dict[str, list[tuple]] = defaultdict(list)
    for account_id, *sub in db.query("SELECT account_id, subscription_id, msisdn, plan, start_date, end_date "
                                     "FROM subscriptions ORDER BY account_id, msisdn, start_date"):
        subs_by_account[account_id].append(tuple(sub))
    earliest = cycle_bounds(_previous_period(period), 1)[1]  # no cycle of P starts before P-01
    coverage: dict[int, list[tuple]] = defaultdict(list)
    for sub_id, line_from, line_to, kind, unit_price in db.query(
            "SELECT l.subscription_id, l.period_from, l.period_to, l.kind, l.unit_price FROM invoice_lines l "
            "JOIN invoices i ON i.invoice_id = l.invoice_id WHERE i.kind = 'invoice' "
            "AND l.kind IN ('recurring', 'recurring_credit') AND l.period_to > ? "
            "ORDER BY l.invoice_id, l.line_no", (earliest.isoformat(),)):
        coverage[int(sub_id)].append((date.fromisoformat(line_from), date.fromisoformat(line_to),
                                      1 if kind == "recurring" else -1, int(unit_price)))
    charges_by_account: dict[str, list[tuple]] = defaultdict(list)
    for charge_id, account_id, kind, description, category, amount, charge_date in db.query(
            "SELECT charge_id, account_id, kind, description, category, amount, charge_date FROM charges "
            "WHERE invoice_id IS NULL ORDER BY charge_id"):
        charges_by_account[account_id].append((int(charge_id), kind, description, category, int(amount), charge_date))
    with_usage = {row[0] for row in db.query("SELECT DISTINCT account_id FROM usage_records WHERE state = 'guided'")}
    catalog_from = {int(sub_id): _utc_day(int(start)) for sub_id, start in db.query(
        "SELECT subscription_id, MIN(fee_period_start) FROM usage_records WHERE record_type = 'fee' "
        "AND fee_type = 'plan' AND subscription_id IS NOT NULL AND state IN ('guided', 'billed') "
        "GROUP BY subscription_id")}

    # 1. per account: fee and charge lines, and the invoice header
    headers: list[tuple] = []
    pending: dict[str, tuple] = {}
    for n, (account_id, entity, juris, cycle_day, payment_type, currency) in enumerate(accounts):
        cycle_start, cycle_end = cycle_bounds(period, int(cycle_day))
        next_end = _add_month(cycle_end)
        lines = _fee_lines(catalog, subs_by_account.get(account_id, []), coverage,
                           [(cycle_start, cycle_end), (cycle_end, next_end)], catalog_from)
        charges = [c for c in charges_by_account.get(account_id, []) if c[5] < cycle_end.isoformat()]
        for _, kind, description, category, amount, charge_date in charges:
            lines.append(_Line(kind=kind, description=description, category=category, amount=amount,
                               period_from=charge_date))
        if not lines and account_id not in with_usage:
            continue
        pending[account_id] = (lines, charges, juris, payment_type)
        headers.append((account_id, entity, juris, payment_type, period, cycle_start.isoformat(),
                        cycle_end.isoformat(), next_end.isoformat(), _ms(cycle_end), currency))
        if n % 5000 == 0:
            tick("accounts", n, len(accounts))
    tick("accounts", len(accounts), len(accounts))
    first_id = db.next_ids("invoice", len(headers)) if headers else 0
    invoice_of = {h[0]: first_id + i for i, h in enumerate(headers)}
    db.executemany(_INVOICE_INSERT, [(invoice_of[h[0]], run_id, *h, now_ms) for h in headers])

    # 2. claim the usage, then aggregate exactly what was claimed
    tick("usage", 0, 1)
    db.execute("UPDATE usage_records SET state = 'billed', invoice_id = i.invoice_id FROM invoices i "
               "WHERE i.run_id = ? AND i.account_id = usage_records.account_id "
               "AND usage_records.state = 'guided' AND usage_records.record_time < i.usage_to", (run_id,))
    usage_rows = db.query(
        "SELECT u.invoice_id, u.msisdn, u.rating_group, COUNT(*), SUM(u.amount), "
        "SUM(COALESCE(u.usage_time, 0)), "
        "SUM(COALESCE(u.octets_total, COALESCE(u.octets_in, 0) + COALESCE(u.octets_out, 0))), "
        "SUM(COALESCE(u.usage_units, 0)), MIN(u.record_date), MAX(u.record_date), SUM(u.money_bonus), "
        "SUM(u.money_shared), SUM(u.allowance_units), SUM(u.allowance_shared) "
        "FROM usage_records u WHERE u.invoice_id IN (SELECT invoice_id FROM invoices WHERE run_id = ?) "
        "AND u.record_type NOT IN ('close', 'fee') GROUP BY u.invoice_id, u.msisdn, u.rating_group "
        "ORDER BY u.invoice_id, u.msisdn, u.rating_group", (run_id,))
    claimed = int(db.scalar("SELECT COALESCE(SUM(amount), 0) FROM usage_records WHERE invoice_id IN "
                            "(SELECT invoice_id FROM invoices WHERE run_id = ?) AND record_type <> 'fee'",
                            (run_id,)) or 0)
    usage_by_invoice: dict[int, list[tuple]] = defaultdict(list)
    for row in usage_rows:
        usage_by_invoice[int(row[0])].append(row[1:])
    fees_by_invoice: dict[int, list[tuple]] = defaultdict(list)
    for row in db.query(
            "SELECT u.invoice_id, u.msisdn, u.fee_type, u.fee_item, u.fee_period_start, u.fee_period_end, "
            "u.record_date, u.amount, u.money_bonus, s.plan FROM usage_records u "
            "LEFT JOIN subscriptions s ON s.subscription_id = u.subscription_id "
            "WHERE u.invoice_id IN (SELECT invoice_id FROM invoices WHERE run_id = ?) AND u.record_type = 'fee' "
            "ORDER BY u.invoice_id, u.msisdn, u.record_time, u.record_id", (run_id,)):
        fees_by_invoice[int(row[0])].append(row[1:])
    claimed_fees = sum(int(row[6]) for rows in fees_by_invoice.values() for row in rows)
    tick("usage", 1, 1)

    # 3. lines, taxes, totals
    line_rows: list[tuple] = []
    totals: list[tuple] = []
    charge_rows: list[tuple] = []
    empty: list[tuple] = []
    usage_total = grand_total = fee_total = 0
    for n, (account_id, invoice_id) in enumerate(invoice_of.items()):
        lines, charges, juris, payment_type = pending[account_id]
        charged = 1 if payment_type == "postpaid" else 0
        usage_lines = []
        for (msisdn, rg, count, amount, seconds, octets, events, day_from, day_to, bonus, shared_money,
             allowance, shared_allowance) in usage_by_invoice.get(invoice_id, []):
            usage_lines.extend(_usage_lines(
                catalog, charged, msisdn, None if rg is None else int(rg), int(count), int(amount), int(seconds),
                int(octets), int(events), day_from, day_to, int(bonus), int(shared_money), int(allowance),
                int(shared_allowance)))
        for msisdn, fee_type, item, start, end, day, amount, bonus, plan in fees_by_invoice.get(invoice_id, []):
            plan_fee = catalog.config.plans.get(plan) if plan else None
            category = plan_fee.tax_category if plan_fee else catalog.config.default_usage_category
            usage_lines.extend(_fee_record_lines(
                charged, msisdn, fee_type, item, None if start is None else int(start),
                None if end is None else int(end), day, int(amount), int(bonus), category))
        all_lines = usage_lines + lines
        if not all_lines:
            empty.append((invoice_id,))
            continue
        subtotal = tax_total = usage_amount = 0
        for line_no, line in enumerate(all_lines, 1):
            rate = catalog.tax_rate(juris, line.category)
            tax = tax_of(line.amount, rate, catalog.minor, catalog.config.tax_rounding) if line.charged else 0
            if line.charged:
                subtotal += line.amount
                tax_total += tax
            if line.kind == "usage":
                usage_amount += line.amount
            elif line.kind == "fee":
                fee_total += line.amount
            line_rows.append((invoice_id, line_no, line.kind, line.description, line.category, line.msisdn,
                              line.rating_group, line.subscription_id, line.quantity, line.unit, line.records,
                              line.period_from, line.period_to, line.unit_price, line.amount, line.charged,
                              _rate_text(rate) if line.charged else "0", tax, None))
        totals.append((subtotal, tax_total, subtotal + tax_total, usage_amount, invoice_id))
        charge_rows.extend((invoice_id, c[0]) for c in charges)
        usage_total += usage_amount
        grand_total += subtotal + tax_total
        if n % 5000 == 0:
            tick("invoices", n, len(invoice_of))
    tick("invoices", len(invoice_of), len(invoice_of))
    db.executemany(_LINE_INSERT, line_rows)
    db.executemany("UPDATE invoices SET subtotal = ?, tax_total = ?, total = ?, usage_amount = ? "
                   "WHERE invoice_id = ?", totals)
    db.executemany("UPDATE charges SET invoice_id = ? WHERE charge_id = ?", charge_rows)
    if empty:  # claimed only zero-amount close records and nothing else
        db.executemany("UPDATE usage_records SET invoice_id = NULL, state = 'guided' WHERE invoice_id = ? "
                       "AND record_type = 'close'", empty)
        db.executemany("DELETE FROM invoices WHERE invoice_id = ?", empty)
    if claimed != usage_total:
        raise BillingError(f"tie-out failed: claimed CDR amounts {claimed} ≠ usage lines {usage_total}")
    if claimed_fees != fee_total:
        raise BillingError(f"tie-out failed: claimed fee records {claimed_fees} ≠ fee lines {fee_total}")
    return {"invoices": len(totals), "usage_amount": usage_total, "total": grand_total}


def _rate_text(rate) -> str:
    from decimal import Decimal

    return str((Decimal(rate.numerator) / Decimal(rate.denominator)).normalize())


def run_status(db: Database, period: str) -> dict:
    """A bill run's summary, and its tie-out: CDR amounts claimed = usage lines = sum of invoice usage."""
    row = db.query_dicts("SELECT run_id, period, status, created_at, finalized_at, invoices, usage_amount, total "
                         "FROM bill_runs WHERE period = ?", (period,))
    if not row:
        raise BillingError(f"no bill run for {period}")
    run = row[0]
    invoices = "SELECT invoice_id FROM invoices WHERE run_id = ?"
    cdr = int(db.scalar(f"SELECT COALESCE(SUM(amount), 0) FROM usage_records WHERE invoice_id IN ({invoices}) "
                        "AND record_type <> 'fee'", (run["run_id"],)) or 0)
    fee_records = int(db.scalar(f"SELECT COALESCE(SUM(amount), 0) FROM usage_records WHERE invoice_id IN "
                                f"({invoices}) AND record_type = 'fee'", (run["run_id"],)) or 0)
    fee_lines = int(db.scalar(f"SELECT COALESCE(SUM(amount), 0) FROM invoice_lines WHERE kind = 'fee' "
                              f"AND invoice_id IN ({invoices})", (run["run_id"],)) or 0)
    records = int(db.scalar(f"SELECT COUNT(*) FROM usage_records WHERE invoice_id IN ({invoices})",
                            (run["run_id"],)) or 0)
    lines = int(db.scalar(f"SELECT COALESCE(SUM(amount), 0) FROM invoice_lines WHERE kind = 'usage' "
                          f"AND invoice_id IN ({invoices})", (run["run_id"],)) or 0)
    charged = int(db.scalar(f"SELECT COALESCE(SUM(amount), 0) FROM invoice_lines WHERE kind = 'usage' AND charged = 1 "
                            f"AND invoice_id IN ({invoices})", (run["run_id"],)) or 0)
    tax = int(db.scalar("SELECT COALESCE(SUM(tax_total), 0) FROM invoices WHERE run_id = ?", (run["run_id"],)) or 0)
    run.update({"records_billed": records, "cdr_amount": cdr, "usage_lines": lines, "usage_charged": charged,
                "usage_prepaid": lines - charged, "tax_total": tax, "fee_amount": fee_records, "fee_lines": fee_lines,
                "ties_out": cdr == lines == run["usage_amount"] and fee_records == fee_lines})
    return run


def finalize(db: Database, catalog: Catalog, period: str, *, today: str, now_ms: int) -> dict:
    """Make the draft invoices of `period` immutable and number them, gaplessly per legal entity."""
    parse_period(period)
    with db.transaction(lock="billing"):
        run = db.one("SELECT run_id, status FROM bill_runs WHERE period = ?", (period,))
        if run is None:
            raise BillingError(f"no bill run for {period}: run `ocs bill run --period {period}` first")
        if run[1] == "finalized":
            return {**run_status(db, period), "changed": False, "numbered": 0,
                    "note": f"bill run {period} was already finalized; nothing changed"}
        run_id = int(run[0])
        due = (date.fromisoformat(today) + timedelta(days=catalog.config.payment_terms_days)).isoformat()
        drafts = db.query("SELECT invoice_id, legal_entity FROM invoices WHERE run_id = ? AND status = 'draft' "
                          "ORDER BY legal_entity, account_id", (run_id,))
        by_entity: dict[str, list[int]] = defaultdict(list)
        for invoice_id, entity in drafts:
            by_entity[entity].append(int(invoice_id))
        updates, numbers = [], []
        for entity, ids in by_entity.items():
            fmt = catalog.entity(entity).invoice_number_format
            first = db.next_ids(f"number:{entity}:invoice", len(ids))
            for offset, invoice_id in enumerate(ids):
                number = fmt.format(seq=first + offset, entity=entity)
                updates.append((first + offset, number, today, due, now_ms, invoice_id))
                numbers.append(number)
        db.executemany("UPDATE invoices SET status = 'finalized', sequence = ?, number = ?, issue_date = ?, "
                       "due_date = ?, finalized_at = ? WHERE invoice_id = ? AND status = 'draft'", updates)
        db.execute("UPDATE bill_runs SET status = 'finalized', finalized_at = ? WHERE run_id = ?", (now_ms, run_id))
    return {**run_status(db, period), "changed": True, "numbered": len(numbers),
            "first_number": numbers[0] if numbers else None, "last_number": numbers[-1] if numbers else None}


def credit_note(db: Database, catalog: Catalog, invoice_number: str, *, reason: str, today: str, now_ms: int,
                line_no: int | None = None, amount: int | None = None) -> dict:
    """Issue a credit note against a finalized invoice: the whole invoice (what is not credited yet), one
    line, or part of one line (`amount`, positive micro-units). Numbered at once from the entity's
    credit-note sequence; the invoice itself never changes."""
    if not reason.strip():
        raise BillingError("a credit note needs a reason")
    if amount is not None and (amount <= 0 or line_no is None):
        raise BillingError("a partial credit needs --line and a positive amount")
    with db.transaction(lock="billing"):
        inv = db.query_dicts("SELECT * FROM invoices WHERE number = ?", (invoice_number,))
        if not inv or inv[0]["kind"] != "invoice":
            raise BillingError(f"unknown invoice {invoice_number}")
        invoice = inv[0]
        if invoice["status"] != "finalized":
            raise BillingError(f"invoice {invoice_number} is a draft: re-run the bill run instead of crediting it")
        lines = db.query_dicts("SELECT * FROM invoice_lines WHERE invoice_id = ? ORDER BY line_no",
                               (invoice["invoice_id"],))
        credited: dict[int, tuple[int, int]] = defaultdict(lambda: (0, 0))
        for n, a, t in db.query(
                "SELECT l.credited_line_no, SUM(l.amount), SUM(l.tax_amount) FROM invoice_lines l JOIN invoices c "
                "ON c.invoice_id = l.invoice_id WHERE c.credited_invoice_id = ? AND c.kind = 'credit_note' "
                "GROUP BY l.credited_line_no", (invoice["invoice_id"],)):
            credited[int(n)] = (int(a), int(t))
        if line_no is not None and not any(line["line_no"] == line_no for line in lines):
            raise BillingError(f"invoice {invoice_number} has no line {line_no}")
        new_lines: list[tuple] = []
        for line in lines:
            if line_no is not None and line["line_no"] != line_no:
                continue
            if not line["charged"]:
                if line_no is not None:
                    raise BillingError(f"line {line_no} is prepaid usage (not charged): nothing to credit")
                continue
            done_amount, done_tax = credited[line["line_no"]]
            left, left_tax = line["amount"] + done_amount, line["tax_amount"] + done_tax
            if amount is not None:
                if line["amount"] <= 0 or amount > left:
                    raise BillingError(f"line {line_no} has {format_money(max(left, 0), catalog.minor_digits)} "
                                       "left to credit")
                rate = catalog.tax_rate(invoice["jurisdiction"], line["category"])
                credit, credit_tax = -amount, tax_of(-amount, rate, catalog.minor, catalog.config.tax_rounding)
            else:
                credit, credit_tax = -left, -left_tax
            if credit == 0 and credit_tax == 0:
                continue
            new_lines.append((line, credit, credit_tax))
        if not new_lines:
            raise BillingError(f"invoice {invoice_number} has nothing left to credit")
        entity = invoice["legal_entity"]
        sequence = db.next_ids(f"number:{entity}:credit_note")
        number = catalog.entity(entity).credit_note_number_format.format(seq=sequence, entity=entity)
        note_id = db.next_ids("invoice")
        subtotal = sum(c for _, c, _ in new_lines)
        tax_total = sum(t for _, _, t in new_lines)
        db.execute(
            "INSERT INTO invoices (invoice_id, kind, status, run_id, account_id, legal_entity, jurisdiction, "
            "payment_type, sequence, number, period, cycle_start, cycle_end, fee_end, usage_to, issue_date, due_date, "
            "currency, subtotal, tax_total, total, usage_amount, credited_invoice_id, reason, created_at, "
            "finalized_at) VALUES (?, 'credit_note', 'finalized', NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, "
            "?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (note_id, invoice["account_id"], entity, invoice["jurisdiction"], invoice["payment_type"], sequence, number,
             invoice["period"], invoice["cycle_start"], invoice["cycle_end"], today, today, invoice["currency"],
             subtotal, tax_total, subtotal + tax_total, invoice["invoice_id"], reason.strip(), now_ms, now_ms))
        db.executemany(_LINE_INSERT, [
            (note_id, n, "credit", f"Credit: {line['description']}", line["category"], line["msisdn"],
             line["rating_group"], line["subscription_id"], None, None, None, line["period_from"], line["period_to"],
             None, credit, 1, line["tax_rate"], credit_tax, line["line_no"])
            for n, (line, credit, credit_tax) in enumerate(new_lines, 1)])
    return {"number": number, "invoice": invoice_number, "subtotal": subtotal, "tax_total": tax_total,
            "total": subtotal + tax_total, "lines": len(new_lines)}
