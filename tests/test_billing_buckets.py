"""Billing agrees with online charging about buckets and tariffs: each CDR bucket is classified by its real
unit (bonus money, a group's shared '@' buckets, allowances), a postpaid account owes only the money from
invoiced money buckets, and re-rating prices usage with the rating engine online charging uses — tariffs by
time band and roaming zone, Tariff-Time-Change parts, the rate-card versions in force — to the micro-unit.
Handcrafted CDRs have the charge script's exact shape; the last test takes them from real online charging."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from billing.accounts import BillingError
from billing.billrun import finalize, run_bill
from billing.cdrs import import_cdrs
from billing.config import DEMO_BILLING_CONFIG, Catalog, PlanFee, load_billing_config
from billing.documents import invoice_document, write_usage_annex
from billing.rerating import rerate
from ratecards import load_ratecard, parse_ratecard
from tests.test_billing_helpers import (  # noqa: F401 - fixtures
    DAY,
    DEMO_RATECARD,
    ROOT,
    T0,
    close_record,
    db,
    db_url,
    make_account,
    usage_record,
    write_cdr_file,
)

MB = 1 << 20
FULL_RATECARD = ROOT / "examples" / "ratecard-full.toml"
BUCKET_UNITS = {"bonus": "money", "promo-*": "money", "family-data": "bytes"}


def catalog_with(ratecard: Path | str = DEMO_RATECARD, card_text: str | None = None) -> Catalog:
    config = load_billing_config(DEMO_BILLING_CONFIG)
    config = msgspec.structs.replace(config, bucket_units=BUCKET_UNITS,
                                     plans={**config.plans, "full": PlanFee(monthly_fee="5.00", name="Full")})
    card = parse_ratecard(card_text) if card_text is not None else load_ratecard(ratecard)
    return Catalog.build(config, card)


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def records_of(db) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in db.query(
        "SELECT record_id, amount, money_invoiced, money_bonus, money_shared, allowance_units, allowance_shared "
        "FROM usage_records")}


def usage_lines(db, account_id: str, period: str = "2026-11") -> list[tuple]:
    return db.query("SELECT l.description, l.amount, l.charged, l.quantity, l.unit, l.tax_amount FROM invoice_lines l "
                    "JOIN invoices i ON i.invoice_id = l.invoice_id WHERE i.account_id = ? AND i.period = ? "
                    "AND l.kind IN ('usage', 'allowance') ORDER BY l.line_no", (account_id, period))


# ---- import: every bucket by its real unit ------------------------------------------------------------


def test_buckets_are_classified_by_unit_bonus_and_shared_money_included(db, tmp_path: Path) -> None:
    catalog = catalog_with()
    at = T0 + 2 * DAY
    records = [
        usage_record("own", 1, 1, at, amount=100_000, bucket={"data": 1_000, "bonus": 30_000, "money": 70_000}),
        usage_record("grp", 1, 1, at + 1, amount=30_000,
                     bucket={"@family-data": 2_000, "promo-x": 10_000, "@money": 20_000}),
        # a CDR that carries each bucket's unit (the proposed bucketUnits) needs no configuration
        usage_record("carried", 1, 1, at + 2, amount=10_000, bucket={"pack-7": 500_000, "money": 10_000},
                     bucketUnits={"pack-7": "bytes", "money": "money"}),
        usage_record("unknown", 1, 1, at + 3, amount=0, bucket={"mystery": 5}),
        usage_record("wrong", 1, 1, at + 4, amount=20_000, bucket={"bonus": 10_000, "family-data": 10_000}),
        {**usage_record("refund", 1, 1, at + 5, amount=-50_000, record_type="refund",
                        bucket={"money": -50_000})},
    ]
    write_cdr_file(tmp_path / "cdr", records)
    report = import_cdrs(db, tmp_path / "cdr", now_ms=at, catalog=catalog)
    assert report.inserted == 4
    reasons = {e.line: e.reason for e in report.errors}
    assert "bucket 'mystery' has no known unit" in reasons[4]
    assert "money buckets add up to 10000, the record's amount is 20000" in reasons[5]
    # (amount, invoiced, bonus, shared money, allowance units, shared allowance units)
    assert records_of(db) == {
        "own;1;100": (100_000, 70_000, 30_000, 0, 1_000, 0),
        "grp;1;100": (30_000, 20_000, 10_000, 20_000, 2_000, 2_000),
        "carried;1;100": (10_000, 10_000, 0, 0, 500_000, 0),
        "refund;1;100": (-50_000, -50_000, 0, 0, 0, 0),
    }
    stored = db.scalar("SELECT buckets FROM usage_records WHERE record_id = 'grp;1;100'")
    assert msgspec.json.decode(stored) == {"@family-data": [2_000, "bytes"], "promo-x": [10_000, "money"],
                                           "@money": [20_000, "money"]}


def test_a_config_without_the_bucket_is_refused_and_rescan_imports_it_once_fixed(db, tmp_path: Path) -> None:
    config = msgspec.structs.replace(load_billing_config(DEMO_BILLING_CONFIG), bucket_units={})
    plain = Catalog.build(config, load_ratecard(DEMO_RATECARD))  # knows 'money' and the plan's 'data' only
    write_cdr_file(tmp_path / "cdr", [usage_record("b", 1, 1, T0, amount=40_000, bucket={"bonus": 40_000})])
    first = import_cdrs(db, tmp_path / "cdr", now_ms=T0, catalog=plain)
    assert (first.inserted, len(first.errors)) == (0, 1)
    again = import_cdrs(db, tmp_path / "cdr", now_ms=T0 + 1, catalog=catalog_with(), rescan=True)
    assert again.inserted == 1 and records_of(db)["b;1;100"] == (40_000, 0, 40_000, 0, 0, 0)


# ---- bill runs: what a postpaid account owes -------------------------------------------------------------


def test_postpaid_owes_invoiced_money_bonus_is_paid_allowances_are_informational(db, tmp_path: Path) -> None:
    catalog = catalog_with()
    post = make_account(db, catalog, 1)
    pre = make_account(db, catalog, 2, payment_type="prepaid")
    at = T0 + 2 * DAY
    written = [
        usage_record("p1", 1, 1, at, amount=100_000, bucket={"data": 1_000, "bonus": 30_000, "money": 70_000}),
        usage_record("p2", 1, 1, at + 60_000, amount=30_000,
                     bucket={"@family-data": 2_000, "promo-x": 10_000, "@money": 20_000}),
        close_record("p2", 2, 1, at + 60_001),
        usage_record("q1", 1, 2, at, amount=25_000, bucket={"@family-data": 4_000, "bonus": 5_000, "money": 20_000}),
    ]
    write_cdr_file(tmp_path / "cdr", written)
    assert import_cdrs(db, tmp_path / "cdr", now_ms=at, catalog=catalog).errors == []
    run = run_bill(db, catalog, "2026-11", now_ms=at)
    assert run["ties_out"] and run["cdr_amount"] == run["usage_lines"] == 155_000
    assert (run["usage_charged"], run["usage_prepaid"]) == (90_000, 65_000)  # bonus money counts as paid
    assert usage_lines(db, post) == [
        ("Data usage 491700000001 (incl. 0.02 from the group's shared balance)", 90_000, 1, 2 * 1_000_000, "bytes",
         20_000),  # 19 % of 0.09 = 0.0171, rounded once to 0.02
        ("Data usage 491700000001 paid from bonus balance", 40_000, 0, None, None, 0),
        ("Data from allowances 491700000001 (incl. the group's shared allowance)", 0, 0, 3_000, "bytes", 0),
    ]
    assert usage_lines(db, pre) == [
        ("Data usage 491700000002 (prepaid, paid from balance)", 25_000, 0, 1_000_000, "bytes", 0),
        ("Data from allowances 491700000002 (incl. the group's shared allowance)", 0, 0, 4_000, "bytes", 0),
    ]
    invoice_id = int(db.scalar("SELECT invoice_id FROM invoices WHERE account_id = ?", (post,)))
    doc = invoice_document(db, catalog, invoice_id)
    fees = sum(line[1] for line in db.query("SELECT kind, amount FROM invoice_lines WHERE invoice_id = ? "
                                            "AND kind = 'recurring'", (invoice_id,)))
    assert doc["usage_amount"] == "0.13" and doc["prepaid_usage"] == "0.04"
    assert db.one("SELECT subtotal, usage_amount FROM invoices WHERE invoice_id = ?", (invoice_id,)) == (
        fees + 90_000, 130_000)


# ---- re-rating with tariffs -----------------------------------------------------------------------------

# The full example card: data 0.01 EUR/MB at home, night band 22:00-07:00 Berlin 0.005, EU roaming 0.02 (cap
# 3.00 a day), in force since 2026-01-01. November in Berlin is UTC+1.
FULL_TEXT = FULL_RATECARD.read_text()


def tariffed_traffic(tmp_path: Path) -> list[dict]:
    def data(session: str, opened: str, reported: str, octets: int, amount: int, plmn: str, **tail) -> dict:
        bucket = {"money": amount} if amount else {}
        return usage_record(session, 1, 1, utc(reported), amount=amount, octets=octets, opened=utc(opened),
                            bucket=bucket, context={"serviceContextId": "32251@3gpp.org", "servingNodePLMN": plmn},
                            version="2026-12-full", **tail)

    records = [
        # Tuesday 13:00 Berlin at home: 10 MB at 0.01
        data("day", "2026-11-03T12:00:00", "2026-11-03T12:10:00", 10 * MB, 100_000, "26201"),
        # 23:00 Berlin at home: the night band, 10 MB at 0.005
        data("night", "2026-11-03T22:00:00", "2026-11-03T22:10:00", 10 * MB, 50_000, "26201", tariff="night"),
        # roaming in France (208-01, zone eu): 10 MB at 0.02
        data("roam", "2026-11-04T10:00:00", "2026-11-04T10:10:00", 10 * MB, 200_000, "20801", tariff="eu-roaming"),
        # granted at 21:50 Berlin, reported after the 22:00 Tariff-Time-Change: 4 MB at 0.01, 6 MB at 0.005
        data("split", "2026-11-05T20:50:00", "2026-11-05T21:10:00", 10 * MB, 70_000, "26201", tariffParts=[
            {"tariffChangeUsage": "before", "usage": {"octetsTotal": 4 * MB}, "amount": 40_000, "tariff": "",
             "ratingVersion": "2026-12-full"},
            {"tariffChangeUsage": "after", "usage": {"octetsTotal": 6 * MB}, "amount": 30_000, "tariff": "night",
             "ratingVersion": "2026-12-full"}]),
    ]
    write_cdr_file(tmp_path / "cdr", records)
    return records


def corrected_card(version: str, *, night: str = "0.005", eu: str = "0.02") -> str:
    """The full card under another version, with the data night and EU-roaming prices given."""
    text = FULL_TEXT
    for old, new in (('version = "2026-12-full"', f'version = "{version}"'),
                     ('zone = "eu"\n    price = "0.02"', f'zone = "eu"\n    price = "{eu}"'),
                     ('(roaming tariffs come first)\n    price = "0.005"',
                      f'(roaming tariffs come first)\n    price = "{night}"')):
        assert text.count(old) == 1
        text = text.replace(old, new)
    return text


@pytest.fixture
def full_catalog() -> Catalog:
    return catalog_with(FULL_RATECARD)


def test_rerating_prices_each_record_with_its_tariff_at_the_usage_time(db, full_catalog, tmp_path: Path) -> None:
    account = make_account(db, full_catalog, 1, plan="full")
    written = tariffed_traffic(tmp_path)
    import_cdrs(db, tmp_path / "cdr", now_ms=T0 + 6 * DAY, catalog=full_catalog)
    assert run_bill(db, full_catalog, "2026-11", now_ms=T0 + 30 * DAY)["usage_charged"] == 420_000
    finalize(db, full_catalog, "2026-11", today="2026-12-01", now_ms=T0 + 30 * DAY)
    # the same prices under a new version: nothing to correct (a base-price re-rating would find 0.10 + 0.10 +
    # 0.10 + 0.10 instead of 0.10 + 0.05 + 0.20 + 0.07)
    same = parse_ratecard(corrected_card("2026-12-full-same"))
    result = rerate(db, full_catalog, same, "2026-11", today="2026-12-02", now_ms=T0 + 31 * DAY)
    assert (result["records"], result["old_amount"], result["new_amount"]) == (4, 420_000, 420_000)
    assert result["adjustments"] == []
    # the night price 0.005 → 0.004 and EU roaming 0.02 → 0.015: the night record, the split record's part
    # after 22:00 and the roaming record change; the day record does not
    fixed = parse_ratecard(corrected_card("2026-12-full-fix", night="0.004", eu="0.015"))
    result = rerate(db, full_catalog, fixed, "2026-11", today="2026-12-02", now_ms=T0 + 31 * DAY)
    new = 100_000 + 40_000 + 150_000 + (40_000 + 20_000)  # 6 MB at 0.004 = 0.024, rounded once: 0.02
    assert (result["old_amount"], result["new_amount"]) == (sum(r["amount"] for r in written), new)
    assert result["adjustments"] == [{"account_id": account, "rating_group": 100, "amount": new - 420_000,
                                      "created": True}]
    assert rerate(db, full_catalog, fixed, "2026-11", today="2026-12-02",
                  now_ms=T0 + 31 * DAY)["adjustments"][0]["created"] is False  # idempotent
    with pytest.raises(BillingError, match="version 2026-12-full of a card in force"):
        rerate(db, full_catalog, parse_ratecard(FULL_TEXT), "2026-11", today="2026-12-02", now_ms=T0)


def test_rerating_a_later_version_rates_only_the_usage_after_it(db, full_catalog, tmp_path: Path) -> None:
    make_account(db, full_catalog, 1, plan="full")
    tariffed_traffic(tmp_path)
    import_cdrs(db, tmp_path / "cdr", now_ms=T0 + 6 * DAY, catalog=full_catalog)
    run_bill(db, full_catalog, "2026-11", now_ms=T0 + 30 * DAY)
    finalize(db, full_catalog, "2026-11", today="2026-12-01", now_ms=T0 + 30 * DAY)
    # a correction in force from 2026-11-04 00:00 Berlin: the night record of the 3rd keeps the old price
    later = corrected_card("2026-11-04-fix", night="0.004", eu="0.015").replace(
        "effective_from = 2026-01-01T00:00:00", "effective_from = 2026-11-04T00:00:00", 1)
    result = rerate(db, full_catalog, parse_ratecard(later), "2026-11", today="2026-12-02", now_ms=T0,
                    active=[full_catalog.ratecard])
    assert result["new_amount"] == 100_000 + 50_000 + 150_000 + (40_000 + 20_000)


def test_rerating_counts_a_session_scope_over_the_records_of_a_call(db, full_catalog, tmp_path: Path) -> None:
    make_account(db, full_catalog, 1, plan="full")
    opened = utc("2026-11-03T12:00:00")  # a Tuesday, 13:00 Berlin: national voice 0.09/min + 0.05 per call

    def voice(number: int, seconds: int, amount: int) -> dict:
        return usage_record("call", number, 1, opened + 60_000 * number, rg=200, seconds=seconds, octets=None,
                            amount=amount, opened=opened, version="2026-12-full",
                            context={"serviceContextId": "32260@3gpp.org", "servingNodePLMN": "26201"})

    # 90 s: two minutes and the setup fee; 30 s more: still within the second minute of the call, 0.00
    write_cdr_file(tmp_path / "cdr", [voice(1, 90, 230_000), voice(2, 30, 0), close_record("call", 3, 1, opened)])
    import_cdrs(db, tmp_path / "cdr", now_ms=T0 + 6 * DAY, catalog=full_catalog)
    run_bill(db, full_catalog, "2026-11", now_ms=T0 + 30 * DAY)
    finalize(db, full_catalog, "2026-11", today="2026-12-01", now_ms=T0 + 30 * DAY)
    same = parse_ratecard(corrected_card("2026-12-full-same"))
    result = rerate(db, full_catalog, same, "2026-11", today="2026-12-02", now_ms=T0)
    assert (result["records"], result["new_amount"], result["adjustments"]) == (2, 230_000, [])
    dearer = corrected_card("2026-12-full-dearer").replace('setup_fee = "0.05"', 'setup_fee = "0.10"', 1)
    assert rerate(db, full_catalog, parse_ratecard(dearer), "2026-11", today="2026-12-02",
                  now_ms=T0)["new_amount"] == 280_000  # once per call, not per record


@pytest.mark.parametrize("carried", [True, False], ids=["cdr-with-rating-keys-and-time", "older-cdr"])
def test_rerating_uses_the_rating_time_and_keys_the_cdr_carries(db, full_catalog, tmp_path: Path,
                                                                 carried: bool) -> None:
    """ratedAt, ratingPlmn and calledPartyAddress (what the charge script writes) say when and with which keys
    online charging chose each record's schedule, so re-rating with the same prices finds no difference. A CDR
    without them is rated at its derived time with the session's servingNodePLMN and no destination: here
    three records come out wrong that way (a re-grant after 22:00 with no record of its own, a grant after a
    handover, a call to France)."""
    make_account(db, full_catalog, 1, plan="full")

    def record(session: str, number: int, opened: str, reported: str, amount: int, rated: str, *, rg: int = 100,
               plmn: str = "26201", destination: str | None = None, tariff: str = "") -> dict:
        fields: dict = {"ratingPlmn": plmn, "ratedAt": utc(rated)}
        if destination:
            fields["calledPartyAddress"] = destination
        tail = {**({"tariff": tariff} if tariff else {}), **(fields if carried else {})}
        voice = rg == 200
        return usage_record(session, number, 1, utc(reported), rg=rg, amount=amount, opened=utc(opened),
                            octets=None if voice else 10 * MB, seconds=90 if voice else None,
                            bucket={"money": amount}, bucketUnits={"money": "money"}, version="2026-12-full",
                            context={"serviceContextId": "32260@3gpp.org" if voice else "32251@3gpp.org",
                                     "servingNodePLMN": "26201"}, **tail)

    write_cdr_file(tmp_path / "cdr", [
        # opened 21:30 Berlin (day); the CCR-U of 22:05 asked for units only (no record), its night grant
        # priced the 10 MB the CCR-T reported
        record("late", 2, "2026-11-03T20:30:00", "2026-11-03T21:20:00", 50_000, "2026-11-03T21:05:00",
               tariff="night"),
        # at home, then a handover to 208-01 in the CCR-U of 11:10: the next 10 MB were granted in France
        record("handover", 1, "2026-11-04T10:00:00", "2026-11-04T10:10:00", 100_000, "2026-11-04T10:00:00"),
        record("handover", 2, "2026-11-04T10:00:00", "2026-11-04T10:20:00", 200_000, "2026-11-04T10:10:00",
               plmn="20801", tariff="eu-roaming"),
        # 90 s to France: 30/6 at 0.29 a minute with the setup fee
        record("call", 1, "2026-11-03T12:00:00", "2026-11-03T12:02:00", 490_000, "2026-11-03T12:00:00", rg=200,
               destination="tel:+33612345678", tariff="international-eu"),
    ])
    assert import_cdrs(db, tmp_path / "cdr", now_ms=T0 + 6 * DAY, catalog=full_catalog).errors == []
    stored = db.query("SELECT record_id, serving_plmn, destination, rated_at FROM usage_records "
                      "WHERE record_id IN ('handover;2;100', 'call;1;200') ORDER BY record_id")
    if carried:
        assert stored == [("call;1;200", "26201", "tel:+33612345678", utc("2026-11-03T12:00:00")),
                          ("handover;2;100", "20801", None, utc("2026-11-04T10:10:00"))]
    else:
        assert stored == [("call;1;200", "26201", None, None), ("handover;2;100", "26201", None, None)]
    run_bill(db, full_catalog, "2026-11", now_ms=T0 + 30 * DAY)
    finalize(db, full_catalog, "2026-11", today="2026-12-01", now_ms=T0 + 30 * DAY)
    same = parse_ratecard(corrected_card("2026-12-full-same"))
    result = rerate(db, full_catalog, same, "2026-11", today="2026-12-02", now_ms=T0 + 31 * DAY)
    assert result["old_amount"] == 50_000 + 100_000 + 200_000 + 490_000
    if carried:
        assert (result["new_amount"], result["adjustments"]) == (result["old_amount"], [])
    else:  # day price for the late data, home price after the handover, the national price for the call
        assert result["new_amount"] == 100_000 + 100_000 + 100_000 + 230_000


def test_rerating_keeps_bonus_money_paid_and_reports_what_it_would_change(db, tmp_path: Path) -> None:
    catalog = catalog_with()
    account = make_account(db, catalog, 1)
    at = T0 + 2 * DAY
    write_cdr_file(tmp_path / "cdr", [
        usage_record("a", 1, 1, at, amount=100_000, octets=10 * MB, bucket={"bonus": 30_000, "money": 70_000}),
        usage_record("b", 1, 1, at + 1, amount=100_000, octets=10 * MB, bucket={"bonus": 100_000}),
    ])
    import_cdrs(db, tmp_path / "cdr", now_ms=at, catalog=catalog)
    run_bill(db, catalog, "2026-11", now_ms=at)
    finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=at)
    text = DEMO_RATECARD.read_text().replace('version = "2026-11-demo"', 'version = "2026-11-fix"', 1)
    cheaper = parse_ratecard(text.replace('price = "0.01"', 'price = "0.002"', 1))  # 10 MB: 0.10 → 0.02
    result = rerate(db, catalog, cheaper, "2026-11", today="2026-12-02", now_ms=at)
    # a: 0.02 is all covered by the 0.03 of bonus: the invoiced 0.07 is credited, the bonus's 0.01 reported
    # b: all bonus: nothing invoiced before or after, the bonus's 0.08 reported
    assert result["adjustments"] == [{"account_id": account, "rating_group": 100, "amount": -70_000,
                                      "created": True}]
    assert result["bonus_not_adjusted"] == [{"account_id": account, "rating_group": 100, "amount": -90_000}]


# ---- from real online charging ------------------------------------------------------------------------------


async def _charge_with_bonus_and_shared_buckets(valkey_url: str, cdr_dir: Path) -> None:
    from balances.model import (
        INITIAL,
        TERMINATION,
        Bucket,
        ChargeRequest,
        MsccCharge,
        Subscriber,
        Units,
        with_schedule_id,
    )
    from balances.store import BalanceStore
    from ocs.cdr_writer import CdrWriter
    from ratecards import compile_plan
    from tests.test_billing_helpers import imsi, msisdn

    # with its content id, as online charging sends it: the reservation names it, the usage is rated with it
    data = with_schedule_id(msgspec.to_builtins(compile_plan(load_ratecard(DEMO_RATECARD), "demo")[100]))
    store = await BalanceStore.connect(valkey_url)
    try:
        await store.create_group("fam")
        await store.add_group_bucket("fam", Bucket("family-data", "bytes", 3 * MB, services=(100,)), now_ms=T0)
        await store.add_group_bucket("fam", Bucket("money", "money", 30_000, priority=50), now_ms=T0)
        await store.provision(Subscriber(msisdn=msisdn(1), imsi=imsi(1), plan="demo", currency="EUR", kind="postpaid",
                                         credit_limit=10_000_000, group="fam"), 0,
                              buckets=(Bucket("bonus", "money", 50_000, priority=10),), now_ms=T0)
        await store.provision(Subscriber(msisdn=msisdn(2), imsi=imsi(2), plan="demo", currency="EUR", group="fam"),
                              1_000_000, now_ms=T0)
        for n, octets, t in ((2, MB, T0 + DAY), (1, 14 * MB, T0 + 2 * DAY)):
            at = await store.locate_msisdn(msisdn(n))
            sid = f"pgw.test;{n}"

            def ccr(rtype: int, number: int, mscc: MsccCharge, now: int, at=at, sid=sid, **extra) -> ChargeRequest:
                return ChargeRequest(session_id=sid, request_type=rtype, request_number=number, msisdn=at.msisdn,
                                     plan=at.plan, partition=at.partition, now_ms=now, msccs=[mscc],
                                     origin_host="pgw.test", group=at.group, **extra)

            grant = MsccCharge(100, data, requested=True, requested_units=Units(total=octets))
            await store.charge(ccr(INITIAL, 0, grant, t, context={"servedIMSI": imsi(n), "servingNodePLMN": "26201"}))
            await store.charge(ccr(TERMINATION, 1, MsccCharge(100, data, used=Units(total=octets)), t + 60_000,
                                   termination_cause=1))
        writer = CdrWriter(store.redis, cdr_dir, range(store.partitions), owner="billing-buckets")
        while await writer.drain_once():
            pass
        await writer.close()
    finally:
        await store.close()


async def test_real_cdrs_with_bonus_and_shared_buckets_bill_to_the_micro_unit(valkey_url, db, tmp_path: Path) -> None:
    from simulators.wholesale import read_cdrs

    cdr_dir = tmp_path / "cdr"
    await _charge_with_bonus_and_shared_buckets(valkey_url, cdr_dir)
    usage = {r["servedMSISDN"]: r for r in read_cdrs(cdr_dir) if r["recordType"] == "usage"}
    # what the charge script wrote: allowances first (the group's), then money by priority: the bonus (10),
    # the group's money (50), the subscriber's own (100, postpaid: below zero within the credit limit)
    assert usage["491700000001"]["bucket"] == {"@family-data": 2 * MB, "bonus": 50_000, "@money": 30_000,
                                               "money": 40_000}
    assert usage["491700000001"]["amount"] == 120_000  # 12 MB at 0.01
    assert usage["491700000002"]["bucket"] == {"@family-data": MB}
    assert usage["491700000001"]["bucketUnits"] == {"@family-data": "bytes", "bonus": "money", "@money": "money",
                                                    "money": "money"}
    # the CDRs name every bucket's unit: a catalog that knows none of these buckets classifies them alike
    config = msgspec.structs.replace(load_billing_config(DEMO_BILLING_CONFIG), bucket_units={})
    catalog = Catalog.build(config, load_ratecard(DEMO_RATECARD))
    post = make_account(db, catalog, 1)
    pre = make_account(db, catalog, 2, payment_type="prepaid")
    report = import_cdrs(db, cdr_dir, now_ms=T0 + 3 * DAY, catalog=catalog)
    assert report.errors == [] and report.guide.rejected == 0
    # the rating time re-rating uses: the grant's (the CCR-I), from the CDR's ratedAt
    assert db.query("SELECT msisdn, rated_at, record_time FROM usage_records WHERE record_type = 'usage' "
                    "ORDER BY msisdn") == [("491700000001", T0 + 2 * DAY, T0 + 2 * DAY + 60_000),
                                           ("491700000002", T0 + DAY, T0 + DAY + 60_000)]
    run = run_bill(db, catalog, "2026-11", now_ms=T0 + 3 * DAY)
    assert run["ties_out"] and run["cdr_amount"] == run["usage_lines"] == 120_000
    assert (run["usage_charged"], run["usage_prepaid"]) == (70_000, 50_000)
    assert [line[:5] for line in usage_lines(db, post)] == [
        ("Data usage 491700000001 (incl. 0.03 from the group's shared balance)", 70_000, 1, 14 * MB, "bytes"),
        ("Data usage 491700000001 paid from bonus balance", 50_000, 0, None, None),
        ("Data from allowances 491700000001 (incl. the group's shared allowance)", 0, 0, 2 * MB, "bytes"),
    ]
    assert [line[:5] for line in usage_lines(db, pre)] == [
        ("Data usage 491700000002 (prepaid, paid from balance)", 0, 0, MB, "bytes"),
        ("Data from allowances 491700000002 (incl. the group's shared allowance)", 0, 0, MB, "bytes"),
    ]
    invoice_id = int(db.scalar("SELECT invoice_id FROM invoices WHERE account_id = ?", (post,)))
    assert write_usage_annex(db, catalog, invoice_id, tmp_path / "annex.csv") == 1
    [row] = list(csv.DictReader((tmp_path / "annex.csv").open()))
    assert (row["amount"], row["invoiced"], row["bonus"]) == ("0.12", "0.07", "0.05")
    assert row["from_allowance"] == str(2 * MB)
    assert msgspec.json.decode(row["buckets"])["@money"] == [30_000, "money"]
