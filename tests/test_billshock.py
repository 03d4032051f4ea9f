"""Bill-shock notifications (ocs/billshock.py, lua/billshock.lua) against a real Valkey: 80 % / 100 % of an
allowance and spend thresholds each emitted once, with two monitors at once, after a restart and after a dead
consumer's entries are claimed; the webhook delivered to a real local HTTP server, retried after a 500."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from balances import keys as k
from balances.model import INITIAL, TERMINATION, Bucket, Location, Units
from balances.store import BalanceStore
from ocs.billshock import LEDGER_GROUP, WEBHOOK_GROUP, BillShockMonitor, list_notifications, period_of
from ocs.cli import app as cli_app
from ocs.clock import FixedClock
from ocs.config import ConfigError, NotificationsConfig, load_config
from tests.gateway import wait_for
from tests.test_buckets import DATA, DAY, member, request
from tests.test_charge_script import NOW, mscc

ALICE, BOB, CAROL = "491712000001", "491712000002", "491712000003"
EUR = 1_000_000


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url, partitions=4)
    yield store
    await store.close()


def monitor(store: BalanceStore, consumer: str, **config) -> BillShockMonitor:
    return BillShockMonitor(store, NotificationsConfig(enabled=True, **config), consumer=consumer,
                            poll_seconds=0.01, claim_idle_ms=60_000)


async def use(store: BalanceStore, at: Location, session_id: str, octets: int, now: int = NOW) -> None:
    """A data session that uses `octets` (CCR-I for them, CCR-T reporting them)."""
    await store.charge(request(at, session_id, INITIAL, 0, [mscc(DATA, requested_units=Units(total=octets))],
                               now=now))
    await store.charge(request(at, session_id, TERMINATION, 1, [mscc(DATA, used=Units(total=octets),
                                                                     requested=False)], now=now))


async def drain(*monitors: BillShockMonitor) -> None:
    """Passes of the monitors, concurrently, until none finds anything more."""
    while sum(await asyncio.gather(*(m.run_once() for m in monitors))):
        pass


async def caught_up(store: BalanceStore) -> bool:
    """Every ledger entry delivered to the group and acknowledged."""
    for p in range(store.partitions):
        groups = await store.redis.xinfo_groups(k.ledger_key(p))
        info = next((g for g in groups if g["name"] in (LEDGER_GROUP, LEDGER_GROUP.encode())), None)
        if info is None or info["pending"] or info["lag"]:
            return False
    return True


def summary(events: list[dict]) -> list[tuple]:
    return [(e["msisdn"], e["kind"], e.get("bucket") or e.get("period"), e.get("percent") or e.get("threshold"))
            for e in events]


async def test_allowance_80_and_100_percent_once_with_two_monitors_and_after_a_restart(store):
    at = await member(store, ALICE, EUR, (Bucket("data", "bytes", 100_000),))
    first, second = monitor(store, "one"), monitor(store, "two")
    for n in range(7):  # 20 % a session: 80 % after the 4th, 100 % after the 5th, then money
        await use(store, at, f"s{n}", 20_000)
        await drain(first, second)  # both at once, each handed its share of the entries
    assert await caught_up(store)
    events = await list_notifications(store)
    assert summary(events) == [(ALICE, "allowance", "data", 80), (ALICE, "allowance", "data", 100)]
    assert events[0]["used"] == 80_000 and events[0]["credited"] == 100_000 and events[0]["unit"] == "bytes"
    assert events[1]["used"] == 100_000

    # a restart (a new process, a new consumer): no notification again, new usage counted on top
    restarted = monitor(store, "three")
    await use(store, at, "s7", 20_000)
    await drain(restarted)
    assert len(await list_notifications(store)) == 2

    # more of the allowance credited: the share drops below 80 % and rising through it is not notified again
    await store.add_bucket(ALICE, Bucket("video", "bytes", 10_000), now_ms=NOW)
    await use(store, at, "s8", 8_000)
    await drain(restarted)
    assert summary(await list_notifications(store))[2:] == [(ALICE, "allowance", "video", 80)]


async def test_a_dead_consumers_entries_are_claimed_and_notified_once(store, redis_client):
    at = await member(store, ALICE, EUR, (Bucket("data", "bytes", 10_000),))
    dead = monitor(store, "dead")
    await dead.run_once()  # creates the groups; then it reads entries and dies before handling them
    await use(store, at, "d1", 9_000)
    read = await redis_client.xreadgroup(LEDGER_GROUP, "dead", {k.ledger_key(at.partition): ">"})
    assert read and read[0][1]
    alive = monitor(store, "alive")
    await drain(alive)  # not idle long enough yet: left to the dead consumer
    assert await list_notifications(store) == []
    # a consumer that got an entry the other holds (a claim racing a slow process) changes nothing
    entries = await store.ledger(at.partition)
    assert [await alive._handle(at.partition, entry) for entry in entries] == [None] * len(entries)
    assert await list_notifications(store) == [] and not await caught_up(store)
    alive.claim_idle_ms = 1
    await asyncio.sleep(0.01)
    await drain(alive, monitor(store, "other"))
    assert summary(await list_notifications(store)) == [(ALICE, "allowance", "data", 80)]
    assert await caught_up(store)


async def test_spend_thresholds_once_per_period(store, valkey_url, tmp_path):
    at = await member(store, BOB, 5 * EUR)
    config = {"spend_thresholds": ["0.15", "0.25"], "spend_period": "day", "allowance_percent": []}
    monitors = [monitor(store, "a", **config), monitor(store, "b", **config)]
    for n in range(4):  # 0.10 EUR a session (100 KB at 0.1 cent per KB): 0.20 crosses 0.15, 0.30 crosses 0.25
        await use(store, at, f"t{n}", 102_400)
        await drain(*monitors)
    for n in range(2):  # the next day: a new period, 0.15 crossed again
        await use(store, at, f"u{n}", 102_400, now=NOW + DAY)
        await drain(*monitors)
    today, tomorrow = period_of(NOW, "day"), period_of(NOW + DAY, "day")
    events = await list_notifications(store, BOB)
    assert summary(events) == [(BOB, "spend", today, "0.15"), (BOB, "spend", today, "0.25"),
                               (BOB, "spend", tomorrow, "0.15")]
    assert [e["spent"] for e in events] == ["0.2", "0.3", "0.2"]
    # a late entry of a period already over is not counted (its notifications are not emitted again)
    await use(store, at, "late", 1_024_000, now=NOW)
    await drain(*monitors)
    assert len(await list_notifications(store, BOB)) == 3
    assert await list_notifications(store, ALICE) == []

    # `ocs notifications`: the same list, as JSON or a table
    env = {"OCS_REDIS_URL": valkey_url, "OCS_REDIS__PARTITIONS": "4", "OCS_DATA_DIR": str(tmp_path)}
    listed = await asyncio.to_thread(CliRunner().invoke, cli_app, ["notifications", "--msisdn", BOB, "--json"],
                                     env=env, catch_exceptions=False)
    assert listed.exit_code == 0 and json.loads(listed.stdout) == events
    table = await asyncio.to_thread(CliRunner().invoke, cli_app, ["notifications"], env=env, catch_exceptions=False)
    assert table.exit_code == 0 and "spend" in table.stdout and "0.25" in table.stdout

    # the server's monitor has a clock: spending of a period already over (a ledger replayed) is not notified
    carol = await member(store, CAROL, 5 * EUR)
    for n in range(3):
        await use(store, carol, f"c{n}", 102_400)
    late = BillShockMonitor(store, NotificationsConfig(enabled=True, **config), clock=FixedClock(NOW + 40 * DAY),
                            consumer="late")
    await drain(late)
    assert await list_notifications(store, CAROL) == []


class Receiver:
    """A real HTTP server in a thread: records each POST's JSON body; answers 500 to the first `fail` ones."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.bodies.append(body)
                status = 500 if receiver.fail > 0 else 204
                receiver.fail -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/billshock"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def webhook_pending(store: BalanceStore) -> int:
    total = 0
    for p in range(store.partitions):
        groups = await store.redis.xinfo_groups(k.notify_key(p))
        total += sum(g["pending"] + (g["lag"] or 0) for g in groups if g["name"] in (WEBHOOK_GROUP,
                                                                                      WEBHOOK_GROUP.encode()))
    return total


