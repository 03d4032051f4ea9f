"""The product catalog against a real Valkey: the file's checks, add-on purchases (debit + buckets + ledger in
one call, refusals that change nothing, idempotent references), renewals (fee, allowances valid for the period,
rollover, suspension when unpaid and renewal after a top-up), plan changes (record, index, and the next CCR
rated with the new plan through the full server), promotions, and `ocs audit` still exact after all of it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import redis

from balances import keys as k
from balances.model import Subscriber
from balances.store import BalanceStore, CatalogRefused
from ocs import catalog as c
from ocs.audit import audit
from ocs.clock import FixedClock
from ocs.routing import reauth_subscriber
from ratecards import load_ratecard, parse_ratecard
from tests.gateway import RAR, Gateway, granted_octets, mscc_of, start_app, wait_for

DEMO = Path(__file__).resolve().parents[1] / "ocs" / "demo"
NOW = 1_769_817_600_000  # 2026-01-31T00:00:00Z: a month-end anchor
DAY = 86_400_000
MB = 1 << 20
EUR = 1_000_000
ALICE, BOB = "491713000001", "491713000002"

CATALOG = """\
version = "test-1"

[plans.basic]
ratecard_plan = "demo"
recurring_fee = "10.00"
period = "month"

  [[plans.basic.allowances]]
  bucket = "data-month"
  unit = "bytes"
  amount = 1000
  rating_groups = [100]
  rollover_cap = 300

[plans.weekly]
ratecard_plan = "demo"
recurring_fee = "2.50"
period = "week"

  [[plans.weekly.allowances]]
  bucket = "sms-week"
  unit = "events"
  amount = 50
  rating_groups = [300]

[addons.data-5gb]
price = "5.00"
plans = ["basic"]

  [[addons.data-5gb.buckets]]
  bucket = "data-5gb"
  unit = "bytes"
  amount = 5000
  rating_groups = [100]
  validity = "30d"

[addons.once-only]
price = "1.00"
repeatable = false

  [[addons.once-only.buckets]]
  bucket = "extra"
  unit = "seconds"
  amount = 60
  rating_groups = [200]
  validity = "1w"

[promotions.welcome]
kind = "bonus"
event = "subscribe"
plans = ["basic"]
from = 2026-01-01T00:00:00Z
until = 2026-03-01T00:00:00Z

  [[promotions.welcome.buckets]]
  bucket = "welcome"
  unit = "bytes"
  amount = 777
  rating_groups = [100]
  validity = "7d"

[promotions.shopper]
kind = "bonus"
event = "addon"
addons = ["data-5gb"]
repeatable = true

  [[promotions.shopper.buckets]]
  bucket = "shopper-credit"
  unit = "money"
  amount = "0.50"
  validity = "30d"
