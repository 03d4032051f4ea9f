"""BalanceStore against a real Valkey: install, provisioning, locating, top-ups, sessions, batching, a lost
function library, errors reaching the caller, and one hash tag per call (also checked by a Valkey running
in cluster mode, which refuses cross-slot calls)."""

from __future__ import annotations

import asyncio
import re
import time
import zlib

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from balances import keys as k
from balances.embedded import EmbeddedValkey
from balances.model import (
    DIRECT_DEBITING,
    EVENT,
    INITIAL,
    TERMINATION,
    UPDATE,
    BucketState,
    Location,
    Subscriber,
    Units,
)
from balances.store import BalanceStore, StoreUnavailable, SubscriberExists, UnknownSubscriber
from tests.test_charge_script import CENT, NOW, buckets, ccr, cdrs, mscc, schedule, subscriber


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url, partitions=4)
    yield store
    await store.close()


# ---- install ---------------------------------------------------------------------------------------------

async def test_partitions_are_installed_once(valkey_url, redis_client):
    first = await BalanceStore.connect(valkey_url)
    assert first.partitions == k.DEFAULT_PARTITIONS
    assert await redis_client.get(k.PARTITIONS_KEY) == b"16"
    again = await BalanceStore.connect(valkey_url, partitions=16)
    with pytest.raises(ValueError, match="fixed at install"):
        await BalanceStore.connect(valkey_url, partitions=8)
    lazy = BalanceStore(redis_client)
    with pytest.raises(RuntimeError):
        _ = lazy.partitions
    assert await lazy.subscriber("4917000000") is None  # async calls get ready on their own
    assert lazy.partitions == 16
    for store in (first, again):
        await store.close()


def test_partition_and_key_names():
    assert k.partition_of("491700000001", 16) == zlib.crc32(b"491700000001") % 16
    assert k.tag(7) == "{p007}"
    assert k.ses_key(7, "a;b") == "ses:{p007}:a;b"
    assert k.evt_key(12, "s", 3) == "evt:{p012}:s:3"
    location = Location(3, "4917", "gold")
    assert k.parse_location(k.location_value(location).encode()) == location


# ---- provisioning and locating -------------------------------------------------------------------------

async def test_provision_creates_subscriber_balances_and_indexes(store):
    sub = Subscriber(msisdn="491703000001", imsi="262010000000001", plan="gold", currency="EUR")
    p = await store.provision(sub, 5_000_000, {"data": 1 << 30})
    assert p == store.partition_for(sub.msisdn)
    expected = Location(p, sub.msisdn, "gold")
    assert await store.redis.get(k.idx_msisdn_key(sub.msisdn)) == f"{p}|491703000001|gold".encode()
    assert await store.locate_msisdn(sub.msisdn) == expected
    assert await store.locate_imsi("262010000000001") == expected
    assert await store.subscriber(sub.msisdn) == Subscriber(msisdn=sub.msisdn, imsi=sub.imsi, plan="gold",
                                                            status="active", currency="EUR", partition=p)
    assert await store.balances(sub.msisdn) == [BucketState("money", 5_000_000, 0),
                                                BucketState("data", 1 << 30, 0)]
    with pytest.raises(SubscriberExists):
        await store.provision(sub, 1)
    assert (await store.balances(sub.msisdn))[0].balance == 5_000_000


async def test_provision_replace_keeps_partition_and_fixes_indexes(store):
    await store.provision(Subscriber(msisdn="491703000002", imsi="262010000000002", partition=3), 100)
    replaced = Subscriber(msisdn="491703000002", imsi="262010000000009", plan="gold")
    assert await store.provision(replaced, 700, {"sms": 10}, replace=True) == 3
    assert await store.locate_msisdn("491703000002") == Location(3, "491703000002", "gold")
    assert await store.locate_imsi("262010000000002") is None
    assert await store.locate_imsi("262010000000009") == Location(3, "491703000002", "gold")
    assert await buckets(store, "491703000002") == {"money": (700, 0), "sms": (10, 0)}


