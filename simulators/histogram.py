"""A log-linear bucket histogram of latencies (HDR-style): constant memory, bounded relative error.

Why not a list of every latency: a load test records millions of values, and the percentiles of a
steady phase must be mergeable across connections and phases. Why not a fixed-width histogram: latencies
span microseconds to seconds, and a p99.9 needs the same relative precision at both ends.

Theory: values are non-negative integers (microseconds here). Values below 2**SUB_BITS get a bucket
each (exact). Above, each power-of-two range [2**k, 2**(k+1)) is split into 2**(SUB_BITS-1) equal
buckets, so a bucket is never wider than 1/2**(SUB_BITS-1) of its lower bound: with SUB_BITS = 8 a
reported percentile is within 0.8 % of the exact one (rounded up to the bucket's highest value and
clipped to the recorded min/max, so p100 is the exact maximum). Recording is one `bit_length`, a shift
and a list increment.

Imports nothing of the project; used by the simulator and its tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["LatencyHistogram", "SUB_BITS"]

SUB_BITS = 8
_SUB_COUNT = 1 << SUB_BITS  # exact values below this
_HALF = _SUB_COUNT >> 1  # buckets per power of two above it
_MAX_BITS = 64


def _index(value: int) -> int:
    if value < _SUB_COUNT:
        return value
    shift = value.bit_length() - SUB_BITS
    return (shift << (SUB_BITS - 1)) + (value >> shift)


def _highest(index: int) -> int:
    """The largest value that falls in bucket `index`."""
    if index < _SUB_COUNT:
        return index
    shift = (index >> (SUB_BITS - 1)) - 1
    mantissa = index - (shift << (SUB_BITS - 1))
    return ((mantissa + 1) << shift) - 1


class LatencyHistogram:
    """Counts of integer values (µs) in log-linear buckets; percentiles, merge, and a compact dict form."""

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * (_index((1 << _MAX_BITS) - 1) + 1)
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max = 0

    def record(self, value: int) -> None:
        """Add one value; negative values count as 0 (a clock that stepped back must not crash a run)."""
        if value < 0:
            value = 0
        self.counts[value if value < _SUB_COUNT else _index(value)] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        if self.min is None or value < self.min:
            self.min = value

    def record_many(self, values: Iterable[int]) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: LatencyHistogram) -> None:
        """Add every value of `other` (e.g. per-connection histograms into one)."""
        if not other.count:
            return
        counts = self.counts
        for index, n in enumerate(other.counts):
            if n:
                counts[index] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min

    def percentile(self, fraction: float) -> int:
        """The value at `fraction` (0..1) by nearest rank: the smallest bucket holding at least that share."""
        if not self.count:
            return 0
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"percentile fraction must be within 0..1, got {fraction}")
        # ceil(fraction × count); the rounding keeps 0.99 × 100 at 99, not 99.00000000000001 → 100
        rank = min(max(1, math.ceil(round(fraction * self.count, 9))), self.count)
        seen = 0
        for index, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= rank:
                    value = _highest(index)
                    assert self.min is not None
                    return min(max(value, self.min), self.max)
        return self.max  # pragma: no cover - the counts always add up to count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def summary_ms(self) -> dict[str, float]:
        """p50/p90/p99/p999/max (and mean) in milliseconds, as the report prints them."""
        return {
            "p50": self.percentile(0.50) / 1000,
            "p90": self.percentile(0.90) / 1000,
            "p99": self.percentile(0.99) / 1000,
            "p999": self.percentile(0.999) / 1000,
            "max": self.max / 1000,
            "mean": round(self.mean / 1000, 3),
        }

    def buckets(self) -> list[tuple[int, int]]:
        """(highest value of the bucket, count) for every non-empty bucket, ascending: for plots."""
        return [(_highest(index), n) for index, n in enumerate(self.counts) if n]
