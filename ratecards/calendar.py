"""Time bands, holidays and calendar periods in a rate card's time zone, answered in epoch seconds.

A band applies on its days (mon..sun, weekdays, weekend, holidays, all) from a local wall-clock time to
another; where bands overlap the first one in the card wins; a time no band covers has no band (-1, the
rate's own price). A holiday date is its own day type: weekday names do not match it, "holidays" and "all"
do. A band whose end is not after its start wraps midnight: it covers start..24:00 and 00:00..end of each
listed day.

Theory of operation: each of the 8 day types (7 weekdays, holiday) is painted once into a list of
(second of day, band) segments. Lookups are answered from chunks of one UTC week: the chunk turns the
local days around that week into absolute boundaries with zoneinfo (so DST days have 23 or 25 hours and a
boundary inside a skipped hour moves to the end of the gap) and keeps them sorted; `band_at` is a dict hit
plus a bisect — O(log boundaries of a week). Chunks are built on first use and kept (a bounded cache).
No I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

__all__ = ["DAY_NAMES", "HOLIDAY", "WEEK", "BandCalendar", "BandSpec", "parse_clock"]

WEEK = 7 * 86_400
HOLIDAY = 7  # the day type of a holiday date (0..6 are Monday..Sunday)
DAY_NAMES: dict[str, tuple[int, ...]] = {
    "mon": (0,), "tue": (1,), "wed": (2,), "thu": (3,), "fri": (4,), "sat": (5,), "sun": (6,),
    "weekdays": (0, 1, 2, 3, 4), "weekend": (5, 6), "holidays": (HOLIDAY,), "all": (0, 1, 2, 3, 4, 5, 6, HOLIDAY),
}
_MAX_CHUNKS = 64


class BandSpec(NamedTuple):
    name: str
    days: frozenset[int]
    intervals: tuple[tuple[int, int], ...]  # seconds of the local day, start < end ≤ 86400


def parse_clock(text: str) -> int:
    """ "HH:MM" or "HH:MM:SS" (24:00 allowed) → seconds since local midnight; ValueError otherwise."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a time of day such as \"07:30\"")
    hours, minutes, seconds = (int(p) for p in (*parts, "00")[:3])
    if minutes > 59 or seconds > 59 or hours > 24 or (hours == 24 and (minutes or seconds)):
        raise ValueError(f"{text!r} is not a time of day between 00:00 and 24:00")
    return hours * 3600 + minutes * 60 + seconds


def band_intervals(start: int, end: int) -> tuple[tuple[int, int], ...]:
    """The day intervals of a band from `start` to `end` (seconds); end ≤ start wraps midnight."""
    if start < end:
        return ((start, end),)
    return tuple(i for i in ((start, 86_400), (0, end)) if i[0] < i[1])