@pytest.mark.parametrize("fail", [0, 1])
async def test_webhook_delivers_each_event_with_a_stable_id_retrying_failures(store, fail):
    receiver = Receiver(fail=fail)
    at = await member(store, ALICE, EUR, (Bucket("data", "bytes", 10_000),))
    hooked = monitor(store, "hook", webhook_url=receiver.url, webhook_timeout_seconds=2.0)
    hooked.start()
    try:
        await use(store, at, "w1", 8_000)
        await use(store, at, "w2", 2_000)
        assert await wait_for(lambda: delivered(store))
    finally:
        await hooked.stop()
        receiver.close()
    emitted = await list_notifications(store)
    assert len(receiver.bodies) == 2 + fail  # the first event twice when it was answered 500 first
    assert [b["id"] for b in receiver.bodies][fail:] == [e["id"] for e in emitted]
    assert receiver.bodies[-1] == emitted[-1] == {
        "id": emitted[-1]["id"], "kind": "allowance", "msisdn": ALICE, "time_ms": NOW,
        "ledger_id": emitted[-1]["ledger_id"], "bucket": "data", "percent": 100, "used": 10_000,
        "credited": 10_000, "unit": "bytes"}


async def delivered(store: BalanceStore) -> bool:
    """Both notifications emitted and every one acknowledged by the webhook delivery."""
    return len(await list_notifications(store)) == 2 and await webhook_pending(store) == 0


