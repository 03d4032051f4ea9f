"""The charge and event functions (balances/lua) against a real Valkey, through BalanceStore.

Exact balances and reservations after each step of a session, duplicates that change nothing (full key
dumps), error answers, CDR records byte-exact, big numbers, conservation of money over random operations,
and a hypothesis property test that the Lua debits and grants equal ratecards.pricing.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from balances import keys as k
from balances.model import (
    CHECK_BALANCE,
    DIRECT_DEBITING,
    EVENT,
    INITIAL,
    PRICE_ENQUIRY,
    REFUND_ACCOUNT,
    TERMINATION,
    UPDATE,
    Bucket,
    ChargeOutcome,
    ChargeRequest,
    Location,
    MsccCharge,
    Subscriber,
    Units,
    schedule_ref,
    with_schedule_id,
)
from balances.store import BalanceStore
from ratecards.pricing import affordable_units, amount_for_units
from ratecards.schedule import RatingSchedule

NOW = 1_700_000_000_000
CENT = 10_000  # micro-units


def schedule(**changes: Any) -> RatingSchedule:
    fields: dict[str, Any] = dict(
        rating_group=10, unit="bytes", increment=1024, price_num=1_000, price_den=1, default_quota=10_240,
        max_quota=1 << 20, minor=CENT, rounding="up", allowances=("data",), final_unit_action=1,
        version="rc-7",
    )
    fields.update(changes)
    return RatingSchedule(**fields)


def mscc(s: RatingSchedule, *, used: Units | None = None, requested: bool = True,
         requested_units: Units | None = None, **extra: Any) -> MsccCharge:
    return MsccCharge(rating_group=s.rating_group, schedule=msgspec.to_builtins(s), used=used,
                      requested=requested, requested_units=requested_units, **extra)


def ccr(at: Location, session_id: str, request_type: int, number: int, msccs: list[MsccCharge],
        now: int = NOW, **extra: Any) -> ChargeRequest:
    return ChargeRequest(session_id=session_id, request_type=request_type, request_number=number,
                         msisdn=at.msisdn, plan=at.plan, partition=at.partition, now_ms=now, msccs=msccs, **extra)


async def subscriber(store: BalanceStore, msisdn: str, money: int, allowances: dict[str, int] | None = None,
                     **fields: Any) -> Location:
    await store.provision(Subscriber(msisdn=msisdn, **fields), money, allowances or {})
    location = await store.locate_msisdn(msisdn)
    assert location is not None
    return location


async def buckets(store: BalanceStore, msisdn: str) -> dict[str, tuple[int, int]]:
    return {b.bucket: (b.balance, b.reserved) for b in await store.balances(msisdn)}


async def dump(redis: Any) -> dict:
    """Every key with its type, value and whether it has a TTL: two equal dumps = nothing changed."""
    out = {}
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            value: Any = await redis.hgetall(key)
        elif kind == "string":
            value = await redis.get(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await redis.xrange(key)
        else:
            value = kind
        out[key] = (kind, value, await redis.pttl(key) > 0)
    return out


async def cdrs(redis: Any, partition: int) -> list[dict]:
    return [msgspec.json.decode(fields[b"r"]) for _, fields in await redis.xrange(k.cdr_key(partition))]


def without_duplicate_flag(outcome: ChargeOutcome) -> ChargeOutcome:
    return msgspec.structs.replace(outcome, duplicate=False)


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url, partitions=4)
    yield store
    await store.close()


# ---- a session, step by step -----------------------------------------------------------------------------

async def test_session_lifecycle_exact_balances_and_reservations(store):
    at = await subscriber(store, "491701000001", 1_000_000, {"data": 5_000})
    s = schedule()

    # CCR-I, empty RSU: default quota 10240 B = 5000 from the allowance + 5240 B of money (6 increments =
    # 6000 micro-units, rounded up to 1 cent)
    outcome = await store.charge(ccr(at, "s1", INITIAL, 0, [mscc(s)], context={"apn": "internet"}))
    assert outcome.result_code == 2001 and not outcome.duplicate
    [m] = outcome.msccs
    assert (m.result_code, m.granted, m.amount, m.reserved, m.final_unit_action) == (
        2001, Units(total=10_240), 0, CENT, None)
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, CENT), "data": (5_000, 5_000)}
    [open_session] = await store.open_sessions()
    assert open_session["reservations"] == {10: {"granted": 10_240, "buckets": {"data": 5_000, "money": CENT}}}

    # CCR-U: 8000 B used = the 5000 allowance + 3000 B (3 increments, 1 cent); then 10240 B all from money
    used = Units(total=8_000, input=3_000, output=5_000)
    outcome = await store.charge(ccr(at, "s1", UPDATE, 1, [mscc(s, used=used)], now=NOW + 60_000))
    [m] = outcome.msccs
    assert (m.result_code, m.granted, m.amount, m.reserved) == (2001, Units(total=10_240), CENT, CENT)
    assert await buckets(store, at.msisdn) == {"money": (990_000, CENT), "data": (0, 0)}

    # CCR-T: 100 B used (1 increment, 1 cent), everything released, session closed
    outcome = await store.charge(ccr(at, "s1", TERMINATION, 2, [mscc(s, used=Units(total=100), requested=False)],
                                     now=NOW + 90_000))
    [m] = outcome.msccs
    assert (m.result_code, m.granted, m.amount, m.reserved) == (2001, None, CENT, 0)
    assert await buckets(store, at.msisdn) == {"money": (980_000, 0), "data": (0, 0)}
    assert await store.open_sessions() == []
    session_key = k.ses_key(at.partition, "s1")
    assert await store.redis.hget(session_key, "state") == b"closed"
    assert 0 < await store.redis.pttl(session_key) <= 86_400_000
    assert [(r["recordType"], r["amount"]) for r in await cdrs(store.redis, at.partition)] == [
        ("usage", CENT), ("usage", CENT), ("close", 0)]


async def test_allowance_is_consumed_before_money(store):
    at = await subscriber(store, "491701000002", 500_000, {"data": 1 << 30, "bonus": 4_096})
    s = schedule(allowances=("bonus", "data"))
    await store.charge(ccr(at, "a1", INITIAL, 0, [mscc(s, requested_units=Units(total=8_192))]))
    assert await buckets(store, at.msisdn) == {"money": (500_000, 0), "bonus": (4_096, 4_096),
                                               "data": (1 << 30, 4_096)}
    await store.charge(ccr(at, "a1", TERMINATION, 1, [mscc(s, used=Units(total=6_000), requested=False)]))
    assert await buckets(store, at.msisdn) == {"money": (500_000, 0), "bonus": (0, 0),
                                               "data": ((1 << 30) - 1_904, 0)}
    [usage, _] = await cdrs(store.redis, at.partition)
    assert usage["bucket"] == {"bonus": 4_096, "data": 1_904} and usage["amount"] == 0


async def test_out_of_credit_partial_grant_then_4012(store):
    at = await subscriber(store, "491701000003", 25_000)
    s = schedule(price_num=CENT, allowances=(), final_unit_action=0)  # 1 cent per KiB, TERMINATE
    # 10 KiB wanted, 2 KiB affordable: a final grant with the schedule's Final-Unit-Action
    outcome = await store.charge(ccr(at, "o1", INITIAL, 0, [mscc(s)]))
    [m] = outcome.msccs
    assert (m.result_code, m.granted, m.reserved, m.final_unit_action) == (2001, Units(total=2_048), 20_000, 0)
    assert await buckets(store, at.msisdn) == {"money": (25_000, 20_000)}
    # the final units are used: debited, and nothing is left for a new grant
    outcome = await store.charge(ccr(at, "o1", UPDATE, 1, [mscc(s, used=Units(total=2_048))]))
    [m] = outcome.msccs
    assert (m.result_code, m.granted, m.amount, m.reserved) == (4012, None, 20_000, 0)
    assert outcome.result_code == 2001
    assert await buckets(store, at.msisdn) == {"money": (5_000, 0)}
    [session] = await store.open_sessions()
    assert session["reservations"] == {}
    # usage beyond the grant still happened: money goes negative
    outcome = await store.charge(ccr(at, "o1", TERMINATION, 2, [mscc(s, used=Units(total=1_500), requested=False)]))
    assert outcome.msccs[0].amount == 20_000
    assert await buckets(store, at.msisdn) == {"money": (-15_000, 0)}


async def test_termination_releases_every_rating_group(store):
    at = await subscriber(store, "491701000004", 10_000_000, {"data": 0})
    video, web = schedule(rating_group=20), schedule(rating_group=30, unit="seconds", increment=60,
                                                     default_quota=600, max_quota=3_600)
    await store.charge(ccr(at, "m1", INITIAL, 0, [mscc(video), mscc(web)]))
    assert (await buckets(store, at.msisdn))["money"] == (10_000_000, 2 * CENT)
    outcome = await store.charge(ccr(at, "m1", TERMINATION, 1, [mscc(web, used=Units(time=61), requested=False)]))
    assert outcome.msccs[0].amount == CENT  # 2 minutes at 1000 micro-units, rounded up to the cent
    assert await buckets(store, at.msisdn) == {"money": (10_000_000 - CENT, 0), "data": (0, 0)}
    session = await store.redis.hgetall(k.ses_key(at.partition, "m1"))
    assert not [f for f in session if f.startswith(b"r:")]


async def test_what_other_sessions_hold_is_not_available(store):
    at = await subscriber(store, "491701000015", 35_000, {"data": 3_000})
    s = schedule(price_num=CENT, final_unit_action=0)  # 1 cent per KiB, TERMINATE
    first = await store.charge(ccr(at, "h1", INITIAL, 0, [mscc(s, requested_units=Units(total=4_024))]))
    assert first.msccs[0].granted == Units(total=4_024)  # 3000 B allowance + 1 KiB for 1 cent
    assert await buckets(store, at.msisdn) == {"money": (35_000, CENT), "data": (3_000, 3_000)}
    second = await store.charge(ccr(at, "h2", INITIAL, 0, [mscc(s)]))
    [m] = second.msccs
    assert (m.granted, m.reserved, m.final_unit_action) == (Units(total=2_048), 20_000, 0)
    assert await buckets(store, at.msisdn) == {"money": (35_000, 30_000), "data": (3_000, 3_000)}
    third = await store.charge(ccr(at, "h3", INITIAL, 0, [mscc(s)]))
    assert third.msccs[0].result_code == 4012
    # usage is paid from the session's own reservation first, not from what others hold
    await store.charge(ccr(at, "h1", TERMINATION, 1, [mscc(s, used=Units(total=4_000), requested=False)]))
    assert await buckets(store, at.msisdn) == {"money": (25_000, 20_000), "data": (0, 0)}


@pytest.mark.parametrize(("rounding", "raw", "expected"), [
    ("up", 1, CENT), ("up", CENT, CENT), ("up", CENT + 1, 2 * CENT),
    ("down", CENT - 1, 0), ("down", 2 * CENT - 1, CENT),
    ("half-up", 4_999, 0), ("half-up", 5_000, CENT), ("half-up", 15_000, 2 * CENT),
    ("half-even", 5_000, 0), ("half-even", 5_001, CENT), ("half-even", 15_000, 2 * CENT),
    ("half-even", 25_000, 2 * CENT), ("half-even", 24_999, 2 * CENT), ("half-even", 35_000, 4 * CENT),
])
async def test_rounding_modes_at_the_midpoints(store, rounding, raw, expected):
    at = await subscriber(store, "491701000016", 10**9)
    s = schedule(increment=1, price_num=raw, rounding=rounding, allowances=(), default_quota=1, max_quota=1)
    assert amount_for_units(s, 1) == expected
    await store.charge(ccr(at, "r1", INITIAL, 0, [mscc(s, requested=False)]))
    outcome = await store.charge(ccr(at, "r1", TERMINATION, 1, [mscc(s, used=Units(total=1), requested=False)]))
    assert outcome.msccs[0].amount == expected
    assert await buckets(store, at.msisdn) == {"money": (10**9 - expected, 0)}


# ---- duplicates and error answers ------------------------------------------------------------------------

async def test_duplicates_return_the_stored_answer_and_change_nothing(store):
    at = await subscriber(store, "491701000005", 1_000_000, {"data": 2_000})
    s = schedule()
    requests = [
        ccr(at, "d1", INITIAL, 0, [mscc(s)], end_to_end=101),
        ccr(at, "d1", UPDATE, 1, [mscc(s, used=Units(total=5_000))], end_to_end=102),
        ccr(at, "d1", TERMINATION, 2, [mscc(s, used=Units(total=1), requested=False)], end_to_end=103),
    ]
    for request in requests:
        first = await store.charge(request)
        before = await dump(store.redis)
        # every earlier request again, e.g. a retransmission with the T flag
        for earlier in requests[: requests.index(request) + 1]:
            again = await store.charge(earlier)
            assert again.duplicate
            assert again.end_to_end == earlier.end_to_end
        again = await store.charge(request)
        assert without_duplicate_flag(again) == first
        assert await dump(store.redis) == before


async def test_update_and_termination_of_unknown_sessions_are_5002(store):
    at = await subscriber(store, "491701000006", 1_000_000)
    s = schedule(allowances=())
    before = await dump(store.redis)
    for request_type in (UPDATE, TERMINATION):
        outcome = await store.charge(ccr(at, "nope", request_type, 1, [mscc(s, used=Units(total=10))]))
        assert (outcome.result_code, outcome.msccs, outcome.duplicate) == (5002, [], False)
    assert await dump(store.redis) == before
    # after CCR-T the session is closed: a later CCR-U is unknown too
    await store.charge(ccr(at, "t1", INITIAL, 0, [mscc(s)]))
    await store.charge(ccr(at, "t1", TERMINATION, 1, []))
    before = await dump(store.redis)
    outcome = await store.charge(ccr(at, "t1", UPDATE, 2, [mscc(s, used=Units(total=10))]))
    assert outcome.result_code == 5002
    assert await dump(store.redis) == before


async def test_unknown_subscriber_is_5030(store):
    ghost = Location(partition=1, msisdn="491709999999", plan="demo")
    outcome = await store.charge(ccr(ghost, "g1", INITIAL, 0, [mscc(schedule())]))
    assert outcome.result_code == 5030
    outcome = await store.charge(ccr(ghost, "g2", EVENT, 0, [mscc(schedule())], requested_action=DIRECT_DEBITING))
    assert outcome.result_code == 5030
    assert await dump(store.redis) == {k.PARTITIONS_KEY.encode(): ("string", b"4", False)}


async def test_stale_plan_changes_nothing_and_names_the_plan_on_record(store):
    at = await subscriber(store, "491701000007", 1_000_000, plan="gold")
    stale = Location(at.partition, at.msisdn, "demo")
    before = await dump(store.redis)
    outcome = await store.charge(ccr(stale, "p1", INITIAL, 0, [mscc(schedule())]))
    assert outcome.stale_plan == "gold" and outcome.result_code == 5012
    assert await dump(store.redis) == before
    outcome = await store.charge(ccr(at, "p1", INITIAL, 0, [mscc(schedule())]))
    assert outcome.result_code == 2001 and outcome.stale_plan is None


async def test_barred_subscriber(store):
    at = await subscriber(store, "491701000008", 1_000_000, status="barred")
    before = await dump(store.redis)
    outcome = await store.charge(ccr(at, "b1", INITIAL, 0, [mscc(schedule())]))
    assert outcome.result_code == 4010
    assert await dump(store.redis) == before


async def test_barred_mid_session_still_debits_usage(store):
    at = await subscriber(store, "491701000009", 1_000_000)
    s = schedule(allowances=())
    await store.charge(ccr(at, "b2", INITIAL, 0, [mscc(s)]))
    await store.redis.hset(k.sub_key(at.partition, at.msisdn), "status", "barred")
    outcome = await store.charge(ccr(at, "b2", UPDATE, 1, [mscc(s, used=Units(total=1_024))]))
    [m] = outcome.msccs
    assert (outcome.result_code, m.result_code, m.amount, m.granted) == (2001, 4010, CENT, None)
    assert await buckets(store, at.msisdn) == {"money": (1_000_000 - CENT, 0)}


async def test_initial_for_an_existing_session_is_5012_and_changes_nothing(store):
    at = await subscriber(store, "491701000010", 1_000_000)
    await store.charge(ccr(at, "x1", INITIAL, 0, [mscc(schedule())]))
    before = await dump(store.redis)
    outcome = await store.charge(ccr(at, "x1", INITIAL, 5, [mscc(schedule())]))
    assert outcome.result_code == 5012
    assert await dump(store.redis) == before


async def test_stored_answers_are_kept_by_age_and_need(store):
    """The last answer and those younger than 60 s are kept (at most 8); a request numbered at or below one
    that was let go, with no stored answer, is answered 5012 and changes nothing."""
    at = await subscriber(store, "491701000011", 10**12)
    s = schedule(allowances=())

    async def kept() -> list[int]:
        fields = await store.redis.hkeys(k.ses_key(at.partition, "w1"))
        return sorted(int(f[2:]) for f in fields if f.startswith(b"a:"))

    await store.charge(ccr(at, "w1", INITIAL, 0, [mscc(s, service_id=7)], origin_host="pgw"))
    for n in (1, 2, 3, 5, 4):  # 5 before 4: a CCR-U sent before the previous one is answered (RFC 4006 §5.1.2)
        outcome = await store.charge(ccr(at, "w1", UPDATE, n, [mscc(s, used=Units(total=1), service_id=7)],
                                         now=NOW + 1_000 * n))
        assert (outcome.result_code, outcome.duplicate) == (2001, False)
    assert await kept() == [0, 1, 2, 3, 4, 5]

    # a minute later only the last one stays; its duplicate is the stored answer, decoded back exactly
    answer = await store.charge(ccr(at, "w1", UPDATE, 6, [mscc(s, used=Units(total=1), service_id=7)],
                                    now=NOW + 70_000, end_to_end=2**32 - 1))
    assert await kept() == [6]
    again = await store.charge(ccr(at, "w1", UPDATE, 6, [], now=NOW + 75_000))
    assert again == msgspec.structs.replace(answer, duplicate=True)
    assert answer.msccs[0].service_id == 7 and answer.end_to_end == 2**32 - 1
    before = await dump(store.redis)
    for old in (5, 0):  # let go: cannot be told apart from an old duplicate
        outcome = await store.charge(ccr(at, "w1", UPDATE, old, [mscc(s, used=Units(total=1))], now=NOW + 75_000))
        assert (outcome.result_code, outcome.duplicate) == (5012, False)
    assert await dump(store.redis) == before

    # a burst within the window keeps at most 8
    for n in range(7, 21):
        await store.charge(ccr(at, "w1", UPDATE, n, [mscc(s, used=Units(total=1))], now=NOW + 80_000))
    assert await kept() == list(range(13, 21))
    assert (await store.charge(ccr(at, "w1", UPDATE, 13, [], now=NOW + 80_000))).duplicate
    outcome = await store.charge(ccr(at, "w1", UPDATE, 12, [mscc(s, used=Units(total=1))], now=NOW + 80_000))
    assert outcome.result_code == 5012


async def test_schedules_named_by_id_are_sent_in_full_once(store):
    """A request names its schedules by id alone; a function that does not know one answers need_schedules
    (changing nothing) and BalanceStore sends the request again in full, once: from then on the id is enough,
    for the session's next request and for an event."""
    at = await subscriber(store, "491701000023", 10**12)
    full = with_schedule_id(msgspec.to_builtins(schedule(allowances=(), version=f"by-id-{random.random()}")))
    ref = schedule_ref(full)
    assert ref == {"id": full["id"]}

    def by_ref(**options: Any) -> MsccCharge:
        return MsccCharge(rating_group=10, schedule=ref, requested=True, **options)

    calls = store.calls_sent
    opened = await store.charge(ccr(at, "r1", INITIAL, 0, [by_ref()]))
    assert (opened.result_code, opened.msccs[0].granted, opened.need_schedules) == (2001, Units(total=10_240), False)
    assert store.calls_sent - calls == 2  # need_schedules, then in full
    calls = store.calls_sent
    updated = await store.charge(ccr(at, "r1", UPDATE, 1, [by_ref(used=Units(total=2_048))]))
    assert (updated.result_code, updated.msccs[0].amount) == (2001, CENT)
    event = await store.charge(ChargeRequest(session_id="e1", request_type=EVENT, request_number=0,
                                             msisdn=at.msisdn, plan=at.plan, partition=at.partition, now_ms=NOW,
                                             msccs=[by_ref()], requested_action=PRICE_ENQUIRY))
    assert event.result_code == 2001 and event.msccs[0].cost == CENT
    assert store.calls_sent - calls == 2  # one each
    # the raw answer of the function, for a schedule nobody sent in full
    unknown = {"id": "0123456789abcdef"}
    request = ccr(at, "r2", INITIAL, 0, [MsccCharge(rating_group=10, schedule=unknown, requested=True)])
    before = await dump(store.redis)
    with pytest.raises(ResponseError, match="named by id"):
        await store.charge(request)
    await store.redis.delete(k.sidx_key("r2"), k.subscriber_sessions_key(at.partition, at.msisdn))
    after = await dump(store.redis)
    assert {key: value for key, value in after.items() if not key.startswith(b"subses:")} == {
        key: value for key, value in before.items() if not key.startswith(b"subses:")}


