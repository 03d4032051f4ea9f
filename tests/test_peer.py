"""The sans-IO peer state machine: capabilities exchange, watchdog, disconnect and protocol-error answers.

No sockets: bytes go in, bytes and events come out, and `now` is driven by hand. Real captured messages
from ../shared/vectors are used wherever one exists; the rest is built with our codec.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from protocol.codec import (
    FLAG_ERROR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    Message,
    decode_message,
    encode_answer,
    encode_message,
)
from protocol.events import (
    AnswerReceived,
    AnswerUndecodable,
    ConnectionClosed,
    PeerOpened,
    PeerRestarted,
    RequestReceived,
)
from protocol.peer import (
    DEFAULT_TRANSITIONS,
    TRANSITIONS,
    Input,
    PeerConnection,
    PeerSettings,
    PeerState,
    PeerStateError,
    WatchdogState,
)

SETTINGS = PeerSettings(
    origin_host="ocs.test.net",
    origin_realm="test.net",
    host_ip_addresses=("192.0.2.10", "2001:db8::10"),
    vendor_id=32473,
    origin_state_id=77,
)
GW_HOST = "gw1.test.net"
PROXY_INFO = ("Proxy-Info", [("Proxy-Host", "dra.test.net"), ("Proxy-State", b"\x01\x02state")])


# ------------------------------------------------------------------------------------------- helpers


def vector(shared_dir, name: str) -> bytes:
    return (shared_dir / "vectors" / f"{name}.bin").read_bytes()


def cer(*, avps: list | None = None, hbh: int = 0x1111, extra: list | None = None) -> bytes:
    if avps is None:
        avps = [
            ("Origin-Host", GW_HOST),
            ("Origin-Realm", "test.net"),
            ("Host-IP-Address", "198.51.100.7"),
            ("Vendor-Id", 10415),
            ("Product-Name", "gw"),
            ("Origin-State-Id", 5),
            ("Auth-Application-Id", 4),
        ]
    return encode_message(257, 0, FLAG_REQUEST, hbh, 0x2222, avps + (extra or []))


def ccr(
    *,
    command: int = 272,
    app: int = 4,
    flags: int = FLAG_REQUEST | FLAG_PROXIABLE,
    hbh: int = 0xA1,
    extra: list | None = None,
) -> bytes:
    avps = [
        ("Session-Id", "gw1;1;1"),
        ("Origin-Host", GW_HOST),
        ("Origin-Realm", "test.net"),
        ("Destination-Realm", "test.net"),
        ("Auth-Application-Id", app),
        ("Service-Context-Id", "32251@3gpp.org"),
        ("CC-Request-Type", 1),
        ("CC-Request-Number", 0),
        PROXY_INFO,
    ]
    return encode_message(command, app, flags, hbh, 0xE1, avps + (extra or []))


def frames(data: bytes) -> list[Message]:
    """Split what the connection sent into decoded messages."""
    out, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset + 1 : offset + 4], "big")
        out.append(decode_message(data[offset : offset + length]))
        offset += length
    return out


def one_answer(conn: PeerConnection) -> Message:
    sent = frames(conn.data_to_send())
    assert len(sent) == 1, sent
    return sent[0]


def drain(conn: PeerConnection) -> list:
    return list(iter(conn.next_event, None))


def open_peer(settings: PeerSettings = SETTINGS, now: float = 0.0, **kwargs) -> PeerConnection:
    conn = PeerConnection(settings, "198.51.100.7", now, rng=random.Random(7), **kwargs)
    conn.receive_data(cer(), now)
    assert one_answer(conn).get("Result-Code") == 2001
    assert isinstance(drain(conn)[0], PeerOpened)
    return conn


def proxy_infos(message: Message) -> list[bytes]:
    return [avp.raw for avp in message.find_all("Proxy-Info")]


def expected_proxy_info() -> list[bytes]:
    return proxy_infos(decode_message(ccr()))


# -------------------------------------------------------------------------------- the tables themselves


def test_every_live_state_has_an_entry_for_every_input():
    for state in (PeerState.WAIT_CER, PeerState.OPEN, PeerState.CLOSING):
        for event in Input:
            assert (state, event) in TRANSITIONS, (state, event)
    assert DEFAULT_TRANSITIONS[PeerState.CLOSED] == (PeerState.CLOSED, "_discard")


def test_settings_refuse_a_watchdog_below_six_seconds():
    with pytest.raises(ValueError):
        PeerSettings(origin_host="a", origin_realm="b", watchdog_seconds=5)


# ------------------------------------------------------------------------------- capabilities exchange


@pytest.mark.parametrize(
    ("name", "result_code"),
    [
        ("godiam_cer", 2001),  # Auth-Application-Id 4 and VSAI{10415, 4}
        ("bromelia_cer_hss", 5010),  # HSS applications only
        ("bromelia_cer_dsr", 2001),  # relay application id
        ("pyhss_cer", 2001),  # relay id among VSAIs for other applications
        ("pydiam_cer_gy_relay", 2001),  # Auth- and Acct-Application-Id 4
    ],
)
def test_real_cers(shared_dir, name, result_code):
    request = vector(shared_dir, name)
    conn = PeerConnection(SETTINGS, "10.0.0.1", 100.0)
    conn.receive_data(request, 100.0)
    cea = one_answer(conn)
    sent = decode_message(request)
    assert cea.get("Result-Code") == result_code
    assert (cea.command_code, cea.hop_by_hop, cea.end_to_end) == (257, sent.hop_by_hop, sent.end_to_end)
    assert not cea.is_request and not cea.is_error
    events = drain(conn)
    if result_code == 2001:
        assert conn.state is PeerState.OPEN and not conn.should_close
        assert events == [
            PeerOpened(sent.get("Origin-Host"), sent.get("Origin-Realm"), sent.get("Origin-State-Id"), (4,))
        ]
        assert conn.peer_origin_host == sent.get("Origin-Host")
    else:
        assert conn.state is PeerState.CLOSED and conn.should_close
        assert events == [ConnectionClosed("capabilities exchange refused (5010)")]


def test_cea_carries_our_capabilities():
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.receive_data(cer(), 0.0)
    cea = one_answer(conn)
    assert [avp.name for avp in cea.avps] == [
        "Result-Code",
        "Origin-Host",
        "Origin-Realm",
        "Host-IP-Address",
        "Host-IP-Address",
        "Vendor-Id",
        "Product-Name",
        "Origin-State-Id",
        "Supported-Vendor-Id",
        "Auth-Application-Id",
        "Firmware-Revision",
    ]
    assert cea.get("Origin-Host") == "ocs.test.net" and cea.get("Origin-Realm") == "test.net"
    assert [a.value for a in cea.find_all("Host-IP-Address")] == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::10"),
    ]
    assert cea.get("Vendor-Id") == 32473 and cea.get("Product-Name") == "ocs"
    assert cea.get("Origin-State-Id") == 77 and cea.get("Firmware-Revision") == 1
    assert cea.get("Auth-Application-Id") == 4 and cea.get("Supported-Vendor-Id") == 10415


def test_cea_advertises_the_vendor_specific_application_only_when_configured():
    settings = PeerSettings(origin_host="ocs", origin_realm="r", advertise_vendor_specific_application=True)
    conn = PeerConnection(settings, "198.51.100.7", 0.0)
    conn.receive_data(cer(), 0.0)
    vsai = one_answer(conn).find("Vendor-Specific-Application-Id")
    assert vsai is not None
    assert (vsai.get("Vendor-Id"), vsai.get("Auth-Application-Id")) == (10415, 4)


def test_vsai_alone_counts_whatever_its_vendor():
    avps = [
        ("Origin-Host", GW_HOST),
        ("Origin-Realm", "test.net"),
        ("Host-IP-Address", "198.51.100.7"),
        ("Vendor-Id", 10415),
        ("Product-Name", "gw"),
        ("Vendor-Specific-Application-Id", [("Vendor-Id", 5535), ("Auth-Application-Id", 4)]),
    ]
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.receive_data(cer(avps=avps), 0.0)
    assert one_answer(conn).get("Result-Code") == 2001


def test_unknown_peer_gets_3010_with_the_e_bit_and_is_closed():
    settings = PeerSettings(origin_host="ocs", origin_realm="r", allowed_peers=("pgw.test.net", "10.9.9.9"))
    conn = PeerConnection(settings, "198.51.100.7", 0.0)
    conn.receive_data(cer(), 0.0)
    cea = one_answer(conn)
    assert cea.get("Result-Code") == 3010 and cea.is_error
    assert conn.should_close and drain(conn) == [ConnectionClosed("capabilities exchange refused (3010)")]


@pytest.mark.parametrize("allowed", [("GW1.Test.NET",), ("198.51.100.7",)])
def test_allowed_peer_by_host_name_case_insensitive_or_by_address(allowed):
    settings = PeerSettings(origin_host="ocs", origin_realm="r", allowed_peers=allowed)
    conn = PeerConnection(settings, "198.51.100.7", 0.0)
    conn.receive_data(cer(), 0.0)
    assert one_answer(conn).get("Result-Code") == 2001


def test_cer_without_host_ip_address_gets_5005_with_a_zero_filled_failed_avp():
    avps = [("Origin-Host", GW_HOST), ("Origin-Realm", "r"), ("Vendor-Id", 1), ("Product-Name", "gw")]
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.receive_data(cer(avps=avps + [("Auth-Application-Id", 4)]), 0.0)
    cea = one_answer(conn)
    assert cea.get("Result-Code") == 5005 and not cea.is_error
    failed = cea.find("Failed-AVP").children
    assert [(a.code, a.data) for a in failed] == [(257, b"\x00\x01\x00\x00\x00\x00")]
    assert conn.should_close


def test_cer_offering_only_tls_gets_5017():
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.receive_data(cer(extra=[("Inband-Security-Id", 1)]), 0.0)
    assert one_answer(conn).get("Result-Code") == 5017 and conn.should_close


def test_request_before_cer_closes_without_an_answer(shared_dir):
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.receive_data(vector(shared_dir, "optiva_ccr_i") + cer(), 0.0)
    assert conn.data_to_send() == b""
    assert conn.state is PeerState.CLOSED and conn.should_close
    assert drain(conn) == [ConnectionClosed("first message was not a CER")]


def test_no_cer_in_time_closes():
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    assert conn.get_timer() == SETTINGS.cer_timeout_seconds
    conn.handle_timer(SETTINGS.cer_timeout_seconds)
    assert conn.should_close and drain(conn) == [ConnectionClosed("no CER received in time")]
    assert conn.get_timer() is None


def test_second_cer_is_answered_5012_and_the_connection_stays(shared_dir):
    conn = open_peer()
    conn.receive_data(cer(hbh=0x42, avps=None), 1.0)
    answer = one_answer(conn)
    assert answer.get("Result-Code") == 5012 and not answer.is_error and answer.hop_by_hop == 0x42
    assert conn.state is PeerState.OPEN and not conn.should_close


def test_second_cer_with_a_new_origin_state_id_reports_a_restart():
    conn = open_peer()
    new = cer(hbh=9, avps=[("Origin-Host", GW_HOST), ("Origin-State-Id", 6)])
    conn.receive_data(new, 1.0)
    assert one_answer(conn).get("Result-Code") == 5012
    assert drain(conn) == [PeerRestarted(GW_HOST, 5, 6)]


def test_identifiers_for_our_requests():
    conn = PeerConnection(SETTINGS, "198.51.100.7", float(0x12345), rng=random.Random(1))
    first, second = conn.next_end_to_end(), conn.next_end_to_end()
    assert first >> 20 == 0x345 and second == first + 1
    hbh = conn.next_hop_by_hop()
    assert conn.next_hop_by_hop() == (hbh + 1) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------- watchdog


def test_dwr_is_answered_with_dwa(shared_dir):
    conn = open_peer()
    request = vector(shared_dir, "pyhss_dwr")
    conn.receive_data(request, 1.0)
    dwa = one_answer(conn)
    sent = decode_message(request)
    assert (dwa.command_code, dwa.flags, dwa.hop_by_hop, dwa.end_to_end) == (
        280,
        0,
        sent.hop_by_hop,
        sent.end_to_end,
    )
    assert dwa.get("Result-Code") == 2001 and dwa.get("Origin-State-Id") == 77
    assert dwa.get("Origin-Host") == "ocs.test.net"
    assert drain(conn) == []


def test_origin_state_id_change_in_dwr_reports_a_restart(shared_dir):
    conn = open_peer()  # the CER said Origin-State-Id 5
    conn.receive_data(vector(shared_dir, "p2j_dwr_pcef"), 1.0)  # Origin-State-Id 1410781750
    assert one_answer(conn).get("Result-Code") == 2001
    assert drain(conn) == [PeerRestarted(GW_HOST, 5, 1410781750)]
    assert conn.peer_origin_state_id == 1410781750


def test_watchdog_sends_dwr_then_suspects_then_closes():
    conn = open_peer(now=1000.0)
    first = conn.get_timer()
    assert 1000.0 + 28 <= first <= 1000.0 + 32  # Tw 30 s ± 2 s jitter
    conn.handle_timer(first - 0.5)  # early: nothing happens
    assert conn.data_to_send() == b"" and conn.watchdog_state is WatchdogState.OKAY

    conn.handle_timer(first)
    dwr = one_answer(conn)
    assert (dwr.command_code, dwr.application_id, dwr.is_request) == (280, 0, True)
    assert dwr.get("Origin-Host") == "ocs.test.net" and dwr.get("Origin-State-Id") == 77
    assert conn.watchdog_state is WatchdogState.PENDING

    second = conn.get_timer()
    assert 28 <= second - first <= 32
    conn.handle_timer(second)
    assert conn.watchdog_state is WatchdogState.SUSPECT and conn.data_to_send() == b""
    assert conn.state is PeerState.OPEN

    conn.handle_timer(conn.get_timer())
    assert conn.state is PeerState.CLOSED and conn.should_close
    assert drain(conn) == [ConnectionClosed("watchdog")]


def test_dwa_clears_the_watchdog_and_any_message_resets_the_timer():
    conn = open_peer()
    first = conn.get_timer()
    conn.receive_data(ccr(), first - 1)  # traffic pushes the timer back
    assert conn.get_timer() > first
    assert [type(e) for e in drain(conn)] == [RequestReceived]
    conn.handle_timer(conn.get_timer())
    dwr = one_answer(conn)
    conn.handle_timer(conn.get_timer())
    assert conn.watchdog_state is WatchdogState.SUSPECT
    # A CCR from a suspect peer brings it back, but our DWR is still unanswered.
    conn.receive_data(ccr(hbh=2), conn.get_timer() - 1)
    assert conn.watchdog_state is WatchdogState.PENDING
    dwa = encode_answer(dwr, [("Result-Code", 2001), ("Origin-Host", GW_HOST), ("Origin-Realm", "r")])
    conn.receive_data(dwa, conn.get_timer() - 1)
    assert conn.watchdog_state is WatchdogState.OKAY
    assert [type(e) for e in drain(conn)] == [RequestReceived]
    assert conn.data_to_send() == b""


# ----------------------------------------------------------------------------------------- disconnect


def test_dpr_from_the_peer_is_answered_and_the_connection_closes(shared_dir):
    conn = open_peer()
    request = vector(shared_dir, "bromelia_dpr")
    conn.receive_data(request, 1.0)
    dpa = one_answer(conn)
    assert dpa.command_code == 282 and dpa.get("Result-Code") == 2001
    assert dpa.hop_by_hop == decode_message(request).hop_by_hop
    assert conn.state is PeerState.CLOSED and conn.should_close
    assert drain(conn) == [ConnectionClosed("peer disconnected (DPR, cause 0)")]
    conn.receive_data(ccr(), 2.0)  # nothing is parsed any more
    assert conn.data_to_send() == b"" and drain(conn) == []


def test_dpa_waits_for_the_answers_the_application_still_owes(shared_dir):
    conn = open_peer()
    conn.receive_data(ccr(hbh=1) + ccr(hbh=2) + vector(shared_dir, "bromelia_dpr"), 1.0)
    assert conn.data_to_send() == b"" and conn.should_close
    conn.send_answer(b"A" * 20)
    assert conn.data_to_send() == b"A" * 20
    conn.send_answer(b"B" * 20)
    sent = conn.data_to_send()
    assert sent[:20] == b"B" * 20 and decode_message(sent[20:]).command_code == 282


def test_our_dpr_then_dpa_closes():
    conn = open_peer()
    conn.disconnect(2, 5.0)
    dpr = one_answer(conn)
    assert (dpr.command_code, dpr.is_request, dpr.get("Disconnect-Cause")) == (282, True, 2)
    assert dpr.get("Origin-Host") == "ocs.test.net"
    assert conn.state is PeerState.CLOSING and conn.get_timer() == 5.0 + SETTINGS.disconnect_timeout_seconds
    # requests still arriving while closing are delivered
    conn.receive_data(ccr(), 5.5)
    assert [type(e) for e in drain(conn)] == [RequestReceived]
    conn.receive_data(encode_answer(dpr, [("Result-Code", 2001), ("Origin-Host", GW_HOST)]), 6.0)
    assert conn.state is PeerState.CLOSED and conn.should_close
    assert drain(conn) == [ConnectionClosed("disconnected (DPA, cause 2)")]


def test_our_dpr_without_dpa_times_out():
    conn = open_peer()
    conn.disconnect(0, 5.0)
    conn.data_to_send()
    conn.handle_timer(conn.get_timer())
    assert conn.should_close and drain(conn) == [ConnectionClosed("no DPA received in time")]


def test_disconnect_before_cer_just_closes():
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.disconnect(0, 1.0)
    assert conn.data_to_send() == b"" and conn.should_close


# -------------------------------------------------------------------------- application requests/answers


def test_valid_request_becomes_an_event_and_its_answer_goes_out():
    conn = open_peer()
    conn.receive_data(ccr(), 1.0)
    (event,) = drain(conn)
    assert isinstance(event, RequestReceived) and event.message.session_id == "gw1;1;1"
    assert conn.data_to_send() == b""
    conn.send_answer(b"answer-bytes")
    assert conn.data_to_send() == b"answer-bytes"


def test_many_requests_in_one_read_give_many_events():
    conn = open_peer()
    conn.receive_data(b"".join(ccr(hbh=i) for i in range(50)), 1.0)
    assert [e.message.hop_by_hop for e in drain(conn)] == list(range(50))


@pytest.mark.parametrize(
    ("request_bytes", "result_code"),
    [
        (ccr(flags=FLAG_REQUEST | FLAG_ERROR), 3008),  # E bit in a request
        (ccr(command=275), 3001),  # STR is not a credit-control command
        (ccr(app=0, command=999), 3001),  # unknown base protocol command
        (ccr(app=16777238), 3007),  # Gx
    ],
)
def test_header_errors_get_e_bit_answers_with_proxy_info(request_bytes, result_code):
    conn = open_peer()
    conn.receive_data(request_bytes, 1.0)
    answer = one_answer(conn)
    request = decode_message(request_bytes)
    assert answer.get("Result-Code") == result_code and answer.is_error and not answer.is_request
    assert (answer.command_code, answer.application_id) == (request.command_code, request.application_id)
    assert (answer.hop_by_hop, answer.end_to_end) == (request.hop_by_hop, request.end_to_end)
    assert answer.session_id == "gw1;1;1" and answer.avps[0].name == "Session-Id"
    assert proxy_infos(answer) == expected_proxy_info()
    assert drain(conn) == [] and conn.state is PeerState.OPEN


def test_gx_ccr_to_our_gy_peer_gets_3007(shared_dir):
    conn = open_peer()
    request = vector(shared_dir, "p2j_gx_ccr_i")
    conn.receive_data(request, 1.0)
    answer = one_answer(conn)
    assert answer.get("Result-Code") == 3007 and answer.is_error and answer.is_proxiable
    assert answer.application_id == 16777238
    assert answer.session_id == decode_message(request).session_id
    assert answer.get("Origin-Host") == "ocs.test.net"


def test_unknown_mandatory_avp_gets_5001_with_failed_avp_and_proxy_info(shared_dir):
    conn = open_peer()
    request = vector(shared_dir, "optiva_ccr_i")  # vendor-12645 AVP 256 with V+M
    conn.receive_data(request, 1.0)
    answer = one_answer(conn)
    assert answer.get("Result-Code") == 5001 and not answer.is_error
    (failed,) = answer.find("Failed-AVP").children
    assert (failed.code, failed.vendor) == (256, 12645)
    assert proxy_infos(answer) == proxy_infos(decode_message(request)) and len(proxy_infos(answer)) == 1
    assert drain(conn) == []


def test_allow_listed_vendor_passes(shared_dir):
    settings = PeerSettings(
        origin_host="ocs", origin_realm="r", unknown_mandatory_vendor_allowlist=frozenset({12645})
    )
    conn = open_peer(settings)
    conn.receive_data(vector(shared_dir, "optiva_ccr_i"), 1.0)
    assert conn.data_to_send() == b""
    (event,) = drain(conn)
    assert event.message.session_id == "diacl;3832384998;0"


def test_avp_running_past_the_message_gets_5014_with_proxy_info():
    good = ccr()
    broken_avp = (461).to_bytes(4, "big") + b"\x40" + (200).to_bytes(3, "big")
    request = bytearray(good + broken_avp)
    request[1:4] = len(request).to_bytes(3, "big")
    conn = open_peer()
    conn.receive_data(bytes(request), 1.0)
    answer = one_answer(conn)
    assert answer.get("Result-Code") == 5014 and not answer.is_error
    (failed,) = answer.find("Failed-AVP").children
    assert failed.code == 461
    # salvaged from the part of the request that could be read
    assert answer.session_id == "gw1;1;1" and proxy_infos(answer) == expected_proxy_info()
    assert conn.state is PeerState.OPEN


def test_fixed_size_avp_with_a_wrong_length_gets_5014():
    bad = (415).to_bytes(4, "big") + b"\x40" + (11).to_bytes(3, "big") + b"\x00\x00\x01\x00"
    conn = open_peer()
    conn.receive_data(ccr(extra=[bad[:11]]), 1.0)
    answer = one_answer(conn)
    assert answer.get("Result-Code") == 5014
    assert answer.find("Failed-AVP").children[0].code == 415
    assert proxy_infos(answer) == expected_proxy_info()


def test_answers_to_our_requests_are_matched_by_hop_by_hop():
    conn = open_peer()
    hbh = conn.next_hop_by_hop()
    rar = encode_message(
        258,
        4,
        FLAG_REQUEST | FLAG_PROXIABLE,
        hbh,
        conn.next_end_to_end(),
        [("Session-Id", "gw1;1;1"), ("Origin-Host", "ocs.test.net"), ("Re-Auth-Request-Type", 0)],
    )
    conn.send_request(rar, 1.0)
    assert conn.data_to_send() == rar and conn.outstanding_requests == 1
    raa = encode_answer(decode_message(rar), [("Session-Id", "gw1;1;1"), ("Result-Code", 2002)])
    stray = encode_answer(decode_message(ccr(command=258, hbh=hbh + 100)), [("Result-Code", 2001)])
    conn.receive_data(stray + raa, 2.0)
    (event,) = drain(conn)
    assert isinstance(event, AnswerReceived) and event.message.get("Result-Code") == 2002
    assert conn.outstanding_requests == 0


def test_undecodable_answer_to_our_request_is_reported():
    conn = open_peer()
    hbh = conn.next_hop_by_hop()
    conn.send_request(encode_message(258, 4, FLAG_REQUEST, hbh, 1, [("Session-Id", "s")]), 1.0)
    broken = bytearray(encode_message(258, 4, 0, hbh, 1, []) + (263).to_bytes(4, "big") + b"\x40\x00\x00\x40")
    broken[1:4] = len(broken).to_bytes(3, "big")
    conn.receive_data(bytes(broken), 2.0)
    (event,) = drain(conn)
    assert isinstance(event, AnswerUndecodable) and event.hop_by_hop == hbh


def test_requests_cannot_be_sent_before_the_capabilities_exchange():
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    with pytest.raises(PeerStateError):
        conn.send_request(ccr(), 0.0)


# -------------------------------------------------------------------------------------- broken framing


def header(version: int = 1, length: int = 20, flags: int = FLAG_REQUEST, command: int = 272) -> bytes:
    return (
        bytes([version])
        + length.to_bytes(3, "big")
        + bytes([flags])
        + command.to_bytes(3, "big")
        + (4).to_bytes(4, "big")
        + (0xABC).to_bytes(4, "big")
        + (0xDEF).to_bytes(4, "big")
    )


@pytest.mark.parametrize(
    ("data", "result_code"),
    [
        (header(version=2, length=20), 5011),
        (header(length=7), 5015),
        (header(length=22), 5015),
        (header(length=1 << 20), 5015),
    ],
)
def test_broken_frame_is_answered_and_closes(data, result_code):
    conn = open_peer()
    conn.receive_data(data + ccr(), 1.0)
    answer = one_answer(conn)
    assert answer.get("Result-Code") == result_code and not answer.is_error
    assert (answer.hop_by_hop, answer.end_to_end) == (0xABC, 0xDEF)
    assert conn.should_close and conn.state is PeerState.CLOSED
    (closed,) = drain(conn)  # the CCR behind the broken frame is never parsed
    assert isinstance(closed, ConnectionClosed) and closed.reason.startswith(f"broken frame ({result_code})")
    conn.receive_data(ccr(), 2.0)
    assert conn.data_to_send() == b"" and drain(conn) == []


def test_zero_length_without_a_header_closes_silently():
    conn = open_peer()
    conn.receive_data(b"\x01\x00\x00\x00", 1.0)
    assert conn.data_to_send() == b"" and conn.should_close


def test_broken_first_frame_is_answered_too():
    conn = PeerConnection(SETTINGS, "198.51.100.7", 0.0)
    conn.receive_data(header(version=2, command=257), 0.0)
    assert one_answer(conn).get("Result-Code") == 5011 and conn.should_close


def test_broken_answer_frame_is_not_answered():
    conn = open_peer()
    conn.receive_data(header(length=7, flags=0), 1.0)
    assert conn.data_to_send() == b"" and conn.should_close


def test_frames_split_across_reads():
    conn = open_peer()
    data = ccr(hbh=1) + ccr(hbh=2)
    for i in range(0, len(data), 7):
        conn.receive_data(data[i : i + 7], 1.0)
    assert [e.message.hop_by_hop for e in drain(conn)] == [1, 2]


def test_transport_loss_closes_and_drops_later_answers():
    conn = open_peer()
    conn.receive_data(ccr(), 1.0)
    drain(conn)
    conn.connection_lost(2.0)
    assert drain(conn) == [ConnectionClosed("transport lost")] and conn.get_timer() is None
    conn.send_answer(b"late")
    assert conn.data_to_send() == b""