"""


@pytest.fixture
def card():
    return load_ratecard(DEMO / "ratecard.toml")


@pytest.fixture
def catalog(card):
    return c.parse_catalog(CATALOG, source="test.toml", card=card)


@pytest.fixture
async def store(valkey_url):
    store = await BalanceStore.connect(valkey_url)
    yield store
    await store.close()


def dump(url: str) -> dict:
    """Every key and its value: what a refused operation must leave as it was."""
    client = redis.Redis.from_url(url)
    state = {}
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"string":
            state[key] = client.get(key)
        elif kind == b"stream":
            state[key] = client.xlen(key)
        elif kind == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = kind
    client.close()
    return state


async def subscribe(store: BalanceStore, catalog: c.Catalog, msisdn: str, plan: str, money: int, now: int = NOW):
    await store.provision(Subscriber(msisdn=msisdn, plan=c.rating_plan_of(catalog, plan)), money, now_ms=now)
    return await c.start_plan(store, catalog, msisdn, plan, now)


def buckets(states) -> dict:
    return {b.bucket: b for b in states}


async def assert_audit_exact(store: BalanceStore, cdr_directory=None) -> None:
    report = await audit(store, cdr_directory)
    assert report.ok, report.differences


# ---- the file -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("edit", "expected"), [
    (("recurring_fee = \"10.00\"", "recurring_fee = 10.0"), "test.toml:5: plans.basic.recurring_fee: expected `str`"),
    (("period = \"week\"", "period = \"fortnight\""), "test.toml:18: plans.weekly.period: a period is month, week"),
    (("ratecard_plan = \"demo\"\nrecurring_fee = \"2.50\"", "ratecard_plan = \"gold\"\nrecurring_fee = \"2.50\""),
     "test.toml:16: plans.weekly.ratecard_plan: the rate card has no plan 'gold'"),
    (("rating_groups = [300]", "rating_groups = [999]"),
     "test.toml:24: plans.weekly.allowances[0].rating_groups: rating group 999 is not rated"),
    (("price = \"5.00\"", "price = \"5.001\""), "test.toml:27: addons.data-5gb.price: 5.001 has more decimals"),
    (("plans = [\"basic\"]\n\n  [[addons", "plans = [\"gold\"]\n\n  [[addons"),
     "test.toml:28: addons.data-5gb.plans: no plan 'gold' in the catalog"),
    (("validity = \"1w\"", "validity = \"soon\""), "test.toml:46: addons.once-only.buckets[0].validity: a validity"),
    (("amount = \"0.50\"", "amount = 50"),
     "test.toml:71: promotions.shopper.buckets[0].amount: a money amount is a decimal string"),
    (("event = \"addon\"", "event = \"birthday\""), "test.toml:64: promotions.shopper.event: must be one of subscribe"),
    (("rollover_cap = 300", "rollover = 300"), "test.toml:13: plans.basic.allowances[0].rollover: unknown key"),
    (("[plans.weekly]", "[plans.weekly"), "test.toml:15: TOML syntax error"),
])
def test_catalog_errors_name_the_line_and_key(card, edit, expected):
    old, new = edit
    assert CATALOG.count(old) == 1
    with pytest.raises(c.CatalogError) as caught:
        c.parse_catalog(CATALOG.replace(old, new), source="test.toml", card=card)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_demo_catalog_is_valid(card):
    catalog, _ = c.load_catalog_file(DEMO / "catalog.toml", card)
    assert {"data-5gb", "roaming-pass"} <= set(catalog.addons)
    assert catalog.plans["demo"].recurring_fee == "9.99"


def test_currency_must_match_the_rate_card(card):
    with pytest.raises(c.CatalogError, match="the rate card is in EUR, the catalog in USD"):
        c.parse_catalog('currency = "USD"\n' + CATALOG, source="t", card=card)


def test_monthly_periods_keep_the_anchor_day():
    anchor = NOW  # 31 January
    starts = []
    at = anchor
    for _ in range(4):
        start, end = c.period_bounds("month", anchor, at)
        starts.append(datetime.fromtimestamp(start / 1000, UTC).date().isoformat())
        at = end
    assert starts == ["2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30"]
    assert c.period_bounds("3d", anchor, anchor + 7 * DAY) == (anchor + 6 * DAY, anchor + 9 * DAY)
    assert c.period_bounds("week", anchor, anchor + 6 * DAY) == (anchor, anchor + 7 * DAY)


# ---- the catalog in Redis -------------------------------------------------------------------------------------


async def test_catalog_key_round_trip(store, catalog):
    assert await c.read_catalog(store.redis) is None
    stored = await c.store_catalog(store.redis, catalog, CATALOG, NOW)
    again = await c.read_catalog(store.redis)
    assert again == stored and again.version == "test-1" and again.catalog == catalog
    assert again.catalog.promotions["welcome"].start == datetime(2026, 1, 1, tzinfo=UTC)


# ---- subscribing, add-ons, promotions ------------------------------------------------------------------------


async def test_subscribe_charges_the_fee_and_grants_the_period(store, catalog):
    result = await subscribe(store, catalog, ALICE, "basic", 30 * EUR)
    assert result.applied and result.buckets == ["data-month"] and result.bonuses == ["welcome"]
    state = buckets(await store.balances(ALICE))
    assert state["money"].balance == 20 * EUR
    month = state["data-month"]
    end = c.period_bounds("month", NOW, NOW)[1]
    assert (month.balance, month.valid_from, month.valid_until, month.services) == (1000, NOW, end, [100])
    assert month.rollover.cap == 300
    assert (state["welcome"].balance, state["welcome"].valid_until) == (777, NOW + 7 * DAY)
    record = await store.plan_record(ALICE)
    assert (record["product"], record["plan"], int(record["period_end"])) == ("basic", "demo", end)
    assert await store.due_renewals(end) == [(ALICE, end)]
    assert await store.due_renewals(end - 1) == []
    entries = await store.ledger((await store.locate_msisdn(ALICE)).partition)
    assert [(e.type, e.changes) for e in entries] == [
        ("provision", {"money": 30 * EUR}),
        ("renewal", {"money": -10 * EUR, "data-month": 1000}),
        ("promotion", {"welcome": 777})]
    await assert_audit_exact(store)


async def test_addon_buy_debits_and_creates_buckets_once(store, catalog):
    await subscribe(store, catalog, ALICE, "basic", 20 * EUR)
    result = await c.buy_addon(store, catalog, ALICE, "data-5gb", "order-1", NOW + DAY)
    assert result.applied and result.buckets == ["data-5gb"] and result.bonuses == ["shopper"]
    assert result.balance == 5 * EUR
    state = buckets(await store.balances(ALICE))
    assert (state["data-5gb"].balance, state["data-5gb"].valid_until) == (5000, NOW + 31 * DAY)
    assert (state["shopper-credit"].balance, state["shopper-credit"].unit) == (500_000, "money")

    again = await c.buy_addon(store, catalog, ALICE, "data-5gb", "order-1", NOW + DAY)
    assert again.duplicate and not again.applied and again.buckets == ["data-5gb"]
    assert buckets(await store.balances(ALICE))["money"].balance == 5 * EUR

    # bought again (another reference): its own bucket with its own validity, and the repeatable bonus again
    second = await c.buy_addon(store, catalog, ALICE, "data-5gb", "order-2", NOW + 2 * DAY)
    assert second.buckets == ["data-5gb.2"] and second.balance == 0
    state = buckets(await store.balances(ALICE))
    assert state["data-5gb.2"].valid_until == NOW + 32 * DAY and state["shopper-credit.2"].balance == 500_000
    entries = await store.ledger((await store.locate_msisdn(ALICE)).partition)
    purchases = [e for e in entries if e.type == "purchase"]
    assert [(e.reference, e.changes, e.amount) for e in purchases] == [
        ("data-5gb;order-1", {"money": -5 * EUR, "data-5gb": 5000}, -5 * EUR),
        ("data-5gb;order-2", {"money": -5 * EUR, "data-5gb.2": 5000}, -5 * EUR)]
    assert purchases[0].units == {"data-5gb": "bytes"}
    await assert_audit_exact(store)


async def test_refused_purchases_change_nothing(store, catalog, valkey_url):
    await subscribe(store, catalog, ALICE, "basic", 14 * EUR)  # 4.00 left: less than 5.00
    await store.provision(Subscriber(msisdn=BOB, plan="demo"), 10 * EUR, now_ms=NOW)  # no catalog plan
    await c.buy_addon(store, catalog, ALICE, "once-only", "o-1", NOW)
    before = dump(valkey_url)
    with pytest.raises(CatalogRefused, match="does not cover the price of data-5gb") as caught:
        await c.buy_addon(store, catalog, ALICE, "data-5gb", "o-2", NOW)
    assert caught.value.code == "funds"
    with pytest.raises(CatalogRefused, match="can be bought once"):
        await c.buy_addon(store, catalog, ALICE, "once-only", "o-3", NOW)
    with pytest.raises(CatalogRefused, match="not offered on a subscriber without a catalog plan"):
        await c.buy_addon(store, catalog, BOB, "data-5gb", "o-4", NOW)
    with pytest.raises(c.PlanError, match="no add-on 'gold'"):
        await c.buy_addon(store, catalog, ALICE, "gold", "o-5", NOW)
    assert dump(valkey_url) == before
    # a postpaid subscriber's credit limit counts: 10.00 − 10.00 fee − 1.00 is within a 1.00 limit, 5.00 more not
    await store.set_account(BOB, "postpaid", 1 * EUR)
    await store.plan_period(BOB, "change", product="basic", rating_plan="demo", start=NOW, end=NOW + DAY,
                            fee=10 * EUR, buckets=[], now_ms=NOW)
    assert (await c.buy_addon(store, catalog, BOB, "once-only", "o-6", NOW)).balance == -1 * EUR
    with pytest.raises(CatalogRefused, match="does not cover"):
        await c.buy_addon(store, catalog, BOB, "data-5gb", "o-7", NOW)
    await assert_audit_exact(store)


async def test_bonus_once_per_subscriber(store, catalog):
    await subscribe(store, catalog, ALICE, "basic", 30 * EUR)
    # a second subscribe event (plan change back to basic) does not grant the once-only welcome again
    result = await store.plan_period(ALICE, "change", product="basic", rating_plan="demo", start=NOW + DAY,
                                     end=NOW + 2 * DAY, fee=0, buckets=[],
                                     bonuses=c.bonuses_for(catalog, "subscribe", plan="basic", now_ms=NOW + DAY),
                                     now_ms=NOW + DAY)
    assert result.applied and result.bonuses == []
    # outside the promotion's window nothing is offered
    assert c.bonuses_for(catalog, "subscribe", plan="basic", now_ms=NOW + 60 * DAY) == []
    assert c.bonuses_for(catalog, "subscribe", plan="weekly", now_ms=NOW) == []


async def test_topup_bonus(store, card):
    catalog, _ = c.load_catalog_file(DEMO / "catalog.toml", card)
    now = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp() * 1000)
    await subscribe(store, catalog, ALICE, "demo", 10 * EUR, now)
    await store.topup(ALICE, 10 * EUR, "t-1", now)
    assert await c.topup_bonuses(store, catalog, ALICE, 10 * EUR, "t-1", now) is None  # below 20.00
    await store.topup(ALICE, 20 * EUR, "t-2", now)
    result = await c.topup_bonuses(store, catalog, ALICE, 20 * EUR, "t-2", now)
    assert result.bonuses == ["topup-20"]
    again = await c.topup_bonuses(store, catalog, ALICE, 20 * EUR, "t-2", now)
    assert again.duplicate
    assert buckets(await store.balances(ALICE))["bonus-credit"].balance == 1 * EUR
    await assert_audit_exact(store)


# ---- renewals -------------------------------------------------------------------------------------------------


async def test_renewal_charges_grants_and_rolls_over(store, catalog):
    await c.store_catalog(store.redis, catalog, CATALOG, NOW)  # the sweep reads the loaded catalog
    await subscribe(store, catalog, ALICE, "basic", 30 * EUR)
    end = c.period_bounds("month", NOW, NOW)[1]  # 28 February
    assert await c.renew(store, catalog, ALICE, end - 1) == c.CatalogResult(applied=False, status="not-due")
    sweep = c.RenewalSweep(store, FixedClock(end + 1000))
    assert await sweep.sweep() == {"renewed": 1, "unpaid": 0, "skipped": 0}
    state = buckets(await store.balances(ALICE))
    assert state["money"].balance == 10 * EUR
    next_end = c.period_bounds("month", NOW, end)[1]  # 31 March
    # last period's 1000 unused bytes: 300 carried over (valid one more period), the rest expired; the settled
    # bucket is gone, so the new period's takes its id
    assert (state["data-month"].balance, state["data-month"].valid_from, state["data-month"].valid_until) == (
        1000, end, next_end)
    assert (state["data-month.rollover"].balance, state["data-month.rollover"].valid_until) == (300, next_end)
    assert (await store.plan_record(ALICE))["period_end"] == str(next_end)
    # the same period again (another process, a repeated sweep): nothing happens
    assert (await c.renew(store, catalog, ALICE, end + 2000)).status == "not-due"
    assert await sweep.sweep() == {"renewed": 0, "unpaid": 0, "skipped": 0}
    assert buckets(await store.balances(ALICE))["money"].balance == 10 * EUR
    await assert_audit_exact(store)


async def test_unpaid_renewal_suspends_until_a_topup_covers_it(store, catalog):
    await c.store_catalog(store.redis, catalog, CATALOG, NOW)  # the sweep reads the loaded catalog
    await subscribe(store, catalog, ALICE, "basic", 15 * EUR)  # 5.00 left: the next fee is 10.00
    end = c.period_bounds("month", NOW, NOW)[1]
    sweep = c.RenewalSweep(store, FixedClock(end + 1000))
    assert await sweep.sweep() == {"renewed": 0, "unpaid": 1, "skipped": 0}
    record = await store.plan_record(ALICE)
    assert (record["status"], record["suspended_for"], record["period_end"]) == ("suspended", "renewal", str(end))
    assert buckets(await store.balances(ALICE))["money"].balance == 5 * EUR
    assert await sweep.sweep() == {"renewed": 0, "unpaid": 1, "skipped": 0}  # still short: still suspended

    await store.topup(ALICE, 5 * EUR, "t-1", end + 5 * DAY)
    later = c.RenewalSweep(store, FixedClock(end + 5 * DAY + 1000))
    assert await later.sweep() == {"renewed": 1, "unpaid": 0, "skipped": 0}
    record = await store.plan_record(ALICE)
    assert record["status"] == "active" and "suspended_for" not in record
    restart = end + 5 * DAY + 1000  # the new period starts at the renewal, not at the old period end
    assert (int(record["period_start"]), int(record["anchor"])) == (restart, restart)
    assert int(record["period_end"]) == c.period_bounds("month", restart, restart)[1]
    assert buckets(await store.balances(ALICE))["money"].balance == 0
    await assert_audit_exact(store)


async def test_operator_suspension_is_not_lifted_by_a_renewal(store, catalog):
    await subscribe(store, catalog, ALICE, "weekly", 10 * EUR)
    await store.set_status(ALICE, "suspended")
    await c.renew(store, catalog, ALICE, NOW + 7 * DAY)
    assert (await store.plan_record(ALICE))["status"] == "suspended"
    assert buckets(await store.balances(ALICE))["money"].balance == 5 * EUR


async def test_change_plan_updates_record_index_and_allowances(store, catalog):
    await subscribe(store, catalog, ALICE, "basic", 30 * EUR)
    await c.buy_addon(store, catalog, ALICE, "data-5gb", "o-1", NOW)
    at = NOW + 3 * DAY
    result = await c.change_plan(store, catalog, ALICE, "weekly", at)
    assert result.applied and result.old_plan == "demo" and result.buckets == ["sms-week"]
    record = await store.plan_record(ALICE)
    assert (record["product"], int(record["period_start"]), int(record["period_end"])) == ("weekly", at, at + 7 * DAY)
    state = buckets(await store.balances(ALICE))
    assert state["money"].balance == 30 * EUR - 10 * EUR - 5 * EUR - 2_500_000  # full fee, no proration
    assert "data-month" not in state  # the old plan's allowance ended (no rollover on a change)
    assert state["data-5gb"].balance == 5000  # add-ons stay
    assert state["sms-week"].valid_until == at + 7 * DAY
    index = await store.redis.get(k.idx_msisdn_key(ALICE))
    assert k.parse_location(index).plan == "demo"
    assert await store.due_renewals(at + 7 * DAY) == [(ALICE, at + 7 * DAY)]
    # a prepaid subscriber who cannot pay the new fee stays where it was
    await store.provision(Subscriber(msisdn=BOB, plan="demo"), 0, now_ms=NOW)
    with pytest.raises(CatalogRefused, match="does not cover the fee of plan basic"):
        await c.change_plan(store, catalog, BOB, "basic", NOW)
    assert (await store.plan_record(BOB)).get("product") is None
    await assert_audit_exact(store)


# ---- through the full server -------------------------------------------------------------------------------


def two_plan_ratecard(tmp_path: Path) -> Path:
    """The demo card plus plan "premium": data at twice the price."""
    text = (DEMO / "ratecard.toml").read_text()
    plan = text[text.index("[plans.demo]"):]
    premium = plan.replace("plans.demo", "plans.premium").replace('price = "0.01"', 'price = "0.02"', 1)
    path = tmp_path / "ratecard.toml"
    path.write_text(text + "\n" + premium)
    parse_ratecard(path.read_text())
    return path


async def test_change_plan_rates_the_next_ccr_with_the_new_plan(valkey_url, tmp_path):
    ratecard = two_plan_ratecard(tmp_path)
    card = load_ratecard(ratecard)
    catalog = c.parse_catalog(CATALOG + """
