"""The simulator's stepped run (the overload knee): one measured phase per step, each with its own results,
3004 share and latency, against a peer that answers busy to every new session and against the real server."""

from __future__ import annotations

import pytest

from ocs.cli import provision_demo
from protocol.codec import Message, encode_answer
from protocol.peer import PeerSettings
from protocol.transport import DiameterServer
from simulators.load import run_scenario
from simulators.report import plot_latency
from simulators.scenario import ScenarioError, load_scenario, parse_scenario
from tests.gateway import start_app
from tests.test_simulator import _Peer, assert_counts_add_up


def stepped(port: int, mode: str = "open") -> str:
    return f"""
        name = "steps"
        [target]
        port = {port}
        [gateways]
        connections = 2
        timeout_seconds = 2.0
        [traffic]
        mode = "{mode}"
        sessions_per_second = 40.0
        in_flight = 4
        updates = 1
        rating_groups = [100]
        [phases]
        warmup_seconds = 0.1
        steps = [{"20, 40" if mode == "open" else "2, 4"}]
        step_seconds = 0.4
        drain_seconds = 3.0
    """


async def test_every_step_is_measured_apart_and_busy_answers_are_its_3004_share(tmp_path):
    def busy(message: Message) -> bytes:
        return encode_answer(message, [("Session-Id", message.session_id), ("Result-Code", 3004),
                                       ("Origin-Host", "fake.test"), ("Origin-Realm", "test")], error=True)

    diameter = DiameterServer(PeerSettings(origin_host="fake.test", origin_realm="test",
                                           application_commands={4: frozenset({272})}), _Peer(busy))
    await diameter.start("127.0.0.1", 0)
    try:
        report, run = await run_scenario(parse_scenario(stepped(diameter.port)))
    finally:
        await diameter.shutdown(timeout=1.0)
    assert list(report["phases"])[:3] == ["warmup", "step1", "step2"]  # (the drain had nothing left to do)
    assert run.measured == ["step1", "step2"]
    steps = report["steps"]
    assert [row["step"] for row in steps] == ["step1", "step2"]
    assert [row["sessions_per_second"] for row in steps] == [20, 40]
    assert [row["nominal_requests_per_second"] for row in steps] == [60, 120]  # CCR-I, one CCR-U, CCR-T
    for row in steps:
        phase = report["phases"][row["step"]]
        assert row["results"] == phase["results"] == {"3004": phase["answers"]} and phase["answers"] > 0
        assert row["too_busy_share"] == 1.0 and row["success_per_second"] == 0
    # every session was refused at its CCR-I: one request each, all answered
    assert report["sessions"]["rejected"] == report["sessions"]["started"] == report["requests"]["sent"]
    assert_counts_add_up(report)
    assert report["mismatches"] == 0  # an E-bit answer needs no CC-Request-Type/-Number (RFC 6733 §7.2)
    pytest.importorskip("matplotlib")
    assert plot_latency(run.series, report, tmp_path / "knee.png").stat().st_size > 0


async def test_closed_loop_steps_against_the_server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path)
    try:
        await provision_demo(app.store, app.config)
        demo_subscribers = '\n[subscribers]\nfirst = "491700000001"\ncount = 10\n'
        report, _ = await run_scenario(parse_scenario(stepped(app.port, "closed") + demo_subscribers))
    finally:
        await app.stop()
    assert report["mismatches"] == 0 and report["errors"] == 0 and report["timeouts"] == 0
    assert [row["in_flight"] for row in report["steps"]] == [2, 4]
    assert all(row["results"] == {"2001": report["phases"][row["step"]]["answers"]} for row in report["steps"])
    assert sum(row["too_busy_share"] for row in report["steps"]) == 0
    assert_counts_add_up(report)


def test_the_knee_scenario_parses_and_bad_steps_name_the_key():
    knee = load_scenario("overload-knee")
    assert knee.traffic.mode == "open" and knee.phases.steps == sorted(knee.phases.steps)
    assert max(knee.phases.steps) == knee.traffic.sessions_per_second
    with pytest.raises(ScenarioError, match=r"\[phases\]\.steps"):
        parse_scenario("[phases]\nsteps = [10, 0]\n")
    with pytest.raises(ScenarioError, match=r"\[phases\]\.step_seconds"):
        parse_scenario("[phases]\nsteps = [10]\nstep_seconds = 0\n")
    assert parse_scenario("[phases]\nsteps = [10]\nsteady_seconds = 0\n").phases.steps == [10]