async def test_the_session_keeps_its_peer_only_when_it_is_not_the_origin_host(store):
    at = await subscriber(store, "491701000022", 10**12)
    s = schedule(allowances=())
    key = k.ses_key(at.partition, "p1")
    await store.charge(ccr(at, "p1", INITIAL, 0, [mscc(s)], origin_host="pgw1", origin_realm="gw", peer="pgw1"))
    session = await store.redis.hgetall(key)
    assert b"peer" not in session and b"ctx" not in session
    assert (await store.session_owner("p1")).peer == "pgw1"
    await store.charge(ccr(at, "p1", UPDATE, 1, [mscc(s)], origin_host="pgw2", origin_realm="gw", peer="dra"))
    assert await store.redis.hget(key, "peer") == b"dra"
    owner = await store.session_owner("p1")
    assert (owner.origin_host, owner.peer) == ("pgw2", "dra")
    await store.charge(ccr(at, "p1", UPDATE, 2, [mscc(s)], origin_host="pgw2", origin_realm="gw", peer="pgw2"))
    assert await store.redis.hget(key, "peer") is None
    assert (await store.session_owner("p1")).peer == "pgw2"
    assert (await store.open_sessions())[0]["peer"] == "pgw2"


async def test_a_session_from_before_the_answer_index_keeps_its_rules(store):
    """A session written by the version that kept the last 32 answers (no 'ak'): its stored answers still
    answer duplicates, a request at or below (highest - 32) is answered 5012, and the next answer written
    lets the old ones go."""
    at = await subscriber(store, "491701000021", 10**12)
    s = schedule(allowances=())
    await store.charge(ccr(at, "l1", INITIAL, 0, [mscc(s)]))
    key = k.ses_key(at.partition, "l1")
    stored = b'{"result_code":2001,"msccs":[{"rating_group":10,"result_code":2001,"amount":0,"reserved":1}],' \
             b'"end_to_end":9}'
    legacy_cdr = f'"servedMSISDN":"{at.msisdn}","sessionId":"l1","originHost":"","recordOpeningTime":{NOW}'
    await store.redis.hset(key, mapping={"hi": 40, "a:39": stored, "a:40": stored, "cdr": legacy_cdr})
    await store.redis.hdel(key, "ak", "a:0")
    duplicate = await store.charge(ccr(at, "l1", UPDATE, 39, []))
    assert (duplicate.duplicate, duplicate.end_to_end, duplicate.msccs[0].reserved) == (True, 9, 1)
    assert (await store.charge(ccr(at, "l1", UPDATE, 8, [mscc(s)]))).result_code == 5012
    outcome = await store.charge(ccr(at, "l1", UPDATE, 41, [mscc(s, used=Units(total=1))], now=NOW + 1))
    assert (outcome.result_code, outcome.duplicate) == (2001, False)
    fields = await store.redis.hkeys(key)
    assert sorted(f for f in fields if f.startswith(b"a:")) == [b"a:41"]
    [(_, record)] = await store.redis.xrange(k.cdr_key(at.partition))
    assert record[b"r"].count(b'"servedMSISDN"') == record[b"r"].count(b'"recordOpeningTime"') == 1
    assert msgspec.json.decode(record[b"r"])["recordOpeningTime"] == NOW
    assert (await store.charge(ccr(at, "l1", UPDATE, 40, [mscc(s)]))).result_code == 5012


