"""Kill -9 the OCS mid-session, start it again, finish the session: debits equal rated usage to the micro-unit
and the CDR files hold exactly one record per commit plus the closing record.

Runs `ocs serve` as a real process against the test Valkey; the client is our simulator's Gy client.
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
from pathlib import Path

from balances.model import Subscriber
from balances.store import BalanceStore
from ocs.config import load_config
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from simulators.gy import (
    CCR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    SimulationSettings,
    ccr_avps,
    open_client,
)

ROOT = Path(__file__).resolve().parents[1]
MSISDN = "491708880001"
MONEY = 20_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "ocs", "serve", "--log-level", "WARNING"], env=env,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode()) from None
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("ocs serve did not start")


async def test_kill_mid_session_then_continue(valkey_url, tmp_path):
    port = free_port()
    env = dict(os.environ, OCS_REDIS_URL=valkey_url, OCS_PORT=str(port), OCS_METRICS_PORT="0",
               OCS_DATA_DIR=str(tmp_path), OCS_CDR__LEASE_MS="1000", OCS_CDR__ROTATE_SECONDS="0.5")
    store = await BalanceStore.connect(valkey_url)
    await store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
    config = load_config(None, environ={k: v for k, v in env.items() if k.startswith("OCS_")})
    data = compiled_plans(config)[0]["demo"][100]
    settings = SimulationSettings(port=port, msisdns=[MSISDN], rating_group=100)
    session_id = "gw-crash.test;1;1"
    used = [1_000_001, 2_345_678, 777, 3_000_000, 12_345]  # USU of requests 1..5 (5 = CCR-T)

    async def send(client, request_type: int, number: int, usage: int | None):
        avps = ccr_avps(session_id, client, request_type, number, MSISDN, settings, usage, request_type != 3)
        return await asyncio.wait_for(client.request(CCR, 4, avps, FLAG_REQUEST | FLAG_PROXIABLE), 10)

    server = start_server(env, port)
    try:
        client = await open_client("127.0.0.1", port, "gw-crash.test", "sim.test", origin_state_id=1)
        assert (await send(client, 1, 0, None)).get("Result-Code") == 2001
        for number in (1, 2):
            assert (await send(client, 2, number, used[number - 1])).get("Result-Code") == 2001
        server.send_signal(signal.SIGKILL)
        server.wait()
        client.transport.close()

        server = start_server(env, port)  # a fresh process: session state lives in Redis
        client = await open_client("127.0.0.1", port, "gw-crash.test", "sim.test", origin_state_id=1)
        # the gateway retransmits the last request it may not have seen answered: no second debit
        assert (await send(client, 2, 2, used[1])).get("Result-Code") == 2001
        for number in (3, 4):
            assert (await send(client, 2, number, used[number - 1])).get("Result-Code") == 2001
        assert (await send(client, 3, 5, used[4])).get("Result-Code") == 2001
        # the new process takes the dead writer's partitions over once its lease expires, then drains
        stream = f"cdr:{{p{store.partition_for(MSISDN):03d}}}"
        deadline = time.time() + 20
        while await store.redis.xlen(stream) and time.time() < deadline:
            await asyncio.sleep(0.2)
        assert await store.redis.xlen(stream) == 0
        # graceful stop with the gateway still connected: DPR (REBOOTING), then the process exits 0
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(client.closed, 10)
        assert client.disconnect_causes == [0]
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # graceful: flushes the CDR files
            server.wait(timeout=30)

    expected = sum(amount_for_units(data, u) for u in used)
    money = {b.bucket: b for b in await store.balances(MSISDN)}["money"]
    assert money.balance == MONEY - expected
    assert money.reserved == 0
    await store.close()

    records = []
    for path in sorted((tmp_path / "cdr").rglob("*.jsonl*")):
        records.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    ours = [r for r in records if r.get("sessionId") == session_id]
    usage = sorted((r for r in ours if r["recordType"] == "usage"), key=lambda r: r["ccRequestNumber"])
    assert [r["ccRequestNumber"] for r in usage] == [1, 2, 3, 4, 5]
    assert [r["amount"] for r in usage] == [amount_for_units(data, u) for u in used]
    assert [r["usage"]["octetsTotal"] for r in usage] == used
    assert [r["recordType"] for r in ours].count("close") == 1
    assert len({r["streamId"] for r in records}) == len(records)
