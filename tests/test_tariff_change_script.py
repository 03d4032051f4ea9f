"""Tariff-Time-Change in the charge function (balances/lua/charge.lua), against a real Valkey.

A grant spanning a change is held at the dearer tariff and answered with tariff_change_ms; the reservation
names the schedules (filed content-addressed in sched:{pNNN}) and the change, so the usage reported later is
rated with the schedule it was granted under: before / after the change by Tariff-Change-Usage, at the dearer
when indeterminate or when usage without Tariff-Change-Usage is reported after the change. The CDR record
lists the parts, the ledger and the CDRs still balance (`ocs audit`), and an open session stays small.
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
    INITIAL,
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
from ocs.audit import audit
from ratecards.pricing import affordable_for_all, charge_for_usage, dearer_charge
from ratecards.schedule import RatingSchedule
from tests.test_lua_pricing import extended_schedules

NOW = 1_700_000_000_000
CENT = 10_000
CHANGE = NOW + 60_000
_numbers = itertools.count()


def voice(price: int, tariff: str, **changes: Any) -> RatingSchedule:
    """`price` micro-units per 6 s."""
    fields: dict[str, Any] = dict(
        rating_group=20, unit="seconds", increment=6, price_num=price, price_den=1, default_quota=300,
        max_quota=3_600, minor=CENT, rounding="up", version="rc-ttc", tariff=tariff,
    )
    fields.update(changes)
    return RatingSchedule(**fields)


PEAK = voice(2 * CENT, "peak")
OFFPEAK = voice(CENT, "offpeak")


def as_dict(s: RatingSchedule) -> dict:
    return with_schedule_id(msgspec.to_builtins(s))


def mscc(s: RatingSchedule, *, next_schedule: RatingSchedule | None = None, change: int | None = None,
         requested: bool = True, **units: Any) -> MsccCharge:
    return MsccCharge(rating_group=s.rating_group, schedule=as_dict(s), requested=requested,
                      tariff_change_ms=change, next_schedule=as_dict(next_schedule) if next_schedule else None,
                      **{key: Units(time=value) for key, value in units.items()})


def ccr(at: Location, session_id: str, request_type: int, number: int, msccs: list[MsccCharge],
        now: int = NOW) -> ChargeRequest:
    return ChargeRequest(session_id=session_id, request_type=request_type, request_number=number,
                         msisdn=at.msisdn, plan=at.plan, partition=at.partition, now_ms=now, msccs=msccs,
                         origin_host="pgw.example", context={"apn": "internet"})


async def subscriber(store: BalanceStore, money: int) -> Location:
    msisdn = f"4916{next(_numbers):08d}"
    await store.provision(Subscriber(msisdn=msisdn), money, {})
    location = await store.locate_msisdn(msisdn)
    assert location is not None
    return location


async def money_of(store: BalanceStore, msisdn: str) -> tuple[int, int]:
    [money] = [(b.balance, b.reserved) for b in await store.balances(msisdn) if b.bucket == "money"]
    return money


async def cdrs(store: BalanceStore, partition: int) -> list[dict]:
    return [msgspec.json.decode(f[b"r"]) for _, f in await store.redis.xrange(k.cdr_key(partition))]


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url, partitions=4)
    yield store
    await store.close()


async def open_across_the_change(store: BalanceStore, money: int = 10**8, first: RatingSchedule = OFFPEAK,
                                 then: RatingSchedule = PEAK) -> tuple[Location, str]:
    at = await subscriber(store, money)
    sid = f"t{at.msisdn}"
    outcome = await store.charge(ccr(at, sid, INITIAL, 0, [mscc(first, next_schedule=then, change=CHANGE)]))
    assert outcome.msccs[0].tariff_change_ms == CHANGE
    return at, sid


async def test_grant_across_a_change_is_held_at_the_dearer_and_names_both_schedules(store):
    at = await subscriber(store, 30 * CENT)  # off-peak affords 180 s, peak only 90 s
    outcome = await store.charge(ccr(at, "g", INITIAL, 0, [mscc(OFFPEAK, next_schedule=PEAK, change=CHANGE)]))
    [m] = outcome.msccs
    grant = affordable_for_all([OFFPEAK, PEAK], 30 * CENT)
    assert grant == 90
    assert (m.granted, m.reserved, m.tariff_change_ms) == (Units(time=90), dearer_charge([OFFPEAK, PEAK], 90),
                                                           CHANGE)
    assert m.final_unit_action == 0  # less than asked: the balance's last units
    record = msgspec.json.decode(await store.redis.hget(k.ses_key(at.partition, "g"), "r:20"))
    assert record == {"u": 90, "b": {"money": 30 * CENT}, "s": as_dict(OFFPEAK)["id"], "a": NOW, "t": CHANGE,
                      "n": as_dict(PEAK)["id"]}
    filed = await store.redis.hgetall(k.schedules_key(at.partition))
    assert set(filed) == {as_dict(OFFPEAK)["id"].encode(), as_dict(PEAK)["id"].encode()}
    assert msgspec.json.decode(filed[as_dict(PEAK)["id"].encode()])["price_num"] == 2 * CENT
    # a duplicate gets the stored answer, tariff_change_ms included
    again = await store.charge(ccr(at, "g", INITIAL, 0, [mscc(OFFPEAK, next_schedule=PEAK, change=CHANGE)]))
    assert again.duplicate and again.msccs[0].tariff_change_ms == CHANGE


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=extended_schedules(), then=extended_schedules(), money=st.integers(0, 10**9))
async def test_grant_across_a_change_equals_affordable_for_all_at_the_dearer_charge(store, first, then, money):
    then = msgspec.structs.replace(then, unit=first.unit, rating_group=first.rating_group,
                                   increment=first.increment, max_quota=first.max_quota,
                                   first_increment=first.first_increment)
    at = await subscriber(store, money)
    request = ccr(at, f"p{at.msisdn}", INITIAL, 0, [MsccCharge(
        rating_group=first.rating_group, schedule=as_dict(first), requested=True, tariff_change_ms=CHANGE,
        next_schedule=as_dict(then), periods={"day": "2023-11-14"}, next_periods={"day": "2023-11-15"})])
    [m] = (await store.charge(request)).msccs
    grant = min(first.default_quota, affordable_for_all([first, then], money))
    granted = m.granted and (m.granted.total or m.granted.time or m.granted.units) or 0
    assert granted == grant
    if grant:
        assert (m.reserved, m.tariff_change_ms) == (dearer_charge([first, then], grant), CHANGE)
    else:
        assert m.tariff_change_ms is None


async def test_no_grant_no_tariff_change(store):
    at = await subscriber(store, 0)
    outcome = await store.charge(ccr(at, "n", INITIAL, 0, [mscc(OFFPEAK, next_schedule=PEAK, change=CHANGE)]))
    assert outcome.msccs[0].result_code == 4012
    assert outcome.msccs[0].tariff_change_ms is None


async def test_usage_before_and_after_are_rated_with_their_own_schedules(store):
    at, sid = await open_across_the_change(store)
    # the request of the CCR-U is after the change: its own schedule is peak, no further change
    outcome = await store.charge(ccr(at, sid, UPDATE, 1, [mscc(PEAK, used_before=60, used_after=30)],
                                     now=CHANGE + 30_000))
    [m] = outcome.msccs
    assert m.amount == charge_for_usage(OFFPEAK, 60) + charge_for_usage(PEAK, 30) == 20 * CENT
    assert m.tariff_change_ms is None
    [record] = [r for r in await cdrs(store, at.partition) if r["recordType"] == "usage"]
    assert (record["usage"], record["amount"], record["bucket"]) == ({"time": 90}, 20 * CENT, {"money": 20 * CENT})
    assert (record["bucketUnits"], record["ratedAt"]) == ({"money": "money"}, NOW)  # the grant chose the schedules
    assert record["tariffParts"] == [
        {"tariffChangeUsage": "before", "usage": {"time": 60}, "amount": 10 * CENT, "tariff": "offpeak",
         "ratingVersion": "rc-ttc"},
        {"tariffChangeUsage": "after", "usage": {"time": 30}, "amount": 10 * CENT, "tariff": "peak",
         "ratingVersion": "rc-ttc"},
    ]
    # the new grant holds the peak price and names only the peak schedule
    assert m.reserved == charge_for_usage(PEAK, 300)
    record = msgspec.json.decode(await store.redis.hget(k.ses_key(at.partition, sid), "r:20"))
    assert record == {"u": 300, "b": {"money": m.reserved}, "s": as_dict(PEAK)["id"], "a": CHANGE + 30_000}
    await store.charge(ccr(at, sid, TERMINATION, 2, [mscc(PEAK, requested=False, used=12)], now=CHANGE + 60_000))
    assert await money_of(store, at.msisdn) == (10**8 - 20 * CENT - 4 * CENT, 0)
    report = await audit(store, None)
    assert report.ok, report.differences


@pytest.mark.parametrize(("now", "expected"), [
    (CHANGE - 1, 10 * CENT),  # reported before the change time: all at the grant's (off-peak) tariff
    (CHANGE, 20 * CENT),  # after it, without Tariff-Change-Usage: at the dearer
])
async def test_usage_without_tariff_change_usage(store, now, expected):
    at, sid = await open_across_the_change(store)
    outcome = await store.charge(ccr(at, sid, UPDATE, 1, [mscc(OFFPEAK, used=60)], now=now))
    assert outcome.msccs[0].amount == expected


async def test_indeterminate_usage_is_charged_at_the_dearer(store):
    # the dearer of the two is the first schedule here (peak until the change, then off-peak)
    at, sid = await open_across_the_change(store, first=PEAK, then=OFFPEAK)
    outcome = await store.charge(ccr(at, sid, UPDATE, 1, [mscc(OFFPEAK, used_indeterminate=60, used_after=6)],
                                     now=CHANGE + 1))
    assert outcome.msccs[0].amount == dearer_charge([PEAK, OFFPEAK], 60) + CENT == 21 * CENT
    [record] = [r for r in await cdrs(store, at.partition) if r["recordType"] == "usage"]
    assert [(p["tariffChangeUsage"], p["tariff"], p["amount"]) for p in record["tariffParts"]] == [
        ("after", "offpeak", CENT), ("indeterminate", "peak", 20 * CENT)]


async def test_usage_is_rated_with_the_schedule_of_its_grant_even_after_a_new_card(store):
    at = await subscriber(store, 10**8)
    await store.charge(ccr(at, "v", INITIAL, 0, [mscc(OFFPEAK)]))
    dearer_card = voice(5 * CENT, "", version="rc-new")
    outcome = await store.charge(ccr(at, "v", UPDATE, 1, [mscc(dearer_card, used=60)], now=NOW + 10_000))
    assert outcome.msccs[0].amount == 10 * CENT
    [record] = [r for r in await cdrs(store, at.partition) if r["recordType"] == "usage"]
    # ratedAt: when the schedule that priced the usage was chosen, the grant's time (billing re-rates with it)
    assert (record["ratingVersion"], record["tariff"], record["ratedAt"]) == ("rc-ttc", "offpeak", NOW)
    # the new grant is the new card's: its usage is rated with it
    outcome = await store.charge(ccr(at, "v", UPDATE, 2, [mscc(dearer_card, used=60)], now=NOW + 20_000))
    assert outcome.msccs[0].amount == 50 * CENT
    second = [r for r in await cdrs(store, at.partition) if r["recordType"] == "usage"][1]
    assert (second["ratingVersion"], second["ratedAt"]) == ("rc-new", NOW + 10_000)


async def test_unknown_schedule_id_falls_back_to_the_requests_schedule(store):
    at, sid = await open_across_the_change(store)
    await store.redis.delete(k.schedules_key(at.partition))
    other = voice(3 * CENT, "other")
    # the request's schedule differs from both: the filed ones are gone, so it prices the usage
    outcome = await store.charge(ccr(at, sid, UPDATE, 1, [mscc(other, used=60)], now=CHANGE + 1))
    assert outcome.msccs[0].amount == 30 * CENT
    [record] = [r for r in await cdrs(store, at.partition) if r["recordType"] == "usage"]
    assert (record["tariff"], record["ratedAt"]) == ("other", CHANGE + 1)  # chosen by this request


async def test_split_usage_advances_the_counters_of_its_own_periods(store):
    """A day-scope schedule with a setup fee: the change at midnight starts a new day's count."""
    s = voice(CENT, "day", scope="day", setup_fee=5 * CENT)
    at = await subscriber(store, 10**8)
    first = MsccCharge(rating_group=20, schedule=as_dict(s), requested=True, tariff_change_ms=CHANGE,
                       next_schedule=as_dict(s), periods={"day": "2023-11-14"}, next_periods={"day": "2023-11-15"})
    await store.charge(ccr(at, "d", INITIAL, 0, [first]))
    later = MsccCharge(rating_group=20, schedule=as_dict(s), requested=False, periods={"day": "2023-11-15"},
                       used_before=Units(time=6), used_after=Units(time=6))
    outcome = await store.charge(ccr(at, "d", TERMINATION, 1, [later], now=CHANGE + 10))
    assert outcome.msccs[0].amount == 2 * (5 * CENT + CENT)  # each day has its setup fee
    counters = await store.redis.hgetall(k.usage_counters_key(at.partition, at.msisdn))
    assert counters == {b"20:2023-11-15": b"6"}  # the older day's field is dropped when the newer is written


