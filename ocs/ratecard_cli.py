"""`ocs ratecard validate|load|show` and `ocs rate` (price enquiry), registered on the `ocs` app by
`register(app)`.

Every command takes `--json` (one JSON document on stdout); bad input prints one line on stderr, exits 2
and changes nothing. Rate cards are read through ocs.ratecard_store (the active versions under the data
directory, else the configured card); `ocs rate` needs no running server: it takes `--plan`, or reads the
subscriber's plan from the balance store (read only). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

__all__ = ["parse_usage", "ratecard_app", "register"]

ratecard_app = typer.Typer(no_args_is_help=True, help="Rate cards: validate, load a new version, show")

ConfigOption = typer.Option(None, "--config", "-c", help="OCS TOML configuration file")
JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables")

_USAGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SECONDS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_BYTES = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def register(app: typer.Typer) -> None:
    """Add `ocs ratecard ...` and `ocs rate` to the `ocs` app."""
    app.add_typer(ratecard_app, name="ratecard")
    app.command("rate")(rate)


class _Failure(Exception):
    """Bad input, worded for the operator."""


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def _emit_json(value: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def _console():
    from rich.console import Console

    return Console()


def _config(path: Path | None):
    from ocs.config import load_config

    return load_config(path)


def _guarded(work):
    """Run `work`, turning operator errors into one line and exit 2."""
    from ocs.config import ConfigError
    from ratecards import RateCardError, UnknownRate

    try:
        return work()
    except (RateCardError, ConfigError, UnknownRate, _Failure, ValueError) as exc:
        _fail(str(exc).strip("'\""))
        raise


def parse_usage(text: str, unit: str) -> int:
    """ "5m", "90s", "1h", "100MB", "1.5GiB", "3" → whole units of the rate (seconds, bytes or events)."""
    found = _USAGE.match(text)
    table = {"seconds": _SECONDS, "bytes": _BYTES, "events": {"": 1}}[unit]
    suffix = found.group(2).lower() if found else ""
    if not found or suffix not in table:
        known = ", ".join(s or "(none)" for s in table)
        raise _Failure(f"usage {text!r} is not an amount of {unit} (suffixes: {known})")
    value = Decimal(found.group(1)) * table[suffix]
    if value != value.to_integral_value():
        raise _Failure(f"usage {text!r} is not a whole number of {unit}")
    return int(value)


def _parse_at(text: str | None, tz) -> float:
    if text is None:
        return time.time()
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _Failure(f"--at {text!r} is not an ISO 8601 date-time such as 2026-12-01T21:58:00+01:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)  # a local time is read in the rate card's time zone
    return when.timestamp()


def _money(micro: int, digits: int) -> str:
    value = Decimal(micro) / 1_000_000
    return f"{value:.{digits}f}" if micro % 10 ** (6 - digits) == 0 else f"{value:f}"


def _local(t: float | None, tz) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz).isoformat(timespec="seconds")


def _summary(card) -> dict[str, Any]:
    from ratecards import effective_epoch

    rates = [r for p in card.plans.values() for r in p.rates]
    return {
        "version": card.version, "effective_from": effective_epoch(card), "currency": card.currency,
        "timezone": card.timezone, "rounding": card.rounding, "rounding_step": card.rounding_step,
        "plans": len(card.plans), "rates": len(rates), "tariffs": sum(len(r.tariffs) for r in rates),
        "bands": len(card.bands), "holidays": len(card.holidays), "zones": len(card.zones),
        "zone_prefixes": sum(len(v) for v in card.zones.values()), "destination_groups": len(card.destinations),
        "destination_prefixes": sum(len(v) for v in card.destinations.values()),
    }


# ---- ocs ratecard validate / load / show -------------------------------------------------------------------


@ratecard_app.command("validate")
def validate(file: Path, json: bool = JsonOption) -> None:
    """Check a rate card file; errors name the line and key (card.toml:33: plans.x.rates[1].increment: ...)."""
    from ratecards import compile_card, load_ratecard

    def work() -> dict[str, Any]:
        card = load_ratecard(file)
        compile_card(card)
        return {"file": str(file), "valid": True, **_summary(card), "_tz": _tz(card)}

    result = _guarded(work)
    tz = result.pop("_tz")
    if json:
        _emit_json(result)
        return
    start = f", effective from {_local(result['effective_from'], tz)}" if result["effective_from"] is not None \
        else ""
    _console().print(
        f"{file}: valid — version {result['version']}{start}; {result['plans']} plan(s), {result['rates']} "
        f"rate(s), {result['tariffs']} tariff(s), {result['bands']} band(s), {result['zones']} zone(s) "
        f"({result['zone_prefixes']} prefixes), {result['destination_groups']} destination group(s) "
        f"({result['destination_prefixes']} prefixes)", highlight=False)


@ratecard_app.command("load")
def load(
    file: Path,
    now: str = typer.Option(None, "--now", help="Treat this ISO 8601 instant as now (default: the clock)"),
    interval: float = typer.Option(None, "--reload-interval",
                                   help="Seconds a new version must lie ahead (default: the OCS's, 60)"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Add a rate card version to the active card (<data_dir>/ratecards/): validated, taking effect at least one
    reload interval from now; prints what it changes. There is no Redis-side store yet: OCS processes read the
    files (see docs/ratecards.md)."""
    from zoneinfo import ZoneInfo

    from ocs.ratecard_store import install_version

    def work():
        cfg = _config(config)
        instant = _parse_at(now, ZoneInfo("UTC"))
        if interval is not None and interval < 0:
            raise _Failure("--reload-interval must not be negative")
        return install_version(cfg, file, now=instant, interval=interval)

    result = _guarded(work)
    if json:
        import msgspec

        _emit_json(msgspec.to_builtins(result))
        return
    console = _console()
    if not result.changed:
        console.print(f"version {result.version} is already loaded: nothing changed", highlight=False)
        return
    if result.seeded:
        console.print(f"the configured rate card became the first version: {result.seeded}", highlight=False)
    when = "in force since forever" if result.effective_from is None else (
        f"takes effect {datetime.fromtimestamp(result.effective_from).astimezone().isoformat(timespec='seconds')}")
    console.print(f"loaded version {result.version} ({when}) → {result.path}", highlight=False)
    for line in result.changes:
        console.print(f"  {line}", highlight=False)


