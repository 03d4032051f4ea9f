"""`ocs serve` on a Redis / Valkey Cluster: a local cluster of three primaries started from the embedded
binary (balances.embedded.EmbeddedValkeyCluster), subscribers in partitions spread over all three, CCR-I/U/T
over real TCP with exact balances, duplicates answered from the store, CDR files written by the writer (with
WAITAOF on each partition's primary: the nodes fsync every second), `ocs audit` and `ocs sessions` over every
primary, RAR routing through the peer registry, the function library on every primary (re-loaded on a node
that lost it), and a partition's slot moved to another primary while the server runs (MOVED).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from redis.crc import key_slot
from typer.testing import CliRunner

from balances import keys as k
from balances.connection import is_cluster_url, open_client, plain_url
from balances.embedded import EmbeddedValkeyCluster
from balances.model import Subscriber
from balances.store import BalanceStore
from ocs.cli import app as cli_app
from ocs.clock import FixedClock
from ocs.config import ConfigError, load_config
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from tests.gateway import RAR, Gateway, cdr_records, granted_octets, start_app, wait_for

NOW = 1_800_000_000_000
MONEY = 10_000_000
PARTITIONS = 16
MB = 1 << 20


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory):
    """Three primaries, no replicas; AOF fsynced every second, so the CDR writer needs WAITAOF per node."""
    cluster = EmbeddedValkeyCluster(tmp_path_factory.mktemp("cluster"), masters=3,
                                    config={"appendfsync": "everysec"})
    cluster.start()
    yield cluster
    cluster.stop()


def _nodes(cluster: EmbeddedValkeyCluster) -> list[redis.Redis]:
    return [redis.Redis(host="127.0.0.1", port=port) for port in cluster.ports]


@pytest.fixture
def cluster_url(valkey_cluster) -> str:
    """The cluster's URL, every primary flushed (data and functions) before each test."""
    for node in _nodes(valkey_cluster):
        node.flushall()
        node.function_flush()
        node.close()
    return valkey_cluster.url


def _node_of(valkey_cluster, key: str) -> int:
    """Index (in valkey_cluster.nodes) of the primary serving `key`, as the nodes themselves say."""
    slot = key_slot(key.encode())
    for index, node in enumerate(_nodes(valkey_cluster)):
        try:
            if slot in _own_slots(node):
                return index
        finally:
            node.close()
    raise AssertionError(f"no primary serves slot {slot}")


def _own_slots(node: redis.Redis) -> set[int]:
    myself = [line for line in node.execute_command("CLUSTER", "NODES").decode().splitlines() if "myself" in line][0]
    slots: set[int] = set()
    for part in myself.split()[8:]:
        if part.startswith("["):
            continue
        start, _, end = part.partition("-")
        slots.update(range(int(start), int(end or start) + 1))
    return slots


def test_cluster_urls_and_config():
    assert is_cluster_url("redis+cluster://10.0.0.1:7000") and not is_cluster_url("redis://10.0.0.1:7000")
    assert plain_url("rediss+cluster://u:p@h:1/0") == "rediss://u:p@h:1/0"
    assert load_config(environ={"OCS_REDIS_URL": "redis+cluster://10.0.0.1:7000"}).redis.url.startswith("redis+")
    assert load_config(environ={"OCS_REDIS_URL": "redis://10.0.0.1:7000", "OCS_REDIS__CLUSTER": "true"}).redis.cluster
    with pytest.raises(ConfigError, match="redis.cluster needs redis.url"):
        load_config(environ={"OCS_REDIS__CLUSTER": "true"})
    with pytest.raises(ConfigError, match="redis.url"):
        load_config(environ={"OCS_REDIS_URL": "http://10.0.0.1:7000"})


def spread_subscribers(valkey_cluster) -> dict[str, int]:
    """One subscriber per partition, msisdn -> partition; the partitions cover every primary."""
    subscribers = {f"4917090000{p:02d}": p for p in range(PARTITIONS)}
    owners = {_node_of(valkey_cluster, k.tag(p)) for p in range(PARTITIONS)}
    assert owners == {0, 1, 2}, owners
    return subscribers


async def test_functions_on_every_primary_and_reloaded_on_a_node_that_lost_them(valkey_cluster, cluster_url):
    store = await BalanceStore.connect(cluster_url, partitions=PARTITIONS)
    try:
        for node in _nodes(valkey_cluster):
            [library] = node.function_list()
            assert dict(zip(library[::2], library[1::2], strict=True))[b"library_name"] == store.library.name.encode()
            node.close()
        msisdn = "491709999001"
        await store.provision(Subscriber(msisdn=msisdn, plan="demo", partition=5), MONEY)
        owner = _nodes(valkey_cluster)[_node_of(valkey_cluster, k.tag(5))]
        owner.function_flush()  # as after a restart without persistence
        assert (await store.topup(msisdn, 1_000, "after-flush", NOW)).balance == MONEY + 1_000
        assert owner.function_list()
        owner.close()
    finally:
        await store.close()


