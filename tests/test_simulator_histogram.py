"""The simulator's latency histogram against exact percentiles of sorted data, and its scenario files."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulators.histogram import SUB_BITS, LatencyHistogram
from simulators.scenario import SCENARIO_DIR, ScenarioError, load_scenario, parse_scenario

FRACTIONS = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]
RELATIVE_ERROR = 1 / (1 << (SUB_BITS - 1))


def exact_percentile(values: list[int], fraction: float) -> int:
    """Nearest rank on sorted data: the smallest value with at least `fraction` of the values at or below it."""
    ordered = sorted(values)
    rank = min(max(1, math.ceil(round(fraction * len(ordered), 9))), len(ordered))
    return ordered[rank - 1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 300), st.integers(0, 10**6), st.integers(0, 10**12)), min_size=1,
                max_size=400))
def test_percentiles_are_within_the_bucket_precision_of_the_exact_ones(values):
    histogram = LatencyHistogram()
    histogram.record_many(values)
    assert (histogram.count, histogram.min, histogram.max, histogram.total) == (
        len(values), min(values), max(values), sum(values))
    for fraction in FRACTIONS:
        exact = exact_percentile(values, fraction)
        reported = histogram.percentile(fraction)
        assert exact <= reported <= max(exact, math.floor(exact * (1 + RELATIVE_ERROR))), (fraction, exact, reported)
        if exact < 1 << SUB_BITS:
            assert reported == exact  # small values have a bucket each


def test_known_percentiles_of_1_to_10000_us():
    histogram = LatencyHistogram()
    histogram.record_many(range(1, 10_001))
    assert histogram.percentile(0.5) == pytest.approx(5000, rel=RELATIVE_ERROR)
    assert histogram.percentile(0.99) == pytest.approx(9900, rel=RELATIVE_ERROR)
    assert histogram.percentile(1.0) == 10_000
    assert histogram.percentile(0.0) == 1
    summary = histogram.summary_ms()
    assert summary["max"] == 10.0 and summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["p999"] <= 10.0


@given(st.lists(st.integers(0, 10**9), max_size=100), st.lists(st.integers(0, 10**9), max_size=100))
def test_merge_is_the_same_as_recording_everything(first, second):
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    a.record_many(first)
    b.record_many(second)
    both.record_many(first + second)
    a.merge(b)
    assert (a.counts, a.count, a.total, a.min, a.max) == (both.counts, both.count, both.total, both.min, both.max)


def test_empty_histogram_and_bad_fraction():
    histogram = LatencyHistogram()
    assert histogram.percentile(0.99) == 0 and histogram.summary_ms()["max"] == 0
    histogram.record(-5)  # a clock step back counts as 0, never crashes the run
    assert histogram.min == 0
    with pytest.raises(ValueError):
        histogram.percentile(1.5)


# ------------------------------------------------------------------------------------------ scenarios

@pytest.mark.parametrize("path", sorted(SCENARIO_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_ready_scenario_loads(path):
    scenario = load_scenario(path.stem)
    assert scenario.name == path.stem and scenario.description
    assert len(scenario.subscribers.population()) == (len(scenario.subscribers.msisdns) or scenario.subscribers.count)


def test_the_four_ready_scenarios_exist():
    assert {p.stem for p in SCENARIO_DIR.glob("*.toml")} >= {"smoke", "steady-data", "peak-mixed",
                                                              "retransmission-storm"}


@pytest.mark.parametrize("text, expected", [
    ('[traffic]\nmode = "sideways"', "[traffic].mode: Invalid enum value 'sideways'"),
    ("[traffic]\nupdates = \"3\"", "[traffic].updates: Expected `int`, got `str`"),
    ("[traffic]\nspeed = 3", "[traffic]: Object contains unknown field `speed`"),
    ("[traffic]\nevent_share = 1.5", "[traffic].event_share: must be within 0..1, got 1.5"),
    ("[traffic]\nretransmission_share = 0.1", "[traffic].retransmission_share: needs [gateways].connections ≥ 2"),
    ("[traffic]\nrating_groups = [100]\nrating_groups_per_session = 2", "[traffic].rating_groups_per_session"),
    ("[gateways]\nconnections = 3\norigin_host = \"gw.sim\"", "[gateways].origin_host: must contain {n}"),
    ("[subscribers]\nfirst = \"49x\"", "[subscribers].first: '49x' is not all digits"),
    ("[phases]\nsteady_seconds = 0", "[phases].steady_seconds: must be positive"),
    ("name = [", "not valid TOML"),
])
def test_scenario_errors_name_the_key(text, expected):
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, source="bad.toml")
    assert str(caught.value).startswith("bad.toml: ") and expected in str(caught.value)


def test_unknown_scenario_name_lists_the_ready_ones():
    with pytest.raises(ScenarioError, match="smoke"):
        load_scenario("no-such-scenario")


def test_population_from_first_and_count_keeps_leading_zeros():
    scenario = parse_scenario('[subscribers]\nfirst = "0049170000099"\ncount = 3')
    assert scenario.subscribers.population() == ["0049170000099", "0049170000100", "0049170000101"]
