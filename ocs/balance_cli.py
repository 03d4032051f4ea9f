"""`ocs audit`, `ocs adjust`, `ocs bucket add|sweep`, `ocs group ...` and `ocs subscriber set-status|set-account`:
the balance model's operator commands, registered on the `ocs` app by `register(app, subscriber_app)`.

Every command takes `--config` and `--json` (one JSON document on stdout); bad input prints one line on
stderr, exits 2 and changes nothing. Money is typed in the currency (a decimal, e.g. `-1.50`) and kept in
micro-units; allowances are typed in their units. The shared helpers (StoreSession, money parsing) live in
ocs.cli and are imported when a command runs (ocs.cli imports this module).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec
import typer

__all__ = ["format_history", "parse_time", "register"]

group_app = typer.Typer(no_args_is_help=True, help="Sharing groups (family, company): shared buckets, members")
bucket_app = typer.Typer(no_args_is_help=True, help="Buckets: add a bundle or allowance, sweep expiries")

ConfigOption = typer.Option(None, "--config", "-c", help="TOML configuration file")
JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables")


def register(app: typer.Typer, subscriber_app: typer.Typer) -> None:
    app.command("audit")(audit)
    app.command("adjust", context_settings={"ignore_unknown_options": True})(adjust)  # negative amounts
    app.add_typer(group_app, name="group")
    app.add_typer(bucket_app, name="bucket")
    subscriber_app.command("set-status")(set_status)
    subscriber_app.command("set-account")(set_account)


def _cli():
    from ocs import cli

    return cli


def parse_time(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date-time (UTC unless it names an offset) → epoch ms."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _cli().CliError(f"{text!r} is neither epoch milliseconds nor an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _signed_money(text: str, digits: int, currency: str) -> int:
    cli = _cli()
    try:
        if Decimal(text.strip()) == 0:
            return 0
    except InvalidOperation:
        raise cli.CliError(f"amount {text!r} is not a number") from None
    negative = text.strip().startswith("-")
    micro = cli.parse_amount(text.strip().lstrip("-+"), digits, currency)
    return -micro if negative else micro


def _units(text: str, signed: bool = False) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _cli().CliError(f"{text!r} is not a whole number of units") from None
    if not signed and value < 0:
        raise _cli().CliError("units cannot be negative")
    return value


def _is_money(unit: str | None, bucket: str) -> bool:
    return unit == "money" or (unit is None and bucket.lstrip("@") == "money")


def _show(value: int, money: bool, digits: int) -> str:
    return _cli().format_money(value, digits) if money else f"{value:,}"


def format_history(lines: list[dict], units: dict[str, str | None], currency: str, digits: int) -> Any:
    """The rich table of `ocs balance --history`."""
    from rich.table import Table

    table = Table("time (UTC)", "type", "bucket", "change", "balance", "note")
    for line in lines:
        money = _is_money(units.get(line["bucket"]), line["bucket"])
        when = datetime.fromtimestamp(line["time"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        change = _show(line["change"], money, digits)
        note = line["reason"] or line["reference"]
        if line["bucket"].startswith("@"):  # a shared bucket: who drew from it
            note = f"{note} (by {line['by'] or 'the group'})".strip()
        table.add_row(when, line["type"], line["bucket"], ("+" if line["change"] > 0 else "") + change,
                      _show(line["balance"], money, digits) + (f" {currency}" if money else ""), note)
    return table


# ---- audit ---------------------------------------------------------------------------------------------


def audit(config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Conservation audit: per bucket and unit, the ledger's credits - debits = the balance (reservations
    included), and the ledger's usage entries match the CDR records (files and stream) by recordId and amount.
    Works while the server runs. Exit 1 when anything differs (listed)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main():
        from ocs.audit import audit as run_audit

        async with cli.StoreSession(cfg) as store:
            return await run_audit(store, cfg.cdr_directory)

    report = cli.run_async(main)
    if json:
        cli.emit_json(report)
    else:
        from rich.table import Table

        table = Table("unit", "credits", "debits", "balance (incl. reserved)", "reserved")
        for unit, totals in sorted(report.units.items()):
            money = unit == "money"
            debits = ", ".join(f"{kind} {_show(v, money, 2)}" for kind, v in sorted(totals.debits.items()))
            table.add_row(unit, _show(totals.credits, money, 2), debits or "-", _show(totals.balance, money, 2),
                          _show(totals.reserved, money, 2))
        cli.console.print(table)
        cli.console.print(f"{report.partitions} partitions, {report.buckets} buckets, {report.ledger_entries} "
                          f"ledger entries, {report.cdr_records} rated CDR records, {report.fee_records} fee records")
        for d in report.differences:
            cli.console.print(f"[red]{d.kind}[/red] p{d.partition:03d} {d.owner} {d.bucket} {d.unit} "
                              f"expected {d.expected} actual {d.actual} {d.reference} {d.detail}", highlight=False)
        cli.console.print("[green]OK: every balance is explained[/green]" if report.ok else
                          f"[red]{len(report.differences)} difference(s)[/red]")
    if not report.ok:
        raise typer.Exit(1)


# ---- adjustments and buckets ---------------------------------------------------------------------------


def adjust(
    msisdn: str,
    bucket: str = typer.Argument(..., help="Bucket id ('money', 'data', ...; '@id' = the subscriber's group's)"),
    amount: str = typer.Argument(..., help="Signed: money in the currency (-1.50), allowances in units"),
    reason: str = typer.Option(..., "--reason", help="Why: written into the ledger entry"),
    ref: str = typer.Option(None, "--ref", help="Idempotency reference: the same ref is applied once"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """An operator correction of one bucket, with an "adjustment" ledger entry."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.store import UnknownSubscriber

        currency, digits = cli.currency_of(cfg)
        async with cli.StoreSession(cfg) as store:
            try:
                states = {b.bucket: b for b in await store.balances(msisdn)}
            except UnknownSubscriber:
                raise cli.CliError(f"unknown subscriber {msisdn}") from None
            state = states.get(bucket)
            money = _is_money(state.unit if state else None, bucket)
            value = _signed_money(amount, digits, currency) if money else _units(amount, signed=True)
            if value == 0:
                raise cli.CliError("an adjustment is not zero")
            try:
                change = await store.adjust(msisdn, bucket, value, reason, ref)
            except ValueError as exc:
                raise cli.CliError(str(exc)) from None
        return {"msisdn": msisdn, "bucket": bucket, "amount": value, "applied": change.applied,
                "balance": change.balance, "reference": ref, "money": money, "digits": digits, "currency": currency}

    result = cli.run_async(main)
    if json:
        cli.emit_json({k: v for k, v in result.items() if k not in ("money", "digits")})
        return
    show = lambda v: _show(v, result["money"], result["digits"])  # noqa: E731
    if result["applied"]:
        cli.console.print(f"{msisdn} {bucket}: {'+' if result['amount'] > 0 else ''}{show(result['amount'])}, "
                          f"balance {show(result['balance'])}")
    else:
        cli.console.print(f"{msisdn}: reference {ref} was already applied; nothing changed")