async def test_serve_on_a_cluster_charges_exactly_across_every_primary(valkey_cluster, cluster_url, tmp_path):
    subscribers = spread_subscribers(valkey_cluster)
    app = await start_app(cluster_url, tmp_path, FixedClock(NOW), OCS_CDR__ROTATE_RECORDS="8")
    gateway = None
    try:
        store = app.store
        data = compiled_plans(app.config)[0]["demo"][100]
        for msisdn, partition in subscribers.items():
            await store.provision(Subscriber(msisdn=msisdn, plan="demo", partition=partition), MONEY, now_ms=NOW)
        gateway = await Gateway.connect(app.port)
        sessions = {msisdn: f"pgw1.gw.test;cluster;{msisdn}" for msisdn in subscribers}

        # every subscriber's CCR-I at once: one tick's calls go to three primaries
        answers = await asyncio.gather(*(gateway.ccr(sid, 1, 0, msisdn) for msisdn, sid in sessions.items()))
        assert all(a.get("Result-Code") == 2001 and granted_octets(a) for a in answers)
        listed = await store.open_sessions()
        assert sorted(s["session_id"] for s in listed) == sorted(sessions.values())
        answers = await asyncio.gather(*(gateway.ccr(sid, 2, 1, used=MB) for sid in sessions.values()))
        assert all(a.get("Result-Code") == 2001 for a in answers)

        # a retransmitted CCR-U is answered from the store and charges nothing more
        sid = sessions["491709000003"]
        again = await gateway.resend(gateway.sent[(sid, 1)])
        assert (again.get("Result-Code"), granted_octets(again)) == (2001, granted_octets(answers[3]))

        run = await asyncio.to_thread(CliRunner().invoke, cli_app, ["sessions", "--json"], env=_cli_env(
            cluster_url, tmp_path), catch_exceptions=False)
        assert run.exit_code == 0, run.output
        assert len(json.loads(run.stdout)) == PARTITIONS

        answers = await asyncio.gather(*(gateway.ccr(sid, 3, 2, used=2 * MB, request_units=False)
                                         for sid in sessions.values()))
        assert all(a.get("Result-Code") == 2001 for a in answers)
        for msisdn in subscribers:
            [money] = [b for b in await store.balances(msisdn) if b.bucket == "money"]
            assert (money.balance, money.reserved) == (MONEY - amount_for_units(data, MB)
                                                       - amount_for_units(data, 2 * MB), 0)
        assert await store.count_open_sessions() == 0

        async def drained() -> bool:
            return not any([await store.redis.xlen(k.cdr_key(p)) for p in range(PARTITIONS)])

        assert await wait_for(drained, timeout=20)
        assert app.cdr_writer.durability == "waitaof"
    finally:
        if gateway is not None:
            gateway.close()
        await app.stop()
    records = [r for r in cdr_records(tmp_path / "cdr") if r["recordType"] == "usage"]
    assert sorted(r["servedMSISDN"] for r in records) == sorted([*subscribers] * 2)
    assert {path.name for path in (tmp_path / "cdr").iterdir()} == {f"p{p:03d}" for p in range(PARTITIONS)}
    run = await asyncio.to_thread(CliRunner().invoke, cli_app, ["audit", "--json"], env=_cli_env(
        cluster_url, tmp_path), catch_exceptions=False)
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["ok"] and report["cdr_records"] == len(records)


def _cli_env(url: str, data_dir) -> dict[str, str]:
    return {"OCS_REDIS_URL": url, "OCS_DATA_DIR": str(data_dir), "OCS_METRICS_PORT": "0"}


async def test_rar_is_routed_through_the_peer_registry_on_a_cluster(valkey_cluster, cluster_url, tmp_path):
    """Process b holds the gateway's connection; a RAR asked on process a goes through b's queue. Process b
    is configured with a plain node URL and `redis.cluster = true`."""
    plain_node = f"redis://127.0.0.1:{valkey_cluster.ports[1]}"
    a = await start_app(cluster_url, tmp_path / "a", FixedClock(NOW))
    b = await start_app(plain_node, tmp_path / "b", FixedClock(NOW), OCS_REDIS__CLUSTER="true")
    gateway = await Gateway.connect(b.port)
    try:
        sid = "pgw1.gw.test;cluster-rar;1"
        await a.store.provision(Subscriber(msisdn="491709000100", plan="demo"), MONEY)
        assert (await gateway.ccr(sid, 1, 0, "491709000100")).get("Result-Code") == 2001

        async def answer_rar():
            request = await gateway.next_request()
            assert request.command_code == RAR
            gateway.answer(request, 2002)

        result, _ = await asyncio.gather(a.reauth(sid), answer_rar())
        assert (result.result_code, result.process) == (2002, b.router.process_id)
    finally:
        gateway.close()
        await b.stop()
        await a.stop()


