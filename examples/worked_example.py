"""The README's worked example: a data session of plan "travel" that crosses midnight and goes roaming.

    .venv/bin/python examples/worked_example.py        (or: make example)

It starts an embedded Valkey in a temporary directory and an in-process OCS on a free port whose clock is
fixed (ocs.clock.FixedClock), so the output is the same on every run. The rate card and the catalog are
examples/worked-example/ratecard.toml and catalog.toml. A subscriber buys "travel" (9.90 EUR a month with
1 GB of data) with 50.00 EUR; then a gateway (the simulator's Gy client, real TCP) opens a data session at
23:50 in Germany, reports usage split at midnight (Tariff-Change-Usage), moves to France and ends the session.
It prints each answer, the usage records of the CDR files, the balance history (what `ocs balance MSISDN
--history` prints) and the conservation audit (`ocs audit`). tests/test_worked_example.py checks the figures
against the card's prices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from balances.embedded import EmbeddedValkey
from balances.model import Subscriber
from balances.store import BalanceStore
from ocs.audit import audit
from ocs.balance_cli import format_history
from ocs.catalog import load_catalog_file, rating_plan_of, start_plan, store_catalog
from ocs.cli import format_money
from ocs.clock import FixedClock
from ocs.config import load_config
from ocs.server import ServerApp
from protocol.codec import Message
from ratecards import load_ratecard
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, close_client, open_client

HERE = Path(__file__).resolve().parent / "worked-example"
RATECARD, CATALOG = HERE / "ratecard.toml", HERE / "catalog.toml"
ZONE = ZoneInfo("Europe/Berlin")  # the card's time zone
MSISDN = "491701234567"
SESSION = "pgw1.example.net;1;1"
DATA = 100  # rating group
MB = 1_048_576
HOME, FRANCE = "26201", "20801"  # 3GPP-SGSN-MCC-MNC: Telekom Germany, Orange France
REQUEST_TYPES = {1: "CCR-I", 2: "CCR-U", 3: "CCR-T"}


def local(text: str) -> int:
    """A wall-clock time in the card's time zone as epoch milliseconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=ZONE).timestamp() * 1000)


@dataclass(frozen=True)
class Step:
    """One CCR of the session: when, from which network, what it reports and asks for."""

    at: str  # local time
    request_type: int
    network: str | None  # 3GPP-SGSN-MCC-MNC, sent when the gateway reports it (CCR-I, a PLMN change)
    used: tuple[tuple[int | None, int], ...] = ()  # (Tariff-Change-Usage or None, octets)
    requested: int | None = None  # octets; 0 = an empty Requested-Service-Unit; None = none


SUBSCRIBED = "2027-01-15T09:00:00"  # a Friday
STEPS = (
    Step("2027-01-15T23:50:00", 1, HOME, requested=2048 * MB),
    Step("2027-01-16T00:10:00", 2, None, used=((0, 1200 * MB), (1, 300 * MB)), requested=0),
    Step("2027-01-16T00:40:00", 2, FRANCE, used=((None, 200 * MB),), requested=0),
    Step("2027-01-16T01:00:00", 3, None, used=((None, 100 * MB),)),
)


def ccr(number: int, step: Step, origin_host: str, origin_realm: str) -> list:
    avps: list = [
        ("Session-Id", SESSION), ("Origin-Host", origin_host), ("Origin-Realm", origin_realm),
        ("Destination-Realm", "ocs.example.net"), ("Auth-Application-Id", 4),
        ("Service-Context-Id", "32251@3gpp.org"), ("CC-Request-Type", step.request_type),
        ("CC-Request-Number", number),
        ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", MSISDN)]),
        ("Multiple-Services-Indicator", 1),
    ]
    mscc: list = []
    if step.requested is not None:
        mscc.append(("Requested-Service-Unit", [("CC-Total-Octets", step.requested)] if step.requested else []))
    for tariff_change_usage, octets in step.used:
        split = [] if tariff_change_usage is None else [("Tariff-Change-Usage", tariff_change_usage)]
        mscc.append(("Used-Service-Unit", [*split, ("CC-Total-Octets", octets)]))
    mscc.append(("Rating-Group", DATA))
    avps.append(("Multiple-Services-Credit-Control", mscc))
    if step.request_type == 3:
        avps.append(("Termination-Cause", 1))
    if step.network is not None:
        avps.append(("Service-Information", [("PS-Information", [("3GPP-SGSN-MCC-MNC", step.network)])]))
    return avps


def clock_text(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, ZONE)
    return f"{moment:%H:%M} {moment.tzname()}"


def megabytes(octets: int) -> str:
    return f"{octets // MB}" if octets % MB == 0 else f"{octets / MB:.3f}"


def answer_row(number: int, step: Step, answer: Message) -> list[str]:
    """The answer's key fields: result (command, MSCC), granted octets, Tariff-Time-Change as local time."""
    mscc = answer.find("Multiple-Services-Credit-Control")
    gsu = mscc.find("Granted-Service-Unit") if mscc is not None else None
    granted = gsu.get("CC-Total-Octets") if gsu is not None else None
    change = gsu.get("Tariff-Time-Change") if gsu is not None else None
    names = {None: "", 0: " before", 1: " after"}
    reported = ", ".join(f"{megabytes(octets)}{names[tcu]}" for tcu, octets in step.used) or "-"
    result = f"{answer.get('Result-Code')}/{mscc.get('Result-Code') if mscc is not None else '-'}"
    return [clock_text(local(step.at)), f"{REQUEST_TYPES[step.request_type]} #{number}", step.network or "-",
            reported, result, "-" if granted is None else megabytes(granted),
            "-" if change is None else clock_text(change * 1000)]


