"""The billing commands of `ocs` end to end on a month of CDR files: account import, cdr import, bill run,
finalize, invoice show/list/annex/pdf/credit, payments, reconcile; bad input prints one line, exits 2 and
changes nothing. Runs on SQLite and on PostgreSQL (OCS_BILLING_DATABASE_URL)."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ocs.cli import app
from simulators.wholesale import derive_host_file, read_cdrs, synthesize_month
from tests.test_billing_helpers import DEMO_RATECARD, db_url, imsi, msisdn  # noqa: F401 - fixture


@pytest.fixture
def ocs(db_url, tmp_path: Path):
    runner = CliRunner()
    env = {"OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0", "OCS_BILLING_DATABASE_URL": db_url,
           "COLUMNS": "200"}

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    def js(*args: str):
        return json.loads(invoke(*args, "--json").stdout)

    invoke.json = js
    return invoke


def _month(tmp_path: Path) -> None:
    subs = [(msisdn(n), imsi(n), "demo") for n in range(1, 5)]
    synthesize_month(tmp_path / "cdr", "2026-11", subs, seed=5, days=6)
    with (tmp_path / "accounts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["account_id", "name", "msisdn", "plan", "imsi", "address", "payment_type", "start_date"])
        for n in range(1, 4):
            writer.writerow([f"ACC{n}", f"Kunde {n}", msisdn(n), "demo", imsi(n), f"Weg {n}|10115 Berlin",
                             "prepaid" if n == 3 else "postpaid", "2026-11-01"])


def test_month_to_invoices_payments_and_reconciliation(ocs, tmp_path: Path) -> None:
    _month(tmp_path)
    assert ocs.json("account", "import", str(tmp_path / "accounts.csv")) == {
        "rows": 3, "accounts_created": 3, "subscriptions_created": 3}
    imported = ocs.json("cdr", "import")
    assert imported["inserted"] > 0 and imported["guide"]["rejected"] > 0  # the 4th SIM has no account yet
    assert ocs.json("cdr", "import")["files_unchanged"] == imported["files_imported"]
    assert ocs.json("cdr", "rejects")["by_reason"][0]["reason"] == f"no billing account for MSISDN {msisdn(4)}"
    ocs("account", "add", "ACC4", "--name", "Kunde 4", "--address", "Platz 4")
    ocs("account", "subscribe", "ACC4", msisdn(4), "--plan", "demo", "--from", "2026-11-01", "--imsi", imsi(4))
    assert ocs.json("cdr", "recycle")["rejected"] == 0
    states = ocs.json("cdr", "status")
    cdr_total = sum(r["amount"] for r in read_cdrs(tmp_path / "cdr"))
    assert states == {"guided": {"records": imported["inserted"], "amount": cdr_total}}
    run = ocs.json("bill", "run", "--period", "2026-11")
    assert run["ties_out"] and run["cdr_amount"] == run["usage_lines"] == cdr_total and run["invoices"] == 4
    final = ocs.json("bill", "finalize", "--period", "2026-11", "--issue-date", "2026-12-01")
    assert (final["first_number"], final["last_number"]) == ("DM-0000001", "DM-0000004")
    invoices = ocs.json("invoice", "list", "--period", "2026-11")
    doc = ocs.json("invoice", "show", "DM-0000001")
    assert doc["account"]["name"] == "Kunde 1" and doc["due_date"] == "2026-12-15"
    assert sum(int(round(float(i["usage_amount"]))) for i in invoices) == cdr_total
    annex = tmp_path / "annex.csv"
    assert ocs.json("invoice", "annex", "DM-0000001", "--out", str(annex))["records"] > 0
    usage_lines = sum(int(line["amount"].replace(".", "")) for line in doc["lines"] if line["kind"] == "usage")
    assert sum(int(r["amount"].replace(".", "")) for r in csv.DictReader(annex.open())) == usage_lines
    pdfs = ocs.json("invoice", "pdf", "--period", "2026-11", "--out", str(tmp_path / "pdf"), "--jobs", "2")["files"]
    assert len(pdfs) == 4 and all(Path(p).read_bytes()[:5] == b"%PDF-" for p in pdfs)
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", pdfs[0], "-"], capture_output=True, text=True).stdout
        assert "Invoice DM-0000001" in text and "Kunde 1" in text and f"{doc['total']} EUR" in text
    paid = ocs.json("payment", "add", doc["total"], "--invoice", "DM-0000001", "--ref", "B1", "--date", "2026-12-05")
    assert paid["allocations"] == [{"invoice": "DM-0000001", "amount": int(doc["total"].replace(".", "")) * 10_000}]
    account = ocs.json("account", "show", "ACC1", "--today", "2026-12-20")
    assert account["balance"]["balance"] == 0 and account["balance"]["status"] == "in good standing"
    assert ocs.json("account", "show", "ACC2", "--today", "2026-12-20")["balance"]["status"] == "overdue"
    fee_line = next(line["line"] for line in ocs.json("invoice", "show", "DM-0000002")["lines"]
                    if line["kind"] == "recurring")
    credit = ocs.json("invoice", "credit", "DM-0000002", "--reason", "goodwill", "--line", str(fee_line),
                      "--amount", "0.50")
    assert credit["number"] == "DM-CN-0000001" and credit["subtotal"] == -500_000
    # re-rating with the same prices under a new version (the rating engine, the versions in force): no change
    corrected = tmp_path / "corrected.toml"
    corrected.write_text(DEMO_RATECARD.read_text().replace('version = "2026-11-demo"', 'version = "2026-11-fix"', 1))
    rerated = ocs.json("bill", "rerate", "--period", "2026-11", "--ratecard", str(corrected), "--date", "2026-12-02")
    assert rerated["records"] > 0 and rerated["new_amount"] == rerated["old_amount"] and rerated["adjustments"] == []
    host = tmp_path / "host.csv"
    injected = derive_host_file(read_cdrs(tmp_path / "cdr"), host, drop=1, unknown_sims=1)
    report = ocs.json("reconcile", str(host), "--out", str(tmp_path / "rec"))
    assert sorted(f["kind"] for f in report["findings"]) == sorted(i.kind for i in injected)
    assert all(Path(p).is_file() for p in report["outputs"].values())
    table = ocs("reconcile", str(host), "--out", str(tmp_path / "rec")).stdout
    assert "missing_at_host" in table and "unknown_sim" in table and "leakage" in table


def test_bad_input_is_one_line_exit_2_and_changes_nothing(ocs, tmp_path: Path) -> None:
    _month(tmp_path)
    ocs("account", "import", str(tmp_path / "accounts.csv"))
    before = ocs.json("account", "list")
    cases = [
        ("bill", "run", "--period", "2026-13"),
        ("bill", "finalize", "--period", "2026-11"),
        ("account", "add", "bad id!", "--name", "x"),
        ("account", "add", "ACC9", "--name", "x", "--cycle-day", "31"),
        ("account", "subscribe", "ACC1", msisdn(9), "--plan", "gold"),
        ("account", "subscribe", "ACC2", msisdn(1), "--plan", "demo", "--from", "2026-11-05"),
        ("account", "charge", "ACC1", "1.234", "--description", "x"),
        ("payment", "add", "12", "--ref", "R", "--account", "NOPE"),
        ("payment", "add", "abc", "--ref", "R", "--account", "ACC1"),
        ("invoice", "show", "DM-9"),
        ("cdr", "import", str(tmp_path / "missing")),
        ("reconcile", str(tmp_path / "missing.csv")),
        ("bill", "rerate", "--period", "2026-11", "--ratecard", str(DEMO_RATECARD)),  # not finalized
    ]
    for args in cases:
        result = ocs(*args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert ocs.json("account", "list") == before
    assert ocs.json("cdr", "status") == {}
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("account_id,name,msisdn,plan\nACC7,Seven,491700000007,demo\nACC8,,491700000008,demo\n")
    result = ocs("account", "import", str(bad_csv), ok=False)
    assert result.exit_code == 2 and "bad.csv:3: missing name" in result.output
    assert ocs.json("account", "list") == before  # the good first row was not written either
