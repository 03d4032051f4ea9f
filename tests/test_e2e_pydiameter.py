"""End to end: python-diameter (an independent stack) drives `ocs serve` over real TCP.

CER → CCR-I → CCR-U → CCR-T → CCR-E → DPR against the real server (real Valkey, real CDR writer); the
money balance and the CDR files change by exactly the rated amounts.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import struct
from pathlib import Path

import pytest
from diameter.message import Message as PdMessage
from diameter.message.avp.grouped import (
    MultipleServicesCreditControl,
    RequestedServiceUnit,
    SubscriptionId,
    UsedServiceUnit,
)
from diameter.message.commands.capabilities_exchange import CapabilitiesExchangeRequest
from diameter.message.commands.credit_control import CreditControlRequest
from diameter.message.commands.disconnect_peer import DisconnectPeerRequest
from diameter.message.constants import (
    APP_DIAMETER_CREDIT_CONTROL_APPLICATION,
    E_CC_REQUEST_TYPE_EVENT_REQUEST,
    E_CC_REQUEST_TYPE_INITIAL_REQUEST,
    E_CC_REQUEST_TYPE_TERMINATION_REQUEST,
    E_CC_REQUEST_TYPE_UPDATE_REQUEST,
    E_SUBSCRIPTION_ID_TYPE_END_USER_E164,
    VENDOR_TGPP,
)

from balances.model import Subscriber
from ocs.server import ServerApp, compiled_plans
from ratecards.pricing import amount_for_units
from tests.gateway import start_app

MSISDN = "491709990001"
MONEY = 5_000_000  # 5.00 EUR
DATA_RG = 100
SMS_RG = 300


class BlockingDiameterClient:
    """A minimal blocking client: python-diameter encodes and decodes, a plain socket carries bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.hop = 1000
        self.origin_host = b"pgw.pyd.test"
        self.origin_realm = b"pyd.test"

    def exchange(self, request) -> PdMessage:
        self.hop += 1
        request.header.hop_by_hop_identifier = self.hop
        request.header.end_to_end_identifier = 0x5000 + self.hop
        if isinstance(request, CreditControlRequest):
            request.header.application_id = 4  # python-diameter sets it only in its node layer
        self.sock.sendall(request.as_bytes())
        return self.read()

    def read(self) -> PdMessage:
        header = self._recv(20)
        length = struct.unpack("!I", b"\x00" + header[1:4])[0]
        return PdMessage.from_bytes(header + self._recv(length - 20))

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by server")
            data += chunk
        return data

    def cer(self) -> PdMessage:
        cer = CapabilitiesExchangeRequest()
        cer.origin_host = self.origin_host
        cer.origin_realm = self.origin_realm
        cer.host_ip_address = ["127.0.0.1"]
        cer.vendor_id = 0
        cer.product_name = "python-diameter-e2e"
        cer.origin_state_id = 1
        cer.supported_vendor_id = [VENDOR_TGPP]
        cer.auth_application_id = [APP_DIAMETER_CREDIT_CONTROL_APPLICATION]
        return self.exchange(cer)

    def ccr(self, session_id: str, request_type: int, number: int, msccs, **extra) -> PdMessage:
        ccr = CreditControlRequest()
        ccr.header.is_proxyable = True
        ccr.session_id = session_id
        ccr.origin_host = self.origin_host
        ccr.origin_realm = self.origin_realm
        ccr.destination_realm = b"test"
        ccr.auth_application_id = APP_DIAMETER_CREDIT_CONTROL_APPLICATION
        ccr.service_context_id = "32251@3gpp.org"
        ccr.cc_request_type = request_type
        ccr.cc_request_number = number
        ccr.event_timestamp = datetime.datetime.now(datetime.UTC)
        ccr.subscription_id = [SubscriptionId(E_SUBSCRIPTION_ID_TYPE_END_USER_E164, MSISDN)]
        ccr.multiple_services_indicator = 1
        ccr.multiple_services_credit_control = msccs
        for key, value in extra.items():
            setattr(ccr, key, value)
        return self.exchange(ccr)

    def dpr(self) -> PdMessage:
        dpr = DisconnectPeerRequest()
        dpr.origin_host = self.origin_host
        dpr.origin_realm = self.origin_realm
        dpr.disconnect_cause = 0
        return self.exchange(dpr)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path)
    await app.store.provision(Subscriber(msisdn=MSISDN, imsi="262019990000001", plan="demo"), money=MONEY,
                              allowances={})
    yield app
    await app.stop()


def cdr_lines(directory: Path) -> list[dict]:
    lines = []
    for path in sorted(directory.rglob("*.jsonl*")):
        lines.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return lines


