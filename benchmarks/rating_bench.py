"""Rating one request in Python: schedule selection (version, band, zone, destination prefix, tariff) plus
pricing of a usage, with 50k destination prefixes and 20 time bands.

    .venv/bin/python benchmarks/rating_bench.py [--prefixes 50000] [--bands 20] [--requests 200000]

Builds a rate card in memory (no file): 20 bands over the week in Europe/Berlin with holidays, a zone table,
`--prefixes` destination prefixes in 250 groups, and a voice rate with a tariff per (group, band) for a
fifth of the groups plus band and zone tariffs. Each request picks a random number from a pool of 20,000
called numbers (international format and "tel:+..." forms), a random instant within a month, a random
serving network, then calls `Rater.schedule_for` and `charge_for_usage` (session scope, 30/6 increments).
Prints compile time, the median / p90 / p99 of single requests timed one by one (warm: after one pass over
the pool), the cold first pass, and the mean over a batched loop. Target (issue 4): median ≤ 10 µs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ratecards import compile_card, parse_ratecard  # noqa: E402
from ratecards.pricing import charge_for_usage  # noqa: E402

TZ = ZoneInfo("Europe/Berlin")
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def build_card(prefixes: int, bands: int, seed: int) -> tuple[str, list[str]]:
    """TOML text of the benchmark card and the destination groups."""
    rng = random.Random(seed)
    lines = ['version = "bench-1"', "currency = \"EUR\"", "currency_minor_digits = 2", 'rounding = "half-up"',
             'timezone = "Europe/Berlin"', 'country_code = "49"',
             "holidays = [" + ", ".join(str(date(2027, m, d)) for m, d in ((1, 1), (4, 2), (4, 5), (5, 1))) + "]"]
    for i in range(bands):
        start = (i * 5) % 24
        end = (start + 3 + i % 4) % 24
        days = [DAYS[i % 7]] if i < 14 else (["weekdays"] if i % 2 else ["weekend", "holidays"])
        lines += ["[[bands]]", f'name = "b{i:02d}"', f"days = {days!r}".replace("'", '"'),
                  f'from = "{start:02d}:{(i * 7) % 60:02d}"', f'to = "{end:02d}:00"']
    lines.append("[zones]")
    lines.append('home = ["26201", "26202", "26203"]')
    lines.append('eu = ["204", "206", "208", "214", "222", "232", "238", "240", "244", "268", "270", "272"]')
    lines.append('world = [""]')
    groups = [f"g{n:03d}" for n in range(250)]
    seen: set[str] = set()
    table: dict[str, list[str]] = {g: [] for g in groups}
    while len(seen) < prefixes:
        country = rng.choice(["49", "33", "34", "39", "44", "1", "7", "86", "91", "55", "61", "81", "234", "971"])
        prefix = country + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 5)))
        if prefix not in seen:
            seen.add(prefix)
            table[rng.choice(groups)].append(prefix)
    lines.append("[destinations]")
    for group, values in table.items():
        lines.append(f"{group} = [" + ", ".join(f'"{p}"' for p in values) + "]")
    lines += ["[plans.bench]", "  [[plans.bench.rates]]", "  rating_group = 200", '  service = "voice"',
              '  unit = "seconds"', '  price = "0.09"', "  per = 60", "  increment = 6", "  first_increment = 30",
              '  setup_fee = "0.05"', '  scope = "session"', "  default_quota = 300", "  max_quota = 3600"]
    for n, group in enumerate(groups[:50]):
        band = f"b{n % bands:02d}"
        lines += ["    [[plans.bench.rates.tariffs]]", f'    destination = "{group}"', f'    band = "{band}"',
                  f'    price = "0.{10 + n:02d}"']
    for n, group in enumerate(groups[50:100]):
        lines += ["    [[plans.bench.rates.tariffs]]", f'    destination = "{group}"', f'    price = "0.{40 + n:02d}"']
    lines += ["    [[plans.bench.rates.tariffs]]", '    zone = "world"', '    price = "1.99"']
    for i in range(bands):
        lines += ["    [[plans.bench.rates.tariffs]]", f'    band = "b{i:02d}"', f'    price = "0.0{1 + i % 9}"']
    return "\n".join(lines) + "\n", groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=50_000)
    parser.add_argument("--bands", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    text, _ = build_card(args.prefixes, args.bands, args.seed)
    started = time.perf_counter()
    card = parse_ratecard(text, source="bench")
    parsed = time.perf_counter()
    rater = compile_card(card)
    compiled = time.perf_counter()

    countries = ["49", "33", "34", "39", "44", "1", "7", "86", "91", "55", "61", "81", "234", "971", "380"]
    numbers = []
    for _ in range(20_000):
        digits = rng.choice(countries) + "".join(rng.choice("0123456789") for _ in range(rng.randint(8, 10)))
        numbers.append(rng.choice([digits, "+" + digits, f"tel:+{digits}"]))
    networks = ["26201", "26201", "26201", "20801", "21401", "310260", "46000"]
    month_start = datetime(2027, 3, 1, tzinfo=TZ).timestamp()
    requests = [(rng.choice(numbers), month_start + rng.random() * 31 * 86_400, rng.choice(networks),
                 rng.randint(1, 600), rng.choice([0, 0, 30, 120])) for _ in range(args.requests)]

    schedule_for = rater.schedule_for
    clock = time.perf_counter_ns

    def one(request) -> int:
        number, instant, plmn, units, used = request
        schedule, _ = schedule_for("bench", 200, at=instant, destination=number, plmn=plmn)
        return charge_for_usage(schedule, units, used_before=used)

    cold = []
    for request in requests[:20_000]:
        t0 = clock()
        one(request)
        cold.append(clock() - t0)
    warm = []
    for request in requests:
        t0 = clock()
        one(request)
        warm.append(clock() - t0)
    t0 = time.perf_counter()
    for request in requests:
        one(request)
    batched = (time.perf_counter() - t0) / len(requests) * 1e6

    def q(values: list[int], p: float) -> float:
        return sorted(values)[int(p * (len(values) - 1))] / 1000

    prefixes = sum(len(v) for v in card.destinations.values())
    tariffs = sum(len(r.tariffs) for p in card.plans.values() for r in p.rates)
    print(f"card: {prefixes:,} destination prefixes in {len(card.destinations)} groups, {len(card.bands)} bands, "
          f"{tariffs} tariffs; parse {parsed - started:.2f} s, compile {compiled - parsed:.2f} s")
    print(f"warm, one request (schedule_for + charge_for_usage), {len(warm):,} requests: "
          f"median {statistics.median(warm) / 1000:.2f} µs, p90 {q(warm, 0.9):.2f} µs, p99 {q(warm, 0.99):.2f} µs")
    print(f"cold first pass ({len(cold):,} requests, memo filling): median {statistics.median(cold) / 1000:.2f} µs, "
          f"p99 {q(cold, 0.99):.2f} µs")
    print(f"batched loop: {batched:.2f} µs per request ({1 / batched * 1e6:,.0f} requests/s on one core)")
    target = statistics.median(warm) / 1000 <= 10
    print("target median ≤ 10 µs:", "met" if target else "NOT met")


if __name__ == "__main__":
    main()
