"""`ocs plan|addon|subscriber change-plan` against a real Valkey: loading (and refusing) a catalog, subscribing on a
catalog plan, buying add-ons, changing plans, renewing, a top-up promotion, and `ocs audit` exact after it all.
Bad input exits 2 with one line and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from balances import keys as k
from ocs.cli import app
from tests.test_cli import dump

DEMO_CATALOG = Path(__file__).resolve().parents[1] / "ocs" / "demo" / "catalog.toml"
MSISDN = "491714000001"
DAY = 86_400_000


@pytest.fixture
def ocs(valkey_url, tmp_path):
    runner = CliRunner()
    env = {"OCS_REDIS_URL": valkey_url, "OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0"}

    def invoke(*args: str):
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return invoke


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_load_list_show(ocs, valkey_url, tmp_path):
    assert ocs("plan", "list").exit_code == 2  # nothing loaded yet
    checked = as_json(ocs("plan", "load", str(DEMO_CATALOG), "--dry-run", "--json"))
    assert checked["dry_run"] and checked["plans"] == ["demo", "demo-plus"]
    assert dump(valkey_url).get(k.CATALOG_KEY.encode()) is None

    loaded = as_json(ocs("plan", "load", str(DEMO_CATALOG), "--json"))
    assert loaded["version"] == "2026-11-demo-catalog" and len(loaded["digest"]) == 12
    listed = as_json(ocs("plan", "list", "--json"))
    assert listed["plans"]["demo"]["recurring_fee"] == "9.99"
    assert set(listed["addons"]) == {"data-5gb", "roaming-pass"}
    shown = as_json(ocs("plan", "show", "demo-plus", "--json"))
    assert shown["ratecard_plan"] == "demo" and set(shown["addons"]) == {"data-5gb", "roaming-pass"}
    assert ocs("plan", "show", "demo").exit_code == 0
    assert ocs("plan", "list").exit_code == 0
    missing = ocs("plan", "show", "gold")
    assert missing.exit_code == 2 and "no plan 'gold'" in missing.stderr

    # a bad file: one line naming the file, line and key; the loaded catalog stays
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO_CATALOG.read_text().replace('price = "5.00"', 'price = 5.00'))
    before = dump(valkey_url)
    result = ocs("plan", "load", str(bad))
    assert result.exit_code == 2
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if text.startswith("price = 5.00"))
    assert f"bad.toml:{line}: addons.data-5gb.price" in result.stderr.replace("\n", "")
    assert dump(valkey_url) == before


def test_subscribe_buy_change_renew_audit(ocs, valkey_url):
    as_json(ocs("plan", "load", str(DEMO_CATALOG), "--json"))

    # the first fee must be covered; refused with nothing written
    before = dump(valkey_url)
    short = ocs("subscriber", "add", MSISDN, "--plan", "demo", "--money", "5.00")
    assert short.exit_code == 2 and "must cover the first fee" in short.stderr
    assert dump(valkey_url) == before

    added = as_json(ocs("subscriber", "add", MSISDN, "--plan", "demo", "--money", "20.00", "--json"))
    assert added["fee"] == 9_990_000 and "data-month" in added["buckets"] and added["rating_plan"] == "demo"
    shown = as_json(ocs("subscriber", "show", MSISDN, "--json"))
    assert shown["catalog_plan"]["plan"] == "demo" and shown["catalog_plan"]["period_end"] > 0
    assert "catalog plan demo, period" in ocs("subscriber", "show", MSISDN).stdout
    balances = {b["bucket"]: b for b in shown["buckets"]}
    assert balances["money"]["balance"] == 10_010_000
    assert balances["data-month"]["balance"] == 1 << 30 and balances["data-month"]["valid_until"]

    bought = as_json(ocs("addon", "buy", MSISDN, "data-5gb", "--ref", "order-1", "--json"))
    assert bought["applied"] and bought["buckets"] == ["data-5gb"] and bought["balance"] == 5_010_000
    again = as_json(ocs("addon", "buy", MSISDN, "data-5gb", "--ref", "order-1", "--json"))
    assert not again["applied"] and again["duplicate"] and again["balance"] == 5_010_000
    before = dump(valkey_url)
    refused = ocs("addon", "buy", MSISDN, "roaming-pass", "--ref", "order-2")
    assert refused.exit_code == 2 and "does not cover the price of roaming-pass" in refused.stderr
    assert ocs("addon", "buy", MSISDN, "no-such", "--ref", "order-3").exit_code == 2
    assert ocs("addon", "buy", "491714999999", "data-5gb").exit_code == 2
    assert dump(valkey_url) == before

    # a top-up of 20.00 earns the top-up promotion's bonus credit
    topped = as_json(ocs("topup", MSISDN, "20.00", "--ref", "t-1", "--json"))
    assert topped["bonuses"] == ["topup-20"]

    changed = as_json(ocs("subscriber", "change-plan", MSISDN, "demo-plus", "--json"))
    assert changed["plan"] == "demo-plus" and "voice-month" in changed["buckets"]
    assert changed["balance"] == 5_010_000 + 20_000_000 - 19_990_000
    assert changed["period_end"] > changed["period_start"]
    assert ocs("subscriber", "change-plan", MSISDN, "gold").exit_code == 2

    renewed = as_json(ocs("plan", "renew", "--now", str(changed["period_end"] + 1000), "--json"))
    assert renewed == {"renewed": 0, "unpaid": 1, "skipped": 0}  # 19.99 due, 5.03 left: suspended
    shown = as_json(ocs("subscriber", "show", MSISDN, "--json"))
    assert shown["subscriber"]["status"] == "suspended"
    as_json(ocs("topup", MSISDN, "20.00", "--ref", "t-2", "--json"))
    renewed = as_json(ocs("plan", "renew", "--now", str(changed["period_end"] + 2 * DAY), "--json"))
    assert renewed == {"renewed": 1, "unpaid": 0, "skipped": 0}
    assert as_json(ocs("subscriber", "show", MSISDN, "--json"))["subscriber"]["status"] == "active"

    report = as_json(ocs("audit", "--json"))
    assert report["ok"], report["differences"]


def test_subscriber_add_without_catalog_keeps_the_rate_card_allowances(ocs):
    added = as_json(ocs("subscriber", "add", MSISDN, "--plan", "demo", "--money", "1.00", "--json"))
    assert "fee" not in added
    shown = as_json(ocs("subscriber", "show", MSISDN, "--json"))
    assert {b["bucket"]: b["balance"] for b in shown["buckets"]} == {"money": 1_000_000, "data": 1 << 30}
    assert "catalog_plan" not in shown
    assert ocs("addon", "buy", MSISDN, "data-5gb").exit_code == 2  # no catalog loaded


async def test_serve_demo_loads_the_demo_catalog_once(valkey_url, tmp_path):
    from balances.store import BalanceStore
    from ocs.catalog import read_catalog, store_catalog
    from ocs.cli import provision_demo
    from ocs.config import load_config

    config = load_config(None, environ={"OCS_REDIS_URL": valkey_url, "OCS_DATA_DIR": str(tmp_path)})
    store = await BalanceStore.connect(valkey_url)
    try:
        await provision_demo(store, config)
        stored = await read_catalog(store.redis)
        assert stored is not None and stored.version == "2026-11-demo-catalog"
        await store_catalog(store.redis, stored.catalog, "# an operator's own\n" + stored.source, 1)
        await provision_demo(store, config)  # a loaded catalog is left as it is
        assert (await read_catalog(store.redis)).source.startswith("# an operator's own")
    finally:
        await store.close()


def test_discount_promotion_becomes_ratecard_versions(ocs, tmp_path):
    from datetime import UTC, datetime, timedelta

    start = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    end = start + timedelta(hours=1)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(DEMO_CATALOG.read_text() + f"""
