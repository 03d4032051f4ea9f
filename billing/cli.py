"""`ocs` sub-commands of the downstream BSS: bill, invoice, payment, account, cdr, reconcile.

`register(app)` adds them to the `ocs` Typer app. Every command takes `--config FILE` (the OCS config: its
data directory holds the CDR files and, by default, the SQLite billing database; its rate card is the
catalog's usage side) and `--json`. The billing catalog is `$OCS_BILLING_CONFIG`, else
`<data_dir>/billing.toml`, else the demo one (billing/demo/billing.toml); the database is
`$OCS_BILLING_DATABASE_URL`, else the catalog's `database_url`, else `<data_dir>/billing.sqlite3`.
Bad input prints one line on stderr, exits 2 and changes nothing.

This is the only billing module that reads the OCS configuration (ocs.config); everything else in
billing/ takes paths and values. Heavy imports happen inside the commands so `ocs --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

ConfigOption = typer.Option(None, "--config", "-c", help="OCS TOML configuration file")
JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables")

bill_app = typer.Typer(no_args_is_help=True, help="Bill runs: draft, finalize, status, re-rate")
invoice_app = typer.Typer(no_args_is_help=True, help="Invoices and credit notes: list, show, pdf, annex, credit")
payment_app = typer.Typer(no_args_is_help=True, help="Payments against invoices")
account_app = typer.Typer(no_args_is_help=True, help="Billing accounts and their subscriptions")
cdr_app = typer.Typer(no_args_is_help=True, help="CDR import into billing, reject queue, recycling")


def register(app: typer.Typer) -> None:
    """Add the billing commands to the `ocs` app."""
    app.add_typer(bill_app, name="bill")
    app.add_typer(invoice_app, name="invoice")
    app.add_typer(payment_app, name="payment")
    app.add_typer(account_app, name="account")
    app.add_typer(cdr_app, name="cdr")
    app.command("reconcile")(reconcile_file)


# ---- plumbing ----------------------------------------------------------------------------------------


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def fail(message: str) -> None:
    _console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def emit_json(value: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


@dataclass
class Billing:
    data_dir: Path
    cdr_dir: Path
    billing_config: str
    ratecard: str
    url: str
    catalog: Any
    db: Any


def _errors() -> tuple[type[BaseException], ...]:
    from billing.accounts import BillingError
    from billing.config import BillingConfigError
    from billing.db import DatabaseError
    from billing.money import MoneyError
    from billing.reconcile import ReconcileError
    from ocs.config import ConfigError
    from ratecards import RateCardError

    return (BillingError, BillingConfigError, DatabaseError, MoneyError, ReconcileError, ConfigError, RateCardError)


@contextmanager
def billing(config: Path | None) -> Iterator[Billing]:
    """The catalog and the database for one command; operator errors become one line and exit 2."""
    errors = _errors()
    try:
        from billing.config import DEMO_BILLING_CONFIG, Catalog
        from billing.db import connect
        from ocs.config import load_config

        cfg = load_config(config)
        data_dir = Path(cfg.data_dir)
        billing_config = os.environ.get("OCS_BILLING_CONFIG") or (
            str(data_dir / "billing.toml") if (data_dir / "billing.toml").is_file() else str(DEMO_BILLING_CONFIG))
        catalog = Catalog.load(billing_config, cfg.charging.ratecard)
        url = (os.environ.get("OCS_BILLING_DATABASE_URL") or catalog.config.database_url
               or str(data_dir / "billing.sqlite3"))
        db = connect(url)
    except errors as exc:
        fail(str(exc))
        raise
    try:
        yield Billing(data_dir, cfg.cdr_directory, billing_config, cfg.charging.ratecard, url, catalog, db)
    except errors as exc:
        fail(str(exc))
    finally:
        db.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def _money(micro: int, b: Billing) -> str:
    from billing.money import format_money

    return format_money(micro, b.catalog.minor_digits)


def _parse_amount(text: str, b: Billing, *, allow_negative: bool = False) -> int:
    from billing.money import parse_money

    return parse_money(text, b.catalog.minor_digits, allow_negative=allow_negative)


def _table(*columns: str):
    from rich.table import Table

    return Table(*columns)


# ---- cdr ---------------------------------------------------------------------------------------------


@cdr_app.command("import")
def cdr_import(
    directory: Path = typer.Argument(None, help="CDR directory (default: the OCS's cdr directory)"),
    on_error: str = typer.Option("skip", "--on-error", help="skip: import a file's good lines; "
                                 "reject-file: import nothing from a file with a bad line"),
    rescan: bool = typer.Option(False, "--rescan", help="Read files already imported again"),
    no_guide: bool = typer.Option(False, "--no-guide", help="Leave records 'received' (guide later)"),
    config: Path = ConfigOption, json: bool = JsonOption,
) -> None:
    """Import sealed CDR files (idempotent by record id) and guide the records to billing accounts."""
    from billing.cdrs import import_cdrs

    if on_error not in ("skip", "reject-file"):
        fail("--on-error must be skip or reject-file")
    with billing(config) as b:
        where = directory or b.cdr_dir
        if not Path(where).is_dir():
            fail(f"CDR directory not found: {where}")
        report = import_cdrs(b.db, where, now_ms=_now_ms(), on_error=on_error, rescan=rescan,
                             guide_records=not no_guide, catalog=b.catalog)
    result = asdict(report)
    result["errors"] = [str(e) for e in report.errors]
    if json:
        emit_json(result)
    else:
        out = _console()
        out.print(f"{report.files_imported} file(s) imported, {report.files_unchanged} unchanged, "
                  f"{report.files_open} still open (skipped): {report.inserted} new record(s), "
                  f"{report.duplicates} already imported")
        if report.guide:
            out.print(f"guided {report.guide.guided}, rejected {report.guide.rejected} {report.guide.reasons or ''}")
        for e in report.errors[:20]:
            out.print(f"[yellow]malformed[/yellow] {e}", highlight=False)
        if len(report.errors) > 20:
            out.print(f"… and {len(report.errors) - 20} more malformed line(s)")
        for name in report.files_rejected:
            out.print(f"[red]rejected file[/red] {name} (nothing imported from it)")
    if report.files_rejected:
        raise typer.Exit(1)


@cdr_app.command("status")
def cdr_status(config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Usage records and amounts per state (received, guided, billed, rejected)."""
    from billing.cdrs import record_states

    with billing(config) as b:
        states = record_states(b.db)
        if json:
            emit_json(states)
            return
        table = _table("state", "records", f"amount ({b.catalog.currency})")
        for state, v in states.items():
            table.add_row(state, f"{v['records']:,}", _money(v["amount"], b))
        _console().print(table)