# ---- events ------------------------------------------------------------------------------------------------

async def test_events_all_four_actions_and_duplicates(store):
    at = await subscriber(store, "491701000012", 120_000, {"sms": 1})
    sms = schedule(rating_group=1, unit="events", increment=1, price_num=50_000, default_quota=1,
                   max_quota=100, allowances=("sms",))

    def event(n: int, action: int, units: int) -> ChargeRequest:
        return ccr(at, "e1", EVENT, n, [mscc(sms, requested_units=Units(units=units))], requested_action=action,
                   origin_host="mmsc.example", context={"servedIMSI": "262019999999999"},
                   rating_keys={"destination": "+33612345678"})

    # 2 SMS: the free one, then 5 cents
    outcome = await store.charge(event(0, DIRECT_DEBITING, 2))
    [m] = outcome.msccs
    assert (outcome.result_code, m.result_code, m.granted, m.amount) == (2001, 2001, Units(units=2), 50_000)
    assert await buckets(store, at.msisdn) == {"money": (70_000, 0), "sms": (0, 0)}
    before = await dump(store.redis)
    again = await store.charge(event(0, DIRECT_DEBITING, 2))
    assert again.duplicate and without_duplicate_flag(again) == outcome
    assert await dump(store.redis) == before
    evt = k.evt_key(at.partition, "e1", 0)
    assert 0 < await store.redis.pttl(evt) <= 300_000

    # 3 more do not fit: 4012, no debit, no record
    outcome = await store.charge(event(1, DIRECT_DEBITING, 3))
    assert outcome.msccs[0].result_code == 4012 and outcome.msccs[0].amount == 0
    assert await buckets(store, at.msisdn) == {"money": (70_000, 0), "sms": (0, 0)}

    # refund 1 SMS: 5 cents back, in the ledger and as a negative CDR amount
    outcome = await store.charge(event(2, REFUND_ACCOUNT, 1))
    assert outcome.msccs[0].amount == -50_000
    assert await buckets(store, at.msisdn) == {"money": (120_000, 0), "sms": (0, 0)}
    [ledger] = [fields for _, fields in await store.redis.xrange(k.ledger_key(at.partition))
                if fields[b"type"] == b"refund"]
    assert ledger == {b"type": b"refund", b"msisdn": at.msisdn.encode(), b"amount": b"50000",
                      b"reference": b"e1;2;1", b"time": str(NOW).encode()}

    # check balance and price enquiry change nothing but their stored answer
    balances_before = await store.redis.hgetall(k.bal_key(at.partition, at.msisdn))
    assert (await store.charge(event(3, CHECK_BALANCE, 2))).check_balance_result == 0
    assert (await store.charge(event(4, CHECK_BALANCE, 3))).check_balance_result == 1
    outcome = await store.charge(event(5, PRICE_ENQUIRY, 7))
    assert outcome.msccs[0].cost == 350_000 and outcome.msccs[0].amount == 0
    assert await store.redis.hgetall(k.bal_key(at.partition, at.msisdn)) == balances_before

    records = await cdrs(store.redis, at.partition)
    assert [(r["recordType"], r["recordId"], r["amount"], r["bucket"]) for r in records] == [
        ("event", "e1;0;1", 50_000, {"sms": 1, "money": 50_000}),
        ("refund", "e1;2;1", -50_000, {"money": -50_000}),
    ]
    assert records[0]["usage"] == {"units": 2} and records[0]["originHost"] == "mmsc.example"
    assert records[0]["servedIMSI"] == "262019999999999"
    # the spine's allowance is in the schedule's unit, its money bucket money; rated with the request's keys now
    assert [(r["bucketUnits"], r["calledPartyAddress"], r["ratedAt"]) for r in records] == [
        ({"sms": "events", "money": "money"}, "+33612345678", NOW), ({"money": "money"}, "+33612345678", NOW)]
    assert all("ratingPlmn" not in r for r in records)


