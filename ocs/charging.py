"""Credit control (RFC 4006 / TS 32.299 Gy/Ro): a decoded CCR in, CCA bytes out.

Theory of operation: `CreditControl.answer(message)` checks the request (5005/5004 with Failed-AVP),
finds the subscriber or the session (cached index keys), turns every Multiple-Services-Credit-Control into
an `MsccCharge` carrying its compiled rating schedule, and makes exactly one `BalanceStore.charge` call: the
charge script does duplicate detection, commit, release and reservation atomically and returns a
`ChargeOutcome`, which is encoded here into the CCA. A duplicate gets the stored outcome re-encoded, so the
answer is the same and nothing is debited twice. Nothing here touches sockets or Redis directly.
"""

from __future__ import annotations

import logging
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
)
from balances.store import BalanceStore
from ocs.clock import Clock
from protocol.codec import Avp, DecodeError, Message, encode_answer, encode_avp
from protocol.dictionary import lookup
from ratecards.schedule import ANSWER_ONLY_FIELDS, REDIRECT, RESTRICT_ACCESS, RatingSchedule

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

    __slots__ = ("validity", "final_validity", "action", "fui", "thresholds", "tail")

    def __init__(self, s: RatingSchedule) -> None:
        self.validity = encode_avp("Validity-Time", s.validity_time) if s.validity_time else b""
        self.final_validity = encode_avp("Validity-Time", s.final_validity_time) if s.final_validity_time else b""
        self.action = s.final_unit_action
        self.fui = encode_avp("Final-Unit-Indication", _fui_avps(s))
        thresholds = []  # (the GSU fields that arm it, the AVP)
        if s.time_quota_threshold:
            thresholds.append((("time",), encode_avp("Time-Quota-Threshold", s.time_quota_threshold)))
        if s.volume_quota_threshold:
            thresholds.append((("total", "input", "output"),
                               encode_avp("Volume-Quota-Threshold", s.volume_quota_threshold)))
        if s.unit_quota_threshold:
            thresholds.append((("units",), encode_avp("Unit-Quota-Threshold", s.unit_quota_threshold)))
        self.thresholds = tuple(thresholds)
        tail = b""
        if s.quota_holding_time is not None:
            tail += encode_avp("Quota-Holding-Time", s.quota_holding_time)
        if s.triggers is not None:
            tail += encode_avp("Trigger", [("Trigger-Type", t) for t in s.triggers])
        self.tail = tail

    def final_unit_indication(self, action: int) -> bytes:
        """The schedule's FUI, or a bare one when a stored outcome names another action (card changed)."""
        if action == self.action:
            return self.fui
        return encode_avp("Final-Unit-Indication", [("Final-Unit-Action", action)])

    def armed_thresholds(self, granted: Units) -> list[bytes]:
        return [avp for fields, avp in self.thresholds if any(getattr(granted, f) is not None for f in fields)]


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
    return Units(
        time=group.get("CC-Time"),
        total=group.get("CC-Total-Octets"),
        input=group.get("CC-Input-Octets"),
        output=group.get("CC-Output-Octets"),
        units=group.get("CC-Service-Specific-Units"),
    )


def _sum_units(groups: list[Avp]) -> tuple[Units | None, int | None]:
    """All USUs of one MSCC summed (a tariff change reports two), and the first Reporting-Reason inside."""
    if not groups:
        return None, None
    total: dict[str, int] = {}
    reason = None
    for group in groups:
        for field, avp_name in UNIT_AVP.items():
            value = group.get(avp_name)
            if value is not None:
                total[field] = total.get(field, 0) + value
        if reason is None:
            reason = group.get("Reporting-Reason")
    return Units(**total), reason


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


def _script_schedule(s: RatingSchedule) -> dict:
    schedule = msgspec.to_builtins(s)
    for name in ANSWER_ONLY_FIELDS:
        schedule.pop(name, None)
    return schedule


