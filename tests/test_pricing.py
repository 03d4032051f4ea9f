"""Pricing properties: integer-exact, monotone, fair per-report rounding, and affordability as the inverse."""

from __future__ import annotations

import decimal
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratecards import (
    ROUNDING_MODES,
    RatingSchedule,
    affordable_units,
    amount_for_units,
    compile_plan,
    increments_for_units,
    parse_ratecard,
    round_to_minor,
)

DEMO = Path(__file__).resolve().parents[1] / "ocs" / "demo" / "ratecard.toml"
DECIMAL_MODES = {
    "up": decimal.ROUND_CEILING,
    "half-up": decimal.ROUND_HALF_UP,
    "half-even": decimal.ROUND_HALF_EVEN,
    "down": decimal.ROUND_FLOOR,
}
MINORS = st.sampled_from([1, 10, 100, 1_000, 10_000, 1_000_000])


@st.composite
def schedules(draw: st.DrawFn) -> RatingSchedule:
    """Schedules as compile.py makes them: price × 10^6 × increment / per, reduced."""
    price = Decimal(draw(st.integers(0, 10**6))).scaleb(-draw(st.integers(0, 6)))
    per = draw(st.integers(1, 2**20))
    increment = draw(st.integers(1, 4096))
    fraction = Fraction(price) * 10**6 * increment / per
    max_increments = draw(st.integers(1, 10_000))
    return RatingSchedule(
        rating_group=1, unit="bytes", increment=increment, price_num=fraction.numerator,
        price_den=fraction.denominator, default_quota=increment, max_quota=max_increments * increment,
        minor=draw(MINORS), rounding=draw(st.sampled_from(ROUNDING_MODES)))


@given(st.integers(0, 10**18), MINORS, st.sampled_from(ROUNDING_MODES))
def test_round_to_minor_matches_decimal_quantize(amount: int, minor: int, mode: str) -> None:
    expected = (Decimal(amount) / minor).quantize(Decimal(1), rounding=DECIMAL_MODES[mode]) * minor
    assert round_to_minor(amount, minor, mode) == int(expected)


def test_round_to_minor_ties() -> None:
    assert [round_to_minor(x, 10_000, "half-even") for x in (5_000, 15_000, 25_000)] == [0, 20_000, 20_000]
    assert [round_to_minor(x, 10_000, "half-up") for x in (4_999, 5_000)] == [0, 10_000]
    assert round_to_minor(1, 10_000, "up") == 10_000 and round_to_minor(9_999, 10_000, "down") == 0
    with pytest.raises(ValueError):
        round_to_minor(1, 10_000, "nearest")


@given(schedules(), st.integers(0, 10**9), st.integers(0, 10**9))
def test_amount_is_monotone_in_units(s: RatingSchedule, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert amount_for_units(s, low) <= amount_for_units(s, high)


@given(schedules(), st.integers(-5, 10**9))
def test_amount_is_whole_minor_units_and_an_int(s: RatingSchedule, units: int) -> None:
    amount = amount_for_units(s, units)
    assert type(amount) is int and amount >= 0 and amount % s.minor == 0
    exact = Fraction(increments_for_units(s, units) * s.price_num, s.price_den)
    raw = -(-exact.numerator // exact.denominator)
    assert abs(amount - raw) < s.minor


@settings(max_examples=300)
@given(schedules(), st.lists(st.integers(0, 10**7), min_size=1, max_size=20))
def test_splitting_usage_into_reports(s: RatingSchedule, reports: list[int]) -> None:
    total = sum(reports)
    # increments are never lost by splitting: each report rounds its own usage up
    assert sum(increments_for_units(s, u) for u in reports) >= increments_for_units(s, total)
    charged = sum(amount_for_units(s, u) for u in reports)
    once = amount_for_units(s, total)
    one_increment = -(-s.price_num // s.price_den)
    assert charged - once <= len(reports) * (one_increment + s.minor)
    if s.rounding == "up":  # rounding up each report never charges less than the total at once
        assert charged >= once


@given(schedules(), st.integers(0, 10**8))
def test_affordable_units_inverts_amount(s: RatingSchedule, units: int) -> None:
    units = min(units, s.max_quota)
    whole = increments_for_units(s, units) * s.increment
    assert affordable_units(s, amount_for_units(s, units)) >= whole


@given(schedules(), st.integers(0, 10**12))
def test_affordable_units_is_the_largest_that_fits(s: RatingSchedule, money: int) -> None:
    units = affordable_units(s, money)
    assert 0 <= units <= s.max_quota and units % s.increment == 0
    assert amount_for_units(s, units) <= money or s.price_num == 0
    if units < s.max_quota:
        assert amount_for_units(s, units + s.increment) > money


def test_affordable_units_edges() -> None:
    card = parse_ratecard(DEMO.read_text())
    data = compile_plan(card, "demo")[100]
    assert affordable_units(data, 0) == 0
    assert affordable_units(data, 10**15) == data.max_quota  # capped at one full grant
    # 1 cent buys 1 MiB of data: 1024 increments of 625/64 micro-units = exactly 10_000
    assert affordable_units(data, 10_000) == 1048576
    assert amount_for_units(data, 1048576) == 10_000 and amount_for_units(data, 1048577) == 20_000
    free = RatingSchedule(rating_group=1, unit="events", increment=1, price_num=0, price_den=1,
                          default_quota=1, max_quota=5, minor=10_000, rounding="up")
    assert affordable_units(free, 0) == 5 and amount_for_units(free, 10**12) == 0

