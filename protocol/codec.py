"""Diameter message codec (RFC 6733 §3, §4): lazy table-driven decoding and fast encoding.

Rules of this file:
- Everything is driven by protocol/dictionary.py; there is no code for any particular AVP.
- Decoding is lazy. `decode_message` walks the top-level AVP headers once and records offsets into the
  one immutable buffer; a grouped AVP's children and an AVP's typed value are decoded only when read,
  then cached. A CCR handler that reads ten AVPs pays for ten values, not for the whole tree.
- Decoding is liberal (non-zero padding, any M/P flags on known AVPs, any AVP order); `validate` does
  the full walk for the errors RFC 6733 requires us to answer (5014, 5001), over the raw bytes.
- Encoding is strict: zero padding, V and Vendor-Id for vendor AVPs, M from the table, never P.
  Encoders are built once per AvpDef (a pre-packed header and one struct call for fixed-size types).

Theory of operation: an AVP is `code(4) flags(1) length(3) [vendor(4)] data padding`; `length` covers
header and data but not the padding, so the next AVP starts at `offset + (length + 3) & ~3`. The walk
of a container (message or grouped AVP) keeps two lists: the start offset of each child and its key
`code | vendor << 32`, so `find` is a `list.index` done in C. Avp objects are created only for the
children that are read; `get` of an integer, Time or text AVP decodes straight from the buffer.

Hot-path tips for answer builders: bind `avp_encoder(name)` once; AVPs that never change (our
Origin-Host/Realm, Auth-Application-Id) can be encoded once and passed as bytes; `Avp` objects and
their `raw` bytes (Proxy-Info) are copied as they are.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from functools import partial
from itertools import compress, repeat
from typing import Any

from protocol.dictionary import (
    AVP_BY_KEY,
    DIAMETER_AVP_UNSUPPORTED,
    DIAMETER_INVALID_AVP_LENGTH,
    DIAMETER_INVALID_AVP_VALUE,
    DIAMETER_INVALID_MESSAGE_LENGTH,
    DIAMETER_UNSUPPORTED_VERSION,
    AvpDef,
    AvpType,
    lookup,
)

__all__ = [
    "AVP_FLAG_MANDATORY",
    "AVP_FLAG_PROTECTED",
    "AVP_FLAG_VENDOR",
    "FLAG_ERROR",
    "FLAG_PROXIABLE",
    "FLAG_REQUEST",
    "FLAG_RETRANSMIT",
    "Avp",
    "AvpInput",
    "AvpValueError",
    "DecodeError",
    "Message",
    "avp_encoder",
    "avp_framer",
    "avp_key",
    "decode_avp",
    "decode_message",
    "encode_answer",
    "encode_answer_body",
    "encode_avp",
    "encode_message",
    "validate",
]

FLAG_REQUEST = 0x80
FLAG_PROXIABLE = 0x40
FLAG_ERROR = 0x20
FLAG_RETRANSMIT = 0x10

AVP_FLAG_VENDOR = 0x80
AVP_FLAG_MANDATORY = 0x40
AVP_FLAG_PROTECTED = 0x20

HEADER_LENGTH = 20
NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_ERA_SECONDS = 1 << 32

_MESSAGE_HEADER = struct.Struct(">IIIII")  # version+length, flags+command, app, hbh, e2e
_AVP_HEADER = struct.Struct(">II")  # code, flags+length
_AVP_HEADER_VENDOR = struct.Struct(">III")  # code, flags+length, vendor
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length & 3

_GROUPED = AvpType.GROUPED
_FAILED_AVP_CODE = 279
_FIXED_SIZES: dict[AvpType, int] = {
    AvpType.INTEGER32: 4,
    AvpType.UNSIGNED32: 4,
    AvpType.ENUMERATED: 4,
    AvpType.FLOAT32: 4,
    AvpType.TIME: 4,
    AvpType.INTEGER64: 8,
    AvpType.UNSIGNED64: 8,
    AvpType.FLOAT64: 8,
}
# smallest valid payload per type, for the zero-filled Failed-AVP of a 5014 (RFC 6733 §7.1.5)
_MINIMUM_PAYLOAD = {**_FIXED_SIZES, AvpType.ADDRESS: 6}


class DecodeError(Exception):
    """A message or AVP that cannot be decoded; carries what the error answer needs."""

    def __init__(self, result_code: int, message: str, failed_avp: bytes | None = None) -> None:
        super().__init__(message)
        self.result_code = result_code
        self.message = message
        self.failed_avp = failed_avp


class AvpValueError(DecodeError):
    """An AVP whose payload is not a valid value of its type (5004, or 5014 for a wrong fixed size)."""


_UNSET: Any = object()


def _int_key(code: int, vendor: int) -> int:
    """AVPs are matched on one int, `code | vendor << 32`, so a search is `list.index` in C."""
    return code | vendor << 32


# definition and value decoder by int key, derived once from the generated table
_DEF_BY_INT: dict[int, AvpDef] = {_int_key(c, v): d for (c, v), d in AVP_BY_KEY.items()}


class _Container:
    """find/find_all/get over an index of child AVPs (`_keys`, `_starts`) built by one header walk.

    Avp objects are created only for the children actually read, and kept in `_objs`; `get` of an
    integer, time or text AVP decodes straight from the buffer without creating one. Subclasses have
    the slots `_buf`, `_keys` (None until walked), `_starts`, `_objs`.
    """

    __slots__ = ()
    _buf: bytes
    _keys: list[int] | None
    _starts: list[int]
    _objs: list[Avp | None]

    def _build_index(self) -> list[int]:
        raise NotImplementedError

    def _all(self) -> list[Avp]:
        if self._keys is None:
            self._build_index()
        objs, starts, buf = self._objs, self._starts, self._buf
        if None in objs:
            for i, avp in enumerate(objs):
                if avp is None:
                    objs[i] = Avp(buf, starts[i])
        return objs  # type: ignore[return-value]

    @property
    def avp_keys(self) -> list[int]:
        """The `avp_key` of every child AVP in wire order, without decoding any (the index itself: read it,
        do not change it); e.g. `required.issubset(message.avp_keys)` checks presence in one C call."""
        keys = self._keys
        return keys if keys is not None else self._build_index()

    def find(self, name_or_key: str | tuple[int, int] | AvpDef) -> Avp | None:
        """The first AVP with that name / (code, vendor) / AvpDef, or None."""
        key = _KEYS.get(name_or_key)
        if key is None:
            key = _key(name_or_key)
        keys = self._keys
        if keys is None:
            keys = self._build_index()
        if key not in keys:
            return None
        i = keys.index(key)
        avp = self._objs[i]
        if avp is None:
            avp = self._objs[i] = Avp(self._buf, self._starts[i])
        return avp

    def find_all(self, name_or_key: str | tuple[int, int] | AvpDef) -> list[Avp]:
        """Every AVP with that name / (code, vendor) / AvpDef, in order."""
        key = _KEYS.get(name_or_key)
        if key is None:
            key = _key(name_or_key)
        keys = self._keys
        if keys is None:
            keys = self._build_index()
        count = keys.count(key)
        if not count:
            return []
        objs, starts, buf = self._objs, self._starts, self._buf
        found: list[Avp] = []
        i = 0
        for _ in range(count):
            i = keys.index(key, i)
            avp = objs[i]
            if avp is None:
                avp = objs[i] = Avp(buf, starts[i])
            found.append(avp)
            i += 1
        return found

    def get(self, name_or_key: str | tuple[int, int] | AvpDef, default: Any = None) -> Any:
        """The value of the first such AVP, or `default`."""
        key = _KEYS.get(name_or_key)
        if key is None:
            key = _key(name_or_key)
        keys = self._keys
        if keys is None:
            keys = self._build_index()
        if key not in keys:
            return default
        i = keys.index(key)
        avp = self._objs[i]
        if avp is None:
            fast = _FAST_DECODER_BY_INT.get(key)
            if fast is not None:
                value = fast(self._buf, self._starts[i])
                if value is not _UNSET:
                    return value
            avp = self._objs[i] = Avp(self._buf, self._starts[i])
        return avp.value


class Avp(_Container):
    """One received AVP: header fields now, data/value/children on demand (cached)."""

    __slots__ = ("code", "flags", "vendor", "_buf", "_start", "_data", "_end", "_value", "_keys", "_starts",
                 "_objs")

    def __init__(self, buf: bytes, start: int) -> None:
        """The AVP at `start` of `buf`, whose length the walk has already checked."""
        code, flags_length = _unpack_header(buf, start)
        self.code = code
        self.flags = flags = flags_length >> 24
        if flags & AVP_FLAG_VENDOR:
            self.vendor = _unpack_u32(buf, start + 8)[0]
            self._data = start + 12
        else:
            self.vendor = 0
            self._data = start + 8
        self._buf = buf
        self._start = start
        self._end = start + (flags_length & 0xFFFFFF)
        self._value = _UNSET
        self._keys = None

    def _build_index(self) -> list[int]:
        keys, self._starts = _walk(self._buf, self._data, self._end)
        self._objs = [None] * len(keys)
        self._keys = keys
        return keys

    @property
    def data(self) -> bytes:
        """Payload without header and padding."""
        return self._buf[self._data : self._end]

    @property
    def raw(self) -> bytes:
        """The whole AVP as received (unpadded), for Failed-AVP and Proxy-Info echoes."""
        return self._buf[self._start : self._end]

    @property
    def length(self) -> int:
        """The AVP Length field: header + data, without padding."""
        return self._end - self._start

    @property
    def definition(self) -> AvpDef | None:
        return _DEF_BY_INT.get(self.code | self.vendor << 32)

    @property
    def name(self) -> str:
        definition = _DEF_BY_INT.get(self.code | self.vendor << 32)
        return definition.name if definition is not None else f"Unknown({self.code}/{self.vendor})"

    @property
    def mandatory(self) -> bool:
        return bool(self.flags & AVP_FLAG_MANDATORY)

    @property
    def value(self) -> Any:
        """Typed value per the dictionary (bytes when unknown); raises AvpValueError when invalid."""
        value = self._value
        if value is _UNSET:
            decoder = _DECODER_BY_INT.get(self.code | self.vendor << 32)
            if decoder is None:
                value = self._buf[self._data : self._end]
            else:
                value = decoder(self)
            self._value = value
        return value

    @property
    def children(self) -> list[Avp]:
        """Inner AVPs, read as a grouped payload whatever the dictionary says (raises DecodeError 5014).

        The list is the cache itself: read it, do not change it."""
        return self._all()

    def __repr__(self) -> str:
        return f"<Avp {self.name} flags=0x{self.flags:02x} len={self._end - self._start}>"


class Message(_Container):
    """One received message: header fields and the top-level AVPs (decoded when read)."""

    __slots__ = (
        "version",
        "flags",
        "command_code",
        "application_id",
        "hop_by_hop",
        "end_to_end",
        "raw",
        "length",
        "_buf",
        "_keys",
        "_starts",
        "_objs",
    )

    def __init__(self, raw: bytes) -> None:
        version_length, flags_command, self.application_id, self.hop_by_hop, self.end_to_end = (
            _MESSAGE_HEADER.unpack_from(raw)
        )
        self.version = version_length >> 24
        self.length = version_length & 0xFFFFFF
        self.flags = flags_command >> 24
        self.command_code = flags_command & 0xFFFFFF
        self.raw = self._buf = raw
        self._keys = []
        self._starts = []
        self._objs = []

    @property
    def avps(self) -> list[Avp]:
        """The top-level AVPs in wire order (the cache itself: read it, do not change it)."""
        return self._all()

    @property
    def header(self) -> bytes:
        """The 20-byte header, as error_answer wants it."""
        return self.raw[:HEADER_LENGTH]

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    @property
    def is_proxiable(self) -> bool:
        return bool(self.flags & FLAG_PROXIABLE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def is_retransmit(self) -> bool:
        return bool(self.flags & FLAG_RETRANSMIT)

    @property
    def session_id(self) -> str | None:
        """Session-Id wherever it is at top level (it should be first, but need not be)."""
        return self.get(263)

    def __repr__(self) -> str:
        return (
            f"<Message cmd={self.command_code} app={self.application_id} flags=0x{self.flags:02x} "
            f"hbh=0x{self.hop_by_hop:08x} e2e=0x{self.end_to_end:08x} avps={len(self._starts)}>"
        )


# ---------------------------------------------------------------------------------------------- keys

_KEYS: dict[Any, int] = {}


def _key(name_or_key: str | tuple[int, int] | AvpDef | int) -> int:
    """The int key of a name, AvpDef, (code, vendor) or int key; cached as it is asked on every find."""
    try:
        return _KEYS[name_or_key]
    except KeyError:
        pass
    if isinstance(name_or_key, str):
        definition = lookup(name_or_key)
        key = _int_key(definition.code, definition.vendor)
    elif isinstance(name_or_key, AvpDef):
        key = _int_key(name_or_key.code, name_or_key.vendor)
    elif isinstance(name_or_key, int):
        key = name_or_key
    else:
        code, vendor = name_or_key
        key = _int_key(int(code), int(vendor))
    _KEYS[name_or_key] = key
    return key


def avp_key(name_or_key: str | tuple[int, int] | AvpDef | int) -> int:
    """The int key `code | vendor << 32` an AVP is indexed by (see Message.avp_keys)."""
    return _key(name_or_key)


# ------------------------------------------------------------------------------------------ decoding

_unpack_header = _AVP_HEADER.unpack_from
_unpack_u32 = _U32.unpack_from


def _walk(buf: bytes, offset: int, end: int) -> tuple[list[int], list[int]]:
    """Keys and start offsets of the AVPs in buf[offset:end], lengths checked: the hot loop.

    Fewer than 8 (or 12) bytes left in the container always fails the length test below, whatever
    the bytes after the container say, so that case needs no test of its own.
    """
    keys: list[int] = []
    starts: list[int] = []
    add_key = keys.append
    add_start = starts.append
    unpack_header = _unpack_header
    try:
        while offset < end:
            code, flags_length = unpack_header(buf, offset)
            next_offset = offset + (flags_length & 0xFFFFFF)
            if flags_length & 0x80000000:
                if next_offset > end or next_offset < offset + 12:
                    raise _length_error(buf, offset, end)
                add_key(code | _unpack_u32(buf, offset + 8)[0] << 32)
            else:
                if next_offset > end or next_offset < offset + 8:
                    raise _length_error(buf, offset, end)
                add_key(code)
            add_start(offset)
            offset = (next_offset + 3) & -4
    except struct.error:  # the header itself runs past the end of the buffer
        raise _length_error(buf, offset, end) from None
    return keys, starts


def _length_error(buf: bytes, offset: int, end: int) -> DecodeError:
    """5014 with the offending header and a zero-filled minimal payload (RFC 6733 §7.1.5)."""
    header = bytes(buf[offset : min(offset + 12, end)])
    flags = header[4] if len(header) > 4 else 0
    header_length = 12 if flags & AVP_FLAG_VENDOR else 8
    header = header[:header_length].ljust(header_length, b"\0")
    code = _U32.unpack_from(header)[0]
    vendor = _U32.unpack_from(header, 8)[0] if header_length == 12 else 0
    definition = _DEF_BY_INT.get(_int_key(code, vendor))
    payload = _MINIMUM_PAYLOAD.get(definition.type, 0) if definition is not None else 0
    if definition is not None and definition.type is AvpType.ADDRESS:
        zero_payload = b"\0\x01" + b"\0" * 4
    else:
        zero_payload = b"\0" * payload
    claimed = _U32.unpack_from(header, 4)[0] & 0xFFFFFF
    failed = bytearray(header)
    failed[5:8] = (header_length + payload).to_bytes(3, "big")
    failed += zero_payload + _PAD[payload & 3]
    name = definition.name if definition is not None else f"Unknown({code}/{vendor})"
    return DecodeError(
        DIAMETER_INVALID_AVP_LENGTH,
        f"AVP {name} at offset {offset}: length {claimed} is invalid ({end - offset} bytes left)",
        bytes(failed),
    )


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode one complete frame: header and top-level AVP headers (values stay lazy)."""
    raw = bytes(data)
    if len(raw) < HEADER_LENGTH:
        raise DecodeError(DIAMETER_INVALID_MESSAGE_LENGTH, f"message of {len(raw)} bytes has no header")
    message = Message(raw)
    if message.version != 1:
        raise DecodeError(DIAMETER_UNSUPPORTED_VERSION, f"Diameter version {message.version} unsupported")
    if message.length != len(raw) or message.length & 3:
        raise DecodeError(
            DIAMETER_INVALID_MESSAGE_LENGTH, f"header length {message.length} but {len(raw)} bytes received"
        )
    message._keys, message._starts = _walk(raw, HEADER_LENGTH, len(raw))
    message._objs = [None] * len(message._keys)
    return message


