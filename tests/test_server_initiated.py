"""Server-initiated RAR and ASR over real TCP: what goes on the wire (also decoded by python-diameter), what
each answer does to the session, the RAR/CCR collision, routing to the process that holds the gateway's
connection (through the peer registry and the per-process queue), and the `ocs session` / `ocs topup` CLI.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from diameter.message import Message as PdMessage
from diameter.message.commands.abort_session import AbortSessionRequest
from diameter.message.commands.re_auth import ReAuthRequest
from typer.testing import CliRunner

from balances.model import Subscriber
from ocs.cli import app as cli_app
from ocs.clock import FixedClock
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from tests.gateway import ASR, DATA_RG, RAR, Gateway, cdr_records, start_app, wait_for

NOW = 1_800_000_000_000
MSISDN = "491706660001"
MONEY = 10_000_000


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
async def apps(valkey_url, tmp_path, clock):
    started = []

    async def start(**settings: str):
        app = await start_app(valkey_url, tmp_path, clock, **settings)
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        await app.stop()


async def open_session(app, gw: Gateway, sid: str, msisdn: str = MSISDN) -> None:
    if await app.store.subscriber(msisdn) is None:
        await app.store.provision(Subscriber(msisdn=msisdn, plan="demo"), money=MONEY, allowances={})
    assert (await gw.ccr(sid, 1, 0, msisdn)).get("Result-Code") == 2001


async def money(app, msisdn: str = MSISDN) -> tuple[int, int]:
    bucket = {b.bucket: b for b in await app.store.balances(msisdn)}["money"]
    return bucket.balance, bucket.reserved


async def answer_next(gw: Gateway, code: int, command: int = RAR):
    request = await gw.next_request()
    assert request.command_code == command
    gw.answer(request, code)
    return request


async def test_rar_on_the_wire_and_raa_2002_keeps_the_session(apps):
    a = await apps()
    gw = await Gateway.connect(a.port, origin_host="pgw1.gw.test", origin_realm="gw.test")
    sid = "pgw1.gw.test;rar;1"
    await open_session(a, gw, sid)

    result, request = await asyncio.gather(a.reauth(sid), answer_next(gw, 2002))
    assert (result.result_code, result.closed, result.error) == (2002, False, None)
    assert result.peer == "pgw1.gw.test" and result.process == a.router.process_id
    # RFC 4006 §3.3 / RFC 6733 §8.3, read by an independent stack
    rar = PdMessage.from_bytes(request.raw)
    assert isinstance(rar, ReAuthRequest) and rar.header.is_request and rar.header.is_proxyable
    assert rar.header.application_id == 4
    assert rar.session_id == sid
    assert rar.destination_host == b"pgw1.gw.test" and rar.destination_realm == b"gw.test"
    assert rar.origin_host == b"ocs.test" and rar.origin_realm == b"test"
    assert rar.auth_application_id == 4 and rar.re_auth_request_type == 0
    # the gateway then reports and asks again: charged as usual
    assert (await gw.ccr(sid, 2, 1, used=1_000_000)).get("Result-Code") == 2001
    assert (await a.store.session_owner(sid)).state == "open"
    gw.close()


async def test_raa_5002_closes_the_session_and_releases_its_reservation(apps, tmp_path):
    a = await apps()
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;rar;gone"
    await open_session(a, gw, sid)
    assert (await money(a))[1] > 0
    result, _ = await asyncio.gather(a.reauth(sid), answer_next(gw, 5002))
    assert (result.result_code, result.closed) == (5002, True)
    assert await money(a) == (MONEY, 0)
    assert (await gw.ccr(sid, 2, 1, used=10)).get("Result-Code") == 5002
    gw.close()
    await a.stop()
    [close] = [r for r in cdr_records(tmp_path / "cdr") if r["sessionId"] == sid and r["recordType"] == "close"]
    assert close["causeForRecClosing"] == "abnormalRelease"


async def test_rar_ccr_collision_the_ccr_is_answered_while_the_rar_is_outstanding(apps):
    a = await apps()
    data = compiled_plans(a.config)[0]["demo"][DATA_RG]
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;collide;1"
    await open_session(a, gw, sid)

    async def gateway_side():
        rar = await gw.next_request()
        assert rar.command_code == RAR
        # a re-authorisation was already under way: its CCR-U goes first and is answered, then RAA 2001
        cca = await gw.ccr(sid, 2, 1, used=2_000_000)
        gw.answer(rar, 2001)
        return cca

    result, cca = await asyncio.gather(a.reauth(sid), gateway_side())
    assert cca.get("Result-Code") == 2001
    assert result.result_code == 2001 and not result.closed
    balance, _ = await money(a)
    assert balance == MONEY - amount_for_units(data, 2_000_000)
    gw.close()


async def test_asr_2001_keeps_the_session_until_its_ccr_t_which_is_charged(apps, tmp_path):
    a = await apps()
    data = compiled_plans(a.config)[0]["demo"][DATA_RG]
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;asr;1"
    await open_session(a, gw, sid)
    result, request = await asyncio.gather(a.abort(sid), answer_next(gw, 2001, ASR))
    asr = PdMessage.from_bytes(request.raw)
    assert isinstance(asr, AbortSessionRequest) and asr.destination_host == b"pgw1.gw.test"
    assert asr.auth_application_id == 4
    assert (result.command, result.result_code, result.closed) == ("ASR", 2001, False)
    assert (await a.store.session_owner(sid)).state == "open"
    # usage reported after the ASR is still charged
    assert (await gw.ccr(sid, 3, 1, used=3_000_000, request_units=False)).get("Result-Code") == 2001
    assert await money(a) == (MONEY - amount_for_units(data, 3_000_000), 0)

    sid2 = "pgw1.gw.test;asr;2"
    await open_session(a, gw, sid2)
    result, _ = await asyncio.gather(a.abort(sid2), answer_next(gw, 5002, ASR))
    assert (result.result_code, result.closed) == (5002, True)
    assert await money(a) == (MONEY - amount_for_units(data, 3_000_000), 0)
    gw.close()
    await a.stop()
    records = [r for r in cdr_records(tmp_path / "cdr") if r["recordType"] == "close"]
    causes = {r["sessionId"]: r["causeForRecClosing"] for r in records}
    assert causes == {sid: "normalRelease", sid2: "abnormalRelease"}


async def test_no_answer_unknown_session_and_closed_session(apps):
    a = await apps(OCS_DIAMETER__ANSWER_TIMEOUT_SECONDS="0.3")
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;silent;1"
    await open_session(a, gw, sid)
    result = await a.reauth(sid)  # the gateway never answers
    assert result.result_code is None and "no RAA" in result.error
    assert (await a.store.session_owner(sid)).state == "open"
    assert (await a.reauth("no-such-session")).error == "unknown session"
    assert (await gw.ccr(sid, 3, 1, request_units=False)).get("Result-Code") == 2001
    assert (await a.abort(sid)).error == "session is not open"
    gw.close()
    await gw.next_request()  # the late RAR was delivered; nothing more to check


async def test_routed_to_the_process_holding_the_gateway_connection(apps):
    a, b = await apps(), await apps()
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;route;1"
    await open_session(a, gw, sid)
    # the gateway fails over to process b and continues the session there
    gw.close()
    gw = await Gateway.connect(b.port)
    assert (await gw.ccr(sid, 2, 1, used=10)).get("Result-Code") == 2001
    # asked on process a, which has no connection to the gateway: b sends the RAR
    result, _ = await asyncio.gather(a.reauth(sid), answer_next(gw, 2002))
    assert (result.result_code, result.process) == (2002, b.router.process_id)
    gw.close()


async def test_through_a_relay_the_request_goes_on_the_relay_connection_to_the_gateway(apps):
    a = await apps()
    relay = await Gateway.connect(a.port, origin_host="dra.relay.test", origin_realm="relay.test")
    sid = "pgw7.gw.test;relayed;1"
    await a.store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
    answer = await relay.ccr(sid, 1, 0, MSISDN, origin_host="pgw7.gw.test")
    assert answer.get("Result-Code") == 2001
    owner = await a.store.session_owner(sid)
    assert (owner.origin_host, owner.peer) == ("pgw7.gw.test", "dra.relay.test")
    result, request = await asyncio.gather(a.reauth(sid), answer_next(relay, 2001))
    assert request.get("Destination-Host") == "pgw7.gw.test"
    assert result.result_code == 2001 and result.peer == "dra.relay.test"
    relay.close()


# ---- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def ocs_cli(valkey_url, tmp_path):
    runner = CliRunner()
    env = {"OCS_REDIS_URL": valkey_url, "OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0"}

    async def invoke(*args: str):
        """The CLI in a thread of its own (it runs its own event loop), while the server runs on this one."""
        return await asyncio.to_thread(runner.invoke, cli_app, list(args), env=env, catch_exceptions=False)

    return invoke


async def test_cli_session_reauth_and_abort_by_session_and_msisdn(apps, ocs_cli):
    await apps()  # a process the gateway is not connected to
    b = await apps()
    gw = await Gateway.connect(b.port)
    sids = ["pgw1.gw.test;cli;1", "pgw1.gw.test;cli;2"]
    for sid in sids:
        await open_session(b, gw, sid)

    run, _ = await asyncio.gather(ocs_cli("session", "reauth", sids[0], "--json"), answer_next(gw, 2002))
    assert run.exit_code == 0, run.output
    [item] = json.loads(run.stdout)
    assert (item["session_id"], item["command"], item["result_code"]) == (sids[0], "RAR", 2002)
    assert item["process"] == b.router.process_id

    async def answer_both():
        for _ in sids:
            await answer_next(gw, 2001)

    run, _ = await asyncio.gather(ocs_cli("session", "reauth", MSISDN, "--json"), answer_both())
    assert run.exit_code == 0, run.output
    assert sorted(item["session_id"] for item in json.loads(run.stdout)) == sids

    run, _ = await asyncio.gather(ocs_cli("session", "abort", sids[1]), answer_next(gw, 5002, ASR))
    assert run.exit_code == 0, run.output
    assert "ASR" in run.stdout and "closed" in run.stdout
    assert (await b.store.session_owner(sids[1])).state == "closed"

    unknown = await ocs_cli("session", "reauth", "nosuch;1")
    assert unknown.exit_code == 2 and "unknown session or subscriber" in unknown.output
    closed = await ocs_cli("session", "abort", sids[1], "--json")
    assert closed.exit_code == 1 and json.loads(closed.stdout)[0]["error"] == "session is not open"
    gw.close()
    # the gateway is gone: nobody holds its connection

    async def released() -> bool:
        return await b.store.peer_owner("pgw1.gw.test") is None

    assert await wait_for(released)
    gone = await ocs_cli("session", "reauth", sids[0], "--json")
    assert gone.exit_code == 1 and "not connected" in json.loads(gone.stdout)[0]["error"]


async def test_topup_sends_a_rar_to_each_open_session_of_the_subscriber(apps, ocs_cli):
    a = await apps()
    gw = await Gateway.connect(a.port)
    sids = ["pgw1.gw.test;topup;1", "pgw1.gw.test;topup;2"]
    for sid in sids:
        await open_session(a, gw, sid)
    assert (await gw.ccr(sids[1], 3, 1, request_units=False)).get("Result-Code") == 2001  # closed: no RAR

    run, rar = await asyncio.gather(ocs_cli("topup", MSISDN, "1.00", "--ref", "t-1", "--json"),
                                    answer_next(gw, 2001))
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    assert out["applied"] is True
    assert [(item["session_id"], item["result_code"]) for item in out["reauth"]] == [(sids[0], 2001)]
    assert rar.session_id == sids[0]
    again = await ocs_cli("topup", MSISDN, "1.00", "--ref", "t-1", "--json")  # not applied: no RAR
    assert json.loads(again.stdout)["reauth"] == []
    assert gw.requests.empty()
    gw.close()


async def test_plan_change_hook_reauthorises_every_open_session(apps):
    a = await apps()
    gw = await Gateway.connect(a.port)
    sids = ["pgw1.gw.test;hook;1", "pgw1.gw.test;hook;2"]
    for sid in sids:
        await open_session(a, gw, sid)

    async def answer_both():
        return sorted([(await answer_next(gw, 2002)).session_id for _ in sids])

    results, asked = await asyncio.gather(a.subscriber_changed(MSISDN), answer_both())
    assert asked == sids
    assert sorted((r.session_id, r.result_code) for r in results) == [(sid, 2002) for sid in sids]
    gw.close()
