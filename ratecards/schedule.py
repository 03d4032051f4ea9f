"""The compiled, integer-only price schedule of one plan × rating group.

This is the contract between ratecards (which compiles it) and the charge script in balances (which
applies it atomically). Everything is an int so Lua and Python compute the same amounts.
"""

from __future__ import annotations

import msgspec

UNIT_KINDS = ("bytes", "seconds", "events")
ROUNDING_MODES = ("up", "half-up", "half-even", "down")


class RatingSchedule(msgspec.Struct, frozen=True, omit_defaults=True):
    rating_group: int
    unit: str  # "bytes" | "seconds" | "events": which Diameter unit type is granted and charged
    increment: int  # billing increment in units (1024 bytes, 60 s, 1 event)
    price_num: int  # price of one increment = price_num / price_den micro-units
    price_den: int
    default_quota: int  # units granted for an empty Requested-Service-Unit
    max_quota: int  # upper bound of one grant
    minor: int  # micro-units per minor currency unit (10_000 for cents)
    rounding: str  # one of ROUNDING_MODES, applied once per committed amount
    money_bucket: str = "money"
    allowances: tuple[str, ...] = ()  # allowance bucket ids consumed before money, in order
    final_unit_action: int = 0  # Final-Unit-Action when credit runs out (0 TERMINATE)
    currency: str = "EUR"
    version: str = ""  # rate card version, written to the CDR as ratingVersion
