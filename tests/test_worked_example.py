"""The README's worked example (examples/worked_example.py) runs and prints the rate card's prices.

The script is run as the README says (its own embedded Valkey, a fixed clock); the expected amounts are
computed here from examples/worked-example/ratecard.toml and catalog.toml with Decimal, not copied from the
output, and the output must be the one pasted into the README's "Worked example" section.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "worked-example"
MB = 1_048_576
CENT = Decimal("0.01")

# the session the script drives: what each report says (octets), where, and with which tariff it is rated
BEFORE_MIDNIGHT, AFTER_MIDNIGHT = 1200 * MB, 300 * MB  # CCR-U #1 at 00:10, split by Tariff-Change-Usage
AT_HANDOVER = 200 * MB  # CCR-U #2 at 00:40 from 20801: used at home before the handover, under the night grant
IN_FRANCE = 100 * MB  # CCR-T #3 at 01:00: used under the grant given in France
START_MONEY = Decimal("50.00")


@pytest.fixture(scope="module")
def output() -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "worked_example.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def card() -> dict:
    return tomllib.loads((EXAMPLE / "ratecard.toml").read_text())


@pytest.fixture(scope="module")
def catalog() -> dict:
    return tomllib.loads((EXAMPLE / "catalog.toml").read_text())


def data_rate(card: dict) -> dict:
    (rate,) = [r for r in card["plans"]["travel"]["rates"] if r["rating_group"] == 100]
    return rate


def price_of(card: dict, tariff: str | None) -> Decimal:
    rate = data_rate(card)
    if tariff is None:
        return Decimal(rate["price"])
    (found,) = [t for t in rate["tariffs"] if t["name"] == tariff]
    return Decimal(found["price"])


def charge(card: dict, octets: int, tariff: str | None) -> Decimal:
    """Whole increments at the price per `per` units, rounded up to the cent (the card's rounding)."""
    rate = data_rate(card)
    assert card["rounding"] == "up"
    increments = -(-octets // rate["increment"])
    exact = price_of(card, tariff) * increments * rate["increment"] / rate["per"]
    return exact.quantize(CENT, rounding=ROUND_CEILING)


def rows(output: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after the line starting with `heading`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    found, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("│"):
            found.append([cell.strip() for cell in line.strip("│").split("│")])
            seen = True
        elif seen and line.startswith("└"):
            break
    return found


def money(value: Decimal) -> str:
    return f"{value:.2f}"


def expected_amounts(card: dict, catalog: dict) -> dict[str, Decimal]:
    bundle = catalog["plans"]["travel"]["allowances"][0]["amount"]
    assert catalog["plans"]["travel"]["allowances"][0]["rating_groups"] == [100]
    assert BEFORE_MIDNIGHT > bundle  # the bundle is used up before midnight: the rest is paid by day
    return {
        "fee": Decimal(catalog["plans"]["travel"]["recurring_fee"]),
        "before": charge(card, BEFORE_MIDNIGHT - bundle, None),
        "after": charge(card, AFTER_MIDNIGHT, "night"),
        "handover": charge(card, AT_HANDOVER, "night"),
        "france": charge(card, IN_FRANCE, "eu-roaming"),
    }


def test_the_answers(output, card, catalog):
    """23:50: 2 GB granted (the 1 GB bundle + 1 GB of money, held at the dearer of day and night) with
    Tariff-Time-Change at midnight local time; then 500 MB grants (the default quota) held at the night price,
    then at the EU price; no further change within the hour's grants; nothing held after the CCR-T."""
    rate = data_rate(card)
    bundle = catalog["plans"]["travel"]["allowances"][0]["amount"]
    first_grant, grant = 2048 * MB, rate["default_quota"]
    dearer = max(charge(card, first_grant - bundle, None), charge(card, first_grant - bundle, "night"))
    assert rows(output, "The data session") == [
        ["23:50 CET", "CCR-I #0", "26201", "-", "2001/2001", "2048", "00:00 CET", money(dearer)],
        ["00:10 CET", "CCR-U #1", "-", "1200 before, 300 after", "2001/2001", str(grant // MB), "-",
         money(charge(card, grant, "night"))],
        ["00:40 CET", "CCR-U #2", "20801", "200", "2001/2001", str(grant // MB), "-",
         money(charge(card, grant, "eu-roaming"))],
        ["01:00 CET", "CCR-T #3", "-", "100", "2001/2001", "-", "-", "0.00"],
    ]


def test_the_usage_records_are_priced_by_the_card(output, card, catalog):
    amounts = expected_amounts(card, catalog)
    assert (amounts["before"], amounts["after"], amounts["handover"], amounts["france"]) == (
        Decimal("0.02") * 176, Decimal("0.005") * 300, Decimal("0.005") * 200, Decimal("0.05") * 100)
    first = amounts["before"] + amounts["after"]
    assert rows(output, "Its usage records") == [
        ["#1", "1500", f"1200 day (before) {money(amounts['before'])} + 300 night (after) {money(amounts['after'])}",
         money(first), f"data-month 1024 MB, money {money(first)}"],
        ["#2", "200", f"200 night {money(amounts['handover'])}", money(amounts["handover"]),
         f"money {money(amounts['handover'])}"],
        ["#3", "100", f"100 eu-roaming {money(amounts['france'])}", money(amounts["france"]),
         f"money {money(amounts['france'])}"],
    ]


def test_the_balance_history_explains_every_change(output, card, catalog):
    amounts = expected_amounts(card, catalog)
    bundle = catalog["plans"]["travel"]["allowances"][0]["amount"]
    balance = START_MONEY - amounts["fee"]
    expected = [
        ["2027-01-15 08:00:00", "provision", "money", f"+{money(START_MONEY)}", f"{money(START_MONEY)} EUR", ""],
        ["2027-01-15 08:00:00", "renewal", "money", f"-{money(amounts['fee'])}", f"{money(balance)} EUR",
         "travel;1800000000000"],
        ["2027-01-15 08:00:00", "renewal", "data-month", f"+{bundle:,}", f"{bundle:,}", "travel;1800000000000"],
        ["2027-01-15 23:10:00", "usage", "data-month", f"-{bundle:,}", "0", "pgw1.example.net;1;1;1"],
    ]
    for number, (time, amount) in enumerate((("23:10", amounts["before"] + amounts["after"]),
                                             ("23:40", amounts["handover"]), ("00:00", amounts["france"])), 1):
        balance -= amount
        day = "2027-01-16" if time == "00:00" else "2027-01-15"
        expected.append([f"{day} {time}:00", "usage", "money", f"-{money(amount)}", f"{money(balance)} EUR",
                         f"pgw1.example.net;1;1;{number}"])
    assert rows(output, "$ ocs balance") == expected
    assert f"money left: {money(balance)} EUR, reserved 0.00" in output
    assert "$ ocs audit\nOK: every balance is explained (5 ledger entries, 3 rated CDR records)" in output


def test_the_readme_shows_this_output(output):
    """The README's worked example is the script's real output (re-paste it when the example changes)."""
    readme = (ROOT / "README.md").read_text()
    assert "## Worked example" in readme
    section = readme.split("## Worked example", 1)[1]
    assert "```text\n" + output + "```" in section
