"""`ocs simulate --scenario FILE`: load the scenario, run it with live progress, print or emit the report.

The `ocs` CLI only parses flags and calls `simulate_scenario`; everything the simulator shows is decided here
and in simulators/report.py. Exit status: 0 when every request was answered and every answer checked out,
1 when there were mismatches, errors, timeouts or lost connections, 2 for an unusable scenario (the CLI's
convention for bad input). Imports only simulators/ and protocol/ (through them), never the server side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.markup import escape

from simulators.load import LoadRun, run_scenario
from simulators.report import LiveProgress, plot_latency, print_report
from simulators.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["simulate_scenario", "scenario_failed"]


def scenario_failed(report: dict[str, Any]) -> bool:
    """A run whose figures must not be trusted: something went wrong on the wire or an answer was wrong."""
    return bool(report["mismatches"] or report["errors"] or report["timeouts"] or report["connection_errors"]
                or report["requests"]["unanswered"])


def simulate_scenario(scenario_file: str | Path, *, host: str | None, port: int | None, as_json: bool,
                      plot: Path | None, progress: bool, console: Console, err_console: Console) -> int:
    """Run one scenario from the command line; returns the exit status."""
    import uvloop

    try:
        scenario: Scenario = load_scenario(scenario_file).with_target(host, port)
    except ScenarioError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    phases = scenario.phases
    total = phases.warmup_seconds + (len(phases.steps) * phases.step_seconds if phases.steps
                                     else phases.ramp_seconds + phases.steady_seconds)
    show = progress and err_console.is_terminal
    live = LiveProgress(err_console, scenario.name, total) if show else None

    async def main() -> tuple[dict, LoadRun]:
        if live is None:
            return await run_scenario(scenario)
        with live:
            return await run_scenario(scenario, on_tick=live.update)

    try:
        report, run = uvloop.run(main())
    except OSError as exc:
        where = f"{scenario.target.host}:{scenario.target.port}"
        err_console.print(f"[red]error:[/red] cannot reach {where}: {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
        return 1
    if plot is not None:
        try:
            steady = run.phases["steady"].histogram if "steady" in run.phases else None  # none in a stepped run
            report["plot"] = str(plot_latency(run.series, report, plot, steady))
        except RuntimeError as exc:
            err_console.print(f"[yellow]warning:[/yellow] {escape(str(exc))}", highlight=False, soft_wrap=True)
    if as_json:
        print(msgspec.json.encode(report).decode(), flush=True)
    else:
        print_report(report, console)
        if plot is not None and "plot" in report:
            console.print(f"latency plot: {report['plot']}")
    return 1 if scenario_failed(report) else 0
