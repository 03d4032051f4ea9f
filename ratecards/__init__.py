"""Rate cards: parse, validate and compile tariffs into integer price schedules.

Pure code, no I/O beyond parsing text handed to it; money is integer micro-units.
Never import protocol, balances or ocs from here.
"""

from ratecards.compile import (
    compile_plan,
    compile_ratecard,
    initial_allowances,
    load_ratecard,
    parse_ratecard,
    validate_ratecard,
)
from ratecards.model import Allowance, Plan, Rate, RateCard, RateCardError
from ratecards.pricing import affordable_units, amount_for_units, increments_for_units, round_to_minor
from ratecards.schedule import ROUNDING_MODES, UNIT_KINDS, RatingSchedule

__all__ = [
    "ROUNDING_MODES",
    "UNIT_KINDS",
    "Allowance",
    "Plan",
    "Rate",
    "RateCard",
    "RateCardError",
    "RatingSchedule",
    "affordable_units",
    "amount_for_units",
    "compile_plan",
    "compile_ratecard",
    "increments_for_units",
    "initial_allowances",
    "load_ratecard",
    "parse_ratecard",
    "round_to_minor",
    "validate_ratecard",
]
