"""The balance model through the full server (CCR in over TCP, CCA and CDR files out): shared group buckets with
member limits, a postpaid account, subscriber status, bucket expiry with the time from the request's clock,
and the conservation audit (`ocs audit`) after a randomized run, while sessions are open, and after tampering.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from typer.testing import CliRunner

from balances import keys as k
from balances.model import Bucket, Rollover, Subscriber
from ocs.audit import audit
from ocs.cli import app as cli_app
from ocs.clock import FixedClock
from tests.gateway import DATA_RG, SMS_RG, VOICE_RG, Gateway, cdr_records, granted_octets, mscc_of, start_app, wait_for

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
MB = 1 << 20
PARENT, CHILD, BARRED, GONE = "491712000001", "491712000002", "491712000003", "491712000004"


async def drained(app) -> bool:
    """Every CDR stream written to the files (the writer trims what it wrote)."""
    lengths = [await app.store.redis.xlen(k.cdr_key(p)) for p in range(app.store.partitions)]
    return not any(lengths)


def result_of(answer) -> tuple[int, int | None]:
    return answer.get("Result-Code"), mscc_of(answer).get("Result-Code") if mscc_of(answer) is not None else None


async def test_group_postpaid_and_status_through_the_server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path, FixedClock(NOW), OCS_CDR__ROTATE_RECORDS="4")
    store = app.store
    gateway = None
    try:
        await store.create_group("family")
        await store.add_group_bucket("family", Bucket("family-data", "bytes", 50 * MB, services=(DATA_RG,),
                                                      member_limits={CHILD: 20 * MB}), now_ms=NOW)
        await store.provision(Subscriber(msisdn=PARENT, plan="demo", kind="postpaid", credit_limit=1_000_000,
                                         group="family"), 0, now_ms=NOW)
        await store.provision(Subscriber(msisdn=CHILD, plan="demo", group="family"), 0, now_ms=NOW)
        await store.provision(Subscriber(msisdn=BARRED, plan="demo", status="suspended"), 1_000_000, now_ms=NOW)
        await store.provision(Subscriber(msisdn=GONE, plan="demo", status="terminated"), 1_000_000, now_ms=NOW)
        gateway = await Gateway.connect(app.port)

        # the child draws from the shared bucket up to its limit (20 MB), then has no money: redirected
        answer = await gateway.ccr("gw;child", 1, 0, CHILD)
        assert result_of(answer) == (2001, 2001) and granted_octets(answer) == 10 * MB
        answer = await gateway.ccr("gw;child", 2, 1, used=10 * MB)
        assert granted_octets(answer) == 10 * MB
        answer = await gateway.ccr("gw;child", 2, 2, used=10 * MB)
        assert granted_octets(answer) is None and mscc_of(answer).find("Final-Unit-Indication") is not None
        await gateway.ccr("gw;child", 3, 3, request_units=False)

        # the parent (postpaid, balance 0, credit limit 1.00): data from the family bucket, voice on credit
        answer = await gateway.ccr("gw;parent-data", 1, 0, PARENT)
        assert granted_octets(answer) == 10 * MB
        answer = await gateway.ccr("gw;parent-voice", 1, 0, PARENT, rating_group=VOICE_RG)
        assert mscc_of(answer).find("Granted-Service-Unit").get("CC-Time") == 300
        await gateway.ccr("gw;parent-voice", 3, 1, rating_group=VOICE_RG, used_seconds=600, request_units=False)
        await gateway.ccr("gw;parent-data", 3, 1, used=25 * MB, request_units=False)
        states = {b.bucket: b for b in await store.balances(PARENT)}
        assert states["money"].balance == -500_000  # 10 minutes at 0.05, below zero on credit
        assert (states["@family-data"].balance, states["@family-data"].member_used) == (5 * MB, 25 * MB)

        # status: suspended 4010, terminated 5030 (both at command level on CCR-I)
        assert result_of(await gateway.ccr("gw;barred", 1, 0, BARRED))[0] == 4010
        assert result_of(await gateway.ccr("gw;gone", 1, 0, GONE))[0] == 5030

        assert await wait_for(lambda: drained(app))
        records = [r for r in cdr_records(tmp_path / "cdr") if r["recordType"] == "usage"]
        assert sorted((r["servedMSISDN"], r["bucket"].get("@family-data", 0)) for r in records if r["ratingGroup"]
                      == DATA_RG) == [(PARENT, 25 * MB), (CHILD, 10 * MB), (CHILD, 10 * MB)]
        report = await audit(store, app.config.cdr_directory)
        assert report.ok, report.differences
        assert report.cdr_records == 4
        lines = await store.history(CHILD)
        assert [(line["type"], line["bucket"], line["change"], line["balance"]) for line in lines] == [
            ("credit", "@family-data", 50 * MB, 50 * MB), ("usage", "@family-data", -10 * MB, 40 * MB),
            ("usage", "@family-data", -10 * MB, 30 * MB), ("usage", "@family-data", -25 * MB, 5 * MB)]
    finally:
        if gateway is not None:
            gateway.close()
        await app.stop()


async def test_joining_a_group_elsewhere_reaches_cached_sessions(valkey_url, tmp_path):
    """Another process (here another store) makes a subscriber with an open session a group member: the
    server's cached location is stale, the charge function says so, the CCR is retried with the group."""
    from balances.store import BalanceStore

    app = await start_app(valkey_url, tmp_path, FixedClock(NOW))
    operator = await BalanceStore.connect(valkey_url)
    gateway = await Gateway.connect(app.port)
    try:
        partition = await operator.create_group("late")
        await operator.add_group_bucket("late", Bucket("pool", "bytes", 40 * MB), now_ms=NOW)
        await operator.provision(Subscriber(msisdn=PARENT, plan="demo", partition=partition), 1_000_000, now_ms=NOW)
        answer = await gateway.ccr("gw;late", 1, 0, PARENT)
        assert granted_octets(answer) == 10 * MB  # money: not a member yet
        await operator.join_group(PARENT, "late")
        answer = await gateway.ccr("gw;late", 2, 1, PARENT, used=MB)
        assert result_of(answer) == (2001, 2001) and granted_octets(answer) == 10 * MB
        await gateway.ccr("gw;late", 3, 2, PARENT, used=2 * MB, request_units=False)
        states = {b.bucket: b.balance for b in await operator.balances(PARENT)}
        assert states["@pool"] == 37 * MB  # both reports were paid from the pool (allowances before money)
        assert (await app.store.locate_session("gw;late")).group == "late"
        assert await wait_for(lambda: drained(app))
        report = await audit(operator, app.config.cdr_directory)
        assert report.ok, report.differences
    finally:
        gateway.close()
        await operator.close()
        await app.stop()


