"""The rating engine: a versioned rate card compiled once into a per-request schedule lookup.

    rater = compile_card([card_v1, card_v2])          # once per card (set of versions)
    schedule, next_change_at = rater.schedule_for("full", 200, at=now, plmn="20801",
                                                  destination="tel:+33612345678", service_context="32260@3gpp.org")

`schedule_for` picks the version in force at `at` (bisect over effective-from), the plan × rating group's
rate, then the first tariff whose conditions hold: time band (the card's time zone, holidays), roaming zone
(serving MCC-MNC → zone, longest prefix), destination group (longest prefix over the card's destinations),
Service-Context-Id kind and Service-Identifier. It also says when the answer next changes — a band boundary
where this rate's tariff changes, the next version's effective-from, or the end of the period a cap or a
period scope counts over — so the caller can send Tariff-Time-Change and reserve at the dearer of the two
schedules (ratecards.pricing.dearer_charge / affordable_for_all). The tariff chosen for a combination of
keys is memoised, so after warm-up a request costs a few dict hits, one bisect over the week's band
boundaries, and one dict probe per distinct prefix length of the destination.

`quote` is the price enquiry (and the reference for how a usage crossing a change is rated): it splits time
usage at each change and prices the parts with ratecards.pricing. `check_new_version` is the rule for
loading a version; `describe_changes` says what a version changes. Pure: no I/O, time is passed in.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from ratecards.calendar import DAY_NAMES, WEEK, BandCalendar, BandSpec, band_intervals, parse_clock
from ratecards.compile import card_timezone, compile_tariffs, validate_ratecard
from ratecards.keys import PrefixTable, normalize_number, normalize_plmn, service_context_kind
from ratecards.model import RateCard, RateCardError, Tariff
from ratecards.pricing import charge_for_usage, increments_for_units
from ratecards.schedule import PERIODS, RatingSchedule

__all__ = [
    "DEFAULT_RELOAD_INTERVAL",
    "HORIZON",
    "Quote",
    "QuotePart",
    "Rater",
    "UnknownRate",
    "check_new_version",
    "compile_card",
    "describe_changes",
    "effective_epoch",
]

DEFAULT_RELOAD_INTERVAL = 60  # seconds: a new version must take effect at least this far ahead
HORIZON = 8 * 86_400  # how far schedule_for looks for the next band change (a week and a day)
_MEMO_LIMIT = 65_536  # rows kept per rate (combinations of zone, destination group, kind, id)


class UnknownRate(LookupError):
    """No rate for this plan × rating group in the version in force (or no version in force yet)."""


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def effective_epoch(card: RateCard) -> int | None:
    """The card's effective_from in epoch seconds (a local date-time is read in the card's time zone)."""
    when = card.effective_from
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=card_timezone(card))
    return int(when.timestamp())


def _epoch(at: datetime | float) -> float:
    if isinstance(at, datetime):
        if at.tzinfo is None:
            raise ValueError("`at` must be an aware datetime or epoch seconds")
        return at.timestamp()
    return at


class _Row:
    """What one combination of the non-time keys (zone, destination group, context kind, service id) selects
    in each time band, and, per UTC week, the instants where that selection changes (band boundaries
    between bands this row prices alike are merged away), so the next change is one bisect away."""

    __slots__ = ("by_class", "classes", "constant", "first", "weeks")

    def __init__(self, by_band: tuple[RatingSchedule, ...]) -> None:
        distinct: dict[int, int] = {}
        self.classes = tuple(distinct.setdefault(id(s), len(distinct)) for s in by_band)  # by band + 1
        self.by_class = tuple({id(s): s for s in by_band}.values())  # class → schedule (insertion order)
        self.constant = len(distinct) == 1
        self.first = by_band[0]
        self.weeks: dict[int, tuple[list[int], list[int]]] = {}

    def _week(self, week: int, calendar: BandCalendar) -> tuple[list[int], list[int]]:
        found = self.weeks.get(week)
        if found is None:
            starts, bands = calendar.week_segments(week)
            classes = self.classes
            merged_starts, merged = [starts[0]], [classes[bands[0] + 1]]
            for start, band in zip(starts[1:-1], bands[1:-1], strict=True):
                if classes[band + 1] != merged[-1]:
                    merged_starts.append(start)
                    merged.append(classes[band + 1])
            merged_starts.append(starts[-1])  # the boundary at or after the week's end, always kept
            merged.append(classes[bands[-1] + 1])
            if len(self.weeks) >= 16:
                self.weeks.clear()
            found = self.weeks[week] = (merged_starts, merged)
        return found

    def at(self, t: float, calendar: BandCalendar, limit: float) -> tuple[RatingSchedule, int | None]:
        """The schedule at t and the first instant before `limit` where the selection changes (else None)."""
        starts, classes = self._week(int(t // WEEK), calendar)
        i = bisect.bisect_right(starts, t) - 1
        current = classes[i]
        schedule = self.by_class[current]
        while True:
            boundary = starts[i + 1]
            if boundary >= limit:
                return schedule, None
            if classes[i + 1] != current:
                return schedule, boundary
            starts, classes = self._week(int(boundary // WEEK), calendar)  # same class across the week's end
            i = bisect.bisect_right(starts, boundary) - 1
            if classes[i] != current:
                return schedule, boundary


class _Rate:
    """One plan × rating group in one version: its own schedule, its tariffs as compiled conditions, and
    the memo of what each combination of keys selects (a _Row over the time bands)."""

    __slots__ = ("band_count", "base", "periodic", "rows", "simple", "uses_band", "uses_context",
                 "uses_destination", "uses_sid", "uses_zone", "variants")

    def __init__(self, base: RatingSchedule, variants: list[tuple[Tariff, RatingSchedule]],
                 band_index: dict[str, int]) -> None:
        self.base = base
        self.band_count = len(band_index)
        self.variants: list[tuple[Any, ...]] = []
        for tariff, schedule in variants:
            bands = _as_list(tariff.band)
            self.variants.append((
                frozenset(band_index[b] for b in bands) if bands is not None else None,
                frozenset(_as_list(tariff.zone)) if tariff.zone is not None else None,
                frozenset(_as_list(tariff.destination)) if tariff.destination is not None else None,
                frozenset(_as_list(tariff.context)) if tariff.context is not None else None,
                frozenset(_as_list(tariff.service_identifier)) if tariff.service_identifier is not None else None,
                schedule,
            ))
        self.uses_band = any(v[0] is not None for v in self.variants)
        self.uses_zone = any(v[1] is not None for v in self.variants)
        self.uses_destination = any(v[2] is not None for v in self.variants)
        self.uses_context = any(v[3] is not None for v in self.variants)
        self.uses_sid = any(v[4] is not None for v in self.variants)
        self.simple = not self.variants
        self.periodic = any(s.cap or s.scope in PERIODS for s in (base, *(v[5] for v in self.variants)))
        self.rows: dict[tuple, _Row] = {}

    def select(self, band: int, zone: str | None, destination: str | None, kind: str | None,
               sid: int | None) -> RatingSchedule:
        """The first tariff whose conditions hold, else the rate's own schedule (a scan: rows memoise it)."""
        for bands, zones, destinations, kinds, sids, schedule in self.variants:
            if ((bands is None or band in bands) and (zones is None or zone in zones)
                    and (destinations is None or destination in destinations)
                    and (kinds is None or kind in kinds) and (sids is None or sid in sids)):
                return schedule
        return self.base

    def row(self, zone: str | None, destination: str | None, kind: str | None, sid: int | None) -> _Row:
        key = (zone, destination, kind, sid)
        found = self.rows.get(key)
        if found is None:
            bands = range(-1, self.band_count) if self.uses_band else (-1,)
            found = _Row(tuple(self.select(band, zone, destination, kind, sid) for band in bands))
            if len(self.rows) >= _MEMO_LIMIT:
                self.rows.clear()
            self.rows[key] = found
        return found