def _describe_rate(rate, currency: str) -> str:
    if not rate.credit_control:
        return "outside credit control (free, 4011)"
    text = f"{rate.price} {currency} per {rate.per} {rate.unit}, increment {rate.increment}"
    if rate.first_increment:
        text = f"{rate.price} {currency} per {rate.per} {rate.unit}, {rate.first_increment}/{rate.increment}"
    extras = [f"{key} {getattr(rate, key)}" for key in ("setup_fee", "minimum_charge", "cap")
              if getattr(rate, key) is not None]
    if getattr(rate, "free_units", None):
        extras.append(f"free_units {rate.free_units}")
    if getattr(rate, "tiers", None):
        extras.append("tiers " + ", ".join(f"from {t.start}: {t.price}" for t in rate.tiers))
    if getattr(rate, "barred", None):
        extras.append("barred")
    return "; ".join([text, *extras])


@ratecard_app.command("show")
def show(
    plan: str = typer.Option(None, "--plan", help="Only this plan"),
    at: str = typer.Option(None, "--at", help="Show the version in force at this ISO 8601 instant (default now)"),
    file: Path = typer.Option(None, "--ratecard", help="A rate card file instead of the active card"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """The active rate card: its versions, and the plans, rates and tariffs of the version in force."""
    import msgspec

    from ratecards import compile_card, effective_epoch, load_ratecard

    def work() -> dict[str, Any]:
        if file is not None:
            cards = [load_ratecard(file)]
        else:
            from ocs.ratecard_store import load_active_cards

            cards = load_active_cards(_config(config))
        rater = compile_card(cards)
        instant = _parse_at(at, _tz(rater.cards[-1]))
        card = rater.version_at(instant)
        if plan is not None and plan not in card.plans:
            raise _Failure(f"unknown plan {plan!r} in version {card.version} (plans: {', '.join(sorted(card.plans))})")
        plans = {name: msgspec.to_builtins(p) for name, p in card.plans.items() if plan is None or name == plan}
        return {"versions": [{"version": c.version, "effective_from": effective_epoch(c),
                              "in_force": c.version == card.version} for c in rater.cards],
                "in_force": card.version, "currency": card.currency, "timezone": card.timezone,
                "bands": msgspec.to_builtins(card.bands), "zones": {z: len(v) for z, v in card.zones.items()},
                "destinations": {d: len(v) for d, v in card.destinations.items()}, "plans": plans,
                "_card": card}

    result = _guarded(work)
    card = result.pop("_card")
    if json:
        _emit_json(result)
        return
    from rich.table import Table

    console = _console()
    versions = Table("version", "effective from", "in force")
    for v in result["versions"]:
        versions.add_row(v["version"], _local(v["effective_from"], _tz(card)) or "(always)",
                         "yes" if v["in_force"] else "")
    console.print(versions)
    if card.bands:
        console.print("bands: " + "; ".join(f"{b.name} {','.join(b.days)} {b.start}-{b.end}" for b in card.bands)
                      + f" ({card.timezone})", highlight=False)
    if card.zones:
        console.print("zones: " + ", ".join(f"{z} ({n})" for z, n in result["zones"].items()), highlight=False)
    if card.destinations:
        console.print("destinations: " + ", ".join(f"{d} ({n})" for d, n in result["destinations"].items()),
                      highlight=False)
    for name in result["plans"]:
        table = Table("rating group", "service", "price", "tariffs", title=f"plan {name}", title_justify="left")
        for rate in card.plans[name].rates:
            tariffs = "\n".join(f"{t.name or '-'}: {_describe_rate(_merged(rate, t), card.currency)}"
                                for t in rate.tariffs)
            table.add_row(str(rate.rating_group), rate.service, _describe_rate(rate, card.currency), tariffs)
        console.print(table)


def _merged(rate, tariff):
    import msgspec

    from ratecards.compile import TARIFF_PRICE_KEYS

    return msgspec.structs.replace(rate, **{k: getattr(tariff, k) for k in TARIFF_PRICE_KEYS
                                            if getattr(tariff, k) is not None})


def _tz(card):
    from ratecards.compile import card_timezone

    return card_timezone(card)


# ---- ocs rate --------------------------------------------------------------------------------------------


def _pick_rating_group(card, plan: str, rating_group: int | None, service: str | None) -> int:
    rates = card.plans[plan].rates
    if rating_group is not None:
        if not any(r.rating_group == rating_group for r in rates):
            raise _Failure(f"plan {plan} has no rating group {rating_group} "
                           f"(it has {', '.join(str(r.rating_group) for r in rates)})")
        return rating_group
    if service is not None:
        for rate in rates:
            if rate.service.lower() == service.lower():
                return rate.rating_group
        raise _Failure(f"plan {plan} has no service {service!r} (services: {', '.join(r.service for r in rates)})")
    if card.plans[plan].default_rating_group is not None:
        return card.plans[plan].default_rating_group
    raise _Failure("name the rating group with --rating-group or --service")


def _plan_of(config: Path | None, msisdn: str) -> str:
    """The subscriber's plan from the balance store (read only)."""
    from ocs.cli import StoreSession, run_async

    cfg = _config(config)

    async def main() -> str | None:
        async with StoreSession(cfg) as store:
            sub = await store.subscriber(msisdn)
        return sub.plan if sub is not None else None

    plan = run_async(main)
    if plan is None:
        raise _Failure(f"unknown subscriber {msisdn}")
    return plan


def rate(
    usage: str = typer.Option(..., "--usage", help="Amount to price: 90s, 5m, 1h, 100MB, 1.5GiB, 3 (events)"),
    msisdn: str = typer.Option(None, "--msisdn", help="Price for this subscriber's plan (read from the balance store)"),
    plan: str = typer.Option(None, "--plan", help="Price for this plan (no subscriber lookup)"),
    rating_group: int = typer.Option(None, "--rating-group", help="Rating group (default: the plan's default)"),
    service: str = typer.Option(None, "--service", help="Or the rate's service name, e.g. voice"),
    at: str = typer.Option(None, "--at", help="Start of the usage, ISO 8601 (a local time is in the card's zone)"),
    destination: str = typer.Option(None, "--destination", help="Called number (Called-Party-Address)"),
    plmn: str = typer.Option(None, "--plmn", help="Serving network MCC-MNC (roaming zone), e.g. 20801"),
    zone: str = typer.Option(None, "--zone", help="Roaming zone name instead of --plmn"),
    context: str = typer.Option(None, "--context", help="Service-Context-Id, e.g. 32260@3gpp.org, or voice/data/sms"),
    service_identifier: int = typer.Option(None, "--service-identifier"),
    used_before: int = typer.Option(0, "--used-before", help="Units already rated in the rate's scope"),
    file: Path = typer.Option(None, "--ratecard", help="A rate card file instead of the active card"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Price enquiry: what usage would cost, exactly as online charging rates it (no server needed)."""
    from ratecards import compile_card, load_ratecard

    def work() -> dict[str, Any]:
        if (msisdn is None) == (plan is None):
            raise _Failure("give either --msisdn or --plan")
        if used_before < 0:
            raise _Failure("--used-before must not be negative")
        if file is not None:
            cards = [load_ratecard(file)]
        else:
            from ocs.ratecard_store import load_active_cards

            cards = load_active_cards(_config(config))
        rater = compile_card(cards)
        instant = _parse_at(at, _tz(rater.cards[-1]))
        card = rater.version_at(instant)
        plan_name = plan if plan is not None else _plan_of(config, msisdn)
        if plan_name not in card.plans:
            raise _Failure(f"unknown plan {plan_name!r} in rate card version {card.version}")
        group = _pick_rating_group(card, plan_name, rating_group, service)
        unit = next(r.unit for r in card.plans[plan_name].rates if r.rating_group == group)
        units = parse_usage(usage, unit)
        keys = {"destination": destination, "plmn": plmn, "zone": zone, "service_context": context,
                "service_identifier": service_identifier}
        schedule, _ = rater.schedule_for(plan_name, group, at=instant, **keys)
        quote = rater.quote(plan_name, group, units, at=instant, used_before=used_before, **keys)
        import msgspec

        return {"msisdn": msisdn, "barred": schedule.barred, "credit_control": schedule.credit_control,
                **msgspec.to_builtins(quote), "_tz": _tz(card)}

    result = _guarded(work)
    tz = result.pop("_tz")
    if json:
        _emit_json(result)
        return
    console = _console()
    digits = result["minor_digits"]
    who = f"subscriber {result['msisdn']}, " if result["msisdn"] else ""
    console.print(f"{who}plan {result['plan']}, rating group {result['rating_group']}: {result['units']} "
                  f"{result['unit']} from {_local(result['parts'][0]['start'], tz)}", highlight=False)
    for part in result["parts"]:
        console.print(f"  {_local(part['start'], tz)}  {part['units']} {result['unit']}  "
                      f"tariff {part['tariff'] or '(rate)'}  version {part['version']}  "
                      f"{_money(part['amount'], digits)} {result['currency']}", highlight=False)
    note = ""
    if result["barred"]:
        note = "  (barred: online charging answers 4010)"
    elif not result["credit_control"]:
        note = "  (outside credit control: free, 4011)"
    console.print(f"total {_money(result['amount'], digits)} {result['currency']}{note}", highlight=False)
    if result["next_change_at"] is not None:
        console.print(f"next tariff change {_local(result['next_change_at'], tz)}", highlight=False)
