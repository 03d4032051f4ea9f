"""Rate cards: parse, validate and compile tariffs into integer price schedules.

Pure code, no I/O beyond parsing text handed to it; money is integer micro-units.
Never import protocol, balances or ocs from here.
"""