# ---- CDR records -------------------------------------------------------------------------------------------

async def test_cdr_records_exact_format(store):
    at = await subscriber(store, "491701000013", 1_000_000, {"data": 0}, imsi="262011234567890")
    s = schedule(rating_group=32, version="2026-11")
    context = {"servedIMSI": "262011234567890", "chargingID": 4_294_967_295, "apn": "internet.example",
               "servingNodePLMN": "26201", "ratType": 1004}
    await store.charge(ccr(at, "pgw;1;2", INITIAL, 0, [mscc(s, service_id=7)], origin_host="pgw.example",
                           context=context))
    await store.charge(ccr(at, "pgw;1;2", UPDATE, 1, [mscc(s, service_id=7, reporting_reason=3,
                                                          used=Units(total=2_000, input=500, output=1_500))],
                           origin_host="pgw.example", now=NOW + 1_000, rating_keys={"plmn": "20801"}))
    await store.charge(ccr(at, "pgw;1;2", TERMINATION, 2, [mscc(s, used=Units(total=0), requested=False)],
                           origin_host="pgw.example", now=NOW + 2_000, termination_cause=4))
    shared = {"schemaVersion": 1, "servedMSISDN": at.msisdn, "servedIMSI": "262011234567890",
              "sessionId": "pgw;1;2", "originHost": "pgw.example", "chargingID": 4_294_967_295,
              "apn": "internet.example", "servingNodePLMN": "26201", "ratType": 1004, "recordOpeningTime": NOW}
    assert await cdrs(store.redis, at.partition) == [
        {**shared, "recordId": "pgw;1;2;1;32", "recordType": "usage", "ccRequestNumber": 1,
         "recordTime": NOW + 1_000, "ratingGroup": 32, "serviceIdentifier": 7,
         "usage": {"octetsIn": 500, "octetsOut": 1_500, "octetsTotal": 2_000}, "amount": CENT, "currency": "EUR",
         "bucket": {"money": CENT}, "bucketUnits": {"money": "money"}, "ratingVersion": "2026-11",
         "reportingReason": 3, "ratingPlmn": "20801", "ratedAt": NOW + 1_000},
        {**shared, "recordId": "pgw;1;2;2;32", "recordType": "usage", "ccRequestNumber": 2,
         "recordTime": NOW + 2_000, "ratingGroup": 32, "usage": {"octetsTotal": 0}, "amount": 0,
         "currency": "EUR", "bucket": {}, "ratingVersion": "2026-11", "ratedAt": NOW + 2_000},
        {**shared, "recordId": "pgw;1;2;2;close", "recordType": "close", "ccRequestNumber": 2,
         "recordTime": NOW + 2_000, "causeForRecClosing": "managementIntervention", "amount": 0,
         "currency": "EUR"},
    ]
    # one stream entry, one field named r; the bucket units beside the bucket map, the rating keys and time last
    entries = await store.redis.xrange(k.cdr_key(at.partition))
    for _, fields in entries:
        assert list(fields) == [b"r"]
    assert list(msgspec.json.decode(entries[0][1][b"r"]))[-8:] == [
        "amount", "currency", "bucket", "bucketUnits", "ratingVersion", "reportingReason", "ratingPlmn", "ratedAt"]


