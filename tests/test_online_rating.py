"""Online charging with the rating engine, through the real server (TCP, real Valkey, a FixedClock).

Each request is rated with the schedule in force at its time and with its rating keys: a night band with
Tariff-Time-Change at the band boundary and the usage split by Tariff-Change-Usage, a roaming zone from
3GPP-SGSN-MCC-MNC kept for the CCR-U that do not repeat it, a voice call by destination prefix (its CDR
records carry the keys, time and bucket units billing re-rates with), a session across midnight, a new
rate-card version picked up without restart, and a bundle-only rating group answered 5030 with
Final-Unit-Indication REDIRECT (the real capture beeline_cca_fui_redirect has that shape), a fair-usage limit
answered with its RESTRICT_ACCESS filters, and events (price enquiry, direct debit) rated alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from balances import keys as k
from balances.model import ChargeRequest, Location, Subscriber, full_schedules
from ocs.charging import rating_keys
from ocs.clock import FixedClock
from ocs.server import ServerApp
from protocol.codec import decode_message, encode_message
from tests.gateway import Gateway, cdr_records, start_app, wait_for

CARD = """
version = "online-1"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"
timezone = "UTC"
country_code = "49"

[[bands]]
name = "night"
days = ["all"]
from = "22:00"
to = "07:00"

[zones]
home = ["26201"]
eu = ["208", "214"]
world = [""]

[destinations]
de-mobile = ["4915", "4916", "4917"]
eu = ["33", "34"]
world = [""]

[plans.online]
default_rating_group = 100

  [[plans.online.rates]]
  rating_group = 100
  service = "data"
  unit = "bytes"
  price = "DAY_PRICE"
  per = 1048576
  increment = 1048576
  default_quota = 10485760
  max_quota = 104857600
  validity_time = 3600

    [[plans.online.rates.tariffs]]
    name = "eu-roaming"
    zone = "eu"
    price = "2.00"

    [[plans.online.rates.tariffs]]
    name = "world-roaming"
    zone = "world"
    price = "5.00"

    [[plans.online.rates.tariffs]]
    name = "night"
    band = "night"
    price = "0.50"

  [[plans.online.rates]]
  rating_group = 200
  service = "voice"
  unit = "seconds"
  price = "0.60"
  per = 60
  increment = 60
  default_quota = 300
  max_quota = 3600

    [[plans.online.rates.tariffs]]
    name = "to-eu"
    destination = "eu"
    price = "1.20"

    [[plans.online.rates.tariffs]]
    name = "to-mobile"
    destination = "de-mobile"
    price = "0.30"
"""

BUNDLE_CARD = """
version = "bundle-1"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"

[plans.online]
default_rating_group = 500

  [[plans.online.rates]]
  rating_group = 500
  service = "video"
  unit = "bytes"
  price = "0.01"
  per = 1048576
  increment = 1048576
  default_quota = 10485760
  max_quota = 104857600
  requires_bundle = true
  final_unit_action = "REDIRECT"
  redirect_address = "https://shop.example.net/bundles"
  final_validity_time = 60

  [[plans.online.rates]]
  rating_group = 600
  service = "data"
  unit = "bytes"
  price = "0.01"
  per = 1048576
  increment = 1048576
  default_quota = 10485760
  max_quota = 104857600
  validity_time = 600
  final_validity_time = 300
  fair_usage = { units = 5242880, period = "day", filter_id = "throttle-1mbps" }