async def test_buckets_expire_by_the_request_time_through_the_server(valkey_url, tmp_path):
    clock = FixedClock(NOW)
    app = await start_app(valkey_url, tmp_path, clock)
    store = app.store
    gateway = await Gateway.connect(app.port)
    try:
        night = Bucket("night", "bytes", 5 * MB, priority=10, valid_from=NOW, valid_until=NOW + HOUR,
                       services=(DATA_RG,))
        await store.provision(Subscriber(msisdn=PARENT, plan="demo"), 1_000_000, buckets=[night], now_ms=NOW)
        await store.provision(Subscriber(msisdn=CHILD, plan="demo"), 0, buckets=[
            Bucket("promo", "bytes", 3 * MB, valid_until=NOW + HOUR, rollover=Rollover(cap=MB, validity_ms=HOUR))],
            now_ms=NOW)
        answer = await gateway.ccr("gw;night", 1, 0, PARENT)
        assert granted_octets(answer) == 10 * MB  # 5 MB of the night bundle, 5 MB of money
        clock.advance(2 * 3600)  # the bundle has ended; the gateway reports what it used before
        answer = await gateway.ccr("gw;night", 2, 1, PARENT, used=8 * MB)
        states = {b.bucket: (b.balance, b.reserved) for b in await store.balances(PARENT)}
        assert "night" not in states  # 5 MB paid from the bundle (it was held), the rest expired: removed
        assert states["money"][0] == 1_000_000 - 30_000  # 3 MB at 0.01
        await gateway.ccr("gw;night", 3, 2, PARENT, used=0, request_units=False)
        # nobody touched the child's promo: the sweep rolls 1 MB over and expires 2 MB
        assert await store.expire_buckets(clock.now_ms()) == 3
        assert {b.bucket: b.balance for b in await store.balances(CHILD)} == {"money": 0, "promo.rollover": MB}
        assert await wait_for(lambda: drained(app))
        report = await audit(store, app.config.cdr_directory)
        assert report.ok, report.differences
        assert report.units["bytes"].debits == {"usage": 5 * MB, "expiry": 2 * MB, "rollover": MB}
    finally:
        gateway.close()
        await app.stop()


