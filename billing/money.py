"""Money arithmetic for billing: integer micro-units, exact ratios, Decimal only at the edges.

Every amount is an int of micro-units (10^-6 of the currency unit). Rates (tax, proration) are exact
fractions: `round_ratio(num, den, ...)` rounds num/den micro-units to a whole minor unit with one of the
rate card's rounding modes, symmetrically for negative amounts (a credit rounds like the charge it undoes).
Usage amounts are never re-rounded here: online charging already rounded them into the CDR.
Must not import anything outside the standard library and ratecards.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from fractions import Fraction

from ratecards.pricing import round_ratio  # the project's one rounding rule

MICRO = 1_000_000

__all__ = ["MICRO", "MoneyError", "format_money", "minor_of", "parse_money", "parse_rate", "prorate",
           "round_ratio", "tax_of", "to_decimal"]


class MoneyError(ValueError):
    """An amount or rate that cannot be used, worded for the operator."""


def minor_of(minor_digits: int) -> int:
    """Micro-units in one minor currency unit (10_000 for cents)."""
    if not 0 <= minor_digits <= 6:
        raise MoneyError(f"currency minor digits must be 0..6, got {minor_digits}")
    return 10 ** (6 - minor_digits)


def parse_money(text: str | int | Decimal, minor_digits: int, *, allow_negative: bool = False,
                allow_zero: bool = False, what: str = "amount") -> int:
    """A decimal amount in currency units → micro-units; refuses floats, NaN and more decimals than the
    currency has (an amount is never rounded silently on the way in)."""
    if isinstance(text, float):
        raise MoneyError(f"{what} must be a decimal string, not a float: {text!r}")
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise MoneyError(f"{what} {text!r} is not a number") from None
    if not value.is_finite():
        raise MoneyError(f"{what} {text!r} is not a finite number")
    if value < 0 and not allow_negative or value == 0 and not allow_zero:
        raise MoneyError(f"{what} must be {'non-zero' if allow_negative else 'positive'}, got {text}")
    if value != value.quantize(Decimal(1).scaleb(-minor_digits)):
        raise MoneyError(f"{what} {text} has more than {minor_digits} decimals")
    micro = int(value * MICRO)
    if abs(micro) > 10**17:
        raise MoneyError(f"{what} {text} is too large")
    return micro


def parse_rate(text: str, *, what: str = "rate") -> Fraction:
    """A decimal rate such as "0.19" → an exact Fraction in [0, 10]."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise MoneyError(f"{what} {text!r} is not a decimal number") from None
    if not value.is_finite() or not 0 <= value <= 10:
        raise MoneyError(f"{what} must be between 0 and 10, got {text!r}")
    return Fraction(value)


def tax_of(amount: int, rate: Fraction, minor: int, mode: str) -> int:
    """Tax on one line: amount × rate, rounded once to the minor unit."""
    return round_ratio(amount * rate.numerator, rate.denominator, minor, mode)


def prorate(fee: int, day_from: int, day_to: int, days_in_cycle: int, minor: int, mode: str) -> int:
    """The part of a cycle fee for days [day_from, day_to) of a cycle of `days_in_cycle` days.

    Cumulative rounding: the amount is cum(day_to) − cum(day_from) with cum(k) = round(fee × k / days),
    so any split of a cycle (a plan change, a credit of the unused days) adds up to exactly `fee`, and a
    credit of days billed before equals what those days cost."""
    if not 0 <= day_from <= day_to <= days_in_cycle:
        raise ValueError(f"bad day range [{day_from}, {day_to}) of {days_in_cycle}")

    def cum(k: int) -> int:
        return round_ratio(fee * k, days_in_cycle, minor, mode)

    return cum(day_to) - cum(day_from)


def to_decimal(micro: int) -> Decimal:
    return Decimal(micro) / MICRO


def format_money(micro: int, minor_digits: int = 2) -> str:
    """Micro-units as a plain decimal string with the currency's decimals (more only when needed)."""
    value = Decimal(micro).scaleb(-6)
    digits = max(minor_digits, 0)
    if micro % minor_of(min(digits, 6)) == 0:
        return f"{value:.{digits}f}"
    return f"{value.normalize():f}"