async def test_provision_many_is_pipelined_and_skips_existing(store):
    subs = [(Subscriber(msisdn=f"4917040{n:05d}", imsi=f"26201{n:010d}"), n, {"data": 1_000}) for n in range(2_500)]
    started = time.perf_counter()
    assert await store.provision_many(subs) == 2_500
    assert time.perf_counter() - started < 30  # generous: only guards against one round trip per key
    assert await store.provision_many(subs[:10] + [(Subscriber(msisdn="491704999999"), 5, {})]) == 1
    assert await store.locate_imsi("262010000002499") == Location(store.partition_for("491704002499"),
                                                                  "491704002499", "demo")
    assert await buckets(store, "491704001234") == {"money": (1_234, 0), "data": (1_000, 0)}
    assert len([key async for key in store.redis.scan_iter("sub:*", count=1000)]) == 2_501


async def test_unknown_subscribers(store):
    assert await store.locate_msisdn("4917") is None
    assert await store.locate_imsi("26201") is None
    assert await store.locate_session("nope") is None
    assert await store.subscriber("4917") is None
    with pytest.raises(UnknownSubscriber):
        await store.balances("4917")
    with pytest.raises(UnknownSubscriber):
        await store.topup("4917", 100, None, NOW)


async def test_location_cache_and_forget(store):
    at = await subscriber(store, "491703000003", 0)
    await store.redis.set(k.idx_msisdn_key(at.msisdn), f"{at.partition}|{at.msisdn}|other")
    assert await store.locate_msisdn(at.msisdn) == at  # cached
    store.forget(msisdn=at.msisdn)
    assert (await store.locate_msisdn(at.msisdn)).plan == "other"


# ---- top-ups ---------------------------------------------------------------------------------------------

async def test_topup_is_idempotent_by_reference(store):
    at = await subscriber(store, "491703000004", 1_000)
    first = await store.topup(at.msisdn, 5_000_000, "voucher-1", NOW)
    assert (first.applied, first.balance, first.reference) == (True, 5_001_000, "voucher-1")
    again = await store.topup(at.msisdn, 5_000_000, "voucher-1", NOW + 1)
    assert (again.applied, again.balance) == (False, 5_001_000)
    plain = [await store.topup(at.msisdn, 10, None, NOW + 2) for _ in range(2)]
    assert [(t.applied, t.balance, t.reference) for t in plain] == [(True, 5_001_010, None), (True, 5_001_020, None)]
    ledger = [fields for _, fields in await store.redis.xrange(k.ledger_key(at.partition))
              if fields[b"type"] == b"topup"]  # (the first entry is the provisioning)
    assert ledger == [
        {b"type": b"topup", b"msisdn": at.msisdn.encode(), b"amount": b"5000000", b"reference": b"voucher-1",
         b"time": str(NOW).encode()},
        {b"type": b"topup", b"msisdn": at.msisdn.encode(), b"amount": b"10", b"reference": b"",
         b"time": str(NOW + 2).encode()},
        {b"type": b"topup", b"msisdn": at.msisdn.encode(), b"amount": b"10", b"reference": b"",
         b"time": str(NOW + 2).encode()},
    ]
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError):
            await store.topup(at.msisdn, bad, None, NOW)


# ---- sessions --------------------------------------------------------------------------------------------

