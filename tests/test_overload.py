"""Overload: a Redis that is too slow or unreachable makes a CCR a 3004 DIAMETER_TOO_BUSY (E bit) at once,
never a silent time-out; too many CCRs in flight shed new sessions and events before updates and
terminations of open sessions. Redis sits behind a TCP proxy the test can stall or drop.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest
from prometheus_client import generate_latest

from balances.model import Subscriber
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from tests.gateway import DATA_RG, SMS_RG, Gateway, RedisProxy, start_app

MSISDN = "491708880101"
MONEY = 10_000_000


@pytest.fixture
async def proxy(valkey_url):
    target = urlparse(valkey_url)
    proxy = RedisProxy(target.hostname, target.port)
    await proxy.start()
    yield proxy
    proxy.resume()


@pytest.fixture
async def app_behind(proxy, tmp_path):
    started = []

    async def start(**settings: str):
        app = await start_app(f"redis://127.0.0.1:{proxy.port}/0", tmp_path, OCS_CDR__ENABLED="false", **settings)
        started.append(app)
        await app.store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
        return app

    yield start
    proxy.resume()
    for app in started:
        await app.stop()


def too_busy(answer) -> bool:
    return answer.is_error and answer.get("Result-Code") == 3004 and answer.get("Origin-Host") == "ocs.test"


async def test_slow_redis_is_answered_3004_and_the_retry_is_charged_once(app_behind, proxy):
    app = await app_behind(OCS_REDIS__CALL_TIMEOUT_MS="200")
    data = compiled_plans(app.config)[0]["demo"][DATA_RG]
    gw = await Gateway.connect(app.port)
    sid = "pgw1.gw.test;slow;1"
    assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    proxy.stall()
    busy = await gw.ccr(sid, 2, 1, used=1_000_000)
    assert too_busy(busy) and busy.session_id == sid
    proxy.resume()
    # the gateway retries (its CCFH): whether or not the first attempt reached Redis, one debit
    assert (await gw.resend(gw.sent[(sid, 1)])).get("Result-Code") == 2001
    assert (await gw.ccr(sid, 3, 2, request_units=False)).get("Result-Code") == 2001
    money = {b.bucket: b for b in await app.store.balances(MSISDN)}["money"]
    assert (money.balance, money.reserved) == (MONEY - amount_for_units(data, 1_000_000), 0)
    gw.close()


async def test_unreachable_redis_is_answered_3004_at_once(app_behind, proxy):
    app = await app_behind(OCS_REDIS__CALL_TIMEOUT_MS="60000")  # refused connections fail long before
    gw = await Gateway.connect(app.port)
    sid = "pgw1.gw.test;down;1"
    assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    port = proxy.port
    await proxy.drop()
    assert too_busy(await gw.ccr(sid, 2, 1, used=10))
    assert too_busy(await gw.ccr("pgw1.gw.test;down;2", 1, 0, MSISDN))
    await proxy.start(port)  # Redis is back
    assert (await gw.ccr(sid, 2, 1, used=10)).get("Result-Code") == 2001
    gw.close()


async def test_overload_sheds_new_sessions_and_events_before_updates(app_behind, proxy):
    app = await app_behind(OCS_REDIS__CALL_TIMEOUT_MS="30000", OCS_OVERLOAD__NEW_SESSIONS_MAX_IN_FLIGHT="1",
                           OCS_OVERLOAD__MAX_IN_FLIGHT="3")
    gw = await Gateway.connect(app.port)
    sids = [f"pgw1.gw.test;load;{n}" for n in range(4)]
    for sid in sids:
        assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    proxy.stall()  # every CCR that reaches Redis now stays in flight
    first = asyncio.ensure_future(gw.ccr(sids[0], 2, 1, used=10))
    await asyncio.sleep(0)
    # one CCR in flight: new sessions and events are shed at once, updates are not
    assert too_busy(await gw.ccr("pgw1.gw.test;load;new", 1, 0, MSISDN))
    assert too_busy(await gw.ccr("pgw1.gw.test;load;evt", 4, 0, MSISDN, rating_group=SMS_RG))
    more = [asyncio.ensure_future(gw.ccr(sid, 2, 1, used=10)) for sid in sids[1:3]]
    await asyncio.sleep(0)
    # three in flight: now updates and terminations are shed too
    assert too_busy(await gw.ccr(sids[3], 3, 1, request_units=False))
    assert not first.done() and not any(task.done() for task in more)
    proxy.resume()
    for answer in await asyncio.gather(first, *more):
        assert answer.get("Result-Code") == 2001
    assert (await gw.ccr(sids[3], 3, 1, request_units=False)).get("Result-Code") == 2001
    text = generate_latest(app.metrics.registry).decode()
    assert 'ocs_overload_answers_total{type="initial"} 1.0' in text
    assert 'ocs_overload_answers_total{type="termination"} 1.0' in text
    gw.close()


async def test_store_bounds_calls_in_flight_and_waiting_and_never_sends_abandoned_ones(proxy):
    from balances.store import BalanceStore, StoreUnavailable

    store = await BalanceStore.connect(f"redis://127.0.0.1:{proxy.port}/0", call_timeout=0.2, max_inflight=1)
    proxy.stall()
    sent = store.calls_sent
    stuck = asyncio.ensure_future(store.locate_msisdn("4917000001"))  # sent, and Redis does not answer
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(store.locate_msisdn("4917000002"))  # no pipeline slot free
    for task in (stuck, waiting):
        with pytest.raises(StoreUnavailable):
            await task
    proxy.resume()
    assert await store.locate_msisdn("4917000003") is None
    assert store.calls_sent == sent + 2  # the first and the last: the abandoned one never went out
    await store.close()
