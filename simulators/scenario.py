"""The load-test scenario: a TOML file decoded strictly with msgspec into one `Scenario` object.

Why a file: a figure is only worth publishing with the traffic that produced it, so the traffic model
(population, arrivals, session shape, event share, retransmissions, abandons) and the phases live in a
file that is kept beside the result, not in command-line flags. The structures mirror the file one to one
(field names are the TOML keys), so an error names the key to fix: `[traffic].event_share: must be
within 0..1`. Defaults sit beside the fields; `smoke.toml` in simulators/scenarios/ shows every key.

Imports nothing of the project (the simulator must be pointable at any OCS).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = [
    "SCENARIO_DIR",
    "Gateways",
    "Phases",
    "Scenario",
    "ScenarioError",
    "Subscribers",
    "Target",
    "Traffic",
    "load_scenario",
    "parse_scenario",
    "scenario_path",
]

SCENARIO_DIR = Path(__file__).parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario file that cannot be used, worded for the operator (file, key, why)."""


class Target(msgspec.Struct, forbid_unknown_fields=True):
    """The OCS under test and what the CCRs carry to reach it."""

    host: str = "127.0.0.1"
    port: int = 3868
    destination_realm: str = "test"
    destination_host: str = ""  # empty: no Destination-Host AVP
    service_context_id: str = "32251@3gpp.org"  # data sessions (PS charging)
    event_service_context_id: str = "32274@3gpp.org"  # SMS events


class Gateways(msgspec.Struct, forbid_unknown_fields=True):
    """The client side: many connections, each a gateway with its own Origin-Host."""

    connections: int = 1
    origin_host: str = "gw{n}.sim.test"  # {n} is the connection's number, from 1
    origin_realm: str = "sim.test"
    timeout_seconds: float = 5.0  # an answer later than this is a timeout; its session is abandoned


class Subscribers(msgspec.Struct, forbid_unknown_fields=True):
    """The population sessions are drawn from: `count` consecutive MSISDNs from `first`, or a list."""

    first: str = "491700000001"
    count: int = 10
    msisdns: list[str] = msgspec.field(default_factory=list)  # when set, used instead of first/count

    def population(self) -> list[str]:
        if self.msisdns:
            return list(self.msisdns)
        width = len(self.first)
        start = int(self.first)
        return [str(start + n).zfill(width) for n in range(self.count)]


class Traffic(msgspec.Struct, forbid_unknown_fields=True):
    """What arrives and what each session does."""

    #: open: sessions arrive at `sessions_per_second` whatever the answers do (the offered load is fixed);
    #: closed: `in_flight` sessions run at once, each sending its next request when the answer is in
    mode: Literal["open", "closed"] = "closed"
    sessions_per_second: float = 10.0  # open loop, steady phase (events count as sessions of one request)
    in_flight: int = 10  # closed loop, steady phase
    #: how long a data session lasts (wall clock): CCR-I, the updates evenly spread, CCR-T at the end.
    #: 0 sends each request as soon as the previous answer is in (closed loop's usual setting)
    session_seconds: float = 0.0
    updates: int = 3  # CCR-U per data session
    updates_distribution: Literal["fixed", "uniform"] = "fixed"  # uniform: 0 .. 2 × updates
    rating_groups: list[int] = msgspec.field(default_factory=lambda: [100])
    rating_groups_per_session: int = 1  # MSCCs per data session, distinct groups drawn from rating_groups
    used_octets: int = 500_000  # reported per update and rating group (never more than granted)
    used_seconds: int = 60  # the same for rating groups granted in time (CC-Time)
    requested_octets: int = 0  # Requested-Service-Unit CC-Total-Octets; 0 sends an empty RSU
    event_share: float = 0.0  # share of arrivals that are SMS events (CCR-Event, DIRECT_DEBITING)
    event_rating_group: int = 300
    event_units: int = 1  # CC-Service-Specific-Units per event
    #: share of requests also sent again with the T flag on another connection (failover retransmission)
    retransmission_share: float = 0.0
    #: share of requests also sent again with the T flag on the same connection (a gateway's duplicate)
    duplicate_share: float = 0.0
    abandon_share: float = 0.0  # share of data sessions that end without CCR-T (the gateway went away)
    #: data sessions carry Service-Information/PS-Information (about 340 bytes, the same in every request of
    #: a session) as PGWs do; off keeps the requests minimal
    ps_information: bool = False
    #: send the next CCR-U no later than the Validity-Time of the grants (when shorter than the plan)
    honour_validity_time: bool = True
    seed: int = 1  # the same seed starts the same sessions (kind, subscriber, shape) in the same order


class Phases(msgspec.Struct, forbid_unknown_fields=True):
    """warm-up (not measured) → ramp (load grows linearly) → steady (measured) → drain (sessions end)."""

    warmup_seconds: float = 1.0
    warmup_level: float = 0.1  # share of the steady load during warm-up
    ramp_seconds: float = 0.0
    steady_seconds: float = 10.0
    #: after steady no session starts; open sessions are ended with CCR-T; answers still missing after
    #: this long count as timeouts
    drain_seconds: float = 10.0
    #: stop starting sessions after this many (0: no limit), e.g. for a smoke test with exact counts
    max_sessions: int = 0
    #: a stepped run instead of ramp + steady: after warm-up, one measured phase per entry ("step1", ...) of
    #: `step_seconds` each, at that many sessions/s (open loop) or sessions in flight (closed loop). Shows
    #: where the server stops keeping up (the knee) and what it answers past it (e.g. 3004 TOO_BUSY)
    steps: list[float] = msgspec.field(default_factory=list)
    step_seconds: float = 10.0


