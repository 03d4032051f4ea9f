"""Split a py-spy raw profile of `ocs serve` into where a request's CPU goes, by package.

`benchmarks/e2e_ccr_u.py --profile FILE` writes the profile (py-spy `--format raw`: one line per distinct stack,
frames separated by `;`, then the sample count). Every stack is put in the first category whose rule matches,
start-up and idle samples are left out, and with `--us-per-request` (the OCS CPU of the run ÷ requests) each
share is also given in µs. The rules are crude on purpose: they name files and classes, not lines.

    .venv/bin/python benchmarks/profile_split.py /tmp/ocs.raw --us-per-request 142
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable

RULES: list[tuple[str, Callable[[str], bool]]] = [
    ("start-up (imports, CLI parsing)",
     lambda s: "_find_and_load" in s or ("Runner.run" not in s and "Thread._bootstrap" not in s)),
    ("CDR writer (its thread and its asyncio task)", lambda s: "CdrWriter" in s or "cdr_writer" in s),
    ("idle (event loop or worker thread waiting)",
     lambda s: s.endswith("Runner.run (asyncio/runners.py)") or s.endswith("_worker (concurrent/futures/thread.py)")),
    ("protocol: validate()", lambda s: "validate (protocol/codec.py)" in s),
    ("protocol: framing, decode, peer state machine, dispatch",
     lambda s: "_PeerProtocol.data_received" in s and "CreditControl" not in s),
    ("protocol: writing answers (transport flush)", lambda s: "_PeerProtocol._flush" in s),
    ("metrics (prometheus_client)", lambda s: "prometheus_client" in s or "ocs/metrics" in s),
    ("balances: BalanceStore and redis-py (pack FCALL, read replies)",
     lambda s: "BalanceStore" in s or "redis/" in s),
    ("ocs.charging: CCR checks, lookups, CCA building (codec reads included)",
     lambda s: "CreditControl" in s or "ocs/charging" in s),
    ("asyncio / uvloop scheduling", lambda s: "asyncio/" in s or "uvloop" in s),
    ("other", lambda s: True),
]
EXCLUDED = ("start-up", "idle")


def split(path: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    with open(path) as profile:
        for line in profile:
            stack, _, samples = line.rstrip("\n").rpartition(" ")
            stack = re.sub(r":\d+\)", ")", stack)
            for name, rule in RULES:
                if rule(stack):
                    counts[name] += int(samples)
                    break
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--us-per-request", type=float)
    args = parser.parse_args()
    counts = split(args.profile)
    busy = sum(n for name, n in counts.items() if not name.startswith(EXCLUDED))
    print(f"{busy} samples on the request path (start-up and idle left out)")
    for name, _ in RULES:
        n = counts[name]
        if name.startswith(EXCLUDED):
            print(f"  {name:<72} {n:6d} samples, left out")
            continue
        share = n / busy if busy else 0.0
        per_request = f"  ≈ {args.us_per_request * share:5.1f} µs/request" if args.us_per_request else ""
        print(f"  {name:<72} {share * 100:5.1f} %{per_request}")


if __name__ == "__main__":
    main()
