"""Rating keys taken from a request: destination digits, serving network (MCC-MNC), service context kind.

Pure functions over values the caller has already decoded (strings, bytes); nothing here knows Diameter
messages or does I/O. `PrefixTable` is the longest-prefix match used for destinations (tens of thousands of
prefixes) and for roaming zones (MCC or MCC-MNC prefixes): a dict of prefixes plus, per leading two
digits, the distinct lengths of the prefixes that start with them, longest first, so a lookup costs at most
one dict probe per distinct length ≤ len(digits) — O(length of the number), whatever the number of prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "CONTEXT_KINDS",
    "SERVICE_KINDS",
    "PrefixTable",
    "normalize_number",
    "normalize_plmn",
    "plmn_from_user_location_info",
    "service_context_kind",
]

# what a Service-Context-Id is for, as a tariff condition names it
SERVICE_KINDS = ("data", "voice", "sms", "content")
# 3GPP Service-Context-Id (digest §3.6): the TS number (last label before "@3gpp.org") → kind
CONTEXT_KINDS = {
    "32251": "data",  # PS domain (Gy)
    "32260": "voice",  # IMS
    "32275": "voice",  # MMTel
    "32276": "voice",  # VCS (circuit-switched voice)
    "32274": "sms",  # SMS
    "32270": "content",  # MMS
}
_DROP_SEPARATORS = str.maketrans("", "", " -.()/")  # visual separators in a dialled number


class PrefixTable:
    """Longest-prefix match of digit strings onto values; the empty prefix "" matches everything."""

    __slots__ = ("_by_lead", "_short", "_values")

    _LEAD = 2  # prefixes are grouped by their first two digits

    def __init__(self, prefixes: Mapping[str, str]) -> None:
        self._values = dict(prefixes)
        lead = self._LEAD
        by_lead: dict[str, set[int]] = {}
        for prefix in self._values:
            if len(prefix) >= lead:
                by_lead.setdefault(prefix[:lead], set()).add(len(prefix))
        # prefixes shorter than the lead ("", "1") are tried after the bucket's, for every number
        self._short = tuple(sorted({len(p) for p in self._values if len(p) < lead}, reverse=True))
        self._by_lead = {key: tuple(sorted(lengths, reverse=True)) for key, lengths in by_lead.items()}

    def __len__(self) -> int:
        return len(self._values)

    def _lengths(self, digits: str) -> tuple[int, ...]:
        return self._by_lead.get(digits[: self._LEAD], ()) + self._short

    def longest_match(self, digits: str) -> str | None:
        """The value of the longest prefix of `digits` in the table, or None."""
        values = self._values
        size = len(digits)
        for length in self._by_lead.get(digits[:2], ()):
            if length <= size:
                found = values.get(digits[:length])
                if found is not None:
                    return found
        for length in self._short:
            if length <= size:
                found = values.get(digits[:length])
                if found is not None:
                    return found
        return None

    def matching_prefix(self, digits: str) -> str | None:
        """The longest prefix itself (for explanations)."""
        size = len(digits)
        for length in self._lengths(digits):
            if length <= size and digits[:length] in self._values:
                return digits[:length]
        return None


def normalize_number(address: str, country_code: str = "", national_prefix: str = "0",
                     international_prefix: str = "00") -> str | None:
    """Called-Party-Address / Recipient-Address → international digits without "+", or None (no number).

    Accepts "tel:+49 170 1234567", "sip:+491701234567@ims.example;user=phone", "00491701234567",
    "01701234567" (national: the card's country code replaces the national prefix) and bare digits (taken
    as international). Visual separators (space - . ( ) /) are dropped; any other character means the
    address is not a number (e.g. sip:alice@example.net) and gives None.
    """
    text = address
    plus = False
    if text.isdigit():
        pass
    elif text[:1] == "+" and text[1:].isdigit():
        plus, text = True, text[1:]
    else:
        text = text.strip()
        if ":" in text[:5]:
            lower = text[:5].lower()
            for scheme in ("tel:", "sips:", "sip:"):
                if lower.startswith(scheme):
                    text = text[len(scheme):]
                    break
        if ";" in text:
            text = text.split(";", 1)[0]
        if "@" in text:
            text = text.split("@", 1)[0]
        if text.startswith("+"):
            plus, text = True, text[1:]
        if not text.isdigit():
            text = text.translate(_DROP_SEPARATORS)
            if not text.isdigit():
                return None
    if not text.isascii():
        return None
    digits = text
    if plus:
        return digits
    if international_prefix and digits.startswith(international_prefix):
        return digits[len(international_prefix):] or None
    if country_code and national_prefix and digits.startswith(national_prefix):
        return country_code + digits[len(national_prefix):]
    return digits


def normalize_plmn(value: str | bytes | None) -> str | None:
    """3GPP-SGSN-MCC-MNC ("26201", "310260", as text or its ASCII bytes) → the digits, or None."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    return value if value.isdigit() and value.isascii() and 5 <= len(value) <= 6 else None


def plmn_from_user_location_info(value: bytes | None) -> str | None:
    """The serving MCC-MNC from 3GPP-User-Location-Info (TS 29.061 §16.4.7.2): after the one-octet
    Geographic-Location-Type, every location type starts with the PLMN in TS 24.008 BCD
    (MCC2 MCC1 | MNC3 MCC3 | MNC2 MNC1, MNC3 = F for a two-digit MNC). None when it cannot be read."""
    if value is None or len(value) < 4:
        return None
    b1, b2, b3 = value[1], value[2], value[3]
    mcc = (b1 & 0x0F, b1 >> 4, b2 & 0x0F)
    mnc3 = b2 >> 4
    mnc = (b3 & 0x0F, b3 >> 4) if mnc3 == 0x0F else (b3 & 0x0F, b3 >> 4, mnc3)
    if any(d > 9 for d in mcc + mnc):
        return None
    return "".join(map(str, mcc + mnc))


def service_context_kind(context_id: str | None, overrides: Mapping[str, str] | None = None) -> str | None:
    """Service-Context-Id → one of SERVICE_KINDS (or None when unknown).

    `overrides` (the card's service_contexts table) maps a full Service-Context-Id or "<label>@<domain>"
    (e.g. "gprs@cmcc.com") to a kind; 3GPP ones are matched by the last label before "@3gpp.org", so
    "8.32251@3gpp.org" and "302.220.8.32251@3gpp.org" are both data. A kind name itself ("voice") is
    accepted as is, for callers that already know it.
    """
    if not context_id:
        return None
    if context_id in SERVICE_KINDS:
        return context_id
    local, _, domain = context_id.partition("@")
    label = local.rsplit(".", 1)[-1]
    if overrides:
        kind = overrides.get(context_id) or overrides.get(f"{label}@{domain}".lower())
        if kind is not None:
            return kind
    if domain.lower() == "3gpp.org":
        return CONTEXT_KINDS.get(label)
    return None
