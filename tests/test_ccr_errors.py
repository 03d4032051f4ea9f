"""Bad CCRs through the real server: RFC answers with Failed-AVP, never a crash; the balance is untouched."""

from __future__ import annotations

import asyncio

import pytest

from balances.model import Subscriber
from ocs.server import ServerApp
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, close_client, open_client
from tests.gateway import start_app

MSISDN = "491707770001"


@pytest.fixture
async def server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path)
    await app.store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=500_000, allowances={})
    yield app
    await app.stop()


def base(session_id: str, request_type: int = 1, number: int = 0, drop: str | None = None) -> list:
    avps = [("Session-Id", session_id), ("Origin-Host", "gw.err.test"), ("Origin-Realm", "err.test"),
            ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", "32251@3gpp.org"),
            ("CC-Request-Type", request_type), ("CC-Request-Number", number),
            ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", MSISDN)])]
    return [a for a in avps if a[0] != drop]


async def ask(server: ServerApp, avps: list):
    client = await open_client("127.0.0.1", server.port, "gw.err.test", "err.test")
    try:
        return await asyncio.wait_for(client.request(CCR, 4, avps, FLAG_REQUEST | FLAG_PROXIABLE), 5)
    finally:
        await close_client(client)


@pytest.mark.parametrize("name, code", [("Service-Context-Id", 461), ("CC-Request-Number", 415),
                                        ("Destination-Realm", 283), ("CC-Request-Type", 416)])
async def test_missing_avp_is_5005_with_failed_avp(server, name, code):
    answer = await ask(server, base("gw.err.test;1;" + name, drop=name))
    assert answer.get("Result-Code") == 5005
    failed = answer.find("Failed-AVP")
    assert failed is not None and failed.children[0].code == code
    assert not answer.is_error


async def test_invalid_request_type_is_5004(server):
    avps = [a if a[0] != "CC-Request-Type" else ("CC-Request-Type", 9) for a in base("gw.err.test;2;1")]
    answer = await ask(server, avps)
    assert answer.get("Result-Code") == 5004
    assert answer.find("Failed-AVP").children[0].value == 9


async def test_event_without_requested_action_is_5005(server):
    answer = await ask(server, base("gw.err.test;3;1", request_type=4))
    assert answer.get("Result-Code") == 5005
    assert answer.find("Failed-AVP").children[0].code == 436


async def test_unrateable_rating_group_is_mscc_5031_with_failed_avp(server):
    avps = base("gw.err.test;4;1") + [
        ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", []), ("Rating-Group", 100)]),
        ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", []), ("Rating-Group", 999)]),
    ]
    answer = await ask(server, avps)
    assert answer.get("Result-Code") == 2001
    results = {m.get("Rating-Group"): m.get("Result-Code") for m in answer.find_all("Multiple-Services-Credit-Control")}
    assert results == {100: 2001, 999: 5031}
    assert answer.find("Failed-AVP").children[0].value == 999


async def test_out_of_credit_grants_the_rest_with_fui_then_4012(server):
    # voice (demo RG 200) ends with TERMINATE: the final units with the FUI, then 4012
    avps = base("gw.err.test;5;1") + [
        ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", [("CC-Time", 3600)]),
                                              ("Rating-Group", 200)])]
    first = await ask(server, avps)
    mscc = first.find("Multiple-Services-Credit-Control")
    assert mscc.get("Result-Code") == 2001
    assert mscc.find("Granted-Service-Unit").get("CC-Time") == 600  # 0.50 EUR at 0.05 EUR/min: 10 of 60 min
    assert mscc.find("Final-Unit-Indication").get("Final-Unit-Action") == 0
    second = base("gw.err.test;5;2") + [
        ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", []), ("Rating-Group", 200)])]
    answer = await ask(server, second)
    assert answer.find("Multiple-Services-Credit-Control").get("Result-Code") == 4012


async def test_out_of_credit_on_data_redirects_to_the_top_up_page(server):
    # data (demo RG 100) ends with REDIRECT: the final units with the FUI, then no units, the FUI again
    avps = base("gw.err.test;6;1") + [
        ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", [("CC-Total-Octets", 104857600)]),
                                              ("Rating-Group", 100)])]
    first = (await ask(server, avps)).find("Multiple-Services-Credit-Control")
    assert first.find("Granted-Service-Unit").get("CC-Total-Octets") == 52428800  # 0.50 EUR at 0.01 EUR/MB
    redirect = first.find("Final-Unit-Indication").find("Redirect-Server")
    assert redirect.get("Redirect-Server-Address") == "https://topup.example.net"
    second = base("gw.err.test;6;1", request_type=2, number=1) + [
        ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", []),
                                              ("Used-Service-Unit", [("CC-Total-Octets", 52428800)]),
                                              ("Rating-Group", 100)])]
    mscc = (await ask(server, second)).find("Multiple-Services-Credit-Control")
    assert (mscc.get("Result-Code"), mscc.get("Validity-Time"), mscc.find("Granted-Service-Unit")) == (2001, 60, None)
    assert mscc.find("Final-Unit-Indication").get("Final-Unit-Action") == 1
