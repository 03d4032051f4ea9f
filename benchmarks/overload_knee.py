"""The overload knee: `ocs serve --demo` (own process, CDR writer on, AOF fsync always) under an open-loop load
stepped past its capacity (simulators/scenarios/overload-knee.toml), with the overload settings given here.

Per step: offered sessions/s and the nominal CCR/s they make, CCRs sent/s, answered/s, 2001/s, the share of
3004 TOO_BUSY, timeouts, and latency p50/p99/max of the answers to the requests sent in that step. The server
should answer 3004 at once past its capacity (overload.new_sessions_max_in_flight for CCR-I/CCR-E,
overload.max_in_flight for all, redis.call_timeout_ms for a slow Valkey) so that latency stays bounded and
answered/s stays near capacity instead of collapsing into timeouts.

    .venv/bin/python benchmarks/overload_knee.py [--new-sessions-max-in-flight 200] [--max-in-flight 400]
        [--call-timeout-ms 1000] [--steps 100,200,...] [--step-seconds 8] [--plot knee.png] [--json]
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


def markdown(steps: list[dict]) -> str:
    lines = ["| sessions/s | nominal CCR/s | sent/s | answered/s | 2001/s | 3004 share | timeouts | p50 ms | p99 ms "
             "| max ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in steps:
        lat = row["latency_ms"]
        lines.append(f"| {row['sessions_per_second']:,g} | {row['nominal_requests_per_second']:,.0f} | "
                     f"{row['sent_per_second']:,.0f} | {row['answered_per_second']:,.0f} | "
                     f"{row['success_per_second']:,.0f} | {row['too_busy_share'] * 100:.1f} % | {row['timeouts']:,} | "
                     f"{lat['p50']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="overload-knee")
    parser.add_argument("--new-sessions-max-in-flight", type=int, default=200)
    parser.add_argument("--max-in-flight", type=int, default=400)
    parser.add_argument("--call-timeout-ms", type=int, default=1000)
    parser.add_argument("--steps", help="sessions/s per step, comma-separated (default: the scenario's)")
    parser.add_argument("--step-seconds", type=float)
    parser.add_argument("--plot", type=Path, help="write the latency plot (PNG) here")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    phases = scenario.phases
    if args.steps:
        steps = [float(x) for x in args.steps.split(",")]
        phases = msgspec.structs.replace(phases, steps=steps)
        scenario = msgspec.structs.replace(scenario, traffic=msgspec.structs.replace(
            scenario.traffic, sessions_per_second=max(steps)))
    if args.step_seconds:
        phases = msgspec.structs.replace(phases, step_seconds=args.step_seconds)
    scenario = msgspec.structs.replace(scenario, phases=phases)
    if not scenario.phases.steps or scenario.traffic.mode != "open":
        sys.exit("the knee needs an open-loop scenario with [phases].steps")
    with tempfile.TemporaryDirectory(prefix="ocs-knee-") as tmp_name:
        tmp = Path(tmp_name)
        valkey = EmbeddedValkey(tmp / "valkey")
        url = valkey.start()
        try:
            client = redis.Redis.from_url(url)
            valkey_pid = int(client.info("server")["process_id"])
            client.close()
            port = free_port()
            env = dict(os.environ, OCS_REDIS_URL=url, OCS_METRICS_PORT="0", OCS_DATA_DIR=str(tmp / "data"),
                       OCS_PORT=str(port),
                       OCS_OVERLOAD__NEW_SESSIONS_MAX_IN_FLIGHT=str(args.new_sessions_max_in_flight),
                       OCS_OVERLOAD__MAX_IN_FLIGHT=str(args.max_in_flight),
                       OCS_REDIS__CALL_TIMEOUT_MS=str(args.call_timeout_ms))
            provision(scenario, env, tmp)
            server = subprocess.Popen([sys.executable, "-m", "ocs", "serve", "--demo", "--log-level", "WARNING"],
                                      env=env, cwd=ROOT)
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
        finally:
            valkey.stop()
    if args.plot:
        report["plot"] = str(plot_latency(run.series, report, args.plot))
    report["cpu_seconds"] = cpu
    report["overload"] = {"new_sessions_max_in_flight": args.new_sessions_max_in_flight,
                          "max_in_flight": args.max_in_flight, "call_timeout_ms": args.call_timeout_ms}
    report["machine"] = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.json:
        print(json.dumps(report))
        return
    print(json.dumps({k: v for k, v in report.items() if k not in ("steps", "phases")}, indent=2))
    print(markdown(report["steps"]))


if __name__ == "__main__":
    main()
