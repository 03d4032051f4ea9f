"""Parse, validate and compile rate cards into integer `RatingSchedule`s.

Theory of operation: TOML text → `tomllib` (syntax errors keep their line) → msgspec, plan by plan (type
errors name the plan and key) → semantic checks (units, rounding, quotas, allowances, the 2^53 bound) →
`compile_plan`, which prices one increment as an exact reduced fraction of micro-units. Every check runs
when a card is parsed, so a card that loads can always be compiled. A semantic error names its key and,
when the key can be found in the text, its line. Reading a file in `load_ratecard` is the only I/O.
"""

from __future__ import annotations

import re
import tomllib
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from os import PathLike
from pathlib import Path
from typing import Any

import msgspec

from ratecards.model import (
    FINAL_UNIT_ACTIONS,
    ROUNDING_MODES,
    UNIT_KINDS,
    Plan,
    Rate,
    RateCard,
    RateCardError,
)
from ratecards.schedule import RatingSchedule

__all__ = [
    "EXACT_LIMIT",
    "MICRO",
    "compile_plan",
    "compile_ratecard",
    "initial_allowances",
    "load_ratecard",
    "parse_ratecard",
    "validate_ratecard",
]

MICRO = 10**6  # micro-units per currency unit
EXACT_LIMIT = 2**53  # the charge script computes in Lua doubles: every product must stay below this
MONEY_BUCKET = "money"
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
    if not card.plans:
        raise _Invalid(("plans",), "a rate card needs at least one plan")
    for name in card.plans:
        _compile_checked(card, name)


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
            if by_group[group][1].unit != allowance.unit:
                raise _Invalid((*where, "unit"), f"{allowance.unit} allowance cannot pay for rating group "
                               f"{group}, which is rated in {by_group[group][1].unit}")
    return by_group


def _price_per_increment(rate: Rate, at: Path_) -> Fraction:
    """price × 10^6 × increment / per micro-units, exact (Decimal → Fraction, no float)."""
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


def _compile_rate(card: RateCard, rate: Rate, at: Path_, allowances: tuple[str, ...]) -> RatingSchedule:
    if rate.unit not in UNIT_KINDS:
        raise _Invalid((*at, "unit"), f"must be one of {', '.join(UNIT_KINDS)}, got {rate.unit!r}")
    if not rate.service.strip():
        raise _Invalid((*at, "service"), "must not be empty")
    if rate.final_unit_action not in FINAL_UNIT_ACTIONS:
        raise _Invalid((*at, "final_unit_action"),
                       f"must be one of {', '.join(FINAL_UNIT_ACTIONS)}, got {rate.final_unit_action!r}")
    price = _price_per_increment(rate, at)
    if rate.default_quota > rate.max_quota:
        raise _Invalid((*at, "default_quota"),
                       f"default_quota {rate.default_quota} exceeds max_quota {rate.max_quota}")
    for key in ("default_quota", "max_quota"):
        if getattr(rate, key) % rate.increment:
            raise _Invalid((*at, key), f"{getattr(rate, key)} is not a whole number of increments "
                           f"of {rate.increment}: a grant would be billed for units it does not give")
    if rate.unit == "seconds" and rate.max_quota > _MAX_UNSIGNED32:
        raise _Invalid((*at, "max_quota"), "CC-Time is an Unsigned32: at most 4294967295 seconds")
    minor = 10 ** (6 - card.currency_minor_digits)
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
        final_unit_action=FINAL_UNIT_ACTIONS[rate.final_unit_action],
        currency=card.currency,
        version=card.version,
    )


def _compile_checked(card: RateCard, name: str) -> dict[int, RatingSchedule]:
    plan = card.plans[name]
    by_group = _check_plan(name, plan)
    schedules: dict[int, RatingSchedule] = {}
    for group, (index, rate) in by_group.items():
        allowances = tuple(a.bucket for a in plan.allowances if group in a.rating_groups)
        schedules[group] = _compile_rate(card, rate, ("plans", name, "rates", index), allowances)
    return schedules


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
    counts: dict[tuple[str, ...], int] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        array = re.match(r"^\s*\[\[\s*([^\]]+?)\s*\]\]", line)
        table = None if array else re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if array:
            key = _split_key(array.group(1))
            counts[key] = counts.get(key, -1) + 1
            headers.append((number, (*key, counts[key])))
        elif table:
            headers.append((number, _split_key(table.group(1))))
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
