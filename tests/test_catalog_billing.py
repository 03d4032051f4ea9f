"""Catalog fees reach billing exactly once: a plan period's fee and an add-on purchase, debited online by the
catalog function (real Valkey), write a fee record to the CDR stream in the same call; the real CDR writer
drains it to files, billing imports it (idempotent), and the bill run puts one line per fee on the account's
next invoice — charged for postpaid, shown as paid for prepaid — with billing's own recurring fee left out for
a subscription on a catalog plan. `ocs audit` matches every fee record with its ledger entry."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

import csv
from pathlib import Path

import msgspec
import pytest

from balances import keys as k
from balances.model import INITIAL, TERMINATION, ChargeRequest, MsccCharge, Subscriber, Units
from balances.store import BalanceStore
from billing.billrun import finalize, run_bill, run_status
from billing.cdrs import import_cdrs
from billing.documents import invoice_document, render_html, write_usage_annex
from billing.money import tax_of
from ocs import catalog as c
from ocs.audit import audit
from ocs.cdr_writer import CdrWriter
from ratecards import compile_plan, load_ratecard
from tests.test_billing_helpers import (  # noqa: F401 - fixtures
    DAY,
    DEMO_RATECARD,
    T0,
    catalog,
    db,
    db_url,
    make_account,
    msisdn,
    write_cdr_file,
)

EUR = 1_000_000
MB = 1 << 20
DEC1 = T0 + 30 * DAY  # 2026-12-01T00:00:00Z: the second period of a plan started on 1 November
POST, PRE = msisdn(1), msisdn(2)

CATALOG = """\
version = "fees-1"

[plans.travel]
ratecard_plan = "demo"
recurring_fee = "12.34"
period = "month"

  [[plans.travel.allowances]]
  bucket = "travel-data"
  unit = "bytes"
  amount = 1000
  rating_groups = [100]

[addons.data-5gb]
price = "5.00"
plans = ["travel"]

  [[addons.data-5gb.buckets]]
  bucket = "data-5gb"
  unit = "bytes"
  amount = 5000
  rating_groups = [100]
  validity = "30d"