def decode_avp(data: bytes | bytearray | memoryview) -> Avp:
    """Exactly one encoded AVP (padding optional), e.g. the content of a Failed-AVP."""
    raw = bytes(data)
    _, starts = _walk(raw, 0, len(raw))
    if len(starts) != 1:
        raise DecodeError(DIAMETER_INVALID_AVP_LENGTH, f"expected one AVP, found {len(starts)}")
    return Avp(raw, 0)


def _value_error(avp: Avp, result_code: int, why: str) -> AvpValueError:
    return AvpValueError(result_code, f"AVP {avp.name}: {why}", avp.raw)


def _fixed(fmt: str) -> Callable[[Avp], Any]:
    unpack = struct.Struct(fmt).unpack_from
    size = struct.calcsize(fmt)

    def decode(avp: Avp) -> Any:
        if avp._end - avp._data != size:
            why = f"{avp._end - avp._data} bytes, expected {size}"
            raise _value_error(avp, DIAMETER_INVALID_AVP_LENGTH, why)
        return unpack(avp._buf, avp._data)[0]

    return decode


_decode_u32 = _fixed(">I")


def _decode_time(avp: Avp) -> int:
    """Unix seconds; NTP timestamps with the MSB clear are in era 1 (from 2036-02-07, RFC 4330 §3)."""
    ntp = _decode_u32(avp)
    if not ntp & 0x80000000:
        ntp += _ERA_SECONDS
    return ntp - NTP_UNIX_OFFSET


