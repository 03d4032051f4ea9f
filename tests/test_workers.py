"""`ocs serve --workers 2` as a real process tree: two workers share the Diameter port (SO_REUSEPORT) and the
test Valkey. A session continues across connections that landed on different workers, a duplicate reaching
the other worker gets the stored answer (no second debit), `ocs session reauth` reaches the gateway whichever
worker holds it, SIGTERM stops everything (DPR, no process left), a worker killed with SIGKILL is restarted,
and without a Redis URL the supervisor starts one embedded Valkey for all workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from balances.model import Subscriber
from balances.store import BalanceStore
from ocs.config import load_config
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from simulators.gy import CER, GyClientProtocol
from tests.gateway import DATA_RG, RAR, Gateway, cdr_records, wait_for
from tests.test_crash_restart import ROOT, free_port

MSISDN = "491707770101"
MONEY = 20_000_000
MAX_CONNECTIONS = 40  # connections opened until both workers have one (each lands on either: 2^-39 to fail)


def free_port_pair() -> int:
    """A free port whose successor is free too (worker 0's and worker 1's /metrics)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def start_pool(env: dict, log: Path, *options: str) -> subprocess.Popen:
    """`ocs serve --workers 2`, returned once every worker listens (its log in `log`)."""
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "ocs", "serve", "--workers", "2", *options], env=env,
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink)
    deadline = time.time() + 60
    while time.time() < deadline:
        if "workers serving Diameter" in log.read_text():
            return process
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("ocs serve --workers 2 did not start:\n" + log.read_text())


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def worker_pids(supervisor: int) -> set[int]:
    return {pid for pid in children(supervisor) if "ocs.workers" in cmdline(pid)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def stop_pool(process: subprocess.Popen) -> None:
    """SIGTERM, then: exit code 0, every worker gone."""
    workers = worker_pids(process.pid)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 60) == 0
    assert not [pid for pid in workers if alive(pid)]


async def connect(port: int, origin_host: str) -> tuple[Gateway, int]:
    """A gateway connection and the Origin-State-Id of the CEA it got."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: GyClientProtocol(origin_host, "gw.test"), "127.0.0.1", port)
    cea = await asyncio.wait_for(client.request(CER, 0, [
        ("Origin-Host", origin_host), ("Origin-Realm", "gw.test"), ("Host-IP-Address", "127.0.0.1"),
        ("Vendor-Id", 0), ("Product-Name", "test-gateway"), ("Origin-State-Id", 7),
        ("Auth-Application-Id", 4)]), 10)
    assert cea.get("Result-Code") == 2001
    return Gateway(client), cea.get("Origin-State-Id")


async def connect_until_both(port: int, store: BalanceStore, pids: set[int]) -> dict[int, list[Gateway]]:
    """Gateway connections (each its own Origin-Host) until both workers hold one: worker pid → gateways,
    read from the peer registry (`peer:<host>` → host:pid:random of the worker that claimed it). Every worker
    advertises the same Origin-State-Id (the server as a whole did not restart)."""
    by_worker: dict[int, list[Gateway]] = {pid: [] for pid in pids}
    state_ids = set()
    for n in range(MAX_CONNECTIONS):
        gateway, state_id = await connect(port, f"pgw{n}.gw.test")
        state_ids.add(state_id)

        async def claimed(host: str = gateway.origin_host) -> str | None:
            return await store.peer_owner(host)

        owner = await wait_for(claimed, timeout=10)
        assert owner is not None, f"{gateway.origin_host} is not in the peer registry"
        by_worker[int(owner.split(":")[1])].append(gateway)
        if all(by_worker.values()):
            assert len(state_ids) == 1 and None not in state_ids
            return by_worker
    raise AssertionError(f"{MAX_CONNECTIONS} connections all went to one worker: {by_worker}")


def metrics_ccr_answers(port: int) -> int:
    """CCR answers counted by the worker whose /metrics listens on `port`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("ocs_diameter_requests_total{") and 'command="CCR"' in line)