async def test_records_carry_bucket_units_and_when_and_with_which_keys_their_schedule_was_chosen(store):
    """bucketUnits: a metadata bucket's unit, the spine's allowance in the schedule's unit, money buckets
    "money". ratedAt and the rating keys are the grant's (kept in the reservation as "a", "d", "z"): usage
    reported with a handover was used under the old network's grant, so billing re-rates it with that."""
    await store.provision(Subscriber(msisdn="491701000020"), 1_000_000, {"minutes": 60},
                          buckets=(Bucket("pack", "seconds", 60, services=(10,), priority=50),
                                   Bucket("bonus", "money", 100_000, priority=10)), now_ms=NOW)
    at = await store.locate_msisdn("491701000020")
    assert at is not None
    s = with_schedule_id(msgspec.to_builtins(schedule(unit="seconds", increment=60, price_num=100_000,
                                                      default_quota=300, allowances=("minutes",))))
    home = {"plmn": "26201", "destination": "+4915112345678"}

    def call(number: int, now: int, used: int | None, **extra: Any) -> ChargeRequest:
        return ccr(at, "roam;1", TERMINATION if number == 2 else (UPDATE if number else INITIAL), number,
                   [MsccCharge(rating_group=10, schedule=s, requested=number < 2,
                               used=None if used is None else Units(time=used))], now=now, **extra)

    await store.charge(call(0, NOW, None, rating_keys=home))
    # a handover to 208-01 reported with the 200 s used at home: 60 s pack, 60 s minutes, 2 minutes of money
    await store.charge(call(1, NOW + 200_000, 200, rating_keys={**home, "plmn": "20801"}))
    reservation = msgspec.json.decode(await store.redis.hget(k.ses_key(at.partition, "roam;1"), "r:10"))
    assert (reservation["a"], reservation["d"], reservation["z"]) == (NOW + 200_000, "+4915112345678", "20801")
    await store.charge(call(2, NOW + 260_000, 30))  # a request without keys: its usage is the grant's anyway
    first, second, _ = await cdrs(store.redis, at.partition)
    assert first["bucket"] == {"pack": 60, "minutes": 60, "bonus": 100_000, "money": 100_000}
    assert first["bucketUnits"] == {"pack": "seconds", "minutes": "seconds", "bonus": "money", "money": "money"}
    assert (first["ratedAt"], first["ratingPlmn"], first["calledPartyAddress"]) == (NOW, "26201", "+4915112345678")
    assert (second["bucket"], second["bucketUnits"]) == ({"money": 100_000}, {"money": "money"})
    assert (second["ratedAt"], second["ratingPlmn"], second["calledPartyAddress"]) == (
        NOW + 200_000, "20801", "+4915112345678")


async def test_malformed_rating_keys_are_refused_before_any_write(store):
    at = await subscriber(store, "491701000021", 1_000_000)
    before = await dump(store.redis)
    with pytest.raises(ResponseError, match="invalid rating_keys"):
        await store.charge(ccr(at, "k1", UPDATE, 1, [mscc(schedule())], rating_keys={"plmn": 26201}))
    assert await dump(store.redis) == before


async def test_big_numbers_are_exact_everywhere(store):
    money = 9_000_000_000_000_000  # 9e15 micro-units, above 14 significant digits and below 2^53
    at = await subscriber(store, "491701000014", money, {"data": 0})
    octets = 9_876_543_210_123
    s = schedule(increment=1, price_num=911, minor=1, allowances=(), default_quota=1_000, max_quota=1_000)
    expected = amount_for_units(s, octets)
    assert expected == 8_997_530_864_422_053
    await store.charge(ccr(at, "big", INITIAL, 0, [mscc(s)], context={"chargingID": 123_456_789_012_345}))
    outcome = await store.charge(ccr(at, "big", UPDATE, 1, [mscc(s, used=Units(total=octets))]))
    assert outcome.msccs[0].amount == expected
    assert await buckets(store, at.msisdn) == {"money": (money - expected, 911_000), "data": (0, 0)}
    [record] = await cdrs(store.redis, at.partition)
    assert record["amount"] == expected and record["bucket"] == {"money": expected}
    assert record["usage"] == {"octetsTotal": octets} and record["chargingID"] == 123_456_789_012_345
    raw = (await store.redis.xrange(k.cdr_key(at.partition)))[0][1][b"r"]
    assert b'"amount":8997530864422053' in raw and b"e+" not in raw
    top = await store.topup(at.msisdn, 1_000_000_000_000_001, "big-ref", NOW)
    assert top.balance == money - expected + 1_000_000_000_000_001