def _decode_text(avp: Avp) -> str:
    try:
        return avp._buf[avp._data : avp._end].decode()
    except UnicodeDecodeError as exc:
        raise _value_error(avp, DIAMETER_INVALID_AVP_VALUE, f"invalid UTF-8 ({exc.reason})") from None


def _decode_bytes(avp: Avp) -> bytes:
    return avp._buf[avp._data : avp._end]


def _decode_address(avp: Avp) -> ipaddress.IPv4Address | ipaddress.IPv6Address | bytes:
    data = avp._buf[avp._data : avp._end]
    if len(data) < 2:
        raise _value_error(avp, DIAMETER_INVALID_AVP_LENGTH, "address shorter than its family")
    family = _U16.unpack_from(data)[0]
    if family == 1:
        if len(data) != 6:
            raise _value_error(avp, DIAMETER_INVALID_AVP_VALUE, f"IPv4 address of {len(data) - 2} bytes")
        return ipaddress.IPv4Address(data[2:])
    if family == 2:
        if len(data) != 18:
            raise _value_error(avp, DIAMETER_INVALID_AVP_VALUE, f"IPv6 address of {len(data) - 2} bytes")
        return ipaddress.IPv6Address(data[2:])
    return data


def _decode_grouped(avp: Avp) -> list[Avp]:
    return avp.children