async def test_an_open_session_with_a_tariff_change_reservation_stays_small(store):
    """The reservation adds about 100 bytes to a session (two schedule ids and the change time). A session's
    CDR members and stored answer are longer than Valkey's default hash-max-listpack-value (64), which makes
    every session a hashtable; with 256 (the embedded Valkey has 1024) it stays a listpack of under 512 B:
    the stored answer is compact, the CDR context is kept once (no 'ctx'), no 'peer' equal to origin_host."""
    async def exact_size(key: str) -> int:
        return await store.redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")

    at, sid = await open_across_the_change(store)
    plain = await subscriber(store, 10**8)
    plain_sid = f"t{plain.msisdn}"
    await store.charge(ccr(plain, plain_sid, INITIAL, 0, [mscc(OFFPEAK)]))
    with_change = await exact_size(k.ses_key(at.partition, sid))
    without = await exact_size(k.ses_key(plain.partition, plain_sid))
    assert with_change - without <= 128
    limit = (await store.redis.config_get("hash-max-listpack-value"))["hash-max-listpack-value"]
    try:
        await store.redis.config_set("hash-max-listpack-value", 256)
        await store.redis.delete(k.ses_key(at.partition, sid))
        at, sid = await open_across_the_change(store)
        compact = await exact_size(k.ses_key(at.partition, sid))
    finally:
        await store.redis.config_set("hash-max-listpack-value", limit)
    print(f"MEMORY USAGE of an open session with a TTC reservation: {with_change} B (plain {without} B), "
          f"{compact} B with hash-max-listpack-value 256")
    assert compact <= 512
