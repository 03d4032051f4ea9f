"""Pricing with a compiled RatingSchedule: integer arithmetic only, mirrored line for line by charge.lua.

Price enquiries, tests and billing checks use these functions; the charge script must compute exactly the
same numbers, so the algorithms are written to be mirrored with Lua doubles: every intermediate value is
an integer below 2^53 for any schedule that compile.py accepts (it checks the two largest products named
below), and every division is a floor or ceiling of non-negative integers.

    amount_for_units(units):  n   = ceil(units / increment)
                              raw = ceil(n × price_num / price_den)            n × num < 2^53 for n ≤ n_max
                              amount = round_to_minor(raw)
    affordable_units(money):  if amount_for_units(max_quota) ≤ money → max_quota   (the clamp: money × den
                              below is then < n_max × num + den, whatever the balance)
                              T = largest raw amount that rounds to ≤ money   (_largest_raw_within)
                              n = floor(T × price_den / price_num);  return n × increment

A Lua mirror dividing doubles must correct the quotient (q = floor(a / b); fix q while q × b > a or
(q + 1) × b ≤ a), because a / b of two exact doubles can round up to the next integer.
"""

from __future__ import annotations

from ratecards.schedule import ROUNDING_MODES, RatingSchedule

__all__ = ["affordable_units", "amount_for_units", "increments_for_units", "round_to_minor"]


def round_to_minor(amount_micro: int, minor: int, mode: str) -> int:
    """Round a non-negative micro-unit amount to a whole number of minor units (minor micro-units each)."""
    if amount_micro < 0 or minor <= 0:
        raise ValueError(f"round_to_minor needs amount ≥ 0 and minor > 0, got {amount_micro}, {minor}")
    whole, rest = divmod(amount_micro, minor)
    if rest == 0:
        return amount_micro
    if mode == "up":
        whole += 1
    elif mode == "half-up":
        whole += 2 * rest >= minor
    elif mode == "half-even":
        whole += 2 * rest > minor or (2 * rest == minor and whole % 2 == 1)
    elif mode != "down":
        raise ValueError(f"unknown rounding mode {mode!r} (one of {', '.join(ROUNDING_MODES)})")
    return whole * minor


def increments_for_units(s: RatingSchedule, units: int) -> int:
    """How many billing increments `units` occupies: a started increment is a whole increment."""
    return -(-units // s.increment) if units > 0 else 0


def amount_for_units(s: RatingSchedule, units: int) -> int:
    """Micro-units charged for `units` (≤ 0 costs nothing), rounded once to the minor unit."""
    n = increments_for_units(s, units)
    raw = -(-n * s.price_num // s.price_den)
    return round_to_minor(raw, s.minor, s.rounding)


def _largest_raw_within(money: int, minor: int, mode: str) -> int:
    """The largest raw micro-unit amount x ≥ 0 with round_to_minor(x) ≤ money (money ≥ 0).

    With k = floor(money / minor): "up" keeps x ≤ k·minor; "down" allows anything below (k+1)·minor;
    the half modes allow up to the midpoint above k·minor, the midpoint itself only when it rounds down
    (half-even with k even).
    """
    k = money // minor
    base = k * minor
    if mode == "up":
        return base
    if mode == "down":
        return base + minor - 1
    half, odd = divmod(minor, 2)
    if odd:  # no exact midpoint: anything up to floor(minor / 2) above rounds down
        return base + half
    if mode == "half-up" or (mode == "half-even" and k % 2 == 1):
        return base + half - 1
    if mode == "half-even":
        return base + half
    raise ValueError(f"unknown rounding mode {mode!r} (one of {', '.join(ROUNDING_MODES)})")


def affordable_units(s: RatingSchedule, money: int) -> int:
    """The largest multiple of the increment, at most max_quota, whose amount_for_units ≤ money.

    A free rate affords max_quota (never "unlimited"); money ≤ 0 affords nothing unless it is free.
    """
    if s.price_num == 0:
        return s.max_quota
    if money < 0:
        return 0
    if amount_for_units(s, s.max_quota) <= money:
        return s.max_quota
    ceiling = _largest_raw_within(money, s.minor, s.rounding)
    return ceiling * s.price_den // s.price_num * s.increment
