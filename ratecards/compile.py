"""Parse, validate and compile rate cards into integer `RatingSchedule`s.

Theory of operation: TOML text → `tomllib` (syntax errors keep their line) → msgspec, plan by plan (type
errors name the plan and key) → semantic checks (units, rounding, quotas, allowances, the 2^53 bound, quota
control: grants per unit type, Validity-Time, thresholds, holding time, triggers, Final-Unit-Indication;
the rating keys: time zone, holidays, bands, zones, destinations; the extended pricing and every tariff) →
`compile_plan`, which prices one increment as an exact reduced fraction of micro-units, and
`compile_tariffs`, which also compiles each tariff of a rate into its own schedule (ratecards.rater turns
those into the per-request lookup). Every check runs when a card is parsed, so a card that loads can always
be compiled. A semantic error names its key and, when the key can be found in the text, its line (nested
arrays of tables such as [[plans.x.rates.tariffs]] included). Reading a file in `load_ratecard` is the only
I/O (zoneinfo reads the system's time-zone data).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from os import PathLike
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from ratecards.calendar import DAY_NAMES, parse_clock
from ratecards.keys import SERVICE_KINDS
from ratecards.model import (
    FINAL_UNIT_ACTIONS,
    REDIRECT_ADDRESS_TYPES,
    ROUNDING_MODES,
    TRIGGER_TYPES,
    UNIT_KINDS,
    FairUsage,
    Plan,
    Rate,
    RateCard,
    RateCardError,
    Tariff,
)
from ratecards.schedule import (
    PERIODS,
    PRICED_UNIT_TYPE,
    REDIRECT,
    RESTRICT_ACCESS,
    ROUNDING_STEPS,
    SCOPES,
    TERMINATE,
    UNIT_TYPES,
    RatingSchedule,
)

__all__ = [
    "EXACT_LIMIT",
    "MICRO",
    "TARIFF_PRICE_KEYS",
    "compile_plan",
    "compile_ratecard",
    "compile_tariffs",
    "initial_allowances",
    "load_ratecard",
    "parse_ratecard",
    "validate_ratecard",
]

MICRO = 10**6  # micro-units per currency unit
EXACT_LIMIT = 2**53  # the charge script computes in Lua doubles: every product must stay below this
MONEY_BUCKET = "money"
MONEY_LIMIT = 10**15  # micro-units (10^9 currency units): fees, minimum charges and caps stay far below 2^53
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # plan and bucket ids end up in Redis keys, fields and index values
_MAX_UNSIGNED32 = 2**32 - 1  # CC-Time is Unsigned32

Path_ = tuple[str | int, ...]


class _Invalid(Exception):
    """A semantic error at `path`, turned into a RateCardError (with a line when found) by the caller."""

    def __init__(self, path: Path_, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# --- parsing ---------------------------------------------------------------------------------------


def parse_ratecard(text: str, *, source: str = "<string>") -> RateCard:
    """Parse and fully validate a rate card; raise RateCardError naming source, line and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        raise RateCardError(f"TOML syntax error: {exc}", source=source,
                            line=int(found.group(1)) if found else None) from None
    try:
        card = _decode(data)
        _check_card(card)
    except _Invalid as exc:
        raise RateCardError(exc.message, source=source, line=_locate(text, exc.path),
                            field=_render(exc.path)) from None
    return card