@bucket_app.command("add")
def bucket_add(
    owner: str = typer.Argument(..., help="MSISDN, or @GROUP for a group's shared bucket"),
    bucket: str = typer.Argument(..., help="Bucket id"),
    unit: str = typer.Option(..., "--unit", help="money | bytes | seconds | events | a service-specific unit"),
    amount: str = typer.Option(..., "--amount", help="Money in the currency, allowances in units"),
    priority: int = typer.Option(100, "--priority", help="Lower is consumed first"),
    valid_from: str = typer.Option(None, "--valid-from", help="Epoch ms or ISO 8601 (UTC by default)"),
    valid_until: str = typer.Option(None, "--valid-until", help="Epoch ms or ISO 8601 (UTC by default)"),
    services: str = typer.Option(None, "--services", help="Rating groups, comma-separated (default: all of the unit)"),
    rollover_cap: int = typer.Option(None, "--rollover-cap", help="Carry up to this many unused units at the end"),
    kind: str = typer.Option("credit", "--kind", help="Ledger entry type: credit, purchase, renewal, ..."),
    ref: str = typer.Option(None, "--ref", help="Idempotency reference"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Add (or top up) a bucket with its metadata: a bundle, an allowance, bonus money."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.model import Bucket, Rollover
        from balances.store import UnknownGroup, UnknownSubscriber

        currency, digits = cli.currency_of(cfg)
        value = _signed_money(amount, digits, currency) if unit == "money" else _units(amount)
        if value < 0:
            raise cli.CliError("a bucket is added with a non-negative amount (use ocs adjust to take away)")
        try:
            services_list = tuple(int(s) for s in services.split(",")) if services else None
        except ValueError:
            raise cli.CliError(f"--services {services!r}: rating group numbers, comma-separated") from None
        new = Bucket(bucket, unit, value, priority=priority,
                     valid_from=parse_time(valid_from) if valid_from else None,
                     valid_until=parse_time(valid_until) if valid_until else None, services=services_list,
                     rollover=Rollover(cap=rollover_cap) if rollover_cap is not None else None)
        async with cli.StoreSession(cfg) as store:
            try:
                if owner.startswith("@"):
                    change = await store.add_group_bucket(owner[1:], new, reference=ref, kind=kind)
                else:
                    change = await store.add_bucket(owner, new, reference=ref, kind=kind)
            except (UnknownSubscriber, UnknownGroup):
                raise cli.CliError(f"unknown subscriber or group {owner}") from None
            except ValueError as exc:
                raise cli.CliError(str(exc)) from None
        return {"owner": owner, "bucket": msgspec.to_builtins(new), "applied": change.applied,
                "balance": change.balance}

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
    else:
        cli.console.print(f"{owner} {bucket}: balance {result['balance']:,}"
                          + ("" if result["applied"] else " (reference already applied; nothing changed)"))


@bucket_app.command("sweep")
def bucket_sweep(
    at: str = typer.Option(None, "--at", help="The time to sweep at (epoch ms or ISO 8601; default now)"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Expire and roll over every bucket whose validity has ended (the cron job; the charge functions also
    do it lazily for the subscribers they touch)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from ocs.clock import Clock

        now = parse_time(at) if at else Clock().now_ms()
        async with cli.StoreSession(cfg) as store:
            entries = await store.roll_over("all", now)
        return {"at": now, "ledger_entries": entries}

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
    else:
        cli.console.print(f"swept: {result['ledger_entries']} expiry/rollover ledger entries")


# ---- subscribers: status and account kind --------------------------------------------------------------


def set_status(
    msisdn: str,
    status: str = typer.Argument(..., help="active | barred | suspended | terminated"),
    reauth: bool = typer.Option(True, "--reauth/--no-reauth", help="RAR to its open sessions so the gateway "
                                "asks again (and hears 4010 or 5030)"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Set a subscriber's status: barred and suspended are answered 4010 END_USER_SERVICE_DENIED, terminated
    5030 USER_UNKNOWN (usage reported by open sessions is still charged)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.store import UnknownSubscriber
        from ocs.routing import reauth_subscriber

        async with cli.StoreSession(cfg) as store:
            try:
                old = await store.set_status(msisdn, status)
            except UnknownSubscriber:
                raise cli.CliError(f"unknown subscriber {msisdn}") from None
            except ValueError as exc:
                raise cli.CliError(str(exc)) from None
            results = []
            if reauth and status != old:
                results = await reauth_subscriber(store, msisdn, cfg.diameter.answer_timeout_seconds + 1)
        return {"msisdn": msisdn, "status": status, "old": old, "reauth": msgspec.to_builtins(results)}

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
    else:
        cli.console.print(f"{msisdn}: status {result['old']} → {status}")
        for item in result["reauth"]:
            cli.console.print(f"  RAR {item['session_id']}: {cli._outcome_text(item)}")


def set_account(
    msisdn: str,
    postpaid: bool = typer.Option(False, "--postpaid/--prepaid", help="Account kind"),
    credit_limit: str = typer.Option("0", "--credit-limit", help="Postpaid: how far the money may go below 0"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Make a subscriber prepaid, or postpaid with a credit limit (money may go down to -limit; grants are
    limited by limit + balance)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.store import UnknownSubscriber

        currency, digits = cli.currency_of(cfg)
        try:
            limit = 0 if Decimal(credit_limit) == 0 else cli.parse_amount(credit_limit, digits, currency)
        except InvalidOperation:
            raise cli.CliError(f"credit limit {credit_limit!r} is not a number") from None
        kind = "postpaid" if postpaid else "prepaid"
        async with cli.StoreSession(cfg) as store:
            try:
                old = await store.set_account(msisdn, kind, limit)
            except UnknownSubscriber:
                raise cli.CliError(f"unknown subscriber {msisdn}") from None
            except ValueError as exc:
                raise cli.CliError(str(exc)) from None
        return {"msisdn": msisdn, "kind": kind, "credit_limit": limit, "old": old}

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
    else:
        cli.console.print(f"{msisdn}: {result['old']} → {result['kind']}"
                          + (f", credit limit {cli.format_money(result['credit_limit'])}" if postpaid else ""))


# ---- groups --------------------------------------------------------------------------------------------


@group_app.command("create")
def group_create(name: str, partition: int = typer.Option(None, "--partition"), config: Path = ConfigOption,
                 json: bool = JsonOption) -> None:
    """Create a sharing group; its members are provisioned into its partition (`subscriber add` then
    `group join`, or BalanceStore.provision with Subscriber.group)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        async with cli.StoreSession(cfg) as store:
            try:
                return {"group": name, "partition": await store.create_group(name, partition)}
            except ValueError as exc:
                raise cli.CliError(str(exc)) from None

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
    else:
        cli.console.print(f"group {name} in partition {result['partition']}")


@group_app.command("show")
def group_show(name: str, config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """A group's shared buckets and members."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.store import UnknownGroup

        async with cli.StoreSession(cfg) as store:
            try:
                return {"group": name, "partition": await store.group_partition(name),
                        "members": await store.group_members(name),
                        "buckets": msgspec.to_builtins(await store.group_balances(name))}
            except UnknownGroup:
                raise cli.CliError(f"unknown group {name}") from None

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
        return
    cli.console.print(f"group {name}: partition {result['partition']}, members {', '.join(result['members']) or '-'}")
    cli._print_buckets(result["buckets"], "")


@group_app.command("join")
def group_join(name: str, msisdn: str, config: Path = ConfigOption) -> None:
    """Make a subscriber of the group's partition a member."""
    _group_change(config, lambda store: store.join_group(msisdn, name), f"{msisdn} joined {name}")


@group_app.command("leave")
def group_leave(msisdn: str, config: Path = ConfigOption) -> None:
    """Take a subscriber out of its group (refused while its sessions hold shared units)."""
    _group_change(config, lambda store: store.leave_group(msisdn), f"{msisdn} left its group")


@group_app.command("limit")
def group_limit(name: str, bucket: str, msisdn: str,
                limit: str = typer.Argument(..., help="Units, or 'none'"), config: Path = ConfigOption) -> None:
    """A member's limit on one shared bucket."""
    value = None if limit == "none" else _units(limit)
    _group_change(config, lambda store: store.set_member_limit(name, bucket, msisdn, value),
                  f"{msisdn}: limit on {name}/{bucket} is {limit}")


def _group_change(config: Path | None, change, message: str) -> None:
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> None:
        from balances.store import UnknownGroup, UnknownSubscriber

        async with cli.StoreSession(cfg) as store:
            try:
                await change(store)
            except (UnknownGroup, UnknownSubscriber) as exc:
                raise cli.CliError(f"unknown {'group' if isinstance(exc, UnknownGroup) else 'subscriber'} "
                                   f"{exc}") from None
            except ValueError as exc:
                raise cli.CliError(str(exc)) from None

    cli.run_async(main)
    cli.console.print(message)
