"""Quota control per rating group through the real server: CCR over TCP → CCA, and the CDR files.

The rate card here sets every quota-control key (grants of several unit types, Validity-Time, thresholds,
Quota-Holding-Time, Trigger, Final-Unit-Indication REDIRECT / RESTRICT_ACCESS / TERMINATE, a free and a
barred rating group), for the MSCC form and for plain RFC 4006 clients (units at command level); plus
Reporting-Reason recording, Service-Context-Id matching and IMEISV decoding (digest §6, §8).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from balances.model import Subscriber
from ocs.server import ServerApp
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, close_client, open_client
from tests.gateway import start_app

RATECARD = """
version = "quota-1"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"

[plans.quota]
default_rating_group = 10

  [[plans.quota.rates]]
  rating_group = 10
  service = "data"
  unit = "bytes"
  price = "0.01"
  per = 1024
  increment = 1024
  default_quota = 10240
  max_quota = 102400
  also_grant = { time = { default = 3600, max = 7200 } }
  validity_time = 600
  volume_quota_threshold = 2048
  time_quota_threshold = 60
  quota_holding_time = 300
  triggers = ["CHANGE_IN_QOS", 4]
  final_unit_action = "REDIRECT"
  redirect_address = "https://topup.example.net"
  final_validity_time = 60

  [[plans.quota.rates]]
  rating_group = 20
  service = "video"
  unit = "bytes"
  price = "0.01"
  per = 1024
  increment = 1024
  default_quota = 10240
  max_quota = 10240
  validity_time = 300
  final_unit_action = "RESTRICT_ACCESS"
  filter_id = "topup-only"
  restriction_filter_rule = "permit out ip from any to 192.0.2.10"

  [[plans.quota.rates]]
  rating_group = 30
  service = "voice"
  unit = "seconds"
  price = "0.06"
  per = 60
  increment = 60
  default_quota = 300
  max_quota = 600
  unit_quota_threshold = 0

  [[plans.quota.rates]]
  rating_group = 40
  service = "portal"
  unit = "bytes"
  credit_control = false

  [[plans.quota.rates]]
  rating_group = 50
  service = "adult"
  unit = "bytes"
  price = "0.01"
  per = 1024
  increment = 1024
  default_quota = 1024
  max_quota = 1024
  barred = true

[plans.plain]
default_rating_group = 30

  [[plans.plain.rates]]
  rating_group = 30
  service = "voice"
  unit = "seconds"
  price = "0.06"
  per = 60
  increment = 60
  default_quota = 300
  max_quota = 600
