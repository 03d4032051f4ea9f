"""The `ocs` command line: serve, provision, top up, inspect, write CDRs, simulate.

Every command takes `--config FILE` (else defaults + OCS_* environment) and `--json` (one JSON document on
stdout instead of tables). Bad input gets one clear line on stderr, a non-zero exit, and changes nothing.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from billing.cli import register as register_billing
from ocs.balance_cli import register as register_balances
from ocs.billshock import register as register_notifications
from ocs.catalog_cli import register as register_catalog
from ocs.config import Config, ConfigError, load_config
from ocs.ratecard_cli import register as register_ratecards

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Online Charging Server (Diameter Gy/Ro)")
subscriber_app = typer.Typer(no_args_is_help=True, help="Provision and inspect subscribers")
app.add_typer(subscriber_app, name="subscriber")
session_app = typer.Typer(no_args_is_help=True, help="Server-initiated messages to the gateway of a session")
app.add_typer(session_app, name="session")
register_billing(app)  # bill, invoice, payment, account, cdr, reconcile (billing/cli.py)
register_ratecards(app)  # ratecard validate|load|show, rate (ocs/ratecard_cli.py)
register_balances(app, subscriber_app)  # audit, adjust, bucket, group, subscriber set-status|set-account
register_catalog(app, subscriber_app)  # plan load|list|show|renew, addon buy|list, subscriber change-plan
register_notifications(app)  # notifications (ocs/billshock.py)

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

ConfigOption = typer.Option(None, "--config", "-c", help="TOML configuration file")
JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables")

DEMO_MSISDNS = [f"4917000000{n:02d}" for n in range(1, 11)]
DEMO_IMSIS = [f"2620100000000{n:02d}" for n in range(1, 11)]
DEMO_MONEY = Decimal("10.00")


class CliError(Exception):
    """A problem worded for the operator: printed as one line, exit code 2."""


def fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def emit_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def get_config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    import uvloop

    try:
        return uvloop.run(factory())
    except CliError as exc:
        fail(str(exc))
        raise


def currency_of(config: Config) -> tuple[str, int]:
    from ratecards import load_ratecard

    card = load_ratecard(config.charging.ratecard)
    return card.currency, card.currency_minor_digits


def parse_amount(text: str, minor_digits: int, currency: str) -> int:
    """A positive decimal amount in the currency → integer micro-units; never float."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise CliError(f"amount {text!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise CliError(f"amount must be a positive number, got {text!r}")
    if value != value.quantize(Decimal(1).scaleb(-minor_digits)):
        raise CliError(f"amount {text} has more decimals than {currency} allows ({minor_digits})")
    micro = value * 1_000_000
    if micro > 10**15:
        raise CliError(f"amount {text} is too large")
    return int(micro)


def format_money(micro: int, minor_digits: int = 2) -> str:
    value = Decimal(micro) / 1_000_000
    return f"{value:.{max(minor_digits, 2)}f}" if micro % 10 ** (6 - minor_digits) == 0 else f"{value:f}"


class StoreSession:
    """A BalanceStore for one CLI command: the configured Redis, the running embedded one, or a temporary
    embedded one on the same data directory (its AOF holds the data)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.embedded = None
        self.store = None

    async def __aenter__(self):
        from balances.store import BalanceStore
        from ocs.server import embedded_url_file

        url = self.config.redis.url
        if url is None:
            url_file = embedded_url_file(self.config)
            if url_file.is_file() and await _reachable(url_file.read_text().strip()):
                url = url_file.read_text().strip()
            else:
                from balances.embedded import EmbeddedValkey

                self.embedded = EmbeddedValkey(Path(self.config.data_dir) / "valkey")
                url = self.embedded.start()
        try:
            self.store = await BalanceStore.connect(url, partitions=self.config.redis.partitions,
                                                    cluster=self.config.redis.cluster)
        except Exception as exc:
            if self.embedded is not None:
                self.embedded.stop()
            raise CliError(f"cannot connect to Redis at {url}: {exc}") from None
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        if self.store is not None:
            await self.store.close()
        if self.embedded is not None:
            self.embedded.stop()


async def _reachable(url: str) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        await client.ping()
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


# ---- serve ---------------------------------------------------------------------------------------------


async def provision_demo(store, config: Config) -> int:
    """The demo subscribers (idempotent: existing ones are left as they are)."""
    from balances.model import Subscriber
    from ocs.catalog_cli import load_demo_catalog
    from ratecards import initial_allowances, load_ratecard

    card = load_ratecard(config.charging.ratecard)
    if "demo" not in card.plans:
        raise CliError("the rate card has no plan 'demo' for the demo data")
    await load_demo_catalog(store, config)  # ocs/demo/catalog.toml, when no catalog is loaded
    allowances = initial_allowances(card, "demo")
    created = 0
    for msisdn, imsi in zip(DEMO_MSISDNS, DEMO_IMSIS, strict=True):
        if await store.subscriber(msisdn) is None:
            await store.provision(Subscriber(msisdn=msisdn, imsi=imsi, plan="demo", currency=card.currency),
                                  money=int(DEMO_MONEY * 1_000_000), allowances=allowances)
            created += 1
    return created


@app.command()
def serve(
    config: Path = ConfigOption,
    demo: bool = typer.Option(False, "--demo", help="Load the demo plan and subscribers 491700000001-10"),
    log_level: str = typer.Option("INFO", "--log-level"),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes sharing the port (SO_REUSEPORT)"),
) -> None:
    """Run the Diameter server (embedded Valkey when no Redis URL is configured)."""
    from ocs.server import ServerApp

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = get_config(config)
    if workers > 1:
        _serve_workers(cfg, workers, demo, log_level)
        return

    async def main() -> None:
        server = ServerApp(cfg)
        if demo:
            original_start = server.start

            async def start_with_demo() -> None:
                await original_start()
                created = await provision_demo(server.store, cfg)
                logging.getLogger("ocs").info("demo data ready (%d subscribers created)", created)

            server.start = start_with_demo  # type: ignore[method-assign]
        await server.serve_forever()

    from ratecards import RateCardError

    try:
        run_async(main)
    except (ConfigError, RateCardError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start: {exc}")


def _serve_workers(cfg: Config, workers: int, demo: bool, log_level: str) -> None:
    """`serve --workers N`: the supervisor of ocs.workers (the demo data provisioned once, before the workers)."""
    from ocs.workers import WorkerPool, WorkerStartError
    from ratecards import RateCardError

    def provision(url: str) -> None:
        import msgspec

        async def main() -> None:
            async with StoreSession(msgspec.structs.replace(
                    cfg, redis=msgspec.structs.replace(cfg.redis, url=url))) as store:
                created = await provision_demo(store, cfg)
            logging.getLogger("ocs").info("demo data ready (%d subscribers created)", created)

        run_async(main)

    try:
        code = WorkerPool(cfg, workers, log_level=log_level, prepare=provision if demo else None).run()
    except (ConfigError, RateCardError, WorkerStartError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start: {exc}")
    else:
        raise typer.Exit(code)


# ---- subscribers ---------------------------------------------------------------------------------------


def _check_msisdn(msisdn: str) -> str:
    if not msisdn.isdigit() or not 5 <= len(msisdn) <= 15:
        raise CliError(f"MSISDN must be 5 to 15 digits, got {msisdn!r}")
    return msisdn


def _check_imsi(imsi: str | None) -> str | None:
    if imsi is not None and (not imsi.isdigit() or not 6 <= len(imsi) <= 15):
        raise CliError(f"IMSI must be 6 to 15 digits, got {imsi!r}")
    return imsi


@subscriber_app.command("add")
def subscriber_add(
    msisdn: str,
    imsi: str = typer.Option(None, "--imsi"),
    plan: str = typer.Option("demo", "--plan"),
    money: str = typer.Option("0", "--money", help="Initial money balance"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Create a subscriber with an optional money balance: on a catalog plan (ocs plan load) with its first
    period (fee and allowances), else on a rate card plan with the rate card's allowances."""
    cfg = get_config(config)

    async def main() -> dict:
        from balances.model import Subscriber
        from ocs.catalog_cli import catalog_plan, provision_plan
        from ocs.clock import Clock
        from ratecards import initial_allowances, load_ratecard

        _check_msisdn(msisdn)
        _check_imsi(imsi)
        card = load_ratecard(cfg.charging.ratecard)
        amount = 0 if money.strip() in ("0", "0.00") else parse_amount(money, card.currency_minor_digits,
                                                                      card.currency)
        async with StoreSession(cfg) as store:
            catalog = await catalog_plan(store, plan)
            if catalog is None and plan not in card.plans:
                raise CliError(f"unknown plan {plan!r} (known: {', '.join(sorted(card.plans))})")
            if await store.subscriber(msisdn) is not None:
                raise CliError(f"subscriber {msisdn} already exists")
            if imsi is not None and await store.locate_imsi(imsi) is not None:
                raise CliError(f"IMSI {imsi} already belongs to another subscriber")
            sub = Subscriber(msisdn=msisdn, imsi=imsi, plan=plan, currency=card.currency)
            if catalog is not None:
                first = await provision_plan(store, catalog, sub, amount, Clock().now_ms())
                return {"msisdn": msisdn, "imsi": imsi, "plan": plan, "money": amount, **first}
            partition = await store.provision(sub, money=amount, allowances=initial_allowances(card, plan))
        return {"msisdn": msisdn, "imsi": imsi, "plan": plan, "partition": partition, "money": amount}

    result = run_async(main)
    if json:
        emit_json(result)
    else:
        console.print(f"subscriber {msisdn} added (plan {plan}, partition {result['partition']})")


@subscriber_app.command("show")
def subscriber_show(msisdn: str, config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Show a subscriber and its balances."""
    cfg = get_config(config)

    async def main() -> dict:
        async with StoreSession(cfg) as store:
            sub = await store.subscriber(msisdn)
            if sub is None:
                raise CliError(f"unknown subscriber {msisdn}")
            buckets = await store.balances(msisdn)
            record = await store.plan_record(msisdn) or {}
        result = {"subscriber": msgspec.to_builtins(sub), "buckets": msgspec.to_builtins(buckets)}
        if "product" in record:  # a catalog plan (docs/catalog.md)
            result["catalog_plan"] = {"plan": record["product"], "period_start": int(record["period_start"]),
                                      "period_end": int(record["period_end"])}
        return result

    result = run_async(main)
    if json:
        emit_json(result)
        return
    sub = result["subscriber"]
    console.print(f"[bold]{sub['msisdn']}[/bold] IMSI {sub.get('imsi') or '-'} plan {sub['plan']} "
                  f"status {sub['status']} partition {sub.get('partition')}")
    if "catalog_plan" in result:
        from datetime import UTC, datetime

        period = result["catalog_plan"]
        start, end = (datetime.fromtimestamp(period[key] // 1000, UTC).isoformat() for key in ("period_start",
                                                                                              "period_end"))
        console.print(f"catalog plan {period['plan']}, period {start} .. {end}")
    _print_buckets(result["buckets"], sub.get("currency", ""))


@subscriber_app.command("import")
def subscriber_import(file: Path, config: Path = ConfigOption, json: bool = JsonOption) -> None:
    """Bulk-provision from a CSV with columns msisdn,imsi,plan[,money]. Checked whole before anything is written."""
    from rich.progress import Progress

    cfg = get_config(config)

    async def main() -> dict:
        from balances.model import Subscriber
        from ratecards import initial_allowances, load_ratecard

        card = load_ratecard(cfg.charging.ratecard)
        if not file.is_file():
            raise CliError(f"file not found: {file}")
        rows: list[tuple[Subscriber, int, dict[str, int]]] = []
        seen: set[str] = set()
        with file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "msisdn" not in reader.fieldnames:
                raise CliError(f"{file}: the header must name at least the column msisdn")
            for line, row in enumerate(reader, start=2):
                try:
                    msisdn = _check_msisdn((row.get("msisdn") or "").strip())
                    imsi = _check_imsi((row.get("imsi") or "").strip() or None)
                    plan = (row.get("plan") or "demo").strip()
                    if plan not in card.plans:
                        raise CliError(f"unknown plan {plan!r}")
                    money_text = (row.get("money") or "0").strip()
                    money = 0 if Decimal(money_text or "0") == 0 else parse_amount(
                        money_text, card.currency_minor_digits, card.currency)
                except (CliError, InvalidOperation) as exc:
                    raise CliError(f"{file}:{line}: {exc}") from None
                if msisdn in seen:
                    raise CliError(f"{file}:{line}: MSISDN {msisdn} appears twice")
                seen.add(msisdn)
                rows.append((Subscriber(msisdn=msisdn, imsi=imsi, plan=plan, currency=card.currency), money,
                             initial_allowances(card, plan)))
        async with StoreSession(cfg) as store:
            for sub, _, _ in rows[:1000] if len(rows) <= 1000 else []:
                if await store.subscriber(sub.msisdn) is not None:
                    raise CliError(f"subscriber {sub.msisdn} already exists; nothing imported")
            created = 0
            with Progress(console=err_console, disable=json) as progress:
                task = progress.add_task("importing", total=len(rows))
                for start in range(0, len(rows), 1000):
                    chunk = rows[start:start + 1000]
                    created += await store.provision_many(chunk)
                    progress.update(task, advance=len(chunk))
        return {"file": str(file), "rows": len(rows), "created": created}

    result = run_async(main)
    if json:
        emit_json(result)
    else:
        console.print(f"imported {result['created']} of {result['rows']} subscribers from {file}")


# ---- money ---------------------------------------------------------------------------------------------


@app.command(context_settings={"ignore_unknown_options": True})
def topup(
    msisdn: str,
    amount: str,
    ref: str = typer.Option(None, "--ref", help="Idempotency reference: the same ref is applied once"),
    config: Path = ConfigOption,
    json: bool = JsonOption,
) -> None:
    """Add money to a subscriber's balance; a RAR then goes to the gateway of each of its open sessions."""
    cfg = get_config(config)

    async def main() -> dict:
        from balances.store import UnknownSubscriber
        from ocs.clock import Clock
        from ocs.routing import reauth_subscriber

        currency, digits = currency_of(cfg)
        micro = parse_amount(amount, digits, currency)
        async with StoreSession(cfg) as store:
            try:
                result = await store.topup(msisdn, micro, ref, Clock().now_ms())
            except UnknownSubscriber:
                raise CliError(f"unknown subscriber {msisdn}") from None
            reauth, bonuses = [], []
            if result.applied:
                from ocs.catalog_cli import topup_promotions

                bonuses = await topup_promotions(store, msisdn, micro, ref, Clock().now_ms())
                reauth = await reauth_subscriber(store, msisdn, cfg.diameter.answer_timeout_seconds + 1)
        return {"msisdn": msisdn, "amount": micro, "applied": result.applied, "balance": result.balance,
                "reference": ref, "currency": currency, "digits": digits, "bonuses": bonuses,
                "reauth": msgspec.to_builtins(reauth)}

    result = run_async(main)
    if json:
        emit_json({k: v for k, v in result.items() if k != "digits"})
    elif result["applied"]:
        console.print(f"{msisdn}: +{format_money(result['amount'], result['digits'])} {result['currency']}, "
                      f"balance {format_money(result['balance'], result['digits'])} {result['currency']}")
        for item in result["reauth"]:
            console.print(f"  RAR {item['session_id']}: {_outcome_text(item)}")
    else:
        console.print(f"{msisdn}: reference {ref} was already applied; nothing changed "
                      f"(balance {format_money(result['balance'], result['digits'])} {result['currency']})")


def _print_buckets(buckets: list[dict], currency: str) -> None:
    table = Table("bucket", "balance", "reserved", "available")
    for b in buckets:
        if b["bucket"] == "money" or b.get("unit") == "money":
            fmt = lambda v: f"{format_money(v)} {currency}"  # noqa: E731
        else:
            fmt = lambda v: f"{v:,}"  # noqa: E731
        table.add_row(b["bucket"], fmt(b["balance"]), fmt(b["reserved"]), fmt(b["balance"] - b["reserved"]))
    console.print(table)


@app.command()
def balance(msisdn: str, config: Path = ConfigOption, json: bool = JsonOption,
            history: bool = typer.Option(False, "--history", help="Every ledger entry of its buckets, with the "
                                         "running balance per bucket")) -> None:
    """Show a subscriber's buckets: balance, reserved and available (--history: explained line by line)."""
    cfg = get_config(config)

    async def main() -> dict:
        async with StoreSession(cfg) as store:
            sub = await store.subscriber(msisdn)
            if sub is None:
                raise CliError(f"unknown subscriber {msisdn}")
            buckets = await store.balances(msisdn)
            lines = await store.history(msisdn) if history else None
        result = {"msisdn": msisdn, "currency": sub.currency, "buckets": msgspec.to_builtins(buckets)}
        if lines is not None:
            result["history"] = lines
        return result

    result = run_async(main)
    if json:
        emit_json(result)
    elif history:
        from ocs.balance_cli import format_history

        units = {b["bucket"]: b.get("unit") for b in result["buckets"]}
        console.print(format_history(result["history"], units, result["currency"], currency_of(cfg)[1]))
        _print_buckets(result["buckets"], result["currency"])
    else:
        _print_buckets(result["buckets"], result["currency"])


@app.command()
def sessions(
    limit: int = typer.Option(100, "--limit"), config: Path = ConfigOption, json: bool = JsonOption
) -> None:
    """Open credit-control sessions with their reservations."""
    cfg = get_config(config)

    async def main() -> list:
        async with StoreSession(cfg) as store:
            return await store.open_sessions(limit)

    result = run_async(main)
    if json:
        emit_json(result)
        return
    table = Table("session", "msisdn", "last activity (ms)", "reservations")
    for s in result:
        table.add_row(str(s.get("session_id")), str(s.get("msisdn")), str(s.get("last")),
                      msgspec.json.encode(s.get("reservations", {})).decode())
    console.print(table)
    console.print(f"{len(result)} open session(s)")


# ---- server-initiated messages -------------------------------------------------------------------------


def _outcome_text(item: dict) -> str:
    if item.get("error"):
        return f"failed: {item['error']}"
    text = f"answered {item.get('result_code')}"
    if item.get("closed"):
        text += " (gateway does not know the session: closed, reservations released)"
    return text


def _server_request(kind: str, target: str, config: Path | None, json: bool, timeout: float | None) -> None:
    """RAR/ASR to SESSION, or to every open session of the subscriber MSISDN; waits for the results."""
    cfg = get_config(config)
    wait = timeout if timeout is not None else cfg.diameter.answer_timeout_seconds + 1

    async def main() -> list[dict]:
        from ocs.routing import send_server_request

        async with StoreSession(cfg) as store:
            if await store.locate_session(target) is not None:
                session_ids = [target]
            elif target.isdigit() and await store.subscriber(target) is not None:
                session_ids = await store.subscriber_sessions(target)
            else:
                raise CliError(f"unknown session or subscriber {target!r}")
            results = await asyncio.gather(*(send_server_request(store, kind, sid, wait) for sid in session_ids))
        return [msgspec.to_builtins(r) for r in results]

    if wait <= 0:
        fail("--timeout must be positive")
    results = run_async(main)
    if json:
        emit_json(results)
    else:
        command = "RAR" if kind == "reauth" else "ASR"
        if not results:
            console.print(f"{target}: no open sessions")
        for item in results:
            console.print(f"{command} {item['session_id']} via {item.get('peer') or '-'}: {_outcome_text(item)}")
    if any(item.get("error") for item in results):
        raise typer.Exit(1)


TimeoutOption = typer.Option(None, "--timeout", help="Seconds to wait for each answer (default: "
                             "diameter.answer_timeout_seconds + 1)")


@session_app.command("reauth")
def session_reauth(target: str = typer.Argument(..., metavar="SESSION|MSISDN"), config: Path = ConfigOption,
                   json: bool = JsonOption, timeout: float | None = TimeoutOption) -> None:
    """Re-Auth-Request (AUTHORIZE_ONLY) to the gateway of the session, or of each open session of the
    subscriber: the gateway reports usage and asks for quota again. Exit 1 if any got no answer."""
    _server_request("reauth", target, config, json, timeout)


@session_app.command("abort")
def session_abort(target: str = typer.Argument(..., metavar="SESSION|MSISDN"), config: Path = ConfigOption,
                  json: bool = JsonOption, timeout: float | None = TimeoutOption) -> None:
    """Abort-Session-Request to the gateway of the session, or of each open session of the subscriber: the
    gateway stops the service and sends its CCR-T (still charged). Exit 1 if any got no answer."""
    _server_request("abort", target, config, json, timeout)


# ---- CDR writer and simulator ------------------------------------------------------------------------


@app.command("cdr-writer")
def cdr_writer(config: Path = ConfigOption) -> None:
    """Run only the CDR writer (when `ocs serve` runs with cdr.enabled = false)."""
    import os

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = get_config(config)

    async def main() -> None:
        import signal

        from ocs.cdr_writer import CdrWriter

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with StoreSession(cfg) as store:
            writer = CdrWriter(store.redis, cfg.cdr_directory, range(store.partitions),
                               owner=f"{os.uname().nodename}:{os.getpid()}",
                               rotate_records=cfg.cdr.rotate_records, rotate_seconds=cfg.cdr.rotate_seconds,
                               lease_ms=cfg.cdr.lease_ms)
            await writer.run(stop)

    run_async(main)


@app.command()
def simulate(
    host: str = typer.Option(None, "--host", help="Server address (default 127.0.0.1, or the scenario's)"),
    port: int = typer.Option(None, "--port", help="Server port (default 3868, or the scenario's)"),
    sessions_: int = typer.Option(100, "--sessions", help="Number of CCR-I/U/T sessions"),
    updates: int = typer.Option(3, "--updates", help="CCR-U per session"),
    concurrency: int = typer.Option(50, "--concurrency", help="Sessions in flight at once"),
    connections: int = typer.Option(1, "--connections", help="Client connections (gateways)"),
    msisdn: list[str] = typer.Option(None, "--msisdn", help="Subscribers to use (default: the demo ones)"),
    scenario: str = typer.Option(None, "--scenario", help="Scenario TOML file, or a ready one: smoke, "
                                 "steady-data, peak-mixed, retransmission-storm (the flags above are then unused)"),
    plot: Path = typer.Option(None, "--plot", help="With --scenario: write a PNG latency plot here"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="With --scenario: live progress"),
    json: bool = JsonOption,
) -> None:
    """Drive CCR-I/U/T sessions against a Gy server and report requests/s and latency."""
    if scenario is not None:
        from simulators.command import simulate_scenario

        raise typer.Exit(simulate_scenario(scenario, host=host, port=port, as_json=json, plot=plot,
                                           progress=progress, console=console, err_console=err_console))
    from simulators.gy import SimulationSettings, run_simulation

    host = host if host is not None else "127.0.0.1"
    port = port if port is not None else 3868
    if sessions_ < 1 or updates < 0 or concurrency < 1 or connections < 1:
        fail("--sessions, --concurrency and --connections must be ≥ 1 and --updates ≥ 0")
    settings = SimulationSettings(host=host, port=port, sessions=sessions_, updates=updates,
                                  concurrency=concurrency, connections=connections,
                                  msisdns=list(msisdn or DEMO_MSISDNS))
    try:
        report = run_async(lambda: run_simulation(settings))
    except OSError as exc:
        fail(f"cannot reach {host}:{port}: {exc}")
        return
    if json:
        emit_json(report)
        return
    console.print(f"{report['requests']} requests in {report['seconds']:.2f} s: "
                  f"[bold]{report['requests_per_second']:.0f} requests/s[/bold]")
    lat = report["latency_ms"]
    console.print(f"latency ms: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}")
    console.print(f"results: {report['results']}  errors: {report['errors']}  timeouts: {report['timeouts']}")
    if report["errors"] or report["timeouts"]:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()