class _Version:
    """One compiled version: calendar, zone and destination tables, numbering, rates by plan × group."""

    def __init__(self, card: RateCard) -> None:
        self.card = card
        self.start = effective_epoch(card)
        tz = card_timezone(card)
        self.tz: ZoneInfo = tz
        specs = []
        for band in card.bands:
            days = frozenset(d for name in band.days for d in DAY_NAMES[name.lower()])
            specs.append(BandSpec(band.name, days, band_intervals(parse_clock(band.start), parse_clock(band.end))))
        self.calendar = BandCalendar(tz, specs, card.holidays)
        band_index = {spec.name: index for index, spec in enumerate(specs)}
        self.zones = PrefixTable({p: zone for zone, prefixes in card.zones.items() for p in prefixes})
        self.destinations = PrefixTable({p: group for group, prefixes in card.destinations.items() for p in prefixes})
        self.numbering = (card.country_code, card.national_prefix, card.international_prefix)
        self._kinds: dict[str, str | None] = {}
        self.rates: dict[tuple[str, int], _Rate] = {}
        for plan in card.plans:
            for group, (base, variants) in compile_tariffs(card, plan).items():
                self.rates[(plan, group)] = _Rate(base, variants, band_index)

    def zone_of(self, plmn: str | bytes | None) -> str | None:
        if plmn is None:
            return None
        if not (isinstance(plmn, str) and plmn.isdigit()):
            plmn = normalize_plmn(plmn)
            if plmn is None:
                return None
        return self.zones.longest_match(plmn)

    def destination_of(self, address: str) -> str | None:
        digits = normalize_number(address, *self.numbering)
        return self.destinations.longest_match(digits) if digits is not None else None

    def kind_of(self, context: str) -> str | None:
        kinds = self._kinds
        if context in kinds:
            return kinds[context]
        kind = service_context_kind(context, self.card.service_contexts)
        if len(kinds) < 1024:
            kinds[context] = kind
        return kind


