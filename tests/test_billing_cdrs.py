"""CDR import into billing: idempotent by record id, sealed files only, malformed lines reported with file
and line (skipped, or the whole file rejected), guiding by MSISDN/IMSI and date, reject queue and recycling,
and the record states received → guided → billed. Runs on SQLite and PostgreSQL."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

from pathlib import Path

from billing.accounts import change_plan
from billing.cdrs import import_cdrs, record_states, recycle, rejects
from tests.test_billing_helpers import (  # noqa: F401 - fixtures
    DAY,
    T0,
    catalog,
    close_record,
    db,
    db_url,
    imsi,
    make_account,
    usage_record,
    write_cdr_file,
)


def _records(n: int, count: int, start: int = T0 + DAY, prefix: str = "s") -> list[dict]:
    return [usage_record(f"{prefix}{n}-{i}", 1, n, start + i * 1000, amount=10_000 * (i + 1)) for i in range(count)]


def _count(db, where: str = "1 = 1") -> int:
    return int(db.scalar(f"SELECT COUNT(*) FROM usage_records WHERE {where}"))


def test_import_is_idempotent_by_record_id(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    cdr = tmp_path / "cdr"
    path = write_cdr_file(cdr, _records(1, 5) + [close_record("s1-0", 2, 1, T0 + DAY + 9000)])
    first = import_cdrs(db, cdr, now_ms=T0)
    assert (first.inserted, first.duplicates, first.files_imported) == (6, 0, 1)
    assert first.amount_inserted == 150_000
    again = import_cdrs(db, cdr, now_ms=T0 + 1)  # same file, same size: not read again
    assert (again.files_unchanged, again.inserted) == (1, 0)
    rescan = import_cdrs(db, cdr, now_ms=T0 + 2, rescan=True)
    assert (rescan.inserted, rescan.duplicates) == (0, 6)
    copy = write_cdr_file(cdr, [], partition=1, name="copy.jsonl")  # the same records under another name
    copy.write_bytes(path.read_bytes())
    moved = import_cdrs(db, cdr, now_ms=T0 + 3)
    assert (moved.files_imported, moved.inserted, moved.duplicates) == (1, 0, 6)
    assert _count(db) == 6
    assert record_states(db) == {"guided": {"records": 6, "amount": 150_000}}


def test_open_files_are_skipped_until_sealed(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    cdr = tmp_path / "cdr"
    open_path = write_cdr_file(cdr, _records(1, 3), sealed=False)
    report = import_cdrs(db, cdr, now_ms=T0)
    assert (report.files_open, report.inserted) == (1, 0)
    open_path.rename(open_path.with_suffix(""))  # the writer seals it
    assert import_cdrs(db, cdr, now_ms=T0).inserted == 3


def test_malformed_lines_are_reported_and_skipped(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    cdr = tmp_path / "cdr"
    bad = [b'{"recordId": "x", "recordType": "usage"\n',  # torn JSON
           b'{"recordId":"a;1;100","recordType":"usage","recordTime":1793577600000,"amount":1.5,"currency":"EUR",'
           b'"servedMSISDN":"491700000001","ratingGroup":100}\n',  # a float amount
           b'{"recordType":"UNDECODABLE","raw":{"r":"??"},"streamId":"1-0"}\n',
           b'{"recordId":"b;1;100","recordType":"bonus","recordTime":1793577600000,"amount":0,"currency":"EUR",'
           b'"servedMSISDN":"491700000001","ratingGroup":100}\n']
    write_cdr_file(cdr, _records(1, 2), extra_lines=bad, name="mixed.jsonl")
    report = import_cdrs(db, cdr, now_ms=T0)
    assert report.inserted == 2
    assert [(e.file, e.line) for e in report.errors] == [("p000/mixed.jsonl", n) for n in (3, 4, 5, 6)]
    reasons = [e.reason for e in report.errors]
    assert reasons[0].startswith("invalid JSON")
    assert "Expected `int`, got `float`" in reasons[1] and "$.amount" in reasons[1]
    assert "UNDECODABLE" in reasons[2]
    assert "unknown recordType 'bonus'" in reasons[3]
    assert int(db.scalar("SELECT COUNT(*) FROM import_errors")) == 4


def test_reject_file_imports_nothing_from_a_file_with_a_bad_line(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    cdr = tmp_path / "cdr"
    write_cdr_file(cdr, _records(1, 2), name="good.jsonl")
    bad = write_cdr_file(cdr, _records(1, 3, prefix="t"), extra_lines=[b"not json\n"], name="bad.jsonl")
    report = import_cdrs(db, cdr, now_ms=T0, on_error="reject-file")
    assert report.files_rejected == ["p000/bad.jsonl"] and report.inserted == 2
    assert _count(db) == 2
    assert str(report.errors[0]).startswith("p000/bad.jsonl:4: invalid JSON")
    bad.write_bytes(bad.read_bytes().replace(b"not json\n", b""))
    assert import_cdrs(db, cdr, now_ms=T0, on_error="reject-file").inserted == 3  # fixed: tried again


def test_guiding_by_msisdn_imsi_and_date_reject_and_recycle(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1, start="2026-11-10")
    cdr = tmp_path / "cdr"
    before = usage_record("early", 1, 1, T0 + 2 * DAY, amount=10_000)  # 2026-11-03: before the subscription
    inside = usage_record("inside", 1, 1, T0 + 12 * DAY, amount=20_000)
    unknown = usage_record("stranger", 1, 2, T0 + 12 * DAY, amount=30_000)
    imsi_only = usage_record("imsi-only", 1, 1, T0 + 13 * DAY, amount=40_000)
    del imsi_only["servedMSISDN"]
    dollars = usage_record("usd", 1, 1, T0 + 14 * DAY, amount=50_000, currency="USD")
    write_cdr_file(cdr, [before, inside, unknown, imsi_only, dollars])
    report = import_cdrs(db, cdr, now_ms=T0)
    assert (report.guide.guided, report.guide.rejected) == (2, 3)
    queue = rejects(db)
    assert {r["reason"]: r["records"] for r in queue["by_reason"]} == {
        "MSISDN 491700000001 has no subscription on 2026-11-03": 1,
        "no billing account for MSISDN 491700000002": 1,
        "currency USD differs from the account's": 1}
    assert db.scalar("SELECT account_id FROM usage_records WHERE record_id = 'imsi-only;1;100'") == "ACC001"
    # the missing account arrives: recycling guides what it now can, the rest stays in the queue
    make_account(db, catalog, 2)
    result = recycle(db)
    assert (result.guided, result.rejected) == (1, 2)
    assert record_states(db)["guided"]["records"] == 3
    assert recycle(db, reason_contains="no subscription").rejected == 1


def test_records_are_guided_to_the_subscription_of_their_date(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    change_plan(db, catalog, "491700000001", "demo-plus", "2026-11-15")
    cdr = tmp_path / "cdr"
    write_cdr_file(cdr, [usage_record("a", 1, 1, T0 + 5 * DAY), usage_record("b", 1, 1, T0 + 20 * DAY)])
    import_cdrs(db, cdr, now_ms=T0)
    plans = dict(db.query("SELECT u.session_id, s.plan FROM usage_records u JOIN subscriptions s "
                          "ON s.subscription_id = u.subscription_id"))
    assert plans == {"a": "demo", "b": "demo-plus"}
    assert imsi(1) == db.scalar("SELECT imsi FROM usage_records WHERE session_id = 'a'")


def test_received_records_wait_for_guiding(db, catalog, tmp_path: Path) -> None:
    make_account(db, catalog, 1)
    cdr = tmp_path / "cdr"
    write_cdr_file(cdr, _records(1, 2))
    import_cdrs(db, cdr, now_ms=T0, guide_records=False)
    assert record_states(db) == {"received": {"records": 2, "amount": 30_000}}
    assert recycle(db).guided == 2  # guiding picks up received records too