def cdr_table(directory: Path) -> Table:
    """The session's usage records: what each report was rated as (its parts when split at the change)."""
    records = [json.loads(line) for path in sorted(directory.rglob("*.jsonl*"))
               for line in path.read_text().splitlines() if line]
    table = Table("request", "usage MB", "rated as", "amount", "taken from")
    for record in sorted((r for r in records if r["recordType"] == "usage"), key=lambda r: r["ccRequestNumber"]):
        parts = record.get("tariffParts") or [{"tariffChangeUsage": "", "usage": record["usage"],
                                               "tariff": record.get("tariff", ""), "amount": record["amount"]}]
        rated = " + ".join(f"{megabytes(part['usage']['octetsTotal'])} {part['tariff'] or 'day'}"
                           f"{' (' + part['tariffChangeUsage'] + ')' if part['tariffChangeUsage'] else ''}"
                           f" {format_money(part['amount'])}" for part in parts)
        taken = ", ".join(f"{bucket} {format_money(value) if bucket == 'money' else megabytes(value) + ' MB'}"
                          for bucket, value in record["bucket"].items())
        table.add_row(f"#{record['ccRequestNumber']}", megabytes(record["usage"]["octetsTotal"]), rated,
                      format_money(record["amount"]), taken)
    return table


async def run(work_dir: Path, console: Console) -> None:
    valkey = EmbeddedValkey(work_dir / "valkey")
    url = valkey.start()
    try:
        await _run(url, work_dir, console)
    finally:
        valkey.stop()


async def _run(url: str, work_dir: Path, console: Console) -> None:
    config = load_config(environ={
        "OCS_REDIS_URL": url, "OCS_DATA_DIR": str(work_dir), "OCS_RATECARD": str(RATECARD), "OCS_PORT": "0",
        "OCS_METRICS_PORT": "0", "OCS_ORIGIN_HOST": "ocs.example.net", "OCS_ORIGIN_REALM": "example.net"})
    clock = FixedClock(local(SUBSCRIBED))
    app = ServerApp(config, clock)
    await app.start()
    try:
        # `ocs plan load catalog.toml` and `ocs subscriber add MSISDN --plan travel --money 50.00`, at 09:00
        catalog, text = load_catalog_file(CATALOG, load_ratecard(RATECARD))
        await store_catalog(app.store.redis, catalog, text, clock.now_ms())
        await app.store.provision(Subscriber(msisdn=MSISDN, plan=rating_plan_of(catalog, "travel")),
                                  money=50_000_000, now_ms=clock.now_ms())
        await start_plan(app.store, catalog, MSISDN, "travel", clock.now_ms())
        console.print(f"{clock_text(clock.now_ms())}  {MSISDN} subscribes to plan travel with 50.00 EUR\n")

        table = Table("time", "request", "MCC-MNC", "reported MB", "result", "granted MB", "Tariff-Time-Change",
                      "money held")
        client = await open_client("127.0.0.1", app.port, "pgw1.example.net", "example.net", origin_state_id=1)
        try:
            for number, step in enumerate(STEPS):
                clock.set(local(step.at))
                answer = await asyncio.wait_for(client.request(
                    CCR, 4, ccr(number, step, client.origin_host, client.origin_realm),
                    FLAG_REQUEST | FLAG_PROXIABLE), 10)
                money = next(b for b in await app.store.balances(MSISDN) if b.bucket == "money")
                table.add_row(*answer_row(number, step, answer), format_money(money.reserved))
        finally:
            await close_client(client)
        console.print("The data session (rating group 100), one row per CCR and its CCA (MCC-MNC: the "
                      "3GPP-SGSN-MCC-MNC sent):")
        console.print(table)
    finally:
        await app.stop()  # drains the CDR stream into the files the audit reads
    console.print("\nIts usage records (the CDR files, what billing reads):")
    console.print(cdr_table(config.cdr_directory))

    store = await BalanceStore.connect(url, partitions=config.redis.partitions)
    try:
        lines = await store.history(MSISDN)
        units = {b.bucket: b.unit for b in await store.balances(MSISDN)}
        sub = await store.subscriber(MSISDN)
        console.print(f"\n$ ocs balance {MSISDN} --history    (ledger times in UTC; CET = UTC+1)")
        console.print(format_history(lines, units, sub.currency, 2))
        report = await audit(store, config.cdr_directory)
        money = next(b for b in await store.balances(MSISDN) if b.bucket == "money")
        console.print(f"money left: {format_money(money.balance)} {sub.currency}, reserved "
                      f"{format_money(money.reserved)}")
        console.print(f"\n$ ocs audit\n{'OK: every balance is explained' if report.ok else 'DIFFERENCES'} "
                      f"({report.ledger_entries} ledger entries, {report.cdr_records} rated CDR records)")
        for difference in report.differences:
            console.print(f"  {difference}")
    finally:
        await store.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    # no colours, a fixed width: the output is the same in a terminal, a pipe and the README
    console = Console(width=120, color_system=None, highlight=False, emoji=False)
    with tempfile.TemporaryDirectory(prefix="ocs-worked-example-") as work_dir:
        asyncio.run(run(Path(work_dir), console))


if __name__ == "__main__":
    main()
