"""`ocs ratecard validate|load|show` and `ocs rate`: JSON output, versions on disk, one clear line on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ocs.cli import app

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "examples" / "ratecard-full.toml"
DEMO = ROOT / "ocs" / "demo" / "ratecard.toml"


@pytest.fixture
def ocs(tmp_path):
    runner = CliRunner()
    env = {"OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0"}

    def invoke(*args: str, **extra: str):
        return runner.invoke(app, list(args), env={**env, **extra}, catch_exceptions=False)

    return invoke


def one_error_line(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_validate(ocs, tmp_path) -> None:
    result = ocs("ratecard", "validate", str(FULL), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["valid"], summary["version"], summary["plans"], summary["tariffs"], summary["bands"]) == (
        True, "2026-12-full", 2, 9, 2)
    result = ocs("ratecard", "validate", str(FULL))
    assert result.exit_code == 0 and "valid" in result.stdout
    bad = tmp_path / "card.toml"
    bad.write_text(FULL.read_text().replace('first_increment = 30', 'first_increment = 0'))
    one_error_line(ocs("ratecard", "validate", str(bad)), f"{bad}:", "plans.full.rates[1].tariffs[1].first_increment",
                   "positive multiple")
    one_error_line(ocs("ratecard", "validate", str(tmp_path / "missing.toml")), "cannot read")


def _version(tmp_path: Path, version: str, effective: str, price: str = "0.06") -> Path:
    text = DEMO.read_text().replace('version = "2026-11-demo"', f'version = "{version}"\neffective_from = {effective}')
    text = text.replace('price = "0.05"', f'price = "{price}"')
    path = tmp_path / f"{version}.toml"
    path.write_text(text)
    return path


def test_load_show_and_rate_with_versions(ocs, tmp_path) -> None:
    new = _version(tmp_path, "2027-03", "2027-03-01T00:00:00Z")
    # too late: less than one reload interval before it takes effect
    one_error_line(ocs("ratecard", "load", str(new), "--now", "2027-02-28T23:59:30Z"), "reload interval (60 s)")
    assert not (tmp_path / "ratecards").exists()
    result = ocs("ratecard", "load", str(new), "--now", "2027-02-28T23:00:00Z", "--json")
    assert result.exit_code == 0, result.output
    loaded = json.loads(result.stdout)
    assert loaded["changed"] and loaded["seeded"].endswith("2026-11-demo.toml")
    assert any("price '0.05' → '0.06'" in line for line in loaded["changes"])
    assert sorted(p.name for p in (tmp_path / "ratecards").iterdir()) == ["2026-11-demo.toml", "2027-03.toml"]
    again = ocs("ratecard", "load", str(new), "--now", "2027-02-28T23:00:00Z")
    assert again.exit_code == 0 and "nothing changed" in again.stdout
    (tmp_path / "other").mkdir()
    clash = _version(tmp_path / "other", "2027-03", "2027-03-01T00:00:00Z", price="0.07")
    one_error_line(ocs("ratecard", "load", str(clash), "--now", "2027-02-28T23:00:00Z"), "already loaded")

    shown = json.loads(ocs("ratecard", "show", "--at", "2027-02-15T12:00:00Z", "--json").stdout)
    assert [(v["version"], v["in_force"]) for v in shown["versions"]] == [("2026-11-demo", True), ("2027-03", False)]
    shown = json.loads(ocs("ratecard", "show", "--at", "2027-03-15T12:00:00Z", "--plan", "demo", "--json").stdout)
    assert shown["in_force"] == "2027-03" and list(shown["plans"]) == ["demo"]
    assert ocs("ratecard", "show").exit_code == 0
    one_error_line(ocs("ratecard", "show", "--plan", "gold"), "unknown plan 'gold'")

    # a 3-minute call across the version change: one minute at 0.05, two at 0.06
    result = ocs("rate", "--plan", "demo", "--service", "voice", "--usage", "3m", "--at", "2027-02-28T23:59:00Z",
                 "--json")
    assert result.exit_code == 0, result.output
    quote = json.loads(result.stdout)
    assert [(p["version"], p["amount"]) for p in quote["parts"]] == [("2026-11-demo", 50_000), ("2027-03", 120_000)]
    assert quote["amount"] == 170_000 and quote["currency"] == "EUR"
    text = ocs("rate", "--plan", "demo", "--service", "voice", "--usage", "3m", "--at", "2027-02-28T23:59:00Z")
    assert text.exit_code == 0 and "total 0.17 EUR" in text.stdout


def test_rate_with_a_card_file(ocs) -> None:
    result = ocs("rate", "--ratecard", str(FULL), "--plan", "full", "--service", "voice", "--usage", "5m",
                 "--destination", "+33612345678", "--at", "2026-12-01T21:58:00", "--json")
    assert result.exit_code == 0, result.output
    quote = json.loads(result.stdout)
    assert quote["amount"] == 1_500_000 and quote["parts"][0]["tariff"] == "international-eu"
    premium = json.loads(ocs("rate", "--ratecard", str(FULL), "--plan", "full", "--service", "voice", "--usage",
                             "1m", "--destination", "0900123", "--json").stdout)
    assert premium["barred"] is True
    data = json.loads(ocs("rate", "--ratecard", str(FULL), "--plan", "full", "--usage", "100MiB", "--plmn", "20801",
                          "--at", "2026-12-01T12:00:00", "--json").stdout)
    assert (data["rating_group"], data["amount"], data["parts"][0]["tariff"]) == (100, 2_000_000, "eu-roaming")


@pytest.mark.parametrize("args, words", [
    (["--plan", "demo", "--usage", "5 parsecs", "--service", "voice"], ["usage '5 parsecs'"]),
    (["--plan", "demo", "--usage", "1.5s", "--service", "voice"], ["whole number of seconds"]),
    (["--plan", "demo", "--usage", "1m", "--rating-group", "7"], ["no rating group 7"]),
    (["--plan", "demo", "--usage", "1m", "--service", "fax"], ["no service 'fax'"]),
    (["--plan", "gold", "--usage", "1m"], ["unknown plan 'gold'"]),
    (["--usage", "1m"], ["either --msisdn or --plan"]),
    (["--plan", "demo", "--usage", "1m", "--at", "yesterday"], ["ISO 8601"]),
])
def test_rate_bad_input_is_one_line(ocs, args: list[str], words: list[str]) -> None:
    one_error_line(ocs("rate", *args), *words)


def test_rate_for_a_subscriber_reads_the_plan(ocs, valkey_url) -> None:
    added = ocs("subscriber", "add", "491700000099", "--plan", "demo", "--money", "5", "--json",
                OCS_REDIS_URL=valkey_url)
    assert added.exit_code == 0, added.output
    result = ocs("rate", "--msisdn", "491700000099", "--usage", "10MiB", "--json", OCS_REDIS_URL=valkey_url)
    assert result.exit_code == 0, result.output
    quote = json.loads(result.stdout)
    assert (quote["msisdn"], quote["plan"], quote["rating_group"], quote["amount"]) == (
        "491700000099", "demo", 100, 100_000)
    one_error_line(ocs("rate", "--msisdn", "491700000098", "--usage", "1MB", OCS_REDIS_URL=valkey_url),
                   "unknown subscriber 491700000098")


def test_the_reload_interval_comes_from_the_configuration(ocs, tmp_path) -> None:
    new = _version(tmp_path, "2027-03", "2027-03-01T00:00:00Z")
    one_error_line(ocs("ratecard", "load", str(new), "--now", "2027-02-28T23:00:00Z",
                       OCS_CHARGING__RATECARD_RELOAD_SECONDS="7200"), "reload interval (7200 s)")
    result = ocs("ratecard", "load", str(new), "--now", "2027-02-28T23:00:00Z", "--reload-interval", "3600")
    assert result.exit_code == 0, result.output
