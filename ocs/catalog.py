"""The product catalog: plans with a recurring fee and included allowances, add-ons, promotions.

Theory of operation. A catalog is one TOML file (format in docs/catalog.md) parsed and checked here —
TOML syntax, then msgspec types, then meaning, each error naming the file, line and key like a rate card's —
and checked against the rate card that rates it (every plan's `ratecard_plan` exists, every rating group an
allowance or add-on serves is priced there, one currency). `ocs plan load` stores the checked catalog as
JSON with its version in one global Redis key (`catalog:current`, outside the partitions: the CLI and the
servers read it, no script does), so every process sees the same catalog.

The rate card still decides prices, Final-Unit-Action and fair usage; the catalog decides what a customer
buys: a plan's period (fee + allowances, renewed), add-ons bought on top, promotion bonuses. Money moves in
one Lua call per operation in the subscriber's partition (balances/lua/catalog.lua via BalanceStore
buy_addon / plan_period / grant_bonuses), each with its ledger entry; this module computes the amounts,
the buckets with their validity, the period bounds and the promotions that apply, and passes them in.

Periods are anchored at the subscription (or the last plan change): a monthly plan bought on the 31st
renews on the last day of shorter months and on the 31st again after. Times are UTC; amounts are integer
micro-units, Decimal only while parsing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec

from balances import keys as k
from balances.buckets import ID as BUCKET_ID
from balances.model import MONEY, Bucket, Rollover
from balances.store import BalanceStore, Bonus, CatalogRefused, CatalogResult, UnknownSubscriber
from ocs.clock import Clock
from ratecards import RateCard, compile_card
from ratecards.compile import _locate, _msgspec_error, _render  # the rate card's error locator, reused as is

log = logging.getLogger(__name__)

MICRO = 1_000_000
MONEY_LIMIT = 10**15  # micro-units: far below 2^53 for every sum the scripts make
EVENTS = ("subscribe", "change-plan", "topup", "addon")
PROMOTION_KINDS = ("bonus", "discount")
DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DURATION = re.compile(r"^(\d+)\s*([hdw])$")
_MULTIPLIER = {"h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}


class CatalogError(ValueError):
    """A catalog that cannot be used: the message names the source, the line when known and the key."""

    def __init__(self, message: str, *, source: str = "<string>", line: int | None = None,
                 field: str | None = None) -> None:
        self.source, self.line, self.field, self.reason = source, line, field, message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


# ---- the file, one to one (field names are the TOML keys) -------------------------------------------------


class PlanAllowance(msgspec.Struct, forbid_unknown_fields=True):
    """Units included in every period of a plan, valid for the period; up to `rollover_cap` unused units
    carry into the next period (then valid one more period)."""

    bucket: str
    unit: str
    amount: int
    rating_groups: list[int] = []  # [] = every rating group priced in the unit
    priority: int = 50
    rollover_cap: int | None = None


class CatalogPlan(msgspec.Struct, forbid_unknown_fields=True):
    description: str = ""
    ratecard_plan: str | None = None  # the rate card plan that rates it (default: the same name)
    recurring_fee: str = "0"  # Decimal string, charged at the start of every period
    period: str = "month"  # month | week | <N>d
    allowances: list[PlanAllowance] = []
    final_unit_action: str = ""  # notes: the rate card applies the policy
    fair_usage: str = ""  # notes: the rate card applies the policy (rates' fair_usage)


class GrantBucket(msgspec.Struct, forbid_unknown_fields=True):
    """A bucket an add-on or a bonus creates: `amount` units (a Decimal string for unit "money"), valid for
    `validity` from the purchase (<N>h, <N>d, <N>w or "month"; absent: no end)."""

    bucket: str
    unit: str
    amount: int | str
    rating_groups: list[int] = []
    validity: str | None = None
    priority: int = 60


class Addon(msgspec.Struct, forbid_unknown_fields=True):
    price: str
    buckets: list[GrantBucket]
    description: str = ""
    plans: list[str] = []  # the plans it may be bought on ([] = any subscriber)
    repeatable: bool = True


class Promotion(msgspec.Struct, forbid_unknown_fields=True):
    """kind "bonus": `buckets` granted on `event` (subscribe, change-plan, topup >= min_topup, addon in
    `addons`) for subscribers of `plans` ([] = any) while the promotion runs [from, until); once per subscriber
    unless repeatable. kind "discount": `percent` off the rates of `rating_groups` of `plans` in [from, until)
    (applied through rate-card versions: ratecards.promotions)."""

    kind: str
    description: str = ""
    event: str = "subscribe"
    plans: list[str] = []
    addons: list[str] = []
    min_topup: str | None = None
    buckets: list[GrantBucket] = []
    repeatable: bool = False
    start: datetime | None = msgspec.field(default=None, name="from")
    until: datetime | None = None
    percent: str | None = None
    rating_groups: list[int] = []


class Catalog(msgspec.Struct, forbid_unknown_fields=True):
    plans: dict[str, CatalogPlan]
    version: str = ""
    currency: str = "EUR"
    currency_minor_digits: int = 2
    addons: dict[str, Addon] = {}
    promotions: dict[str, Promotion] = {}


class StoredCatalog(msgspec.Struct):
    """What catalog:current holds."""

    version: str  # the file's version, else its digest
    digest: str  # first 12 hex digits of the SHA1 of the source text
    loaded_ms: int
    source: str
    catalog: Catalog


class _Invalid(Exception):
    def __init__(self, path: tuple, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


# ---- parsing and checks ------------------------------------------------------------------------------------


def parse_catalog(text: str, *, source: str = "<string>", card: RateCard | None = None) -> Catalog:
    """Parse and check a catalog (against `card`, the rate card that rates it, when given)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        raise CatalogError(f"TOML syntax error: {exc}", source=source,
                           line=int(found.group(1)) if found else None) from None
    try:
        catalog = _decode(data)
        _check(catalog, card)
    except _Invalid as exc:
        raise CatalogError(exc.message, source=source, line=_locate(text, exc.path),
                           field=_render(exc.path)) from None
    return catalog