# ---- conservation over random operations -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
async def test_money_is_conserved_over_random_operations(store, seed):
    rng = random.Random(seed)
    initial = {f"49170200{seed:02d}{i:02d}": rng.randrange(0, 300_000) for i in range(3)}
    allowance = {msisdn: rng.randrange(0, 50_000) for msisdn in initial}
    data = schedule(price_num=rng.choice([0, 700, 1_000, 3_333]), price_den=rng.choice([1, 3]),
                    rounding=rng.choice(["up", "down", "half-up", "half-even"]), minor=rng.choice([1, 100, CENT]))
    sms = schedule(rating_group=1, unit="events", increment=1, price_num=50_000, default_quota=1, max_quota=10,
                   allowances=())
    locations = {m: await subscriber(store, m, initial[m], {"data": allowance[m]}) for m in initial}
    topups = dict.fromkeys(initial, 0)
    open_sessions: dict[str, tuple[str, int]] = {}  # session -> (msisdn, next request number)
    counter = itertools.count()
    last: ChargeRequest | None = None
    now = NOW
    for _ in range(150):
        now += rng.randrange(1, 5_000)
        msisdn = rng.choice(list(initial))
        at = locations[msisdn]
        action = rng.random()
        request = None
        if action < 0.2 or not open_sessions:
            sid = f"r{seed};{next(counter)}"
            open_sessions[sid] = (msisdn, 1)
            request = ccr(at, sid, INITIAL, 0, [mscc(data)], now=now)
        elif action < 0.6:
            sid = rng.choice(list(open_sessions))
            owner, n = open_sessions[sid]
            open_sessions[sid] = (owner, n + 1)
            used = Units(total=rng.randrange(0, 30_000))
            request = ccr(locations[owner], sid, UPDATE, n, [mscc(data, used=used)], now=now)
        elif action < 0.7:
            sid = rng.choice(list(open_sessions))
            owner, n = open_sessions.pop(sid)
            request = ccr(locations[owner], sid, TERMINATION, n,
                          [mscc(data, used=Units(total=rng.randrange(0, 30_000)), requested=False)], now=now)
        elif action < 0.75:
            sid = rng.choice(list(open_sessions))
            owner, _ = open_sessions.pop(sid)
            assert await store.close_session(sid, "timeLimit", now)
        elif action < 0.85:
            reference = rng.choice([None, f"ref{seed}.{rng.randrange(5)}"])
            amount = rng.randrange(1, 100_000)
            result = await store.topup(msisdn, amount, reference, now)
            topups[msisdn] += amount if result.applied else 0
        elif action < 0.95:
            request = ccr(at, f"ev{next(counter)}", EVENT, 0, [mscc(sms, requested_units=Units(units=2))],
                          requested_action=rng.choice([DIRECT_DEBITING, REFUND_ACCOUNT]), now=now)
        elif last is not None:
            assert (await store.charge(last)).duplicate  # a retransmission changes nothing
        if request is not None:
            outcome = await store.charge(request)
            assert outcome.result_code == 2001
            last = request
    for sid, (owner, n) in list(open_sessions.items()):
        await store.charge(ccr(locations[owner], sid, TERMINATION, n, [], now=now + 1))

    for msisdn, at in locations.items():
        credited = sum(int(fields[b"amount"]) for _, fields in await store.redis.xrange(k.ledger_key(at.partition))
                       if fields[b"msisdn"] == msisdn.encode() and fields[b"type"] == b"topup")
        records = [r for r in await cdrs(store.redis, at.partition) if r["servedMSISDN"] == msisdn]
        charged = sum(r["amount"] for r in records)
        from_allowance = sum(r.get("bucket", {}).get("data", 0) for r in records)
        state = await buckets(store, msisdn)
        assert credited == topups[msisdn]
        assert state["money"] == (initial[msisdn] + topups[msisdn] - charged, 0)
        assert state["data"] == (allowance[msisdn] - from_allowance, 0)
        assert all(reserved == 0 for _, reserved in state.values())
    assert await store.open_sessions() == []


# ---- the Lua arithmetic equals ratecards.pricing -----------------------------------------------------------

_numbers = itertools.count()


