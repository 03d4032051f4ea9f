"""Pricing with a compiled RatingSchedule: integer arithmetic only, mirrored line for line by the charge script.

Price enquiries, tests and billing use these functions; the charge script (balances/lua/common.lua) must
compute exactly the same numbers, so the algorithms are written to be mirrored with Lua doubles: every
intermediate value is an integer below 2^53 for any schedule that compile.py accepts, and every division
is a floor or ceiling of non-negative integers.

Spine schedules (no extended field set; what common.lua does today, unchanged):

    amount_for_units(units):  n   = ceil(units / increment)
                              raw = ceil(n × price_num / price_den)            n × num < 2^53 for n ≤ n_max
                              amount = round_to_minor(raw)
    affordable_units(money):  if amount_for_units(max_quota) ≤ money → max_quota   (the clamp: money × den
                              below is then < n_max × num + den, whatever the balance)
                              T = largest raw amount that rounds to ≤ money   (_largest_raw_within)
                              n = floor(T × price_den / price_num);  return n × increment
                              (common.lua finds the same n by binary search over price_increments)

A Lua mirror dividing doubles must correct the quotient (q = floor(a / b); fix q while q × b > a or
(q + 1) × b ≤ a), because a / b of two exact doubles can round up to the next integer.

======================================== WHAT THE CHARGE SCRIPT MIRRORS ===========================================
All of items 1-8 below are mirrored by balances/lua/common.lua (price_count, raw_for_increments,
cumulative_amount, charge_for_usage, view_affordable, commit_part / plan_grant for item 6, the counters and
views for item 7, check_extended for item 8) and applied by charge.lua and event.lua; tests/test_lua_pricing.py
checks the Lua against these functions with random schedules and usage splits.
Extended schedules (`is_extended(s)`: any of first_increment, setup_fee, minimum_charge, free_units, tiers, cap
set, or scope ≠ "report") are priced by the functions below. To port them into common.lua:

 1. increments_for_units(s, U): n = ceil(U / increment) for U > 0 (0 otherwise); if first_increment > 0,
    n = max(n, first_increment / increment)  (compile.py guarantees first_increment is a multiple).
 2. raw_for_increments(s, n): graduated tiers. With the base price (price_num, price_den) from increment 0 and
    each tier (from_n, num, den) from increment from_n on, in order:
        raw = Σ over segments [a, b) ∩ [0, n) of price_count(b − a, num, den)
        price_count(c, num, den) = q × num + ceil(r × num / den)  with q = floor(c / den), r = c − q × den
    i.e. each segment is ceiled on its own (≤ 1 micro-unit per segment), never c × num (c may be a whole
    month of usage). compile.py checks num × den < 2^53 for every price of an extended schedule, so r × num
    is exact; q × num ≤ the amount itself.
 3. amount_for_units(s, U) — the cumulative charge C(U) of U units counted in the scope:
        C(U) = 0 if U ≤ free_units, else
        round_to_minor(max(raw_for_increments(s, increments_for_units(s, U − free_units)), minimum_charge)
                       + setup_fee)
    (round_to_minor as today; with rounding step "increment" compile.py already made every price a whole
    number of minor units, so this rounding is then a no-op — nothing extra to mirror for the step.)
 4. charge_for_usage(s, u, used_before, spent_before) — what a usage report of u units costs:
        a = C(used_before + u) − C(used_before)            (0 when u ≤ 0)
        if cap > 0: a = min(a, max(0, cap − spent_before))
    Splitting usage into reports therefore telescopes: the reports of one scope sum to C(total), to the
    micro-unit, however the gateway splits them.
 5. affordable_usage(s, money, used_before, spent_before): the largest k × increment ≤ max_quota with
    charge_for_usage(k × increment) ≤ money, by binary search over k exactly like affordable_increments in
    common.lua (charge_for_usage is monotone in u). money < 0 affords 0; a charge of 0 for max_quota affords
    max_quota.
 6. A grant spanning a Tariff-Time-Change is reserved at the dearer tariff: dearer_charge = max over the
    schedules of charge_for_usage; affordable_for_all = min over them of affordable_usage. UNIT_INDETERMINATE
    usage is charged with dearer_charge.
 7. State the script keeps for `used_before` / `spent_before` (nothing for scope "report" without cap):
      scope "session": cumulative units of the session × rating group, e.g. "c" in the r:<rg> reservation
                        JSON of ses:{pNNN}:<id>; it survives reservation release and is never refunded.
      scope day/week/month: units per subscriber × rating group × period, e.g. hash use:{pNNN}:<msisdn> field
                        "<rg>:<period key>"; the key comes from Python (Rater.period_key(at, scope)): Lua has
                        no time zones. Fields of other periods can be deleted when a new one is written.
      cap:              micro-units charged per subscriber × rating group × cap_period, same layout with
                        field "<rg>:cap:<period key>" (Rater.period_key(at, cap_period)).
    Usage paid from allowance buckets is taken before money as today; only the units priced in money
    advance these counters (an allowance is prepaid usage, outside the tariff).
 8. check_schedule: the new fields arrive only when set (msgspec omit_defaults): default first_increment,
    setup_fee, minimum_charge, free_units, cap to 0, tiers to {}, scope to "report", cap_period and tariff to
    ""; check the numbers are non-negative integers, tiers a list of [n, num, den] with increasing n > 0 and
    den > 0, scope one of schedule.SCOPES, cap_period one of PERIODS when cap > 0. `tariff` (the tariff's
    name) is for the CDR beside ratingVersion.
================================================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable

from ratecards.schedule import ROUNDING_MODES, RatingSchedule

__all__ = [
    "affordable_for_all",
    "affordable_units",
    "affordable_usage",
    "amount_for_units",
    "charge_for_usage",
    "dearer_charge",
    "increments_for_units",
    "is_extended",
    "raw_for_increments",
    "round_to_minor",
]


def round_ratio(num: int, den: int, minor: int, mode: str) -> int:
    """num/den micro-units rounded to a whole number of minor units (minor micro-units each): the one rounding
    rule of the project, used by online charging (round_to_minor), price enquiry and billing (taxes, proration).

    Exact: the comparison with the half is done on integers. A negative value rounds like its absolute value,
    so crediting a charge gives back exactly what the charge took."""
    if den <= 0 or minor <= 0:
        raise ValueError("round_ratio needs den > 0 and minor > 0")
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r} (one of {', '.join(ROUNDING_MODES)})")
    sign = -1 if num < 0 else 1
    step = den * minor
    whole, rest = divmod(abs(num), step)
    if rest:
        if mode == "up":
            whole += 1
        elif mode == "half-up":
            whole += 2 * rest >= step
        elif mode == "half-even":
            whole += 2 * rest > step or (2 * rest == step and whole % 2 == 1)
    return sign * whole * minor


def round_to_minor(amount_micro: int, minor: int, mode: str) -> int:
    """Round a non-negative micro-unit amount to a whole number of minor units (minor micro-units each).
    balances/lua/common.lua mirrors exactly this."""
    if amount_micro < 0 or minor <= 0:
        raise ValueError(f"round_to_minor needs amount ≥ 0 and minor > 0, got {amount_micro}, {minor}")
    return round_ratio(amount_micro, 1, minor, mode)


def is_extended(s: RatingSchedule) -> bool:
    """True when the schedule uses pricing beyond the spine's (the charge script needs the extended path)."""
    return bool(s.first_increment or s.setup_fee or s.minimum_charge or s.free_units or s.tiers or s.cap
                or s.scope != "report")


