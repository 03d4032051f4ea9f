"""Discount promotions as rate-card versions: "percent off the rates of some rating groups of a plan between two
dates" becomes two versions of the card — one effective at the start with the discounted prices, one effective
at the end with the prices as they were — so online charging, `ocs rate` and billing, which all rate with the
version in force when the usage happened, price it the same to the micro-unit.

What is discounted: the rate's `price` and its tiers' prices, and the same in each of its tariffs (per-unit
prices, exact decimals: no rounding here; the card's rounding applies to the amounts as usual). Setup fees,
minimum charges and caps are amounts in minor units and stay as they are. Also `to_toml`, which writes a card
back as TOML (the version files are TOML). Pure code, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import msgspec

from ratecards.model import Plan, Rate, RateCard, RateCardError, Tier

__all__ = ["discount_versions", "discounted_card", "to_toml"]


def _off(price: str | None, factor: Decimal) -> str | None:
    if price is None:
        return None
    value = (Decimal(price.strip()) * factor).normalize()
    return format(value, "f")


def _tiers(tiers: Sequence[Tier] | None, factor: Decimal) -> list[Tier] | None:
    if tiers is None:
        return None
    return [msgspec.structs.replace(tier, price=_off(tier.price, factor)) for tier in tiers]


def _discount_rate(rate: Rate, factor: Decimal) -> Rate:
    tariffs = [msgspec.structs.replace(t, price=_off(t.price, factor), tiers=_tiers(t.tiers, factor))
               for t in rate.tariffs]
    return msgspec.structs.replace(rate, price=_off(rate.price, factor), tiers=_tiers(rate.tiers, factor) or [],
                                   tariffs=tariffs)


def discounted_card(card: RateCard, plans: Sequence[str], rating_groups: Sequence[int], percent: Decimal | str, *,
                    version: str, effective_from: datetime) -> RateCard:
    """`card` with `percent` off the prices of `rating_groups` in `plans`, as version `version` from
    `effective_from`."""
    factor = 1 - Decimal(percent) / 100
    if not 0 <= factor < 1:
        raise RateCardError(f"a discount is more than 0 and at most 100 percent, got {percent}")
    wanted = set(rating_groups)
    new_plans: dict[str, Plan] = dict(card.plans)
    for name in plans:
        if name not in card.plans:
            raise RateCardError(f"no plan {name!r} to discount", source=f"rate card {card.version!r}")
        plan = card.plans[name]
        rates = [_discount_rate(r, factor) if r.rating_group in wanted and r.price is not None else r
                 for r in plan.rates]
        new_plans[name] = msgspec.structs.replace(plan, rates=rates)
    return msgspec.structs.replace(card, plans=new_plans, version=version, effective_from=effective_from)


def discount_versions(before_start: RateCard, before_end: RateCard, name: str, plans: Sequence[str],
                      rating_groups: Sequence[int], percent: Decimal | str, start: datetime,
                      end: datetime) -> list[RateCard]:
    """The two versions of promotion `name`: `before_start` (the version in force at `start`) discounted from
    `start`, and `before_end` (the version that would be in force at `end`) as it is again from `end`."""
    return [
        discounted_card(before_start, plans, rating_groups, percent, version=f"{before_start.version}.{name}",
                        effective_from=start),
        msgspec.structs.replace(before_end, version=f"{before_end.version}.{name}-end", effective_from=end),
    ]


# ---- TOML -------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else _scalar(name)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _table(lines: list[str], path: str, data: dict[str, Any], array: bool = False) -> None:
    """Scalars (and lists of them) as `key = value`, then non-empty dicts as sub-tables and lists of dicts as
    arrays of tables (a header under an array of tables names its last element, as TOML says)."""
    if path:
        lines.append(f"\n[[{path}]]" if array else f"\n[{path}]")
    nested = []
    for key, value in data.items():
        if value is None or (isinstance(value, dict) and not value):
            continue
        if isinstance(value, dict) or _is_table_list(value):
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_scalar(value)}")
    for key, value in nested:
        child = f"{path}.{_key(key)}" if path else _key(key)
        if isinstance(value, list):
            for item in value:
                _table(lines, child, item, array=True)
        else:
            _table(lines, child, value)


def to_toml(card: RateCard) -> str:
    """The card as TOML that parse_ratecard reads back to an equal card."""
    data = msgspec.to_builtins(card, builtin_types=(datetime, date, time))
    lines: list[str] = [f"# rate card version {card.version}"]
    _table(lines, "", data)
    return "\n".join(lines) + "\n"
