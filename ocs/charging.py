"""Credit control (RFC 4006 / TS 32.299 Gy/Ro): a decoded CCR in, CCA bytes out.

Theory of operation: `CreditControl.answer(message)` checks the request (5005/5004 with Failed-AVP),
finds the subscriber or the session (cached index keys), turns every Multiple-Services-Credit-Control into
an `MsccCharge` carrying the rating schedule in force at the request's time for its keys (`OnlineRating`
over the loaded `Rater`: serving network, destination, Service-Context-Id, Service-Identifier; the CCR-I's
keys ride in the session index for the CCR-U/T), with Tariff-Time-Change and the next schedule when the
price changes within the grant, and makes exactly one `BalanceStore.charge` call: the
charge script does duplicate detection, commit, release and reservation atomically and returns a
`ChargeOutcome`, which is encoded here into the CCA. A duplicate gets the stored outcome re-encoded, so the
answer is the same and nothing is debited twice. Nothing here touches sockets or Redis directly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from balances.model import (
    EVENT,
    INITIAL,
    TERMINATION,
    UPDATE,
    ChargeOutcome,
    ChargeRequest,
    Location,
    MsccCharge,
    MsccOutcome,
    Units,
    schedule_ref,
    with_schedule_id,
)
from balances.store import BalanceStore
from ocs.clock import Clock
from protocol.codec import (
    Avp,
    DecodeError,
    Message,
    avp_encoder,
    avp_framer,
    avp_key,
    encode_answer,
    encode_answer_body,
    encode_avp,
)
from protocol.dictionary import lookup
from ratecards.keys import normalize_plmn, plmn_from_user_location_info
from ratecards.rater import Rater, UnknownRate
from ratecards.schedule import ANSWER_ONLY_FIELDS, PERIODS, REDIRECT, RESTRICT_ACCESS, RatingSchedule

log = logging.getLogger(__name__)

SUCCESS = 2001
UNABLE_TO_COMPLY = 5012
MISSING_AVP = 5005
INVALID_AVP_VALUE = 5004
UNKNOWN_SESSION_ID = 5002
USER_UNKNOWN = 5030
RATING_FAILED = 5031
TOO_BUSY = 3004

SUBSCRIPTION_E164, SUBSCRIPTION_IMSI = 0, 1
REQUIRED_CCR_AVPS = (
    "Session-Id",
    "Origin-Host",
    "Origin-Realm",
    "Destination-Realm",
    "Auth-Application-Id",
    "Service-Context-Id",
    "CC-Request-Type",
    "CC-Request-Number",
)
_REQUIRED_KEYS = frozenset(map(avp_key, REQUIRED_CCR_AVPS))
_CC_REQUEST_TYPE = avp_key("CC-Request-Type")
_AUTH_APPLICATION_ID = avp_key("Auth-Application-Id")
# ISO 4217 numeric codes for Cost-Information / Remaining-Balance
CURRENCY_CODES = {"EUR": 978, "USD": 840, "GBP": 826, "CHF": 756, "SEK": 752, "NOK": 578, "DKK": 208,
                  "PLN": 985, "CZK": 203, "HUF": 348, "RON": 946, "TRY": 949, "INR": 356, "BRL": 986,
                  "ZAR": 710, "NGN": 566, "KES": 404, "JPY": 392, "CNY": 156, "AUD": 36, "CAD": 124}
UNIT_FIELD = {"bytes": "total", "seconds": "time", "events": "units"}
UNIT_AVP = {"time": "CC-Time", "total": "CC-Total-Octets", "input": "CC-Input-Octets",
            "output": "CC-Output-Octets", "units": "CC-Service-Specific-Units"}
# Service-Context-Id (digest §3.6, §8.14): the last label before "@", with the domain
KNOWN_SERVICE_CONTEXTS = frozenset({
    ("32251", "3gpp.org"),  # PS domain (Gy)
    ("32260", "3gpp.org"),  # IMS
    ("32270", "3gpp.org"),  # MMS
    ("32274", "3gpp.org"),  # SMS
    ("32275", "3gpp.org"),  # MMTel
    ("32276", "3gpp.org"),  # VCS
})
IMEISV = 0  # User-Equipment-Info-Type
# Tariff-Change-Usage (RFC 4006 §8.27) in a Used-Service-Unit
UNIT_BEFORE_TARIFF_CHANGE, UNIT_AFTER_TARIFF_CHANGE, UNIT_INDETERMINATE = 0, 1, 2
DEFAULT_CHARGING_HORIZON = 86_400  # seconds (charging.charging_horizon_seconds)
MAX_CHARGING_HORIZON = 7 * 86_400  # schedule_for looks 8 days ahead; a memoised choice serves one of them
_CHOICE_SPAN = 86_400  # a choice without a change within ratecards.rater.HORIZON is reused this long
_CHOICE_LIMIT = 100_000  # memoised choices (plan × rating group × keys) before the memo starts over
MAX_DESTINATION_LENGTH = 256  # a longer called address is not kept in the session index
CAUSES = {1: "normalRelease", 2: "abnormalRelease", 3: "abnormalRelease", 4: "managementIntervention",
          5: "abnormalRelease", 6: "timeLimit", 7: "abnormalRelease", 8: "timeLimit"}


class RequestRejected(Exception):
    """A CCR we answer with a command-level error before charging (5005, 5004, 5030, 5002, ...)."""

    def __init__(self, result_code: int, failed_avp: bytes | None = None, message: str = "") -> None:
        super().__init__(message or str(result_code))
        self.result_code = result_code
        self.failed_avp = failed_avp
        self.message = message


def _zero_value(type_name: str) -> Any:
    if type_name in ("GROUPED",):
        return []
    if type_name in ("OCTET_STRING",):
        return b""
    if type_name in ("UTF8_STRING", "DIAMETER_IDENTITY", "DIAMETER_URI", "IP_FILTER_RULE"):
        return ""
    if type_name in ("ADDRESS",):
        return "0.0.0.0"
    if type_name.startswith("FLOAT"):
        return 0.0
    return 0


def missing_avp(name: str) -> RequestRejected:
    """5005 with a Failed-AVP carrying the missing AVP with a zero-filled payload (RFC 6733 §7.5)."""
    definition = lookup(name)
    failed = encode_avp(definition, _zero_value(definition.type.name))
    return RequestRejected(MISSING_AVP, failed, f"missing AVP {name}")


def invalid_avp(avp: Avp, message: str) -> RequestRejected:
    return RequestRejected(INVALID_AVP_VALUE, bytes(avp.raw), message)


def service_context_known(context: str) -> bool:
    """`[[[ext.]MNC.MCC.]release.]32251@3gpp.org` → ("32251", "3gpp.org"), looked up in the known set."""
    local, at, domain = context.rpartition("@")
    if not at:
        return False
    return (local.rpartition(".")[2], domain.lower()) in KNOWN_SERVICE_CONTEXTS


def imeisv_digits(value: Any) -> str | None:
    """IMEISV as digits from 8 TBCD octets (low nibble first, 0xF filler) or 14-16 ASCII digits; None when
    it is neither (some gateways send a placeholder such as b"IMEISV": recorded as absent, never rejected)."""
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    if not isinstance(value, bytes | bytearray):
        return None
    if 14 <= len(value) <= 16 and value.isdigit():
        return value.decode("ascii")
    if len(value) != 8:
        return None
    digits = []
    for octet in value:
        for nibble in (octet & 0x0F, octet >> 4):
            if nibble == 0x0F:
                return "".join(digits) if len(digits) >= 14 else None
            if nibble > 9:
                return None
            digits.append(chr(48 + nibble))
    return "".join(digits)


def _imeisv(message: Message) -> str | None:
    """The IMEISV of User-Equipment-Info (or RFC 8506 User-Equipment-Info-Extension, or PS-Information's
    3GPP-IMEISV); a malformed value is ignored, never answered 5004 (digest §8.13)."""
    try:
        for info in message.find_all("User-Equipment-Info"):
            if info.get("User-Equipment-Info-Type") == IMEISV:
                digits = imeisv_digits(info.get("User-Equipment-Info-Value"))
                if digits:
                    return digits
        extension = message.find("User-Equipment-Info-Extension")
        if extension is not None:
            digits = imeisv_digits(extension.get("User-Equipment-Info-IMEISV"))
            if digits:
                return digits
    except DecodeError:
        return None
    return None


class QuotaAvps:
    """The constant quota-control AVPs of one plan × rating group, encoded once (RatingSchedule fields).

    An MSCC is GSU, Service-Identifier, Rating-Group, Validity-Time, Result-Code, FUI, thresholds,
    Quota-Holding-Time, Trigger (TS 32.299 order); only GSU, the ids and Result-Code change per request.
    """

    __slots__ = ("validity", "final_validity", "action", "fui", "fair_usage_fui", "thresholds", "_armed", "tail")

    def __init__(self, s: RatingSchedule) -> None:
        self.validity = encode_avp("Validity-Time", s.validity_time) if s.validity_time else b""
        self.final_validity = encode_avp("Validity-Time", s.final_validity_time) if s.final_validity_time else b""
        self.action = s.final_unit_action
        self.fui = encode_avp("Final-Unit-Indication", _fui_avps(s))
        # the fair-usage policy's restriction (its own Filter-Ids / rules), whatever the credit action is
        fair: list = [("Final-Unit-Action", RESTRICT_ACCESS)]
        fair.extend(("Restriction-Filter-Rule", rule) for rule in s.fair_usage_restriction_filter_rules)
        fair.extend(("Filter-Id", name) for name in s.fair_usage_filter_ids)
        self.fair_usage_fui = encode_avp("Final-Unit-Indication", fair)
        thresholds = []  # (the GSU fields that arm it, the AVP)
        if s.time_quota_threshold:
            thresholds.append((("time",), encode_avp("Time-Quota-Threshold", s.time_quota_threshold)))
        if s.volume_quota_threshold:
            thresholds.append((("total", "input", "output"),
                               encode_avp("Volume-Quota-Threshold", s.volume_quota_threshold)))
        if s.unit_quota_threshold:
            thresholds.append((("units",), encode_avp("Unit-Quota-Threshold", s.unit_quota_threshold)))
        self.thresholds = tuple(thresholds)
        # the joined thresholds per (time granted, volume granted, units granted)
        self._armed = {(t, v, u): b"".join(avp for fields, avp in self.thresholds
                                           if (t and "time" in fields) or (v and "total" in fields)
                                           or (u and "units" in fields))
                       for t in (False, True) for v in (False, True) for u in (False, True)}
        tail = b""
        if s.quota_holding_time is not None:
            tail += encode_avp("Quota-Holding-Time", s.quota_holding_time)
        if s.triggers is not None:
            tail += encode_avp("Trigger", [("Trigger-Type", t) for t in s.triggers])
        self.tail = tail

    def final_unit_indication(self, action: int, fair_usage: bool = False) -> bytes:
        """The schedule's FUI (the fair-usage restriction when the outcome says so), or a bare one when a
        stored outcome names another action (card changed)."""
        if fair_usage and action == RESTRICT_ACCESS:
            return self.fair_usage_fui
        if action == self.action:
            return self.fui
        return encode_avp("Final-Unit-Indication", [("Final-Unit-Action", action)])

    def armed_thresholds(self, granted: Units) -> bytes:
        """The thresholds of the unit types granted, encoded and joined (time, volume, units order)."""
        armed = self._armed.get((granted.time is not None,
                                 granted.total is not None or granted.input is not None or granted.output is not None,
                                 granted.units is not None))
        if armed is None:
            armed = b"".join(avp for fields, avp in self.thresholds
                             if any(getattr(granted, f) is not None for f in fields))
        return armed


def _fui_avps(s: RatingSchedule) -> list:
    """Final-Unit-Indication ::= {Final-Unit-Action} *[Restriction-Filter-Rule] *[Filter-Id] [Redirect-Server]"""
    avps: list = [("Final-Unit-Action", s.final_unit_action)]
    if s.final_unit_action == RESTRICT_ACCESS:
        avps.extend(("Restriction-Filter-Rule", rule) for rule in s.restriction_filter_rules)
        avps.extend(("Filter-Id", name) for name in s.filter_ids)
    elif s.final_unit_action == REDIRECT and s.redirect_address:
        avps.append(("Redirect-Server", [("Redirect-Address-Type", s.redirect_address_type),
                                         ("Redirect-Server-Address", s.redirect_address)]))
    return avps


def _units(group: Avp | None) -> Units | None:
    if group is None:
        return None
    present = group.avp_keys
    if not present:  # the usual Requested-Service-Unit: empty, "as much as you give"
        return Units()
    return Units(**{field: group.get(key) for field, key in _UNIT_KEYS if key in present})


def _sum_units(groups: list[Avp]) -> tuple[Units | None, int | None, tuple[Units | None, ...]]:
    """The USUs of one MSCC: those without Tariff-Change-Usage summed, the first Reporting-Reason inside, and
    the ones split at a tariff change summed apart (before, after, indeterminate; None when absent)."""
    if not groups:
        return None, None, _NO_SPLIT
    totals: list[dict[str, int] | None] = [{}, None, None, None]  # plain, before, after, indeterminate
    reason = None
    for group in groups:
        present = group.avp_keys
        usage = group.get(_TARIFF_CHANGE_USAGE) if _TARIFF_CHANGE_USAGE in present else None
        slot = usage + 1 if usage in (UNIT_BEFORE_TARIFF_CHANGE, UNIT_AFTER_TARIFF_CHANGE, UNIT_INDETERMINATE) \
            else 0
        total = totals[slot]
        if total is None:
            total = totals[slot] = {}
        for field, key in _UNIT_KEYS:
            if key in present:
                value = group.get(key)
                if value is not None:
                    total[field] = total.get(field, 0) + value
        if reason is None and _REPORTING_REASON in present:
            reason = group.get(_REPORTING_REASON)
    plain, *split = totals
    if not any(t is not None for t in split):
        return Units(**plain), reason, _NO_SPLIT
    return (Units(**plain) if plain else None), reason, tuple(None if t is None else Units(**t) for t in split)


_NO_SPLIT: tuple[Units | None, ...] = (None, None, None)
_UNIT_KEYS = tuple((field, avp_key(name)) for field, name in UNIT_AVP.items())  # Units field, AVP key
_TARIFF_CHANGE_USAGE = avp_key("Tariff-Change-Usage")
_REPORTING_REASON = avp_key("Reporting-Reason")
_NO_PERIODS: dict[str, str] = {}
_NO_KEYS: dict[str, str] = {}
_SESSION_KEYS = frozenset({"zone", "destination"})  # the rating keys a session keeps from its CCR-I


def _context(message: Message, imsi: str | None) -> dict[str, Any]:
    """Static CDR fields taken from the CCR-I or CCR-E (TS 32.298 names)."""
    context: dict[str, Any] = {"originHost": message.get("Origin-Host") or "",
                               "serviceContextId": message.get("Service-Context-Id") or ""}
    if imsi:
        context["servedIMSI"] = imsi
    imeisv = _imeisv(message)
    info = message.find("Service-Information")
    ps = info.find("PS-Information") if info is not None else None
    if ps is not None:
        apn = ps.get("Called-Station-Id")
        if apn:
            context["apn"] = apn
        charging_id = ps.get("3GPP-Charging-Id")
        if charging_id is not None:
            context["chargingID"] = (
                int.from_bytes(charging_id, "big") if isinstance(charging_id, bytes | bytearray) else charging_id
            )
        plmn = ps.get("3GPP-SGSN-MCC-MNC")
        if plmn:
            context["servingNodePLMN"] = plmn if isinstance(plmn, str) else bytes(plmn).decode("ascii", "replace")
        rat = ps.get("3GPP-RAT-Type")
        if rat is not None:
            context["ratType"] = rat[0] if isinstance(rat, bytes | bytearray) and len(rat) == 1 else (
                rat if isinstance(rat, int) else bytes(rat).decode("ascii", "replace"))
        if "servedIMSI" not in context:
            imsi_ps = ps.get("3GPP-IMSI")
            if imsi_ps:
                context["servedIMSI"] = imsi_ps
        if imeisv is None:
            try:
                imeisv = imeisv_digits(ps.get("3GPP-IMEISV"))
            except DecodeError:
                imeisv = None
    if imeisv:
        context["servedIMEISV"] = imeisv
    if "apn" not in context:
        apn = message.get("Called-Station-Id")
        if apn:
            context["apn"] = apn
    return context


def _rated_keys(location: Location, used_keys: frozenset[str]) -> dict[str, str]:
    """The rating keys a request is rated with (those of its location the plan's tariffs use), for its CDR
    records (ChargeRequest.rating_keys); the shared empty dict when there are none."""
    plmn = location.plmn if "zone" in used_keys else ""
    destination = location.destination if "destination" in used_keys else ""
    if not plmn and not destination:
        return _NO_KEYS
    keys = {}
    if plmn:
        keys["plmn"] = plmn
    if destination:
        keys["destination"] = destination
    return keys


def _script_schedule(s: RatingSchedule) -> dict:
    schedule = msgspec.to_builtins(s)
    for name in ANSWER_ONLY_FIELDS:
        schedule.pop(name, None)
    return with_schedule_id(schedule)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    return value or None


def _address_data(recipient: Avp | None) -> str | None:
    return _text(recipient.get("Address-Data")) if recipient is not None else None


def rating_keys(message: Message) -> tuple[str | None, str | None]:
    """The request's rating keys: the serving MCC-MNC (3GPP-SGSN-MCC-MNC in PS-Information or at top level,
    else the MCC-MNC of 3GPP-User-Location-Info) and the called address (IMS Called-Party-Address or
    Requested-Party-Address, SMS/MMS Recipient-Address); None for what it does not carry or cannot be read."""
    plmn = destination = None
    try:
        info = message.find("Service-Information")
        if info is not None:
            ps = info.find("PS-Information")
            if ps is not None:
                plmn = normalize_plmn(ps.get("3GPP-SGSN-MCC-MNC")) or plmn_from_user_location_info(
                    ps.get("3GPP-User-Location-Info"))
            ims = info.find("IMS-Information")
            if ims is not None:
                destination = _text(ims.get("Called-Party-Address")) or _text(ims.get("Requested-Party-Address"))
            if destination is None:
                sms = info.find("SMS-Information")
                if sms is not None:
                    for recipient in sms.find_all("Recipient-Info"):
                        destination = _address_data(recipient.find("Recipient-Address"))
                        if destination:
                            break
            if destination is None:
                mms = info.find("MMS-Information")
                if mms is not None:
                    destination = _address_data(mms.find("Recipient-Address"))
        if plmn is None:
            plmn = normalize_plmn(message.get("3GPP-SGSN-MCC-MNC")) or plmn_from_user_location_info(
                message.get("3GPP-User-Location-Info"))
    except DecodeError:
        pass  # a malformed key rates like an absent one
    if destination is not None and len(destination) > MAX_DESTINATION_LENGTH:
        destination = None
    return plmn, destination


class RatedSchedule:
    """A compiled schedule as online charging sends it, built once per schedule: the charge script's dict
    (without the answer-only fields, with its content id) and the reference to it by id alone that requests
    carry (BalanceStore.charge sends the full one when the function asks), the CCA's constant AVPs, the
    periods whose keys the script counts by, and the grant horizon for Tariff-Time-Change."""

    __slots__ = ("source", "schedule", "script", "script_ref", "quota", "periods", "horizon")

    def __init__(self, source: RatingSchedule, default_quotas: Mapping[str, int], horizon: int) -> None:
        self.source = source
        quota = default_quotas.get(source.unit, 0)
        schedule = msgspec.structs.replace(source, default_quota=quota, max_quota=max(quota, source.max_quota)) \
            if quota else source
        self.schedule = schedule
        self.script = _script_schedule(schedule)
        self.script_ref = schedule_ref(self.script)
        self.quota = QuotaAvps(schedule)
        periods = [schedule.scope]
        if schedule.cap:
            periods.append(schedule.cap_period)
        if schedule.fair_usage_units:
            periods.append(schedule.fair_usage_period)
        self.periods = tuple(dict.fromkeys(p for p in periods if p in PERIODS))
        self.horizon = min(schedule.validity_time or horizon, MAX_CHARGING_HORIZON)


class RatingChoice:
    """What one plan × rating group × rating keys is rated with from `since` until `until` (the next change,
    or a day when none is near), and, computed when first needed, the schedule from that change on."""

    __slots__ = ("key", "rated", "change", "since", "until", "following", "next_rated", "next_periods")

    def __init__(self, key: tuple, rated: RatedSchedule, change: float | None, since: float) -> None:
        self.key = key
        self.rated = rated
        self.change = change
        self.since = since
        self.until = change if change is not None else since + _CHOICE_SPAN
        self.next_rated: RatedSchedule | None = None
        self.following: float | None = None  # the change after `change`
        self.next_periods: dict[str, str] = {}


class OnlineRating:
    """The rate card as online charging reads it, rebuilt on every reload: per request, the schedule for the
    request's plan, rating group, time and keys (Rater.schedule_for), memoised per combination of keys for
    as long as it holds, with the script dicts and constant AVPs built once per schedule."""

    def __init__(self, rater: Rater, *, default_quotas: Mapping[str, int] | None = None,
                 horizon_seconds: int = DEFAULT_CHARGING_HORIZON) -> None:
        self.rater = rater
        self.horizon = min(horizon_seconds, MAX_CHARGING_HORIZON)
        self.default_quotas = {unit: quota for unit, quota in (default_quotas or {}).items() if quota}
        self.default_rating_groups = rater.default_rating_groups()
        self.currency = rater.currency
        self.versions = tuple(card.version for card in rater.cards)
        self._rated: dict[int, RatedSchedule] = {}
        self._choices: dict[tuple, RatingChoice] = {}
        self._keys_used: dict[str, frozenset[str]] = {}

    def keys_used(self, plan: str) -> frozenset[str]:
        used = self._keys_used.get(plan)
        if used is None:
            used = self._keys_used[plan] = self.rater.keys_used(plan)
        return used

    def rated(self, schedule: RatingSchedule) -> RatedSchedule:
        found = self._rated.get(id(schedule))
        if found is None or found.source is not schedule:
            found = self._rated[id(schedule)] = RatedSchedule(schedule, self.default_quotas, self.horizon)
        return found

    def choose(self, plan: str, rating_group: int, t: float, plmn: str | None, destination: str | None,
               context: str | None, service_id: int | None) -> RatingChoice:
        """The choice in force at t (UnknownRate when the plan cannot rate the rating group)."""
        key = (plan, rating_group, plmn, destination, context, service_id)
        choice = self._choices.get(key)
        if choice is not None and choice.since <= t < choice.until:
            return choice
        schedule, change = self.rater.schedule_for(plan, rating_group, at=t, plmn=plmn, destination=destination,
                                                   service_context=context, service_identifier=service_id)
        choice = RatingChoice(key, self.rated(schedule), change, t)
        if len(self._choices) >= _CHOICE_LIMIT:
            self._choices.clear()
        self._choices[key] = choice
        return choice

    def after_change(self, choice: RatingChoice) -> RatingChoice:
        """Fills in the schedule from choice.change on (once per choice)."""
        if choice.next_rated is None and choice.change is not None:
            plan, rating_group, plmn, destination, context, service_id = choice.key
            schedule, following = self.rater.schedule_for(
                plan, rating_group, at=choice.change, plmn=plmn, destination=destination, service_context=context,
                service_identifier=service_id)
            rated = self.rated(schedule)
            choice.following = following
            choice.next_periods = self.periods(rated, choice.change)
            choice.next_rated = rated
        return choice

    def periods(self, rated: RatedSchedule, t: float) -> dict[str, str]:
        """Period kind → key at t, for the periods the schedule counts by."""
        if not rated.periods:
            return {}
        return {kind: self.rater.period_key(t, kind) for kind in rated.periods}


def _quota_for(quotas: dict, mscc: MsccOutcome, session: bool) -> tuple[QuotaAvps | None, bytes]:
    """The quota-control AVPs an answer MSCC gets: a session's MSCC answered 2001, or with a final unit
    action (5030 for a bundle-only rating group, 4012 ...); none for events and plain errors."""
    if not session or (mscc.result_code != SUCCESS and mscc.final_unit_action is None):
        return None, b""
    found = quotas.get((mscc.rating_group, mscc.service_id))
    return found if found is not None else (None, b"")


class CreditControl:
    """Answers CCRs; one instance per server process, shared by every peer connection."""

    def __init__(
        self,
        *,
        origin_host: str,
        origin_realm: str,
        store: BalanceStore,
        rater: Rater,
        default_quotas: Mapping[str, int] | None = None,
        charging_horizon: int = DEFAULT_CHARGING_HORIZON,
        clock: Clock | None = None,
        metrics: Any = None,
        unknown_session_termination_result: int = UNKNOWN_SESSION_ID,
        cc_session_failover: int | None = None,
        accept_unknown_service_context: bool = False,
        failure_handling: Any = None,
    ) -> None:
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.store = store
        self.clock = clock or Clock()
        self.metrics = metrics
        self.unknown_session_termination_result = unknown_session_termination_result
        # CC-Session-Failover sent in every CCA (1 FAILOVER_SUPPORTED: sessions live in Redis, any process
        # may continue them); None sends none (RFC 4006 default: not supported)
        self.cc_session_failover = cc_session_failover
        # a Service-Context-Id outside KNOWN_SERVICE_CONTEXTS: 5031 RATING_FAILED, or accepted when True
        self.accept_unknown_service_context = accept_unknown_service_context
        self._failure_handling = failure_handling
        self._failure_hints: dict[tuple[str, str], list[bytes]] = {}
        self._result_blocks: dict[int, bytes] = {}  # Result-Code, Origin-Host/-Realm, Auth-Application-Id
        self._peer_tails: dict[tuple, bytes] = {}  # CC-Session-Failover and hints per (host, realm, failover)
        self._identity = [("Origin-Host", origin_host), ("Origin-Realm", origin_realm)]
        self._default_quotas = dict(default_quotas or {})
        self._charging_horizon = charging_horizon
        self.set_rater(rater)

    def set_rater(self, rater: Rater) -> None:
        """The rate card to rate with from now on (a reload swaps it between two requests)."""
        self.rating = OnlineRating(rater, default_quotas=self._default_quotas, horizon_seconds=self._charging_horizon)

    @property
    def default_rating_groups(self) -> dict[str, int]:
        return self.rating.default_rating_groups

    # ---- entry point -------------------------------------------------------------------------------------

    async def answer(self, message: Message, peer: str | None = None) -> bytes:
        """The CCA for one CCR (never raises: every failure becomes a Diameter answer). `peer` is the
        Origin-Host of the connection it came on: with the CCR's Origin-Host it is recorded as the session's
        owner, where RAR/ASR go."""
        request_type = None
        started = time.perf_counter()
        try:
            request_type = self._check_required(message)
            outcome, location, quotas = await self._charge(message, request_type, peer)
            answer = self._encode(message, outcome, quotas)
            if self.metrics is not None:
                self.metrics.observe_answer(request_type, outcome.result_code)
                self.metrics.observe_latency(time.perf_counter() - started)
            return answer
        except RequestRejected as rejected:
            if self.metrics is not None:
                self.metrics.observe_answer(request_type, rejected.result_code)
            return self._reject(message, rejected)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.warning("Redis unavailable while answering %s: %s", message.session_id, exc)
            if self.metrics is not None:
                self.metrics.observe_answer(request_type, TOO_BUSY)
            return self._too_busy(message)
        except Exception:
            log.exception("unexpected failure answering CCR %s", message.session_id)
            if self.metrics is not None:
                self.metrics.observe_answer(request_type, UNABLE_TO_COMPLY)
            return self._reject(message, RequestRejected(UNABLE_TO_COMPLY, message="internal error"))

    # ---- request checks ----------------------------------------------------------------------------------

    def _check_required(self, message: Message) -> int:
        """5005/5004 for a CCR without what RFC 4006 §3.1 requires; its CC-Request-Type. The presence test is
        one C-level subset test over the top-level index; AVPs are built only for an error answer."""
        if not _REQUIRED_KEYS.issubset(message.avp_keys):
            for name in REQUIRED_CCR_AVPS:
                if message.find(name) is None:
                    raise missing_avp(name)
        request_type = message.get(_CC_REQUEST_TYPE)
        if request_type not in (INITIAL, UPDATE, TERMINATION, EVENT):
            raise invalid_avp(message.find(_CC_REQUEST_TYPE), "CC-Request-Type must be 1..4")
        if message.get(_AUTH_APPLICATION_ID) != 4:
            raise invalid_avp(message.find(_AUTH_APPLICATION_ID), "Auth-Application-Id must be 4 (credit control)")
        if request_type == EVENT:
            action = message.find("Requested-Action")
            if action is None:
                raise missing_avp("Requested-Action")
            if action.value not in (0, 1, 2, 3):
                raise invalid_avp(action, "Requested-Action must be 0..3")
        return request_type

    def _check_service_context(self, message: Message) -> None:
        """5031 RATING_FAILED with Failed-AVP for a service we cannot rate (digest §3.6); checked when a
        session opens and for events, not on every update."""
        context = message.find("Service-Context-Id")
        if not self.accept_unknown_service_context and not service_context_known(str(context.value)):
            raise RequestRejected(RATING_FAILED, bytes(context.raw), f"unknown Service-Context-Id {context.value}")

    # ---- charging ----------------------------------------------------------------------------------------

    async def _locate_subscriber(self, message: Message) -> tuple[Location, str | None]:
        imsi = None
        location = None
        for subscription in message.find_all("Subscription-Id"):
            kind = subscription.get("Subscription-Id-Type")
            data = subscription.get("Subscription-Id-Data")
            if data is None or kind is None:
                continue
            if kind == SUBSCRIPTION_IMSI:
                imsi = data
            if location is None and kind == SUBSCRIPTION_E164:
                location = await self.store.locate_msisdn(data)
            elif location is None and kind == SUBSCRIPTION_IMSI:
                location = await self.store.locate_imsi(data)
        if location is None and imsi is None:
            user_name = message.get("User-Name")
            if user_name:
                location = await self.store.locate_msisdn(user_name)
        if location is None:
            raise RequestRejected(USER_UNKNOWN, message="subscriber unknown")
        return location, imsi

    async def _charge(self, message: Message, request_type: int, peer: str | None = None,
                      ) -> tuple[ChargeOutcome, Location | None, dict]:
        session_id = message.session_id
        request_number = message.get("CC-Request-Number")
        context: dict[str, Any] = {}
        session_location: Location | None = None  # the session index value to write (CCR-I, new keys)
        if request_type in (INITIAL, EVENT):
            self._check_service_context(message)
            location, imsi = await self._locate_subscriber(message)
            context = _context(message, imsi)
            plmn, destination = rating_keys(message)
            if plmn or destination:
                location = Location(location.partition, location.msisdn, location.plan, location.group,
                                    plmn or "", destination or "")
                if request_type == INITIAL:
                    session_location = location
        else:
            location = await self.store.locate_session(session_id)
            if location is None:
                if request_type == TERMINATION:
                    raise RequestRejected(self.unknown_session_termination_result, message="session unknown")
                raise RequestRejected(UNKNOWN_SESSION_ID, message="session unknown")
            if not self.rating.keys_used(location.plan).isdisjoint(_SESSION_KEYS):
                # the CCR-I's keys, unless this request brings others (a handover to another network)
                plmn, destination = rating_keys(message)
                if (plmn and plmn != location.plmn) or (destination and destination != location.destination):
                    location = Location(location.partition, location.msisdn, location.plan, location.group,
                                        plmn or location.plmn, destination or location.destination)
                    if request_type == UPDATE:
                        session_location = location
        command_level = _MSCC_KEY not in message.avp_keys
        now_ms = self.clock.now_ms()
        for _attempt in range(2):
            msccs, rating_failures, quotas = self._msccs(message, location, request_type, now_ms)
            request = ChargeRequest(
                session_id=session_id,
                request_type=request_type,
                request_number=request_number,
                msisdn=location.msisdn,
                plan=location.plan,
                partition=location.partition,
                now_ms=now_ms,
                msccs=msccs,
                requested_action=message.get("Requested-Action"),
                origin_host=message.get("Origin-Host") or "",
                origin_realm=message.get("Origin-Realm") or "",
                peer=peer or "",
                end_to_end=message.end_to_end,
                termination_cause=message.get("Termination-Cause"),
                context=context,
                command_level=command_level and bool(msccs),
                group=location.group,
                rating_keys=_rated_keys(location, self.rating.keys_used(location.plan)),
            )
            charge_started = time.perf_counter()
            outcome = await self.store.charge(request, session_location)
            if self.metrics is not None:
                self.metrics.observe_redis(time.perf_counter() - charge_started)
            if outcome.stale_plan is None:
                break
            self.store.forget(msisdn=location.msisdn, session_id=session_id)
            location = msgspec.structs.replace(location, plan=outcome.stale_plan, group=outcome.stale_group or "")
            if session_location is not None:
                session_location = location
        else:
            raise RequestRejected(UNABLE_TO_COMPLY, message="subscriber plan changed during the request")
        if rating_failures and not outcome.duplicate:
            outcome.msccs.extend(rating_failures)
        return outcome, location, quotas

    def _msccs(self, message: Message, location: Location, request_type: int, now_ms: int,
               ) -> tuple[list[MsccCharge], list[MsccOutcome], dict]:
        """Every MSCC as an MsccCharge rated at now_ms with the request's keys; MSCCs whose rating group the
        plan cannot rate become 5031 outcomes. Also the constant AVPs (and Validity-Time) per (rating group,
        Service-Identifier) for the answer."""
        plan = location.plan
        rating = self.rating
        used_keys = rating.keys_used(plan)
        keys = (
            plan,
            location.plmn or None if "zone" in used_keys else None,
            location.destination or None if "destination" in used_keys else None,
            message.get("Service-Context-Id") if "context" in used_keys else None,
            "service_identifier" in used_keys,
        )
        t = now_ms / 1000
        granting = request_type in (INITIAL, UPDATE)  # a CCR-T gets no grant, an event no Tariff-Time-Change
        charges: list[MsccCharge] = []
        failures: list[MsccOutcome] = []
        quotas: dict = {}
        groups = message.find_all("Multiple-Services-Credit-Control")
        if not groups:
            # plain RFC 4006 client: command-level units on the plan's default rating group
            requested = message.find("Requested-Service-Unit")
            used = message.find_all("Used-Service-Unit")
            if requested is None and not used and request_type not in (EVENT, UPDATE):
                return charges, failures, quotas
            # a CCR-U without units still goes to the charge script: for a redirected or restricted client it
            # is the request for units after the Validity-Time (RFC 4006 §5.6.3); otherwise it changes nothing
            rating_group = rating.default_rating_groups.get(plan)
            charge = None if rating_group is None else self._mscc_charge(
                rating_group, message.get("Service-Identifier"), requested, used, None, t, keys, granting, quotas,
                request_type == EVENT)
            if charge is None:
                failures.append(MsccOutcome(rating_group=rating_group or 0, result_code=RATING_FAILED))
            else:
                charges.append(charge)
            return charges, failures, quotas
        for group in groups:
            rating_group = group.get("Rating-Group")
            service_id = group.get("Service-Identifier")
            if rating_group is None:
                rating_group = rating.default_rating_groups.get(plan)
            charge = None if rating_group is None else self._mscc_charge(
                rating_group, service_id, group.find("Requested-Service-Unit"), group.find_all("Used-Service-Unit"),
                group, t, keys, granting, quotas, request_type == EVENT)
            if charge is None:
                failures.append(MsccOutcome(rating_group=rating_group or 0, service_id=service_id,
                                            result_code=RATING_FAILED))
            else:
                charges.append(charge)
        return charges, failures, quotas

    def _mscc_charge(self, rating_group: int, service_id: int | None, requested: Avp | None, used: list[Avp],
                     group: Avp | None, t: float, keys: tuple, granting: bool, quotas: dict,
                     event: bool) -> MsccCharge | None:
        """One MSCC (or the command-level units) rated with the schedule in force at t; None when the plan
        has no rate for the rating group. A change of schedule within the grant horizon adds the
        Tariff-Time-Change, the next schedule and its period keys (CCR-I/U: what may get a grant)."""
        plan, plmn, destination, context, by_service_id = keys
        rating = self.rating
        try:
            choice = rating.choose(plan, rating_group, t, plmn, destination, context,
                                   service_id if by_service_id else None)
        except UnknownRate:
            return None
        rated = choice.rated
        validity = rated.quota.validity
        change_ms = next_schedule = None
        next_periods: dict[str, str] = {}
        change = choice.change
        if granting and change is not None and change < t + rated.horizon:
            rating.after_change(choice)
            change_ms = int(change * 1000)
            next_schedule = choice.next_rated.script_ref
            next_periods = choice.next_periods
            following = choice.following
            if following is not None and following < t + rated.horizon:
                # one Tariff-Time-Change per grant: it must be used up before the change after that one
                validity = encode_avp("Validity-Time", max(1, math.ceil(following - t)))
        quotas[(rating_group, service_id)] = (rated.quota, validity)
        used_units, reason, (before, after, indeterminate) = _sum_units(used)
        if reason is None and group is not None:
            reason = group.get("Reporting-Reason")
        return MsccCharge(
            rating_group=rating_group,
            schedule=rated.script_ref,
            service_id=service_id,
            used=used_units,
            requested=requested is not None or event,
            requested_units=_units(requested),
            reporting_reason=reason,
            used_before=before,
            used_after=after,
            used_indeterminate=indeterminate,
            tariff_change_ms=change_ms,
            next_schedule=next_schedule,
            periods=rating.periods(rated, t) if rated.periods else _NO_PERIODS,
            next_periods=next_periods,
        )

    # ---- answers -----------------------------------------------------------------------------------------

    def _header_avps(self, message: Message, result_code: int) -> list:
        """The answer's leading AVPs (error answers; a CCA built by _encode has the same bytes from _header)."""
        return [self._header(message, result_code, message.get(_CC_REQUEST_TYPE), message.get(_CC_REQUEST_NUMBER))]

    def _header(self, message: Message, result_code: int, request_type: int | None,
                request_number: int | None) -> bytes:
        """Session-Id, Result-Code, Origin-Host, Origin-Realm, Auth-Application-Id, CC-Request-Type/-Number,
        CC-Session-Failover and the failure-handling hints, from bytes cached per result code and per peer."""
        fixed = self._result_blocks.get(result_code)
        if fixed is None:
            fixed = _RESULT_CODE(result_code) + b"".join(encode_avp(n, v) for n, v in self._identity) + _AUTH_APP_4
            if len(self._result_blocks) < 1_000:
                self._result_blocks[result_code] = fixed
        header = _SESSION_ID(message.get(_SESSION_ID_KEY) or "") + fixed
        if request_type is not None:
            header += _CC_REQUEST_TYPE_AVP(request_type)
        if request_number is not None:
            header += _CC_REQUEST_NUMBER_AVP(request_number)
        host, realm = message.get(_ORIGIN_HOST) or "", message.get(_ORIGIN_REALM) or ""
        failover = self.cc_session_failover
        key = (host, realm, failover)
        tail = self._peer_tails.get(key)
        if tail is None:
            tail = encode_avp("CC-Session-Failover", failover) if failover is not None else b""
            if self._failure_handling is not None:
                tail += b"".join(self._hints_for(host, realm))
            if len(self._peer_tails) < 10_000:
                self._peer_tails[key] = tail
        return header + tail

    def _hints_for(self, host: str, realm: str) -> list[bytes]:
        """CCFH/DDFH for this gateway (a peer rule, else a realm rule, else the default), encoded once per
        (host, realm) and cached."""
        key = (host, realm)
        hints = self._failure_hints.get(key)
        if hints is None:
            from ocs.config import CCFH_VALUES, DDFH_VALUES

            config = self._failure_handling
            ccfh, ddfh = config.credit_control_failure_handling, config.direct_debiting_failure_handling
            by_peer = [r for r in config.rules if r.peer is not None and r.peer.lower() == host.lower()]
            by_realm = [r for r in config.rules if r.realm is not None and r.realm.lower() == realm.lower()]
            for rule in (by_peer or by_realm)[:1]:
                ccfh = rule.credit_control_failure_handling or ccfh
                ddfh = rule.direct_debiting_failure_handling or ddfh
            hints = []
            if ccfh is not None:
                hints.append(encode_avp("Credit-Control-Failure-Handling", CCFH_VALUES[ccfh]))
            if ddfh is not None:
                hints.append(encode_avp("Direct-Debiting-Failure-Handling", DDFH_VALUES[ddfh]))
            if len(self._failure_hints) < 10_000:
                self._failure_hints[key] = hints
        return hints

    def _trailer(self, message: Message) -> list:
        return [bytes(p.raw) for p in message.find_all("Proxy-Info")]

    @staticmethod
    def _trailer_bytes(message: Message) -> bytes:
        """The request's Proxy-Info AVPs as received (RFC 6733 §6.7.3), padded."""
        if _PROXY_INFO not in message.avp_keys:
            return b""
        trailer = b""
        for proxy_info in message.find_all(_PROXY_INFO):
            raw = proxy_info.raw
            trailer += raw + _PAD[len(raw) & 3]
        return trailer

    def _too_busy(self, message: Message) -> bytes:
        """3004 as a protocol error (E bit, generic answer, RFC 6733 §7.2): the gateway's CCFH decides
        whether to retry elsewhere; a retry of a request that did commit is a duplicate and changes nothing."""
        avps: list = [("Session-Id", message.session_id)] if message.session_id is not None else []
        avps += [*self._identity, ("Result-Code", TOO_BUSY), ("Error-Message", "balance store unavailable"),
                 *self._trailer(message)]
        return encode_answer(message, avps, error=True)

    def _reject(self, message: Message, rejected: RequestRejected) -> bytes:
        avps = self._header_avps(message, rejected.result_code)
        if rejected.message and rejected.result_code != SUCCESS:
            avps.append(("Error-Message", rejected.message))
        avps.extend(self._trailer(message))
        if rejected.failed_avp is not None:
            avps.append(("Failed-AVP", [rejected.failed_avp]))
        return encode_answer(message, avps)

    def _encode(self, message: Message, outcome: ChargeOutcome, quotas: dict) -> bytes:
        """The CCA; `quotas` holds, per (rating group, Service-Identifier), the constant AVPs of the schedule
        this request was rated with and the Validity-Time of a grant (see _mscc_charge). Built from encoded
        bytes (cached constant parts, one struct call per integer AVP) and joined once."""
        request_type = message.get(_CC_REQUEST_TYPE)
        result_code = outcome.result_code
        parts: list[bytes] = []
        add = parts.append
        failed: list[bytes] = []
        session = request_type != EVENT  # an event gets units, never quota control
        if _MSCC_KEY not in message.avp_keys:
            # RFC 4006 form: GSU, Cost-Information, FUI and Validity-Time at command level (no 3GPP thresholds,
            # holding time or triggers: they live in MSCC only)
            for mscc in outcome.msccs:
                quota, validity = _quota_for(quotas, mscc, session)
                if mscc.granted is not None:
                    add(_gsu(mscc))
                if mscc.cost is not None:
                    add(self._cost_bytes(mscc.cost))
                if mscc.final_unit_action is not None:
                    add(quota.final_unit_indication(mscc.final_unit_action, mscc.fair_usage)
                        if quota is not None else _bare_fui(mscc.final_unit_action))
                if quota is not None:
                    validity = validity if mscc.granted is not None else (
                        quota.final_validity if mscc.final_unit_action is not None else b"")
                    if validity:
                        add(validity)
                if mscc.result_code != SUCCESS and outcome.result_code == SUCCESS:
                    result_code = mscc.result_code
        else:
            cost = None
            for mscc in outcome.msccs:
                quota, validity = _quota_for(quotas, mscc, session)
                add(_mscc_bytes(mscc, quota, validity))
                if mscc.result_code == RATING_FAILED:
                    failed.append(_RATING_GROUP(mscc.rating_group))
                if mscc.cost is not None:
                    cost = mscc.cost if cost is None else cost + mscc.cost
            if cost is not None:
                add(self._cost_bytes(cost))
        if outcome.check_balance_result is not None:
            add(_CHECK_BALANCE_RESULT(outcome.check_balance_result))
        add(self._trailer_bytes(message))
        if failed:
            add(_FAILED_AVP(b"".join(failed)))
        header = self._header(message, result_code, request_type, message.get(_CC_REQUEST_NUMBER))
        return encode_answer_body(message, header + b"".join(parts))

    def _cost_bytes(self, micro: int) -> bytes:
        """Cost-Information ::= {Unit-Value} {Currency-Code} (RFC 4006 §8.7), encoded."""
        digits, exponent = _digits_exponent(micro)
        return _COST_INFORMATION(_UNIT_VALUE(_VALUE_DIGITS(digits) + _EXPONENT(exponent))
                                 + _CURRENCY_CODE(CURRENCY_CODES.get(self.rating.currency, 978)))


