"""How a load run is shown: live progress in the terminal (rich), the final tables, the PNG latency plot.

Kept apart from the engine (simulators/load.py) so the engine stays quiet and testable; the CLI wires them.
Imports rich always and matplotlib only when a plot is asked for (an optional dependency: `pip install
'.[plot]'`). Nothing here imports the project's server side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simulators.histogram import LatencyHistogram

__all__ = ["LiveProgress", "plot_latency", "print_report", "print_steps"]


class LiveProgress:
    """A rich Live panel refreshed by the run's once-a-second tick (on stderr, so --json stays clean)."""

    def __init__(self, console: Console, scenario_name: str, total_seconds: float) -> None:
        self.console = console
        self.scenario_name = scenario_name
        self.total_seconds = total_seconds
        self.live = Live(Text("connecting…"), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)  # type: ignore[arg-type]

    def update(self, snapshot: dict[str, Any]) -> None:
        interval = snapshot.get("interval") or {}
        head = Text.assemble(
            (f"{self.scenario_name} ", "bold"),
            (f"{snapshot['phase']:<7}", "cyan"),
            f" {snapshot['elapsed']:>6.1f} s of ~{self.total_seconds:.0f} s   ",
            (f"{interval.get('requests_per_second', 0):>8,.0f} req/s", "bold green"),
            f"   p50 {interval.get('p50_ms', 0):.2f} ms  p99 {interval.get('p99_ms', 0):.2f} ms"
            f"  max {interval.get('max_ms', 0):.2f} ms",
        )
        results = "  ".join(f"{code}: {n:,}" for code, n in sorted(snapshot["results"].items()))
        problems = (f"timeouts {snapshot['timeouts']:,}  errors {snapshot['errors']:,}  "
                    f"mismatches {snapshot['mismatches']:,}")
        style = "red" if snapshot["timeouts"] or snapshot["errors"] or snapshot["mismatches"] else "dim"
        body = Text.assemble(
            f"sessions open {snapshot['sessions_open']:,}   requests in flight {snapshot['requests_in_flight']:,}"
            f"   sent {snapshot['sent']:,}   answered {snapshot['answered']:,}\n",
            f"results  {results or '-'}\n",
            (problems, style),
        )
        self.live.update(Group(head, body))


