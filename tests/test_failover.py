"""CC-Session-Failover with real processes: two `ocs serve` share one Valkey; a session starts on A, A is
killed (SIGKILL), the gateway continues the same session on B (a retransmitted duplicate with the T flag
first), and the balance and the CDR files are exact. Then `ocs session reauth` (another process) reaches the
gateway through B's queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from balances.model import Subscriber
from balances.store import BalanceStore
from ocs.config import load_config
from ocs.server import compiled_plans
from ratecards.pricing import amount_for_units
from tests.gateway import DATA_RG, RAR, Gateway, cdr_records, wait_for
from tests.test_crash_restart import ROOT, free_port, start_server

MSISDN = "491707770001"
MONEY = 20_000_000


async def test_session_continues_on_a_second_process_after_the_first_is_killed(valkey_url, tmp_path):
    ports = free_port(), free_port()
    base = dict(os.environ, OCS_REDIS_URL=valkey_url, OCS_METRICS_PORT="0", OCS_DATA_DIR=str(tmp_path),
                OCS_CDR__LEASE_MS="1000", OCS_CDR__ROTATE_SECONDS="0.5")
    envs = [dict(base, OCS_PORT=str(port)) for port in ports]
    store = await BalanceStore.connect(valkey_url)
    await store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=MONEY, allowances={})
    config = load_config(None, environ={k: v for k, v in envs[0].items() if k.startswith("OCS_")})
    data = compiled_plans(config)[0]["demo"][DATA_RG]
    sid = "pgw1.gw.test;failover;1"
    used = [1_000_001, 2_345_678, 777, 3_000_000]  # USU of requests 1..4 (4 = CCR-T)

    a, b = start_server(envs[0], ports[0]), start_server(envs[1], ports[1])
    try:
        gw = await Gateway.connect(ports[0], state_id=5)
        opened = await gw.ccr(sid, 1, 0, MSISDN)
        assert opened.get("Result-Code") == 2001 and opened.get("CC-Session-Failover") == 1
        assert (await gw.ccr(sid, 2, 1, used=used[0])).get("Result-Code") == 2001
        second = await gw.ccr(sid, 2, 2, used=used[1])
        assert second.get("Result-Code") == 2001
        a.send_signal(signal.SIGKILL)
        a.wait()
        gw.close()

        failover = await Gateway.connect(ports[1], state_id=5)  # the same gateway, not restarted
        # it did not see the answer to request 2: it sends it again, T flag set, to B
        again = await failover.resend(gw.sent[(sid, 2)])
        assert again.get("Result-Code") == 2001
        assert again.raw[16:] == second.raw[16:]
        assert (await failover.ccr(sid, 2, 3, used=used[2])).get("Result-Code") == 2001

        # an operator's reauth from a third process goes through B's queue to the gateway
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ocs", "session", "reauth", sid, "--json", env=envs[1], cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        rar = await failover.next_request(timeout=20)
        assert rar.command_code == RAR and rar.get("Destination-Host") == "pgw1.gw.test"
        failover.answer(rar, 2002)
        out, err = await asyncio.wait_for(cli.communicate(), 20)
        assert cli.returncode == 0, err.decode()
        [result] = json.loads(out)
        assert result["result_code"] == 2002

        assert (await failover.ccr(sid, 3, 4, used=used[3], request_units=False)).get("Result-Code") == 2001
        # B takes over A's CDR partitions once A's lease runs out, and drains them
        stream = f"cdr:{{p{store.partition_for(MSISDN):03d}}}"

        async def drained() -> bool:
            return await store.redis.xlen(stream) == 0

        assert await wait_for(drained, timeout=20, step=0.2)
        b.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(b.wait, 30) == 0
        failover.close()
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.kill()
                process.wait()

    charged = [amount_for_units(data, u) for u in used]
    money = {bucket.bucket: bucket for bucket in await store.balances(MSISDN)}["money"]
    assert (money.balance, money.reserved) == (MONEY - sum(charged), 0)
    await store.close()
    records = cdr_records(tmp_path / "cdr")
    ours = [r for r in records if r["sessionId"] == sid]
    usage = sorted((r for r in ours if r["recordType"] == "usage"), key=lambda r: r["ccRequestNumber"])
    assert [r["ccRequestNumber"] for r in usage] == [1, 2, 3, 4]
    assert [r["amount"] for r in usage] == charged
    assert [r["recordType"] for r in ours].count("close") == 1
    assert len({r["streamId"] for r in records}) == len(records)
