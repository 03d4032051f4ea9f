"""One configuration object for the whole server: a TOML file, then `OCS_*` environment variables on top.

Defaults sit beside the fields. Everything is validated once at start; a bad value stops the server with
one clear line naming the field. Environment variables: `OCS_<SECTION>__<FIELD>` (e.g.
`OCS_DIAMETER__PORT=3869`), plus the short forms in ENV_ALIASES for the settings operators change most.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import msgspec

from balances.connection import is_valid_url

DEMO_RATECARD = Path(__file__).parent / "demo" / "ratecard.toml"


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


class DiameterConfig(msgspec.Struct, forbid_unknown_fields=True):
    origin_host: str = "ocs.test"
    origin_realm: str = "test"
    listen_host: str = "127.0.0.1"
    port: int = 3868
    host_ip_addresses: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1"])
    product_name: str = "ocs"
    vendor_id: int = 0
    # None accepts any peer (demo); production lists Origin-Host names or IP addresses
    allowed_peers: list[str] | None = None
    advertise_vendor_specific_application: bool = False
    watchdog_seconds: float = 30.0
    max_message_length: int = 65536
    # vendors whose unknown M-bit AVPs are ignored instead of answered 5001 (digest §8.8)
    unknown_mandatory_vendor_allowlist: list[int] = msgspec.field(default_factory=list)
    # answer to a CCR-T for a session we do not know (digest §8.2): 5002 or 2001
    unknown_session_termination_result: int = 5002
    # CC-Session-Failover FAILOVER_SUPPORTED in every CCA: session state is in Redis, any OCS process of the
    # cluster continues a session (RFC 4006 §5.7)
    cc_session_failover: bool = True
    # lease of this process's entry in the peer registry (peer → process), refreshed every third of it
    peer_lease_seconds: float = 30.0
    # how long a RAR/ASR waits for its RAA/ASA (and `ocs session reauth|abort` for the result)
    answer_timeout_seconds: float = 5.0


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True):
    # None starts the embedded Valkey under data_dir/valkey; redis+cluster://host:port is a Redis / Valkey
    # Cluster (any node: the others are discovered)
    url: str | None = None
    partitions: int = 16
    embedded_port: int = 6390
    # warn at start when the server is configured less safely than this
    require_appendfsync_always: bool = True
    # bound of one balance-store call: past it the CCR is answered 3004 DIAMETER_TOO_BUSY at once
    call_timeout_ms: int = 1000
    # the url is a node of a Redis / Valkey Cluster (same as a redis+cluster:// url)
    cluster: bool = False


class ChargingConfig(msgspec.Struct, forbid_unknown_fields=True):
    ratecard: str = str(DEMO_RATECARD)
    # how often OCS processes re-read the active rate card (<data_dir>/ratecards/); a new version must take
    # effect at least this far ahead (`ocs ratecard load` checks it)
    ratecard_reload_seconds: float = 60.0
    # how long a grant without Validity-Time may be used, for Tariff-Time-Change: a tariff change (band
    # boundary, new version, period end) within a grant's Validity-Time, or within this horizon when the rate
    # card gives none, is sent as Tariff-Time-Change with the next schedule (at most 7 days)
    charging_horizon_seconds: int = 86_400
    # how often each server renews the catalog plans whose period ended (fee + allowances; 0 = never: run
    # `ocs plan renew` from cron instead)
    renewal_interval_seconds: float = 60.0
    # override the rate card's default grant per unit type (0 = use the rate card's)
    default_quota_bytes: int = 0
    default_quota_seconds: int = 0
    default_quota_events: int = 0
    # a CCR-I/CCR-E whose Service-Context-Id is not a known 3GPP one (32251, 32260, 32270, 32274, 32275, 32276
    # @3gpp.org, any prefix) is answered 5031 RATING_FAILED unless this is true (digest §3.6)
    accept_unknown_service_context: bool = False
    # session supervision (RFC 4006 Tcc): a session silent for 2 x its Validity-Time, within these bounds, is
    # closed (reservations released, CDR "sessionTimeout"); the default applies when it has no Validity-Time
    tcc_min_seconds: int = 60
    tcc_max_seconds: int = 14_400
    tcc_default_seconds: int = 7_200
    supervision_interval_seconds: float = 10.0


class CdrConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = True  # run the CDR writer inside `ocs serve`
    directory: str = ""  # default: data_dir/cdr
    rotate_records: int = 100_000
    rotate_seconds: float = 300.0
    lease_ms: int = 10_000  # a writer that dies hands its partitions over after this long


class OverloadConfig(msgspec.Struct, forbid_unknown_fields=True):
    # CCRs in flight in this process at which new sessions (CCR-I) and events (CCR-E) are answered 3004
    new_sessions_max_in_flight: int = 2_000
    # CCRs in flight at which every CCR, updates and terminations too, is answered 3004
    max_in_flight: int = 5_000
    # Time budget of updates and terminations in the process, from the read of their bytes: answered 3004 without
    # a Redis call when the CCRs answered lately took longer than this (moving average, others in flight) or
    # when it waited longer than this before the server got to it
    # (200 ms: well inside a gateway's Tx of seconds, so a load spike the process works through in time is
    # served, while a backlog that would outlast Tx is answered at once; benchmarks/overload_knee.py shows
    # tighter budgets, e.g. 50 / 25, for latency-bound deployments)
    max_queue_ms: int = 200
    # the same for new sessions (CCR-I) and events (CCR-E), shed first
    new_sessions_max_queue_ms: int = 100


CCFH_VALUES = {"TERMINATE": 0, "CONTINUE": 1, "RETRY_AND_TERMINATE": 2}
DDFH_VALUES = {"TERMINATE_OR_BUFFER": 0, "CONTINUE": 1}


class FailureHandlingRule(msgspec.Struct, forbid_unknown_fields=True):
    """Hints for the gateways matching `peer` (Origin-Host) or `realm` (Origin-Realm); a peer rule wins."""

    peer: str | None = None
    realm: str | None = None
    credit_control_failure_handling: str | None = None
    direct_debiting_failure_handling: str | None = None


class FailureHandlingConfig(msgspec.Struct, forbid_unknown_fields=True):
    """What a gateway should do when we do not answer in its Tx (RFC 4006 §5.7): sent in every CCA as
    Credit-Control-Failure-Handling / Direct-Debiting-Failure-Handling. Tx itself is the client's timer and
    has no AVP; these tell it what to do when Tx expires. None sends nothing (the client's default)."""

    credit_control_failure_handling: str | None = None  # TERMINATE | CONTINUE | RETRY_AND_TERMINATE
    direct_debiting_failure_handling: str | None = None  # TERMINATE_OR_BUFFER | CONTINUE
    rules: list[FailureHandlingRule] = msgspec.field(default_factory=list)


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 9464  # 0 disables /metrics


class NotificationsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Bill-shock notifications (ocs/billshock.py, docs/notifications.md): events on notify:{pNNN}, each once."""

    enabled: bool = False  # run the bill-shock monitor (and the webhook delivery) inside `ocs serve`
    # an allowance bucket's used share (percent of what it was credited) that emits an event
    allowance_percent: list[int] = msgspec.field(default_factory=lambda: [80, 100])
    # money spent in the period (decimal strings in the currency's major unit, e.g. "50.00") that emits an event
    spend_thresholds: list[str] = msgspec.field(default_factory=list)
    spend_period: str = "month"  # "day" | "month", in UTC
    webhook_url: str = ""  # "" = no webhook; http:// or https://, each event POSTed as JSON
    webhook_timeout_seconds: float = 5.0


class Config(msgspec.Struct, forbid_unknown_fields=True):
    data_dir: str = "data"
    diameter: DiameterConfig = msgspec.field(default_factory=DiameterConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    charging: ChargingConfig = msgspec.field(default_factory=ChargingConfig)
    cdr: CdrConfig = msgspec.field(default_factory=CdrConfig)
    overload: OverloadConfig = msgspec.field(default_factory=OverloadConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    failure_handling: FailureHandlingConfig = msgspec.field(default_factory=FailureHandlingConfig)
    notifications: NotificationsConfig = msgspec.field(default_factory=NotificationsConfig)

    @property
    def cdr_directory(self) -> Path:
        return Path(self.cdr.directory) if self.cdr.directory else Path(self.data_dir) / "cdr"


ENV_ALIASES = {
    "OCS_ORIGIN_HOST": ("diameter", "origin_host"),
    "OCS_ORIGIN_REALM": ("diameter", "origin_realm"),
    "OCS_LISTEN_HOST": ("diameter", "listen_host"),
    "OCS_PORT": ("diameter", "port"),
    "OCS_REDIS_URL": ("redis", "url"),
    "OCS_DATA_DIR": ("data_dir",),
    "OCS_RATECARD": ("charging", "ratecard"),
    "OCS_METRICS_PORT": ("metrics", "port"),
}


def _parse_env_value(text: str) -> object:
    """Environment values are TOML literals when they parse as one (numbers, booleans, arrays), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_overrides(environ: dict[str, str]) -> dict:
    overrides: dict = {}
    for name, text in environ.items():
        if not name.startswith("OCS_"):
            continue
        if name in ENV_ALIASES:
            path = ENV_ALIASES[name]
        elif "__" in name:
            path = tuple(part.lower() for part in name[4:].split("__"))
        else:
            continue
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(text)
    return overrides


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment variables, validate. Raises ConfigError."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    raw = _merge(raw, _env_overrides(dict(os.environ if environ is None else environ)))
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None
    _check(config)
    _check_notifications(config.notifications)
    return config


def _check(config: Config) -> None:
    d = config.diameter
    if not d.origin_host or "." not in d.origin_host and d.origin_host != "localhost":
        raise ConfigError(f"diameter.origin_host must be a DiameterIdentity (FQDN), got {d.origin_host!r}")
    if not d.origin_realm:
        raise ConfigError("diameter.origin_realm must not be empty")
    if not 0 <= d.port <= 65535:
        raise ConfigError(f"diameter.port must be 0..65535, got {d.port}")
    if d.watchdog_seconds < 6:
        raise ConfigError(f"diameter.watchdog_seconds must be at least 6 (RFC 3539), got {d.watchdog_seconds}")
    if d.max_message_length < 20:
        raise ConfigError("diameter.max_message_length must be at least 20")
    if d.unknown_session_termination_result not in (5002, 2001):
        raise ConfigError("diameter.unknown_session_termination_result must be 5002 or 2001")
    handling = config.failure_handling
    for where, rule in [("failure_handling", handling)] + [
            (f"failure_handling.rules[{n}]", r) for n, r in enumerate(handling.rules)]:
        if rule.credit_control_failure_handling not in (None, *CCFH_VALUES):
            raise ConfigError(f"{where}.credit_control_failure_handling must be one of {', '.join(CCFH_VALUES)}")
        if rule.direct_debiting_failure_handling not in (None, *DDFH_VALUES):
            raise ConfigError(f"{where}.direct_debiting_failure_handling must be one of {', '.join(DDFH_VALUES)}")
        if rule is not handling and (rule.peer is None) == (rule.realm is None):
            raise ConfigError(f"{where} needs exactly one of peer or realm")
    if not 1 <= config.redis.partitions <= 999:
        raise ConfigError(f"redis.partitions must be 1..999, got {config.redis.partitions}")
    if config.redis.url is not None and not is_valid_url(config.redis.url):
        raise ConfigError(f"redis.url must be a redis://, redis+cluster:// or unix:// URL, got {config.redis.url!r}")
    if config.redis.url is None and config.redis.cluster:
        raise ConfigError("redis.cluster needs redis.url (a node of the cluster)")
    if config.redis.call_timeout_ms < 1:
        raise ConfigError(f"redis.call_timeout_ms must be at least 1, got {config.redis.call_timeout_ms}")
    if d.peer_lease_seconds < 1 or d.answer_timeout_seconds <= 0:
        raise ConfigError("diameter.peer_lease_seconds must be at least 1 and answer_timeout_seconds positive")
    c = config.charging
    if not 1 <= c.tcc_min_seconds <= c.tcc_max_seconds or c.tcc_default_seconds < 1:
        raise ConfigError("charging.tcc_min_seconds must be 1..tcc_max_seconds and tcc_default_seconds at least 1")
    if c.supervision_interval_seconds <= 0:
        raise ConfigError("charging.supervision_interval_seconds must be positive")
    if c.ratecard_reload_seconds <= 0:
        raise ConfigError("charging.ratecard_reload_seconds must be positive")
    if c.renewal_interval_seconds < 0:
        raise ConfigError("charging.renewal_interval_seconds must be >= 0 (0 = no renewal sweep)")
    if not 1 <= c.charging_horizon_seconds <= 7 * 86_400:
        raise ConfigError("charging.charging_horizon_seconds must be 1..604800 (7 days)")
    o = config.overload
    if not 1 <= o.new_sessions_max_in_flight <= o.max_in_flight:
        raise ConfigError("overload.new_sessions_max_in_flight must be 1..overload.max_in_flight")
    if not 1 <= o.new_sessions_max_queue_ms <= o.max_queue_ms:
        raise ConfigError("overload.new_sessions_max_queue_ms must be 1..overload.max_queue_ms")
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"metrics.port must be 0..65535, got {config.metrics.port}")
    for name in ("default_quota_bytes", "default_quota_seconds", "default_quota_events"):
        if getattr(config.charging, name) < 0:
            raise ConfigError(f"charging.{name} must not be negative")
    if not Path(config.charging.ratecard).is_file():
        raise ConfigError(f"charging.ratecard: file not found: {config.charging.ratecard}")


def spend_micro(text: str) -> int:
    """A spend threshold ("50.00", major units) in micro-units; ValueError unless exact and positive."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text) * 1_000_000
    except (InvalidOperation, TypeError):
        raise ValueError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value != value.to_integral_value() or not 0 < value < 2**53:
        raise ValueError(f"must be positive, below 9e9, with at most 6 decimals: {text!r}")
    return int(value)


def _check_notifications(n: NotificationsConfig) -> None:
    if any(not 1 <= p <= 100 for p in n.allowance_percent):
        raise ConfigError(f"notifications.allowance_percent must be 1..100, got {n.allowance_percent}")
    for text in n.spend_thresholds:
        try:
            spend_micro(text)
        except ValueError as exc:
            raise ConfigError(f"notifications.spend_thresholds: {exc}") from None
    if n.spend_period not in ("day", "month"):
        raise ConfigError(f"notifications.spend_period must be day or month, got {n.spend_period!r}")
    if n.webhook_url and not n.webhook_url.startswith(("http://", "https://")):
        raise ConfigError(f"notifications.webhook_url must be an http:// or https:// URL, got {n.webhook_url!r}")
    if n.webhook_timeout_seconds <= 0:
        raise ConfigError("notifications.webhook_timeout_seconds must be positive")