_DECODERS: dict[AvpType, Callable[[Avp], Any]] = {
    AvpType.OCTET_STRING: _decode_bytes,
    AvpType.INTEGER32: _fixed(">i"),
    AvpType.INTEGER64: _fixed(">q"),
    AvpType.UNSIGNED32: _decode_u32,
    AvpType.UNSIGNED64: _fixed(">Q"),
    AvpType.FLOAT32: _fixed(">f"),
    AvpType.FLOAT64: _fixed(">d"),
    AvpType.GROUPED: _decode_grouped,
    AvpType.ADDRESS: _decode_address,
    AvpType.TIME: _decode_time,
    AvpType.UTF8_STRING: _decode_text,
    AvpType.DIAMETER_IDENTITY: _decode_text,
    AvpType.DIAMETER_URI: _decode_text,
    AvpType.ENUMERATED: _fixed(">i"),
    AvpType.IP_FILTER_RULE: _decode_text,
}


_DECODER_BY_INT: dict[int, Callable[[Avp], Any]] = {k: _DECODERS[d.type] for k, d in _DEF_BY_INT.items()}


def _fast_fixed(value_format: str, vendor: bool, is_time: bool) -> Callable[[bytes, int], Any]:
    """(buf, start) -> value for a fixed-size AVP in one unpack; _UNSET if its length is wrong."""
    header = ">III" if vendor else ">II"
    unpack = struct.Struct(header + value_format).unpack_from
    expected = (12 if vendor else 8) + struct.calcsize(">" + value_format)
    position = 3 if vendor else 2

    def decode(buf: bytes, start: int) -> Any:
        try:
            fields = unpack(buf, start)
        except struct.error:
            return _UNSET
        if fields[1] & 0xFFFFFF != expected:
            return _UNSET
        value = fields[position]
        if is_time:
            if not value & 0x80000000:
                value += _ERA_SECONDS
            value -= NTP_UNIX_OFFSET
        return value

    return decode