def load_catalog_file(path: str | Path, card: RateCard | None = None) -> tuple[Catalog, str]:
    """A catalog file and its text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot read catalog: {exc}", source=str(path)) from None
    return parse_catalog(text, source=str(path), card=card), text


def _decode(data: dict[str, Any]) -> Catalog:
    """msgspec, one named table at a time so an error names it (msgspec elides dict keys)."""
    for section, kind in (("plans", CatalogPlan), ("addons", Addon), ("promotions", Promotion)):
        table = data.get(section)
        if isinstance(table, dict):
            for name, value in table.items():
                try:
                    msgspec.convert(value, kind)
                except msgspec.ValidationError as exc:
                    raise _as_invalid(exc, (section, name)) from None
    try:
        return msgspec.convert(data, Catalog)
    except msgspec.ValidationError as exc:
        raise _as_invalid(exc, ()) from None


def _as_invalid(exc: msgspec.ValidationError, prefix: tuple) -> _Invalid:
    invalid = _msgspec_error(exc, prefix)
    message = invalid.message
    if invalid.path and invalid.path[-1] in ("recurring_fee", "price", "min_topup", "percent") and "got `" in message:
        message += ' (write amounts as strings, e.g. "9.99", so they stay exact)'
    return _Invalid(invalid.path, message)


def _money(catalog: Catalog, text: str, at: tuple, *, zero: bool = True) -> int:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise _Invalid(at, f"{text!r} is not a decimal amount") from None
    if not value.is_finite() or value < 0 or (value == 0 and not zero):
        raise _Invalid(at, f"must be a {'non-negative' if zero else 'positive'} amount, got {text!r}")
    if value != value.quantize(Decimal(1).scaleb(-catalog.currency_minor_digits)):
        raise _Invalid(at, f"{text} has more decimals than {catalog.currency} allows "
                           f"({catalog.currency_minor_digits})")
    micro = int(value * MICRO)
    if micro > MONEY_LIMIT:
        raise _Invalid(at, f"{text} is too large")
    return micro


def _check_name(value: str, at: tuple, what: str) -> None:
    if not BUCKET_ID.match(value):
        raise _Invalid(at, f"{what} {value!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")


def _check_units(amount: int, at: tuple) -> None:
    if isinstance(amount, bool) or not 0 < amount < 2**53:
        raise _Invalid(at, f"must be a positive integer below 2^53, got {amount!r}")


def parse_period(text: str) -> tuple[str, int]:
    """("month", 1) | ("days", N): a plan's period."""
    if text == "month":
        return "month", 1
    if text == "week":
        return "days", 7
    found = re.fullmatch(r"(\d+)\s*d", text)
    if found and 0 < int(found.group(1)) <= 3660:
        return "days", int(found.group(1))
    raise ValueError(f"a period is month, week or <N>d, got {text!r}")


