"""Billing accounts, their subscriptions (MSISDN × plan over dates), one-off charges, and payments.

A subscription row says "this MSISDN (and IMSI) belongs to this account on plan P from start_date until
end_date (exclusive)". A plan change ends the current row and starts a new one on the same date, so the
rows of an MSISDN never overlap: guiding is unambiguous and recurring fees prorate by day from the rows.
Payments are idempotent by reference and allocated to the oldest open invoices unless one is named.

Every function that changes data runs in one transaction and checks its input first: a BillingError
means nothing was changed. Imports billing only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from billing.config import Catalog
from billing.db import Database

__all__ = ["AccountInput", "BillingError", "account_balance", "add_account", "add_charge", "add_payment",
           "change_plan", "end_subscription", "get_account", "list_accounts", "subscribe"]


class BillingError(ValueError):
    """Bad input or a forbidden change, worded for the operator; nothing was changed."""


_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MSISDN = re.compile(r"^\d{5,15}$")
_IMSI = re.compile(r"^\d{6,15}$")


def parse_date(text: str, what: str = "date") -> str:
    """An ISO date 'YYYY-MM-DD' (checked) as the text the database stores."""
    try:
        return date.fromisoformat(text).isoformat()
    except (TypeError, ValueError):
        raise BillingError(f"{what} must be a date YYYY-MM-DD, got {text!r}") from None


@dataclass
class AccountInput:
    account_id: str
    name: str
    address: list[str]
    email: str = ""
    legal_entity: str | None = None
    jurisdiction: str | None = None
    cycle_day: int = 1
    payment_type: str = "postpaid"
    currency: str | None = None


def add_account(db: Database, catalog: Catalog, account: AccountInput, *, now_ms: int) -> dict:
    """Create an account; the same input again changes nothing, a different one is refused."""
    entity = account.legal_entity or catalog.config.default_legal_entity
    jurisdiction = account.jurisdiction or catalog.config.default_jurisdiction
    currency = account.currency or catalog.currency
    if not _ACCOUNT_ID.match(account.account_id):
        raise BillingError(f"account id {account.account_id!r}: letters, digits, . _ - (max 64)")
    if not account.name.strip():
        raise BillingError("account name must not be empty")
    if entity not in catalog.config.legal_entities:
        raise BillingError(f"unknown legal entity {entity!r} (known: {', '.join(catalog.config.legal_entities)})")
    if jurisdiction not in catalog.config.taxes:
        raise BillingError(f"no tax table for jurisdiction {jurisdiction!r} (known: {', '.join(catalog.config.taxes)})")
    if not 1 <= account.cycle_day <= 28:
        raise BillingError(f"cycle day must be 1..28, got {account.cycle_day}")
    if account.payment_type not in ("postpaid", "prepaid"):
        raise BillingError(f"payment type must be postpaid or prepaid, got {account.payment_type!r}")
    if currency != catalog.currency:
        raise BillingError(f"currency {currency} differs from the rate card's {catalog.currency}")
    row = ("\n".join(line.strip() for line in account.address if line.strip()), account.email, entity, jurisdiction,
           account.cycle_day, account.payment_type, currency)
    with db.transaction():
        existing = db.one("SELECT name, address, email, legal_entity, jurisdiction, cycle_day, payment_type, currency "
                          "FROM accounts WHERE account_id = ?", (account.account_id,))
        if existing is not None:
            if tuple(existing) != (account.name, *row):
                raise BillingError(f"account {account.account_id} exists with other details")
            return {"account_id": account.account_id, "created": False}
        db.execute("INSERT INTO accounts (account_id, name, address, email, legal_entity, jurisdiction, cycle_day, "
                   "payment_type, currency, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?)",
                   (account.account_id, account.name, *row, now_ms))
    return {"account_id": account.account_id, "created": True}


def _require_account(db: Database, account_id: str) -> tuple:
    row = db.one("SELECT account_id, status FROM accounts WHERE account_id = ?", (account_id,))
    if row is None:
        raise BillingError(f"unknown account {account_id}")
    return row


def subscribe(db: Database, catalog: Catalog, account_id: str, msisdn: str, plan: str, start: str,
              imsi: str | None = None) -> dict:
    """Attach an MSISDN to an account on a plan from `start` (its rows must not overlap)."""
    start = parse_date(start, "start date")
    if not _MSISDN.match(msisdn):
        raise BillingError(f"MSISDN must be 5..15 digits, got {msisdn!r}")
    if imsi is not None and not _IMSI.match(imsi):
        raise BillingError(f"IMSI must be 6..15 digits, got {imsi!r}")
    if plan not in catalog.plan_fees:
        raise BillingError(f"plan {plan!r} has no recurring fee in the billing catalog "
                           f"(known: {', '.join(catalog.plan_fees)})")
    with db.transaction():
        _require_account(db, account_id)
        same = db.one("SELECT subscription_id FROM subscriptions WHERE account_id = ? AND msisdn = ? AND plan = ? "
                      "AND start_date = ? AND end_date IS NULL", (account_id, msisdn, plan, start))
        if same is not None:
            return {"subscription_id": int(same[0]), "created": False}
        _check_no_overlap(db, msisdn, imsi, start, None)
        sub_id = db.next_ids("subscription")
        db.execute("INSERT INTO subscriptions (subscription_id, account_id, msisdn, imsi, plan, start_date, end_date) "
                   "VALUES (?, ?, ?, ?, ?, ?, NULL)", (sub_id, account_id, msisdn, imsi, plan, start))
    return {"subscription_id": sub_id, "created": True}


def _check_no_overlap(db: Database, msisdn: str, imsi: str | None, start: str, end: str | None) -> None:
    for key, value in (("msisdn", msisdn), ("imsi", imsi)):
        if value is None:
            continue
        before_end = "" if end is None else " AND start_date < ?"
        clash = db.one(f"SELECT account_id, start_date, end_date FROM subscriptions WHERE {key} = ? "
                       f"AND (end_date IS NULL OR end_date > ?){before_end}",
                       (value, start) if end is None else (value, start, end))
        if clash is not None:
            raise BillingError(f"{key.upper()} {value} already belongs to account {clash[0]} from {clash[1]}"
                               f"{' to ' + clash[2] if clash[2] else ''}")


def _current(db: Database, msisdn: str, on: str) -> tuple:
    row = db.one("SELECT subscription_id, account_id, imsi, plan, start_date FROM subscriptions WHERE msisdn = ? "
                 "AND start_date <= ? AND (end_date IS NULL OR end_date > ?)", (msisdn, on, on))
    if row is None:
        raise BillingError(f"MSISDN {msisdn} has no subscription on {on}")
    return row


def change_plan(db: Database, catalog: Catalog, msisdn: str, plan: str, on: str) -> dict:
    """From date `on` the MSISDN is on `plan`: the current row ends there, a new one starts (fees prorate)."""
    on = parse_date(on, "change date")
    if plan not in catalog.plan_fees:
        raise BillingError(f"plan {plan!r} has no recurring fee in the billing catalog")
    with db.transaction():
        sub_id, account_id, imsi, old_plan, start = _current(db, msisdn, on)
        if old_plan == plan:
            raise BillingError(f"MSISDN {msisdn} is already on plan {plan} on {on}")
        later = db.one("SELECT start_date FROM subscriptions WHERE msisdn = ? AND start_date > ?", (msisdn, on))
        if later is not None:
            raise BillingError(f"MSISDN {msisdn} has a later subscription from {later[0]}; change that one")
        # even when the row starts on that day it is ended (empty), never edited: fees billed for it are then
        # credited at the fee they were charged at
        db.execute("UPDATE subscriptions SET end_date = ? WHERE subscription_id = ?", (on, sub_id))
        new_id = db.next_ids("subscription")
        db.execute("INSERT INTO subscriptions (subscription_id, account_id, msisdn, imsi, plan, start_date, end_date) "
                   "SELECT ?, account_id, msisdn, imsi, ?, ?, NULL FROM subscriptions WHERE subscription_id = ?",
                   (new_id, plan, on, sub_id))
    return {"subscription_id": new_id, "plan": plan, "from": on, "previous_plan": old_plan}


def end_subscription(db: Database, msisdn: str, on: str) -> dict:
    """The MSISDN leaves its account from `on` (exclusive end): fees stop, unused advance days are credited."""
    on = parse_date(on, "end date")
    with db.transaction():
        sub_id, account_id, *_ = _current(db, msisdn, on)
        db.execute("UPDATE subscriptions SET end_date = ? WHERE subscription_id = ?", (on, sub_id))
    return {"subscription_id": int(sub_id), "account_id": account_id, "end_date": on}


def add_charge(db: Database, catalog: Catalog, account_id: str, amount: int, description: str, *,
               kind: str = "one_off", category: str | None = None, charge_date: str, reference: str | None = None,
               now_ms: int) -> dict:
    """A one-off charge or an adjustment (negative = credit) billed on the next bill run."""
    if kind not in ("one_off", "adjustment", "rerating"):
        raise BillingError("kind must be one_off or adjustment")
    if amount == 0:
        raise BillingError("amount must not be zero")
    if not description.strip():
        raise BillingError("a charge needs a description")
    charge_date = parse_date(charge_date, "charge date")
    category = category or catalog.config.default_usage_category
    with db.transaction():
        _require_account(db, account_id)
        juris = db.scalar("SELECT jurisdiction FROM accounts WHERE account_id = ?", (account_id,))
        try:
            catalog.tax_rate(juris, category)
        except ValueError as exc:
            raise BillingError(str(exc)) from None
        if reference is not None:
            row = db.one("SELECT charge_id, account_id, amount FROM charges WHERE reference = ?", (reference,))
            if row is not None:
                if (row[1], int(row[2])) != (account_id, amount):
                    raise BillingError(f"reference {reference} was used for another charge")
                return {"charge_id": int(row[0]), "created": False}
        charge_id = db.next_ids("charge")
        db.execute("INSERT INTO charges (charge_id, account_id, kind, description, category, amount, charge_date, "
                   "reference, invoice_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                   (charge_id, account_id, kind, description.strip(), category, amount, charge_date, reference,
                    now_ms))
    return {"charge_id": charge_id, "created": True}


def add_payment(db: Database, account_id: str | None, amount: int, reference: str, *, received: str,
                invoice_number: str | None = None, method: str = "transfer", now_ms: int) -> dict:
    """Record a payment (idempotent by reference) and allocate it: to the named invoice, else to the oldest
    open finalized invoices; what is left stays on the account as credit."""
    if amount <= 0:
        raise BillingError("a payment amount must be positive")
    if not reference.strip():
        raise BillingError("a payment needs a reference")
    received = parse_date(received, "payment date")
    with db.transaction(lock="payments"):
        target = None
        if invoice_number is not None:
            row = db.one("SELECT invoice_id, account_id, status, kind FROM invoices WHERE number = ?",
                         (invoice_number,))
            if row is None or row[3] != "invoice":
                raise BillingError(f"unknown invoice {invoice_number}")
            if account_id is not None and row[1] != account_id:
                raise BillingError(f"invoice {invoice_number} belongs to account {row[1]}, not {account_id}")
            target, account_id = int(row[0]), row[1]
        if account_id is None:
            raise BillingError("name an account or an invoice")
        _require_account(db, account_id)
        existing = db.one("SELECT payment_id, account_id, amount FROM payments WHERE reference = ?", (reference,))
        if existing is not None:
            if (existing[1], int(existing[2])) != (account_id, amount):
                raise BillingError(f"payment reference {reference} was already used with other details")
            return {"payment_id": int(existing[0]), "created": False, "allocations": _allocations(db, existing[0])}
        payment_id = db.next_ids("payment")
        db.execute("INSERT INTO payments (payment_id, account_id, amount, received_date, reference, method, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (payment_id, account_id, amount, received, reference, method, now_ms))
        left = amount
        opens = open_invoices(db, account_id)
        if target is not None:
            opens = [o for o in opens if o["invoice_id"] == target] + [o for o in opens if o["invoice_id"] != target]
        rows = []
        for inv in opens:
            if left <= 0:
                break
            take = min(left, inv["open"])
            if take > 0:
                rows.append((payment_id, inv["invoice_id"], take))
                left -= take
        db.executemany("INSERT INTO payment_allocations (payment_id, invoice_id, amount) VALUES (?, ?, ?)", rows)
    return {"payment_id": payment_id, "created": True, "allocations": _allocations(db, payment_id),
            "unallocated": left}


def _allocations(db: Database, payment_id: int) -> list[dict]:
    return [{"invoice": number, "amount": int(amount)} for number, amount in db.query(
        "SELECT i.number, a.amount FROM payment_allocations a JOIN invoices i ON i.invoice_id = a.invoice_id "
        "WHERE a.payment_id = ? ORDER BY i.sequence", (payment_id,))]


def open_invoices(db: Database, account_id: str) -> list[dict]:
    """Finalized invoices of the account with what is still open (total − payments − credit notes)."""
    rows = db.query(
        "SELECT i.invoice_id, i.number, i.total, i.issue_date, i.due_date, "
        "COALESCE((SELECT SUM(a.amount) FROM payment_allocations a WHERE a.invoice_id = i.invoice_id), 0), "
        "COALESCE((SELECT SUM(c.total) FROM invoices c WHERE c.credited_invoice_id = i.invoice_id "
        "AND c.kind = 'credit_note'), 0) "
        "FROM invoices i WHERE i.account_id = ? AND i.kind = 'invoice' AND i.status = 'finalized' "
        "ORDER BY i.issue_date, i.sequence", (account_id,))
    return [{"invoice_id": int(r[0]), "number": r[1], "total": int(r[2]), "issue_date": r[3], "due_date": r[4],
             "paid": int(r[5]), "credited": -int(r[6]), "open": int(r[2]) - int(r[5]) + int(r[6])} for r in rows]


def account_balance(db: Database, account_id: str, today: str) -> dict:
    """What the account owes (positive) or has in credit (negative), and which invoices are overdue."""
    _require_account(db, account_id)
    invoices = open_invoices(db, account_id)
    paid_total = int(db.scalar("SELECT COALESCE(SUM(amount), 0) FROM payments WHERE account_id = ?",
                               (account_id,)) or 0)
    billed = sum(i["total"] for i in invoices) - sum(i["credited"] for i in invoices)
    overdue = [i for i in invoices if i["open"] > 0 and i["due_date"] is not None and i["due_date"] < today]
    return {"account_id": account_id, "billed": billed, "paid": paid_total, "balance": billed - paid_total,
            "open_invoices": [i for i in invoices if i["open"] > 0], "overdue": overdue,
            "overdue_amount": sum(i["open"] for i in overdue), "status": "overdue" if overdue else "in good standing"}


def get_account(db: Database, account_id: str) -> dict:
    rows = db.query_dicts("SELECT * FROM accounts WHERE account_id = ?", (account_id,))
    if not rows:
        raise BillingError(f"unknown account {account_id}")
    account = rows[0]
    account["address"] = account["address"].split("\n") if account["address"] else []
    account["subscriptions"] = db.query_dicts(
        "SELECT subscription_id, msisdn, imsi, plan, start_date, end_date FROM subscriptions WHERE account_id = ? "
        "ORDER BY msisdn, start_date", (account_id,))
    account["pending_charges"] = db.query_dicts(
        "SELECT charge_id, kind, description, category, amount, charge_date FROM charges WHERE account_id = ? "
        "AND invoice_id IS NULL ORDER BY charge_id", (account_id,))
    return account


def list_accounts(db: Database, limit: int = 1000) -> list[dict]:
    return db.query_dicts(
        "SELECT a.account_id, a.name, a.payment_type, a.cycle_day, a.legal_entity, a.jurisdiction, a.status, "
        "(SELECT COUNT(*) FROM subscriptions s WHERE s.account_id = a.account_id AND s.end_date IS NULL) AS lines "
        "FROM accounts a ORDER BY a.account_id LIMIT ?", (limit,))
