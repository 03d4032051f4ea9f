"""Load and conformance simulators that speak only standard Gy on the wire.

Uses protocol/ for encoding; never imports balances or ocs internals, so it can drive any OCS.
"""