def _fast_text(vendor: bool) -> Callable[[bytes, int], Any]:
    """(buf, start) -> str for a UTF-8 AVP; _UNSET if invalid (the slow path then raises)."""
    header_length = 12 if vendor else 8

    def decode(buf: bytes, start: int) -> Any:
        end = start + (_unpack_u32(buf, start + 4)[0] & 0xFFFFFF)
        try:
            return buf[start + header_length : end].decode()
        except UnicodeDecodeError:
            return _UNSET

    return decode


def _fast_decoders() -> dict[int, Callable[[bytes, int], Any]]:
    formats = {
        AvpType.INTEGER32: "i", AvpType.ENUMERATED: "i", AvpType.UNSIGNED32: "I", AvpType.TIME: "I",
        AvpType.INTEGER64: "q", AvpType.UNSIGNED64: "Q",
    }
    text = {AvpType.UTF8_STRING, AvpType.DIAMETER_IDENTITY, AvpType.DIAMETER_URI, AvpType.IP_FILTER_RULE}
    built: dict[tuple[AvpType, bool], Callable[[bytes, int], Any]] = {}
    table: dict[int, Callable[[bytes, int], Any]] = {}
    for key, definition in _DEF_BY_INT.items():
        kind, vendor = definition.type, definition.vendor != 0
        if (kind, vendor) not in built:
            if kind in formats:
                built[(kind, vendor)] = _fast_fixed(formats[kind], vendor, kind is AvpType.TIME)
            elif kind in text:
                built[(kind, vendor)] = _fast_text(vendor)
            else:
                continue
        table[key] = built[(kind, vendor)]
    return table


_FAST_DECODER_BY_INT = _fast_decoders()


def validate(message: Message, *, unknown_mandatory_vendor_allowlist: frozenset[int] = frozenset()) -> None:
    """Walk the whole tree and raise DecodeError for the first 5014 or 5001 (RFC 6733 §4.4, §7.1.5).

    Known AVPs: M and P flags are not checked (real clients differ); a fixed-size type with the wrong
    length is 5014. Unknown AVPs with M set are 5001 unless their vendor is allow-listed; an unknown AVP
    is never looked into, so M bits inside an unknown grouped AVP with M clear are ignored as §4.4 allows.
    The content of a Failed-AVP (in answers) is someone else's offending AVP and is not checked.

    Which error is "first": a container's AVP headers are all length-checked before any of its AVPs is
    judged, then its AVPs are judged in wire order, depth first. This runs on every request, so it is a
    walk over the raw buffer that creates no Avp objects (see `_CHECK_BY_INT`); it reuses the top-level
    index `decode_message` already built.
    """
    _validate_raw(message._buf, message._keys, message._starts, unknown_mandatory_vendor_allowlist)


# What validate must check per known AVP key: _NOTHING for variable-length types, the data size for
# fixed-size types, _GROUP to look inside, and nothing for the base Failed-AVP (someone else's AVP).
_NOTHING = 0
_GROUP = -1
_CHECK_BY_INT: dict[int, int] = {
    key: _GROUP if definition.type is _GROUPED else _FIXED_SIZES.get(definition.type, _NOTHING)
    for key, definition in _DEF_BY_INT.items()
}
_CHECK_BY_INT[_FAILED_AVP_CODE] = _NOTHING
_UNKNOWN = -2