"""

MSISDN = "491705551000"
MB = 1_048_576
EUR = 1_000_000
START_MONEY = 100 * EUR
HOME, EU_NETWORK = "26201", "20801"
DATA, VOICE, VIDEO, FAIR = 100, 200, 500, 600


def epoch(text: str) -> int:
    """An ISO instant in UTC (the card's time zone) as epoch seconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


async def start(valkey_url: str, tmp_path: Path, clock: FixedClock, card: str = CARD, **env: str) -> ServerApp:
    path = tmp_path / "card.toml"
    path.write_text(card.replace("DAY_PRICE", "1.00"))
    app = await start_app(valkey_url, tmp_path, clock=clock, OCS_RATECARD=str(path), **env)
    await app.store.provision(Subscriber(msisdn=MSISDN, plan="online"), money=START_MONEY, allowances={},
                              replace=True)
    return app


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(epoch("2027-03-10T10:00:00") * 1000)  # a Wednesday


@pytest.fixture
async def server(valkey_url, tmp_path, clock):
    app = await start(valkey_url, tmp_path, clock)
    yield app
    await app.stop()


@pytest.fixture
async def gateway(server):
    gateway = await Gateway.connect(server.port)
    yield gateway
    gateway.close()


def ccr(session_id: str, request_type: int, number: int, *msccs: list, context: str = "32251@3gpp.org",
        service_information: list | None = None) -> list:
    avps: list = [
        ("Session-Id", session_id), ("Origin-Host", "pgw1.gw.test"), ("Origin-Realm", "gw.test"),
        ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", context),
        ("CC-Request-Type", request_type), ("CC-Request-Number", number),
        ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", MSISDN)]),
        ("Multiple-Services-Indicator", 1),
    ]
    avps.extend(("Multiple-Services-Credit-Control", mscc) for mscc in msccs)
    if request_type == 3:
        avps.append(("Termination-Cause", 1))
    if service_information is not None:
        avps.append(("Service-Information", service_information))
    return avps


def mscc(rating_group: int, *avps) -> list:
    return [*avps, ("Rating-Group", rating_group)]


RSU = ("Requested-Service-Unit", [])


def usu(field: str, amount: int, tariff_change_usage: int | None = None) -> tuple:
    split = [("Tariff-Change-Usage", tariff_change_usage)] if tariff_change_usage is not None else []
    return ("Used-Service-Unit", [*split, (field, amount)])


def serving_network(plmn: str) -> list:
    return [("PS-Information", [("3GPP-SGSN-MCC-MNC", plmn)])]


def called(address: str) -> list:
    return [("IMS-Information", [("Called-Party-Address", address)])]


async def money(app: ServerApp) -> int:
    return next(b.balance for b in await app.store.balances(MSISDN) if b.bucket == "money")


def the_mscc(answer):
    found = answer.find_all("Multiple-Services-Credit-Control")
    assert len(found) == 1, answer
    return found[0]


# ---- Tariff-Time-Change ------------------------------------------------------------------------------------

async def test_night_band_tariff_time_change_and_split_usage(server, gateway, clock):
    """At 21:30 a grant valid for an hour spans the 22:00 night band: the GSU carries Tariff-Time-Change; the
    usage reported before it is priced by day (1.00/MB), after it by night (0.50/MB)."""
    clock.set(epoch("2027-03-10T21:30:00") * 1000)
    opening = ccr("ttc;1", 1, 0, mscc(DATA, RSU), service_information=serving_network(HOME))
    answer = await gateway.request(opening, ("ttc;1", 0))
    assert answer.get("Result-Code") == 2001
    data = the_mscc(answer)
    gsu = data.find("Granted-Service-Unit")
    assert [c.name for c in gsu.children][0] == "Tariff-Time-Change"  # RFC 4006 §8.17: first in the GSU
    assert gsu.get("Tariff-Time-Change") == epoch("2027-03-10T22:00:00")
    assert gsu.get("CC-Total-Octets") == 10 * MB and data.get("Validity-Time") == 3600
    again = await gateway.resend(gateway.sent[("ttc;1", 0)])  # a duplicate: the stored outcome re-encoded
    assert the_mscc(again).find("Granted-Service-Unit").get("Tariff-Time-Change") == epoch("2027-03-10T22:00:00")

    clock.set(epoch("2027-03-10T22:10:00") * 1000)
    answer = await gateway.request(ccr("ttc;1", 2, 1, mscc(DATA, RSU, usu("CC-Total-Octets", 3 * MB, 0),
                                                           usu("CC-Total-Octets", 2 * MB, 1))))
    assert answer.get("Result-Code") == 2001
    assert the_mscc(answer).find("Granted-Service-Unit").get("Tariff-Time-Change") is None  # 07:00 is far
    clock.set(epoch("2027-03-10T22:20:00") * 1000)
    answer = await gateway.request(ccr("ttc;1", 3, 2, mscc(DATA, usu("CC-Total-Octets", 0))))
    assert answer.get("Result-Code") == 2001
    assert await money(server) == START_MONEY - (3 * EUR + 2 * EUR // 2)


async def test_no_tariff_time_change_when_the_grant_ends_before_the_band(server, gateway, clock):
    clock.set(epoch("2027-03-10T20:30:00") * 1000)  # 22:00 is beyond the hour of Validity-Time
    answer = await gateway.request(ccr("ttc;2", 1, 0, mscc(DATA, RSU)))
    gsu = the_mscc(answer).find("Granted-Service-Unit")
    assert gsu.get("Tariff-Time-Change") is None and gsu.get("CC-Total-Octets") == 10 * MB


async def test_a_session_across_midnight_stays_at_the_night_price(server, gateway, clock):
    """22:00-07:00 every day is one night: midnight is no change (no Tariff-Time-Change), and what is used
    after it is priced like before it."""
    clock.set(epoch("2027-03-10T23:50:00") * 1000)
    answer = await gateway.request(ccr("night;1", 1, 0, mscc(DATA, RSU), service_information=serving_network(HOME)))
    assert the_mscc(answer).find("Granted-Service-Unit").get("Tariff-Time-Change") is None
    clock.set(epoch("2027-03-11T00:20:00") * 1000)
    answer = await gateway.request(ccr("night;1", 2, 1, mscc(DATA, RSU, usu("CC-Total-Octets", 4 * MB))))
    assert answer.get("Result-Code") == 2001
    answer = await gateway.request(ccr("night;1", 3, 2, mscc(DATA, usu("CC-Total-Octets", 2 * MB))))
    assert answer.get("Result-Code") == 2001
    assert await money(server) == START_MONEY - 6 * EUR // 2


# ---- rating keys -------------------------------------------------------------------------------------------

async def test_roaming_zone_is_priced_and_kept_for_updates_without_it(server, gateway):
    """CCR-I from an EU network (3GPP-SGSN-MCC-MNC 20801): 2.00/MB. The CCR-U and CCR-T carry no
    PS-Information and are rated with the session's zone from the session index (no extra round trip)."""
    answer = await gateway.request(ccr("roam;1", 1, 0, mscc(DATA, RSU),
                                       service_information=serving_network(EU_NETWORK)))
    assert answer.get("Result-Code") == 2001
    stored = k.parse_location(await server.store.redis.get(k.sidx_key("roam;1")))
    assert (stored.plan, stored.plmn) == ("online", EU_NETWORK)
    answer = await gateway.request(ccr("roam;1", 2, 1, mscc(DATA, RSU, usu("CC-Total-Octets", 2 * MB))))
    assert answer.get("Result-Code") == 2001
    answer = await gateway.request(ccr("roam;1", 3, 2, mscc(DATA, usu("CC-Total-Octets", 1 * MB))))
    assert answer.get("Result-Code") == 2001
    assert await money(server) == START_MONEY - 3 * 2 * EUR


async def test_a_new_serving_network_on_update_is_kept(server, gateway):
    """A handover reported in a CCR-U (another MCC-MNC) rewrites the session's keys in the same pipeline."""
    await gateway.request(ccr("roam;2", 1, 0, mscc(DATA, RSU), service_information=serving_network(HOME)))
    answer = await gateway.request(ccr("roam;2", 2, 1, mscc(DATA, RSU, usu("CC-Total-Octets", 1 * MB)),
                                       service_information=serving_network("21401")))
    assert answer.get("Result-Code") == 2001
    stored = k.parse_location(await server.store.redis.get(k.sidx_key("roam;2")))
    assert stored.plmn == "21401"
    answer = await gateway.request(ccr("roam;2", 3, 2, mscc(DATA, usu("CC-Total-Octets", 1 * MB))))
    assert answer.get("Result-Code") == 2001
    assert await money(server) == START_MONEY - (1 * EUR + 2 * EUR)  # 1 MB at home, 1 MB in Spain


async def test_voice_is_priced_by_destination_prefix(server, gateway):
    for session, address, price in (("call;fr", "tel:+33612345678", 1_200_000), ("call;mobile", "+4915112345678",
                                                                                  300_000),
                                    ("call;fixed", "sip:+493012345678@ims.example;user=phone", 600_000)):
        before = await money(server)
        answer = await gateway.request(ccr(session, 1, 0, mscc(VOICE, RSU), context="32260@3gpp.org",
                                           service_information=called(address)))
        assert answer.get("Result-Code") == 2001
        answer = await gateway.request(ccr(session, 3, 1, mscc(VOICE, usu("CC-Time", 120)), context="32260@3gpp.org"))
        assert answer.get("Result-Code") == 2001
        assert before - await money(server) == 2 * price, session


async def test_a_call_priced_by_destination_leaves_cdrs_billing_can_re_rate(server, gateway, clock):
    """The CDR records of a call say what online charging priced them with: the called party and serving
    network of the grant (a handover reported in the CCR-U moves only what follows it), when that grant
    chose the schedule (ratedAt), and the unit of every bucket drawn from (bucketUnits)."""
    start = clock.now_ms()
    keys = serving_network(HOME) + called("tel:+33612345678")
    answer = await gateway.request(ccr("call;cdr", 1, 0, mscc(VOICE, RSU), context="32260@3gpp.org",
                                       service_information=keys))
    assert answer.get("Result-Code") == 2001
    clock.advance(120)
    answer = await gateway.request(ccr("call;cdr", 2, 1, mscc(VOICE, RSU, usu("CC-Time", 120)),
                                       context="32260@3gpp.org", service_information=serving_network(EU_NETWORK)))
    assert answer.get("Result-Code") == 2001
    clock.advance(60)
    answer = await gateway.request(ccr("call;cdr", 3, 2, mscc(VOICE, usu("CC-Time", 60)), context="32260@3gpp.org"))
    assert answer.get("Result-Code") == 2001
    await server.stop()  # drains the CDR streams to files
    records = [r for r in cdr_records(server.config.cdr_directory) if r["recordType"] == "usage"]
    assert [(r["ccRequestNumber"], r["amount"], r["tariff"], r["bucket"], r["bucketUnits"]) for r in records] == [
        (1, 2 * 1_200_000, "to-eu", {"money": 2 * 1_200_000}, {"money": "money"}),
        (2, 1_200_000, "to-eu", {"money": 1_200_000}, {"money": "money"}),
    ]
    assert [(r["calledPartyAddress"], r["ratingPlmn"], r["ratedAt"], r["recordTime"]) for r in records] == [
        ("tel:+33612345678", HOME, start, start + 120_000),
        ("tel:+33612345678", EU_NETWORK, start + 120_000, start + 180_000),
    ]


async def test_price_enquiry_and_direct_debit_use_the_same_tariffs(server, gateway, clock):
    """CCR-E: PRICE_ENQUIRY quotes 2 minutes to France at the EU price (night or day alike), DIRECT_DEBITING
    of data from an EU network takes the roaming price."""
    def event(session: str, action: int, *msccs, **options) -> list:
        avps = ccr(session, 4, 0, *msccs, **options)
        avps.insert(8, ("Requested-Action", action))
        return avps

    answer = await gateway.request(event("e;1", 3, mscc(VOICE, ("Requested-Service-Unit", [("CC-Time", 120)])),
                                         context="32260@3gpp.org", service_information=called("+33612345678")))
    value = answer.find("Cost-Information").find("Unit-Value")
    assert value.get("Value-Digits") * 10 ** (6 + value.get("Exponent")) == 2 * 1_200_000
    assert await money(server) == START_MONEY
    two_megabytes = ("Requested-Service-Unit", [("CC-Total-Octets", 2 * MB)])
    answer = await gateway.request(event("e;2", 0, mscc(DATA, two_megabytes),
                                         service_information=serving_network(EU_NETWORK)))
    assert the_mscc(answer).get("Result-Code") == 2001
    assert await money(server) == START_MONEY - 2 * 2 * EUR


# ---- hot reload --------------------------------------------------------------------------------------------

async def test_a_new_version_is_picked_up_without_restart(valkey_url, tmp_path, clock):
    from ocs.ratecard_store import install_version

    app = await start(valkey_url, tmp_path, clock, OCS_CHARGING__RATECARD_RELOAD_SECONDS="0.05")
    gateway = await Gateway.connect(app.port)
    try:
        newer = tmp_path / "online-2.toml"
        newer.write_text(CARD.replace("DAY_PRICE", "1.50").replace('version = "online-1"',
                                                                   'version = "online-2"\neffective_from = '
                                                                   '2027-03-10T12:00:00'))
        install_version(app.config, newer, now=clock.now())

        async def loaded():
            return "online-2" in app.credit_control.rating.versions

        assert await wait_for(loaded)
        await gateway.request(ccr("v;1", 1, 0, mscc(DATA, RSU)))  # 10:00: the first version
        await gateway.request(ccr("v;1", 3, 1, mscc(DATA, usu("CC-Total-Octets", 1 * MB))))
        assert await money(app) == START_MONEY - 1 * EUR
        clock.set(epoch("2027-03-10T12:30:00") * 1000)
        await gateway.request(ccr("v;2", 1, 0, mscc(DATA, RSU)))
        await gateway.request(ccr("v;2", 3, 1, mscc(DATA, usu("CC-Total-Octets", 1 * MB))))
        assert await money(app) == START_MONEY - 1 * EUR - 1_500_000
    finally:
        gateway.close()
        await app.stop()


async def test_a_broken_version_file_keeps_the_card_in_use(valkey_url, tmp_path, clock, caplog):
    app = await start(valkey_url, tmp_path, clock, OCS_CHARGING__RATECARD_RELOAD_SECONDS="0.05")
    gateway = await Gateway.connect(app.port)
    try:
        directory = tmp_path / "ratecards"
        directory.mkdir()
        (directory / "online-2.toml").write_text('version = "online-2"\ncurrency = 12\n')

        async def reported():
            return "rate card reload failed" in caplog.text

        assert await wait_for(reported)
        assert app.credit_control.rating.versions == ("online-1",)
        await gateway.request(ccr("b;1", 1, 0, mscc(DATA, RSU)))
        answer = await gateway.request(ccr("b;1", 3, 1, mscc(DATA, usu("CC-Total-Octets", 1 * MB))))
        assert answer.get("Result-Code") == 2001
        assert await money(app) == START_MONEY - 1 * EUR
    finally:
        gateway.close()
        await app.stop()


# ---- bundles -----------------------------------------------------------------------------------------------

async def test_bundle_only_rating_group_without_bundle_is_5030_with_redirect(valkey_url, tmp_path, clock):
    app = await start(valkey_url, tmp_path, clock, card=BUNDLE_CARD)
    gateway = await Gateway.connect(app.port)
    try:
        answer = await gateway.request(ccr("shop;1", 1, 0, mscc(VIDEO, RSU)))
        assert answer.get("Result-Code") == 2001
        video = the_mscc(answer)
        assert [c.name for c in video.children] == ["Rating-Group", "Validity-Time", "Result-Code",
                                                    "Final-Unit-Indication"]
        assert (video.get("Result-Code"), video.get("Validity-Time")) == (5030, 60)
        fui = video.find("Final-Unit-Indication")
        assert fui.get("Final-Unit-Action") == 1
        server = fui.find("Redirect-Server")
        assert (server.get("Redirect-Address-Type"), server.get("Redirect-Server-Address")) == (
            2, "https://shop.example.net/bundles")
        assert await money(app) == START_MONEY  # never charged from money
    finally:
        gateway.close()
        await app.stop()


# ---- pieces ------------------------------------------------------------------------------------------------

def test_rating_keys_are_read_where_gateways_put_them():
    def message(*avps) -> object:
        return decode_message(encode_message(272, 4, 0x80, 1, 1, [("Session-Id", "x"), *avps]))

    uli = bytes([130, 0x62, 0xF2, 0x10, 0, 1, 0, 0, 0, 0, 0, 1, 2])  # TAI+ECGI, MCC 262 MNC 01
    assert rating_keys(message(("Service-Information", serving_network("20801")))) == ("20801", None)
    assert rating_keys(message(("Service-Information", [("PS-Information", [("3GPP-User-Location-Info", uli)])]))
                       ) == ("26201", None)
    assert rating_keys(message(("3GPP-SGSN-MCC-MNC", "21401"))) == ("21401", None)
    assert rating_keys(message(("Service-Information", called("tel:+331")))) == (None, "tel:+331")
    sms = [("SMS-Information", [("Recipient-Info", [("Recipient-Address", [("Address-Data", "+4917")])])])]
    assert rating_keys(message(("Service-Information", sms))) == (None, "+4917")
    assert rating_keys(message()) == (None, None)


def test_session_index_values_old_and_new():
    assert k.parse_location("3|4917|gold") == Location(3, "4917", "gold")
    assert k.parse_location("3|4917|gold|fam") == Location(3, "4917", "gold", "fam")
    for location in (Location(3, "4917", "gold", "", "20801", ""), Location(3, "4917", "gold", "fam", "", "+33|1"),
                     Location(3, "4917", "gold", "fam", "26201", "sip:+4930@x;user=phone")):
        assert k.parse_location(k.location_value(location).encode()) == location


async def test_fair_usage_limit_restricts_with_its_filters(valkey_url, tmp_path, clock):
    """5 MB a day: the grant stops at the limit with FUI RESTRICT_ACCESS carrying the fair-usage Filter-Id;
    once used, the answer has no grant, the restricted-state Validity-Time and the same FUI; the next day
    grants again."""
    app = await start(valkey_url, tmp_path, clock, card=BUNDLE_CARD)
    gateway = await Gateway.connect(app.port)
    try:
        answer = await gateway.request(ccr("fair;1", 1, 0, mscc(FAIR, RSU)))
        data = the_mscc(answer)
        assert data.find("Granted-Service-Unit").get("CC-Total-Octets") == 5 * MB
        assert (data.get("Result-Code"), data.get("Validity-Time")) == (2001, 600)
        fui = data.find("Final-Unit-Indication")
        assert (fui.get("Final-Unit-Action"), fui.get("Filter-Id")) == (2, "throttle-1mbps")
        answer = await gateway.request(ccr("fair;1", 2, 1, mscc(FAIR, RSU, usu("CC-Total-Octets", 5 * MB))))
        data = the_mscc(answer)
        assert data.find("Granted-Service-Unit") is None
        assert (data.get("Result-Code"), data.get("Validity-Time")) == (2001, 300)
        assert data.find("Final-Unit-Indication").get("Filter-Id") == "throttle-1mbps"
        clock.set(epoch("2027-03-11T00:05:00") * 1000)
        answer = await gateway.request(ccr("fair;1", 2, 2, mscc(FAIR, RSU)))
        assert the_mscc(answer).find("Granted-Service-Unit").get("CC-Total-Octets") == 5 * MB
    finally:
        gateway.close()
        await app.stop()


async def test_plain_client_gets_tariff_time_change_at_command_level(server, gateway, clock):
    """RFC 4006 without MSCC: the command-level GSU carries Tariff-Time-Change and command-level USUs are
    split by Tariff-Change-Usage like MSCC ones (the plan's default rating group, data)."""
    clock.set(epoch("2027-03-10T21:30:00") * 1000)
    opening = [avp for avp in ccr("plain;1", 1, 0) if avp[0] != "Multiple-Services-Indicator"]
    answer = await gateway.request([*opening, RSU])
    assert answer.get("Result-Code") == 2001
    gsu = answer.find("Granted-Service-Unit")
    assert gsu.get("Tariff-Time-Change") == epoch("2027-03-10T22:00:00") and gsu.get("CC-Total-Octets") == 10 * MB
    clock.set(epoch("2027-03-10T22:30:00") * 1000)
    closing = [avp for avp in ccr("plain;1", 3, 1) if avp[0] != "Multiple-Services-Indicator"]
    answer = await gateway.request([*closing, usu("CC-Total-Octets", 2 * MB, 0), usu("CC-Total-Octets", 4 * MB, 1)])
    assert answer.get("Result-Code") == 2001
    assert await money(server) == START_MONEY - (2 * EUR + 4 * EUR // 2)


SHORT_BANDS = """
version = "short-1"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"
timezone = "UTC"

[[bands]]
name = "happy"
days = ["all"]
from = "22:00"
to = "22:20"

[plans.short]
  [[plans.short.rates]]
  rating_group = 1
  service = "data"
  unit = "bytes"
  price = "1.00"
  per = 1048576
  increment = 1048576
  default_quota = 10485760
  max_quota = 104857600
  cap = "3.00"
  cap_period = "day"

    [[plans.short.rates.tariffs]]
    band = "happy"
    price = "0.10"
"""


def test_one_change_per_grant_and_the_period_keys():
    """What the charge script gets: the schedule in force, the change within the horizon (no Validity-Time:
    the configured day) with the next schedule and both period keys; Validity-Time is cut to the change
    after it (22:20), since one grant carries one Tariff-Time-Change. Memoised until the change."""
    from ocs.charging import CreditControl
    from ratecards import compile_card, parse_ratecard

    control = CreditControl(origin_host="ocs", origin_realm="test", store=None,
                            rater=compile_card(parse_ratecard(SHORT_BANDS)))
    message = decode_message(encode_message(272, 4, 0xC0, 1, 1, ccr("s;1", 2, 1, mscc(1, RSU))))
    location = Location(0, MSISDN, "short")
    now = epoch("2027-03-10T21:50:00")
    charges, failures, quotas = control._msccs(message, location, 2, now * 1000)
    assert failures == [] and len(charges) == 1
    charge = charges[0]
    assert charge.tariff_change_ms == epoch("2027-03-10T22:00:00") * 1000
    assert list(charge.schedule) == list(charge.next_schedule) == ["id"]  # named by id (the script keeps them)
    full = full_schedules(ChargeRequest("s;1", 2, 1, MSISDN, "short", 0, now * 1000, msccs=charges)).msccs[0]
    assert full.schedule["price_num"] != full.next_schedule["price_num"]
    assert charge.schedule["id"] != charge.next_schedule["id"]
    assert (full.schedule["id"], full.next_schedule["id"]) == (charge.schedule["id"], charge.next_schedule["id"])
    assert charge.periods == charge.next_periods == {"day": "2027-03-10"}
    quota, validity = quotas[(1, None)]
    assert decode_message(encode_message(272, 4, 0, 1, 1, [validity])).get("Validity-Time") == 30 * 60
    again, _, _ = control._msccs(message, location, 2, (now + 60) * 1000)
    assert again[0].schedule is charge.schedule and again[0].next_schedule is charge.next_schedule
    late, _, _ = control._msccs(message, location, 2, epoch("2027-03-10T23:00:00") * 1000)
    assert late[0].tariff_change_ms == epoch("2027-03-11T00:00:00") * 1000  # the cap's day ends
    assert late[0].next_periods == {"day": "2027-03-11"}


# ---- extended pricing through the server ---------------------------------------------------------------------

EXTENDED_CARD = """
version = "extended-1"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"
timezone = "UTC"

[plans.online]
default_rating_group = 200

  [[plans.online.rates]]
  rating_group = 200
  service = "voice"
  unit = "seconds"
  price = "0.60"
  per = 60
  increment = 6
  first_increment = 30
  setup_fee = "0.10"
  minimum_charge = "0.40"
  scope = "session"
  default_quota = 300
  max_quota = 3600

  [[plans.online.rates]]
  rating_group = 300
  service = "sms"
  unit = "events"
  price = "0.20"
  per = 1
  increment = 1
  default_quota = 1
  max_quota = 10
  cap = "0.50"
  cap_period = "day"
"""


async def test_extended_pricing_is_charged_online_as_the_rate_card_prices_it(valkey_url, tmp_path, clock):
    """A 30/6 voice call with a setup fee and a minimum charge counted over the session, reported in three
    CCRs, costs what ratecards.pricing says for the whole call (the reports telescope); SMS with a daily cap
    stops costing at the cap and costs again the next day. Money, CDR amounts and `ocs audit` agree."""
    from decimal import Decimal

    from ocs.audit import audit
    from ratecards import compile_ratecard, parse_ratecard
    from ratecards.pricing import amount_for_units, charge_for_usage

    app = await start(valkey_url, tmp_path, clock, card=EXTENDED_CARD)
    gw = await Gateway.connect(app.port)
    try:
        schedules = compile_ratecard(parse_ratecard(EXTENDED_CARD))["online"]
        voice, sms = schedules[VOICE], schedules[300]
        # independent arithmetic from the card: 30 s first, then 6 s steps at 0.60/min = 0.06 per step;
        # minimum 0.40 for the call, plus the 0.10 setup fee; rounded up to the cent
        reports = [20, 25, 52]  # 97 s: 30 + 12 × 6 = 102 s billed → 0.30 + 0.72 = 1.02 + 0.10 fee
        expected_call = Decimal("1.12")
        assert amount_for_units(voice, sum(reports)) == int(expected_call * EUR)

        sid = "pgw1.gw.test;ext-voice"
        answer = await gw.request(ccr(sid, 1, 0, mscc(VOICE, RSU), context="32260@3gpp.org"))
        assert answer.get("Result-Code") == 2001
        for number, used in enumerate(reports[:-1], start=1):
            answer = await gw.request(ccr(sid, 2, number, mscc(VOICE, RSU, usu("CC-Time", used)),
                                          context="32260@3gpp.org"))
            assert answer.get("Result-Code") == 2001
        answer = await gw.request(ccr(sid, 3, len(reports), mscc(VOICE, usu("CC-Time", reports[-1])),
                                      context="32260@3gpp.org"))
        assert answer.get("Result-Code") == 2001
        assert await money(app) == START_MONEY - int(expected_call * EUR)

        # a 3-second call costs the minimum plus the fee, not 30 s of price
        short = "pgw1.gw.test;ext-short"
        await gw.request(ccr(short, 1, 0, mscc(VOICE, RSU), context="32260@3gpp.org"))
        await gw.request(ccr(short, 3, 1, mscc(VOICE, usu("CC-Time", 3)), context="32260@3gpp.org"))
        assert await money(app) == START_MONEY - int((expected_call + Decimal("0.50")) * EUR)

        # SMS: 0.20 each, at most 0.50 a day (events, CCR-E direct debit)
        before = await money(app)
        charged = []
        for n in range(4):
            event = [("Session-Id", f"smsc;ext-sms-{n}"), ("Origin-Host", "pgw1.gw.test"),
                     ("Origin-Realm", "gw.test"), ("Destination-Realm", "test"), ("Auth-Application-Id", 4),
                     ("Service-Context-Id", "32274@3gpp.org"), ("CC-Request-Type", 4), ("CC-Request-Number", 0),
                     ("Requested-Action", 0),
                     ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", MSISDN)]),
                     ("Multiple-Services-Indicator", 1),
                     ("Multiple-Services-Credit-Control", mscc(300, ("Requested-Service-Unit",
                                                                     [("CC-Service-Specific-Units", 1)])))]
            assert (await gw.request(event)).get("Result-Code") == 2001
            now = await money(app)
            charged.append(before - now)
            before = now
        assert charged == [200_000, 200_000, 100_000, 0]
        spent, priced = 0, []
        for _ in range(4):  # each SMS as ratecards.pricing prices it, against what the day already cost
            priced.append(charge_for_usage(sms, 1, spent_before=spent))
            spent += priced[-1]
        assert charged == priced
        clock.advance(86_400)  # the next day: a new cap period
        event[0] = ("Session-Id", "smsc;ext-sms-next-day")
        assert (await gw.request(event)).get("Result-Code") == 2001
        assert before - await money(app) == 200_000

        await wait_for(lambda: _cdr_total(tmp_path), timeout=10)
        report = await audit(app.store, tmp_path / "cdr")
        assert report.ok, report.differences
    finally:
        gw.close()
        await app.stop()


async def _cdr_total(tmp_path: Path) -> bool:
    return len(cdr_records(tmp_path / "cdr")) >= 5