class QuotePart(msgspec.Struct):
    """A part of an enquired usage priced with one schedule (a usage crossing a change has several)."""

    start: int  # epoch seconds at which the part begins
    units: int
    increments: int  # increments of the scope after this part
    amount: int  # micro-units
    version: str
    tariff: str  # "" = the rate's own price


class Quote(msgspec.Struct):
    plan: str
    rating_group: int
    unit: str
    units: int
    amount: int  # micro-units, whole minor units
    currency: str
    minor_digits: int
    parts: list[QuotePart]
    next_change_at: int | None  # after the start of the usage


class Rater:
    """A compiled, versioned rate card: per-request schedule selection and price enquiries."""

    def __init__(self, versions: Sequence[_Version]) -> None:
        self._versions = list(versions)
        self._starts = [v.start for v in self._versions[1:]]
        self._first_start = self._versions[0].start
        self._single = self._versions[0] if len(self._versions) == 1 else None
        first = self._versions[0].card
        self.currency = first.currency
        self.minor_digits = first.currency_minor_digits

    # ---- versions ----

    @property
    def cards(self) -> list[RateCard]:
        """The versions, oldest first."""
        return [v.card for v in self._versions]

    def _version_at(self, t: float) -> tuple[_Version, int | None]:
        index = bisect.bisect_right(self._starts, t)
        if index == 0 and self._first_start is not None and t < self._first_start:
            raise UnknownRate(f"no rate card version is in force at {_iso(t)} (the first takes effect "
                              f"{_iso(self._first_start)})")
        return self._versions[index], self._starts[index] if index < len(self._starts) else None

    def version_at(self, at: datetime | float) -> RateCard:
        """The version in force at `at`."""
        return self._version_at(_epoch(at))[0].card

    # ---- the per-request lookup ----

    def schedule_for(self, plan: str, rating_group: int, *, at: datetime | float, zone: str | None = None,
                     plmn: str | bytes | None = None, destination: str | None = None,
                     service_context: str | None = None, service_identifier: int | None = None,
                     ) -> tuple[RatingSchedule, int | None]:
        """The schedule that rates usage of `plan` × `rating_group` at `at`, and the next instant (epoch
        seconds) the applicable schedule or its counting period changes, None if not within HORIZON.

        zone: a roaming zone name when the caller knows it; else `plmn` (3GPP-SGSN-MCC-MNC or the MCC-MNC of
        3GPP-User-Location-Info, see ratecards.keys) is looked up in the version's zone table. destination:
        Called-Party-Address / Recipient-Address as received. service_context: the Service-Context-Id (or a
        kind: data | voice | sms | content). Raises UnknownRate when the plan has no such rating group.
        """
        t = at if at.__class__ is float or at.__class__ is int else _epoch(at)
        version = self._single
        if version is None or (version.start is not None and t < version.start):
            version, change = self._version_at(t)
        else:
            change = None
        rate = version.rates.get((plan, rating_group))
        if rate is None:
            raise UnknownRate(f"plan {plan!r} has no rate for rating group {rating_group} in rate card "
                              f"version {version.card.version!r}")
        if rate.simple:
            schedule = rate.base
        else:
            if rate.uses_zone:
                if zone is None:
                    zone = version.zone_of(plmn)
            else:
                zone = None
            group = version.destination_of(destination) if rate.uses_destination and destination else None
            kind = version.kind_of(service_context) if rate.uses_context and service_context else None
            sid = service_identifier if rate.uses_sid else None
            row = rate.rows.get((zone, group, kind, sid)) or rate.row(zone, group, kind, sid)
            if row.constant:
                schedule = row.first
            else:
                limit = t + HORIZON if change is None or change > t + HORIZON else change
                schedule, band_change = row.at(t, version.calendar, limit)
                if band_change is not None:
                    change = band_change
        if rate.periodic:
            for kind_of_period in (schedule.scope, schedule.cap_period if schedule.cap else ""):
                if kind_of_period in PERIODS:
                    period_end = version.calendar.period(t, kind_of_period)[2]
                    if change is None or period_end < change:
                        change = period_end
        return schedule, change

    def period_key(self, at: datetime | float, period: str) -> str:
        """The key of the calendar period ("day", "week", "month") holding `at` in the card's time zone,
        e.g. "2027-01-15", "2027-W02", "2027-01": what the charge script's per-period counters are named by."""
        t = _epoch(at)
        return self._version_at(t)[0].calendar.period(t, period)[0]

    def band_at(self, at: datetime | float) -> str | None:
        """The name of the time band in force at `at` (None: no band)."""
        t = _epoch(at)
        version = self._version_at(t)[0]
        return version.calendar.band_name(version.calendar.band_at(t)[0])

    def zone_of(self, plmn: str | bytes | None, *, at: datetime | float) -> str | None:
        """The roaming zone of a serving network (MCC-MNC) in the version in force at `at`."""
        return self._version_at(_epoch(at))[0].zone_of(plmn)

    def destination_of(self, address: str, *, at: datetime | float) -> str | None:
        """The destination group of a called number in the version in force at `at`."""
        return self._version_at(_epoch(at))[0].destination_of(address)

    # ---- what online charging reads once per (re)load ----

    def keys_used(self, plan: str) -> frozenset[str]:
        """The request keys any version's tariffs of `plan` select by ("zone", "destination", "context",
        "service_identifier"): the others need not be read from a request (nor memoised apart)."""
        used: set[str] = set()
        for version in self._versions:
            for (name, _group), rate in version.rates.items():
                if name == plan:
                    used.update(key for key, flag in (("zone", rate.uses_zone), ("destination", rate.uses_destination),
                                                      ("context", rate.uses_context),
                                                      ("service_identifier", rate.uses_sid)) if flag)
        return frozenset(used)

    def schedules(self) -> list[tuple[str, int, RatingSchedule]]:
        """Every schedule of every version (each rate's own and its tariffs'), as (plan, rating group, schedule)."""
        found = []
        for version in self._versions:
            for (plan, group), rate in version.rates.items():
                found.append((plan, group, rate.base))
                found.extend((plan, group, variant[-1]) for variant in rate.variants)
        return found

    def default_rating_groups(self) -> dict[str, int]:
        """Plan → the rating group of command-level units (the newest version's default_rating_group, else
        its lowest rating group)."""
        defaults: dict[str, int] = {}
        for version in self._versions:
            for name, plan in version.card.plans.items():
                groups = [group for (plan_name, group) in version.rates if plan_name == name]
                if plan.default_rating_group is not None:
                    defaults[name] = plan.default_rating_group
                elif groups:
                    defaults[name] = min(groups)
        return defaults

    # ---- price enquiry ----

    def quote(self, plan: str, rating_group: int, units: int, *, at: datetime | float,
              duration: int | None = None, used_before: int = 0, spent_before: int = 0,
              **keys: Any) -> Quote:
        """Price `units` of usage starting at `at`, exactly as online charging rates it.

        A usage in seconds lasts `units` seconds (else `duration`, spread evenly); it is split at every
        change schedule_for announces and each part is priced with its schedule (charge_for_usage):
        parts of a "report" scope are separate reports, a "session" scope counts on across them, a period
        scope or cap restarts its count in a new period. `keys` are schedule_for's (zone, plmn, ...).
        """
        if units < 0:
            raise ValueError("units must not be negative")
        start = int(_epoch(at))
        schedule, first_change = self.schedule_for(plan, rating_group, at=start, **keys)
        span = units if schedule.unit == "seconds" and duration is None else (duration or 0)
        parts: list[QuotePart] = []
        t, done, used, spent = start, 0, used_before, spent_before
        periods: dict[str, str] = {}
        change = first_change
        while True:
            if parts:
                schedule, change = self.schedule_for(plan, rating_group, at=t, **keys)
            upto = units * (change - start) // span if span and change is not None and change < start + span \
                else units
            part = upto - done
            if schedule.scope == "report":
                used = 0
            elif schedule.scope in PERIODS:
                key = self.period_key(t, schedule.scope)
                if periods.setdefault("scope", key) != key:
                    periods["scope"], used = key, 0
            if schedule.cap:
                key = self.period_key(t, schedule.cap_period)
                if periods.setdefault("cap", key) != key:
                    periods["cap"], spent = key, 0
            amount = charge_for_usage(schedule, part, used_before=used, spent_before=spent)
            used += part
            if schedule.cap:
                spent += amount
            parts.append(QuotePart(start=t, units=part, increments=increments_for_units(
                schedule, used - schedule.free_units), amount=amount, version=schedule.version,
                tariff=schedule.tariff))
            done = upto
            if done >= units or change is None or not span:
                break
            t = change
        return Quote(plan=plan, rating_group=rating_group, unit=schedule.unit, units=units,
                     amount=sum(p.amount for p in parts), currency=self.currency, minor_digits=self.minor_digits,
                     parts=parts, next_change_at=first_change)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _source(card: RateCard) -> str:
    return f"rate card {card.version!r}"


