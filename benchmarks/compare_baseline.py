"""The same scenario against `ocs serve` and against the python-diameter baseline, in one run: the ratio.

Both servers run as their own process on the same embedded Valkey (AOF, fsync always), with the CDR writer
on, one after the other, driven by the same simulator (simulators/load.py) with the same scenario
(benchmarks/scenarios/compare.toml unless --scenario says otherwise). The subscribers are provisioned once
with 100.00 of money each. Reported: each server's steady-phase requests/s and latency, the CPU seconds
of the server process, Valkey and the simulator, and ours ÷ baseline. What the baseline is, exactly, is
written at the top of benchmarks/pydiameter_baseline.py.

    .venv/bin/python benchmarks/compare_baseline.py [--scenario FILE] [--steady SECONDS] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import redis  # noqa: E402
import uvloop  # noqa: E402

from balances.embedded import EmbeddedValkey  # noqa: E402
from simulators.load import run_scenario  # noqa: E402
from simulators.scenario import Scenario, load_scenario  # noqa: E402

DEFAULT_SCENARIO = ROOT / "benchmarks" / "scenarios" / "compare.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def provision(scenario: Scenario, env: dict, tmp: Path) -> None:
    population = scenario.subscribers.population()
    csv_path = tmp / "subscribers.csv"
    csv_path.write_text("msisdn,imsi,plan,money\n" + "".join(
        f"{m},26201{n:010d},demo,100.00\n" for n, m in enumerate(population)))
    subprocess.run([sys.executable, "-m", "ocs", "subscriber", "import", str(csv_path), "--json"], env=env,
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def measure(name: str, command: list[str], env: dict, port: int, scenario: Scenario, valkey_pid: int) -> dict:
    server = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        wait_port(port, server)
        time.sleep(0.5)  # let its start-up work (library load, CDR writer lease) finish before measuring
        before = {"server": cpu_seconds(server.pid), "valkey": cpu_seconds(valkey_pid)}
        simulator_before = time.process_time()
        report, _ = uvloop.run(run_scenario(scenario.with_target(port=port)))
        cpu = {
            "server": round(cpu_seconds(server.pid) - before["server"], 2),
            "valkey": round(cpu_seconds(valkey_pid) - before["valkey"], 2),
            "simulator": round(time.process_time() - simulator_before, 2),
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    answered = report["requests"]["answered"]
    return {
        "server": name,
        "requests_per_second": report["requests_per_second"],
        "latency_ms": report["latency_ms"],
        "results": report["results"],
        "errors": report["errors"],
        "timeouts": report["timeouts"],
        "mismatches": report["mismatches"],
        "requests_answered": answered,
        "cpu_seconds": cpu,
        "server_cpu_us_per_request": round(cpu["server"] / answered * 1e6, 1) if answered else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    parser.add_argument("--steady", type=float, help="override the scenario's steady_seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    if args.steady:
        scenario = msgspec.structs.replace(
            scenario, phases=msgspec.structs.replace(scenario.phases, steady_seconds=args.steady))
    if scenario.traffic.retransmission_share or scenario.traffic.duplicate_share:
        sys.exit("the comparison needs a scenario without retransmissions (python-diameter answers those itself)")

    with tempfile.TemporaryDirectory(prefix="ocs-compare-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = EmbeddedValkey(tmp / "valkey")
        url = valkey.start()
        try:
            client = redis.Redis.from_url(url)
            valkey_pid = int(client.info("server")["process_id"])
            client.close()
            base_env = dict(os.environ, OCS_REDIS_URL=url, OCS_METRICS_PORT="0")
            provision(scenario, dict(base_env, OCS_DATA_DIR=str(tmp / "provision")), tmp)
            runs = []
            port = free_port()
            runs.append(measure("ocs serve", [sys.executable, "-m", "ocs", "serve", "--log-level", "WARNING"],
                                dict(base_env, OCS_PORT=str(port), OCS_DATA_DIR=str(tmp / "ours")), port,
                                scenario, valkey_pid))
            port = free_port()
            hosts = [scenario.gateways.origin_host.format(n=n + 1) for n in range(scenario.gateways.connections)]
            baseline = [sys.executable, str(ROOT / "benchmarks" / "pydiameter_baseline.py"), "--port", str(port),
                        "--peer-realm", scenario.gateways.origin_realm]
            for host in hosts:
                baseline += ["--peer", host]
            runs.append(measure("python-diameter baseline", baseline,
                                dict(base_env, OCS_PORT="0", OCS_DATA_DIR=str(tmp / "baseline")), port, scenario,
                                valkey_pid))
        finally:
            valkey.stop()
    ours, theirs = runs
    result = {
        "benchmark": "compare_baseline",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "scenario": scenario.name,
        "steady_seconds": scenario.phases.steady_seconds,
        "runs": runs,
        "ratio_requests_per_second": round(ours["requests_per_second"] / theirs["requests_per_second"], 2)
        if theirs["requests_per_second"] else None,
        "ratio_p50_latency": round(theirs["latency_ms"]["p50"] / ours["latency_ms"]["p50"], 2)
        if ours["latency_ms"]["p50"] else None,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
