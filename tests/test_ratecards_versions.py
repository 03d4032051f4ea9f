"""Versioned rate cards: the version in force rates the usage, a new version must lie one reload interval
ahead, the spine's card is one version in force forever, and what a version changes is described."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from ratecards import (
    RateCardError,
    UnknownRate,
    check_new_version,
    compile_card,
    compile_plan,
    describe_changes,
    effective_epoch,
    load_ratecard,
    parse_ratecard,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "ocs" / "demo" / "ratecard.toml"
BERLIN = ZoneInfo("Europe/Berlin")

CARD = """
version = "{version}"
{effective}
currency = "EUR"
currency_minor_digits = 2
rounding = "up"
timezone = "Europe/Berlin"

[plans.p]
  [[plans.p.rates]]
  rating_group = 10
  service = "voice"
  unit = "seconds"
  price = "{price}"
  per = 60
  increment = 60
  default_quota = 300
  max_quota = 3600
"""


def card(version: str, price: str, effective: str | None = None):
    line = f"effective_from = {effective}" if effective else ""
    return parse_ratecard(CARD.format(version=version, price=price, effective=line))


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def test_spine_card_is_one_version_in_force_forever() -> None:
    demo = load_ratecard(DEMO)
    rater = compile_card(demo)
    for group, schedule in compile_plan(demo, "demo").items():
        for when in (0, 1.8e9, 4e9):
            assert rater.schedule_for("demo", group, at=when) == (schedule, None)
    with pytest.raises(UnknownRate, match="no rate for rating group 999"):
        rater.schedule_for("demo", 999, at=0)
    with pytest.raises(UnknownRate):
        rater.schedule_for("gold", 100, at=0)


def test_usage_is_rated_by_the_version_in_force() -> None:
    v1 = card("v1", "0.06")
    v2 = card("v2", "0.09", "2027-03-01T00:00:00")  # local time in Europe/Berlin
    rater = compile_card([v2, v1])  # any order
    assert [c.version for c in rater.cards] == ["v1", "v2"]
    assert effective_epoch(v2) == at("2027-03-01T00:00:00")
    before, change = rater.schedule_for("p", 10, at=at("2027-02-28T23:59:59"))
    assert (before.version, before.price_num, change) == ("v1", 60_000, at("2027-03-01T00:00:00"))
    after, change = rater.schedule_for("p", 10, at=at("2027-03-01T00:00:00"))
    assert (after.version, after.price_num, change) == ("v2", 90_000, None)
    assert rater.version_at(datetime(2027, 3, 1, tzinfo=BERLIN)).version == "v2"
    # a call across the change: the minutes before at v1, after at v2
    quote = rater.quote("p", 10, 180, at=at("2027-02-28T23:59:00"))
    assert [(p.version, p.units, p.amount) for p in quote.parts] == [("v1", 60, 60_000), ("v2", 120, 180_000)]


def test_before_the_first_version_nothing_is_in_force() -> None:
    rater = compile_card(card("v1", "0.06", "2027-03-01T00:00:00+01:00"))
    with pytest.raises(UnknownRate, match="no rate card version is in force"):
        rater.schedule_for("p", 10, at=at("2027-02-01T00:00:00"))
    assert rater.schedule_for("p", 10, at=at("2027-03-01T00:00:00"))[0].version == "v1"


def test_a_set_of_versions_must_be_consistent() -> None:
    with pytest.raises(RateCardError, match="appears twice"):
        compile_card([card("v1", "0.06"), card("v1", "0.07", "2027-01-01T00:00:00")])
    with pytest.raises(RateCardError, match="only the oldest may leave it out"):
        compile_card([card("v1", "0.06"), card("v2", "0.07")])
    with pytest.raises(RateCardError, match="same instant"):
        compile_card([card("v1", "0.06", "2027-01-01T00:00:00"), card("v2", "0.07", "2027-01-01T00:00:00+01:00")])
    other = msgspec.structs.replace(card("v2", "0.07", "2027-01-01T00:00:00"), currency="USD")
    with pytest.raises(RateCardError, match="one currency"):
        compile_card([card("v1", "0.06"), other])
    with pytest.raises(RateCardError):
        compile_card([])


def test_a_new_version_must_lie_one_reload_interval_ahead() -> None:
    existing = [card("v1", "0.06")]
    now = at("2027-02-28T23:58:00")
    new = card("v2", "0.09", "2027-03-01T00:00:00")
    check_new_version(existing, new, now=now)  # 120 s ahead, interval 60 s
    check_new_version(existing, new, now=now, reload_interval=120)  # exactly one interval: fine
    with pytest.raises(RateCardError, match=r"less than one reload interval \(121 s\)") as caught:
        check_new_version(existing, new, now=now, reload_interval=121)
    assert caught.value.field == "effective_from"
    with pytest.raises(RateCardError, match="needs effective_from"):
        check_new_version(existing, card("v2", "0.09"), now=now)
    with pytest.raises(RateCardError, match="already loaded with other content"):
        check_new_version(existing, card("v1", "0.07"), now=now)
    check_new_version(existing, card("v1", "0.06"), now=now)  # the same version again: idempotent
    check_new_version([], card("v0", "0.01"), now=now)  # the first version may be in force at once


def test_describe_changes() -> None:
    v1 = card("v1", "0.06")
    v2 = parse_ratecard(CARD.format(version="v2", price="0.09", effective="effective_from = 2027-03-01T00:00:00")
                        + '\n[zones]\neu = ["208", "214"]\n')
    lines = describe_changes(v1, v2)
    assert "zone 'eu' added (2 prefixes)" in lines
    assert any("rating group 10 (voice): price '0.06' → '0.09'" in line for line in lines)
    assert describe_changes(None, v1) == ["first version 'v1': 1 plan(s)"]
    assert describe_changes(v1, v1) == ["no change in prices or rating keys"]


def test_tariff_changes_at_a_band_boundary_and_a_version_boundary() -> None:
    text = CARD + """
    [[plans.p.rates.tariffs]]
    band = "night"
    price = "0.02"

[[bands]]
name = "night"
days = ["all"]
from = "22:00"
to = "07:00"
"""
    v1 = parse_ratecard(text.format(version="v1", price="0.06", effective=""))
    v2 = parse_ratecard(text.format(version="v2", price="0.09", effective="effective_from = 2027-03-01T03:00:00"))
    rater = compile_card([v1, v2])
    s, change = rater.schedule_for("p", 10, at=at("2027-02-28T21:00:00"))
    assert (s.version, s.tariff, change) == ("v1", "", at("2027-02-28T22:00:00"))
    s, change = rater.schedule_for("p", 10, at=at("2027-02-28T23:00:00"))
    # the night band lasts until 07:00 but the new version takes effect at 03:00
    assert (s.version, s.tariff, change) == ("v1", "band=night", at("2027-03-01T03:00:00"))
    s, change = rater.schedule_for("p", 10, at=at("2027-03-01T03:00:00"))
    assert (s.version, s.tariff, s.price_num, change) == ("v2", "band=night", 20_000, at("2027-03-01T07:00:00"))