"""


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url)
    yield store
    await store.close()


@pytest.fixture
def product_catalog():
    return c.parse_catalog(CATALOG, source="fees.toml", card=load_ratecard(DEMO_RATECARD))


async def drain(store: BalanceStore, cdr_dir: Path) -> None:
    writer = CdrWriter(store.redis, cdr_dir, range(store.partitions), owner="fees")
    while await writer.drain_once():
        pass
    await writer.close()


async def fee_records(store: BalanceStore, number: str) -> list[dict]:
    location = await store.locate_msisdn(number)
    entries = await store.redis.xrange(k.cdr_key(location.partition))
    records = [msgspec.json.decode(fields[b"r"]) for _, fields in entries]
    return [r for r in records if r["recordType"] == "fee" and r["servedMSISDN"] == number]


def money_of(text: str) -> int:
    units, _, cents = text.partition(".")
    return int(units) * EUR + int(cents.ljust(6, "0"))


async def test_fee_record_is_written_with_the_debit_in_the_cdr_format(store, product_catalog):
    """The exact record: money taken (bucket, bucketUnits), buckets granted, the catalog item and period,
    and a recordId its ledger entry names."""
    await store.provision(Subscriber(msisdn=POST, imsi="262010000000001", plan="demo", kind="postpaid",
                                     credit_limit=100 * EUR), 0, now_ms=T0)
    await c.start_plan(store, product_catalog, POST, "travel", T0)
    [record] = await fee_records(store, POST)
    end = c.period_bounds("month", T0, T0)[1]
    assert record == {
        "recordId": f"fee;{POST};{T0};1", "recordType": "fee", "schemaVersion": 1, "servedMSISDN": POST,
        "servedIMSI": "262010000000001", "recordTime": T0, "feeType": "plan", "item": "travel",
        "ratingPlan": "demo", "periodMode": "start", "periodStart": T0, "periodEnd": end, "amount": 12_340_000,
        "currency": "EUR", "bucket": {"money": 12_340_000}, "bucketUnits": {"money": "money"},
        "granted": {"travel-data": 1000}, "grantedUnits": {"travel-data": "bytes"}, "ledgerType": "renewal",
        "ledgerReference": f"travel;{T0}"}
    location = await store.locate_msisdn(POST)
    [entry] = [fields for _, fields in await store.redis.xrange(k.ledger_key(location.partition))
               if fields[b"type"] == b"renewal"]
    assert entry[b"cdr"].decode() == record["recordId"] and int(entry[b"amount"]) == -12_340_000
    await c.buy_addon(store, product_catalog, POST, "data-5gb", "shop-1", T0 + DAY)
    await c.buy_addon(store, product_catalog, POST, "data-5gb", "shop-1", T0 + DAY)  # duplicate: nothing again
    addon = (await fee_records(store, POST))[1:]
    assert [(r["feeType"], r["item"], r["amount"], r["bucket"], r["purchaseReference"]) for r in addon] == [
        ("addon", "data-5gb", 5 * EUR, {"money": 5 * EUR}, "shop-1")]
    assert (await c.renew(store, product_catalog, POST, T0 + 2 * DAY)).status == "not-due"
    assert len(await fee_records(store, POST)) == 2  # nothing was charged: no record
    report = await audit(store, None)
    assert report.ok and report.fee_records == 2, report.differences


async def _online_month(store: BalanceStore, product_catalog: c.Catalog, cdr_dir: Path) -> int:
    """Postpaid POST and prepaid PRE subscribe to "travel" on 1 November, POST buys an add-on and uses data
    beyond its allowances, both renew on 1 December. Returns the money of POST's usage."""
    await store.provision(Subscriber(msisdn=POST, plan="demo", kind="postpaid", credit_limit=100 * EUR), 0,
                          now_ms=T0)
    await store.provision(Subscriber(msisdn=PRE, plan="demo"), 40 * EUR, now_ms=T0)
    for number in (POST, PRE):
        assert (await c.start_plan(store, product_catalog, number, "travel", T0)).applied
    assert (await c.buy_addon(store, product_catalog, POST, "data-5gb", "order-7", T0 + 3 * DAY)).applied
    data = msgspec.to_builtins(compile_plan(load_ratecard(DEMO_RATECARD), "demo")[100])
    at = await store.locate_msisdn(POST)

    def ccr(rtype: int, number: int, mscc: MsccCharge, now: int, **extra) -> ChargeRequest:
        return ChargeRequest(session_id="pgw;fees;1", request_type=rtype, request_number=number, msisdn=POST,
                             plan=at.plan, partition=at.partition, now_ms=now, msccs=[mscc], origin_host="pgw.test",
                             **extra)

    t = T0 + 5 * DAY
    await store.charge(ccr(INITIAL, 0, MsccCharge(100, data, requested=True), t))
    await store.charge(ccr(TERMINATION, 1, MsccCharge(100, data, used=Units(total=3 * MB)), t + 60_000,
                           termination_cause=1))
    for number in (POST, PRE):
        assert (await c.renew(store, product_catalog, number, DEC1)).status == "renew"
        assert (await c.renew(store, product_catalog, number, DEC1 + 1000)).status == "not-due"  # once
    usage = 0
    location = await store.locate_msisdn(POST)
    for _, fields in await store.redis.xrange(k.cdr_key(location.partition)):
        record = msgspec.json.decode(fields[b"r"])
        if record["recordType"] == "usage" and record["servedMSISDN"] == POST:
            usage += record["amount"]
    await drain(store, cdr_dir)
    return usage