def parse_validity(text: str) -> tuple[str, int]:
    """("month", 1) | ("ms", N): how long a bucket bought now stays valid."""
    if text == "month":
        return "month", 1
    found = _DURATION.fullmatch(text.strip())
    if found and int(found.group(1)) > 0:
        return "ms", int(found.group(1)) * _MULTIPLIER[found.group(2)]
    raise ValueError(f"a validity is <N>h, <N>d, <N>w or month, got {text!r}")


def _check_grant(catalog: Catalog, grant: GrantBucket, at: tuple, card: RateCard | None,
                 plans: Sequence[str]) -> None:
    _check_name(grant.bucket, (*at, "bucket"), "bucket id")
    if grant.bucket == MONEY:
        raise _Invalid((*at, "bucket"), "'money' is the main balance; name the bonus bucket otherwise")
    if grant.unit == MONEY:
        if not isinstance(grant.amount, str):
            raise _Invalid((*at, "amount"), 'a money amount is a decimal string, e.g. "2.00"')
        _money(catalog, grant.amount, (*at, "amount"), zero=False)
    else:
        _check_name(grant.unit, (*at, "unit"), "unit")
        if not isinstance(grant.amount, int):
            raise _Invalid((*at, "amount"), f"units are an integer, got {grant.amount!r}")
        _check_units(grant.amount, (*at, "amount"))
    if grant.validity is not None:
        try:
            parse_validity(grant.validity)
        except ValueError as exc:
            raise _Invalid((*at, "validity"), str(exc)) from None
    if not -(2**53) < grant.priority < 2**53:
        raise _Invalid((*at, "priority"), "out of range")
    _check_rating_groups(catalog, grant.rating_groups, grant.unit, (*at, "rating_groups"), card, plans)


def _check_rating_groups(catalog: Catalog, groups: Sequence[int], unit: str, at: tuple, card: RateCard | None,
                         plans: Sequence[str]) -> None:
    for rg in groups:
        if isinstance(rg, bool) or not 0 <= rg < 2**32:
            raise _Invalid(at, f"rating group {rg!r} is not an Unsigned32")
    if card is None or not groups:
        return
    rating_plans = [catalog.plans[p].ratecard_plan or p for p in plans if p in catalog.plans] or list(card.plans)
    for rg in groups:
        if not any(rg in {r.rating_group for r in card.plans[p].rates} for p in rating_plans if p in card.plans):
            raise _Invalid(at, f"rating group {rg} is not rated by rate card plan(s) {', '.join(rating_plans)}")


