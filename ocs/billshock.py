"""Bill-shock notifications: allowance use (80 % / 100 % of a bucket) and money spent in a period, each emitted
once to the partition's stream notify:{pNNN}, and optionally POSTed to a webhook (docs/notifications.md).

Off the charging path: every balance change is already a ledger entry (ledger:{pNNN}), so the monitor tails the
ledgers with a consumer group (any number of OCS processes share the work; a dead one's entries are claimed
after `claim_idle_ms`) and hands each entry of a subscriber to lua/billshock.lua, which applies its counters,
emits what crossed a threshold (deduplicated in notified:{pNNN}:<msisdn>) and acknowledges the entry in one
call. The webhook delivery reads notify:{pNNN} with a consumer group of its own, at least once, in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import typer

from balances import keys as k
from balances.ledger import parse_entry
from balances.model import MONEY, LedgerEntry
from ocs.config import NotificationsConfig, spend_micro

if TYPE_CHECKING:  # the CLI imports this module: the store (redis) only when a command runs
    from balances.store import BalanceStore
    from ocs.clock import Clock

log = logging.getLogger(__name__)

LEDGER_GROUP = "billshock"  # consumer group on ledger:{pNNN}
WEBHOOK_GROUP = "webhook"  # consumer group on notify:{pNNN}
NOT_CREDITS = ("usage", "refund")  # entry types whose positive changes give back what was used
SPENDING = ("purchase", "renewal")  # besides usage: fees taken from the money bucket
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # webhook retries, seconds

_encoder = msgspec.json.Encoder()
_answer = msgspec.json.Decoder(dict)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def period_of(time_ms: int, spend_period: str) -> str:
    """The spend period (UTC) an entry at `time_ms` belongs to: '2026-11-23' (day) or '2026-11' (month)."""
    moment = datetime.fromtimestamp(time_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d" if spend_period == "day" else "%Y-%m")


def spent_by(entry: LedgerEntry) -> int:
    """Micro-units of money the entry spent: a usage entry's amount, a purchase's or renewal's fee."""
    if entry.type == "usage":
        return max(entry.amount, 0)
    if entry.type in SPENDING:
        return max(-entry.changes.get(MONEY, 0), 0)
    return 0


def _money(micro: int) -> str:
    return str(Decimal(micro).scaleb(-6).normalize()) if micro else "0"


def event_payload(partition: int, stream_id: str, fields: dict) -> dict[str, Any]:
    """A notify:{pNNN} entry as the webhook's / CLI's JSON. `id` is stable (partition + stream id): a receiver
    that sees an id twice has seen the same event twice."""
    f = {_text(key): _text(value) for key, value in fields.items()}
    event: dict[str, Any] = {"id": f"p{partition:03d}-{stream_id}", "kind": f.get("kind", ""),
                             "msisdn": f.get("msisdn", ""), "time_ms": int(f.get("time", "0")),
                             "ledger_id": f.get("ledger", "")}
    if event["kind"] == "allowance":
        event.update(bucket=f.get("bucket", ""), percent=int(f.get("threshold", "0")), used=int(f.get("used", "0")),
                     credited=int(f.get("credited", "0")), unit=f.get("unit", ""))
    elif event["kind"] == "spend":
        event.update(period=f.get("period", ""), threshold=_money(int(f.get("threshold", "0"))),
                     spent=_money(int(f.get("spent", "0"))))
    return event