async def test_plan_and_addon_fees_are_invoiced_once_and_the_audit_is_exact(store, product_catalog, db, catalog,
                                                                            tmp_path: Path):
    cdr_dir = tmp_path / "cdr"
    usage = await _online_month(store, product_catalog, cdr_dir)
    assert usage > 0
    report = await audit(store, cdr_dir)
    assert report.ok and report.fee_records == 5 and report.cdr_records >= 1, report.differences

    post = make_account(db, catalog, 1, payment_type="postpaid")
    pre = make_account(db, catalog, 2, payment_type="prepaid")
    imported = import_cdrs(db, cdr_dir, now_ms=DEC1 + DAY, catalog=catalog)
    assert (imported.errors, imported.guide.rejected) == ([], 0)
    assert import_cdrs(db, cdr_dir, now_ms=DEC1 + DAY, rescan=True, catalog=catalog).inserted == 0

    def invoice_of(account: str, period: str) -> dict:
        invoice_id = int(db.scalar("SELECT i.invoice_id FROM invoices i JOIN bill_runs r ON r.run_id = i.run_id "
                                   "WHERE i.account_id = ? AND r.period = ?", (account, period)))
        return invoice_document(db, catalog, invoice_id)

    run = run_bill(db, catalog, "2026-11", now_ms=DEC1 + DAY)
    assert run["ties_out"] and run["fee_amount"] == run["fee_lines"] == 2 * 12_340_000 + 5 * EUR
    rate = catalog.tax_rate("DE", "telecom")
    november = invoice_of(post, "2026-11")
    fees = [(line["description"], line["amount"], line["charged"], line["period_from"], line["period_to"])
            for line in november["lines"] if line["kind"] == "fee"]
    assert fees == [(f"Plan travel, 2026-11 ({POST})", "12.34", True, "2026-11-01", "2026-12-01"),
                    (f"Add-on data-5gb ({POST})", "5.00", True, "2026-11-04", None)]
    assert not [line for line in november["lines"] if line["kind"].startswith("recurring")]  # the catalog's plan
    charged = [12_340_000, 5 * EUR, usage]
    subtotal = sum(charged)
    tax = sum(tax_of(amount, rate, catalog.minor, catalog.config.tax_rounding) for amount in charged)
    assert (money_of(november["subtotal"]), money_of(november["tax_total"]), money_of(november["total"])) == (
        subtotal, tax, subtotal + tax)
    prepaid = invoice_of(pre, "2026-11")
    assert [(line["description"], line["amount"], line["charged"]) for line in prepaid["lines"]] == [
        (f"Plan travel, 2026-11 ({PRE}, prepaid, paid from balance)", "12.34", False)]
    assert prepaid["total"] == "0.00"
    assert "Plan travel, 2026-11" in render_html(november)
    annex = tmp_path / "annex.csv"
    assert write_usage_annex(db, catalog, november["invoice_id"], annex) == 3  # usage, plan fee, add-on
    rows = list(csv.DictReader(annex.open()))
    assert [(r["type"], r["description"], r["amount"]) for r in rows if r["type"] == "fee"] == [
        ("fee", "Plan travel, 2026-11", "12.34"), ("fee", "Add-on data-5gb", "5.00")]

    again = run_bill(db, catalog, "2026-11", now_ms=DEC1 + 2 * DAY)  # a draft rebuilt: the same invoice
    assert again["total"] == run["total"] and invoice_of(post, "2026-11")["lines"] == november["lines"]
    finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=DEC1 + 2 * DAY)
    assert import_cdrs(db, cdr_dir, now_ms=DEC1 + 3 * DAY, rescan=True, catalog=catalog).inserted == 0

    december = run_bill(db, catalog, "2026-12", now_ms=DEC1 + 31 * DAY)
    assert december["ties_out"] and december["fee_amount"] == 2 * 12_340_000
    lines = invoice_of(post, "2026-12")["lines"]
    assert [(line["kind"], line["description"], line["amount"]) for line in lines] == [
        ("fee", f"Plan travel, 2026-12 ({POST})", "12.34")]
    assert db.scalar("SELECT COUNT(*) FROM invoice_lines WHERE kind = 'fee'") == 5  # each fee record once
    assert db.scalar("SELECT COUNT(*) FROM usage_records WHERE record_type = 'fee' AND state = 'billed'") == 5
    assert run_status(db, "2026-11")["ties_out"]
    report = await audit(store, cdr_dir)
    assert report.ok and report.fee_records == 5, report.differences


async def test_audit_finds_a_lost_or_altered_fee_record(store, product_catalog, tmp_path: Path):
    cdr_dir = tmp_path / "cdr"
    await store.provision(Subscriber(msisdn=PRE, plan="demo"), 40 * EUR, now_ms=T0)
    await c.start_plan(store, product_catalog, PRE, "travel", T0)
    await c.buy_addon(store, product_catalog, PRE, "data-5gb", "order-1", T0 + DAY)
    await drain(store, cdr_dir)
    assert (await audit(store, cdr_dir)).ok
    [path] = list(cdr_dir.glob("p*/*.jsonl"))
    lines = path.read_bytes().splitlines(keepends=True)
    altered = [line.replace(b'"amount":5000000', b'"amount":4000000') for line in lines]
    path.write_bytes(b"".join(altered))
    report = await audit(store, cdr_dir)
    assert [(d.kind, d.expected, d.actual) for d in report.differences] == [("cdr-mismatch", -5 * EUR, -4 * EUR)]
    path.write_bytes(b"".join(line for line in lines if b'"feeType":"addon"' not in line))
    report = await audit(store, cdr_dir)
    assert [d.kind for d in report.differences] == ["cdr-missing"]


