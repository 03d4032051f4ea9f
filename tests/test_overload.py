"""Overload: a Redis that is too slow or unreachable makes a CCR a 3004 DIAMETER_TOO_BUSY (E bit) at once,
never a silent time-out; too many CCRs in flight, or a CCR that waited too long in the process before the
server got to it, shed new sessions and events before updates and terminations of open sessions. Redis sits
behind a TCP proxy the test can stall or drop; a slow step in the server makes requests wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from urllib.parse import urlparse

import pytest
from prometheus_client import generate_latest

from balances.model import Subscriber
from ocs.config import ConfigError, load_config
from ocs.server import compiled_plans
from protocol.codec import FLAG_PROXIABLE, FLAG_REQUEST, Message, encode_message
from ratecards.pricing import amount_for_units
from simulators.gy import CCR
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
    app = await app_behind(OCS_REDIS__CALL_TIMEOUT_MS="200", OCS_OVERLOAD__MAX_QUEUE_MS="60000")
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
                           OCS_OVERLOAD__MAX_IN_FLIGHT="3", OCS_OVERLOAD__NEW_SESSIONS_MAX_QUEUE_MS="60000",
                           OCS_OVERLOAD__MAX_QUEUE_MS="60000")
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


class SlowStep:
    """Stands in for the handler: the first request of an armed read blocks the event loop (a stand-in for a
    slow step: a GC pause, a burst of other work), so every request of that read waits before the server's
    own code gets to it; everything else goes to the app unchanged."""

    def __init__(self, app, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.armed = False

    def handle_request(self, peer, message: Message):
        if self.armed:
            self.armed = False
            time.sleep(self.seconds)
        return self.app.handle_request(peer, message)

    def __getattr__(self, name: str):
        return getattr(self.app, name)


class CountingPending(dict):
    """The gateway's hop-by-hop → future map, counting the answers that came for each hop."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: Counter[int] = Counter()

    def pop(self, hop, default=None):
        self.answers[hop] += 1
        return super().pop(hop, default)


def burst(gw: Gateway, requests: list[list]) -> list[tuple[int, asyncio.Future[Message]]]:
    """All the requests in one write, so the server reads them together: (hop-by-hop id, answer) each."""
    sent, frames = [], []
    loop = asyncio.get_running_loop()
    for avps in requests:
        hop, e2e = gw._ids()
        frames.append(encode_message(CCR, 4, FLAG_REQUEST | FLAG_PROXIABLE, hop, e2e, avps))
        future = loop.create_future()
        gw.client.pending[hop] = future
        sent.append((hop, future))
    gw.client.transport.write(b"".join(frames))
    return sent


async def test_requests_that_waited_past_the_budget_are_answered_3004_without_redis_new_sessions_first(
        app_behind, proxy):
    app = await app_behind(OCS_REDIS__CALL_TIMEOUT_MS="30000", OCS_OVERLOAD__NEW_SESSIONS_MAX_QUEUE_MS="50",
                           OCS_OVERLOAD__MAX_QUEUE_MS="60000")
    slow = SlowStep(app, 0.2)
    app.diameter.handler = slow
    gw = await Gateway.connect(app.port)
    gw.client.pending = counting = CountingPending()
    sids = [f"pgw1.gw.test;queue;{n}" for n in range(3)]
    for sid in sids:
        assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    proxy.stall()  # what reaches Redis now stays in flight: a 3004 that arrives meanwhile needed no Redis call
    calls = app.store.calls_sent
    slow.armed = True
    relayed = ("Proxy-Info", [("Proxy-Host", "dra1.gw.test"), ("Proxy-State", b"state-1")])
    requests = [
        gw.ccr_avps(sids[0], 2, 1, used=10),
        gw.ccr_avps("pgw1.gw.test;queue;new1", 1, 0, MSISDN) + [relayed],
        gw.ccr_avps(sids[1], 3, 1, request_units=False),
        gw.ccr_avps("pgw1.gw.test;queue;evt", 4, 0, MSISDN, rating_group=SMS_RG),
        gw.ccr_avps("pgw1.gw.test;queue;new2", 1, 0, MSISDN),
        gw.ccr_avps(sids[2], 2, 1, used=10),
    ]
    sent = burst(gw, requests)
    shed = [sent[n][1] for n in (1, 3, 4)]  # CCR-I, CCR-E, CCR-I: over the new-session budget
    kept = [sent[n][1] for n in (0, 2, 5)]  # CCR-U, CCR-T, CCR-U: within the budget of open sessions
    shed_sessions = ["pgw1.gw.test;queue;new1", "pgw1.gw.test;queue;evt", "pgw1.gw.test;queue;new2"]
    for sid, answer in zip(shed_sessions, await asyncio.gather(*shed), strict=True):
        assert too_busy(answer) and answer.session_id == sid
        assert answer.get("Origin-Realm") is not None and answer.get("Error-Message")
    first = await shed[0]
    assert [(p.get("Proxy-Host"), p.get("Proxy-State")) for p in first.find_all("Proxy-Info")] == [
        ("dra1.gw.test", b"state-1")]
    assert not any(future.done() for future in kept)
    assert app.store.calls_sent - calls <= len(kept)  # only the kept ones went towards Redis
    proxy.resume()
    for answer in await asyncio.gather(*kept):
        assert answer.get("Result-Code") == 2001
    assert (await gw.ccr(sids[0], 3, 2, request_units=False)).get("Result-Code") == 2001  # a later one: no wait
    assert all(counting.answers[hop] == 1 for hop, _ in sent)  # exactly one answer each
    text = generate_latest(app.metrics.registry).decode()
    assert 'ocs_overload_answers_total{type="initial"} 2.0' in text
    assert 'ocs_overload_answers_total{type="event"} 1.0' in text
    gw.close()


