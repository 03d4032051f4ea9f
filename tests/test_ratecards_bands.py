"""Time bands in the card's time zone: overlaps, midnight wrap, holidays, DST days, next boundary, periods."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from ratecards.calendar import DAY_NAMES, HOLIDAY, WEEK, BandCalendar, BandSpec, band_intervals, parse_clock

BERLIN = ZoneInfo("Europe/Berlin")
HOLIDAYS = [date(2026, 12, 25), date(2026, 12, 26), date(2027, 1, 1), date(2027, 4, 5)]


def spec(name: str, days: list[str], start: str, end: str) -> BandSpec:
    return BandSpec(name, frozenset(d for n in days for d in DAY_NAMES[n]),
                    band_intervals(parse_clock(start), parse_clock(end)))


SPECS = [
    spec("night", ["all"], "22:00", "07:00"),
    spec("weekend", ["weekend", "holidays"], "00:00", "24:00"),
    spec("lunch", ["weekdays"], "12:00", "13:30"),
    spec("early", ["mon", "wed"], "02:30", "03:15"),  # inside the DST hours
]


def local(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def name_at(calendar: BandCalendar, text: str) -> str | None:
    return calendar.band_name(calendar.band_at(local(text))[0])


def test_parse_clock() -> None:
    assert parse_clock("07:30") == 27_000 and parse_clock("24:00") == 86_400 and parse_clock("00:00:05") == 5
    for bad in ("7:30", "24:01", "12:60", "noon", "12:00:00:00"):
        try:
            parse_clock(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_first_band_wins_and_midnight_wraps() -> None:
    calendar = BandCalendar(BERLIN, SPECS, HOLIDAYS)
    assert name_at(calendar, "2026-12-01T21:59:59") is None  # Tuesday
    assert name_at(calendar, "2026-12-01T22:00:00") == "night"
    assert name_at(calendar, "2026-12-02T06:59:59") == "night"
    assert name_at(calendar, "2026-12-02T07:00:00") is None
    assert name_at(calendar, "2026-12-02T12:30:00") == "lunch"
    assert name_at(calendar, "2026-12-05T23:00:00") == "night"  # Saturday: night is listed first
    assert name_at(calendar, "2026-12-05T12:30:00") == "weekend"  # no lunch band at the weekend


def test_holidays_are_their_own_day_type() -> None:
    calendar = BandCalendar(BERLIN, SPECS, HOLIDAYS)
    assert calendar.day_type(date(2026, 12, 25)) == HOLIDAY
    assert name_at(calendar, "2026-12-25T12:30:00") == "weekend"  # Friday, but a holiday: no lunch band
    assert name_at(calendar, "2026-12-24T12:30:00") == "lunch"


def test_band_at_says_when_the_segment_ends() -> None:
    calendar = BandCalendar(BERLIN, SPECS, HOLIDAYS)
    band, end = calendar.band_at(local("2026-12-04T20:00:00"))  # Friday evening
    assert band == -1 and end == local("2026-12-04T22:00:00")
    band, end = calendar.band_at(local("2026-12-04T23:00:00"))
    # night, then the weekend band from Saturday 07:00 (night wins until then)
    assert calendar.band_name(band) == "night" and end == local("2026-12-05T07:00:00")


def test_spring_forward_day() -> None:
    """29 March 2026: 02:00 CET jumps to 03:00 CEST. A band starting at 02:30 starts when the clock shows
    03:00; the day has 23 hours."""
    calendar = BandCalendar(BERLIN, [spec("early", ["sun"], "02:30", "03:15")], [])
    gap_end = datetime(2026, 3, 29, 1, 0, tzinfo=ZoneInfo("UTC")).timestamp()  # 03:00 CEST
    assert calendar.band_at(gap_end - 1)[0] == -1
    band, end = calendar.band_at(gap_end)
    assert band == 0 and end == gap_end + 15 * 60
    assert calendar.period(gap_end, "day")[2] - calendar.period(gap_end, "day")[1] == 23 * 3600


def test_fall_back_day() -> None:
    """25 October 2026: 03:00 CEST falls back to 02:00 CET. A band from 02:30 to 03:15 starts at the first
    02:30 and lasts through the repeated hour until 03:15 CET; the day has 25 hours."""
    calendar = BandCalendar(BERLIN, [spec("early", ["sun"], "02:30", "03:15")], [])
    first = datetime(2026, 10, 25, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp()  # 02:30 CEST
    band, end = calendar.band_at(first)
    assert band == 0 and end == datetime(2026, 10, 25, 2, 15, tzinfo=ZoneInfo("UTC")).timestamp()
    assert calendar.band_at(first - 1)[0] == -1
    assert calendar.period(first, "day")[2] - calendar.period(first, "day")[1] == 25 * 3600


def _expected(specs: list[BandSpec], holidays: set[date], t: float) -> int:
    wall = datetime.fromtimestamp(t, BERLIN)
    day = HOLIDAY if wall.date() in holidays else wall.weekday()
    second = wall.hour * 3600 + wall.minute * 60 + wall.second
    for index, band in enumerate(specs):
        if day in band.days and any(a <= second < b for a, b in band.intervals):
            return index
    return -1


def _dst_day(t: float) -> bool:
    day = datetime.fromtimestamp(t, BERLIN)
    start = datetime(day.year, day.month, day.day, tzinfo=BERLIN)
    return (start + timedelta(days=1)).utcoffset() != start.utcoffset() or \
        (start - timedelta(days=1)).utcoffset() != start.utcoffset()


@settings(max_examples=400, deadline=None)
@given(st.integers(int(local("2026-01-01T00:00:00")), int(local("2028-12-31T00:00:00"))))
def test_band_at_equals_the_wall_clock(t: int) -> None:
    """Away from DST days (tested above), the band is what the local wall clock says, and the segment ends
    where the band changes (or at a chunk's week boundary)."""
    calendar = BandCalendar(BERLIN, SPECS, HOLIDAYS)
    if _dst_day(t):
        return
    band, end = calendar.band_at(t)
    assert band == _expected(SPECS, set(HOLIDAYS), t)
    assert end > t
    if not _dst_day(end - 1):
        assert _expected(SPECS, set(HOLIDAYS), end - 1) == band
    assert calendar.band_at(end)[0] != band or end % WEEK == 0


def test_no_bands_is_one_band_forever() -> None:
    calendar = BandCalendar(BERLIN)
    assert calendar.constant
    band, end = calendar.band_at(local("2026-12-01T12:00:00"))
    assert band == -1 and end % WEEK == 0


def test_periods() -> None:
    calendar = BandCalendar(BERLIN)
    t = local("2027-01-15T23:30:00")  # a Friday
    assert calendar.period(t, "day") == ("2027-01-15", local("2027-01-15T00:00:00"), local("2027-01-16T00:00:00"))
    assert calendar.period(t, "week") == ("2027-W02", local("2027-01-11T00:00:00"), local("2027-01-18T00:00:00"))
    assert calendar.period(t, "month") == ("2027-01", local("2027-01-01T00:00:00"), local("2027-02-01T00:00:00"))
    assert calendar.period(local("2026-12-31T12:00:00"), "month")[2] == local("2027-01-01T00:00:00")