async def test_a_partition_moved_to_another_primary_while_serving(valkey_cluster, cluster_url, tmp_path):
    """Resharding: the slot of one partition moves to another primary while the server's slot map still names
    the old one. Half-way (keys migrated, slot still MIGRATING) a read gets ASK and is re-sent with ASKING to
    the new primary; once the slot is reassigned the next CCR gets MOVED, the map is re-read, the call is
    re-sent to the new primary and the session goes on. The CDR writer follows the move too."""
    app = await start_app(cluster_url, tmp_path, FixedClock(NOW))
    gateway = await Gateway.connect(app.port)
    partition, msisdn, sid = 3, "491709000200", "pgw1.gw.test;cluster-move;1"
    slot = key_slot(k.tag(partition).encode())
    source = _node_of(valkey_cluster, k.tag(partition))
    target = (source + 1) % 3
    moved = False
    try:
        await app.store.provision(Subscriber(msisdn=msisdn, plan="demo", partition=partition), MONEY)
        assert (await gateway.ccr(sid, 1, 0, msisdn)).get("Result-Code") == 2001
        moved = True
        await asyncio.to_thread(_move_slot, valkey_cluster, slot, source, target, finish=False)
        assert (await app.store.session_owner(sid)).state == "open"  # ASK
        await asyncio.to_thread(_move_slot, valkey_cluster, slot, source, target)
        assert _node_of(valkey_cluster, k.tag(partition)) == target
        answer = await gateway.ccr(sid, 2, 1, used=MB)
        assert answer.get("Result-Code") == 2001 and granted_octets(answer)
        assert app.store._nodes.node_for_key(k.tag(partition)).port == valkey_cluster.ports[target]
        assert (await gateway.ccr(sid, 3, 2, used=MB, request_units=False)).get("Result-Code") == 2001
        data = compiled_plans(app.config)[0]["demo"][100]
        [money] = [b for b in await app.store.balances(msisdn) if b.bucket == "money"]
        assert (money.balance, money.reserved) == (MONEY - amount_for_units(data, 2 * MB), 0)

        async def drained() -> bool:
            return not await app.store.redis.xlen(k.cdr_key(partition))

        assert await wait_for(drained, timeout=20)
    finally:
        gateway.close()
        await app.stop()
        if moved:  # the next tests expect the slot layout of the fixture
            if _node_of(valkey_cluster, k.tag(partition)) == source:  # half-way: finish the move first
                await asyncio.to_thread(_assign_slot, valkey_cluster, slot, target)
            await asyncio.to_thread(_move_slot, valkey_cluster, slot, target, source)
    usage = [r for r in cdr_records(tmp_path / "cdr") if r["recordType"] == "usage"]
    assert [r["servedMSISDN"] for r in usage] == [msisdn, msisdn]


def _move_slot(valkey_cluster, slot: int, source_index: int, target_index: int, finish: bool = True) -> None:
    """What `valkey-cli --cluster reshard` does for one slot: IMPORTING/MIGRATING, MIGRATE the keys, then
    (`finish`) NODE on every primary."""
    nodes = _nodes(valkey_cluster)
    source, target = nodes[source_index], nodes[target_index]
    try:
        source_id = source.execute_command("CLUSTER", "MYID").decode()
        target_id = target.execute_command("CLUSTER", "MYID").decode()
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", valkey_cluster.ports[target_index], "", 0, 5000,
                                   "KEYS", *keys)
    finally:
        for node in nodes:
            node.close()
    if finish:
        _assign_slot(valkey_cluster, slot, target_index)


def _assign_slot(valkey_cluster, slot: int, owner_index: int) -> None:
    nodes = _nodes(valkey_cluster)
    try:
        owner_id = nodes[owner_index].execute_command("CLUSTER", "MYID").decode()
        for node in nodes:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)
    finally:
        for node in nodes:
            node.close()


async def test_open_client_makes_a_cluster_client_for_a_cluster_url(cluster_url):
    client = open_client(cluster_url)
    try:
        await client.set("plain-key", "1")
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()