async def test_past_the_budget_of_open_sessions_every_request_is_answered_3004_and_charged_on_retry(
        app_behind, proxy):
    app = await app_behind(OCS_OVERLOAD__NEW_SESSIONS_MAX_QUEUE_MS="20", OCS_OVERLOAD__MAX_QUEUE_MS="50")
    data = compiled_plans(app.config)[0]["demo"][DATA_RG]
    slow = SlowStep(app, 0.2)
    app.diameter.handler = slow
    gw = await Gateway.connect(app.port)
    sid = "pgw1.gw.test;queue;all"
    assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    calls = app.store.calls_sent
    slow.armed = True
    sent = burst(gw, [gw.ccr_avps(sid, 2, 1, used=1_000_000), gw.ccr_avps(sid, 3, 2, request_units=False),
                      gw.ccr_avps("pgw1.gw.test;queue;other", 1, 0, MSISDN)])
    for answer in await asyncio.gather(*(future for _, future in sent)):
        assert too_busy(answer)
    assert app.store.calls_sent == calls  # nothing reached Redis
    # the gateway retries (CCFH): the update and the termination are charged as usual, once
    assert (await gw.ccr(sid, 2, 1, used=1_000_000)).get("Result-Code") == 2001
    assert (await gw.ccr(sid, 3, 2, request_units=False)).get("Result-Code") == 2001
    money = {b.bucket: b for b in await app.store.balances(MSISDN)}["money"]
    assert (money.balance, money.reserved) == (MONEY - amount_for_units(data, 1_000_000), 0)
    text = generate_latest(app.metrics.registry).decode()
    assert 'ocs_overload_answers_total{type="termination"} 1.0' in text
    gw.close()


async def test_when_answers_take_too_long_new_sessions_joining_the_queue_are_answered_3004_at_once(
        app_behind, proxy):
    app = await app_behind(OCS_REDIS__CALL_TIMEOUT_MS="30000", OCS_OVERLOAD__NEW_SESSIONS_MAX_QUEUE_MS="10",
                           OCS_OVERLOAD__MAX_QUEUE_MS="60000")
    gw = await Gateway.connect(app.port)
    sids = [f"pgw1.gw.test;slowanswers;{n}" for n in range(3)]
    for sid in sids:
        assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    proxy.stall()
    slow = asyncio.ensure_future(gw.ccr(sids[0], 2, 1, used=10))
    await asyncio.sleep(0.3)  # Valkey holds it: an answer that took 0.3 s in the process
    proxy.resume()
    assert (await slow).get("Result-Code") == 2001
    proxy.stall()
    waiting = asyncio.ensure_future(gw.ccr(sids[1], 2, 1, used=10))  # a queue to join
    await asyncio.sleep(0)
    busy = await gw.ccr("pgw1.gw.test;slowanswers;new", 1, 0, MSISDN)  # shed on arrival, before any Redis call
    assert too_busy(busy) and busy.get("Error-Message") == "answers take too long"
    update = asyncio.ensure_future(gw.ccr(sids[2], 2, 1, used=10))  # within the budget of open sessions
    proxy.resume()
    assert [(await task).get("Result-Code") for task in (waiting, update)] == [2001, 2001]
    # nothing in flight: no queue to wait in, the new session is served
    assert (await gw.ccr("pgw1.gw.test;slowanswers;new", 1, 0, MSISDN)).get("Result-Code") == 2001
    gw.close()


def test_queue_budgets_are_checked():
    config = load_config(None, environ={"OCS_OVERLOAD__MAX_QUEUE_MS": "150"})
    assert (config.overload.max_queue_ms, config.overload.new_sessions_max_queue_ms) == (150, 100)
    for bad in ({"OCS_OVERLOAD__NEW_SESSIONS_MAX_QUEUE_MS": "0"}, {"OCS_OVERLOAD__MAX_QUEUE_MS": "50"}):
        with pytest.raises(ConfigError, match="max_queue_ms"):
            load_config(None, environ=bad)
