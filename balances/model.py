"""Plain data passed to and from BalanceStore. Units are ints; money is integer micro-units."""

from __future__ import annotations

import msgspec

# request types, the same numbers as CC-Request-Type so callers need no mapping
INITIAL, UPDATE, TERMINATION, EVENT = 1, 2, 3, 4
# event actions, the same numbers as Requested-Action
DIRECT_DEBITING, REFUND_ACCOUNT, CHECK_BALANCE, PRICE_ENQUIRY = 0, 1, 2, 3


class Units(msgspec.Struct, omit_defaults=True):
    """Service units as Diameter counts them; None = absent."""

    time: int | None = None  # CC-Time, seconds
    total: int | None = None  # CC-Total-Octets
    input: int | None = None  # CC-Input-Octets
    output: int | None = None  # CC-Output-Octets
    units: int | None = None  # CC-Service-Specific-Units


class MsccCharge(msgspec.Struct, omit_defaults=True):
    """One Multiple-Services-Credit-Control of a request (or the command-level units of a plain RFC 4006
    client, as rating group 0 / the configured default)."""

    rating_group: int
    schedule: dict  # ratecards.RatingSchedule as a dict (msgspec.to_builtins), cached by the caller
    service_id: int | None = None
    used: Units | None = None  # Used-Service-Unit(s), summed
    requested: bool = False  # Requested-Service-Unit present (possibly empty)
    requested_units: Units | None = None  # None or all-None = default quota
    reporting_reason: int | None = None


class ChargeRequest(msgspec.Struct, omit_defaults=True):
    session_id: str
    request_type: int  # INITIAL / UPDATE / TERMINATION / EVENT
    request_number: int
    msisdn: str
    plan: str
    partition: int
    now_ms: int  # from the injected clock, never Redis TIME
    msccs: list[MsccCharge] = []
    requested_action: int | None = None  # EVENT only
    origin_host: str = ""
    origin_realm: str = ""  # with origin_host: where a RAR/ASR for the session goes (Destination-Host/-Realm)
    peer: str = ""  # Origin-Host of the connected peer the request came through ("" = origin_host)
    end_to_end: int = 0
    termination_cause: int | None = None
    context: dict = {}  # static CDR fields stored at CCR-I (servedIMSI, apn, chargingID, ...)
    # units outside MSCC (plain RFC 4006 client): the one MSCC's result is the command's, and a failure closes
    # the session
    command_level: bool = False


class MsccOutcome(msgspec.Struct, omit_defaults=True):
    rating_group: int
    result_code: int
    service_id: int | None = None
    granted: Units | None = None
    final_unit_action: int | None = None  # set when this grant is the last the balance covers
    amount: int = 0  # micro-units debited for the reported usage in this request
    reserved: int = 0  # micro-units (or allowance units) now reserved for the new grant
    cost: int | None = None  # PRICE_ENQUIRY: price of the requested units, micro-units


class ChargeOutcome(msgspec.Struct, omit_defaults=True):
    result_code: int  # command level
    msccs: list[MsccOutcome] = []
    duplicate: bool = False  # answered from the stored outcome, nothing changed
    check_balance_result: int | None = None  # EVENT CHECK_BALANCE: 0 ENOUGH_CREDIT, 1 NO_CREDIT
    stale_plan: str | None = None  # the plan on record when the caller's cached plan was wrong
    end_to_end: int = 0  # End-to-End-Id of the request whose outcome this is


class Location(msgspec.Struct, frozen=True):
    partition: int
    msisdn: str
    plan: str


class Subscriber(msgspec.Struct, omit_defaults=True):
    msisdn: str
    imsi: str | None = None
    plan: str = "demo"
    status: str = "active"
    currency: str = "EUR"
    partition: int | None = None


class BucketState(msgspec.Struct):
    bucket: str
    balance: int
    reserved: int


class TopupResult(msgspec.Struct):
    applied: bool  # False when the reference was already used: nothing changed
    balance: int  # money balance after (micro-units)
    reference: str | None = None