async def test_session_index_open_sessions_and_close_session(store, valkey_url):
    at = await subscriber(store, "491703000005", 1_000_000, {"data": 0})
    s = schedule(allowances=())
    await store.charge(ccr(at, "gx;1", INITIAL, 0, [mscc(s)], now=NOW))
    await store.charge(ccr(at, "gx;2", INITIAL, 0, [mscc(s)], now=NOW + 5))
    assert await store.count_open_sessions() == 2

    other = await BalanceStore.connect(valkey_url)  # another process: no cache, finds the session index
    assert await other.locate_session("gx;1") == at
    sessions = await other.open_sessions(limit=1)
    assert sessions == [{"session_id": "gx;1", "partition": at.partition, "msisdn": at.msisdn, "plan": "demo",
                         "created": NOW, "last": NOW, "origin_host": "", "peer": "",
                         "reservations": {10: {"granted": 10_240, "buckets": {"money": CENT}}}}]
    assert await other.close_session("gx;1", "timeLimit", NOW + 600_000)
    assert not await other.close_session("gx;1", "timeLimit", NOW + 600_001)
    assert not await other.close_session("never", "timeLimit", NOW)
    await other.close()

    assert [s["session_id"] for s in await store.open_sessions()] == ["gx;2"]
    assert await buckets(store, at.msisdn) == {"money": (1_000_000, CENT), "data": (0, 0)}
    [close] = await cdrs(store.redis, at.partition)
    assert (close["recordId"], close["causeForRecClosing"], close["recordTime"]) == (
        "gx;1;0;close", "timeLimit", NOW + 600_000)
    assert 0 < await store.redis.pttl(k.sidx_key("gx;1")) <= 86_400_000
    outcome = await store.charge(ccr(at, "gx;1", UPDATE, 1, [mscc(s, used=Units(total=10))]))
    assert outcome.result_code == 5002

    await store.charge(ccr(at, "gx;2", TERMINATION, 1, []))
    assert await store.locate_session("gx;2") == at  # the index lives on while the stored answers do
    assert 0 < await store.redis.pttl(k.sidx_key("gx;2")) <= 86_400_000
    assert await store.count_open_sessions() == 0


async def test_failed_initial_leaves_no_session_index(store):
    ghost = Location(2, "491703999999", "demo")
    assert (await store.charge(ccr(ghost, "lost", INITIAL, 0, [mscc(schedule())]))).result_code == 5030
    assert await store.redis.exists(k.sidx_key("lost")) == 0
    assert await store.locate_session("lost") is None


# ---- batching --------------------------------------------------------------------------------------------

async def test_concurrent_calls_share_pipelines(store):
    subs = [(Subscriber(msisdn=f"4917050{n:05d}"), 1_000_000, {}) for n in range(300)]
    await store.provision_many(subs)
    located = [await store.locate_msisdn(sub.msisdn) for sub, _, _ in subs]
    s = schedule(allowances=(), price_num=CENT)
    before = store.pipelines_sent
    opened = await asyncio.gather(*(store.charge(ccr(at, f"c{i}", INITIAL, 0, [mscc(s)]))
                                    for i, at in enumerate(located)))
    assert all(o.msccs[0].granted == Units(total=10_240) for o in opened)
    sent = store.pipelines_sent - before
    assert sent <= -(-300 // store.max_batch) + 1
    updated = await asyncio.gather(*(store.charge(ccr(at, f"c{i}", UPDATE, 1, [mscc(s, used=Units(total=1_024 * i))]))
                                     for i, at in enumerate(located)))
    assert [o.msccs[0].amount for o in updated] == [CENT * i for i in range(300)]
    for i, at in enumerate(located[:5]):
        assert await buckets(store, at.msisdn) == {"money": (1_000_000 - CENT * i, 100_000)}
    # awaited one by one, each call is its own pipeline
    before = store.pipelines_sent
    for i, at in enumerate(located[:3]):
        await store.charge(ccr(at, f"c{i}", TERMINATION, 2, []))
    assert store.pipelines_sent - before == 3


async def test_redis_errors_reach_only_their_caller(store):
    at = await subscriber(store, "491703000006", 1_000_000)
    good = ccr(at, "ok", INITIAL, 0, [mscc(schedule())])
    broken = ccr(at, "bad", INITIAL, 0, [mscc(schedule(increment=0))])  # rejected before any write
    before = store.pipelines_sent
    results = await asyncio.gather(store.charge(good), store.charge(broken), return_exceptions=True)
    assert store.pipelines_sent - before == 1
    assert results[0].result_code == 2001
    assert isinstance(results[1], ResponseError) and "schedule increment" in str(results[1])
    assert await store.redis.exists(k.ses_key(at.partition, "bad")) == 0


async def test_a_lost_function_library_is_loaded_again(store):
    at = await subscriber(store, "491703000007", 1_000_000)
    await store.redis.function_flush()
    outcomes = await asyncio.gather(*(store.charge(ccr(at, f"f{i}", INITIAL, 0, [mscc(schedule())]))
                                      for i in range(3)))
    assert [o.result_code for o in outcomes] == [2001] * 3
    await store.redis.function_flush()
    assert (await store.topup(at.msisdn, 5, "after-flush", NOW)).applied
    await store.redis.function_flush()
    await store.provision(Subscriber(msisdn="491703000008"), 1)


async def test_connection_errors_fail_every_call_of_the_batch():
    store = BalanceStore(aioredis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0)), 4)
    store._partitions = 4  # skip install: nothing listens there
    results = await asyncio.gather(*(store.charge(ccr(Location(0, "4917", "demo"), f"x{i}", INITIAL, 0, []))
                                     for i in range(3)), return_exceptions=True)
    # the caller sees a ConnectionError (charging answers 3004), caused by the Redis error
    assert all(isinstance(r, StoreUnavailable) and isinstance(r.__cause__, RedisConnectionError) for r in results)
    assert store.pipelines_sent == 1
    await store.redis.aclose()


