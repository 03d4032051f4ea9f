"""The codec against the 29 real Diameter messages in ../shared/vectors and their independent decodes.

Each vector must decode to the same AVP tree (codes, vendors, flags, lengths, values) as the
independent decoder's output in vectors/decoded/*.txt, re-encode to its own bytes (non-zero padding
aside), and pass validate() except where the digest says it should not.
"""

from __future__ import annotations

import ast
import datetime
import ipaddress
import re
from pathlib import Path

import pytest

from protocol.codec import (
    Avp,
    DecodeError,
    Message,
    decode_avp,
    decode_message,
    encode_avp,
    encode_message,
    validate,
)
from protocol.dictionary import AvpType
from protocol.errors import error_answer
from tests.conftest import SHARED

VECTORS = SHARED / "vectors"
NAMES = sorted(path.stem for path in VECTORS.rglob("*.bin")) if VECTORS.is_dir() else []
NTP_OFFSET = 2_208_988_800


@pytest.fixture
def vectors(shared_dir: Path) -> Path:
    return shared_dir / "vectors"


def load(vectors: Path, name: str) -> bytes:
    [path] = vectors.rglob(f"{name}.bin")
    return path.read_bytes()


def test_all_29_vectors_are_found(vectors):
    assert len(NAMES) == 29


# ------------------------------------------------------------------------- the independent decodes

LINE = re.compile(
    r"^(?P<indent> *)(?P<name>\S+)\((?P<code>\d+)(?:/v(?P<vendor>\d+))?\) \[(?P<flags>[VMP-]+)\] "
    r"len=(?P<length>\d+)(?: = (?P<value>.*)| \{)$"
)


def parse_decoded(path: Path) -> tuple[dict, list[dict]]:
    """The header line and AVP tree of a decoded/*.txt file."""
    lines = path.read_text().splitlines()
    header = dict(re.findall(r"(\w+)=(\S+)", lines[1]))
    root: list[dict] = []
    stack: list[tuple[int, list[dict]]] = [(-1, root)]
    for line in lines[2:]:
        if not line.strip() or line.startswith("#") or line.strip() == "}":
            continue
        match = LINE.match(line)
        assert match, line
        depth = len(match["indent"])
        while stack[-1][0] >= depth:
            stack.pop()
        node = {"code": int(match["code"]), "vendor": int(match["vendor"] or 0), "flags": match["flags"],
                "length": int(match["length"]), "value": match["value"], "children": []}
        stack[-1][1].append(node)
        if match["value"] is None:
            stack.append((depth, node["children"]))
    return header, root


def flags_text(avp: Avp) -> str:
    letters = "".join(letter for bit, letter in ((0x80, "V"), (0x40, "M"), (0x20, "P")) if avp.flags & bit)
    return letters or "-"


def assert_tree(ours: list[Avp], theirs: list[dict], path: str) -> None:
    assert [(a.code, a.vendor) for a in ours] == [(t["code"], t["vendor"]) for t in theirs], path
    for avp, node in zip(ours, theirs, strict=True):
        where = f"{path}/{avp.name}"
        assert (avp.length, flags_text(avp)) == (node["length"], node["flags"]), where
        text = node["value"]
        if text is None:
            assert_tree(avp.children, node["children"], where)
            continue
        value = avp.value
        definition = avp.definition
        if text.startswith(("'", '"')):
            expected = ast.literal_eval(text)
            assert (value if isinstance(value, str) else avp.data.decode()) == expected, where
        elif text.startswith("0x"):
            assert avp.data.hex() == text[2:], where  # the other decoder shows raw bytes
        elif text.startswith("IPv"):
            assert value == ipaddress.ip_address(text.split()[1]), where
        elif definition is not None and definition.type is AvpType.TIME:
            assert (value + NTP_OFFSET) % 2**32 == int(text.split()[0]), where
        else:
            assert value == int(text.split()[0]), where


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_like_the_independent_decoder(vectors, name):
    frame = load(vectors, name)
    message = decode_message(frame)
    header, tree = parse_decoded(vectors / "decoded" / f"{name}.txt")
    assert message.length == int(header["length"]) == len(frame)
    assert message.flags == int(header["flags"].split("[")[0], 16)
    assert message.command_code == int(header["cmd"].split("(")[0])
    assert message.application_id == int(header["app"])
    assert (message.hop_by_hop, message.end_to_end) == (int(header["hbh"], 16), int(header["e2e"], 16))
    assert_tree(message.avps, tree, name)


# --------------------------------------------------------------------------------------- re-encoding