def _validate_raw(buf: bytes, keys: list[int], starts: list[int], allowlist: frozenset[int]) -> None:
    """validate() over the top-level AVPs (already walked by decode_message), then depth first.

    Each container is walked once: its headers are length-checked and fixed sizes compared on the way,
    and only groups, unknown AVPs and wrong sizes are listed to be judged in order after the walk.
    Containers wait on a stack of iterators, so a deeply nested message cannot exhaust the Python stack.
    A large group whose exact bytes passed before passes again without a walk (`_PASSED_GROUPS`): a
    gateway repeats the same Service-Information in every CCR-U of a session.
    """
    checks = list(map(_CHECK_BY_INT.get, keys, repeat(_UNKNOWN)))
    unpack_u32 = _unpack_u32
    top: list[tuple[int, int, int, int]] = []
    for i in compress(range(len(keys)), checks):  # the AVPs whose check is not _NOTHING
        check, start = checks[i], starts[i]
        flags_length = unpack_u32(buf, start + 4)[0]
        if check > 0 and (flags_length & 0xFFFFFF) - (12 if flags_length & 0x80000000 else 8) == check:
            continue  # a fixed-size AVP of the right size
        top.append((check, keys[i], start, flags_length))
    passed = _PASSED_GROUPS.get(allowlist)
    if passed is None or len(passed) >= _PASSED_GROUPS_SIZE:
        passed = _PASSED_GROUPS[allowlist] = {}  # (cleared when full: cheaper than an LRU, rarely hit)
    # each entry: the iterator of a container's AVPs still to judge, and the bytes that pass once it is done
    stack: list[tuple[Iterator[tuple[int, int, int, int]], bytes | None]] = [(iter(top), None)]
    while stack:
        for check, key, start, flags_length in stack[-1][0]:
            end = start + (flags_length & 0xFFFFFF)
            data = start + 12 if flags_length & 0x80000000 else start + 8
            if check == _GROUP:
                group = None
                if end - data >= _PASSED_GROUP_MIN_BYTES:
                    group = buf[start:end]
                    if group in passed:
                        continue
                children = _to_check(buf, data, end)  # 5014 for any broken child header comes first
                if children:
                    stack.append((iter(children), group))
                    break
                if group is not None:
                    passed[group] = None
            elif check == _UNKNOWN:
                vendor = key >> 32
                if flags_length & 0x40000000 and vendor not in allowlist:
                    name = f"Unknown({key & 0xFFFFFFFF}/{vendor})"
                    raise DecodeError(DIAMETER_AVP_UNSUPPORTED, f"AVP {name} with the M bit is not supported",
                                      buf[start:end])
            elif end - data != check:
                raise DecodeError(
                    DIAMETER_INVALID_AVP_LENGTH,
                    f"AVP {_DEF_BY_INT[key].name} has {end - data} bytes of data, expected {check}",
                    buf[start:end],
                )
        else:
            group = stack.pop()[1]
            if group is not None:
                passed[group] = None  # every AVP inside it passed


# Grouped AVPs (whole, header included) that passed validate, per allowlist; only groups with at least
# _PASSED_GROUP_MIN_BYTES of data, where skipping the walk saves more than hashing the bytes costs.
_PASSED_GROUPS: dict[frozenset[int], dict[bytes, None]] = {}
_PASSED_GROUPS_SIZE = 4096
_PASSED_GROUP_MIN_BYTES = 128


def _to_check(buf: bytes, offset: int, end: int) -> list[tuple[int, int, int, int]]:
    """Length-check every AVP header in buf[offset:end] (as `_walk`) and list those validate must judge:
    (check, key, start, flags+length word) of groups, unknown AVPs and fixed-size AVPs of the wrong size.

    A negative check (group, unknown) never equals a data length, so one comparison does for every kind.
    """
    found: list[tuple[int, int, int, int]] = []
    get = _CHECK_BY_INT.get
    unpack_header = _unpack_header
    try:
        while offset < end:
            code, flags_length = unpack_header(buf, offset)
            next_offset = offset + (flags_length & 0xFFFFFF)
            if flags_length & 0x80000000:
                if next_offset > end or next_offset < offset + 12:
                    raise _length_error(buf, offset, end)
                key = code | _unpack_u32(buf, offset + 8)[0] << 32
                check = get(key, _UNKNOWN)
                if check and check != (flags_length & 0xFFFFFF) - 12:
                    found.append((check, key, offset, flags_length))
            else:
                if next_offset > end or next_offset < offset + 8:
                    raise _length_error(buf, offset, end)
                check = get(code, _UNKNOWN)
                if check and check != (flags_length & 0xFFFFFF) - 8:
                    found.append((check, code, offset, flags_length))
            offset = (next_offset + 3) & -4
    except struct.error:  # the header itself runs past the end of the buffer
        raise _length_error(buf, offset, end) from None
    return found


# ------------------------------------------------------------------------------------------ encoding

