"""Rate cards: parse, validate and compile versioned tariffs into integer price schedules, and rate requests.

Pure code, no I/O beyond parsing text handed to it (and reading one file in load_ratecard); money is
integer micro-units, time is passed in. Never import protocol, balances or ocs from here.
"""

from ratecards.compile import (
    compile_plan,
    compile_ratecard,
    compile_tariffs,
    initial_allowances,
    load_ratecard,
    parse_ratecard,
    validate_ratecard,
)
from ratecards.keys import (
    SERVICE_KINDS,
    PrefixTable,
    normalize_number,
    normalize_plmn,
    plmn_from_user_location_info,
    service_context_kind,
)
from ratecards.model import Allowance, Band, Plan, Rate, RateCard, RateCardError, Tariff, Tier
from ratecards.pricing import (
    affordable_for_all,
    affordable_units,
    affordable_usage,
    amount_for_units,
    charge_for_usage,
    dearer_charge,
    increments_for_units,
    is_extended,
    round_to_minor,
)
from ratecards.rater import (
    DEFAULT_RELOAD_INTERVAL,
    Quote,
    QuotePart,
    Rater,
    UnknownRate,
    check_new_version,
    compile_card,
    describe_changes,
    effective_epoch,
)
from ratecards.schedule import PERIODS, ROUNDING_MODES, ROUNDING_STEPS, SCOPES, UNIT_KINDS, RatingSchedule

__all__ = [
    "DEFAULT_RELOAD_INTERVAL",
    "PERIODS",
    "ROUNDING_MODES",
    "ROUNDING_STEPS",
    "SCOPES",
    "SERVICE_KINDS",
    "UNIT_KINDS",
    "Allowance",
    "Band",
    "Plan",
    "PrefixTable",
    "Quote",
    "QuotePart",
    "Rate",
    "RateCard",
    "RateCardError",
    "Rater",
    "RatingSchedule",
    "Tariff",
    "Tier",
    "UnknownRate",
    "affordable_for_all",
    "affordable_units",
    "affordable_usage",
    "amount_for_units",
    "charge_for_usage",
    "check_new_version",
    "compile_card",
    "compile_plan",
    "compile_ratecard",
    "compile_tariffs",
    "dearer_charge",
    "describe_changes",
    "effective_epoch",
    "increments_for_units",
    "initial_allowances",
    "is_extended",
    "load_ratecard",
    "normalize_number",
    "normalize_plmn",
    "parse_ratecard",
    "plmn_from_user_location_info",
    "round_to_minor",
    "service_context_kind",
    "validate_ratecard",
]
