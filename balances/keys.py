"""Every Redis key name the balance engine uses, in one place (the table in ARCHITECTURE.md).

Keys inside a partition carry the hash tag `{pNNN}`, so every key one script touches lives in one Redis
Cluster slot. Index keys (`idx:`, `sidx:`) live outside the partitions: they are read before the partition
is known. Nothing here talks to Redis.
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
    return f"ledger:{tag(partition)}"


def cdrlease_key(partition: int) -> str:
    return f"cdrlease:{tag(partition)}"


def idx_msisdn_key(msisdn: str) -> str:
    return f"idx:msisdn:{msisdn}"


def idx_imsi_key(imsi: str) -> str:
    return f"idx:imsi:{imsi}"


def sidx_key(session_id: str) -> str:
    return f"sidx:{session_id}"


def location_value(location: Location) -> str:
    """What index keys hold: `<partition>|<msisdn>|<plan>`."""
    return f"{location.partition}|{location.msisdn}|{location.plan}"


def parse_location(value: str | bytes) -> Location:
    text = value.decode() if isinstance(value, bytes) else value
    partition, msisdn, plan = text.split("|", 2)
    return Location(int(partition), msisdn, plan)


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