async def test_audit_after_a_randomized_run_and_after_tampering(valkey_url, tmp_path):
    rng = random.Random(4)
    clock = FixedClock(NOW)
    app = await start_app(valkey_url, tmp_path, clock, OCS_CDR__ROTATE_RECORDS="7")
    store = app.store
    gateway = await Gateway.connect(app.port)
    try:
        await store.create_group("co")
        await store.add_group_bucket("co", Bucket("pool", "bytes", 200 * MB, valid_until=NOW + 2 * HOUR,
                                                  rollover=Rollover(cap=10 * MB, validity_ms=HOUR)), now_ms=NOW)
        msisdns = [f"4917130000{n:02d}" for n in range(9)]
        for n, msisdn in enumerate(msisdns):
            extra = [Bucket("bonus", "bytes", rng.randrange(1, 30) * MB, valid_until=NOW + rng.randrange(1, 4) * HOUR)]
            sub = Subscriber(msisdn=msisdn, plan="demo", group="co" if n < 3 else None,
                             kind="postpaid" if n % 4 == 3 else "prepaid",
                             credit_limit=2_000_000 if n % 4 == 3 else 0)
            await store.provision(sub, rng.randrange(0, 3_000_000), {"data": rng.randrange(0, 50) * MB},
                                  buckets=extra, now_ms=NOW)
        open_sessions: dict[str, tuple[str, int, int]] = {}  # session -> msisdn, rating group, next number
        serial = 0
        for step in range(160):
            clock.advance(rng.randrange(30, 120))
            choice = rng.random()
            if choice < 0.3 or not open_sessions:
                msisdn, rg = rng.choice(msisdns), rng.choice([DATA_RG, DATA_RG, VOICE_RG])
                serial += 1
                sid = f"gw;r{serial}"
                answer = await gateway.ccr(sid, 1, 0, msisdn, rating_group=rg)
                if answer.get("Result-Code") == 2001:
                    open_sessions[sid] = (msisdn, rg, 1)
            elif choice < 0.75:
                sid = rng.choice(sorted(open_sessions))
                msisdn, rg, number = open_sessions[sid]
                ending = rng.random() < 0.3
                usage = ({"used": rng.randrange(0, 12 * MB)} if rg == DATA_RG
                         else {"used_seconds": rng.randrange(0, 400)})
                answer = await gateway.ccr(sid, 3 if ending else 2, number, request_units=not ending, rating_group=rg,
                                           **usage)
                if ending or answer.get("Result-Code") != 2001:
                    del open_sessions[sid]
                else:
                    open_sessions[sid] = (msisdn, rg, number + 1)
            elif choice < 0.82:
                serial += 1
                await gateway.ccr(f"gw;e{serial}", 4, 0, rng.choice(msisdns), rating_group=SMS_RG)
            elif choice < 0.9:
                await store.topup(rng.choice(msisdns), rng.randrange(1, 200) * 10_000, f"t{step}", clock.now_ms())
            elif choice < 0.95:
                await store.adjust(rng.choice(msisdns), "money", rng.choice([-1, 1]) * rng.randrange(1, 50) * 10_000,
                                   "random correction", now_ms=clock.now_ms())
            else:
                await store.expire_buckets(clock.now_ms())
            if step == 80:  # mid-run, sessions open and reservations held: the audit holds
                report = await audit(store, app.config.cdr_directory)
                assert report.ok, report.differences
                assert sum(t.reserved for t in report.units.values()) > 0
        for sid, (_, rg, number) in sorted(open_sessions.items()):
            await gateway.ccr(sid, 3, number, request_units=False, rating_group=rg)
        assert await wait_for(lambda: drained(app))
        report = await audit(store, app.config.cdr_directory)
        assert report.ok, report.differences
        assert report.cdr_records > 50 and set(report.units) >= {"money", "bytes", "units"}
        assert report.units["bytes"].debits.get("expiry", 0) > 0

        # tampering is found: a balance changed behind the ledger's back, a CDR line lost
        location = await store.locate_msisdn(msisdns[5])
        await store.redis.hincrby(k.bal_key(location.partition, msisdns[5]), "money", 1)
        files = sorted((tmp_path / "cdr").rglob("*.jsonl"))
        victim = next(path for path in files if '"recordType":"usage"' in path.read_text())
        lines = victim.read_text().splitlines(keepends=True)
        lost = next(n for n, line in enumerate(lines) if '"recordType":"usage"' in line and '"bucket":{"' in line)
        victim.write_text("".join(lines[:lost] + lines[lost + 1:]))
        report = await audit(store, app.config.cdr_directory)
        kinds = sorted(d.kind for d in report.differences)
        assert not report.ok and kinds == ["balance", "cdr-missing"]
        [balance] = [d for d in report.differences if d.kind == "balance"]
        assert (balance.owner, balance.bucket, balance.unit, balance.actual - balance.expected) == (
            f"m:{msisdns[5]}", "money", "money", 1)
        [missing] = [d for d in report.differences if d.kind == "cdr-missing"]
        assert missing.reference == json.loads(lines[lost])["recordId"]

        # the CLI says the same: exit 1 and the differences in JSON
        env = {"OCS_REDIS_URL": valkey_url, "OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0"}
        result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["audit", "--json"], env=env)
        assert result.exit_code == 1
        assert sorted(d["kind"] for d in json.loads(result.stdout)["differences"]) == ["balance", "cdr-missing"]
        history = await asyncio.to_thread(CliRunner().invoke, cli_app, ["balance", msisdns[0], "--history",
                                                                        "--json"], env=env)
        assert history.exit_code == 0, history.output
        lines_of = json.loads(history.stdout)["history"]
        running: dict[str, int] = {}
        for line in lines_of:  # each line's balance is the previous one plus its change
            assert line["balance"] == running.get(line["bucket"], 0) + line["change"]
            running[line["bucket"]] = line["balance"]
        states = {b["bucket"]: b["balance"] for b in json.loads(history.stdout)["buckets"]}
        assert all(states.get(bucket, 0) == value for bucket, value in running.items())
    finally:
        gateway.close()
        await app.stop()