class Scenario(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "unnamed"
    description: str = ""
    target: Target = msgspec.field(default_factory=Target)
    gateways: Gateways = msgspec.field(default_factory=Gateways)
    subscribers: Subscribers = msgspec.field(default_factory=Subscribers)
    traffic: Traffic = msgspec.field(default_factory=Traffic)
    phases: Phases = msgspec.field(default_factory=Phases)

    def with_target(self, host: str | None = None, port: int | None = None) -> Scenario:
        """The same scenario pointed elsewhere (command-line --host/--port win over the file)."""
        target = msgspec.structs.replace(
            self.target,
            host=host if host is not None else self.target.host,
            port=port if port is not None else self.target.port,
        )
        return msgspec.structs.replace(self, target=target)


def _check(scenario: Scenario) -> None:
    """Ranges msgspec cannot express; raises ScenarioError naming the key."""

    def bad(key: str, why: str) -> None:
        raise ScenarioError(f"{key}: {why}")

    t, g, s, tr, p = scenario.target, scenario.gateways, scenario.subscribers, scenario.traffic, scenario.phases
    if not 0 < t.port < 65536:
        bad("[target].port", f"must be 1..65535, got {t.port}")
    if not t.destination_realm:
        bad("[target].destination_realm", "must not be empty")
    if g.connections < 1:
        bad("[gateways].connections", f"must be at least 1, got {g.connections}")
    if g.connections > 1 and "{n}" not in g.origin_host:
        bad("[gateways].origin_host", "must contain {n} when there are several connections (one host each)")
    if g.timeout_seconds <= 0:
        bad("[gateways].timeout_seconds", "must be positive")
    if s.msisdns:
        for msisdn in s.msisdns:
            if not msisdn.isdigit():
                bad("[subscribers].msisdns", f"{msisdn!r} is not all digits")
    else:
        if not s.first.isdigit():
            bad("[subscribers].first", f"{s.first!r} is not all digits")
        if s.count < 1:
            bad("[subscribers].count", f"must be at least 1, got {s.count}")
    if tr.mode == "open" and tr.sessions_per_second <= 0:
        bad("[traffic].sessions_per_second", "must be positive in open mode")
    if tr.mode == "closed" and tr.in_flight < 1:
        bad("[traffic].in_flight", "must be at least 1 in closed mode")
    if tr.session_seconds < 0:
        bad("[traffic].session_seconds", "must not be negative")
    if tr.updates < 0:
        bad("[traffic].updates", "must not be negative")
    if not tr.rating_groups or any(rg < 0 for rg in tr.rating_groups):
        bad("[traffic].rating_groups", "must list at least one rating group, none negative")
    if len(set(tr.rating_groups)) != len(tr.rating_groups):
        bad("[traffic].rating_groups", "lists a rating group twice")
    if not 1 <= tr.rating_groups_per_session <= len(tr.rating_groups):
        bad("[traffic].rating_groups_per_session",
            f"must be 1..{len(tr.rating_groups)} (the number of rating_groups), got {tr.rating_groups_per_session}")
    for key in ("used_octets", "used_seconds", "requested_octets", "event_units"):
        if getattr(tr, key) < 0:
            bad(f"[traffic].{key}", "must not be negative")
    if tr.event_units < 1:
        bad("[traffic].event_units", "must be at least 1")
    for key in ("event_share", "retransmission_share", "duplicate_share", "abandon_share"):
        value = getattr(tr, key)
        if not 0.0 <= value <= 1.0:
            bad(f"[traffic].{key}", f"must be within 0..1, got {value}")
    if tr.retransmission_share > 0 and g.connections < 2:
        bad("[traffic].retransmission_share", "needs [gateways].connections ≥ 2 (it resends on another one)")
    for key in ("warmup_seconds", "ramp_seconds", "drain_seconds"):
        if getattr(p, key) < 0:
            bad(f"[phases].{key}", "must not be negative")
    if p.steady_seconds <= 0 and not p.steps:
        bad("[phases].steady_seconds", "must be positive")
    if any(step <= 0 for step in p.steps):
        bad("[phases].steps", "every step must be positive (sessions/s, or sessions in flight when closed)")
    if p.steps and p.step_seconds <= 0:
        bad("[phases].step_seconds", "must be positive")
    if not 0.0 < p.warmup_level <= 1.0:
        bad("[phases].warmup_level", f"must be within 0..1 (and above 0), got {p.warmup_level}")
    if p.max_sessions < 0:
        bad("[phases].max_sessions", "must not be negative")


def parse_scenario(text: str, *, source: str = "<scenario>") -> Scenario:
    """A Scenario from TOML text; every problem is a ScenarioError that names the source and the key."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    try:
        scenario = msgspec.convert(data, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{source}: {_render(str(exc))}") from None
    try:
        _check(scenario)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    return scenario


def _render(message: str) -> str:
    """msgspec's `... - at `$.traffic.mode`` → `[traffic].mode: ...`, the way the file spells it."""
    text, marker, path = message.rpartition(" - at `$")
    if not marker:
        return message
    parts = path.rstrip("`").lstrip(".").split(".")
    if len(parts) > 1:
        key = f"[{'.'.join(parts[:-1])}].{parts[-1]}"
    else:
        key = f"[{parts[0]}]" if parts[0] in Scenario.__struct_fields__ and parts[0] not in _SCALARS else parts[0]
    return f"{key}: {text}"


_SCALARS = ("name", "description")


def scenario_path(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a ready scenario (`smoke` → simulators/scenarios/smoke.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    ready = SCENARIO_DIR / f"{name_or_path}.toml"
    if ready.is_file():
        return ready
    known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
    raise ScenarioError(f"scenario {str(name_or_path)!r} is neither a file nor a ready scenario ({known})")


def load_scenario(name_or_path: str | Path) -> Scenario:
    path = scenario_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    return parse_scenario(text, source=str(path))