def fee_record(n: int, at_ms: int, amount: int, *, fee_type: str = "plan", item: str = "travel",
               start: int | None = None, end: int | None = None, seq: int = 1) -> dict:
    """A fee record shaped as lua/catalog.lua writes it."""
    record = {"recordId": f"fee;{msisdn(n)};{at_ms};{seq}", "recordType": "fee", "schemaVersion": 1,
              "servedMSISDN": msisdn(n), "recordTime": at_ms, "feeType": fee_type, "item": item}
    if fee_type == "plan":
        record.update({"ratingPlan": "demo", "periodMode": "start", "periodStart": start, "periodEnd": end})
    record.update({"amount": amount, "currency": "EUR", "bucket": {"money": amount} if amount else {},
                   "bucketUnits": {"money": "money"} if amount else {}, "granted": {}, "grantedUnits": {},
                   "ledgerType": "renewal" if fee_type == "plan" else "purchase", "ledgerReference": "x"})
    return record


def test_a_subscription_moving_to_a_catalog_plan_is_credited_billings_own_fee(db, catalog, tmp_path: Path):
    """Billing charges its recurring fee in advance; from the first day of a catalog plan period the fee comes
    from the catalog's records only: the days billed before are credited, no day is paid twice."""
    account = make_account(db, catalog, 3)
    run_bill(db, catalog, "2026-11", now_ms=T0 + DAY)
    finalize(db, catalog, "2026-11", today="2026-11-02", now_ms=T0 + DAY)
    recurring = db.query("SELECT kind, amount, period_from, period_to FROM invoice_lines WHERE kind = 'recurring'")
    assert recurring == [("recurring", 9_990_000, "2026-11-01", "2026-12-01"),
                         ("recurring", 9_990_000, "2026-12-01", "2027-01-01")]
    jan1 = DEC1 + 31 * DAY
    write_cdr_file(tmp_path / "cdr", [fee_record(3, DEC1 + 5000, 12_340_000, start=DEC1, end=jan1)])
    assert import_cdrs(db, tmp_path / "cdr", now_ms=DEC1 + DAY, catalog=catalog).inserted == 1
    run = run_bill(db, catalog, "2026-12", now_ms=DEC1 + 2 * DAY)
    assert run["ties_out"]
    lines = db.query("SELECT l.kind, l.amount, l.period_from, l.period_to, l.description FROM invoice_lines l "
                     "JOIN invoices i ON i.invoice_id = l.invoice_id WHERE i.account_id = ? AND i.period = '2026-12' "
                     "ORDER BY l.line_no", (account,))
    assert lines == [("fee", 12_340_000, "2026-12-01", "2027-01-01", f"Plan travel, 2026-12 ({msisdn(3)})"),
                     ("recurring_credit", -9_990_000, "2026-12-01", "2027-01-01",
                      f"Credit: Demo plan {msisdn(3)}")]


def test_malformed_fee_records_are_reported(db, catalog, tmp_path: Path):
    make_account(db, catalog, 4)
    bad = [fee_record(4, T0 + 1000, 1, fee_type="gift"),
           fee_record(4, T0 + 2000, 1, start=T0 + DAY, end=T0),
           {**fee_record(4, T0 + 3000, 1_000_000, fee_type="addon"), "amount": -1_000_000,
            "bucket": {"money": -1_000_000}},
           fee_record(4, T0 + 4000, 2_000_000, fee_type="addon", item="data-5gb")]
    write_cdr_file(tmp_path / "cdr", bad)
    report = import_cdrs(db, tmp_path / "cdr", now_ms=T0 + DAY, catalog=catalog)
    assert report.inserted == 1 and [(e.line, e.reason.split(" ")[0:3]) for e in report.errors] == [
        (1, ["fee", "record", "with"]), (2, ["plan", "fee", "record"]), (3, ["negative", "amount", "-1000000"])]
