"""Tests of the receive buffer: frames out of an untrusted TCP byte stream."""

from __future__ import annotations

import struct

import pytest

from protocol.codec import decode_message, encode_message
from protocol.framing import FramingError, ReceiveBuffer


def frame(n: int = 0, session: str = "s;1") -> bytes:
    return encode_message(272, 4, 0xC0, n, n, [("Session-Id", f"{session};{n}"), ("CC-Request-Number", n)])


def header(length: int, version: int = 1) -> bytes:
    return struct.pack(">IIIII", version << 24 | length, 0xC0 << 24 | 272, 4, 0x11223344, 0x55667788)


def drain(buffer: ReceiveBuffer) -> list[bytes]:
    frames = []
    while (next_frame := buffer.next_frame()) is not None:
        frames.append(next_frame)
    return frames


def test_fragmented_byte_by_byte():
    stream = frame(1) + frame(2)
    buffer = ReceiveBuffer()
    out = []
    for i in range(len(stream)):
        buffer.feed(stream[i : i + 1])
        out += drain(buffer)
    assert out == [frame(1), frame(2)]
    assert len(buffer) == 0


def test_many_messages_in_one_feed_and_a_partial_tail():
    messages = [frame(n) for n in range(500)]
    stream = b"".join(messages)
    buffer = ReceiveBuffer()
    buffer.feed(stream + messages[0][:7])
    assert drain(buffer) == messages
    assert len(buffer) == 7
    buffer.feed(messages[0][7:])
    assert drain(buffer) == [messages[0]]
    assert decode_message(messages[499]).get("CC-Request-Number") == 499


def test_compaction_keeps_frames_intact_across_large_streams():
    buffer = ReceiveBuffer()
    messages = [frame(n, session="x" * 200) for n in range(2000)]  # ~460 kB, forces compaction
    stream = b"".join(messages)
    out = []
    for i in range(0, len(stream), 1000):  # reads that split frames everywhere
        buffer.feed(stream[i : i + 1000])
        out += drain(buffer)
    assert out == messages


def test_empty_feed_and_short_header_wait():
    buffer = ReceiveBuffer()
    buffer.feed(b"")
    assert buffer.next_frame() is None
    buffer.feed(b"\x01\x00")
    assert buffer.next_frame() is None


@pytest.mark.parametrize("length", [0, 4, 19])
def test_lengths_below_a_header_fail_at_once(length):
    buffer = ReceiveBuffer()
    buffer.feed(struct.pack(">I", 0x01000000 | length))  # only the first word: must not wait for more
    with pytest.raises(FramingError) as caught:
        buffer.next_frame()
    assert caught.value.result_code == 5015 and caught.value.header is None


def test_length_below_a_header_keeps_the_header_when_present():
    buffer = ReceiveBuffer()
    buffer.feed(header(4))
    with pytest.raises(FramingError) as caught:
        buffer.next_frame()
    assert caught.value.result_code == 5015 and caught.value.header == header(4)


def test_length_not_a_multiple_of_four():
    buffer = ReceiveBuffer()
    buffer.feed(header(21) + b"\0")
    with pytest.raises(FramingError) as caught:
        buffer.next_frame()
    assert caught.value.result_code == 5015 and caught.value.header == header(21)


def test_huge_length_fails_without_buffering_the_body():
    buffer = ReceiveBuffer(max_message_length=4096)
    buffer.feed(header(0xFFFFFC))
    with pytest.raises(FramingError) as caught:
        buffer.next_frame()
    assert caught.value.result_code == 5015 and caught.value.header == header(0xFFFFFC)
    assert "4096" in caught.value.message


def test_message_of_exactly_the_maximum_is_accepted():
    message = frame(7)
    buffer = ReceiveBuffer(max_message_length=len(message))
    buffer.feed(message)
    assert buffer.next_frame() == message


def test_version_2_fails_with_the_header_available():
    bad = bytearray(frame(3))
    bad[0] = 2
    buffer = ReceiveBuffer()
    buffer.feed(bytes(bad))
    with pytest.raises(FramingError) as caught:
        buffer.next_frame()
    assert caught.value.result_code == 5011
    assert caught.value.header == bytes(bad[:20])


def test_version_error_waits_for_the_header_when_fed_slowly():
    bad = header(24, version=2)
    buffer = ReceiveBuffer()
    for i in range(19):
        buffer.feed(bad[i : i + 1])
        assert buffer.next_frame() is None
    buffer.feed(bad[19:])
    with pytest.raises(FramingError) as caught:
        buffer.next_frame()
    assert caught.value.header == bad


def test_after_an_error_the_buffer_stays_dead():
    buffer = ReceiveBuffer()
    buffer.feed(frame(1) + header(0) + frame(2))
    assert buffer.next_frame() == frame(1)
    with pytest.raises(FramingError) as first:
        buffer.next_frame()
    with pytest.raises(FramingError) as again:
        buffer.next_frame()
    assert again.value is first.value
    with pytest.raises(FramingError):
        buffer.feed(frame(3))


def test_max_length_must_allow_a_header():
    with pytest.raises(ValueError):
        ReceiveBuffer(max_message_length=8)
