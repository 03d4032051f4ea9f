"""Micro-benchmark of ocs.charging's own CPU per CCR, outside the store: the request checks, building the
MSCC list (rating included) and encoding the CCA.

The CCR-U is codec_bench's (976 B: PS-Information, one MSCC with USU + RSU, a Proxy-Info); the answer has one
MSCC granting time and volume with Validity-Time, two thresholds, Quota-Holding-Time and a Trigger, plus
CC-Session-Failover and failure-handling hints. Each figure is the best of 5 rounds; the request side
decodes a fresh message per operation (values are cached on a message once read), so its decode is listed.

    .venv/bin/python benchmarks/cca_bench.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec_bench import build_ccr_u  # noqa: E402

from balances.model import ChargeOutcome, Location, MsccOutcome, Units  # noqa: E402
from ocs.charging import CreditControl  # noqa: E402
from protocol.codec import decode_message  # noqa: E402
from ratecards import compile_card, parse_ratecard  # noqa: E402

RATECARD = """
version = "bench-1"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"

[plans.bench]
default_rating_group = 99

  [[plans.bench.rates]]
  rating_group = 99
  service = "data"
  unit = "bytes"
  price = "0.01"
  per = 1024
  increment = 1024
  default_quota = 10240
  max_quota = 102400
  also_grant = { time = { default = 3600, max = 7200 } }
  validity_time = 600
  volume_quota_threshold = 2048
  time_quota_threshold = 60
  quota_holding_time = 300
  triggers = ["CHANGE_IN_QOS"]
"""
ROUNDS, NUMBER = 5, 20_000


def best(statement, number: int = NUMBER) -> float:
    """µs per call, best of ROUNDS."""
    return min(timeit.repeat(statement, number=number, repeat=ROUNDS)) / number * 1e6


def main() -> None:
    handling = SimpleNamespace(credit_control_failure_handling="RETRY_AND_TERMINATE",
                               direct_debiting_failure_handling=None, rules=[])
    control = CreditControl(origin_host="ocs1.example.net", origin_realm="example.net", store=None,
                            rater=compile_card(parse_ratecard(RATECARD)), cc_session_failover=1,
                            failure_handling=handling)
    raw = build_ccr_u()
    message = decode_message(raw)
    location = Location(1, "96871217162", "bench")
    now_ms = 1_767_225_600_000
    _, _, quotas = control._msccs(message, location, 2, now_ms)
    outcome = ChargeOutcome(result_code=2001, msccs=[
        MsccOutcome(rating_group=99, result_code=2001, granted=Units(time=3600, total=10240))])
    answer = control._encode(message, outcome, quotas)

    decode = best(lambda: decode_message(raw))
    check = best(lambda: control._check_required(decode_message(raw)))
    msccs = best(lambda: control._msccs(decode_message(raw), location, 2, now_ms))
    encode = best(lambda: control._encode(message, outcome, quotas))
    print(f"CCR-U {len(raw)} B, CCA {len(answer)} B")
    print(f"decode alone (decode_message)                           {decode:6.2f} µs")
    print(f"decode + request checks (_check_required)               {check:6.2f} µs")
    print(f"decode + MSCC list with rating (_msccs)                 {msccs:6.2f} µs")
    print(f"CCA encoding (_encode, message decoded before)          {encode:6.2f} µs")


if __name__ == "__main__":
    main()