async def test_session_and_event_charge_exactly(server: ServerApp):
    plans, _ = compiled_plans(server.config)
    data = plans["demo"][DATA_RG]
    client = BlockingDiameterClient(server.port)
    session_id = "pgw.pyd.test;1;42"

    def flow():
        cea = client.cer()
        answers = [cea]
        answers.append(client.ccr(session_id, E_CC_REQUEST_TYPE_INITIAL_REQUEST, 0, [
            MultipleServicesCreditControl(requested_service_unit=RequestedServiceUnit(), rating_group=DATA_RG)]))
        answers.append(client.ccr(session_id, E_CC_REQUEST_TYPE_UPDATE_REQUEST, 1, [
            MultipleServicesCreditControl(requested_service_unit=RequestedServiceUnit(),
                                          used_service_unit=[UsedServiceUnit(cc_total_octets=1_500_000)],
                                          rating_group=DATA_RG)]))
        answers.append(client.ccr(session_id, E_CC_REQUEST_TYPE_TERMINATION_REQUEST, 2, [
            MultipleServicesCreditControl(used_service_unit=[UsedServiceUnit(cc_total_octets=700_001)],
                                          rating_group=DATA_RG)], termination_cause=1))
        answers.append(client.ccr("pgw.pyd.test;1;43", E_CC_REQUEST_TYPE_EVENT_REQUEST, 0, [
            MultipleServicesCreditControl(
                requested_service_unit=RequestedServiceUnit(cc_service_specific_units=1),
                rating_group=SMS_RG)], requested_action=0))
        answers.append(client.dpr())
        client.close()
        return answers

    cea, cca_i, cca_u, cca_t, cca_e, dpa = await asyncio.to_thread(flow)
    assert cea.result_code == 2001
    for cca in (cca_i, cca_u, cca_t, cca_e):
        assert cca.result_code == 2001
        assert cca.session_id is not None
        assert [m.result_code for m in cca.multiple_services_credit_control] == [2001]
    assert cca_i.multiple_services_credit_control[0].granted_service_unit.cc_total_octets == data.default_quota
    assert cca_u.cc_request_number == 1
    assert dpa.result_code == 2001

    sms = plans["demo"][SMS_RG]
    expected = amount_for_units(data, 1_500_000) + amount_for_units(data, 700_001) + amount_for_units(sms, 1)
    buckets = {b.bucket: b for b in await server.store.balances(MSISDN)}
    assert buckets["money"].balance == MONEY - expected
    assert buckets["money"].reserved == 0

    await server.stop()  # drains the CDR streams to files
    records = [r for r in cdr_lines(server.config.cdr_directory) if r["servedMSISDN"] == MSISDN]
    usage = [r for r in records if r["recordType"] in ("usage", "event")]
    closing = [r for r in records if r["recordType"] == "close"]
    assert sorted(r["amount"] for r in usage) == sorted([
        amount_for_units(data, 1_500_000), amount_for_units(data, 700_001), amount_for_units(sms, 1)])
    assert sum(r["amount"] for r in usage) == expected
    assert len(closing) == 1 and closing[0]["sessionId"] == session_id
    assert len({r["recordId"] for r in records}) == len(records)


async def test_duplicate_ccr_is_answered_again_without_second_debit(server: ServerApp):
    client = BlockingDiameterClient(server.port)
    session_id = "pgw.pyd.test;2;1"

    def flow():
        client.cer()
        client.ccr(session_id, E_CC_REQUEST_TYPE_INITIAL_REQUEST, 0, [
            MultipleServicesCreditControl(requested_service_unit=RequestedServiceUnit(), rating_group=DATA_RG)])
        mscc = [MultipleServicesCreditControl(requested_service_unit=RequestedServiceUnit(),
                                              used_service_unit=[UsedServiceUnit(cc_total_octets=2_000_000)],
                                              rating_group=DATA_RG)]
        first = client.ccr(session_id, E_CC_REQUEST_TYPE_UPDATE_REQUEST, 1, mscc)
        again = client.ccr(session_id, E_CC_REQUEST_TYPE_UPDATE_REQUEST, 1, mscc)
        client.close()
        return first, again

    first, again = await asyncio.to_thread(flow)
    assert first.result_code == again.result_code == 2001
    granted = first.multiple_services_credit_control[0].granted_service_unit.cc_total_octets
    assert again.multiple_services_credit_control[0].granted_service_unit.cc_total_octets == granted
    plans, _ = compiled_plans(server.config)
    buckets = {b.bucket: b for b in await server.store.balances(MSISDN)}
    assert buckets["money"].balance == MONEY - amount_for_units(plans["demo"][DATA_RG], 2_000_000)


async def test_unknown_subscriber_and_unknown_session(server: ServerApp):
    client = BlockingDiameterClient(server.port)

    def flow():
        client.cer()
        ccr = CreditControlRequest()
        ccr.session_id = "pgw.pyd.test;3;1"
        ccr.origin_host = client.origin_host
        ccr.origin_realm = client.origin_realm
        ccr.destination_realm = b"test"
        ccr.auth_application_id = 4
        ccr.service_context_id = "32251@3gpp.org"
        ccr.cc_request_type = E_CC_REQUEST_TYPE_INITIAL_REQUEST
        ccr.cc_request_number = 0
        ccr.subscription_id = [SubscriptionId(E_SUBSCRIPTION_ID_TYPE_END_USER_E164, "49000")]
        unknown_user = client.exchange(ccr)
        unknown_session = client.ccr("pgw.pyd.test;3;nosuch", E_CC_REQUEST_TYPE_UPDATE_REQUEST, 1, [
            MultipleServicesCreditControl(used_service_unit=[UsedServiceUnit(cc_total_octets=1)],
                                          rating_group=DATA_RG)])
        client.close()
        return unknown_user, unknown_session

    unknown_user, unknown_session = await asyncio.to_thread(flow)
    assert unknown_user.result_code == 5030
    assert unknown_session.result_code == 5002


async def test_metrics_count_answers_and_latency(server: ServerApp):
    from prometheus_client import generate_latest

    client = BlockingDiameterClient(server.port)

    def flow():
        client.cer()
        client.ccr("pgw.pyd.test;4;1", E_CC_REQUEST_TYPE_INITIAL_REQUEST, 0, [
            MultipleServicesCreditControl(requested_service_unit=RequestedServiceUnit(), rating_group=DATA_RG)])
        client.close()

    await asyncio.to_thread(flow)
    text = generate_latest(server.metrics.registry).decode()
    assert 'ocs_diameter_requests_total{command="CCR",result="2001",type="initial"} 1.0' in text
    assert 'ocs_request_latency_seconds_count{command="CCR"} 1.0' in text
    assert "ocs_redis_call_latency_seconds_count 1.0" in text
