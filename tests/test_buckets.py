"""The balance model (issue 4) against a real Valkey, through BalanceStore: buckets with priority, validity
and services; expiry (lazy and by the sweep) and rollover; shared group buckets with member limits;
postpaid credit limits; subscriber status; operator adjustments; and the ledger, which must explain every
balance (the conservation audit runs at the end of each test)."""

from __future__ import annotations

import asyncio
import re

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from balances import keys as k
from balances.embedded import EmbeddedValkey
from balances.model import (
    DIRECT_DEBITING,
    EVENT,
    INITIAL,
    REFUND_ACCOUNT,
    TERMINATION,
    UPDATE,
    Bucket,
    Location,
    Rollover,
    Subscriber,
    Units,
)
from balances.store import BalanceStore, UnknownGroup
from ocs.audit import audit
from tests.test_charge_script import CENT, NOW, buckets, ccr, cdrs, mscc, schedule

HOUR = 3_600_000
DAY = 24 * HOUR
DATA = schedule(rating_group=100, allowances=())  # 0.1 cent per KB, rounded up to a cent; no spine allowances
VOICE = schedule(rating_group=200, unit="seconds", increment=60, price_num=50_000, price_den=1, default_quota=300,
                 max_quota=3600, allowances=())


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url, partitions=4)
    yield store
    report = await audit(store, None)  # whatever a test did, the ledger explains every balance
    assert report.ok, report.differences
    await store.close()


async def member(store: BalanceStore, msisdn: str, money: int = 0, buckets_: tuple[Bucket, ...] = (),
                 **fields) -> Location:
    await store.provision(Subscriber(msisdn=msisdn, **fields), money, buckets=buckets_, now_ms=NOW)
    location = await store.locate_msisdn(msisdn)
    assert location is not None
    return location


def request(at: Location, session_id: str, request_type: int, number: int, msccs, now: int = NOW, **extra):
    return ccr(at, session_id, request_type, number, msccs, now=now, group=at.group, **extra)


async def ledger_types(store: BalanceStore, partition: int) -> list[tuple[str, str, int]]:
    return [(e.type, next(iter(e.changes)) if len(e.changes) == 1 else "*", e.amount)
            for e in await store.ledger(partition)]


# ---- buckets: order, services, validity -----------------------------------------------------------------

