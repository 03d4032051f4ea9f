"""Chaos run (outside CI): mixed Gy traffic with random retransmissions against two `ocs serve` processes
sharing one Valkey, while OCS processes are killed (SIGKILL) and restarted and Valkey itself is killed -9 and
restarted on its AOF. At the end every bucket must be conserved exactly and the CDR files must match the
ledger: `ocs audit --json` decides.

    .venv/bin/python benchmarks/chaos.py --minutes 10            # the recorded run (BENCHMARKS.md)
    .venv/bin/python benchmarks/chaos.py --minutes 1 --sessions 30

The gateways behave like real ones (RFC 4006 §5.7 with CC-Session-Failover): a request that times out, gets
3004 or loses its connection is sent again with the T flag, to the other OCS process, until it is answered;
on top of that a share of answered requests is re-sent as duplicates, whose answers must match the first.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balances.embedded import EmbeddedValkey  # noqa: E402
from protocol.codec import Message, encode_message  # noqa: E402
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, open_client  # noqa: E402

FLAG_RETRANSMIT = 0x10
DATA_RG, SMS_RG = 100, 300


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OcsProcess:
    def __init__(self, env: dict, port: int, log: Path) -> None:
        self.env = dict(env, OCS_PORT=str(port))
        self.port = port
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "ocs", "serve", "--log-level", "WARNING"],
                                            env=self.env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.answers: dict[str, int] = {}
        self.retries = 0
        self.duplicates = 0
        self.duplicate_mismatches = 0
        self.gave_up = 0
        self.kills = {"ocs": 0, "valkey": 0}


class Gateway:
    """A gateway that fails over between the OCS processes and retransmits until it gets a final answer."""

    def __init__(self, name: str, ports: list[int], stats: Stats, rng: random.Random) -> None:
        self.name = name
        self.ports = ports
        self.stats = stats
        self.rng = rng
        self.clients: dict[int, object] = {}
        self.hop = rng.randrange(1 << 24) << 8
        self.e2e = rng.randrange(1 << 12) << 20

    async def _client(self, port: int):
        client = self.clients.get(port)
        if client is None or client.transport.is_closing():
            client = await asyncio.wait_for(open_client("127.0.0.1", port, self.name, "chaos.test",
                                                        origin_state_id=1), 5)
            self.clients[port] = client
        return client

    async def _send(self, raw: bytearray, port: int) -> Message:
        client = await self._client(port)
        self.hop = (self.hop + 1) & 0xFFFFFFFF
        raw[12:16] = self.hop.to_bytes(4, "big")
        future = asyncio.get_running_loop().create_future()
        client.pending[self.hop] = future
        client.transport.write(bytes(raw))
        return await asyncio.wait_for(future, 5)

    async def _duplicate(self, raw: bytearray, code: int) -> None:
        raw[4] |= FLAG_RETRANSMIT
        port = self.rng.choice(self.ports)
        try:
            again = await self._send(raw, port)
        except (TimeoutError, ConnectionError, OSError):
            self.clients.pop(port, None)
            return  # the duplicate was lost in the chaos; the original answer stands
        self.stats.duplicates += 1
        if again.get("Result-Code") not in (code, 3004):
            self.stats.duplicate_mismatches += 1

    async def request(self, avps: list, deadline: float) -> Message | None:
        """Send until a final answer (anything but 3004 / timeout / lost connection) or the deadline."""
        self.e2e = (self.e2e + 1) & 0xFFFFFFFF
        raw = bytearray(encode_message(CCR, 4, FLAG_REQUEST | FLAG_PROXIABLE, 0, self.e2e, avps))
        port = self.rng.choice(self.ports)
        self.stats.requests += 1
        while time.monotonic() < deadline:
            try:
                answer = await self._send(raw, port)
                code = answer.get("Result-Code")
                if code != 3004:
                    self.stats.answers[str(code)] = self.stats.answers.get(str(code), 0) + 1
                    if self.rng.random() < 0.05:  # a spurious retransmission: must get the same answer
                        await self._duplicate(raw, code)
                    return answer
            except (TimeoutError, ConnectionError, OSError):
                self.clients.pop(port, None)
            self.stats.retries += 1
            raw[4] |= FLAG_RETRANSMIT  # potentially retransmitted (RFC 6733 §3)
            port = self.ports[(self.ports.index(port) + 1) % len(self.ports)]
            await asyncio.sleep(0.2 + self.rng.random() * 0.3)
        self.stats.gave_up += 1
        return None


def ccr(gateway: Gateway, session_id: str, request_type: int, number: int, msisdn: str,
        used: int | None, request_units: bool, rating_group: int = DATA_RG) -> list:
    avps: list = [("Session-Id", session_id), ("Origin-Host", gateway.name), ("Origin-Realm", "chaos.test"),
                  ("Destination-Realm", "test"), ("Auth-Application-Id", 4),
                  ("Service-Context-Id", "32251@3gpp.org" if rating_group == DATA_RG else "32274@3gpp.org"),
                  ("CC-Request-Type", request_type), ("CC-Request-Number", number),
                  ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", msisdn)])]
    if request_type == 4:
        avps.append(("Requested-Action", 0))
    mscc: list = []
    if request_units:
        mscc.append(("Requested-Service-Unit",
                     [("CC-Service-Specific-Units", 1)] if rating_group == SMS_RG else []))
    if used is not None:
        mscc.append(("Used-Service-Unit", [("CC-Total-Octets", used)]))
    mscc.append(("Rating-Group", rating_group))
    avps.append(("Multiple-Services-Credit-Control", mscc))
    return avps


async def traffic(gateways: list[Gateway], msisdns: list[str], until: float, sessions: int,
                  rng: random.Random) -> None:
    counter = iter(range(1 << 30))

    async def one_session() -> None:
        while time.monotonic() < until:
            n = next(counter)
            gateway = gateways[n % len(gateways)]
            msisdn = rng.choice(msisdns)
            session_id = f"{gateway.name};chaos;{n}"
            deadline = until + 120  # in-flight sessions are finished after the chaos stops
            if rng.random() < 0.15:
                await gateway.request(ccr(gateway, session_id, 4, 0, msisdn, None, True, SMS_RG), deadline)
                continue
            answer = await gateway.request(ccr(gateway, session_id, 1, 0, msisdn, None, True), deadline)
            if answer is None or answer.get("Result-Code") != 2001:
                continue
            updates = rng.randint(1, 8)
            for number in range(1, updates + 1):
                await asyncio.sleep(rng.random() * 0.5)
                if time.monotonic() > until:
                    break
                await gateway.request(ccr(gateway, session_id, 2, number, msisdn, rng.randint(0, 3_000_000), True),
                                      deadline)
            await gateway.request(ccr(gateway, session_id, 3, updates + 1, msisdn, rng.randint(0, 500_000),
                                      False), deadline)

    await asyncio.gather(*(one_session() for _ in range(sessions)))


async def chaos(ocs: list[OcsProcess], valkey_factory, until: float, stats: Stats, rng: random.Random) -> None:
    valkey = valkey_factory.current
    while time.monotonic() < until - 20:
        await asyncio.sleep(rng.uniform(20, 40))
        if rng.random() < 0.65:
            victim = rng.choice(ocs)
            victim.kill()
            stats.kills["ocs"] += 1
            await asyncio.sleep(rng.uniform(1, 4))
            victim.start()
        else:
            valkey.kill()
            stats.kills["valkey"] += 1
            await asyncio.sleep(rng.uniform(1, 3))
            valkey = valkey_factory.restart()


class ValkeyFactory:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.current = EmbeddedValkey(directory, port=port)

    def start(self) -> str:
        return self.current.start()

    def restart(self) -> EmbeddedValkey:
        self.current = EmbeddedValkey(self.directory, port=self.port)
        self.current.start(timeout=60)
        return self.current


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    rng = random.Random(args.seed)
    valkey = ValkeyFactory(tmp / "valkey", free_port())
    url = valkey.start()
    env = dict(os.environ, OCS_REDIS_URL=url, OCS_METRICS_PORT="0", OCS_DATA_DIR=str(tmp),
               OCS_CDR__LEASE_MS="2000", OCS_REDIS__CALL_TIMEOUT_MS="1000")
    msisdns = [f"4916{n:09d}" for n in range(args.subscribers)]
    (tmp / "subs.csv").write_text("msisdn,imsi,plan,money\n" + "".join(
        f"{m},26202{n:010d},demo,50.00\n" for n, m in enumerate(msisdns)))
    subprocess.run([sys.executable, "-m", "ocs", "subscriber", "import", str(tmp / "subs.csv"), "--json"], env=env,
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    ocs = [OcsProcess(env, free_port(), tmp / f"ocs{n}.log") for n in range(2)]
    for process in ocs:
        process.start()
    await asyncio.sleep(3)
    stats = Stats()
    gateways = [Gateway(f"pgw{n}.chaos.test", [p.port for p in ocs], stats, rng) for n in range(3)]
    started = time.monotonic()
    until = started + args.minutes * 60
    await asyncio.gather(traffic(gateways, msisdns, until, args.sessions, rng),
                         chaos(ocs, valkey, until, stats, rng))
    for gateway in gateways:
        for client in gateway.clients.values():
            client.transport.close()
    await asyncio.sleep(args.settle)  # let the CDR writers drain the streams
    for process in ocs:
        process.stop()
    audit = subprocess.run([sys.executable, "-m", "ocs", "audit", "--json"], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    valkey.current.stop()
    try:
        audit_report = json.loads(audit.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        audit_report = {"error": (audit.stdout + audit.stderr)[-2000:]}
    return {
        "benchmark": "chaos",
        "minutes": args.minutes,
        "seconds": round(time.monotonic() - started, 1),
        "seed": args.seed,
        "requests": stats.requests,
        "answers": stats.answers,
        "retransmissions_after_failure": stats.retries,
        "spurious_duplicates": stats.duplicates,
        "duplicate_mismatches": stats.duplicate_mismatches,
        "requests_given_up": stats.gave_up,
        "kills": stats.kills,
        "audit_exit_code": audit.returncode,
        "audit": audit_report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--sessions", type=int, default=60, help="sessions in flight")
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=8, help="seconds for the CDR writers to drain at the end")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ocs-chaos-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result))
    ok = result["audit_exit_code"] == 0 and not result["duplicate_mismatches"] and not result["requests_given_up"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