def compile_card(cards: RateCard | Sequence[RateCard]) -> Rater:
    """Compile one card or a set of versions (any order) into a Rater; RateCardError when the set is not
    consistent: unique versions and effective-from instants, at most one version without effective_from
    (then the oldest), one currency."""
    versions = [cards] if isinstance(cards, RateCard) else list(cards)
    if not versions:
        raise RateCardError("a rate card needs at least one version")
    for card in versions:
        validate_ratecard(card, source=_source(card))
    seen: dict[str, RateCard] = {}
    for card in versions:
        if card.version in seen:
            raise RateCardError(f"version {card.version!r} appears twice", source=_source(card), field="version")
        seen[card.version] = card
    compiled = sorted((_Version(card) for card in versions),
                      key=lambda v: (v.start is not None, v.start or 0))
    for earlier, later in zip(compiled, compiled[1:], strict=False):
        if later.start is None:
            raise RateCardError(f"versions {earlier.card.version!r} and {later.card.version!r} both have no "
                                "effective_from: only the oldest may leave it out", source=_source(later.card),
                                field="effective_from")
        if earlier.start == later.start:
            raise RateCardError(f"takes effect at the same instant as version {earlier.card.version!r}",
                                source=_source(later.card), field="effective_from")
    first = compiled[0].card
    for version in compiled[1:]:
        card = version.card
        if (card.currency, card.currency_minor_digits) != (first.currency, first.currency_minor_digits):
            raise RateCardError(f"currency {card.currency} ({card.currency_minor_digits} digits) differs from "
                                f"version {first.version!r}'s {first.currency} ({first.currency_minor_digits}): "
                                "a card has one currency", source=_source(card), field="currency")
    return Rater(compiled)