async def test_consumption_order_is_priority_then_earliest_expiry(store):
    at = await member(store, "491711000001", 1_000_000, (
        Bucket("late", "bytes", 1_000, valid_until=NOW + 2 * DAY),
        Bucket("early", "bytes", 1_000, valid_until=NOW + DAY),
        Bucket("first", "bytes", 1_000, priority=10),  # no expiry, but the lowest priority number
        Bucket("voice-only", "bytes", 1_000, services=(200,)),  # another rating group's
        Bucket("minutes", "seconds", 600),  # another unit
        Bucket("later", "bytes", 1_000, valid_from=NOW + HOUR),  # not valid yet
    ))
    await store.charge(request(at, "o1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=2_500))]))
    session = (await store.open_sessions())[0]
    assert session["reservations"] == {100: {"granted": 2_500, "buckets": {"first": 1_000, "early": 1_000,
                                                                           "late": 500}}}
    outcome = await store.charge(request(at, "o1", TERMINATION, 1, [mscc(DATA, used=Units(total=3_100),
                                                                         requested=False)], now=NOW + 1000))
    # 3000 from the allowances in order, the last 100 B in money (1 KB increment = 1 cent)
    assert outcome.msccs[0].amount == CENT
    state = await buckets(store, at.msisdn)
    assert {b: state[b] for b in ("first", "early", "late", "voice-only", "minutes", "later", "money")} == {
        "first": (0, 0), "early": (0, 0), "late": (0, 0), "voice-only": (1_000, 0), "minutes": (600, 0),
        "later": (1_000, 0), "money": (1_000_000 - CENT, 0)}
    [record] = [r for r in await cdrs(store.redis, at.partition) if r["recordType"] == "usage"]
    assert record["bucket"] == {"first": 1_000, "early": 1_000, "late": 1_000, "money": CENT}
    [usage] = [e for e in await store.ledger(at.partition) if e.type == "usage"]
    assert (usage.reference, usage.amount, usage.records) == ("o1;1", CENT, {"o1;1;100": {
        "first": -1_000, "early": -1_000, "late": -1_000, "money": -CENT}})


async def test_service_specific_units_and_bonus_money_before_the_main_money(store):
    sms = schedule(rating_group=300, unit="events", increment=1, price_num=90_000, price_den=1, default_quota=1,
                   max_quota=10, allowances=())
    at = await member(store, "491711000002", 1_000_000, (
        Bucket("sms-pack", "sms", 2, services=(300,)),  # a service-specific unit counts CC-Service-Specific-Units
        Bucket("bonus", "money", 100_000, valid_until=NOW + DAY),  # consumed before the main money (expires)
    ))
    for n in range(4):
        outcome = await store.charge(request(at, f"e{n}", EVENT, 0, [mscc(sms, requested_units=Units(units=1))],
                                             requested_action=DIRECT_DEBITING))
        assert outcome.msccs[0].result_code == 2001
    state = await buckets(store, at.msisdn)
    assert (state["sms-pack"], state["bonus"], state["money"]) == ((0, 0), (0, 0), (1_000_000 - 80_000, 0))
    records = [r["bucket"] for r in await cdrs(store.redis, at.partition)]
    assert records == [{"sms-pack": 1}, {"sms-pack": 1}, {"bonus": 90_000}, {"bonus": 10_000, "money": 80_000}]


async def test_metadata_reads_back(store):
    at = await member(store, "491711000003", 5, (
        Bucket("data", "bytes", 7, priority=5, valid_from=NOW, valid_until=NOW + DAY, services=(100, 101),
               rollover=Rollover(cap=3)),))
    [money, data] = await store.balances(at.msisdn)
    assert (money.bucket, money.balance, money.unit) == ("money", 5, None)
    assert (data.unit, data.priority, data.valid_from, data.valid_until, data.services, data.rollover) == (
        "bytes", 5, NOW, NOW + DAY, [100, 101], Rollover(cap=3))
    with pytest.raises(ValueError, match="bucket id"):
        await store.provision(Subscriber(msisdn="491711000004"), 0, buckets=[Bucket("a:b", "bytes")])
    with pytest.raises(ValueError, match="rollover needs valid_until"):
        await store.provision(Subscriber(msisdn="491711000004"), 0, buckets=[Bucket("x", "bytes",
                                                                                    rollover=Rollover(cap=1))])
    assert await store.subscriber("491711000004") is None


# ---- expiry -----------------------------------------------------------------------------------------------

async def test_an_expired_bucket_is_not_used_and_expires_lazily(store):
    at = await member(store, "491711000010", 1_000_000, (Bucket("week", "bytes", 5_000, valid_until=NOW + HOUR),))
    outcome = await store.charge(request(at, "x1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=1_024))],
                                         now=NOW + HOUR))  # exactly at valid_until: no longer valid
    assert outcome.msccs[0].reserved == CENT  # money, not the expired allowance
    state = await buckets(store, at.msisdn)
    assert "week" not in state and state["money"] == (1_000_000, CENT)
    assert (await ledger_types(store, at.partition))[-1] == ("expiry", "week", -5_000)
    assert await store.redis.zscore(k.expiry_key(at.partition), f"m:{at.msisdn}") == NOW + HOUR  # stale: harmless
    assert await store.expire_buckets(NOW + DAY) == 0
    assert await store.redis.zscore(k.expiry_key(at.partition), f"m:{at.msisdn}") is None


async def test_usage_granted_before_the_expiry_is_paid_from_the_expired_bucket(store):
    at = await member(store, "491711000011", 1_000_000, (Bucket("day", "bytes", 8_000, valid_until=NOW + HOUR),))
    await store.charge(request(at, "g1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=5_000))]))
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, 0), "day": (8_000, 5_000)}
    # reported after the expiry: 2000 of the 5000 held come from the bucket (grace), the rest of it expires
    await store.charge(request(at, "g1", UPDATE, 1, [mscc(DATA, used=Units(total=2_000),
                                                          requested_units=Units(total=1_024))], now=NOW + 2 * HOUR))
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, CENT)}
    types = await ledger_types(store, at.partition)
    assert types[1:] == [("expiry", "day", -3_000), ("usage", "day", 0), ("expiry", "day", -3_000)]
    # grace covers at most what was held: usage beyond it is paid in money
    at2 = await member(store, "491711000012", 1_000_000, (Bucket("day", "bytes", 8_000, valid_until=NOW + HOUR),))
    await store.charge(request(at2, "g2", INITIAL, 0, [mscc(DATA, requested_units=Units(total=1_000))]))
    outcome = await store.charge(request(at2, "g2", TERMINATION, 1, [mscc(DATA, used=Units(total=12_264),
                                                                          requested=False)], now=NOW + HOUR))
    assert outcome.msccs[0].amount == 2 * CENT  # 11 KB
    assert await buckets(store, at2.msisdn) == {"money": (1_000_000 - 2 * CENT, 0)}