class BandCalendar:
    """Which band is in force at an instant, when that changes, and calendar periods, in one time zone."""

    def __init__(self, tz: ZoneInfo, bands: Sequence[BandSpec] = (), holidays: Iterable[date] = ()) -> None:
        self.tz = tz
        self.names = tuple(b.name for b in bands)
        self.holidays = frozenset(holidays)
        self.patterns = tuple(self._paint(bands, day) for day in range(8))
        self.constant = all(p == ((0, -1),) for p in self.patterns)
        self._chunks: dict[int, tuple[list[int], list[int]]] = {}
        self._periods: dict[str, tuple[int, int, str]] = {}

    @staticmethod
    def _paint(bands: Sequence[BandSpec], day: int) -> tuple[tuple[int, int], ...]:
        """(second of day, band index) segments of one day type, first band in card order winning."""
        applying = [(index, spec) for index, spec in enumerate(bands) if day in spec.days]
        cuts = sorted({0, *(edge for _, spec in applying for iv in spec.intervals for edge in iv)} - {86_400})
        segments: list[tuple[int, int]] = []
        for cut in cuts:
            band = next((index for index, spec in applying
                         if any(a <= cut < b for a, b in spec.intervals)), -1)
            if not segments or segments[-1][1] != band:
                segments.append((cut, band))
        return tuple(segments)

    def day_type(self, day: date) -> int:
        return HOLIDAY if day in self.holidays else day.weekday()

    def _local_epoch(self, day: date, second: int) -> int:
        """The first instant whose local wall-clock time is `second` into `day`: an ambiguous time (the
        repeated hour) is its first occurrence, a skipped one (the DST gap) the end of the gap."""
        wall = datetime(day.year, day.month, day.day, tzinfo=self.tz) + timedelta(seconds=second)
        early, late = int(wall.timestamp()), int(wall.replace(fold=1).timestamp())
        if late >= early:
            return early
        after = wall.replace(fold=1).utcoffset()  # in a gap: find the transition in (late, early]
        while early - late > 1:
            middle = (late + early) // 2
            if datetime.fromtimestamp(middle, self.tz).utcoffset() == after:
                early = middle
            else:
                late = middle
        return early

    def _chunk(self, week: int) -> tuple[list[int], list[int]]:
        """Boundaries and bands covering UTC week `week` ([week × WEEK, (week + 1) × WEEK)): starts[0] ≤ the
        week's start and the last start ≥ its end, so every instant of the week has a next boundary."""
        begin, end = week * WEEK, (week + 1) * WEEK
        day = datetime.fromtimestamp(begin - 2 * 86_400, self.tz).date()
        last = datetime.fromtimestamp(end + 2 * 86_400, self.tz).date()
        pairs: list[tuple[int, int]] = []
        while day <= last:
            for second, band in self.patterns[self.day_type(day)]:
                instant = self._local_epoch(day, second)
                while pairs and pairs[-1][0] >= instant:  # a boundary a DST gap moved past the next one
                    pairs.pop()
                if not pairs or pairs[-1][1] != band:
                    pairs.append((instant, band))
            day += timedelta(days=1)
        first = max(bisect.bisect_right([p[0] for p in pairs], begin) - 1, 0)
        kept = pairs[first:]
        starts, bands = [p[0] for p in kept], [p[1] for p in kept]
        after = bisect.bisect_left(starts, end)
        if after < len(starts):
            del starts[after + 1:], bands[after + 1:]
        else:  # no boundary past the week: a marker with the same band keeps "next boundary" defined
            starts.append(end)
            bands.append(bands[-1])
        return starts, bands

    def week_segments(self, week: int) -> tuple[list[int], list[int]]:
        """(starts, bands) of UTC week `week`: starts[0] ≤ its start, starts[-1] ≥ its end (see _chunk)."""
        chunk = self._chunks.get(week)
        if chunk is None:
            if len(self._chunks) >= _MAX_CHUNKS:
                self._chunks.clear()
            chunk = self._chunks[week] = self._chunk(week)
        return chunk

    def band_at(self, t: float) -> tuple[int, int]:
        """(band index or -1, the instant the segment holding t ends)."""
        week = int(t // WEEK)
        chunk = self._chunks.get(week)
        if chunk is None:
            chunk = self.week_segments(week)
        starts, bands = chunk
        i = bisect.bisect_right(starts, t) - 1
        return bands[i], starts[i + 1]

    def band_name(self, index: int) -> str | None:
        return self.names[index] if index >= 0 else None

    def period(self, t: float, kind: str) -> tuple[str, int, int]:
        """(key, start, end) of the calendar period ("day", "week" from Monday, "month") holding t."""
        cached = self._periods.get(kind)
        if cached is not None and cached[0] <= t < cached[1]:
            return cached[2], cached[0], cached[1]
        local = datetime.fromtimestamp(t, self.tz).date()
        if kind == "day":
            first, following, key = local, local + timedelta(days=1), local.isoformat()
        elif kind == "week":
            first = local - timedelta(days=local.weekday())
            following = first + timedelta(days=7)
            year, number, _ = local.isocalendar()
            key = f"{year}-W{number:02d}"
        elif kind == "month":
            first = local.replace(day=1)
            following = (first + timedelta(days=32)).replace(day=1)
            key = f"{local.year}-{local.month:02d}"
        else:
            raise ValueError(f"unknown period {kind!r} (day, week, month)")
        start, stop = self._local_epoch(first, 0), self._local_epoch(following, 0)
        self._periods[kind] = (start, stop, key)
        return key, start, stop
