"""CCR-Event through the real server: each Requested-Action answered per RFC 4006 §6, money exact."""

from __future__ import annotations

import asyncio

import pytest

from balances.model import Subscriber
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, close_client, open_client
from tests.gateway import start_app

MSISDN = "491706660001"
MONEY = 1_000_000
SMS_RG = 300


@pytest.fixture
async def server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path)
    await app.store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
    yield app
    await app.stop()


async def event(server, session_id: str, action: int, units: int):
    client = await open_client("127.0.0.1", server.port, "smsc.test", "sms.test")
    avps = [("Session-Id", session_id), ("Origin-Host", "smsc.test"), ("Origin-Realm", "sms.test"),
            ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", "32274@3gpp.org"),
            ("CC-Request-Type", 4), ("CC-Request-Number", 0), ("Requested-Action", action),
            ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", MSISDN)]),
            ("Multiple-Services-Credit-Control", [
                ("Requested-Service-Unit", [("CC-Service-Specific-Units", units)]), ("Rating-Group", SMS_RG)])]
    try:
        return await asyncio.wait_for(client.request(CCR, 4, avps, FLAG_REQUEST | FLAG_PROXIABLE), 5)
    finally:
        await close_client(client)


async def money(server) -> int:
    return {b.bucket: b.balance for b in await server.store.balances(MSISDN)}["money"]


async def test_each_requested_action(server):
    sms = compiled_plans(server.config)[0]["demo"][SMS_RG]
    price = amount_for_units(sms, 3)

    enquiry = await event(server, "smsc.test;1", 3, 3)  # PRICE_ENQUIRY: cost, nothing changes
    cost = enquiry.find("Cost-Information")
    value = cost.find("Unit-Value")
    assert value.get("Value-Digits") * 10 ** (6 + value.get("Exponent")) == price
    assert cost.get("Currency-Code") == 978
    assert await money(server) == MONEY

    check = await event(server, "smsc.test;2", 2, 3)  # CHECK_BALANCE: enough, nothing changes
    assert check.get("Check-Balance-Result") == 0
    assert await money(server) == MONEY

    debit = await event(server, "smsc.test;3", 0, 3)  # DIRECT_DEBITING
    mscc = debit.find("Multiple-Services-Credit-Control")
    assert mscc.get("Result-Code") == 2001
    assert mscc.find("Granted-Service-Unit").get("CC-Service-Specific-Units") == 3
    assert await money(server) == MONEY - price

    again = await event(server, "smsc.test;3", 0, 3)  # the same event again: stored answer, no second debit
    assert again.find("Multiple-Services-Credit-Control").get("Result-Code") == 2001
    assert await money(server) == MONEY - price

    refund = await event(server, "smsc.test;4", 1, 3)  # REFUND_ACCOUNT
    assert refund.get("Result-Code") == 2001
    assert await money(server) == MONEY

    too_much = await event(server, "smsc.test;5", 2, 10)  # 10 SMS cost 0.90 of 1.00: enough
    assert too_much.get("Check-Balance-Result") == 0
    await event(server, "smsc.test;6", 0, 10)
    broke = await event(server, "smsc.test;7", 2, 10)
    assert broke.get("Check-Balance-Result") == 1
    denied = await event(server, "smsc.test;8", 0, 10)
    assert denied.find("Multiple-Services-Credit-Control").get("Result-Code") == 4012
    assert await money(server) == MONEY - amount_for_units(sms, 10)
