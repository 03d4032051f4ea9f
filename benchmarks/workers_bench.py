"""`ocs serve --workers N` end to end: K gateway connections, CCR-I/U/T sessions, and the spread over workers.

SO_REUSEPORT hands each new *connection* to one worker (a hash of the 4-tuple); every request of that
connection then goes to the same worker. So the figure that matters beside the throughput is the spread:
connections per worker (from the peer registry in Redis: `peer:<origin-host>` → the worker's process id) and
requests per worker (each worker's /metrics, on metrics port + worker index). Everything runs on this machine,
the load generator included, against its own embedded Valkey (AOF fsync always, as shipped).

    .venv/bin/python benchmarks/workers_bench.py [--workers 1 2] [--connections 8] [--sessions 2000] \
        [--updates 10] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from balances.embedded import EmbeddedValkey  # noqa: E402
from benchmarks.e2e_ccr_u import cpu_seconds  # noqa: E402
from simulators.gy import (  # noqa: E402
    Recorder,
    SimulationSettings,
    close_client,
    open_client,
    percentile,
    run_session,
)


def metrics_text(port: int) -> str | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None


def ccr_answers(text: str) -> int:
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("ocs_diameter_requests_total{") and 'command="CCR"' in line)


def worker_pids(server: subprocess.Popen, workers: int) -> dict[int, int]:
    """pid → worker index (a single process is worker 0 itself)."""
    if workers == 1:
        return {server.pid: 0}
    found = {}
    for task in Path(f"/proc/{server.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"ocs.workers" in argv:
                found[int(child)] = int(argv[argv.index(b"--index") + 1])
    return found


async def drive(settings: SimulationSettings, registry: redis.Redis, pids: dict[int, int]) -> dict:
    """Open the connections, record which worker each reached, run the sessions, close."""
    clients = [await open_client(settings.host, settings.port, f"gw{n}.sim.test", settings.origin_realm)
               for n in range(settings.connections)]
    connections = [0] * len(pids)
    for client in clients:
        owner = None
        for _ in range(200):  # the worker claims the peer right after the CEA
            owner = registry.get(f"peer:{client.origin_host}")
            if owner is not None:
                break
            await asyncio.sleep(0.01)
        if owner is None:
            raise RuntimeError(f"{client.origin_host} not in the peer registry")
        connections[pids[int(owner.decode().split(":")[1])]] += 1
    recorder = Recorder()
    semaphore = asyncio.Semaphore(settings.concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            await run_session(clients[index % len(clients)], index, settings, recorder)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(settings.sessions)))
    seconds = time.perf_counter() - started
    for client in clients:
        await close_client(client)
    latencies = sorted(recorder.latencies)
    return {
        "connections_per_worker": connections,
        "requests": len(latencies),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(latencies) / seconds) if seconds else 0,
        "latency_ms": {name: round(percentile(latencies, q) * 1000, 3)
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "results": recorder.results,
        "errors": recorder.errors,
        "timeouts": recorder.timeouts,
    }


def run_one(workers: int, args: argparse.Namespace, tmp: Path, url: str, msisdns: list[str], valkey_pid: int
            ) -> dict:
    env = dict(os.environ, OCS_REDIS_URL=url, OCS_PORT=str(args.port), OCS_METRICS_PORT=str(args.metrics_port),
               OCS_DATA_DIR=str(tmp / f"w{workers}"))
    server = subprocess.Popen([sys.executable, "-m", "ocs", "serve", "--workers", str(workers),
                               "--log-level", "WARNING"], env=env, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not all(metrics_text(args.metrics_port + i) for i in range(workers)):  # /metrics is up last
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("ocs serve did not start")
            time.sleep(0.2)
        pids = worker_pids(server, workers)
        before = {pid: cpu_seconds(pid) for pid in [*pids, valkey_pid]}
        answered_before = [ccr_answers(metrics_text(args.metrics_port + i) or "") for i in range(workers)]
        client_before = time.process_time()
        settings = SimulationSettings(port=args.port, sessions=args.sessions, updates=args.updates,
                                      concurrency=args.concurrency, connections=args.connections,
                                      msisdns=msisdns, used_octets=50_000)
        registry = redis.Redis.from_url(url)
        report = asyncio.run(drive(settings, registry, pids))
        registry.close()
        client_cpu = time.process_time() - client_before
        by_index = {index: pid for pid, index in pids.items()}
        report["requests_per_worker"] = [
            ccr_answers(metrics_text(args.metrics_port + i) or "") - answered_before[i] for i in range(workers)]
        report["cpu_seconds_per_worker"] = [round(cpu_seconds(by_index[i]) - before[by_index[i]], 2)
                                            for i in range(workers)]
        report["cpu_seconds_valkey"] = round(cpu_seconds(valkey_pid) - before[valkey_pid], 2)
        report["cpu_seconds_simulator"] = round(client_cpu, 2)
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {"workers": workers, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--port", type=int, default=3897)
    parser.add_argument("--metrics-port", type=int, default=9564)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="ocs-workers-bench-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = EmbeddedValkey(tmp / "valkey")
        url = valkey.start()
        try:
            msisdns = [f"4916{n:09d}" for n in range(args.subscribers)]
            csv_path = tmp / "subs.csv"
            csv_path.write_text("msisdn,imsi,plan,money\n" + "".join(
                f"{m},26202{n:010d},demo,1000.00\n" for n, m in enumerate(msisdns)))
            subprocess.run([sys.executable, "-m", "ocs", "subscriber", "import", str(csv_path), "--json"],
                           env=dict(os.environ, OCS_REDIS_URL=url, OCS_DATA_DIR=str(tmp)), check=True,
                           stdout=subprocess.DEVNULL, cwd=ROOT)
            valkey_pid = int(subprocess.check_output(["pgrep", "-f", f"valkey-server.*:{valkey.port}"]).split()[0])
            for workers in args.workers:
                runs.append(run_one(workers, args, tmp, url, msisdns, valkey_pid))
        finally:
            valkey.stop()
    result = {
        "benchmark": "workers_bench",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "connections": args.connections,
        "sessions": args.sessions,
        "updates_per_session": args.updates,
        "concurrency": args.concurrency,
        "runs": runs,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