def _digits_exponent(micro: int) -> tuple[int, int]:
    """Micro-units as Unit-Value digits and exponent, trailing zeros dropped (2_500_000 → 25, -1)."""
    digits, exponent = micro, -6
    while digits and digits % 10 == 0 and exponent < 0:
        digits //= 10
        exponent += 1
    return digits, exponent


_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length & 3
_SESSION_ID_KEY = avp_key("Session-Id")
_ORIGIN_HOST = avp_key("Origin-Host")
_ORIGIN_REALM = avp_key("Origin-Realm")
_CC_REQUEST_NUMBER = avp_key("CC-Request-Number")
_PROXY_INFO = avp_key("Proxy-Info")
_MSCC_KEY = avp_key("Multiple-Services-Credit-Control")
_SESSION_ID = avp_encoder("Session-Id")
_RESULT_CODE = avp_encoder("Result-Code")
_CC_REQUEST_TYPE_AVP = avp_encoder("CC-Request-Type")
_CC_REQUEST_NUMBER_AVP = avp_encoder("CC-Request-Number")
_AUTH_APP_4 = encode_avp("Auth-Application-Id", 4)
_RATING_GROUP = avp_encoder("Rating-Group")
_SERVICE_IDENTIFIER = avp_encoder("Service-Identifier")
_TARIFF_TIME_CHANGE = avp_encoder("Tariff-Time-Change")
_CHECK_BALANCE_RESULT = avp_encoder("Check-Balance-Result")
_VALUE_DIGITS = avp_encoder("Value-Digits")
_EXPONENT = avp_encoder("Exponent")
_CURRENCY_CODE = avp_encoder("Currency-Code")
_CC_TIME = avp_encoder("CC-Time")
_CC_TOTAL_OCTETS = avp_encoder("CC-Total-Octets")
_CC_INPUT_OCTETS = avp_encoder("CC-Input-Octets")
_CC_OUTPUT_OCTETS = avp_encoder("CC-Output-Octets")
_CC_SERVICE_SPECIFIC_UNITS = avp_encoder("CC-Service-Specific-Units")
_MSCC = avp_framer("Multiple-Services-Credit-Control")
_GSU = avp_framer("Granted-Service-Unit")
_COST_INFORMATION = avp_framer("Cost-Information")
_UNIT_VALUE = avp_framer("Unit-Value")
_FAILED_AVP = avp_framer("Failed-AVP")
_BARE_FUI: dict[int, bytes] = {}  # Final-Unit-Action → Final-Unit-Indication with only that action


