"""Bill runs against SQLite and PostgreSQL: usage billed at the CDR amounts (prepaid shown as consumed),
recurring fees in advance with daily proration and credits, taxes per line, idempotent re-runs, immutable
finalized invoices with gapless numbers per legal entity, credit notes, payments and overdue status,
re-rating as explicit adjustments, and the tie-out CDR charges = billed usage = invoice usage lines."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from billing.accounts import (
    BillingError,
    account_balance,
    add_charge,
    add_payment,
    change_plan,
    end_subscription,
    open_invoices,
)
from billing.billrun import credit_note, finalize, run_bill
from billing.cdrs import import_cdrs
from billing.config import Catalog, load_billing_config
from billing.documents import invoice_document
from billing.money import prorate
from billing.rerating import rerate
from ratecards import parse_ratecard
from tests.test_billing_helpers import (  # noqa: F401 - fixtures
    CENT,
    DAY,
    DEMO_RATECARD,
    T0,
    catalog,
    close_record,
    db,
    db_url,
    make_account,
    usage_record,
    write_cdr_file,
)

FEE = 9_990_000
PLUS = 19_990_000


def lines_of(db, account_id: str, period: str = "2026-11") -> list[tuple]:
    return db.query("SELECT l.kind, l.msisdn, l.rating_group, l.period_from, l.period_to, l.amount, l.charged, "
                    "l.tax_amount FROM invoice_lines l JOIN invoices i ON i.invoice_id = l.invoice_id "
                    "WHERE i.account_id = ? AND i.period = ? AND i.kind = 'invoice' ORDER BY l.line_no",
                    (account_id, period))


def traffic(tmp_path: Path, n: int, amounts: list[int], *, day: int = 3, name: str | None = None) -> list[dict]:
    records = []
    for i, amount in enumerate(amounts):
        sid = f"{name or 'x'}{n}-{day}-{i}"
        records.append(usage_record(sid, 1, n, T0 + day * DAY + i * 60_000, amount=amount,
                                    allowance=0 if amount else 500_000))
        records.append(close_record(sid, 2, n, T0 + day * DAY + i * 60_000 + 1))
    write_cdr_file(tmp_path / "cdr", records, partition=n, name=f"{name or 'f'}-{n}-{day}.jsonl")
    return records


def test_usage_is_billed_at_cdr_amounts_and_ties_out(db, catalog, tmp_path: Path) -> None:
    post = make_account(db, catalog, 1)
    pre = make_account(db, catalog, 2, payment_type="prepaid")
    written = traffic(tmp_path, 1, [12_340_000, 0, 50_000]) + traffic(tmp_path, 2, [70_000, 30_000])
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)
    run = run_bill(db, catalog, "2026-11", now_ms=T0)
    cdr_total = sum(r["amount"] for r in written)
    assert run["ties_out"] and run["cdr_amount"] == run["usage_lines"] == run["usage_amount"] == cdr_total
    assert run["records_billed"] == len(written)
    assert (run["usage_charged"], run["usage_prepaid"]) == (12_390_000, 100_000)
    post_lines = lines_of(db, post)
    assert post_lines[0][:3] == ("usage", "491700000001", 100) and post_lines[0][5:] == (12_390_000, 1, 2_350_000)
    pre_usage = [line for line in lines_of(db, pre) if line[0] == "usage"]
    assert pre_usage == [("usage", "491700000002", 100, "2026-11-04", "2026-11-04", 100_000, 0, 0)]
    doc = invoice_document(db, catalog, int(db.scalar("SELECT invoice_id FROM invoices WHERE account_id = ?", (pre,))))
    assert doc["prepaid_usage"] == "0.10" and doc["subtotal"] == "19.98"  # fees only: usage was paid up front
    states = dict(db.query("SELECT state, COUNT(*) FROM usage_records GROUP BY state"))
    assert states == {"billed": len(written)}


def test_recurring_fees_in_advance_with_daily_proration(db, catalog, tmp_path: Path) -> None:
    account = make_account(db, catalog, 1, start="2026-11-10")
    run_bill(db, catalog, "2026-11", now_ms=T0)
    assert [(k, f, t, a) for k, _, _, f, t, a, *_ in lines_of(db, account)] == [
        ("recurring", "2026-11-10", "2026-12-01", prorate(FEE, 9, 30, 30, CENT, "half-up")),
        ("recurring", "2026-12-01", "2027-01-01", FEE)]
    assert prorate(FEE, 9, 30, 30, CENT, "half-up") == 6_990_000  # 21 of 30 days
    finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=T0)
    change_plan(db, catalog, "491700000001", "demo-plus", "2026-12-15")
    run_bill(db, catalog, "2026-12", now_ms=T0)
    december = [(k, f, t, a) for k, _, _, f, t, a, *_ in lines_of(db, account, "2026-12")]
    assert december == [
        ("recurring_credit", "2026-12-15", "2027-01-01", -prorate(FEE, 14, 31, 31, CENT, "half-up")),
        ("recurring", "2026-12-15", "2027-01-01", prorate(PLUS, 14, 31, 31, CENT, "half-up")),
        ("recurring", "2027-01-01", "2027-02-01", PLUS)]
    finalize(db, catalog, "2026-12", today="2027-01-01", now_ms=T0)
    end_subscription(db, "491700000001", "2027-01-20")
    run_bill(db, catalog, "2027-01", now_ms=T0)
    assert [(k, f, t, a) for k, _, _, f, t, a, *_ in lines_of(db, account, "2027-01")] == [
        ("recurring_credit", "2027-01-20", "2027-02-01", -prorate(PLUS, 19, 31, 31, CENT, "half-up"))]
    # every day billed once: Nov 10–Dec 14 on demo, Dec 15–Jan 19 on demo-plus
    total = int(db.scalar("SELECT SUM(amount) FROM invoice_lines WHERE kind LIKE 'recurring%'"))
    assert total == (prorate(FEE, 9, 30, 30, CENT, "half-up") + prorate(FEE, 0, 14, 31, CENT, "half-up")
                     + prorate(PLUS, 14, 31, 31, CENT, "half-up") + prorate(PLUS, 0, 19, 31, CENT, "half-up"))


def test_cycle_day_shifts_the_cycle(db, catalog, tmp_path: Path) -> None:
    account = make_account(db, catalog, 1, start="2026-11-01", cycle_day=15)
    traffic(tmp_path, 1, [10_000], day=20)  # 2026-11-21: after the cycle Nov 15 – Dec 15 starts
    traffic(tmp_path, 1, [20_000], day=3, name="early")  # 2026-11-04: in the cycle Oct 15 – Nov 15
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)
    run_bill(db, catalog, "2026-11", now_ms=T0)
    invoice = db.query_dicts("SELECT * FROM invoices WHERE account_id = ?", (account,))[0]
    assert (invoice["cycle_start"], invoice["cycle_end"], invoice["fee_end"]) == ("2026-11-15", "2026-12-15",
                                                                                  "2027-01-15")
    assert invoice["usage_amount"] == 30_000  # both, before the cycle end
    fees = [(f, t, a) for k, _, _, f, t, a, *_ in lines_of(db, account) if k == "recurring"]
    assert fees == [("2026-11-15", "2026-12-15", FEE), ("2026-12-15", "2027-01-15", FEE)]


def test_rerun_is_idempotent_and_finalized_runs_never_change(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    make_account(db, catalog, 2)
    traffic(tmp_path, 1, [10_000, 20_000])
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)

    def snapshot() -> list:
        return db.query("SELECT i.account_id, l.line_no, l.kind, l.amount, l.tax_amount, i.total FROM invoices i "
                        "JOIN invoice_lines l ON l.invoice_id = i.invoice_id ORDER BY i.account_id, l.line_no")

    first = run_bill(db, catalog, "2026-11", now_ms=T0)
    before = snapshot()
    second = run_bill(db, catalog, "2026-11", now_ms=T0 + 1)
    assert snapshot() == before and second["total"] == first["total"]
    done = finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=T0)
    assert done["changed"] and not finalize(db, catalog, "2026-11", today="2026-12-02", now_ms=T0)["changed"]
    traffic(tmp_path, 1, [40_000], day=20, name="late")  # a late CDR of November
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)
    again = run_bill(db, catalog, "2026-11", now_ms=T0 + 2)
    assert not again["changed"] and snapshot() == before
    december = run_bill(db, catalog, "2026-12", now_ms=T0)
    assert december["usage_amount"] == 40_000 and december["ties_out"]  # billed on the next run
    with pytest.raises(BillingError, match="2026-12 is still a draft"):
        run_bill(db, catalog, "2027-01", now_ms=T0)
    finalize(db, catalog, "2026-12", today="2027-01-01", now_ms=T0)
    with pytest.raises(BillingError, match="already finalized"):
        run_bill(db, catalog, "2026-10", now_ms=T0)
    with pytest.raises(BillingError, match="period must be YYYY-MM"):
        run_bill(db, catalog, "2026-13", now_ms=T0)


def _two_entity_catalog(tmp_path: Path) -> Catalog:
    text = Path(load_billing_config.__globals__["DEMO_BILLING_CONFIG"]).read_text()
    text += ('\n[legal_entities.other]\nname = "Other Telecom AG"\naddress = ["Ring 2", "1010 Wien"]\n'
             'invoice_number_format = "OT-{seq:05d}"\ncredit_note_number_format = "OT-CN-{seq:05d}"\n')
    path = tmp_path / "billing.toml"
    path.write_text(text)
    return Catalog.load(path, DEMO_RATECARD)


class _FailingCatalog(Catalog):
    """Fails while numbering the second entity: finalization must roll back without leaving a gap."""

    def entity(self, entity_id: str):  # type: ignore[override]
        if entity_id == "other":
            raise RuntimeError("disk full")
        return super().entity(entity_id)


def test_gapless_invoice_numbers_per_legal_entity(db, tmp_path: Path) -> None:
    cat = _two_entity_catalog(tmp_path)
    for n in range(1, 6):
        make_account(db, cat, n, legal_entity="other" if n % 2 == 0 else "demo", jurisdiction="AT" if n % 2 == 0
                     else None)
    run_bill(db, cat, "2026-11", now_ms=T0)
    failing = _FailingCatalog(**{f.name: getattr(cat, f.name) for f in dataclasses.fields(cat)})
    with pytest.raises(RuntimeError):
        finalize(db, failing, "2026-11", today="2026-12-01", now_ms=T0)
    assert db.scalar("SELECT COUNT(*) FROM invoices WHERE number IS NOT NULL") == 0
    finalize(db, cat, "2026-11", today="2026-12-01", now_ms=T0)
    numbers = dict(db.query("SELECT account_id, number FROM invoices ORDER BY account_id"))
    assert numbers == {"ACC001": "DM-0000001", "ACC002": "OT-00001", "ACC003": "DM-0000002",
                       "ACC004": "OT-00002", "ACC005": "DM-0000003"}
    at_tax = db.scalar("SELECT tax_total FROM invoices WHERE account_id = 'ACC002'")
    assert at_tax == 2 * 2_000_000  # 20 % of 9.99 = 1.998 → 2.00, twice


def test_credit_notes_are_the_only_correction_after_finalization(db, catalog, tmp_path: Path) -> None:
    account = make_account(db, catalog, 1)
    traffic(tmp_path, 1, [1_000_000])
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)
    run_bill(db, catalog, "2026-11", now_ms=T0)
    draft = db.scalar("SELECT invoice_id FROM invoices")
    with pytest.raises(BillingError, match="unknown invoice"):
        credit_note(db, catalog, f"#{draft}", reason="x", today="2026-12-01", now_ms=T0)
    finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=T0)
    number = db.scalar("SELECT number FROM invoices")
    before = db.query("SELECT * FROM invoice_lines ORDER BY line_no")
    partial = credit_note(db, catalog, number, reason="goodwill", line_no=1, amount=400_000, today="2026-12-05",
                          now_ms=T0)
    assert (partial["number"], partial["subtotal"], partial["tax_total"]) == ("DM-CN-0000001", -400_000, -80_000)
    with pytest.raises(BillingError, match="left to credit"):
        credit_note(db, catalog, number, reason="too much", line_no=1, amount=700_000, today="2026-12-05", now_ms=T0)
    rest = credit_note(db, catalog, number, reason="cancel", today="2026-12-06", now_ms=T0)
    invoice_total = int(db.scalar("SELECT total FROM invoices WHERE number = ?", (number,)))
    assert partial["total"] + rest["total"] == -invoice_total and rest["number"] == "DM-CN-0000002"
    with pytest.raises(BillingError, match="nothing left to credit"):
        credit_note(db, catalog, number, reason="again", today="2026-12-07", now_ms=T0)
    assert db.query("SELECT * FROM invoice_lines WHERE invoice_id = (SELECT invoice_id FROM invoices WHERE number = ?)"
                    " ORDER BY line_no", (number,)) == before
    assert open_invoices(db, account)[0]["open"] == 0


def test_one_off_charges_adjustments_and_taxes(db, catalog, tmp_path: Path) -> None:
    account = make_account(db, catalog, 1, jurisdiction="EXPORT")
    add_charge(db, catalog, account, 25_000_000, "SIM replacement", charge_date="2026-11-20", reference="c1",
               now_ms=T0)
    add_charge(db, catalog, account, 25_000_000, "SIM replacement", charge_date="2026-11-20", reference="c1",
               now_ms=T0)  # the same reference: recorded once
    add_charge(db, catalog, account, -5_000_000, "Goodwill", kind="adjustment", charge_date="2026-11-21", now_ms=T0)
    add_charge(db, catalog, account, 1_000_000, "Next month", charge_date="2026-12-02", now_ms=T0)
    with pytest.raises(BillingError, match="unknown account"):
        add_charge(db, catalog, "NOPE", 1, "x", charge_date="2026-11-20", now_ms=T0)
    run_bill(db, catalog, "2026-11", now_ms=T0)
    kinds = [(k, a, t) for k, _, _, _, _, a, _, t in lines_of(db, account)]
    assert kinds == [("recurring", FEE, 0), ("recurring", FEE, 0), ("one_off", 25_000_000, 0),
                     ("adjustment", -5_000_000, 0)]  # EXPORT: 0 % tax; the December charge waits
    assert db.scalar("SELECT COUNT(*) FROM charges WHERE invoice_id IS NULL") == 1


def test_payments_allocation_balance_and_overdue(db, catalog, tmp_path: Path) -> None:
    account = make_account(db, catalog, 1)
    run_bill(db, catalog, "2026-11", now_ms=T0)
    finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=T0)
    number = db.scalar("SELECT number FROM invoices")
    total = int(db.scalar("SELECT total FROM invoices"))
    assert account_balance(db, account, "2026-12-10")["status"] == "in good standing"
    late = account_balance(db, account, "2026-12-16")
    assert late["status"] == "overdue" and late["overdue_amount"] == total == late["balance"]
    first = add_payment(db, None, 10_000_000, "BANK-1", received="2026-12-16", invoice_number=number, now_ms=T0)
    assert first["allocations"] == [{"invoice": number, "amount": 10_000_000}]
    assert not add_payment(db, account, 10_000_000, "BANK-1", received="2026-12-16", now_ms=T0)["created"]
    with pytest.raises(BillingError, match="already used"):
        add_payment(db, account, 5_000_000, "BANK-1", received="2026-12-16", now_ms=T0)
    rest = add_payment(db, account, total - 10_000_000 + 1_000_000, "BANK-2", received="2026-12-17", now_ms=T0)
    assert rest["unallocated"] == 1_000_000
    paid = account_balance(db, account, "2026-12-20")
    assert paid["status"] == "in good standing" and paid["balance"] == -1_000_000  # in credit


def test_rerating_a_period_produces_adjustments_never_silent_changes(db, catalog, tmp_path: Path) -> None:
    account = make_account(db, catalog, 1)
    prepaid = make_account(db, catalog, 2, payment_type="prepaid")
    mb = 1 << 20
    records = [usage_record("r1", 1, 1, T0 + DAY, octets=100 * mb, amount=1_000_000),
               usage_record("r2", 1, 2, T0 + DAY, octets=50 * mb, amount=500_000),
               usage_record("r3", 1, 1, T0 + DAY + 5, octets=10 * mb, amount=0, allowance=10 * mb)]
    write_cdr_file(tmp_path / "cdr", records)
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)
    run_bill(db, catalog, "2026-11", now_ms=T0)
    finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=T0)
    invoices_before = db.query("SELECT * FROM invoices ORDER BY invoice_id")
    text = DEMO_RATECARD.read_text().replace('version = "2026-11-demo"', 'version = "2026-11-fix"', 1)
    text = text.replace('price = "0.01"', 'price = "0.008"', 1)
    corrected = parse_ratecard(text)
    with pytest.raises(BillingError, match="not finalized"):
        rerate(db, catalog, corrected, "2026-12", today="2026-12-05", now_ms=T0)
    result = rerate(db, catalog, corrected, "2026-11", today="2026-12-05", now_ms=T0)
    assert result["adjustments"] == [{"account_id": account, "rating_group": 100, "amount": -200_000,
                                      "created": True}]
    assert result["prepaid_not_adjusted"] == [{"account_id": prepaid, "rating_group": 100, "amount": -100_000}]
    again = rerate(db, catalog, corrected, "2026-11", today="2026-12-05", now_ms=T0)
    assert not again["adjustments"][0]["created"]
    assert db.query("SELECT * FROM invoices ORDER BY invoice_id") == invoices_before
    run_bill(db, catalog, "2026-12", now_ms=T0)
    assert ("rerating", -200_000) in [(k, a) for k, _, _, _, _, a, *_ in lines_of(db, account, "2026-12")]
