"""Replay every Gy CCR of the real captures in ../shared against the server, byte for byte.

The subscribers and rating groups the captures use are provisioned first (a rate card made here prices every
rating group seen). Each answer must be well formed (python-diameter decodes it, independently of our codec)
and carry the result the capture's own CCA carried; deviations are listed in docs/gy-conformance.md
(§ "Replay of real traffic"). Skipped when ../shared is absent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from diameter.message import Message as PdMessage

from balances.model import Subscriber
from protocol.codec import Message, decode_message
from simulators.gy import open_client
from simulators.pcap import Frame, read_diameter
from tests.gateway import start_app

GY_CAPTURES = [
    "magma_gx_gy_combined_03_210505_132953-1.pcapng",
    "magma_gx_gy_combined_04_210505_133027-1.pcapng",
    "magma_gx_gy_combined_05_210505_133111-1.pcapng",
    "magma_gx_gy_combined_06_210505_133132-1.pcapng",
    "otp_gy_session.pcap",
    "otp_via_freediameter_relay.pcap",
    "node_and_pydiameter_vs_otp.pcap",
]
CCR, APP_GY = 272, 4


def ratecard_for(rating_groups: set[int]) -> str:
    rates = "".join(f"""
  [[plans.replay.rates]]
  rating_group = {rg}
  service = "data"
  unit = "bytes"
  price = "0.001"
  per = 1048576
  increment = 1024
  default_quota = 1048576
  max_quota = 104857600
""" for rg in sorted(rating_groups))
    return f"""version = "replay"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"

[plans.replay]
description = "every rating group seen in the captures"
{rates}"""


def gy_exchange(frames: list[Frame]) -> list[tuple[Message, Message | None]]:
    """Each Gy CCR of the capture with the capture's own CCA (matched by End-to-End and Hop-by-Hop)."""
    answers = {(f.end_to_end, f.hop_by_hop): decode_message(f.data) for f in frames
               if not f.is_request and f.command_code == CCR and f.application_id == APP_GY}
    return [(decode_message(f.data), answers.get((f.end_to_end, f.hop_by_hop))) for f in frames
            if f.is_request and f.command_code == CCR and f.application_id == APP_GY]


def subscribers_of(requests: list[Message]) -> dict[str, str | None]:
    """MSISDN → IMSI of every subscriber named in a CCR (E.164 and IMSI Subscription-Ids)."""
    found: dict[str, str | None] = {}
    imsi_only: set[str] = set()
    for request in requests:
        ids = {s.get("Subscription-Id-Type"): s.get("Subscription-Id-Data")
               for s in request.find_all("Subscription-Id")}
        if 0 in ids:
            found.setdefault(ids[0], ids.get(1))
        elif 1 in ids:
            imsi_only.add(ids[1])
    for imsi in imsi_only - {i for i in found.values() if i}:
        found["9" + imsi[-12:]] = imsi  # an IMSI-only subscriber gets a synthetic MSISDN
    return found


@pytest.fixture
def captures(shared_dir: Path) -> Path:
    return shared_dir / "captures"


@pytest.mark.parametrize("capture", GY_CAPTURES)
async def test_replay_gets_the_captures_results(capture, captures, valkey_url, tmp_path):
    exchanges = gy_exchange(read_diameter(captures / capture))
    assert exchanges, f"no Gy CCR in {capture}"
    requests = [request for request, _ in exchanges]
    rating_groups = {m.get("Rating-Group") for r in requests
                     for m in r.find_all("Multiple-Services-Credit-Control") if m.get("Rating-Group") is not None}
    card = tmp_path / "replay.toml"
    card.write_text(ratecard_for(rating_groups or {1}))
    server = await start_app(valkey_url, tmp_path, OCS_RATECARD=str(card))
    try:
        for msisdn, imsi in subscribers_of(requests).items():
            await server.store.provision(Subscriber(msisdn=msisdn, imsi=imsi, plan="replay"),
                                         money=1_000_000_000, allowances={})
        client = await open_client("127.0.0.1", server.port, "replay.test", "test")
        mismatches = []
        for number, (request, captured) in enumerate(exchanges):
            raw = bytearray(request.raw)
            raw[12:20] = (0x7000 + number).to_bytes(4, "big") * 2  # fresh Hop-by-Hop and End-to-End
            hop = 0x7000 + number
            future = asyncio.get_running_loop().create_future()
            client.pending[hop] = future
            client.transport.write(bytes(raw))
            answer = await asyncio.wait_for(future, 10)
            PdMessage.from_bytes(answer.raw)  # an independent decoder accepts it
            assert answer.session_id == request.session_id
            assert answer.get("CC-Request-Number") == request.get("CC-Request-Number")
            if captured is None:
                continue
            ours = (answer.get("Result-Code"),
                    [m.get("Result-Code") for m in answer.find_all("Multiple-Services-Credit-Control")])
            theirs = (captured.get("Result-Code"),
                      [m.get("Result-Code") for m in captured.find_all("Multiple-Services-Credit-Control")])
            # a captured MSCC without Result-Code (Magma's OCS in CCA-T) is matched by our 2001
            theirs_filled = (theirs[0], [2001 if code is None else code for code in theirs[1]])
            if ours != theirs_filled:
                mismatches.append((number, request.get("CC-Request-Type"), ours, theirs))
        client.transport.close()
        assert not mismatches, mismatches[:5]
        open_sessions = await server.store.open_sessions()
        assert not [s for s in open_sessions if s["msisdn"] in subscribers_of(requests)], \
            "every replayed session ended with its CCR-T"
    finally:
        await server.stop()