def load_ratecard(path: str | PathLike[str]) -> RateCard:
    """Read and parse a rate card file; the file's path is the source named in errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RateCardError(f"cannot read rate card: {exc}", source=str(path)) from None
    return parse_ratecard(text, source=str(path))


def validate_ratecard(card: RateCard, *, source: str = "<card>") -> None:
    """Check a RateCard built in code (parse_ratecard already does this for text)."""
    try:
        _check_card(card)
    except _Invalid as exc:
        raise RateCardError(exc.message, source=source, field=_render(exc.path)) from None


def _decode(data: dict[str, Any]) -> RateCard:
    """msgspec conversion, plan by plan so that errors name the plan (msgspec elides dict keys)."""
    plans = data.get("plans")
    if isinstance(plans, dict):
        for name, plan in plans.items():
            try:
                msgspec.convert(plan, Plan)
            except msgspec.ValidationError as exc:
                raise _msgspec_error(exc, ("plans", name)) from None
    try:
        return msgspec.convert(data, RateCard)
    except msgspec.ValidationError as exc:
        raise _msgspec_error(exc, ()) from None


def _msgspec_error(exc: msgspec.ValidationError, prefix: Path_) -> _Invalid:
    """Turn "Expected `int`, got `str` - at `$.rates[0].per`" into a path and a reason."""
    message, _, where = str(exc).partition(" - at `")
    path: list[str | int] = list(prefix)
    for name, index in re.findall(r"\.([A-Za-z0-9_]+)|\[(\d+)\]", where.rstrip("`")):
        path.append(name if name else int(index))
    named = re.match(r"Object (missing required|contains unknown) field `([^`]+)`", message)
    if named:
        path.append(named.group(2))
        message = "missing required key" if named.group(1) == "missing required" else "unknown key"
    else:
        message = message[0].lower() + message[1:]
        message = message.replace(" | null", "")  # optional keys: TOML has no null, the key is just left out
        if path and path[-1] == "price" and ("got `float`" in message or "got `int`" in message):
            message += ' (write prices as strings, e.g. price = "0.01", so they stay exact)'
    return _Invalid(tuple(path), message)


# --- semantic checks --------------------------------------------------------------------------------


def _check_card(card: RateCard) -> None:
    if not card.version.strip():
        raise _Invalid(("version",), "must not be empty")
    if not re.fullmatch(r"[A-Z]{3}", card.currency):
        raise _Invalid(("currency",), f"must be an ISO 4217 code such as EUR, got {card.currency!r}")
    if not 0 <= card.currency_minor_digits <= 6:
        raise _Invalid(("currency_minor_digits",), f"must be 0..6, got {card.currency_minor_digits}")
    if card.rounding not in ROUNDING_MODES:
        raise _Invalid(("rounding",), f"must be one of {', '.join(ROUNDING_MODES)}, got {card.rounding!r}")
    if card.rounding_step not in ROUNDING_STEPS:
        raise _Invalid(("rounding_step",),
                       f"must be one of {', '.join(ROUNDING_STEPS)}, got {card.rounding_step!r}")
    _check_rating_keys(card)
    if not card.plans:
        raise _Invalid(("plans",), "a rate card needs at least one plan")
    for name in card.plans:
        _compile_checked(card, name, tariffs=True)


def card_timezone(card: RateCard) -> ZoneInfo:
    """The card's time zone (checked at parse time, so this only fails for a card built in code)."""
    try:
        return ZoneInfo(card.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise RateCardError(f"unknown time zone {card.timezone!r}", source=_card_source(card),
                            field="timezone") from None


def _check_rating_keys(card: RateCard) -> None:
    """Time zone, effective-from, holidays, bands, zones, destinations, numbering, service contexts."""
    try:
        ZoneInfo(card.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Invalid(("timezone",), f"{card.timezone!r} is not an IANA time zone such as \"Europe/Berlin\"") \
            from None
    if card.effective_from is not None and card.effective_from.year < 1970:
        raise _Invalid(("effective_from",), "must not lie before 1970")
    names: set[str] = set()
    for index, band in enumerate(card.bands):
        at: Path_ = ("bands", index)
        if not _NAME.match(band.name):
            raise _Invalid((*at, "name"), "band names may use only letters, digits, '_', '-' and '.'")
        if band.name in names:
            raise _Invalid((*at, "name"), f"band {band.name!r} is defined twice")
        names.add(band.name)
        if not band.days:
            raise _Invalid((*at, "days"), "name at least one day")
        for position, day in enumerate(band.days):
            if day.lower() not in DAY_NAMES:
                raise _Invalid((*at, "days", position), f"{day!r} is not a day: one of {', '.join(DAY_NAMES)}")
        clock = {}
        for key, value in (("from", band.start), ("to", band.end)):
            try:
                clock[key] = parse_clock(value)
            except ValueError as exc:
                raise _Invalid((*at, key), str(exc)) from None
        if clock["from"] == 86_400:
            raise _Invalid((*at, "from"), 'must be before 24:00 (write "00:00")')
        if clock["from"] == clock["to"]:
            raise _Invalid((*at, "to"), 'from and to are the same time: for the whole day write '
                           'from = "00:00", to = "24:00"')
    _check_prefixes(card.zones, "zones", 6, "serving-network (MCC or MCC-MNC)")
    _check_prefixes(card.destinations, "destinations", 15, "number")
    for key, value in (("country_code", card.country_code), ("national_prefix", card.national_prefix),
                       ("international_prefix", card.international_prefix)):
        if value and not (value.isdigit() and value.isascii() and len(value) <= 4):
            raise _Invalid((key,), f"must be up to 4 digits, got {value!r}")
    for context, kind in card.service_contexts.items():
        if kind not in SERVICE_KINDS:
            raise _Invalid(("service_contexts", context), f"must be one of {', '.join(SERVICE_KINDS)}, got {kind!r}")


def _check_prefixes(table: dict[str, list[str]], key: str, longest: int, what: str) -> None:
    owner: dict[str, str] = {}
    for name, prefixes in table.items():
        if not _NAME.match(name):
            raise _Invalid((key, name), "names may use only letters, digits, '_', '-' and '.'")
        for index, prefix in enumerate(prefixes):
            if prefix and not (prefix.isdigit() and prefix.isascii() and len(prefix) <= longest):
                raise _Invalid((key, name, index), f"{prefix!r} is not a {what} prefix (up to {longest} digits, "
                               "\"\" for any)")
            other = owner.setdefault(prefix, name)
            if other != name:
                raise _Invalid((key, name, index), f"prefix {prefix!r} is also in {other!r}: a prefix belongs to "
                               "one entry")


def _check_plan(name: str, plan: Plan) -> dict[int, tuple[int, Rate]]:
    """Check the plan's own structure; return its rates by rating group (with their index)."""
    at: Path_ = ("plans", name)
    if not _NAME.match(name):
        raise _Invalid(at, "plan names may use only letters, digits, '_', '-' and '.'")
    if not plan.rates:
        raise _Invalid((*at, "rates"), "a plan needs at least one rate")
    by_group: dict[int, tuple[int, Rate]] = {}
    for index, rate in enumerate(plan.rates):
        if not 0 <= rate.rating_group <= _MAX_UNSIGNED32:
            raise _Invalid((*at, "rates", index, "rating_group"), "must be an Unsigned32")
        if rate.rating_group in by_group:
            raise _Invalid((*at, "rates", index, "rating_group"),
                           f"rating group {rate.rating_group} is rated twice in this plan")
        by_group[rate.rating_group] = (index, rate)
    if plan.default_rating_group is not None and plan.default_rating_group not in by_group:
        raise _Invalid((*at, "default_rating_group"),
                       f"rating group {plan.default_rating_group} has no rate in this plan")
    buckets: set[str] = set()
    for index, allowance in enumerate(plan.allowances):
        where = (*at, "allowances", index)
        if not _NAME.match(allowance.bucket) or allowance.bucket == MONEY_BUCKET:
            raise _Invalid((*where, "bucket"), f"{allowance.bucket!r} is not a usable bucket id "
                           f"(letters, digits, '_', '-', '.'; not {MONEY_BUCKET!r})")
        if allowance.bucket in buckets:
            raise _Invalid((*where, "bucket"), f"bucket {allowance.bucket!r} is granted twice")
        buckets.add(allowance.bucket)
        if allowance.unit not in UNIT_KINDS:
            raise _Invalid((*where, "unit"),
                           f"must be one of {', '.join(UNIT_KINDS)}, got {allowance.unit!r}")
        if not 0 <= allowance.amount < EXACT_LIMIT:
            raise _Invalid((*where, "amount"), f"must be 0 ≤ amount < 2^53, got {allowance.amount}")
        if not allowance.rating_groups:
            raise _Invalid((*where, "rating_groups"), "name at least one rating group")
        for group in allowance.rating_groups:
            if group not in by_group:
                raise _Invalid((*where, "rating_groups"), f"rating group {group} has no rate in this plan")
            if not by_group[group][1].credit_control:
                raise _Invalid((*where, "rating_groups"), f"rating group {group} is outside credit control "
                               "(credit_control = false): there is nothing to pay for")
            if by_group[group][1].unit != allowance.unit:
                raise _Invalid((*where, "unit"), f"{allowance.unit} allowance cannot pay for rating group "
                               f"{group}, which is rated in {by_group[group][1].unit}")
    return by_group


def _price_per_increment(rate: Rate, at: Path_) -> Fraction:
    """price × 10^6 × increment / per micro-units, exact (Decimal → Fraction, no float)."""
    assert rate.price is not None and rate.per is not None and rate.increment is not None
    try:
        price = Decimal(rate.price.strip())
    except InvalidOperation:
        raise _Invalid((*at, "price"), f"{rate.price!r} is not a decimal number") from None
    if not price.is_finite() or price < 0:
        raise _Invalid((*at, "price"), f"must be a finite, non-negative amount, got {rate.price!r}")
    for key in ("per", "increment", "default_quota", "max_quota"):
        if getattr(rate, key) <= 0:
            raise _Invalid((*at, key), f"must be positive, got {getattr(rate, key)}")
    return Fraction(price) * MICRO * rate.increment / rate.per


# keys that mean nothing for a rating group outside credit control, with their defaults
_QUOTA_KEYS = {
    "also_grant": {}, "validity_time": 0, "final_validity_time": None, "time_quota_threshold": 0,
    "volume_quota_threshold": 0, "unit_quota_threshold": 0, "quota_holding_time": None, "triggers": None,
    "final_unit_action": "TERMINATE", "redirect_address": None, "filter_id": None,
    "restriction_filter_rule": None,
}
# extended pricing keys of a rate, with their defaults (meaningless outside credit control)
_PRICING_DEFAULTS = {
    "first_increment": None, "setup_fee": None, "minimum_charge": None, "free_units": 0, "tiers": [],
    "cap": None, "scope": "report", "tariffs": [], "requires_bundle": False, "fair_usage": None,
}
# keys a tariff may override (everything that decides the price, and barred)
TARIFF_PRICE_KEYS = ("price", "per", "increment", "first_increment", "setup_fee", "minimum_charge", "free_units",
                     "tiers", "cap", "barred")
_UNSIGNED32_KEYS = ("validity_time", "final_validity_time", "time_quota_threshold", "volume_quota_threshold",
                    "unit_quota_threshold", "quota_holding_time")
# threshold key → the unit types it watches, and what to call them in an error
_THRESHOLDS = (
    ("time_quota_threshold", ("time",), "time"),
    ("volume_quota_threshold", ("total", "input", "output"), "volume (octets)"),
    ("unit_quota_threshold", ("units",), "service-specific unit"),
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
_SIP_URI = re.compile(r"^sips?:\S+$")
_IP_FILTER_RULE = re.compile(r"^(permit|deny)\s+(in|out)\s+\S+\s+from\s+\S.*\s+to\s+\S.*$")


def _strings(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _free_schedule(card: RateCard, rate: Rate, at: Path_) -> RatingSchedule:
    """A rating group outside credit control: answered 4011, usage recorded at amount 0."""
    if rate.barred:
        raise _Invalid((*at, "barred"), "a rating group outside credit control (credit_control = false) "
                       "cannot also be barred")
    for key, default in _QUOTA_KEYS.items():
        if getattr(rate, key) != default:
            raise _Invalid((*at, key), "has no effect with credit_control = false (no quota is granted)")
    for key, default in _PRICING_DEFAULTS.items():
        if getattr(rate, key) != default:
            raise _Invalid((*at, key), "has no effect with credit_control = false (nothing is charged)")
    return RatingSchedule(
        rating_group=rate.rating_group, unit=rate.unit, increment=1, price_num=0, price_den=1, default_quota=0,
        max_quota=0, minor=10 ** (6 - card.currency_minor_digits), rounding=card.rounding,
        money_bucket=MONEY_BUCKET, currency=card.currency, version=card.version, credit_control=False,
    )


def _also_grant(rate: Rate, at: Path_) -> tuple[tuple[str, int, int], ...]:
    priced = PRICED_UNIT_TYPE[rate.unit]
    grants = []
    for name, limit in rate.also_grant.items():
        where = (*at, "also_grant", name)
        if name not in UNIT_TYPES:
            raise _Invalid(where, f"unknown unit type {name!r}: one of {', '.join(UNIT_TYPES)}")
        if name == priced:
            raise _Invalid(where, f"{name} is the priced unit of this {rate.unit} rate: "
                           "set default_quota and max_quota instead")
        bound = _MAX_UNSIGNED32 if name == "time" else EXACT_LIMIT - 1
        for key in ("default", "max"):
            value = getattr(limit, key)
            if not 0 < value <= bound:
                raise _Invalid((*where, key), f"must be 1..{bound}, got {value}")
        if limit.default > limit.max:
            raise _Invalid((*where, "default"), f"default {limit.default} exceeds max {limit.max}")
        grants.append((name, limit.default, limit.max))
    return tuple(sorted(grants, key=lambda g: UNIT_TYPES.index(g[0])))


def _quota_control(rate: Rate, at: Path_, also: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    """The quota-control fields of a schedule: Validity-Time, thresholds, holding time, triggers, FUI."""
    for key in _UNSIGNED32_KEYS:
        value = getattr(rate, key)
        if value is not None and not 0 <= value <= _MAX_UNSIGNED32:
            raise _Invalid((*at, key), f"must be 0..{_MAX_UNSIGNED32} (an Unsigned32), got {value}")
    defaults = {PRICED_UNIT_TYPE[rate.unit]: rate.default_quota, **{name: d for name, d, _ in also}}
    for key, types, what in _THRESHOLDS:
        value = getattr(rate, key)
        if not value:
            continue
        watched = [defaults[t] for t in types if t in defaults]
        if not watched:
            raise _Invalid((*at, key), f"needs a {what} grant: a rate in that unit or also_grant."
                           f"{'/'.join(types)}")
        if value >= min(watched):
            raise _Invalid((*at, key), f"{value} is not below the default {what} grant {min(watched)}: "
                           "the gateway would ask again at once")
    triggers: tuple[int, ...] | None = None
    if rate.triggers is not None:
        known = set(TRIGGER_TYPES.values())
        values = []
        for index, trigger in enumerate(rate.triggers):
            value = TRIGGER_TYPES.get(trigger.upper()) if isinstance(trigger, str) else trigger
            if value is None or value not in known:
                raise _Invalid((*at, "triggers", index), f"{trigger!r} is not a Trigger-Type (TS 32.299 "
                               "AVP 870): a number such as 2 or a name such as \"CHANGE_IN_QOS\"")
            values.append(value)
        triggers = tuple(values)
    fields: dict[str, Any] = dict(
        validity_time=rate.validity_time, time_quota_threshold=rate.time_quota_threshold,
        volume_quota_threshold=rate.volume_quota_threshold, unit_quota_threshold=rate.unit_quota_threshold,
        quota_holding_time=rate.quota_holding_time, triggers=triggers,
    )
    if rate.fair_usage is not None:
        fields.update(_fair_usage(rate.fair_usage, (*at, "fair_usage")))
    if rate.final_unit_action not in FINAL_UNIT_ACTIONS:
        raise _Invalid((*at, "final_unit_action"),
                       f"must be one of {', '.join(FINAL_UNIT_ACTIONS)}, got {rate.final_unit_action!r}")
    action = FINAL_UNIT_ACTIONS[rate.final_unit_action]
    fields["final_unit_action"] = action
    if action == REDIRECT:
        fields.update(_redirect(rate, at))
    elif rate.redirect_address is not None:
        raise _Invalid((*at, "redirect_address"), 'is only used with final_unit_action = "REDIRECT"')
    filters, rules = _strings(rate.filter_id), _strings(rate.restriction_filter_rule)
    if action == RESTRICT_ACCESS:
        if not filters and not rules:
            raise _Invalid((*at, "final_unit_action"), "RESTRICT_ACCESS needs filter_id and/or "
                           "restriction_filter_rule: what the gateway lets through once credit runs out")
        for index, name in enumerate(filters):
            if not name.strip():
                raise _Invalid((*at, "filter_id"), f"filter id {index} is empty")
        for rule in rules:
            if not _IP_FILTER_RULE.match(rule.strip()):
                raise _Invalid((*at, "restriction_filter_rule"), f"{rule!r} is not an IPFilterRule such as "
                               "\"permit out ip from any to 10.0.0.1\" (RFC 6733 §4.3)")
        fields.update(filter_ids=filters, restriction_filter_rules=tuple(r.strip() for r in rules))
    elif filters or rules:
        key = "filter_id" if filters else "restriction_filter_rule"
        raise _Invalid((*at, key), 'is only used with final_unit_action = "RESTRICT_ACCESS"')
    final_validity = rate.final_validity_time if rate.final_validity_time is not None else rate.validity_time
    restricts = action != TERMINATE or rate.fair_usage is not None
    if not restricts and rate.final_validity_time is not None:
        raise _Invalid((*at, "final_validity_time"), "is only used with REDIRECT, RESTRICT_ACCESS or fair_usage")
    if restricts and not final_validity:
        what = rate.final_unit_action if action != TERMINATE else "fair_usage"
        raise _Invalid((*at, "final_unit_action" if action != TERMINATE else "fair_usage"), f"{what} needs "
                       "validity_time or final_validity_time: how long the gateway keeps the user there before "
                       "it asks again")
    fields["final_validity_time"] = final_validity if restricts else 0
    return fields


def _fair_usage(policy: FairUsage, at: Path_) -> dict[str, Any]:
    """The fair_usage_* fields of a schedule: units per period and what the gateway restricts to after."""
    if not 0 < policy.units < EXACT_LIMIT:
        raise _Invalid((*at, "units"), f"must be a positive number of units below 2^53, got {policy.units}")
    if policy.period not in PERIODS:
        raise _Invalid((*at, "period"), f"must be one of {', '.join(PERIODS)}, got {policy.period!r}")
    filters, rules = _strings(policy.filter_id), _strings(policy.restriction_filter_rule)
    if not filters and not rules:
        raise _Invalid(at, "needs filter_id and/or restriction_filter_rule: what the gateway lets through (or "
                       "how it throttles) once the units of the period are used")
    for index, name in enumerate(filters):
        if not name.strip():
            raise _Invalid((*at, "filter_id"), f"filter id {index} is empty")
    for rule in rules:
        if not _IP_FILTER_RULE.match(rule.strip()):
            raise _Invalid((*at, "restriction_filter_rule"), f"{rule!r} is not an IPFilterRule such as "
                           "\"permit out ip from any to 10.0.0.1\" (RFC 6733 §4.3)")
    return dict(fair_usage_units=policy.units, fair_usage_period=policy.period, fair_usage_filter_ids=filters,
                fair_usage_restriction_filter_rules=tuple(r.strip() for r in rules))


def _redirect(rate: Rate, at: Path_) -> dict[str, Any]:
    if rate.redirect_address_type not in REDIRECT_ADDRESS_TYPES:
        raise _Invalid((*at, "redirect_address_type"), f"must be one of {', '.join(REDIRECT_ADDRESS_TYPES)}, "
                       f"got {rate.redirect_address_type!r}")
    address = (rate.redirect_address or "").strip()
    if not address:
        raise _Invalid((*at, "final_unit_action"), "REDIRECT needs redirect_address (e.g. a top-up URL)")
    kind = rate.redirect_address_type
    valid = {
        "URL": lambda: bool(_URL.match(address)),
        "SIP_URI": lambda: bool(_SIP_URI.match(address)),
        "IPV4_ADDRESS": lambda: _is_ip(address, ipaddress.IPv4Address),
        "IPV6_ADDRESS": lambda: _is_ip(address, ipaddress.IPv6Address),
    }[kind]()
    if not valid:
        raise _Invalid((*at, "redirect_address"), f"{address!r} is not a valid {kind}")
    return {"redirect_address": address, "redirect_address_type": REDIRECT_ADDRESS_TYPES[kind]}


def _is_ip(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _compile_rate(card: RateCard, rate: Rate, at: Path_, allowances: tuple[str, ...]) -> RatingSchedule:
    if rate.unit not in UNIT_KINDS:
        raise _Invalid((*at, "unit"), f"must be one of {', '.join(UNIT_KINDS)}, got {rate.unit!r}")
    if not rate.service.strip():
        raise _Invalid((*at, "service"), "must not be empty")
    if not rate.credit_control:
        return _free_schedule(card, rate, at)
    for key in ("price", "per", "increment", "default_quota", "max_quota"):
        if getattr(rate, key) is None:
            raise _Invalid((*at, key), "missing required key")
    assert rate.increment is not None and rate.default_quota is not None and rate.max_quota is not None
    minor = 10 ** (6 - card.currency_minor_digits)
    extended = _extended_pricing(card, rate, at, _price_per_increment(rate, at), minor)
    price = extended.pop("price")
    if rate.default_quota > rate.max_quota:
        raise _Invalid((*at, "default_quota"),
                       f"default_quota {rate.default_quota} exceeds max_quota {rate.max_quota}")
    for key in ("default_quota", "max_quota"):
        if getattr(rate, key) % rate.increment:
            raise _Invalid((*at, key), f"{getattr(rate, key)} is not a whole number of increments "
                           f"of {rate.increment}: a grant would be billed for units it does not give")
    if rate.unit == "seconds" and rate.max_quota > _MAX_UNSIGNED32:
        raise _Invalid((*at, "max_quota"), "CC-Time is an Unsigned32: at most 4294967295 seconds")
    # The largest products the charge script forms (see ratecards/pricing.py):
    #   pricing a full grant:       n_max × price_num + price_den - 1   (ceil of n × num / den)
    #   affordability:              money × price_den, where money is first clamped below the cost
    #                               of one full grant, so money × den < n_max × num + den.
    increments = rate.max_quota // rate.increment
    if increments * price.numerator + price.denominator >= EXACT_LIMIT:
        raise _Invalid((*at, "max_quota"), f"max_quota/increment × price_num = {increments} × "
                       f"{price.numerator} reaches 2^53: lower max_quota or the price precision")
    full_grant = -(-increments * price.numerator // price.denominator) + minor
    if full_grant * price.denominator >= EXACT_LIMIT:
        raise _Invalid((*at, "price"), f"the cost of a full grant × price_den = {full_grant} × "
                       f"{price.denominator} reaches 2^53: simplify the price, per or increment")
    also = _also_grant(rate, at)
    return RatingSchedule(
        rating_group=rate.rating_group,
        unit=rate.unit,
        increment=rate.increment,
        price_num=price.numerator,
        price_den=price.denominator,
        default_quota=rate.default_quota,
        max_quota=rate.max_quota,
        minor=minor,
        rounding=card.rounding,
        money_bucket=MONEY_BUCKET,
        allowances=allowances,
        currency=card.currency,
        version=card.version,
        also_grant=also,
        barred=rate.barred,
        requires_bucket=rate.requires_bundle,
        **extended,
        **_quota_control(rate, at, also),
    )


def _money(card: RateCard, value: str | None, at: Path_) -> int:
    """A Decimal amount string → micro-units, a whole number of the currency's minor units."""
    if value is None:
        return 0
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise _Invalid(at, f"{value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0:
        raise _Invalid(at, f"must be a finite, non-negative amount, got {value!r}")
    micro = amount * MICRO
    minor = 10 ** (6 - card.currency_minor_digits)
    if micro != micro.to_integral_value() or int(micro) % minor:
        raise _Invalid(at, f"{value} has more decimals than {card.currency} has ({card.currency_minor_digits})")
    if micro >= MONEY_LIMIT:
        raise _Invalid(at, f"{value} is too large (at most {MONEY_LIMIT // MICRO - 1})")
    return int(micro)


def _round_price(price: Fraction, minor: int, mode: str) -> Fraction:
    """A price per increment rounded to whole minor units (rounding_step = "increment")."""
    whole, rest = divmod(price, minor)
    if rest:
        if mode == "up":
            whole += 1
        elif mode == "half-up":
            whole += 2 * rest >= minor
        elif mode == "half-even":
            whole += 2 * rest > minor or (2 * rest == minor and whole % 2 == 1)
    return Fraction(int(whole) * minor)


def _extended_pricing(card: RateCard, rate: Rate, at: Path_, price: Fraction, minor: int) -> dict[str, Any]:
    """First increment, setup fee, minimum charge, free units, tiers, cap and scope of a priced rate, and the
    base price after the card's rounding step. Checks the 2^53 bound the extended Lua path relies on."""
    assert rate.increment is not None and rate.per is not None
    increment = rate.increment
    fields: dict[str, Any] = {}
    if rate.scope not in SCOPES:
        raise _Invalid((*at, "scope"), f"must be one of {', '.join(SCOPES)}, got {rate.scope!r}")
    fields["scope"] = rate.scope
    if rate.first_increment is not None:
        if rate.first_increment <= 0 or rate.first_increment % increment:
            raise _Invalid((*at, "first_increment"), f"must be a positive multiple of increment {increment} "
                           f"(e.g. 30 with increment 6 for 30/6), got {rate.first_increment}")
    fields["first_increment"] = rate.first_increment if rate.first_increment and rate.first_increment > increment \
        else 0
    if not 0 <= rate.free_units < EXACT_LIMIT:
        raise _Invalid((*at, "free_units"), f"must be 0 ≤ free_units < 2^53, got {rate.free_units}")
    fields["free_units"] = rate.free_units
    fields["setup_fee"] = _money(card, rate.setup_fee, (*at, "setup_fee"))
    fields["minimum_charge"] = _money(card, rate.minimum_charge, (*at, "minimum_charge"))
    cap = _money(card, rate.cap, (*at, "cap"))
    if rate.cap is not None and cap == 0:
        raise _Invalid((*at, "cap"), "must be positive (leave it out for no cap)")
    if rate.cap_period not in PERIODS:
        raise _Invalid((*at, "cap_period"), f"must be one of {', '.join(PERIODS)}, got {rate.cap_period!r}")
    fields.update(cap=cap, cap_period=rate.cap_period if cap else "")
    step = card.rounding_step == "increment"
    prices = [(price, (*at, "price"))]
    tiers = []
    previous = 0
    for index, tier in enumerate(rate.tiers):
        where = (*at, "tiers", index)
        if tier.start <= previous or tier.start % increment:
            raise _Invalid((*where, "from"), f"must be a multiple of increment {increment} above "
                           f"{previous if previous else 0} (tiers start after the base price, in order), "
                           f"got {tier.start}")
        previous = tier.start
        tier_price = _price_per_increment(msgspec.structs.replace(rate, price=tier.price), where)
        prices.append((tier_price, (*where, "price")))
    rounded = []
    for value, where in prices:
        if step:
            exact, value = value, _round_price(value, minor, card.rounding)
            if exact and not value:
                raise _Invalid(where, f"costs {exact} micro-units per increment of {increment}: rounded "
                               f"{card.rounding} to a whole minor unit (rounding_step = \"increment\") that is 0")
        rounded.append(value)
    for tier, value in zip(rate.tiers, rounded[1:], strict=True):
        tiers.append((tier.start // increment, value.numerator, value.denominator))
    fields["tiers"] = tuple(tiers)
    fields["price"] = rounded[0]
    extended = rate.scope != "report" or any(
        fields[k] for k in ("first_increment", "setup_fee", "minimum_charge", "free_units", "tiers", "cap"))
    if extended:  # the extended Lua path computes r × num with r < den (ratecards/pricing.py, item 2)
        for value, (_, where) in zip(rounded, prices, strict=True):
            if value.numerator * value.denominator >= EXACT_LIMIT:
                raise _Invalid(where, f"price_num × price_den = {value.numerator} × {value.denominator} reaches "
                               "2^53: simplify the price, per or increment")
    return fields


def _tariff_name(tariff: Tariff) -> str:
    if tariff.name:
        return tariff.name
    parts = []
    for key in ("band", "zone", "destination", "context", "service_identifier"):
        value = getattr(tariff, key)
        if value is not None:
            values = value if isinstance(value, list) else [value]
            parts.append(f"{key}={'|'.join(str(v) for v in values)}")
    return ",".join(parts)


def _check_conditions(card: RateCard, tariff: Tariff, at: Path_) -> None:
    known = {
        "band": ({b.name for b in card.bands}, "[[bands]]"),
        "zone": (set(card.zones), "[zones]"),
        "destination": (set(card.destinations), "[destinations]"),
        "context": (set(SERVICE_KINDS), None),
    }
    named = False
    for key, (names, table) in known.items():
        value = getattr(tariff, key)
        if value is None:
            continue
        named = True
        values = value if isinstance(value, list) else [value]
        if not values:
            raise _Invalid((*at, key), "name at least one value (or leave the key out)")
        for position, item in enumerate(values):
            if item not in names:
                where = (*at, key, position) if isinstance(value, list) else (*at, key)
                hint = f"not defined in {table}" if table else f"one of {', '.join(SERVICE_KINDS)}"
                raise _Invalid(where, f"{item!r} is {hint}")
    if tariff.service_identifier is not None:
        named = True
        values = tariff.service_identifier if isinstance(tariff.service_identifier, list) else [
            tariff.service_identifier]
        if not values or not all(0 <= v <= _MAX_UNSIGNED32 for v in values):
            raise _Invalid((*at, "service_identifier"), "must be Unsigned32 values")
    if not named:
        raise _Invalid(at, "a tariff needs a condition: band, zone, destination, context or service_identifier")


def _compile_tariff(card: RateCard, rate: Rate, tariff: Tariff, rate_at: Path_, index: int,
                    allowances: tuple[str, ...]) -> RatingSchedule:
    at: Path_ = (*rate_at, "tariffs", index)
    if not rate.credit_control:
        raise _Invalid(at, "a rating group outside credit control (credit_control = false) has no tariffs")
    if tariff.name and not tariff.name.strip():
        raise _Invalid((*at, "name"), "must not be blank")
    _check_conditions(card, tariff, at)
    overrides = {key: getattr(tariff, key) for key in TARIFF_PRICE_KEYS if getattr(tariff, key) is not None}
    merged = msgspec.structs.replace(rate, **overrides)
    try:
        schedule = _compile_rate(card, merged, rate_at, allowances)
    except _Invalid as exc:
        key = exc.path[len(rate_at)] if len(exc.path) > len(rate_at) else None
        if key in overrides:
            raise _Invalid((*at, *exc.path[len(rate_at):]), exc.message) from None
        if key in ("default_quota", "max_quota") and "increment" in overrides:
            raise _Invalid((*at, "increment"), f"the rate's {exc.message}") from None
        raise
    return msgspec.structs.replace(schedule, tariff=_tariff_name(tariff))


def _compile_checked(card: RateCard, name: str, *, tariffs: bool = False
                     ) -> dict[int, RatingSchedule]:
    return {group: base for group, (base, _) in _compile_all(card, name, tariffs=tariffs).items()}


def _compile_all(card: RateCard, name: str, *, tariffs: bool = True
                 ) -> dict[int, tuple[RatingSchedule, list[tuple[Tariff, RatingSchedule]]]]:
    plan = card.plans[name]
    by_group = _check_plan(name, plan)
    compiled: dict[int, tuple[RatingSchedule, list[tuple[Tariff, RatingSchedule]]]] = {}
    for group, (index, rate) in by_group.items():
        allowances = tuple(a.bucket for a in plan.allowances if group in a.rating_groups)
        at: Path_ = ("plans", name, "rates", index)
        base = _compile_rate(card, rate, at, allowances)
        variants = [(tariff, _compile_tariff(card, rate, tariff, at, position, allowances))
                    for position, tariff in enumerate(rate.tariffs)] if tariffs else []
        compiled[group] = (base, variants)
    return compiled


# --- compilation ------------------------------------------------------------------------------------


def compile_plan(card: RateCard, plan: str) -> dict[int, RatingSchedule]:
    """The integer schedules of one plan, by rating group."""
    if plan not in card.plans:
        raise RateCardError(f"no plan {plan!r} (plans: {', '.join(sorted(card.plans))})",
                            source=_card_source(card), field="plans")
    try:
        return _compile_checked(card, plan)
    except _Invalid as exc:
        raise RateCardError(exc.message, source=_card_source(card), field=_render(exc.path)) from None


def compile_ratecard(card: RateCard) -> dict[str, dict[int, RatingSchedule]]:
    """Every plan's schedules: plan → rating group → schedule."""
    return {name: compile_plan(card, name) for name in card.plans}


def compile_tariffs(card: RateCard, plan: str
                    ) -> dict[int, tuple[RatingSchedule, list[tuple[Tariff, RatingSchedule]]]]:
    """One plan's rates by rating group: the rate's own schedule and each tariff with its schedule, in the
    card's order (ratecards.rater builds the per-request lookup from this)."""
    if plan not in card.plans:
        raise RateCardError(f"no plan {plan!r} (plans: {', '.join(sorted(card.plans))})",
                            source=_card_source(card), field="plans")
    try:
        return _compile_all(card, plan)
    except _Invalid as exc:
        raise RateCardError(exc.message, source=_card_source(card), field=_render(exc.path)) from None


def initial_allowances(card: RateCard, plan: str) -> dict[str, int]:
    """Allowance bucket → units granted when a subscriber is provisioned on `plan`."""
    if plan not in card.plans:
        raise RateCardError(f"no plan {plan!r}", source=_card_source(card), field="plans")
    return {a.bucket: a.amount for a in card.plans[plan].allowances}


def _card_source(card: RateCard) -> str:
    return f"rate card {card.version!r}"


# --- error locations --------------------------------------------------------------------------------


def _render(path: Path_) -> str:
    """("plans", "demo", "rates", 1, "price") → plans.demo.rates[1].price"""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _NAME.match(part) and "." not in part else f'"{part}"'
            out += f".{key}" if out else key
    return out


def _split_key(dotted: str) -> tuple[str, ...]:
    """Split a TOML header key on dots outside quotes (best effort, for error locations only)."""
    parts = re.findall(r'\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[^.\s]+)\s*(?:\.|$)', dotted)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _locate(text: str, path: Path_) -> int | None:
    """Best-effort line of `path` in the TOML text: the key's own line, else its table's header line."""
    headers: list[tuple[int, Path_]] = [(0, ())]  # (line, table path); line 0 = the top-level table
    arrays: dict[Path_, int] = {}  # array-of-tables path (with its parents' indices) → its last index
    lines = text.splitlines()

    def concrete(key: tuple[str, ...]) -> Path_:
        """The header's path with the current index after every enclosing array of tables."""
        out: list[str | int] = []
        for part in key[:-1]:
            out.append(part)
            if tuple(out) in arrays:
                out.append(arrays[tuple(out)])
        return (*out, *key[-1:])

    for number, line in enumerate(lines, 1):
        array = re.match(r"^\s*\[\[\s*([^\]]+?)\s*\]\]", line)
        table = None if array else re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if array:
            path_of = concrete(_split_key(array.group(1)))
            arrays[path_of] = arrays.get(path_of, -1) + 1
            headers.append((number, (*path_of, arrays[path_of])))
        elif table:
            headers.append((number, concrete(_split_key(table.group(1)))))
    best = max((h for h in headers if path[: len(h[1])] == h[1]), key=lambda h: len(h[1]))
    start, table_path = best
    rest = path[len(table_path):]
    if rest and isinstance(rest[0], str):
        following = [n for n, _ in headers if n > start]
        stop = following[0] if following else len(lines) + 1
        key = re.compile(r"^\s*[\"']?" + re.escape(rest[0]) + r"[\"']?\s*=")
        for number in range(start + 1, stop):
            if key.match(lines[number - 1]):
                return number
    return start or None
