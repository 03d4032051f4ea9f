"""Balances, reservations and sessions in Redis/Valkey, changed only by atomic Lua scripts.

Knows Redis keys, partitions and money in integer micro-units; knows nothing of Diameter.
Never import protocol or ocs from here.
"""
