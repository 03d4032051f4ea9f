"""End-to-end CCR-U throughput: simulator → `ocs serve` (its own process) → Valkey (its own process).

Everything runs on this machine (the load generator included), with AOF fsync always as shipped. Sessions are
long (many CCR-U each) so updates dominate; the figure reported is answered CCR-U per second, measured by the
client over the steady phase (all requests after CER and before DPR).

    .venv/bin/python benchmarks/e2e_ccr_u.py [--sessions 2000] [--updates 20] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balances.embedded import EmbeddedValkey  # noqa: E402
from simulators.gy import SimulationSettings, run_simulation  # noqa: E402


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port}")


def child_pid(pid: int, timeout: float = 10.0) -> int:
    """The (first) child process of `pid`, from /proc; waits for it to appear."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} has no child")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--port", type=int, default=3899)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the server under py-spy and write a flame-graph-ready profile (raw format)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ocs-bench-") as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "valkey")
        url = valkey.start()
        env = dict(os.environ, OCS_REDIS_URL=url, OCS_PORT=str(args.port), OCS_METRICS_PORT="0",
                   OCS_DATA_DIR=tmp)
        msisdns = [f"4915{n:09d}" for n in range(args.subscribers)]
        csv_path = Path(tmp) / "subs.csv"
        csv_path.write_text("msisdn,imsi,plan,money\n" + "".join(
            f"{m},26201{n:010d},demo,100.00\n" for n, m in enumerate(msisdns)))
        ocs = [sys.executable, "-m", "ocs"]
        subprocess.run([*ocs, "subscriber", "import", str(csv_path), "--json"], env=env, check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT)
        command = [*ocs, "serve", "--log-level", "WARNING"]
        if args.profile:
            command = ["py-spy", "record", "--format", "raw", "--rate", "500", "-o", args.profile, "--", *command]
        server = subprocess.Popen(command, env=env, cwd=ROOT)
        try:
            wait_port(args.port)
            valkey_pid = int(subprocess.check_output(["pgrep", "-f", f"valkey-server.*:{valkey.port}"]).split()[0])
            # under py-spy the server is py-spy's child; never look it up by name (other runs may exist)
            ocs_pid = server.pid if not args.profile else child_pid(server.pid)
            cpu_before = {"ocs": cpu_seconds(ocs_pid), "valkey": cpu_seconds(valkey_pid)}
            client_before = time.process_time()
            settings = SimulationSettings(port=args.port, sessions=args.sessions, updates=args.updates,
                                          concurrency=args.concurrency, connections=args.connections,
                                          msisdns=msisdns, used_octets=50_000)
            report = asyncio.run(run_simulation(settings))
            cpu = {
                "ocs": cpu_seconds(ocs_pid) - cpu_before["ocs"],
                "valkey": cpu_seconds(valkey_pid) - cpu_before["valkey"],
                "simulator": time.process_time() - client_before,
            }
        finally:
            if args.profile:
                with contextlib.suppress(RuntimeError, ProcessLookupError):
                    os.kill(child_pid(server.pid), signal.SIGINT)  # py-spy writes its file when it exits
            else:
                server.terminate()
            server.wait(timeout=60)
            valkey.stop()
    updates = args.sessions * args.updates
    result = {
        "benchmark": "e2e_ccr_u",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "sessions": args.sessions,
        "updates_per_session": args.updates,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "requests": report["requests"],
        "seconds": round(report["seconds"], 3),
        "requests_per_second": round(report["requests_per_second"]),
        "ccr_u_per_second": round(updates / report["seconds"]) if report["seconds"] else 0,
        "latency_ms": {k: round(v, 3) for k, v in report["latency_ms"].items()},
        "results": report["results"],
        "errors": report["errors"],
        "timeouts": report["timeouts"],
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
