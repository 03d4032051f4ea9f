"""Re-rating: the usage billed in a finalized period priced again with a corrected rate card, by the rating
engine online charging uses, and the differences recorded as charges for the next bill run.

The versions: the rate-card versions in force (ocs.ratecard_store.load_active_cards; the CLI passes them)
with the corrected card in place of the version it corrects — the one with the same effective-from (none:
the version without one), else it is added as a version of its own from its effective-from. They are
compiled into one ratecards.Rater, so each record is rated with the version, tariff (time band, roaming
zone, destination, Service-Context-Id kind, Service-Identifier) and extended pricing in force for it:

- schedule: Rater.schedule_for(plan, rating group, at=<rating time>, plmn=<ratingPlmn, else
  servingNodePLMN>, destination=<calledPartyAddress>, service_context=<serviceContextId>,
  service_identifier=...). The plan is the subscription's. Online charging rates reported usage with the
  schedule of the grant it was used under, chosen at the request that granted it: the rating time is the
  record's ratedAt (the grant's time, as the charge script recorded it); for a CDR without it, a usage
  record's is the time of the session's previous record of that rating group, else the session's opening
  (recordOpeningTime), an event or refund record's its own time. A record split at a Tariff-Time-Change
  (tariffParts) is rated part by part as online: "before" with the grant's schedule, "after" with the
  schedule from the change on (Rater.schedule_for's next change), "used" and "indeterminate" at the dearer
  of the two.
- allowances stay as they were taken online (allowance_units, free; split over the parts in their order),
  the rest is priced in money with ratecards.pricing.charge_for_usage: session scopes count per session,
  day / week / month scopes and caps per subscriber × rating group × period key (Rater.period_key), over
  every guided record of the subscriber back to 32 days before the period's first record (a month's scope
  or cap starts at most that far back). Amounts come rounded from ratecards.pricing (round_to_minor): no
  rounding here.

The differences: a postpaid record owes its money from invoiced money buckets (billing.cdrs): what bonus
money paid stays paid, so the new invoiced amount is max(0, new − bonus) and the difference to the old one
is charged or credited per account × rating group (kind "rerating", idempotent by period × version ×
account × rating group). What the bonus part would change, and every prepaid difference, is reported, not
adjusted: that money is in the OCS balance (a top-up or an adjustment there).

Imports billing and ratecards only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import msgspec

from billing.accounts import BillingError
from billing.billrun import parse_period
from billing.config import Catalog
from billing.db import Database
from ratecards import RateCard, RateCardError, Rater, RatingSchedule, UnknownRate, compile_card, effective_epoch
from ratecards.pricing import charge_for_usage

__all__ = ["rerate", "version_set"]

CONTEXT_MS = 32 * 86_400_000  # a month's scope or cap period starts at most this long before a record
_parts = msgspec.json.Decoder(list[dict[str, Any]])


def version_set(active: Sequence[RateCard], corrected: RateCard) -> list[RateCard]:
    """The active versions with `corrected` in place of the one with the same effective-from."""
    for card in active:
        if card.version == corrected.version:
            raise BillingError(f"the corrected rate card has the version {corrected.version} of a card in force; "
                               "give it a new one")
        if card.currency != corrected.currency:
            raise BillingError("the corrected rate card has another currency")
    start = effective_epoch(corrected)
    return [card for card in active if effective_epoch(card) != start] + [corrected]


def _units(unit: str, usage: dict[str, Any]) -> int:
    """A usage in the schedule's unit, as the charge script reads it (common.lua units_in)."""
    if unit == "bytes":
        if usage.get("octetsTotal") is not None:
            return int(usage["octetsTotal"])
        return int(usage.get("octetsIn") or 0) + int(usage.get("octetsOut") or 0)
    if unit == "seconds":
        return int(usage.get("time") or 0)
    return int(usage.get("units") or 0)


