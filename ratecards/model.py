"""The rate card as written in TOML: plain msgspec structures, decoded strictly.

These mirror the file one to one (field names are the TOML keys) so a validation error can name the key
the operator has to fix. Nothing here computes prices: compile.py turns a `Plan` into integer
`RatingSchedule`s. Prices stay Decimal strings until then, so a tariff is never read through a float.
"""

from __future__ import annotations

import msgspec

from ratecards.schedule import (
    REDIRECT,
    REDIRECT_ADDRESS_TYPES,
    RESTRICT_ACCESS,
    ROUNDING_MODES,
    TERMINATE,
    UNIT_KINDS,
)

__all__ = [
    "FINAL_UNIT_ACTIONS",
    "REDIRECT_ADDRESS_TYPES",
    "ROUNDING_MODES",
    "TRIGGER_TYPES",
    "UNIT_KINDS",
    "Allowance",
    "GrantLimit",
    "Plan",
    "Rate",
    "RateCard",
    "RateCardError",
]

# Final-Unit-Action (RFC 4006 §8.35) by name, as written in a rate card
FINAL_UNIT_ACTIONS = {"TERMINATE": TERMINATE, "REDIRECT": REDIRECT, "RESTRICT_ACCESS": RESTRICT_ACCESS}
# Trigger-Type (TS 32.299 §7.2, AVP 870) by name; a rate card may name them or give the numbers
TRIGGER_TYPES = {
    "CHANGE_IN_SGSN_IP_ADDRESS": 1, "CHANGE_IN_QOS": 2, "CHANGE_IN_LOCATION": 3, "CHANGE_IN_RAT": 4,
    "CHANGE_IN_UE_TIMEZONE": 5, "CHANGEINQOS_TRAFFIC_CLASS": 10, "CHANGEINQOS_RELIABILITY_CLASS": 11,
    "CHANGEINQOS_DELAY_CLASS": 12, "CHANGEINQOS_PEAK_THROUGHPUT": 13, "CHANGEINQOS_PRECEDENCE_CLASS": 14,
    "CHANGEINQOS_MEAN_THROUGHPUT": 15, "CHANGEINQOS_MAXIMUM_BIT_RATE_FOR_UPLINK": 16,
    "CHANGEINQOS_MAXIMUM_BIT_RATE_FOR_DOWNLINK": 17, "CHANGEINQOS_RESIDUAL_BER": 18,
    "CHANGEINQOS_SDU_ERROR_RATIO": 19, "CHANGEINQOS_TRANSFER_DELAY": 20,
    "CHANGEINQOS_TRAFFIC_HANDLING_PRIORITY": 21, "CHANGEINQOS_GUARANTEED_BIT_RATE_FOR_UPLINK": 22,
    "CHANGEINQOS_GUARANTEED_BIT_RATE_FOR_DOWNLINK": 23, "CHANGEINQOS_APN_AGGREGATE_MAXIMUM_BIT_RATE": 24,
    "CHANGEINLOCATION_MCC": 30, "CHANGEINLOCATION_MNC": 31, "CHANGEINLOCATION_RAC": 32,
    "CHANGEINLOCATION_LAC": 33, "CHANGEINLOCATION_CELLID": 34, "CHANGEINLOCATION_TAC": 35,
    "CHANGEINLOCATION_ECGI": 36, "CHANGE_IN_MEDIA_COMPOSITION": 40, "CHANGEINPARTICIPANTS_NUMBER": 50,
    "CHANGE_IN_THRSHLD_OF_PARTICIPANTS_NMB": 51, "CHANGE_IN_USER_PARTICIPATING_TYPE": 52,
    "CHANGE_IN_SERVICE_CONDITION": 60, "CHANGE_IN_SERVING_NODE": 61,
    "CHANGE_IN_ACCESS_FOR_A_SERVICE_DATA_FLOW": 62, "CHANGE_IN_USER_CSG_INFORMATION": 70,
    "CHANGE_IN_HYBRID_SUBSCRIBED_USER_CSG_INFORMATION": 71, "CHANGE_IN_HYBRID_UNSUBSCRIBED_USER_CSG_INFORMATION": 72,
    "CHANGE_OF_UE_PRESENCE_IN_PRESENCE_REPORTING_AREA": 73, "CHANGE_IN_SERVING_PLMN_RATE_CONTROL": 74,
    "CHANGE_IN_APN_RATE_CONTROL": 75,
    "CHANGE_IN_3GPP_PS_DATA_OFF": 76,
}


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


class GrantLimit(msgspec.Struct, forbid_unknown_fields=True):
    """Default and largest grant of one extra unit type (see Rate.also_grant)."""

    default: int
    max: int


class Rate(msgspec.Struct, forbid_unknown_fields=True):
    """The tariff of one rating group: `price` currency units per `per` units, billed in `increment`s, and
    how its quota is controlled (grants, Validity-Time, thresholds, holding time, triggers, final units).

    The price keys may be left out only for a rating group outside credit control (`credit_control = false`);
    compile.py says "missing required key" otherwise.
    """

    rating_group: int
    service: str
    unit: str
    price: str | None = None  # a Decimal string ("0.01"): TOML floats are refused so prices stay exact
    per: int | None = None
    increment: int | None = None
    default_quota: int | None = None  # priced units granted for an empty Requested-Service-Unit
    max_quota: int | None = None
    # other unit types granted too: {time, total, input, output, units} → {default, max}
    also_grant: dict[str, GrantLimit] = {}
    validity_time: int = 0  # seconds, 0 = not sent
    final_validity_time: int | None = None  # REDIRECT / RESTRICT_ACCESS without units (default validity_time)
    time_quota_threshold: int = 0
    volume_quota_threshold: int = 0
    unit_quota_threshold: int = 0
    quota_holding_time: int | None = None  # 0 disables the gateway's holding timer; absent = its default
    triggers: list[int | str] | None = None  # Trigger-Type values or names; [] = an empty Trigger
    final_unit_action: str = "TERMINATE"
    redirect_address: str | None = None  # REDIRECT
    redirect_address_type: str = "URL"  # IPV4_ADDRESS | IPV6_ADDRESS | URL | SIP_URI
    filter_id: str | list[str] | None = None  # RESTRICT_ACCESS
    restriction_filter_rule: str | list[str] | None = None  # RESTRICT_ACCESS
    credit_control: bool = True  # false: free, answered 4011 without quota, usage recorded at amount 0
    barred: bool = False  # true: answered 4010, no grant; reported usage is still charged


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
