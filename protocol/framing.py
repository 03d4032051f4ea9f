"""Turns a TCP byte stream into Diameter frames without ever trusting the header (RFC 6733 §3).

A frame is the 20-byte header plus `Message-Length - 20` bytes. The length comes from the peer, so it
is checked before it is believed: version must be 1 (else 5011); the length must be at least 20, a
multiple of 4 and at most `max_message_length` (else 5015). A length of 0 would otherwise mean "a
message of no bytes" forever, and a huge one would make us buffer without bound.

When an error is detected the buffer is dead: the stream has lost its framing, so every later call
raises the same error and the connection must be answered (if a header is available) and closed.

Errors are reported as soon as the first 4 bytes show them, except that for a claimed length of at
least 20 we wait for the full 20-byte header (the peer sends it anyway) so the answer can be built.
"""

from __future__ import annotations

import struct

from protocol.dictionary import DIAMETER_INVALID_MESSAGE_LENGTH, DIAMETER_UNSUPPORTED_VERSION

HEADER_LENGTH = 20
_unpack_u32 = struct.Struct(">I").unpack_from
_COMPACT_AT = 1 << 16  # consumed bytes kept at the front before the buffer is compacted


class FramingError(Exception):
    """The stream is not Diameter any more; `header` (20 bytes) lets the caller build an answer."""

    def __init__(self, result_code: int, message: str, header: bytes | None) -> None:
        super().__init__(message)
        self.result_code = result_code
        self.message = message
        self.header = header


class ReceiveBuffer:
    """Accumulates bytes and hands out complete frames; many frames per read stay cheap."""

    __slots__ = ("_buffer", "_start", "_max_length", "_error")

    def __init__(self, max_message_length: int = 65536) -> None:
        if max_message_length < HEADER_LENGTH:
            raise ValueError("max_message_length must allow at least a header")
        self._buffer = bytearray()
        self._start = 0  # offset of the first unconsumed byte
        self._max_length = max_message_length
        self._error: FramingError | None = None

    def __len__(self) -> int:
        """Bytes received and not yet handed out."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete message, or None if more bytes are needed; raises FramingError."""
        if self._error is not None:
            raise self._error
        buffer, start = self._buffer, self._start
        available = len(buffer) - start
        if available < 4:
            return None
        version_length = _unpack_u32(buffer, start)[0]
        length = version_length & 0xFFFFFF
        if version_length >> 24 != 1 or length < HEADER_LENGTH or length & 3 or length > self._max_length:
            return self._fail(version_length >> 24, length, available)
        if available < length:
            return None
        end = start + length
        if length == available and not start:  # the frame is the whole buffer: one copy, not a slice and a copy
            frame = bytes(buffer)
            buffer.clear()
            return frame
        frame = bytes(buffer[start:end])
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        elif end >= _COMPACT_AT:
            del buffer[:end]
            self._start = 0
        else:
            self._start = end
        return frame

    def _fail(self, version: int, length: int, available: int) -> None:
        """Record and raise the error, once the header is here (if the claimed length promises one)."""
        if available < HEADER_LENGTH and length >= HEADER_LENGTH:
            return None  # wait for the rest of the header so the answer can echo it
        header = bytes(self._buffer[self._start : self._start + HEADER_LENGTH]) if available >= 20 else None
        if version != 1:
            code, why = DIAMETER_UNSUPPORTED_VERSION, f"Diameter version {version} is not supported"
        elif length < HEADER_LENGTH:
            code, why = DIAMETER_INVALID_MESSAGE_LENGTH, f"message length {length} is below 20"
        elif length & 3:
            code, why = DIAMETER_INVALID_MESSAGE_LENGTH, f"message length {length} is not a multiple of 4"
        else:
            code, why = DIAMETER_INVALID_MESSAGE_LENGTH, f"message length {length} exceeds {self._max_length}"
        error = FramingError(code, why, header)
        self._error = error
        raise error