def _check(catalog: Catalog, card: RateCard | None) -> None:
    if not re.fullmatch(r"[A-Z]{3}", catalog.currency):
        raise _Invalid(("currency",), f"must be an ISO 4217 code such as EUR, got {catalog.currency!r}")
    if not 0 <= catalog.currency_minor_digits <= 6:
        raise _Invalid(("currency_minor_digits",), f"must be 0..6, got {catalog.currency_minor_digits}")
    if card is not None and card.currency != catalog.currency:
        raise _Invalid(("currency",), f"the rate card is in {card.currency}, the catalog in {catalog.currency}")
    if not catalog.plans:
        raise _Invalid(("plans",), "a catalog needs at least one plan")
    for name, plan in catalog.plans.items():
        at = ("plans", name)
        _check_name(name, at, "plan")
        rating_plan = plan.ratecard_plan or name
        if card is not None and rating_plan not in card.plans:
            raise _Invalid((*at, "ratecard_plan"), f"the rate card has no plan {rating_plan!r} (it has "
                                                   f"{', '.join(sorted(card.plans))})")
        _money(catalog, plan.recurring_fee, (*at, "recurring_fee"))
        try:
            parse_period(plan.period)
        except ValueError as exc:
            raise _Invalid((*at, "period"), str(exc)) from None
        seen: set[str] = set()
        for index, allowance in enumerate(plan.allowances):
            where = (*at, "allowances", index)
            _check_name(allowance.bucket, (*where, "bucket"), "bucket id")
            if allowance.bucket in seen or allowance.bucket == MONEY:
                raise _Invalid((*where, "bucket"), f"bucket {allowance.bucket!r} is given twice or is 'money'")
            seen.add(allowance.bucket)
            if allowance.unit == MONEY:
                raise _Invalid((*where, "unit"), "included allowances are units; a bonus can be money")
            _check_name(allowance.unit, (*where, "unit"), "unit")
            _check_units(allowance.amount, (*where, "amount"))
            if allowance.rollover_cap is not None and not 0 < allowance.rollover_cap < 2**53:
                raise _Invalid((*where, "rollover_cap"), "must be a positive integer")
            _check_rating_groups(catalog, allowance.rating_groups, allowance.unit, (*where, "rating_groups"), card,
                                 [name])
    for name, addon in catalog.addons.items():
        at = ("addons", name)
        _check_name(name, at, "add-on")
        _money(catalog, addon.price, (*at, "price"))
        for plan in addon.plans:
            if plan not in catalog.plans:
                raise _Invalid((*at, "plans"), f"no plan {plan!r} in the catalog")
        if not addon.buckets:
            raise _Invalid((*at, "buckets"), "an add-on creates at least one bucket")
        for index, grant in enumerate(addon.buckets):
            _check_grant(catalog, grant, (*at, "buckets", index), card, addon.plans)
    for name, promotion in catalog.promotions.items():
        _check_promotion(catalog, name, promotion, card)


def _check_promotion(catalog: Catalog, name: str, promotion: Promotion, card: RateCard | None) -> None:
    at = ("promotions", name)
    _check_name(name, at, "promotion")
    if promotion.kind not in PROMOTION_KINDS:
        raise _Invalid((*at, "kind"), f"must be one of {', '.join(PROMOTION_KINDS)}, got {promotion.kind!r}")
    for plan in promotion.plans:
        if plan not in catalog.plans:
            raise _Invalid((*at, "plans"), f"no plan {plan!r} in the catalog")
    if promotion.start is not None and promotion.until is not None and _ms(promotion.until) <= _ms(promotion.start):
        raise _Invalid((*at, "until"), "must be after from")
    if promotion.kind == "discount":
        if promotion.percent is None:
            raise _Invalid((*at, "percent"), "missing required key")
        try:
            percent = Decimal(promotion.percent)
        except InvalidOperation:
            raise _Invalid((*at, "percent"), f"{promotion.percent!r} is not a number") from None
        if not 0 < percent <= 100:
            raise _Invalid((*at, "percent"), "must be in (0, 100]")
        if not promotion.plans or not promotion.rating_groups:
            raise _Invalid(at, "a discount names its plans and rating_groups")
        if promotion.start is None or promotion.until is None:
            raise _Invalid(at, "a discount runs from `from` until `until`")
        for plan in promotion.plans:
            _check_rating_groups(catalog, promotion.rating_groups, "", (*at, "rating_groups"), card, [plan])
        return
    if promotion.event not in EVENTS:
        raise _Invalid((*at, "event"), f"must be one of {', '.join(EVENTS)}, got {promotion.event!r}")
    if not promotion.buckets:
        raise _Invalid((*at, "buckets"), "a bonus grants at least one bucket")
    if promotion.event == "topup":
        if promotion.min_topup is None:
            raise _Invalid((*at, "min_topup"), "a top-up bonus needs min_topup")
        _money(catalog, promotion.min_topup, (*at, "min_topup"))
    for addon in promotion.addons:
        if addon not in catalog.addons:
            raise _Invalid((*at, "addons"), f"no add-on {addon!r} in the catalog")
    for index, grant in enumerate(promotion.buckets):
        _check_grant(catalog, grant, (*at, "buckets", index), card, promotion.plans)


# ---- amounts, periods, buckets -------------------------------------------------------------------------