def check_new_version(existing: Sequence[RateCard], new: RateCard, *, now: float,
                      reload_interval: float = DEFAULT_RELOAD_INTERVAL) -> None:
    """Raise RateCardError unless `new` may be added to the versions in `existing` at `now`: a new version
    takes effect at least one reload interval from now (so every OCS process has loaded it in time), never
    rewrites an existing version, and keeps the card's currency. An existing version with the same content
    is not an error (loading is idempotent): the caller compares and does nothing."""
    source = _source(new)
    validate_ratecard(new, source=source)
    for card in existing:
        if card.version == new.version and card != new:
            raise RateCardError(f"version {new.version!r} is already loaded with other content: give the "
                                "changed card a new version", source=source, field="version")
    if any(card.version == new.version for card in existing):
        return
    start = effective_epoch(new)
    if existing and start is None:
        raise RateCardError("a new version needs effective_from (when it takes effect), at least "
                            f"{reload_interval:g} s from now", source=source, field="effective_from")
    if existing and start is not None and start < now + reload_interval:
        raise RateCardError(f"takes effect at {_iso(start)}, less than one reload interval ({reload_interval:g} s) "
                            f"after now ({_iso(now)}): every OCS process must have a version before it takes effect",
                            source=source, field="effective_from")
    compile_card([*existing, new])


