"""Reconciliation against a host wholesale file derived from our CDRs by simulators/wholesale.py with
known discrepancies: it must find exactly the injected ones; completeness checks, the configurable
column mapping, bad rows (skipped or the file rejected) and the report files."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from billing.cdrs import import_cdrs
from billing.config import Catalog, load_billing_config
from billing.reconcile import ReconcileError, reconcile, write_chart, write_findings_csv
from simulators.wholesale import derive_host_file, read_cdrs, synthesize_month
from tests.test_billing_helpers import DEMO_RATECARD, T0, catalog, db, db_url, imsi, make_account, msisdn  # noqa: F401


@pytest.fixture
def month(db, catalog, tmp_path: Path) -> list[dict]:
    subs = [(msisdn(n), imsi(n), "demo") for n in range(1, 7)]
    synthesize_month(tmp_path / "cdr", "2026-11", subs, seed=3, days=10)
    for n in range(1, 7):
        make_account(db, catalog, n)
    import_cdrs(db, tmp_path / "cdr", now_ms=T0)
    return read_cdrs(tmp_path / "cdr")


def _found(report: dict) -> list[tuple]:
    return sorted((f["kind"], f["our_key"] if f["our_key"] else f["host_seqs"][0]) for f in report["findings"])


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_reconciliation_finds_exactly_the_injected_discrepancies(db, catalog, month, tmp_path: Path,
                                                                 seed: int) -> None:
    host = tmp_path / "host.csv"
    injected = derive_host_file(month, host, config=catalog.config, seed=seed, drop=3, duplicate=2, shift=3,
                                inflate=3, extra=2, unknown_sims=2)
    report = reconcile(db, catalog, host, now_ms=T0)
    expected = sorted((i.kind, i.our_key if i.our_key else i.host_seq) for i in injected)
    assert len(expected) == 15 and _found(report) == expected
    assert report["completeness"]["complete"], report["completeness"]["issues"]
    summary = report["summary"]
    assert summary["matched"]["items"] > 100
    assert report["totals"]["leakage"] == summary["missing_in_ours"]["host_charge"] + summary["unknown_sim"][
        "host_charge"] > 0
    assert report["totals"]["missing_at_host_value"] > 0
    # a clean file matches everything
    clean = tmp_path / "clean.csv"
    assert derive_host_file(month, clean, config=catalog.config, seed=11) == []
    assert reconcile(db, catalog, clean, now_ms=T0)["findings"] == []


def test_completeness_sequence_gaps_and_trailer(db, catalog, month, tmp_path: Path) -> None:
    host = tmp_path / "host.csv"
    derive_host_file(month, host, config=catalog.config, sequence_gaps=2, wrong_trailer=True)
    issues = reconcile(db, catalog, host, now_ms=T0)["completeness"]["issues"]
    assert len([i for i in issues if i.startswith("sequence gap")]) == 2
    assert any(i.startswith("trailer says") for i in issues)
    lines = host.read_text().splitlines()
    host.write_text("\n".join(lines[:-1]) + "\n")  # no trailer
    assert "no trailer" in " ".join(reconcile(db, catalog, host, now_ms=T0)["completeness"]["issues"])


def test_bad_rows_are_reported_and_skipped_or_reject_the_file(db, catalog, month, tmp_path: Path) -> None:
    host = tmp_path / "host.csv"
    derive_host_file(month, host, config=catalog.config)
    lines = host.read_text().splitlines()
    lines[3] = lines[3].replace("DATA", "FAX", 1).replace("VOICE", "FAX", 1).replace("SMS", "FAX", 1)
    lines[5] = lines[5].rsplit(",", 2)[0] + ",12.3.4,EUR"
    host.write_text("\n".join(lines) + "\n")
    report = reconcile(db, catalog, host, now_ms=T0)
    assert report["completeness"]["malformed"][0].startswith("host.csv:4: unknown service 'FAX'")
    assert report["completeness"]["malformed"][1].startswith("host.csv:6:")
    before = db.scalar("SELECT COUNT(*) FROM reconciliations")
    with pytest.raises(ReconcileError, match="2 bad row"):
        reconcile(db, catalog, host, now_ms=T0, on_error="reject-file")
    assert db.scalar("SELECT COUNT(*) FROM reconciliations") == before


def test_column_mapping_and_time_format_are_configurable(db, month, tmp_path: Path) -> None:
    text = Path(load_billing_config.__globals__["DEMO_BILLING_CONFIG"]).read_text()
    text = text.replace('delimiter = ","', 'delimiter = ";"').replace('time_format = "iso"',
                                                                     'time_format = "epoch_ms"')
    text = text.replace('columns = { seq = "record_seq", start_time = "start_time_utc", charge = "charge_eur" }',
                        'columns = { seq = "SEQ_NO", imsi = "IMSI", start_time = "EVENT_TS", charge = "AMOUNT",'
                        ' bytes_total = "VOL" }')
    path = tmp_path / "billing.toml"
    path.write_text(text)
    cat = Catalog.load(path, DEMO_RATECARD)
    host = tmp_path / "host.csv"
    injected = derive_host_file(month, host, config=cat.config, drop=1)
    header = next(csv.reader(host.open(), delimiter=";"))
    assert {"SEQ_NO", "IMSI", "EVENT_TS", "AMOUNT", "VOL"} <= set(header)
    report = reconcile(db, cat, host, now_ms=T0)
    assert _found(report) == [("missing_at_host", injected[0].our_key)]
    with pytest.raises(ReconcileError, match="header lacks column"):
        reconcile(db, Catalog.load(load_billing_config.__globals__["DEMO_BILLING_CONFIG"], DEMO_RATECARD), host,
                  now_ms=T0)


def test_report_files(db, catalog, month, tmp_path: Path) -> None:
    host = tmp_path / "host.csv"
    derive_host_file(month, host, config=catalog.config, drop=1, inflate=1)
    report = reconcile(db, catalog, host, now_ms=T0)
    write_findings_csv(report, tmp_path / "findings.csv")
    write_chart(report, tmp_path / "chart.png")
    rows = list(csv.DictReader((tmp_path / "findings.csv").open()))
    assert sorted(r["kind"] for r in rows) == ["missing_at_host", "variance"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report)  # JSON-ready
    assert {d["service"] for d in report["daily"]} == {"data", "voice", "sms"}
    assert sum(d["host_charge"] for d in report["daily"]) == report["totals"]["host_charge"]