@pytest.fixture
def ocs(valkey_url, tmp_path):
    runner = CliRunner()
    env = {"OCS_REDIS_URL": valkey_url, "OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0", "COLUMNS": "160"}

    def invoke(*args: str):
        return runner.invoke(cli_app, list(args), env=env, catch_exceptions=False)

    return invoke


def test_operator_commands(ocs):
    assert ocs("subscriber", "add", "491714000001", "--money", "2.00").exit_code == 0
    assert ocs("group", "create", "fam", "--json").exit_code == 0
    result = ocs("bucket", "add", "491714000001", "weekend", "--unit", "bytes", "--amount", "1000",
                 "--valid-until", "2099-01-01T00:00:00", "--services", "100", "--kind", "purchase", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bucket"]["valid_until"] == 4_070_908_800_000
    result = ocs("adjust", "491714000001", "money", "-0.50", "--reason", "duplicate top-up", "--ref", "t-9", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["balance"] == 1_500_000
    assert ocs("adjust", "491714000001", "weekend", "25", "--reason", "outage").exit_code == 0
    assert ocs("adjust", "491714000001", "money", "0.001", "--reason", "x").exit_code == 2  # more than 2 decimals
    assert ocs("adjust", "491714000001", "money", "1", "--reason", "").exit_code == 2
    result = ocs("subscriber", "set-status", "491714000001", "barred", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["old"] == "active"
    assert ocs("subscriber", "set-status", "491714000001", "lost").exit_code == 2
    result = ocs("subscriber", "set-account", "491714000001", "--postpaid", "--credit-limit", "50", "--json")
    assert json.loads(result.stdout) == {"msisdn": "491714000001", "kind": "postpaid", "credit_limit": 50_000_000,
                                         "old": "prepaid"}
    shown = json.loads(ocs("subscriber", "show", "491714000001", "--json").stdout)["subscriber"]
    assert (shown["status"], shown["kind"], shown["credit_limit"]) == ("barred", "postpaid", 50_000_000)
    history = json.loads(ocs("balance", "491714000001", "--history", "--json").stdout)["history"]
    assert [(h["type"], h["bucket"], h["change"], h["balance"]) for h in history] == [
        ("provision", "money", 2_000_000, 2_000_000), ("provision", "data", 1 << 30, 1 << 30),  # the plan's
        ("purchase", "weekend", 1000, 1000),
        ("adjustment", "money", -500_000, 1_500_000), ("adjustment", "weekend", 25, 1025)]
    table = ocs("balance", "491714000001", "--history")
    assert "duplicate top-up" in table.stdout and "-0.50" in table.stdout
    assert ocs("group", "join", "fam", "491714000001").exit_code in (0, 2)  # 0 when it is the group's partition
    assert ocs("bucket", "sweep", "--at", "2100-01-01T00:00:00", "--json").exit_code == 0
    assert json.loads(ocs("audit", "--json").stdout)["ok"] is True
    assert "every balance is explained" in ocs("audit").stdout
