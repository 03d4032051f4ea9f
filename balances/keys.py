"""Every Redis key name the balance engine uses, in one place (the table in ARCHITECTURE.md).

Keys inside a partition carry the hash tag `{pNNN}`, so every key one script touches lives in one Redis
Cluster slot. Index keys (`idx:`, `sidx:`, `gidx:`) live outside the partitions: they are read before the
partition is known. A sharing group lives in one partition and its members are provisioned into it, so a
member's keys and the group's shared buckets (`grp:`) share one hash tag. Nothing here talks to Redis.
"""

from __future__ import annotations

import zlib

from balances.model import Location

PARTITIONS_KEY = "ocs:partitions"
DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1000  # the tag is zero-padded to 3 digits


def tag(partition: int) -> str:
    """The hash tag of a partition: `{p007}`."""
    return f"{{p{partition:03d}}}"


def partition_of(msisdn: str, partitions: int) -> int:
    """The partition a new subscriber is placed in: stable across processes and Python versions."""
    return zlib.crc32(msisdn.encode()) % partitions


def sub_key(partition: int, msisdn: str) -> str:
    return f"sub:{tag(partition)}:{msisdn}"


def bal_key(partition: int, msisdn: str) -> str:
    return f"bal:{tag(partition)}:{msisdn}"


def ses_key(partition: int, session_id: str) -> str:
    return f"ses:{tag(partition)}:{session_id}"


def open_key(partition: int) -> str:
    return f"open:{tag(partition)}"


def evt_key(partition: int, session_id: str, request_number: int) -> str:
    return f"evt:{tag(partition)}:{session_id}:{request_number}"


def tup_key(partition: int, reference: str) -> str:
    return f"tup:{tag(partition)}:{reference}"


def cdr_key(partition: int) -> str:
    return f"cdr:{tag(partition)}"


def ledger_key(partition: int) -> str:
    """Every balance change of the partition (append-only stream, never trimmed by the OCS)."""
    return f"ledger:{tag(partition)}"


def expiry_key(partition: int) -> str:
    """Sorted set: wallets with buckets that expire ('m:<msisdn>' / 'g:<group>'), scored by the earliest
    valid_until (never later than the truth: the sweep reads members due and corrects their score)."""
    return f"bexp:{tag(partition)}"


def usage_counters_key(partition: int, msisdn: str) -> str:
    """Hash of the subscriber's rating counters (ratecards/pricing.py item 7), per rating group and period:
    '<rg>:<period>' units of a day/week/month scope, '<rg>:cap:<period>' micro-units charged in the cap
    period, '<rg>:fu:<period>' every unit used in the fair-usage period."""
    return f"use:{tag(partition)}:{msisdn}"


def schedules_key(partition: int) -> str:
    """Hash: schedule id (balances.model.with_schedule_id) -> the rating schedule JSON a reservation was
    granted with, so its usage is rated with that one (Tariff-Time-Change)."""
    return f"sched:{tag(partition)}"


def group_key(partition: int, group: str) -> str:
    """A sharing group's shared buckets: the same hash layout as bal:, plus per-member counters."""
    return f"grp:{tag(partition)}:{group}"


def group_members_key(partition: int, group: str) -> str:
    return f"gmem:{tag(partition)}:{group}"


def operation_key(partition: int, kind: str, reference: str) -> str:
    """The stored answer of an operator change (adjustment, credit) with that reference (idempotency)."""
    return f"ref:{tag(partition)}:{kind}:{reference}"


def idx_group_key(group: str) -> str:
    """The group's partition (a string), written when the group is created."""
    return f"gidx:{group}"


def cdrlease_key(partition: int) -> str:
    return f"cdrlease:{tag(partition)}"


def idx_msisdn_key(msisdn: str) -> str:
    return f"idx:msisdn:{msisdn}"


def idx_imsi_key(imsi: str) -> str:
    return f"idx:imsi:{imsi}"


def sidx_key(session_id: str) -> str:
    return f"sidx:{session_id}"


def location_value(location: Location) -> str:
    """What index keys hold: `<partition>|<msisdn>|<plan>`, and `|<group>` for a group member; a session
    index with rating keys adds `|<plmn>|<destination>` (the group then always present, maybe empty)."""
    value = f"{location.partition}|{location.msisdn}|{location.plan}"
    if location.plmn or location.destination:
        return f"{value}|{location.group}|{location.plmn}|{location.destination}"
    return f"{value}|{location.group}" if location.group else value


def parse_location(value: str | bytes) -> Location:
    """Any value location_value ever wrote (3, 4 or 6 fields; the destination may hold '|')."""
    text = value.decode() if isinstance(value, bytes) else value
    partition, msisdn, plan, *rest = text.split("|", 5)
    if len(rest) == 3:
        return Location(int(partition), msisdn, plan, rest[0], rest[1], rest[2])
    return Location(int(partition), msisdn, plan, "|".join(rest))


# ---- session ownership and server-initiated messages (ocs.routing, ocs.supervision) ----------------------


def subscriber_sessions_key(partition: int, msisdn: str) -> str:
    """Set of the subscriber's session ids opened and not yet seen closed (members are checked on read)."""
    return f"subses:{tag(partition)}:{msisdn}"


def peer_key(origin_host: str) -> str:
    """Which OCS process holds the connection to this Diameter peer (a lease: PX, refreshed while connected)."""
    return f"peer:{origin_host.lower()}"


def peer_state_key(origin_host: str) -> str:
    """The peer's last Origin-State-Id seen by any OCS process (a change means the peer restarted)."""
    return f"peerstate:{origin_host.lower()}"


def queue_key(process_id: str) -> str:
    """Requests (reauth, abort) for the OCS process that holds the peer connection."""
    return f"ocsq:{process_id}"


def reply_key(request_id: str) -> str:
    """Where the process that carried out a queued request puts its result."""
    return f"ocsr:{request_id}"


# ---- the product catalog (ocs.catalog) -------------------------------------------------------------------

CATALOG_KEY = "catalog:current"  # the loaded catalog (JSON, with its version): read by the CLI and servers only


def renewal_key(partition: int) -> str:
    """Sorted set: subscribers on a catalog plan, scored by the end of their current period (ms): what the
    renewal sweep reads."""
    return f"renew:{tag(partition)}"


# ---- bill-shock notifications (ocs.billshock) ------------------------------------------------------------


def billshock_state_key(partition: int, msisdn: str) -> str:
    """Hash of the subscriber's notification counters: 'cr:<bucket>' units credited to an allowance bucket,
    'period' the newest spend period, 'spend:<period>' micro-units spent in it."""
    return f"bshock:{tag(partition)}:{msisdn}"


def notified_key(partition: int, msisdn: str) -> str:
    """Hash: '<kind>:<bucket or period>:<threshold>' -> the ledger entry id that emitted that notification
    (each notification is emitted once)."""
    return f"notified:{tag(partition)}:{msisdn}"


def notify_key(partition: int) -> str:
    """Stream of the partition's notifications (bill-shock events), read by the webhook delivery and the CLI."""
    return f"notify:{tag(partition)}"
