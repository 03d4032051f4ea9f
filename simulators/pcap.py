"""Diameter messages out of packet captures (pcap and pcapng; TCP and SCTP), with no tshark needed.

Used to replay real traffic at a server (`ocs replay`) and by the conformance tests. TCP payloads are joined
per flow in capture order (enough for captures taken on one host, which is what we replay); SCTP DATA chunks
are taken one message per chunk (fragmented chunks are joined by TSN order within a stream). Anything that is
not Ethernet/Linux-cooked/loopback + IPv4/IPv6 + TCP/SCTP is skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
PCAPNG_SECTION = 0x0A0D0D0A
LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_NULL, LINKTYPE_LINUX_SLL2 = 1, 101, 113, 0, 276
IPPROTO_TCP, IPPROTO_SCTP = 6, 132


@dataclass(frozen=True)
class Frame:
    """One Diameter message and where it came from."""

    data: bytes
    source: tuple[str, int]
    destination: tuple[str, int]
    transport: str  # "tcp" | "sctp"

    @property
    def is_request(self) -> bool:
        return bool(self.data[4] & 0x80)

    @property
    def command_code(self) -> int:
        return int.from_bytes(self.data[5:8], "big")

    @property
    def application_id(self) -> int:
        return int.from_bytes(self.data[8:12], "big")

    @property
    def hop_by_hop(self) -> int:
        return int.from_bytes(self.data[12:16], "big")

    @property
    def end_to_end(self) -> int:
        return int.from_bytes(self.data[16:20], "big")


def _packets(path: Path) -> Iterator[tuple[int, bytes]]:
    """(link type, packet bytes) of every packet of a pcap or pcapng file."""
    data = path.read_bytes()
    if data[:4] in PCAP_MAGICS:
        order = PCAP_MAGICS[data[:4]]
        linktype = struct.unpack_from(order + "I", data, 20)[0]
        offset = 24
        while offset + 16 <= len(data):
            captured = struct.unpack_from(order + "I", data, offset + 8)[0]
            yield linktype, data[offset + 16:offset + 16 + captured]
            offset += 16 + captured
        return
    if struct.unpack_from("<I", data, 0)[0] != PCAPNG_SECTION:
        raise ValueError(f"{path}: not a pcap or pcapng file")
    order = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
    linktypes: list[int] = []
    offset = 0
    while offset + 12 <= len(data):
        block_type, block_length = struct.unpack_from(order + "II", data, offset)
        if block_length < 12:
            break
        body = offset + 8
        if block_type == PCAPNG_SECTION:
            order = "<" if data[body:body + 4] == b"\x4d\x3c\x2b\x1a" else ">"
            linktypes = []
        elif block_type == 1:  # interface description
            linktypes.append(struct.unpack_from(order + "H", data, body)[0])
        elif block_type == 6:  # enhanced packet
            interface, _, _, captured, _ = struct.unpack_from(order + "IIIII", data, body)
            yield linktypes[interface] if interface < len(linktypes) else LINKTYPE_ETHERNET, \
                data[body + 20:body + 20 + captured]
        elif block_type == 3:  # simple packet
            captured = block_length - 16
            yield linktypes[0] if linktypes else LINKTYPE_ETHERNET, data[body + 4:body + 4 + captured]
        offset += block_length


def _ip_payload(linktype: int, packet: bytes) -> tuple[int, str, str, bytes] | None:
    """(protocol, source, destination, payload) of an IPv4/IPv6 packet under the link layer."""
    if linktype == LINKTYPE_ETHERNET:
        ethertype, offset = struct.unpack_from("!H", packet, 12)[0], 14
        while ethertype == 0x8100:  # VLAN
            ethertype, offset = struct.unpack_from("!H", packet, offset + 2)[0], offset + 4
    elif linktype == LINKTYPE_LINUX_SLL:
        ethertype, offset = struct.unpack_from("!H", packet, 14)[0], 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        ethertype, offset = struct.unpack_from("!H", packet, 0)[0], 20
    elif linktype == LINKTYPE_NULL:
        family = struct.unpack_from("<I", packet, 0)[0]
        ethertype, offset = (0x0800 if family == 2 else 0x86DD), 4
    elif linktype == LINKTYPE_RAW:
        ethertype, offset = (0x0800 if packet[0] >> 4 == 4 else 0x86DD), 0
    else:
        return None
    if ethertype == 0x0800:
        header_length = (packet[offset] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, offset + 2)[0]
        protocol = packet[offset + 9]
        source = ".".join(map(str, packet[offset + 12:offset + 16]))
        destination = ".".join(map(str, packet[offset + 16:offset + 20]))
        return protocol, source, destination, packet[offset + header_length:offset + total]
    if ethertype == 0x86DD:
        length, protocol = struct.unpack_from("!HB", packet, offset + 4)
        source = packet[offset + 8:offset + 24].hex()
        destination = packet[offset + 24:offset + 40].hex()
        return protocol, source, destination, packet[offset + 40:offset + 40 + length]
    return None


def _split_diameter(buffer: bytearray) -> Iterator[bytes]:
    """Complete Diameter messages at the front of a flow's byte stream (consumed from the buffer)."""
    while len(buffer) >= 20:
        if buffer[0] != 1:
            buffer.clear()  # not Diameter (or we joined the flow mid-message): drop the flow's bytes
            return
        length = int.from_bytes(buffer[1:4], "big")
        if length < 20 or len(buffer) < length:
            return
        yield bytes(buffer[:length])
        del buffer[:length]


def read_diameter(path: str | Path) -> list[Frame]:
    """Every Diameter message in the capture, in capture order."""
    frames: list[Frame] = []
    tcp_flows: dict[tuple, bytearray] = {}
    sctp_fragments: dict[tuple, bytearray] = {}
    for linktype, packet in _packets(Path(path)):
        try:
            ip = _ip_payload(linktype, packet)
        except (struct.error, IndexError):
            continue
        if ip is None:
            continue
        protocol, source, destination, payload = ip
        if protocol == IPPROTO_TCP and len(payload) >= 20:
            sport, dport = struct.unpack_from("!HH", payload, 0)
            body = payload[(payload[12] >> 4) * 4:]
            if not body:
                continue
            key = (source, sport, destination, dport)
            buffer = tcp_flows.setdefault(key, bytearray())
            buffer += body
            frames.extend(Frame(m, (source, sport), (destination, dport), "tcp") for m in _split_diameter(buffer))
        elif protocol == IPPROTO_SCTP and len(payload) >= 12:
            sport, dport = struct.unpack_from("!HH", payload, 0)
            offset = 12
            while offset + 4 <= len(payload):
                chunk_type, flags, chunk_length = struct.unpack_from("!BBH", payload, offset)
                if chunk_length < 4:
                    break
                if chunk_type == 0 and chunk_length > 16:  # DATA
                    stream = struct.unpack_from("!H", payload, offset + 8)[0]
                    data = payload[offset + 16:offset + chunk_length]
                    key = (source, sport, destination, dport, stream)
                    if flags & 0x02:  # B: first fragment
                        sctp_fragments[key] = bytearray()
                    sctp_fragments.setdefault(key, bytearray()).extend(data)
                    if flags & 0x01:  # E: last fragment
                        message = bytes(sctp_fragments.pop(key))
                        if len(message) >= 20 and message[0] == 1:
                            frames.append(Frame(message, (source, sport), (destination, dport), "sctp"))
                offset += (chunk_length + 3) & ~3
    return frames
