"""Protocol-error answers built from nothing more than a request's 20-byte header (RFC 6733 §7.2).

A request that cannot be decoded (bad version, broken AVP length, unknown M-bit AVP, wrong application)
still gets an answer in the generic answer-message form:

    <answer-message> ::= < Diameter Header: code, ERR [, PXY] >
                         0*1< Session-Id > { Origin-Host } { Origin-Realm } { Result-Code }
                         [ Origin-State-Id ] [ Error-Message ] [ Error-Reporting-Host ]
                         [ Failed-AVP ] [ Experimental-Result ] * [ Proxy-Info ] * [ AVP ]

The result codes themselves are defined once, in protocol/dictionary.py, and re-exported here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from protocol.codec import FLAG_ERROR, FLAG_PROXIABLE, encode_message
from protocol.dictionary import (  # noqa: F401 - re-exported: result codes live in one place
    DIAMETER_APPLICATION_UNSUPPORTED,
    DIAMETER_AUTHORIZATION_REJECTED,
    DIAMETER_AVP_NOT_ALLOWED,
    DIAMETER_AVP_OCCURS_TOO_MANY_TIMES,
    DIAMETER_AVP_UNSUPPORTED,
    DIAMETER_COMMAND_UNSUPPORTED,
    DIAMETER_CONTRADICTING_AVPS,
    DIAMETER_CREDIT_CONTROL_NOT_APPLICABLE,
    DIAMETER_CREDIT_LIMIT_REACHED,
    DIAMETER_END_USER_SERVICE_DENIED,
    DIAMETER_INVALID_AVP_BIT_COMBO,
    DIAMETER_INVALID_AVP_BITS,
    DIAMETER_INVALID_AVP_LENGTH,
    DIAMETER_INVALID_AVP_VALUE,
    DIAMETER_INVALID_BIT_IN_HEADER,
    DIAMETER_INVALID_HDR_BITS,
    DIAMETER_INVALID_MESSAGE_LENGTH,
    DIAMETER_LIMITED_SUCCESS,
    DIAMETER_LOOP_DETECTED,
    DIAMETER_MISSING_AVP,
    DIAMETER_NO_COMMON_APPLICATION,
    DIAMETER_NO_COMMON_SECURITY,
    DIAMETER_RATING_FAILED,
    DIAMETER_REALM_NOT_SERVED,
    DIAMETER_REDIRECT_INDICATION,
    DIAMETER_RESOURCES_EXCEEDED,
    DIAMETER_SUCCESS,
    DIAMETER_TOO_BUSY,
    DIAMETER_UNABLE_TO_COMPLY,
    DIAMETER_UNABLE_TO_DELIVER,
    DIAMETER_UNKNOWN_PEER,
    DIAMETER_UNKNOWN_SESSION_ID,
    DIAMETER_UNSUPPORTED_VERSION,
    DIAMETER_USER_UNKNOWN,
    RESULT_CODE_NAMES,
    is_protocol_error,
)

_HEADER = struct.Struct(">IIIII")


def error_answer(
    request_header: bytes,
    result_code: int,
    origin_host: str,
    origin_realm: str,
    *,
    session_id: str | None = None,
    failed_avp: bytes | None = None,
    error_message: str | None = None,
    proxy_infos: Iterable[bytes] = (),
    origin_state_id: int | None = None,
) -> bytes:
    """The generic answer to the request whose header is given; E set for 3xxx only.

    `failed_avp` is one encoded AVP (received raw bytes or a zero-filled example), wrapped here in
    Failed-AVP; `proxy_infos` are the request's Proxy-Info AVPs as received, echoed in order.
    """
    if len(request_header) < 20:
        raise ValueError(f"a Diameter header has 20 bytes, got {len(request_header)}")
    _, flags_command, application_id, hop_by_hop, end_to_end = _HEADER.unpack_from(request_header)
    flags = (flags_command >> 24) & FLAG_PROXIABLE
    if is_protocol_error(result_code):
        flags |= FLAG_ERROR
    avps: list = []
    if session_id is not None:
        avps.append(("Session-Id", session_id))
    avps += [("Origin-Host", origin_host), ("Origin-Realm", origin_realm), ("Result-Code", result_code)]
    if origin_state_id is not None:
        avps.append(("Origin-State-Id", origin_state_id))
    if error_message:
        avps.append(("Error-Message", error_message))
    if failed_avp is not None:
        avps.append(("Failed-AVP", [bytes(failed_avp)]))
    avps.extend(bytes(proxy_info) for proxy_info in proxy_infos)
    return encode_message(flags_command & 0xFFFFFF, application_id, flags, hop_by_hop, end_to_end, avps)