def post_json(url: str, body: bytes, timeout: float) -> int:
    """One POST (blocking: run it in a thread); the HTTP status, 0 when there was no answer."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "ocs-billshock"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("webhook %s: %s", url, exc)
        return 0


class BillShockMonitor:
    """Tails every partition's ledger and emits bill-shock notifications; delivers them to the webhook when one
    is configured. start()/stop() run it in the background; run_once()/deliver_once() are one pass each."""

    def __init__(self, store: BalanceStore, config: NotificationsConfig, *, clock: Clock | None = None,
                 consumer: str | None = None, poll_seconds: float = 0.5, claim_idle_ms: int = 30_000,
                 batch: int = 100) -> None:
        self.store = store
        self.config = config
        self.clock = clock  # with a clock, spending of a period already over is not counted (a ledger replay)
        self.consumer = consumer or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.poll_seconds = poll_seconds
        self.claim_idle_ms = claim_idle_ms
        self.batch = batch
        self.percents = sorted(set(config.allowance_percent))
        self.spend_thresholds = sorted({spend_micro(text) for text in config.spend_thresholds})
        self._groups_ready = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---- consumer groups ---------------------------------------------------------------------------------

    async def _create_group(self, key: str, group: str) -> None:
        client = await self.store.client_for(key)
        try:  # from the stream's first entry: credited counters need every credit
            await client.xgroup_create(key, group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        await self.store.ready()
        for p in range(self.store.partitions):
            await self._create_group(k.ledger_key(p), LEDGER_GROUP)
            if self.config.webhook_url:
                await self._create_group(k.notify_key(p), WEBHOOK_GROUP)
        self._groups_ready = True

    async def _claim(self, key: str, group: str) -> list[tuple[Any, Any]]:
        """Entries pending longer than claim_idle_ms on any consumer (a dead process's, or ours that failed)."""
        client = await self.store.client_for(key)
        claimed: list[tuple[Any, Any]] = []
        start = "0-0"
        while True:
            reply = await client.xautoclaim(key, group, self.consumer, self.claim_idle_ms, start_id=start,
                                            count=self.batch)
            start, entries = _text(reply[0]), reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                await client.xack(key, group, *deleted)
            claimed.extend((entry_id, fields) for entry_id, fields in entries if fields is not None)
            if start == "0-0":
                return claimed

    async def _read(self, key: str, group: str) -> list[tuple[Any, Any]]:
        client = await self.store.client_for(key)
        reply = await client.xreadgroup(group, self.consumer, {key: ">"}, count=self.batch)
        return [item for _, items in reply or [] for item in items]

    # ---- the ledger -> notifications ---------------------------------------------------------------------

    async def run_once(self) -> int:
        """One pass over every partition: claimed stale entries, then new ones. The number of entries handled."""
        await self._ensure_groups()
        handled = 0
        for p in range(self.store.partitions):
            key = k.ledger_key(p)
            for entries in (await self._claim(key, LEDGER_GROUP), await self._read(key, LEDGER_GROUP)):
                if not entries:
                    continue
                # one call per entry, sent together (the store pipelines them); the calls' effects commute
                done = await asyncio.gather(*(self._handle(p, parse_entry(entry_id, fields))
                                              for entry_id, fields in entries))
                nothing = [entry_id for entry_id in done if entry_id is not None]
                if nothing:  # entries with nothing to count: acknowledged as they are
                    await (await self.store.client_for(key)).xack(key, LEDGER_GROUP, *nothing)
                handled += len(entries)
        return handled

    async def _handle(self, partition: int, entry: LedgerEntry) -> str | None:
        """Hands the entry to lua/billshock.lua (which acknowledges it); the entry's id when there is nothing
        to count (no subscriber, no own bucket, no spending)."""
        changes = [[ref, change] for ref, change in entry.changes.items() if not ref.startswith("@") and change]
        spend = spent_by(entry) if self.spend_thresholds else 0
        period = period_of(entry.time, self.config.spend_period) if spend else ""
        if spend and self.clock is not None and period < period_of(self.clock.now_ms(), self.config.spend_period):
            spend = 0
        if not entry.msisdn or not (changes and self.percents) and not spend:
            return entry.id
        keys = (k.ledger_key(partition), k.bal_key(partition, entry.msisdn),
                k.billshock_state_key(partition, entry.msisdn), k.notified_key(partition, entry.msisdn),
                k.notify_key(partition))
        payload = _encoder.encode({
            "group": LEDGER_GROUP, "consumer": self.consumer, "id": entry.id, "msisdn": entry.msisdn,
            "time": entry.time, "credit": entry.type not in NOT_CREDITS, "changes": changes, "spend": spend,
            "period": period if spend else "",
            "percents": self.percents, "spend_thresholds": self.spend_thresholds})
        answer = _answer.decode(await self.store._call("billshock", keys, (payload,)))
        if answer["events"]:
            log.info("bill-shock: %d notification(s) for %s", len(answer["events"]), entry.msisdn)
        return None

    # ---- notifications -> webhook ------------------------------------------------------------------------

    async def deliver_once(self) -> int:
        """One pass of the webhook delivery over every partition; the number of events delivered. An event is
        acknowledged after a 2xx answer only; until then it is retried with backoff (in order) while running."""
        if not self.config.webhook_url:
            return 0
        await self._ensure_groups()
        delivered = 0
        for p in range(self.store.partitions):
            key = k.notify_key(p)
            for events in (await self._claim(key, WEBHOOK_GROUP), await self._read(key, WEBHOOK_GROUP)):
                for stream_id, fields in events:
                    if not await self._deliver(p, _text(stream_id), fields):
                        return delivered  # stopping: the rest stays pending for the next pass or process
                    delivered += 1
        return delivered

    async def _deliver(self, partition: int, stream_id: str, fields: dict) -> bool:
        body = _encoder.encode(event_payload(partition, stream_id, fields))
        delay = BACKOFF_FIRST
        while True:
            status = await asyncio.to_thread(post_json, self.config.webhook_url, body,
                                             self.config.webhook_timeout_seconds)
            if 200 <= status < 300:
                key = k.notify_key(partition)
                await (await self.store.client_for(key)).xack(key, WEBHOOK_GROUP, stream_id)
                return True
            log.warning("webhook answered %s for event %s; retrying in %.1f s", status or "nothing", stream_id, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return False
            except TimeoutError:
                delay = min(delay * 2, BACKOFF_MAX)

    # ---- background ---------------------------------------------------------------------------------------

    async def _loop(self, one_pass: Any, what: str) -> None:
        while not self._stop.is_set():
            try:
                busy = await one_pass()
            except Exception as exc:  # Redis away, a bad entry: logged, retried (entries stay pending)
                log.warning("bill-shock %s pass failed: %s", what, exc)
                busy = 0
            if not busy:
                try:
                    await asyncio.wait_for(self._stop.wait(), self.poll_seconds)
                except TimeoutError:
                    pass

    def start(self) -> None:
        self._stop.clear()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(self.run_once, "monitor"))]
        if self.config.webhook_url:
            self._tasks.append(loop.create_task(self._loop(self.deliver_once, "webhook")))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


