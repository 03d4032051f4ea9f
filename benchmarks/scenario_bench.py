"""One scenario against `ocs serve` in its own process, on a fresh embedded Valkey: the report and the CPU split.

The scenario's subscribers are provisioned first (100.00 of money each, plan demo), the server runs with the
CDR writer on and AOF fsync always, the simulator (simulators/load.py) runs in this process. Afterwards
`ocs audit --json` is run against the same Valkey and data directory when the command exists, so the
charges of the run are checked, not only the answers.

    .venv/bin/python benchmarks/scenario_bench.py --scenario steady-data [--rate SESSIONS_PER_S] [--steady SECONDS]
        [--plot FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from benchmarks.compare_baseline import cpu_seconds, free_port, provision, wait_port  # noqa: E402
from simulators.load import run_scenario  # noqa: E402
from simulators.report import plot_latency  # noqa: E402
from simulators.scenario import load_scenario  # noqa: E402


def audit(env: dict) -> dict:
    """`ocs audit --json` if this OCS has it; its verdict, or why there is none."""
    done = subprocess.run([sys.executable, "-m", "ocs", "audit", "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode == 2 and "No such command" in done.stderr:
        return {"available": False}
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        verdict = {"output": (done.stdout + done.stderr)[-2000:]}
    return {"available": True, "exit_code": done.returncode, "report": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="steady-data")
    parser.add_argument("--steady", type=float, help="override the scenario's steady_seconds")
    parser.add_argument("--rate", type=float, help="override the scenario's sessions_per_second (open loop)")
    parser.add_argument("--plot", type=Path, help="write the latency plot (PNG) here")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    if args.steady:
        scenario = msgspec.structs.replace(
            scenario, phases=msgspec.structs.replace(scenario.phases, steady_seconds=args.steady))
    if args.rate:
        scenario = msgspec.structs.replace(
            scenario, traffic=msgspec.structs.replace(scenario.traffic, sessions_per_second=args.rate))
    with tempfile.TemporaryDirectory(prefix="ocs-scenario-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = EmbeddedValkey(tmp / "valkey")
        url = valkey.start()
        try:
            client = redis.Redis.from_url(url)
            valkey_pid = int(client.info("server")["process_id"])
            client.close()
            port = free_port()
            env = dict(os.environ, OCS_REDIS_URL=url, OCS_METRICS_PORT="0", OCS_DATA_DIR=str(tmp / "data"),
                       OCS_PORT=str(port))
            provision(scenario, env, tmp)
            server = subprocess.Popen([sys.executable, "-m", "ocs", "serve", "--log-level", "WARNING"], env=env,
                                      cwd=ROOT)
            try:
                wait_port(port, server)
                time.sleep(0.5)
                before = {"ocs": cpu_seconds(server.pid), "valkey": cpu_seconds(valkey_pid)}
                simulator_before = time.process_time()
                report, run = uvloop.run(run_scenario(scenario.with_target(port=port)))
                cpu = {"ocs": round(cpu_seconds(server.pid) - before["ocs"], 2),
                       "valkey": round(cpu_seconds(valkey_pid) - before["valkey"], 2),
                       "simulator": round(time.process_time() - simulator_before, 2)}
            finally:
                server.terminate()
                server.wait(timeout=60)
            audit_result = audit(env)
        finally:
            valkey.stop()
    if args.plot:
        report["plot"] = str(plot_latency(run.series, report, args.plot, run.phases["steady"].histogram))
    report["cpu_seconds"] = cpu
    answered = report["requests"]["answered"]
    report["ocs_cpu_us_per_request"] = round(cpu["ocs"] / answered * 1e6, 1) if answered else None
    report["audit"] = audit_result
    report["machine"] = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
