"""Invoice documents: a JSON document, a CSV usage annex, HTML from billing/templates/invoice.html and PDF.

The JSON document is the one source the other formats are made from; its money values are decimal
strings in the currency (exact, from integer micro-units). PDFs are rendered with WeasyPrint, which is
slow (~0.1–0.3 s a page), so `render_pdfs` runs separately from the bill run, in worker processes that
each open their own database connection. Imports billing and the standard library (WeasyPrint lazily).
"""

from __future__ import annotations

import csv
import html
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from string import Template

from billing.accounts import BillingError
from billing.billrun import fee_description
from billing.config import Catalog
from billing.db import Database, connect

__all__ = ["find_invoice", "invoice_document", "list_invoices", "render_html", "render_pdf", "render_pdfs",
           "write_usage_annex"]

TEMPLATE = Path(__file__).parent / "templates" / "invoice.html"
_SERVICE_LABEL = {"sms": "SMS", "data": "Data", "voice": "Voice"}


def _money(micro: int, digits: int) -> str:
    return f"{Decimal(micro).scaleb(-6):.{digits}f}"


def find_invoice(db: Database, ref: str) -> int:
    """An invoice id from its number (DM-0000001) or its internal id (#17 or 17, for drafts)."""
    row = db.one("SELECT invoice_id FROM invoices WHERE number = ?", (ref,))
    if row is None and ref.lstrip("#").isdigit():
        row = db.one("SELECT invoice_id FROM invoices WHERE invoice_id = ?", (int(ref.lstrip("#")),))
    if row is None:
        raise BillingError(f"unknown invoice {ref}")
    return int(row[0])


def invoice_document(db: Database, catalog: Catalog, invoice_id: int) -> dict:
    """The invoice (or credit note) as a JSON-ready document."""
    rows = db.query_dicts("SELECT * FROM invoices WHERE invoice_id = ?", (invoice_id,))
    if not rows:
        raise BillingError(f"unknown invoice #{invoice_id}")
    inv = rows[0]
    digits = catalog.minor_digits
    account = db.query_dicts("SELECT account_id, name, address, email, payment_type FROM accounts WHERE account_id = ?",
                             (inv["account_id"],))[0]
    entity = catalog.entity(inv["legal_entity"])
    lines = db.query_dicts("SELECT * FROM invoice_lines WHERE invoice_id = ? ORDER BY line_no", (invoice_id,))
    taxes: dict[str, list[int]] = {}
    for line in lines:
        if line["charged"]:
            t = taxes.setdefault(line["tax_rate"], [0, 0])
            t[0] += line["amount"]
            t[1] += line["tax_amount"]
    credited = None
    if inv["credited_invoice_id"] is not None:
        credited = db.scalar("SELECT number FROM invoices WHERE invoice_id = ?", (inv["credited_invoice_id"],))
    return {
        "kind": inv["kind"], "status": inv["status"], "invoice_id": inv["invoice_id"], "number": inv["number"],
        "legal_entity": {"id": inv["legal_entity"], "name": entity.name, "address": entity.address,
                         "vat_id": entity.vat_id, "email": entity.email, "bank": entity.bank, "footer": entity.footer},
        "account": {"id": account["account_id"], "name": account["name"],
                    "address": account["address"].split("\n") if account["address"] else [],
                    "email": account["email"], "payment_type": inv["payment_type"]},
        "period": inv["period"], "cycle_start": inv["cycle_start"], "cycle_end": inv["cycle_end"],
        "fee_end": inv["fee_end"], "issue_date": inv["issue_date"], "due_date": inv["due_date"],
        "currency": inv["currency"], "credits_invoice": credited, "reason": inv["reason"],
        "lines": [{
            "line": line["line_no"], "kind": line["kind"], "description": line["description"],
            "category": line["category"], "msisdn": line["msisdn"], "rating_group": line["rating_group"],
            "quantity": line["quantity"], "unit": line["unit"], "records": line["records"],
            "period_from": line["period_from"], "period_to": line["period_to"],
            "amount": _money(line["amount"], digits), "charged": bool(line["charged"]),
            "tax_rate": line["tax_rate"], "tax": _money(line["tax_amount"], digits),
            "credits_line": line["credited_line_no"]} for line in lines],
        "taxes": [{"rate": rate, "net": _money(net, digits), "tax": _money(tax, digits)}
                  for rate, (net, tax) in sorted(taxes.items())],
        "subtotal": _money(inv["subtotal"], digits), "tax_total": _money(inv["tax_total"], digits),
        "total": _money(inv["total"], digits), "usage_amount": _money(inv["usage_amount"], digits),
        "prepaid_usage": _money(sum(line["amount"] for line in lines if not line["charged"]), digits),
    }


