"""Exactly-once and session life through the server over real TCP (the simulator's Gy client as gateway).

Duplicates (T flag or not, also at a second OCS process sharing the Valkey) get the stored answer again and
change nothing; CCR-I for an open session, CCR-U after CCR-T and out-of-order numbers get defined answers;
CCAs advertise CC-Session-Failover; a session silent past its Tcc is closed once, by whichever process
sweeps first; a peer that comes back with a new Origin-State-Id loses its old sessions.
"""

from __future__ import annotations

import asyncio

import pytest

from balances import keys as k
from balances.model import Subscriber
from ocs.clock import FixedClock
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from tests.gateway import (
    DATA_RG,
    SMS_RG,
    VOICE_RG,
    Gateway,
    cdr_records,
    granted_octets,
    mscc_of,
    start_app,
    wait_for,
)

NOW = 1_800_000_000_000
MSISDN = "491705550001"
OTHER = "491705550002"
MONEY = 50_000  # 0.05 EUR: 5 MB of data at 0.01 EUR/MB, less than the 10 MB default grant → final units


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


async def provision(app, msisdn: str = MSISDN, money: int = MONEY) -> None:
    await app.store.provision(Subscriber(msisdn=msisdn, plan="demo"), money=money, allowances={})


async def money(app, msisdn: str = MSISDN) -> tuple[int, int]:
    bucket = {b.bucket: b for b in await app.store.balances(msisdn)}["money"]
    return bucket.balance, bucket.reserved


def body(answer) -> bytes:
    """An answer without its Hop-by-Hop id: a re-sent answer must equal the first in everything else."""
    return answer.raw[:12] + answer.raw[16:]


async def test_duplicates_answered_again_at_a_second_process_without_second_debit(apps, tmp_path):
    a, b = await apps(), await apps()
    await provision(a)
    data = compiled_plans(a.config)[0]["demo"][DATA_RG]
    gw_a = await Gateway.connect(a.port)
    gw_b = await Gateway.connect(b.port)  # the same gateway's second link, to the other process
    sid = "pgw1.gw.test;dup;1"

    first_i = await gw_a.ccr(sid, 1, 0, MSISDN)
    assert first_i.get("Result-Code") == 2001
    assert granted_octets(first_i) == 5 * 1024 * 1024
    assert mscc_of(first_i).find("Final-Unit-Indication") is not None
    again_i = await gw_b.resend(gw_a.sent[(sid, 0)])  # T flag, other process
    assert body(again_i) == body(first_i)
    assert await money(a) == (MONEY, MONEY)  # one reservation

    first_u = await gw_a.ccr(sid, 2, 1, used=1_000_000)
    for answer in (await gw_b.resend(gw_a.sent[(sid, 1)]),  # T flag
                   await gw_b.resend(gw_a.sent[(sid, 1)], retransmit=False),  # no T flag
                   await gw_a.resend(gw_a.sent[(sid, 1)])):  # the first process again
        assert body(answer) == body(first_u)
    assert mscc_of(first_u).find("Final-Unit-Indication") is not None

    first_t = await gw_a.ccr(sid, 3, 2, used=2_000_000, request_units=False)
    assert first_t.get("Result-Code") == 2001
    assert body(await gw_b.resend(gw_a.sent[(sid, 2)])) == body(first_t)
    charged = amount_for_units(data, 1_000_000) + amount_for_units(data, 2_000_000)
    assert await money(a) == (MONEY - charged, 0)

    gw_a.close()
    gw_b.close()
    await a.stop()
    await b.stop()
    records = [r for r in cdr_records(tmp_path / "cdr") if r["sessionId"] == sid]
    assert sorted(r["ccRequestNumber"] for r in records if r["recordType"] == "usage") == [1, 2]
    assert [r["recordType"] for r in records].count("close") == 1
    assert sum(r["amount"] for r in records) == charged


async def test_event_duplicates_are_recognised_for_at_least_four_minutes(apps, clock):
    a, b = await apps(), await apps()
    await provision(a, money=1_000_000)
    sms = compiled_plans(a.config)[0]["demo"][SMS_RG]
    gw_a, gw_b = await Gateway.connect(a.port), await Gateway.connect(b.port)
    sid = "pgw1.gw.test;evt;1"
    first = await gw_a.ccr(sid, 4, 0, MSISDN, rating_group=SMS_RG)
    assert first.get("Result-Code") == 2001
    location = await a.store.locate_msisdn(MSISDN)
    assert await a.store.redis.pttl(k.evt_key(location.partition, sid, 0)) >= 240_000
    clock.advance(4 * 60)
    again = await gw_b.resend(gw_a.sent[(sid, 0)])
    assert body(again) == body(first)
    assert await money(a) == (1_000_000 - amount_for_units(sms, 1), 0)
    gw_a.close()
    gw_b.close()