@st.composite
def priced_cases(draw: st.DrawFn) -> tuple[RatingSchedule, int, int]:
    unit = draw(st.sampled_from(["bytes", "seconds", "events"]))
    increment = draw(st.sampled_from([1, 7, 60, 1_000, 1_024, 1_000_000]))
    price_num = draw(st.one_of(st.just(0), st.integers(1, 10**7)))
    price_den = draw(st.sampled_from([1, 3, 7, 1_000, 1_000_003]))
    max_quota = draw(st.integers(0, 10**9))
    default_quota = draw(st.integers(0, 10**9))
    units = draw(st.integers(0, 10**10))
    limit = 2**53 - 1
    if price_num and max(-(-units // increment), -(-max_quota // increment)) * price_num >= limit:
        units, max_quota = units % (10**6), max_quota % (10**6)
        price_num = price_num % 10**6 + 1
    s = RatingSchedule(
        rating_group=draw(st.integers(0, 10**6)), unit=unit, increment=increment, price_num=price_num,
        price_den=price_den, default_quota=default_quota, max_quota=max_quota,
        minor=draw(st.sampled_from([1, 7, 100, 10_000, 1_000_000])),
        rounding=draw(st.sampled_from(["up", "half-up", "half-even", "down"])),
    )
    money = draw(st.integers(0, 10**13))
    return s, units, money


def units_of(unit: str, n: int) -> Units:
    return {"bytes": Units(total=n), "seconds": Units(time=n), "events": Units(units=n)}[unit]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=priced_cases())
async def test_lua_debits_and_grants_equal_python_pricing(store, case):
    s, units, money = case
    at = await subscriber(store, f"4917{next(_numbers):08d}", money)
    request = ccr(at, f"h{at.msisdn}", INITIAL, 0, [mscc(s, used=units_of(s.unit, units))])
    [m] = (await store.charge(request)).msccs
    amount = amount_for_units(s, units)
    want = min(s.default_quota, s.max_quota)
    grant = want if s.price_num == 0 else min(want, affordable_units(s, max(0, money - amount)))
    assert m.amount == amount
    if grant == 0:
        assert (m.result_code, m.granted, m.reserved) == (4012, None, 0)
    else:
        assert (m.result_code, m.granted) == (2001, units_of(s.unit, grant))
        assert m.reserved == amount_for_units(s, grant)
        assert m.final_unit_action == (None if grant == want else 0)
    assert await buckets(store, at.msisdn) == {"money": (money - amount, m.reserved)}


# ---- quota control per rating group ------------------------------------------------------------------------

async def test_grant_of_several_unit_types_never_exceeds_what_the_balance_covers(store):
    at = await subscriber(store, "491701000020", 30_000)
    # priced in octets (1 cent per KiB); time and input octets granted too
    s = schedule(price_num=CENT, allowances=(), default_quota=10_240, max_quota=20_480,
                 also_grant=(("time", 600, 3_600), ("input", 8_192, 100_000)))
    outcome = await store.charge(ccr(at, "g1", INITIAL, 0, [mscc(s, requested_units=Units(time=7_200))]))
    [m] = outcome.msccs
    # 3 KiB affordable of the 10 KiB default; time asked 7200 is capped at 3600; input capped at the grant
    assert m.granted == Units(total=3_072, time=3_600, input=3_072)
    assert (m.reserved, m.final_unit_action) == (30_000, 1)
    await store.topup(at.msisdn, 1_000_000, "g1-top", NOW)
    outcome = await store.charge(ccr(at, "g1", UPDATE, 1, [mscc(s, used=Units(total=3_000, time=50))]))
    assert outcome.msccs[0].granted == Units(total=10_240, time=600, input=8_192)
    assert outcome.msccs[0].amount == 30_000  # time is a cap, not priced


async def test_rating_group_outside_credit_control_is_4011_and_recorded_free(store):
    at = await subscriber(store, "491701000021", 100_000, {"data": 5_000})
    free = schedule(rating_group=40, price_num=0, allowances=(), default_quota=0, max_quota=0,
                    credit_control=False)
    paid = schedule(rating_group=10, allowances=())
    outcome = await store.charge(ccr(at, "f1", INITIAL, 0, [mscc(free), mscc(paid)]))
    assert outcome.result_code == 2001
    assert [(m.rating_group, m.result_code, m.granted) for m in outcome.msccs] == [
        (40, 4011, None), (10, 2001, Units(total=10_240))]
    outcome = await store.charge(ccr(at, "f1", UPDATE, 1, [mscc(free, used=Units(total=99_999),
                                                                reporting_reason=2)]))
    assert (outcome.msccs[0].result_code, outcome.msccs[0].amount) == (4011, 0)
    assert await buckets(store, at.msisdn) == {"money": (100_000, CENT), "data": (5_000, 0)}
    [record] = await cdrs(store.redis, at.partition)
    assert (record["ratingGroup"], record["amount"], record["bucket"], record["usage"], record["reportingReason"]) == (
        40, 0, {}, {"octetsTotal": 99_999}, 2)
    session = await store.redis.hgetall(k.ses_key(at.partition, "f1"))
    assert b"r:40" not in session and b"r:10" in session


async def test_barred_rating_group_is_4010_and_its_usage_is_charged(store):
    at = await subscriber(store, "491701000022", 100_000)
    barred = schedule(rating_group=50, allowances=(), barred=True)
    outcome = await store.charge(ccr(at, "x2", INITIAL, 0, [mscc(barred)]))
    assert (outcome.result_code, outcome.msccs[0].result_code, outcome.msccs[0].granted) == (2001, 4010, None)
    outcome = await store.charge(ccr(at, "x2", UPDATE, 1, [mscc(barred, used=Units(total=1_024))]))
    assert (outcome.msccs[0].result_code, outcome.msccs[0].amount) == (4010, CENT)
    assert await buckets(store, at.msisdn) == {"money": (100_000 - CENT, 0)}


async def test_redirect_final_units_then_restricted_then_regranted_after_topup(store):
    at = await subscriber(store, "491701000023", 25_000)
    s = schedule(price_num=CENT, allowances=(), final_unit_action=1)  # 1 cent per KiB, REDIRECT
    # CCR-I: 2 KiB affordable of 10 KiB: the final units, with the FUI
    [m] = (await store.charge(ccr(at, "rd", INITIAL, 0, [mscc(s)]))).msccs
    assert (m.result_code, m.granted, m.final_unit_action) == (2001, Units(total=2_048), 1)
    # the final units are used: CCR-U with USU and no RSU is debited; no grant, the FUI again
    outcome = await store.charge(ccr(at, "rd", UPDATE, 1, [mscc(s, used=Units(total=2_048), requested=False)]))
    [m] = outcome.msccs
    assert (outcome.result_code, m.result_code, m.granted, m.amount, m.final_unit_action) == (
        2001, 2001, None, 20_000, 1)
    assert await buckets(store, at.msisdn) == {"money": (5_000, 0)}
    [session] = await store.open_sessions()
    assert session["reservations"] == {10: {"granted": 0, "buckets": {}}}
    # Validity-Time over, still no money: CCR-U without USU (and without RSU) asks again; the policy again
    outcome = await store.charge(ccr(at, "rd", UPDATE, 2, [mscc(s, requested=False)]))
    [m] = outcome.msccs
    assert (m.result_code, m.granted, m.final_unit_action, m.amount) == (2001, None, 1, 0)
    before = await dump(store.redis)
    assert (await store.charge(ccr(at, "rd", UPDATE, 2, [mscc(s, requested=False)]))).duplicate
    assert await dump(store.redis) == before
    assert await buckets(store, at.msisdn) == {"money": (5_000, 0)}
    # money arrives: the next CCR-U re-grants in full, without FUI
    await store.topup(at.msisdn, 1_000_000, "rd-top", NOW)
    [m] = (await store.charge(ccr(at, "rd", UPDATE, 3, [mscc(s, requested=False)]))).msccs
    assert (m.result_code, m.granted, m.final_unit_action, m.reserved) == (2001, Units(total=10_240), None, 100_000)
    [session] = await store.open_sessions()
    assert session["reservations"] == {10: {"granted": 10_240, "buckets": {"money": 100_000}}}
    # a usage-only report now is a plain one: no FUI
    [m] = (await store.charge(ccr(at, "rd", UPDATE, 4, [mscc(s, used=Units(total=1), requested=False)]))).msccs
    assert (m.result_code, m.granted, m.final_unit_action) == (2001, None, None)


async def test_restrict_access_already_empty_at_initial_and_terminate_keeps_4012(store):
    at = await subscriber(store, "491701000024", 0)
    restrict = schedule(rating_group=60, price_num=CENT, allowances=(), final_unit_action=2)  # 1 cent per KiB
    terminate = schedule(rating_group=70, price_num=CENT, allowances=(), final_unit_action=0)
    outcome = await store.charge(ccr(at, "em", INITIAL, 0, [mscc(restrict), mscc(terminate)]))
    assert outcome.result_code == 2001
    assert [(m.result_code, m.granted, m.final_unit_action) for m in outcome.msccs] == [
        (2001, None, 2), (4012, None, None)]
    assert await store.count_open_sessions() == 1
    # usage reported while restricted: debited (money goes negative: usage happened), still restricted
    [m] = (await store.charge(ccr(at, "em", UPDATE, 1, [mscc(restrict, used=Units(total=10), requested=False)]))
           ).msccs
    assert (m.result_code, m.final_unit_action, m.amount) == (2001, 2, CENT)
    await store.topup(at.msisdn, 150_000, "em-top", NOW)  # 1.40 left: 10 KiB for one, 4 KiB for the other
    [m, t] = (await store.charge(ccr(at, "em", UPDATE, 2, [mscc(restrict), mscc(terminate)]))).msccs
    assert (m.result_code, m.granted, m.final_unit_action) == (2001, Units(total=10_240), None)
    assert (t.result_code, t.granted, t.final_unit_action) == (2001, Units(total=4_096), 0)


async def test_command_level_failure_closes_the_session(store):
    at = await subscriber(store, "491701000025", 15_000)
    s = schedule(price_num=CENT, allowances=(), final_unit_action=0)
    outcome = await store.charge(ccr(at, "cl", INITIAL, 0, [mscc(s)], command_level=True))
    assert (outcome.result_code, outcome.msccs[0].granted) == (2001, Units(total=1_024))
    outcome = await store.charge(ccr(at, "cl", UPDATE, 1, [mscc(s, used=Units(total=1_024))], command_level=True))
    assert (outcome.result_code, outcome.msccs[0].result_code, outcome.msccs[0].amount) == (4012, 4012, CENT)
    assert await store.count_open_sessions() == 0
    assert await buckets(store, at.msisdn) == {"money": (5_000, 0)}
    records = await cdrs(store.redis, at.partition)
    assert [(r["recordType"], r.get("causeForRecClosing")) for r in records] == [
        ("usage", None), ("close", "abnormalRelease")]
    again = await store.charge(ccr(at, "cl", UPDATE, 1, [mscc(s, used=Units(total=1_024))], command_level=True))
    assert again.duplicate and again.result_code == 4012
    assert (await store.charge(ccr(at, "cl", UPDATE, 2, [mscc(s)], command_level=True))).result_code == 5002
    # a REDIRECT rate at command level keeps the session open: 2001 with the FUI
    r = schedule(price_num=CENT, allowances=(), final_unit_action=1)
    outcome = await store.charge(ccr(at, "cl2", INITIAL, 0, [mscc(r)], command_level=True))
    assert (outcome.result_code, outcome.msccs[0].final_unit_action) == (2001, 1)
    assert await store.count_open_sessions() == 1


async def test_events_for_free_and_barred_rating_groups(store):
    at = await subscriber(store, "491701000026", 100_000)
    free = schedule(rating_group=1, unit="events", increment=1, price_num=0, default_quota=0, max_quota=0,
                    allowances=(), credit_control=False)
    barred = schedule(rating_group=2, unit="events", increment=1, price_num=CENT, default_quota=1, max_quota=9,
                      allowances=(), barred=True)
    outcome = await store.charge(ccr(at, "ev", EVENT, 0, [mscc(free, requested_units=Units(units=3)),
                                                          mscc(barred, requested_units=Units(units=1))],
                                     requested_action=DIRECT_DEBITING))
    assert [(m.result_code, m.granted, m.amount) for m in outcome.msccs] == [(4011, None, 0), (4010, None, 0)]
    assert await buckets(store, at.msisdn) == {"money": (100_000, 0)}
    [record] = await cdrs(store.redis, at.partition)
    assert (record["recordType"], record["ratingGroup"], record["usage"], record["amount"]) == (
        "event", 1, {"units": 3}, 0)


async def test_mscc_reporting_nothing_and_asking_nothing_keeps_the_reservation(store):
    at = await subscriber(store, "491701000027", 1_000_000)
    s = schedule(allowances=())
    await store.charge(ccr(at, "kp", INITIAL, 0, [mscc(s)]))
    before = await buckets(store, at.msisdn)
    [m] = (await store.charge(ccr(at, "kp", UPDATE, 1, [mscc(s, requested=False)]))).msccs
    assert (m.result_code, m.granted, m.final_unit_action, m.amount) == (2001, None, None, 0)
    assert await buckets(store, at.msisdn) == before == {"money": (1_000_000, CENT)}
    [session] = await store.open_sessions()
    assert session["reservations"] == {10: {"granted": 10_240, "buckets": {"money": CENT}}}


# ---- bundles only (requires_bucket) and fair usage ------------------------------------------------------------

def granted_bytes(m: Any) -> int:
    return m.granted.total if m.granted else 0


async def test_rating_group_served_only_from_a_bundle_is_5030_in_its_mscc_without_one(store):
    bundle = schedule(requires_bucket=True, final_unit_action=1)
    other = schedule(rating_group=11, allowances=())
    at = await subscriber(store, "491709000001", 1_000_000)
    outcome = await store.charge(ccr(at, "rb1", INITIAL, 0, [mscc(bundle), mscc(other)]))
    assert outcome.result_code == 2001
    [m, o] = outcome.msccs
    assert (m.result_code, m.granted, m.final_unit_action, m.reserved) == (5030, None, 1, 0)
    assert (o.result_code, granted_bytes(o)) == (2001, 10_240)
    # usage reported in that rating group is still charged from money; the session stays open
    outcome = await store.charge(ccr(at, "rb1", UPDATE, 1, [mscc(bundle, used=Units(total=2_048))]))
    [m] = outcome.msccs
    assert (m.result_code, m.amount, m.final_unit_action) == (5030, amount_for_units(bundle, 2_048), 1)
    assert await buckets(store, at.msisdn) == {"money": (1_000_000 - CENT, CENT)}


async def test_rating_group_served_only_from_a_bundle_grants_only_the_bundle(store):
    bundle = schedule(requires_bucket=True, final_unit_action=1)
    at = await subscriber(store, "491709000002", 1_000_000, {"data": 4_000})
    outcome = await store.charge(ccr(at, "rb2", INITIAL, 0, [mscc(bundle)]))
    [m] = outcome.msccs
    assert (m.result_code, granted_bytes(m), m.final_unit_action, m.reserved) == (2001, 4_000, 1, 4_000)
    # the final units are reported: the redirect; then a new request finds no bundle: 5030
    outcome = await store.charge(ccr(at, "rb2", UPDATE, 1, [mscc(bundle, used=Units(total=4_000),
                                                                 requested=False)]))
    assert (outcome.msccs[0].result_code, outcome.msccs[0].final_unit_action) == (2001, 1)
    outcome = await store.charge(ccr(at, "rb2", UPDATE, 2, [mscc(bundle)]))
    assert (outcome.msccs[0].result_code, outcome.msccs[0].granted, outcome.msccs[0].final_unit_action) == (
        5030, None, 1)
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, 0), "data": (0, 0)}