def reencode(avp: Avp) -> bytes:
    """Through the encoder, from decoded values, keeping each AVP's received M and P flags."""
    definition = avp.definition
    if definition is None:
        return avp.raw
    definition = definition._replace(mandatory=avp.mandatory)
    if definition.type is AvpType.GROUPED:
        encoded = bytearray(encode_avp(definition, [reencode(child) for child in avp.children]))
    else:
        encoded = bytearray(encode_avp(definition, avp.value))
    encoded[4] |= avp.flags & 0x20
    return bytes(encoded)


def zero_padded(avp: Avp) -> bytes:
    """The AVP as received but with zero padding, built from the decoded tree."""
    if avp.definition is not None and avp.definition.type is AvpType.GROUPED:
        header = avp.raw[: 12 if avp.vendor else 8]
        return header + b"".join(zero_padded(child) for child in avp.children)
    return avp.raw + b"\0" * (-len(avp.raw) % 4)


@pytest.mark.parametrize("name", NAMES)
def test_reencoding_the_decoded_tree_reproduces_the_bytes(vectors, name):
    frame = load(vectors, name)
    message = decode_message(frame)
    expected = message.raw[:20] + b"".join(zero_padded(avp) for avp in message.avps)
    assert (expected == frame) == (name != "godiam_ccr_i_psinfo")  # the one with non-zero padding
    rebuilt = encode_message(message.command_code, message.application_id, message.flags, message.hop_by_hop,
                             message.end_to_end, [reencode(avp) for avp in message.avps])
    assert rebuilt == expected


# ---------------------------------------------------------------------------------------- validate

@pytest.mark.parametrize("name", NAMES)
def test_every_vector_but_optiva_ccr_i_validates(vectors, name):
    message = decode_message(load(vectors, name))
    if name == "optiva_ccr_i":
        with pytest.raises(DecodeError) as caught:
            validate(message)
        assert caught.value.result_code == 5001
        failed = decode_avp(caught.value.failed_avp)
        assert (failed.code, failed.vendor, failed.flags, failed.data) == (256, 12645, 0xC0, b"\0\0\0\0")
    validate(message, unknown_mandatory_vendor_allowlist=frozenset({12645}))


# ------------------------------------------------------------------------------------- spot checks

def test_optiva_session_values(vectors):
    ccr_t = decode_message(load(vectors, "optiva_ccr_t"))
    assert ccr_t.session_id == "diacl;3832384998;0"
    assert (ccr_t.get("CC-Request-Type"), ccr_t.get("CC-Request-Number")) == (3, 2)
    assert ccr_t.get("Origin-Host") == "diacl" and ccr_t.get("Destination-Host") == "redscldp003b.ocs"
    [mscc] = ccr_t.find_all("Multiple-Services-Credit-Control")
    assert mscc.get("Rating-Group") == 99 and mscc.get("Reporting-Reason") == 2  # FINAL, at MSCC level
    [usu] = mscc.find_all("Used-Service-Unit")
    assert (usu.get("CC-Total-Octets"), usu.get("CC-Input-Octets"), usu.get("CC-Output-Octets")) == (
        3276800, 1638400, 1638400)
    assert [s.get("Subscription-Id-Data") for s in ccr_t.find_all("Subscription-Id")] == [
        "96871217162", "4220296871217162"]
    ps = ccr_t.find("Service-Information").find("PS-Information")
    assert ps.get("Called-Station-Id") == "taif" and ps.get("3GPP-RAT-Type") == b"\x06"
    assert ps.get("PDP-Address") == ipaddress.IPv4Address("10.180.160.27")
    assert ps.get("3GPP-Charging-Characteristics") == "0400"
    [proxy] = ccr_t.find_all("Proxy-Info")
    assert proxy.get("Proxy-Host") == "ipd-aio-0.ipd.oce83204.svc.cluster.local.arm.proxy.redknee.com"
    assert len(proxy.raw) == 188 and proxy.get("Proxy-State").startswith(b"\x01\x00")
    assert ccr_t.get("Event-Timestamp") == int(datetime.datetime(2023, 1, 24, 15, 37, 47,
                                                                  tzinfo=datetime.UTC).timestamp())
    ccr_u = decode_message(load(vectors, "optiva_ccr_u"))
    mscc = ccr_u.find("Multiple-Services-Credit-Control")
    assert ccr_u.get("CC-Request-Number") == 1 and mscc.get("Rating-Group") == 99
    assert mscc.find("Requested-Service-Unit").children == []  # empty RSU
    assert mscc.find("Used-Service-Unit") is None


def test_event_timestamp_example_of_the_digest(vectors):
    ccr = decode_message(load(vectors, "godiam_ccr_i_psinfo"))
    event = ccr.find("Event-Timestamp")
    assert event.data == bytes.fromhex("da12ca05")
    assert datetime.datetime.fromtimestamp(event.value, datetime.UTC) == datetime.datetime(
        2015, 12, 9, 15, 40, 53, tzinfo=datetime.UTC)
    assert ccr.get("Origin-Host") == "client" and ccr.get("Destination-Realm") == "realm"  # non-zero padding
    ps = ccr.find("Service-Information").find("PS-Information")
    assert ps.get("GGSN-Address") == ipaddress.IPv4Address("127.0.0.1") and ps.get("3GPP-RAT-Type") == b"01"