class CreditControl:
    """Answers CCRs; one instance per server process, shared by every peer connection."""

    def __init__(
        self,
        *,
        origin_host: str,
        origin_realm: str,
        store: BalanceStore,
        plans: Mapping[str, Mapping[int, RatingSchedule]],
        default_rating_groups: Mapping[str, int] | None = None,
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
        self.default_rating_groups = dict(default_rating_groups or {})
        self._failure_handling = failure_handling
        self._failure_hints: dict[tuple[str, str], list[bytes]] = {}
        self._identity = [("Origin-Host", origin_host), ("Origin-Realm", origin_realm)]
        self.set_plans(plans)

    def set_plans(self, plans: Mapping[str, Mapping[int, RatingSchedule]]) -> None:
        """Compiled schedules, kept as the dicts the charge script takes (without the fields only the answer
        needs), and their constant quota-control AVPs encoded: both built once per plan × RG."""
        self._schedules = {
            plan: {rg: _script_schedule(s) for rg, s in groups.items()} for plan, groups in plans.items()
        }
        self._quota = {plan: {rg: QuotaAvps(s) for rg, s in groups.items()} for plan, groups in plans.items()}
        self._currency = {
            plan: next(iter(groups.values())).currency if groups else "EUR" for plan, groups in plans.items()
        }
        for plan, groups in plans.items():
            if plan not in self.default_rating_groups and groups:
                self.default_rating_groups[plan] = min(groups)

    # ---- entry point -------------------------------------------------------------------------------------

    async def answer(self, message: Message, peer: str | None = None) -> bytes:
        """The CCA for one CCR (never raises: every failure becomes a Diameter answer). `peer` is the
        Origin-Host of the connection it came on: with the CCR's Origin-Host it is recorded as the session's
        owner, where RAR/ASR go."""
        request_type = None
        started = time.perf_counter()
        try:
            self._check_required(message)
            request_type = message.get("CC-Request-Type")
            outcome, location = await self._charge(message, request_type, peer)
            answer = self._encode(message, outcome, location)
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

    def _check_required(self, message: Message) -> None:
        for name in REQUIRED_CCR_AVPS:
            if message.find(name) is None:
                raise missing_avp(name)
        request_type = message.find("CC-Request-Type")
        if request_type.value not in (INITIAL, UPDATE, TERMINATION, EVENT):
            raise invalid_avp(request_type, "CC-Request-Type must be 1..4")
        app = message.find("Auth-Application-Id")
        if app.value != 4:
            raise invalid_avp(app, "Auth-Application-Id must be 4 (credit control)")
        if request_type.value == EVENT:
            action = message.find("Requested-Action")
            if action is None:
                raise missing_avp("Requested-Action")
            if action.value not in (0, 1, 2, 3):
                raise invalid_avp(action, "Requested-Action must be 0..3")

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

    async def _charge(self, message: Message, request_type: int,
                      peer: str | None = None) -> tuple[ChargeOutcome, Location | None]:
        session_id = message.session_id
        request_number = message.get("CC-Request-Number")
        context: dict[str, Any] = {}
        if request_type in (INITIAL, EVENT):
            self._check_service_context(message)
            location, imsi = await self._locate_subscriber(message)
            context = _context(message, imsi)
        else:
            location = await self.store.locate_session(session_id)
            if location is None:
                if request_type == TERMINATION:
                    raise RequestRejected(self.unknown_session_termination_result, message="session unknown")
                raise RequestRejected(UNKNOWN_SESSION_ID, message="session unknown")
        command_level = not message.find_all("Multiple-Services-Credit-Control")
        for _attempt in range(2):
            msccs, rating_failures = self._msccs(message, location.plan, request_type)
            request = ChargeRequest(
                session_id=session_id,
                request_type=request_type,
                request_number=request_number,
                msisdn=location.msisdn,
                plan=location.plan,
                partition=location.partition,
                now_ms=self.clock.now_ms(),
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
            )
            charge_started = time.perf_counter()
            outcome = await self.store.charge(request)
            if self.metrics is not None:
                self.metrics.observe_redis(time.perf_counter() - charge_started)
            if outcome.stale_plan is None:
                break
            self.store.forget(msisdn=location.msisdn, session_id=session_id)
            location = Location(location.partition, location.msisdn, outcome.stale_plan, outcome.stale_group or "")
        else:
            raise RequestRejected(UNABLE_TO_COMPLY, message="subscriber plan changed during the request")
        if rating_failures and not outcome.duplicate:
            outcome.msccs.extend(rating_failures)
        return outcome, location

    def _msccs(self, message: Message, plan: str, request_type: int) -> tuple[list[MsccCharge], list[MsccOutcome]]:
        """Every MSCC as an MsccCharge; MSCCs whose rating group the plan cannot rate become 5031 outcomes."""
        schedules = self._schedules.get(plan, {})
        charges: list[MsccCharge] = []
        failures: list[MsccOutcome] = []
        groups = message.find_all("Multiple-Services-Credit-Control")
        if not groups:
            # plain RFC 4006 client: command-level units on the plan's default rating group
            requested = message.find("Requested-Service-Unit")
            used = message.find_all("Used-Service-Unit")
            if requested is None and not used and request_type not in (EVENT, UPDATE):
                return charges, failures
            # a CCR-U without units still goes to the charge script: for a redirected or restricted client it
            # is the request for units after the Validity-Time (RFC 4006 §5.6.3); otherwise it changes nothing
            rating_group = self.default_rating_groups.get(plan)
            schedule = schedules.get(rating_group) if rating_group is not None else None
            if schedule is None:
                failures.append(MsccOutcome(rating_group=rating_group or 0, result_code=RATING_FAILED))
                return charges, failures
            used_units, reason = _sum_units(used)
            charges.append(MsccCharge(
                rating_group=rating_group,
                schedule=schedule,
                service_id=message.get("Service-Identifier"),
                used=used_units,
                requested=requested is not None or request_type == EVENT,
                requested_units=_units(requested),
                reporting_reason=reason,
            ))
            return charges, failures
        for group in groups:
            rating_group = group.get("Rating-Group")
            service_id = group.get("Service-Identifier")
            if rating_group is None:
                rating_group = self.default_rating_groups.get(plan)
            schedule = schedules.get(rating_group) if rating_group is not None else None
            if schedule is None:
                failures.append(MsccOutcome(rating_group=rating_group or 0, service_id=service_id,
                                            result_code=RATING_FAILED))
                continue
            requested = group.find("Requested-Service-Unit")
            used_units, reason = _sum_units(group.find_all("Used-Service-Unit"))
            if reason is None:
                reason = group.get("Reporting-Reason")
            charges.append(MsccCharge(
                rating_group=rating_group,
                schedule=schedule,
                service_id=service_id,
                used=used_units,
                requested=requested is not None or request_type == EVENT,
                requested_units=_units(requested),
                reporting_reason=reason,
            ))
        return charges, failures

    # ---- answers -----------------------------------------------------------------------------------------

    def _header_avps(self, message: Message, result_code: int) -> list:
        avps: list = [
            ("Session-Id", message.session_id or ""),
            ("Result-Code", result_code),
            *self._identity,
            ("Auth-Application-Id", 4),
        ]
        request_type = message.get("CC-Request-Type")
        if request_type is not None:
            avps.append(("CC-Request-Type", request_type))
        request_number = message.get("CC-Request-Number")
        if request_number is not None:
            avps.append(("CC-Request-Number", request_number))
        if self.cc_session_failover is not None:
            avps.append(("CC-Session-Failover", self.cc_session_failover))
        if self._failure_handling is not None:
            avps.extend(self._hints_for(message.get("Origin-Host") or "", message.get("Origin-Realm") or ""))
        return avps

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

    def _encode(self, message: Message, outcome: ChargeOutcome, location: Location | None) -> bytes:
        avps = self._header_avps(message, outcome.result_code)
        failed: list[bytes] = []
        command_level = not message.find_all("Multiple-Services-Credit-Control")
        plan = location.plan if location is not None else ""
        quotas = self._quota.get(plan, {})
        session = message.get("CC-Request-Type") != EVENT  # an event gets units, never quota control
        if command_level:
            # RFC 4006 form: GSU, Cost-Information, FUI and Validity-Time at command level (no 3GPP thresholds,
            # holding time or triggers: they live in MSCC only)
            for mscc in outcome.msccs:
                quota = quotas.get(mscc.rating_group) if session and mscc.result_code == SUCCESS else None
                if mscc.granted is not None:
                    avps.append(("Granted-Service-Unit", self._unit_avps(mscc.granted)))
                if mscc.cost is not None:
                    avps.append(("Cost-Information", self._cost(mscc.cost, plan)))
                if mscc.final_unit_action is not None:
                    avps.append(quota.final_unit_indication(mscc.final_unit_action) if quota is not None
                                else encode_avp("Final-Unit-Indication",
                                                [("Final-Unit-Action", mscc.final_unit_action)]))
                if quota is not None:
                    validity = quota.validity if mscc.granted is not None else (
                        quota.final_validity if mscc.final_unit_action is not None else b"")
                    if validity:
                        avps.append(validity)
                if mscc.result_code != SUCCESS and outcome.result_code == SUCCESS:
                    avps[1] = ("Result-Code", mscc.result_code)
        else:
            for mscc in outcome.msccs:
                quota = quotas.get(mscc.rating_group) if session and mscc.result_code == SUCCESS else None
                avps.append(("Multiple-Services-Credit-Control", self._mscc_avps(mscc, quota)))
                if mscc.result_code == RATING_FAILED:
                    failed.append(encode_avp("Rating-Group", mscc.rating_group))
            costs = [m.cost for m in outcome.msccs if m.cost is not None]
            if costs:
                avps.append(("Cost-Information", self._cost(sum(costs), plan)))
        if outcome.check_balance_result is not None:
            avps.append(("Check-Balance-Result", outcome.check_balance_result))
        avps.extend(self._trailer(message))
        if failed:
            avps.append(("Failed-AVP", failed))
        return encode_answer(message, avps)

    @staticmethod
    def _unit_avps(units: Units) -> list:
        return [(UNIT_AVP[field], value) for field, value in msgspec.structs.asdict(units).items()
                if value is not None]

    def _mscc_avps(self, mscc: MsccOutcome, quota: QuotaAvps | None) -> list:
        """One answer MSCC. `quota` (a 2001 MSCC of a session) adds the rate card's quota control: with a
        grant its Validity-Time, thresholds (not with final units: nothing more to ask for), holding time and
        triggers; without a grant but with final_unit_action (REDIRECT/RESTRICT_ACCESS, the units are used)
        the Validity-Time of the restricted state and the FUI, so the gateway keeps redirecting."""
        avps: list = []
        granted = mscc.granted
        if granted is not None:
            avps.append(("Granted-Service-Unit", self._unit_avps(granted)))
        if mscc.service_id is not None:
            avps.append(("Service-Identifier", mscc.service_id))
        avps.append(("Rating-Group", mscc.rating_group))
        if quota is None:
            avps.append(("Result-Code", mscc.result_code))
            if mscc.final_unit_action is not None:
                avps.append(("Final-Unit-Indication", [("Final-Unit-Action", mscc.final_unit_action)]))
            return avps
        if granted is not None:
            if quota.validity:
                avps.append(quota.validity)
        elif mscc.final_unit_action is not None and quota.final_validity:
            avps.append(quota.final_validity)
        avps.append(("Result-Code", mscc.result_code))
        if mscc.final_unit_action is not None:
            avps.append(quota.final_unit_indication(mscc.final_unit_action))
        if granted is not None:
            if mscc.final_unit_action is None and quota.thresholds:
                avps.extend(quota.armed_thresholds(granted))
            if quota.tail:
                avps.append(quota.tail)
        return avps

    def _cost(self, micro: int, plan: str) -> list:
        digits, exponent = micro, -6
        while digits and digits % 10 == 0 and exponent < 0:
            digits //= 10
            exponent += 1
        currency = self._currency.get(plan, "EUR")
        return [("Unit-Value", [("Value-Digits", digits), ("Exponent", exponent)]),
                ("Currency-Code", CURRENCY_CODES.get(currency, 978))]