async def test_the_sweep_expires_buckets_nobody_touches(store):
    subscribers = [await member(store, f"49171100002{n}", 0, (Bucket("promo", "bytes", 1_000 + n,
                                                                     valid_until=NOW + n * HOUR),))
                   for n in range(1, 4)]
    assert await store.expire_buckets(NOW + 2 * HOUR) == 2
    states = [await buckets(store, at.msisdn) for at in subscribers]
    assert states == [{"money": (0, 0)}, {"money": (0, 0)}, {"money": (0, 0), "promo": (1_003, 0)}]
    assert await store.expire_buckets(NOW + 2 * HOUR) == 0
    assert await store.expire_buckets(NOW + 3 * HOUR) == 1


async def test_the_sweep_leaves_held_units_until_they_are_released(store):
    at = await member(store, "491711000025", 1_000_000, (Bucket("day", "bytes", 8_000, valid_until=NOW + HOUR),))
    await store.charge(request(at, "h1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=5_000))]))
    assert await store.expire_buckets(NOW + 2 * HOUR) == 1  # the 3000 nobody holds
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, 0), "day": (5_000, 5_000)}
    assert await store.redis.zscore(k.expiry_key(at.partition), f"m:{at.msisdn}") == NOW + 2 * HOUR + 1
    assert await store.expire_buckets(NOW + 2 * HOUR) == 0  # the same sweep again: nothing, and it ends
    assert await store.close_session("h1", "timeLimit", NOW + 2 * HOUR)  # supervision: released, not used
    assert await store.expire_buckets(NOW + 3 * HOUR) == 1
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, 0)}


# ---- rollover -------------------------------------------------------------------------------------------

async def test_rollover_carries_up_to_the_cap_into_the_next_period(store):
    month = 30 * DAY
    at = await member(store, "491711000030", 0, (
        Bucket("data", "bytes", 10_000, valid_from=NOW - month, valid_until=NOW, rollover=Rollover(cap=4_000)),))
    assert await store.roll_over(at.msisdn, NOW) == 3
    state = {b.bucket: b for b in await store.balances(at.msisdn)}
    assert "data" not in state
    carried = state["data.rollover"]
    assert (carried.balance, carried.valid_from, carried.valid_until, carried.rollover) == (4_000, NOW, NOW + month,
                                                                                           None)
    assert (await ledger_types(store, at.partition))[1:] == [
        ("rollover", "data", -4_000), ("rollover", "data.rollover", 4_000), ("expiry", "data", -6_000)]
    # the carried units do not roll again: they expire at the end of the next period
    assert await store.roll_over("all", NOW + month) == 1
    assert await buckets(store, at.msisdn) == {"money": (0, 0)}


async def test_rollover_into_a_named_bucket_lazily_in_the_charge_with_held_units(store):
    at = await member(store, "491711000031", 0, (
        Bucket("may", "bytes", 6_000, valid_from=NOW - DAY, valid_until=NOW,
               rollover=Rollover(cap=5_000, into="june")),
        Bucket("june", "bytes", 1_000, valid_from=NOW, valid_until=NOW + DAY)))
    await store.charge(request(at, "r1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=2_000))],
                               now=NOW - 1))
    # period end with 2000 held: 4000 roll now (cap 5000); the charge does it lazily
    await store.charge(request(at, "r1", UPDATE, 1, [mscc(DATA, used=Units(total=500),
                                                          requested_units=Units(total=1_000))], now=NOW))
    # the 1500 left of the held units roll too, up to the cap's remaining 1000; 500 expire
    assert await buckets(store, at.msisdn) == {"money": (0, 0), "june": (1_000 + 5_000, 1_000)}
    types = await ledger_types(store, at.partition)
    assert types[1:] == [("rollover", "may", -4_000), ("rollover", "june", 4_000), ("usage", "may", 0),
                         ("rollover", "may", -1_000), ("rollover", "june", 1_000), ("expiry", "may", -500)]


# ---- shared buckets ---------------------------------------------------------------------------------------