def list_invoices(db: Database, *, account_id: str | None = None, period: str | None = None,
                  status: str | None = None, limit: int = 200) -> list[dict]:
    where, params = [], []
    for column, value in (("account_id", account_id), ("period", period), ("status", status)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    return db.query_dicts(
        "SELECT invoice_id, number, kind, status, account_id, period, issue_date, due_date, subtotal, tax_total, "
        f"total, usage_amount FROM invoices {clause} ORDER BY invoice_id LIMIT ?", (*params, limit))


def write_usage_annex(db: Database, catalog: Catalog, invoice_id: int, out: str | Path) -> int:
    """Every usage and fee record on the invoice as CSV (the annex); returns the number of records written.
    `amount` is the CDR's money amount = `invoiced` (from invoiced money buckets) + `bonus` (from bonus money
    buckets); `buckets` is what the record took from each bucket ('@': the group's) with the bucket's unit; a fee
    record (type "fee") has no service and says what it paid for in `description` ("Plan travel, 2026-12")."""
    digits = catalog.minor_digits
    rows = db.query(
        "SELECT record_id, record_type, msisdn, rating_group, record_time, usage_time, octets_in, octets_out, "
        "octets_total, usage_units, allowance_units, amount, currency, money_invoiced, money_bonus, buckets, "
        "fee_type, fee_item, fee_period_start, fee_period_end "
        "FROM usage_records WHERE invoice_id = ? AND record_type <> 'close' ORDER BY msisdn, record_time, record_id",
        (invoice_id,))
    with Path(out).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["record_id", "type", "msisdn", "service", "rating_group", "time_utc", "seconds", "octets_in",
                         "octets_out", "octets_total", "events", "from_allowance", "amount", "currency", "invoiced",
                         "bonus", "buckets", "description"])
        for (rid, rtype, msisdn, rg, at, seconds, o_in, o_out, o_total, units, allowance, amount, currency, invoiced,
             bonus, buckets, fee_type, fee_item, fee_start, fee_end) in rows:
            when = datetime.fromtimestamp(at / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            fee = rtype == "fee"
            writer.writerow([rid, rtype, msisdn, "" if fee else catalog.service_name(rg), _blank(rg), when,
                             _blank(seconds), _blank(o_in), _blank(o_out), _blank(o_total), _blank(units), allowance,
                             _money(amount, digits), currency, _money(invoiced, digits), _money(bonus, digits),
                             buckets or "", fee_description(fee_type, fee_item, fee_start, fee_end) if fee else ""])
    return len(rows)


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)


# ---- HTML and PDF ------------------------------------------------------------------------------------


def _quantity(line: dict) -> str:
    q, unit = line["quantity"], line["unit"]
    if q is None:
        return ""
    if unit == "bytes":
        return f"{Decimal(q) / Decimal(1 << 20):,.2f} MB"
    if unit == "seconds":
        return f"{q // 60:,} min {q % 60:02d} s"
    if unit == "events":
        return f"{q:,} {'SMS' if line['rating_group'] == 300 else 'events'}" if line["rating_group"] else f"{q:,}"
    if unit == "days":
        return f"{q} day{'s' if q != 1 else ''}"
    return f"{q:,} {unit}"


def _span(first: str | None, end: str | None, *, exclusive: bool) -> str:
    if not first:
        return ""
    last = end
    if end and exclusive:
        last = (date.fromisoformat(end) - timedelta(days=1)).isoformat()
    if not last or last == first:
        return _d(first)
    return f"{_d(first)} – {_d(last)}"


def _d(iso: str) -> str:
    return date.fromisoformat(iso).strftime("%d.%m.%Y")


