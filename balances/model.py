"""Plain data passed to and from BalanceStore. Units are ints; money is integer micro-units; times are epoch ms."""

from __future__ import annotations

import hashlib

import msgspec

# request types, the same numbers as CC-Request-Type so callers need no mapping
INITIAL, UPDATE, TERMINATION, EVENT = 1, 2, 3, 4
# event actions, the same numbers as Requested-Action
DIRECT_DEBITING, REFUND_ACCOUNT, CHECK_BALANCE, PRICE_ENQUIRY = 0, 1, 2, 3
# subscriber status, enforced by the charge and event functions: barred and suspended are answered 4010
# END_USER_SERVICE_DENIED (suspended is the customer's or a temporary stop, barred the operator's), terminated
# 5030 USER_UNKNOWN; both barred kinds still pay the usage their open sessions report
STATUSES = ("active", "barred", "suspended", "terminated")
ACCOUNT_KINDS = ("prepaid", "postpaid")
MONEY = "money"  # the unit of money buckets (and the id of the default money bucket)
DEFAULT_PRIORITY = 100


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
    # ---- Tariff-Time-Change (RFC 4006 §8.20, TS 32.299 Tariff-Change-Usage) ----
    # `used` holds the USUs without Tariff-Change-Usage; the split ones go here (0 / 1 / 2)
    used_before: Units | None = None  # UNIT_BEFORE_TARIFF_CHANGE
    used_after: Units | None = None  # UNIT_AFTER_TARIFF_CHANGE
    used_indeterminate: Units | None = None  # UNIT_INDETERMINATE: charged at the dearer tariff
    # the next change of this rating group's price within the grant horizon (Rater.schedule_for's
    # next_change_at, epoch ms) and the schedule in force from then on; a grant is then reserved at the dearer
    tariff_change_ms: int | None = None
    next_schedule: dict | None = None
    # period keys (Rater.period_key) for the periods the schedule counts over (scope, cap_period, fair usage):
    # "day" / "week" / "month" -> key, at now_ms; next_periods the same at tariff_change_ms
    periods: dict[str, str] = {}
    next_periods: dict[str, str] = {}


# schedules by id, for sending a request again with its schedules in full (BalanceStore.charge after an answer
# with need_schedules); content-addressed, so shared by every store; bounded (the oldest go first)
_SCHEDULES: dict[str, dict] = {}
_SCHEDULES_MAX = 65_536


def with_schedule_id(schedule: dict) -> dict:
    """The schedule dict with "id": a content hash the charge script files it under (sched:{pNNN}), so a
    reservation can name the schedule it was granted with and its usage is rated with that one later. Kept
    here by its id, for `full_schedules`."""
    body = {key: value for key, value in schedule.items() if key != "id"}
    digest = hashlib.sha1(msgspec.json.encode(body, order="sorted")).hexdigest()[:16]
    full = {**body, "id": digest}
    if digest not in _SCHEDULES:
        if len(_SCHEDULES) >= _SCHEDULES_MAX:
            del _SCHEDULES[next(iter(_SCHEDULES))]
        _SCHEDULES[digest] = full
    return full


def schedule_ref(schedule: dict) -> dict:
    """A schedule of with_schedule_id named by its id alone: what an MsccCharge usually carries (the charge
    functions keep checked schedules by id, see lua/common.lua), so a request's JSON is not mostly schedules."""
    _SCHEDULES.setdefault(schedule["id"], schedule)
    return {"id": schedule["id"]}


def _full(schedule: dict | None) -> dict | None:
    if schedule is not None and len(schedule) == 1 and "id" in schedule:
        return _SCHEDULES.get(schedule["id"], schedule)
    return schedule


def full_schedules(request: ChargeRequest) -> ChargeRequest:
    """The request with every schedule named by id alone in full (after an answer with need_schedules)."""
    return msgspec.structs.replace(request, msccs=[
        msgspec.structs.replace(m, schedule=_full(m.schedule), next_schedule=_full(m.next_schedule))
        for m in request.msccs])


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
    group: str = ""  # the subscriber's sharing group, from the index (Location.group); checked by the script
    # the rating keys the request was rated with, for the CDR records: "plmn" (normalized serving MCC-MNC,
    # CDR ratingPlmn) and "destination" (the called address as received, CDR calledPartyAddress); only the
    # keys the plan's tariffs use, so a request without them sends nothing. A grant keeps them: the record
    # of the usage reported later names its grant's keys
    rating_keys: dict[str, str] = {}


class MsccOutcome(msgspec.Struct, omit_defaults=True):
    rating_group: int
    result_code: int
    service_id: int | None = None
    granted: Units | None = None
    final_unit_action: int | None = None  # set when this grant is the last the balance covers
    amount: int = 0  # micro-units debited for the reported usage in this request
    reserved: int = 0  # micro-units (or allowance units) now reserved for the new grant
    cost: int | None = None  # PRICE_ENQUIRY: price of the requested units, micro-units
    tariff_change_ms: int | None = None  # the grant spans this tariff change: sent as Tariff-Time-Change
    fair_usage: bool = False  # final_unit_action comes from the fair-usage policy (its Filter-Ids), not credit


