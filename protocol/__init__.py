"""Diameter base protocol (RFC 6733) as a sans-IO core: bytes in, events out.

Codec, framing and the peer state machine know nothing of charging; only `protocol.transport`
imports asyncio. Never import ocs, balances or ratecards from here.
"""