class _Counters:
    """The charge script's counters (scope units and cap money) rebuilt while records are rated in order."""

    def __init__(self, rater: Rater) -> None:
        self.rater = rater
        self.values: dict[tuple, int] = defaultdict(int)

    def view(self, s: RatingSchedule, at: float, msisdn: str, session: str | None, rg: int) -> tuple:
        """(schedule, scope counter key or None, cap counter key or None)."""
        scope = None
        if s.scope == "session":
            scope = ("session", session, rg)
        elif s.scope != "report":
            scope = ("scope", msisdn, rg, self.rater.period_key(at, s.scope))
        cap = ("cap", msisdn, rg, self.rater.period_key(at, s.cap_period)) if s.cap else None
        return s, scope, cap

    def charge(self, views: list[tuple], units: int) -> int:
        """Price `units` at the dearest view (the first on a tie, as online) and advance its counters."""
        best, amount = views[0], -1
        for view in views:
            s, scope, cap = view
            a = charge_for_usage(s, units, used_before=self.values[scope] if scope else 0,
                                 spent_before=self.values[cap] if cap else 0)
            if a > amount:
                best, amount = view, a
        _, scope, cap = best
        if scope and units > 0:
            self.values[scope] += units
        if cap:
            self.values[cap] += amount
        return amount


_COLUMNS = ("u.record_id, u.record_type, u.msisdn, u.session_id, u.rating_group, u.service_id, u.opening_time, "
            "u.record_time, u.request_number, u.usage_time, u.octets_in, u.octets_out, u.octets_total, "
            "u.usage_units, u.allowance_units, u.amount, u.money_bonus, u.serving_plmn, u.service_context, "
            "u.destination, u.tariff_parts, u.rated_at, s.plan, u.account_id, a.payment_type, u.invoice_id")
_FROM = ("FROM usage_records u LEFT JOIN subscriptions s ON s.subscription_id = u.subscription_id "
         "LEFT JOIN accounts a ON a.account_id = u.account_id WHERE u.record_type IN ('usage', 'event', 'refund') ")


def _records(db: Database, run_id: int, counting: bool) -> tuple[list[dict], set[str]]:
    """The records to rate in order: the run's, their sessions' other records, and (when a schedule counts
    over periods) the subscribers' earlier guided records; and the ids of the run's."""
    invoices = "SELECT invoice_id FROM invoices WHERE run_id = ?"
    rows = {r["record_id"]: r for r in db.query_dicts(
        f"SELECT {_COLUMNS} {_FROM} AND u.invoice_id IN ({invoices})", (run_id,))}
    billed = set(rows)
    for r in db.query_dicts(f"SELECT {_COLUMNS} {_FROM} AND u.session_id IN (SELECT session_id FROM usage_records "
                            f"WHERE invoice_id IN ({invoices}))", (run_id,)):
        rows.setdefault(r["record_id"], r)
    if counting and billed:
        first = min(rows[i]["record_time"] for i in billed)
        last = max(rows[i]["record_time"] for i in billed)
        for r in db.query_dicts(
                f"SELECT {_COLUMNS} {_FROM} AND u.state IN ('guided', 'billed') AND u.record_time >= ? "
                f"AND u.record_time <= ? AND u.msisdn IN (SELECT msisdn FROM usage_records WHERE invoice_id IN "
                f"({invoices}))", (first - CONTEXT_MS, last, run_id)):
            rows.setdefault(r["record_id"], r)
    records = sorted(rows.values(), key=lambda r: (r["record_time"], r["request_number"] or 0, r["record_id"]))
    # the rating time: the CDR's ratedAt; without it (older CDRs), of usage the session's previous record of the
    # rating group, else the session's opening
    previous: dict[tuple, int] = {}
    for r in sorted(records, key=lambda r: (r["session_id"] or "", r["rating_group"], r["request_number"] or 0,
                                            r["record_time"])):
        key = (r["session_id"], r["rating_group"])
        if r["rated_at"] is None:
            if r["record_type"] == "usage" and r["session_id"]:
                r["rated_at"] = previous.get(key, r["opening_time"] or r["record_time"])
            else:
                r["rated_at"] = r["record_time"]
        if r["session_id"]:
            previous[key] = r["record_time"]
    return records, billed