def render_html(doc: dict) -> str:
    """The document as HTML (the PDF's source)."""
    e = html.escape
    credit = doc["kind"] == "credit_note"
    rows = []
    for line in doc["lines"]:
        exclusive = line["kind"] in ("recurring", "recurring_credit") or (line["kind"] == "fee" and line["period_to"])
        info = not line["charged"]
        rows.append(
            f'<tr class="{"info" if info else ""}"><td>{line["line"]}</td><td>{e(line["description"])}</td>'
            f'<td class="period">{_span(line["period_from"], line["period_to"], exclusive=exclusive)}</td>'
            f'<td class="num">{e(_quantity(line))}</td><td class="num">{line["amount"]}</td>'
            f'<td class="num">{"—" if info else e(_pct(line["tax_rate"]))}</td>'
            f'<td class="num">{"—" if info else line["tax"]}</td></tr>')
    tax_rows = "\n".join(f'  <tr><td>Tax {e(_pct(t["rate"]))} on {t["net"]}</td><td class="num">{t["tax"]} '
                         f'{e(doc["currency"])}</td></tr>' for t in doc["taxes"])
    notes = []
    if Decimal(doc["prepaid_usage"]) != 0:
        notes.append(f'Usage and fees marked in grey ({doc["prepaid_usage"]} {e(doc["currency"])}) were already '
                     "paid from your prepaid or bonus balance and are shown for information only; they are not part "
                     "of the total.")
    if credit:
        notes.append(f"This credit note reduces invoice {e(doc['credits_invoice'] or '')}. "
                     f"Reason: {e(doc['reason'] or '')}")
    entity = doc["legal_entity"]
    payment = ""
    if not credit and Decimal(doc["total"]) > 0:
        payment = (f'<div class="pay">Please pay <strong>{doc["total"]} {e(doc["currency"])}</strong> by '
                   f'<strong>{_d(doc["due_date"]) if doc["due_date"] else "the due date"}</strong> to '
                   f'{e(entity["bank"])}, quoting {e(doc["number"] or "the invoice number")}.</div>')
    number = doc["number"] or f"DRAFT #{doc['invoice_id']}"
    title = ("Credit note " if credit else "Invoice ") + number
    values = {
        "title": e(title), "draft": '<div class="draft">DRAFT</div>' if doc["status"] == "draft" else "",
        "footer": e(entity["footer"] or entity["name"]).replace('"', "'"),
        "entity_name": e(entity["name"]), "entity_address": "<br>".join(e(x) for x in entity["address"]),
        "entity_address_line": e(", ".join(entity["address"])),
        "entity_contact": "<br>".join(e(x) for x in (f"VAT ID {entity['vat_id']}" if entity["vat_id"] else "",
                                                     entity["email"]) if x),
        "customer_name": e(doc["account"]["name"]),
        "customer_address": "<br>".join(e(x) for x in doc["account"]["address"]),
        "number_label": "Credit note no." if credit else "Invoice no.", "number": e(number),
        "issue_date": _d(doc["issue_date"]) if doc["issue_date"] else "(not issued)",
        "due_row": (f'<tr><td>Due date</td><td>{_d(doc["due_date"])}</td></tr>'
                    if doc["due_date"] and not credit else ""),
        "account_id": e(doc["account"]["id"]),
        "period_text": _span(doc["cycle_start"], doc["cycle_end"], exclusive=True) + (
            f"<br>fees in advance to {_d((date.fromisoformat(doc['fee_end']) - timedelta(days=1)).isoformat())}"
            if doc.get("fee_end") else ""),
        "credited_row": f"<tr><td>Credits invoice</td><td>{e(doc['credits_invoice'])}</td></tr>" if credit else "",
        "currency": e(doc["currency"]), "lines": "\n".join(rows), "subtotal": doc["subtotal"], "tax_rows": tax_rows,
        "total_label": "Total credited" if credit else "Total due", "total": doc["total"],
        "notes": "".join(f'<p class="note">{n}</p>' for n in notes), "payment": payment,
    }
    return Template(TEMPLATE.read_text()).substitute(values)


def _pct(rate: str) -> str:
    value = Decimal(rate) * 100
    return f"{value.normalize():f} %"


def render_pdf(doc: dict, out: str | Path) -> Path:
    from weasyprint import HTML

    out = Path(out)
    HTML(string=render_html(doc)).write_pdf(out)
    return out


def _pdf_name(doc: dict) -> str:
    return f"{doc['number'] or 'draft-' + str(doc['invoice_id'])}.pdf"


def _render_worker(args: tuple[str, str, str, list[int], str]) -> list[str]:
    url, billing_config, ratecard, ids, out_dir = args
    catalog = Catalog.load(billing_config, ratecard)
    out = []
    with connect(url, migrate=False) as db:
        for invoice_id in ids:
            doc = invoice_document(db, catalog, invoice_id)
            out.append(str(render_pdf(doc, Path(out_dir) / _pdf_name(doc))))
    return out


def render_pdfs(url: str, billing_config: str, ratecard: str, invoice_ids: list[int], out_dir: str | Path, *,
                jobs: int = 1, progress=None) -> list[str]:
    """Render many invoices to PDF files in `out_dir`, in `jobs` processes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = [invoice_ids[i:i + 20] for i in range(0, len(invoice_ids), 20)]
    tasks = [(url, billing_config, ratecard, chunk, str(out_dir)) for chunk in chunks]
    written: list[str] = []
    if jobs <= 1:
        for task in tasks:
            written += _render_worker(task)
            if progress:
                progress(len(written), len(invoice_ids))
        return written
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for paths in pool.map(_render_worker, tasks):
            written += paths
            if progress:
                progress(len(written), len(invoice_ids))
    return written
