"""From real online charging to invoices and reconciliation: a month of data, voice and SMS charged through
BalanceStore (the Lua functions, real Valkey, the time injected day by day), CDR files written by the real
CDR writer, imported, billed, finalized and rendered; a host file derived from those CDRs with injected
discrepancies is reconciled. Totals tie out: CDR charges = billed usage = invoice usage lines."""
# ruff: noqa: F811 - pytest fixtures are imported from tests/test_billing_helpers.py and used as arguments

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import msgspec

from balances.model import (
    DIRECT_DEBITING,
    EVENT,
    INITIAL,
    TERMINATION,
    UPDATE,
    ChargeRequest,
    MsccCharge,
    Subscriber,
    Units,
)
from balances.store import BalanceStore
from billing.billrun import finalize, run_bill
from billing.cdrs import import_cdrs
from billing.documents import invoice_document, render_pdf, write_usage_annex
from billing.reconcile import reconcile
from ocs.cdr_writer import CdrWriter
from ratecards import compile_plan, initial_allowances, load_ratecard
from simulators.wholesale import derive_host_file, read_cdrs
from tests.test_billing_helpers import (  # noqa: F401 - fixtures
    DAY,
    DEMO_RATECARD,
    T0,
    catalog,
    db,
    db_url,
    imsi,
    make_account,
    msisdn,
)

SUBSCRIBERS = 4
DAYS = 30
MB = 1 << 20


async def _month_of_traffic(valkey_url: str, cdr_dir: Path) -> None:
    card = load_ratecard(DEMO_RATECARD)
    plan = {rg: msgspec.to_builtins(s) for rg, s in compile_plan(card, "demo").items()}
    store = await BalanceStore.connect(valkey_url)
    try:
        for n in range(1, SUBSCRIBERS + 1):
            await store.provision(Subscriber(msisdn=msisdn(n), imsi=imsi(n), plan="demo", currency="EUR"),
                                  money=200_000_000, allowances=initial_allowances(card, "demo"))
        locations = {n: await store.locate_msisdn(msisdn(n)) for n in range(1, SUBSCRIBERS + 1)}

        def ccr(n: int, sid: str, rtype: int, number: int, msccs: list, now: int, **extra) -> ChargeRequest:
            at = locations[n]
            return ChargeRequest(session_id=sid, request_type=rtype, request_number=number, msisdn=at.msisdn,
                                 plan=at.plan, partition=at.partition, now_ms=now, msccs=msccs,
                                 origin_host="pgw.test", **extra)

        for day in range(DAYS):
            for n in range(1, SUBSCRIBERS + 1):
                t = T0 + day * DAY + n * 3_600_000
                sid = f"pgw.test;{day};{n};d"
                ctx = {"servedIMSI": imsi(n), "chargingID": str(10_000_000 + day * 100 + n)}
                data = plan[100]
                await store.charge(ccr(n, sid, INITIAL, 0, [MsccCharge(100, data, requested=True)], t, context=ctx))
                used = (7 + (day * n) % 23) * MB + day * 1000 + n
                await store.charge(ccr(n, sid, UPDATE, 1, [MsccCharge(100, data, used=Units(total=used),
                                                                      requested=True)], t + 60_000))
                await store.charge(ccr(n, sid, TERMINATION, 2, [MsccCharge(100, data, used=Units(total=used // 3))],
                                       t + 120_000, termination_cause=1))
                if (day + n) % 2 == 0:
                    vid = f"ims.test;{day};{n};v"
                    voice = plan[200]
                    await store.charge(ccr(n, vid, INITIAL, 0, [MsccCharge(200, voice, requested=True)], t + 500_000,
                                           context={"servedIMSI": imsi(n)}))
                    await store.charge(ccr(n, vid, TERMINATION, 1,
                                           [MsccCharge(200, voice, used=Units(time=30 + day * 7 + n))],
                                           t + 700_000, termination_cause=1))
                if (day + n) % 3 == 0:
                    await store.charge(ccr(n, f"smsc.test;{day};{n}", EVENT, 0,
                                           [MsccCharge(300, plan[300], requested_units=Units(units=1))],
                                           t + 900_000, requested_action=DIRECT_DEBITING,
                                           context={"servedIMSI": imsi(n)}))
        writer = CdrWriter(store.redis, cdr_dir, range(store.partitions), owner="e2e", rotate_records=40)
        while await writer.drain_once():
            pass
        await writer.close()
    finally:
        await store.close()


async def test_a_month_from_online_charging_to_invoices_and_reconciliation(valkey_url, db, catalog,
                                                                          tmp_path: Path) -> None:
    cdr_dir = tmp_path / "cdr"
    await _month_of_traffic(valkey_url, cdr_dir)
    cdrs = read_cdrs(cdr_dir)
    assert {r["recordType"] for r in cdrs} == {"usage", "event", "close"}
    cdr_charges = sum(r["amount"] for r in cdrs)
    assert cdr_charges > 0
    for n in range(1, SUBSCRIBERS + 1):
        make_account(db, catalog, n, payment_type="prepaid" if n == SUBSCRIBERS else "postpaid")
    report = import_cdrs(db, cdr_dir, now_ms=T0 + 31 * DAY, catalog=catalog)
    assert (report.inserted, report.errors, report.guide.rejected) == (len(cdrs), [], 0)
    assert import_cdrs(db, cdr_dir, now_ms=T0 + 31 * DAY, rescan=True, catalog=catalog).inserted == 0

    run = run_bill(db, catalog, "2026-11", now_ms=T0 + 31 * DAY)
    assert run["ties_out"] and run["cdr_amount"] == run["usage_lines"] == cdr_charges
    assert run["records_billed"] == len(cdrs)
    final = finalize(db, catalog, "2026-11", today="2026-12-01", now_ms=T0 + 31 * DAY)
    assert final["numbered"] == SUBSCRIBERS
    lines_total = 0
    for n in range(1, SUBSCRIBERS + 1):
        invoice_id = int(db.scalar("SELECT invoice_id FROM invoices WHERE account_id = ?", (f"ACC{n:03d}",)))
        doc = invoice_document(db, catalog, invoice_id)
        mine = sum(r["amount"] for r in cdrs if r["servedMSISDN"] == msisdn(n))
        usage = [line for line in doc["lines"] if line["kind"] == "usage"]
        assert sum(int(line["amount"].replace(".", "")) * 10_000 for line in usage) == mine
        assert all(line["charged"] == (n != SUBSCRIBERS) for line in usage)
        assert write_usage_annex(db, catalog, invoice_id, tmp_path / f"annex{n}.csv") == len(
            [r for r in cdrs if r["servedMSISDN"] == msisdn(n) and r["recordType"] != "close"])
        lines_total += mine
    assert lines_total == cdr_charges

    pdf = render_pdf(invoice_document(db, catalog, int(db.scalar("SELECT MIN(invoice_id) FROM invoices"))),
                     tmp_path / "invoice.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True).stdout
        assert "Invoice DM-0000001" in text and "Voice usage 491700000001" in text and "Total due" in text

    host = tmp_path / "host.csv"
    injected = derive_host_file(cdrs, host, config=catalog.config, seed=5, drop=2, duplicate=1, shift=2, inflate=2,
                                extra=1, unknown_sims=1)
    result = reconcile(db, catalog, host, now_ms=T0 + 32 * DAY)
    found = sorted((f["kind"], f["our_key"] or f["host_seqs"][0]) for f in result["findings"])
    assert found == sorted((i.kind, i.our_key or i.host_seq) for i in injected)
    assert result["completeness"]["complete"]