def money(text: str) -> int:
    """A checked Decimal string in micro-units."""
    return int(Decimal(text.strip()) * MICRO)


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _datetime(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _add_months(anchor: datetime, months: int) -> datetime:
    """anchor + months, the day clamped to the month's last (31 Jan + 1 month = 28/29 Feb)."""
    index = anchor.year * 12 + anchor.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    last = (datetime(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1)).day
    return anchor.replace(year=year, month=month, day=min(anchor.day, last))


def period_bounds(period: str, anchor_ms: int, at_ms: int) -> tuple[int, int]:
    """The period [start, end) of a plan anchored at anchor_ms that contains at_ms (at_ms >= anchor_ms)."""
    kind, length = parse_period(period)
    if kind == "days":
        span = length * DAY_MS
        n = max(at_ms - anchor_ms, 0) // span
        return anchor_ms + n * span, anchor_ms + (n + 1) * span
    anchor = _datetime(anchor_ms)
    at = _datetime(max(at_ms, anchor_ms))
    n = max((at.year - anchor.year) * 12 + at.month - anchor.month - 1, 0)
    while _ms(_add_months(anchor, n + 1)) <= at_ms:
        n += 1
    return _ms(_add_months(anchor, n)), _ms(_add_months(anchor, n + 1))


def _valid_until(validity: str | None, start_ms: int) -> int | None:
    if validity is None:
        return None
    kind, amount = parse_validity(validity)
    if kind == "month":
        return _ms(_add_months(_datetime(start_ms), 1))
    return start_ms + amount


def _grant_amount(grant: GrantBucket) -> int:
    return money(grant.amount) if grant.unit == MONEY and isinstance(grant.amount, str) else int(grant.amount)


def grant_buckets(grants: Sequence[GrantBucket], now_ms: int) -> list[Bucket]:
    """An add-on's or a bonus's buckets, valid from now."""
    return [Bucket(id=g.bucket, unit=g.unit, amount=_grant_amount(g), priority=g.priority, valid_from=now_ms,
                   valid_until=_valid_until(g.validity, now_ms),
                   services=tuple(g.rating_groups) if g.rating_groups else None) for g in grants]


def period_buckets(plan: CatalogPlan, start: int, end: int, anchor: int) -> list[Bucket]:
    """A period's included allowances: valid [start, end), with the rollover rule (unused units up to the cap
    move into '<id>.rollover', valid for the next period: the existing expiry/rollover machinery)."""
    carry_ms = period_bounds(plan.period, anchor, end)[1] - end
    return [Bucket(id=a.bucket, unit=a.unit, amount=a.amount, priority=a.priority, valid_from=start, valid_until=end,
                   services=tuple(a.rating_groups) if a.rating_groups else None,
                   rollover=Rollover(cap=a.rollover_cap, validity_ms=carry_ms) if a.rollover_cap else None)
            for a in plan.allowances]


def _running(promotion: Promotion, now_ms: int) -> bool:
    if promotion.start is not None and now_ms < _ms(promotion.start):
        return False
    return promotion.until is None or now_ms < _ms(promotion.until)


def bonuses_for(catalog: Catalog, event: str, *, plan: str | None, now_ms: int, addon: str | None = None,
                topup: int | None = None) -> list[Bonus]:
    """The bonus promotions an event earns now (the script skips `once` ones the subscriber had)."""
    out = []
    for name, promotion in sorted(catalog.promotions.items()):
        if promotion.kind != "bonus" or promotion.event != event or not _running(promotion, now_ms):
            continue
        if promotion.plans and plan not in promotion.plans:
            continue
        if event == "addon" and promotion.addons and addon not in promotion.addons:
            continue
        if event == "topup" and (topup is None or topup < money(promotion.min_topup or "0")):
            continue
        out.append(Bonus(name=name, buckets=grant_buckets(promotion.buckets, now_ms), once=not promotion.repeatable))
    return out


def discount_cards(catalog: Catalog, cards: Sequence[RateCard]) -> list[RateCard]:
    """The rate-card versions that carry the catalog's discount promotions (ratecards.promotions): per
    promotion, the version in force at `from` with the discount, and the version in force at `until` as it is.
    The promotion's own versions (from an earlier load) are left out of `cards` first, so loading the same
    catalog again gives the same versions. A discount names catalog plans; it applies to their rate card plans
    (so to every catalog plan rated by the same one)."""
    from ratecards.promotions import discount_versions

    out: list[RateCard] = []
    for name, promotion in sorted(catalog.promotions.items()):
        if promotion.kind != "discount" or promotion.start is None or promotion.until is None:
            continue
        base = [card for card in cards if not card.version.endswith((f".{name}", f".{name}-end"))]
        rater = compile_card(base)
        start, end = _datetime(_ms(promotion.start)), _datetime(_ms(promotion.until))
        plans = sorted({rating_plan_of(catalog, plan) for plan in promotion.plans})
        out += discount_versions(rater.version_at(start), rater.version_at(end), name, plans,
                                 promotion.rating_groups, promotion.percent or "0", start, end)
    return out


# ---- the catalog in Redis --------------------------------------------------------------------------------


async def store_catalog(redis: Any, catalog: Catalog, text: str, now_ms: int) -> StoredCatalog:
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    stored = StoredCatalog(version=catalog.version or digest, digest=digest, loaded_ms=now_ms, source=text,
                           catalog=catalog)
    await redis.set(k.CATALOG_KEY, msgspec.json.encode(stored))
    return stored


async def read_catalog(redis: Any) -> StoredCatalog | None:
    raw = await redis.get(k.CATALOG_KEY)
    return None if raw is None else msgspec.json.decode(raw, type=StoredCatalog)


# ---- operations ---------------------------------------------------------------------------------------------


class PlanError(ValueError):
    """An operation the catalog does not allow (unknown plan or add-on, not eligible ...): nothing changed."""


def _plan(catalog: Catalog, name: str) -> CatalogPlan:
    plan = catalog.plans.get(name)
    if plan is None:
        raise PlanError(f"no plan {name!r} in the catalog (it has {', '.join(sorted(catalog.plans))})")
    return plan


def rating_plan_of(catalog: Catalog, name: str) -> str:
    return _plan(catalog, name).ratecard_plan or name


async def start_plan(store: BalanceStore, catalog: Catalog, msisdn: str, name: str, now_ms: int) -> CatalogResult:
    """The first period of a newly provisioned subscriber: fee, allowances, subscribe bonuses, due time."""
    plan = _plan(catalog, name)
    start, end = period_bounds(plan.period, now_ms, now_ms)
    return await store.plan_period(
        msisdn, "start", product=name, rating_plan=rating_plan_of(catalog, name), start=start, end=end,
        fee=money(plan.recurring_fee), buckets=period_buckets(plan, start, end, now_ms), anchor=now_ms,
        bonuses=bonuses_for(catalog, "subscribe", plan=name, now_ms=now_ms), now_ms=now_ms)


async def change_plan(store: BalanceStore, catalog: Catalog, msisdn: str, name: str, now_ms: int) -> CatalogResult:
    """Another plan from now on: its full fee and allowances for a period starting now (no proration); the old
    plan's period allowances end now (units carried over by rollover, add-ons and bonuses are kept). Updates
    the record and the index; the caller re-authorises the open sessions."""
    plan = _plan(catalog, name)
    rating_plan = rating_plan_of(catalog, name)
    start, end = period_bounds(plan.period, now_ms, now_ms)
    result = await store.plan_period(
        msisdn, "change", product=name, rating_plan=rating_plan, start=start, end=end,
        fee=money(plan.recurring_fee), buckets=period_buckets(plan, start, end, now_ms), anchor=now_ms,
        bonuses=bonuses_for(catalog, "change-plan", plan=name, now_ms=now_ms), now_ms=now_ms)
    await store.set_plan_index(msisdn, rating_plan)
    return result


async def buy_addon(store: BalanceStore, catalog: Catalog, msisdn: str, name: str, reference: str,
                    now_ms: int) -> CatalogResult:
    addon = catalog.addons.get(name)
    if addon is None:
        known = ", ".join(sorted(catalog.addons)) or "none"
        raise PlanError(f"no add-on {name!r} in the catalog (it has {known})")
    record = await store.plan_record(msisdn)
    if record is None:
        raise UnknownSubscriber(msisdn)
    return await store.buy_addon(
        msisdn, name, money(addon.price), grant_buckets(addon.buckets, now_ms), reference=reference,
        plans=addon.plans, repeatable=addon.repeatable,
        bonuses=bonuses_for(catalog, "addon", plan=record.get("product"), now_ms=now_ms, addon=name),
        now_ms=now_ms)


async def topup_bonuses(store: BalanceStore, catalog: Catalog, msisdn: str, amount: int, reference: str,
                        now_ms: int) -> CatalogResult | None:
    """The top-up promotions a top-up of `amount` earns (None: none applies)."""
    record = await store.plan_record(msisdn)
    if record is None:
        raise UnknownSubscriber(msisdn)
    bonuses = bonuses_for(catalog, "topup", plan=record.get("product"), now_ms=now_ms, topup=amount)
    if not bonuses:
        return None
    return await store.grant_bonuses(msisdn, bonuses, reference=f"topup;{reference}", now_ms=now_ms)


async def renew(store: BalanceStore, catalog: Catalog, msisdn: str, now_ms: int, *,
                suspend_unpaid: bool = True) -> CatalogResult | None:
    """Renews the subscriber if its period has ended: the next period (a missed one is not charged: the new
    period is the one containing now; after a suspension for an unpaid fee it starts now). None when the
    subscriber has no catalog plan (or one the catalog no longer has: it leaves the renewal schedule)."""
    record = await store.plan_record(msisdn)
    if record is None:
        await store.drop_renewal(msisdn)
        return None
    name = record.get("product")
    if not name or name not in catalog.plans or "period_end" not in record:
        if name:
            log.warning("subscriber %s has plan %r, which the catalog does not have: not renewed", msisdn, name)
        await store.drop_renewal(msisdn)
        return None
    plan = catalog.plans[name]
    expect_end = int(record["period_end"])
    if expect_end > now_ms:
        return CatalogResult(applied=False, status="not-due")
    anchor = int(record.get("anchor", record.get("period_start", expect_end)))
    restart = record.get("suspended_for") == "renewal"
    if restart:
        anchor = now_ms
    start, end = period_bounds(plan.period, anchor, max(now_ms, expect_end) if restart else expect_end)
    if end <= now_ms:
        start, end = period_bounds(plan.period, anchor, now_ms)
    return await store.plan_period(
        msisdn, "renew", product=name, rating_plan=rating_plan_of(catalog, name), start=start, end=end,
        fee=money(plan.recurring_fee), buckets=period_buckets(plan, start, end, anchor), expect_end=expect_end,
        anchor=anchor if restart else None, suspend_unpaid=suspend_unpaid, now_ms=now_ms)


class RenewalSweep:
    """Renews every subscriber whose period is due (renew:{pNNN} by score), every `interval` seconds; any
    number of processes may run one: the script renews a period once (the record's period_end must still be
    the one read). `on_renewed(msisdn)`: e.g. a RAR to its sessions (ServerApp.subscriber_changed)."""

    def __init__(self, store: BalanceStore, clock: Clock, interval: float = 60.0,
                 on_renewed: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.on_renewed = on_renewed
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def sweep(self) -> dict[str, int]:
        """One pass: {"renewed", "unpaid", "skipped"}."""
        stored = await read_catalog(self.store.redis)
        counts = {"renewed": 0, "unpaid": 0, "skipped": 0}
        if stored is None:
            return counts
        now = self.clock.now_ms()
        seen: set[str] = set()
        while True:
            due = [(msisdn, end) for msisdn, end in await self.store.due_renewals(now) if msisdn not in seen]
            if not due:
                return counts
            for msisdn, _ in due:
                seen.add(msisdn)
                try:
                    result = await renew(self.store, stored.catalog, msisdn, now)
                except (CatalogRefused, UnknownSubscriber, ValueError) as exc:
                    log.warning("renewal of %s failed: %s", msisdn, exc)
                    counts["skipped"] += 1
                    continue
                if result is None or not result.applied:
                    counts["unpaid" if result is not None and result.status == "unpaid" else "skipped"] += 1
                    continue
                counts["renewed"] += 1
                if self.on_renewed is not None:
                    try:
                        await self.on_renewed(msisdn)
                    except Exception as exc:  # a RAR that fails must not stop the sweep
                        log.warning("after renewing %s: %s", msisdn, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps every `interval` seconds until `stop` is set; a failed pass is logged and retried."""
        while not stop.is_set():
            try:
                counts = await self.sweep()
                if counts["renewed"] or counts["unpaid"]:
                    log.info("renewals: %(renewed)d renewed, %(unpaid)d unpaid", counts)
            except Exception as exc:
                log.warning("renewal pass failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