"""
RICH, POOR, EMPTY, PLAIN = "491705550001", "491705550002", "491705550003", "491705550004"
CENT = 10_000


async def start(valkey_url: str, tmp_path: Path, **env: str) -> ServerApp:
    card = tmp_path / "quota.toml"
    card.write_text(RATECARD)
    app = await start_app(valkey_url, tmp_path, OCS_RATECARD=str(card), **env)
    for msisdn, money, plan in ((RICH, 10_000_000, "quota"), (POOR, 30_000, "quota"), (EMPTY, 0, "quota"),
                                (PLAIN, 100_000, "plain")):
        await app.store.provision(Subscriber(msisdn=msisdn, plan=plan), money=money, allowances={})
    return app


@pytest.fixture
async def server(valkey_url, tmp_path):
    app = await start(valkey_url, tmp_path)
    yield app
    await app.stop()


class Gateway:
    """One connection, CCRs built from (name, value) lists."""

    def __init__(self, client) -> None:
        self.client = client

    async def ccr(self, session_id: str, request_type: int, number: int, msisdn: str, *extra,
                  context: str = "32251@3gpp.org"):
        avps = [("Session-Id", session_id), ("Origin-Host", "pgw.quota.test"), ("Origin-Realm", "quota.test"),
                ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", context),
                ("CC-Request-Type", request_type), ("CC-Request-Number", number),
                ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", msisdn)]), *extra]
        return await asyncio.wait_for(self.client.request(CCR, 4, avps, FLAG_REQUEST | FLAG_PROXIABLE), 5)


@pytest.fixture
async def gateway(server):
    client = await open_client("127.0.0.1", server.port, "pgw.quota.test", "quota.test")
    yield Gateway(client)
    if not client.transport.is_closing():
        await close_client(client)


async def finish(server: ServerApp, gateway: Gateway) -> list[dict]:
    """Disconnect, stop the server (which drains the CDR streams to files) and read every CDR record."""
    await close_client(gateway.client)
    await server.stop()
    lines = []
    for path in sorted(server.config.cdr_directory.rglob("*.jsonl*")):
        lines.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return lines


def mscc(rating_group: int, *avps) -> tuple:
    return ("Multiple-Services-Credit-Control", [*avps, ("Rating-Group", rating_group)])


RSU = ("Requested-Service-Unit", [])


def usu(*units, reason: int | None = None) -> tuple:
    return ("Used-Service-Unit", [*units, *([("Reporting-Reason", reason)] if reason is not None else [])])


def msccs_by_group(answer) -> dict:
    return {m.get("Rating-Group"): m for m in answer.find_all("Multiple-Services-Credit-Control")}


def names(avp) -> list[str]:
    return [child.name for child in avp.children]


# ---- the MSCC form -----------------------------------------------------------------------------------------

async def test_each_rating_group_gets_its_own_result_and_quota_control(server, gateway):
    answer = await gateway.ccr("q;1", 1, 0, RICH, mscc(10, RSU), mscc(40, RSU), mscc(50, RSU), mscc(999, RSU),
                               mscc(30, ("Requested-Service-Unit", [("CC-Time", 120)])))
    assert answer.get("Result-Code") == 2001
    groups = msccs_by_group(answer)
    assert {rg: m.get("Result-Code") for rg, m in groups.items()} == {10: 2001, 40: 4011, 50: 4010, 999: 5031,
                                                                       30: 2001}
    data = groups[10]
    assert names(data) == ["Granted-Service-Unit", "Rating-Group", "Validity-Time", "Result-Code",
                           "Time-Quota-Threshold", "Volume-Quota-Threshold", "Quota-Holding-Time", "Trigger"]
    gsu = data.find("Granted-Service-Unit")
    assert (gsu.get("CC-Total-Octets"), gsu.get("CC-Time")) == (10240, 3600)
    assert (data.get("Validity-Time"), data.get("Volume-Quota-Threshold"), data.get("Time-Quota-Threshold"),
            data.get("Quota-Holding-Time")) == (600, 2048, 60, 300)
    assert [t.value for t in data.find("Trigger").find_all("Trigger-Type")] == [2, 4]
    voice = groups[30]
    assert names(voice) == ["Granted-Service-Unit", "Rating-Group", "Result-Code"]
    assert voice.find("Granted-Service-Unit").get("CC-Time") == 120
    for rg in (40, 50, 999):  # no quota, no quota control
        assert names(groups[rg]) == ["Rating-Group", "Result-Code"]
    assert answer.find("Failed-AVP").children[0].value == 999
    # the session stays open: the free group's usage is recorded at amount 0, the barred one's is charged
    answer = await gateway.ccr("q;1", 2, 1, RICH, mscc(40, usu(("CC-Total-Octets", 5000))),
                               mscc(50, usu(("CC-Total-Octets", 2048)), RSU))
    assert {rg: m.get("Result-Code") for rg, m in msccs_by_group(answer).items()} == {40: 4011, 50: 4010}
    await gateway.ccr("q;1", 3, 2, RICH, mscc(10, usu(("CC-Total-Octets", 1024), reason=2)))
    money = {b.bucket: b for b in await server.store.balances(RICH)}["money"]
    assert (money.balance, money.reserved) == (10_000_000 - 2 * CENT - CENT, 0)
    usage = {(r["ccRequestNumber"], r["ratingGroup"]): r for r in await finish(server, gateway)
             if r["recordType"] == "usage"}
    assert (usage[1, 40]["amount"], usage[1, 40]["bucket"], usage[1, 40]["usage"]) == (0, {}, {"octetsTotal": 5000})
    assert usage[1, 50]["amount"] == 2 * CENT and usage[2, 10]["amount"] == CENT


async def test_redirect_final_units_restricted_then_regranted(server, gateway):
    # 0.30 EUR at 1 cent per KiB: 3 KiB of the 10 KiB default, the final units with the FUI
    first = msccs_by_group(await gateway.ccr("r;1", 1, 0, POOR, mscc(10, RSU)))[10]
    assert names(first) == ["Granted-Service-Unit", "Rating-Group", "Validity-Time", "Result-Code",
                            "Final-Unit-Indication", "Quota-Holding-Time", "Trigger"]  # no thresholds
    assert first.find("Granted-Service-Unit").get("CC-Total-Octets") == 3072
    assert first.get("Validity-Time") == 600
    fui = first.find("Final-Unit-Indication")
    assert fui.get("Final-Unit-Action") == 1
    server_avp = fui.find("Redirect-Server")
    assert (server_avp.get("Redirect-Address-Type"), server_avp.get("Redirect-Server-Address")) == (
        2, "https://topup.example.net")
    # the final units are used: USU, no RSU → debited, no grant, the restricted state's Validity-Time and FUI
    used = await gateway.ccr("r;1", 2, 1, POOR, mscc(10, usu(("CC-Total-Octets", 3072), reason=2)))
    assert used.get("Result-Code") == 2001
    restricted = msccs_by_group(used)[10]
    assert names(restricted) == ["Rating-Group", "Validity-Time", "Result-Code", "Final-Unit-Indication"]
    assert (restricted.get("Result-Code"), restricted.get("Validity-Time")) == (2001, 60)
    assert restricted.find("Final-Unit-Indication").find("Redirect-Server") is not None
    assert {b.bucket: b.balance for b in await server.store.balances(POOR)}["money"] == 0
    duplicate = await gateway.ccr("r;1", 2, 1, POOR, mscc(10, usu(("CC-Total-Octets", 3072), reason=2)))
    assert duplicate.raw[20:] == used.raw[20:]  # the stored outcome, encoded again: the same answer
    assert {b.bucket: b.balance for b in await server.store.balances(POOR)}["money"] == 0
    # Validity-Time over, no money yet: a CCR-U without USU gets the policy again
    again = msccs_by_group(await gateway.ccr("r;1", 2, 2, POOR, mscc(10)))[10]
    assert names(again) == names(restricted) and again.get("Validity-Time") == 60
    # money arrives: the next CCR-U re-grants, no FUI, the normal Validity-Time and thresholds
    await server.store.topup(POOR, 1_000_000, "r1-topup", 1)
    regranted = msccs_by_group(await gateway.ccr("r;1", 2, 3, POOR, mscc(10, RSU)))[10]
    assert names(regranted)[:4] == ["Granted-Service-Unit", "Rating-Group", "Validity-Time", "Result-Code"]
    assert regranted.find("Final-Unit-Indication") is None
    assert regranted.find("Granted-Service-Unit").get("CC-Total-Octets") == 10240
    assert regranted.get("Volume-Quota-Threshold") == 2048


async def test_already_empty_at_initial(server, gateway):
    answer = await gateway.ccr("e;1", 1, 0, EMPTY, mscc(20, RSU), mscc(10, RSU), mscc(30, RSU))
    assert answer.get("Result-Code") == 2001
    groups = msccs_by_group(answer)
    restrict = groups[20]
    assert names(restrict) == ["Rating-Group", "Validity-Time", "Result-Code", "Final-Unit-Indication"]
    assert (restrict.get("Result-Code"), restrict.get("Validity-Time")) == (2001, 300)
    fui = restrict.find("Final-Unit-Indication")
    assert (fui.get("Final-Unit-Action"), fui.get("Filter-Id"), fui.get("Restriction-Filter-Rule")) == (
        2, "topup-only", "permit out ip from any to 192.0.2.10")
    assert groups[10].find("Final-Unit-Indication").get("Final-Unit-Action") == 1
    assert groups[10].get("Validity-Time") == 60
    assert names(groups[30]) == ["Rating-Group", "Result-Code"] and groups[30].get("Result-Code") == 4012
    assert await server.store.count_open_sessions() == 1


async def test_events_for_free_and_barred_rating_groups(server, gateway):
    answer = await gateway.ccr("ev;1", 4, 0, RICH, ("Requested-Action", 0),
                               mscc(40, ("Requested-Service-Unit", [("CC-Total-Octets", 500)])),
                               mscc(50, ("Requested-Service-Unit", [("CC-Total-Octets", 500)])),
                               mscc(10, ("Requested-Service-Unit", [("CC-Total-Octets", 1024)])))
    groups = msccs_by_group(answer)
    assert {rg: m.get("Result-Code") for rg, m in groups.items()} == {40: 4011, 50: 4010, 10: 2001}
    assert names(groups[10]) == ["Granted-Service-Unit", "Rating-Group", "Result-Code"]  # no quota control
    money = {b.bucket: b.balance for b in await server.store.balances(RICH)}["money"]
    assert money == 10_000_000 - CENT


# ---- plain RFC 4006 clients: units at command level -------------------------------------------------------

async def test_command_level_units_validity_and_fui(server, gateway):
    answer = await gateway.ccr("c;1", 1, 0, POOR, ("Requested-Service-Unit", [("CC-Total-Octets", 4096)]))
    assert answer.get("Result-Code") == 2001
    assert answer.find("Multiple-Services-Credit-Control") is None
    assert answer.find("Granted-Service-Unit").get("CC-Total-Octets") == 3072
    assert answer.get("Validity-Time") == 600
    assert answer.find("Final-Unit-Indication").find("Redirect-Server").get("Redirect-Server-Address") == (
        "https://topup.example.net")
    assert answer.find("Volume-Quota-Threshold") is None and answer.find("Trigger") is None  # MSCC only
    used = await gateway.ccr("c;1", 2, 1, POOR, ("Used-Service-Unit", [("CC-Total-Octets", 3072)]))
    assert used.get("Result-Code") == 2001 and used.find("Granted-Service-Unit") is None
    assert used.get("Validity-Time") == 60 and used.find("Final-Unit-Indication").get("Final-Unit-Action") == 1
    # after the Validity-Time the client asks with a CCR-U carrying no units: still no money, the policy again
    empty = await gateway.ccr("c;1", 2, 2, POOR)
    assert (empty.get("Result-Code"), empty.get("Validity-Time")) == (2001, 60)
    assert empty.find("Granted-Service-Unit") is None
    assert empty.find("Final-Unit-Indication") is not None
    await server.store.topup(POOR, 100_000, "c1-topup", 1)
    regranted = await gateway.ccr("c;1", 2, 3, POOR)
    assert regranted.find("Granted-Service-Unit").get("CC-Total-Octets") == 10240
    assert regranted.find("Final-Unit-Indication") is None and regranted.get("Validity-Time") == 600


async def test_command_level_failure_closes_the_session(server, gateway):
    # 0.10 EUR at 0.06 per minute: one minute, the final units (TERMINATE); then 4012 closes the session
    first = await gateway.ccr("p;1", 1, 0, PLAIN, ("Requested-Service-Unit", []))
    assert first.get("Result-Code") == 2001 and first.find("Granted-Service-Unit").get("CC-Time") == 60
    assert first.find("Final-Unit-Indication").get("Final-Unit-Action") == 0
    answer = await gateway.ccr("p;1", 2, 1, PLAIN, ("Requested-Service-Unit", []),
                               ("Used-Service-Unit", [("CC-Time", 60)]))
    assert answer.get("Result-Code") == 4012
    assert await server.store.count_open_sessions() == 0
    assert (await gateway.ccr("p;1", 2, 2, PLAIN, ("Requested-Service-Unit", []))).get("Result-Code") == 5002
    records = [r for r in await finish(server, gateway) if r["sessionId"] == "p;1"]
    assert [(r["recordType"], r["amount"], r.get("causeForRecClosing")) for r in records] == [
        ("usage", 6 * CENT, None), ("close", 0, "abnormalRelease")]


# ---- Reporting-Reason, Service-Context-Id, IMEISV -----------------------------------------------------------

async def test_reporting_reason_inside_usu_or_at_mscc_level_is_recorded(server, gateway):
    await gateway.ccr("rr;1", 1, 0, RICH, mscc(10, RSU))
    # every value, alternately inside the USU and at MSCC level; number 9 has both: the USU's wins
    for reason in range(9):
        octets = ("CC-Total-Octets", 100 + reason)
        placed = (mscc(10, usu(octets, reason=reason), RSU) if reason % 2 else
                  mscc(10, usu(octets), RSU, ("Reporting-Reason", reason)))
        assert (await gateway.ccr("rr;1", 2, reason + 1, RICH, placed)).get("Result-Code") == 2001
    await gateway.ccr("rr;1", 2, 10, RICH, mscc(10, usu(("CC-Total-Octets", 1), reason=3), RSU,
                                               ("Reporting-Reason", 4)))
    await gateway.ccr("rr;1", 3, 11, RICH, ("Used-Service-Unit", [("CC-Total-Octets", 7), ("Reporting-Reason", 2)]))
    reasons = {r["ccRequestNumber"]: r.get("reportingReason") for r in await finish(server, gateway)
               if r["recordType"] == "usage" and r["sessionId"] == "rr;1"}
    assert reasons == {**{n + 1: n for n in range(9)}, 10: 3, 11: 2}


@pytest.mark.parametrize("context", ["32251@3gpp.org", "8.32251@3gpp.org", "302.220.8.32251@3gpp.org",
                                     "32260@3gpp.org", "32274@3GPP.org", "ext.1.2.15.32270@3gpp.org",
                                     "32275@3gpp.org", "32276@3gpp.org"])
async def test_known_service_contexts_are_matched_on_their_last_label(server, gateway, context):
    answer = await gateway.ccr("sc;" + context, 1, 0, RICH, mscc(10, RSU), context=context)
    assert answer.get("Result-Code") == 2001
    await gateway.ccr("sc;" + context, 3, 1, RICH)
    [record] = [r for r in await finish(server, gateway) if r["sessionId"] == "sc;" + context]
    assert record["serviceContextId"] == context  # the full string


@pytest.mark.parametrize("context", ["gprs@cmcc.com", "32251@example.com", "32299@3gpp.org", "32251"])
async def test_unknown_service_context_is_5031_with_failed_avp(server, gateway, context):
    for request_type in (1, 4):
        extra = [("Requested-Action", 0)] if request_type == 4 else []
        answer = await gateway.ccr("u;" + context, request_type, 0, RICH, *extra, mscc(10, RSU), context=context)
        assert answer.get("Result-Code") == 5031
        failed = answer.find("Failed-AVP").children[0]
        assert (failed.code, failed.value) == (461, context)
    assert await server.store.count_open_sessions() == 0


async def test_unknown_service_context_accepted_by_configuration(valkey_url, tmp_path):
    app = await start(valkey_url, tmp_path, OCS_CHARGING__ACCEPT_UNKNOWN_SERVICE_CONTEXT="true")
    try:
        client = await open_client("127.0.0.1", app.port, "pgw.quota.test", "quota.test")
        answer = await Gateway(client).ccr("ua;1", 1, 0, RICH, mscc(10, RSU), context="gprs@cmcc.com")
        assert answer.get("Result-Code") == 2001
        await close_client(client)
    finally:
        await app.stop()


@pytest.mark.parametrize("value, digits", [
    (bytes.fromhex("6869920052929187"), "8696290025291978"),  # TBCD, as cmcc_ccr_u_validity_time
    (b"3564871075436638", "3564871075436638"),  # 16 ASCII digits, as eseye_ccr_u1
    (b"IMEISV", None),  # a placeholder, as optiva_ccr_i: ignored
    (b"\xff\xff", None),
])
async def test_imeisv_is_recorded_never_rejected(server, gateway, value, digits):
    info = ("User-Equipment-Info", [("User-Equipment-Info-Type", 0), ("User-Equipment-Info-Value", value)])
    answer = await gateway.ccr("im;1", 1, 0, RICH, info, mscc(10, RSU))
    assert answer.get("Result-Code") == 2001
    await gateway.ccr("im;1", 3, 1, RICH, mscc(10, usu(("CC-Total-Octets", 10))))
    records = [r for r in await finish(server, gateway) if r["sessionId"] == "im;1"]
    assert records and all(r.get("servedIMEISV") == digits for r in records)