async def test_group_members_share_a_bucket_with_member_limits(store):
    p = await store.create_group("family-1")
    assert await store.create_group("family-1", partition=(p + 1) % 4) == p  # a group keeps its partition
    await store.add_group_bucket("family-1", Bucket("family-data", "bytes", 10_000, services=(100,),
                                                    member_limits={"491711000041": 3_000}), now_ms=NOW)
    parent = await member(store, "491711000040", 1_000_000, group="family-1")
    child = await member(store, "491711000041", 0, group="family-1")
    assert parent.partition == child.partition == p and parent.group == "family-1"
    # the child may use 3000 of the shared 10000; then its own (empty) money: a partial grant
    outcome = await store.charge(request(child, "c1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=5_000))]))
    assert outcome.msccs[0].granted == Units(total=3_000) and outcome.msccs[0].final_unit_action == 1
    outcome = await store.charge(request(parent, "p1", INITIAL, 0, [mscc(DATA,
                                                                         requested_units=Units(total=9_000))]))
    assert outcome.msccs[0].granted == Units(total=9_000) and outcome.msccs[0].reserved == CENT
    [shared] = await store.group_balances("family-1")
    assert (shared.balance, shared.reserved) == (10_000, 10_000)
    await store.charge(request(child, "c1", TERMINATION, 1, [mscc(DATA, used=Units(total=2_000), requested=False)]))
    await store.charge(request(parent, "p1", TERMINATION, 1, [mscc(DATA, used=Units(total=8_000),
                                                                   requested=False)]))
    child_view = {b.bucket: b for b in await store.balances(child.msisdn)}
    # the child's session ended first: the parent's usage found all 8000 left in the shared bucket
    assert (child_view["@family-data"].balance, child_view["@family-data"].member_used,
            child_view["@family-data"].member_limit) == (0, 2_000, 3_000)
    assert (await store.balances(parent.msisdn))[0].balance == 1_000_000
    records = {r["sessionId"]: r["bucket"] for r in await cdrs(store.redis, p) if r["recordType"] == "usage"}
    assert records == {"c1": {"@family-data": 2_000}, "p1": {"@family-data": 8_000}}
    lines = await store.history(child.msisdn)
    assert [(line["type"], line["bucket"], line["change"], line["balance"], line["by"]) for line in lines] == [
        ("credit", "@family-data", 10_000, 10_000, ""),  # (provisioning the child with nothing wrote nothing)
        ("usage", "@family-data", -2_000, 8_000, "491711000041"),
        ("usage", "@family-data", -8_000, 0, "491711000040")]


async def test_shared_bucket_is_atomic_across_members(store):
    await store.create_group("company", partition=2)
    await store.add_group_bucket("company", Bucket("pool", "bytes", 50_000), now_ms=NOW)
    members = [await member(store, f"49171100005{n}", 0, group="company") for n in range(10)]
    outcomes = await asyncio.gather(*(
        store.charge(request(at, f"s{n}", INITIAL, 0, [mscc(DATA, requested_units=Units(total=7_000))]))
        for n, at in enumerate(members)))
    granted = sorted(o.msccs[0].granted.total if o.msccs[0].granted else 0 for o in outcomes)
    assert sum(granted) == 50_000 and granted[-1] == 7_000  # 7 full grants, one of 1000, two none
    await asyncio.gather(*(
        store.charge(request(at, f"s{n}", TERMINATION, 1, [mscc(DATA, used=Units(total=g), requested=False)]))
        for n, (at, g) in enumerate(zip(members, [7_000] * 10, strict=True))))
    [pool] = await store.group_balances("company")
    assert pool.reserved == 0 and pool.balance == 0  # usage beyond the grants went to money (negative)


async def test_leaving_a_group_waits_for_its_sessions_and_the_cache_follows(store):
    await store.create_group("g1", partition=1)
    await store.add_group_bucket("g1", Bucket("pool", "bytes", 5_000), now_ms=NOW)
    at = await member(store, "491711000060", 100_000, partition=1)  # in the group's partition, not a member yet
    await store.join_group(at.msisdn, "g1")
    at = await store.locate_msisdn(at.msisdn)
    assert at.group == "g1"
    await store.charge(request(at, "l1", INITIAL, 0, [mscc(DATA, requested_units=Units(total=1_000))]))
    with pytest.raises(ValueError, match="hold units"):
        await store.leave_group(at.msisdn)
    await store.charge(request(at, "l1", TERMINATION, 1, [mscc(DATA, used=Units(total=400), requested=False)]))
    await store.leave_group(at.msisdn)
    # a request still naming the group is answered stale (and the caller retries with what is on record)
    outcome = await store.charge(request(at, "l2", INITIAL, 0, [mscc(DATA)]))
    assert (outcome.result_code, outcome.stale_plan, outcome.stale_group) == (5012, "demo", "")
    assert (await store.locate_msisdn(at.msisdn)).group == ""
    other = await member(store, "491711000061", 0, partition=2)
    with pytest.raises(ValueError, match="partition"):
        await store.join_group(other.msisdn, "g1")
    with pytest.raises(UnknownGroup):
        await store.provision(Subscriber(msisdn="491711000062", group="nope"), 0)


# ---- postpaid -------------------------------------------------------------------------------------------

async def test_postpaid_is_charged_against_a_credit_limit(store):
    postpaid = await member(store, "491711000070", 0, kind="postpaid", credit_limit=50_000)
    prepaid = await member(store, "491711000071", 0)
    sub = await store.subscriber(postpaid.msisdn)
    assert (sub.kind, sub.credit_limit) == ("postpaid", 50_000)
    outcome = await store.charge(request(postpaid, "pp", INITIAL, 0, [mscc(DATA, requested_units=Units(
        total=100 * 1024))]))
    assert outcome.msccs[0].granted == Units(total=50 * 1024)  # limit + balance = 5 cents = 50 KB
    outcome = await store.charge(request(prepaid, "pr", INITIAL, 0, [mscc(DATA)]))
    assert (outcome.msccs[0].granted, outcome.msccs[0].final_unit_action) == (None, 1)  # no money: redirected
    await store.charge(request(postpaid, "pp", UPDATE, 1, [mscc(DATA, used=Units(total=50 * 1024))]))
    assert (await buckets(store, postpaid.msisdn))["money"] == (-50_000, 0)
    assert (await store.topup(postpaid.msisdn, 20_000, "payment-1", NOW)).balance == -30_000  # a payment
    assert await store.set_account(postpaid.msisdn, "postpaid", 100_000) == "postpaid"
    outcome = await store.charge(request(postpaid, "pp", UPDATE, 2, [mscc(DATA, requested_units=Units(
        total=100 * 1024))]))
    assert outcome.msccs[0].granted == Units(total=70 * 1024)
    assert await store.set_account(prepaid.msisdn, "postpaid", 10_000) == "prepaid"
    with pytest.raises(ValueError):
        await store.set_account(prepaid.msisdn, "prepaid", 10)


# ---- status ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, initial", [("barred", 4010), ("suspended", 4010), ("terminated", 5030)])
async def test_status_is_enforced_by_the_charge_and_event_functions(store, status, initial):
    at = await member(store, "491711000080", 1_000_000)
    await store.charge(request(at, "st", INITIAL, 0, [mscc(DATA)]))
    assert await store.set_status(at.msisdn, status) == "active"
    assert (await store.subscriber(at.msisdn)).status == status
    assert (await store.charge(request(at, "st2", INITIAL, 0, [mscc(DATA)]))).result_code == initial
    event = await store.charge(request(at, "ev", EVENT, 0, [mscc(DATA)], requested_action=DIRECT_DEBITING))
    assert event.result_code == initial
    outcome = await store.charge(request(at, "st", UPDATE, 1, [mscc(DATA, used=Units(total=1_024))]))
    assert outcome.msccs[0].amount == CENT  # usage happened: charged in every status
    if status == "terminated":
        assert outcome.result_code == 5030 and await store.open_sessions() == []
        assert (await cdrs(store.redis, at.partition))[-1]["causeForRecClosing"] == "managementIntervention"
        refund = await store.charge(request(at, "rf", EVENT, 0, [mscc(DATA)], requested_action=REFUND_ACCOUNT))
        assert refund.result_code == 5030
    else:
        assert outcome.result_code == 2001 and outcome.msccs[0].result_code == 4010
        await store.charge(request(at, "st", TERMINATION, 2, [mscc(DATA, requested=False)]))
    assert await buckets(store, at.msisdn) == {"money": (1_000_000 - CENT, 0)}
    with pytest.raises(ValueError):
        await store.set_status(at.msisdn, "gone")


# ---- operator changes ------------------------------------------------------------------------------------

async def test_adjustments_and_credits_are_in_the_ledger_once_per_reference(store):
    at = await member(store, "491711000090", 1_000, (Bucket("data", "bytes", 100),))
    change = await store.adjust(at.msisdn, "money", -400, "goodwill reversal", "ticket-7", now_ms=NOW + 1)
    assert (change.applied, change.balance) == (True, 600)
    again = await store.adjust(at.msisdn, "money", -400, "goodwill reversal", "ticket-7", now_ms=NOW + 2)
    assert (again.applied, again.balance) == (False, 600)
    assert (await store.adjust(at.msisdn, "data", 50, "network outage", now_ms=NOW + 3)).balance == 150
    with pytest.raises(ValueError, match="no bucket"):
        await store.adjust(at.msisdn, "nothing", 5, "typo")
    with pytest.raises(ValueError, match="no group"):
        await store.adjust(at.msisdn, "@pool", 5, "typo")
    bundle = Bucket("night", "bytes", 1 << 20, valid_from=NOW, valid_until=NOW + DAY)
    assert (await store.add_bucket(at.msisdn, bundle, reference="order-1", kind="purchase", now_ms=NOW)).applied
    assert not (await store.add_bucket(at.msisdn, bundle, reference="order-1", kind="purchase", now_ms=NOW)).applied
    entries = [e for e in await store.ledger(at.partition)]
    assert [(e.type, e.changes, e.reference, e.reason) for e in entries] == [
        ("provision", {"money": 1_000, "data": 100}, "", ""),
        ("adjustment", {"money": -400}, "ticket-7", "goodwill reversal"),
        ("adjustment", {"data": 50}, "", "network outage"),
        ("purchase", {"night": 1 << 20}, "order-1", "")]
    lines = await store.history(at.msisdn)
    assert [(line["bucket"], line["change"], line["balance"]) for line in lines] == [
        ("money", 1_000, 1_000), ("data", 100, 100), ("money", -400, 600), ("data", 50, 150),
        ("night", 1 << 20, 1 << 20)]


# ---- one slot per call, also on a cluster ----------------------------------------------------------------

async def test_group_calls_run_on_a_cluster_node(tmp_path):
    """A Valkey in cluster mode refuses cross-slot calls: a member's charge with the shared bucket, the
    sweep, adjustments and group changes all stay in the group's slot."""
    server = EmbeddedValkey(tmp_path / "cluster", config={
        "cluster-enabled": "yes", "cluster-config-file": str(tmp_path / "cluster" / "nodes.conf"),
        "appendfsync": "no"})
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url)
        await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            if b"cluster_state:ok" in await client.execute_command("CLUSTER", "INFO"):
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ResponseError, match="same slot"):
            await client.eval("return 1", 2, "{p001}x", "{p002}y")
        store = await BalanceStore.connect(server.url, partitions=8)
        await store.create_group("fam")
        await store.add_group_bucket("fam", Bucket("pool", "bytes", 10_000, valid_until=NOW + HOUR,
                                                   rollover=Rollover(cap=10, validity_ms=DAY)), now_ms=NOW)
        at = await member(store, "491711000100", 1_000_000, (Bucket("own", "bytes", 10, valid_until=NOW + HOUR),),
                          group="fam")
        await store.charge(request(at, "cl", INITIAL, 0, [mscc(DATA)]))
        await store.charge(request(at, "cl", UPDATE, 1, [mscc(DATA, used=Units(total=5_000))], now=NOW + HOUR))
        assert await store.close_session("cl", "managementIntervention", NOW + HOUR)
        await store.charge(request(at, "ev", EVENT, 0, [mscc(DATA)], requested_action=DIRECT_DEBITING))
        await store.adjust(at.msisdn, "@pool.rollover", 1, "test", now_ms=NOW + HOUR)
        await store.set_member_limit("fam", "pool.rollover", at.msisdn, 5, now_ms=NOW + HOUR)
        assert await store.expire_buckets(NOW + 2 * DAY) > 0
        await store.set_status(at.msisdn, "barred")
        await store.leave_group(at.msisdn)
        report = await audit(store, None)
        assert report.ok, report.differences
        await store.close()
        await client.aclose()
    finally:
        server.stop()


def test_every_key_of_a_group_has_the_group_partition_tag():
    tags = {re.search(r"\{p\d{3}\}", key).group(0) for key in (
        k.group_key(7, "fam"), k.group_members_key(7, "fam"), k.bal_key(7, "4917"), k.expiry_key(7),
        k.operation_key(7, "adjust", "ref"), k.ledger_key(7))}
    assert tags == {"{p007}"}
    assert k.parse_location(k.location_value(Location(3, "4917", "gold", "fam"))) == Location(3, "4917", "gold", "fam")
    assert k.parse_location(b"3|4917|gold") == Location(3, "4917", "gold")