def test_notifications_config_from_environment():
    config = load_config(environ={"OCS_NOTIFICATIONS__ENABLED": "true",
                                  "OCS_NOTIFICATIONS__SPEND_THRESHOLDS": '["50", "100.50"]',
                                  "OCS_NOTIFICATIONS__SPEND_PERIOD": "day"}).notifications
    assert config.enabled and config.allowance_percent == [80, 100] and config.spend_thresholds == ["50", "100.50"]
    for name, value in [("SPEND_THRESHOLDS", '["0.0000001"]'), ("SPEND_PERIOD", "week"),
                        ("ALLOWANCE_PERCENT", "[0]"), ("WEBHOOK_URL", "ftp://x")]:
        with pytest.raises(ConfigError, match="notifications"):
            load_config(environ={f"OCS_NOTIFICATIONS__{name}": value})


async def test_the_server_runs_the_monitor_when_enabled(valkey_url, tmp_path):
    """`ocs serve` with notifications.enabled: usage through Diameter is notified (the plan's spine bucket)."""
    from balances.model import Subscriber
    from tests.gateway import Gateway, start_app

    app = await start_app(valkey_url, tmp_path, FixedClock(NOW), OCS_NOTIFICATIONS__ENABLED="true",
                          OCS_NOTIFICATIONS__SPEND_THRESHOLDS='["0.01"]')
    gateway = None
    try:
        store = app.store
        await store.provision(Subscriber(msisdn=ALICE, plan="demo"), EUR, {"data": 1_000_000})
        gateway = await Gateway.connect(app.port)
        for n, used in enumerate([850_000, 150_000, 2_000_000]):
            assert (await gateway.ccr(f"gw;{n}", 1, 0, ALICE)).get("Result-Code") == 2001
            assert (await gateway.ccr(f"gw;{n}", 3, 1, ALICE, used=used, request_units=False)
                    ).get("Result-Code") == 2001

        async def three() -> bool:
            return len(await list_notifications(store)) == 3 and await caught_up(store)

        assert await wait_for(three)
        # the monitor may see the entries after the usage (it reads the balance of now): then the allowance's
        # thresholds come together, after the spend
        assert sorted(summary(await list_notifications(store))) == [
            (ALICE, "allowance", "data", 80), (ALICE, "allowance", "data", 100),
            (ALICE, "spend", period_of(NOW, "month"), "0.01")]
    finally:
        if gateway is not None:
            gateway.close()
        await app.stop()
