"""Where Valkey's time goes in one charge call: the charge function cut short at successive stages.

The requests are the ones the server really sends: an in-process `ocs serve` (tests/gateway.start_app, demo
rate card, CDR writer off) opens sessions with CCR-I over TCP (PS-Information as a PGW sends it) and answers
one CCR-U each; the ChargeRequests BalanceStore.charge receives are kept. Then a copy of the function
library with stop points in charge.lua (loaded beside the real one, the files are not changed) is called
with those CCR-Us (fresh request numbers, one FCALL each, pipelined) and told where to stop: the server's
`usec_per_call` of FCALL at each stop point, minus the one before, is what that stage costs. The last
stage is the whole function (it writes; the others return before their first write, so they leave the data
as it was). Each stage is measured --rounds times, interleaved, and the median is printed. Then the shipped
function itself with the same CCR-Us, as the server sends them (schedules named by id) and with their schedules
in full (as every request carried them before), interleaved.

On a VM shared with other work, `usec_per_call` (wall time inside the call) moves by ±30 % between rounds;
`--cpu` measures Valkey's CPU time per call instead (INFO cpu: the call, its networking and its AOF writes).
A stop point before the first write leaves out the AOF work of the writes after it, so the last stage carries
the AOF cost of the whole call.

    .venv/bin/python benchmarks/charge_cost.py [--sessions 500] [--calls 20000] [--rounds 3] [--cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import uvloop  # noqa: E402

from balances import keys as k  # noqa: E402
from balances.embedded import EmbeddedValkey  # noqa: E402
from balances.model import UPDATE, ChargeRequest, Subscriber, full_schedules  # noqa: E402
from balances.scripts import build_library  # noqa: E402
from ratecards import initial_allowances, load_ratecard  # noqa: E402
from simulators.load import ps_information  # noqa: E402
from tests.gateway import Gateway, start_app  # noqa: E402

# (stage, the line of charge.lua after which the function stops for it)
STOPS = (
    ("fcall + bind", None),
    ("decode request JSON", "local req = decode(ARGV[1])\n"),
    ("check_request (schedule checks)", "  return redis.error_reply('ERR charge: invalid ' .. err)\nend\n"),
    ("HMGET session + HMGET subscriber", "  return outcome_json(4010, nil, e2e)\nend\n"),
    ("session checks, CDR parts", "    ses_del[#ses_del + 1] = 'peer'\n  end\nend\n"),
    ("HGETALL balances (purse)", "local debits = {}"),
    ("MSCCs: release, rate, CDR XADD, grant", "-- a plain RFC 4006 client hears"),
    ("ledger XADD, wallet HSET, counters", "if next(filed) then"),
    ("outcome JSON, stored answer, answers kept", "if #ses_del > 0 then\n  call('HDEL'"),
    ("HDEL of answers let go", "call('HSET', ses_key, unpack_(ses_set))"),
    ("session HSET, ZADD open:", ""),
)
NO_CDR = "MSCCs without the CDR XADD"
CPU = False  # --cpu: Valkey's CPU time per call (INFO cpu) instead of FCALL's usec_per_call


def staged_library() -> tuple[str, str]:
    """The function library with stop points: FCALL <name> ... <payload> <stage index> [nocdr]."""
    library = build_library()
    source = library.source
    start = source.index("local function charge_body(KEYS, ARGV)\nif not fmt then bind() end\n")
    end = source.index("-- ==== event.lua ====")
    body = source[start:end]
    head = "local function charge_body(KEYS, ARGV)\nif not fmt then bind() end\n"
    body = body.replace(head, head + "local STOP = tonumber(ARGV[2]) or 99\nBENCH_NO_CDR = ARGV[3] == 'nocdr'\n"
                        "if STOP == 0 then return '' end\n", 1)
    for index, (_, line) in enumerate(STOPS[1:-1], start=1):
        assert body.count(line) == 1, line
        if line.endswith("\n"):
            body = body.replace(line, line + f"if STOP == {index} then return '' end\n", 1)
        else:
            body = body.replace(line, f"if STOP == {index} then return '' end\n" + line, 1)
    source = source[:start] + body + source[end:]
    # the CDR XADD of a usage record, skipped when asked (to tell its cost apart within the MSCC stage)
    xadd = "  call('XADD', cdr_key, '*', 'r', rec.head .. rg .. '\",\"recordType\":\"' .. record_type"
    assert source.count(xadd) == 1
    source = source.replace(xadd, "  if BENCH_NO_CDR then return end\n" + xadd, 1)
    source = source.replace("local function capture()", "local BENCH_NO_CDR = false\nlocal function capture()", 1)
    version = library.version
    source = source.replace(f"ocs_{version}", "ocs_stages").replace(f"_{version}'", "_stages'")
    return source, "ocs_charge_stages"


async def capture(url: str, tmp: Path, sessions: int) -> list[ChargeRequest]:
    """CCR-I and one CCR-U per session through the real server; the CCR-U ChargeRequests it sent."""
    app = await start_app(url, tmp, OCS_CDR__ENABLED="false", OCS_OVERLOAD__MAX_IN_FLIGHT="100000",
                          OCS_OVERLOAD__NEW_SESSIONS_MAX_IN_FLIGHT="100000")
    seen: list[ChargeRequest] = []
    charge = app.store.charge

    async def keep(request: ChargeRequest, *args):
        if request.request_type == UPDATE:
            seen.append(request)
        return await charge(request, *args)

    app.store.charge = keep
    try:
        card = load_ratecard(app.config.charging.ratecard)
        allowances = initial_allowances(card, "demo")
        msisdns = [f"4917{n:08d}" for n in range(sessions)]
        await app.store.provision_many([(Subscriber(msisdn=m, imsi="26201" + m[-10:], plan="demo"), 10**12,
                                         allowances) for m in msisdns])
        gateway = await Gateway.connect(app.port)
        for number in (0, 1):
            todo = list(range(sessions))
            while todo:  # a request shed by the overload control (3004) is sent again
                answers = await asyncio.gather(*(
                    gateway.request(request(gateway, f"pgw1.gw.test;cost;{n}", number, msisdns[n],
                                            ps_information(msisdns[n], n))) for n in todo[:50]))
                codes = [answer.get("Result-Code") for answer in answers]
                if set(codes) - {2001, 3004}:
                    raise SystemExit(f"answers {set(codes)}")
                todo = [n for n, code in zip(todo, codes, strict=False) if code == 3004] + todo[50:]
                if 3004 in codes:
                    await asyncio.sleep(0.05)
        gateway.close()
    finally:
        await app.stop()
    return seen


def request(gateway: Gateway, session_id: str, number: int, msisdn: str, info: bytes) -> list:
    avps: list = [
        ("Session-Id", session_id), ("Origin-Host", gateway.origin_host), ("Origin-Realm", "gw.test"),
        ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", "32251@3gpp.org"),
        ("CC-Request-Type", 1 if number == 0 else 2), ("CC-Request-Number", number),
    ]
    mscc: list = [("Requested-Service-Unit", []), ("Rating-Group", 100)]
    if number == 0:
        avps.append(("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", msisdn)]))
        avps.append(("Multiple-Services-Indicator", 1))
    else:
        mscc.append(("Used-Service-Unit", [("CC-Total-Octets", 1_000_000), ("CC-Input-Octets", 400_000),
                                           ("CC-Output-Octets", 600_000)]))
    avps.append(("Multiple-Services-Credit-Control", mscc))
    avps.append(info)
    return avps


def call_args(request: ChargeRequest) -> list:
    p = request.partition
    return [k.sub_key(p, request.msisdn), k.bal_key(p, request.msisdn), k.ses_key(p, request.session_id),
            k.open_key(p), k.cdr_key(p), k.ledger_key(p), k.expiry_key(p), k.usage_counters_key(p, request.msisdn),
            k.schedules_key(p)]


async def measure(client: aioredis.Redis, function: str, requests: list[ChargeRequest], calls: int,
                  number: list[int], stage: int, nocdr: bool, whole: bool = False) -> float:
    await client.config_resetstat()
    cpu = await valkey_cpu(client)
    encoder = msgspec.json.Encoder()
    sent = 0
    while sent < calls:
        async with client.pipeline(transaction=False) as pipe:
            for request in requests:
                number[0] += 1
                payload = encoder.encode(msgspec.structs.replace(request, request_number=number[0],
                                                                 now_ms=request.now_ms + number[0]))
                keys = call_args(request)
                if whole:
                    pipe.execute_command("FCALL", function, len(keys), *keys, payload)
                else:
                    pipe.execute_command("FCALL", function, len(keys), *keys, payload, stage,
                                         "nocdr" if nocdr else "")
                sent += 1
            replies = await pipe.execute(raise_on_error=True)
        if whole or stage == len(STOPS) - 1:
            outcome = msgspec.json.decode(replies[-1])
            assert outcome["result_code"] == 2001 and not outcome.get("duplicate"), outcome
    cpu = await valkey_cpu(client) - cpu
    stats = (await client.info("commandstats"))["cmdstat_fcall"]
    return cpu / sent * 1e6 if CPU else float(stats["usec_per_call"])


async def valkey_cpu(client: aioredis.Redis) -> float:
    """CPU seconds of the Valkey process (main thread and all), from INFO cpu."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(url: str, tmp: Path, args: argparse.Namespace) -> None:
    requests = await capture(url, tmp, args.sessions)
    print(f"{len(requests)} CCR-U requests captured; a request's JSON: "
          f"{statistics.median(len(msgspec.json.encode(r)) for r in requests):.0f} B, of which schedules "
          f"{statistics.median(sum(len(msgspec.json.encode(m.schedule)) for m in r.msccs) for r in requests):.0f} B")
    if args.show:
        print(msgspec.json.encode(requests[0]).decode())
    client = aioredis.Redis.from_url(url)
    source, function = staged_library()
    await client.execute_command("FUNCTION", "LOAD", "REPLACE", source)
    number = [1_000]
    plan = [(index, False) for index in range(len(STOPS))] + [(len(STOPS) - 1, True)]
    results: dict[tuple[int, bool], list[float]] = {key: [] for key in plan}
    for _ in range(args.rounds):
        for stage, nocdr in plan:
            results[(stage, nocdr)].append(await measure(client, function, requests, args.calls, number, stage,
                                                         nocdr))
    await client.aclose()
    what = "Valkey CPU µs per call" if CPU else "µs per FCALL inside Valkey"
    print(f"\n{what} (median of {args.rounds} rounds of {args.calls} calls), cumulative and "
          f"by stage:")
    previous = 0.0
    for index, (name, _) in enumerate(STOPS):
        value = statistics.median(results[(index, False)])
        print(f"  {index}  {name:<48}{value:>8.1f}{value - previous:>+9.1f}")
        previous = value
    full = statistics.median(results[(len(STOPS) - 1, False)])
    no_cdr = statistics.median(results[(len(STOPS) - 1, True)])
    print(f"     {NO_CDR:<48}{no_cdr:>8.1f}{no_cdr - full:>+9.1f}  (the CDR XADD: {full - no_cdr:.1f})")

    # the library as shipped, with the requests as the server sends them (schedules named by id) and with their
    # schedules in full (as every request carried them before)
    client = aioredis.Redis.from_url(url)
    charge = build_library().functions["charge"]
    shapes = {"schedules by id": requests, "schedules in full": [full_schedules(r) for r in requests]}
    whole: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(args.rounds):
        for name, batch in shapes.items():
            whole[name].append(await measure(client, charge, batch, args.calls, number, 0, False, whole=True))
    await client.aclose()
    print(f"\nthe shipped charge function, {what} (median of {args.rounds} rounds):")
    for name, values in whole.items():
        size = statistics.median(len(msgspec.json.encode(r)) for r in shapes[name])
        print(f"  {name:<20}{statistics.median(values):>8.1f}   (request JSON {size:.0f} B; rounds "
              f"{', '.join(f'{v:.1f}' for v in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--calls", type=int, default=20_000, help="FCALLs per stage and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", default="always", choices=("always", "everysec", "no"))
    parser.add_argument("--cpu", action="store_true",
                        help="measure Valkey's CPU time per call (INFO cpu: FCALL, networking and AOF writes "
                             "included; less moved by other processes on the cores) instead of usec_per_call")
    parser.add_argument("--show", action="store_true", help="print one captured request's JSON")
    args = parser.parse_args()
    global CPU
    CPU = args.cpu
    uvloop.install()
    with tempfile.TemporaryDirectory(prefix="ocs-charge-cost-") as tmp:
        with EmbeddedValkey(Path(tmp) / "valkey", config={"appendfsync": args.fsync}) as server:
            asyncio.run(run(server.url, Path(tmp), args))


if __name__ == "__main__":
    main()
