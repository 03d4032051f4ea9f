"""The rate card as written in TOML: plain msgspec structures, decoded strictly.

These mirror the file one to one (field names are the TOML keys) so a validation error can name the key
the operator has to fix. Nothing here computes prices: compile.py turns a `Plan` into integer
`RatingSchedule`s. Prices stay Decimal strings until then, so a tariff is never read through a float.
"""

from __future__ import annotations

import msgspec

from ratecards.schedule import ROUNDING_MODES, UNIT_KINDS

__all__ = [
    "FINAL_UNIT_ACTIONS",
    "ROUNDING_MODES",
    "UNIT_KINDS",
    "Allowance",
    "Plan",
    "Rate",
    "RateCard",
    "RateCardError",
]

# Final-Unit-Action (RFC 4006 §8.35) by name, as written in a rate card
FINAL_UNIT_ACTIONS = {"TERMINATE": 0, "REDIRECT": 1, "RESTRICT_ACCESS": 2}


class RateCardError(ValueError):
    """A rate card that cannot be used. The message names the source, the line when known and the key."""

    def __init__(self, message: str, *, source: str = "<string>", line: int | None = None,
                 field: str | None = None) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.reason = message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


class Allowance(msgspec.Struct, forbid_unknown_fields=True):
    """Units granted at provisioning into their own bucket, consumed before money for `rating_groups`."""

    bucket: str
    unit: str
    amount: int
    rating_groups: list[int]


class Rate(msgspec.Struct, forbid_unknown_fields=True):
    """The tariff of one rating group: `price` currency units per `per` units, billed in `increment`s."""

    rating_group: int
    service: str
    unit: str
    price: str  # a Decimal string ("0.01"): TOML floats are refused so prices stay exact
    per: int
    increment: int
    default_quota: int
    max_quota: int
    final_unit_action: str = "TERMINATE"


class Plan(msgspec.Struct, forbid_unknown_fields=True):
    rates: list[Rate]
    description: str = ""
    allowances: list[Allowance] = []
    # rating group used for plain RFC 4006 requests that carry no Multiple-Services-Credit-Control
    default_rating_group: int | None = None


class RateCard(msgspec.Struct, forbid_unknown_fields=True):
    version: str  # written into every CDR as ratingVersion
    currency: str  # ISO 4217 code
    currency_minor_digits: int  # 2 → one minor unit is 10_000 micro-units
    rounding: str  # one of ROUNDING_MODES, the card's single rounding policy
    plans: dict[str, Plan]