@cdr_app.command("rejects")
def cdr_rejects(limit: int = typer.Option(20, "--limit"), config: Path = ConfigOption,
                json: bool = JsonOption) -> None:
    """The reject queue: records no account could be found for, with the reason."""
    from billing.cdrs import rejects

    with billing(config) as b:
        queue = rejects(b.db, limit)
        if json:
            emit_json(queue)
            return
        table = _table("reason", "records", f"amount ({b.catalog.currency})")
        for r in queue["by_reason"]:
            table.add_row(r["reason"], str(r["records"]), _money(r["amount"], b))
        _console().print(table)
        _console().print(f"{queue['total']} rejected record(s); `ocs cdr recycle` guides them again")


@cdr_app.command("recycle")
def cdr_recycle(reason: str = typer.Option(None, "--reason", help="Only rejects whose reason contains this"),
                config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Guide rejected records again (after the missing account or subscription was added)."""
    from billing.cdrs import recycle

    with billing(config) as b:
        report = recycle(b.db, reason_contains=reason)
    if json:
        emit_json(asdict(report))
    else:
        _console().print(f"guided {report.guided}, still rejected {report.rejected} {report.reasons or ''}")


# ---- accounts ----------------------------------------------------------------------------------------


@account_app.command("add")
def account_add(
    account_id: str,
    name: str = typer.Option(..., "--name"),
    address: list[str] = typer.Option([], "--address", help="An address line (repeat for more lines)"),
    email: str = typer.Option("", "--email"),
    cycle_day: int = typer.Option(1, "--cycle-day", help="1..28"),
    payment_type: str = typer.Option("postpaid", "--payment-type", help="postpaid | prepaid"),
    legal_entity: str = typer.Option(None, "--legal-entity"),
    jurisdiction: str = typer.Option(None, "--jurisdiction"),
    config: Path = ConfigOption, json: bool = JsonOption,
) -> None:
    """Create a billing account (the same details again change nothing)."""
    from billing.accounts import AccountInput, add_account

    with billing(config) as b:
        result = add_account(b.db, b.catalog, AccountInput(account_id, name, list(address), email, legal_entity,
                                                           jurisdiction, cycle_day, payment_type), now_ms=_now_ms())
    emit_json(result) if json else _console().print(
        f"account {account_id} {'created' if result['created'] else 'exists already (unchanged)'}")


@account_app.command("subscribe")
def account_subscribe(
    account_id: str, msisdn: str,
    plan: str = typer.Option(..., "--plan"),
    start: str = typer.Option(None, "--from", help="First day (YYYY-MM-DD), default today"),
    imsi: str = typer.Option(None, "--imsi"),
    config: Path = ConfigOption, json: bool = JsonOption,
) -> None:
    """Attach an MSISDN to an account on a plan from a date."""
    from billing.accounts import subscribe

    with billing(config) as b:
        result = subscribe(b.db, b.catalog, account_id, msisdn, plan, start or _today(), imsi=imsi)
    emit_json(result) if json else _console().print(f"{msisdn} on {plan} for account {account_id} "
                                                    f"({'new' if result['created'] else 'unchanged'})")


@account_app.command("change-plan")
def account_change_plan(msisdn: str, plan: str, on: str = typer.Option(None, "--from", help="YYYY-MM-DD"),
                        config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Move an MSISDN to another plan from a date; recurring fees are prorated by day."""
    from billing.accounts import change_plan

    with billing(config) as b:
        result = change_plan(b.db, b.catalog, msisdn, plan, on or _today())
    emit_json(result) if json else _console().print(f"{msisdn} on {plan} from {result['from']}")


@account_app.command("end")
def account_end(msisdn: str, on: str = typer.Option(None, "--on", help="First day without the line"),
                config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """End an MSISDN's subscription; unused days billed in advance are credited on the next run."""
    from billing.accounts import end_subscription

    with billing(config) as b:
        result = end_subscription(b.db, msisdn, on or _today())
    emit_json(result) if json else _console().print(f"{msisdn} ends on {result['end_date']}")


@account_app.command("charge")
def account_charge(
    account_id: str, amount: str,
    description: str = typer.Option(..., "--description"),
    kind: str = typer.Option("one_off", "--kind", help="one_off | adjustment (negative = credit)"),
    category: str = typer.Option(None, "--category", help="Tax category (default: the usage category)"),
    on: str = typer.Option(None, "--date"),
    ref: str = typer.Option(None, "--ref", help="Idempotency reference"),
    config: Path = ConfigOption, json: bool = JsonOption,
) -> None:
    """A one-off charge or an adjustment, billed on the next bill run."""
    from billing.accounts import add_charge

    with billing(config) as b:
        micro = _parse_amount(amount, b, allow_negative=kind == "adjustment")
        result = add_charge(b.db, b.catalog, account_id, micro, description, kind=kind, category=category,
                            charge_date=on or _today(), reference=ref, now_ms=_now_ms())
    emit_json(result) if json else _console().print(f"charge {result['charge_id']} "
                                                    f"{'recorded' if result['created'] else 'already recorded'}")


@account_app.command("show")
def account_show(account_id: str, today: str = typer.Option(None, "--today"), config: Path = ConfigOption,
                 json: bool = JsonOption) -> None:
    """An account: details, subscriptions, pending charges, balance and overdue invoices."""
    from billing.accounts import account_balance, get_account

    with billing(config) as b:
        account = get_account(b.db, account_id)
        account["balance"] = account_balance(b.db, account_id, today or _today())
        if json:
            emit_json(account)
            return
        out = _console()
        bal = account["balance"]
        out.print(f"[bold]{account['account_id']}[/bold] {account['name']} ({account['payment_type']}, "
                  f"cycle day {account['cycle_day']}, {account['legal_entity']}/{account['jurisdiction']})")
        for line in account["address"]:
            out.print(f"  {line}")
        table = _table("msisdn", "imsi", "plan", "from", "to")
        for s in account["subscriptions"]:
            table.add_row(s["msisdn"], s["imsi"] or "", s["plan"], s["start_date"], s["end_date"] or "")
        out.print(table)
        out.print(f"billed {_money(bal['billed'], b)}, paid {_money(bal['paid'], b)}, balance "
                  f"[bold]{_money(bal['balance'], b)} {b.catalog.currency}[/bold] — {bal['status']}"
                  + (f" ({len(bal['overdue'])} overdue: {_money(bal['overdue_amount'], b)})" if bal["overdue"] else ""))


@account_app.command("list")
def account_list(limit: int = typer.Option(1000, "--limit"), config: Path = ConfigOption,
                 json: bool = JsonOption) -> None:
    """Billing accounts."""
    from billing.accounts import list_accounts

    with billing(config) as b:
        rows = list_accounts(b.db, limit)
    if json:
        emit_json(rows)
        return
    table = _table("account", "name", "type", "cycle day", "entity", "jurisdiction", "lines")
    for r in rows:
        table.add_row(r["account_id"], r["name"], r["payment_type"], str(r["cycle_day"]), r["legal_entity"],
                      r["jurisdiction"], str(r["lines"]))
    _console().print(table)


@account_app.command("import")
def account_import(file: Path, start: str = typer.Option(None, "--from", help="Default start date"),
                   config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Accounts and subscriptions from CSV: account_id,name,msisdn,plan[,imsi,address,email,cycle_day,
    payment_type,start_date] (address lines separated by '|'). Every row is checked before anything is written."""
    import csv

    from billing.accounts import AccountInput, BillingError, add_account, parse_date, subscribe

    try:
        rows = list(csv.DictReader(file.open(newline="")))
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    with billing(config) as b:
        parsed = []
        for n, row in enumerate(rows, 2):
            try:
                missing = [k for k in ("account_id", "name", "msisdn", "plan") if not (row.get(k) or "").strip()]
                if missing:
                    raise BillingError(f"missing {', '.join(missing)}")
                if row["plan"] not in b.catalog.plan_fees:
                    raise BillingError(f"plan {row['plan']!r} has no recurring fee in the billing catalog")
                cycle_day = int(row.get("cycle_day") or 1)
                first = parse_date(row.get("start_date") or start or _today(), "start_date")
            except (BillingError, ValueError) as exc:
                fail(f"{file}:{n}: {exc}")
            parsed.append((AccountInput(row["account_id"].strip(), row["name"].strip(),
                                        (row.get("address") or "").split("|"), (row.get("email") or "").strip(),
                                        None, None, cycle_day, (row.get("payment_type") or "postpaid").strip()),
                           row["msisdn"].strip(), row["plan"].strip(), (row.get("imsi") or "").strip() or None, first))
        created = subscribed = 0
        now = _now_ms()
        for account, msisdn, plan, imsi, first in parsed:
            created += add_account(b.db, b.catalog, account, now_ms=now)["created"]
            subscribed += subscribe(b.db, b.catalog, account.account_id, msisdn, plan, first, imsi=imsi)["created"]
    result = {"rows": len(parsed), "accounts_created": created, "subscriptions_created": subscribed}
    emit_json(result) if json else _console().print(
        f"{len(parsed)} row(s): {created} account(s) and {subscribed} subscription(s) created")


# ---- bill runs ---------------------------------------------------------------------------------------


def _progress(json: bool) -> tuple[Callable[[str, int, int], None], Callable[[], None]]:
    if json or not sys.stderr.isatty():
        return (lambda stage, done, total: None), (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=_console(stderr=True), transient=True)
    bar.start()
    tasks: dict[str, Any] = {}

    def tick(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return tick, bar.stop


def _print_run(run: dict, b: Billing) -> None:
    out = _console()
    if run.get("note"):
        out.print(run["note"])
    table = _table("bill run", "status", "invoices", "records", f"usage ({b.catalog.currency})", "charged",
                   "prepaid", "tax", "total", "ties out")
    table.add_row(run["period"], run["status"], str(run["invoices"]), f"{run['records_billed']:,}",
                  _money(run["usage_lines"], b), _money(run["usage_charged"], b), _money(run["usage_prepaid"], b),
                  _money(run["tax_total"], b), _money(run["total"], b),
                  "[green]yes[/green]" if run["ties_out"] else "[red]NO[/red]")
    out.print(table)
    out.print(f"CDR amounts billed {_money(run['cdr_amount'], b)} = usage lines {_money(run['usage_lines'], b)}")
    if run.get("fee_amount") or run.get("fee_lines"):
        out.print(f"fee records billed {_money(run['fee_amount'], b)} = fee lines {_money(run['fee_lines'], b)}")
    if run.get("first_number"):
        out.print(f"numbered {run['numbered']} invoice(s): {run['first_number']} … {run['last_number']}")


@bill_app.command("run")
def bill_run(period: str = typer.Option(..., "--period", help="YYYY-MM: the cycles that start in this month"),
             config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Produce draft invoices for a period (re-running rebuilds the draft; a finalized period is kept)."""
    from billing.billrun import run_bill

    with billing(config) as b:
        tick, stop = _progress(json)
        try:
            run = run_bill(b.db, b.catalog, period, now_ms=_now_ms(), progress=tick)
        finally:
            stop()
        emit_json(run) if json else _print_run(run, b)


@bill_app.command("finalize")
def bill_finalize(period: str = typer.Option(..., "--period"),
                  issue_date: str = typer.Option(None, "--issue-date", help="YYYY-MM-DD, default today"),
                  config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Make a period's draft invoices immutable and give them gapless numbers per legal entity."""
    from billing.accounts import parse_date
    from billing.billrun import finalize

    with billing(config) as b:
        run = finalize(b.db, b.catalog, period, today=parse_date(issue_date or _today(), "issue date"),
                       now_ms=_now_ms())
        emit_json(run) if json else _print_run(run, b)


@bill_app.command("status")
def bill_status(period: str = typer.Option(..., "--period"), config: Path = ConfigOption,
                json: bool = JsonOption) -> None:
    """A bill run's totals and its tie-out (CDR amounts = usage lines)."""
    from billing.billrun import run_status

    with billing(config) as b:
        run = run_status(b.db, period)
        emit_json(run) if json else _print_run(run, b)


@bill_app.command("rerate")
def bill_rerate(period: str = typer.Option(..., "--period"),
                ratecard: Path = typer.Option(..., "--ratecard", help="The corrected rate card (new version)"),
                on: str = typer.Option(None, "--date", help="Date of the adjustments"),
                config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Re-rate a finalized period with a corrected rate card (in place of the version in force with the same
    effective-from) by the online rating engine: differences become adjustments on the next run."""
    from billing.rerating import rerate
    from ocs.config import load_config
    from ocs.ratecard_store import load_active_cards
    from ratecards import load_ratecard

    with billing(config) as b:
        active = load_active_cards(load_config(config))
        result = rerate(b.db, b.catalog, load_ratecard(ratecard), period, today=on or _today(), now_ms=_now_ms(),
                        active=active)
        if json:
            emit_json(result)
            return
        _console().print(f"{result['records']} record(s) re-rated: {_money(result['old_amount'], b)} → "
                         f"{_money(result['new_amount'], b)} {b.catalog.currency}; "
                         f"{len(result['adjustments'])} adjustment(s), total {_money(result['total'], b)} "
                         f"{b.catalog.currency}; not adjusted (prepaid or bonus money, in the OCS balance): "
                         f"{len(result['prepaid_not_adjusted']) + len(result['bonus_not_adjusted'])}")


# ---- invoices ----------------------------------------------------------------------------------------


@invoice_app.command("list")
def invoice_list(account: str = typer.Option(None, "--account"), period: str = typer.Option(None, "--period"),
                 status: str = typer.Option(None, "--status"), limit: int = typer.Option(200, "--limit"),
                 config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Invoices and credit notes."""
    from billing.documents import list_invoices

    with billing(config) as b:
        rows = list_invoices(b.db, account_id=account, period=period, status=status, limit=limit)
        if json:
            emit_json(rows)
            return
        table = _table("number", "kind", "status", "account", "period", "issued", "due", "net", "tax", "total")
        for r in rows:
            table.add_row(r["number"] or f"#{r['invoice_id']}", r["kind"], r["status"], r["account_id"],
                          r["period"] or "", r["issue_date"] or "", r["due_date"] or "", _money(r["subtotal"], b),
                          _money(r["tax_total"], b), _money(r["total"], b))
        _console().print(table)


@invoice_app.command("show")
def invoice_show(ref: str = typer.Argument(..., help="Invoice number, or #id for a draft"),
                 config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """One invoice with its lines and taxes (--json: the invoice JSON document)."""
    from billing.documents import find_invoice, invoice_document

    with billing(config) as b:
        doc = invoice_document(b.db, b.catalog, find_invoice(b.db, ref))
    if json:
        emit_json(doc)
        return
    out = _console()
    out.print(f"[bold]{'Credit note' if doc['kind'] == 'credit_note' else 'Invoice'} "
              f"{doc['number'] or '#' + str(doc['invoice_id'])}[/bold] ({doc['status']}) for {doc['account']['name']} "
              f"[{doc['account']['id']}], period {doc['period']}, issued {doc['issue_date'] or '-'}, "
              f"due {doc['due_date'] or '-'}")
    table = _table("#", "description", "from", "to", "quantity", "net", "tax rate", "tax")
    for line in doc["lines"]:
        table.add_row(str(line["line"]), line["description"], line["period_from"] or "", line["period_to"] or "",
                      "" if line["quantity"] is None else f"{line['quantity']:,} {line['unit']}",
                      line["amount"] + ("" if line["charged"] else " (prepaid)"), line["tax_rate"], line["tax"])
    out.print(table)
    out.print(f"net {doc['subtotal']}  tax {doc['tax_total']}  [bold]total {doc['total']} {doc['currency']}[/bold]")


@invoice_app.command("pdf")
def invoice_pdf(refs: list[str] = typer.Argument(None, help="Invoice numbers (or #id)"),
                period: str = typer.Option(None, "--period", help="Every invoice of this bill run"),
                out: Path = typer.Option(None, "--out", help="Directory (default <data_dir>/invoices)"),
                jobs: int = typer.Option(1, "--jobs", help="Render in this many processes"),
                config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Render invoices as PDF (WeasyPrint); separate from the bill run and parallel with --jobs."""
    from billing.documents import find_invoice, render_pdfs

    if not refs and not period:
        fail("name invoices or give --period")
    if jobs < 1:
        fail("--jobs must be ≥ 1")
    with billing(config) as b:
        ids = [find_invoice(b.db, r) for r in refs or []]
        if period:
            ids += [int(r[0]) for r in b.db.query("SELECT i.invoice_id FROM invoices i JOIN bill_runs r ON "
                                                  "r.run_id = i.run_id WHERE r.period = ? ORDER BY i.invoice_id",
                                                  (period,))]
            if not ids:
                fail(f"no invoices for period {period}")
        target = out or b.data_dir / "invoices"
        tick, stop = _progress(json)
        try:
            paths = render_pdfs(b.url, b.billing_config, b.ratecard, ids, target, jobs=jobs,
                                progress=lambda done, total: tick("pdf", done, total))
        finally:
            stop()
    emit_json({"files": paths}) if json else _console().print(f"{len(paths)} PDF file(s) in {target}")


@invoice_app.command("annex")
def invoice_annex(ref: str, out: Path = typer.Option(None, "--out", help="CSV file (default <number>-usage.csv)"),
                  config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """The usage annex of an invoice: every CDR on it, as CSV."""
    from billing.documents import find_invoice, write_usage_annex

    with billing(config) as b:
        invoice_id = find_invoice(b.db, ref)
        target = out or Path(f"{ref.lstrip('#')}-usage.csv")
        count = write_usage_annex(b.db, b.catalog, invoice_id, target)
    emit_json({"file": str(target), "records": count}) if json else _console().print(
        f"{count} usage record(s) written to {target}")


@invoice_app.command("credit")
def invoice_credit(ref: str, reason: str = typer.Option(..., "--reason"),
                   line: int = typer.Option(None, "--line", help="Credit only this line"),
                   amount: str = typer.Option(None, "--amount", help="Credit this much (net) of --line"),
                   on: str = typer.Option(None, "--date"), config: Path = ConfigOption,
                   json: bool = JsonOption) -> None:
    """Issue a credit note against a finalized invoice (the only correction after finalization)."""
    from billing.billrun import credit_note

    with billing(config) as b:
        micro = None if amount is None else _parse_amount(amount, b)
        result = credit_note(b.db, b.catalog, ref, reason=reason, line_no=line, amount=micro, today=on or _today(),
                             now_ms=_now_ms())
        emit_json(result) if json else _console().print(
            f"credit note {result['number']} for {ref}: {_money(result['total'], b)} {b.catalog.currency}")


# ---- payments ----------------------------------------------------------------------------------------


@payment_app.command("add")
def payment_add(amount: str, ref: str = typer.Option(..., "--ref", help="Bank reference (idempotency key)"),
                account: str = typer.Option(None, "--account"), invoice: str = typer.Option(None, "--invoice"),
                on: str = typer.Option(None, "--date", help="Received on (YYYY-MM-DD)"),
                method: str = typer.Option("transfer", "--method"),
                config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Record a payment and allocate it to the invoice (or the oldest open invoices of the account)."""
    from billing.accounts import add_payment

    with billing(config) as b:
        micro = _parse_amount(amount, b)
        result = add_payment(b.db, account, micro, ref, received=on or _today(), invoice_number=invoice,
                             method=method, now_ms=_now_ms())
        if json:
            emit_json(result)
            return
        if not result["created"]:
            _console().print(f"payment {ref} was already recorded; nothing changed")
            return
        alloc = ", ".join(f"{a['invoice']} {_money(a['amount'], b)}" for a in result["allocations"]) or "none"
        _console().print(f"payment {ref} recorded; allocated to {alloc}; "
                         f"unallocated {_money(result['unallocated'], b)}")


@payment_app.command("list")
def payment_list(account: str = typer.Option(None, "--account"), config: Path = ConfigOption,
                 json: bool = JsonOption) -> None:
    """Payments received."""
    with billing(config) as b:
        where, params = ("WHERE account_id = ?", (account,)) if account else ("", ())
        rows = b.db.query_dicts("SELECT payment_id, account_id, amount, received_date, reference, method "
                                f"FROM payments {where} ORDER BY payment_id", params)
        if json:
            emit_json(rows)
            return
        table = _table("id", "account", "received", "reference", "method", "amount")
        for r in rows:
            table.add_row(str(r["payment_id"]), r["account_id"], r["received_date"], r["reference"], r["method"],
                          _money(r["amount"], b))
        _console().print(table)


# ---- reconciliation ----------------------------------------------------------------------------------


def reconcile_file(
    file: Path = typer.Argument(..., help="The host's wholesale usage file (CSV)"),
    out: Path = typer.Option(None, "--out", help="Report directory (default <data_dir>/reconciliation/<file>)"),
    on_error: str = typer.Option("skip", "--on-error", help="skip | reject-file"),
    config: Path = ConfigOption, json: bool = JsonOption,
) -> None:
    """Reconcile a host wholesale file against our CDRs: leakage, disputes, variances; CSV, JSON and PNG reports."""
    import json as jsonlib

    from billing.reconcile import reconcile, report_rows, write_chart, write_findings_csv

    if on_error not in ("skip", "reject-file"):
        fail("--on-error must be skip or reject-file")
    if not file.is_file():
        fail(f"file not found: {file}")
    with billing(config) as b:
        report = reconcile(b.db, b.catalog, file, now_ms=_now_ms(), on_error=on_error)
        target = out or b.data_dir / "reconciliation" / file.stem
        target.mkdir(parents=True, exist_ok=True)
        (target / "report.json").write_text(jsonlib.dumps(report, indent=1))
        write_findings_csv(report, target / "findings.csv")
        write_chart(report, target / "daily-variance.png")
        report["outputs"] = {name: str(target / name) for name in ("report.json", "findings.csv",
                                                                   "daily-variance.png")}
        if json:
            emit_json(report)
            return
        out_console = _console()
        table = _table("finding", "items", f"host charge ({b.catalog.currency})", "expected wholesale")
        for row in report_rows(report):
            table.add_row(row[0], str(row[1]), row[2], row[3])
        out_console.print(table)
        t = report["totals"]
        out_console.print(f"leakage {_money(t['leakage'], b)} · disputable {_money(t['disputable'], b)} · "
                          f"missing at host {_money(t['missing_at_host_value'], b)} · "
                          f"variance {_money(t['variance'], b)} {b.catalog.currency}")
        issues = report["completeness"]["issues"]
        out_console.print("completeness: " + ("[green]complete[/green]" if not issues else "; ".join(issues)))
        out_console.print(f"reports in {target}")