class ChargeOutcome(msgspec.Struct, omit_defaults=True):
    result_code: int  # command level
    msccs: list[MsccOutcome] = []
    duplicate: bool = False  # answered from the stored outcome, nothing changed
    check_balance_result: int | None = None  # EVENT CHECK_BALANCE: 0 ENOUGH_CREDIT, 1 NO_CREDIT
    stale_plan: str | None = None  # the plan on record when the caller's cached plan (or group) was wrong
    stale_group: str | None = None  # with stale_plan: the group on record ("" = none)
    end_to_end: int = 0  # End-to-End-Id of the request whose outcome this is
    # a schedule the request named by id alone is not known to the function: nothing was done, the request is
    # sent again with full_schedules (BalanceStore.charge does; callers never see it)
    need_schedules: bool = False


class Location(msgspec.Struct, frozen=True):
    partition: int
    msisdn: str
    plan: str
    group: str = ""  # the sharing group the subscriber is a member of ("" = none)
    # a session's rating keys from its CCR-I (sidx: only), for the CCR-U/T that do not repeat them: the serving
    # MCC-MNC (digits) and the called address as received ("" = none)
    plmn: str = ""
    destination: str = ""


class Subscriber(msgspec.Struct, omit_defaults=True):
    msisdn: str
    imsi: str | None = None
    plan: str = "demo"
    status: str = "active"  # one of STATUSES
    currency: str = "EUR"
    partition: int | None = None
    kind: str = "prepaid"  # prepaid | postpaid
    credit_limit: int = 0  # postpaid: money may go down to -credit_limit (micro-units)
    group: str | None = None  # sharing group (the subscriber is placed in the group's partition)


class Rollover(msgspec.Struct, omit_defaults=True):
    """At the end of its validity, up to `cap` unused units move into bucket `into` (default
    '<id>.rollover', created valid for one more period of the same length, or `validity_ms`)."""

    cap: int
    into: str | None = None
    validity_ms: int | None = None


class Bucket(msgspec.Struct, omit_defaults=True):
    """A bucket as provisioned: money or an allowance of units, with its consumption order, validity window
    [valid_from, valid_until) and the rating groups it serves (None: every rating group priced in its unit;
    a unit other than bytes / seconds / events / money counts service-specific units)."""

    id: str
    unit: str  # "money" | "bytes" | "seconds" | "events" | any service-specific unit name
    amount: int = 0  # initial balance (micro-units for money)
    priority: int = DEFAULT_PRIORITY  # lower is consumed first; then the earliest valid_until
    valid_from: int | None = None
    valid_until: int | None = None
    services: tuple[int, ...] | None = None  # rating groups
    rollover: Rollover | None = None
    credit_limit: int = 0  # money: the balance may be drawn down to -credit_limit
    member_limits: dict[str, int] = {}  # shared buckets: msisdn -> most units that member may use


class BucketState(msgspec.Struct):
    bucket: str  # '@<id>' for a bucket of the subscriber's group
    balance: int
    reserved: int
    unit: str | None = None  # None: a bucket without metadata (named by the rating schedules)
    priority: int | None = None
    valid_from: int | None = None
    valid_until: int | None = None
    services: list[int] | None = None
    rollover: Rollover | None = None
    credit_limit: int | None = None
    group: str | None = None  # the group of a shared bucket
    member_limit: int | None = None  # shared: the subscriber's limit on it
    member_used: int | None = None  # shared: what the subscriber used (committed) from it


class LedgerEntry(msgspec.Struct, omit_defaults=True):
    """One entry of ledger:{pNNN}: a balance change, written by the function that made it."""

    id: str  # stream id
    time: int
    type: str  # provision | topup | refund | usage | credit | expiry | rollover | adjustment | ...
    msisdn: str  # "" for a change of a group's own (shared) buckets
    changes: dict[str, int]  # bucket ref -> signed change ('@<id>': a bucket of `group`)
    amount: int = 0  # the money amount (usage: what the CDR record says)
    reference: str = ""  # top-up reference, CDR recordId (usage, refund), the other bucket (rollover), ...
    group: str = ""
    reason: str = ""
    records: dict[str, dict[str, int]] = {}  # usage: CDR recordId -> its changes (they sum to `changes`)
    units: dict[str, str] = {}  # bucket -> unit, for buckets with metadata that this entry creates or changes


class AccountChange(msgspec.Struct):
    """What an operator change (credit, adjustment, expiry sweep) did."""

    applied: bool  # False: the reference was used before; nothing changed
    balance: int  # the bucket's balance after
    entries: int  # ledger entries written (settled expiries and rollovers included)


class TopupResult(msgspec.Struct):
    applied: bool  # False when the reference was already used: nothing changed
    balance: int  # money balance after (micro-units)
    reference: str | None = None