# ---- one hash tag per call -------------------------------------------------------------------------------

class RecordingStore(BalanceStore):
    """Records the keys of every function call it sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_lists: list[tuple[str, tuple[str, ...]]] = []

    def _enqueue(self, function, keys, args, extra=()):
        if function:  # "" = a plain command (index GET) riding in the pipeline, outside the partitions
            self.key_lists.append((function, tuple(keys)))
        return super()._enqueue(function, keys, args, extra)


async def exercise(store: BalanceStore) -> None:
    """Every function: provision, charge I/U/T, events, top-up, close."""
    at = await subscriber(store, "491706000001", 1_000_000, {"data": 10})
    s = schedule()
    await store.charge(ccr(at, "t;1", INITIAL, 0, [mscc(s)], context={"apn": "a"}))
    await store.charge(ccr(at, "t;1", UPDATE, 1, [mscc(s, used=Units(total=100))]))
    await store.charge(ccr(at, "t;1", TERMINATION, 2, [mscc(s, used=Units(total=100), requested=False)]))
    await store.charge(ccr(at, "t;2", INITIAL, 0, [mscc(s)]))
    assert await store.close_session("t;2", "managementIntervention", NOW)
    await store.charge(ccr(at, "t;3", EVENT, 0, [mscc(s)], requested_action=DIRECT_DEBITING))
    assert (await store.topup(at.msisdn, 100, "tag-test", NOW)).applied
    await store.topup(at.msisdn, 100, None, NOW)


async def test_every_call_names_keys_of_one_partition(valkey_url):
    store = RecordingStore(aioredis.Redis.from_url(valkey_url), 4)
    await exercise(store)
    called = {function.split("_")[1] for function, _ in store.key_lists}
    assert called == {"charge", "event", "topup", "close"}  # provision is pipelined with its index keys
    provision = store._provision_commands(Subscriber(msisdn="4917", imsi="2620"), 3, 0, {}, False)
    [fcall] = [command for command in provision if command[0] == "FCALL"]
    store.key_lists.append((fcall[1], tuple(fcall[3:3 + fcall[2]])))
    for function, keys in store.key_lists:
        tags = {re.search(r"\{p\d{3}\}", key).group(0) for key in keys}
        assert len(tags) == 1, (function, keys)
    await store.close()
    await store.redis.aclose()


async def test_calls_run_on_a_cluster_node(tmp_path):
    """A Valkey in cluster mode rejects any call whose keys are not in one slot (CROSSSLOT)."""
    server = EmbeddedValkey(tmp_path / "cluster", config={
        "cluster-enabled": "yes", "cluster-config-file": str(tmp_path / "cluster" / "nodes.conf"),
        "appendfsync": "no"})
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url)
        await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            if b"cluster_state:ok" in await client.execute_command("CLUSTER", "INFO"):
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ResponseError, match="same slot"):
            await client.eval("return 1", 2, "{p001}x", "{p002}y")
        store = await BalanceStore.connect(server.url, partitions=8)
        await exercise(store)
        assert (await store.balances("491706000001"))[0].balance < 1_000_000
        await store.close()
        await client.aclose()
    finally:
        server.stop()
