"""Buckets as the Lua functions store them: checks before anything is written, and the metadata JSON.

A bucket's metadata is one hash field, `<id>:m` in the balance hash (see the layout in lua/common.lua); the
spine's buckets have none (the rating schedules name them). Nothing here talks to Redis.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from balances.model import ACCOUNT_KINDS, MONEY, STATUSES, Bucket, BucketState, Rollover, Subscriber

# bucket and group ids: no ':' (field suffixes), '@' (shared refs), '|' (index values) or braces (hash tags)
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_EXACT = 2**53 - 1  # Lua numbers are doubles: every amount the functions compute stays below this
KNOWN_UNITS = ("money", "bytes", "seconds", "events")

_meta_decoder = msgspec.json.Decoder(dict)


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not ID.match(value):
        raise ValueError(f"{kind} id {value!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return value


def _check_amount(name: str, value: Any, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_EXACT:
        raise ValueError(f"{name} must be an integer in {low}..2^53-1, got {value!r}")


def check_bucket(bucket: Bucket, *, shared: bool) -> None:
    """Raises ValueError for a bucket the functions could not apply exactly."""
    check_id("bucket", bucket.id)
    if not isinstance(bucket.unit, str) or not ID.match(bucket.unit):
        raise ValueError(f"bucket {bucket.id}: unit {bucket.unit!r} is not a unit name")
    _check_amount(f"bucket {bucket.id}: amount", bucket.amount)
    _check_amount(f"bucket {bucket.id}: priority", bucket.priority, -MAX_EXACT)
    for name in ("valid_from", "valid_until"):
        value = getattr(bucket, name)
        if value is not None:
            _check_amount(f"bucket {bucket.id}: {name}", value)
    if bucket.valid_from is not None and bucket.valid_until is not None and bucket.valid_until <= bucket.valid_from:
        raise ValueError(f"bucket {bucket.id}: valid_until must be after valid_from")
    for rg in bucket.services or ():
        _check_amount(f"bucket {bucket.id}: rating group", rg)
    if bucket.credit_limit:
        if bucket.unit != MONEY:
            raise ValueError(f"bucket {bucket.id}: only money has a credit limit")
        _check_amount(f"bucket {bucket.id}: credit_limit", bucket.credit_limit)
    if bucket.member_limits and not shared:
        raise ValueError(f"bucket {bucket.id}: member limits belong to a group's shared buckets")
    for msisdn, limit in bucket.member_limits.items():
        _check_amount(f"bucket {bucket.id}: limit of {msisdn}", limit)
    if bucket.rollover is not None:
        rule = bucket.rollover
        _check_amount(f"bucket {bucket.id}: rollover cap", rule.cap)
        if rule.into is not None:
            check_id("rollover target", rule.into)
        if rule.validity_ms is not None:
            _check_amount(f"bucket {bucket.id}: rollover validity_ms", rule.validity_ms, 1)
        if bucket.valid_until is None:
            raise ValueError(f"bucket {bucket.id}: a rollover needs valid_until (the period end)")
        if rule.validity_ms is None and bucket.valid_from is None:
            raise ValueError(f"bucket {bucket.id}: a rollover needs valid_from or rollover.validity_ms (how long "
                             "the carried units stay valid)")


def check_subscriber(sub: Subscriber) -> None:
    if sub.status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {sub.status!r}")
    if sub.kind not in ACCOUNT_KINDS:
        raise ValueError(f"kind must be prepaid or postpaid, got {sub.kind!r}")
    _check_amount("credit_limit", sub.credit_limit)
    if sub.kind == "prepaid" and sub.credit_limit:
        raise ValueError("a prepaid subscriber has no credit limit")
    if sub.group is not None:
        check_id("group", sub.group)


def bucket_meta(bucket: Bucket) -> dict[str, Any]:
    """The metadata the functions read (omitted keys take their defaults there)."""
    meta: dict[str, Any] = {"unit": bucket.unit, "priority": bucket.priority}
    if bucket.valid_from is not None:
        meta["valid_from"] = bucket.valid_from
    if bucket.valid_until is not None:
        meta["valid_until"] = bucket.valid_until
    if bucket.services is not None:
        meta["services"] = list(bucket.services)
    if bucket.rollover is not None:
        meta["rollover"] = msgspec.to_builtins(bucket.rollover)
    if bucket.credit_limit:
        meta["credit_limit"] = bucket.credit_limit
    if bucket.member_limits:
        meta["member_limits"] = dict(bucket.member_limits)
    return meta


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def bucket_states(fields: dict, *, group: str | None = None, member: str | None = None) -> list[BucketState]:
    """The buckets of one balance hash (HGETALL reply), money first; a group's as '@<id>' with the member's
    limit and use."""
    values: dict[str, int] = {}
    metas: dict[str, dict] = {}
    for raw_field, raw_value in fields.items():
        field = _text(raw_field)
        if field.endswith(":m"):
            metas[field[:-2]] = _meta_decoder.decode(raw_value)
        else:
            values[field] = int(raw_value)
    ids = {f for f in values if ":" not in f} | set(metas)
    states = []
    for bucket in sorted(ids, key=lambda b: (b != MONEY, b)):
        meta = metas.get(bucket)
        state = BucketState("@" + bucket if group else bucket, values.get(bucket, 0), values.get(bucket + ":r", 0),
                            group=group)
        if meta is not None:
            state.unit = meta.get("unit")
            state.priority = meta.get("priority")
            state.valid_from = meta.get("valid_from")
            state.valid_until = meta.get("valid_until")
            state.services = meta.get("services")
            if meta.get("rollover"):
                state.rollover = msgspec.convert(meta["rollover"], Rollover)
            state.credit_limit = meta.get("credit_limit")
            if member is not None:
                state.member_limit = (meta.get("member_limits") or {}).get(member)
        if group and member is not None:
            state.member_used = values.get(f"{bucket}:c:{member}", 0)
        states.append(state)
    return states
