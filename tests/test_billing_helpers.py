"""Shared fixtures and builders for the billing tests (imported by the other test_billing_* modules), and
the tests of billing.money.

Every database test runs twice: on SQLite (a file in tmp_path) and on PostgreSQL when
OCS_TEST_POSTGRES_URL is set (.ci/postgres.sh starts one), each test in a schema of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.accounts import AccountInput, add_account, subscribe
from billing.config import DEMO_BILLING_CONFIG, Catalog
from billing.db import Database, connect
from billing.money import MoneyError, parse_money, prorate, round_ratio, tax_of
from ratecards.pricing import round_to_minor

ROOT = Path(__file__).resolve().parents[1]
DEMO_RATECARD = ROOT / "ocs" / "demo" / "ratecard.toml"
PG_ENV = "OCS_TEST_POSTGRES_URL"
T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DAY = 86_400_000
CENT = 10_000


def postgres_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty billing database URL on each engine."""
    if request.param == "sqlite":
        yield str(tmp_path / "billing.sqlite3")
        return
    base = postgres_url()
    if base is None:
        pytest.skip(f"PostgreSQL variant skipped: {PG_ENV} is not set (.ci/postgres.sh starts a server)")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = connect(db_url)
    yield database
    database.close()


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.load(DEMO_BILLING_CONFIG, DEMO_RATECARD)


# ---- builders ----------------------------------------------------------------------------------------


def msisdn(n: int) -> str:
    return f"4917{n:08d}"


def imsi(n: int) -> str:
    return f"26201{n:010d}"


def make_account(db: Database, catalog: Catalog, n: int, *, plan: str = "demo", start: str = "2026-11-01",
                 payment_type: str = "postpaid", cycle_day: int = 1, jurisdiction: str | None = None,
                 legal_entity: str | None = None) -> str:
    account_id = f"ACC{n:03d}"
    add_account(db, catalog, AccountInput(account_id, f"Customer {n}", [f"Street {n}", "10115 Berlin"],
                                          payment_type=payment_type, cycle_day=cycle_day, jurisdiction=jurisdiction,
                                          legal_entity=legal_entity), now_ms=T0)
    subscribe(db, catalog, account_id, msisdn(n), plan, start, imsi=imsi(n))
    return account_id


def usage_record(session: str, number: int, n: int, at_ms: int, *, rg: int = 100, amount: int = 0,
                 octets: int | None = 1_000_000, seconds: int | None = None, units: int | None = None,
                 record_type: str = "usage", allowance: int = 0, charging_id: str | None = None,
                 currency: str = "EUR", opened: int | None = None, bucket: dict[str, int] | None = None,
                 context: dict | None = None, version: str = "2026-11-demo", **tail) -> dict:
    """A CDR record shaped exactly as balances/lua writes it (key order and types). `bucket` replaces the
    default map (allowance "data", then "money"); `context` adds session members (servingNodePLMN,
    serviceContextId, ...) and `tail` members after ratingVersion (tariff, tariffParts)."""
    usage = {}
    if seconds is not None:
        usage["time"] = seconds
    if octets is not None and rg == 100:
        usage["octetsTotal"] = octets
    if units is not None:
        usage["units"] = units
    if bucket is None:
        bucket = {}
        if allowance:
            bucket["data"] = allowance
        if amount:
            bucket["money"] = amount
    record = {"recordId": f"{session};{number};{rg}", "recordType": record_type, "schemaVersion": 1,
              "servedMSISDN": msisdn(n), "servedIMSI": imsi(n), "sessionId": session, "originHost": "gw.test"}
    if charging_id is not None:
        record["chargingID"] = charging_id
    record.update(context or {})
    record.update({"recordOpeningTime": opened if opened is not None else at_ms, "ccRequestNumber": number,
                   "recordTime": at_ms, "ratingGroup": rg, "usage": usage, "amount": amount, "currency": currency,
                   "bucket": bucket, "ratingVersion": version})
    record.update(tail)
    return record


def close_record(session: str, number: int, n: int, at_ms: int) -> dict:
    return {"recordId": f"{session};{number};close", "recordType": "close", "schemaVersion": 1,
            "servedMSISDN": msisdn(n), "servedIMSI": imsi(n), "sessionId": session, "originHost": "gw.test",
            "recordOpeningTime": at_ms, "ccRequestNumber": number, "recordTime": at_ms,
            "causeForRecClosing": "normalRelease", "amount": 0, "currency": "EUR"}


def write_cdr_file(directory: Path, records: list[dict], *, partition: int = 0, name: str | None = None,
                   sealed: bool = True, extra_lines: list[bytes] | None = None) -> Path:
    """Write records as the CDR writer does (plus streamId); `extra_lines` are appended raw."""
    folder = directory / f"p{partition:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(records):
        line = dict(record)
        line["streamId"] = f"{record['recordTime']}-{i}"
        lines.append(msgspec.json.encode(line) + b"\n")
    lines.extend(extra_lines or [])
    file_name = name or f"cdr-p{partition:03d}-20261101T000000-{len(list(folder.iterdir()))}_0.jsonl"
    path = folder / (file_name + ("" if sealed else ".open"))
    path.write_bytes(b"".join(lines))
    return path


# ---- billing.money -----------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from([1, 10, 100, 10_000, 1_000_000]),
       st.sampled_from(["up", "half-up", "half-even", "down"]))
def test_round_ratio_agrees_with_the_rate_card_rounding(amount: int, minor: int, mode: str) -> None:
    assert round_ratio(amount, 1, minor, mode) == round_to_minor(amount, minor, mode)
    assert round_ratio(-amount, 1, minor, mode) == -round_to_minor(amount, minor, mode)


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=28, max_value=31),
       st.lists(st.integers(min_value=0, max_value=31), min_size=0, max_size=5))
def test_prorated_parts_of_a_cycle_add_up_to_the_fee(fee_minor: int, days: int, cuts: list[int]) -> None:
    fee = fee_minor * CENT
    points = sorted({0, days, *(c for c in cuts if c <= days)})
    parts = [prorate(fee, a, b, days, CENT, "half-up") for a, b in zip(points, points[1:], strict=False)]
    assert sum(parts) == fee
    assert all(p % CENT == 0 for p in parts)


def test_tax_is_rounded_once_per_line_and_symmetric_for_credits() -> None:
    from fractions import Fraction

    rate = Fraction(19, 100)
    assert tax_of(13_000_000, rate, CENT, "half-up") == 2_470_000
    assert tax_of(50_000, rate, CENT, "half-up") == 10_000  # 0.0095 → 0.01
    assert tax_of(-50_000, rate, CENT, "half-up") == -10_000


def test_amounts_are_parsed_exactly_or_refused() -> None:
    assert parse_money("9.99", 2) == 9_990_000
    assert parse_money("-1.50", 2, allow_negative=True) == -1_500_000
    for bad in ("9.999", "abc", "NaN", "0", "-1"):
        with pytest.raises(MoneyError):
            parse_money(bad, 2)
    with pytest.raises(MoneyError):
        parse_money(9.99, 2)  # type: ignore[arg-type]


def test_the_demo_catalog_joins_billing_config_and_rate_card(catalog: Catalog) -> None:
    assert catalog.currency == "EUR" and catalog.minor == CENT
    assert catalog.plan_fees["demo"] == 9_990_000
    assert catalog.unit_of(200) == "seconds" and catalog.service_name(300) == "sms"
    assert str(catalog.tax_rate("DE", "telecom")) == "19/100"
    assert str(catalog.tax_rate("EXPORT", "anything")) == "0"