[promotions.half-price-data]
kind = "discount"
plans = ["demo"]
rating_groups = [100]
percent = "50"
from = {start.isoformat()}
until = {end.isoformat()}
""")
    checked = as_json(ocs("plan", "load", str(catalog), "--dry-run", "--json"))
    assert checked["ratecard_versions"] == ["2026-11-demo.half-price-data", "2026-11-demo.half-price-data-end"]
    assert not (tmp_path / "ratecards").exists()
    as_json(ocs("plan", "load", str(catalog), "--json"))
    assert sorted(p.name for p in (tmp_path / "ratecards").iterdir()) == [
        "2026-11-demo.half-price-data-end.toml", "2026-11-demo.half-price-data.toml", "2026-11-demo.toml"]
    again = as_json(ocs("plan", "load", str(catalog), "--json"))  # the same catalog again: the same versions
    assert again["ratecard_versions"] == checked["ratecard_versions"]

    def price(at: datetime) -> int:
        quote = as_json(ocs("rate", "--plan", "demo", "--rating-group", "100", "--usage", "100MiB", "--at",
                            at.isoformat(), "--json"))
        return quote["amount"]

    assert price(start - timedelta(minutes=1)) == 1_000_000  # 100 MB at 0.01 per MB
    assert price(start + timedelta(minutes=1)) == 500_000
    assert price(end + timedelta(minutes=1)) == 1_000_000

    # one that starts too soon for every process to have the versions is refused, nothing written
    catalog.write_text(catalog.read_text().replace(start.isoformat(), datetime.now(UTC).replace(
        microsecond=0).isoformat(), 1))
    result = ocs("plan", "load", str(catalog))
    assert result.exit_code == 2 and "discount promotion" in result.stderr