def _bare_fui(action: int) -> bytes:
    """Final-Unit-Indication with only its Final-Unit-Action (no schedule to take filters from)."""
    fui = _BARE_FUI.get(action)
    if fui is None:
        fui = encode_avp("Final-Unit-Indication", [("Final-Unit-Action", action)])
        if len(_BARE_FUI) < 64:
            _BARE_FUI[action] = fui
    return fui


def _gsu(mscc: MsccOutcome) -> bytes:
    """Granted-Service-Unit ::= [Tariff-Time-Change] [CC-Time] [CC-Total-Octets] [CC-Input-Octets]
    [CC-Output-Octets] [CC-Service-Specific-Units] (RFC 4006 §8.17, TS 32.299): the change inside the grant,
    as NTP seconds."""
    units = mscc.granted
    body = b"" if mscc.tariff_change_ms is None else _TARIFF_TIME_CHANGE(mscc.tariff_change_ms // 1000)
    if units.time is not None:
        body += _CC_TIME(units.time)
    if units.total is not None:
        body += _CC_TOTAL_OCTETS(units.total)
    if units.input is not None:
        body += _CC_INPUT_OCTETS(units.input)
    if units.output is not None:
        body += _CC_OUTPUT_OCTETS(units.output)
    if units.units is not None:
        body += _CC_SERVICE_SPECIFIC_UNITS(units.units)
    return _GSU(body)


def _mscc_bytes(mscc: MsccOutcome, quota: QuotaAvps | None, validity: bytes = b"") -> bytes:
    """One answer MSCC. `quota` (an MSCC of a session answered 2001, or with a final unit action such as
    5030 for a bundle-only rating group) adds the rate card's quota control: with a grant its Validity-Time
    (`validity`), thresholds (not with final units: nothing more to ask for), holding time and triggers;
    without a grant but with final_unit_action (REDIRECT/RESTRICT_ACCESS, the units are used, or none to
    give) the Validity-Time of the restricted state and the FUI with its Redirect-Server or filters (the
    fair-usage ones when the outcome says so), so the gateway keeps redirecting."""
    granted = mscc.granted
    body = b"" if granted is None else _gsu(mscc)
    if mscc.service_id is not None:
        body += _SERVICE_IDENTIFIER(mscc.service_id)
    body += _RATING_GROUP(mscc.rating_group)
    action = mscc.final_unit_action
    if quota is None:
        body += _RESULT_CODE(mscc.result_code)
        if action is not None:
            body += _bare_fui(action)
        return _MSCC(body)
    if granted is not None:
        body += validity
    elif action is not None:
        body += quota.final_validity
    body += _RESULT_CODE(mscc.result_code)
    if action is not None:
        body += quota.final_unit_indication(action, mscc.fair_usage)
    if granted is not None:
        if action is None and quota.thresholds:
            body += quota.armed_thresholds(granted)
        body += quota.tail
    return _MSCC(body)