async def reauth(env: dict, session_id: str) -> subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ocs", "session", "reauth", session_id, "--json", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_sessions_duplicates_and_reauth_work_across_two_workers(valkey_url, tmp_path):
    port, metrics_port = free_port(), free_port_pair()
    env = dict(os.environ, OCS_REDIS_URL=valkey_url, OCS_PORT=str(port), OCS_METRICS_PORT=str(metrics_port),
               OCS_DATA_DIR=str(tmp_path), OCS_CDR__LEASE_MS="1000", OCS_CDR__ROTATE_SECONDS="0.5")
    store = await BalanceStore.connect(valkey_url)
    await store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
    config = load_config(None, environ={k: v for k, v in env.items() if k.startswith("OCS_")})
    data = compiled_plans(config)[0]["demo"][DATA_RG]
    sid, other_sid = "pgw.gw.test;workers;1", "pgw.gw.test;workers;2"
    used = [1_000_001, 2_345_678, 777, 3_000_000]  # USU of requests 1..4 (4 = CCR-T)

    pool = start_pool(env, tmp_path / "ocs.log")
    try:
        pids = worker_pids(pool.pid)
        assert len(pids) == 2
        by_worker = await connect_until_both(port, store, pids)
        first_pid, second_pid = sorted(pids)
        a, b = by_worker[first_pid][0], by_worker[second_pid][0]
        sent = {first_pid: 0, second_pid: 0}  # CCRs answered by each worker

        assert (await a.ccr(sid, 1, 0, MSISDN)).get("Result-Code") == 2001
        assert (await a.ccr(sid, 2, 1, used=used[0])).get("Result-Code") == 2001
        sent[first_pid] += 2
        # the session continues on a connection the other worker accepted
        second = await b.ccr(sid, 2, 2, used=used[1])
        assert second.get("Result-Code") == 2001
        # the same request again (T flag) reaching the first worker: the stored answer, no second debit
        again = await a.resend(b.sent[(sid, 2)])
        assert again.get("Result-Code") == 2001 and again.raw[16:] == second.raw[16:]
        assert (await b.ccr(sid, 2, 3, used=used[2])).get("Result-Code") == 2001
        sent[second_pid] += 2
        sent[first_pid] += 1

        # `ocs session reauth` (another process, no connection) reaches the gateway on either worker
        assert (await a.ccr(other_sid, 1, 0, MSISDN)).get("Result-Code") == 2001
        sent[first_pid] += 1
        for session_id, gateway in ((sid, b), (other_sid, a)):
            cli = await reauth(env, session_id)
            rar = await gateway.next_request(timeout=20)
            assert rar.command_code == RAR and rar.session_id == session_id
            gateway.answer(rar, 2001)
            out, err = await asyncio.wait_for(cli.communicate(), 30)
            assert cli.returncode == 0, err.decode()
            [result] = json.loads(out)
            assert result["result_code"] == 2001 and result["peer"] == gateway.origin_host
            assert result["process"].split(":")[1] == str(second_pid if gateway is b else first_pid)

        assert (await a.ccr(sid, 3, 4, used=used[3], request_units=False)).get("Result-Code") == 2001
        assert (await b.ccr(other_sid, 3, 1, used=0, request_units=False)).get("Result-Code") == 2001
        sent[first_pid] += 1
        sent[second_pid] += 1

        # each worker has its own /metrics: metrics.port + worker index, counting what it answered
        counts = sorted([metrics_ccr_answers(metrics_port), metrics_ccr_answers(metrics_port + 1)])
        assert counts == sorted(sent.values())

        gateways = [gateway for group in by_worker.values() for gateway in group]
        await stop_pool(pool)
        assert all(gateway.client.disconnect_causes == [0] for gateway in gateways)  # DPR REBOOTING from both
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()

    charged = [amount_for_units(data, u) for u in used]
    money = {bucket.bucket: bucket for bucket in await store.balances(MSISDN)}["money"]
    assert (money.balance, money.reserved) == (MONEY - sum(charged), 0)
    await store.close()
    records = [r for r in cdr_records(tmp_path / "cdr") if r["sessionId"] == sid]
    usage = sorted((r for r in records if r["recordType"] == "usage"), key=lambda r: r["ccRequestNumber"])
    assert [r["ccRequestNumber"] for r in usage] == [1, 2, 3, 4]
    assert [r["amount"] for r in usage] == charged


async def test_a_killed_worker_is_restarted(valkey_url, tmp_path):
    port = free_port()
    env = dict(os.environ, OCS_REDIS_URL=valkey_url, OCS_PORT=str(port), OCS_METRICS_PORT="0",
               OCS_DATA_DIR=str(tmp_path), OCS_CDR__LEASE_MS="1000")
    store = await BalanceStore.connect(valkey_url)
    await store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
    log = tmp_path / "ocs.log"
    pool = start_pool(env, log)
    try:
        before = worker_pids(pool.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            now = worker_pids(pool.pid)
            return len(now) == 2 and victim not in now and log.read_text().count(" ready (pid") == 3

        assert await wait_for(replaced, timeout=30, step=0.1)
        assert "exited (killed by SIGKILL)" in log.read_text()
        after = worker_pids(pool.pid)
        # the new worker serves: connections reach both the survivor and it
        by_worker = await connect_until_both(port, store, after)
        newcomer = by_worker[(after - before).pop()][0]
        answer = await newcomer.ccr("pgw.gw.test;restarted;1", 1, 0, MSISDN)
        assert answer.get("Result-Code") == 2001
        await stop_pool(pool)
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
        await store.close()


async def test_embedded_valkey_is_started_once_for_all_workers(tmp_path):
    port, valkey_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCS_")}
    env.update(OCS_PORT=str(port), OCS_METRICS_PORT="0", OCS_DATA_DIR=str(tmp_path),
               OCS_REDIS__EMBEDDED_PORT=str(valkey_port))
    pool = start_pool(env, tmp_path / "ocs.log", "--demo")
    try:
        url = (tmp_path / "valkey" / "url").read_text()
        assert url == f"redis://127.0.0.1:{valkey_port}"
        workers = worker_pids(pool.pid)
        valkeys = [pid for pid in children(pool.pid) if "valkey-server" in cmdline(pid)]
        assert len(workers) == 2 and len(valkeys) == 1
        assert not [pid for worker in workers for pid in children(worker)]  # no worker started its own
        store = await BalanceStore.connect(url)
        by_worker = await connect_until_both(port, store, workers)
        for number, (gateway, *_) in enumerate(by_worker.values()):  # demo subscriber, charged by each worker
            answer = await gateway.ccr(f"pgw.gw.test;embedded;{number}", 1, 0, "491700000001")
            assert answer.get("Result-Code") == 2001
        await store.close()
        await stop_pool(pool)
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
    assert not alive(valkeys[0])
    assert not (tmp_path / "valkey" / "url").exists()
    client = redis.Redis(port=valkey_port, socket_connect_timeout=1)
    try:
        client.ping()
        raise AssertionError("the embedded Valkey still answers")
    except redis.ConnectionError:
        pass
    finally:
        client.close()


def test_a_port_in_use_fails_the_start_and_leaves_nothing(valkey_url, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, OCS_REDIS_URL=valkey_url, OCS_PORT=str(port), OCS_METRICS_PORT="0",
                   OCS_DATA_DIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "ocs", "serve", "--workers", "2"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "worker 0 started" not in done.stderr
