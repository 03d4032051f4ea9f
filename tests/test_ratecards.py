"""Rate cards: the demo card compiles to exact fractions, and bad cards fail naming the key (and line)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from ratecards import (
    RateCard,
    RateCardError,
    RatingSchedule,
    compile_plan,
    compile_ratecard,
    initial_allowances,
    load_ratecard,
    parse_ratecard,
    validate_ratecard,
)

DEMO = Path(__file__).resolve().parents[1] / "ocs" / "demo" / "ratecard.toml"
DEMO_TEXT = DEMO.read_text()

SMALL = """
version = "t1"
currency = "EUR"
currency_minor_digits = 2
rounding = "half-even"

[plans.basic]
default_rating_group = 1
  [[plans.basic.rates]]
  rating_group = 1
  service = "data"
  unit = "bytes"
  price = "{price}"
  per = {per}
  increment = {increment}
  default_quota = {default_quota}
  max_quota = {max_quota}
"""


def small(**overrides: object) -> str:
    values = {"price": "0.01", "per": 1000, "increment": 1000, "default_quota": 1000, "max_quota": 10000}
    values.update(overrides)
    return SMALL.format(**values)


def error_of(text: str) -> RateCardError:
    with pytest.raises(RateCardError) as caught:
        parse_ratecard(text, source="card.toml")
    return caught.value


def test_demo_card_parses_and_compiles_to_exact_fractions() -> None:
    card = load_ratecard(DEMO)
    assert isinstance(card, RateCard)
    assert (card.version, card.currency, card.currency_minor_digits, card.rounding) == (
        "2026-11-demo", "EUR", 2, "up")
    schedules = compile_plan(card, "demo")
    assert set(schedules) == {100, 200, 300, 400}
    data, voice, sms, portal = schedules[100], schedules[200], schedules[300], schedules[400]
    # 0.01 EUR per MiB, 1 KiB increments: 10_000 µ × 1024 / 1048576 = 625/64 micro-units per increment
    assert (data.price_num, data.price_den) == (625, 64)
    assert Fraction(data.price_num, data.price_den) == Fraction("0.01") * 10**6 * 1024 / 1048576
    assert (voice.price_num, voice.price_den) == (50_000, 1)  # 0.05 per minute, charged per minute
    assert (sms.price_num, sms.price_den) == (90_000, 1)
    assert data == RatingSchedule(
        rating_group=100, unit="bytes", increment=1024, price_num=625, price_den=64,
        default_quota=10485760, max_quota=104857600, minor=10_000, rounding="up",
        allowances=("data",), final_unit_action=1, currency="EUR", version="2026-11-demo",
        validity_time=600, final_validity_time=60, volume_quota_threshold=1048576, quota_holding_time=300,
        redirect_address="https://topup.example.net", redirect_address_type=2)
    assert voice.allowances == () and voice.unit == "seconds" and voice.increment == 60
    assert sms.unit == "events" and (sms.default_quota, sms.max_quota) == (1, 10)
    assert voice.validity_time == 0 and voice.final_unit_action == 0 and voice.credit_control
    assert not portal.credit_control and (portal.price_num, portal.max_quota) == (0, 0)
    assert initial_allowances(card, "demo") == {"data": 1073741824}
    assert compile_ratecard(card) == {"demo": schedules}
    assert card.plans["demo"].default_rating_group == 100


def test_fractions_are_reduced_and_never_float() -> None:
    card = parse_ratecard(small(price="0.0123", per=1048576, increment=1000, default_quota=1000,
                                max_quota=1_000_000))
    s = compile_plan(card, "basic")[1]
    assert Fraction(s.price_num, s.price_den) == Fraction("0.0123") * 10**6 * 1000 / 1048576
    assert Fraction(s.price_num, s.price_den).denominator == s.price_den  # already reduced
    assert all(type(v) is int for v in (s.price_num, s.price_den, s.minor, s.increment))
    assert s.rounding == "half-even" and card.plans["basic"].default_rating_group == 1


def test_free_rate_compiles_to_zero() -> None:
    s = compile_plan(parse_ratecard(small(price="0")), "basic")[1]
    assert (s.price_num, s.price_den) == (0, 1)


@pytest.mark.parametrize("digits, minor", [(0, 1_000_000), (2, 10_000), (3, 1_000), (6, 1)])
def test_minor_unit_follows_currency_digits(digits: int, minor: int) -> None:
    text = small().replace("currency_minor_digits = 2", f"currency_minor_digits = {digits}")
    assert compile_plan(parse_ratecard(text), "basic")[1].minor == minor


def test_toml_syntax_error_names_source_and_line() -> None:
    broken = DEMO_TEXT.replace('currency = "EUR"', 'currency = "EUR')
    err = error_of(broken)
    assert err.line == 3 and str(err).startswith("card.toml:3: TOML syntax error")


@pytest.mark.parametrize(
    "old, new, field, line, words",
    [
        ('price = "0.05"', "price = 0.05", "plans.demo.rates[1].price", 37, "got `float`"),
        ("increment = 60", "increment = 0", "plans.demo.rates[1].increment", 39, "positive"),
        ("per = 60", 'per = "60"', "plans.demo.rates[1].per", 38, "expected `int`"),
        ('rounding = "up"', 'rounding = "sideways"', "rounding", 5, "sideways"),
        ("max_quota = 3600", "max_quota = 120", "plans.demo.rates[1].default_quota", 40, "exceeds"),
        ("max_quota = 3600", "max_quota = 3630", "plans.demo.rates[1].max_quota", 41, "increments"),
        ('unit = "seconds"', 'unit = "minutes"', "plans.demo.rates[1].unit", 36, "minutes"),
        ('  price = "0.09"\n', "", "plans.demo.rates[2].price", 43, "missing"),
        ('service = "sms"', 'service = "sms"\n  colour = "red"', "plans.demo.rates[2].colour", 46, "unknown"),
        ("rating_groups = [100]", "rating_groups = [200]", "plans.demo.allowances[0].unit", 13, "seconds"),
        ("rating_groups = [100]", "rating_groups = [99]", "plans.demo.allowances[0].rating_groups", 15, "99"),
        ('price = "0.01"', 'price = "abc"', "plans.demo.rates[0].price", 21, "decimal"),
        ('price = "0.01"', 'price = "-0.01"', "plans.demo.rates[0].price", 21, "non-negative"),
        ('"REDIRECT"  #', '"STOP" #', "plans.demo.rates[0].final_unit_action", 29, "STOP"),
        ("currency_minor_digits = 2", "currency_minor_digits = 7", "currency_minor_digits", 4, "0..6"),
        ('currency = "EUR"', 'currency = "euro"', "currency", 3, "ISO 4217"),
        ("rating_group = 300", "rating_group = 200", "plans.demo.rates[2].rating_group", 44, "twice"),
        ('bucket = "data"', 'bucket = "money"', "plans.demo.allowances[0].bucket", 12, "bucket"),
    ],
)
def test_bad_values_name_the_key_and_line(old: str, new: str, field: str, line: int, words: str) -> None:
    assert old in DEMO_TEXT
    err = error_of(DEMO_TEXT.replace(old, new, 1))
    assert err.field == field, str(err)
    assert err.line == line, str(err)
    assert words in str(err) and str(err).startswith(f"card.toml:{line}: {field}: ")


def test_unknown_default_rating_group_is_refused() -> None:
    err = error_of(small().replace("default_rating_group = 1", "default_rating_group = 7"))
    assert err.field == "plans.basic.default_rating_group" and err.line == 8


def test_plan_without_rates_and_card_without_plans() -> None:
    err = error_of(small().split("  [[plans.basic.rates]]")[0].replace("default_rating_group = 1", ""))
    assert err.field == "plans.basic.rates" and "missing" in str(err)
    err = error_of('version = "x"\ncurrency = "EUR"\ncurrency_minor_digits = 2\nrounding = "up"\n[plans]\n')
    assert err.field == "plans"


def test_two_to_the_53_guard_on_grant_size() -> None:
    # 1 EUR per byte, 1-byte increments: 10^6 micro-units per increment, 2^40 increments
    err = error_of(small(price="1", per=1, increment=1, default_quota=1, max_quota=2**40))
    assert err.field == "plans.basic.rates[0].max_quota" and "2^53" in str(err)
    # just under the bound passes: (2^53 // 10^6) increments of 10^6 micro-units
    limit = (2**53 - 2) // 10**6
    parse_ratecard(small(price="1", per=1, increment=1, default_quota=1, max_quota=limit))


def test_two_to_the_53_guard_on_price_denominator() -> None:
    # a price whose fraction has a huge denominator: cost of a full grant × den would reach 2^53
    err = error_of(small(price="0.000001", per=2**50 - 1, increment=2**40, default_quota=2**40,
                         max_quota=2**52))
    assert err.field and err.field.startswith("plans.basic.rates[0].") and "2^53" in str(err)


def test_load_ratecard_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RateCardError, match="cannot read"):
        load_ratecard(tmp_path / "nope.toml")


def test_compile_plan_unknown_plan_and_hand_built_card() -> None:
    card = load_ratecard(DEMO)
    with pytest.raises(RateCardError, match="no plan 'gold'"):
        compile_plan(card, "gold")
    with pytest.raises(RateCardError, match="no plan"):
        initial_allowances(card, "gold")
    bad = RateCard(version="x", currency="EUR", currency_minor_digits=2, rounding="nearest", plans=card.plans)
    with pytest.raises(RateCardError, match="rounding"):
        validate_ratecard(bad)
    validate_ratecard(card)


# ---- quota control per rating group ------------------------------------------------------------------------

def with_keys(*lines: str, **overrides: object) -> str:
    """The small card with extra keys in its one rate (they follow max_quota, on lines 18, 19, ...)."""
    return small(**overrides) + "".join(f"  {line}\n" for line in lines)


def test_quota_control_compiles_into_the_schedule() -> None:
    card = parse_ratecard(with_keys(
        'also_grant = { time = { default = 600, max = 3600 }, output = { default = 8000, max = 9000 } }',
        "validity_time = 900", "volume_quota_threshold = 500", "time_quota_threshold = 60",
        "quota_holding_time = 0", 'triggers = ["CHANGE_IN_RAT", 2, "change_in_location"]',
        'final_unit_action = "REDIRECT"', 'redirect_address = "https://topup.example.net/?a=1"',
        default_quota=5000))
    s = compile_plan(card, "basic")[1]
    assert s.also_grant == (("time", 600, 3600), ("output", 8000, 9000))  # in Units field order
    assert (s.validity_time, s.final_validity_time, s.volume_quota_threshold, s.time_quota_threshold) == (
        900, 900, 500, 60)
    assert s.quota_holding_time == 0 and s.triggers == (4, 2, 3) and s.unit_quota_threshold == 0
    assert (s.final_unit_action, s.redirect_address, s.redirect_address_type) == (
        1, "https://topup.example.net/?a=1", 2)
    assert s.credit_control and not s.barred


def test_restrict_access_and_empty_trigger_list() -> None:
    card = parse_ratecard(with_keys(
        'final_unit_action = "RESTRICT_ACCESS"', 'filter_id = "topup-only"',
        'restriction_filter_rule = ["permit out ip from any to 10.1.2.3", "permit in ip from 10.1.2.3 to any"]',
        "final_validity_time = 30", "triggers = []", "barred = true"))
    s = compile_plan(card, "basic")[1]
    assert (s.final_unit_action, s.filter_ids, s.final_validity_time, s.validity_time) == (
        2, ("topup-only",), 30, 0)
    assert s.restriction_filter_rules == ("permit out ip from any to 10.1.2.3", "permit in ip from 10.1.2.3 to any")
    assert s.triggers == () and s.barred


def test_requires_bundle_and_fair_usage_compile_into_the_schedule() -> None:
    card = parse_ratecard(with_keys(
        "requires_bundle = true", "validity_time = 600",
        'fair_usage = { units = 5368709120, period = "month", filter_id = "throttle-1mbps", '
        'restriction_filter_rule = "permit out ip from any to 10.9.9.9" }'))
    s = compile_plan(card, "basic")[1]
    assert s.requires_bucket
    assert (s.fair_usage_units, s.fair_usage_period, s.fair_usage_filter_ids) == (5368709120, "month",
                                                                                  ("throttle-1mbps",))
    assert s.fair_usage_restriction_filter_rules == ("permit out ip from any to 10.9.9.9",)
    assert (s.final_unit_action, s.final_validity_time) == (0, 600)  # the restricted state's Validity-Time
    plain = compile_plan(parse_ratecard(small()), "basic")[1]
    assert not plain.requires_bucket and plain.fair_usage_units == 0


@pytest.mark.parametrize(
    "lines, field, words",
    [
        (['fair_usage = { units = 0, filter_id = "t" }', "validity_time = 60"], "fair_usage.units", "positive"),
        (['fair_usage = { units = 10, period = "year", filter_id = "t" }', "validity_time = 60"],
         "fair_usage.period", "day, week, month"),
        (["fair_usage = { units = 10 }", "validity_time = 60"], "fair_usage", "filter_id"),
        (['fair_usage = { units = 10, restriction_filter_rule = "slow" }', "validity_time = 60"],
         "fair_usage.restriction_filter_rule", "IPFilterRule"),
        (['fair_usage = { units = 10, filter_id = "t", limit = 3 }'], "fair_usage", "limit"),
        (['fair_usage = { units = 10, filter_id = "t" }'], "fair_usage", "validity_time"),
        (["credit_control = false", "requires_bundle = true"], "requires_bundle", "no effect"),
    ],
)
def test_bad_fair_usage_and_bundle_keys_name_the_key(lines: list[str], field: str, words: str) -> None:
    err = error_of(with_keys(*lines))
    assert err.field is not None and err.field.startswith(f"plans.basic.rates[0].{field}"), str(err)
    assert words in str(err), str(err)


def test_rate_outside_credit_control_needs_no_price() -> None:
    text = SMALL.split("  price =")[0] + "  credit_control = false\n"
    s = compile_plan(parse_ratecard(text), "basic")[1]
    assert (s.credit_control, s.price_num, s.default_quota, s.max_quota) == (False, 0, 0, 0)


@pytest.mark.parametrize(
    "lines, field, line, words",
    [
        (['also_grant = { octets = { default = 1, max = 2 } }'], "also_grant.octets", 18, "unknown unit type"),
        (['also_grant = { total = { default = 1, max = 2 } }'], "also_grant.total", 18, "priced unit"),
        (['also_grant = { time = { default = 5, max = 2 } }'], "also_grant.time.default", 18, "exceeds"),
        (['also_grant = { time = { default = 5, max = 4294967296 } }'], "also_grant.time.max", 18, "1..4294967295"),
        (["volume_quota_threshold = 1000"], "volume_quota_threshold", 18, "not below the default"),
        (["time_quota_threshold = 10"], "time_quota_threshold", 18, "needs a time grant"),
        (["unit_quota_threshold = 10"], "unit_quota_threshold", 18, "also_grant.units"),
        (["validity_time = 4294967296"], "validity_time", 18, "Unsigned32"),
        (["quota_holding_time = -1"], "quota_holding_time", 18, "Unsigned32"),
        (['triggers = [1, "CHANGE_IN_MOOD"]'], "triggers[1]", 18, "CHANGE_IN_MOOD"),
        (["triggers = [99]"], "triggers[0]", 18, "Trigger-Type"),
        (['final_unit_action = "REDIRECT"', "validity_time = 60"], "final_unit_action", 18, "redirect_address"),
        (['final_unit_action = "REDIRECT"', 'redirect_address = "topup page"', "validity_time = 60"],
         "redirect_address", 19, "not a valid URL"),
        (['final_unit_action = "REDIRECT"', 'redirect_address = "10.0.0.300"', "validity_time = 60",
          'redirect_address_type = "IPV4_ADDRESS"'], "redirect_address", 19, "IPV4_ADDRESS"),
        (['final_unit_action = "REDIRECT"', 'redirect_address = "http://x"', "validity_time = 60",
          'redirect_address_type = "HTTP"'], "redirect_address_type", 21, "URL"),
        (['final_unit_action = "REDIRECT"', 'redirect_address = "https://topup.example.net"'],
         "final_unit_action", 18, "needs validity_time or final_validity_time"),
        (['redirect_address = "https://topup.example.net"'], "redirect_address", 18, "only used with"),
        (['final_unit_action = "RESTRICT_ACCESS"', "validity_time = 60"], "final_unit_action", 18, "filter_id"),
        (['final_unit_action = "RESTRICT_ACCESS"', "validity_time = 60", 'restriction_filter_rule = "allow all"'],
         "restriction_filter_rule", 20, "IPFilterRule"),
        (['filter_id = "f"', 'final_unit_action = "REDIRECT"', 'redirect_address = "https://t.example"',
          "validity_time = 9"], "filter_id", 18, "RESTRICT_ACCESS"),
        (["final_validity_time = 60"], "final_validity_time", 18, "only used with REDIRECT"),
        (["credit_control = false", "barred = true"], "barred", 19, "cannot also be barred"),
        (["credit_control = false", "validity_time = 60"], "validity_time", 19, "no effect"),
    ],
)
def test_bad_quota_control_names_the_key_and_line(lines: list[str], field: str, line: int, words: str) -> None:
    err = error_of(with_keys(*lines))
    assert err.field == f"plans.basic.rates[0].{field}", str(err)
    assert err.line == line, str(err)
    assert words in str(err), str(err)


def test_allowance_cannot_pay_for_a_free_rating_group_and_prices_are_required() -> None:
    text = SMALL.split("  price =")[0] + """  credit_control = false
  [[plans.basic.allowances]]
  bucket = "data"
  unit = "bytes"
  amount = 10
  rating_groups = [1]
"""
    err = error_of(text)
    assert err.field == "plans.basic.allowances[0].rating_groups" and "outside credit control" in str(err)
    err = error_of(small().replace("  per = 1000\n", ""))
    assert err.field == "plans.basic.rates[0].per" and "missing required key" in str(err)
