"""Rating keys: longest prefix match, number normalisation, MCC-MNC from User-Location-Info, context kinds."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ratecards import (
    PrefixTable,
    normalize_number,
    normalize_plmn,
    plmn_from_user_location_info,
    service_context_kind,
)

digits = st.text(alphabet="0123456789", min_size=0, max_size=8)


@settings(max_examples=300)
@given(st.dictionaries(digits, st.sampled_from(["a", "b", "c", "d"]), max_size=60),
       st.text(alphabet="0123456789", max_size=15))
def test_longest_prefix_match_equals_brute_force(table: dict[str, str], number: str) -> None:
    matches = [p for p in table if number.startswith(p)]
    expected = table[max(matches, key=len)] if matches else None
    assert PrefixTable(table).longest_match(number) == expected
    assert PrefixTable(table).matching_prefix(number) == (max(matches, key=len) if matches else None)


def test_longest_prefix_match_over_many_prefixes() -> None:
    table = {f"49{n:05d}": "de" for n in range(50_000)}
    table.update({"49": "de-other", "4967": "de-mobile", "": "world"})
    lookup = PrefixTable(table)
    assert len(lookup) == 50_003
    assert lookup.longest_match("4900012345") == "de"
    assert lookup.longest_match("4967123") == "de-mobile"
    assert lookup.longest_match("49") == "de-other"
    assert lookup.longest_match("1555") == "world"
    assert PrefixTable({"33": "fr"}).longest_match("1") is None


def test_normalize_number() -> None:
    de = {"country_code": "49"}
    assert normalize_number("+491701234567") == "491701234567"
    assert normalize_number("tel:+49-170-123 4567") == "491701234567"
    assert normalize_number("sip:+491701234567@ims.example.net;user=phone") == "491701234567"
    assert normalize_number("SIP:00491701234567@ims") == "491701234567"
    assert normalize_number("01701234567", **de) == "491701234567"
    assert normalize_number("01701234567") == "01701234567"  # no country code: taken as it is
    assert normalize_number("0033612345678", **de) == "33612345678"
    assert normalize_number("491701234567", **de) == "491701234567"
    assert normalize_number("(030) 1234", **de) == "49301234"
    assert normalize_number("sip:alice@example.net") is None
    assert normalize_number("") is None and normalize_number("tel:") is None


def test_normalize_plmn() -> None:
    assert normalize_plmn("26201") == "26201" and normalize_plmn(b"310260") == "310260"
    assert normalize_plmn(" 26201 ") == "26201"
    assert normalize_plmn("2620") is None and normalize_plmn("abcde") is None and normalize_plmn(None) is None
    assert normalize_plmn(b"\xff\xfe") is None


def test_plmn_from_user_location_info() -> None:
    # TAI+ECGI (130) in 262-01: MCC 2 6 2, MNC 0 1 with the filler F
    assert plmn_from_user_location_info(bytes([130, 0x62, 0xF2, 0x10]) + bytes(9)) == "26201"
    # three-digit MNC: 310-260
    assert plmn_from_user_location_info(bytes([128, 0x13, 0x00, 0x62, 0, 1])) == "310260"
    assert plmn_from_user_location_info(b"\x00\x62") is None
    assert plmn_from_user_location_info(bytes([1, 0xAB, 0xF2, 0x10])) is None  # not BCD


def test_user_location_info_of_the_captured_requests_matches_wireshark(shared_dir) -> None:
    """Every 3GPP-User-Location-Info in the decoded vectors gives the MCC/MNC Wireshark printed for it."""
    text = (shared_dir / "vectors" / "decoded" / "wireshark_4.0_all_vectors.txt").read_text(errors="replace")
    found = re.findall(r"val=MCC (\d{3})[^,\n]*, MNC (\d{2,3})[^\n]*\n(?:[^\n]*\n){0,20}?\s*"
                       r"3GPP-User-Location-Info: ([0-9a-f]+)", text)
    pairs = {(hexa, mcc + mnc) for mcc, mnc, hexa in found}
    assert pairs, "no User-Location-Info in the decoded vectors"
    for hexa, plmn in pairs:
        assert plmn_from_user_location_info(bytes.fromhex(hexa)) == plmn, hexa


def test_service_context_kind() -> None:
    assert service_context_kind("32251@3gpp.org") == "data"
    assert service_context_kind("8.32251@3gpp.org") == "data"
    assert service_context_kind("302.220.8.32260@3gpp.org") == "voice"
    assert service_context_kind("32274@3gpp.org") == "sms"
    assert service_context_kind("32270@3gpp.org") == "content"
    assert service_context_kind("32276@3GPP.ORG") == "voice"
    assert service_context_kind("gprs@cmcc.com") is None
    assert service_context_kind("gprs@cmcc.com", {"gprs@cmcc.com": "data"}) == "data"
    assert service_context_kind("6.gprs@cmcc.com", {"gprs@cmcc.com": "data"}) == "data"
    assert service_context_kind("voice") == "voice" and service_context_kind(None) is None