# an element of an AVP list: (name or AvpDef, value), encoded AVP bytes (copied, padded), or a received Avp
AvpInput = tuple[str | AvpDef, object] | bytes | Avp

_ENCODERS: dict[Any, Callable[[Any], bytes]] = {}
_IDENTITY_CACHE_SIZE = 1024  # per AVP definition


def avp_encoder(name_or_def: str | AvpDef) -> Callable[[Any], bytes]:
    """The encoder of one AVP definition: value -> padded AVP bytes. Bind it once on hot paths."""
    try:
        return _ENCODERS[name_or_def]
    except KeyError:
        pass
    definition = lookup(name_or_def)
    encoder = _ENCODERS.get(definition)
    if encoder is None:
        encoder = _ENCODERS[definition] = _build_encoder(definition)
    _ENCODERS[name_or_def] = encoder
    return encoder


def encode_avp(name_or_def: str | AvpDef, value: Any) -> bytes:
    """One AVP, padded; V, Vendor-Id and M come from the definition.

    Values mirror Avp.value: int for the integer types and Enumerated, float for Float32/64, int unix
    seconds (or datetime) for Time, str for UTF8String/DiameterIdentity/DiameterURI/IPFilterRule,
    bytes (or str, as UTF-8) for OctetString, str/ipaddress (or an encoded payload as bytes) for
    Address, and a list of AvpInput for Grouped.
    """
    try:
        encoder = _ENCODERS[name_or_def]
    except KeyError:
        encoder = avp_encoder(name_or_def)
    try:
        return encoder(value)
    except (struct.error, OverflowError) as exc:
        name = name_or_def if isinstance(name_or_def, str) else name_or_def.name
        raise ValueError(f"cannot encode {value!r} as AVP {name}: {exc}") from None


def _encode_input(item: Any) -> bytes:
    """One element of an AVP list: (name, value), already-encoded bytes, or a received Avp."""
    if type(item) is tuple:
        name_or_def, value = item
        try:
            encoder = _ENCODERS[name_or_def]
        except KeyError:
            encoder = avp_encoder(name_or_def)
        try:
            return encoder(value)
        except (struct.error, OverflowError):
            return encode_avp(name_or_def, value)  # re-raised with the AVP name
    if isinstance(item, Avp):
        item = item.raw
    elif not isinstance(item, bytes):
        if isinstance(item, bytearray | memoryview):
            item = bytes(item)
        elif isinstance(item, tuple):
            return _encode_input(tuple(item))
        else:
            raise TypeError(f"an AVP is (name, value), bytes or Avp, not {type(item).__name__}")
    return item + _PAD[len(item) & 3]


def _encode_list(items: Iterable[Any]) -> bytes:
    """Concatenated padded AVPs; the (name, value) case with a known encoder is inlined for speed."""
    parts: list[bytes] = []
    add = parts.append
    encoders = _ENCODERS
    for item in items:
        if type(item) is tuple:
            encoder = encoders.get(item[0])
            if encoder is not None:
                try:
                    add(encoder(item[1]))
                    continue
                except (struct.error, OverflowError):
                    pass  # the slow path raises it again with the AVP's name
        add(_encode_input(item))
    return b"".join(parts)


_FRAMERS: dict[Any, Callable[[bytes], bytes]] = {}


def avp_framer(name_or_def: str | AvpDef) -> Callable[[bytes], bytes]:
    """payload -> padded AVP bytes (header from the definition, as `avp_encoder`); for a Grouped AVP the
    payload is its children already encoded and joined, so answer builders can join cached bytes."""
    try:
        return _FRAMERS[name_or_def]
    except KeyError:
        pass
    definition = lookup(name_or_def)
    code, vendor = definition.code, definition.vendor
    flags_word = ((AVP_FLAG_VENDOR if vendor else 0) | (AVP_FLAG_MANDATORY if definition.mandatory else 0)) << 24
    if vendor:

        def frame(payload: bytes) -> bytes:
            n = len(payload)
            return _AVP_HEADER_VENDOR.pack(code, flags_word | (12 + n), vendor) + payload + _PAD[n & 3]

    else:

        def frame(payload: bytes) -> bytes:
            n = len(payload)
            return _AVP_HEADER.pack(code, flags_word | (8 + n)) + payload + _PAD[n & 3]

    _FRAMERS[name_or_def] = frame
    return frame