def _price(rater: Rater, counters: _Counters, r: dict) -> int:
    """The record's money amount under the corrected versions (UnknownRate / ValueError propagate)."""
    plan, rg, at = r["plan"], int(r["rating_group"]), r["rated_at"] / 1000
    keys = {"plmn": r["serving_plmn"], "destination": r["destination"], "service_context": r["service_context"],
            "service_identifier": r["service_id"]}
    g, change = rater.schedule_for(plan, rg, at=at, **keys)
    usage = {"time": r["usage_time"], "octetsIn": r["octets_in"], "octetsOut": r["octets_out"],
             "octetsTotal": r["octets_total"], "units": r["usage_units"]}
    if r["record_type"] == "refund":
        return -charge_for_usage(g, _units(g.unit, usage))
    allowance = int(r["allowance_units"] or 0)
    view = counters.view(g, at, r["msisdn"], r["session_id"], rg)
    if not r["tariff_parts"]:
        units = _units(g.unit, usage)
        return counters.charge([view], max(0, units - allowance))
    if change is not None:
        after_schedule, _ = rater.schedule_for(plan, rg, at=change, **keys)
        after = counters.view(after_schedule, change, r["msisdn"], r["session_id"], rg)
    else:
        after = view
    views = {"used": [view, after], "before": [view], "after": [after], "indeterminate": [view, after]}
    amount = 0
    for part in _parts.decode(r["tariff_parts"]):
        units = _units(g.unit, part.get("usage") or {})
        free = min(units, allowance)
        allowance -= free
        amount += counters.charge(views[part["tariffChangeUsage"]], units - free)
    return amount


def rerate(db: Database, catalog: Catalog, corrected: RateCard, period: str, *, today: str, now_ms: int,
           active: Sequence[RateCard] | None = None) -> dict:
    """Price the usage billed in `period` again (see the module docstring) and record the postpaid
    differences as re-rating charges billed on the next run. Never changes a CDR or an invoice.
    `active`: the rate-card versions in force (default: the catalog's card)."""
    parse_period(period)
    run = db.one("SELECT run_id, status FROM bill_runs WHERE period = ?", (period,))
    if run is None or run[1] != "finalized":
        raise BillingError(f"bill run {period} is not finalized: re-run it instead of re-rating")
    if corrected.currency != catalog.currency:
        raise BillingError("the corrected rate card has another currency")
    try:
        rater = compile_card(version_set(active or [catalog.ratecard], corrected))
    except RateCardError as exc:
        raise BillingError(f"corrected rate card: {exc}") from None
    counting = any(s.scope != "report" or s.cap for _, _, s in rater.schedules())
    records, billed = _records(db, int(run[0]), counting)
    counters = _Counters(rater)
    diffs: dict[tuple[str, int], int] = defaultdict(int)
    bonus_diffs: dict[tuple[str, int], int] = defaultdict(int)
    prepaid: dict[tuple[str, int], int] = defaultdict(int)
    old_total = new_total = 0
    for r in records:
        mine = r["record_id"] in billed
        if r["plan"] is None:  # a context record not guided to a subscription: nothing to rate it with
            continue
        try:
            new = _price(rater, counters, r)
        except UnknownRate as exc:
            if mine:
                raise BillingError(f"corrected rate card: {exc}") from None
            continue
        if not mine:
            continue
        old, bonus, rg = int(r["amount"]), int(r["money_bonus"] or 0), int(r["rating_group"])
        old_total += old
        new_total += new
        key = (r["account_id"], rg)
        if r["payment_type"] != "postpaid":
            prepaid[key] += new - old
            continue
        invoiced = new - bonus if r["record_type"] == "refund" else max(0, new - bonus)
        diffs[key] += invoiced - (old - bonus)
        bonus_diffs[key] += (new - old) - (invoiced - (old - bonus))
    created = []
    with db.transaction(lock="billing"):
        for (account_id, rg), diff in sorted(diffs.items()):
            if diff == 0:
                continue
            ref = f"rerate:{period}:{corrected.version}:{account_id}:{rg}"
            exists = db.scalar("SELECT charge_id FROM charges WHERE reference = ?", (ref,))
            if exists is None:
                description = f"Re-rating {period} {catalog.service_name(rg)} (corrected rate card {corrected.version})"
                db.execute("INSERT INTO charges (charge_id, account_id, kind, description, category, amount, "
                           "charge_date, reference, invoice_id, created_at) VALUES (?, ?, 'rerating', ?, ?, ?, ?, ?, "
                           "NULL, ?)", (db.next_ids("charge"), account_id, description, catalog.usage_category(rg),
                                        diff, today, ref, now_ms))
            created.append({"account_id": account_id, "rating_group": rg, "amount": diff, "created": exists is None})

    def listed(found: dict[tuple[str, int], int]) -> list[dict]:
        return [{"account_id": a, "rating_group": g, "amount": d} for (a, g), d in sorted(found.items()) if d]

    return {"period": period, "version": corrected.version, "records": len(billed), "old_amount": old_total,
            "new_amount": new_total, "adjustments": created, "total": sum(c["amount"] for c in created),
            "prepaid_not_adjusted": listed(prepaid), "bonus_not_adjusted": listed(bonus_diffs)}