def increments_for_units(s: RatingSchedule, units: int) -> int:
    """How many billing increments `units` occupies: a started increment is a whole one, and any usage
    occupies at least the first increment."""
    if units <= 0:
        return 0
    n = -(-units // s.increment)
    first = s.first_increment // s.increment
    return n if n >= first else first


def _price_count(count: int, num: int, den: int) -> int:
    """ceil(count × num / den) without forming count × num (count may be a month of usage)."""
    whole, rest = divmod(count, den)
    return whole * num + -(-rest * num // den)


def raw_for_increments(s: RatingSchedule, n: int) -> int:
    """Micro-units (before rounding) of n increments over the base price and the graduated tiers."""
    if n <= 0:
        return 0
    if not s.tiers:
        return _price_count(n, s.price_num, s.price_den)
    raw, start, num, den = 0, 0, s.price_num, s.price_den
    for tier_start, tier_num, tier_den in s.tiers:
        if n <= tier_start:
            break
        raw += _price_count(tier_start - start, num, den)
        start, num, den = tier_start, tier_num, tier_den
    return raw + _price_count(n - start, num, den)


def amount_for_units(s: RatingSchedule, units: int) -> int:
    """Micro-units charged for `units` counted from the start of the scope (≤ 0 costs nothing), rounded once
    to the minor unit. For a spine schedule: ceil(n × num / den) rounded, as the charge script computes."""
    if units <= s.free_units:
        return 0
    n = -(-(units - s.free_units) // s.increment)  # increments_for_units, inlined: this runs per request
    if s.first_increment and n * s.increment < s.first_increment:
        n = s.first_increment // s.increment
    raw = _price_count(n, s.price_num, s.price_den) if not s.tiers else raw_for_increments(s, n)
    if raw < s.minimum_charge:
        raw = s.minimum_charge
    return round_to_minor(raw + s.setup_fee, s.minor, s.rounding)


def charge_for_usage(s: RatingSchedule, units: int, *, used_before: int = 0, spent_before: int = 0) -> int:
    """What a report of `units` costs when `used_before` units of the scope were already rated and
    `spent_before` micro-units of the cap period already charged: C(used + units) − C(used), capped."""
    if units <= 0:
        return 0
    amount = amount_for_units(s, used_before + units) - amount_for_units(s, used_before)
    if s.cap:
        room = s.cap - spent_before
        amount = (amount if amount < room else room) if room > 0 else 0
    return amount


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
    Extended schedules go through affordable_usage (same answer, by search).
    """
    if is_extended(s):
        return affordable_usage(s, money)
    if s.price_num == 0:
        return s.max_quota
    if money < 0:
        return 0
    if amount_for_units(s, s.max_quota) <= money:
        return s.max_quota
    ceiling = _largest_raw_within(money, s.minor, s.rounding)
    return ceiling * s.price_den // s.price_num * s.increment


def affordable_usage(s: RatingSchedule, money: int, *, used_before: int = 0, spent_before: int = 0) -> int:
    """The largest k × increment ≤ max_quota whose charge_for_usage fits in `money` (binary search over k,
    as the charge script does: the charge is monotone in the units)."""
    kmax = s.max_quota // s.increment
    full = charge_for_usage(s, kmax * s.increment, used_before=used_before, spent_before=spent_before)
    if full <= money or full == 0:
        return kmax * s.increment
    if money < 0:
        return 0
    lo, hi = 0, kmax  # charge(lo) ≤ money < charge(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if charge_for_usage(s, mid * s.increment, used_before=used_before, spent_before=spent_before) <= money:
            lo = mid
        else:
            hi = mid
    return lo * s.increment


def dearer_charge(schedules: Iterable[RatingSchedule], units: int, *, used_before: int = 0,
                  spent_before: int = 0) -> int:
    """The charge at the dearest of the schedules: a grant spanning a Tariff-Time-Change is reserved at it,
    and UNIT_INDETERMINATE usage is charged at it."""
    return max(charge_for_usage(s, units, used_before=used_before, spent_before=spent_before) for s in schedules)


def affordable_for_all(schedules: Iterable[RatingSchedule], money: int, *, used_before: int = 0,
                       spent_before: int = 0) -> int:
    """Units `money` covers whichever of the schedules applies (the smallest of their affordable_usage)."""
    return min(affordable_usage(s, money, used_before=used_before, spent_before=spent_before) for s in schedules)