async def test_defined_answers_for_requests_out_of_sequence(apps, clock):
    a = await apps()
    await provision(a, money=10_000_000)
    data = compiled_plans(a.config)[0]["demo"][DATA_RG]
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;seq;1"
    opened = await gw.ccr(sid, 1, 0, MSISDN)
    assert opened.get("Result-Code") == 2001
    held = await money(a)

    # CCR-I again for the open session: number 0 is answered, so it is that answer again (no second
    # reservation); any other number is 5012 and changes nothing
    again = await gw.ccr(sid, 1, 0, MSISDN)
    assert again.get("Result-Code") == 2001 and granted_octets(again) == granted_octets(opened)
    assert (await gw.ccr(sid, 1, 7, MSISDN)).get("Result-Code") == 5012
    assert await money(a) == held

    # updates may arrive out of order (RFC 4006 §5.1.2): each is charged once
    assert (await gw.ccr(sid, 2, 2, used=300_000)).get("Result-Code") == 2001
    assert (await gw.ccr(sid, 2, 1, used=200_000)).get("Result-Code") == 2001
    # the answers of a minute ago are let go (the last one stays): a number at or below them, never answered,
    # cannot be told from an old duplicate; a higher one not answered yet is charged
    clock.advance(61)
    assert (await gw.ccr(sid, 2, 40, used=100_000)).get("Result-Code") == 2001
    assert (await gw.ccr(sid, 2, 3, used=999_999)).get("Result-Code") == 2001  # still within the minute
    clock.advance(61)
    assert (await gw.ccr(sid, 2, 41, used=50_000)).get("Result-Code") == 2001
    assert (await gw.ccr(sid, 2, 39, used=999_999)).get("Result-Code") == 5012
    assert (await gw.resend(gw.sent[(sid, 41)])).get("Result-Code") == 2001  # the last one is kept

    assert (await gw.ccr(sid, 3, 42, used=1, request_units=False)).get("Result-Code") == 2001
    # CCR-U after CCR-T: the session is closed
    after = await gw.ccr(sid, 2, 43, used=10)
    assert after.get("Result-Code") == 5002
    assert after.get("CC-Request-Type") == 2 and after.get("CC-Request-Number") == 43
    # the CCR-T retransmitted is still answered from its stored outcome
    assert (await gw.resend(gw.sent[(sid, 42)])).get("Result-Code") == 2001

    charged = sum(amount_for_units(data, u) for u in (300_000, 200_000, 100_000, 999_999, 50_000, 1))
    assert await money(a) == (10_000_000 - charged, 0)
    gw.close()


@pytest.mark.parametrize("failover", ["true", "false"])
async def test_cca_advertises_cc_session_failover(apps, failover):
    a = await apps(OCS_DIAMETER__CC_SESSION_FAILOVER=failover)
    await provision(a)
    gw = await Gateway.connect(a.port)
    answer = await gw.ccr("pgw1.gw.test;fo;1", 1, 0, MSISDN)
    assert answer.get("CC-Session-Failover") == (1 if failover == "true" else None)
    gw.close()


# ---- supervision (Tcc) ----------------------------------------------------------------------------------


async def closing_records(app, session_id: str) -> list[dict]:
    location = await app.store.locate_msisdn(MSISDN)
    entries = await app.store.redis.xrange(k.cdr_key(location.partition))
    import json

    records = [json.loads(fields[b"r"]) for _, fields in entries]
    return [r for r in records if r["sessionId"] == session_id and r["recordType"] == "close"]


async def test_silent_session_is_closed_after_twice_its_validity_time(apps, clock):
    a = await apps(OCS_CDR__ENABLED="false")
    await provision(a, money=10_000_000)
    gw = await Gateway.connect(a.port)
    sid = "pgw1.gw.test;tcc;1"
    opened = await gw.ccr(sid, 1, 0, MSISDN)
    assert mscc_of(opened).get("Validity-Time") == 600  # the demo rate card: Tcc = 1200 s
    assert (await money(a))[1] > 0

    clock.advance(1000)
    assert (await gw.ccr(sid, 2, 1, used=1000)).get("Result-Code") == 2001  # activity restarts Tcc
    clock.advance(1199)
    assert await a.supervisor.sweep() == 0
    assert (await a.store.session_owner(sid)).state == "open"
    clock.advance(1)
    assert await a.supervisor.sweep() == 1
    assert (await a.store.session_owner(sid)).state == "closed"
    assert (await money(a))[1] == 0
    [record] = await closing_records(a, sid)
    assert record["causeForRecClosing"] == "sessionTimeout" and record["ccRequestNumber"] == 1
    assert (await gw.ccr(sid, 2, 2, used=10)).get("Result-Code") == 5002
    assert await a.supervisor.sweep() == 0
    gw.close()


