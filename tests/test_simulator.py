"""The load simulator over real TCP: the smoke scenario against the real server (no mismatches, counts add
up, the server's open sessions are exactly the abandoned ones), the open loop's drain, timeouts against a
peer that never answers, mismatches against one that answers wrongly, and `ocs simulate --scenario --json`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from ocs.cli import provision_demo
from protocol.codec import Message, encode_answer
from protocol.peer import PeerSettings
from protocol.transport import DiameterServer
from simulators.load import run_scenario
from simulators.scenario import load_scenario, parse_scenario
from tests.gateway import start_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path)
    await provision_demo(app.store, app.config)  # what `ocs serve --demo` provisions
    yield app
    await app.stop()


def assert_counts_add_up(report: dict) -> None:
    requests, sessions = report["requests"], report["sessions"]
    assert requests["sent"] == requests["answered"] + requests["timeouts"] + requests["errors"] + requests["unanswered"]
    assert sum(report["results"].values()) == requests["answered"]
    assert sum(requests["by_type"].values()) == requests["sent"]
    assert sessions["started"] == sessions["data"] + sessions["events"]
    assert sessions["started"] == (sessions["completed"] + sessions["abandoned"] + sessions["rejected"]
                                   + sessions["failed"])
    assert sum(phase["answers"] for phase in report["phases"].values()) == requests["answered"]
    latency = report["latency_ms"]
    assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"] <= latency["max"]


async def test_smoke_scenario_against_the_server(server):
    scenario = load_scenario("smoke").with_target(port=server.port)
    report, run = await run_scenario(scenario)
    assert report["mismatches"] == 0, report["mismatch_kinds"]
    assert (report["errors"], report["timeouts"], report["connection_errors"]) == (0, 0, [])
    assert_counts_add_up(report)
    requests, sessions = report["requests"], report["sessions"]
    assert sessions["started"] == scenario.phases.max_sessions == 40
    assert sessions["failed"] == 0 and sessions["events"] > 0 and sessions["abandoned"] > 0
    assert requests["unanswered"] == 0 and requests["retransmissions"] + requests["duplicates"] > 0
    assert set(requests["by_type"]) == {"initial", "update", "termination", "event"}
    assert report["results"] == {"2001": requests["answered"]}
    assert report["requests_per_second"] > 0 and report["connections"] == 2
    # every session but the abandoned ones was terminated: the server holds exactly those open
    assert await server.store.count_open_sessions() == sessions["abandoned"]
    assert sum(point["requests_per_second"] > 0 for point in run.series) >= 1


async def test_open_loop_sessions_still_running_at_the_end_are_terminated_in_the_drain(server):
    scenario = parse_scenario(f"""
        name = "open-drain"
        [target]
        port = {server.port}
        [gateways]
        connections = 2
        [traffic]
        mode = "open"
        sessions_per_second = 40.0
        session_seconds = 3.0
        updates = 2
        rating_groups = [100]
        [phases]
        warmup_seconds = 0.2
        ramp_seconds = 0.3
        steady_seconds = 0.8
        drain_seconds = 5.0
    """)
    report, _ = await run_scenario(scenario)
    assert report["mismatches"] == 0 and report["errors"] == 0 and report["timeouts"] == 0
    assert_counts_add_up(report)
    assert set(report["phases"]) == {"warmup", "ramp", "steady", "drain"}
    # sessions of 3 s cannot have ended by themselves in 1.3 s: the drain sent their CCR-T
    assert report["sessions"]["completed"] == report["sessions"]["started"] > 10
    assert report["requests"]["by_type"]["termination"] == report["sessions"]["started"]
    assert await server.store.count_open_sessions() == 0


class _Peer:
    """A Diameter peer on our own transport whose CCR answers are whatever `answer` makes of the request."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def peer_opened(self, peer, event) -> None:
        pass

    def peer_closed(self, peer) -> None:
        pass

    def handle_request(self, peer, message: Message):
        return self.answer(message)


async def _run_against(answer, **phases) -> dict:
    diameter = DiameterServer(PeerSettings(origin_host="fake.test", origin_realm="test",
                                           application_commands={4: frozenset({272})}), _Peer(answer))
    await diameter.start("127.0.0.1", 0)
    scenario = parse_scenario(f"""
        [target]
        port = {diameter.port}
        [gateways]
        timeout_seconds = 0.3
        [traffic]
        in_flight = 3
        updates = 1
        [phases]
        warmup_seconds = 0
        steady_seconds = 0.5
        drain_seconds = 1.0
        max_sessions = {phases.get("max_sessions", 3)}
    """)
    try:
        report, _ = await run_scenario(scenario)
    finally:
        await diameter.shutdown(timeout=1.0)
    return report


async def test_requests_never_answered_are_timeouts_and_their_sessions_fail():
    report = await _run_against(lambda message: asyncio.get_running_loop().create_future())  # never resolved
    assert report["timeouts"] == report["requests"]["sent"] == 3  # one CCR-I per session, then it is given up
    assert report["sessions"]["failed"] == 3 and report["requests"]["answered"] == 0
    assert_counts_add_up(report)


async def test_wrong_answers_are_counted_as_mismatches():
    def wrong(message: Message) -> bytes:
        return encode_answer(message, [
            ("Session-Id", message.session_id), ("Result-Code", 2001), ("Origin-Host", "fake.test"),
            ("Origin-Realm", "test"), ("Auth-Application-Id", 4), ("CC-Request-Type", message.get("CC-Request-Type")),
            ("CC-Request-Number", message.get("CC-Request-Number") + 1)])  # wrong number, and no MSCC at all

    report = await _run_against(wrong, max_sessions=2)
    kinds = report["mismatch_kinds"]
    assert kinds["CC-Request-Number differs from the request's"] == report["requests"]["answered"] > 0
    assert kinds["not one MSCC per MSCC asked"] == report["requests"]["answered"]
    assert report["mismatches"] == sum(kinds.values())
    assert_counts_add_up(report)


async def test_ocs_simulate_scenario_json_is_the_last_stdout_line(server, tmp_path):
    smoke = (ROOT / "simulators/scenarios/smoke.toml").read_text()
    assert "max_sessions = 40" in smoke
    scenario_file = tmp_path / "tiny.toml"
    scenario_file.write_text(smoke.replace("max_sessions = 40", "max_sessions = 10"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ocs", "simulate", "--scenario", str(scenario_file), "--port", str(server.port),
        "--json", "--no-progress", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    for key in ("requests_per_second", "latency_ms", "results", "errors", "timeouts", "mismatches"):
        assert key in report
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99", "p999", "max"}
    assert report["sessions"]["started"] == 10 and report["mismatches"] == 0


async def test_ocs_simulate_with_a_bad_scenario_says_which_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[traffic]\nabandon_share = 2\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ocs", "simulate", "--scenario", str(bad), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "[traffic].abandon_share: must be within 0..1" in stderr.decode()