# ---- `ocs notifications` ---------------------------------------------------------------------------------


async def list_notifications(store: BalanceStore, msisdn: str | None = None) -> list[dict[str, Any]]:
    """Every notification emitted (notify:{pNNN} of every partition, or the subscriber's), in emission order."""
    await store.ready()
    partitions = range(store.partitions)
    if msisdn is not None:
        location = await store.locate_msisdn(msisdn)
        partitions = range(0) if location is None else range(location.partition, location.partition + 1)
    events = []
    for p in partitions:
        key = k.notify_key(p)
        start = "-"
        while True:
            page = await (await store.client_for(key)).xrange(key, start, "+", count=1000)
            events.extend(event_payload(p, _text(sid), fields) for sid, fields in page)
            if len(page) < 1000:
                break
            start = "(" + _text(page[-1][0])
    if msisdn is not None:
        events = [event for event in events if event["msisdn"] == msisdn]
    return sorted(events, key=_emitted)


def _emitted(event: dict[str, Any]) -> tuple[int, int, str]:
    """Emission order: the stream id's milliseconds and sequence (then the partition)."""
    partition, stream_id = event["id"].split("-", 1)
    ms, seq = stream_id.split("-")
    return int(ms), int(seq), partition


def notifications(msisdn: str | None = typer.Option(None, "--msisdn", help="Only this subscriber's"),
                  config: Path | None = typer.Option(None, "--config", "-c", help="TOML configuration file"),
                  json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables")) -> None:
    """Bill-shock notifications emitted so far (allowance use, money spent), in the order they were emitted."""
    from ocs import cli

    cfg = cli.get_config(config)

    async def main() -> list[dict[str, Any]]:
        async with cli.StoreSession(cfg) as store:
            return await list_notifications(store, msisdn)

    events = cli.run_async(main)
    if json:
        cli.emit_json(events)
        return
    from rich.table import Table

    table = Table("id", "time (UTC)", "msisdn", "kind", "what", "threshold", "value")
    for event in events:
        when = datetime.fromtimestamp(event["time_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        if event["kind"] == "allowance":
            what, threshold = event["bucket"], f"{event['percent']} %"
            value = f"{event['used']:,} of {event['credited']:,} {event['unit']}".strip()
        else:
            what, threshold, value = event.get("period", ""), event.get("threshold", ""), event.get("spent", "")
        table.add_row(event["id"], when, event["msisdn"], event["kind"], what, threshold, value)
    cli.console.print(table)


def register(app: typer.Typer) -> None:
    app.command("notifications")(notifications)