@pytest.mark.parametrize(("settings", "rating_group", "tcc"), [
    ({}, VOICE_RG, 7200),  # no Validity-Time: the default
    ({"OCS_CHARGING__TCC_MAX_SECONDS": "900"}, DATA_RG, 900),  # 2 x 600 s, capped
    ({"OCS_CHARGING__TCC_MIN_SECONDS": "3000", "OCS_CHARGING__TCC_DEFAULT_SECONDS": "3000"}, DATA_RG, 3000),
])
async def test_tcc_bounds_and_default(apps, clock, settings, rating_group, tcc):
    a = await apps(OCS_CDR__ENABLED="false", **settings)
    await provision(a, money=10_000_000)
    gw = await Gateway.connect(a.port)
    sid = f"pgw1.gw.test;tcc;{rating_group};{tcc}"
    assert (await gw.ccr(sid, 1, 0, MSISDN, rating_group=rating_group)).get("Result-Code") == 2001
    clock.advance(tcc - 1)
    assert await a.supervisor.sweep() == 0
    clock.advance(1)
    assert await a.supervisor.sweep() == 1
    [record] = await closing_records(a, sid)
    assert record["causeForRecClosing"] == "sessionTimeout"
    gw.close()


async def test_two_processes_sweeping_close_a_session_once(apps, clock):
    a, b = await apps(OCS_CDR__ENABLED="false"), await apps(OCS_CDR__ENABLED="false")
    await provision(a, money=10_000_000)
    gw = await Gateway.connect(a.port)
    sids = [f"pgw1.gw.test;race;{n}" for n in range(5)]
    for sid in sids:
        assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    clock.advance(1200)
    closed = await asyncio.gather(a.supervisor.sweep(), b.supervisor.sweep(), a.supervisor.sweep())
    assert sum(closed) == len(sids)
    for sid in sids:
        assert len(await closing_records(a, sid)) == 1
    assert await money(a) == (10_000_000, 0)
    gw.close()


# ---- a restarted peer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("same_process", [True, False])
async def test_peer_back_with_new_origin_state_id_loses_its_sessions(apps, clock, same_process):
    a = await apps(OCS_CDR__ENABLED="false")
    b = a if same_process else await apps(OCS_CDR__ENABLED="false")
    await provision(a, money=10_000_000)
    await provision(a, OTHER, money=10_000_000)
    gw = await Gateway.connect(a.port, state_id=7)
    other_gw = await Gateway.connect(a.port, origin_host="pgw2.gw.test", state_id=7)
    old = ["pgw1.gw.test;old;1", "pgw1.gw.test;old;2"]
    for sid in old:
        assert (await gw.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
    assert (await other_gw.ccr("pgw2.gw.test;kept;1", 1, 0, OTHER)).get("Result-Code") == 2001

    # the same Origin-State-Id again (a reconnect, not a restart) changes nothing
    gw.close()
    gw = await Gateway.connect(b.port, state_id=7)
    clock.advance(1)
    assert (await gw.ccr(old[0], 2, 1, used=10)).get("Result-Code") == 2001

    gw.close()
    clock.advance(1)
    gw = await Gateway.connect(b.port, state_id=8)  # restarted
    clock.advance(1)
    new_sid = "pgw1.gw.test;new;1"
    assert (await gw.ccr(new_sid, 1, 0, MSISDN)).get("Result-Code") == 2001

    async def old_closed() -> bool:
        states = [(await a.store.session_owner(sid)).state for sid in old]
        return states == ["closed", "closed"]

    assert await wait_for(old_closed)
    assert (await a.store.session_owner(new_sid)).state == "open"
    assert (await a.store.session_owner("pgw2.gw.test;kept;1")).state == "open"
    causes = [r["causeForRecClosing"] for sid in old for r in await closing_records(a, sid)]
    assert causes == ["abnormalRelease", "abnormalRelease"]
    assert (await money(a))[1] > 0  # only the new session holds a reservation now
    assert (await gw.ccr(old[1], 2, 1, used=10)).get("Result-Code") == 5002
    gw.close()
    other_gw.close()
