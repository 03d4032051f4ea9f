"""The compiled, integer-only price schedule of one plan × rating group, with its quota-control settings.

This is the contract between ratecards (which compiles it), the charge script in balances (which applies
the price and grant fields atomically) and ocs.charging (which encodes the quota-control fields into the CCA
once per plan × rating group). Money and units are ints so Lua and Python compute the same amounts. Fields
added later have defaults, so a schedule built in code needs only the price fields.
"""

from __future__ import annotations

import msgspec

UNIT_KINDS = ("bytes", "seconds", "events")
ROUNDING_MODES = ("up", "half-up", "half-even", "down")
# where the rounding to the minor unit happens: once on the amount of a usage (per report or cumulated, see
# SCOPES), or on the price of every increment (at compile time: each increment then costs whole minor units)
ROUNDING_STEPS = ("usage", "increment")
# what increments, first increment, setup fee, minimum charge, tiers and free units count over: each usage
# report on its own (the spine's behaviour), the session × rating group, or a calendar period in the card's
# time zone (per subscriber × rating group)
SCOPES = ("report", "session", "day", "week", "month")
PERIODS = ("day", "week", "month")
# Diameter unit types as named in balances.model.Units (CC-Time, CC-Total/Input/Output-Octets,
# CC-Service-Specific-Units), and the one each rating unit is charged in
UNIT_TYPES = ("time", "total", "input", "output", "units")
PRICED_UNIT_TYPE = {"bytes": "total", "seconds": "time", "events": "units"}
# Final-Unit-Action (RFC 4006 §8.35) and Redirect-Address-Type (§8.38)
TERMINATE, REDIRECT, RESTRICT_ACCESS = 0, 1, 2
REDIRECT_ADDRESS_TYPES = {"IPV4_ADDRESS": 0, "IPV6_ADDRESS": 1, "URL": 2, "SIP_URI": 3}

# the fields only the CCA encoder reads (ocs.charging strips them from what it sends to the charge script)
ANSWER_ONLY_FIELDS = (
    "time_quota_threshold", "volume_quota_threshold", "unit_quota_threshold", "quota_holding_time", "triggers",
    "redirect_address", "redirect_address_type", "filter_ids", "restriction_filter_rules",
    "fair_usage_filter_ids", "fair_usage_restriction_filter_rules",
)


class RatingSchedule(msgspec.Struct, frozen=True, omit_defaults=True):
    rating_group: int
    unit: str  # "bytes" | "seconds" | "events": which quantity is priced (PRICED_UNIT_TYPE says which AVP)
    increment: int  # billing increment in units (1024 bytes, 60 s, 1 event)
    price_num: int  # price of one increment = price_num / price_den micro-units
    price_den: int
    default_quota: int  # priced units granted for an empty Requested-Service-Unit
    max_quota: int  # upper bound of one grant of priced units
    minor: int  # micro-units per minor currency unit (10_000 for cents)
    rounding: str  # one of ROUNDING_MODES, applied once per committed amount
    money_bucket: str = "money"
    allowances: tuple[str, ...] = ()  # allowance bucket ids consumed before money, in order
    final_unit_action: int = TERMINATE  # Final-Unit-Action when credit runs out
    currency: str = "EUR"
    version: str = ""  # rate card version, written to the CDR as ratingVersion
    # ---- quota control (TS 32.299 MSCC / RFC 4006) ----
    # other unit types granted beside the priced one: (UNIT_TYPES name, default, max). Not priced: a cap the
    # gateway also counts down; one in the priced unit's dimension (input/output octets) is capped at the grant
    also_grant: tuple[tuple[str, int, int], ...] = ()
    validity_time: int = 0  # Validity-Time of a grant, seconds (0: not sent)
    # Validity-Time of an answer without units under REDIRECT / RESTRICT_ACCESS: how long the gateway keeps
    # the user redirected or restricted before it asks again
    final_validity_time: int = 0
    time_quota_threshold: int = 0  # seconds (0: not sent)
    volume_quota_threshold: int = 0  # octets (0: not sent)
    unit_quota_threshold: int = 0  # service-specific units (0: not sent)
    quota_holding_time: int | None = None  # seconds; 0 disables it at the gateway, None leaves its default
    triggers: tuple[int, ...] | None = None  # Trigger-Type values; () sends an empty Trigger (none armed)
    redirect_address: str = ""  # REDIRECT: Redirect-Server-Address (a top-up URL)
    redirect_address_type: int = 2  # REDIRECT: Redirect-Address-Type (2 URL)
    filter_ids: tuple[str, ...] = ()  # RESTRICT_ACCESS: Filter-Id values
    restriction_filter_rules: tuple[str, ...] = ()  # RESTRICT_ACCESS: Restriction-Filter-Rule (IPFilterRule)
    credit_control: bool = True  # False: free, answered 4011 without quota; usage recorded with amount 0
    barred: bool = False  # True: answered 4010 (no grant); reported usage is still charged
    # ---- extended pricing (issue 4; all default to "off", so a spine schedule encodes as before). The charge
    # script must apply these as ratecards/pricing.py does (its header lists exactly what to mirror) ----
    first_increment: int = 0  # units of the first increment (30 in 30/6), a multiple of increment; 0 = increment
    setup_fee: int = 0  # micro-units charged once when the scope's usage first becomes billable
    minimum_charge: int = 0  # micro-units: billable usage never costs less (setup fee not included)
    free_units: int = 0  # units of each scope that cost nothing (no setup fee either)
    # graduated price steps after the base price: (from increment n, price_num, price_den), increasing n;
    # increments n.. of the scope cost price_num / price_den micro-units each
    tiers: tuple[tuple[int, int, int], ...] = ()
    scope: str = "report"  # one of SCOPES: over what the items above count
    cap: int = 0  # micro-units: most charged per cap_period per subscriber × rating group (0 = no cap)
    cap_period: str = ""  # one of PERIODS when cap > 0
    tariff: str = ""  # which tariff of the rate this is ("" = the rate's own price), for CDRs and enquiries
    # ---- fair usage and bundles (issue 4 catalog, issue 3 MSCC 5030) ----
    # after fair_usage_units units of this rating group in a fair_usage_period (day / week / month, the card's
    # time zone; all units used, from allowances or money), grants stop there with Final-Unit-Indication
    # RESTRICT_ACCESS carrying these Filter-Ids / Restriction-Filter-Rules (the gateway throttles or
    # restricts); the next period grants again. 0 = no fair-usage policy
    fair_usage_units: int = 0
    fair_usage_period: str = ""
    fair_usage_filter_ids: tuple[str, ...] = ()
    fair_usage_restriction_filter_rules: tuple[str, ...] = ()
    # the rating group is only served from an allowance bucket (a bundle or add-on): without a live bucket
    # serving it, a request for units is answered 5030 USER_UNKNOWN in the MSCC (with the final unit action,
    # e.g. REDIRECT to the shop), not charged from money
    requires_bucket: bool = False
