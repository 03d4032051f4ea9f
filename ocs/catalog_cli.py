"""`ocs plan load|list|show|renew`, `ocs addon buy|list` and `ocs subscriber change-plan`: the product catalog's
commands (ocs/catalog.py), registered on the `ocs` app by `register(app, subscriber_app)`.

Every command takes `--config` and `--json`; bad input prints one line on stderr, exits 2 and changes nothing.
The shared helpers (StoreSession, money formatting) live in ocs.cli and are imported when a command runs
(ocs.cli imports this module).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import msgspec
import typer

__all__ = ["catalog_plan", "provision_plan", "register", "topup_promotions"]

plan_app = typer.Typer(no_args_is_help=True, help="The product catalog: plans, add-ons, promotions; renewals")
addon_app = typer.Typer(no_args_is_help=True, help="Add-ons and bundles bought on top of a plan")

ConfigOption = typer.Option(None, "--config", "-c", help="TOML configuration file")
JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables")
AtOption = typer.Option(None, "--at", help="When (epoch ms or ISO 8601; default: now)")


def register(app: typer.Typer, subscriber_app: typer.Typer) -> None:
    app.add_typer(plan_app, name="plan")
    app.add_typer(addon_app, name="addon")
    subscriber_app.command("change-plan")(change_plan)


def _cli():
    from ocs import cli

    return cli


def _now(at: str | None) -> int:
    from ocs.balance_cli import parse_time
    from ocs.clock import Clock

    return Clock().now_ms() if at is None else parse_time(at)


def _rate_card(cfg: Any):
    """The newest active rate card version: the one a catalog is checked against."""
    from ocs.ratecard_store import load_active_cards
    from ratecards import RateCardError, effective_epoch

    try:
        cards = load_active_cards(cfg)
    except RateCardError as exc:
        raise _cli().CliError(str(exc)) from None
    return max(cards, key=lambda card: effective_epoch(card) or float("-inf"))


async def _stored(store: Any):
    from ocs.catalog import read_catalog

    stored = await read_catalog(store.redis)
    if stored is None:
        raise _cli().CliError("no catalog is loaded (ocs plan load FILE)")
    return stored


def _money_text(micro: int, digits: int) -> str:
    return _cli().format_money(micro, digits)


# ---- hooks used by ocs.cli (subscriber add, topup, serve --demo) ------------------------------------------


async def catalog_plan(store: Any, name: str):
    """The loaded catalog when it has plan `name` (None: no catalog, or not one of its plans)."""
    from ocs.catalog import read_catalog

    stored = await read_catalog(store.redis)
    if stored is None or name not in stored.catalog.plans:
        return None
    return stored.catalog


async def provision_plan(store: Any, catalog: Any, sub: Any, money: int, now_ms: int) -> dict:
    """`ocs subscriber add --plan` for a catalog plan: the subscriber on the plan's rate card plan with its
    money, then the first period (fee, allowances, subscribe bonuses). A prepaid balance that does not cover
    the first fee is refused before anything is written."""
    from ocs.catalog import money as to_micro
    from ocs.catalog import rating_plan_of, start_plan

    plan = catalog.plans[sub.plan]
    fee = to_micro(plan.recurring_fee)
    if money < fee:
        raise _cli().CliError(f"plan {sub.plan} costs {plan.recurring_fee} {catalog.currency} per {plan.period}: "
                              f"--money must cover the first fee")
    product = sub.plan
    sub = msgspec.structs.replace(sub, plan=rating_plan_of(catalog, product))
    partition = await store.provision(sub, money=money, now_ms=now_ms)
    result = await start_plan(store, catalog, sub.msisdn, product, now_ms)
    return {"partition": partition, "fee": fee, "buckets": result.buckets, "bonuses": result.bonuses,
            "balance": result.balance, "rating_plan": sub.plan}


async def topup_promotions(store: Any, msisdn: str, amount: int, reference: str | None, now_ms: int) -> list[str]:
    """The top-up bonuses a top-up earns (names granted); nothing without a catalog."""
    from ocs.catalog import read_catalog, topup_bonuses

    stored = await read_catalog(store.redis)
    if stored is None:
        return []
    result = await topup_bonuses(store, stored.catalog, msisdn, amount, reference or str(now_ms), now_ms)
    return [] if result is None else result.bonuses


async def load_demo_catalog(store: Any, cfg: Any) -> bool:
    """`ocs serve --demo`: the demo catalog when no catalog is loaded yet (skipped, with a warning, when the
    configured rate card cannot rate it)."""
    import logging

    from ocs.catalog import CatalogError, load_catalog_file, read_catalog, store_catalog
    from ocs.clock import Clock

    if await read_catalog(store.redis) is not None:
        return False
    try:
        catalog, text = load_catalog_file(Path(__file__).resolve().parent / "demo" / "catalog.toml",
                                          _rate_card(cfg))
    except (CatalogError, _cli().CliError) as exc:
        logging.getLogger("ocs").warning("demo catalog not loaded: %s", exc)
        return False
    await store_catalog(store.redis, catalog, text, Clock().now_ms())
    return True


# ---- ocs plan ----------------------------------------------------------------------------------------------


@plan_app.command("load")
def plan_load(file: Path, dry_run: bool = typer.Option(False, "--dry-run", help="Only check the file"),
              config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Check a catalog file against the rate card and make it the catalog every OCS process uses."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from ocs.catalog import CatalogError, load_catalog_file, store_catalog

        try:
            catalog, text = load_catalog_file(file, _rate_card(cfg))
        except CatalogError as exc:
            raise cli.CliError(str(exc)) from None
        versions = _discount_versions(cfg, catalog, install=not dry_run)
        summary = {"file": str(file), "plans": sorted(catalog.plans), "addons": sorted(catalog.addons),
                   "promotions": sorted(catalog.promotions), "dry_run": dry_run, "version": catalog.version,
                   "ratecard_versions": versions}
        if dry_run:
            return summary
        async with cli.StoreSession(cfg) as store:
            stored = await store_catalog(store.redis, catalog, text, _now(None))
        return {**summary, "version": stored.version, "digest": stored.digest}

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
        return
    verb = "is valid" if dry_run else f"loaded (version {result['version']})"
    cli.console.print(f"catalog {file} {verb}: {len(result['plans'])} plan(s), {len(result['addons'])} add-on(s), "
                      f"{len(result['promotions'])} promotion(s)")


def _discount_versions(cfg: Any, catalog: Any, *, install: bool) -> list[str]:
    """The discount promotions' rate-card versions (ocs.catalog.discount_cards), checked like `ocs ratecard
    load` (each takes effect at least one reload interval from now) and, with `install`, added to the active
    card. Returns their version names."""
    import tempfile
    import time

    from ocs.catalog import discount_cards
    from ocs.ratecard_store import install_version, load_active_cards, reload_interval
    from ratecards import RateCardError, check_new_version
    from ratecards.promotions import to_toml

    try:
        existing = load_active_cards(cfg)
        cards = discount_cards(catalog, existing)
        now = time.time()
        for card in cards:
            check_new_version(existing, card, now=now, reload_interval=reload_interval(cfg))
            existing = [*existing, card]
        if install:
            for card in cards:
                with tempfile.TemporaryDirectory() as directory:
                    path = Path(directory) / f"{card.version}.toml"
                    path.write_text(to_toml(card), encoding="utf-8")
                    install_version(cfg, path, now=now)
    except RateCardError as exc:
        raise _cli().CliError(f"discount promotion: {exc}") from None
    return [card.version for card in cards]


@plan_app.command("list")
def plan_list(config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """The catalog's plans, add-ons and promotions."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main():
        async with cli.StoreSession(cfg) as store:
            return await _stored(store)

    stored = cli.run_async(main)
    catalog = stored.catalog
    if json:
        cli.emit_json({"version": stored.version, "digest": stored.digest, "loaded_ms": stored.loaded_ms,
                       "currency": catalog.currency,
                       "plans": {name: msgspec.to_builtins(plan) for name, plan in catalog.plans.items()},
                       "addons": {name: msgspec.to_builtins(a) for name, a in catalog.addons.items()},
                       "promotions": {name: msgspec.to_builtins(p) for name, p in catalog.promotions.items()}})
        return
    from rich.table import Table

    table = Table("plan", "rate card plan", "fee", "period", "allowances", "description")
    for name, plan in sorted(catalog.plans.items()):
        allowances = ", ".join(f"{a.bucket} {a.amount:,} {a.unit}" for a in plan.allowances)
        table.add_row(name, plan.ratecard_plan or name, f"{plan.recurring_fee} {catalog.currency}", plan.period,
                      allowances or "-", plan.description)
    cli.console.print(table)
    if catalog.addons:
        table = Table("add-on", "price", "buckets", "plans", "repeatable")
        for name, addon in sorted(catalog.addons.items()):
            table.add_row(name, f"{addon.price} {catalog.currency}",
                          ", ".join(f"{b.bucket} {b.amount} {b.unit} {b.validity or ''}" for b in addon.buckets),
                          ", ".join(addon.plans) or "any", "yes" if addon.repeatable else "no")
        cli.console.print(table)
    if catalog.promotions:
        table = Table("promotion", "kind", "when", "plans", "runs")
        for name, p in sorted(catalog.promotions.items()):
            when = p.event if p.kind == "bonus" else f"{p.percent}% off rating groups {p.rating_groups}"
            table.add_row(name, p.kind, when, ", ".join(p.plans) or "any",
                          f"{p.start or '-'} .. {p.until or '-'}")
        cli.console.print(table)
    cli.console.print(f"catalog version {stored.version}")


@plan_app.command("show")
def plan_show(name: str, config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """One plan with its add-ons and promotions."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main():
        async with cli.StoreSession(cfg) as store:
            stored = await _stored(store)
        catalog = stored.catalog
        if name not in catalog.plans:
            raise cli.CliError(f"no plan {name!r} in the catalog (it has {', '.join(sorted(catalog.plans))})")
        return {
            "name": name, "currency": catalog.currency, "plan": msgspec.to_builtins(catalog.plans[name]),
            "ratecard_plan": catalog.plans[name].ratecard_plan or name,
            "addons": {a: msgspec.to_builtins(v) for a, v in catalog.addons.items() if not v.plans or name in v.plans},
            "promotions": {p: msgspec.to_builtins(v) for p, v in catalog.promotions.items()
                           if not v.plans or name in v.plans},
        }

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
        return
    plan = result["plan"]
    cli.console.print(f"[bold]{name}[/bold] (rate card plan {result['ratecard_plan']}): "
                      f"{plan['recurring_fee']} {result['currency']} per {plan['period']}  {plan['description']}")
    for a in plan["allowances"]:
        rollover = f", rollover up to {a['rollover_cap']:,}" if a.get("rollover_cap") else ""
        cli.console.print(f"  includes {a['bucket']}: {a['amount']:,} {a['unit']} per period for rating groups "
                          f"{a['rating_groups'] or 'all'}{rollover}")
    for label in ("final_unit_action", "fair_usage"):
        if plan.get(label):
            cli.console.print(f"  {label.replace('_', ' ')}: {plan[label]}")
    for addon, value in result["addons"].items():
        cli.console.print(f"  add-on {addon}: {value['price']} {result['currency']}")
    for promotion, value in result["promotions"].items():
        cli.console.print(f"  promotion {promotion}: {value['kind']} {value.get('description', '')}")


@plan_app.command("renew")
def plan_renew(now: str = typer.Option(None, "--now", help="Renew as of this time (epoch ms or ISO 8601; "
                                       "default: the clock)"),
               config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Renew every subscriber whose period has ended: fee and the next period's allowances; a prepaid subscriber
    who cannot pay is suspended until a top-up covers it (renewed by a later run)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from ocs.catalog import RenewalSweep
        from ocs.clock import FixedClock

        at = _now(now)
        async with cli.StoreSession(cfg) as store:
            await _stored(store)
            return await RenewalSweep(store, FixedClock(at)).sweep()

    result = cli.run_async(main)
    if json:
        cli.emit_json(result)
    else:
        cli.console.print(f"renewed {result['renewed']}, unpaid {result['unpaid']}, skipped {result['skipped']}")


# ---- ocs addon ---------------------------------------------------------------------------------------------


@addon_app.command("buy")
def addon_buy(msisdn: str, addon: str,
              ref: str = typer.Option(None, "--ref", help="Idempotency reference (default: a new one)"),
              at: str = AtOption, config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Buy an add-on: its price from the money balance and its buckets, in one step (refused, with nothing
    changed, when the balance does not cover it)."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.store import CatalogRefused, UnknownSubscriber
        from ocs.catalog import PlanError, buy_addon

        reference = ref or uuid.uuid4().hex
        async with cli.StoreSession(cfg) as store:
            stored = await _stored(store)
            try:
                result = await buy_addon(store, stored.catalog, msisdn, addon, reference, _now(at))
            except UnknownSubscriber:
                raise cli.CliError(f"unknown subscriber {msisdn}") from None
            except (CatalogRefused, PlanError) as exc:
                raise cli.CliError(f"{msisdn}: {exc}") from None
            reauth = []
            if result.applied:
                from ocs.routing import reauth_subscriber

                reauth = await reauth_subscriber(store, msisdn, cfg.diameter.answer_timeout_seconds + 1)
        return {"msisdn": msisdn, "addon": addon, "reference": reference, "applied": result.applied,
                "duplicate": result.duplicate, "buckets": result.buckets, "bonuses": result.bonuses,
                "balance": result.balance, "currency": stored.catalog.currency,
                "digits": stored.catalog.currency_minor_digits, "reauth": msgspec.to_builtins(reauth)}

    result = cli.run_async(main)
    if json:
        cli.emit_json({key: value for key, value in result.items() if key != "digits"})
    elif result["applied"]:
        cli.console.print(f"{msisdn}: bought {addon} (buckets {', '.join(result['buckets'])}), balance "
                          f"{_money_text(result['balance'], result['digits'])} {result['currency']}")
    else:
        cli.console.print(f"{msisdn}: reference {result['reference']} was already used; nothing changed")


@addon_app.command("list")
def addon_list(config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """The catalog's add-ons."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main():
        async with cli.StoreSession(cfg) as store:
            return await _stored(store)

    catalog = cli.run_async(main).catalog
    if json:
        cli.emit_json({name: msgspec.to_builtins(a) for name, a in catalog.addons.items()})
        return
    for name, a in sorted(catalog.addons.items()):
        cli.console.print(f"{name}: {a.price} {catalog.currency} ({', '.join(a.plans) or 'any plan'}) {a.description}")


# ---- ocs subscriber change-plan ----------------------------------------------------------------------------


def change_plan(msisdn: str, plan: str, at: str = AtOption, config: Path = ConfigOption,
                json: bool = JsonOption) -> None:
    """Move a subscriber to another catalog plan now: the new plan's full fee and allowances for a period
    starting now (no proration), the old plan's period allowances end (carried-over units, add-ons and
    bonuses stay); the open sessions get a RAR so the next request is rated with the new plan."""
    cli = _cli()
    cfg = cli.get_config(config)

    async def main() -> dict:
        from balances.store import CatalogRefused, UnknownSubscriber
        from ocs.catalog import PlanError
        from ocs.catalog import change_plan as change
        from ocs.clock import Clock
        from ocs.routing import reauth_subscriber

        when = _now(at)
        if when > Clock().now_ms() + 60_000:
            raise cli.CliError("--at is in the future: a plan change takes effect when it is made")
        async with cli.StoreSession(cfg) as store:
            stored = await _stored(store)
            try:
                result = await change(store, stored.catalog, msisdn, plan, when)
            except UnknownSubscriber:
                raise cli.CliError(f"unknown subscriber {msisdn}") from None
            except (CatalogRefused, PlanError) as exc:
                raise cli.CliError(f"{msisdn}: {exc}") from None
            reauth = await reauth_subscriber(store, msisdn, cfg.diameter.answer_timeout_seconds + 1)
            record = await store.plan_record(msisdn) or {}
        return {"msisdn": msisdn, "plan": plan, "rating_plan": record.get("plan"), "old_rating_plan": result.old_plan,
                "period_start": int(record.get("period_start", 0)), "period_end": int(record.get("period_end", 0)),
                "buckets": result.buckets, "bonuses": result.bonuses, "balance": result.balance,
                "currency": stored.catalog.currency, "digits": stored.catalog.currency_minor_digits,
                "reauth": msgspec.to_builtins(reauth)}

    result = cli.run_async(main)
    if json:
        cli.emit_json({key: value for key, value in result.items() if key != "digits"})
        return
    cli.console.print(f"{msisdn}: now on plan {plan} (buckets {', '.join(result['buckets']) or '-'}), balance "
                      f"{_money_text(result['balance'], result['digits'])} {result['currency']}")
    for item in result["reauth"]:
        cli.console.print(f"  RAR {item['session_id']}: {cli._outcome_text(item)}")