[plans.premium]
recurring_fee = "1.00"
""", card=card)
    app = await start_app(valkey_url, tmp_path, FixedClock(NOW), OCS_CHARGING__RATECARD=str(ratecard))
    store = await BalanceStore.connect(valkey_url)  # the operator's: the server's process keeps its cache
    gateway = None
    try:
        await c.store_catalog(store.redis, catalog, CATALOG, NOW)
        await store.provision(Subscriber(msisdn=ALICE, plan="demo"), 20 * EUR, now_ms=NOW)
        await c.start_plan(store, catalog, ALICE, "basic", NOW)  # 1000 bytes + 777 welcome bytes first
        gateway = await Gateway.connect(app.port)
        used = 10 * MB + 1777  # 10 MB from money at 0.01 per MB
        answer = await gateway.ccr("gw;before", 1, 0, ALICE)
        assert answer.get("Result-Code") == 2001 and granted_octets(answer)
        await gateway.ccr("gw;before", 3, 1, used=used, request_units=False)
        assert buckets(await store.balances(ALICE))["money"].balance == 10 * EUR - 100_000

        # the server's process has the old plan cached: the charge script answers stale plan and it refreshes
        await c.change_plan(store, catalog, ALICE, "premium", NOW + 1000)
        answer = await gateway.ccr("gw;after", 1, 0, ALICE)
        assert answer.get("Result-Code") == 2001
        await gateway.ccr("gw;after", 3, 1, used=10 * MB, request_units=False)
        assert buckets(await store.balances(ALICE))["money"].balance == 10 * EUR - 100_000 - 1 * EUR - 200_000

        # a session open across a change gets a RAR (as after a top-up) and reports at once
        answer = await gateway.ccr("gw;open", 1, 0, ALICE)
        assert mscc_of(answer).get("Result-Code") == 2001

        async def gateway_side():
            rar = await gateway.next_request()
            assert rar.command_code == 258
            cca = await gateway.ccr("gw;open", 2, 1, used=MB)
            gateway.answer(rar, 2001)
            return cca

        await store.topup(ALICE, 10 * EUR, "t-1", NOW + 2000)
        await c.change_plan(store, catalog, ALICE, "basic", NOW + 2000)
        results, cca = await asyncio.gather(reauth_subscriber(store, ALICE, 5), gateway_side())
        assert [(r.session_id, r.result_code) for r in results] == [("gw;open", 2001)]
        assert cca.get("Result-Code") == 2001
        await gateway.ccr("gw;open", 3, 2, used=MB, request_units=False)

        async def drained() -> bool:
            return not any([await store.redis.xlen(k.cdr_key(p)) for p in range(store.partitions)])

        assert await wait_for(drained)
        await assert_audit_exact(store, app.config.cdr_directory)
    finally:
        if gateway is not None:
            gateway.close()
        await store.close()
        await app.stop()


# ---- discount promotions as rate-card versions (ratecards.promotions) ---------------------------------------


def test_discounted_versions_price_every_tariff_and_restore_after():
    from ratecards import compile_card
    from ratecards.promotions import discount_versions, to_toml

    card = load_ratecard(Path(__file__).resolve().parents[1] / "examples" / "ratecard-full.toml")
    data = next(r for r in card.plans["full"].rates if r.tariffs and r.price == "0.01")
    start, end = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 2, 1, tzinfo=UTC)
    discounted, restored = discount_versions(card, card, "winter", ["full"], [data.rating_group], "25", start, end)
    rate = next(r for r in discounted.plans["full"].rates if r.rating_group == data.rating_group)
    assert rate.price == "0.0075" and [t.price for t in rate.tariffs] == [
        None if t.price is None else format(Decimal(t.price) * Decimal("0.75"), "f").rstrip("0").rstrip(".")
        for t in data.tariffs]
    others = [r for r in discounted.plans["full"].rates if r.rating_group != data.rating_group]
    assert others == [r for r in card.plans["full"].rates if r.rating_group != data.rating_group]
    assert (discounted.version, restored.version) == (f"{card.version}.winter", f"{card.version}.winter-end")
    assert restored.plans == card.plans and restored.effective_from == end
    # the versions survive being written as files, and the rater picks them by time
    for version in (discounted, restored):
        assert parse_ratecard(to_toml(version)) == version
    rater = compile_card([msgspec.structs.replace(card, effective_from=None), discounted, restored])
    assert rater.version_at(start.timestamp() - 1).version == card.version
    assert rater.version_at(start.timestamp() + 1).version == discounted.version
    assert rater.version_at(end.timestamp()).version == restored.version


async def test_an_addon_unlocks_a_bundle_only_rating_group(valkey_url, tmp_path):
    """A rate with requires_bundle is served only from an allowance: before the add-on the MSCC is refused (5030
    with the shop redirect), after `addon buy` it is granted from the add-on's bucket."""
    text = (DEMO / "ratecard.toml").read_text() + """
  [[plans.demo.rates]]
  rating_group = 500
  service = "video"
  unit = "bytes"
  price = "0.01"
  per = 1048576
  increment = 1024
  default_quota = 1048576
  max_quota = 10485760
  requires_bundle = true
  final_unit_action = "REDIRECT"
  redirect_address = "https://shop.example.net/bundles"
  final_validity_time = 60
"""
    ratecard = tmp_path / "ratecard.toml"
    ratecard.write_text(text)
    catalog = c.parse_catalog(CATALOG + """
[addons.video-pass]
price = "3.00"

  [[addons.video-pass.buckets]]
  bucket = "video"
  unit = "bytes"
  amount = 5242880
  rating_groups = [500]
  validity = "1d"
""", card=load_ratecard(ratecard))
    app = await start_app(valkey_url, tmp_path, FixedClock(NOW), OCS_CHARGING__RATECARD=str(ratecard))
    gateway = None
    try:
        store = app.store
        await subscribe(store, catalog, ALICE, "basic", 20 * EUR)
        gateway = await Gateway.connect(app.port)
        answer = await gateway.ccr("gw;video-1", 1, 0, ALICE, rating_group=500)
        assert mscc_of(answer).get("Result-Code") == 5030 and granted_octets(answer) is None
        await gateway.ccr("gw;video-1", 3, 1, request_units=False, rating_group=500)

        await c.buy_addon(store, catalog, ALICE, "video-pass", "order-v", NOW)
        answer = await gateway.ccr("gw;video-2", 1, 0, ALICE, rating_group=500)
        assert mscc_of(answer).get("Result-Code") == 2001 and granted_octets(answer) == MB
        await gateway.ccr("gw;video-2", 3, 1, used=MB, request_units=False, rating_group=500)
        state = buckets(await store.balances(ALICE))
        assert state["video"].balance == 4 * MB and state["money"].balance == 7 * EUR
        await assert_audit_exact(store)
    finally:
        if gateway is not None:
            gateway.close()
        await app.stop()