async def test_fair_usage_cuts_the_grant_restricts_and_grants_again_next_period(store):
    s = schedule(final_unit_action=0, fair_usage_units=20_000, fair_usage_period="month")
    at = await subscriber(store, "491709000003", 10**9, {"data": 5_000})

    def fu(number: int, month: str = "2023-11", **extra: Any) -> ChargeRequest:
        return ccr(at, "fu", INITIAL if number == 0 else UPDATE, number, [mscc(s, periods={"month": month},
                                                                               **extra)])

    [m] = (await store.charge(fu(0))).msccs
    assert (granted_bytes(m), m.final_unit_action, m.fair_usage) == (10_240, None, False)
    # 10240 used (5000 of them from the allowance: every unit counts): 9760 left this month
    [m] = (await store.charge(fu(1, used=Units(total=10_240)))).msccs
    assert (granted_bytes(m), m.final_unit_action, m.fair_usage) == (9_760, 2, True)
    record = msgspec.json.decode(await store.redis.hget(k.ses_key(at.partition, "fu"), "r:10"))
    assert (record["f"], record["w"]) == (1, 1)
    # the final units are reported: restricted, no grant
    [m] = (await store.charge(fu(2, used=Units(total=9_760), requested=False))).msccs
    assert (m.result_code, m.granted, m.final_unit_action, m.fair_usage) == (2001, None, 2, True)
    # asking again in the same month: still restricted
    [m] = (await store.charge(fu(3))).msccs
    assert (m.result_code, m.granted, m.final_unit_action, m.fair_usage) == (2001, None, 2, True)
    # an MSCC with neither USU nor RSU while restricted asks again too
    [m] = (await store.charge(fu(4, requested=False))).msccs
    assert (m.granted, m.final_unit_action, m.fair_usage) == (None, 2, True)
    # next month: granted again
    [m] = (await store.charge(fu(5, month="2023-12"))).msccs
    assert (granted_bytes(m), m.final_unit_action, m.fair_usage) == (10_240, None, False)
    counters = await store.redis.hgetall(k.usage_counters_key(at.partition, at.msisdn))
    assert counters == {b"10:fu:2023-11": b"20000"}  # the new month's counter is written by its first usage


async def test_event_of_a_bundle_only_rating_group(store):
    bundle = schedule(requires_bucket=True, final_unit_action=1)
    at = await subscriber(store, "491709000004", 1_000_000, {"data": 3_000})

    async def event(number: int, units: int) -> Any:
        request = ccr(at, f"rbe{number}", EVENT, 0, [mscc(bundle, requested_units=Units(total=units))],
                      requested_action=DIRECT_DEBITING)
        return (await store.charge(request)).msccs[0]

    first = await event(1, 2_000)
    assert (first.result_code, first.amount, first.granted) == (2001, 0, Units(total=2_000))
    assert (await event(2, 2_000)).result_code == 4012  # the bundle does not cover it; never from money
    assert (await event(3, 1_000)).result_code == 2001
    last = await event(4, 1)
    assert (last.result_code, last.final_unit_action) == (5030, 1)
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, 0), "data": (0, 0)}
