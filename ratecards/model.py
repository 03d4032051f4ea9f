"""The rate card as written in TOML: plain msgspec structures, decoded strictly.

These mirror the file one to one (field names are the TOML keys) so a validation error can name the key
the operator has to fix. Nothing here computes prices: compile.py turns a `Plan` into integer
`RatingSchedule`s. Prices stay Decimal strings until then, so a tariff is never read through a float.
"""

from __future__ import annotations

from datetime import date, datetime

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
    "Band",
    "GrantLimit",
    "Plan",
    "Rate",
    "RateCard",
    "RateCardError",
    "Tariff",
    "Tier",
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


class FairUsage(msgspec.Struct, forbid_unknown_fields=True):
    """A fair-usage policy of a rating group: after `units` units in a `period` (day / week / month in the
    card's time zone; every unit used, from allowances or money), grants stop there and the gateway is told to
    restrict the user (Final-Unit-Action RESTRICT_ACCESS with these Filter-Ids / Restriction-Filter-Rules,
    e.g. a throttling policy) until the next period."""

    units: int
    period: str = "month"
    filter_id: str | list[str] | None = None
    restriction_filter_rule: str | list[str] | None = None


class Tier(msgspec.Struct, forbid_unknown_fields=True):
    """A graduated price step: from `from` units of the scope on, usage costs `price` per `per` units."""

    start: int = msgspec.field(name="from")
    price: str


class Tariff(msgspec.Struct, forbid_unknown_fields=True):
    """Another price for the rate, used when every condition it names holds (the first such tariff in the
    rate's list wins; none → the rate's own price). A condition is one value or a list of alternatives.
    Pricing keys left out are the rate's; quota control (grants, Validity-Time, FUI ...) stays the rate's."""

    name: str = ""  # shown in enquiries and CDRs (schedule.tariff); default: the conditions
    # ---- conditions ----
    band: str | list[str] | None = None  # time band names (the card's [[bands]])
    zone: str | list[str] | None = None  # roaming zones (the card's [zones], from the serving MCC-MNC)
    destination: str | list[str] | None = None  # destination groups (the card's [destinations])
    context: str | list[str] | None = None  # Service-Context-Id kind: data | voice | sms | content
    service_identifier: int | list[int] | None = None  # Service-Identifier of the MSCC
    # ---- pricing overrides ----
    price: str | None = None
    per: int | None = None
    increment: int | None = None
    first_increment: int | None = None
    setup_fee: str | None = None
    minimum_charge: str | None = None
    free_units: int | None = None
    tiers: list[Tier] | None = None
    cap: str | None = None
    barred: bool | None = None


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
    # true: served only from an allowance bucket (a bundle or add-on); without one left, a request for units
    # is answered 5030 in its MSCC with the final_unit_action (e.g. REDIRECT to the shop), never from money
    requires_bundle: bool = False
    fair_usage: FairUsage | None = None  # throttle / restrict after so many units per period
    # ---- extended pricing (all optional) ----
    first_increment: int | None = None  # units of the first increment: 30/6 voice is first_increment = 30,
    #                                     increment = 6; a multiple of increment
    setup_fee: str | None = None  # Decimal string, charged once per scope when usage becomes billable
    minimum_charge: str | None = None  # Decimal string: billable usage of a scope costs at least this
    free_units: int = 0  # the first units of each scope are free (no setup fee either)
    tiers: list[Tier] = []  # graduated steps after the base price, counted in the scope
    cap: str | None = None  # Decimal string: at most this much per cap_period (per subscriber × rating group)
    cap_period: str = "day"  # day | week | month (the card's time zone)
    scope: str = "report"  # report | session | day | week | month: what increments, setup fee, minimum
    #                        charge, tiers and free units count over
    tariffs: list[Tariff] = []  # other prices by time band, roaming zone, destination, service


class Band(msgspec.Struct, forbid_unknown_fields=True):
    """A named time band: on `days`, from `from` to `to` local time (HH:MM) in the card's time zone."""

    name: str
    days: list[str]  # mon tue wed thu fri sat sun, weekdays, weekend, holidays, all
    start: str = msgspec.field(name="from")
    end: str = msgspec.field(name="to")


class Plan(msgspec.Struct, forbid_unknown_fields=True):
    rates: list[Rate]
    description: str = ""
    allowances: list[Allowance] = []
    # rating group used for plain RFC 4006 requests that carry no Multiple-Services-Credit-Control
    default_rating_group: int | None = None


class RateCard(msgspec.Struct, forbid_unknown_fields=True):
    """One version of a rate card. A card without effective_from, bands, zones or destinations is the
    spine's card: one version in force forever, one band."""

    version: str  # written into every CDR as ratingVersion
    currency: str  # ISO 4217 code
    currency_minor_digits: int  # 2 → one minor unit is 10_000 micro-units
    rounding: str  # one of ROUNDING_MODES, the card's single rounding policy
    plans: dict[str, Plan]
    # when this version takes effect (a local date-time is in `timezone`); None: in force since forever
    effective_from: datetime | None = None
    timezone: str = "UTC"  # IANA name: time bands, holidays and cap/scope periods use it
    rounding_step: str = "usage"  # usage | increment: where `rounding` applies (ratecards.schedule)
    holidays: list[date] = []
    bands: list[Band] = []
    # roaming zones: zone → serving-network prefixes (MCC "208" or MCC-MNC "20801"; "" matches any)
    zones: dict[str, list[str]] = {}
    # destination groups: group → number prefixes in international format without "+" ("" matches any)
    destinations: dict[str, list[str]] = {}
    country_code: str = ""  # replaces national_prefix in national numbers ("0170..." → "49170...")
    national_prefix: str = "0"
    international_prefix: str = "00"
    # Service-Context-Id (full, or "<label>@<domain>") → data | voice | sms | content, beyond the 3GPP ones
    service_contexts: dict[str, str] = {}