async def test_the_server_renews_due_periods_and_reauthorises_open_sessions(valkey_url, tmp_path, catalog):
    """`ocs serve` runs the renewal sweep (charging.renewal_interval_seconds): a period that ends while the
    subscriber has a session open is renewed by the server itself, once, and the session's gateway gets a
    RAR so it asks for quota against the new allowances."""
    end = c.period_bounds("month", NOW, NOW)[1]
    clock = FixedClock(end - 60_000)
    app = await start_app(valkey_url, tmp_path, clock=clock, OCS_CHARGING__RENEWAL_INTERVAL_SECONDS="0.05")
    gateway = None
    try:
        store = app.store
        await c.store_catalog(store.redis, catalog, CATALOG, NOW)
        await subscribe(store, catalog, ALICE, "basic", 30 * EUR)
        gateway = await Gateway.connect(app.port)
        answer = await gateway.ccr("gw;renew-1", 1, 0, ALICE)
        assert answer.get("Result-Code") == 2001
        await asyncio.sleep(0.2)  # sweeps before the period end renew nothing
        assert buckets(await store.balances(ALICE))["money"].balance == 20 * EUR
        clock.set(end + 1000)
        rar = await gateway.next_request()
        assert rar.command_code == RAR and rar.session_id == "gw;renew-1"
        gateway.answer(rar, 2001)
        state = buckets(await store.balances(ALICE))
        assert state["money"].balance == 10 * EUR  # one fee, however many sweeps ran
        # the open session still holds the old period's bucket, so the new period's allowance gets its own id
        assert [(b.balance, b.valid_from) for b in state.values() if b.valid_from == end] == [(1000, end)]
        await asyncio.sleep(0.2)
        assert buckets(await store.balances(ALICE))["money"].balance == 10 * EUR
        await gateway.ccr("gw;renew-1", 3, 1, used=100, request_units=False)
        await assert_audit_exact(store)
    finally:
        if gateway is not None:
            gateway.close()
        await app.stop()