# ---- what a version changes -------------------------------------------------------------------------------


def _rate_summary(rate: Any) -> dict[str, Any]:
    return {k: v for k, v in msgspec.to_builtins(rate).items() if k not in ("rating_group",)}


def _prefix_changes(name: str, old: dict[str, list[str]], new: dict[str, list[str]]) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = set(old.get(key, ())), set(new.get(key, ()))
        if key not in old:
            lines.append(f"{name} {key!r} added ({len(after)} prefixes)")
        elif key not in new:
            lines.append(f"{name} {key!r} removed")
        elif before != after:
            lines.append(f"{name} {key!r}: +{len(after - before)} / -{len(before - after)} prefixes")
    return lines


def describe_changes(old: RateCard | None, new: RateCard) -> list[str]:
    """What `new` changes compared with `old` (the version it follows), one line per change."""
    if old is None:
        return [f"first version {new.version!r}: {len(new.plans)} plan(s)"]
    lines: list[str] = []
    for key in ("currency", "currency_minor_digits", "rounding", "rounding_step", "timezone", "country_code",
                "national_prefix", "international_prefix"):
        if getattr(old, key) != getattr(new, key):
            lines.append(f"{key}: {getattr(old, key)!r} → {getattr(new, key)!r}")
    if old.holidays != new.holidays:
        lines.append(f"holidays: {len(old.holidays)} → {len(new.holidays)} dates")
    old_bands = {b.name: b for b in old.bands}
    new_bands = {b.name: b for b in new.bands}
    for name in sorted(set(old_bands) | set(new_bands)):
        if name not in old_bands:
            lines.append(f"band {name!r} added")
        elif name not in new_bands:
            lines.append(f"band {name!r} removed")
        elif old_bands[name] != new_bands[name]:
            b = new_bands[name]
            lines.append(f"band {name!r} now {','.join(b.days)} {b.start}-{b.end}")
    lines += _prefix_changes("zone", old.zones, new.zones)
    lines += _prefix_changes("destination group", old.destinations, new.destinations)
    if old.service_contexts != new.service_contexts:
        lines.append("service_contexts changed")
    for plan in sorted(set(old.plans) | set(new.plans)):
        if plan not in old.plans:
            lines.append(f"plan {plan!r} added ({len(new.plans[plan].rates)} rates)")
            continue
        if plan not in new.plans:
            lines.append(f"plan {plan!r} removed")
            continue
        before, after = old.plans[plan], new.plans[plan]
        old_rates = {r.rating_group: r for r in before.rates}
        new_rates = {r.rating_group: r for r in after.rates}
        for group in sorted(set(old_rates) | set(new_rates)):
            if group not in old_rates:
                lines.append(f"plan {plan!r}: rating group {group} ({new_rates[group].service}) added")
            elif group not in new_rates:
                lines.append(f"plan {plan!r}: rating group {group} removed")
            else:
                a, b = _rate_summary(old_rates[group]), _rate_summary(new_rates[group])
                changed = [f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
                           if a.get(k) != b.get(k) and k != "tariffs"]
                if a.get("tariffs") != b.get("tariffs"):
                    changed.append(f"tariffs: {len(a.get('tariffs') or [])} → {len(b.get('tariffs') or [])} "
                                   "(changed)")
                if changed:
                    lines.append(f"plan {plan!r}: rating group {group} ({new_rates[group].service}): "
                                 + "; ".join(changed))
        if before.allowances != after.allowances:
            lines.append(f"plan {plan!r}: allowances changed")
        if before.default_rating_group != after.default_rating_group:
            lines.append(f"plan {plan!r}: default_rating_group {before.default_rating_group} → "
                         f"{after.default_rating_group}")
    return lines or ["no change in prices or rating keys"]
