"""Benchmark: a bill run of 100k accounts (draft + finalize), with the CDR import that feeds it.

    .venv/bin/python benchmarks/bill_run.py --accounts 100000 --records 10 [--db postgresql://...]

Creates the accounts and subscriptions with bulk SQL (the per-account CLI path is not what is measured),
writes `--records` usage records per account as CDR files in the CDR writer's format (one month, data, voice
and SMS amounts), then times: import + guiding, the bill run (draft), a second bill run (rebuild, idempotent),
finalization (gapless numbering), and checks the tie-out. PDF rendering is separate (`ocs invoice pdf
--jobs N`) and is timed for a sample of invoices only.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import msgspec

from billing.billrun import finalize, run_bill
from billing.cdrs import import_cdrs
from billing.config import DEMO_BILLING_CONFIG, Catalog
from billing.db import connect

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DAY = 86_400_000


def write_cdrs(directory: Path, accounts: int, per_account: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    total = records = 0
    per_file = 100_000
    buffer: list[bytes] = []
    files = 0

    def flush() -> None:
        nonlocal buffer, files
        if buffer:
            folder = directory / f"p{files % 16:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"cdr-p{files % 16:03d}-20261101T000000-{files}_0.jsonl").write_bytes(b"".join(buffer))
            files += 1
            buffer = []

    for a in range(accounts):
        msisdn, imsi = f"49170{a:07d}", f"26201{a:010d}"
        for r in range(per_account):
            at = T0 + rng.randrange(0, 30 * DAY)
            rg = (100, 100, 200, 300)[r % 4]
            amount = rng.randrange(0, 200) * 10_000
            usage = {100: {"octetsTotal": rng.randrange(1, 50_000_000)}, 200: {"time": rng.randrange(1, 900)},
                     300: {"units": 1}}[rg]
            sid = f"bench;{a};{r}"
            buffer.append(encode({
                "recordId": f"{sid};1;{rg}", "recordType": "usage" if rg != 300 else "event", "schemaVersion": 1,
                "servedMSISDN": msisdn, "servedIMSI": imsi, "sessionId": sid, "originHost": "bench",
                "recordOpeningTime": at, "ccRequestNumber": 1, "recordTime": at, "ratingGroup": rg, "usage": usage,
                "amount": amount, "currency": "EUR", "bucket": {"money": amount} if amount else {},
                "ratingVersion": "2026-11-demo", "streamId": f"{at}-{r}"}) + b"\n")
            total += amount
            records += 1
            if len(buffer) >= per_file:
                flush()
    flush()
    return records, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--records", type=int, default=10, help="usage records per account")
    parser.add_argument("--db", default=None, help="database URL (default: a SQLite file in a temp dir)")
    parser.add_argument("--pdfs", type=int, default=20, help="invoices to render as a PDF sample")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bill-bench-"))
    catalog = Catalog.load(DEMO_BILLING_CONFIG, ROOT / "ocs" / "demo" / "ratecard.toml")
    db = connect(args.db or str(work / "billing.sqlite3"))
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        print(f"{name:<28} {timings[name]:8.2f} s", flush=True)
        return result

    def setup() -> None:
        with db.transaction():
            db.executemany("INSERT INTO accounts (account_id, name, address, email, legal_entity, jurisdiction, "
                           "cycle_day, payment_type, currency, status, created_at) VALUES (?, ?, ?, '', 'demo', 'DE', "
                           "1, ?, 'EUR', 'active', ?)",
                           [(f"A{a:07d}", f"Customer {a}", f"Street {a}\n10115 Berlin",
                             "prepaid" if a % 5 == 0 else "postpaid", T0) for a in range(args.accounts)])
            db.executemany("INSERT INTO subscriptions (subscription_id, account_id, msisdn, imsi, plan, start_date, "
                           "end_date) VALUES (?, ?, ?, ?, ?, '2026-11-01', NULL)",
                           [(a + 1, f"A{a:07d}", f"49170{a:07d}", f"26201{a:010d}",
                             "demo-plus" if a % 7 == 0 else "demo") for a in range(args.accounts)])
            db.next_ids("subscription", args.accounts)

    timed("accounts + subscriptions", setup)
    records, total = timed("write CDR files", lambda: write_cdrs(work / "cdr", args.accounts, args.records, args.seed))
    report = timed("import + guide", lambda: import_cdrs(db, work / "cdr", now_ms=T0 + 31 * DAY))
    assert report.inserted == records and report.guide.rejected == 0
    run = timed("bill run (draft)", lambda: run_bill(db, catalog, "2026-11", now_ms=T0 + 31 * DAY))
    timed("bill run again (rebuild)", lambda: run_bill(db, catalog, "2026-11", now_ms=T0 + 31 * DAY))
    final = timed("finalize (numbering)", lambda: finalize(db, catalog, "2026-11", today="2026-12-01",
                                                           now_ms=T0 + 31 * DAY))
    assert run["ties_out"] and final["cdr_amount"] == final["usage_lines"] == total, final
    if args.pdfs:
        from billing.documents import invoice_document, render_pdf

        ids = [int(r[0]) for r in db.query("SELECT invoice_id FROM invoices ORDER BY invoice_id LIMIT ?",
                                           (args.pdfs,))]
        (work / "pdf").mkdir()
        timed(f"{len(ids)} PDFs (one process)", lambda: [
            render_pdf(invoice_document(db, catalog, i), work / "pdf" / f"{i}.pdf") for i in ids])
    print(f"\n{args.accounts:,} accounts, {records:,} CDRs, {final['invoices']:,} invoices "
          f"({final['first_number']} … {final['last_number']}); ties out: {final['ties_out']}; "
          f"engine {db.dialect}; work dir {work}")


if __name__ == "__main__":
    main()