def print_report(report: dict[str, Any], console: Console) -> None:
    """The final report as tables: throughput and latency per phase, results, problems, counts."""
    latency = Table(title=f"scenario {report['scenario']} ({report['mode']} loop) against {report['target']}, "
                          f"{report['connections']} connection(s)", title_justify="left")
    for column in ("phase", "seconds", "answers", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"):
        latency.add_column(column, justify="right" if column != "phase" else "left")
    for name, phase in report["phases"].items():
        lat = phase["latency_ms"]
        latency.add_row(
            Text(name, style="bold" if name == "steady" else ""), f"{phase['seconds']:.1f}", f"{phase['answers']:,}",
            f"{phase['requests_per_second']:,.0f}", *(f"{lat[k]:.2f}" for k in ("p50", "p90", "p99", "p999", "max")),
        )
    console.print(latency)
    if report.get("steps"):
        print_steps(report["steps"], console)
    requests, sessions = report["requests"], report["sessions"]
    throughput = ("stepped run (no steady phase: see the steps)" if report.get("steps") else
                  f"[bold]{report['requests_per_second']:,.0f} requests/s[/bold] in the steady phase")
    console.print(f"{throughput}; results {report['results']}; MSCC results {report['mscc_results']}")
    console.print(
        f"requests: sent {requests['sent']:,} = answered {requests['answered']:,} + timeouts {requests['timeouts']:,}"
        f" + errors {requests['errors']:,} + unanswered {requests['unanswered']:,}  (by type {requests['by_type']}, "
        f"retransmissions {requests['retransmissions']:,}, duplicates {requests['duplicates']:,})"
    )
    console.print(
        f"sessions: started {sessions['started']:,} (data {sessions['data']:,}, events {sessions['events']:,}) = "
        f"completed {sessions['completed']:,} + abandoned {sessions['abandoned']:,} + rejected "
        f"{sessions['rejected']:,} + failed {sessions['failed']:,}"
    )
    if report["server_requests"]:
        console.print(f"requests from the server: {report['server_requests']}")
    bad = report["mismatches"] or report["errors"] or report["timeouts"] or report["connection_errors"]
    style = "red" if bad else "green"
    console.print(f"[{style}]mismatches {report['mismatches']:,}  errors {report['errors']:,}  "
                  f"timeouts {report['timeouts']:,}[/{style}]")
    for kind, count in {**report["mismatch_kinds"], **report["error_kinds"]}.items():
        console.print(f"  [red]{count:,} × {escape(kind)}[/red]")


def print_steps(steps: list[dict[str, Any]], console: Console) -> None:
    """A stepped run, one row per step: offered load, answers per second, the 3004 share, latency."""
    table = Table(title="steps (answers are counted in the step their request was sent in)", title_justify="left")
    offered = "sessions/s" if "sessions_per_second" in steps[0] else "in flight"
    for column in ("step", offered, "nominal req/s", "sent/s", "answered/s", "2001/s", "3004 share", "timeouts",
                   "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right" if column != "step" else "left")
    for row in steps:
        lat = row["latency_ms"]
        table.add_row(row["step"], f"{row.get('sessions_per_second', row.get('in_flight', 0)):,g}",
                      f"{row.get('nominal_requests_per_second', 0):,.0f}", f"{row['sent_per_second']:,.0f}",
                      f"{row['answered_per_second']:,.0f}", f"{row['success_per_second']:,.0f}",
                      f"{row['too_busy_share'] * 100:.1f} %", f"{row['timeouts']:,}", f"{lat['p50']:.2f}",
                      f"{lat['p99']:.2f}", f"{lat['max']:.2f}")
    console.print(table)


def plot_latency(series: list[dict[str, float]], report: dict[str, Any], path: Path,
                 steady: LatencyHistogram | None = None) -> Path:
    """A PNG: latency p50/p99/max and answers/s per second of the run (phases shaded), and the steady
    phase's latency by percentile (the HDR "percentile spectrum", 50 % … 99.99 %, max)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the latency plot needs matplotlib: pip install 'ocs[plot]'") from exc
    panels = 3 if steady is not None and steady.count else 2
    figure, axes = plt.subplots(panels, 1, figsize=(10, 3.2 * panels))
    top, middle = axes[0], axes[1]
    times = [p["t"] for p in series]
    marker = "o" if len(series) < 30 else None
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        top.plot(times, [p[key] for p in series], label=label, linewidth=1.2, marker=marker, markersize=3)
    top.set_ylabel("latency (ms)")
    top.set_yscale("symlog", linthresh=1.0)
    top.legend(loc="upper left")
    middle.plot(times, [p["requests_per_second"] for p in series], color="tab:green", linewidth=1.2,
                marker=marker, markersize=3)
    middle.set_ylabel("answers / s")
    middle.set_xlabel("seconds since the start (one point per second)")
    colours = {"warmup": "#dddddd", "ramp": "#ffe8c0", "steady": "#d8f0d8", "drain": "#e8e0f0"}
    start = 0.0
    for name, phase in report["phases"].items():
        end = start + phase["seconds"]
        if end > start:
            for axis in (top, middle):
                step_colour = ("#d8f0d8", "#c8e0f0")[int(name[4:]) % 2] if name.startswith("step") else "#eeeeee"
                axis.axvspan(start, end, color=colours.get(name, step_colour), alpha=0.6, lw=0)
            top.text((start + end) / 2, 1.0, name, transform=top.get_xaxis_transform(), ha="center",
                     va="bottom", fontsize=8)
        start = end
    for axis in (top, middle):
        axis.grid(True, alpha=0.3)
    if panels == 3:
        assert steady is not None
        fractions = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999]
        spectrum = axes[2]
        spectrum.plot([1 / (1 - f) for f in fractions], [steady.percentile(f) / 1000 for f in fractions],
                      marker="o", markersize=3, color="tab:purple")
        spectrum.axhline(steady.max / 1000, color="tab:red", linewidth=0.8, linestyle="--", label="max")
        spectrum.set_xscale("log")
        spectrum.set_xticks([1 / (1 - f) for f in fractions])
        spectrum.set_xticklabels([f"{f * 100:g}%" for f in fractions], fontsize=8)
        spectrum.set_ylabel("latency (ms)")
        spectrum.set_xlabel(f"percentile of the steady phase ({steady.count:,} answers)")
        spectrum.legend(loc="upper left")
        spectrum.grid(True, alpha=0.3)
    lat = report["latency_ms"]
    if report.get("steps"):
        best = max(report["steps"], key=lambda row: row["success_per_second"])
        title = (f"{report['scenario']} ({report['mode']} loop, {len(report['steps'])} steps): at most "
                 f"{best['success_per_second']:,.0f} answers 2001/s ({best['step']}); 3004 share of the last step "
                 f"{report['steps'][-1]['too_busy_share'] * 100:.1f} %")
    else:
        title = (f"{report['scenario']} ({report['mode']} loop): steady {report['requests_per_second']:,.0f} "
                 f"req/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, p99.9 {lat['p999']:.2f} ms")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