def test_reporting_reasons_and_final_unit_indication(vectors):
    eseye = decode_message(load(vectors, "eseye_ccr_u1"))
    mscc = eseye.find("Multiple-Services-Credit-Control")
    assert (mscc.get("Rating-Group"), mscc.get("Reporting-Reason")) == (1004, 3)
    assert mscc.find("Requested-Service-Unit").get("CC-Total-Octets") == 512000
    assert mscc.find("Used-Service-Unit").get("CC-Total-Octets") == 128000
    assert not eseye.find("Origin-Host").mandatory  # sent without M, still read
    cmcc = decode_message(load(vectors, "cmcc_ccr_u_validity_time"))
    assert cmcc.find("Multiple-Services-Credit-Control").get("Reporting-Reason") == 4
    p2j = decode_message(load(vectors, "p2j_gy_ccr_t"))
    mscc = p2j.find("Multiple-Services-Credit-Control")
    assert (mscc.get("Rating-Group"), mscc.get("Service-Identifier")) == (199, 199)
    assert p2j.get("Termination-Cause") == 1
    beeline = decode_message(load(vectors, "beeline_cca_fui_redirect"))
    assert beeline.get("Result-Code") == 2001 and beeline.get("Credit-Control-Failure-Handling") == 0
    mscc = beeline.find("Multiple-Services-Credit-Control")
    assert (mscc.get("Rating-Group"), mscc.get("Result-Code"), mscc.get("Validity-Time")) == (101, 5030, 60)
    fui = mscc.find("Final-Unit-Indication")
    server = fui.find("Redirect-Server")
    assert fui.get("Final-Unit-Action") == 1 and server.get("Redirect-Address-Type") == 2
    assert server.get("Redirect-Server-Address").startswith("https://balance.beeline.ru/")


def test_session_id_not_first_and_capabilities(vectors):
    assert decode_message(load(vectors, "diamrs_cca_min")).session_id == "ses;123"
    cer = decode_message(load(vectors, "godiam_cer"))
    assert cer.get("Auth-Application-Id") == 4 and cer.get("Supported-Vendor-Id") == 10415
    vsai = cer.find("Vendor-Specific-Application-Id")
    assert (vsai.get("Vendor-Id"), vsai.get("Auth-Application-Id")) == (10415, 4)
    assert isinstance(cer.get("Host-IP-Address"), ipaddress.IPv4Address)
    relay = decode_message(load(vectors, "bromelia_cer_dsr"))
    assert 0xFFFFFFFF in [a.value for a in relay.find_all("Auth-Application-Id")]
    cea = decode_message(load(vectors, "pydiam_cea_5012"))
    assert cea.get("Result-Code") == 5012
    assert cea.get("Error-Message") == "Invalid state to receive a new connection attempt."


def test_gx_request_gets_a_3007_answer_with_e_bit(vectors):
    request: Message = decode_message(load(vectors, "p2j_gx_ccr_i"))
    frame = error_answer(request.header, 3007, "ocs.example", "example", session_id=request.session_id,
                         error_message="application 16777238 is not supported",
                         proxy_infos=[p.raw for p in request.find_all("Proxy-Info")])
    answer = decode_message(frame)
    validate(answer)
    assert answer.flags == 0x60 and answer.application_id == 16777238  # P copied, E set, R clear
    assert (answer.hop_by_hop, answer.end_to_end) == (request.hop_by_hop, request.end_to_end)
    assert [a.name for a in answer.avps] == ["Session-Id", "Origin-Host", "Origin-Realm", "Result-Code",
                                             "Error-Message"]
    assert answer.get("Result-Code") == 3007


def test_unsupported_avp_answer_echoes_proxy_info(vectors):
    request = decode_message(load(vectors, "optiva_ccr_i"))
    with pytest.raises(DecodeError) as caught:
        validate(request)
    frame = error_answer(request.header, caught.value.result_code, "ocs.example", "example",
                         session_id=request.session_id, failed_avp=caught.value.failed_avp,
                         proxy_infos=[p.raw for p in request.find_all("Proxy-Info")])
    answer = decode_message(frame)
    assert answer.flags == 0x40  # 5xxx: no E bit
    assert answer.get("Result-Code") == 5001
    failed = answer.find("Failed-AVP").find((256, 12645))
    assert failed.raw == caught.value.failed_avp
    assert answer.find("Proxy-Info").raw == request.find("Proxy-Info").raw
