"""ReceiveBuffer hands out exactly the frames that were fed, whatever their sizes and however the bytes
arrive (the whole-buffer shortcut of next_frame must only apply when the frame really is the whole buffer)."""

from __future__ import annotations

import random

from protocol.codec import encode_message
from protocol.framing import ReceiveBuffer


def frame(number: int, size: int) -> bytes:
    """A CCR-like request of `size` AVP bytes (Session-Id padded out), numbered by its hop-by-hop id."""
    text = ("s" * max(0, size - 8))[: max(0, size - 8)]
    return encode_message(272, 4, 0x80, number, number, [("Session-Id", text)])


def test_frames_of_equal_first_and_third_length_in_one_read():
    frames = [frame(1, 100), frame(2, 40), frame(3, 100)]  # after the first, 2 × start + length == buffered
    buffer = ReceiveBuffer()
    buffer.feed(b"".join(frames))
    assert [buffer.next_frame() for _ in frames] == frames
    assert buffer.next_frame() is None and len(buffer) == 0


def test_any_frames_in_any_chunks_come_out_unchanged():
    rng = random.Random(5)
    frames = [frame(n, rng.choice((12, 40, 100, 400, 1000))) for n in range(300)]
    stream = b"".join(frames)
    buffer = ReceiveBuffer()
    out: list[bytes] = []
    offset = 0
    while offset < len(stream):
        size = rng.choice((1, 3, 20, 64, 500, 4000, 70_000))
        buffer.feed(stream[offset:offset + size])
        offset += size
        while (next_frame := buffer.next_frame()) is not None:
            out.append(next_frame)
    assert out == frames and len(buffer) == 0
