"""Micro-benchmark of the Diameter codec on the per-CCR hot path.

Measures (1) decoding a realistic Gy CCR-U (PS-Information, one MSCC with USU + RSU) and reading the
fields the charging logic needs, (2) `validate()`, the RFC 6733 walk every request gets, and (3) encoding
the CCA (one MSCC with GSU and Validity-Time).
Run: `.venv/bin/python benchmarks/codec_bench.py`; prints µs per operation (best of several rounds).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.codec import _PASSED_GROUPS, decode_message, encode_answer, encode_message, validate  # noqa: E402

SESSION_ID = "pgw01.epc.mnc002.mcc422.3gppnetwork.org;3832384998;1;42"


def build_ccr_u() -> bytes:
    """A CCR-U shaped like the captured Gy traffic in ../shared/vectors (optiva, p2j, eseye)."""
    ps_information = [
        ("3GPP-Charging-Id", b"\xcd\x10\xe0\x0f"),
        ("3GPP-PDP-Type", 0),
        ("PDP-Address", "10.180.160.27"),
        ("3GPP-GPRS-Negotiated-QoS-Profile", "08-4406000186A0000186A0"),
        ("SGSN-Address", "192.10.136.111"),
        ("GGSN-Address", "123.123.123.64"),
        ("3GPP-IMSI-MCC-MNC", "422002"),
        ("3GPP-GGSN-MCC-MNC", "422002"),
        ("3GPP-NSAPI", b"5"),
        ("Called-Station-Id", "internet"),
        ("3GPP-Selection-Mode", "0"),
        ("3GPP-Charging-Characteristics", "0400"),
        ("3GPP-SGSN-MCC-MNC", "422002"),
        ("3GPP-User-Location-Info", bytes.fromhex("012422002f4c6bb6")),
        ("3GPP-RAT-Type", b"\x06"),
        ("3GPP-MS-TimeZone", b"\x69\x00"),
    ]
    avps = [
        ("Session-Id", SESSION_ID),
        ("Origin-Host", "pgw01.epc.mnc002.mcc422.3gppnetwork.org"),
        ("Origin-Realm", "epc.mnc002.mcc422.3gppnetwork.org"),
        ("Destination-Realm", "ocs.example.net"),
        ("Auth-Application-Id", 4),
        ("Service-Context-Id", "8.32251@3gpp.org"),
        ("CC-Request-Type", 2),
        ("CC-Request-Number", 1),
        ("Destination-Host", "ocs1.ocs.example.net"),
        ("Origin-State-Id", 1094807040),
        ("Event-Timestamp", 1674574667),
        ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", "96871217162")]),
        ("Subscription-Id", [("Subscription-Id-Type", 1), ("Subscription-Id-Data", "422029871217162")]),
        ("Multiple-Services-Indicator", 1),
        ("Multiple-Services-Credit-Control", [
            ("Requested-Service-Unit", []),
            ("Used-Service-Unit", [
                ("CC-Total-Octets", 3276800), ("CC-Input-Octets", 1638400), ("CC-Output-Octets", 1638400),
            ]),
            ("Rating-Group", 99),
            ("Reporting-Reason", 3),
        ]),
        ("User-Equipment-Info", [("User-Equipment-Info-Type", 0),
                                 ("User-Equipment-Info-Value", bytes.fromhex("3582400322437348"))]),
        ("Service-Information", [("PS-Information", ps_information)]),
        ("Route-Record", "dra1.example.net"),
        ("Proxy-Info", [("Proxy-Host", "dra1.example.net"), ("Proxy-State", b"\x01" * 40)]),
    ]
    return encode_message(272, 4, 0xC0, 0x49FCE41D, 0xB4B87A1C, avps)


def read_fields(message) -> tuple:
    """What the charging logic reads from a CCR-U."""
    session_id = message.session_id
    request_type = message.get("CC-Request-Type")
    request_number = message.get("CC-Request-Number")
    reads = []
    for mscc in message.find_all("Multiple-Services-Credit-Control"):
        rating_group = mscc.get("Rating-Group")
        used = [(u.get("CC-Total-Octets"), u.get("CC-Input-Octets"), u.get("CC-Output-Octets"))
                for u in mscc.find_all("Used-Service-Unit")]
        requested = mscc.find("Requested-Service-Unit")
        reads.append((rating_group, used, requested is not None, mscc.get("Reporting-Reason")))
    return session_id, request_type, request_number, reads


def encode_cca(request) -> bytes:
    """The CCA for that CCR-U: one MSCC with GSU and Validity-Time, Proxy-Info echoed."""
    avps = [
        ("Session-Id", request.session_id),
        ("Result-Code", 2001),
        ("Origin-Host", "ocs1.ocs.example.net"),
        ("Origin-Realm", "ocs.example.net"),
        ("Auth-Application-Id", 4),
        ("CC-Request-Type", 2),
        ("CC-Request-Number", 1),
        ("Multiple-Services-Credit-Control", [
            ("Granted-Service-Unit", [("CC-Total-Octets", 10485760)]),
            ("Rating-Group", 99),
            ("Validity-Time", 3600),
            ("Result-Code", 2001),
        ]),
    ]
    avps.extend(p.raw for p in request.find_all("Proxy-Info"))
    return encode_answer(request, avps)


def one_ccr(frame: bytes) -> bytes:
    request = decode_message(frame)
    validate(request)  # the peer layer runs it on every request before the handler sees it
    read_fields(request)
    return encode_cca(request)


def measure(label: str, statement, number: int) -> float:
    best = min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6
    print(f"{label:<58} {best:7.2f} µs/op")
    return best


def main() -> None:
    frame = build_ccr_u()
    request = decode_message(frame)
    print(f"CCR-U: {len(frame)} bytes, {len(request.avps)} top-level AVPs; "
          f"CCA: {len(encode_cca(request))} bytes")
    decoded = measure("decode CCR-U header + top-level walk", lambda: decode_message(frame), 20000)
    measure("decode CCR-U + read Session-Id, CC-Req-*, MSCC/RG/USU/RSU",
            lambda: read_fields(decode_message(frame)), 20000)
    validated = measure("decode CCR-U + validate (RFC 6733 5001/5014 walk), groups seen before",
                        lambda: validate(decode_message(frame)), 20000)
    print(f"{'  of which validate':<58} {validated - decoded:7.2f} µs/op")
    first = measure("decode CCR-U + validate, its groups never seen before",
                    lambda: (_PASSED_GROUPS.clear(), validate(decode_message(frame))), 20000)
    print(f"{'  of which validate':<58} {first - decoded:7.2f} µs/op")
    measure("encode CCA (MSCC with GSU + Validity-Time, Proxy-Info)", lambda: encode_cca(request), 20000)
    measure("decode + validate + read + encode (one CCR's codec cost)", lambda: one_ccr(frame), 10000)


if __name__ == "__main__":
    main()
