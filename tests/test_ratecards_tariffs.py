"""The full example card: tariffs chosen by band, zone, destination, service context and identifier; price
enquiries across a change; and bad keys anywhere (nested tariffs, bands, zones) named with their line."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratecards import (
    RateCardError,
    charge_for_usage,
    compile_card,
    load_ratecard,
    parse_ratecard,
    plmn_from_user_location_info,
)

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "examples" / "ratecard-full.toml"
FULL_TEXT = FULL.read_text()
BERLIN = ZoneInfo("Europe/Berlin")
MB = 1 << 20


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


@pytest.fixture(scope="module")
def rater():
    return compile_card(load_ratecard(FULL))


def test_data_tariffs_by_zone_and_night_band(rater) -> None:
    tuesday_noon = at("2026-12-01T12:00:00")
    home, change = rater.schedule_for("full", 100, at=tuesday_noon, plmn="26201")
    assert (home.tariff, home.allowances, change) == ("", ("data",), at("2026-12-01T22:00:00"))
    night, change = rater.schedule_for("full", 100, at=at("2026-12-01T23:00:00"), plmn="26201")
    assert (night.tariff, change) == ("night", at("2026-12-02T07:00:00"))
    assert night.price_num * 2 * home.price_den == home.price_num * night.price_den  # half price
    # roaming in France: the zone from the SGSN's MCC-MNC or from User-Location-Info; its cap counts per day
    uli = bytes([130, 0x02, 0xF8, 0x10]) + bytes(9)  # TAI+ECGI in 208-01
    assert plmn_from_user_location_info(uli) == "20801"
    roaming, change = rater.schedule_for("full", 100, at=tuesday_noon, plmn=plmn_from_user_location_info(uli))
    assert (roaming.tariff, roaming.cap, roaming.cap_period) == ("eu-roaming", 3_000_000, "day")
    assert change == at("2026-12-02T00:00:00")  # the cap's day ends: the counter restarts
    assert rater.schedule_for("full", 100, at=tuesday_noon, zone="eu")[0] is roaming
    world, _ = rater.schedule_for("full", 100, at=at("2026-12-01T23:00:00"), plmn="310260")
    assert world.tariff == "world-roaming"  # roaming comes before night in the list
    assert rater.zone_of(b"26201", at=tuesday_noon) == "home"


def test_voice_by_destination_prefix(rater) -> None:
    when = at("2026-12-01T12:00:00")

    def tariff(number: str) -> str:
        return rater.schedule_for("full", 200, at=when, destination=number)[0].tariff

    assert tariff("+491701234567") == ""  # national: the rate's own price (60/60, setup fee)
    assert tariff("01701234567") == ""  # national format, country code 49 from the card
    assert tariff("tel:+33 6 12 34 56 78") == "international-eu"
    assert tariff("sip:+35312345@ims.example.net") == "international-eu"
    assert tariff("+15551234567") == "international-world"
    assert tariff("0900123456") == "premium"
    assert rater.schedule_for("full", 200, at=when, destination="0900123456")[0].barred
    assert rater.destination_of("+4930123", at=when) == "de-fixed"
    eu, change = rater.schedule_for("full", 200, at=when, destination="+33612345678")
    assert (eu.increment, eu.first_increment, eu.price_num, change) == (6, 30, 29_000, None)


def test_sms_by_context_and_destination(rater) -> None:
    when = at("2026-12-01T12:00:00")
    s, _ = rater.schedule_for("full", 300, at=when, destination="+33612345678", service_context="32274@3gpp.org")
    assert s.tariff == "sms-international"
    s, _ = rater.schedule_for("full", 300, at=when, destination="+33612345678", service_context="32251@3gpp.org")
    assert s.tariff == ""  # the international SMS tariff asks for the SMS context
    s, _ = rater.schedule_for("full", 300, at=when, plmn="310260", service_context="32274@3gpp.org")
    assert s.tariff == "sms-roaming"


def test_service_identifier_condition() -> None:
    text = FULL_TEXT.replace('''    name = "sms-roaming"
    zone = "world"''', '''    name = "sms-roaming"
    service_identifier = [7, 8]''')
    rater = compile_card(parse_ratecard(text))
    when = at("2026-12-01T12:00:00")
    assert rater.schedule_for("full", 300, at=when, service_identifier=8)[0].tariff == "sms-roaming"
    assert rater.schedule_for("full", 300, at=when, service_identifier=9)[0].tariff == ""


def test_a_call_across_the_night_band(rater) -> None:
    """A national call from 21:58 for 5 minutes: 2 minutes at the day price with the setup fee, then the
    off-peak tariff prices the rest of the call (scope session: minutes count over the whole call)."""
    quote = rater.quote("full", 200, 300, at=at("2026-12-01T21:58:00"), destination="+491701234567")
    assert [(p.tariff, p.units, p.amount) for p in quote.parts] == [("", 120, 230_000), ("off-peak", 180, 90_000)]
    assert quote.amount == 320_000 and quote.next_change_at == at("2026-12-01T22:00:00")


def test_a_data_session_across_midnight_while_roaming_is_capped_per_day(rater) -> None:
    # 200 MB over 2 hours from 23:00 in France: 0.02/MB; 100 MB before midnight (2.00), 100 after (2.00)
    quote = rater.quote("full", 100, 200 * MB, at=at("2026-12-01T23:00:00"), duration=7200, plmn="20801")
    assert [(p.units, p.amount) for p in quote.parts] == [(100 * MB, 2_000_000), (100 * MB, 2_000_000)]
    # 400 MB over the same time: the 3.00 cap applies per day
    quote = rater.quote("full", 100, 400 * MB, at=at("2026-12-01T23:00:00"), duration=7200, plmn="20801")
    assert [p.amount for p in quote.parts] == [3_000_000, 3_000_000]


def test_monthly_tiers_and_cap(rater) -> None:
    video, change = rater.schedule_for("full", 400, at=at("2026-12-10T12:00:00"))
    assert change == at("2027-01-01T00:00:00") and video.scope == "month"
    gb = 1 << 30
    assert charge_for_usage(video, gb) == 1024 * 20_000  # first GB at 0.02/MB
    assert charge_for_usage(video, gb, used_before=gb) == 1024 * 10_000  # second GB at 0.01/MB
    assert charge_for_usage(video, gb, used_before=gb, spent_before=20_000_000) == 5_000_000  # capped at 25


def test_basic_plan_is_spine_compatible(rater) -> None:
    basic, change = rater.schedule_for("basic", 200, at=at("2026-12-01T12:00:00"))
    assert (basic.tariff, basic.scope, basic.setup_fee, change) == ("", "report", 0, None)


KEYS = st.fixed_dictionaries({
    "plmn": st.sampled_from([None, "26201", "20801", "310260"]),
    "destination": st.sampled_from([None, "+491701234567", "+33612345678", "+15551234567", "0900123"]),
    "service_context": st.sampled_from([None, "32274@3gpp.org", "32260@3gpp.org"]),
})


@settings(max_examples=300, deadline=None)
@given(st.integers(int(at("2026-10-20T00:00:00")), int(at("2027-04-10T00:00:00"))),
       st.sampled_from([100, 200, 300, 400]), KEYS, st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_next_change_at_is_where_the_schedule_changes(rater, t: int, group: int, keys: dict,
                                                      samples: list[float]) -> None:
    """The schedule holds from `at` until next_change_at (sampled), and differs there unless the change is
    the end of a cap or scope period; None means it holds for the whole horizon."""
    from ratecards.rater import HORIZON

    schedule, change = rater.schedule_for("full", group, at=t, **keys)
    end = change if change is not None else t + HORIZON
    assert end > t
    for fraction in samples:
        inside = t + int((end - 1 - t) * fraction)
        assert rater.schedule_for("full", group, at=inside, **keys)[0] is schedule
    if change is not None:
        after = rater.schedule_for("full", group, at=change, **keys)[0]
        assert after is not schedule or schedule.cap or schedule.scope in ("day", "week", "month")


def _line_of(text: str, snippet: str) -> int:
    return text[: text.index(snippet)].count("\n") + 1


@pytest.mark.parametrize(
    "old, new, field, words",
    [
        ('band = "night"                 # at home (roaming tariffs come first)', 'band = "nite"',
         "plans.full.rates[0].tariffs[2].band", "'nite' is not defined in [[bands]]"),
        ('price = "1.99"', 'price = "1.99"\n    increment = 7', "plans.full.rates[1].tariffs[2].increment",
         "the rate's 300 is not a whole number of increments of 7"),
        ("first_increment = 30", "first_increment = 31", "plans.full.rates[1].tariffs[1].first_increment",
         "multiple of increment 6"),
        ('setup_fee = "0.15"', 'setup_fee = "0.155"', "plans.full.rates[1].tariffs[2].setup_fee",
         "more decimals than EUR"),
        ('name = "premium"', 'name = "premium"\n    colour = "red"', "plans.full.rates[1].tariffs[0].colour",
         "unknown key"),
        ('    destination = "de-premium"\n', "", "plans.full.rates[1].tariffs[0]", "needs a condition"),
        ('context = "sms"', 'context = "fax"', "plans.full.rates[2].tariffs[1].context", "fax"),
        ('from = "22:00"', 'from = "25:00"', "bands[0].from", "between 00:00 and 24:00"),
        ('days = ["all"]', 'days = ["funday"]', "bands[0].days[0]", "funday"),
        ('to = "07:00"', 'to = "22:00"', "bands[0].to", "the same time"),
        ('timezone = "Europe/Berlin"', 'timezone = "Mars/Base"', "timezone", "IANA"),
        ('eu = ["204",', 'eu = ["2x4",', "zones.eu[0]", "not a serving-network"),
        ('de-mobile = ["4915",', 'de-mobile = ["492",', "destinations.de-mobile[0]", "also in 'de-fixed'"),
        ("{ from = 1073741824,", "{ from = 1073741825,", "plans.full.rates[3].tiers[0].from", "multiple"),
        ('scope = "month"', 'scope = "year"', "plans.full.rates[3].scope", "day, week, month"),
        ('rounding_step = "usage"', 'rounding_step = "call"', "rounding_step", "usage, increment"),
        ('cap = "25.00"', 'cap = "-1"', "plans.full.rates[3].cap", "non-negative"),
        ('price = "2.00"', 'price = 2.00', "plans.full.rates[0].tariffs[1].price", "got `float`"),
    ],
)
def test_bad_keys_are_named_with_their_line(old: str, new: str, field: str, words: str) -> None:
    assert FULL_TEXT.count(old) >= 1, old
    text = FULL_TEXT.replace(old, new, 1)
    with pytest.raises(RateCardError) as caught:
        parse_ratecard(text, source="card.toml")
    err = caught.value
    assert err.field == field, str(err)
    assert words in str(err), str(err)
    target = new.strip().splitlines()[-1] if new.strip() else None
    if "tiers" in field:
        target = "tiers = ["  # an inline array: the line of its key
    if target and field.split(".")[-1].split("[")[0] in target:
        assert err.line == _line_of(text, target), str(err)
    assert str(err).startswith(f"card.toml:{err.line}: {field}: "), str(err)


def test_a_tariff_without_condition_points_at_its_header() -> None:
    text = FULL_TEXT.replace('    destination = "de-premium"\n', "", 1)
    with pytest.raises(RateCardError) as caught:
        parse_ratecard(text, source="card.toml")
    header = text.index('    name = "premium"')
    assert caught.value.line == text[:header].count("\n")  # the [[plans.full.rates.tariffs]] line above it
