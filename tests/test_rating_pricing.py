"""Extended pricing: increments (60/60, 30/6, per-KB), setup fee, minimum charge, tiers, caps, free units and
the rounding step — and the properties that make online charging, enquiries and billing agree: splitting usage
into reports never creates or loses a minor unit and never charges more than the increments allow."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratecards import (
    ROUNDING_MODES,
    RatingSchedule,
    affordable_for_all,
    affordable_units,
    affordable_usage,
    amount_for_units,
    charge_for_usage,
    compile_plan,
    dearer_charge,
    increments_for_units,
    is_extended,
    parse_ratecard,
    round_to_minor,
)
from ratecards.pricing import raw_for_increments

CENT = 10_000


def voice(**changes: object) -> RatingSchedule:
    """0.06 per minute in 60 s increments (60/60), cents rounded up."""
    fields = dict(rating_group=2, unit="seconds", increment=60, price_num=60_000, price_den=1, default_quota=300,
                  max_quota=3600, minor=CENT, rounding="up")
    fields.update(changes)
    return RatingSchedule(**fields)


CARD = """
version = "p1"
currency = "EUR"
currency_minor_digits = 2
rounding = "{rounding}"
rounding_step = "{step}"

[plans.p]
  [[plans.p.rates]]
  rating_group = 1
  service = "voice"
  unit = "seconds"
  price = "{price}"
  per = 60
  increment = {increment}
  default_quota = 300
  max_quota = 3600
{extra}
"""


def compiled(price: str = "0.06", increment: int = 60, rounding: str = "up", step: str = "usage",
             **extra: object) -> RatingSchedule:
    lines = "".join(f"  {k} = {v if not isinstance(v, str) else repr(v).replace(chr(39), chr(34))}\n"
                    for k, v in extra.items())
    text = CARD.format(price=price, increment=increment, rounding=rounding, step=step, extra=lines)
    return compile_plan(parse_ratecard(text), "p")[1]


# ---- increments ---------------------------------------------------------------------------------------------

def test_sixty_sixty_charges_every_started_minute() -> None:
    s = voice()
    assert [amount_for_units(s, u) for u in (0, 1, 59, 60, 61, 120, 121)] == [
        0, 60_000, 60_000, 60_000, 120_000, 120_000, 180_000]
    assert not is_extended(s)


def test_thirty_six_charges_the_first_thirty_seconds_then_six_second_steps() -> None:
    s = compiled(first_increment=30, increment=6)
    assert (s.increment, s.first_increment, s.price_num, s.price_den) == (6, 30, 6_000, 1)  # 0.006 per 6 s
    assert [increments_for_units(s, u) for u in (0, 1, 30, 31, 36, 37)] == [0, 5, 5, 6, 6, 7]
    # 0.03 for anything up to 30 s, then 0.006 per 6 s, the total rounded up to the cent once per report
    assert [amount_for_units(s, u) for u in (1, 30, 31, 36, 42)] == [30_000, 30_000, 40_000, 40_000, 50_000]
    assert is_extended(s)


def test_first_increment_must_be_a_multiple_of_the_increment() -> None:
    from ratecards import RateCardError

    with pytest.raises(RateCardError, match="first_increment: must be a positive multiple of increment 6"):
        compiled(first_increment=32, increment=6)
    assert compiled(first_increment=60).first_increment == 0  # 60/60 is the plain increment: not extended


def test_per_kb_data() -> None:
    s = RatingSchedule(rating_group=1, unit="bytes", increment=1024, price_num=625, price_den=64,
                       default_quota=1024, max_quota=1 << 30, minor=CENT, rounding="up")
    assert amount_for_units(s, 1) == CENT  # 1 KB of 0.01/MB is 0.0000098 → one cent, rounded up
    assert amount_for_units(s, 1 << 20) == CENT and amount_for_units(s, (1 << 20) + 1) == 2 * CENT


# ---- setup fee, minimum charge, free units ------------------------------------------------------------------

def test_setup_fee_is_charged_once_per_scope() -> None:
    s = compiled(setup_fee="0.10", scope="session")
    assert (s.setup_fee, s.scope) == (100_000, "session")
    assert charge_for_usage(s, 30) == 160_000  # setup + first minute
    assert charge_for_usage(s, 30, used_before=30) == 0  # still the first minute
    assert charge_for_usage(s, 31, used_before=30) == 60_000  # the second minute, no second setup fee
    assert charge_for_usage(s, 0) == 0  # nothing used, nothing charged (an unanswered call)


def test_minimum_charge_applies_to_billable_usage_only() -> None:
    s = compiled(minimum_charge="0.25", setup_fee="0.05", scope="session")
    assert amount_for_units(s, 0) == 0
    assert amount_for_units(s, 1) == 300_000  # max(0.06, 0.25) + 0.05
    assert amount_for_units(s, 4 * 60) == 300_000  # 0.24 < 0.25
    assert amount_for_units(s, 5 * 60) == 350_000  # 0.30 ≥ 0.25


def test_free_units_cost_nothing_not_even_the_setup_fee() -> None:
    s = compiled(free_units=10, setup_fee="0.05", scope="session")
    assert [amount_for_units(s, u) for u in (5, 10, 11, 70, 71)] == [0, 0, 110_000, 110_000, 170_000]


def test_money_amounts_must_fit_the_currency() -> None:
    from ratecards import RateCardError

    with pytest.raises(RateCardError, match="setup_fee: 0.001 has more decimals than EUR has"):
        compiled(setup_fee="0.001")
    with pytest.raises(RateCardError, match="cap: must be positive"):
        compiled(cap="0")
    with pytest.raises(RateCardError, match="scope: must be one of report, session, day, week, month"):
        compiled(scope="call")


# ---- tiers -----------------------------------------------------------------------------------------------------

def test_tiers_are_graduated_steps() -> None:
    # 0.06/min for the first 10 minutes of the month, 0.03/min from minute 10, 0.01/min from minute 100
    s = compiled(scope="month", tiers=_inline_tiers([(600, "0.03"), (6000, "0.01")]))
    assert s.tiers == ((10, 30_000, 1), (100, 10_000, 1))
    assert amount_for_units(s, 600) == 600_000
    assert amount_for_units(s, 660) == 630_000
    assert amount_for_units(s, 6000) == 600_000 + 90 * 30_000
    assert amount_for_units(s, 6060) == 600_000 + 90 * 30_000 + 10_000
    assert charge_for_usage(s, 120, used_before=540) == 60_000 + 30_000  # straddles the first step


def _inline_tiers(tiers: list[tuple[int, str]]) -> object:
    class Raw(str):
        def __repr__(self) -> str:
            return self

    return Raw("[" + ", ".join(f'{{ from = {start}, price = "{price}" }}' for start, price in tiers) + "]")


def test_tiers_must_increase_in_whole_increments() -> None:
    from ratecards import RateCardError

    with pytest.raises(RateCardError, match=r"tiers\[1\]\.from: must be a multiple of increment 60 above 600"):
        compiled(tiers=_inline_tiers([(600, "0.03"), (600, "0.01")]))
    with pytest.raises(RateCardError, match=r"tiers\[0\]\.from"):
        compiled(tiers=_inline_tiers([(0, "0.03")]))
    with pytest.raises(RateCardError, match=r"tiers\[0\]\.price"):
        compiled(tiers=_inline_tiers([(60, "cheap")]))


# ---- caps ----------------------------------------------------------------------------------------------------

def test_cap_limits_what_a_period_charges() -> None:
    s = compiled(cap="1.00", cap_period="day")
    assert (s.cap, s.cap_period) == (1_000_000, "day")
    assert charge_for_usage(s, 600) == 600_000
    assert charge_for_usage(s, 600, spent_before=600_000) == 400_000
    assert charge_for_usage(s, 600, spent_before=1_000_000) == 0
    assert affordable_usage(s, 0, spent_before=1_000_000) == s.max_quota  # capped out: usage is free


# ---- rounding step ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, cents", [("up", 1), ("half-up", 1), ("half-even", 1), ("down", None)])
def test_rounding_at_the_increment_step(mode: str, cents: int | None) -> None:
    # 0.06/min in 6 s steps is 0.006 per increment: rounded to a whole cent per increment at compile time
    if cents is None:
        from ratecards import RateCardError

        with pytest.raises(RateCardError, match="that is 0"):
            compiled(increment=6, rounding=mode, step="increment")
        return
    s = compiled(increment=6, rounding=mode, step="increment")
    assert (s.price_num, s.price_den) == (cents * CENT, 1)
    assert amount_for_units(s, 60) == 10 * cents * CENT  # ten increments of a whole cent: no rounding left


def test_rounding_step_half_even_ties() -> None:
    # 0.05 per minute in 6 s steps = exactly half a cent per increment: half-even rounds to 0 (forbidden),
    # half-up to one cent
    assert compiled(price="0.05", increment=6, rounding="half-up", step="increment").price_num == CENT
    from ratecards import RateCardError

    with pytest.raises(RateCardError):
        compiled(price="0.05", increment=6, rounding="half-even", step="increment")
    assert compiled(price="0.15", increment=6, rounding="half-even", step="increment").price_num == 2 * CENT


# ---- dearer of two tariffs ----------------------------------------------------------------------------------

def test_dearer_charge_and_affordable_for_all() -> None:
    day, night = voice(), voice(price_num=20_000)
    assert dearer_charge([day, night], 90) == 120_000
    assert affordable_for_all([day, night], 130_000) == 120  # what the day price covers
    assert affordable_usage(night, 130_000) == 360


# ---- properties -----------------------------------------------------------------------------------------------

MINORS = st.sampled_from([1, 100, 10_000, 1_000_000])


@st.composite
def schedules(draw: st.DrawFn, *, scope: str | None = None, step: str | None = None) -> RatingSchedule:
    """Schedules as compile.py makes them, with every extended feature possibly on."""
    minor = draw(MINORS)
    mode = draw(st.sampled_from(ROUNDING_MODES))
    increment = draw(st.integers(1, 600))

    def price() -> tuple[int, int]:
        value = Fraction(Decimal(draw(st.integers(0, 10**5))).scaleb(-draw(st.integers(0, 6)))) * 10**6 \
            * increment / draw(st.integers(1, 3600))
        if (step or draw(st.sampled_from(["usage", "increment"]))) == "increment":
            value = Fraction(round_to_minor(-(-value.numerator // value.denominator), minor, "up"))
        return value.numerator, value.denominator

    num, den = price()
    tiers, start = [], 0
    for _ in range(draw(st.integers(0, 3))):
        start += draw(st.integers(1, 50))
        tiers.append((start, *price()))
    money = st.integers(0, 500).map(lambda k: k * minor)
    return RatingSchedule(
        rating_group=1, unit="seconds", increment=increment, price_num=num, price_den=den,
        default_quota=increment, max_quota=draw(st.integers(1, 200)) * increment, minor=minor, rounding=mode,
        first_increment=draw(st.sampled_from([0, 0, 2, 5])) * increment, setup_fee=draw(money),
        minimum_charge=draw(money), free_units=draw(st.sampled_from([0, 0, 1, 10, 61])), tiers=tuple(tiers),
        scope=scope or draw(st.sampled_from(["session", "day", "month"])),
        cap=draw(st.sampled_from([0, 0, 1, 7, 100]).map(lambda k: k * minor)),
        cap_period="day")


def splits(total: int, cuts: list[int]) -> list[int]:
    points = sorted({min(c, total) for c in cuts} | {0, total})
    return [b - a for a, b in zip(points, points[1:], strict=False)]


@settings(max_examples=400, deadline=None)
@given(schedules(), st.integers(0, 20_000), st.lists(st.integers(0, 20_000), max_size=30))
def test_splitting_usage_never_creates_or_loses_a_minor_unit(s: RatingSchedule, total: int, cuts: list[int]) -> None:
    """However the gateway splits a scope's usage into reports, the reports sum to what the whole usage
    costs at once (to the micro-unit), and each report is a whole number of minor units."""
    reports = splits(total, cuts)
    used = spent = 0
    charged = []
    for units in reports:
        amount = charge_for_usage(s, units, used_before=used, spent_before=spent)
        assert amount >= 0 and amount % s.minor == 0
        charged.append(amount)
        used += units
        spent += amount
    whole = amount_for_units(s, total)
    assert sum(charged) == (min(whole, s.cap) if s.cap else whole)


@settings(max_examples=400, deadline=None)
@given(schedules(), st.integers(1, 20_000))
def test_never_more_than_the_increments_allow(s: RatingSchedule, total: int) -> None:
    """A scope's charge is the price of its started increments (with the first increment), plus the setup
    fee, at least the minimum charge, rounded once: never more."""
    billable = total - s.free_units
    if billable <= 0:
        assert amount_for_units(s, total) == 0
        return
    n = -(-billable // s.increment)
    n = max(n, s.first_increment // s.increment)
    exact = Fraction(0)
    boundaries = [(0, s.price_num, s.price_den), *s.tiers]
    for i, (start, num, den) in enumerate(boundaries):
        end = boundaries[i + 1][0] if i + 1 < len(boundaries) else n
        if n > start:
            exact += Fraction(num, den) * (min(n, end) - start)
    bound = max(exact, s.minimum_charge) + s.setup_fee
    allowed = round_to_minor(-(-bound.numerator // bound.denominator) + len(boundaries), s.minor, "up")
    assert amount_for_units(s, total) <= allowed
    assert raw_for_increments(s, n) - exact < len(boundaries)  # each step ceiled once, < 1 micro-unit each


@settings(max_examples=300, deadline=None)
@given(schedules(scope="report", step="increment"), st.lists(st.integers(0, 5_000), min_size=1, max_size=20))
def test_report_scope_with_increment_rounding_is_additive(s: RatingSchedule, reports: list[int]) -> None:
    """Rounded at the increment, independent reports cost exactly their increments, and splitting adds at
    most one started increment per extra report."""
    s = msgspec.structs.replace(s, tiers=(), setup_fee=0, minimum_charge=0, free_units=0, first_increment=0,
                                cap=0, cap_period="")
    total = sum(reports)
    assert sum(amount_for_units(s, u) for u in reports) == s.price_num * sum(
        increments_for_units(s, u) for u in reports)
    assert sum(increments_for_units(s, u) for u in reports) <= increments_for_units(s, total) + len(reports) - 1


@settings(max_examples=300, deadline=None)
@given(schedules(), st.integers(-10, 10**7), st.integers(0, 5_000), st.integers(0, 10**6))
def test_affordable_usage_is_the_largest_that_fits(s: RatingSchedule, money: int, used: int, spent: int) -> None:
    units = affordable_usage(s, money, used_before=used, spent_before=spent)
    assert 0 <= units <= s.max_quota and units % s.increment == 0
    charge = charge_for_usage(s, units, used_before=used, spent_before=spent)
    assert units == 0 or charge <= money or charge_for_usage(s, s.max_quota, used_before=used, spent_before=spent) == 0
    if units < s.max_quota:
        assert charge_for_usage(s, units + s.increment, used_before=used, spent_before=spent) > money


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**12), st.data())
def test_spine_closed_form_equals_the_search(money: int, data: st.DataObject) -> None:
    """For spine schedules the closed-form affordable_units (what the charge script mirrors today) and the
    search of the extended path agree: both can back the same grant."""
    s = data.draw(schedules(scope="report"))
    s = msgspec.structs.replace(s, tiers=(), setup_fee=0, minimum_charge=0, free_units=0, first_increment=0,
                                cap=0, cap_period="")
    assert not is_extended(s)
    assert affordable_units(s, money) == affordable_usage(s, money)


@given(schedules(), st.integers(0, 5_000), st.integers(0, 5_000))
def test_amount_is_monotone(s: RatingSchedule, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert amount_for_units(s, low) <= amount_for_units(s, high)