def _build_encoder(definition: AvpDef) -> Callable[[Any], bytes]:
    """Pre-pack what never changes for this definition and return value -> bytes."""
    code, vendor, kind = definition.code, definition.vendor, definition.type
    flags = (AVP_FLAG_VENDOR if vendor else 0) | (AVP_FLAG_MANDATORY if definition.mandatory else 0)
    header_length = 12 if vendor else 8
    size = _FIXED_SIZES.get(kind)

    if size is not None:
        value_format = {
            AvpType.INTEGER32: "i", AvpType.ENUMERATED: "i", AvpType.UNSIGNED32: "I", AvpType.TIME: "I",
            AvpType.FLOAT32: "f", AvpType.INTEGER64: "q", AvpType.UNSIGNED64: "Q", AvpType.FLOAT64: "d",
        }[kind]
        flags_length = flags << 24 | (header_length + size)
        if vendor:
            pack = partial(struct.Struct(">III" + value_format).pack, code, flags_length, vendor)
        else:
            pack = partial(struct.Struct(">II" + value_format).pack, code, flags_length)
        if kind is AvpType.TIME:
            return lambda value: pack(_ntp_seconds(value))
        return pack

    flags_word = flags << 24
    if vendor:

        def frame(payload: bytes) -> bytes:
            n = len(payload)
            return _AVP_HEADER_VENDOR.pack(code, flags_word | (12 + n), vendor) + payload + _PAD[n & 3]

    else:

        def frame(payload: bytes) -> bytes:
            n = len(payload)
            return _AVP_HEADER.pack(code, flags_word | (8 + n)) + payload + _PAD[n & 3]

    if kind is AvpType.GROUPED:

        def encode_grouped(value: Iterable[Any]) -> bytes:
            # children are padded, so the group length is a multiple of 4 and needs no padding of its own
            return frame(_encode_list(value))

        return encode_grouped

    if kind is AvpType.OCTET_STRING:

        def encode_octets(value: Any) -> bytes:
            if type(value) is not bytes:
                value = value.encode() if isinstance(value, str) else bytes(value)
            return frame(value)

        return encode_octets

    if kind is AvpType.ADDRESS:
        return lambda value: frame(_address_payload(value))

    # UTF8String, DiameterIdentity, DiameterURI, IPFilterRule
    def encode_text(value: Any) -> bytes:
        if type(value) is str:
            return frame(value.encode())
        if isinstance(value, bytes | bytearray):
            return frame(bytes(value))
        raise TypeError(f"AVP {definition.name} takes str, not {type(value).__name__}")

    if kind is not AvpType.DIAMETER_IDENTITY:
        return encode_text

    # Host and realm names repeat in every answer (our own Origin-Host/Realm): keep them encoded.
    identities: dict[Any, bytes] = {}

    def encode_identity(value: Any) -> bytes:
        encoded = identities.get(value)
        if encoded is None:
            encoded = encode_text(value)
            if len(identities) < _IDENTITY_CACHE_SIZE and type(value) is str:
                identities[value] = encoded
        return encoded

    return encode_identity


def _ntp_seconds(value: Any) -> int:
    """Unix seconds (or datetime) -> 32-bit NTP seconds, era 0 from 1968 to 2036 and era 1 to 2104."""
    if isinstance(value, datetime):
        value = value.timestamp()
    ntp = int(value) + NTP_UNIX_OFFSET
    if not 0x80000000 <= ntp < _ERA_SECONDS + 0x80000000:
        raise ValueError(f"time {value} is outside the range a Diameter Time can carry (1968..2104)")
    return ntp & 0xFFFFFFFF


def _address_payload(value: Any) -> bytes:
    """2-octet address family + address; bytes are taken as an already-encoded payload."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        value = ipaddress.ip_address(value)
    if isinstance(value, ipaddress.IPv4Address):
        return b"\0\x01" + value.packed
    if isinstance(value, ipaddress.IPv6Address):
        return b"\0\x02" + value.packed
    raise TypeError(f"an Address is str, ipaddress or bytes, not {type(value).__name__}")


def encode_message(
    command_code: int,
    application_id: int,
    flags: int,
    hop_by_hop: int,
    end_to_end: int,
    avps: Iterable[AvpInput],
) -> bytes:
    """A whole message from its header fields and AVP list."""
    body = _encode_list(avps)
    length = HEADER_LENGTH + len(body)
    if length > 0xFFFFFF:
        raise ValueError(f"message of {length} bytes does not fit the 24-bit length")
    return (
        _MESSAGE_HEADER.pack(
            0x01000000 | length, (flags & 0xFF) << 24 | command_code, application_id, hop_by_hop, end_to_end
        )
        + body
    )


def encode_answer(request: Message, avps: Iterable[AvpInput], *, error: bool = False) -> bytes:
    """The answer to `request`: same command, application and ids; R and T clear, P copied, E if error."""
    flags = (request.flags & FLAG_PROXIABLE) | (FLAG_ERROR if error else 0)
    return encode_message(
        request.command_code, request.application_id, flags, request.hop_by_hop, request.end_to_end, avps
    )


def encode_answer_body(request: Message, body: bytes, *, error: bool = False) -> bytes:
    """encode_answer for AVPs already encoded and joined (each padded): the header in one pack."""
    length = HEADER_LENGTH + len(body)
    if length > 0xFFFFFF:
        raise ValueError(f"message of {length} bytes does not fit the 24-bit length")
    flags = (request.flags & FLAG_PROXIABLE) | (FLAG_ERROR if error else 0)
    return _MESSAGE_HEADER.pack(0x01000000 | length, flags << 24 | request.command_code, request.application_id,
                                request.hop_by_hop, request.end_to_end) + body
