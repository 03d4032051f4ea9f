"""The extended pricing of the charge and event functions (balances/lua/common.lua) equals ratecards.pricing.

A real Valkey through BalanceStore: a hypothesis property test drives whole sessions with random extended
schedules and random usage splits and compares every report's amount and every grant with the pure
functions of ratecards/pricing.py (per report and in total, to the micro-unit), then direct cases for each
feature: setup fee, first increment 30/6, minimum charge, free units, tiers, a cap per day, scopes session and
day, the event function, and the counters kept in use:{pNNN}:<msisdn> and in the session's reservation.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balances import keys as k
from balances.model import (
    DIRECT_DEBITING,
    EVENT,
    INITIAL,
    PRICE_ENQUIRY,
    TERMINATION,
    UPDATE,
    ChargeRequest,
    Location,
    MsccCharge,
    Subscriber,
    Units,
    with_schedule_id,
)
from balances.store import BalanceStore
from ratecards.pricing import affordable_usage, amount_for_units, charge_for_usage
from ratecards.schedule import RatingSchedule

NOW = 1_700_000_000_000
CENT = 10_000
DAY = "2023-11-14"
_numbers = itertools.count()


def voice(**changes: Any) -> RatingSchedule:
    """1 cent per 6 s (10 cents a minute), 30/6 off unless asked."""
    fields: dict[str, Any] = dict(
        rating_group=20, unit="seconds", increment=6, price_num=CENT, price_den=1, default_quota=300,
        max_quota=3_600, minor=CENT, rounding="up", version="rc-x",
    )
    fields.update(changes)
    return RatingSchedule(**fields)


def units_of(unit: str, n: int) -> Units:
    return {"bytes": Units(total=n), "seconds": Units(time=n), "events": Units(units=n)}[unit]


def mscc(s: RatingSchedule, *, used: int | None = None, requested: bool = True, periods: dict | None = None,
         **extra: Any) -> MsccCharge:
    return MsccCharge(rating_group=s.rating_group, schedule=with_schedule_id(msgspec.to_builtins(s)),
                      used=None if used is None else units_of(s.unit, used), requested=requested,
                      periods=periods if periods is not None else {"day": DAY}, **extra)


def ccr(at: Location, session_id: str, request_type: int, number: int, msccs: list[MsccCharge],
        now: int = NOW, **extra: Any) -> ChargeRequest:
    return ChargeRequest(session_id=session_id, request_type=request_type, request_number=number,
                         msisdn=at.msisdn, plan=at.plan, partition=at.partition, now_ms=now, msccs=msccs, **extra)


async def subscriber(store: BalanceStore, money: int, allowances: dict[str, int] | None = None) -> Location:
    msisdn = f"4915{next(_numbers):08d}"
    await store.provision(Subscriber(msisdn=msisdn), money, allowances or {})
    location = await store.locate_msisdn(msisdn)
    assert location is not None
    return location


async def money_of(store: BalanceStore, msisdn: str) -> tuple[int, int]:
    [money] = [(b.balance, b.reserved) for b in await store.balances(msisdn) if b.bucket == "money"]
    return money


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url, partitions=4)
    yield store
    await store.close()


# ---- the property: whole sessions, random splits ------------------------------------------------------------

@st.composite
def extended_schedules(draw: st.DrawFn) -> RatingSchedule:
    unit = draw(st.sampled_from(["bytes", "seconds", "events"]))
    increment = draw(st.sampled_from([1, 6, 60, 1_024]))
    den = draw(st.sampled_from([1, 3, 7, 1_000, 1_000_003]))
    num = draw(st.integers(0, 10**6))
    tiers: list[tuple[int, int, int]] = []
    start = 0
    for _ in range(draw(st.integers(0, 3))):
        start += draw(st.integers(1, 50))
        tiers.append((start, draw(st.integers(0, 10**6)), draw(st.sampled_from([1, 3, 1_000]))))
    minor = draw(st.sampled_from([1, 100, CENT]))
    money = st.one_of(st.just(0), st.integers(1, 10**6).map(lambda n: n * minor))
    max_quota = increment * draw(st.integers(1, 2_000))
    s = RatingSchedule(
        rating_group=draw(st.integers(0, 1_000)), unit=unit, increment=increment, price_num=num, price_den=den,
        default_quota=draw(st.integers(0, max_quota // increment)) * increment, max_quota=max_quota,
        minor=minor, rounding=draw(st.sampled_from(["up", "half-up", "half-even", "down"])),
        first_increment=increment * draw(st.sampled_from([0, 2, 5])), setup_fee=draw(money),
        minimum_charge=draw(money), free_units=draw(st.sampled_from([0, 1, 10, 1_000])), tiers=tuple(tiers),
        scope=draw(st.sampled_from(["report", "session", "day"])), cap=draw(money),
    )
    if s.first_increment == increment:
        s = msgspec.structs.replace(s, first_increment=0)
    if s.cap:
        s = msgspec.structs.replace(s, cap_period="day")
    return s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=extended_schedules(), reports=st.lists(st.integers(0, 5_000), min_size=1, max_size=6),
       money=st.integers(0, 10**9))
async def test_lua_extended_pricing_equals_python_over_random_reports(store, s, reports, money):
    """Each report costs charge_for_usage(used_before, spent_before), each grant is affordable_usage of what
    is left and holds its charge; the reports of a session or day scope sum to C(total) (capped)."""
    at = await subscriber(store, money)
    sid = f"x{at.msisdn}"
    used = spent = total = charged = 0
    balance = money
    for number, units in enumerate([None, *reports]):
        kind = INITIAL if number == 0 else (TERMINATION if number == len(reports) else UPDATE)
        outcome = await store.charge(ccr(at, sid, kind, number, [
            mscc(s, used=units, requested=kind != TERMINATION)]))
        [m] = outcome.msccs
        if units is not None:
            expect = charge_for_usage(s, units, used_before=used if s.scope != "report" else 0,
                                      spent_before=spent)
            assert m.amount == expect, (number, units)
            used, spent, total, charged = used + units, spent + expect, total + units, charged + expect
            balance -= expect
        if kind != TERMINATION:
            want = min(s.default_quota, s.max_quota)
            grant = min(want, affordable_usage(s, max(balance, 0), used_before=used if s.scope != "report" else 0,
                                               spent_before=spent))
            granted = m.granted and (m.granted.total or m.granted.time or m.granted.units) or 0
            assert granted == grant, (number, m)
            if grant:
                assert m.reserved == charge_for_usage(s, grant, used_before=used if s.scope != "report" else 0,
                                                      spent_before=spent)
    assert await money_of(store, at.msisdn) == (money - charged, 0)
    if s.scope != "report" and not s.cap:
        assert charged == amount_for_units(s, total)
    if s.cap:
        assert charged <= s.cap


# ---- each feature on its own ------------------------------------------------------------------------------

async def session_amounts(store: BalanceStore, s: RatingSchedule, reports: list[int], money: int = 10**9,
                          periods: dict | None = None, at: Location | None = None, sid: str = "") -> list[int]:
    """The amount of each report of one session (CCR-I asks, CCR-U reports and asks, CCR-T reports)."""
    at = at or await subscriber(store, money)
    sid = sid or f"s{next(_numbers)}"
    amounts = []
    await store.charge(ccr(at, sid, INITIAL, 0, [mscc(s, periods=periods)]))
    for number, units in enumerate(reports, start=1):
        kind = TERMINATION if number == len(reports) else UPDATE
        outcome = await store.charge(ccr(at, sid, kind, number, [
            mscc(s, used=units, requested=kind == UPDATE, periods=periods)]))
        amounts.append(outcome.msccs[0].amount)
    return amounts


async def test_setup_fee_once_per_session_scope_and_per_report_scope(store):
    fee = 5 * CENT
    assert await session_amounts(store, voice(setup_fee=fee, scope="session"), [60, 60, 0]) == [
        fee + 10 * CENT, 10 * CENT, 0]
    assert await session_amounts(store, voice(setup_fee=fee), [60, 60]) == [fee + 10 * CENT, fee + 10 * CENT]


async def test_first_increment_30_then_6(store):
    s = voice(first_increment=30)
    # report scope: 1 s costs the first 30 s (5 cents), 31 s costs 30 + 6 (6 cents)
    assert await session_amounts(store, s, [1, 31, 30]) == [5 * CENT, 6 * CENT, 5 * CENT]
    # session scope: the first increment is taken once
    assert await session_amounts(store, voice(first_increment=30, scope="session"), [1, 29, 1, 6]) == [
        5 * CENT, 0, CENT, CENT]


async def test_minimum_charge(store):
    s = voice(minimum_charge=3 * CENT, scope="session")
    assert await session_amounts(store, s, [6, 6, 6, 6]) == [3 * CENT, 0, 0, CENT]


async def test_free_units_cost_nothing_not_even_the_setup_fee(store):
    s = voice(free_units=60, setup_fee=2 * CENT, scope="session")
    assert await session_amounts(store, s, [30, 30, 1, 6]) == [0, 0, 3 * CENT, CENT]


async def test_tiers_are_graduated_within_the_scope(store):
    # increments 0-9 at 1 cent, from increment 10 at half a cent (5000 micro-units)
    s = voice(tiers=((10, 5_000, 1),), scope="session", minor=1)
    assert await session_amounts(store, s, [54, 12, 60]) == [9 * CENT, CENT + 5_000, 10 * 5_000]


async def test_cap_per_day_counts_across_sessions_and_restarts_on_a_new_day(store):
    s = voice(cap=25 * CENT, cap_period="day")
    at = await subscriber(store, 10**9)
    assert await session_amounts(store, s, [120, 60], at=at) == [20 * CENT, 5 * CENT]
    assert await session_amounts(store, s, [60], at=at) == [0]
    assert await session_amounts(store, s, [60], at=at, periods={"day": "2023-11-15"}) == [10 * CENT]
    counters = await store.redis.hgetall(k.usage_counters_key(at.partition, at.msisdn))
    assert counters == {b"20:cap:2023-11-15": b"100000"}  # the older day's counter is gone


async def test_day_scope_counts_across_sessions(store):
    s = voice(setup_fee=CENT, scope="day", first_increment=30)
    at = await subscriber(store, 10**9)
    assert await session_amounts(store, s, [1], at=at) == [6 * CENT]  # setup fee + first 30 s
    assert await session_amounts(store, s, [29, 6], at=at) == [0, CENT]  # same day: inside the first 30 s
    assert await session_amounts(store, s, [6], at=at, periods={"day": "2023-11-15"}) == [6 * CENT]
    counters = await store.redis.hgetall(k.usage_counters_key(at.partition, at.msisdn))
    assert counters == {b"20:2023-11-15": b"6"}


async def test_allowances_are_taken_first_and_do_not_advance_the_counters(store):
    s = voice(setup_fee=CENT, scope="session", allowances=("minutes",))
    at = await subscriber(store, 10**9, {"minutes": 60})
    # 90 s: 60 from the allowance, 30 priced (setup fee + 5 increments); then 6 s more: one increment
    assert await session_amounts(store, s, [90, 6], at=at) == [6 * CENT, CENT]


async def test_session_counter_survives_releases_and_a_report_without_a_new_grant(store):
    s = voice(setup_fee=CENT, scope="session")
    at = await subscriber(store, 10**9)
    await store.charge(ccr(at, "c1", INITIAL, 0, [mscc(s)]))
    outcome = await store.charge(ccr(at, "c1", UPDATE, 1, [mscc(s, used=6, requested=False)]))
    assert outcome.msccs[0].amount == 2 * CENT
    record = msgspec.json.decode(await store.redis.hget(k.ses_key(at.partition, "c1"), "r:20"))
    assert record == {"u": 0, "b": {}, "c": 6}
    outcome = await store.charge(ccr(at, "c1", UPDATE, 2, [mscc(s, used=6)]))
    assert outcome.msccs[0].amount == CENT  # no second setup fee


async def test_grant_is_what_the_money_affords_with_the_setup_fee(store):
    s = voice(setup_fee=5 * CENT, scope="session")
    at = await subscriber(store, 8 * CENT)
    outcome = await store.charge(ccr(at, "g1", INITIAL, 0, [mscc(s)]))
    [m] = outcome.msccs
    assert (m.granted, m.reserved, m.final_unit_action) == (Units(time=18), 8 * CENT, 0)
    assert await money_of(store, at.msisdn) == (8 * CENT, 8 * CENT)


async def test_event_direct_debiting_and_price_enquiry_use_the_counters(store):
    s = msgspec.structs.replace(voice(), unit="events", increment=1, price_num=10 * CENT, default_quota=1,
                                max_quota=100, cap=25 * CENT, cap_period="day", rating_group=30)
    at = await subscriber(store, 10**9)

    async def event(number: int, action: int, units: int) -> Any:
        request = ccr(at, f"e{number}", EVENT, 0, [mscc(s, requested_units=Units(units=units))],
                      requested_action=action)
        return (await store.charge(request)).msccs[0]

    assert (await event(1, PRICE_ENQUIRY, 2)).cost == 20 * CENT
    assert (await event(2, DIRECT_DEBITING, 2)).amount == 20 * CENT
    assert (await event(3, PRICE_ENQUIRY, 2)).cost == 5 * CENT  # the cap leaves 5 cents today
    assert (await event(4, DIRECT_DEBITING, 2)).amount == 5 * CENT
    assert (await event(5, DIRECT_DEBITING, 1)).amount == 0
    assert await money_of(store, at.msisdn) == (10**9 - 25 * CENT, 0)


async def test_missing_period_key_is_refused_before_any_change(store):
    at = await subscriber(store, 10**9)
    with pytest.raises(Exception, match="period"):
        await store.charge(ccr(at, "p1", INITIAL, 0, [mscc(voice(scope="day"), periods={})]))
